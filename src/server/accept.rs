//! The accept loop: each connection is checked (listener IP lists, PROXY
//! protocol, bans, the connection table) before a byte of HTTP is read,
//! then served on its own task, after its TLS handshake on TLS listeners.

use super::*;

pub(super) async fn accept_loop(
    listener: TcpListener,
    settings: Arc<ArcSwap<ListenerRuntime>>,
    snapshot: SharedSnapshot,
    connections: Arc<ConnTable>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
) {
    let local = listener.local_addr().ok();
    if let Some(addr) = local {
        tracing::info!(listener = %settings.load().name, %addr, "listening");
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        // Read per connection: a reload may have changed the settings.
        let runtime = settings.load_full();
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of
                // spinning; the error is the operator's to see.
                tracing::error!(listener = %settings.load().name, error = %e, "accept failed; pausing accepts for 100ms");
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
    if let Some(addr) = local {
        tracing::info!(listener = %settings.load().name, %addr, "stopped listening");
    }
    drop(listener);
}

pub(super) fn is_trusted(snapshot: &SharedSnapshot, ip: std::net::IpAddr) -> bool {
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
pub(super) struct Accepted {
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

/// A TLS connection: the handshake (within its timeout, evictable while
/// it stalls), then ALPN picks HTTP/2 or HTTP/1.1 and the connection is
/// served like any other, knowing its TLS version, cipher and client
/// certificate.
pub(super) async fn serve_tls(
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
