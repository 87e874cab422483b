//! cache: on caching routes, a GET or HEAD may be answered from the store
//! (or by waiting on the URL's flight), and what the origin answers is
//! stored, refreshes a stored response (304) or is replaced by a stale one
//! when the origin fails; an unsafe request that succeeds invalidates what
//! is stored for its URL. The rules and the store are `crate::cache`; this
//! is where they meet one request ([`Plan`]).

use std::sync::Arc;

use http::header::HeaderValue;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::context::{Exchange, Outbound};
use super::exchange::{Picked, exchange};
use super::record::Trace;
use super::{ConnInfo, respond};
use crate::body::{ProxyBody, RequestBody};
use crate::cache::serve::{Answer, CACHE_STATUS, Lookup, ONLY_IF_CACHED_STATUS, Outcome, Pending};
use crate::cache::{self, Cache};
use crate::config::{RouteCache, RouteConfig};
use crate::error::ProxyError;
use crate::forwarding;
use crate::state::Snapshot;

/// What the cache phase decided for one request, and what it does with
/// the answer.
pub(super) struct Plan<'a> {
    caching: Option<(&'a Arc<RouteCache>, &'a Arc<Cache>)>,
    /// The flight or revalidation the origin's answer goes to.
    pending: Option<Box<Pending>>,
    /// An unsafe request's URL key and origin, invalidated on success.
    invalidate: Option<(String, String)>,
    /// `Cache-Status` of a request the cache does not serve: a method it
    /// does not serve, or a GET / HEAD with a body.
    bypass_status: &'static str,
}

