//! The later steps of the protection ladder over real sockets: origin load
//! shedding, temporary bans, per-listener IP lists, the PROXY protocol and
//! the HTTP/2 flood limits (Rapid Reset, CONTINUATION).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// An origin that reports each request's path on `arrivals`, holds the
/// ones to `/hold` until `release` is `true`, and answers the rest at once.
async fn gated_origin() -> (Origin, mpsc::UnboundedReceiver<String>, watch::Sender<bool>) {
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let (release, released) = watch::channel(false);
    let origin = origin(move |req| {
        let (arrived, mut released) = (arrived.clone(), released.clone());
        async move {
            let path = req.uri().path().to_owned();
            let _ = arrived.send(path.clone());
            if path == "/hold" {
                let _ = released.wait_for(|r| *r).await;
            }
            text(200, "ok")
        }
    })
    .await;
    (origin, arrivals, release)
}

async fn next_arrival(arrivals: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .expect("the origin saw the request in time")
        .expect("origin alive")
}

fn config(origin: SocketAddr, route: &str, extra: &str) -> String {
    Template::new(&[origin])
        .listener("name = \"web\"")
        .route(&format!("name = \"main\"\n{route}"))
        .extra(&format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}"))
        .build()
}

/// Sends GET `path` from `127.0.0.<last>` with an optional cookie on a
/// new connection, in its own task.
fn spawn_get(
    last: u8,
    addr: SocketAddr,
    path: &'static str,
    cookie: Option<String>,
) -> tokio::task::JoinHandle<Option<Got>> {
    tokio::spawn(async move {
        let mut c = h1_from(last, addr).await.ok()?;
        let mut req = Request::get(path).header("host", "a");
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        let req = req.body(empty()).expect("request");
        Some(read(c.send_ready(req).await.ok()?).await)
    })
}

fn shedding(mode: &str) -> String {
    format!(
        "[protect.load_shedding]\nmode = \"{mode}\"\nmin_limit = 4\nmax_limit = 4\nreserve = 0.5\nretry_after = \"2s\"\n"
    )
}

#[tokio::test]
async fn load_shedding_refuses_new_sources_first_when_the_origin_is_full() {
    let (origin, mut arrivals, release) = gated_origin().await;
    let proxy = start_proxy(&config(origin.addr, "challenge = \"attack\"", &shedding("enforce"))).await;
    // A limit of 4 with half reserved: unknown clients may fill 2.
    let held: Vec<_> = [20u8, 21]
        .into_iter()
        .map(|last| spawn_get(last, proxy.addr, "/hold", None))
        .collect();
    for _ in 0..2 {
        assert_eq!(next_arrival(&mut arrivals).await, "/hold");
    }
    let mut c = h1_from(22, proxy.addr).await.expect("connect");
    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
    let shed = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(shed.status, 503, "a new source is shed at once");
    assert_eq!(shed.header("retry-after"), Some("2"));
    assert_eq!(
        shed.header("proxy-status"),
        Some("portcullis; error=connection_limit_reached")
    );

    // A client with a valid challenge cookie uses the reserve.
    let client = IpAddr::from([127, 0, 0, 23]);
    let snapshot = proxy.snapshot.load_full();
    let cookie = format!(
        "__portcullis_challenge={}",
        snapshot.challenge.issue(client, portcullis::state::unix_now())
    );
    let trusted = spawn_get(23, proxy.addr, "/hold", Some(cookie));
    assert_eq!(next_arrival(&mut arrivals).await, "/hold");
    assert_eq!(proxy.snapshot.load().upstreams[0].in_flight(), 3);

    release.send(true).expect("release");
    for task in held.into_iter().chain([trusted]) {
        assert_eq!(task.await.expect("task").expect("answered").status, 200);
    }
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"portcullis_protection_actions_total{route="main",action="shed"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"portcullis_upstream_concurrency_limit{upstream="app"} 4"#),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn load_shedding_in_shadow_mode_changes_no_response() {
    let (origin, mut arrivals, release) = gated_origin().await;
    let proxy = start_proxy(&config(origin.addr, "challenge = \"attack\"", &shedding("shadow"))).await;
    let held: Vec<_> = [24u8, 25, 26]
        .into_iter()
        .map(|last| spawn_get(last, proxy.addr, "/hold", None))
        .collect();
    for _ in 0..3 {
        assert_eq!(next_arrival(&mut arrivals).await, "/hold", "nothing is shed");
    }
    release.send(true).expect("release");
    for task in held {
        assert_eq!(task.await.expect("task").expect("answered").status, 200);
    }
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"portcullis_protection_actions_total{route="main",action="shadow_shed"} 1"#),
        "{text}"
    );
    proxy.shutdown().await;
}

