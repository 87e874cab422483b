//! Protection must not block real users: the situations where it used to
//! (issue 18), each reproduced over real sockets from distinct loopback
//! addresses. Detector windows are waited for on the detector's own
//! notification; traffic is sent per window, not per unit of time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::net::SocketAddr;

use http::{Request, StatusCode};
use support::*;

/// The settings docs/protection.md describes, with a short window: attack
/// mode enforced, bans and load shedding on.
fn protected(origin: SocketAddr, route_extra: &str, adaptive_extra: &str) -> String {
    format!(
        "{}\n[protect.adaptive]\nmode = \"enforce\"\nwindow = \"200ms\"\nmin_rate = 50\nenter_after = 2\nleave_after = 3\n{adaptive_extra}\n[protect.bans]\nstrikes = 3\n[protect.load_shedding]\nmode = \"enforce\"\n",
        Template::new(&[origin])
            .listener("name = \"web\"")
            .route(&format!("name = \"main\"\nchallenge = \"attack\"\n{route_extra}"))
            .extra("[metrics]\nlisten = \"127.0.0.1:0\"")
            .build()
    )
}

/// `n` GETs on one connection from `127.0.<third>.<last>`, as a browser
/// keeping its cookie: the statuses.
async fn browser_requests(
    c: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    n: usize,
    cookie: &str,
) -> Vec<StatusCode> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = Request::get(format!("/page/{}", i % 5))
            .header("host", "a")
            .header("cookie", cookie)
            .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0")
            .body(empty())
            .expect("request");
        out.push(match c.send_ready(req).await {
            Ok(r) => read(r).await.status,
            Err(_) => StatusCode::from_u16(599).expect("status"),
        });
    }
    out
}

/// One window of the partner: 10 POSTs without a cookie.
async fn partner_window(c: &mut hyper::client::conn::http1::SendRequest<TestBody>) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for _ in 0..10 {
        let req = Request::post("/api/v1/orders")
            .header("host", "a")
            .header("user-agent", "partner-sync/2.1")
            .body(empty())
            .expect("request");
        out.push(match c.send_ready(req).await {
            Ok(r) => read(r).await.status,
            Err(_) => StatusCode::from_u16(599).expect("status"),
        });
    }
    out
}

fn no_bans(proxy: &TestProxy) {
    let snapshot = proxy.snapshot.load_full();
    let bans = snapshot.bans.as_ref().expect("bans");
    assert!(
        bans.list(portcullis::upstream::health::now_ms()).is_empty(),
        "nobody is banned"
    );
}

#[tokio::test]
async fn a_cold_start_under_steady_traffic_above_min_rate_is_no_attack() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    // The situation: 55 requests/s (min_rate is 50) from six
    // addresses, 45/s of it from one browser-like client with a cookie,
    // from the first second of a fresh process, under a route limit of
    // 60/s per address.
    let proxy = start_proxy(&protected(
        origin.addr,
        "[routes.rate_limit]\nrate = \"60/s\"\nburst = 120",
        "learn = \"2s\"",
    ))
    .await;
    let adaptive = proxy.snapshot.load_full().adaptive.clone().expect("adaptive");
    let mut heavy = h1_from_block(18, 1, proxy.addr).await.expect("connect");
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(h1_from_block(18, 10 + i, proxy.addr).await.expect("connect"));
    }
    let mut statuses = Vec::new();
    for _ in 0..30 {
        // One window: 9 + 2 = 11 requests in 200 ms, 55/s.
        statuses.extend(browser_requests(&mut heavy, 9, "session=heavy").await);
        for c in others.iter_mut().take(2) {
            statuses.extend(browser_requests(c, 1, "session=other").await);
        }
        others.rotate_left(2);
        next_window(&proxy).await;
        assert!(!adaptive.in_attack(), "{:?}", adaptive.state().last);
    }
    let last = adaptive.state().last.expect("verdict");
    assert!(!last.learning, "learned after 2 s of traffic: {last:?}");
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    no_bans(&proxy);
    let text = metrics(&proxy).await;
    assert!(text.contains("portcullis_attack_mode 0"), "{text}");
    proxy.shutdown().await;
}

