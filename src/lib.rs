//! Portcullis: a reverse proxy for HTTP/1.1 and HTTP/2.
//!
//! The library holds the whole proxy; `main.rs` is a thin command line over
//! it. A proxy is built from a validated [`config::Config`], bound with
//! [`Proxy::bind`] and served with [`Proxy::run`].
//!
//! # Layout
//! Five layers, each importing only from itself and the layers below
//! (ARCHITECTURE.md; enforced by `tests/architecture.rs`):
//! 0. rules, pure: [`config`] (the file model and its validation),
//!    [`routing`], [`forwarding`], [`target`], [`error`], [`secret`], the
//!    cache rules in [`cache`], the balancing algorithms in [`upstream`],
//!    the attack detector in [`protect`], [`plan`] (what a new config
//!    changes) and [`change`] (the changes an operator can make);
//! 1. runtime state built from a config: [`cache`] (store, flights, the
//!    cache phase's plumbing), [`upstream`] (groups, pools, health),
//!    [`protect`] (connection table, bans, limiters, shedding, challenge),
//!    [`observe`] (logs, audit, metrics), [`tls`], [`body`], and [`state`]
//!    (the immutable snapshot and the kept state that outlives it);
//! 2. the request path: [`pipeline`], one file per phase;
//! 3. serving: [`server`] (listeners, connections, validation with I/O,
//!    reload, `Control` and the admin API, graceful drain) and [`demo`];
//! 4. `main.rs`, the command line.

pub mod body;
pub mod cache;
pub mod change;
pub mod config;
pub mod demo;
pub mod error;
pub mod forwarding;
pub mod observe;
pub mod pipeline;
pub mod plan;
pub mod protect;
pub mod routing;
pub mod secret;
pub mod server;
pub mod state;
pub mod target;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{Proxy, StartError};
