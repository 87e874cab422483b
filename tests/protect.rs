//! Protection over real sockets, with distinct loopback source addresses
//! (127.0.0.2, 127.0.0.3, ...: the whole 127.0.0.0/8 is local).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use http::{Request, StatusCode};
use support::*;

fn config(origin: SocketAddr, extra: &str) -> String {
    Template::new(&[origin])
        .listener("name = \"web\"")
        .route(&format!("name = \"main\"\n{extra}"))
        .extra("[metrics]\nlisten = \"127.0.0.1:0\"")
        .build()
}

#[tokio::test]
async fn the_per_ip_connection_cap_refuses_only_that_address() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&format!(
        "{}\n[protect]\nmax_connections_per_ip = 2\n",
        config(origin.addr, "")
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = h1_from(2, proxy.addr).await.expect("admitted");
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);
        held.push(c);
    }
    assert_eq!(
        get_from(2, proxy.addr).await,
        None,
        "a third connection from 127.0.0.2 is closed"
    );
    assert_eq!(
        get_from(3, proxy.addr).await,
        Some(StatusCode::OK),
        "127.0.0.3 is not affected"
    );
    let text = metrics(&proxy).await;
    assert!(
        text.contains("portcullis_connections_rejected_total{listener=\"web\",reason=\"max_connections_per_ip\"} 1"),
        "{text}"
    );
    // Closing one gives its place back (the proxy notices the close in its
    // own time: retry, bounded).
    held.pop();
    let mut admitted = false;
    for _ in 0..200 {
        if get_from(2, proxy.addr).await == Some(StatusCode::OK) {
            admitted = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(admitted, "the freed place was given to a new connection");
}

#[tokio::test]
async fn the_global_connection_cap_holds() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&format!(
        "{}\n[protect]\nmax_connections = 2\n",
        config(origin.addr, "")
    ))
    .await;
    let _a = h1_from(2, proxy.addr).await.expect("1");
    let mut b = h1_from(3, proxy.addr).await.expect("2");
    // b answering proves both were accepted and counted.
    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
    assert_eq!(read(b.send_ready(req).await.expect("send")).await.status, 200);
    assert_eq!(get_from(4, proxy.addr).await, None, "a third connection is refused");
}