fn bans(mode: &str, audit: &std::path::Path) -> String {
    format!(
        "[protect.bans]\nmode = \"{mode}\"\nstrikes = 3\nwindow = \"1m\"\nduration = \"10m\"\n[audit_log]\npath = {:?}\n",
        audit.display().to_string()
    )
}

const RATE_LIMIT: &str = "[routes.rate_limit]\nrate = \"1/min\"\nburst = 1";

/// Four GETs on one connection from `127.0.0.<last>`: one allowed, then
/// three refused by the rate limit (three strikes); then a fifth.
async fn strike_three_times(last: u8, addr: SocketAddr) -> Vec<u16> {
    let mut c = h1_from(last, addr).await.expect("connect");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        statuses.push(read(c.send_ready(req).await.expect("send")).await.status.as_u16());
    }
    statuses
}

#[tokio::test]
async fn a_client_that_keeps_getting_refused_is_banned_at_accept_until_lifted() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let proxy = start_proxy(&config(origin.addr, RATE_LIMIT, &bans("enforce", &audit))).await;

    let mut c = h1_from(30, proxy.addr).await.expect("connect");
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        let got = read(c.send_ready(req).await.expect("send")).await;
        statuses.push(got.status.as_u16());
        last = Some(got);
    }
    assert_eq!(statuses, [200, 429, 429, 429, 403]);
    assert_eq!(
        last.expect("answered").header("connection"),
        Some("close"),
        "a banned client's connection is closed after the 403"
    );
    assert_eq!(get_from(30, proxy.addr).await, None, "closed at accept");
    assert_eq!(get_from(31, proxy.addr).await, Some(StatusCode::OK), "others pass");

    let text = metrics(&proxy).await;
    assert!(text.contains("portcullis_bans_total 1"), "{text}");
    assert!(text.contains("portcullis_bans_active 1"), "{text}");
    assert!(
        text.contains(r#"portcullis_connections_rejected_total{listener="web",reason="banned"} 1"#),
        "{text}"
    );
    let snapshot = proxy.snapshot.load_full();
    let bans = snapshot.bans.as_ref().expect("bans on");
    let now = portcullis::upstream::health::now_ms();
    let listed = bans.list(now);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].client, IpAddr::from([127, 0, 0, 30]));
    assert!(bans.unban(IpAddr::from([127, 0, 0, 30])));
    assert!(
        get_from(30, proxy.addr).await.is_some(),
        "an unbanned client is admitted again"
    );
    proxy.shutdown().await;

    let records = std::fs::read_to_string(&audit).expect("audit");
    let ban: Vec<serde_json::Value> = records
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["event"] == "protection.ban")
        .collect();
    assert_eq!(ban.len(), 1, "{records}");
    assert_eq!(ban[0]["client"], "127.0.0.30");
    assert_eq!(ban[0]["mode"], "enforce");
    assert_eq!(ban[0]["seconds"], 600);
}

#[tokio::test]
async fn bans_in_shadow_mode_are_recorded_but_refuse_nothing() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let proxy = start_proxy(&config(origin.addr, RATE_LIMIT, &bans("shadow", &audit))).await;
    assert_eq!(strike_three_times(32, proxy.addr).await, [200, 429, 429, 429, 429]);
    assert_eq!(
        get_from(32, proxy.addr).await,
        Some(StatusCode::TOO_MANY_REQUESTS),
        "admitted; only its rate limit answers"
    );
    let text = metrics(&proxy).await;
    assert!(text.contains("portcullis_bans_total 1"), "{text}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_listener_ip_list_closes_connections_at_accept() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let toml = config(origin.addr, "", "").replacen(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\ndeny = [\"127.0.0.40/32\"]\n",
        1,
    );
    let proxy = start_proxy(&toml).await;
    assert_eq!(get_from(40, proxy.addr).await, None);
    assert_eq!(get_from(41, proxy.addr).await, Some(StatusCode::OK));
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"portcullis_connections_rejected_total{listener="web",reason="ip_denied"} 1"#),
        "{text}"
    );
    proxy.shutdown().await;
}

/// Writes `bytes` from `source` and reads until the proxy closes.
async fn exchange_from(source: IpAddr, addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tcp_from(source, addr).await;
    // The proxy may close before reading everything: that is an answer too.
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the proxy answered or closed in time");
    String::from_utf8_lossy(&out).into_owned()
}

fn proxy_v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&80u16.to_be_bytes());
    header
}

