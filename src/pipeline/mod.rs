//! The request phases, in order, in one readable function ([`forward`]),
//! one file per phase with the same names as docs/request-lifecycle.md:
//!
//! 1. [`validate`]: limits and framing the parser did not enforce, a
//!    valid host, the path in its normal form;
//! 2. [`route`]: host + path -> route -> upstream group;
//! 3. [`protect`]: bans, the route's IP lists, attack mode, rate limit,
//!    challenge;
//! 4. [`admit`]: the declared body size, upgrades to HTTP/2 groups; load
//!    shedding (`protect::check_load`) after the cache;
//! 5. [`cache`]: on caching routes, an answer from the store, or the plan
//!    for the origin's answer;
//! 6. [`rewrite`]: the header fields (before the cache on caching routes)
//!    and the target;
//! 7. select and send ([`exchange`]): a server of the group, retried on
//!    another when that is safe;
//! 8. [`respond`]: the cache sees the origin's answer first, then `Via`,
//!    route edits and the sticky cookie; errors become responses here;
//!    an accepted upgrade becomes a [`tunnel`].
//!
//! [`record`] is the request's log and metrics record, carried by the
//! response body and finished when it ends; [`conn`] what a request knows
//! of its connection; [`context`] the facts the phases pass each other.
//! Every failure is a [`ProxyError`], turned into a response in one place.

mod admit;
mod cache;
mod conn;
mod context;
mod exchange;
mod protect;
mod record;
mod respond;
mod rewrite;
mod route;
mod tunnel;
mod validate;
pub use validate::ConflictingFraming;

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

pub use conn::{ConnHold, ConnInfo};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::observe::request_id;
use crate::state::Snapshot;
use context::Outbound;
pub use context::Phase;
use record::{Observation, Trace};

