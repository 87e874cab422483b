//! What a request knows about the connection it came on ([`ConnInfo`]),
//! made by the serving layer at accept and read by every phase.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What a request knows about the connection it came on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`: what the client used, told to upstreams.
    pub scheme: &'static str,
    /// `Strict-Transport-Security` for every response (TLS listeners).
    pub hsts: Option<http::HeaderValue>,
    /// Cleartext listener redirecting everything to HTTPS on this port.
    pub redirect_https_port: Option<u16>,
    /// mTLS listeners: the headers that carry the client's certificate to
    /// the upstream (always stripped from the client's own request), and
    /// the verified subject and fingerprint, if the client sent one.
    pub client_cert_headers: Option<(http::HeaderName, http::HeaderName)>,
    pub client_cert: Option<(http::HeaderValue, http::HeaderValue)>,
    /// The peer as the forwarding headers write it, formatted once.
    pub forwarded: crate::forwarding::Peer,
    pub local: SocketAddr,
    /// The peer is in `server.trusted_proxies` (decided once at accept).
    pub trusted: bool,
    pub tasks: tokio_util::task::TaskTracker,
    pub hard_stop: CancellationToken,
    /// TLS protocol version and cipher suite (TLS listeners).
    pub tls: Option<(&'static str, &'static str)>,
    /// Reported to the connection table for eviction (when it is on).
    pub activity: Option<Arc<crate::protect::connections::Activity>>,
    /// Asks the connection to close after what is in flight (a banned
    /// client: `Connection: close` does not exist in HTTP/2, GOAWAY does).
    pub close: tokio::sync::Notify,
    /// The connection's place in the connection table and its count in
    /// the open-connections gauge: given back when the last holder of this
    /// `ConnInfo` goes, which for an upgraded connection is its tunnel.
    pub _hold: ConnHold,
    /// `timeouts.tunnel_idle` when the connection was accepted.
    pub tunnel_idle: Duration,
}

impl ConnInfo {
    /// The same facts without the connection's place in the table: for
    /// work that outlives the request (a background cache refresh), which
    /// must not keep a closed connection counted.
    pub fn detached(&self) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            peer: self.peer,
            scheme: self.scheme,
            hsts: self.hsts.clone(),
            redirect_https_port: self.redirect_https_port,
            client_cert_headers: self.client_cert_headers.clone(),
            client_cert: self.client_cert.clone(),
            forwarded: self.forwarded.clone(),
            local: self.local,
            trusted: self.trusted,
            tasks: self.tasks.clone(),
            hard_stop: self.hard_stop.clone(),
            tls: self.tls,
            activity: None,
            close: tokio::sync::Notify::new(),
            _hold: ConnHold::default(),
            tunnel_idle: self.tunnel_idle,
        })
    }
}

/// What an open connection holds until it (or its tunnel) closes.
#[derive(Default)]
pub struct ConnHold {
    pub _slot: Option<crate::protect::ConnSlot>,
    pub _open: Option<Box<dyn Send + Sync>>,
}