#[tokio::test]
async fn the_proxy_protocol_names_the_client_for_trusted_balancers_only() {
    let origin = echo_origin().await;
    let toml = config(
        origin.addr,
        "deny = [\"203.0.113.66/32\"]",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    )
    .replacen(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\nproxy_protocol = true\n",
        1,
    );
    let proxy = start_proxy(&toml).await;
    let balancer = IpAddr::from([127, 0, 0, 1]);
    let request = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

    let v1 = exchange_from(
        balancer,
        proxy.addr,
        format!("PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n{request}").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&v1), 200, "{v1}");
    assert!(v1.contains("x-forwarded-for: 203.0.113.9\n"), "{v1}");

    let mut bytes = proxy_v2([203, 0, 113, 10], 40001);
    bytes.extend_from_slice(request.as_bytes());
    let v2 = exchange_from(balancer, proxy.addr, &bytes).await;
    assert_eq!(status_of(&v2), 200, "{v2}");
    assert!(v2.contains("x-forwarded-for: 203.0.113.10\n"), "{v2}");

    // The named client is what the route's lists see.
    let denied = exchange_from(
        balancer,
        proxy.addr,
        format!("PROXY TCP4 203.0.113.66 127.0.0.1 40002 80\r\n{request}").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&denied), 403, "{denied}");

    // UNKNOWN keeps the balancer's address but not its trust: the
    // client's own X-Forwarded-For is not believed.
    let unknown = exchange_from(
        balancer,
        proxy.addr,
        b"PROXY UNKNOWN\r\nGET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&unknown), 200, "{unknown}");
    assert!(unknown.contains("x-forwarded-for: 127.0.0.1\n"), "{unknown}");
    assert!(!unknown.contains("198.51.100.1"), "{unknown}");

    // No header, a broken one, or a header from an untrusted peer: closed
    // without an answer, and the origin never asked.
    let before = origin.requests();
    for (source, bytes) in [
        (balancer, request.to_owned()),
        (
            balancer,
            format!("PROXY TCP4 203.0.113.9 127.0.0.1 99999 80\r\n{request}"),
        ),
        (
            IpAddr::from([127, 0, 0, 50]),
            format!("PROXY TCP4 203.0.113.9 127.0.0.1 40003 80\r\n{request}"),
        ),
    ] {
        let answer = exchange_from(source, proxy.addr, bytes.as_bytes()).await;
        assert_eq!(answer, "", "from {source}: {bytes:?}");
    }
    assert_eq!(origin.requests(), before);
    let text = metrics(&proxy).await;
    for reason in ["proxy_protocol_invalid", "proxy_protocol_untrusted"] {
        assert!(
            text.contains(&format!(
                r#"portcullis_connections_rejected_total{{listener="web",reason="{reason}"}}"#
            )),
            "{reason}: {text}"
        );
    }
    proxy.shutdown().await;
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// HPACK: GET, http, the given `:path` (a literal), `:authority: a`.
fn request_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    block
}

/// The frame types in `bytes` (a server's side of a connection).
fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        types.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    types
}

#[tokio::test]
async fn rapid_reset_closes_the_http2_connection_past_its_limit() {
    let (origin, mut arrivals, _release) = gated_origin().await;
    let proxy = start_proxy(&config(origin.addr, "", "[protect]\nh2_max_resets_per_second = 5\n")).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.expect("preface");
    // Each stream is reset once the origin is working on it: the request
    // cost the proxy and the origin, and the client's stream count stays 1.
    for n in 0..6u32 {
        let id = 2 * n + 1;
        stream
            .write_all(&frame(HEADERS, END_STREAM | END_HEADERS, id, &request_block("/hold")))
            .await
            .expect("headers");
        assert_eq!(next_arrival(&mut arrivals).await, "/hold");
        stream
            .write_all(&frame(RST_STREAM, 0, id, &8u32.to_be_bytes()))
            .await
            .expect("reset");
    }
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "the sixth reset within a second closes the connection");
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"portcullis_connections_rejected_total{listener="web",reason="h2_reset_flood"} 1"#),
        "{text}"
    );
    // Other clients are served.
    let mut c = h2(proxy.addr).await;
    let req = Request::get("http://a/").body(empty()).expect("request");
    assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_continuation_flood_gets_goaway_and_reaches_no_origin() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&config(origin.addr, "", "")).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    // A header block that never ends: empty CONTINUATION frames.
    bytes.extend(frame(HEADERS, END_STREAM, 1, &request_block("/")));
    for _ in 0..50 {
        bytes.extend(frame(CONTINUATION, 0, 1, &[]));
    }
    let _ = stream.write_all(&bytes).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "the proxy closes the connection");
    assert!(
        frame_types(&out).contains(&GOAWAY),
        "GOAWAY sent: {:?}",
        frame_types(&out)
    );
    assert_eq!(origin.requests(), 0);
    proxy.shutdown().await;
}

