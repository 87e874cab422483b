//! protect: the route's defences applied to one request, after `route`:
//! bans (403), the route's IP lists (403), attack mode (a tightened rate
//! for the flooding sources), the route's rate limit (429) and the
//! challenge (307); and, in `admit`, load shedding (503). The tables they
//! consult live in `crate::protect`.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::ConnInfo;
use crate::body::ProxyBody;
use crate::config::ChallengeWhen;
use crate::error::ProxyError;
use crate::observe::diag;
use crate::protect::bans::StrikeKind;
use crate::protect::detect::Sample;
use crate::protect::{Strike, adaptive, network, shedding};
use crate::state::Snapshot;
use crate::upstream::balance;

/// The `protect` phase of a routed request: bans (403), the route's IP
/// lists (403), attack mode (a tightened rate for the flooding sources,
/// 429 beyond it), the route's rate limit (429) and the challenge (a 307
/// answer). `Ok(None)`: the request goes on. Challenges sent and requests
/// refused by the route's own rate limit are strikes toward a ban;
/// refusals by attack mode's tightened rate are not (a verdict is not
/// evidence).
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
    let bans = snapshot.bans.as_deref();
    if limiter.is_none()
        && route.ip_filter.is_empty()
        && route.challenge == ChallengeWhen::Never
        && adaptive.is_none()
        && bans.is_none()
    {
        return Ok(None);
    }
    let client = client_of(req, conn, snapshot);
    let now_ms = crate::upstream::health::now_ms();
    if let Some(bans) = bans {
        if bans.is_banned(client, now_ms) {
            if bans.enforced() {
                *protection = Some("banned");
                if let Some(left_out) = diag::BANNED.admit_now() {
                    tracing::info!(phase = "protect", client = %bans.shown(client), left_out, "request of a banned client refused");
                }
                // Over HTTP/2 too, the connection ends (GOAWAY): the next
                // one meets the ban at accept.
                conn.close.notify_one();
                return Err(ProxyError::Banned);
            }
            *protection = Some("shadow_banned");
        }
    }
    if !route.ip_filter.permits(client) {
        *protection = Some("ip_denied");
        return Err(ProxyError::Forbidden);
    }
    let client_net = network(client, config.protect.ipv6_prefix);
    let mut challenge = route.challenge == ChallengeWhen::Always;
    if let Some(adaptive) = adaptive {
        challenge |= attack_mode(adaptive, req, snapshot, route_index, client, client_net, protection)?;
    }
    if let Some(limit) = limiter {
        if let Err(wait) = limit.limiter.check(limit.key(client, client_net, req.headers())) {
            *protection = Some("rate_limited");
            // Only a limit of the address itself is the address's doing;
            // a shared prefix, API key or cookie could strike neighbours.
            if limit.config_key() == &crate::config::RateKey::ClientIp {
                strike(snapshot, client, now_ms, StrikeKind::RateLimited);
            }
            if let Some(left_out) = diag::REFUSED.admit_now() {
                tracing::info!(phase = "protect", %client, route = %route.name, left_out, "request refused by the route's rate limit");
            }
            return Err(ProxyError::RateLimited {
                retry_after: retry_after(wait),
            });
        }
    }
    if challenge && !has_valid_cookie(req.headers(), snapshot, client) {
        *protection = Some("challenged");
        strike(snapshot, client, now_ms, StrikeKind::Challenged);
        if let Some(left_out) = diag::CHALLENGED.admit_now() {
            tracing::info!(phase = "protect", %client, route = %route.name, left_out, "challenge sent");
        }
        let now = crate::state::unix_now();
        return Ok(Some(challenge_response(
            req,
            &config.protect.challenge.cookie,
            &snapshot.challenge.issue(client, now),
            snapshot.challenge.lifetime(),
        )));
    }
    Ok(None)
}

/// Attack mode's part of `protect`: the request is counted by the
/// detector; while an attack is on, a suspect over its tightened rate is
/// refused (429, not a strike), and routes with `challenge = "attack"`
/// challenge. Returns whether to challenge; in shadow mode only the
/// `protection` word says what would have been done.
fn attack_mode(
    adaptive: &crate::protect::Adaptive,
    req: &Request<Incoming>,
    snapshot: &Snapshot,
    route_index: usize,
    client: std::net::IpAddr,
    client_net: std::net::IpAddr,
    protection: &mut Option<&'static str>,
) -> Result<bool, ProxyError> {
    let client_key = adaptive::client_hash(client_net);
    adaptive.observe(Sample {
        client: client_key,
        signature: adaptive::signature(req.method(), req.uri().path(), req.headers()),
        has_cookie: req.headers().contains_key(header::COOKIE),
        route: Some(route_index),
    });
    if !adaptive.in_attack() {
        return Ok(false);
    }
    let enforce = adaptive.step.enforced();
    if adaptive.is_suspect(client_key) {
        if let Err(wait) = adaptive.check_suspect(client_key) {
            if enforce {
                *protection = Some("attack_source_limited");
                if let Some(left_out) = diag::REFUSED.admit_now() {
                    tracing::info!(phase = "protect", %client, left_out, "attack source held to suspect_rate");
                }
                return Err(ProxyError::RateLimited {
                    retry_after: retry_after(wait),
                });
            }
            *protection = Some("shadow_attack_source");
        }
    }
    if snapshot.config.routes[route_index].challenge != ChallengeWhen::DuringAttack || adaptive.is_known(client_key) {
        // Known clients (trusted, or heavy with a calm history) are not
        // challenged by attack mode.
        return Ok(false);
    }
    if !enforce && protection.is_none() {
        *protection = Some("shadow_challenge");
    }
    Ok(enforce)
}

