//! Protection of the origins: limits applied before a request reaches an
//! upstream. docs/protection.md has the threat model.
//!
//! What is here today (layers 1 and 2 of the plan):
//! - [`connections`]: at accept, before any byte is read: IP allow / deny
//!   lists, a global and a per-IP cap on open connections, and a per-IP
//!   new-connection rate;
//! - [`rate`]: GCRA rate limits (governor) per route, keyed by client IP,
//!   IP prefix, header or cookie, answered `429` with `Retry-After`.
//!
//! The timers against slow clients (header read from the first byte, idle
//! keep-alive, TLS handshake) live with the connection (`server/conn.rs`),
//! the request limits with the pipeline (`validate`). Adaptive spike
//! detection, challenges and bans are the next layers.

pub mod adaptive;
pub mod challenge;
pub mod connections;
pub mod detect;
pub mod rate;

pub use adaptive::{Adaptive, AdaptiveState};
pub use challenge::{Challenge, CookieError};
pub use connections::{ConnSlot, ConnTable, Refusal};
pub use rate::{Limiter, RouteLimiter};
