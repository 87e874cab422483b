//! Upstream connections: connect, handshake, and keep idle HTTP/1.1
//! connections per server for reuse; one shared HTTP/2 connection per server.
//!
//! An HTTP/1.1 connection is lent to one request as a [`Lease`]. The lease
//! travels inside the response body and comes back to the pool when the body
//! has been read to its end; a connection whose response was abandoned is
//! closed instead, since its state is unknown. The idle list is bounded
//! (`pool_size`) and entries older than `idle_timeout` are discarded.
//! The task driving an HTTP/1.1 connection closes it at the deadline of
//! the request it carries ([`Watched`]), whether or not the response body
//! is read; a connection whose request went out without its declared body
//! is never reused.
//!
//! Invariant: no lock here is held across an `.await`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;

/// Settings shared by every server of one upstream group.
#[derive(Clone)]
pub struct PoolSettings {
    pub protocol: UpstreamProtocol,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS to the servers (with ALPN set for `protocol`), if configured.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// A connection to an upstream server: plain TCP or TLS over it.
enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of one upstream server.
pub struct ServerPool {
    settings: PoolSettings,
    /// SNI and certificate name for TLS upstreams.
    server_name: Option<rustls::pki_types::ServerName<'static>>,
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, shared by all requests (h2c groups only).
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Serializes HTTP/2 connection attempts so a burst opens one connection.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Connections opened so far (for tests and, later, metrics).
    pub connects: AtomicU64,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    watch: Arc<ConnWatch>,
    since: Instant,
}

/// An HTTP/1.1 connection lent to one request.
pub struct Lease {
    pool: Arc<ServerPool>,
    sender: http1::SendRequest<RequestBody>,
    watch: Arc<ConnWatch>,
    /// False when the request was sent without the body its head
    /// declared: the server may read the next request as that body, so
    /// the connection is never reused.
    reusable: bool,
}

impl crate::body::Reuse for Lease {
    fn release(self: Box<Self>) {
        Lease::release(*self);
    }
}

impl Lease {
    /// Gives the connection back once it can take another request.
    pub fn release(mut self) {
        if !self.reusable || self.sender.is_closed() {
            return;
        }
        if self.sender.is_ready() {
            self.pool.put(self.sender, self.watch);
            return;
        }
        // The connection is finishing the exchange (the request body may
        // still be draining): wait for it off the request path; the
        // request's deadline still applies.
        tokio::spawn(async move {
            if self.sender.ready().await.is_ok() {
                self.pool.put(self.sender, self.watch);
            }
        });
    }
}

const NO_DEADLINE: u64 = u64::MAX;

/// The deadline of the request an HTTP/1.1 connection carries, read by the
/// task that drives the connection ([`Watched`]): past it the connection
/// is closed whether or not anyone polls the response body, so a client
/// that stops reading cannot hold an upstream connection beyond the
/// request timeout.
struct ConnWatch {
    base: Instant,
    /// Milliseconds after `base`, or `NO_DEADLINE` while idle.
    deadline_ms: AtomicU64,
}

impl ConnWatch {
    fn new() -> Arc<ConnWatch> {
        Arc::new(ConnWatch {
            base: Instant::now(),
            deadline_ms: AtomicU64::new(NO_DEADLINE),
        })
    }

