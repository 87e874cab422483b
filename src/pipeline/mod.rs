//! The request phases, in order, in one readable function ([`forward`]).
//! docs/request-lifecycle.md draws the same phases with the same names:
//!
//! 1. `validate`: limits and framing the parser did not already enforce
//!    (URI length, header bytes, `Host` rules, CONNECT policy);
//! 2. `route`: host + path -> route -> upstream group; then `protect`
//!    (`protect::check_request`): the route's IP lists (403), attack mode,
//!    rate limit (429) and challenge (307);
//! 3. `admit`: a declared body larger than the limit is refused before a
//!    byte of it is read (and before `100 Continue` is sent);
//!    then `cache` on caching routes ([`crate::cache::Cache::lookup`]: a
//!    response from the store, or a wait on the URL's flight) and load
//!    shedding (`protect::check_load`);
//! 4. `rewrite`: the upstream request: hop-by-hop fields removed,
//!    forwarding headers set, route edits, `Host`, path rewrite;
//! 5. `select`: a server of the group;
//! 6. `send`: pooled connection, request head and streamed body, response
//!    head within the timeouts;
//! 7. `respond`: the cache sees the origin's response first (stores it
//!    through a body tee, refreshes on 304, serves stale on errors); then
//!    hop-by-hop fields removed, `Via`, route edits; the body streams back;
//!    an accepted upgrade becomes a byte `tunnel`.
//!
//! Steps 4 to 6 are [`exchange`], which the cache's background
//! revalidation calls as well.
//!
//! Every failure is a [`ProxyError`], turned into a response in one place.

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

mod conn;
mod protect;
mod record;
mod respond;
mod tunnel;

pub use conn::{ConnHold, ConnInfo};

