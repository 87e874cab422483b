//! tunnel: an accepted upgrade (WebSocket, allowed CONNECT) becomes a byte
//! tunnel between the client and the upstream, bounded by
//! `timeouts.tunnel_idle` and the drain deadline.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::ConnInfo;

/// Copies bytes both ways between an upgraded client and upstream until
/// either side closes, no byte passed for `timeouts.tunnel_idle`, or the
/// drain deadline cuts it. The tunnel holds the client connection's
/// `ConnInfo`, and with it the connection's place in the connection table
/// (caps count open tunnels); it is never evicted as idle.
pub(super) async fn run(client: OnUpgrade, upstream: OnUpgrade, conn: Arc<ConnInfo>) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::debug!(
                client_ok = c.is_ok(),
                upstream_ok = u.is_ok(),
                "upgrade did not complete"
            );
            return;
        }
    };
    let _busy = conn.activity.as_ref().map(|a| a.tunnel());
    let idle = conn.tunnel_idle;
    let traffic = Arc::new(Traffic::default());
    let mut client = Counted::new(TokioIo::new(client), traffic.clone());
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel closed with an error");
            }
        }
        () = traffic.idle_for(idle) => {
            tracing::debug!(peer = %conn.peer, "tunnel idle (timeouts.tunnel_idle); closing");
        }
        _ = conn.hard_stop.cancelled() => {}
    }
}

/// When a tunnel last carried a byte (milliseconds since `start`).
pub struct Traffic {
    start: Instant,
    last: AtomicU64,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Traffic {
    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        if self.last.load(Ordering::Relaxed) != now {
            self.last.store(now, Ordering::Relaxed);
        }
    }

    /// Resolves once no byte has passed for `idle`; wakes at most once per
    /// `idle` while bytes flow.
    pub async fn idle_for(&self, idle: Duration) {
        let idle_ms = (idle.as_millis() as u64).max(1);
        loop {
            let due = self.last.load(Ordering::Relaxed) + idle_ms;
            if self.start.elapsed().as_millis() as u64 >= due {
                return;
            }
            tokio::time::sleep_until(self.start + Duration::from_millis(due)).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream that notes in a [`Traffic`] every read and write that
    /// moved bytes.
    pub struct Counted<S> {
        #[pin]
        stream: S,
        traffic: Arc<Traffic>,
    }
}

impl<S> Counted<S> {
    pub fn new(stream: S, traffic: Arc<Traffic>) -> Self {
        Counted { stream, traffic }
    }
}

impl<S: AsyncRead> AsyncRead for Counted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.stream.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.traffic.touch();
        }
        result
    }
}

impl<S: AsyncWrite> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.stream.poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.traffic.touch();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_is_idle_from_its_last_byte() {
        let traffic = Traffic::default();
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        traffic.touch();
        traffic.idle_for(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(8));
        // Already idle that long: at once.
        let at = Instant::now();
        traffic.idle_for(Duration::from_secs(5)).await;
        assert_eq!(at.elapsed(), Duration::ZERO);
    }
}
