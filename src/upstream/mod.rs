//! Upstream groups: their servers, name resolution, server selection and the
//! connection pools.
//!
//! An [`Upstream`] is built from an [`UpstreamConfig`] when a snapshot is
//! built. Servers given by DNS name are resolved then (an unresolvable name
//! fails the load) and again every `resolve_interval` by a background task
//! that also sweeps idle connections; the task holds only a weak reference
//! and ends when the snapshot is dropped.

pub mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::config::{ConfigError, ServerAddr, UpstreamConfig};
use pool::{PoolSettings, ServerPool};

/// One server of a group.
pub struct Server {
    pub addr: ServerAddr,
    /// `host:port` as a header value, for `preserve_host = false`.
    pub host_header: HeaderValue,
    /// The addresses the name resolved to, most recent resolution.
    pub resolved: ArcSwap<Vec<SocketAddr>>,
    pub pool: Arc<ServerPool>,
}

/// An upstream group of one snapshot.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub servers: Vec<Arc<Server>>,
    next: AtomicUsize,
}

impl Upstream {
    /// Builds the group, resolving every server name; `path` prefixes errors.
    pub async fn build(config: &UpstreamConfig, path: &str) -> Result<Arc<Upstream>, Vec<ConfigError>> {
        let settings = PoolSettings {
            protocol: config.protocol,
            max_idle: config.pool_size,
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
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
            servers.push(Arc::new(Server {
                addr: addr.clone(),
                host_header,
                resolved: ArcSwap::from_pointee(resolved),
                pool: Arc::new(ServerPool::new(settings.clone())),
            }));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let upstream = Arc::new(Upstream {
            config: config.clone(),
            servers,
            next: AtomicUsize::new(0),
        });
        tokio::spawn(maintain(Arc::downgrade(&upstream)));
        Ok(upstream)
    }

    /// Picks the next server, round robin.
    pub fn pick(&self) -> Option<&Arc<Server>> {
        if self.servers.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        self.servers.get(i)
    }
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
async fn maintain(upstream: Weak<Upstream>) {
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
