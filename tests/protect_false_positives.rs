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
