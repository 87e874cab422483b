//! Observability: access log, audit log, metrics, request ids.
//!
//! [`Observe`] is process-wide (it outlives snapshots): the access log
//! writer, the audit log writer and the metrics registry, the sinks. The
//! per-request record that feeds them is the pipeline's
//! (`pipeline::record`): when a response body is done or dropped it makes
//! one metrics update and at most one access log record, formatted on the
//! request's thread and queued without waiting. [`Observed`] holds one
//! snapshot's metric handles.
//!
//! - [`access`]: record formats and the non-blocking writer;
//! - [`audit`]: the hash-chained audit log and its verifier;
//! - [`metrics`]: Prometheus families and the metrics endpoint;
//! - [`request_id`]: UUIDv7 request ids and `traceparent`;
//! - [`clock`]: timestamp formats;
//! - [`diag`]: the proxy's own log lines under load, one per kind and
//!   second.

pub mod access;
pub mod audit;
pub mod clock;
pub mod diag;
pub mod metrics;
pub mod request_id;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

use crate::config::Config;
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
            // Counted for the metrics endpoint and for the admin API's /metrics.
            metrics: (config.metrics.is_some() || config.admin.is_some()).then(|| Arc::new(Metrics::new())),
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
    /// The handles for `config`'s routes and servers (a server is labelled
    /// by its address as configured, as `upstream::Server::label` is).
    pub fn build(metrics: &Metrics, config: &Config) -> Observed {
        Observed {
            routes: config.routes.iter().map(|r| metrics.route(&r.name)).collect(),
            no_route: metrics.route(""),
            servers: config
                .upstreams
                .iter()
                .map(|u| {
                    u.servers
                        .iter()
                        .map(|s| metrics.server(&u.name, &s.to_string()))
                        .collect()
                })
                .collect(),
            retries: config.upstreams.iter().map(|u| metrics.retries(&u.name)).collect(),
        }
    }
}