#[tokio::test]
async fn denied_addresses_are_closed_at_accept_and_routes_can_allow_only_some() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&format!(
        "{}\n[protect]\ndeny = [\"127.0.0.9\"]\n",
        config(origin.addr, "allow = [\"127.0.0.20/31\"]")
    ))
    .await;
    assert_eq!(get_from(9, proxy.addr).await, None, "denied at accept");
    assert_eq!(get_from(20, proxy.addr).await, Some(StatusCode::OK));
    assert_eq!(get_from(21, proxy.addr).await, Some(StatusCode::OK));
    let mut c = h1_from(22, proxy.addr).await.expect("accepted");
    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
    let got = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, 403);
    assert_eq!(
        got.header("proxy-status"),
        Some("portcullis; error=http_request_denied")
    );
    assert_eq!(origin.requests(), 2, "the origin never saw the refused request");
    let text = metrics(&proxy).await;
    assert!(
        text.contains("portcullis_connections_rejected_total{listener=\"web\",reason=\"ip_denied\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_flood_from_one_source_is_throttled_while_a_normal_client_passes() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&config(origin.addr, "[routes.rate_limit]\nrate = \"5/s\"\nburst = 5\n")).await;
    let mut attacker = h1_from(2, proxy.addr).await.expect("attacker");
    let mut normal = h1_from(3, proxy.addr).await.expect("normal");
    let started = Instant::now();
    let (mut passed, mut limited, mut normal_ok) = (0u32, 0u32, 0u32);
    for i in 0..100 {
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        let got = read(attacker.send_ready(req).await.expect("send")).await;
        match got.status {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                let retry: u64 = got
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .expect("Retry-After in seconds");
                assert_eq!(retry, 1, "one allowance comes back within a second");
            }
            other => panic!("unexpected {other}"),
        }
        if i % 25 == 0 {
            let req = Request::get("/").header("host", "a").body(empty()).expect("request");
            if read(normal.send_ready(req).await.expect("send")).await.status == StatusCode::OK {
                normal_ok += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, plus what the rate gave back while the flood ran.
    let allowed = 5 + (elapsed * 5.0).ceil() as u32;
    assert!(
        passed >= 5 && passed <= allowed,
        "{passed} passed in {elapsed:.2}s (at most {allowed})"
    );
    assert_eq!(passed + limited, 100);
    assert_eq!(normal_ok, 4, "the normal client was never limited");
    assert_eq!(
        origin.requests() as u32,
        passed + normal_ok,
        "refused requests never reach the origin"
    );
    let text = metrics(&proxy).await;
    assert!(
        text.contains(&format!(
            "portcullis_protection_actions_total{{route=\"main\",action=\"rate_limited\"}} {limited}"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn rate_limits_by_header_count_each_key_alone() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&config(
        origin.addr,
        "[routes.rate_limit]\nrate = \"1/min\"\nburst = 2\nkey = \"header:x-api-key\"\n",
    ))
    .await;
    let mut c = h1(proxy.addr).await;
    async fn status(c: &mut hyper::client::conn::http1::SendRequest<TestBody>, key: &str) -> StatusCode {
        let req = Request::get("/")
            .header("host", "a")
            .header("x-api-key", key)
            .body(empty())
            .expect("request");
        read(c.send_ready(req).await.expect("send")).await.status
    }
    assert_eq!(status(&mut c, "alice").await, 200);
    assert_eq!(status(&mut c, "alice").await, 200);
    assert_eq!(status(&mut c, "alice").await, 429);
    assert_eq!(status(&mut c, "bob").await, 200, "another key has its own allowance");
}

#[tokio::test]
async fn new_connections_per_ip_are_rate_limited() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&format!(
        "{}\n[protect]\nnew_connections_per_ip = \"1/min\"\nnew_connections_burst = 2\n",
        config(origin.addr, "")
    ))
    .await;
    assert_eq!(get_from(2, proxy.addr).await, Some(StatusCode::OK));
    assert_eq!(get_from(2, proxy.addr).await, Some(StatusCode::OK));
    assert_eq!(
        get_from(2, proxy.addr).await,
        None,
        "the third new connection within the minute"
    );
    assert_eq!(get_from(3, proxy.addr).await, Some(StatusCode::OK), "per address");
}

#[tokio::test]
async fn a_slow_upload_is_cut_with_408_and_a_normal_one_passes() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&format!(
        "{}\n[protect]\nmin_body_rate = \"1KiB/s\"\nbody_rate_grace = \"200ms\"\n",
        config(origin.addr, "")
    ))
    .await;
    // 100 bytes of a declared 100,000, then nothing: the client stalls.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slow.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        .await
        .expect("head");
    slow.write_all(&[b'x'; 100]).await.expect("some body");
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), slow.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    // 200 ms of grace plus 100 bytes' worth at 1 KiB/s, not the 15 minute
    // request timeout.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    let mut c = h1(proxy.addr).await;
    let req = Request::post("/upload")
        .header("host", "a")
        .body(full(vec![b'y'; 50_000]))
        .expect("request");
    let got = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.echoed().body.len(), 50_000);
}

#[tokio::test]
async fn the_challenge_lets_cookie_keeping_clients_through_and_scrubs_the_rest() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&config(origin.addr, "challenge = true")).await;
    let send = |last: u8, cookie: Option<String>| {
        let addr = proxy.addr;
        async move {
            let mut c = h1_from(last, addr).await.expect("connect");
            let mut req = Request::get("/page?x=1").header("host", "a");
            if let Some(cookie) = cookie {
                req = req.header("cookie", format!("theme=dark; {cookie}"));
            }
            read(c.send_ready(req.body(empty()).expect("request")).await.expect("send")).await
        }
    };
    // First visit: a 307 back to the same target, with the cookie.
    let first = send(4, None).await;
    assert_eq!(first.status, 307);
    assert_eq!(first.header("location"), Some("/page?x=1"));
    assert_eq!(first.header("cache-control"), Some("no-store"));
    let set_cookie = first.header("set-cookie").expect("a cookie").to_owned();
    assert!(set_cookie.starts_with("__portcullis_challenge=v1."), "{set_cookie}");
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("Max-Age=3600"),
        "{set_cookie}"
    );
    assert_eq!(origin.requests(), 0);
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();

    // The browser follows with the cookie: through.
    assert_eq!(send(4, Some(cookie.clone())).await.status, 200);
    assert_eq!(origin.requests(), 1);
    // The same cookie from another address is not valid.
    assert_eq!(send(5, Some(cookie.clone())).await.status, 307);
    // A tampered cookie is not either.
    let tampered = format!("{}0", &cookie[..cookie.len() - 1]);
    let tampered = if tampered == cookie {
        format!("{}1", &cookie[..cookie.len() - 1])
    } else {
        tampered
    };
    assert_eq!(send(4, Some(tampered)).await.status, 307);

    // A flood that does not keep cookies never reaches the origin.
    let mut flood = h1_from(6, proxy.addr).await.expect("connect");
    for _ in 0..200 {
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        assert_eq!(read(flood.send_ready(req).await.expect("send")).await.status, 307);
    }
    assert_eq!(origin.requests(), 1, "only the browser's request");
    let text = metrics(&proxy).await;
    assert!(
        text.contains("portcullis_protection_actions_total{route=\"main\",action=\"challenged\"}"),
        "{text}"
    );
}

