//! select and send: the request goes to a server of the route's group,
//! and is tried again on another one when [`may_retry`] says that is safe;
//! the response comes back with its hop-by-hop fields removed, carrying
//! the upstream connection and the server's request count, or becomes a
//! tunnel. The cache's background revalidation sends requests this way too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::context::{Exchange, Outbound};
use super::record::Trace;
use super::{ConnInfo, rewrite, tunnel};
use crate::body::{BodyTooLarge, BodyTooSlow, ProxyBody, RequestBody, find_cause};
use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::forwarding;
use crate::observe::metrics::ServerMetrics;
use crate::state::Snapshot;
use crate::upstream::health::now_ms;
use crate::upstream::pool::{Lease, SendError};
use crate::upstream::{Outcome, PickContext, ServerGuard, Upstream, balance};

/// The server that answered, and the one the client was pinned to (for
/// the sticky cookie).
pub(super) struct Picked {
    pub server: usize,
    pub pinned: Option<String>,
}

/// rewrite (the target), select, send: the response, and who answered
/// (`None` for a tunnel: nothing is pinned to it).
pub(super) async fn exchange(
    mut parts: http::request::Parts,
    mut body: RequestBody,
    client_upgrade: Option<OnUpgrade>,
    conn: &Arc<ConnInfo>,
    snapshot: &Snapshot,
    outbound: &Outbound<'_>,
    trace: &mut Trace,
) -> Result<(Response<ProxyBody>, Option<Picked>), ProxyError> {
    let route = &snapshot.config.routes[outbound.route_index];
    let upstream = &snapshot.upstreams[route.upstream];
    let downstream_version = parts.version;
    trace.phase = super::Phase::Rewrite;
    rewrite::target(&mut parts, route, upstream, outbound)?;
    let deadline = outbound.started + snapshot.config.timeouts.request;
    let mut attempts = Attempts {
        replay: Replay::of(&parts, &body, upstream, outbound.kind),
        pinned: upstream
            .config
            .sticky_cookie
            .as_deref()
            .and_then(|name| balance::cookie(&parts.headers, name).map(str::to_owned)),
        body_sent: body.sent_flag(),
        pending: None,
        snapshot,
        route,
        upstream,
        client: conn.forwarded.ip,
        deadline,
        tried: Vec::new(),
        last_error: ProxyError::NoHealthyServer,
        metrics: snapshot
            .observed
            .as_ref()
            .map(|o| (&o.servers[route.upstream][..], &o.retries[route.upstream])),
    };
    attempts.pending = Some(Request::from_parts(parts, body));
    let sent = attempts.run(trace).await?;
    trace.server = Some((route.upstream, sent.server));
    let pinned = attempts.pinned.take();
    Ok(respond_with(
        sent,
        client_upgrade,
        conn,
        outbound.kind,
        downstream_version,
        deadline,
        pinned,
    ))
}

/// The copy of a request head kept to send it again after a failed
/// exchange: only for idempotent requests without a body (bodies stream,
/// they are not kept) to groups that can retry. Connect failures need no
/// copy: the pool hands the request back.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(parts: &http::request::Parts, body: &RequestBody, upstream: &Upstream, kind: Exchange) -> Option<Replay> {
        let possible = upstream.servers.len() > 1
            && upstream.config.retry.max_retries > 0
            && !kind.is_upgrade()
            && http_body::Body::is_end_stream(body)
            && is_idempotent(&parts.method);
        possible.then(|| Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        })
    }

    fn request(&self) -> Request<RequestBody> {
        let mut r = Request::new(RequestBody::empty());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// What failed, as far as sending it again goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Nothing was sent (connect failed): any method may go to another
    /// server, the request comes back whole.
    Unsent,
    /// The connection closed before any response byte: only a request that
    /// can be replayed (idempotent, no body) may go again.
    ClosedBeforeResponse,
    /// Anything else (a timeout: the origin may be working on it; an
    /// invalid response): never sent again.
    Final,
}

