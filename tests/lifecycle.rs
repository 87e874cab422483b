//! Connection timers and graceful shutdown.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes; returns how long that took.
async fn time_until_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(result.is_ok(), "the proxy never closed the connection");
    started.elapsed()
}

#[tokio::test]
async fn graceful_drain_finishes_in_flight_requests_and_refuses_new_connections() {
    let (release, released) = tokio::sync::watch::channel(false);
    let origin = origin(move |req| {
        let mut released = released.clone();
        async move {
            if req.uri().path() == "/slow" {
                let _ = released.wait_for(|r| *r).await;
            }
            text(200, "finished")
        }
    })
    .await;
    let config = format!("[server]\ndrain_timeout = \"30s\"\n{}", basic_config(origin.addr));
    let mut proxy = start_proxy(&config).await;
    let addr = proxy.addr;

    // An idle keep-alive client and a client with a slow request in flight.
    let mut idle = TcpStream::connect(addr).await.expect("connect idle");
    idle.write_all(b"GET /fast HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let slow = tokio::spawn(async move { get(addr, "/slow").await });
    while origin.requests() < 2 {
        tokio::task::yield_now().await;
    }

    let done = proxy.begin_shutdown();
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..10_000 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the listener still accepts after shutdown began");
    // The idle keep-alive connection is closed at once.
    assert!(time_until_closed(&mut idle).await < Duration::from_secs(5));
    assert!(!done.is_finished(), "drain must wait for the in-flight request");

    release.send(true).expect("release");
    let got = slow.await.expect("slow client");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), "finished");
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("drain ends")
        .expect("proxy task");
}

#[tokio::test]
async fn drain_deadline_cuts_requests_that_run_too_long() {
    let (origin, _held) = held_origin().await;
    let config = format!("[server]\ndrain_timeout = \"300ms\"\n{}", basic_config(origin.addr));
    let mut proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    while origin.requests() < 1 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), proxy.begin_shutdown())
        .await
        .expect("drain ends")
        .expect("task");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(time_until_closed(&mut stream).await < Duration::from_secs(5));
}