impl<'a> Plan<'a> {
    /// The plan of a request on `route`: caching only on caching routes,
    /// never for upgrades.
    pub(super) fn new(route: &'a RouteConfig, snapshot: &'a Snapshot, kind: Exchange) -> Plan<'a> {
        let caching = match (&route.cache, &snapshot.cache) {
            (Some(options), Some(cache)) if !kind.is_upgrade() => Some((options, cache)),
            _ => None,
        };
        Plan {
            caching,
            pending: None,
            invalidate: None,
            bypass_status: "portcullis; fwd=method",
        }
    }

    pub(super) fn caching(&self) -> bool {
        self.caching.is_some()
    }

    /// Looks the request up: `Some` when the cache answers it (fresh,
    /// 304, 206, stale while revalidating, 504 for `only-if-cached`).
    /// The request's fields must already be the origin's (`rewrite::fields`).
    pub(super) async fn lookup(
        &mut self,
        req: &mut Request<Incoming>,
        conn: &ConnInfo,
        snapshot: &Arc<Snapshot>,
        route_index: usize,
        host: Option<&HeaderValue>,
        trace: &mut Trace,
    ) -> Option<Response<ProxyBody>> {
        let (options, cache) = self.caching?;
        let host_text = host.map(|h| String::from_utf8_lossy(h.as_bytes()));
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
        let get_or_head = req.method() == Method::GET || req.method() == Method::HEAD;
        if !(get_or_head && http_body::Body::is_end_stream(req.body())) {
            trace.cache = Some(Outcome::Bypass);
            if get_or_head {
                self.bypass_status = "portcullis; fwd=bypass; detail=request-body";
            }
            if !req.method().is_safe() {
                self.invalidate = Some((url, format!("{scheme}://{host_text}")));
            }
            return None;
        }
        // Parameters left out of the key never reach the origin either, so
        // they cannot change what is stored.
        if let Some(uri) = cache::key::strip_unkeyed(req.uri(), options) {
            *req.uri_mut() = uri;
        }
        let key = cache::key::primary_key(url, req.headers(), options);
        let method = req.method().clone();
        let route = &snapshot.config.routes[route_index];
        let version = req.version();
        match cache.lookup(&method, req.headers_mut(), key, options).await {
            Lookup::Answer(response, outcome) => {
                trace.cache = Some(outcome);
                Some(finish_stored(response, snapshot, route, version))
            }
            Lookup::AnswerAndRefresh(response, refresh) => {
                trace.cache = Some(Outcome::Stale);
                let parts = clone_head(req);
                spawn_refresh(
                    *refresh,
                    parts,
                    conn.detached(),
                    snapshot.clone(),
                    route_index,
                    host.cloned(),
                );
                Some(finish_stored(response, snapshot, route, version))
            }
            Lookup::Forward(pending) => {
                self.pending = Some(pending);
                None
            }
            Lookup::OnlyIfCached => {
                trace.cache = Some(Outcome::Bypass);
                let mut response = respond::error_response(ProxyError::OnlyIfCached);
                response
                    .headers_mut()
                    .insert(CACHE_STATUS.clone(), HeaderValue::from_static(ONLY_IF_CACHED_STATUS));
                Some(response)
            }
        }
    }

    /// The origin's answer (or failure), seen by the cache first: a stale
    /// response instead of a failure when allowed, a stored one instead of
    /// a 304 or a not-modified 200, a tee that stores the body as it
    /// streams, invalidation and `Cache-Status`. `Err(response)` is a
    /// response the cache made (finished already); `Ok` the origin's, to
    /// finish in respond.
    #[allow(clippy::type_complexity)]
    pub(super) fn answer(
        self,
        exchanged: Result<(Response<ProxyBody>, Option<Picked>), ProxyError>,
        snapshot: &Snapshot,
        route: &RouteConfig,
        version: Version,
        trace: &mut Trace,
    ) -> Result<Result<(Response<ProxyBody>, Option<Picked>), Response<ProxyBody>>, ProxyError> {
        let Plan {
            caching,
            pending,
            invalidate,
            bypass_status,
        } = self;
        let ((response, picked), pending) = match (exchanged, pending) {
            (Ok(pair), pending) => (pair, pending),
            (Err(error), Some(pending)) => {
                // stale-if-error, when allowed
                trace.cache = Some(Outcome::Miss);
                let response = pending.on_error(error)?;
                trace.cache = Some(Outcome::Stale);
                return Ok(Err(finish_stored(response, snapshot, route, version)));
            }
            (Err(error), None) => return Err(error),
        };
        let (mut parts, mut body) = response.into_parts();
        if let Some(pending) = pending {
            let handled = pending.on_response(&mut parts);
            trace.cache = Some(handled.outcome);
            if let Answer::Replace(response) = handled.answer {
                if let Some(tee) = handled.tee {
                    // The client is answered from the stored copy; the body
                    // still has to arrive to be stored.
                    body.set_tap(Box::new(tee));
                    tokio::spawn(drain_body(body));
                }
                return Ok(Err(finish_stored(*response, snapshot, route, version)));
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
        Ok(Ok((Response::from_parts(parts, body), picked)))
    }
}

/// The head of a request, for a background refresh (the body is not
/// needed: a refresh is a plain GET).
fn clone_head(req: &Request<Incoming>) -> http::request::Parts {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head.into_parts().0
}

/// Route edits and `Via` on a response the cache answered.
fn finish_stored(
    mut response: Response<ProxyBody>,
    snapshot: &Snapshot,
    route: &RouteConfig,
    version: Version,
) -> Response<ProxyBody> {
    respond::decorate(response.headers_mut(), snapshot, route, version);
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
    refresh: Pending,
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
        let sent = exchange(
            parts,
            RequestBody::empty(),
            None,
            &conn,
            &snapshot,
            &outbound,
            &mut trace,
        )
        .await;
        match sent {
            Ok((response, _)) => {
                let (mut parts, mut body) = response.into_parts();
                // The client was answered: only the store is refreshed.
                if let Some(tee) = refresh.on_response(&mut parts).tee {
                    body.set_tap(Box::new(tee));
                    drain_body(body).await;
                }
            }
            Err(error) => tracing::debug!(phase = "cache", %error, "background revalidation failed"),
        }
    });
}
