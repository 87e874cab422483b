//! Prometheus metrics (prometheus-client), served as text exposition 0.0.4
//! on `[metrics] listen`.
//!
//! Labels are bounded by the config, never by traffic: route and upstream
//! names, server addresses as configured, listener names, a method folded
//! into a fixed set and a status class. No path, IP or header value ever
//! becomes a label.
//!
//! The request path touches no map: every handle a request needs (a route's
//! counters and histogram, a server's histogram) is created when the
//! snapshot is built, or on first use into a `OnceLock`, and is an atomic
//! increment after that. Gauges that mirror state (servers up, requests in
//! flight) are refreshed from the current snapshot at scrape time.

use std::sync::OnceLock;

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::cache::serve::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub upstream: String,
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub listener: String,
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub route: String,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Methods get their own label value; any other is `other`.
const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

/// Every metric family of the proxy, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    upstream_duration: Family<ServerLabels, Histogram>,
    upstream_failures: Family<ServerLabels, Counter>,
    upstream_retries: Family<UpstreamLabels, Counter>,
    upstream_in_flight: Family<ServerLabels, Gauge>,
    upstream_up: Family<ServerLabels, Gauge>,
    connections_accepted: Family<ListenerLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    connections_rejected: Family<ReasonLabels, Counter>,
    tls_handshakes: Family<TlsLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    admin_requests: Family<ResultLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    protection: Family<ActionLabels, Counter>,
    pub access_log_records: Counter,
    pub access_log_dropped: Counter,
    pub audit_records: Counter,
    /// 1 while attack mode is on.
    pub attack_mode: Gauge,
    pub bans_total: Counter,
    /// Bans not made because `max_per_minute` was reached.
    pub bans_capped_total: Counter,
    bans_active: Gauge,
    concurrency_limit: Family<UpstreamLabels, Gauge>,
    cache_requests: Family<CacheLabels, Counter>,
    cache_bytes: Gauge,
    cache_entries: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[allow(
        clippy::too_many_lines,
        reason = "registers every metric family, one after the other, as the exposition lists them"
    )]
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, method and status class",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(duration_buckets()));
        registry.register_with_unit(
            "request_duration",
            "Time from the request head to the end of the response body",
            Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_duration =
            Family::<ServerLabels, Histogram>::new_with_constructor(|| Histogram::new(duration_buckets()));
        registry.register_with_unit(
            "upstream_response_duration",
            "Time from sending a request upstream to its response head",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let upstream_failures = Family::<ServerLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Failed tries to an upstream server: connect errors, resets, timeouts",
            upstream_failures.clone(),
        );
        let upstream_retries = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent again to another server of the group",
            upstream_retries.clone(),
        );
        let upstream_in_flight = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "upstream_in_flight_requests",
            "Requests in flight to each upstream server",
            upstream_in_flight.clone(),
        );
        let upstream_up = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "upstream_server_up",
            "1 when the server is in rotation, 0 when ejected or failing its health checks",
            upstream_up.clone(),
        );
        let connections_accepted = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            connections_accepted.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_rejected",
            "Client connections closed by the proxy before or during a request head, by reason",
            connections_rejected.clone(),
        );
        let tls_handshakes = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Completed TLS handshakes, by protocol version",
            tls_handshakes.clone(),
        );
        let tls_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes (error or timeout)",
            tls_failures.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("reloads", "Reloads by kind and result", reloads.clone());
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by result (ok, error), from SIGHUP, the admin API or the file watch",
            config_reloads.clone(),
        );
        let admin_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests by result (ok, unauthorized, forbidden, bad_request, not_found, conflict, invalid)",
            admin_requests.clone(),
        );
        let protection = Family::<ActionLabels, Counter>::default();
        registry.register(
            "protection_actions",
            "Requests refused by protection, by route and action (rate_limited, ip_denied)",
            protection.clone(),
        );
        let access_log_records = Counter::default();
        registry.register(
            "access_log_records",
            "Access log records written",
            access_log_records.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log records dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let audit_records = Counter::default();
        registry.register("audit_records", "Audit log records queued", audit_records.clone());
        let attack_mode = Gauge::default();
        registry.register(
            "attack_mode",
            "1 while the spike detector holds attack mode on",
            attack_mode.clone(),
        );
        let bans_total = Counter::default();
        registry.register(
            "bans",
            "Clients banned (or, in shadow mode, that would be)",
            bans_total.clone(),
        );
        let bans_capped_total = Counter::default();
        registry.register(
            "bans_capped",
            "Bans not made because protect.bans.max_per_minute was reached",
            bans_capped_total.clone(),
        );
        let bans_active = Gauge::default();
        registry.register("bans_active", "Bans in force", bans_active.clone());
        let concurrency_limit = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_concurrency_limit",
            "The adaptive concurrency limit of each upstream group (load shedding)",
            concurrency_limit.clone(),
        );
        let cache_requests = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Requests on caching routes by how the cache served them (hit, miss, revalidated, stale, bypass)",
            cache_requests.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register_with_unit(
            "cache_size",
            "Bytes the HTTP cache holds (bodies, fields and per-entry overhead)",
            Unit::Bytes,
            cache_bytes.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register("cache_entries", "Keys the HTTP cache holds", cache_entries.clone());
        registry.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_failures,
            upstream_retries,
            upstream_in_flight,
            upstream_up,
            connections_accepted,
            connections_open,
            connections_rejected,
            tls_handshakes,
            tls_failures,
            reloads,
            admin_requests,
            config_reloads,
            protection,
            access_log_records,
            access_log_dropped,
            audit_records,
            attack_mode,
            bans_total,
            bans_capped_total,
            bans_active,
            concurrency_limit,
            cache_requests,
            cache_bytes,
            cache_entries,
        }
    }

    /// The handles of one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_owned(),
            requests: Default::default(),
            duration: self.request_duration.get_or_create_owned(&RouteLabels {
                route: route.to_owned(),
            }),
            cache: Default::default(),
        }
    }

    /// The handles of one upstream server.
    pub fn server(&self, upstream: &str, server: &str) -> ServerMetrics {
        let labels = ServerLabels {
            upstream: upstream.to_owned(),
            server: server.to_owned(),
        };
        ServerMetrics {
            response: self.upstream_duration.get_or_create_owned(&labels),
            failures: self.upstream_failures.get_or_create_owned(&labels),
        }
    }

    pub fn retries(&self, upstream: &str) -> Counter {
        self.upstream_retries.get_or_create_owned(&UpstreamLabels {
            upstream: upstream.to_owned(),
        })
    }

    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let labels = ListenerLabels {
            listener: listener.to_owned(),
        };
        ListenerMetrics {
            name: listener.to_owned(),
            accepted: self.connections_accepted.get_or_create_owned(&labels),
            open: self.connections_open.get_or_create_owned(&labels),
            rejected: self.connections_rejected.clone(),
            tls_handshakes: self.tls_handshakes.clone(),
            tls_failures: self.tls_failures.clone(),
        }
    }

    pub fn admin_request(&self, result: &'static str) {
        self.admin_requests.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn reload(&self, kind: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        if kind == "config" {
            self.config_reloads.get_or_create(&ResultLabels { result }).inc();
        }
        self.reloads
            .get_or_create(&ReloadLabels {
                kind,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Sets the state gauges from `snapshot`, then encodes every family.
    pub fn render(&self, snapshot: &crate::state::Snapshot) -> String {
        self.upstream_in_flight.clear();
        self.upstream_up.clear();
        let now = crate::upstream::health::now_ms();
        for upstream in &snapshot.upstreams {
            for server in &upstream.servers {
                let labels = ServerLabels {
                    upstream: upstream.config.name.clone(),
                    server: server.addr.to_string(),
                };
                self.upstream_in_flight.get_or_create(&labels).set(i64::from(
                    server.health.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                ));
                let up = server.health.status(now) == crate::upstream::health::ServerStatus::Healthy;
                self.upstream_up.get_or_create(&labels).set(i64::from(up));
            }
        }
        for (upstream, shedder) in snapshot.upstreams.iter().zip(&snapshot.shedders) {
            if let Some(shedder) = shedder {
                let labels = UpstreamLabels {
                    upstream: upstream.config.name.clone(),
                };
                self.concurrency_limit
                    .get_or_create(&labels)
                    .set(i64::from(shedder.limit()));
            }
        }
        if let Some(bans) = &snapshot.bans {
            self.bans_active.set(bans.active_count(now) as i64);
        }
        if let Some(cache) = &snapshot.cache {
            self.cache_bytes.set(cache.store().bytes() as i64);
            self.cache_entries.set(cache.store().keys() as i64);
        }
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// One route's request counters (by method and status class, created on
/// first use) and duration histogram.
pub struct RouteMetrics {
    route: String,
    requests: [[OnceLock<Counter>; 5]; 8],
    duration: Histogram,
    /// By [`Outcome::index`], created on first use.
    cache: [OnceLock<Counter>; 5],
}

impl RouteMetrics {
    pub fn record(&self, metrics: &Metrics, method: &Method, status: u16, seconds: f64) {
        let m = method_index(method);
        let c = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[m][c]
            .get_or_init(|| {
                metrics.requests.get_or_create_owned(&RequestLabels {
                    route: self.route.clone(),
                    method: METHODS[m],
                    status_class: CLASSES[c],
                })
            })
            .inc();
        self.duration.observe(seconds);
    }

    /// Counts how the cache served a request.
    pub fn cache_result(&self, metrics: &Metrics, result: Outcome) {
        let Some(counter) = self.cache.get(result.index()) else {
            return;
        };
        counter
            .get_or_init(|| {
                metrics.cache_requests.get_or_create_owned(&CacheLabels {
                    route: self.route.clone(),
                    result: result.as_str(),
                })
            })
            .inc();
    }

    /// Counts a request refused by protection (labels built per call).
    pub fn protection_action(&self, metrics: &Metrics, action: &'static str) {
        metrics
            .protection
            .get_or_create(&ActionLabels {
                route: self.route.clone(),
                action,
            })
            .inc();
    }
}

pub struct ServerMetrics {
    pub response: Histogram,
    pub failures: Counter,
}

/// A listener's connection counters.
#[derive(Clone)]
pub struct ListenerMetrics {
    name: String,
    pub accepted: Counter,
    pub open: Gauge,
    rejected: Family<ReasonLabels, Counter>,
    tls_handshakes: Family<TlsLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
}

impl ListenerMetrics {
    pub fn rejected(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                listener: self.name.clone(),
                reason,
            })
            .inc();
    }

    pub fn tls_handshake(&self, version: &'static str) {
        self.tls_handshakes
            .get_or_create(&TlsLabels {
                listener: self.name.clone(),
                version,
            })
            .inc();
    }

    pub fn tls_failure(&self, reason: &'static str) {
        self.tls_failures
            .get_or_create(&ReasonLabels {
                listener: self.name.clone(),
                reason,
            })
            .inc();
    }
}

/// Serves the metrics endpoint until `stop` fires: `GET <path>` answers
/// the text exposition, anything else 404 (or 405 for other methods).
pub async fn serve(
    listener: tokio::net::TcpListener,
    path: String,
    metrics: std::sync::Arc<Metrics>,
    observe: std::sync::Arc<super::Observe>,
    snapshot: crate::state::SharedSnapshot,
    stop: tokio_util::sync::CancellationToken,
) {
    use bytes::Bytes;
    use http_body_util::Full;
    let path: std::sync::Arc<str> = path.into();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let (metrics, observe, snapshot, path, stop) = (
            metrics.clone(),
            observe.clone(),
            snapshot.clone(),
            path.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let response = if req.uri().path() != &*path {
                    plain(http::StatusCode::NOT_FOUND, "not found\n".into())
                } else if req.method() != Method::GET && req.method() != Method::HEAD {
                    plain(http::StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into())
                } else {
                    observe.sync_counters();
                    let text = metrics.render(&snapshot.load());
                    let mut r = plain(http::StatusCode::OK, text);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
                    );
                    r
                };
                std::future::ready(Ok::<_, std::convert::Infallible>(response))
            });
            fn plain(status: http::StatusCode, body: String) -> http::Response<Full<Bytes>> {
                let mut r = http::Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                r
            }
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
