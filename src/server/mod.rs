//! Listeners, the accept loop and graceful drain.
//!
//! [`Proxy::bind`] binds every listener first (so a test can bind
//! `127.0.0.1:0` and read [`Proxy::local_addrs`] before any traffic), then
//! [`Proxy::run`] serves until the shutdown future resolves:
//! 1. the listeners close (new connections are refused);
//! 2. every connection is asked to drain: idle HTTP/1.1 connections close,
//!    busy ones close after their response, HTTP/2 ones get GOAWAY;
//! 3. after `server.drain_timeout`, whatever is left is cut.

pub mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigErrors, ListenerConfig, ListenerProtocol};
use crate::state::{SharedSnapshot, Snapshot};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        addr: SocketAddr,
        listener: String,
        source: std::io::Error,
    },
}

/// Per-listener serving settings, built once at bind.
///
/// hyper-util's auto builder ignores "HTTP/1 only" / "HTTP/2 only" when
/// upgrades are enabled, so restricted listeners use hyper's own builders.
pub(crate) struct ListenerRuntime {
    pub name: String,
    pub protocol: ListenerProtocol,
    pub http1: hyper::server::conn::http1::Builder,
    pub http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    pub auto: auto::Builder<TokioExecutor>,
}

/// Most concurrent streams per HTTP/2 client connection.
const MAX_CONCURRENT_STREAMS: u32 = 256;
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl ListenerRuntime {
    fn new(listener: &ListenerConfig, config: &Config) -> Self {
        let limits = &config.limits;
        // hyper answers 431 when the head does not fit its buffer; the exact
        // byte limit is enforced by `max_header_size` (HTTP/1-only listeners)
        // and again in the pipeline (all listeners).
        let buf_size = (limits.max_request_header_bytes + 4096).max(16 * 1024);

        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // The proxy runs its own header and idle timers (see conn.rs).
            .header_read_timeout(None)
            .keep_alive(true)
            .max_headers(limits.max_header_count)
            .max_header_size(limits.max_request_header_bytes)
            .max_buf_size(buf_size);

        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_request_header_bytes as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .enable_connect_protocol();

        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .max_headers(limits.max_header_count)
            .max_buf_size(buf_size);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_request_header_bytes as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .enable_connect_protocol();

        ListenerRuntime {
            name: listener.name.clone(),
            protocol: listener.protocol,
            http1,
            http2,
            auto,
        }
    }
}

/// A bound proxy, ready to run.
pub struct Proxy {
    snapshot: SharedSnapshot,
    listeners: Vec<(Arc<ListenerRuntime>, TcpListener)>,
}

impl Proxy {
    /// Builds the runtime snapshot and binds every listener.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let mut listeners = Vec::new();
        for listener in &config.listeners {
            let runtime = Arc::new(ListenerRuntime::new(listener, &config));
            for addr in &listener.bind {
                let socket = TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                    addr: *addr,
                    listener: listener.name.clone(),
                    source,
                })?;
                listeners.push((runtime.clone(), socket));
            }
        }
        let snapshot = Snapshot::build(config).await?;
        Ok(Proxy {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            listeners,
        })
    }

    /// Where each listener is bound, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(_, l)| l.local_addr().ok()).collect()
    }

    /// The current snapshot, for inspection (tests, admin).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let drain_timeout = self.snapshot.load().config.server.drain_timeout;

        let mut accept_loops = Vec::new();
        for (runtime, listener) in self.listeners {
            let snapshot = self.snapshot.clone();
            let stop = stop_accepting.clone();
            let hard = hard_stop.clone();
            let tracker = tasks.clone();
            accept_loops.push(tokio::spawn(accept_loop(
                listener, runtime, snapshot, stop, hard, tracker,
            )));
        }

        shutdown.await;
        tracing::info!(
            "shutting down: no new connections, draining for up to {:?}",
            drain_timeout
        );
        stop_accepting.cancel();
        for handle in accept_loops {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "accept loop ended abnormally");
            }
        }
        tasks.close();
        if tokio::time::timeout(drain_timeout, tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "drain deadline passed; closing remaining connections"
            );
            hard_stop.cancel();
            tasks.wait().await;
        }
        tracing::info!("shutdown complete");
    }
}

async fn accept_loop(
    listener: TcpListener,
    runtime: Arc<ListenerRuntime>,
    snapshot: SharedSnapshot,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
) {
    let local = listener.local_addr().ok();
    if let Some(addr) = local {
        tracing::info!(listener = %runtime.name, %addr, "listening");
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of
                // spinning; the error is the operator's to see.
                tracing::error!(listener = %runtime.name, error = %e, "accept failed; pausing accepts for 100ms");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on client connection");
        }
        let trusted = {
            let snap = snapshot.load();
            let ip = peer.ip().to_canonical();
            snap.config.server.trusted_proxies.iter().any(|net| net.contains(&ip))
        };
        let info = Arc::new(conn::ConnInfo {
            peer,
            forwarded: crate::forwarding::Peer::new(peer.ip()),
            local: local.unwrap_or(peer),
            trusted,
            tasks: tasks.clone(),
            hard_stop: hard_stop.clone(),
        });
        tasks.spawn(conn::serve(
            stream,
            info,
            runtime.clone(),
            snapshot.clone(),
            stop.clone(),
        ));
    }
    // Dropping the listener here closes the socket: new connections are
    // refused from now on.
    drop(listener);
}
