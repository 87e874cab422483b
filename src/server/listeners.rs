//! The listeners of a running proxy, changed by a reload: a listener
//! whose address stays keeps its socket (never closed and bound again),
//! an added address is bound before the new config is swapped in (a port
//! that cannot be bound fails the reload and changes nothing), a removed
//! one stops accepting and its connections drain (each has its own
//! cancellation token, a child of the proxy's), and changed settings
//! (protocol, TLS, limits, the listener's lists) apply to connections
//! accepted after the reload: each accept loop reads its listener's
//! settings from an `ArcSwap`.

use super::*;
use std::collections::HashMap;

use crate::config::ConfigError;

/// What an accept loop needs besides its socket; set when the proxy runs.
#[derive(Clone)]
pub(super) struct Context {
    pub snapshot: SharedSnapshot,
    pub connections: Arc<ConnTable>,
    pub stop: CancellationToken,
    pub hard_stop: CancellationToken,
    pub tasks: TaskTracker,
}

/// One bound socket of a listener.
struct Socket {
    /// The address as configured (`127.0.0.1:0` stays that).
    configured: SocketAddr,
    local: SocketAddr,
    /// Ends this socket's accept loop and drains its connections.
    stop: CancellationToken,
    /// Until the proxy runs: the socket itself.
    waiting: Option<TcpListener>,
}

struct Live {
    config: ListenerConfig,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    sockets: Vec<Socket>,
}

/// Every listener, in config order.
#[derive(Default)]
pub(super) struct Listeners {
    live: Vec<Live>,
    context: Option<Context>,
}

/// A reload's listeners, bound but not yet serving.
pub(super) struct Prepared {
    live: Vec<Live>,
    /// Sockets of the running listeners that the new config drops.
    released: Vec<CancellationToken>,
    /// New settings for running listeners, stored at commit (the accept
    /// loops hold these `ArcSwap`s).
    updates: Vec<(Arc<ArcSwap<ListenerRuntime>>, ListenerRuntime)>,
}

