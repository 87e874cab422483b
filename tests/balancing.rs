//! Load balancing and resilience with real origins: retries, outlier
//! ejection, health checks, slow start, sticky sessions, circuit breaking.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, StatusCode};
use portcullis::upstream::health::ServerStatus;
use support::*;

async fn named(name: &'static str) -> Origin {
    origin(move |_| async move { text(200, name) }).await
}

fn group_config(servers: &[SocketAddr], extra: &str) -> String {
    Template::new(servers).group(extra).build()
}

fn statuses(proxy: &TestProxy) -> Vec<ServerStatus> {
    proxy.snapshot.load().upstreams[0]
        .statuses()
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

fn failures(proxy: &TestProxy, server: usize) -> u64 {
    proxy.snapshot.load().upstreams[0].servers[server]
        .health
        .failures
        .load(Ordering::Relaxed)
}

/// Sends requests until `done` holds. The 10 s bound is a guard against a
/// hung test, not a synchronization: the loop ends on the event itself.
async fn until(proxy: &TestProxy, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if done() {
            return;
        }
        let got = get(proxy.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK, "while waiting for {what}");
        tokio::task::yield_now().await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_dead_server_costs_clients_nothing_and_comes_back_with_slow_start() {
    let a = named("a").await;
    let b = named("b").await;
    let c = named("c").await;
    let b_addr = b.addr;
    let config = group_config(
        &[a.addr, b.addr, c.addr],
        r#"algorithm = "round_robin"
slow_start = "30s"
[upstreams.app.outlier]
consecutive_failures = 3
base_ejection_time = "200ms"
max_ejection_time = "1s"
[upstreams.app.health_check]
type = "http"
path = "/"
interval = "100ms"
timeout = "100ms"
healthy_threshold = 2
unhealthy_threshold = 2
"#,
    );
    let proxy = start_proxy(&config).await;
    let mut from_b = 0;
    for _ in 0..30 {
        let got = get(proxy.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK);
        from_b += usize::from(got.text() == "b");
    }
    assert_eq!(from_b, 10, "round robin spreads evenly");

    // b crashes in the middle of a steady stream: not one client request fails.
    b.kill();
    for i in 0..60 {
        let got = get(proxy.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK, "request {i} after the crash");
        assert_ne!(got.text(), "b");
    }
    // Consecutive connect failures ejected it: it is tried no more.
    let status = statuses(&proxy)[1];
    assert!(
        matches!(status, ServerStatus::Ejected | ServerStatus::Unhealthy),
        "{status:?}"
    );
    until(&proxy, "b to fail its health checks", || {
        statuses(&proxy)[1] == ServerStatus::Unhealthy
    })
    .await;
    let failed = failures(&proxy, 1);
    for _ in 0..30 {
        assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
    }
    assert_eq!(failures(&proxy, 1), failed, "an unhealthy server receives no traffic");

    // b comes back on the same port: it passes its checks, then ramps up.
    let b2 = origin_on(b_addr, Proto::Http1, |_| async { text(200, "b") }).await;
    until(&proxy, "b to pass its health checks", || {
        statuses(&proxy)[1] == ServerStatus::Healthy
    })
    .await;
    let snapshot = proxy.snapshot.load();
    let server = &snapshot.upstreams[0].servers[1];
    let weight = server.health.effective_weight(
        &portcullis::upstream::health::ServerSettings {
            weight: 1,
            slow_start: Duration::from_secs(30),
        },
        portcullis::upstream::health::now_ms(),
    );
    assert_eq!(weight, 1, "slow start begins at the lowest weight");
    // Client traffic reaches b again (its origin also counts health checks,
    // so look at the answers).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(proxy.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK);
        if got.text() == "b" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "b never got traffic back");
    }
    assert!(b2.requests() > 0);
}