#[tokio::test]
async fn http2_clients_get_goaway_on_shutdown() {
    let origin = echo_origin().await;
    let mut proxy = proxy_to(origin.addr).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("handshake");
    let conn = tokio::spawn(conn);
    let got = read(
        sender
            .send_ready(Request::get("http://a/").body(empty()).expect("req"))
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let done = proxy.begin_shutdown();
    // The client connection ends cleanly (GOAWAY, then close).
    let result = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("h2 connection closes");
    assert!(result.expect("join").is_ok());
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("drain")
        .expect("task");
}

#[tokio::test]
async fn idle_keepalive_connections_are_closed_after_the_idle_timeout() {
    let origin = echo_origin().await;
    let config = format!(
        "[timeouts]\nkeepalive_idle = \"400ms\"\nheader_read = \"5s\"\n{}",
        basic_config(origin.addr)
    );
    let proxy = start_proxy(&config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 2048];
    let n = stream.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let waited = time_until_closed(&mut stream).await;
    assert!(waited >= Duration::from_millis(300), "closed too early: {waited:?}");
    assert!(waited < Duration::from_secs(4), "closed too late: {waited:?}");
}

#[tokio::test]
async fn header_timeout_runs_from_the_first_byte_not_per_read() {
    let origin = echo_origin().await;
    let config = format!(
        "[timeouts]\nheader_read = \"500ms\"\nkeepalive_idle = \"60s\"\n{}",
        basic_config(origin.addr)
    );
    let proxy = start_proxy(&config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    // A slowloris client: one header byte every 50 ms, never finishing.
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ";
    let mut sent = 0usize;
    let closed_after = loop {
        ticker.tick().await;
        let byte = if sent < head.len() { head[sent] } else { b'a' };
        if stream.write_all(&[byte]).await.is_err() {
            break started.elapsed();
        }
        sent += 1;
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slowloris kept the connection open"
        );
    };
    assert!(
        closed_after >= Duration::from_millis(400),
        "closed too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed too late: {closed_after:?}"
    );
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let origin = echo_origin().await;
    let config = format!(
        "[timeouts]\nheader_read = \"300ms\"\nkeepalive_idle = \"60s\"\n{}",
        basic_config(origin.addr)
    );
    let proxy = start_proxy(&config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let waited = time_until_closed(&mut stream).await;
    assert!(waited < Duration::from_secs(4), "{waited:?}");
}

#[tokio::test]
async fn upstream_names_are_resolved() {
    let origin = echo_origin().await;
    let config =
        basic_config(origin.addr).replace(&origin.addr.to_string(), &format!("localhost:{}", origin.addr.port()));
    let proxy = start_proxy(&config).await;
    let got = get(proxy.addr, "/by-name").await;
    assert_eq!(got.status, StatusCode::OK);
}

/// A config with one part of every kind that outlives a snapshot.
fn stateful_config(origin: std::net::SocketAddr, limit: &str, second_group: &str) -> String {
    format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
name = "api"
path = "/api"
upstream = "app"
[routes.rate_limit]
rate = "{limit}"
burst = 2

[[routes]]
name = "site"
upstream = "other"
cache = {{}}

[upstreams.app]
servers = ["{origin}"]

[upstreams.other]
servers = ["{second_group}"]

[protect.bans]
strikes = 3
[protect.load_shedding]
min_limit = 4
[protect.adaptive]
min_rate = 1000
"#
    )
}

/// The same object, not an equal one.
fn same<T>(a: &std::sync::Arc<T>, b: &std::sync::Arc<T>) -> bool {
    std::sync::Arc::ptr_eq(a, b)
}

/// Reloads the proxy with `toml` (the path SIGHUP takes); returns the state
/// the next snapshot would be built from.
async fn rebuild(proxy: &TestProxy, toml: &str) -> portcullis::state::Kept {
    let config = portcullis::Config::from_toml(toml, "test").unwrap();
    proxy
        .reloader
        .apply(config, "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    proxy.reloader.kept().await
}

#[tokio::test]
async fn a_rebuilt_snapshot_carries_every_part_over_by_name() {
    let origin = echo_origin().await;
    let toml = stateful_config(origin.addr, "1/m", &origin.addr.to_string());
    let proxy = start_proxy(&toml).await;
    let before = proxy.snapshot.load_full();
    // Spend the route's burst: the limiter's state is what must survive.
    spend_burst(proxy.addr, "/api", 2).await;

    rebuild(&proxy, &toml).await;
    let after = proxy.snapshot.load_full();
    assert!(!std::sync::Arc::ptr_eq(&before, &after), "a new snapshot");
    assert!(same(
        before.route_limits[0].as_ref().unwrap(),
        after.route_limits[0].as_ref().unwrap()
    ));
    for (a, b) in before.upstreams.iter().zip(&after.upstreams) {
        assert!(same(a, b), "upstream {}", a.config.name);
    }
    for (a, b) in before.shedders.iter().zip(&after.shedders) {
        assert!(same(a.as_ref().unwrap(), b.as_ref().unwrap()));
    }
    assert!(same(before.bans.as_ref().unwrap(), after.bans.as_ref().unwrap()));
    assert!(same(
        before.adaptive.as_ref().unwrap(),
        after.adaptive.as_ref().unwrap()
    ));
    assert!(same(before.cache.as_ref().unwrap(), after.cache.as_ref().unwrap()));
    assert!(same(&before.challenge, &after.challenge));
    // The client's spent burst came across: still refused on the new snapshot.
    assert_eq!(get(proxy.addr, "/api").await.status, StatusCode::TOO_MANY_REQUESTS);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_rebuilt_snapshot_builds_changed_parts_fresh_and_keeps_the_rest() {
    let origin = echo_origin().await;
    let other = echo_origin().await;
    let toml = stateful_config(origin.addr, "1/m", &origin.addr.to_string());
    let proxy = start_proxy(&toml).await;
    let before = proxy.snapshot.load_full();
    spend_burst(proxy.addr, "/api", 2).await;

    // A new limit for "api" and a new server list for "other".
    let changed = stateful_config(origin.addr, "2/m", &other.addr.to_string());
    let kept = rebuild(&proxy, &changed).await;
    let after = proxy.snapshot.load_full();
    assert!(!same(
        before.route_limits[0].as_ref().unwrap(),
        after.route_limits[0].as_ref().unwrap()
    ));
    assert!(same(&before.upstreams[0], &after.upstreams[0]), "app is unchanged");
    assert!(
        !same(&before.upstreams[1], &after.upstreams[1]),
        "other has a new server"
    );
    assert!(same(before.cache.as_ref().unwrap(), after.cache.as_ref().unwrap()));
    assert!(same(before.bans.as_ref().unwrap(), after.bans.as_ref().unwrap()));
    // The new limiter starts with a full burst.
    assert_eq!(get(proxy.addr, "/api").await.status, StatusCode::OK);

    // A route whose limit is removed and put back starts afresh: what is no
    // longer configured is not kept.
    let unlimited = changed.replace("[routes.rate_limit]\nrate = \"2/m\"\nburst = 2\n", "");
    let config = portcullis::Config::from_toml(&unlimited, "test").unwrap();
    let without = portcullis::server::validate(&config, &proxy.observe, &kept)
        .await
        .unwrap();
    assert!(without.snapshot.route_limits[0].is_none());
    let config = portcullis::Config::from_toml(&changed, "test").unwrap();
    let again = portcullis::server::validate(&config, &proxy.observe, &without.kept)
        .await
        .unwrap();
    assert!(!same(
        after.route_limits[0].as_ref().unwrap(),
        again.snapshot.route_limits[0].as_ref().unwrap()
    ));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_config_that_fails_to_build_changes_nothing_kept() {
    let origin = echo_origin().await;
    let toml = stateful_config(origin.addr, "1/m", &origin.addr.to_string());
    let proxy = start_proxy(&toml).await;
    let before = proxy.snapshot.load_full();
    let broken = format!("{toml}\n[protect.challenge]\nkey_file = \"/nonexistent/portcullis-key\"\n");
    let config = portcullis::Config::from_toml(&broken, "test").unwrap();
    let kept = proxy.reloader.kept().await;
    let errors = portcullis::server::validate(&config, &proxy.observe, &kept)
        .await
        .err()
        .expect("a missing key file is an error");
    assert!(errors.to_string().contains("protect.challenge.key_file"), "{errors}");
    // The kept state still builds the same parts as before.
    let config = portcullis::Config::from_toml(&toml, "test").unwrap();
    let rebuilt = portcullis::server::validate(&config, &proxy.observe, &kept)
        .await
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&before.challenge, &rebuilt.snapshot.challenge));
    assert!(std::sync::Arc::ptr_eq(
        before.cache.as_ref().unwrap(),
        rebuilt.snapshot.cache.as_ref().unwrap()
    ));
    proxy.shutdown().await;
}