/// The `admit` phase's load shedding: when the upstream group has as
/// many requests waiting for response headers as its adaptive concurrency
/// limit allows, untrusted clients are answered `503` at once; trusted
/// ones (a valid challenge cookie, or a calm history the detector has seen
/// over two generations and never in a spike) may use the reserve. Only past the untrusted share of the limit is the client
/// looked at, so a calm proxy pays two atomic loads. An admitted request
/// counts as waiting until the returned guard is dropped.
pub async fn check_load(
    headers: &http::HeaderMap,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    upstream_index: usize,
    route_index: usize,
    protection: &mut Option<&'static str>,
) -> Result<Option<shedding::Waiting>, ProxyError> {
    let Some(Some(shedder)) = snapshot.shedders.get(upstream_index) else {
        return Ok(None);
    };
    if let Some(waiting) = shedder.try_wait(false) {
        return Ok(Some(waiting));
    }
    let client = crate::observe::client_ip(
        headers,
        conn.peer.ip().to_canonical(),
        conn.trusted,
        &snapshot.config.server.trusted_proxies,
    );
    let route = &snapshot.config.routes[route_index];
    // Without a way to tell clients apart, everyone may use the whole limit.
    let can_tell = snapshot.adaptive.is_some() || route.challenge != ChallengeWhen::Never;
    let trusted = !can_tell
        || snapshot.adaptive.as_ref().is_some_and(|a| {
            a.is_trusted(adaptive::client_hash(network(
                client,
                snapshot.config.protect.ipv6_prefix,
            )))
        })
        || has_valid_cookie(headers, snapshot, client);
    if trusted {
        if let Some(waiting) = shedder.try_wait(true) {
            return Ok(Some(waiting));
        }
        if shedder.mode.enforced() {
            if let Some(waiting) = shedder.queue().await {
                return Ok(Some(waiting));
            }
        }
    }
    if shedder.mode.enforced() {
        *protection = Some("shed");
        if let Some(left_out) = diag::SHED.admit_now() {
            tracing::warn!(phase = "admit", %client, route = %route.name, limit = shedder.limit(), left_out, "request shed: the upstream group is at its concurrency limit");
        }
        return Err(ProxyError::Overloaded {
            retry_after: shedder.retry_after,
        });
    }
    if protection.is_none() {
        *protection = Some("shadow_shed");
    }
    Ok(Some(shedder.wait()))
}

/// The client as protection sees it: the peer, or the address a trusted
/// proxy forwarded for.
fn client_of(req: &Request<Incoming>, conn: &ConnInfo, snapshot: &Snapshot) -> std::net::IpAddr {
    crate::observe::client_ip(
        req.headers(),
        conn.peer.ip().to_canonical(),
        conn.trusted,
        &snapshot.config.server.trusted_proxies,
    )
}

fn has_valid_cookie(headers: &http::HeaderMap, snapshot: &Snapshot, client: std::net::IpAddr) -> bool {
    let name = &snapshot.config.protect.challenge.cookie;
    let now = crate::state::unix_now();
    balance::cookie(headers, name).is_some_and(|value| snapshot.challenge.verify(value, client, now).is_ok())
}

/// Whole seconds to wait, at least 1 (for `Retry-After`).
fn retry_after(wait: std::time::Duration) -> u32 {
    u32::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Counts a strike toward a ban; logs (one line a second), audits and
/// counts a new ban with its evidence.
fn strike(snapshot: &Snapshot, client: std::net::IpAddr, now_ms: u64, kind: StrikeKind) {
    let Some(bans) = &snapshot.bans else { return };
    let tally = match bans.strike(client, now_ms, kind) {
        Strike::Banned(tally) => tally,
        Strike::Capped => {
            if let Some(m) = &snapshot.observe.metrics {
                m.bans_capped_total.inc();
            }
            if let Some(left_out) = diag::BANS.admit_now() {
                tracing::warn!(phase = "protect", client = %bans.shown(client), max_per_minute = bans.config.max_per_minute, left_out, "ban not made: max_per_minute reached");
            }
            return;
        }
        Strike::Counted | Strike::Ignored => return,
    };
    {
        let mode = if bans.enforced() { "enforce" } else { "shadow" };
        let seconds = bans.config.duration.as_secs();
        let reason = tally.reasons(bans.config.window);
        if let Some(left_out) = diag::BANS.admit_now() {
            tracing::warn!(phase = "protect", client = %bans.shown(client), %mode, seconds, %reason, left_out, "client banned");
        }
        if let Some(m) = &snapshot.observe.metrics {
            m.bans_total.inc();
        }
        snapshot.observe.audit(crate::observe::Event::Ban {
            client: bans.shown(client),
            mode: mode.into(),
            reason,
            seconds,
        });
    }
}

/// The challenge: `307` back to the same target with a cookie that proves,
/// on the next request, that the client keeps cookies (browsers do, most
/// flood tools do not). 307 keeps the method and body.
fn challenge_response(req: &Request<Incoming>, name: &str, value: &str, lifetime: u64) -> Response<ProxyBody> {
    // The path is normalised (no `//`), but a `Location` starting with
    // `//` would name another host: never send one.
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|t| t.starts_with('/') && !t.starts_with("//"))
        .unwrap_or("/");
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
