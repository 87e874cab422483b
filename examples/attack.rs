//! Attack scenarios against a release build of Portcullis, for
//! `bench/attack.sh`: each runs for a bounded time and reports how the
//! legitimate traffic fared and how many attack requests reached the
//! origin, with every step of the mitigation ladder enforced.
//!
//! Sources are distinct loopback addresses: the legitimate traffic comes
//! from 127.0.0.3 (a browser-like client with a session cookie, most of
//! the requests) and 127.0.0.4-8 (a few lighter ones); attackers are
//! 127.0.1.x (floods) and 127.0.2.x (slow clients); flash-crowd browsers
//! 127.0.3.x. The origin (in this process) tells them apart by the address
//! the proxy appends to `X-Forwarded-For`.
//!
//! The origin is scarce: `ORIGIN_WORKERS` requests at once, each holding
//! its worker while its body arrives and then 2 ms (`ATTACK_ORIGIN_MS`),
//! like a thread-per-request application server, so a flood or a slow
//! body that reaches it takes capacity from everyone. It and the
//! legitimate clients each run on a thread of their own, away from the
//! attackers' tasks.
//!
//! Usage: attack PORTCULLIS_BINARY [SECONDS_PER_SCENARIO]
//! (`ATTACK_MODE=shadow` runs every ladder step in shadow mode instead;
//! `ATTACK_SHEDDING=off` turns load shedding off; `ATTACK_ORIGIN_MS=0`
//! makes the origin answer at once, without a limit; `ATTACK_TRACE=20`
//! prints each legitimate request slower than 20 ms)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "a benchmark harness fails loudly"
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};

/// Attack requests that reached the origin, and those whose body the
/// origin received in full.
#[derive(Default)]
struct OriginCounts {
    attack: AtomicU64,
    attack_bodies: AtomicU64,
}

/// Requests the origin works on at once: with 2 ms each, a capacity of
/// about 4 / 2.5 ms = 1,600 requests/s (tokio's timer rounds 2 ms up),
/// below what the distributed flood sends.
const ORIGIN_WORKERS: usize = 4;

fn origin_service() -> Duration {
    let ms = std::env::var("ATTACK_ORIGIN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    Duration::from_millis(ms)
}

/// Runs `future` on a thread of its own (a current-thread runtime), so the
/// origin and the legitimate clients are not scheduled behind the
/// attackers' tasks: what they measure is the proxy, not this harness.
fn on_own_thread<F>(future: F) -> tokio::sync::oneshot::Receiver<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = done.send(runtime.block_on(future));
    });
    result
}

