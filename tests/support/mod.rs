//! Test support: in-process origins and proxies on `127.0.0.1:0`, and
//! clients for HTTP/1.1, HTTP/2 and raw bytes.
//!
//! Readiness is never waited for by the clock: an origin or proxy is bound
//! before its address is returned.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never: Infallible| match never {}).boxed()
}

pub fn text(status: u16, body: &str) -> Response<TestBody> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r
}

/// Which protocols an origin speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    H2,
}

/// A running origin with counters.
pub struct Origin {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl Origin {
    /// Stops listening and cuts every open connection, like a crash.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Starts an HTTP/1.1 origin answering with `handler`.
pub async fn origin<F, Fut>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    origin_with(Proto::Http1, handler).await
}

pub async fn origin_with<F, Fut>(proto: Proto, handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    origin_on("127.0.0.1:0".parse().expect("addr"), proto, handler).await
}

/// An origin on a given address (to bring a killed one back on its port).
pub async fn origin_on<F, Fut>(bind: SocketAddr, proto: Proto, handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind(bind).await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let (c, r) = (connections.clone(), requests.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let accept_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = accept_stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let r = r.clone();
            let conn_stop = accept_stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let builder = match proto {
                    Proto::Http1 => builder.http1_only(),
                    Proto::H2 => builder.http2_only(),
                };
                tokio::select! {
                    _ = conn_stop.cancelled() => {}
                    _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service) => {}
                }
            });
        }
    });
    Origin {
        addr,
        connections,
        requests,
        stop,
    }
}

/// An origin below HTTP: reads each request head, writes `reply` (any
/// bytes, even none) and closes. Counts the heads it read.
pub async fn raw_origin(reply: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(AtomicUsize::new(0));
    let counter = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(reply).await;
            });
        }
    });
    (addr, heads)
}

/// An origin that holds every request until `release` is sent `true` (or
/// dropped), then answers `200 released`.
pub async fn held_origin() -> (Origin, tokio::sync::watch::Sender<bool>) {
    let (release, released) = tokio::sync::watch::channel(false);
    let origin = origin(move |_| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            text(200, "released")
        }
    })
    .await;
    (origin, release)
}

/// An origin that describes the request it received: the first line is
/// `METHOD TARGET VERSION`, then one `name: value` line per header, then a
/// blank line and the request body.
pub async fn echo_origin() -> Origin {
    origin(echo).await
}

pub async fn echo(req: Request<Incoming>) -> Response<TestBody> {
    let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        out.push_str(&format!("{}: {}\n", name, String::from_utf8_lossy(value.as_bytes())));
    }
    out.push('\n');
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    Response::new(full(bytes))
}