/// The retry policy, in one place: may a request that failed this way on
/// `tried` servers so far go to another server?
fn may_retry(failure: Failure, replayable: bool, tried: usize, upstream: &Upstream) -> bool {
    let allowed = match failure {
        Failure::Unsent => true,
        Failure::ClosedBeforeResponse => replayable,
        Failure::Final => false,
    };
    allowed && tried < upstream.config.retry.max_retries as usize && upstream.budget.try_retry(now_ms())
}

/// One try that got a response head.
struct Sent {
    response: Response<Incoming>,
    lease: Option<Lease>,
    guard: ServerGuard,
    server: usize,
}

/// How one try ended. (Returned by value once per try: boxing the large
/// variant would cost an allocation per request.)
#[allow(clippy::large_enum_variant)]
enum Try {
    Sent(Sent),
    /// Send the request again, to another server.
    Again,
    Failed(ProxyError),
}

/// The tries of one request.
struct Attempts<'a> {
    snapshot: &'a Snapshot,
    route: &'a RouteConfig,
    upstream: &'a Arc<Upstream>,
    client: std::net::IpAddr,
    deadline: Instant,
    /// The request for the next try (the first one, or one the pool gave
    /// back after a failed connect).
    pending: Option<Request<RequestBody>>,
    replay: Option<Replay>,
    pinned: Option<String>,
    /// Whether the client's whole body went out: a timeout before that is
    /// the client's slowness, not held against the server.
    body_sent: Arc<AtomicBool>,
    tried: Vec<usize>,
    last_error: ProxyError,
    metrics: Option<(&'a [ServerMetrics], &'a Counter)>,
}