/// Serves one request: the upstream's response, or the proxy's error.
pub async fn handle(mut req: Request<Incoming>, conn: &Arc<ConnInfo>, snapshot: &Arc<Snapshot>) -> Response<ProxyBody> {
    let observe = &snapshot.observe;
    let exchange = observe
        .tracks_requests()
        .then(|| Observation::start(observe, snapshot, conn, &req));
    let (request_id, traceparent) = request_ids(&mut req, conn, snapshot, exchange.is_some());
    let method = req.method().clone();
    let version = req.version();
    let mut trace = Trace {
        bytes_in: exchange.as_ref().and_then(|e| e.trace.bytes_in.clone()),
        ..Trace::default()
    };
    let (mut response, error) = match conn.redirect_https_port {
        Some(port) => (validate::redirect_to_https(&req, port), None),
        None => handle_inner(req, conn, snapshot, &method, &mut trace).await,
    };
    if let Some(hsts) = &conn.hsts {
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    if error == Some("http_request_error") && version < Version::HTTP_2 {
        // A malformed request leaves the connection in doubt: close it.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let (Some(name), Some(id)) = (&snapshot.config.request_id.header, &request_id) {
        response.headers_mut().insert(name.clone(), id.clone());
    }
    if let Some(mut exchange) = exchange {
        exchange.status = response.status().as_u16();
        exchange.trace = trace;
        exchange.request_id = request_id;
        exchange.traceparent = traceparent;
        exchange.error = error;
        response.body_mut().set_record(exchange);
    }
    response
}

/// The request id (kept from a trusted proxy, else new; written into the
/// request for the upstream) and the `traceparent` (created if configured).
fn request_ids(
    req: &mut Request<Incoming>,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    logged: bool,
) -> (Option<HeaderValue>, Option<HeaderValue>) {
    let settings = &snapshot.config.request_id;
    let id = settings.header.as_ref().map(|name| {
        let incoming = req
            .headers()
            .get(name)
            .filter(|v| conn.trusted && settings.trust_incoming && request_id::valid_incoming(v));
        match incoming {
            Some(v) => v.clone(),
            None => {
                let id = request_id::new_id();
                req.headers_mut().insert(name.clone(), id.clone());
                id
            }
        }
    });
    // Read only when it is created or logged.
    if !settings.create_traceparent && !logged {
        return (id, None);
    }
    let traceparent_name = HeaderName::from_static("traceparent");
    let mut traceparent = req.headers().get(&traceparent_name).cloned();
    if settings.create_traceparent && !traceparent.as_ref().is_some_and(request_id::valid_traceparent) {
        let created = request_id::new_traceparent(id.as_ref().unwrap_or(&request_id::new_id()));
        req.headers_mut().insert(traceparent_name, created.clone());
        traceparent = Some(created);
    }
    (id, traceparent)
}

async fn handle_inner(
    req: Request<Incoming>,
    conn: &Arc<ConnInfo>,
    snapshot: &Arc<Snapshot>,
    method: &Method,
    trace: &mut Trace,
) -> (Response<ProxyBody>, Option<&'static str>) {
    match forward(req, conn, snapshot, trace).await {
        Ok(response) => (response, None),
        Err(error) => {
            let phase = trace.phase.as_str();
            if matches!(error, ProxyError::Overloaded { .. }) {
                // Logged (one line a second) where it was shed.
            } else if error.is_upstream() {
                if let Some(left_out) = crate::observe::diag::UPSTREAM_FAILED.admit_now() {
                    tracing::warn!(phase, peer = %conn.peer, %method, %error, left_out, "request failed upstream");
                }
            } else {
                tracing::debug!(phase, peer = %conn.peer, %method, %error, "request refused");
            }
            let mut response = respond::error_response(error);
            if method == Method::CONNECT {
                // The client may already be sending tunnel bytes: they must
                // not be read as the next request.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            (response, error.status().1)
        }
    }
}

/// The phases of one request, in order.
async fn forward(
    mut req: Request<Incoming>,
    conn: &Arc<ConnInfo>,
    snapshot: &Arc<Snapshot>,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    let mut checked = validate::request(&mut req, &snapshot.config)?;
    trace.phase = Phase::Route;
    let route_index = route::route(&mut req, &mut checked, snapshot, trace)?;
    trace.phase = Phase::Protect;
    if let Some(answer) = protect::check_request(&req, conn, snapshot, route_index, &mut trace.protection)? {
        return Ok(answer);
    }
    trace.phase = Phase::Admit;
    admit::admit(&req, snapshot, route_index, checked.kind)?;
    let route = &snapshot.config.routes[route_index];
    let host = checked.host.as_ref();
    let version = req.version();
    let mut plan = cache::Plan::new(route, snapshot, checked.kind);
    // Load shedding judges the client by the fields it sent, not by the
    // ones the rewrite gives the origin.
    let shedding = matches!(snapshot.shedders.get(route.upstream), Some(Some(_)));
    let as_sent = (plan.caching() && shedding).then(|| req.headers().clone());
    // On caching routes the fields are rewritten first: cache keys and
    // `Vary` are worked out on what the origin will see.
    if plan.caching() {
        rewrite::fields(req.headers_mut(), version, checked.kind, conn, snapshot, route, host);
    }
    trace.phase = Phase::Cache;
    if let Some(answer) = plan.lookup(&mut req, conn, snapshot, route_index, host, trace).await {
        return Ok(answer);
    }
    // A small body is read whole here, before load shedding and the
    // choice of an upstream: a slow upload holds neither.
    trace.phase = Phase::Admit;
    let client_upgrade: Option<OnUpgrade> = checked.kind.is_upgrade().then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut body = admit::request_body(body, snapshot, checked.kind, trace);
    admit::buffer(
        &mut body,
        snapshot,
        checked.kind,
        (started + snapshot.config.timeouts.body_read).min(started + snapshot.config.timeouts.request),
    )
    .await?;
    let mut req = Request::from_parts(parts, body);
    // Held until the response head arrives (or the exchange fails).
    let headers = as_sent.as_ref().unwrap_or(req.headers());
    let shed_wait = protect::check_load(
        headers,
        conn,
        snapshot,
        route.upstream,
        route_index,
        &mut trace.protection,
    )
    .await?;
    if !plan.caching() {
        rewrite::fields(req.headers_mut(), version, checked.kind, conn, snapshot, route, host);
    }
    let (parts, body) = req.into_parts();
    let outbound = Outbound {
        route_index,
        host,
        kind: checked.kind,
        started,
    };
    let exchanged = exchange::exchange(parts, body, client_upgrade, conn, snapshot, &outbound, trace).await;
    drop(shed_wait);
    if exchanged.is_ok() {
        // A failed exchange keeps the phase it failed in (the cache may
        // still answer it stale).
        trace.phase = Phase::Cache;
    }
    let (response, picked) = match plan.answer(exchanged, snapshot, route, version, trace)? {
        Ok(pair) => pair,
        Err(answered) => return Ok(answered),
    };
    trace.phase = Phase::Respond;
    let (mut parts, body) = response.into_parts();
    respond::decorate(&mut parts.headers, snapshot, route, parts.version);
    if let Some(picked) = &picked {
        respond::sticky(&mut parts.headers, &snapshot.upstreams[route.upstream], picked);
    }
    parts.version = version;
    Ok(Response::from_parts(parts, body))
}