/// Parsed echo: the request line and headers (lowercase names, in order).
pub struct Echoed {
    pub line: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Echoed {
    pub fn parse(body: &[u8]) -> Echoed {
        let text = String::from_utf8_lossy(body).into_owned();
        let (head, rest) = text.split_once("\n\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let line = lines.next().unwrap_or("").to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        Echoed {
            line,
            headers,
            body: rest.to_owned(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A proxy running in this process.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub snapshot: portcullis::state::SharedSnapshot,
    /// Reloads the proxy's config.
    pub reloader: portcullis::server::Reloader,
    pub observe: Arc<portcullis::observe::Observe>,
    pub metrics_addr: Option<SocketAddr>,
    /// The admin API, when `[admin]` is on.
    pub admin_addr: Option<SocketAddr>,
    /// Applies changes as the admin API does.
    pub control: portcullis::server::Control,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// Starts shutdown and returns the task that finishes when drain is done.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("proxy already shut down")
    }

    pub async fn shutdown(mut self) {
        self.begin_shutdown().await.expect("proxy task");
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a proxy from TOML text (listeners should bind `127.0.0.1:0`).
pub async fn start_proxy(toml: &str) -> TestProxy {
    let config = portcullis::Config::from_toml(toml, "test").unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    run_proxy(portcullis::Proxy::bind(config).await.expect("bind proxy"))
}

/// Starts a proxy from a config file (a reload can read it again).
pub async fn start_proxy_file(path: &std::path::Path) -> TestProxy {
    let config = portcullis::Config::load(path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    run_proxy(portcullis::Proxy::bind(config).await.expect("bind proxy"))
}

/// Starts a proxy with logs and metrics made by the test.
pub async fn start_proxy_with(toml: &str, observe: portcullis::observe::Observe) -> TestProxy {
    let config = portcullis::Config::from_toml(toml, "test").unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    run_proxy(
        portcullis::Proxy::bind_with(config, Arc::new(observe))
            .await
            .expect("bind proxy"),
    )
}

fn run_proxy(proxy: portcullis::Proxy) -> TestProxy {
    let addr = proxy.local_addrs()[0];
    let snapshot = proxy.snapshot();
    let reloader = proxy.reloader();
    let observe = proxy.observe();
    let metrics_addr = proxy.metrics_addr();
    let admin_addr = proxy.admin_addr();
    let control = proxy.control();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    TestProxy {
        addr,
        snapshot,
        reloader,
        observe,
        metrics_addr,
        admin_addr,
        control,
        stop: Some(stop),
        task: Some(task),
    }
}

/// The one config template of the tests: a listener on `127.0.0.1:0`, one
/// route to the group `app`, and what a test adds to each part. Every test
/// file builds its configs from this.
#[derive(Clone, Default)]
pub struct Template {
    servers: Vec<String>,
    top: String,
    listener: String,
    route: String,
    group: String,
    extra: String,
}

impl Template {
    /// The group `app` with these servers.
    pub fn new(servers: &[SocketAddr]) -> Template {
        Template {
            servers: servers.iter().map(|s| format!("\"{s}\"")).collect(),
            ..Template::default()
        }
    }

    /// Sections written before the listener (`[server]`, `[protect]`).
    pub fn top(mut self, toml: &str) -> Template {
        self.top.push_str(toml);
        self.top.push('\n');
        self
    }

    /// Lines of the listener's table (and its sub-tables, last).
    pub fn listener(mut self, toml: &str) -> Template {
        self.listener.push_str(toml);
        self.listener.push('\n');
        self
    }

    /// Lines of the route's table (and its sub-tables, last).
    pub fn route(mut self, toml: &str) -> Template {
        self.route.push_str(toml);
        self.route.push('\n');
        self
    }

    /// Lines of `[upstreams.app]` (and its sub-tables, last).
    pub fn group(mut self, toml: &str) -> Template {
        self.group.push_str(toml);
        self.group.push('\n');
        self
    }

    /// Sections written after the group (`[cache]`, `[metrics]`, logs).
    pub fn extra(mut self, toml: &str) -> Template {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn build(&self) -> String {
        format!(
            "{}\n[[listeners]]\nbind = \"127.0.0.1:0\"\n{}\n[[routes]]\nupstream = \"app\"\n{}\n[upstreams.app]\nservers = [{}]\n{}\n{}",
            self.top,
            self.listener,
            self.route,
            self.servers.join(", "),
            self.group,
            self.extra
        )
    }
}

/// Spends a rate limit's burst of `burst` on `path` (each answered 200),
/// then checks the next request is refused with 429.
pub async fn spend_burst(addr: SocketAddr, path: &str, burst: usize) {
    for _ in 0..burst {
        assert_eq!(get(addr, path).await.status, StatusCode::OK);
    }
    assert_eq!(get(addr, path).await.status, StatusCode::TOO_MANY_REQUESTS);
}

/// The usual config: one listener, every path to the `app` group.
pub fn basic_config(upstream: SocketAddr) -> String {
    Template::new(&[upstream]).build()
}

pub async fn proxy_to(upstream: SocketAddr) -> TestProxy {
    start_proxy(&basic_config(upstream)).await
}

/// An HTTP/1.1 client connection (upgrades enabled).
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// An HTTP/2 prior-knowledge client connection.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A response with its body read.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn echoed(&self) -> Echoed {
        Echoed::parse(&self.body)
    }
}

pub async fn read(response: Response<Incoming>) -> Got {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("read body");
    let trailers = collected.trailers().cloned();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// GET `path` with `Host: test.local` on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str) -> Got {
    let mut c = h1(addr).await;
    let req = Request::get(path)
        .header("host", "test.local")
        .body(empty())
        .expect("request");
    read(c.send_request(req).await.expect("send")).await
}

/// Writes raw bytes and reads until the server closes (or 10 s pass, a
/// guard against a hung test, not a synchronization).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
pub fn status_of(raw_response: &str) -> u16 {
    raw_response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A port that refuses connections: bound (so no other process can take
/// it while the test runs) but never listening, so a connect to it is
/// answered with a reset. Keep the value alive as long as the address is
/// used.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = socket.local_addr().expect("addr");
    ClosedPort { addr, _socket: socket }
}

/// `send_request` after waiting for the connection to be ready: a client
/// connection that just finished a response may not have taken the next
/// request yet, and hyper refuses to queue it.
pub trait SendReady {
    fn send_ready(
        &mut self,
        req: Request<TestBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + Send + '_;
}

impl SendReady for hyper::client::conn::http1::SendRequest<TestBody> {
    async fn send_ready(&mut self, req: Request<TestBody>) -> Result<Response<Incoming>, hyper::Error> {
        self.ready().await?;
        self.send_request(req).await
    }
}

impl SendReady for hyper::client::conn::http2::SendRequest<TestBody> {
    async fn send_ready(&mut self, req: Request<TestBody>) -> Result<Response<Incoming>, hyper::Error> {
        self.ready().await?;
        self.send_request(req).await
    }
}

/// An HTTP/1.1 connection from source address `127.0.<third>.<last>`
/// (the whole 127.0.0.0/8 is local), or the error if the proxy closes it
/// before answering.
pub async fn h1_from_block(
    third: u8,
    last: u8,
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<TestBody>, hyper::Error> {
    let stream = tcp_from(std::net::IpAddr::from([127, 0, third, last]), addr).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A TCP connection to `addr` from `source`.
pub async fn tcp_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind source address");
    socket.connect(addr).await.expect("connect")
}

/// [`h1_from_block`] from `127.0.0.<last>`.
pub async fn h1_from(
    last: u8,
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<TestBody>, hyper::Error> {
    h1_from_block(0, last, addr).await
}

/// GET `/` on a new connection from `127.0.<third>.<last>`: the status, or
/// `None` when the proxy closed the connection without an answer.
pub async fn get_from_block(third: u8, last: u8, addr: SocketAddr) -> Option<StatusCode> {
    let mut c = h1_from_block(third, last, addr).await.ok()?;
    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
    Some(read(c.send_ready(req).await.ok()?).await.status)
}

/// [`get_from_block`] from `127.0.0.<last>`.
pub async fn get_from(last: u8, addr: SocketAddr) -> Option<StatusCode> {
    get_from_block(0, last, addr).await
}

/// The metrics text of a proxy with `[metrics]` on (no waiting: counters
/// at accept move before the connection is closed).
pub async fn metrics(proxy: &TestProxy) -> String {
    let mut m = h1(proxy.metrics_addr.expect("metrics")).await;
    let req = Request::get("/metrics")
        .header("host", "m")
        .body(empty())
        .expect("request");
    read(m.send_ready(req).await.expect("scrape")).await.text()
}

/// Waits for the next window of the proxy's attack detector to close
/// (on its own notification: no polling, bounded).
pub async fn next_window(proxy: &TestProxy) {
    let snapshot = proxy.snapshot.load_full();
    let adaptive = snapshot.adaptive.as_ref().expect("adaptive");
    let mut windows = adaptive.windows();
    let seen = *windows.borrow_and_update();
    let waited = tokio::time::timeout(std::time::Duration::from_secs(10), windows.wait_for(|n| *n > seen)).await;
    assert!(matches!(waited, Ok(Ok(_))), "no detector window closed within 10 s");
}

/// Gives the detector the quiet traffic it learns from (two requests a
/// window from a few addresses, 127.0.9.x) until it has learned.
pub async fn let_the_detector_learn(proxy: &TestProxy) {
    for i in 0..200u8 {
        let learning = proxy
            .snapshot
            .load()
            .adaptive
            .as_ref()
            .expect("adaptive")
            .state()
            .last
            .is_none_or(|v| v.learning);
        if !learning {
            return;
        }
        for k in 0..2 {
            get_from_block(9, 1 + (i + k) % 3, proxy.addr).await;
        }
        next_window(proxy).await;
    }
    panic!("the detector never finished learning");
}