/// An HTTP/1.1 connection from `127.0.0.<last>` and the task driving it,
/// which ends when the proxy closes the connection.
async fn h1_watched(
    last: u8,
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    tokio::task::JoinHandle<()>,
) {
    let stream = tcp_from(IpAddr::from([127, 0, 0, last]), addr).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, driver)
}

#[tokio::test]
async fn a_full_connection_table_evicts_a_quiet_connection_for_a_newcomer() {
    let (origin, mut arrivals, release) = gated_origin().await;
    let toml = config(
        origin.addr,
        "",
        "[protect]\nmax_connections = 3\nevict_idle_after = \"0s\"\n",
    );
    let proxy = start_proxy(&toml).await;
    let busy = spawn_get(60, proxy.addr, "/hold", None);
    assert_eq!(next_arrival(&mut arrivals).await, "/hold");
    let mut quiet = Vec::new();
    for last in [61u8, 62] {
        let (mut c, driver) = h1_watched(last, proxy.addr).await;
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);
        assert_eq!(next_arrival(&mut arrivals).await, "/");
        quiet.push((c, driver));
    }
    // The table is full: the newcomer gets in, a quiet connection goes.
    assert_eq!(get_from(63, proxy.addr).await, Some(StatusCode::OK));
    let (_c1, d1) = quiet.remove(0);
    let (_c2, d2) = quiet.remove(0);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = d1 => {}
            _ = d2 => {}
        }
    })
    .await;
    assert!(closed.is_ok(), "one quiet connection was closed");
    release.send(true).expect("release");
    assert_eq!(
        busy.await.expect("task").expect("answered").status,
        200,
        "the connection with a request in flight was left alone"
    );
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"portcullis_connections_rejected_total{listener="web",reason="evicted_idle"} 1"#),
        "{text}"
    );
    proxy.shutdown().await;
}

/// Reads HTTP/2 frames (type, stream, payload) from `stream` until `done`
/// says so or the connection closes; bounded in time.
async fn frames_until(
    stream: &mut tokio::net::TcpStream,
    done: impl Fn(u8, u32, &[u8]) -> bool,
) -> Vec<(u8, u32, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            while buf.len() >= 9 {
                let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let kind = buf[3];
                let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let payload = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                let finished = done(kind, id, &payload);
                frames.push((kind, id, payload));
                if finished {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "no answer in time: {frames:?}");
    frames
}

#[tokio::test]
async fn an_empty_data_frame_flood_gets_goaway_enhance_your_calm() {
    let (seen, mut bodies) = mpsc::unbounded_channel();
    let origin = origin(move |req| {
        let seen = seen.clone();
        async move {
            use http_body_util::BodyExt;
            let method = req.method().clone();
            let _ = seen.send((method, req.into_body().collect().await.is_ok()));
            text(200, "ok")
        }
    })
    .await;
    let proxy = start_proxy(&config(origin.addr, "", "")).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    // A POST whose body is a stream of empty DATA frames: work for the
    // server, nothing for the message.
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &[0x83, 0x86, 0x84, 0x01, 0x01, b'a']));
    for _ in 0..1000 {
        bytes.extend(frame(DATA, 0, 1, &[]));
    }
    let _ = stream.write_all(&bytes).await;
    let frames = frames_until(&mut stream, |kind, _, _| kind == GOAWAY).await;
    let goaway = frames
        .iter()
        .find(|(kind, _, _)| *kind == GOAWAY)
        .unwrap_or_else(|| panic!("GOAWAY sent: {frames:?}"));
    // The error code follows the last stream id: ENHANCE_YOUR_CALM (0xb).
    assert_eq!(goaway.2.get(4..8), Some(&[0u8, 0, 0, 0xb][..]), "{goaway:?}");
    // The proxy goes on serving; the flooded body never completed at the
    // origin (by the time a later request has).
    assert_eq!(get(proxy.addr, "/").await.status, 200);
    let mut reports = Vec::new();
    while let Ok(report) = bodies.try_recv() {
        reports.push(report);
    }
    assert!(reports.contains(&(http::Method::GET, true)), "{reports:?}");
    assert!(
        !reports.contains(&(http::Method::POST, true)),
        "the origin never got a whole body: {reports:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_banned_http2_client_loses_its_connection() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let proxy = start_proxy(&config(origin.addr, RATE_LIMIT, &bans("enforce", &audit))).await;
    let stream = tcp_from(IpAddr::from([127, 0, 0, 34]), proxy.addr).await;
    let (mut c, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let req = Request::get("http://a/").body(empty()).expect("request");
        statuses.push(read(c.send_ready(req).await.expect("send")).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 429, 429, 429, 403]);
    // GOAWAY after the 403: the connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "the banned client's HTTP/2 connection was closed");
    proxy.shutdown().await;
}
