//! Attack scenarios against a release build of Portcullis, for
//! `bench/attack.sh`: each runs for a bounded time and reports how a
//! legitimate client fared and how many attack requests reached the origin.
//!
//! Sources are distinct loopback addresses: the legitimate client is
//! 127.0.0.3, attackers 127.0.1.x (floods), 127.0.2.x (slow clients),
//! flash-crowd browsers 127.0.3.x. The origin (in this process) tells them
//! apart by the address the proxy appends to `X-Forwarded-For`.
//!
//! The origin has a finite capacity (`ORIGIN_WORKERS` requests at once,
//! 2 ms each, `ATTACK_ORIGIN_MS` to change), so a flood can saturate it; it and the
//! legitimate client each run on a thread of their own, away from the
//! attackers' tasks.
//!
//! Usage: attack PORTCULLIS_BINARY [SECONDS_PER_SCENARIO]
//! (`ATTACK_SHEDDING=off` turns load shedding off, for comparison;
//! `ATTACK_ORIGIN_MS=0` makes the origin answer at once, without a limit)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "a benchmark harness fails loudly"
)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};

#[derive(Default)]
struct OriginCounts {
    legit: AtomicU64,
    attack: AtomicU64,
    crowd: AtomicU64,
}

/// Requests the origin works on at once, and how long each takes (2 ms
/// unless `ATTACK_ORIGIN_MS` says otherwise; 0: answer at once): a
/// capacity of about 4 / 2.5 ms = 1,600 requests/s (tokio's timer rounds
/// 2 ms up), below what the distributed flood sends.
const ORIGIN_WORKERS: usize = 4;

fn origin_service() -> Duration {
    let ms = std::env::var("ATTACK_ORIGIN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    Duration::from_millis(ms)
}

/// Runs `future` on a thread of its own (a current-thread runtime), so the
/// origin and the legitimate client are not scheduled behind the
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
/// once, `ORIGIN_SERVICE` each; the rest wait in line, as on a real
/// application server.
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
                    let counter = if client.starts_with("127.0.1.") || client.starts_with("127.0.2.") {
                        &counts.attack
                    } else if client.starts_with("127.0.3.") {
                        &counts.crowd
                    } else {
                        &counts.legit
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let (body, workers) = (body.clone(), workers.clone());
                    async move {
                        // Drain any request body before answering.
                        let _ = req.into_body().collect().await;
                        let _worker = workers.acquire().await;
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

/// The proxy process, its address, and attack mode as its log reports it.
struct Proxy(Child, SocketAddr, tokio::sync::watch::Receiver<bool>);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let addr = loop {
        let line = lines.next().expect("proxy exited").expect("stderr");
        if line.contains("listener=") {
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap_or("").parse().expect("address");
            }
        }
    };
    // Follow attack mode from the proxy's log, so the harness can wait for
    // calm between scenarios on the event, not on the clock.
    let (mode, attack) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("attack mode entered") {
                mode.send_replace(true);
            } else if line.contains("attack mode left") {
                mode.send_replace(false);
            }
        }
    });
    Proxy(child, addr, attack)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

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

/// One GET on a kept connection (reconnecting when it closed): the status,
/// or `None` when no answer came. With a cookie jar, a challenge (307 with
/// a cookie) is answered as a browser would: keep the cookie, ask again.
async fn get(
    conn: &mut Option<Sender>,
    source: IpAddr,
    proxy: SocketAddr,
    mut jar: Option<&mut Option<String>>,
    agent: &str,
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
        let mut req = Request::get("/").header("host", "site").header("user-agent", agent);
        if let Some(Some(cookie)) = jar.as_deref() {
            req = req.header("cookie", cookie.as_str());
        }
        let req = req.body(Empty::new()).ok()?;
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
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        let _ = response.into_body().collect().await;
        match (status, set_cookie, jar.as_deref_mut()) {
            (307, Some(cookie), Some(slot)) => *slot = Some(cookie),
            _ => return Some(status),
        }
    }
    None
}