#[tokio::test]
async fn slow_start_gives_a_returning_server_a_small_share() {
    // Weights 10 and 10, but the second has just rejoined: during its ramp it
    // gets far less than half.
    let a = named("a").await;
    let b = named("b").await;
    let config = group_config(&[a.addr, b.addr], "algorithm = \"round_robin\"\nslow_start = \"60s\"")
        .replace(
            &format!("\"{}\"", a.addr),
            &format!("{{ address = \"{}\", weight = 10 }}", a.addr),
        )
        .replace(
            &format!("\"{}\"", b.addr),
            &format!("{{ address = \"{}\", weight = 10 }}", b.addr),
        );
    let proxy = start_proxy(&config).await;
    proxy.snapshot.load().upstreams[0].servers[1]
        .health
        .rejoined(portcullis::upstream::health::now_ms());
    for _ in 0..100 {
        assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
    }
    assert!(b.requests() <= 15, "b got {} of 100 during its ramp", b.requests());
    assert!(b.requests() >= 1);
}

#[tokio::test]
async fn a_reset_is_retried_for_get_but_a_sent_post_is_never_replayed() {
    // Reads each request head and closes without answering.
    let (closer, closer_seen) = raw_origin(b"").await;
    let good = echo_origin().await;
    let config = group_config(
        &[closer, good.addr],
        "algorithm = \"round_robin\"\n[upstreams.app.outlier]\nconsecutive_failures = 0",
    );
    let proxy = start_proxy(&config).await;

    // Round robin starts with the closing server: the GET is retried on the good one.
    let got = get(proxy.addr, "/idempotent").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(closer_seen.load(Ordering::SeqCst), 1);
    assert_eq!(good.requests(), 1);

    // Whichever server's turn it is, send POSTs until one reaches the closer.
    let mut client = h1(proxy.addr).await;
    let mut post_status = None;
    let mut good_before = 0;
    for _ in 0..2 {
        let before = closer_seen.load(Ordering::SeqCst);
        good_before = good.requests();
        let req = Request::post("/pay")
            .header("host", "test.local")
            .body(full("amount=10"))
            .expect("req");
        let got = read(client.send_ready(req).await.expect("send")).await;
        if closer_seen.load(Ordering::SeqCst) > before {
            post_status = Some((got.status, got.header("proxy-status").map(str::to_owned)));
            break;
        }
        client = h1(proxy.addr).await;
    }
    let (status, proxy_status) = post_status.expect("a POST reached the closing server");
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy_status.as_deref(), Some("portcullis; error=connection_terminated"));
    assert_eq!(
        good.requests(),
        good_before,
        "the POST whose body was sent was not replayed elsewhere"
    );
}