/// Eight sources flooding back to back from 127.0.19.x until `stop`.
fn flood(
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u32, u32)>> {
    (1..=8u8)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut sent, mut refused) = (0, 0);
                let Ok(mut c) = h1_from_block(19, i, addr).await else {
                    return (0, 0);
                };
                while sent < 50_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = Request::get("/").header("host", "a").body(empty()).expect("request");
                    match c.send_ready(req).await {
                        Ok(r) => {
                            if read(r).await.status == StatusCode::TOO_MANY_REQUESTS {
                                refused += 1;
                            }
                        }
                        Err(_) => break,
                    }
                    sent += 1;
                }
                (sent, refused)
            })
        })
        .collect()
}

#[tokio::test]
async fn a_heavy_client_seen_before_a_flood_is_never_tightened_or_banned() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let proxy = start_proxy(&protected(origin.addr, "", "learn = \"1s\"")).await;
    let adaptive = proxy.snapshot.load_full().adaptive.clone().expect("adaptive");
    // An API partner: 10 requests a window (50/s), far above the 20
    // ordinary clients' one request a window each, and no cookie.
    let mut partner = h1_from_block(20, 1, proxy.addr).await.expect("connect");
    let mut ordinary = Vec::new();
    for i in 0..20 {
        ordinary.push(h1_from_block(20, 10 + i, proxy.addr).await.expect("connect"));
    }
    let mut partner_statuses = Vec::new();
    // Learned: 15 windows (3 s) of the partner beside ordinary traffic.
    for _ in 0..15 {
        partner_statuses.extend(partner_window(&mut partner).await);
        for (i, c) in ordinary.iter_mut().enumerate() {
            browser_requests(c, 1, &format!("session={i}")).await;
        }
        next_window(&proxy).await;
    }
    assert!(!adaptive.in_attack());
    assert!(!adaptive.state().last.expect("verdict").learning);

    // The flood: eight new sources back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders = flood(proxy.addr, stop.clone());
    let mut windows_in_attack = 0;
    for _ in 0..100 {
        partner_statuses.extend(partner_window(&mut partner).await);
        next_window(&proxy).await;
        if adaptive.in_attack() {
            windows_in_attack += 1;
            if windows_in_attack == 8 {
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flood_refused = 0;
    for f in flooders {
        flood_refused += f.await.expect("flooder").1;
    }
    assert_eq!(windows_in_attack, 8, "the flood put the proxy in attack mode");
    assert!(flood_refused > 0, "the flooders were held to suspect_rate");
    assert!(
        partner_statuses.iter().all(|s| *s == StatusCode::OK),
        "the partner was never refused: {partner_statuses:?}"
    );
    no_bans(&proxy);
    let text = metrics(&proxy).await;
    assert!(text.contains("action=\"attack_source_limited\""), "{text}");
    proxy.shutdown().await;
}

/// Opens a connection from `127.0.<third>.<last>` that declares a
/// `declared`-byte body and sends `sent` bytes of it, then nothing.
async fn slow_upload(third: u8, last: u8, addr: SocketAddr, declared: usize, sent: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tcp_from(std::net::IpAddr::from([127, 0, third, last]), addr).await;
    let head = format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {declared}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&vec![b'x'; sent]).await.expect("body");
    stream
}

#[tokio::test]
async fn a_slow_upload_flood_never_reaches_the_origin_and_a_client_keeps_being_served() {
    // An origin that counts what reaches it, and reads every body whole.
    let origin = origin(|req: Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let _ = req.into_body().collect().await;
        text(200, "ok")
    })
    .await;
    let proxy = start_proxy(&protected(origin.addr, "", "learn = \"1s\"")).await;
    // 300 connections from 30 addresses, each declaring a 2 KB body and
    // sending one byte of it.
    let mut slow = Vec::new();
    for i in 0..300u16 {
        slow.push(slow_upload(22, 1 + (i % 30) as u8, proxy.addr, 2_000, 1).await);
    }
    // A legitimate client: GETs and small POSTs, all served.
    let mut c = h1_from_block(23, 1, proxy.addr).await.expect("connect");
    let mut ok = 0;
    for i in 0..100 {
        let req = if i % 2 == 0 {
            Request::get("/").header("host", "a").body(empty()).expect("request")
        } else {
            Request::post("/form")
                .header("host", "a")
                .body(full(vec![b'f'; 1_500]))
                .expect("request")
        };
        if read(c.send_ready(req).await.expect("send")).await.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 100, "the legitimate client is served");
    assert_eq!(origin.requests(), 100, "no slow body reached the origin");
    drop(slow);
    proxy.shutdown().await;
}