/// The origin, on its own thread: at most `ORIGIN_WORKERS` requests at
/// once; a request takes its worker before its body is read.
async fn origin(counts: Arc<OriginCounts>) -> SocketAddr {
    let (bound, addr) = tokio::sync::oneshot::channel();
    // The origin runs until the process exits.
    drop(on_own_thread(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let _ = bound.send(listener.local_addr().expect("addr"));
        let body = Bytes::from(vec![b'x'; 1024]);
        let service_time = origin_service();
        let workers = Arc::new(tokio::sync::Semaphore::new(if service_time.is_zero() {
            tokio::sync::Semaphore::MAX_PERMITS
        } else {
            ORIGIN_WORKERS
        }));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (counts, body, workers) = (counts.clone(), body.clone(), workers.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let client = req
                        .headers()
                        .get("x-forwarded-for")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit(',').next())
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    let attack = client.starts_with("127.0.1.") || client.starts_with("127.0.2.");
                    if attack {
                        counts.attack.fetch_add(1, Ordering::Relaxed);
                    }
                    let (body, workers, counts) = (body.clone(), workers.clone(), counts.clone());
                    async move {
                        let _worker = workers.acquire().await;
                        let has_body = req.headers().contains_key("content-length")
                            || req.headers().contains_key("transfer-encoding");
                        if req.into_body().collect().await.is_ok() && attack && has_body {
                            counts.attack_bodies.fetch_add(1, Ordering::Relaxed);
                        }
                        if !service_time.is_zero() {
                            tokio::time::sleep(service_time).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }));
    addr.await.expect("origin bound")
}

/// What the proxy's log said, counted by a thread that reads its stderr.
#[derive(Default)]
struct LogCounts {
    lines: AtomicU64,
    attack_entered: AtomicU64,
}

/// The proxy process, its addresses, attack mode as its log reports it,
/// and its log counts.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    attack: tokio::sync::watch::Receiver<bool>,
    log: Arc<LogCounts>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn address_after(line: &str, key: &str) -> Option<SocketAddr> {
    line.split(key).nth(1)?.split_whitespace().next()?.parse().ok()
}

fn start_proxy(binary: &str, config: &str, dir: &std::path::Path) -> Proxy {
    let path = dir.join("attack.toml");
    std::fs::write(&path, config).expect("write config");
    let mut child = Command::new(binary)
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portcullis");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let (mut addr, mut metrics) = (None, None);
    while addr.is_none() || metrics.is_none() {
        let line = lines.next().expect("proxy exited").expect("stderr");
        if line.contains("metrics endpoint listening") {
            metrics = address_after(&line, "addr=");
        } else if line.contains("listener=") && line.contains(" listening") {
            addr = address_after(&line, "addr=");
        }
    }
    // Follow attack mode and count lines from the proxy's log, so the
    // harness can wait for calm between scenarios on the event, not on
    // the clock, and say how much the proxy wrote.
    let (mode, attack) = tokio::sync::watch::channel(false);
    let log = Arc::new(LogCounts::default());
    let counts = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            counts.lines.fetch_add(1, Ordering::Relaxed);
            if line.contains("attack mode entered") {
                counts.attack_entered.fetch_add(1, Ordering::Relaxed);
                mode.send_replace(true);
            } else if line.contains("attack mode left") {
                mode.send_replace(false);
            }
        }
    });
    Proxy {
        child,
        addr: addr.expect("listener address"),
        metrics: metrics.expect("metrics address"),
        attack,
        log,
    }
}

/// The proxy's counters that say what protection did: bans made,
/// connections closed by reason and protection actions by kind (summed
/// over routes).
async fn protection_counters(metrics: SocketAddr) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(stream) = tokio::net::TcpStream::connect(metrics).await else {
        return out;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return out;
    };
    tokio::spawn(conn);
    let req = Request::get("/metrics")
        .header("host", "metrics")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let Ok(response) = sender.send_request(req).await else {
        return out;
    };
    let Ok(body) = response.into_body().collect().await else {
        return out;
    };
    for line in String::from_utf8_lossy(&body.to_bytes()).lines() {
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        let Some(value) = value else { continue };
        let key = if line.starts_with("portcullis_bans_total ") {
            "bans made".to_owned()
        } else if line.starts_with("portcullis_connections_rejected_total{") {
            match line.split("reason=\"").nth(1).and_then(|r| r.split('"').next()) {
                Some(reason) => format!("connections closed ({reason})"),
                None => continue,
            }
        } else if line.starts_with("portcullis_protection_actions_total{") {
            match line.split("action=\"").nth(1).and_then(|r| r.split('"').next()) {
                Some(action) => action.to_owned(),
                None => continue,
            }
        } else {
            continue;
        };
        *out.entry(key).or_default() += value as u64;
    }
    out
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect_from(source: IpAddr, proxy: SocketAddr) -> Option<Sender> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    let stream = socket.connect(proxy).await.ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

/// A client's cookies, kept as a browser keeps them.
#[derive(Default)]
struct Jar(Vec<String>);

impl Jar {
    fn keep(&mut self, set_cookie: &str) {
        let Some(pair) = set_cookie.split(';').next() else {
            return;
        };
        let name = pair.split('=').next().unwrap_or("");
        self.0.retain(|c| c.split('=').next() != Some(name));
        self.0.push(pair.trim().to_owned());
    }

    fn header(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join("; "))
    }
}

