//! Listeners, the accept loop and graceful drain.
//!
//! [`Proxy::bind`] binds every listener first (so a test can bind
//! `127.0.0.1:0` and read [`Proxy::local_addrs`] before any traffic), then
//! [`Proxy::run`] serves until the shutdown future resolves:
//! 1. the listeners close (new connections are refused);
//! 2. every connection is asked to drain: idle HTTP/1.1 connections close,
//!    busy ones close after their response, HTTP/2 ones get GOAWAY;
//! 3. after `server.drain_timeout`, whatever is left is cut.

pub mod conn;
/// TLS material (certificates, stores, rustls configs) lives in `crate::tls`;
/// re-exported here where the listeners use it.
pub use crate::tls;

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
use crate::state::{SharedSnapshot, Snapshot};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Tls(String),
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

/// Loads the certificates of every TLS listener (used by `check` and bind).
pub fn load_certificates(config: &Config) -> Result<Vec<Arc<tls::CertStore>>, ConfigErrors> {
    let mut stores = Vec::new();
    let mut errors = Vec::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        if let Some(t) = &listener.tls {
            match tls::CertStore::load(&listener.name, t) {
                Ok(store) => stores.push(Arc::new(store)),
                Err(mut e) => errors.append(&mut e),
            }
            if let Some(auth) = &t.client_auth {
                if let Err(message) = tls::load_roots(&auth.ca) {
                    errors.push(crate::config::ConfigError {
                        path: format!("listeners[{i}].tls.client_auth.ca"),
                        message,
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(stores)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Route hosts that no certificate of any TLS listener covers, as warnings
/// (`routes[0].host: no TLS certificate covers "a.example.com"`). Empty when
/// there is no TLS listener.
pub fn uncovered_route_hosts(config: &Config, stores: &[Arc<tls::CertStore>]) -> Vec<String> {
    if stores.is_empty() {
        return Vec::new();
    }
    let tables: Vec<_> = stores.iter().map(|s| s.current()).collect();
    let mut warnings = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        for host in &route.hosts {
            let name = match host {
                crate::config::HostPattern::Exact(name) => name.clone(),
                // A wildcard route is covered when one of its names would be.
                crate::config::HostPattern::Wildcard(suffix) => format!("portcullis-probe{suffix}"),
            };
            if !tables.iter().any(|t| t.covers(&name)) {
                let shown = match host {
                    crate::config::HostPattern::Exact(n) => n.clone(),
                    crate::config::HostPattern::Wildcard(suffix) => format!("*{suffix}"),
                };
                warnings.push(format!("routes[{i}].host: no TLS certificate covers \"{shown}\""));
            }
        }
    }
    warnings
}

/// Reloads the certificates of every TLS listener: new handshakes use the
/// new files, established connections keep theirs, and a listener whose
/// files fail keeps its old certificates. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CertReloader {
    stores: Arc<Vec<Arc<tls::CertStore>>>,
    observe: Arc<Observe>,
}

impl CertReloader {
    /// Reloads every store; returns the errors of the ones that failed.
    pub fn reload(&self) -> Result<usize, ConfigErrors> {
        self.reload_by("api")
    }

    /// [`reload`](Self::reload), recording `trigger` (such as `SIGHUP`) in
    /// the audit log.
    pub fn reload_by(&self, trigger: &str) -> Result<usize, ConfigErrors> {
        let mut errors = Vec::new();
        for store in self.stores.iter() {
            if let Err(mut e) = reload_store(store, trigger, &self.observe) {
                errors.append(&mut e.0);
            }
        }
        if errors.is_empty() {
            Ok(self.stores.len())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    pub fn stores(&self) -> &[Arc<tls::CertStore>] {
        &self.stores
    }
}

/// Reloads one listener's certificates, logging, counting and auditing the
/// result.
fn reload_store(store: &tls::CertStore, trigger: &str, observe: &Observe) -> Result<(), ConfigErrors> {
    let before = store.current().fingerprints.clone();
    let result = store.reload();
    let after = store.current().fingerprints.clone();
    let error = match &result {
        Ok(()) => {
            tracing::info!(listener = %store.listener, %trigger, fingerprints = ?after, "certificates reloaded");
            None
        }
        Err(e) => {
            let text = e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            tracing::error!(listener = %store.listener, %trigger, "certificate reload failed ({text}); keeping the current certificates");
            Some(text)
        }
    };
    if let Some(m) = &observe.metrics {
        m.reload("certificates", result.is_ok());
    }
    observe.audit(Event::CertificatesReload {
        trigger: trigger.to_owned(),
        listener: store.listener.clone(),
        result: if result.is_ok() { "ok" } else { "error" }.to_owned(),
        added: after.iter().filter(|f| !before.contains(f)).cloned().collect(),
        removed: before.iter().filter(|f| !after.contains(f)).cloned().collect(),
        error,
    });
    result.map_err(ConfigErrors)
}

/// A bound proxy, ready to run.
pub struct Proxy {
    snapshot: SharedSnapshot,
    listeners: Vec<(Arc<ListenerRuntime>, TcpListener)>,
    certificates: CertReloader,
    observe: Arc<Observe>,
    metrics_listener: Option<(TcpListener, String)>,
    /// Open client connections and the limits on them (all listeners).
    connections: Arc<ConnTable>,
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
        let mut listeners = Vec::new();
        let stores = load_certificates(&config)?;
        for warning in uncovered_route_hosts(&config, &stores) {
            tracing::warn!("{warning}");
        }
        let mut next_store = stores.iter();
        for listener in &config.listeners {
            let mut runtime = ListenerRuntime::new(listener, &config, &observe);
            if let Some(t) = &listener.tls {
                let store = next_store
                    .next()
                    .cloned()
                    .ok_or_else(|| StartError::Tls(format!("{}: certificates not loaded", listener.name)))?;
                let server_config = tls::server_config(store, t).map_err(StartError::Tls)?;
                runtime.tls = Some((tokio_rustls::TlsAcceptor::from(server_config), t.handshake_timeout));
            }
            let runtime = Arc::new(runtime);
            for addr in &listener.bind {
                let socket = TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                    addr: *addr,
                    listener: listener.name.clone(),
                    source,
                })?;
                listeners.push((runtime.clone(), socket));
            }
        }
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
        let snapshot = Snapshot::build(config, &observe).await?;
        observe.audit(Event::ProcessStart {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
        });
        observe.audit(summary);
        Ok(Proxy {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            listeners,
            certificates: CertReloader {
                stores: Arc::new(stores),
                observe: observe.clone(),
            },
            observe,
            metrics_listener,
            connections,
        })
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

    /// Where each listener is bound, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(_, l)| l.local_addr().ok()).collect()
    }

    /// The current snapshot, for inspection (tests, admin).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    #[allow(
        clippy::too_many_lines,
        reason = "starts and stops the process's tasks in order: listeners, watchers, drain"
    )]
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let drain_timeout = self.snapshot.load().config.server.drain_timeout;

        let mut accept_loops = Vec::new();
        for (runtime, listener) in self.listeners {
            let snapshot = self.snapshot.clone();
            let stop = stop_accepting.clone();
            let hard = hard_stop.clone();
            let tracker = tasks.clone();
            accept_loops.push(tokio::spawn(accept_loop(
                listener,
                runtime,
                snapshot,
                self.connections.clone(),
                stop,
                hard,
                tracker,
            )));
        }

        for store in self.certificates.stores() {
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
        tracing::info!(
            "shutting down: no new connections, draining for up to {:?}",
            drain_timeout
        );
        stop_accepting.cancel();
        for handle in accept_loops {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "accept loop ended abnormally");
            }
        }
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
        self.observe.audit(Event::ProcessStop {
            pid: std::process::id(),
            reason: "shutdown".into(),
        });
        self.observe.flush().await;
        tracing::info!("shutdown complete");
    }
}