/// Eight sources sending back to back until `stop` (at most 20,000
/// requests each).
fn flood_from_eight(
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    (1..=8u8)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                let Ok(mut c) = h1_from_block(1, i, addr).await else {
                    return 0;
                };
                while sent < 20_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
                    match c.send_ready(req).await {
                        Ok(r) => {
                            read(r).await;
                        }
                        Err(_) => break,
                    }
                    sent += 1;
                }
                sent
            })
        })
        .collect()
}

fn adaptive_config(origin: SocketAddr, mode: &str, audit: &std::path::Path) -> String {
    format!(
        "{}\n[protect.adaptive]\nmode = \"{mode}\"\nwindow = \"200ms\"\nlearn = \"1s\"\nmin_rate = 20\nenter_after = 2\nleave_after = 2\n[audit_log]\npath = {:?}\n",
        config(origin, "challenge = \"attack\""),
        audit.display().to_string()
    )
}

/// Waits (bounded) until attack mode is `on`: on the detector's own
/// change notification, no polling.
async fn attack_mode_is(proxy: &TestProxy, on: bool) {
    let snapshot = proxy.snapshot.load_full();
    let adaptive = snapshot.adaptive.as_ref().expect("adaptive");
    let mut changes = adaptive.subscribe();
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        changes.wait_for(|state| *state == on),
    )
    .await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "attack mode never became {on}: {:?}",
        adaptive.state().last
    );
}

#[tokio::test]
async fn attack_mode_refuses_the_flooding_sources_and_challenges_only_while_on() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let proxy = start_proxy(&adaptive_config(origin.addr, "enforce", &audit)).await;
    let_the_detector_learn(&proxy).await;
    // Before any attack, the route does not challenge.
    assert_eq!(get_from(50, proxy.addr).await, Some(StatusCode::OK));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = flood_from_eight(proxy.addr, stop.clone());
    attack_mode_is(&proxy, true).await;
    // The flooding sources are refused; a newcomer is challenged; a
    // browser that keeps the cookie passes.
    let mut refused = false;
    for _ in 0..100 {
        if get_from_block(1, 1, proxy.addr).await == Some(StatusCode::TOO_MANY_REQUESTS) {
            refused = true;
            break;
        }
    }
    assert!(refused, "a flooding source is refused in attack mode");
    let mut c = h1_from(51, proxy.addr).await.expect("connect");
    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
    let challenged = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(challenged.status, 307);
    let cookie = challenged
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("cookie")
        .to_owned();
    let req = Request::get("/")
        .header("host", "a")
        .header("cookie", cookie)
        .body(empty())
        .expect("request");
    assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.expect("flood task");
    }
    attack_mode_is(&proxy, false).await;
    assert_eq!(
        get_from(52, proxy.addr).await,
        Some(StatusCode::OK),
        "no challenge once the attack is over"
    );
    let text = metrics(&proxy).await;
    assert!(text.contains("portcullis_attack_mode 0"), "{text}");
    proxy.shutdown().await;

    let records = std::fs::read_to_string(&audit).expect("audit");
    let changes: Vec<serde_json::Value> = records
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["event"] == "protection.attack_mode")
        .collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["state"], "entered");
    assert_eq!(changes[0]["mode"], "enforce");
    assert!(
        changes[0]["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.starts_with("few sources"))),
        "{changes:?}"
    );
    assert_eq!(changes[1]["state"], "left");
}

#[tokio::test]
async fn shadow_mode_detects_but_changes_no_response() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let proxy = start_proxy(&adaptive_config(origin.addr, "shadow", &audit)).await;
    let_the_detector_learn(&proxy).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = flood_from_eight(proxy.addr, stop.clone());
    attack_mode_is(&proxy, true).await;
    assert_eq!(
        get_from_block(1, 1, proxy.addr).await,
        Some(StatusCode::OK),
        "a flooding source still passes"
    );
    assert_eq!(
        get_from(53, proxy.addr).await,
        Some(StatusCode::OK),
        "no challenge in shadow mode"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.expect("flood task");
    }
    let text = metrics(&proxy).await;
    assert!(text.contains("action=\"shadow_attack_source\""), "{text}");
    assert!(text.contains("action=\"shadow_challenge\""), "{text}");
    assert!(!text.contains("action=\"challenged\""), "{text}");
    proxy.shutdown().await;
    assert!(
        std::fs::read_to_string(&audit)
            .expect("audit")
            .contains("\"mode\":\"shadow\"")
    );
}