/// One request on a kept connection (reconnecting when it closed): the
/// status, or `None` when no answer came. With a cookie jar, a challenge
/// (307 with a cookie) is answered as a browser would: keep the cookie,
/// ask again.
async fn send(
    conn: &mut Option<Sender>,
    source: IpAddr,
    proxy: SocketAddr,
    mut jar: Option<&mut Jar>,
    agent: &str,
    body: Option<&Bytes>,
) -> Option<u16> {
    for _ in 0..2 {
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = connect_from(source, proxy).await;
        }
        let sender = conn.as_mut()?;
        if sender.ready().await.is_err() {
            *conn = None;
            return None;
        }
        let mut req = match body {
            Some(_) => Request::post("/form"),
            None => Request::get("/"),
        }
        .header("host", "site")
        .header("user-agent", agent);
        if let Some(cookie) = jar.as_deref().and_then(Jar::header) {
            req = req.header("cookie", cookie);
        }
        let req = req.body(Full::new(body.cloned().unwrap_or_default())).ok()?;
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                *conn = None;
                return None;
            }
        };
        let status = response.status().as_u16();
        let set_cookie = response
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let _ = response.into_body().collect().await;
        match (status, set_cookie, jar.as_deref_mut()) {
            (307, Some(cookie), Some(jar)) => jar.keep(&cookie),
            _ => return Some(status),
        }
    }
    None
}

async fn get(conn: &mut Option<Sender>, source: IpAddr, proxy: SocketAddr, agent: &str) -> Option<u16> {
    send(conn, source, proxy, None, agent, None).await
}

/// `ATTACK_TRACE=MS`: each legitimate request slower than MS
/// milliseconds is printed to stderr, with when it was answered.
fn trace_slower_than() -> Option<f64> {
    std::env::var("ATTACK_TRACE").ok()?.parse().ok()
}

/// What the legitimate clients saw.
#[derive(Default)]
struct Legit {
    sent: u64,
    ok: u64,
    /// Milliseconds per request.
    latencies: Vec<f64>,
    /// Each failure: a status, "no answer" or "timeout".
    failures: Vec<String>,
}

impl Legit {
    fn add(&mut self, other: Legit) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.latencies.extend(other.latencies);
        self.failures.extend(other.failures);
    }
}

/// One legitimate client: `rate` requests per second from `source` until
/// `stop`, with a session cookie; every fifth request of a client that
/// `posts` is a 1.5 KB form.
async fn legit_client(proxy: SocketAddr, source: IpAddr, rate: u64, posts: bool, stop: Arc<AtomicBool>) -> Legit {
    let since = Instant::now();
    let trace = trace_slower_than();
    let mut conn = None;
    let mut jar = Jar::default();
    jar.keep(&format!("session={source}"));
    let agent = format!("Mozilla/5.0 (legit {source})");
    let form = Bytes::from(vec![b'f'; 1500]);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut seen = Legit::default();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let started = Instant::now();
        seen.sent += 1;
        let body = (posts && seen.sent % 5 == 0).then_some(&form);
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            send(&mut conn, source, proxy, Some(&mut jar), &agent, body),
        )
        .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        seen.latencies.push(ms);
        if trace.is_some_and(|limit| ms > limit) {
            eprintln!(
                "  {source}: {ms:.1} ms, answered {:.3} s into the scenario",
                since.elapsed().as_secs_f64()
            );
        }
        match answer {
            Ok(Some(200)) => seen.ok += 1,
            Ok(Some(status)) => seen.failures.push(status.to_string()),
            Ok(None) => seen.failures.push("no answer".into()),
            Err(_) => {
                seen.failures.push("timeout".into());
                conn = None;
            }
        }
    }
    seen
}

/// The legitimate traffic, on a thread of its own: 45 requests/s from one
/// browser-like client with a session cookie (127.0.0.3; a fifth of its
/// requests are form posts) and 2/s from each of five more (127.0.0.4-8),
/// 55 requests/s in all: a little above `min_rate` (50).
fn legit_traffic(proxy: SocketAddr, stop: Arc<AtomicBool>) -> tokio::sync::oneshot::Receiver<Legit> {
    on_own_thread(async move {
        let mut clients = vec![tokio::spawn(legit_client(
            proxy,
            IpAddr::from([127, 0, 0, 3]),
            45,
            true,
            stop.clone(),
        ))];
        for last in 4..=8u8 {
            clients.push(tokio::spawn(legit_client(
                proxy,
                IpAddr::from([127, 0, 0, last]),
                2,
                false,
                stop.clone(),
            )));
        }
        let mut all = Legit::default();
        for client in clients {
            all.add(client.await.expect("legit client"));
        }
        all
    })
}