/// Reloads a listener's certificates when their files change.
async fn watch_certificates(
    store: Arc<tls::CertStore>,
    interval: Duration,
    stop: CancellationToken,
    observe: Arc<Observe>,
) {
    let mut seen = store.files_signature();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = store.files_signature();
        if now == seen {
            continue;
        }
        seen = now;
        // Logged, counted and audited by reload_store; the old
        // certificates stay in use on failure.
        let _ = reload_store(&store, "file-watch", &observe);
    }
}

/// Forgets idle rate-limit keys, expired bans and old strike counts every
/// few seconds, so their memory is bounded by the keys seen recently.
async fn housekeeping(connections: Arc<ConnTable>, snapshot: SharedSnapshot, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        connections.housekeeping();
        let current = snapshot.load();
        for limit in current.route_limits.iter().flatten() {
            limit.limiter.housekeeping();
        }
        if let Some(adaptive) = &current.adaptive {
            adaptive.housekeeping();
        }
        if let Some(bans) = &current.bans {
            bans.housekeeping(crate::upstream::health::now_ms());
        }
    }
}

/// Closes a detector window every `window`: logs, audits and counts each
/// change of attack mode with its reasons.
async fn attack_watch(window: Duration, snapshot: SharedSnapshot, observe: Arc<Observe>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let current = snapshot.load();
        let Some(adaptive) = &current.adaptive else { return };
        let Some((verdict, transition)) = adaptive.tick() else {
            continue;
        };
        let mode = match adaptive.config.mode {
            crate::config::ProtectMode::Shadow => "shadow",
            crate::config::ProtectMode::Enforce => "enforce",
        };
        let (state, reasons) = match transition {
            None => continue,
            Some(crate::protect::detect::Transition::Entered(reasons)) => {
                tracing::warn!(%mode, reasons = ?reasons, "attack mode entered");
                ("entered", reasons)
            }
            Some(crate::protect::detect::Transition::Left) => {
                tracing::warn!(%mode, rate = verdict.rate, "attack mode left");
                ("left", verdict.reasons.clone())
            }
        };
        if let Some(m) = &observe.metrics {
            m.attack_mode.set(i64::from(state == "entered"));
        }
        observe.audit(Event::AttackMode {
            state: state.into(),
            mode: mode.into(),
            reasons,
        });
    }
}