use crate::body::{BodyTooLarge, BodyTooSlow, ProxyBody, RequestBody, find_cause};
use crate::cache;
use crate::cache::serve::{CACHE_STATUS, Lookup, outcome};
use crate::config::{Limits, RouteConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::forwarding::{self, Hop};
use crate::observe::request_id;
use crate::state::Snapshot;
use crate::upstream::pool::SendError;
use crate::upstream::{Outcome, PickContext, balance};
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
        Some(port) => (redirect_to_https(&req, port), None),
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
            if error.is_upstream() {
                tracing::warn!(peer = %conn.peer, %method, %error, "request failed upstream");
            } else {
                tracing::debug!(peer = %conn.peer, %method, %error, "request refused");
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

async fn forward(
    mut req: Request<Incoming>,
    conn: &Arc<ConnInfo>,
    snapshot: &Arc<Snapshot>,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    let config = &snapshot.config;

    // validate
    if !config.server.allowed_methods.contains(req.method()) {
        return Err(ProxyError::MethodNotImplemented);
    }
    validate(&req, &config.limits)?;
    let host = request_host(&req)?;
    let kind = exchange_kind(&req, &config.server.upgrade_protocols);
    let is_connect = kind == Exchange::Connect;
    if kind != Exchange::Plain && declares_body(&req)? {
        // A tunnel carries no request body: the declared bytes would be
        // read by the origin as the next request (request smuggling).
        return Err(ProxyError::BadRequest);
    }
    let raw_target = normalize_target(&mut req, config.server.encoded_slash)?;

    // route
    let path = req.uri().path();
    let lookup_path = if path == "*" || is_connect { "/" } else { path };
    let host_text = host.as_ref().and_then(|h| h.to_str().ok());
    let route_index = snapshot
        .router
        .route(host_text, lookup_path)
        .ok_or(ProxyError::NoRoute)?;
    let route = &config.routes[route_index];
    trace.route = Some(route_index);
    if is_connect && !route.allow_connect {
        return Err(ProxyError::MethodNotAllowed);
    }
    if let (true, Some(raw)) = (route.raw_path, raw_target) {
        req.extensions_mut().insert(RawTarget(raw));
    }

    // protect: the route's IP lists, attack mode, rate limit, challenge
    if let Some(answer) = protect::check_request(&req, conn, snapshot, route_index, &mut trace.protection)? {
        return Ok(answer);
    }

    // admit
    if let (Some(limit), Some(declared)) = (config.limits.max_request_body_bytes, content_length(&req)?) {
        if declared > limit {
            return Err(ProxyError::BodyTooLarge);
        }
    }

    let upstream = &snapshot.upstreams[route.upstream];
    let upgrade = kind != Exchange::Plain;
    if upgrade && upstream.config.protocol == UpstreamProtocol::H2 {
        // Tunnels to HTTP/2 upstreams would need extended CONNECT upstream,
        // which origins rarely enable: refused plainly instead.
        return Err(ProxyError::UpgradeFailed);
    }

    // cache: a GET or HEAD may be answered from the store; an unsafe
    // request that succeeds invalidates what the store holds for its URL
    let caching = match (&route.cache, &snapshot.cache) {
        (Some(options), Some(cache)) if !upgrade => Some((options, cache)),
        _ => None,
    };
    let version = req.version();
    // Load shedding judges the client by the fields it sent.
    let shedding = matches!(snapshot.shedders.get(route.upstream), Some(Some(_)));
    let as_sent = (caching.is_some() && shedding).then(|| req.headers().clone());
    if caching.is_some() {
        // rewrite (the header fields) first: cache keys and `Vary` are
        // worked out on what the origin will see.
        rewrite_fields(req.headers_mut(), version, kind, conn, snapshot, route, host.as_ref());
    }
    let mut pending = None;
    let mut invalidate = None;
    // A method the cache does not serve, or a GET / HEAD with a body.
    let mut bypass_status = "portcullis; fwd=method";
    if let Some((options, cache)) = caching {
        let host_text = host.as_ref().map(|h| String::from_utf8_lossy(h.as_bytes()));
        let host_text = host_text.as_deref().unwrap_or("");
        // The scheme the client used: a trusted terminator's, else ours.
        let scheme = match req
            .headers()
            .get(&forwarding::X_FORWARDED_PROTO)
            .map(HeaderValue::as_bytes)
        {
            Some(b"https") => "https",
            Some(b"http") => "http",
            _ => conn.scheme,
        };
        let url = cache::key::url_key(scheme, host_text, req.uri(), options);
        let bodiless = http_body::Body::is_end_stream(req.body());
        if (req.method() == Method::GET || req.method() == Method::HEAD) && bodiless {
            // Parameters left out of the key never reach the origin either,
            // so they cannot change what is stored.
            if let Some(uri) = cache::key::strip_unkeyed(req.uri(), options) {
                *req.uri_mut() = uri;
            }
            let key = cache::key::primary_key(url, req.headers(), options);
            let method = req.method().clone();
            match cache.lookup(&method, req.headers_mut(), key, options).await {
                Lookup::Answer(response, outcome) => {
                    trace.cache = Some(outcome);
                    return Ok(finish_stored(response, snapshot, route, version));
                }
                Lookup::AnswerAndRefresh(response, refresh) => {
                    trace.cache = Some(outcome::STALE);
                    let (parts, _) = req.into_parts();
                    spawn_refresh(*refresh, parts, conn.detached(), snapshot.clone(), route_index, host);
                    return Ok(finish_stored(response, snapshot, route, version));
                }
                Lookup::Forward(p) => pending = Some(p),
                Lookup::OnlyIfCached => {
                    trace.cache = Some(outcome::BYPASS);
                    let mut response = respond::error_response(ProxyError::OnlyIfCached);
                    response.headers_mut().insert(
                        CACHE_STATUS.clone(),
                        HeaderValue::from_static(cache::serve::ONLY_IF_CACHED_STATUS),
                    );
                    return Ok(response);
                }
            }
        } else {
            trace.cache = Some(outcome::BYPASS);
            if req.method() == Method::GET || req.method() == Method::HEAD {
                bypass_status = "portcullis; fwd=bypass; detail=request-body";
            }
            if !req.method().is_safe() {
                invalidate = Some((url, format!("{scheme}://{host_text}")));
            }
        }
    }

    // Held until the response head arrives (or the exchange fails).
    let shed_wait = protect::check_load(
        as_sent.as_ref().unwrap_or(req.headers()),
        conn,
        snapshot,
        route.upstream,
        route_index,
        &mut trace.protection,
    )?;
    if caching.is_none() {
        // rewrite (the header fields)
        rewrite_fields(req.headers_mut(), version, kind, conn, snapshot, route, host.as_ref());
    }

    let client_upgrade: Option<OnUpgrade> = upgrade.then(|| hyper::upgrade::on(&mut req));
    let downstream_version = req.version();
    let (parts, body) = req.into_parts();
    let body = if upgrade {
        RequestBody::empty()
    } else {
        RequestBody::new(body, config.limits.max_request_body_bytes)
            .owned_fields(snapshot.owned_fields.clone())
            .counted(trace.bytes_in.clone())
            .min_rate(
                config
                    .protect
                    .min_body_rate
                    .map(|rate| (rate, config.protect.body_rate_grace)),
            )
    };
    let outbound = Outbound {
        route_index,
        host: host.as_ref(),
        kind,
        started,
    };
    let exchanged = exchange(parts, body, client_upgrade, conn, snapshot, &outbound, trace).await;
    drop(shed_wait);
    let (response, picked) = match (exchanged, pending) {
        (Ok(pair), pending_again) => {
            pending = pending_again;
            pair
        }
        (Err(error), Some(p)) => {
            // stale-if-error, when allowed
            trace.cache = Some(outcome::MISS);
            let response = p.on_error(error)?;
            trace.cache = Some(outcome::STALE);
            return Ok(finish_stored(response, snapshot, route, downstream_version));
        }
        (Err(error), None) => return Err(error),
    };

    // respond
    let (mut parts, mut body) = response.into_parts();
    if let Some(p) = pending {
        let handled = p.on_response(&mut parts);
        trace.cache = Some(handled.outcome);
        if let cache::serve::Answer::Replace(response) = handled.answer {
            if let Some(tee) = handled.tee {
                // The client is answered from the stored copy; the body
                // still has to arrive to be stored.
                body.set_tap(Box::new(tee));
                tokio::spawn(drain_body(body));
            }
            return Ok(finish_stored(*response, snapshot, route, downstream_version));
        }
        match handled.tee {
            // Others may wait for this body: read at the origin's pace.
            Some(tee) if tee.leads() => body = tee.feed(body),
            Some(tee) => body.set_tap(Box::new(tee)),
            None => {}
        }
    } else if let Some((_, cache)) = caching {
        if let Some((url, origin)) = &invalidate {
            if parts.status.is_success() || parts.status.is_redirection() {
                cache.invalidate(url, origin, &parts.headers);
            }
        }
        parts
            .headers
            .append(CACHE_STATUS.clone(), HeaderValue::from_static(bypass_status));
    }
    if let Some(via) = &snapshot.via {
        forwarding::append_via(&mut parts.headers, &via[via_index(parts.version)]);
    }
    route.response_headers.apply(&mut parts.headers);
    if let Some((chosen, pinned)) = picked {
        if let Some(cookie) = &upstream.config.sticky_cookie {
            let id = &upstream.servers[chosen].sticky_id;
            if pinned.as_deref() != Some(id.as_str()) {
                if let Ok(v) = HeaderValue::from_str(&format!("{cookie}={id}; Path=/; HttpOnly; SameSite=Lax")) {
                    parts.headers.append(header::SET_COOKIE, v);
                }
            }
        }
    }
    parts.version = downstream_version;
    Ok(Response::from_parts(parts, body))
}

/// rewrite, the part that does not depend on the server chosen: the
/// request's fields as the upstream will see them (hop-by-hop removed,
/// forwarding fields, `Via`, the client certificate's fields, the route's
/// edits). Done before the cache phase, so cache keys and `Vary` see what
/// the origin sees.
fn rewrite_fields(
    headers: &mut http::HeaderMap,
    version: Version,
    kind: Exchange,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    route: &RouteConfig,
    host: Option<&HeaderValue>,
) {
    let traceparent = HeaderName::from_static("traceparent");
    match &snapshot.config.request_id.header {
        Some(id) => forwarding::strip_hop_by_hop_keeping(headers, kind == Exchange::Upgrade, &[id, &traceparent]),
        None => forwarding::strip_hop_by_hop_keeping(headers, kind == Exchange::Upgrade, &[&traceparent]),
    };
    headers.remove(header::EXPECT);
    forwarding::set_forwarding(
        headers,
        &Hop {
            peer: &conn.forwarded,
            trusted: conn.trusted,
            proto: conn.scheme,
            host,
        },
    );
    if let Some(options) = &route.cache {
        // What the cache key does not hold must not change the answer.
        for name in &options.unkeyed {
            headers.remove(name);
        }
        if conn.trusted {
            if !options.keyed_forwarded_host {
                match host {
                    Some(h) => headers.insert(forwarding::X_FORWARDED_HOST.clone(), h.clone()),
                    None => headers.remove(&forwarding::X_FORWARDED_HOST),
                };
            }
            if !options.keyed_forwarded {
                forwarding::set_forwarded_this_hop(
                    headers,
                    &Hop {
                        peer: &conn.forwarded,
                        trusted: true,
                        proto: conn.scheme,
                        host,
                    },
                );
            }
        }
    }
    if let Some(via) = &snapshot.via {
        forwarding::append_via(headers, &via[via_index(version)]);
    }
    // Only the proxy vouches for a client certificate: the identity
    // fields of every listener are removed, whichever listener this is.
    for name in &snapshot.identity_headers {
        headers.remove(name);
    }
    if let (Some((subject_header, fingerprint_header)), Some((subject, fingerprint))) =
        (&conn.client_cert_headers, &conn.client_cert)
    {
        headers.insert(subject_header.clone(), subject.clone());
        headers.insert(fingerprint_header.clone(), fingerprint.clone());
    }
    route.request_headers.apply(headers);
}

/// What [`exchange`] needs to know of the request beyond its head.
struct Outbound<'a> {
    route_index: usize,
    host: Option<&'a HeaderValue>,
    kind: Exchange,
    /// When the request arrived (the whole-request deadline counts from it).
    started: Instant,
}

/// rewrite, select, send: the request goes to a server of the route's
/// group (retried on another when that is safe); the response comes back
/// with its hop-by-hop fields removed, with the server chosen and the one
/// the client was pinned to (for the sticky cookie); `None` for a tunnel.
async fn exchange(
    mut parts: http::request::Parts,
    body: RequestBody,
    client_upgrade: Option<OnUpgrade>,
    conn: &Arc<ConnInfo>,
    snapshot: &Snapshot,
    outbound: &Outbound<'_>,
    trace: &mut Trace,
) -> Result<(Response<ProxyBody>, Option<(usize, Option<String>)>), ProxyError> {
    let config = &snapshot.config;
    let route = &config.routes[outbound.route_index];
    let upstream = &snapshot.upstreams[route.upstream];
    let (kind, host, started) = (outbound.kind, outbound.host, outbound.started);
    let is_connect = kind == Exchange::Connect;
    let upgrade = kind != Exchange::Plain;

    // rewrite, the part that depends on the server group (the header
    // fields were rewritten before the cache phase, by `rewrite_fields`)
    let downstream_version = parts.version;
    if kind == Exchange::ExtendedConnect {
        extended_connect_to_upgrade(&mut parts);
    }
    let raw = parts.extensions.remove::<RawTarget>();
    parts.uri = upstream_uri(
        &parts.uri,
        raw.as_ref().map(|r| &r.0),
        route,
        upstream.config.protocol,
        host,
        is_connect,
        upstream.config.tls.is_some(),
    )?;
    parts.version = match upstream.config.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2 => Version::HTTP_2,
    };
    set_upstream_host(&mut parts, upstream.config.protocol, host);
    // A request can be sent again after a failed exchange only if it is
    // idempotent and has no body to replay (bodies stream, they are not kept).
    // Connect failures need no copy: the pool hands the request back.
    let replay = (upstream.servers.len() > 1
        && upstream.config.retry.max_retries > 0
        && !upgrade
        && http_body::Body::is_end_stream(&body)
        && is_idempotent(&parts.method))
    .then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        )
    });
    let server_metrics = snapshot
        .observed
        .as_ref()
        .map(|o| (&o.servers[route.upstream], &o.retries[route.upstream]));
    // The server the client is pinned to, if sticky sessions are on.
    let pinned: Option<String> = upstream
        .config
        .sticky_cookie
        .as_deref()
        .and_then(|name| balance::cookie(&parts.headers, name).map(str::to_owned));
    let mut body = body;
    // Whether the client's whole body went out: a timeout before that is
    // the client's slowness, not held against the server.
    let body_sent = body.sent_flag();
    let mut pending = Some(Request::from_parts(parts, body));

    // select + send, retrying on another server when that is safe
    let deadline = started + config.timeouts.request;
    upstream.budget.record_request(crate::upstream::health::now_ms());
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = ProxyError::NoHealthyServer;
    let (mut response, lease, server_guard, chosen) = loop {
        let mut upstream_req = match pending.take() {
            Some(r) => r,
            None => match &replay {
                Some((method, uri, version, headers)) => {
                    let mut r = Request::new(RequestBody::empty());
                    *r.method_mut() = method.clone();
                    *r.uri_mut() = uri.clone();
                    *r.version_mut() = *version;
                    *r.headers_mut() = headers.clone();
                    r
                }
                None => return Err(last_error),
            },
        };
        let picked = upstream.select(&PickContext {
            client: conn.forwarded.ip,
            headers: upstream_req.headers(),
            path: upstream_req.uri().path(),
            tried: &tried,
        });
        let (index, guard) = match picked {
            Ok(pair) => pair,
            // Nothing left to retry on: the previous failure is the answer.
            Err(e) => return Err(if tried.is_empty() { e } else { last_error }),
        };
        let server = &upstream.servers[index];
        if !route.preserve_host {
            set_server_host(&mut upstream_req, upstream.config.protocol, &server.host_header);
        }
        let try_started = Instant::now();
        let try_timeout = upstream
            .config
            .per_try_timeout
            .min(deadline.saturating_duration_since(try_started));
        let addrs = server.resolved.load_full();
        let may_retry = |tried: &Vec<usize>| {
            tried.len() < upstream.config.retry.max_retries as usize
                && upstream.budget.try_retry(crate::upstream::health::now_ms())
        };
        match tokio::time::timeout(try_timeout, server.pool.send(upstream_req, &addrs, Some(deadline))).await {
            Ok(Ok((response, lease))) => {
                let latency = try_started.elapsed();
                upstream.record(
                    index,
                    Outcome::Response {
                        status: response.status().as_u16(),
                        latency,
                    },
                );
                if let Some((servers, _)) = server_metrics {
                    servers[index].response.observe(latency.as_secs_f64());
                }
                if let Some(Some(shedder)) = snapshot.shedders.get(route.upstream) {
                    shedder.sample(latency, response.status().as_u16());
                }
                trace.upstream_header = Some(latency);
                break (response, lease, guard, index);
            }
            Err(_) => {
                // The origin may be working on it: never retried.
                if body_sent.load(std::sync::atomic::Ordering::Relaxed) {
                    upstream.record(index, Outcome::Failed);
                    if let Some(Some(shedder)) = snapshot.shedders.get(route.upstream) {
                        shedder.timed_out();
                    }
                    if let Some((servers, _)) = server_metrics {
                        servers[index].failures.inc();
                    }
                }
                trace.server = Some((route.upstream, index));
                return Err(ProxyError::ResponseTimeout);
            }
            Ok(Err(SendError::Connect(ProxyError::LocalResources, _))) => {
                // Not the server's failure: not recorded against it, and
                // another server would fail the same way.
                trace.server = Some((route.upstream, index));
                return Err(ProxyError::LocalResources);
            }
            Ok(Err(SendError::Connect(e, returned))) => {
                upstream.record(index, Outcome::Failed);
                if let Some((servers, _)) = server_metrics {
                    servers[index].failures.inc();
                }
                trace.server = Some((route.upstream, index));
                tracing::debug!(upstream = %upstream.config.name, server = %server.addr, error = %e, "connect failed");
                last_error = e;
                if !may_retry(&tried) {
                    return Err(e);
                }
                tried.push(index);
                trace.retries += 1;
                if let Some((_, retries)) = server_metrics {
                    retries.inc();
                }
                pending = Some(*returned);
            }
            Ok(Err(SendError::Exchange(err))) => {
                let e = classify(&err);
                if matches!(
                    e,
                    ProxyError::BodyTooLarge | ProxyError::BadRequest | ProxyError::RequestTimeout
                ) {
                    // The client's fault, not the server's.
                    return Err(e);
                }
                if Instant::now() >= deadline {
                    // The pool closed the connection at the request
                    // deadline (it races the timeout above): a timeout.
                    if body_sent.load(std::sync::atomic::Ordering::Relaxed) {
                        upstream.record(index, Outcome::Failed);
                    }
                    trace.server = Some((route.upstream, index));
                    return Err(ProxyError::ResponseTimeout);
                }
                upstream.record(index, Outcome::Failed);
                if let Some((servers, _)) = server_metrics {
                    servers[index].failures.inc();
                }
                trace.server = Some((route.upstream, index));
                tracing::debug!(upstream = %upstream.config.name, server = %server.addr, error = %err, "exchange failed");
                last_error = e;
                if replay.is_none() || e != ProxyError::ConnectionTerminated || !may_retry(&tried) {
                    return Err(e);
                }
                tried.push(index);
                trace.retries += 1;
                if let Some((_, retries)) = server_metrics {
                    retries.inc();
                }
            }
        }
    };

    trace.server = Some((route.upstream, chosen));
    let status = response.status();
    let tunnel = match kind {
        Exchange::Plain => false,
        Exchange::Upgrade | Exchange::ExtendedConnect => status == StatusCode::SWITCHING_PROTOCOLS,
        Exchange::Connect => status.is_success(),
    };
    if let (true, Some(client_side)) = (tunnel, client_upgrade) {
        let upstream_side = hyper::upgrade::on(&mut response);
        conn.tasks.spawn(tunnel::run(client_side, upstream_side, conn.clone()));
    }
    let (mut parts, body) = response.into_parts();
    forwarding::strip_hop_by_hop(&mut parts.headers, tunnel && kind == Exchange::Upgrade);
    if tunnel && kind == Exchange::ExtendedConnect {
        // RFC 8441: the HTTP/2 side of a WebSocket is a 200 to the CONNECT.
        parts.status = StatusCode::OK;
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    }
    parts.version = downstream_version;
    let body = if tunnel {
        ProxyBody::empty()
    } else {
        let reuse = lease.map(|l| Box::new(l) as Box<dyn crate::body::Reuse>);
        let mut body = ProxyBody::upstream(body, reuse, Some(deadline));
        body.hold(Box::new(server_guard));
        body
    };
    Ok((Response::from_parts(parts, body), Some((chosen, pinned))))
}

