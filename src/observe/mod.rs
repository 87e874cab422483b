//! Observability: access log, audit log, metrics, request ids.
//!
//! [`Observe`] is process-wide (it outlives snapshots): the access log
//! writer, the audit log writer and the metrics registry. Per request, the
//! pipeline fills an [`Observation`] as it goes (route, server, timings) and
//! hands it to the response body; when the body is done or dropped, the
//! exchange is finished: one metrics update and at most one access log
//! record, formatted on the request's thread and queued without waiting.
//!
//! - [`access`]: record formats and the non-blocking writer;
//! - [`audit`]: the hash-chained audit log and its verifier;
//! - [`metrics`]: Prometheus families and the metrics endpoint;
//! - [`request_id`]: UUIDv7 request ids and `traceparent`;
//! - [`clock`]: timestamp formats.

pub mod access;
pub mod audit;
pub mod clock;
pub mod metrics;
pub mod request_id;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use ipnet::IpNet;
use tokio::time::Instant;

use crate::config::Config;
use crate::server::conn::ConnInfo;
use crate::state::Snapshot;
pub use access::AccessLog;
pub use audit::{AuditLog, Event};
pub use metrics::Metrics;

/// The process-wide observability outputs; each one optional.
#[derive(Debug, Default)]
pub struct Observe {
    pub access: Option<AccessLog>,
    pub audit: Option<AuditLog>,
    pub metrics: Option<Arc<Metrics>>,
    /// Serializes [`Observe::sync_counters`] (concurrent scrapes).
    sync: std::sync::Mutex<()>,
}

impl Observe {
    /// Nothing on (`check`, unit tests).
    pub fn disabled() -> Arc<Observe> {
        Arc::new(Observe::default())
    }

    /// Opens what `config` turns on.
    pub fn from_config(config: &Config) -> Result<Observe, String> {
        Ok(Observe {
            access: AccessLog::open(&config.access_log)?,
            audit: config.audit_log.as_ref().map(AuditLog::open).transpose()?,
            metrics: config.metrics.as_ref().map(|_| Arc::new(Metrics::new())),
            sync: std::sync::Mutex::default(),
        })
    }

    /// Logs and metrics made by the caller (tests, embedding).
    pub fn new(access: Option<AccessLog>, audit: Option<AuditLog>, metrics: Option<Arc<Metrics>>) -> Observe {
        Observe {
            access,
            audit,
            metrics,
            sync: std::sync::Mutex::default(),
        }
    }

    /// Records an audit event, if the audit log is on.
    pub fn audit(&self, event: Event) {
        if let Some(audit) = &self.audit {
            audit.record(event);
            if let Some(m) = &self.metrics {
                m.audit_records.inc();
            }
        }
    }

    /// Reopens the log files at their paths (SIGUSR1, after rotation).
    pub fn reopen(&self) {
        if let Some(a) = &self.access {
            a.reopen();
        }
        if let Some(a) = &self.audit {
            a.reopen();
        }
    }

    /// Waits until every queued record is written.
    pub async fn flush(&self) {
        if let Some(a) = &self.access {
            a.flush().await;
        }
        if let Some(a) = &self.audit {
            a.flush().await;
        }
    }

    /// Copies the access log writer's counters into the metrics.
    pub fn sync_counters(&self) {
        if let (Some(m), Some(a)) = (&self.metrics, &self.access) {
            let Ok(_one_at_a_time) = self.sync.lock() else { return };
            let sync = |counter: &prometheus_client::metrics::counter::Counter, value: &AtomicU64| {
                let now = value.load(Ordering::Relaxed);
                let seen = counter.get();
                if now > seen {
                    counter.inc_by(now - seen);
                }
            };
            sync(&m.access_log_records, &a.counters.written);
            sync(&m.access_log_dropped, &a.counters.dropped);
        }
    }

    /// Whether requests need an [`Observation`] at all.
    pub fn tracks_requests(&self) -> bool {
        self.access.is_some() || self.metrics.is_some()
    }
}

/// What `check` can tell about the log files without creating them: their
/// directories exist, the HMAC key reads.
pub fn check_files(config: &Config) -> Vec<crate::config::ConfigError> {
    use std::path::Path;
    let mut errors = Vec::new();
    let mut directory = |field: &str, file: &Path| {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            errors.push(crate::config::ConfigError {
                path: field.to_owned(),
                message: format!("directory {} does not exist", dir.display()),
            });
        }
    };
    if let crate::config::LogDestination::File(path) = &config.access_log.destination {
        directory("access_log.destination", path);
    }
    if let Some(audit) = &config.audit_log {
        directory("audit_log.path", &audit.path);
        if let Some(key) = &audit.hmac_key_file {
            if let Err(message) = audit::read_key(key) {
                errors.push(crate::config::ConfigError {
                    path: "audit_log.hmac_key_file".into(),
                    message,
                });
            }
        }
    }
    errors
}

/// The client's address: the peer, or when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` address that is not itself a trusted
/// proxy (the left-most entries are whatever the client claimed).
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: bool, trusted_proxies: &[IpNet]) -> IpAddr {
    if !trusted {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
    for value in values.iter().rev() {
        let Ok(text) = value.to_str() else { return client };
        for item in text.rsplit(',') {
            let Ok(ip) = item.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip;
            if !trusted_proxies.iter().any(|net| net.contains(&ip.to_canonical())) {
                return client;
            }
        }
    }
    client
}

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
    pub cache: Option<&'static str>,
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

    pub fn add_bytes_out(&mut self, n: usize) {
        self.bytes_out += n as u64;
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
            cache: self.trace.cache,
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

/// The per-snapshot handles: each route's and server's metrics.
pub struct Observed {
    pub routes: Vec<metrics::RouteMetrics>,
    /// Requests that matched no route (404) or failed before routing.
    pub no_route: metrics::RouteMetrics,
    /// `servers[upstream][server]`.
    pub servers: Vec<Vec<metrics::ServerMetrics>>,
    pub retries: Vec<prometheus_client::metrics::counter::Counter>,
}

impl Observed {
    pub fn build(metrics: &Metrics, config: &Config, upstreams: &[Arc<crate::upstream::Upstream>]) -> Observed {
        Observed {
            routes: config.routes.iter().map(|r| metrics.route(&r.name)).collect(),
            no_route: metrics.route(""),
            servers: upstreams
                .iter()
                .map(|u| {
                    u.servers
                        .iter()
                        .map(|s| metrics.server(&u.config.name, &s.label))
                        .collect()
                })
                .collect(),
            retries: upstreams.iter().map(|u| metrics.retries(&u.config.name)).collect(),
        }
    }
}