#[tokio::test]
async fn buffered_bodies_are_bounded_in_memory_and_by_time() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&format!(
        "{}\n[limits]\nbuffer_request_body = \"1KiB\"\nrequest_buffer_memory = \"1KiB\"\n[timeouts]\nbody_read = \"300ms\"\n",
        Template::new(&[origin.addr]).listener("name = \"web\"").route("name = \"main\"").build()
    ))
    .await;
    // Three uploads hold 900 of the 1,024 bytes.
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(slow_upload(24, 1 + i, proxy.addr, 1_000, 300).await);
    }
    // Wait until the proxy holds them (it reads as they arrive): a fourth
    // upload of 300 bytes then finds the memory full: 503 at once.
    let mut refused = None;
    let mut passed = 0;
    for attempt in 0..50u8 {
        let mut c = h1_from_block(25, 1 + attempt, proxy.addr).await.expect("connect");
        let req = Request::post("/x")
            .header("host", "a")
            .body(full(vec![b'y'; 300]))
            .expect("request");
        let got = read(c.send_ready(req).await.expect("send")).await;
        if got.status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(got);
            break;
        }
        assert_eq!(got.status, StatusCode::OK);
        passed += 1;
    }
    let refused = refused.expect("the buffer memory is bounded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // A request without a body needs no buffer.
    assert_eq!(get_from_block(25, 200, proxy.addr).await, Some(StatusCode::OK));
    // The held uploads are cut by body_read (408) and give their memory back.
    for mut stream in held {
        use tokio::io::AsyncReadExt;
        let mut out = vec![0u8; 12];
        stream.read_exact(&mut out).await.expect("an answer");
        assert_eq!(&out, b"HTTP/1.1 408");
    }
    let mut c = h1_from_block(25, 201, proxy.addr).await.expect("connect");
    let req = Request::post("/x")
        .header("host", "a")
        .body(full(vec![b'y'; 1_000]))
        .expect("request");
    assert_eq!(
        read(c.send_ready(req).await.expect("send")).await.status,
        StatusCode::OK
    );
    assert_eq!(origin.requests(), passed + 2, "no held upload reached the origin");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_large_body_reaches_the_origin_only_after_its_first_part_has_arrived() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&format!(
        "{}\n[limits]\nbuffer_request_body = \"4KiB\"\n[timeouts]\nbody_read = \"300ms\"\n",
        Template::new(&[origin.addr])
            .listener("name = \"web\"")
            .route("name = \"main\"")
            .build()
    ))
    .await;
    // Twenty uploads declare 1 MB, longer than what is read ahead, and
    // send 3 KB of it: the proxy holds them, not the origin.
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(slow_upload(26, 1 + i, proxy.addr, 1_000_000, 3_000).await);
    }
    // A 200 KB upload at full speed is read ahead in part, then streams:
    // it arrives whole.
    let mut c = h1_from_block(27, 1, proxy.addr).await.expect("connect");
    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let req = Request::post("/big")
        .header("host", "a")
        .body(full(body.clone()))
        .expect("request");
    let got = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body.ends_with(&body), "the whole body reached the origin, in order");
    // The held uploads are cut at body_read with 408, never forwarded.
    for mut stream in held {
        use tokio::io::AsyncReadExt;
        let mut out = vec![0u8; 12];
        stream.read_exact(&mut out).await.expect("an answer");
        assert_eq!(&out, b"HTTP/1.1 408");
    }
    assert_eq!(
        origin.requests(),
        1,
        "only the upload that arrived in time reached the origin"
    );
    proxy.shutdown().await;
}
