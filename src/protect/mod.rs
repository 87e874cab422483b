//! Protection of the origins: limits applied before a request reaches an
//! upstream. docs/protection.md has the threat model.
//!
//! - [`connections`]: at accept, before any byte is read: IP allow / deny
//!   lists, a global and a per-IP cap on open connections, and a per-IP
//!   new-connection rate;
//! - [`rate`]: GCRA rate limits (governor) per route, keyed by client IP,
//!   IP prefix, header or cookie, answered `429` with `Retry-After`;
//! - [`challenge`]: the HMAC-signed, IP-bound challenge cookie;
//! - [`detect`]: the spike detector (pure), and [`adaptive`]: attack mode
//!   built on it.
//!
//! The pipeline's `protect` phase (`pipeline::protect`) applies them to a
//! routed request: the route's IP lists, attack mode, rate limit and
//! challenge, in that order; its `admit` phase runs load shedding.
//!
//! The timers against slow clients (header read from the first byte, idle
//! keep-alive, TLS handshake) live with the connection (`server/conn.rs`),
//! the request limits with the pipeline (`validate`).
//!
//! - [`bans`]: clients that keep failing (challenges, refused requests)
//!   are shut out for a while, at accept and per request;
//! - [`shedding`]: the adaptive concurrency limit per upstream group.

pub mod adaptive;
pub mod bans;
pub mod challenge;
pub mod connections;
pub mod detect;
pub mod proxy_protocol;
pub mod rate;
pub mod shedding;

pub use adaptive::{Adaptive, AdaptiveState};
pub use bans::{BanInfo, Bans, Strike};
pub use challenge::{Challenge, CookieError};
pub use connections::{ConnSlot, ConnTable, Refusal};
pub use rate::{Limiter, RouteLimiter, network};
pub use shedding::Shedder;
