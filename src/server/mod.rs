//! Listeners, the accept loop and graceful drain.
//!
//! [`Proxy::bind`] binds every listener first (so a test can bind
//! `127.0.0.1:0` and read [`Proxy::local_addrs`] before any traffic), then
//! [`Proxy::run`] serves until the shutdown future resolves:
//! 1. the listeners close (new connections are refused);
//! 2. every connection is asked to drain: idle HTTP/1.1 connections close,
//!    busy ones close after their response, HTTP/2 ones get GOAWAY;
//! 3. after `server.drain_timeout`, whatever is left is cut.

mod accept;
pub mod admin;
mod certificates;
mod check;
pub mod conn;
mod control;
mod listeners;
mod reload;
mod tasks;
/// TLS material (certificates, stores, rustls configs) lives in `crate::tls`;
/// re-exported here where the listeners use it.
pub use crate::tls;
use accept::accept_loop;
use certificates::watch_certificates;
pub use certificates::{CertReloader, load_certificates, uncovered_route_hosts};
pub use check::{Validated, validate};
pub use control::Control;
pub use reload::{Reloader, plan};
use tasks::{attack_watch, housekeeping};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigErrors, ListenerConfig, ListenerProtocol};
use crate::observe::audit::CertificateSummary;
use crate::observe::metrics::ListenerMetrics;
use crate::observe::{Event, Observe};
use crate::protect::ConnTable;
use crate::state::{Kept, SharedSnapshot, Snapshot};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config failed validation (certificates included).
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Observe(String),
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        addr: SocketAddr,
        listener: String,
        source: std::io::Error,
    },
}

/// Per-listener serving settings, built once at bind.
///
/// hyper-util's auto builder ignores "HTTP/1 only" / "HTTP/2 only" when
/// upgrades are enabled, so restricted listeners use hyper's own builders.
pub(crate) struct ListenerRuntime {
    pub name: String,
    pub protocol: ListenerProtocol,
    pub http1: hyper::server::conn::http1::Builder,
    pub http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    pub auto: auto::Builder<TokioExecutor>,
    /// TLS termination: the acceptor (whose resolver reads the reloadable
    /// certificate store) and the handshake timeout.
    pub tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    /// Header names for the verified client certificate (mTLS listeners).
    pub client_cert_headers: Option<(http::HeaderName, http::HeaderName)>,
    pub hsts: Option<http::HeaderValue>,
    pub redirect_https_port: Option<u16>,
    /// Connection counters, when metrics are on.
    pub metrics: Option<ListenerMetrics>,
    /// The listener's own allow / deny lists, checked at accept.
    pub ip_filter: crate::config::IpFilter,
    /// Connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
}

