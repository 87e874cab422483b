//! Body types of the proxy.
//!
//! - [`RequestBody`]: the client's body on its way upstream, counted against
//!   `limits.max_request_body_bytes` so an oversized chunked upload fails with
//!   413 instead of being forwarded.
//! - [`ProxyBody`]: what the client receives: a short local body, or the
//!   upstream's body streamed frame by frame (never buffered whole).
//!
//! A body knows none of the modules that ride in it: it carries guards
//! ([`Guard`], dropped with it: the connection's in-flight mark, the
//! server's request count), a [`Record`] told of bytes and of the end, a
//! [`Tap`] that copies it (the cache) and the [`Reuse`] of its upstream
//! connection, all filled in by the pipeline. So everything that must end
//! with the body ends exactly when it is done or dropped.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The request body exceeded the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The client sent its body slower than `protect.min_body_rate`.
#[derive(Debug, thiserror::Error)]
#[error("request body arrived slower than the minimum rate")]
pub struct BodyTooSlow;

/// The whole-request deadline passed while the body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("request timed out while streaming the body")]
pub struct BodyDeadline;

/// The task feeding a response body stopped before its end.
#[derive(Debug, thiserror::Error)]
#[error("the response body was cut off")]
pub struct BodyCut;

pin_project_lite::pin_project! {
    /// The client's request body, forwarded as it arrives.
    pub struct RequestBody {
        #[pin]
        inner: Option<Incoming>,
        limit: Option<u64>,
        seen: u64,
        // Shared with the access log record, when there is one.
        counter: Option<Arc<AtomicU64>>,
        // The minimum data rate (bytes per second) after a grace period,
        // measured from `started`; the timer is armed only while the
        // client is not sending.
        min_rate: Option<(u64, Duration)>,
        started: Instant,
        slow: Option<Pin<Box<Sleep>>>,
        // Fields only the proxy sets, removed from the client's trailers
        // with those a trailer may not carry.
        owned: Option<Arc<[http::HeaderName]>>,
        // Set once the whole body has been read (for the upstream: sent).
        sent: Option<Arc<std::sync::atomic::AtomicBool>>,
        // Frames read ahead by `prefetch`, given out first.
        buffered: std::collections::VecDeque<Frame<Bytes>>,
        // The client's body has ended (all of it is in `buffered`).
        inner_done: bool,
        // The share of the buffer memory budget the read-ahead holds.
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    }
}

