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
use std::collections::HashSet;

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
    /// The settings its accept loop reads per connection.
    settings: Arc<ArcSwap<ListenerRuntime>>,
    /// Until the proxy runs: the socket itself.
    waiting: Option<TcpListener>,
}

impl Socket {
    /// The same socket, for the next set of listeners.
    fn kept(&self) -> Socket {
        Socket {
            configured: self.configured,
            local: self.local,
            stop: self.stop.clone(),
            settings: self.settings.clone(),
            waiting: None,
        }
    }
}

struct Live {
    config: ListenerConfig,
    runtime: Arc<ListenerRuntime>,
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
    /// New settings for running sockets, stored at commit.
    updates: Vec<(Arc<ArcSwap<ListenerRuntime>>, Arc<ListenerRuntime>)>,
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
            let runtime = Arc::new(ListenerRuntime::new(listener, config, observe).with_tls(listener, server_config));
            let mut sockets = Vec::new();
            for addr in &listener.bind {
                let socket = bind_socket(*addr, &listener.name, &runtime)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: *addr,
                        listener: listener.name.clone(),
                        source,
                    })?;
                sockets.push(socket);
            }
            live.push(Live {
                config: listener.clone(),
                runtime,
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
                    spawn_loop(&context, listener, socket.settings.clone(), socket.stop.clone());
                }
            }
        }
        self.context = Some(context);
    }

    /// Binds what `config` adds and builds the settings it changes,
    /// without touching the running listeners; every bind failure is an
    /// error with its path. A socket is kept by its listener's name and
    /// address, or, for a fixed port, by its address alone (a listener
    /// renamed, or an address moved to another listener).
    pub async fn prepare(
        &self,
        config: &Config,
        observe: &Observe,
        server_configs: &[Option<Arc<rustls::ServerConfig>>],
        old: &Config,
    ) -> Result<Prepared, Vec<ConfigError>> {
        let rebuild_all = config.limits != old.limits
            || config.protect.h2_max_concurrent_streams != old.protect.h2_max_concurrent_streams;
        let mut claimed: HashSet<(usize, usize)> = HashSet::new();
        let mut live = Vec::new();
        let mut errors = Vec::new();
        let mut updates = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            let previous = self.live.iter().position(|l| l.config.name == listener.name);
            let server_config = server_configs.get(i).cloned().flatten();
            let runtime = match previous.map(|p| &self.live[p]) {
                Some(p) if p.config == *listener && !rebuild_all => p.runtime.clone(),
                Some(p) if p.config.tls == listener.tls && p.runtime.tls.is_some() => {
                    // The same TLS settings: the same acceptor (its
                    // certificate store and session keys).
                    Arc::new(ListenerRuntime {
                        tls: p.runtime.tls.clone(),
                        ..ListenerRuntime::new(listener, config, observe)
                    })
                }
                _ => Arc::new(ListenerRuntime::new(listener, config, observe).with_tls(listener, server_config)),
            };
            let mut sockets = Vec::new();
            for addr in &listener.bind {
                let same_listener = previous.and_then(|p| {
                    let j = self.live[p].sockets.iter().position(|s| s.configured == *addr)?;
                    Some((p, j))
                });
                let any_listener = || (addr.port() != 0).then(|| self.find(*addr, &claimed)).flatten();
                match same_listener.filter(|k| !claimed.contains(k)).or_else(any_listener) {
                    Some((p, j)) => {
                        claimed.insert((p, j));
                        let socket = self.live[p].sockets[j].kept();
                        if !Arc::ptr_eq(&socket.settings.load(), &runtime) {
                            updates.push((socket.settings.clone(), runtime.clone()));
                        }
                        sockets.push(socket);
                    }
                    None => match bind_socket(*addr, &listener.name, &runtime).await {
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
        let mut released = Vec::new();
        for (p, old) in self.live.iter().enumerate() {
            for (j, socket) in old.sockets.iter().enumerate() {
                if !claimed.contains(&(p, j)) {
                    released.push(socket.stop.clone());
                }
            }
        }
        Ok(Prepared {
            live,
            released,
            updates,
        })
    }

    /// A running socket configured with `addr` that no new listener has
    /// claimed yet.
    fn find(&self, addr: SocketAddr, claimed: &HashSet<(usize, usize)>) -> Option<(usize, usize)> {
        self.live.iter().enumerate().find_map(|(p, l)| {
            let j = l
                .sockets
                .iter()
                .enumerate()
                .position(|(j, s)| s.configured == addr && !claimed.contains(&(p, j)))?;
            Some((p, j))
        })
    }

    /// Puts `prepared` in service: new sockets accept, released ones stop
    /// and drain their connections.
    pub fn commit(&mut self, mut prepared: Prepared) {
        // A kept socket that is not serving yet (the proxy has not started
        // running) moves over with its settings.
        for old in self.live.iter_mut().flat_map(|l| l.sockets.iter_mut()) {
            let next = prepared
                .live
                .iter_mut()
                .flat_map(|l| l.sockets.iter_mut())
                .find(|s| Arc::ptr_eq(&s.settings, &old.settings));
            if let Some(next) = next {
                if next.waiting.is_none() {
                    next.waiting = old.waiting.take();
                }
            }
        }
        if let Some(context) = &self.context {
            for socket in prepared.live.iter_mut().flat_map(|l| l.sockets.iter_mut()) {
                if let Some(listener) = socket.waiting.take() {
                    spawn_loop(context, listener, socket.settings.clone(), socket.stop.clone());
                }
            }
        }
        for (swap, runtime) in prepared.updates {
            swap.store(runtime);
        }
        for stop in prepared.released {
            stop.cancel();
        }
        self.live = prepared.live;
    }
}

async fn bind_socket(addr: SocketAddr, name: &str, runtime: &Arc<ListenerRuntime>) -> std::io::Result<Socket> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::debug!(listener = %name, %local, "bound");
    Ok(Socket {
        configured: addr,
        local,
        stop: CancellationToken::new(),
        settings: Arc::new(ArcSwap::new(runtime.clone())),
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
