//! Upstream groups: their servers, name resolution, server selection and the
//! connection pools.
//!
//! An [`Upstream`] is built from an [`UpstreamConfig`] when a snapshot is
//! built. Servers given by DNS name are resolved then (an unresolvable name
//! fails the load) and again every `resolve_interval` by a background task
//! that also sweeps idle connections; active health checks run in one task
//! per server. Every task ends when the group is dropped (its
//! `CancellationToken` is cancelled on drop), so a snapshot that
//! replaces the group leaks none.
//!
//! [`Upstream::select`] picks a server for a request: candidates are the
//! servers that are healthy, not ejected, not draining, not full and not
//! yet tried by this request; [`balance::pick`] chooses among them.
//! [`Upstream::record`] feeds each outcome back (latency, passive health).

pub mod balance;
pub mod health;
pub mod pool;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, ServerAddr, UpstreamConfig};
use crate::error::ProxyError;
use crate::observe::{AuditLog, Event};
use balance::{Algorithm, Candidate, Ring, Rng, RoundRobinState};
use health::{RetryBudget, ServerHealth, ServerSettings, ServerStatus, now_ms};
use pool::{PoolSettings, ServerPool};

/// One server of a group.
pub struct Server {
    pub addr: ServerAddr,
    /// `host:port` as a header value, for `preserve_host = false`.
    pub host_header: HeaderValue,
    /// The addresses the name resolved to, most recent resolution.
    pub resolved: ArcSwap<Vec<SocketAddr>>,
    pub pool: Arc<ServerPool>,
    pub health: Arc<ServerHealth>,
    /// Opaque id for sticky cookies: a hash, never the address.
    pub sticky_id: String,
    /// The address as configured, for logs and metric labels.
    pub label: String,
    settings: ServerSettings,
}

impl Server {
    /// The weight the balancer uses: the operator's, else the configured.
    pub fn weight(&self) -> u32 {
        self.health.weight(&self.settings)
    }

    /// Balances with `weight` instead of the configured one (`None`: the
    /// configured one again), until the file changes this server's weight.
    pub fn set_weight(&self, weight: Option<u32>) {
        self.health.set_weight(weight, self.settings.weight);
    }
}

/// An upstream group of one snapshot.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub servers: Vec<Arc<Server>>,
    pub budget: RetryBudget,
    ring: Ring,
    round_robin: Mutex<RoundRobinState>,
    in_flight: std::sync::atomic::AtomicU32,
    /// Cancelled when the group is dropped: ends its background tasks.
    tasks: CancellationToken,
    /// Where ejections and restorations are recorded.
    audit: Option<AuditLog>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}

/// What a request offers the balancer.
pub struct PickContext<'a> {
    pub client: IpAddr,
    pub headers: &'a http::HeaderMap,
    pub path: &'a str,
    /// Servers this request already tried (retries go elsewhere).
    pub tried: &'a [usize],
}