    fn set(&self, deadline: Option<Instant>) {
        // Rounded up: the connection is never cut before the deadline the
        // pipeline's own timeouts use (they must win the race).
        let ms = deadline.map_or(NO_DEADLINE, |d| {
            (d.saturating_duration_since(self.base).as_millis() + 1).min(u128::from(NO_DEADLINE - 1)) as u64
        });
        self.deadline_ms.store(ms, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// Drives an upstream connection until it ends, or until the deadline
    /// of the request it carries passes. The timer is armed when a
    /// request sets a deadline and left armed when later ones set later
    /// deadlines (it is moved forward only when it fires), so a busy
    /// connection costs one timer per request timeout, not one per request.
    struct Watched<F> {
        #[pin]
        conn: F,
        watch: Arc<ConnWatch>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        armed_ms: u64,
    }
}

/// How a watched connection ended.
enum Ended {
    Closed(Result<(), hyper::Error>),
    /// The request deadline passed: the connection is dropped (closed).
    Deadline,
}

impl<F: Future<Output = Result<(), hyper::Error>>> Future for Watched<F> {
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Ended> {
        let this = self.project();
        if let Poll::Ready(result) = this.conn.poll(cx) {
            return Poll::Ready(Ended::Closed(result));
        }
        loop {
            let deadline = this.watch.deadline_ms.load(Ordering::Acquire);
            if deadline == NO_DEADLINE {
                return Poll::Pending;
            }
            if this.sleep.is_none() || deadline < *this.armed_ms {
                let at = this.watch.base + Duration::from_millis(deadline);
                match this.sleep {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => *this.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                *this.armed_ms = deadline;
            }
            let Some(sleep) = this.sleep.as_mut() else {
                return Poll::Pending;
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer fired: at the deadline it was armed for, or at an
            // earlier one while a later request set a later deadline.
            let now = this.watch.deadline_ms.load(Ordering::Acquire);
            if now == NO_DEADLINE {
                *this.sleep = None;
                return Poll::Pending;
            }
            if now <= *this.armed_ms {
                return Poll::Ready(Ended::Deadline);
            }
            let at = this.watch.base + Duration::from_millis(now);
            sleep.as_mut().reset(at);
            *this.armed_ms = now;
        }
    }
}

/// The length a request head declares, if any.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl ServerPool {
    pub fn new(settings: PoolSettings, server_name: Option<rustls::pki_types::ServerName<'static>>) -> Self {
        ServerPool {
            settings,
            server_name,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            connects: AtomicU64::new(0),
        }
    }

    fn put(&self, sender: http1::SendRequest<RequestBody>, watch: Arc<ConnWatch>) {
        watch.set(None);
        let Ok(mut idle) = self.idle.lock() else { return };
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                sender,
                watch,
                since: Instant::now(),
            });
        }
    }

    /// Takes the most recently used live idle connection, if any.
    fn take_idle(&self) -> Option<(http1::SendRequest<RequestBody>, Arc<ConnWatch>)> {
        let mut idle = self.idle.lock().ok()?;
        let now = Instant::now();
        while let Some(entry) = idle.pop() {
            if entry.sender.is_ready() && now.duration_since(entry.since) < self.settings.idle_timeout {
                return Some((entry.sender, entry.watch));
            }
        }
        None
    }

    /// Drops idle connections past their idle timeout (called periodically).
    pub fn sweep(&self) {
        let Ok(mut idle) = self.idle.lock() else { return };
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        idle.retain(|e| !e.sender.is_closed() && now.duration_since(e.since) < timeout);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Sends `req` to this server, reusing a pooled connection when one is
    /// idle. Returns the response and, for HTTP/1.1, the lease to release.
    /// An HTTP/1.1 connection is closed at `deadline` if the exchange is
    /// still going on then (HTTP/2 connections are shared: their streams
    /// are bounded by flow control instead).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        addrs: &[SocketAddr],
        deadline: Option<Instant>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        match self.settings.protocol {
            UpstreamProtocol::Http1 => self.send_h1(req, addrs, deadline).await,
            UpstreamProtocol::H2 => self.send_h2(req, addrs).await.map(|r| (r, None)),
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        addrs: &[SocketAddr],
        deadline: Option<Instant>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        let reusable =
            !(http_body::Body::is_end_stream(req.body()) && declared_length(req.headers()).is_some_and(|n| n > 0));
        // A pooled connection may have been closed by the server a moment
        // ago; if the request was not written, try once more on a new one.
        if let Some((mut sender, watch)) = self.take_idle() {
            watch.set(deadline);
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok((
                        response,
                        Some(Lease {
                            pool: self.clone(),
                            sender,
                            watch,
                            reusable,
                        }),
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(returned) => req = returned,
                    None => return Err(SendError::Exchange(e.into_error())),
                },
            }
        }
        let stream = match self.connect(addrs).await {
            Ok(stream) => stream,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        let stream = match self.secure(stream).await {
            Ok(stream) => stream,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        let (mut sender, conn) = match http1::Builder::new().handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(_) => return Err(SendError::Connect(ProxyError::UpstreamProtocol, Box::new(req))),
        };
        let watch = ConnWatch::new();
        watch.set(deadline);
        let watched = Watched {
            conn: conn.with_upgrades(),
            watch: watch.clone(),
            sleep: None,
            armed_ms: NO_DEADLINE,
        };
        tokio::spawn(async move {
            match watched.await {
                Ended::Closed(Ok(())) => {}
                Ended::Closed(Err(e)) => tracing::debug!(error = %e, "upstream connection closed with an error"),
                Ended::Deadline => tracing::debug!("upstream connection closed at the request deadline"),
            }
        });
        match sender.send_request(req).await {
            Ok(response) => Ok((
                response,
                Some(Lease {
                    pool: self.clone(),
                    sender,
                    watch,
                    reusable,
                }),
            )),
            Err(e) => Err(SendError::Exchange(e)),
        }
    }

    async fn send_h2(&self, req: Request<RequestBody>, addrs: &[SocketAddr]) -> Result<Response<Incoming>, SendError> {
        let mut sender = match self.h2_sender(addrs).await {
            Ok(sender) => sender,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        sender.send_request(req).await.map_err(SendError::Exchange)
    }

    async fn h2_sender(&self, addrs: &[SocketAddr]) -> Result<http2::SendRequest<RequestBody>, ProxyError> {
        if let Some(sender) = self.live_h2() {
            return Ok(sender);
        }
        let _connecting = self.h2_connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(sender) = self.live_h2() {
            return Ok(sender);
        }
        let stream = self.connect(addrs).await?;
        let stream = self.secure(stream).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ProxyError::UpstreamProtocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection closed with an error");
            }
        });
        if let Ok(mut slot) = self.h2.lock() {
            *slot = Some(sender.clone());
        }
        Ok(sender)
    }