const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl ListenerRuntime {
    /// With TLS termination when the listener has TLS settings and a
    /// rustls config was built for them.
    fn with_tls(mut self, listener: &ListenerConfig, server_config: Option<Arc<rustls::ServerConfig>>) -> Self {
        if let (Some(t), Some(server_config)) = (&listener.tls, server_config) {
            self.tls = Some((tokio_rustls::TlsAcceptor::from(server_config), t.handshake_timeout));
        }
        self
    }

    fn new(listener: &ListenerConfig, config: &Config, observe: &Observe) -> Self {
        let limits = &config.limits;
        // hyper answers 431 when the head does not fit its buffer; the exact
        // byte limit is enforced by `max_header_size` (HTTP/1-only listeners)
        // and again in the pipeline (all listeners).
        let buf_size = (limits.max_request_header_bytes + 4096).max(16 * 1024);

        // hyper's own builders and the auto builder's are different types
        // with the same setters: one macro per protocol keeps their
        // settings from drifting apart.
        macro_rules! http1_settings {
            ($builder:expr) => {
                $builder
                    .timer(TokioTimer::new())
                    // The proxy runs its own header and idle timers (see conn.rs).
                    .header_read_timeout(None)
                    .keep_alive(true)
                    .max_headers(limits.max_header_count)
                    .max_buf_size(buf_size)
            };
        }
        macro_rules! http2_settings {
            ($builder:expr) => {
                $builder
                    .timer(TokioTimer::new())
                    .max_header_list_size(limits.max_request_header_bytes as u32)
                    .max_concurrent_streams(config.protect.h2_max_concurrent_streams)
                    .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
                    .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                    .enable_connect_protocol()
            };
        }

        let mut http1 = hyper::server::conn::http1::Builder::new();
        // Only hyper's own HTTP/1 builder can enforce the exact byte limit.
        http1_settings!(http1).max_header_size(limits.max_request_header_bytes);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2_settings!(http2);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        http1_settings!(auto.http1());
        http2_settings!(auto.http2());

        ListenerRuntime {
            name: listener.name.clone(),
            protocol: listener.protocol,
            http1,
            http2,
            auto,
            tls: None,
            client_cert_headers: listener
                .tls
                .as_ref()
                .and_then(|t| t.client_auth.as_ref())
                .map(|a| (a.subject_header.clone(), a.fingerprint_header.clone())),
            hsts: listener
                .tls
                .as_ref()
                .and_then(|t| t.hsts_max_age)
                .and_then(|age| http::HeaderValue::from_str(&format!("max-age={}", age.as_secs())).ok()),
            redirect_https_port: listener.redirect_https_port,
            metrics: observe.metrics.as_ref().map(|m| m.listener(&listener.name)),
            ip_filter: listener.ip_filter.clone(),
            proxy_protocol: listener.proxy_protocol,
        }
    }
}

/// A bound proxy, ready to run.
pub struct Proxy {
    snapshot: SharedSnapshot,
    /// Every listener's sockets and settings (a reload changes them).
    listeners: Arc<tokio::sync::Mutex<listeners::Listeners>>,
    /// Where the first config's listeners were bound, in config order.
    bound: Vec<SocketAddr>,
    certificates: CertReloader,
    observe: Arc<Observe>,
    metrics_listener: Option<(TcpListener, String)>,
    /// Open client connections and the limits on them (all listeners;
    /// process-wide, outside every snapshot).
    connections: Arc<ConnTable>,
    /// Reloads the config (SIGHUP, tests); holds the kept state.
    reloader: Reloader,
    /// The admin API's listener, tokens and TLS, when `[admin]` is on.
    admin: Option<(TcpListener, admin::Tokens, Option<admin::Tls>)>,
    /// False once shutdown begins (`/readyz`).
    ready: Arc<std::sync::atomic::AtomicBool>,
    started: std::time::Instant,
}

