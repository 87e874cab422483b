//! Portcullis: a reverse proxy for HTTP/1.1 and HTTP/2.
//!
//! The library holds the whole proxy; `main.rs` is a thin command line over
//! it. A proxy is built from a validated [`config::Config`], bound with
//! [`Proxy::bind`] and served with [`Proxy::run`].
//!
//! # Layout
//! - [`config`]: the TOML file model, validation with paths, runtime config;
//! - [`server`]: listeners, accept loop, connection timers, graceful drain;
//! - [`pipeline`]: the request phases, in order;
//! - [`routing`]: host and path matching (pure);
//! - [`forwarding`]: hop-by-hop and forwarding header rules (pure);
//! - [`cache`]: the shared HTTP cache (RFC 9111): pure rules, store,
//!   coalescing and the pipeline's cache phase;
//! - [`upstream`]: upstream groups, name resolution, connection pools;
//! - [`observe`]: access log, audit log, metrics, request ids;
//! - [`protect`]: connection limits, IP lists and rate limits;
//! - [`body`]: request and response body types (streaming, limits);
//! - [`error`]: the error type and its status / `Proxy-Status` mapping;
//! - [`secret`]: key files and hex, for the audit log and challenge cookie;
//! - [`state`]: the runtime snapshot behind one `ArcSwap`;
//! - [`target`]: the normalised path and the host rules (pure);
//! - [`tls`]: certificates, the SNI store, rustls configs for listeners and
//!   upstreams;
//! - [`demo`]: built-in origins for `portcullis demo` and tests.

pub mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod forwarding;
pub mod observe;
pub mod pipeline;
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
