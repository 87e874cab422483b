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
//! [`check_request`] is the pipeline's `protect` phase: the route's IP
//! lists, attack mode, rate limit and challenge, in that order.
//!
//! The timers against slow clients (header read from the first byte, idle
//! keep-alive, TLS handshake) live with the connection (`server/conn.rs`),
//! the request limits with the pipeline (`validate`). Bans and origin load
//! shedding are the next layers.

pub mod adaptive;
pub mod challenge;
pub mod connections;
pub mod detect;
pub mod rate;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::config::{AdaptiveMode, ChallengeWhen};
use crate::error::ProxyError;
use crate::server::conn::ConnInfo;
use crate::state::Snapshot;
use crate::upstream::balance;
use detect::Sample;

pub use adaptive::{Adaptive, AdaptiveState};
pub use challenge::{Challenge, CookieError};
pub use connections::{ConnSlot, ConnTable, Refusal};
pub use rate::{Limiter, RouteLimiter};

/// The `protect` phase of a routed request: the route's IP lists (403),
/// attack mode (429 for the flooding sources), its rate limit (429) and
/// the challenge (a 307 answer). `Ok(None)`: the request goes on.
pub fn check_request(
    req: &Request<Incoming>,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    route_index: usize,
    protection: &mut Option<&'static str>,
) -> Result<Option<Response<ProxyBody>>, ProxyError> {
    let config = &snapshot.config;
    let route = &config.routes[route_index];
    let limiter = snapshot.route_limits.get(route_index).and_then(Option::as_ref);
    let adaptive = snapshot.adaptive.as_ref();
    if limiter.is_some() || !route.ip_filter.is_empty() || route.challenge != ChallengeWhen::Never || adaptive.is_some()
    {
        let client = crate::observe::client_ip(
            req.headers(),
            conn.peer.ip().to_canonical(),
            conn.trusted,
            &config.server.trusted_proxies,
        );
        if !route.ip_filter.permits(client) {
            *protection = Some("ip_denied");
            return Err(ProxyError::Forbidden);
        }
        let mut challenge = route.challenge == ChallengeWhen::Always;
        if let Some(adaptive) = adaptive {
            let client_key = adaptive::client_hash(client);
            adaptive.observe(Sample {
                client: client_key,
                signature: adaptive::signature(req.method(), req.uri().path(), req.headers()),
                has_cookie: req.headers().contains_key(header::COOKIE),
            });
            if adaptive.in_attack() {
                let enforce = adaptive.config.mode == AdaptiveMode::Enforce;
                if adaptive.is_suspect(client_key) {
                    if enforce {
                        *protection = Some("attack_source_refused");
                        let retry_after = adaptive.config.window.as_secs().max(1) as u32;
                        return Err(ProxyError::RateLimited { retry_after });
                    }
                    *protection = Some("shadow_attack_source");
                }
                if route.challenge == ChallengeWhen::DuringAttack {
                    if enforce {
                        challenge = true;
                    } else if protection.is_none() {
                        *protection = Some("shadow_challenge");
                    }
                }
            }
        }
        if let Some(limit) = limiter {
            if let Err(wait) = limit.limiter.check(limit.key(client, req.headers())) {
                *protection = Some("rate_limited");
                let retry_after = u32::try_from(wait.as_millis().div_ceil(1000))
                    .unwrap_or(u32::MAX)
                    .max(1);
                return Err(ProxyError::RateLimited { retry_after });
            }
        }
        if challenge {
            let name = &config.protect.challenge.cookie;
            let now = crate::state::unix_now();
            let passed = balance::cookie(req.headers(), name)
                .is_some_and(|value| snapshot.challenge.verify(value, client, now).is_ok());
            if !passed {
                *protection = Some("challenged");
                return Ok(Some(challenge_response(
                    req,
                    name,
                    &snapshot.challenge.issue(client, now),
                    snapshot.challenge.lifetime(),
                )));
            }
        }
    }
    Ok(None)
}

/// The challenge: `307` back to the same target with a cookie that proves,
/// on the next request, that the client keeps cookies (browsers do, most
/// flood tools do not). 307 keeps the method and body.
fn challenge_response(req: &Request<Incoming>, name: &str, value: &str, lifetime: u64) -> Response<ProxyBody> {
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(target) {
        headers.insert(header::LOCATION, location);
    }
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={lifetime}; HttpOnly; SameSite=Lax"
    )) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}