/// What the legitimate client saw.
struct Legit {
    sent: u64,
    ok: u64,
    /// Milliseconds per request.
    latencies: Vec<f64>,
    /// Each failure: a status, "no answer" or "timeout".
    failures: Vec<String>,
}

/// The legitimate client: `rate` requests per second from 127.0.0.3 until
/// `stop`.
async fn legit(proxy: SocketAddr, rate: u64, stop: Arc<AtomicBool>) -> Legit {
    let source = IpAddr::from([127, 0, 0, 3]);
    let mut conn = None;
    let mut jar = None;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
    let (mut sent, mut ok, mut latencies, mut failures) = (0, 0, Vec::new(), Vec::new());
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let started = Instant::now();
        sent += 1;
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            get(&mut conn, source, proxy, Some(&mut jar), "Mozilla/5.0 (legit)"),
        )
        .await;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        match answer {
            Ok(Some(200)) => ok += 1,
            Ok(Some(status)) => failures.push(status.to_string()),
            Ok(None) => failures.push("no answer".into()),
            Err(_) => {
                failures.push("timeout".into());
                conn = None;
            }
        }
    }
    Legit {
        sent,
        ok,
        latencies,
        failures,
    }
}

/// Back-to-back requests from `source` until `stop`: requests sent.
async fn flood(proxy: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> u64 {
    let mut conn = None;
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        sent += 1;
        if tokio::time::timeout(Duration::from_secs(2), get(&mut conn, source, proxy, None, "flood/1.0"))
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
        if tokio::time::timeout(Duration::from_secs(2), get(&mut conn, source, proxy, None, "flood/1.0"))
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
/// it: slowloris (a head never ended) and slow POST (a body never
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

/// Slow POST: a body of 1 MB declared, sent one byte every 500 ms.
async fn slow_post(proxy: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> u64 {
    slow_client(
        proxy,
        source,
        b"POST / HTTP/1.1\r\nHost: site\r\nContent-Length: 1000000\r\n\r\n",
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
    let mut jar = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let (mut sent, mut bad) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        sent += 1;
        let agent = format!("Mozilla/5.0 (browser {})", phase % 37);
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            get(&mut conn, source, proxy, Some(&mut jar), &agent),
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

struct Row {
    scenario: &'static str,
    legit: Legit,
    attack_sent: String,
    attack_at_origin: u64,
    note: String,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let binary = args.next().unwrap_or_else(|| "target/release/portcullis".into());
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let counts = Arc::new(OriginCounts::default());
    let origin = origin(counts.clone()).await;
    // ATTACK_SHEDDING=off runs the same scenarios without load shedding,
    // for comparison.
    let shedding = std::env::var("ATTACK_SHEDDING").unwrap_or_else(|_| "enforce".into());
    let config = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
upstream = "app"
challenge = "attack"
[routes.rate_limit]
rate = "20/s"
burst = 40
[upstreams.app]
servers = ["{origin}"]
pool_size = 256
[timeouts]
header_read = "5s"
[protect]
max_connections_per_ip = 64
min_body_rate = "1KiB/s"
body_rate_grace = "2s"
[protect.adaptive]
mode = "enforce"
window = "1s"
min_rate = 50
enter_after = 2
leave_after = 3
[protect.bans]
[protect.load_shedding]
mode = "{shedding}"
min_limit = 4
"#
    );
    let proxy = start_proxy(&binary, &config, dir.path());
    let addr = proxy.1;
    let attack_mode = proxy.2.clone();
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
    // Browser-like, well under the route's 20/s limit.
    let legit_rate = 10;
    let mut rows = Vec::new();
    let run_for = Duration::from_secs(seconds);

    type Attack = fn(SocketAddr, Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>>;
    let scenarios: [(&str, Option<Attack>); 5] = [
        ("no attack (baseline)", None),
        (
            "flood: 8 sources, back to back",
            Some(|addr, stop| {
                (1..=8u8)
                    .map(|i| tokio::spawn(flood(addr, IpAddr::from([127, 0, 1, i]), stop.clone())))
                    .collect()
            }),
        ),
        (
            "distributed flood: 200 sources x 15 req/s",
            Some(|addr, stop| {
                (0..200u16)
                    .map(|i| {
                        let source = IpAddr::from([127, 0, 1, 10 + i as u8]);
                        tokio::spawn(paced_bot(addr, source, 15, stop.clone()))
                    })
                    .collect()
            }),
        ),
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
            "slow POST: 200 connections",
            Some(|addr, stop| {
                (0..200u16)
                    .map(|i| {
                        let source = IpAddr::from([127, 0, 2, 9 + (i % 8) as u8]);
                        tokio::spawn(slow_post(addr, source, stop.clone()))
                    })
                    .collect()
            }),
        ),
    ];
    for (name, attack) in scenarios {
        calm().await;
        let before = counts.attack.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let attackers = attack.map(|a| a(addr, stop.clone())).unwrap_or_default();
        let legit_task = on_own_thread(legit(addr, legit_rate, stop.clone()));
        tokio::time::sleep(run_for).await;
        stop.store(true, Ordering::Relaxed);
        let legit_result = legit_task.await.expect("legit");
        let mut sent = 0;
        for a in attackers {
            // Slow clients may sit in a sleep or a write: bounded wait.
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), a).await {
                sent += n;
            }
        }
        let at_origin = counts.attack.load(Ordering::Relaxed) - before;
        rows.push(Row {
            scenario: name,
            legit: legit_result,
            attack_sent: if name.starts_with("no attack") {
                "-".into()
            } else if name.contains("flood") {
                format!("{sent} requests")
            } else {
                format!("{sent} connections")
            },
            attack_at_origin: at_origin,
            note: String::new(),
        });
    }

    // Flash crowd: 200 browsers at 2 requests per second each, with the
    // legitimate client beside them.
    calm().await;
    let stop = Arc::new(AtomicBool::new(false));
    let browsers: Vec<_> = (0..200u16)
        .map(|i| {
            let source = IpAddr::from([127, 0, 3, 1 + (i % 250) as u8]);
            tokio::spawn(browser(addr, source, u64::from(i) * 500 / 200, stop.clone()))
        })
        .collect();
    let legit_task = on_own_thread(legit(addr, legit_rate, stop.clone()));
    tokio::time::sleep(run_for).await;
    stop.store(true, Ordering::Relaxed);
    let legit_result = legit_task.await.expect("legit");
    let (mut crowd_sent, mut crowd_bad) = (0, Vec::new());
    for b in browsers {
        if let Ok(Ok((s, bad))) = tokio::time::timeout(Duration::from_secs(3), b).await {
            crowd_sent += s;
            crowd_bad.extend(bad);
        }
    }
    rows.push(Row {
        scenario: "flash crowd: 200 sources x 2 req/s",
        legit: legit_result,
        attack_sent: "-".into(),
        attack_at_origin: 0,
        note: if crowd_bad.is_empty() {
            format!("crowd: {crowd_sent} requests, 0 refused or failed")
        } else {
            format!(
                "crowd: {crowd_sent} requests, {} refused or failed ({})",
                crowd_bad.len(),
                crowd_bad.join(", ")
            )
        },
    });

    println!(
        "| scenario | legit success | legit p50 ms | legit p99 ms | attack sent | attack requests at origin | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let Legit {
            sent,
            ok,
            mut latencies,
            failures,
        } = row.legit;
        let mut note = row.note;
        if !failures.is_empty() {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&format!("legit failures: {}", failures.join(", ")));
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
            note
        );
    }
    drop(proxy);
}