/// Back-to-back requests from `source` until `stop`: requests sent.
async fn flood(proxy: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> u64 {
    let mut conn = None;
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        sent += 1;
        if tokio::time::timeout(Duration::from_secs(2), get(&mut conn, source, proxy, "flood/1.0"))
            .await
            .is_err()
        {
            conn = None;
        }
    }
    sent
}

/// A bot of a distributed flood: `rate` requests per second (under the
/// per-IP limit), one signature, no cookies.
async fn paced_bot(proxy: SocketAddr, source: IpAddr, rate: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut conn = None;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        sent += 1;
        if tokio::time::timeout(Duration::from_secs(2), get(&mut conn, source, proxy, "flood/1.0"))
            .await
            .is_err()
        {
            conn = None;
        }
    }
    sent
}

/// Opens raw connections from `source` one after another until `stop`,
/// each sending `head` and then `drip` every `every` until the proxy cuts
/// it: slowloris (a head never ended) and slow uploads (a body never
/// finished). Returns the connections opened.
async fn slow_client(
    proxy: SocketAddr,
    source: IpAddr,
    head: &'static [u8],
    drip: &'static [u8],
    every: Duration,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut opened = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = TcpSocket::new_v4() else { return opened };
        if socket.bind(SocketAddr::new(source, 0)).is_err() {
            return opened;
        }
        let Ok(mut stream) = socket.connect(proxy).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        opened += 1;
        if stream.write_all(head).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(every).await;
            if stream.write_all(drip).await.is_err() {
                break;
            }
        }
    }
    opened
}