impl Attempts<'_> {
    async fn run(&mut self, trace: &mut Trace) -> Result<Sent, ProxyError> {
        self.upstream.budget.record_request(now_ms());
        loop {
            let request = match (self.pending.take(), &self.replay) {
                (Some(r), _) => r,
                (None, Some(replay)) => replay.request(),
                (None, None) => return Err(self.last_error),
            };
            trace.phase = super::Phase::Select;
            let picked = self.upstream.select(&PickContext {
                client: self.client,
                headers: request.headers(),
                path: request.uri().path(),
                tried: &self.tried,
            });
            let (index, guard) = match picked {
                Ok(pair) => pair,
                Err(e) if self.tried.is_empty() => return Err(e),
                // Nothing left to retry on: the previous failure is the answer.
                Err(_) => {
                    trace.phase = super::Phase::Send;
                    return Err(self.last_error);
                }
            };
            trace.phase = super::Phase::Send;
            match self.try_once(request, index, guard, trace).await {
                Try::Sent(sent) => return Ok(sent),
                Try::Again => {}
                Try::Failed(e) => return Err(e),
            }
        }
    }

    async fn try_once(
        &mut self,
        mut request: Request<RequestBody>,
        index: usize,
        guard: ServerGuard,
        trace: &mut Trace,
    ) -> Try {
        let server = &self.upstream.servers[index];
        if !self.route.preserve_host {
            rewrite::set_server_host(&mut request, self.upstream.config.protocol, &server.host_header);
        }
        let started = Instant::now();
        let timeout = self
            .upstream
            .config
            .per_try_timeout
            .min(self.deadline.saturating_duration_since(started));
        let addrs = server.resolved.load_full();
        let sent = tokio::time::timeout(timeout, server.pool.send(request, &addrs, Some(self.deadline))).await;
        trace.server = Some((self.route.upstream, index));
        match sent {
            Ok(Ok((response, lease))) => {
                self.answered(index, &response, started.elapsed(), trace);
                Try::Sent(Sent {
                    response,
                    lease,
                    guard,
                    server: index,
                })
            }
            Err(_) => {
                // The origin may be working on it: never retried, and held
                // against the server only once the client's body was out.
                if self.body_sent.load(Ordering::Relaxed) {
                    self.server_failed(index);
                    if let Some(Some(shedder)) = self.snapshot.shedders.get(self.route.upstream) {
                        shedder.timed_out();
                    }
                }
                Try::Failed(ProxyError::ResponseTimeout)
            }
            // Not the server's failure, and another would fail the same way.
            Ok(Err(SendError::Connect(ProxyError::LocalResources, _))) => Try::Failed(ProxyError::LocalResources),
            Ok(Err(SendError::Connect(e, returned))) => {
                tracing::debug!(phase = "send", upstream = %self.upstream.config.name, server = %server.addr, error = %e, "connect failed");
                self.pending = Some(*returned);
                self.failed(index, e, Failure::Unsent, trace)
            }
            Ok(Err(SendError::Exchange(err))) => self.exchange_failed(index, &err, trace),
        }
    }

    /// A response head arrived: latency and health for the server.
    fn answered(&self, index: usize, response: &Response<Incoming>, latency: std::time::Duration, trace: &mut Trace) {
        let status = response.status().as_u16();
        self.upstream.record(index, Outcome::Response { status, latency });
        if let Some((servers, _)) = self.metrics {
            servers[index].response.observe(latency.as_secs_f64());
        }
        if let Some(Some(shedder)) = self.snapshot.shedders.get(self.route.upstream) {
            shedder.sample(latency, status);
        }
        trace.upstream_header = Some(latency);
    }

    fn exchange_failed(&mut self, index: usize, err: &hyper::Error, trace: &mut Trace) -> Try {
        let e = classify(err);
        if e.side() == crate::error::Side::Downstream {
            // The client's body failed (too large, too slow, gone).
            return Try::Failed(e);
        }
        if Instant::now() >= self.deadline {
            // The pool closed the connection at the request deadline (it
            // races the timeout): a timeout.
            if self.body_sent.load(Ordering::Relaxed) {
                self.upstream.record(index, Outcome::Failed);
            }
            return Try::Failed(ProxyError::ResponseTimeout);
        }
        let server = &self.upstream.servers[index];
        tracing::debug!(phase = "send", upstream = %self.upstream.config.name, server = %server.addr, error = %err, "exchange failed");
        let failure = if e == ProxyError::ConnectionTerminated {
            Failure::ClosedBeforeResponse
        } else {
            Failure::Final
        };
        self.failed(index, e, failure, trace)
    }

    fn server_failed(&self, index: usize) {
        self.upstream.record(index, Outcome::Failed);
        if let Some((servers, _)) = self.metrics {
            servers[index].failures.inc();
        }
    }

    /// A try failed on the server: recorded, then retried elsewhere if the
    /// policy allows it.
    fn failed(&mut self, index: usize, e: ProxyError, failure: Failure, trace: &mut Trace) -> Try {
        self.server_failed(index);
        self.last_error = e;
        if !may_retry(failure, self.replay.is_some(), self.tried.len(), self.upstream) {
            return Try::Failed(e);
        }
        self.tried.push(index);
        trace.retries += 1;
        if let Some((_, retries)) = self.metrics {
            retries.inc();
        }
        Try::Again
    }
}

/// The client's response from what the server sent: a tunnel for an
/// accepted upgrade, else the upstream body carrying its connection (given
/// back when read whole) and the server's request count.
fn respond_with(
    sent: Sent,
    client_upgrade: Option<OnUpgrade>,
    conn: &Arc<ConnInfo>,
    kind: Exchange,
    downstream_version: Version,
    deadline: Instant,
    pinned: Option<String>,
) -> (Response<ProxyBody>, Option<Picked>) {
    let Sent {
        mut response,
        lease,
        guard,
        server,
    } = sent;
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
        body.hold(Box::new(guard));
        body
    };
    (Response::from_parts(parts, body), Some(Picked { server, pinned }))
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
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