/// Route edits and `Via` on a response the cache answered.
fn finish_stored(
    mut response: Response<ProxyBody>,
    snapshot: &Snapshot,
    route: &RouteConfig,
    version: Version,
) -> Response<ProxyBody> {
    if let Some(via) = &snapshot.via {
        forwarding::append_via(response.headers_mut(), &via[via_index(version)]);
    }
    route.response_headers.apply(response.headers_mut());
    *response.version_mut() = version;
    response
}

/// Reads a body to its end (or its first error), for the cache's copy.
/// Stops as soon as the copy is given up (the body grew too big).
async fn drain_body(mut body: ProxyBody) {
    use http_body_util::BodyExt;
    while body.has_tap() {
        match body.frame().await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

/// `stale-while-revalidate`: the client has its stale answer; this fetches
/// the fresh one in the background, once per key (the flight `refresh`
/// holds).
fn spawn_refresh(
    refresh: cache::serve::Pending,
    parts: http::request::Parts,
    conn: Arc<ConnInfo>,
    snapshot: Arc<Snapshot>,
    route_index: usize,
    host: Option<HeaderValue>,
) {
    let mut parts = parts;
    // A plain GET, whatever the client asked (HEAD, a range): the refresh
    // is for the store.
    parts.method = Method::GET;
    tokio::spawn(async move {
        let mut trace = Trace::default();
        let outbound = Outbound {
            route_index,
            host: host.as_ref(),
            kind: Exchange::Plain,
            started: Instant::now(),
        };
        match exchange(
            parts,
            RequestBody::empty(),
            None,
            &conn,
            &snapshot,
            &outbound,
            &mut trace,
        )
        .await
        {
            Ok((response, _)) => {
                let (mut parts, mut body) = response.into_parts();
                // The client was answered: only the store is refreshed.
                if let Some(tee) = refresh.on_response(&mut parts).tee {
                    body.set_tap(Box::new(tee));
                    drain_body(body).await;
                }
            }
            Err(error) => tracing::debug!(%error, "background revalidation failed"),
        }
    });
}

/// `308 Permanent Redirect` to the same host, path and query over HTTPS
/// (308 keeps the method and body, unlike 301).
fn redirect_to_https(req: &Request<Incoming>, port: u16) -> Response<ProxyBody> {
    let Ok(Some(host)) = request_host(req) else {
        return respond::error_response(ProxyError::BadRequest);
    };
    let host = host.to_str().ok().map(|h| match h.rfind(':') {
        Some(i) if !h.ends_with(']') => &h[..i],
        _ => h,
    });
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return respond::error_response(ProxyError::BadRequest);
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            response.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => return respond::error_response(ProxyError::BadRequest),
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Sets `Host` (HTTP/1.1) for the client's host; HTTP/2 carries it in the
/// URI's authority, set by [`upstream_uri`].
fn set_upstream_host(parts: &mut http::request::Parts, protocol: UpstreamProtocol, host: Option<&HeaderValue>) {
    match (protocol, host) {
        (UpstreamProtocol::Http1, Some(h)) => {
            parts.headers.insert(header::HOST, h.clone());
        }
        (UpstreamProtocol::Http1, None) | (UpstreamProtocol::H2, _) => {
            parts.headers.remove(header::HOST);
        }
    }
}

/// `preserve_host = false`: the chosen server's `host:port` instead.
fn set_server_host(req: &mut Request<RequestBody>, protocol: UpstreamProtocol, server_host: &HeaderValue) {
    match protocol {
        UpstreamProtocol::Http1 => {
            req.headers_mut().insert(header::HOST, server_host.clone());
        }
        UpstreamProtocol::H2 => {
            let mut parts = req.uri().clone().into_parts();
            if let Ok(authority) = http::uri::Authority::try_from(server_host.as_bytes()) {
                parts.authority = Some(authority);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}

/// What kind of exchange a request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    Plain,
    /// HTTP/1.1 `Upgrade` (WebSocket and others): 101, then a tunnel.
    Upgrade,
    /// Classic `CONNECT host:port`: 2xx, then a tunnel.
    Connect,
    /// RFC 8441 / 9220 extended CONNECT over HTTP/2 (`:protocol`), carried to
    /// an HTTP/1.1 upstream as an `Upgrade` request.
    ExtendedConnect,
}

/// An upgrade (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT) counts as one
/// only for a protocol in `server.upgrade_protocols`; an HTTP/1.1 request
/// asking for another is served as a plain request (RFC 9110 section 7.8:
/// a server may ignore `Upgrade`), an extended CONNECT for another is a
/// plain CONNECT.
fn exchange_kind(req: &Request<Incoming>, allowed: &[String]) -> Exchange {
    let allowed_protocol = |name: &str| allowed.iter().any(|p| p.eq_ignore_ascii_case(name.trim()));
    if req.method() == Method::CONNECT {
        match req.extensions().get::<hyper::ext::Protocol>() {
            Some(protocol) if allowed_protocol(protocol.as_str()) => Exchange::ExtendedConnect,
            _ => Exchange::Connect,
        }
    } else if req.version() <= Version::HTTP_11
        && forwarding::is_upgrade_request(req.headers())
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .all(|v| v.to_str().is_ok_and(|text| text.split(',').all(allowed_protocol)))
    {
        Exchange::Upgrade
    } else {
        Exchange::Plain
    }
}

/// True when the request declares a body (`Content-Length` above zero, or
/// any `Transfer-Encoding`).
fn declares_body(req: &Request<Incoming>) -> Result<bool, ProxyError> {
    Ok(req.headers().contains_key(header::TRANSFER_ENCODING) || content_length(req)?.is_some_and(|n| n > 0))
}

/// The client's request target, kept for a `raw_path` route.
#[derive(Clone)]
struct RawTarget(PathAndQuery);

/// Replaces the request's path with its normal form ([`crate::target`]);
/// returns the target as the client sent it when that changed anything.
/// A path that cannot be normalised safely is a bad request.
fn normalize_target(
    req: &mut Request<Incoming>,
    encoded_slash: crate::target::EncodedSlash,
) -> Result<Option<PathAndQuery>, ProxyError> {
    let uri = req.uri();
    // An absolute-form target without a path (`GET http://host?x`) names `/`.
    let empty = uri.path().is_empty() && uri.authority().is_some() && req.method() != Method::CONNECT;
    let normal = match crate::target::normalize_path(uri.path(), encoded_slash) {
        Ok(std::borrow::Cow::Borrowed(_)) if empty => "/".to_owned(),
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(None),
        Ok(std::borrow::Cow::Owned(normal)) => normal,
        Err(why) => {
            tracing::debug!(path = %uri.path(), %why, "request path refused");
            return Err(ProxyError::BadRequest);
        }
    };
    let raw = uri.path_and_query().cloned();
    let mut target = normal;
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(target).map_err(|_| ProxyError::BadRequest)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest)?;
    Ok(raw)
}

/// Rewrites an extended CONNECT into the HTTP/1.1 upgrade request it
/// stands for (RFC 8441 section 5): `GET` with `Upgrade: <protocol>`, and
/// for WebSocket a fresh `Sec-WebSocket-Key` (the HTTP/2 side has none).
fn extended_connect_to_upgrade(parts: &mut http::request::Parts) {
    let protocol = parts
        .extensions
        .remove::<hyper::ext::Protocol>()
        .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
        .unwrap_or(HeaderValue::from_static("websocket"));
    parts.method = Method::GET;
    if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
    }
    parts.headers.insert(header::UPGRADE, protocol);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// A WebSocket handshake nonce: 16 unpredictable bytes, base64.
fn websocket_key() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
        half.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

fn via_index(version: Version) -> usize {
    match version {
        Version::HTTP_09 | Version::HTTP_10 => 0,
        Version::HTTP_11 => 1,
        _ => 2,
    }
}

/// Limits and framing rules that hyper's parser does not enforce itself.
fn validate(req: &Request<Incoming>, limits: &Limits) -> Result<(), ProxyError> {
    // Request smuggling. With both Content-Length and Transfer-Encoding,
    // hyper reads the body as chunked, drops Content-Length and closes the
    // connection after the response (RFC 9112 6.1), so nothing can follow
    // on it. The only transfer coding forwarded is `chunked` alone: others
    // would reach the upstream still encoded (RFC 9112 6.1: 501).
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let only_chunked =
            codings.next().is_none() && first.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !only_chunked {
            return Err(ProxyError::TransferCodingNotImplemented);
        }
    }
    let uri = req.uri();
    let target_len =
        uri.path_and_query().map_or(0, |p| p.as_str().len()) + uri.authority().map_or(0, |a| a.as_str().len());
    if target_len > limits.max_uri_length {
        return Err(ProxyError::UriTooLong);
    }
    if req.headers().len() > limits.max_header_count {
        return Err(ProxyError::HeadersTooLarge);
    }
    let mut head_bytes = req.method().as_str().len() + target_len + 12;
    for (name, value) in req.headers() {
        head_bytes += name.as_str().len() + value.len() + 4;
    }
    if head_bytes > limits.max_request_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// The host the client asked for: `:authority` on HTTP/2, `Host` on
/// HTTP/1.1 (exactly one, and agreeing with an absolute-form target),
/// valid as RFC 3986 `host [ ":" port ]` ([`crate::target::valid_authority`]).
fn request_host(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let host = request_host_unchecked(req)?;
    match &host {
        Some(h) if !crate::target::valid_authority(h.as_bytes()) => Err(ProxyError::BadRequest),
        _ => Ok(host),
    }
}

fn request_host_unchecked(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let authority = req.uri().authority();
    if req.version() == Version::HTTP_2 {
        return match authority {
            Some(a) => HeaderValue::from_str(a.as_str())
                .map(Some)
                .map_err(|_| ProxyError::BadRequest),
            None => Ok(req.headers().get(header::HOST).cloned()),
        };
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest);
    }
    match (host, authority) {
        (None, _) if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest),
        (Some(h), Some(a)) if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) => Err(ProxyError::BadRequest),
        (Some(h), _) if h.is_empty() || h.as_bytes().iter().any(|b| b.is_ascii_whitespace()) => {
            Err(ProxyError::BadRequest)
        }
        (Some(h), _) => Ok(Some(h.clone())),
        (None, Some(a)) => HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest),
        (None, None) => Ok(None),
    }
}