/// A request in flight to a server: counted until dropped (it rides in the
/// response body, so least-requests sees requests until they finish).
pub struct ServerGuard {
    upstream: Arc<Upstream>,
    server: usize,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(s) = self.upstream.servers.get(self.server) {
            s.health.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static RNG: std::cell::RefCell<Rng> = std::cell::RefCell::new(Rng::from_entropy());
}

impl Upstream {
    /// Builds the group, resolving every server name; `path` prefixes errors.
    ///
    /// `previous` is the group of the same name in the running snapshot,
    /// when its settings changed: every server still configured (same
    /// address) keeps its live state (health, latency, ejection, a drain
    /// or weight set by the operator; the weight is dropped when the
    /// configured one changed) and, when the connection settings are
    /// unchanged, its pool of idle connections.
    #[allow(clippy::too_many_lines, reason = "builds a group's servers, then starts its tasks")]
    pub async fn build(
        config: &UpstreamConfig,
        path: &str,
        audit: Option<AuditLog>,
        previous: Option<&Upstream>,
    ) -> Result<Arc<Upstream>, Vec<ConfigError>> {
        let tls = match &config.tls {
            None => None,
            Some(t) => match tls_connector(t, config.protocol) {
                Ok(connector) => Some(connector),
                Err((field, message)) => {
                    return Err(vec![ConfigError {
                        path: format!("{path}.tls.{field}"),
                        message,
                    }]);
                }
            },
        };
        let settings = PoolSettings {
            protocol: config.protocol,
            max_idle: config.pool_size,
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            tls,
        };
        let mut servers = Vec::with_capacity(config.servers.len());
        let mut errors = Vec::new();
        for (i, addr) in config.servers.iter().enumerate() {
            let resolved = match resolve(addr).await {
                Ok(list) => list,
                Err(why) => {
                    errors.push(ConfigError {
                        path: format!("{path}.servers[{i}]"),
                        message: why,
                    });
                    continue;
                }
            };
            let host_header =
                HeaderValue::from_str(&addr.to_string()).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
            let sticky_id = format!("{:016x}", balance::hash64(format!("{}|{addr}", config.name).as_bytes()));
            let label = addr.to_string();
            let before = previous.and_then(|p| Some((p, p.servers.iter().find(|s| s.label == label)?)));
            // Shared, never written here: a build may be a dry run.
            let health = match before {
                Some((_, s)) => s.health.clone(),
                None => Arc::new(ServerHealth::default()),
            };
            let pool = match before {
                Some((p, s)) if same_connections(&p.config, config) => s.pool.clone(),
                _ => Arc::new(ServerPool::new(settings.clone(), tls_server_name(config, addr))),
            };
            servers.push(Arc::new(Server {
                addr: addr.clone(),
                host_header,
                resolved: ArcSwap::from_pointee(resolved),
                pool,
                health,
                sticky_id,
                label,
                settings: ServerSettings {
                    weight: addr.weight,
                    slow_start: config.slow_start,
                },
            }));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let ring = match config.algorithm {
            Algorithm::ConsistentHash(_) => Ring::new(
                &servers
                    .iter()
                    .map(|s| (s.addr.to_string(), s.addr.weight))
                    .collect::<Vec<_>>(),
            ),
            _ => Ring::default(),
        };
        let upstream = Arc::new(Upstream {
            config: config.clone(),
            servers,
            budget: RetryBudget::new(config.retry),
            ring,
            round_robin: Mutex::new(RoundRobinState::default()),
            in_flight: std::sync::atomic::AtomicU32::new(0),
            tasks: CancellationToken::new(),
            audit,
        });
        tokio::spawn(maintain(Arc::downgrade(&upstream), upstream.tasks.clone()));
        if let Some(check) = &config.health_check {
            for (index, server) in upstream.servers.iter().enumerate() {
                tokio::spawn(health_check_loop(
                    upstream.config.name.clone(),
                    index,
                    server.clone(),
                    check.clone(),
                    upstream.tasks.clone(),
                    upstream.audit.clone(),
                ));
            }
        }
        Ok(upstream)
    }

    /// Requests of this group in flight now (until their responses end).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Chooses a server for a request and counts it in flight.
    pub fn select(self: &Arc<Self>, ctx: &PickContext<'_>) -> Result<(usize, ServerGuard), ProxyError> {
        if let Some(max) = self.config.max_requests {
            if self.in_flight.load(Ordering::Relaxed) >= max {
                return Err(ProxyError::ConnectionLimit);
            }
        }
        let now = now_ms();
        let mut candidates = Vec::with_capacity(self.servers.len());
        let mut full = false;
        for (index, server) in self.servers.iter().enumerate() {
            if ctx.tried.contains(&index) || server.health.status(now) != ServerStatus::Healthy {
                continue;
            }
            let in_flight = server.health.in_flight.load(Ordering::Relaxed);
            if self.config.max_requests_per_server.is_some_and(|max| in_flight >= max) {
                full = true;
                continue;
            }
            candidates.push(Candidate {
                index,
                weight: server.health.effective_weight(&server.settings, now),
                in_flight,
                latency_us: server.health.latency_us(),
            });
        }
        if candidates.is_empty() {
            return Err(if full {
                ProxyError::ConnectionLimit
            } else {
                ProxyError::NoHealthyServer
            });
        }
        let sticky = self.config.sticky_cookie.as_deref().and_then(|name| {
            let id = balance::cookie(ctx.headers, name)?;
            candidates
                .iter()
                .find(|c| self.servers[c.index].sticky_id == id)
                .map(|c| c.index)
        });
        let chosen = match sticky {
            Some(index) => index,
            None => {
                let hash = match &self.config.algorithm {
                    Algorithm::ConsistentHash(key) => balance::request_hash(key, ctx.client, ctx.headers, ctx.path),
                    _ => None,
                };
                // The one lock of select, taken only by round robin.
                let mut rr = matches!(self.config.algorithm, Algorithm::RoundRobin)
                    .then(|| self.round_robin.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
                RNG.with(|rng| {
                    balance::pick(
                        &self.config.algorithm,
                        &candidates,
                        rr.as_deref_mut(),
                        &self.ring,
                        hash,
                        &mut rng.borrow_mut(),
                    )
                })
                .ok_or(ProxyError::NoHealthyServer)?
            }
        };
        self.servers[chosen].health.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok((
            chosen,
            ServerGuard {
                upstream: self.clone(),
                server: chosen,
            },
        ))
    }

    /// Feeds the outcome of one try back: latency of a response head, and
    /// passive health (a connect failure, a reset, a timeout or a gateway
    /// error counts against the server). A `500` does not: it is the
    /// application's answer to a request, and a client that can make the
    /// application fail must not be able to take healthy servers out of
    /// rotation. A failure of the proxy's own (out of file descriptors)
    /// is no one's but the proxy's, and is not recorded at all.
    pub fn record(&self, server: usize, outcome: Outcome) {
        let Some(s) = self.servers.get(server) else { return };
        let now = now_ms();
        match outcome {
            Outcome::Response { status, latency } => {
                s.health.observe_latency(latency.as_secs_f64() * 1e6, now);
                if health::is_gateway_failure(status) {
                    self.failure(server, now);
                } else {
                    s.health.record_success();
                }
            }
            Outcome::Failed => self.failure(server, now),
        }
    }

    fn failure(&self, server: usize, now: u64) {
        let ejected = self
            .servers
            .iter()
            .filter(|s| s.health.status(now) == ServerStatus::Ejected)
            .count();
        let allowed = health::may_eject(self.servers.len(), ejected, self.config.outlier.max_ejected_percent);
        let s = &self.servers[server];
        if let Some(duration) = s.health.record_failure(&self.config.outlier, now, allowed) {
            tracing::warn!(
                upstream = %self.config.name,
                server = %s.addr,
                ejections = s.health.ejections(),
                "server ejected for {:?} after {} consecutive failures",
                duration,
                self.config.outlier.consecutive_failures
            );
            if let Some(audit) = &self.audit {
                audit.record(Event::ServerEjected {
                    upstream: self.config.name.clone(),
                    server: s.label.clone(),
                    reason: format!(
                        "{} consecutive failures: ejected for {}s",
                        self.config.outlier.consecutive_failures,
                        duration.as_secs()
                    ),
                });
            }
        }
    }

    /// The token that ends this group's background tasks (cancelled when the
    /// group is dropped); for tests and the admin API.
    pub fn background_tasks(&self) -> CancellationToken {
        self.tasks.clone()
    }

    /// Status of every server, for tests, metrics and the admin API.
    pub fn statuses(&self) -> Vec<(String, ServerStatus)> {
        let now = now_ms();
        self.servers
            .iter()
            .map(|s| (s.addr.to_string(), s.health.status(now)))
            .collect()
    }
}

/// How one try ended, for [`Upstream::record`].
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Response {
        status: u16,
        latency: Duration,
    },
    /// Connect failure, reset, timeout or invalid response.
    Failed,
}

/// The TLS client side of a group: roots (its CA bundle or the system's),
/// ALPN for its protocol, and an optional client certificate.
fn tls_connector(
    tls: &crate::config::UpstreamTls,
    protocol: crate::config::UpstreamProtocol,
) -> Result<tokio_rustls::TlsConnector, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    let roots = match &tls.ca {
        Some(path) => crate::tls::load_roots(path).map_err(|e| ("ca", e))?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err((
                    "ca",
                    "no system root certificates found: set ca to a PEM bundle".to_owned(),
                ));
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("ca", e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let loaded = crate::tls::load_cert(cert, key).map_err(|e| ("client_cert", e))?;
            let chain = loaded.key.cert.clone();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ("client_key", format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ("client_cert", e.to_string()))?
        }
    };
    config.alpn_protocols = match protocol {
        crate::config::UpstreamProtocol::H2 => vec![b"h2".to_vec()],
        crate::config::UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name a TLS upstream server is asked for and checked against.
/// Whether two settings of a group open the same kind of connection, so a
/// server's idle connections may be carried from one to the other.
fn same_connections(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    a.protocol == b.protocol
        && a.pool_size == b.pool_size
        && a.idle_timeout == b.idle_timeout
        && a.connect_timeout == b.connect_timeout
        && a.tls == b.tls
}

fn tls_server_name(config: &UpstreamConfig, addr: &ServerAddr) -> Option<rustls::pki_types::ServerName<'static>> {
    let tls = config.tls.as_ref()?;
    let name = tls.server_name.clone().unwrap_or_else(|| match addr.literal {
        Some(literal) => literal.ip().to_string(),
        None => addr.host.clone(),
    });
    rustls::pki_types::ServerName::try_from(name).ok()
}

/// Resolves a server: a literal is returned as is.
async fn resolve(addr: &ServerAddr) -> Result<Vec<SocketAddr>, String> {
    if let Some(literal) = addr.literal {
        return Ok(vec![literal]);
    }
    match tokio::net::lookup_host((addr.host.as_str(), addr.port)).await {
        Ok(found) => {
            let list: Vec<SocketAddr> = found.collect();
            if list.is_empty() {
                Err(format!("\"{addr}\" resolved to no address"))
            } else {
                Ok(list)
            }
        }
        Err(e) => Err(format!("cannot resolve \"{addr}\": {e}")),
    }
}

/// Re-resolves names and sweeps idle connections until the group is dropped.
async fn maintain(upstream: Weak<Upstream>, cancel: CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = maintain_loop(upstream) => {}
    }
}

async fn maintain_loop(upstream: Weak<Upstream>) {
    let Some(first) = upstream.upgrade() else { return };
    let period = first.config.resolve_interval.min(first.config.idle_timeout);
    let has_names = first.servers.iter().any(|s| s.addr.literal.is_none());
    drop(first);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut since_resolve = std::time::Duration::ZERO;
    loop {
        ticker.tick().await;
        let Some(up) = upstream.upgrade() else { return };
        for server in &up.servers {
            server.pool.sweep();
        }
        since_resolve += period;
        if has_names && since_resolve >= up.config.resolve_interval {
            since_resolve = std::time::Duration::ZERO;
            for server in &up.servers {
                match resolve(&server.addr).await {
                    Ok(list) => {
                        if **server.resolved.load() != list {
                            tracing::info!(upstream = %up.config.name, server = %server.addr, addrs = ?list, "upstream name resolved to new addresses");
                            server.resolved.store(Arc::new(list));
                        }
                    }
                    // Keep the last good answer: a DNS blip must not take
                    // a server out.
                    Err(why) => tracing::warn!(upstream = %up.config.name, "{why}; keeping previous addresses"),
                }
            }
        }
    }
}

/// Runs one server's active health check until the group is dropped.
async fn health_check_loop(
    upstream: String,
    index: usize,
    server: Arc<Server>,
    settings: health::CheckSettings,
    cancel: CancellationToken,
    audit: Option<AuditLog>,
) {
    let mut counter = health::CheckCounter::default();
    // Each server starts at its own offset, and every interval varies by up
    // to 10%, so checks from many proxies do not arrive in step.
    let mut rng = Rng::seeded(balance::hash64(
        format!("{upstream}{index}{:?}", std::time::Instant::now()).as_bytes(),
    ));
    let jitter = |rng: &mut Rng, base: Duration| {
        let spread = (base.as_millis() as u64 / 10).max(1);
        base - Duration::from_millis(spread / 2) + Duration::from_millis(rng.below(spread))
    };
    let first = Duration::from_millis(rng.below((settings.interval.as_millis() as u64 / 10).max(1)));
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(first) => {}
    }
    loop {
        let addrs = server.resolved.load_full();
        let ok = tokio::select! {
            _ = cancel.cancelled() => return,
            ok = health::run_check(&settings, &addrs, &server.addr) => ok,
        };
        let healthy = server.health.checked_healthy.load(Ordering::Relaxed);
        if let Some(now_healthy) = counter.record(ok, healthy, &settings) {
            server.health.checked_healthy.store(now_healthy, Ordering::Relaxed);
            if now_healthy {
                server.health.rejoined(now_ms());
                tracing::info!(%upstream, server = %server.addr, "server passed its health checks: back in rotation");
            } else {
                tracing::warn!(%upstream, server = %server.addr, "server failed its health checks: out of rotation");
            }
            if let Some(audit) = &audit {
                let (upstream, server) = (upstream.clone(), server.label.clone());
                let reason = "active health checks".to_owned();
                audit.record(if now_healthy {
                    Event::ServerRestored {
                        upstream,
                        server,
                        reason,
                    }
                } else {
                    Event::ServerEjected {
                        upstream,
                        server,
                        reason,
                    }
                });
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(jitter(&mut rng, settings.interval)) => {}
        }
    }
}
