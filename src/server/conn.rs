//! One downstream connection: HTTP/1.1 and/or HTTP/2 served by hyper, with
//! the proxy's own connection timers.
//!
//! hyper's HTTP/1 header timer starts when it begins waiting for a request,
//! so it would also cut idle keep-alive connections at the header timeout.
//! The proxy keeps the two apart with a small watchdog per connection:
//! - `header_read`: from the *first byte* of a request to its last header
//!   byte (a slow-header client cannot reset it by trickling bytes);
//! - `keepalive_idle`: from the end of the last response with no new byte.
//!
//! [`WatchedIo`] stamps the first byte of each request; [`InFlight`] guards
//! count requests in flight and stamp the start of idleness when the last
//! response body is dropped. Nobody wakes the watchdog: it wakes by itself at
//! least every `min(header_read, keepalive_idle)` and recomputes its deadline
//! from those stamps. Since a stamp is never older than the watchdog's last
//! wake-up, a deadline is never missed, and the request path pays for no
//! wake-ups or timer resets, only for two clock reads per request.
//!
//! While a request is in flight the same watchdog enforces two more:
//! - `request` (HTTP/1.x, armed once the response head is ready): the
//!   connection is closed at the request's deadline whether or not the
//!   client reads the body, so a client that stops reading cannot hold
//!   the exchange (and its upstream connection) beyond it;
//! - `send`: a write to the client that has waited this long (the client
//!   stopped reading) closes the connection; draining connections keep
//!   this one ([`ConnState::stalled`]).
//!
//! The watchdog and the shutdown signals are polled only when one of them
//! woke the task ([`Gated`]), not on every socket event of the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::task::Waker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ListenerRuntime;
use crate::config::{ListenerProtocol, Timeouts};
use crate::pipeline::ConnInfo;
use crate::state::SharedSnapshot;

const NONE: u64 = u64::MAX;

/// Timer state of one connection, shared by the IO wrapper, the request
/// guards and the watchdog.
pub struct ConnState {
    start: Instant,
    in_flight: AtomicU32,
    /// Milliseconds since `start` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `start` of the first byte of a pending request
    /// head, or `NONE`.
    head_started: AtomicU64,
    /// No request is being received or answered: the next byte read starts
    /// a request head.
    awaiting_head: AtomicBool,
    /// Set once a request arrived over HTTP/2, where the header timer does
    /// not apply (frames arrive between streams by design).
    is_h2: AtomicBool,
    /// Requests received on this connection.
    requests: AtomicU64,
    /// Asks the connection to drain (HTTP/2 at its request limit).
    drain: tokio::sync::Notify,
    /// HTTP/2 streams the client cancelled before their response, in the
    /// one-second window that started at `resets_since` (ms since `start`).
    resets: AtomicU32,
    resets_since: AtomicU64,
    /// Closes the connection at once (an HTTP/2 reset flood).
    abort: tokio::sync::Notify,
    /// What the connection table's eviction sees, when it is on.
    activity: Option<Arc<crate::protect::connections::Activity>>,
    /// HTTP/1.x: milliseconds since `start` when the request in flight
    /// passes `timeouts.request`, or `NONE`. The connection is closed
    /// then, whether or not the client reads.
    request_deadline: AtomicU64,
    /// HTTP/2: the deadline of each stream whose response head is out
    /// (token, ms since `start`). hyper does not poll the body of a stream
    /// whose client withholds flow control, so no timer inside the body
    /// can fire: the watchdog closes the connection at the earliest of
    /// these instead. Touched once per stream, never contended but by the
    /// watchdog's scan.
    h2_deadlines: std::sync::Mutex<Vec<(u64, u64)>>,
    next_token: AtomicU64,
    /// `timeouts.request` and `timeouts.send` in milliseconds.
    request_ms: u64,
    send_ms: u64,
    /// Milliseconds since `start` since which a write to the client has
    /// been waiting (the client is not reading), or `NONE`.
    write_stalled: AtomicU64,
    /// Requests handed to the service so far (the head scanner re-arms
    /// after each).
    heads: AtomicU64,
    /// The head just read had both `Content-Length` and
    /// `Transfer-Encoding` (taken by the next HTTP/1.1 request).
    framing_conflict: AtomicBool,
}