async fn accept_loop(
    listener: TcpListener,
    runtime: Arc<ListenerRuntime>,
    snapshot: SharedSnapshot,
    connections: Arc<ConnTable>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
) {
    let local = listener.local_addr().ok();
    if let Some(addr) = local {
        tracing::info!(listener = %runtime.name, %addr, "listening");
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of
                // spinning; the error is the operator's to see.
                tracing::error!(listener = %runtime.name, error = %e, "accept failed; pausing accepts for 100ms");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let accepted = Accepted {
            runtime: runtime.clone(),
            snapshot: snapshot.clone(),
            connections: connections.clone(),
            stop: stop.clone(),
            hard_stop: hard_stop.clone(),
            tasks: tasks.clone(),
            local: local.unwrap_or(peer),
        };
        // The listener's own lists concern the socket's peer (with the
        // PROXY protocol: the balancer).
        if !runtime.ip_filter.permits(peer.ip()) {
            accepted.refuse(peer, "ip_denied");
            continue;
        }
        if !runtime.proxy_protocol {
            accepted.start(stream, peer, true);
            continue;
        }
        // The peer is a load balancer that names the client in a PROXY
        // protocol header: only a trusted one may, and the checks of the
        // connection apply to the client it names.
        if !is_trusted(&snapshot, peer.ip()) {
            accepted.refuse(peer, "proxy_protocol_untrusted");
            continue;
        }
        let header_timeout = snapshot.load().config.timeouts.header_read;
        tasks.spawn(async move {
            let mut stream = stream;
            let header = tokio::select! {
                _ = accepted.stop.cancelled() => return,
                header = tokio::time::timeout(
                    header_timeout,
                    crate::protect::proxy_protocol::read_header(&mut stream),
                ) => header,
            };
            // An UNKNOWN / LOCAL header keeps the balancer's address, but
            // not its trust: the HTTP headers behind it are a client's.
            let (client, may_trust) = match header {
                Ok(Ok(crate::protect::proxy_protocol::ProxyHeader::Proxied { source, .. })) => (source, true),
                Ok(Ok(crate::protect::proxy_protocol::ProxyHeader::Unknown)) => (peer, false),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "bad PROXY protocol header; closing");
                    accepted.refuse(peer, "proxy_protocol_invalid");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "no PROXY protocol header in time; closing");
                    accepted.refuse(peer, "proxy_protocol_timeout");
                    return;
                }
            };
            accepted.start(stream, client, may_trust);
        });
    }
    // Dropping the listener here closes the socket: new connections are
    // refused from now on.
    drop(listener);
}

fn is_trusted(snapshot: &SharedSnapshot, ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    snapshot
        .load()
        .config
        .server
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&ip))
}

/// What a just-accepted connection needs from its listener.
struct Accepted {
    runtime: Arc<ListenerRuntime>,
    snapshot: SharedSnapshot,
    connections: Arc<ConnTable>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
    local: SocketAddr,
}

impl Accepted {
    /// Closed before a byte of HTTP is read: the cheapest answer.
    fn refuse(&self, peer: SocketAddr, reason: &'static str) {
        if let Some(m) = &self.runtime.metrics {
            m.rejected(reason);
        }
        tracing::debug!(peer = %peer, reason, "connection refused");
    }