#[tokio::test]
async fn connections_end_after_their_request_limit() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&format!(
        "{}\n[protect]\nmax_requests_per_connection = 3\n",
        config(origin.addr, "")
    ))
    .await;
    let mut c = h1(proxy.addr).await;
    for i in 1..=3 {
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        let got = read(c.send_ready(req).await.expect("send")).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("connection") == Some("close"), i == 3, "request {i}");
    }
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), c.ready()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the HTTP/1.1 connection is closed after 3 requests"
    );

    let mut c2 = h2(proxy.addr).await;
    for _ in 0..3 {
        let req = Request::get("http://a/").body(empty()).expect("request");
        assert_eq!(read(c2.send_ready(req).await.expect("send")).await.status, 200);
    }
    // GOAWAY after the third stream: the connection takes no more.
    let req = Request::get("http://a/").body(empty()).expect("request");
    let fourth = tokio::time::timeout(std::time::Duration::from_secs(10), c2.send_ready(req)).await;
    assert!(
        matches!(fourth, Ok(Err(_))),
        "the HTTP/2 connection drained after 3 streams"
    );
    assert_eq!(origin.requests(), 6);
}

#[tokio::test]
async fn hundreds_of_slowloris_connections_do_not_stop_a_normal_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = origin(|_| async { text(200, "ok") }).await;
    let toml = format!("[timeouts]\nheader_read = \"1s\"\n{}", config(origin.addr, ""));
    let proxy = start_proxy(&toml).await;
    // 200 connections from 8 addresses, each stopped in the middle of its
    // request head.
    let mut slow = Vec::new();
    for i in 0..200u16 {
        let source = std::net::IpAddr::from([127, 0, 5, 1 + (i % 8) as u8]);
        let mut stream = tcp_from(source, proxy.addr).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            .await
            .expect("partial head");
        slow.push(stream);
    }
    for _ in 0..20 {
        assert_eq!(get_from(60, proxy.addr).await, Some(StatusCode::OK));
    }
    // Each slow connection is closed once its head has taken header_read.
    for mut stream in slow {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a slowloris connection was closed");
    }
    assert_eq!(origin.requests(), 20, "no partial head reached the origin");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_flash_crowd_is_neither_throttled_nor_challenged_nor_banned() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    // The background window is 5 minutes, so only this test closes
    // windows (by calling tick): no timing involved.
    let toml = format!(
        "{}\n[protect.adaptive]\nmode = \"enforce\"\nwindow = \"5m\"\nmin_rate = 1\nenter_after = 1\n[protect.bans]\nstrikes = 3\n[protect.load_shedding]\nmode = \"enforce\"\n",
        config(
            origin.addr,
            "challenge = \"attack\"\n[routes.rate_limit]\nrate = \"20/s\"\nburst = 40"
        )
    );
    let proxy = start_proxy(&toml).await;
    let adaptive = proxy.snapshot.load_full().adaptive.clone().expect("adaptive");
    // One quiet window (5 requests) is what the detector learns from.
    for i in 0..5 {
        assert_eq!(get_from(40 + i, proxy.addr).await, Some(StatusCode::OK));
    }
    let (learned, _) = adaptive.tick().expect("tick");
    assert!(learned.learning && learned.kind == portcullis::protect::detect::Kind::Normal);
    // 300 new visitors, each loading three pages with its cookies, like a
    // browser: varied paths and agents.
    let visitors: Vec<_> = (0..300u16)
        .map(|i| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut c = h1_from_block(4 + (i / 250) as u8, 1 + (i % 250) as u8, addr)
                    .await
                    .expect("connect");
                let mut statuses = Vec::new();
                for page in 0..3 {
                    let req = Request::get(format!("/article/{}", (i * 3 + page) % 97))
                        .header("host", "a")
                        .header("cookie", format!("session={i}"))
                        .header("user-agent", format!("Mozilla/5.0 (crowd {})", i % 7))
                        .body(empty())
                        .expect("request");
                    statuses.push(read(c.send_ready(req).await.expect("send")).await.status);
                }
                statuses
            })
        })
        .collect();
    for v in visitors {
        assert!(v.await.expect("visitor").iter().all(|s| *s == StatusCode::OK));
    }
    let snapshot = proxy.snapshot.load_full();
    let (verdict, transition) = adaptive.tick().expect("tick");
    assert_eq!(
        verdict.kind,
        portcullis::protect::detect::Kind::FlashCrowd,
        "{:?}",
        verdict.reasons
    );
    assert!(transition.is_none() && !adaptive.in_attack());
    let bans = snapshot.bans.as_ref().expect("bans");
    assert!(bans.list(portcullis::upstream::health::now_ms()).is_empty());
    assert_eq!(origin.requests(), 905);
    proxy.shutdown().await;
}