    fn live_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let slot = self.h2.lock().ok()?;
        slot.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Runs the TLS handshake when the group uses TLS.
    async fn secure(&self, stream: TcpStream) -> Result<UpstreamIo, ProxyError> {
        let (Some(connector), Some(name)) = (&self.settings.tls, &self.server_name) else {
            return Ok(UpstreamIo::Plain(stream));
        };
        let handshake = tokio::time::timeout(self.settings.connect_timeout, connector.connect(name.clone(), stream));
        match handshake.await {
            Ok(Ok(tls)) => Ok(UpstreamIo::Tls(Box::new(tls))),
            Ok(Err(e)) => {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
                tracing::warn!(server = ?name, error = %e, "upstream TLS handshake failed");
                Err(if certificate {
                    ProxyError::TlsCertificate
                } else {
                    ProxyError::TlsProtocol
                })
            }
            Err(_) => Err(ProxyError::ConnectionTimeout),
        }
    }

    /// Opens a TCP connection to the first address that accepts one.
    async fn connect(&self, addrs: &[SocketAddr]) -> Result<TcpStream, ProxyError> {
        let mut last = ProxyError::DnsError;
        for addr in addrs {
            match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Small requests and responses must not wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY on upstream connection");
                    }
                    self.connects.fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                Ok(Err(e)) => {
                    last = connect_error(&e);
                    if last == ProxyError::LocalResources {
                        // Trying the next address would fail the same way.
                        tracing::warn!(%addr, error = %e, "cannot open an upstream connection: out of local resources");
                        return Err(last);
                    }
                    tracing::debug!(%addr, error = %e, "upstream connect failed");
                }
                Err(_) => {
                    tracing::debug!(%addr, "upstream connect timed out");
                    last = ProxyError::ConnectionTimeout;
                }
            }
        }
        Err(last)
    }
}

/// What a failed `connect` means. Running out of file descriptors,
/// buffers or local ports is the proxy's condition, not the server's
/// ([`ProxyError::LocalResources`]: never counted against the server).
pub fn connect_error(e: &std::io::Error) -> ProxyError {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL, EADDRINUSE (Linux).
    const LOCAL: [i32; 6] = [24, 23, 105, 12, 99, 98];
    if e.raw_os_error().is_some_and(|code| LOCAL.contains(&code)) {
        return ProxyError::LocalResources;
    }
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ProxyError::ConnectionRefused,
        std::io::ErrorKind::TimedOut => ProxyError::ConnectionTimeout,
        _ => ProxyError::DestinationUnavailable,
    }
}

/// Why a send failed: before a connection existed, or during the exchange.
pub enum SendError {
    /// No byte of the request was sent: the request comes back, and may be
    /// tried on another server whatever its method.
    Connect(ProxyError, Box<Request<RequestBody>>),
    Exchange(hyper::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_resource_failures_are_the_proxys_own() {
        for code in [24, 23, 105, 12, 99, 98] {
            let e = std::io::Error::from_raw_os_error(code);
            assert_eq!(connect_error(&e), ProxyError::LocalResources, "{e}");
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_error(&refused), ProxyError::ConnectionRefused);
        let unreachable = std::io::Error::from_raw_os_error(113);
        assert_eq!(connect_error(&unreachable), ProxyError::DestinationUnavailable);
    }
}