    /// A place in the connection table for `peer`, or why not: a ban (the
    /// trusted proxies are never refused for one), or the table's limits.
    fn admit(&self, peer: SocketAddr, trusted: bool) -> Result<crate::protect::ConnSlot, &'static str> {
        let banned = !trusted
            && self
                .snapshot
                .load()
                .bans
                .as_ref()
                .is_some_and(|b| b.enforced() && b.is_banned(peer.ip(), crate::upstream::health::now_ms()));
        if banned {
            return Err("banned");
        }
        self.connections.admit(peer.ip()).map_err(|r| r.reason())
    }

    /// Admits a connection from `peer` (the socket's peer, or the client a
    /// PROXY protocol header named) or refuses it; an admitted connection
    /// is served on its own task. `may_trust`: the peer's forwarding
    /// headers may be believed if it is a trusted proxy.
    fn start(self, stream: tokio::net::TcpStream, peer: SocketAddr, may_trust: bool) {
        let runtime = &self.runtime;
        let trusted = may_trust && is_trusted(&self.snapshot, peer.ip());
        let slot = match self.admit(peer, trusted) {
            Ok(slot) => slot,
            Err(reason) => {
                self.refuse(peer, reason);
                drop(stream);
                return;
            }
        };
        let open_guard = runtime.metrics.as_ref().map(|m| {
            m.accepted.inc();
            m.open.inc();
            OpenGuard(m.open.clone())
        });
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on client connection");
        }
        let info = crate::pipeline::ConnInfo {
            peer,
            client_cert_headers: runtime.client_cert_headers.clone(),
            client_cert: None,
            scheme: if runtime.tls.is_some() { "https" } else { "http" },
            hsts: runtime.hsts.clone(),
            redirect_https_port: runtime.redirect_https_port,
            forwarded: crate::forwarding::Peer::new(peer.ip()),
            local: self.local,
            trusted,
            tasks: self.tasks.clone(),
            hard_stop: self.hard_stop.clone(),
            tls: None,
            activity: slot.activity(),
            close: tokio::sync::Notify::new(),
            _hold: crate::pipeline::ConnHold {
                _slot: Some(slot),
                _open: open_guard.map(|g| Box::new(g) as Box<dyn Send + Sync>),
            },
            tunnel_idle: self.snapshot.load().config.timeouts.tunnel_idle,
        };
        let Accepted {
            runtime,
            snapshot,
            stop,
            tasks,
            ..
        } = self;
        match &runtime.tls {
            None => {
                let serve = conn::serve(
                    stream,
                    runtime.protocol,
                    Arc::new(info),
                    runtime.clone(),
                    snapshot,
                    stop,
                );
                tasks.spawn(serve);
            }
            Some((acceptor, handshake_timeout)) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = *handshake_timeout;
                tasks.spawn(serve_tls(
                    stream,
                    acceptor,
                    handshake_timeout,
                    info,
                    runtime,
                    snapshot,
                    stop,
                ));
            }
        }
    }
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

/// A TLS connection: the handshake (within its timeout, evictable while
/// it stalls), then ALPN picks HTTP/2 or HTTP/1.1 and the connection is
/// served like any other, knowing its TLS version, cipher and client
/// certificate.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    mut info: crate::pipeline::ConnInfo,
    runtime: Arc<ListenerRuntime>,
    snapshot: SharedSnapshot,
    stop: CancellationToken,
) {
    let evicted = async {
        match &info.activity {
            Some(a) => a.evicted().await,
            None => std::future::pending().await,
        }
    };
    let handshake = tokio::select! {
        _ = stop.cancelled() => return,
        // A stalled handshake is quiet: evictable too.
        _ = evicted => {
            if let Some(m) = &runtime.metrics {
                m.rejected("evicted_idle");
            }
            return;
        }
        result = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)) => result,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
            if let Some(m) = &runtime.metrics {
                m.tls_failure("error");
            }
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %info.peer, "TLS handshake timed out");
            if let Some(m) = &runtime.metrics {
                m.tls_failure("timeout");
            }
            return;
        }
    };
    let session = stream.get_ref().1;
    let version = session.protocol_version().and_then(|v| v.as_str()).unwrap_or("unknown");
    let cipher = session
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or("unknown");
    info.tls = Some((version, cipher));
    if let Some(m) = &runtime.metrics {
        m.tls_handshake(version);
    }
    // ALPN decides the protocol; no ALPN means HTTP/1.1.
    let protocol = match session.alpn_protocol() {
        Some(b"h2") => ListenerProtocol::H2c,
        _ => ListenerProtocol::Http1,
    };
    if info.client_cert_headers.is_some() {
        info.client_cert = tls::client_identity(session.peer_certificates());
    }
    conn::serve(stream, protocol, Arc::new(info), runtime, snapshot, stop).await;
}

/// Counts a connection open until dropped.
pub(crate) struct OpenGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
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
    }
}