/// The declared body length; a malformed `Content-Length` is a bad request
/// (hyper already refuses conflicting values on HTTP/1.1).
fn content_length(req: &Request<Incoming>) -> Result<Option<u64>, ProxyError> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest),
    }
}

/// The request target for the upstream: origin-form for HTTP/1.1,
/// absolute for HTTP/2, with the route's prefix rewrite applied.
fn upstream_uri(
    original: &Uri,
    raw: Option<&PathAndQuery>,
    route: &RouteConfig,
    protocol: UpstreamProtocol,
    host: Option<&HeaderValue>,
    is_connect: bool,
    tls: bool,
) -> Result<Uri, ProxyError> {
    if is_connect {
        // authority-form, as the client sent it
        return Ok(original.clone());
    }
    let path_and_query = match &route.rewrite_prefix {
        Some(replacement) => {
            let path = original.path();
            let rest = path.get(route.path.len()..).unwrap_or("");
            let mut new = String::with_capacity(replacement.len() + rest.len() + 16);
            new.push_str(replacement);
            if replacement.ends_with('/') {
                new.push_str(rest.strip_prefix('/').unwrap_or(rest));
            } else {
                new.push_str(rest);
            }
            if let Some(query) = original.query() {
                new.push('?');
                new.push_str(query);
            }
            PathAndQuery::try_from(new).map_err(|_| ProxyError::BadRequest)?
        }
        None => match raw.or(original.path_and_query()) {
            Some(pq) => pq.clone(),
            None => PathAndQuery::from_static("/"),
        },
    };
    match protocol {
        UpstreamProtocol::Http1 => {
            if raw.is_none()
                && route.rewrite_prefix.is_none()
                && original.scheme().is_none()
                && original.authority().is_none()
            {
                return Ok(original.clone());
            }
            Ok(Uri::from(path_and_query))
        }
        UpstreamProtocol::H2 => {
            let authority = host.and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            Uri::builder()
                .scheme(if tls { "https" } else { "http" })
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
                .map_err(|_| ProxyError::BadRequest)
        }
    }
}

/// Maps an exchange failure to what the client is told.
fn classify(error: &hyper::Error) -> ProxyError {
    if find_cause::<BodyTooLarge>(error).is_some() {
        return ProxyError::BodyTooLarge;
    }
    if find_cause::<BodyTooSlow>(error).is_some() {
        return ProxyError::RequestTimeout;
    }
    if error.is_user() {
        // The client's own body failed (it went away mid-upload).
        return ProxyError::BadRequest;
    }
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        return ProxyError::UpstreamProtocol;
    }
    if error.is_timeout() {
        return ProxyError::ResponseTimeout;
    }
    ProxyError::ConnectionTerminated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_16_bytes_of_base64_and_differ() {
        let a = websocket_key();
        let b = websocket_key();
        assert_eq!(a.len(), 24);
        assert!(a.to_str().expect("ascii").ends_with("=="));
        assert_ne!(a, b);
    }
}