impl Listeners {
    /// The listeners of the first config, bound.
    pub async fn bind(
        config: &Config,
        observe: &Observe,
        server_configs: Vec<Option<Arc<rustls::ServerConfig>>>,
    ) -> Result<Listeners, StartError> {
        let mut live = Vec::new();
        for (listener, server_config) in config.listeners.iter().zip(server_configs) {
            let runtime = ListenerRuntime::new(listener, config, observe).with_tls(listener, server_config);
            let mut sockets = Vec::new();
            for addr in &listener.bind {
                sockets.push(
                    bind_socket(*addr, &listener.name)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: *addr,
                            listener: listener.name.clone(),
                            source,
                        })?,
                );
            }
            live.push(Live {
                config: listener.clone(),
                runtime: Arc::new(ArcSwap::from_pointee(runtime)),
                sockets,
            });
        }
        Ok(Listeners { live, context: None })
    }

    /// Where each socket is bound, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.live
            .iter()
            .flat_map(|l| l.sockets.iter().map(|s| s.local))
            .collect()
    }

    /// What the accept loops run with, once the proxy runs.
    pub fn context(&self) -> Option<&Context> {
        self.context.as_ref()
    }

    /// Starts every accept loop (the proxy runs).
    pub fn start(&mut self, context: Context) {
        for live in &mut self.live {
            for socket in &mut live.sockets {
                if let Some(listener) = socket.waiting.take() {
                    spawn_loop(&context, listener, live.runtime.clone(), socket.stop.clone());
                }
            }
        }
        self.context = Some(context);
    }

    /// Binds what `config` adds and builds the settings it changes,
    /// without touching the running listeners; every bind failure is an
    /// error with its path.
    pub async fn prepare(
        &self,
        config: &Config,
        observe: &Observe,
        server_configs: &[Option<Arc<rustls::ServerConfig>>],
        old: &Config,
    ) -> Result<Prepared, Vec<ConfigError>> {
        let rebuild_all = config.limits != old.limits
            || config.protect.h2_max_concurrent_streams != old.protect.h2_max_concurrent_streams;
        let mut by_name: HashMap<&str, &Live> = self.live.iter().map(|l| (l.config.name.as_str(), l)).collect();
        let mut live = Vec::new();
        let mut errors = Vec::new();
        let mut updates = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            let previous = by_name.remove(listener.name.as_str());
            let server_config = server_configs.get(i).cloned().flatten();
            let runtime = match previous {
                Some(p) if p.config == *listener && !rebuild_all => p.runtime.clone(),
                Some(p) => {
                    let next = ListenerRuntime::new(listener, config, observe);
                    let next = match (p.config.tls == listener.tls, &p.runtime.load().tls) {
                        // The same TLS settings: the same acceptor (its
                        // certificate store and session keys).
                        (true, Some(tls)) => ListenerRuntime {
                            tls: Some(tls.clone()),
                            ..next
                        },
                        _ => next.with_tls(listener, server_config),
                    };
                    updates.push((p.runtime.clone(), next));
                    p.runtime.clone()
                }
                None => Arc::new(ArcSwap::from_pointee(
                    ListenerRuntime::new(listener, config, observe).with_tls(listener, server_config),
                )),
            };
            let mut sockets = Vec::new();
            for addr in &listener.bind {
                let kept = previous.and_then(|p| p.sockets.iter().find(|s| s.configured == *addr));
                match kept {
                    Some(s) => sockets.push(Socket {
                        configured: s.configured,
                        local: s.local,
                        stop: s.stop.clone(),
                        waiting: None,
                    }),
                    None => match bind_socket(*addr, &listener.name).await {
                        Ok(s) => sockets.push(s),
                        Err(e) => errors.push(ConfigError {
                            path: format!("listeners[{i}].bind"),
                            message: format!("cannot listen on {addr}: {e}"),
                        }),
                    },
                }
            }
            live.push(Live {
                config: listener.clone(),
                runtime,
                sockets,
            });
        }
        if !errors.is_empty() {
            // The sockets bound for it close as `live` drops.
            return Err(errors);
        }
        let mut released: Vec<CancellationToken> = by_name
            .values()
            .flat_map(|l| l.sockets.iter().map(|s| s.stop.clone()))
            .collect();
        for old in &self.live {
            if let Some(new) = live.iter().find(|l| l.config.name == old.config.name) {
                for s in old.sockets.iter().filter(|s| !new.config.bind.contains(&s.configured)) {
                    released.push(s.stop.clone());
                }
            }
        }
        Ok(Prepared {
            live,
            released,
            updates,
        })
    }

    /// Puts `prepared` in service: new sockets accept, released ones stop
    /// and drain their connections.
    pub fn commit(&mut self, mut prepared: Prepared) {
        // A kept socket that is not serving yet (the proxy has not started
        // running) moves over with its listener.
        for old in &mut self.live {
            let Some(new) = prepared.live.iter_mut().find(|l| l.config.name == old.config.name) else {
                continue;
            };
            for socket in &mut old.sockets {
                if let Some(kept) = new.sockets.iter_mut().find(|s| s.configured == socket.configured) {
                    if kept.waiting.is_none() {
                        kept.waiting = socket.waiting.take();
                    }
                }
            }
        }
        if let Some(context) = &self.context {
            for live in &mut prepared.live {
                for socket in &mut live.sockets {
                    if let Some(listener) = socket.waiting.take() {
                        spawn_loop(context, listener, live.runtime.clone(), socket.stop.clone());
                    }
                }
            }
        }
        for (swap, runtime) in prepared.updates {
            swap.store(Arc::new(runtime));
        }
        for stop in prepared.released {
            stop.cancel();
        }
        self.live = prepared.live;
    }
}

async fn bind_socket(addr: SocketAddr, name: &str) -> std::io::Result<Socket> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::debug!(listener = %name, %local, "bound");
    Ok(Socket {
        configured: addr,
        local,
        stop: CancellationToken::new(),
        waiting: Some(listener),
    })
}

fn spawn_loop(
    context: &Context,
    listener: TcpListener,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    own: CancellationToken,
) {
    // Stops with its own token (a reload released it) or the proxy's; the
    // loop is tracked, so the drain waits for its socket to close.
    let stop = context.stop.child_token();
    let linked = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = own.cancelled() => linked.cancel(),
            _ = linked.cancelled() => {}
        }
    });
    context.tasks.spawn(accept_loop(
        listener,
        runtime,
        context.snapshot.clone(),
        context.connections.clone(),
        stop,
        context.hard_stop.clone(),
        context.tasks.clone(),
    ));
}