/// Slowloris: a request head sent one header line per second, never ended.
async fn slowloris(proxy: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> u64 {
    slow_client(
        proxy,
        source,
        b"GET / HTTP/1.1\r\nHost: site\r\n",
        b"X-Slow: 1\r\n",
        Duration::from_secs(1),
        stop,
    )
    .await
}

/// A slow form upload: a body of 2 KB declared, sent one byte every 100 ms.
async fn slow_upload(proxy: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> u64 {
    slow_client(
        proxy,
        source,
        b"POST /form HTTP/1.1\r\nHost: site\r\nContent-Length: 2000\r\n\r\n",
        b"x",
        Duration::from_millis(100),
        stop,
    )
    .await
}

/// Slow POST of a large file: 1 MB declared (above
/// `limits.buffer_request_body`, so it streams), one byte every 500 ms.
async fn slow_post(proxy: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> u64 {
    slow_client(
        proxy,
        source,
        b"POST /upload HTTP/1.1\r\nHost: site\r\nContent-Length: 1000000\r\n\r\n",
        b"x",
        Duration::from_millis(500),
        stop,
    )
    .await
}

/// A browser of the flash crowd: 2 requests per second from its address;
/// returns (sent, refused or failed).
async fn browser(proxy: SocketAddr, source: IpAddr, phase: u64, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    tokio::time::sleep(Duration::from_millis(phase)).await;
    let mut conn = None;
    let mut jar = Jar::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let (mut sent, mut bad) = (0, Vec::new());
    let agent = format!("Mozilla/5.0 (browser {})", phase % 37);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        sent += 1;
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            send(&mut conn, source, proxy, Some(&mut jar), &agent, None),
        )
        .await;
        match answer {
            Ok(Some(200)) => {}
            Ok(Some(status)) => bad.push(status.to_string()),
            Ok(None) => bad.push("no answer".into()),
            Err(_) => bad.push("timeout".into()),
        }
    }
    (sent, bad)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Counts failures by kind: "429 x3, timeout x1".
fn summarise(failures: &[String]) -> String {
    let mut by_kind = BTreeMap::<&str, usize>::new();
    for f in failures {
        *by_kind.entry(f.as_str()).or_default() += 1;
    }
    by_kind
        .iter()
        .map(|(kind, n)| format!("{kind} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Row {
    scenario: &'static str,
    legit: Legit,
    attack_sent: String,
    attack_at_origin: String,
    notes: Vec<String>,
}

/// What an attack starts: its tasks, and whether it counts requests or
/// connections.
type Attack = fn(SocketAddr, Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>>;

fn distributed_flood(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..200u16)
        .map(|i| {
            let source = IpAddr::from([127, 0, 1, 10 + i as u8]);
            tokio::spawn(paced_bot(addr, source, 15, stop.clone()))
        })
        .collect()
}

fn config(origin: SocketAddr) -> String {
    let mode = std::env::var("ATTACK_MODE").unwrap_or_else(|_| "enforce".into());
    let shedding = std::env::var("ATTACK_SHEDDING").unwrap_or_else(|_| mode.clone());
    format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[[routes]]
upstream = "app"
challenge = "attack"
[routes.rate_limit]
rate = "60/s"
burst = 120
[upstreams.app]
servers = ["{origin}"]
pool_size = 256
[timeouts]
header_read = "5s"
body_read = "5s"
[protect]
max_connections_per_ip = 64
min_body_rate = "1KiB/s"
body_rate_grace = "2s"
[protect.adaptive]
mode = "{mode}"
window = "1s"
learn = "10s"
trust_after = "10s"
min_rate = 50
enter_after = 2
leave_after = 3
[protect.bans]
mode = "{mode}"
duration = "1m"
[protect.load_shedding]
mode = "{shedding}"
min_limit = 4
"#
    )
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let binary = args.next().unwrap_or_else(|| "target/release/portcullis".into());
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let counts = Arc::new(OriginCounts::default());
    let origin = origin(counts.clone()).await;
    // One fresh process for every scenario: the first (a cold start) is
    // also the warm-up of the others, which meet a proxy that has learned
    // its normal traffic (learn = 10s) and trusts its regular clients
    // (seen in two 10 s generations).
    let proxy = start_proxy(&binary, &config(origin), dir.path());
    let addr = proxy.addr;
    let attack_mode = proxy.attack.clone();
    // Waits (bounded) until attack mode from the previous scenario is
    // over, so each scenario starts from calm.
    let calm = move || {
        let mut attack_mode = attack_mode.clone();
        async move {
            if tokio::time::timeout(Duration::from_secs(60), attack_mode.wait_for(|on| !on))
                .await
                .is_err()
            {
                eprintln!("attack mode still on after 60 s; going on");
            }
        }
    };
    let mut rows = Vec::new();
    let run_for = Duration::from_secs(seconds);

    let scenarios: [(&str, Option<Attack>); 9] = [
        ("cold start: 55 req/s from 6 addresses on a fresh process", None),
        ("no attack (baseline)", None),
        (
            "flood: 8 sources, back to back",
            Some(|addr, stop| {
                (1..=8u8)
                    .map(|i| tokio::spawn(flood(addr, IpAddr::from([127, 0, 1, i]), stop.clone())))
                    .collect()
            }),
        ),
        ("distributed flood: 200 sources x 15 req/s", Some(distributed_flood)),
        (
            "slowloris: 200 connections",
            Some(|addr, stop| {
                (0..200u16)
                    .map(|i| {
                        let source = IpAddr::from([127, 0, 2, 1 + (i % 8) as u8]);
                        tokio::spawn(slowloris(addr, source, stop.clone()))
                    })
                    .collect()
            }),
        ),
        (
            "slow uploads: 300 connections from 30 addresses, 2 KB bodies a byte at a time",
            Some(|addr, stop| {
                (0..300u16)
                    .map(|i| {
                        let source = IpAddr::from([127, 0, 2, 20 + (i % 30) as u8]);
                        tokio::spawn(slow_upload(addr, source, stop.clone()))
                    })
                    .collect()
            }),
        ),
        (
            "slow POST: 200 connections, 1 MB bodies",
            Some(|addr, stop| {
                (0..200u16)
                    .map(|i| {
                        let source = IpAddr::from([127, 0, 2, 9 + (i % 8) as u8]);
                        tokio::spawn(slow_post(addr, source, stop.clone()))
                    })
                    .collect()
            }),
        ),
        (
            "the distributed flood again, same addresses, its bans expired",
            Some(distributed_flood),
        ),
        ("flash crowd: 200 new browsers x 2 req/s", None),
    ];
    for (name, attack) in scenarios {
        calm().await;
        let before = (
            counts.attack.load(Ordering::Relaxed),
            counts.attack_bodies.load(Ordering::Relaxed),
            proxy.log.lines.load(Ordering::Relaxed),
            proxy.log.attack_entered.load(Ordering::Relaxed),
            protection_counters(proxy.metrics).await,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let attackers = attack.map(|a| a(addr, stop.clone())).unwrap_or_default();
        let crowd = name.starts_with("flash crowd").then(|| {
            (0..200u16)
                .map(|i| {
                    let source = IpAddr::from([127, 0, 3, 1 + (i % 250) as u8]);
                    tokio::spawn(browser(addr, source, u64::from(i) * 500 / 200, stop.clone()))
                })
                .collect::<Vec<_>>()
        });
        let legit_task = legit_traffic(addr, stop.clone());
        let started = Instant::now();
        if trace_slower_than().is_some() {
            eprintln!("{name}:");
        }
        tokio::time::sleep(run_for).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let legit_result = legit_task.await.expect("legit");
        let mut sent = 0;
        for a in attackers {
            // Slow clients may sit in a sleep or a write: bounded wait.
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), a).await {
                sent += n;
            }
        }
        let mut notes = Vec::new();
        if let Some(browsers) = crowd {
            let (mut crowd_sent, mut crowd_bad) = (0, Vec::new());
            for b in browsers {
                if let Ok(Ok((s, bad))) = tokio::time::timeout(Duration::from_secs(3), b).await {
                    crowd_sent += s;
                    crowd_bad.extend(bad);
                }
            }
            notes.push(if crowd_bad.is_empty() {
                format!("crowd: {crowd_sent} requests, 0 refused or failed")
            } else {
                format!(
                    "crowd: {crowd_sent} requests, {} refused or failed ({})",
                    crowd_bad.len(),
                    summarise(&crowd_bad)
                )
            });
        }
        let at_origin = counts.attack.load(Ordering::Relaxed) - before.0;
        let bodies = counts.attack_bodies.load(Ordering::Relaxed) - before.1;
        let lines = proxy.log.lines.load(Ordering::Relaxed) - before.2;
        let entered = proxy.log.attack_entered.load(Ordering::Relaxed) - before.3;
        let after = protection_counters(proxy.metrics).await;
        notes.push(if entered == 0 {
            "attack mode not entered".into()
        } else {
            "attack mode entered".into()
        });
        let actions: Vec<String> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.4.get(k).copied().unwrap_or(0);
                (d > 0).then(|| format!("{k} {d}"))
            })
            .collect();
        if !actions.is_empty() {
            notes.push(format!("proxy: {}", actions.join(", ")));
        }
        notes.push(format!("{:.1} proxy log lines/s", lines as f64 / elapsed));
        let attack_at_origin = if attack.is_none() {
            "-".into()
        } else if name.starts_with("slow up") || name.starts_with("slow POST") {
            format!("{at_origin} (bodies complete: {bodies})")
        } else {
            at_origin.to_string()
        };
        rows.push(Row {
            scenario: name,
            legit: legit_result,
            attack_sent: match attack {
                None => "-".into(),
                Some(_) if name.contains("flood") => format!("{sent} requests"),
                Some(_) => format!("{sent} connections"),
            },
            attack_at_origin,
            notes,
        });
    }

    println!("| scenario | legitimate success | p50 ms | p99 ms | attack sent | attack requests at origin | notes |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let Legit {
            sent,
            ok,
            mut latencies,
            failures,
        } = row.legit;
        let mut notes = row.notes;
        if !failures.is_empty() {
            notes.push(format!("legitimate failures: {}", summarise(&failures)));
        }
        latencies.sort_by(f64::total_cmp);
        println!(
            "| {} | {:.2}% ({ok}/{sent}) | {:.2} | {:.2} | {} | {} | {} |",
            row.scenario,
            if sent == 0 {
                0.0
            } else {
                ok as f64 * 100.0 / sent as f64
            },
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            row.attack_sent,
            row.attack_at_origin,
            notes.join("; ")
        );
    }
    drop(proxy);
}