impl ConnState {
    fn new(activity: Option<Arc<crate::protect::connections::Activity>>, timeouts: &Timeouts) -> Arc<Self> {
        Arc::new(ConnState {
            request_deadline: AtomicU64::new(NONE),
            h2_deadlines: std::sync::Mutex::new(Vec::new()),
            next_token: AtomicU64::new(0),
            request_ms: timeouts.request.as_millis() as u64,
            send_ms: timeouts.send.as_millis() as u64,
            write_stalled: AtomicU64::new(NONE),
            heads: AtomicU64::new(0),
            framing_conflict: AtomicBool::new(false),
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            // The first request head must arrive within the header timeout
            // of the accept, like any later one from its first byte.
            head_started: AtomicU64::new(0),
            awaiting_head: AtomicBool::new(true),
            is_h2: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            drain: tokio::sync::Notify::new(),
            resets: AtomicU32::new(0),
            resets_since: AtomicU64::new(0),
            abort: tokio::sync::Notify::new(),
            activity,
        })
    }

    /// Resolves when the connection table evicts this connection; never
    /// when eviction is off.
    async fn evicted(&self) {
        match &self.activity {
            Some(a) => a.evicted().await,
            None => std::future::pending().await,
        }
    }

    /// Counts an HTTP/2 stream the client cancelled before its response;
    /// past `max` in one second the connection is aborted (Rapid Reset:
    /// each cancelled stream costs the proxy, and maybe the origin, a
    /// request, while the client's concurrent-stream count stays low).
    fn count_reset(&self, max: u32) {
        let now = self.now_ms();
        let since = self.resets_since.load(Ordering::Relaxed);
        let count = if now.saturating_sub(since) >= 1000 {
            self.resets_since.store(now, Ordering::Relaxed);
            self.resets.store(1, Ordering::Relaxed);
            1
        } else {
            self.resets.fetch_add(1, Ordering::Relaxed) + 1
        };
        if count > max {
            self.abort.notify_one();
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn on_read(&self) {
        if self.awaiting_head.load(Ordering::Relaxed) && self.head_started.load(Ordering::Relaxed) == NONE {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The earliest deadline of the HTTP/2 streams in flight, if any.
    fn earliest_h2_deadline(&self) -> Option<u64> {
        let deadlines = self.h2_deadlines.lock().unwrap_or_else(|p| p.into_inner());
        deadlines.iter().map(|&(_, at)| at).min()
    }

    /// A write to the client is waiting for it to read.
    fn on_write_pending(&self) {
        if self.write_stalled.load(Ordering::Relaxed) == NONE {
            self.write_stalled.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A write to the client made progress.
    fn on_write_progress(&self) {
        if self.write_stalled.load(Ordering::Relaxed) != NONE {
            self.write_stalled.store(NONE, Ordering::Relaxed);
        }
    }

    /// When the stalled write (if any) passes the send timeout.
    fn send_deadline(&self, send_ms: u64) -> Option<(u64, Expiry)> {
        let stalled = self.write_stalled.load(Ordering::Relaxed);
        (stalled != NONE).then(|| (stalled + send_ms, Expiry::SendTimeout))
    }

    /// Waits until a timer of the connection expires: the header read
    /// and idle timers when nothing is in flight; the request deadline
    /// (HTTP/1.x) and the send timeout while something is.
    async fn expired(&self, timeouts: &Timeouts) -> Expiry {
        let header_ms = timeouts.header_read.as_millis() as u64;
        let idle_ms = timeouts.keepalive_idle.as_millis() as u64;
        let send_ms = timeouts.send.as_millis() as u64;
        // Never sleep longer than this: see the module doc. (At least a
        // millisecond: the config refuses shorter timeouts, and a zero
        // period would spin.)
        let period_ms = header_ms.min(idle_ms).min(send_ms).min(self.request_ms).max(1);
        loop {
            let now = self.now_ms();
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                let request = match self.request_deadline.load(Ordering::Relaxed) {
                    NONE => self.earliest_h2_deadline(),
                    at => Some(at),
                };
                let request = request.map(|at| (at, Expiry::RequestTimeout));
                match (request, self.send_deadline(send_ms)) {
                    (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                    (a, b) => a.or(b),
                }
            } else {
                let head = self.head_started.load(Ordering::Relaxed);
                if head != NONE && !self.is_h2.load(Ordering::Relaxed) {
                    Some((head + header_ms, Expiry::HeaderTimeout))
                } else {
                    Some((self.idle_since.load(Ordering::Relaxed) + idle_ms, Expiry::Idle))
                }
            };
            let wake_at = match deadline {
                Some((at, kind)) if now >= at => return kind,
                Some((at, _)) => at.min(now + period_ms),
                None => now + period_ms,
            };
            tokio::time::sleep_until(self.start + Duration::from_millis(wake_at)).await;
        }
    }

    /// Waits until a write has made no progress for `send`: while a
    /// connection drains (its other timers no longer apply), a client that
    /// stopped reading must not keep it until the drain deadline.
    async fn stalled(&self, send: Duration) {
        let send_ms = (send.as_millis() as u64).max(1);
        loop {
            let now = self.now_ms();
            let wake_at = match self.send_deadline(send_ms) {
                Some((at, _)) if now >= at => return,
                Some((at, _)) => at.min(now + send_ms),
                None => now + send_ms,
            };
            tokio::time::sleep_until(self.start + Duration::from_millis(wake_at)).await;
        }
    }
}

/// Why the control future of a connection fired.
enum Control {
    /// Shutdown or idle: finish what is in flight, then close.
    Drain,
    /// The drain deadline passed.
    Cut,
    HeaderTimeout,
    /// Too many HTTP/2 streams cancelled per second.
    ResetFlood,
    /// The connection table needs the room (the connection was quiet).
    Evicted,
    /// The HTTP/1.x request in flight passed `timeouts.request`.
    RequestTimeout,
    /// A write to the client made no progress for `timeouts.send`.
    SendTimeout,
}

/// What the connection does about a control signal.
enum Step {
    /// Finish what is in flight (HTTP/2: GOAWAY), then close.
    Drain,
    Close,
}

/// Decides, logs and counts what a control signal does to the connection.
fn decide(signal: Control, state: &ConnState, info: &ConnInfo, listener: &ListenerRuntime) -> Step {
    let (reason, message) = match signal {
        Control::Drain => return Step::Drain,
        Control::Cut => return Step::Close,
        Control::Evicted => {
            if let Some(m) = &listener.metrics {
                m.rejected("evicted_idle");
            }
            if state.in_flight.load(Ordering::Acquire) > 0 {
                // A request arrived since it was chosen: let it finish.
                return Step::Drain;
            }
            tracing::debug!(peer = %info.peer, "connection evicted to make room; closing");
            return Step::Close;
        }
        Control::ResetFlood => ("h2_reset_flood", "HTTP/2 stream resets over the limit; closing"),
        Control::HeaderTimeout => ("header_timeout", "request header read timed out; closing"),
        Control::RequestTimeout => ("request_timeout", "request passed timeouts.request; closing"),
        Control::SendTimeout => ("send_timeout", "client stopped reading (timeouts.send); closing"),
    };
    tracing::debug!(peer = %info.peer, reason, "{message}");
    if let Some(m) = &listener.metrics {
        m.rejected(reason);
    }
    Step::Close
}

/// The hyper service of one connection: each request is marked in flight
/// (and counted, for `max_requests_per_connection`: the last one says
/// `Connection: close` on HTTP/1.1 and drains HTTP/2), watched for resets
/// (HTTP/2) and answered on the snapshot current when it arrived.
fn request_service(
    state: Arc<ConnState>,
    info: Arc<ConnInfo>,
    snapshot: SharedSnapshot,
    max_resets: u32,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<crate::body::ProxyBody>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::ProxyBody>, std::convert::Infallible>> + Send,
> + Clone {
    service_fn(move |mut req: Request<Incoming>| {
        let h2 = req.version() == http::Version::HTTP_2;
        if !h2 && state.framing_conflict.swap(false, Ordering::Relaxed) {
            req.extensions_mut().insert(crate::pipeline::ConflictingFraming);
        }
        let guard = InFlight::new(&state, h2);
        let snapshot = snapshot.load_full();
        let last = snapshot
            .config
            .protect
            .max_requests_per_connection
            .is_some_and(|max| state.requests.fetch_add(1, Ordering::Relaxed) + 1 >= max);
        if last && h2 {
            state.drain.notify_one();
        }
        let reset_watch = ResetWatch {
            state: state.clone(),
            max: max_resets,
            armed: h2,
        };
        answer(req, info.clone(), snapshot, guard, reset_watch, last && !h2)
    })
}

/// One request through the pipeline, with what the connection adds: the
/// reset watch disarmed once the response is ready, `Connection: close`
/// on the last response of an HTTP/1.1 connection, and the in-flight mark
/// (with its deadline) riding in the body.
async fn answer(
    req: Request<Incoming>,
    info: Arc<ConnInfo>,
    snapshot: Arc<crate::state::Snapshot>,
    mut guard: InFlight,
    reset_watch: ResetWatch,
    last_h1: bool,
) -> Result<http::Response<crate::body::ProxyBody>, std::convert::Infallible> {
    let mut response = crate::pipeline::handle(req, &info, &snapshot).await;
    reset_watch.disarm();
    if last_h1 {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    guard.arm_deadline();
    response.body_mut().hold(Box::new(guard));
    Ok(response)
}

/// Lives in an HTTP/2 request's service future: dropped before it is
/// disarmed means the client reset the stream before the response.
struct ResetWatch {
    state: Arc<ConnState>,
    max: u32,
    armed: bool,
}

impl ResetWatch {
    /// The response is ready: not a reset.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ResetWatch {
    fn drop(&mut self) {
        if self.armed {
            self.state.count_reset(self.max);
        }
    }
}

pin_project_lite::pin_project! {
    /// Polls its inner future only after the inner future's own waker fired,
    /// so a connection task woken by socket events does not re-poll timers
    /// and cancellation tokens (each poll of those takes locks).
    struct Gated<F> {
        #[pin]
        inner: F,
        gate: Arc<Gate>,
    }
}

struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Gated<F> {
    fn new(inner: F) -> Self {
        // Starts open: the inner future must be polled once to register.
        Gated {
            inner,
            gate: Arc::new(Gate {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.gate.task.register(cx.waker());
        if !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.gate.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Idle,
    HeaderTimeout,
    RequestTimeout,
    SendTimeout,
}

/// Marks one request in flight until dropped (it lives in the response body).
pub struct InFlight {
    state: Arc<ConnState>,
    /// When the request arrived (ms since the connection's start).
    started_ms: u64,
    h2: bool,
    /// The stream's entry in `h2_deadlines`, once armed.
    token: Option<u64>,
}

impl InFlight {
    fn new(state: &Arc<ConnState>, h2: bool) -> Self {
        if h2 {
            state.is_h2.store(true, Ordering::Relaxed);
        }
        state.awaiting_head.store(false, Ordering::Relaxed);
        state.head_started.store(NONE, Ordering::Relaxed);
        state.heads.fetch_add(1, Ordering::Relaxed);
        if state.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            if let Some(a) = &state.activity {
                a.busy();
            }
        }
        InFlight {
            state: state.clone(),
            started_ms: state.now_ms(),
            h2,
            token: None,
        }
    }

    /// The response head is ready: from now on the connection is closed
    /// at the request's deadline if the exchange is still going on, read
    /// by the client or not (HTTP/2: the whole connection, since one
    /// stream cannot be reset from outside hyper). Before the head, the
    /// pipeline's own timeouts answer (504); this one must not race them.
    /// A response ready only at (or past) the deadline, such as a stale
    /// answer to a timed-out exchange, still gets `timeouts.send` to go out.
    fn arm_deadline(&mut self) {
        let state = &self.state;
        let now = state.now_ms();
        let deadline = match self.started_ms.saturating_add(state.request_ms) {
            passed if passed <= now => now.saturating_add(state.send_ms),
            deadline => deadline,
        };
        if self.h2 {
            let token = state.next_token.fetch_add(1, Ordering::Relaxed);
            state
                .h2_deadlines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((token, deadline));
            self.token = Some(token);
        } else {
            state.request_deadline.store(deadline, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(token) = self.token {
            let mut deadlines = self.state.h2_deadlines.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = deadlines.iter().position(|&(t, _)| t == token) {
                deadlines.swap_remove(i);
            }
        }
        if self.state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.request_deadline.store(NONE, Ordering::Relaxed);
            self.state.idle_since.store(self.state.now_ms(), Ordering::Relaxed);
            self.state.awaiting_head.store(true, Ordering::Relaxed);
            if let Some(a) = &self.state.activity {
                a.quiet();
                // A request that started meanwhile on another stream may
                // have marked the connection busy before this: busy wins.
                if self.state.in_flight.load(Ordering::Acquire) > 0 {
                    a.busy();
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The client stream (TCP or TLS), stamping the first byte of each
    /// request head.
    pub struct WatchedIo<S> {
        #[pin]
        stream: S,
        state: Arc<ConnState>,
        // Looks for both framings in HTTP/1.1 heads, when refused.
        scan: Option<HeadScan>,
    }
}

impl<S: AsyncRead> AsyncRead for WatchedIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.stream.poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.on_read();
            if let Some(scan) = this.scan {
                scan.read(&buf.filled()[before..], this.state);
            }
        }
        result
    }
}

/// The connection's look at raw HTTP/1.1 request heads for a
/// `Content-Length` beside a `Transfer-Encoding` (hyper drops the former
/// before the request is seen). It is not a parser: it follows line starts
/// from the first byte read while the connection awaits a head to the
/// head's empty line, compares each line's first 18 bytes with the two
/// names, and then sleeps until the request was handed on. A head read in
/// the same buffer as the request before it (pipelining) is not looked at:
/// that request gets the lenient reading (chunked, connection closed),
/// which is safe too.
#[derive(Debug, Default)]
struct HeadScan {
    in_head: bool,
    /// Requests handed on when the last head ended: scanning re-arms once
    /// there are more.
    heads_at_end: Option<u64>,
    /// The current line's first bytes, lower-cased.
    line: [u8; 18],
    line_len: usize,
    lines: u32,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    fn read(&mut self, bytes: &[u8], state: &ConnState) {
        if state.is_h2.load(Ordering::Relaxed) {
            return;
        }
        if !self.in_head {
            let handed_on = self
                .heads_at_end
                .is_none_or(|at| state.heads.load(Ordering::Relaxed) > at);
            if !(handed_on && state.awaiting_head.load(Ordering::Relaxed)) {
                return;
            }
            *self = HeadScan {
                in_head: true,
                ..HeadScan::default()
            };
        }
        for &b in bytes {
            if b != b'\n' {
                if self.line_len < self.line.len() {
                    self.line[self.line_len] = b.to_ascii_lowercase();
                    self.line_len += 1;
                }
                continue;
            }
            let line = &self.line[..self.line_len];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                // Empty lines before the request line are allowed.
                if self.lines > 0 {
                    if self.content_length && self.transfer_encoding {
                        state.framing_conflict.store(true, Ordering::Relaxed);
                    }
                    self.in_head = false;
                    self.heads_at_end = Some(state.heads.load(Ordering::Relaxed));
                    return;
                }
            } else {
                self.lines += 1;
                self.content_length |= line.starts_with(b"content-length:");
                self.transfer_encoding |= line.starts_with(b"transfer-encoding:");
            }
            self.line_len = 0;
        }
    }
}

/// Stamps a write that waits (the client is not reading) and clears the
/// stamp when a write makes progress, for the send timeout.
fn watch_write(state: &ConnState, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
    match &result {
        Poll::Pending => state.on_write_pending(),
        Poll::Ready(Ok(n)) if *n > 0 => state.on_write_progress(),
        Poll::Ready(_) => {}
    }
    result
}

impl<S: AsyncWrite> AsyncWrite for WatchedIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        watch_write(this.state, this.stream.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        watch_write(this.state, this.stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        watch_flush(this.state, this.stream.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        watch_flush(this.state, this.stream.poll_shutdown(cx))
    }
}

/// [`watch_write`] for a flush or shutdown (over TLS the last bytes of a
/// response can wait there, in rustls' buffer, for a client that stopped
/// reading).
fn watch_flush(state: &ConnState, result: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
    match &result {
        Poll::Pending => state.on_write_pending(),
        Poll::Ready(Ok(())) => state.on_write_progress(),
        Poll::Ready(Err(_)) => {}
    }
    result
}

/// Serves one accepted connection until it closes, drains or is cut.
pub(super) async fn serve<S>(
    stream: S,
    protocol: ListenerProtocol,
    info: Arc<ConnInfo>,
    listener: Arc<ListenerRuntime>,
    snapshot: SharedSnapshot,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (timeouts, max_resets) = {
        let current = snapshot.load();
        (current.config.timeouts, current.config.protect.h2_max_resets_per_second)
    };
    let state = ConnState::new(info.activity.clone(), &timeouts);
    let strict_framing = snapshot.load().config.server.reject_conflicting_framing;
    let io = TokioIo::new(WatchedIo {
        stream,
        state: state.clone(),
        scan: (strict_framing && protocol != ListenerProtocol::H2c).then(HeadScan::default),
    });
    let service = request_service(state.clone(), info.clone(), snapshot, max_resets);
    // What can end or drain the connection besides the client: shutdown,
    // the drain deadline, the watchdog. Polled only when one of them fires.
    let control = Gated::new(async {
        tokio::select! {
            _ = shutdown.cancelled() => Control::Drain,
            _ = state.drain.notified() => Control::Drain,
            _ = info.close.notified() => Control::Drain,
            _ = state.abort.notified() => Control::ResetFlood,
            _ = state.evicted() => Control::Evicted,
            _ = info.hard_stop.cancelled() => Control::Cut,
            expiry = state.expired(&timeouts) => match expiry {
                Expiry::Idle => Control::Drain,
                Expiry::HeaderTimeout => Control::HeaderTimeout,
                Expiry::RequestTimeout => Control::RequestTimeout,
                Expiry::SendTimeout => Control::SendTimeout,
            },
        }
    });
    tokio::pin!(control);
    // After a drain starts, only the drain deadline and a client that
    // stopped reading still matter.
    let cut = Gated::new(async {
        tokio::select! {
            _ = info.hard_stop.cancelled() => {}
            _ = state.stalled(timeouts.send) => {
                if let Some(m) = &listener.metrics {
                    m.rejected("send_timeout");
                }
            }
        }
    });
    tokio::pin!(cut);

    // The same drive loop for each connection type hyper offers.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    biased;
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(peer = %info.peer, error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                    signal = control.as_mut(), if !draining => match decide(signal, &state, &info, &listener) {
                        Step::Drain => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        Step::Close => return,
                    },
                    _ = cut.as_mut(), if draining => return,
                }
            }
        }};
    }
    match protocol {
        ListenerProtocol::Auto => drive!(listener.auto.serve_connection_with_upgrades(io, service)),
        ListenerProtocol::Http1 => drive!(listener.http1.serve_connection(io, service).with_upgrades()),
        ListenerProtocol::H2c => drive!(listener.http2.serve_connection(io, service)),
    }
}

#[cfg(test)]
mod tests;