impl Proxy {
    /// Opens the configured logs and metrics, builds the runtime snapshot
    /// and binds every listener.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let observe = Observe::from_config(&config).map_err(StartError::Observe)?;
        Self::bind_with(config, Arc::new(observe)).await
    }

    /// [`bind`](Self::bind) with logs and metrics made by the caller (tests,
    /// embedding: an access log to a writer of their own).
    pub async fn bind_with(config: Config, observe: Arc<Observe>) -> Result<Proxy, StartError> {
        let Validated {
            stores,
            server_configs,
            warnings,
            snapshot,
            kept,
            tokens,
            admin_tls,
        } = validate(&config, &observe, &Kept::default()).await?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        let listeners = listeners::Listeners::bind(&config, &observe, server_configs).await?;
        let bound = listeners.local_addrs();
        let listeners = Arc::new(tokio::sync::Mutex::new(listeners));
        let metrics_listener = match (&config.metrics, &observe.metrics) {
            (Some(m), Some(_)) => {
                let socket = TcpListener::bind(m.listen).await.map_err(|source| StartError::Bind {
                    addr: m.listen,
                    listener: "metrics".into(),
                    source,
                })?;
                Some((socket, m.path.clone()))
            }
            _ => None,
        };
        let mut stores = stores;
        let admin_tls = admin_tls.map(|(store, server_config)| {
            stores.push(store);
            let timeout = config
                .admin
                .as_ref()
                .and_then(|a| a.tls.as_ref())
                .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
            (tokio_rustls::TlsAcceptor::from(server_config), timeout)
        });
        let admin = bind_admin(&config, tokens)
            .await?
            .map(|(socket, tokens)| (socket, tokens, admin_tls));
        let connections = if config.protect.max_connections.is_some() {
            ConnTable::new(&config.protect)
        } else {
            let (max, limit) = default_max_connections();
            tracing::info!(max_connections = max, open_file_limit = ?limit, "protect.max_connections not set; derived from the open file limit");
            let mut protect = config.protect.clone();
            protect.max_connections = Some(max);
            ConnTable::new(&protect)
        };
        let summary = config_summary(&config, &stores, "start");
        observe.audit(Event::ProcessStart {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
        });
        observe.audit(summary);
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let certificates = CertReloader {
            stores: Arc::new(ArcSwap::from_pointee(stores)),
            observe: observe.clone(),
        };
        Ok(Proxy {
            reloader: Reloader::new(
                snapshot.clone(),
                kept,
                observe.clone(),
                certificates.clone(),
                listeners.clone(),
            ),
            snapshot,
            listeners,
            bound,
            certificates,
            observe,
            metrics_listener,
            connections,
            admin,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            started: std::time::Instant::now(),
        })
    }

    /// Where the admin API listens, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _, _)| l.local_addr().ok())
    }

    /// The handle that applies changes (admin API, SIGHUP, tests).
    pub fn control(&self) -> Control {
        let snapshot = self.snapshot.load();
        Control {
            snapshot: self.snapshot.clone(),
            reloader: self.reloader.clone(),
            certificates: self.certificates.clone(),
            observe: self.observe.clone(),
            config_path: snapshot.config.source.as_ref().map(|(p, _)| p.clone()),
            ready: self.ready.clone(),
            started: self.started,
        }
    }

    /// The logs and metrics of this proxy (reopen on SIGUSR1, flush, tests).
    pub fn observe(&self) -> Arc<Observe> {
        self.observe.clone()
    }

    /// Where the metrics endpoint listens, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The handle that reloads TLS certificates (SIGHUP, admin API).
    pub fn certificates(&self) -> CertReloader {
        self.certificates.clone()
    }

    /// Where each listener of the first config is bound, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.clone()
    }

    /// Where each listener is bound now (a reload may have changed them).
    pub async fn current_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.lock().await.local_addrs()
    }

    /// The current snapshot, for inspection (tests, admin).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    /// The handle that reloads the whole config (SIGHUP, tests).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    #[allow(
        clippy::too_many_lines,
        reason = "starts and stops the process's tasks in order: listeners, watchers, drain"
    )]
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        if let Some((listener, tokens, tls)) = self.admin.take() {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "admin API listening");
            }
            let control = self.control();
            tokio::spawn(admin::serve(
                listener,
                Arc::new(admin::Admin { control, tokens }),
                tls,
                admin_stop.clone(),
            ));
        }
        let hard_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        self.listeners.lock().await.start(listeners::Context {
            snapshot: self.snapshot.clone(),
            connections: self.connections.clone(),
            stop: stop_accepting.clone(),
            hard_stop: hard_stop.clone(),
            tasks: tasks.clone(),
        });
        tokio::spawn(self.control().watch_config(stop_accepting.clone()));
        for store in self.certificates.stores().iter() {
            if let Some(interval) = store.watch_interval {
                tasks.spawn(watch_certificates(
                    store.clone(),
                    interval,
                    stop_accepting.clone(),
                    self.observe.clone(),
                ));
            }
        }
        tokio::spawn(housekeeping(
            self.connections.clone(),
            self.snapshot.clone(),
            stop_accepting.clone(),
        ));
        if let Some(adaptive) = &self.snapshot.load().adaptive {
            tokio::spawn(attack_watch(
                adaptive.config.window,
                self.snapshot.clone(),
                self.observe.clone(),
                stop_accepting.clone(),
            ));
        }
        let metrics_stop = CancellationToken::new();
        if let (Some((listener, path)), Some(metrics)) = (self.metrics_listener, &self.observe.metrics) {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, %path, "metrics endpoint listening");
            }
            tokio::spawn(crate::observe::metrics::serve(
                listener,
                path,
                metrics.clone(),
                self.observe.clone(),
                self.snapshot.clone(),
                metrics_stop.clone(),
            ));
        }

        shutdown.await;
        // Load balancers polling /readyz stop sending from now on; the
        // listeners stay open for `shutdown_delay` while they notice.
        self.ready.store(false, std::sync::atomic::Ordering::Relaxed);
        let delay = self.snapshot.load().config.server.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!("shutting down: /readyz is false; listeners close in {delay:?}");
            tokio::time::sleep(delay).await;
        }
        // Read now: a reload may have changed it.
        let drain_timeout = self.snapshot.load().config.server.drain_timeout;
        tracing::info!(
            "shutting down: no new connections, draining for up to {:?}",
            drain_timeout
        );
        // The accept loops are tracked tasks: they end here, their sockets
        // close, and the connections drain.
        stop_accepting.cancel();
        tasks.close();
        if tokio::time::timeout(drain_timeout, tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "drain deadline passed; closing remaining connections"
            );
            hard_stop.cancel();
            tasks.wait().await;
        }
        metrics_stop.cancel();
        admin_stop.cancel();
        self.observe.audit(Event::ProcessStop {
            pid: std::process::id(),
            reason: "shutdown".into(),
        });
        self.observe.flush().await;
        tracing::info!("shutdown complete");
    }
}