#[tokio::test]
async fn connect_failures_are_retried_for_any_method() {
    let dead = closed_port();
    let good = echo_origin().await;
    let config = group_config(&[dead.addr, good.addr], "algorithm = \"round_robin\"");
    let proxy = start_proxy(&config).await;
    for i in 0..6 {
        let raw_out = raw(
            proxy.addr,
            b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .await;
        assert_eq!(status_of(&raw_out), 200, "POST {i}: {raw_out}");
        assert!(raw_out.ends_with("hello"), "the body arrived intact: {raw_out}");
    }
    assert_eq!(good.requests(), 6);
}

#[tokio::test]
async fn sticky_cookie_pins_a_client_and_falls_back_when_its_server_dies() {
    let a = named("a").await;
    let b = named("b").await;
    let c = named("c").await;
    let config = group_config(
        &[a.addr, b.addr, c.addr],
        "algorithm = \"random\"\nsticky_cookie = \"pc_srv\"",
    );
    let proxy = start_proxy(&config).await;
    let first = get(proxy.addr, "/").await;
    let set_cookie = first.header("set-cookie").expect("a sticky cookie is set").to_owned();
    assert!(
        set_cookie.starts_with("pc_srv=") && set_cookie.contains("HttpOnly"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("pair").to_owned();
    let id = cookie.trim_start_matches("pc_srv=");
    for name in ["a", "b", "c"] {
        assert!(!id.contains(name) || id.len() == 16, "opaque id, not an address: {id}");
    }
    assert!(!set_cookie.contains("127.0.0.1"));
    let pinned = first.text();
    let mut client = h1(proxy.addr).await;
    for _ in 0..20 {
        let req = Request::get("/")
            .header("host", "t")
            .header("cookie", &cookie)
            .body(empty())
            .expect("req");
        let got = read(client.send_ready(req).await.expect("send")).await;
        assert_eq!(got.text(), pinned, "pinned");
        assert!(got.header("set-cookie").is_none(), "no new cookie while the pin holds");
    }
    // The pinned server dies: the client is served elsewhere and re-pinned.
    match pinned.as_str() {
        "a" => a.kill(),
        "b" => b.kill(),
        _ => c.kill(),
    }
    let req = Request::get("/")
        .header("host", "t")
        .header("cookie", &cookie)
        .body(empty())
        .expect("req");
    let mut client = h1(proxy.addr).await;
    let got = read(client.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_ne!(got.text(), pinned);
    assert!(got.header("set-cookie").is_some_and(|c| c.starts_with("pc_srv=")));
}

#[tokio::test]
async fn circuit_breaker_answers_503_at_once_when_full() {
    let (slow, release) = held_origin().await;
    let config = group_config(&[slow.addr], "max_requests_per_server = 1");
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { get(addr, "/").await });
    while slow.requests() < 1 {
        tokio::task::yield_now().await;
    }
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        got.header("proxy-status"),
        Some("portcullis; error=connection_limit_reached")
    );
    release.send(true).expect("release");
    assert_eq!(first.await.expect("first").status, StatusCode::OK);
    assert_eq!(
        get(proxy.addr, "/").await.status,
        StatusCode::OK,
        "room again once the first finished"
    );
}

#[tokio::test]
async fn all_servers_down_is_503_without_hanging() {
    let closed = [closed_port(), closed_port()];
    let dead = [closed[0].addr, closed[1].addr];
    let config = group_config(
        &dead,
        "connect_timeout = \"500ms\"\n[upstreams.app.health_check]\ntype = \"tcp\"\ninterval = \"50ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1",
    );
    let proxy = start_proxy(&config).await;
    // Before the checks notice: refused fast, on every server.
    let started = std::time::Instant::now();
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_millis(500));
    // Once both failed their checks: 503 destination_unavailable at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !statuses(&proxy).iter().all(|s| *s == ServerStatus::Unhealthy) {
        assert!(
            std::time::Instant::now() < deadline,
            "health checks never marked the servers down"
        );
        let _ = get(proxy.addr, "/").await;
        tokio::task::yield_now().await;
    }
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        got.header("proxy-status"),
        Some("portcullis; error=destination_unavailable")
    );
}

#[tokio::test]
async fn consistent_hash_sends_a_key_to_one_server() {
    let servers = [named("a").await, named("b").await, named("c").await];
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let config = group_config(&addrs, "algorithm = \"consistent_hash\"\nhash_key = \"header:x-user\"");
    let proxy = start_proxy(&config).await;
    let mut seen = std::collections::HashMap::new();
    for user in 0..30 {
        for _ in 0..3 {
            let mut client = h1(proxy.addr).await;
            let req = Request::get("/")
                .header("host", "t")
                .header("x-user", format!("user-{user}"))
                .body(empty())
                .expect("req");
            let got = read(client.send_ready(req).await.expect("send")).await;
            let previous = seen.insert(user, got.text());
            if let Some(p) = previous {
                assert_eq!(p, got.text(), "user-{user} moved");
            }
        }
    }
    let distinct: std::collections::HashSet<&String> = seen.values().collect();
    assert!(distinct.len() >= 2, "30 keys should spread over several servers");
}

#[tokio::test]
async fn background_tasks_end_with_their_snapshot() {
    let a = named("a").await;
    let config = group_config(&[a.addr], "[upstreams.app.health_check]\ninterval = \"20ms\"");
    let proxy = start_proxy(&config).await;
    let tasks = proxy.snapshot.load().upstreams[0].background_tasks();
    assert!(!tasks.is_cancelled());
    proxy.shutdown().await;
    assert!(
        tasks.is_cancelled(),
        "dropping the snapshot ends its health checks and maintenance"
    );
}