/// The buffer memory for read-ahead request bodies was all in use.
#[derive(Debug, thiserror::Error)]
#[error("request buffer memory exhausted")]
pub struct BufferFull;

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        RequestBody {
            inner: Some(inner),
            limit,
            seen: 0,
            counter: None,
            min_rate: None,
            started: Instant::now(),
            slow: None,
            owned: None,
            sent: None,
            buffered: std::collections::VecDeque::new(),
            inner_done: false,
            permit: None,
        }
    }

    /// Reads the body ahead, up to `max` bytes, holding memory from
    /// `budget` for what it read (one permit per byte, taken as bytes
    /// arrive, so a client trickling its body holds only what it sent).
    /// `Ok(true)`: the whole body is here; `Ok(false)`: it is longer, the
    /// read part is given out first and the rest streams. The minimum
    /// rate and the size limit apply as they do when streaming. Errors:
    /// [`BufferFull`], [`BodyTooSlow`], [`BodyTooLarge`], or the client's.
    pub async fn prefetch(&mut self, max: u64, budget: &Arc<tokio::sync::Semaphore>) -> Result<bool, BoxError> {
        let mut read = 0u64;
        loop {
            let polled = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_inner(cx)).await;
            let Some(frame) = polled else {
                self.inner_done = true;
                return Ok(true);
            };
            let frame = frame?;
            let bytes = frame.data_ref().map_or(0, Bytes::len);
            if bytes > 0 {
                let wanted = u32::try_from(bytes).map_err(|_| Box::new(BufferFull) as BoxError)?;
                let permit = budget
                    .clone()
                    .try_acquire_many_owned(wanted)
                    .map_err(|_| Box::new(BufferFull) as BoxError)?;
                match &mut self.permit {
                    Some(held) => held.merge(permit),
                    None => self.permit = Some(permit),
                }
            }
            read += bytes as u64;
            self.buffered.push_back(frame);
            if self.inner.as_ref().is_none_or(Body::is_end_stream) {
                self.inner_done = true;
                return Ok(true);
            }
            if read >= max {
                return Ok(false);
            }
        }
    }

    /// Fails the body (408) when it arrives slower than `bytes_per_second`
    /// on average once `grace` has passed.
    pub fn min_rate(mut self, rate: Option<(u64, Duration)>) -> Self {
        self.min_rate = rate;
        self
    }

    /// A flag set once the whole body has been read, so a caller that
    /// handed the body on can tell whether it was all sent (a timeout
    /// before that is the client's slowness, not the server's).
    pub fn sent_flag(&mut self) -> Arc<std::sync::atomic::AtomicBool> {
        let ended = self.is_end_stream();
        self.sent
            .get_or_insert_with(|| Arc::new(std::sync::atomic::AtomicBool::new(ended)))
            .clone()
    }

    /// Cleans the client's trailers (`owned` are the proxy's own fields).
    pub fn owned_fields(mut self, owned: Arc<[http::HeaderName]>) -> Self {
        self.owned = Some(owned);
        self
    }

    /// Also counts the bytes into `counter` (for the access log).
    pub fn counted(mut self, counter: Option<Arc<AtomicU64>>) -> Self {
        self.counter = counter;
        self
    }

    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            limit: None,
            seen: 0,
            counter: None,
            min_rate: None,
            started: Instant::now(),
            slow: None,
            owned: None,
            sent: None,
            buffered: std::collections::VecDeque::new(),
            inner_done: false,
            permit: None,
        }
    }

    /// The client's body as it arrives: counted, limited, timed, its
    /// trailers cleaned.
    fn poll_inner(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(mut inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let polled = match inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                let Some((rate, grace)) = *this.min_rate else {
                    return Poll::Pending;
                };
                // By now the client must have sent `rate` bytes for every
                // second after the grace period.
                let due = *this.started + grace + Duration::from_secs_f64(*this.seen as f64 / rate as f64);
                let sleep = this.slow.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if sleep.deadline() != due {
                    sleep.as_mut().reset(due);
                }
                return match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow)))),
                    Poll::Pending => Poll::Pending,
                };
            }
        };
        if let Some(sent) = this.sent {
            let ended = polled.is_none() || inner.is_end_stream();
            if ended {
                sent.store(true, Ordering::Relaxed);
            }
        }
        match polled {
            Some(Ok(frame)) if frame.is_trailers() => {
                let mut trailers = frame.into_trailers().unwrap_or_default();
                crate::forwarding::clean_request_trailers(&mut trailers, this.owned.as_deref().unwrap_or(&[]));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if let Some(counter) = this.counter {
                        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    if let Some(limit) = *this.limit {
                        if *this.seen > limit {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.buffered.pop_front() {
            if self.buffered.is_empty() && self.inner_done {
                if let Some(sent) = &self.sent {
                    sent.store(true, Ordering::Relaxed);
                }
                // The memory is given back once the read-ahead is out.
                self.permit = None;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        self.permit = None;
        if self.inner_done {
            return Poll::Ready(None);
        }
        self.poll_inner(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && (self.inner_done || self.inner.as_ref().is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        // With trailers the length stays unknown: they go only in a
        // chunked body.
        if self.inner_done && !self.buffered.iter().any(Frame::is_trailers) {
            let bytes: usize = self.buffered.iter().filter_map(Frame::data_ref).map(Bytes::len).sum();
            return SizeHint::with_exact(bytes as u64);
        }
        if self.inner_done {
            return SizeHint::default();
        }
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What a body carries to tell the request's record how it went: bytes as
/// they go out, and once, when the body is done or dropped, whether it was
/// read to its end. (The pipeline's access log and metrics record.)
pub trait Record: Send {
    fn on_data(&mut self, bytes: usize);
    fn finish(self: Box<Self>, complete: bool);
}

/// What copies a body while it streams (the cache's tee). `data` returns
/// false when the copy is given up (the body is too big); `finish` is
/// called when the body ended whole, `pass` when the copy was given up;
/// dropped otherwise (the body did not end well).
pub trait Tap: Send {
    fn data(&mut self, chunk: &Bytes) -> bool;
    fn finish(self: Box<Self>);
    fn pass(self: Box<Self>);
}

/// A connection that can be reused once its response was read whole (the
/// pool's lease); dropped without `release`, it is closed.
pub trait Reuse: Send {
    fn release(self: Box<Self>);
}

/// A guard held until the body is done or dropped (the connection's
/// in-flight mark, the server's request count). The body knows nothing of
/// them but that they end with it.
pub type Guard = Box<dyn Send>;

/// What the client receives.
pub struct ProxyBody {
    kind: Kind,
    /// Released when the body is dropped (in-flight marks, server counts).
    guards: Vec<Guard>,
    /// The request's log and metrics record, finished on drop.
    record: Option<Box<dyn Record>>,
    /// Keeps a copy of the body for the cache while it streams.
    tap: Option<Box<dyn Tap>>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
    /// Fed by a task that reads the upstream body at the origin's pace
    /// (the cache's `Tee::feed`), until it hands the rest over.
    Fed(Box<Fed>),
}

/// What the feeding task sends.
pub enum Feed {
    /// A frame, with a guard for the bytes it holds (released when the
    /// frame is taken), and whether it is the last one.
    Frame(Result<Frame<Bytes>, BoxError>, Option<Guard>, bool),
    /// The rest of the body, to read directly (at the client's pace).
    Rest(ProxyBody),
    /// The body ended cleanly.
    End,
}

struct Fed {
    rx: tokio::sync::mpsc::UnboundedReceiver<Feed>,
    rest: Option<ProxyBody>,
    ended: bool,
    failed: bool,
}

/// An upstream response body with its connection and deadline.
struct UpstreamBody {
    inner: Incoming,
    done: bool,
    /// Ended by an error (upstream failure or deadline).
    failed: bool,
    /// The pooled HTTP/1.1 connection, given back on drop if the body was
    /// read to its end (otherwise it is closed).
    reuse: Option<Box<dyn Reuse>>,
    deadline: Option<Instant>,
    /// Armed lazily, only when the body stalls, so a small response that is
    /// ready at once never touches the timer wheel.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ProxyBody {
    fn with_kind(kind: Kind) -> Self {
        ProxyBody {
            kind,
            guards: Vec::new(),
            record: None,
            tap: None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::with_kind(Kind::Full(Some(bytes.into())))
    }

    /// A body fed through `rx` (see [`Feed`]).
    pub fn fed(rx: tokio::sync::mpsc::UnboundedReceiver<Feed>) -> Self {
        Self::with_kind(Kind::Fed(Box::new(Fed {
            rx,
            rest: None,
            ended: false,
            failed: false,
        })))
    }

    pub fn empty() -> Self {
        Self::with_kind(Kind::Full(None))
    }

    /// An upstream body; `reuse` gives its connection back when the body
    /// was read whole.
    pub fn upstream(inner: Incoming, reuse: Option<Box<dyn Reuse>>, deadline: Option<Instant>) -> Self {
        Self::with_kind(Kind::Upstream(UpstreamBody {
            inner,
            done: false,
            failed: false,
            reuse,
            deadline,
            sleep: None,
        }))
    }

    /// Holds `guard` until the body is done or dropped.
    pub fn hold(&mut self, guard: Guard) {
        self.guards.push(guard);
    }

    pub fn set_record(&mut self, record: Box<dyn Record>) {
        self.record = Some(record);
    }

    pub fn set_tap(&mut self, tap: Box<dyn Tap>) {
        self.tap = Some(tap);
    }

    /// Still copying for the cache.
    pub fn has_tap(&self) -> bool {
        self.tap.is_some()
    }

    /// Read to its end without an error.
    fn complete(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(up) => up.completed(),
            Kind::Fed(f) => match &f.rest {
                Some(rest) => !f.failed && rest.complete(),
                None => f.ended && !f.failed,
            },
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let complete = self.complete();
        if let Some(record) = self.record.take() {
            record.finish(complete);
        }
        if let Some(tap) = self.tap.take() {
            // A body the server never polled to `None` (it stops at
            // `is_end_stream`) is still whole; an unfinished one is not
            // stored (dropping the tap abandons its flight).
            if complete {
                tap.finish();
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // ProxyBody is Unpin: every field is.
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(up) => up.poll_frame(cx),
            Kind::Fed(f) => f.poll_frame(cx),
        };
        if let (Some(record), Poll::Ready(Some(Ok(frame)))) = (&mut this.record, &polled) {
            if let Some(data) = frame.data_ref() {
                record.on_data(data.len());
            }
        }
        if this.tap.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        if this.tap.as_mut().is_some_and(|tap| !tap.data(data)) {
                            // Too big to keep: the waiters go on their own.
                            if let Some(tap) = this.tap.take() {
                                tap.pass();
                            }
                        }
                    }
                    // The last frame: the server may not poll again.
                    if this.is_end_stream() {
                        if let Some(tap) = this.tap.take() {
                            tap.finish();
                        }
                    }
                }
                Poll::Ready(None) => {
                    if let Some(tap) = this.tap.take() {
                        tap.finish();
                    }
                }
                Poll::Ready(Some(Err(_))) => this.tap = None,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(up) => up.done || up.inner.is_end_stream(),
            Kind::Fed(f) => f.ended || f.rest.as_ref().is_some_and(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(up) => up.inner.size_hint(),
            Kind::Fed(f) => f.rest.as_ref().map_or_else(SizeHint::new, Body::size_hint),
        }
    }
}

impl Fed {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(rest) = &mut self.rest {
                return Pin::new(rest).poll_frame(cx);
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Feed::Frame(frame, _counted, last))) => {
                    self.failed |= frame.is_err();
                    self.ended |= last;
                    return Poll::Ready(Some(frame));
                }
                Poll::Ready(Some(Feed::Rest(rest))) => self.rest = Some(rest),
                Poll::Ready(Some(Feed::End)) => self.ended = true,
                // The feeder went away without saying the body ended.
                Poll::Ready(None) => {
                    self.ended = true;
                    self.failed = true;
                    return Poll::Ready(Some(Err(Box::new(BodyCut))));
                }
            }
        }
    }
}

impl UpstreamBody {
    /// Read to its end without an error.
    fn completed(&self) -> bool {
        (self.done && !self.failed) || self.inner.is_end_stream()
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                self.failed = true;
                self.reuse = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => {
                let Some(deadline) = self.deadline else {
                    return Poll::Pending;
                };
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.done = true;
                        self.failed = true;
                        self.reuse = None;
                        Poll::Ready(Some(Err(Box::new(BodyDeadline))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(reuse) = self.reuse.take() {
            // Only a connection whose response was read to the end can carry
            // another request; anything else is closed by dropping it.
            if self.done || self.inner.is_end_stream() {
                reuse.release();
            }
        }
    }
}

/// Finds an error of type `E` anywhere in a source chain.
pub fn find_cause<'a, E: StdError + 'static>(mut err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    loop {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        err = err.source()?;
    }
}