/// Binds the admin API's listener when `[admin]` is on.
async fn bind_admin(
    config: &Config,
    tokens: Option<admin::Tokens>,
) -> Result<Option<(TcpListener, admin::Tokens)>, StartError> {
    let (Some(a), Some(tokens)) = (&config.admin, tokens) else {
        return Ok(None);
    };
    let socket = TcpListener::bind(a.listen).await.map_err(|source| StartError::Bind {
        addr: a.listen,
        listener: "admin".into(),
        source,
    })?;
    if tokens.is_open() {
        tracing::warn!(addr = %a.listen, "admin API without tokens: open to every local caller");
    }
    Ok(Some((socket, tokens)))
}

/// `protect.max_connections` when the config does not set it: half the
/// process's open-file limit (each client connection may need an upstream
/// connection too) less 64 for listeners, logs and health checks, as
/// HAProxy derives its `maxconn`; 10,000 when the limit cannot be read.
/// Past it, accept would fail anyway, and with a cap the table can evict
/// quiet connections instead.
fn default_max_connections() -> (usize, Option<u64>) {
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|soft| soft.parse::<u64>().ok())
    });
    let max = match limit {
        Some(n) => (n.saturating_sub(64) / 2).clamp(64, 10_000_000) as usize,
        None => 10_000,
    };
    (max, limit)
}

/// The `config.load` audit record: what is now in use.
fn config_summary(config: &Config, stores: &[Arc<tls::CertStore>], trigger: &str) -> Event {
    Event::ConfigLoad {
        trigger: trigger.to_owned(),
        file: config.source.as_ref().map(|(p, _)| p.display().to_string()),
        sha256: config.source.as_ref().map(|(_, h)| h.clone()),
        listeners: config.listeners.iter().map(|l| l.name.clone()).collect(),
        routes: config.routes.iter().map(|r| r.name.clone()).collect(),
        upstreams: config.upstreams.iter().map(|u| u.name.clone()).collect(),
        certificates: stores
            .iter()
            .map(|s| CertificateSummary {
                listener: s.listener.clone(),
                fingerprints: s.current().fingerprints.clone(),
            })
            .collect(),
        changes: Vec::new(),
    }
}
