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

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::ProtectMode;

/// The mode of one step of the mitigation ladder (bans, attack mode, load
/// shedding): the config's, until the operator switches it (admin API).
/// It lives in the step's runtime object, so a switch lasts as long as
/// the object: through reloads that leave the step's settings unchanged,
/// and until one that changes them (the file's newer word wins).
#[derive(Debug)]
pub struct StepMode(AtomicBool);

impl StepMode {
    pub fn new(mode: ProtectMode) -> StepMode {
        StepMode(AtomicBool::new(mode == ProtectMode::Enforce))
    }

    pub fn get(&self) -> ProtectMode {
        if self.0.load(Ordering::Relaxed) {
            ProtectMode::Enforce
        } else {
            ProtectMode::Shadow
        }
    }

    pub fn set(&self, mode: ProtectMode) {
        self.0.store(mode == ProtectMode::Enforce, Ordering::Relaxed);
    }

    pub fn enforced(&self) -> bool {
        self.get() == ProtectMode::Enforce
    }
}
