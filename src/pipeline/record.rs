//! record: what the pipeline learned about one request ([`Observation`],
//! with the [`Trace`] the phases fill), finished when the response body is
//! done: the request's metrics and its access log record.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri, Version};
use tokio::time::Instant;

use super::ConnInfo;
use crate::cache::serve::Outcome;
use crate::observe::{Observe, access, client_ip, request_id};
use crate::state::Snapshot;

/// What the pipeline learned about one request, finished when the
/// response body is done.
pub struct Observation {
    observe: Arc<Observe>,
    snapshot: Arc<Snapshot>,
    conn: Arc<ConnInfo>,
    started: Instant,
    time: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    headers: Vec<Option<HeaderValue>>,
    client_ip: IpAddr,
    pub request_id: Option<HeaderValue>,
    pub traceparent: Option<HeaderValue>,
    pub status: u16,
    pub trace: Trace,
    pub error: Option<&'static str>,
    bytes_out: u64,
}

/// What the phases of the pipeline record as they run.
#[derive(Default)]
pub struct Trace {
    pub route: Option<usize>,
    /// (upstream index, server index) of the server that answered.
    pub server: Option<(usize, usize)>,
    pub upstream_header: Option<Duration>,
    pub retries: u32,
    /// Request body bytes, counted by the body as it streams.
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// What protection did to the request (`rate_limited`, `ip_denied`).
    pub protection: Option<&'static str>,
    /// How the cache served it (`hit`, `miss`, ...), on caching routes.
    pub cache: Option<Outcome>,
    /// The phase the request is in (the one that failed, if it fails).
    pub phase: super::Phase,
}

impl Observation {
    /// Starts tracking a request (before the pipeline edits its headers).
    pub fn start(
        observe: &Arc<Observe>,
        snapshot: &Arc<Snapshot>,
        conn: &Arc<ConnInfo>,
        req: &http::Request<hyper::body::Incoming>,
    ) -> Box<Observation> {
        let logging = observe.access.as_ref();
        let headers = req.headers();
        let get = |name: http::HeaderName| logging.and_then(|_| headers.get(name).cloned());
        let extra = logging.map_or_else(Vec::new, |log| {
            log.config().headers.iter().map(|h| headers.get(h).cloned()).collect()
        });
        let client_ip = match logging {
            Some(_) => client_ip(
                headers,
                conn.peer.ip().to_canonical(),
                conn.trusted,
                &snapshot.config.server.trusted_proxies,
            ),
            None => conn.peer.ip(),
        };
        let host = match req.version() {
            Version::HTTP_2 => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .or_else(|| headers.get(http::header::HOST).cloned()),
            _ => headers.get(http::header::HOST).cloned(),
        };
        Box::new(Observation {
            observe: observe.clone(),
            snapshot: snapshot.clone(),
            conn: conn.clone(),
            started: Instant::now(),
            time: SystemTime::now(),
            method: req.method().clone(),
            uri: if logging.is_some() {
                req.uri().clone()
            } else {
                Uri::default()
            },
            version: req.version(),
            host: logging.and(host),
            user_agent: get(http::header::USER_AGENT),
            referer: get(http::header::REFERER),
            headers: extra,
            client_ip,
            request_id: None,
            traceparent: None,
            status: 0,
            trace: Trace {
                bytes_in: logging.map(|_| Arc::new(AtomicU64::new(0))),
                ..Trace::default()
            },
            error: None,
            bytes_out: 0,
        })
    }

    /// Records the metrics and writes the access log record.
    pub fn finish(self: Box<Self>, complete: bool) {
        let duration = self.started.elapsed();
        let snapshot = &self.snapshot;
        if let (Some(metrics), Some(observed)) = (&self.observe.metrics, &snapshot.observed) {
            let route = match self.trace.route {
                Some(i) => observed.routes.get(i).unwrap_or(&observed.no_route),
                None => &observed.no_route,
            };
            route.record(metrics, &self.method, self.status, duration.as_secs_f64());
            if let Some(result) = self.trace.cache {
                route.cache_result(metrics, result);
            }
            if let Some(action) = self.trace.protection {
                route.protection_action(metrics, action);
            }
        }
        let Some(log) = &self.observe.access else { return };
        let route = self.trace.route.and_then(|i| snapshot.config.routes.get(i));
        if self.status < 400 {
            if let (Some(route), Some(counters)) = (self.trace.route, &snapshot.log_samples) {
                let n = snapshot.config.routes.get(route).map_or(1, |r| r.log_sample);
                if n > 1 && counters[route].fetch_add(1, Ordering::Relaxed) % u64::from(n) != 0 {
                    return;
                }
            }
        }
        let (upstream, server) = match self.trace.server {
            Some((u, s)) => {
                let up = snapshot.upstreams.get(u);
                (
                    up.map(|u| u.config.name.as_str()),
                    up.and_then(|u| u.servers.get(s)).map(|s| s.label.as_str()),
                )
            }
            None => (None, None),
        };
        let trace_id = self.traceparent.as_ref().and_then(request_id::trace_id);
        let entry = access::Entry {
            time: self.time,
            request_id: self.request_id.as_ref().map(HeaderValue::as_bytes),
            trace_id,
            client_ip: self.client_ip,
            peer_ip: self.conn.peer.ip().to_canonical(),
            method: self.method.as_str(),
            scheme: self.conn.scheme,
            host: self.host.as_ref().map(HeaderValue::as_bytes),
            path: self.uri.path(),
            query: self.uri.query(),
            protocol: match self.version {
                Version::HTTP_09 => "HTTP/0.9",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/3.0",
            },
            status: self.status,
            bytes_in: self.trace.bytes_in.as_ref().map_or(0, |b| b.load(Ordering::Relaxed)),
            bytes_out: self.bytes_out,
            duration,
            upstream_header: self.trace.upstream_header,
            upstream,
            server,
            route: route.map(|r| r.name.as_str()),
            retries: self.trace.retries,
            cache: self.trace.cache.map(Outcome::as_str),
            protection: self.trace.protection,
            tls: self.conn.tls,
            user_agent: self.user_agent.as_ref().map(HeaderValue::as_bytes),
            referer: self.referer.as_ref().map(HeaderValue::as_bytes),
            error: self.error,
            complete,
            headers: &self.headers,
        };
        log.write(&entry);
    }
}

impl crate::body::Record for Observation {
    fn on_data(&mut self, bytes: usize) {
        self.bytes_out += bytes as u64;
    }

    fn finish(self: Box<Self>, complete: bool) {
        Observation::finish(self, complete);
    }
}
