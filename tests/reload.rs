//! Reloading the whole config of a running proxy (`server::Reloader`, what
//! SIGHUP runs): new routes answer, state is carried over, a bad config
//! changes nothing, and requests under load never fail across reloads.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http::{Request, StatusCode};
use support::*;

/// The proxy's listener is the same across these reloads (a reload cannot
/// change listeners); `extra` adds routes or sections.
fn config(listen: &str, origin: std::net::SocketAddr, extra: &str) -> String {
    with_servers(listen, &format!("\"{origin}\""), extra)
}

/// [`config`] with the group's `servers` list written out.
fn with_servers(listen: &str, servers: &str, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
bind = "{listen}"

[[routes]]
name = "api"
path = "/api"
upstream = "app"
[routes.rate_limit]
rate = "1/m"
burst = 2

[[routes]]
name = "site"
path = "/"
upstream = "app"

[upstreams.app]
servers = [{servers}]
{extra}
"#
    )
}

const NEW_ROUTE: &str = "[[routes]]\nname = \"new\"\npath = \"/new\"\npath_match = \"exact\"\nupstream = \"app\"\nrequest_headers = { set = { \"x-route\" = \"new\" } }\n";

async fn reload(proxy: &TestProxy, toml: &str) -> Result<portcullis::plan::Plan, portcullis::config::ConfigErrors> {
    let config = portcullis::Config::from_toml(toml, "reload").unwrap();
    proxy.reloader.apply(config, "test").await
}

/// Starts a proxy; the listen text is what reload configs repeat (a reload
/// compares the config, so `127.0.0.1:0` names the same listener).
async fn start(origin: std::net::SocketAddr, extra: &str) -> (TestProxy, String) {
    let listen = "127.0.0.1:0".to_owned();
    let proxy = start_proxy(&config(&listen, origin, extra)).await;
    (proxy, listen)
}

#[tokio::test]
async fn a_reload_adds_a_route_and_an_open_connection_uses_it_at_its_next_request() {
    let origin = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    let mut conn = h1(proxy.addr).await;
    let req = |path: &str| Request::get(path).header("host", "x").body(empty()).unwrap();
    let before = read(conn.send_ready(req("/new")).await.unwrap()).await;
    assert_eq!(before.echoed().get("x-route"), None, "served by the catch-all route");

    reload(&proxy, &config(&listen, origin.addr, NEW_ROUTE)).await.unwrap();
    let after = read(conn.send_ready(req("/new")).await.unwrap()).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(
        after.echoed().get("x-route"),
        Some("new"),
        "the same connection sees the new route"
    );

    reload(&proxy, &config(&listen, origin.addr, "")).await.unwrap();
    let removed = read(conn.send_ready(req("/new")).await.unwrap()).await;
    assert_eq!(
        removed.echoed().get("x-route"),
        None,
        "and stops seeing it once removed"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reload_carries_limiter_state_and_upstream_groups_over() {
    let origin = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    spend_burst(proxy.addr, "/api", 2).await;
    let before = proxy.snapshot.load_full();

    reload(&proxy, &config(&listen, origin.addr, NEW_ROUTE)).await.unwrap();
    let after = proxy.snapshot.load_full();
    assert!(!Arc::ptr_eq(&before, &after), "a new snapshot is in use");
    assert!(
        Arc::ptr_eq(&before.upstreams[0], &after.upstreams[0]),
        "the group (pools, health) is kept"
    );
    assert_eq!(
        get(proxy.addr, "/api").await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the spent burst is still spent"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_changed_group_keeps_the_live_state_and_pools_of_its_servers() {
    let (a, b, c) = (echo_origin().await, echo_origin().await, echo_origin().await);
    let two = format!("\"{}\", \"{}\"", a.addr, b.addr);
    let (proxy, listen) = start(a.addr, "").await;
    reload(&proxy, &with_servers(&listen, &two, "")).await.unwrap();
    let old = proxy.snapshot.load_full().upstreams[0].clone();
    old.servers[1].health.draining.store(true, Ordering::Relaxed);
    old.servers[0].set_weight(Some(7));
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
    assert_eq!(a.connections.load(Ordering::SeqCst), 1, "served by a (b drains)");

    let three = format!("{two}, \"{}\"", c.addr);
    reload(&proxy, &with_servers(&listen, &three, "")).await.unwrap();
    let new = proxy.snapshot.load_full().upstreams[0].clone();
    assert!(!Arc::ptr_eq(&old, &new), "the group changed, so it was rebuilt");
    for i in 0..2 {
        assert!(
            Arc::ptr_eq(&old.servers[i].health, &new.servers[i].health),
            "server {i}"
        );
        assert!(Arc::ptr_eq(&old.servers[i].pool, &new.servers[i].pool), "server {i}");
    }
    assert!(new.servers[1].health.draining.load(Ordering::Relaxed), "b still drains");
    assert_eq!(new.servers[0].weight(), 7);
    assert!(!new.servers[2].health.draining.load(Ordering::Relaxed), "c is new");
    drop((old, new));

    // a's configured weight changes: the file's newer word replaces the
    // operator's; connection settings change: pools start empty.
    let reweighted = format!(
        "{{ address = \"{}\", weight = 3 }}, \"{}\", \"{}\"",
        a.addr, b.addr, c.addr
    );
    let before = proxy.snapshot.load_full().upstreams[0].clone();
    let text = with_servers(&listen, &reweighted, "").replace("servers = [", "pool_size = 3\nservers = [");
    reload(&proxy, &text).await.unwrap();
    let after = proxy.snapshot.load_full().upstreams[0].clone();
    assert!(Arc::ptr_eq(&before.servers[0].health, &after.servers[0].health));
    assert_eq!(after.servers[0].weight(), 3, "the file's new weight");
    assert_eq!(
        before.servers[0].weight(),
        7,
        "the old group, serving its last requests, is untouched"
    );
    assert!(
        !Arc::ptr_eq(&before.servers[0].pool, &after.servers[0].pool),
        "new pool settings"
    );
    drop((before, after));
    proxy.shutdown().await;
}

#[tokio::test]
async fn bans_and_cache_entries_survive_a_reload_that_changes_their_settings() {
    let origin = origin(|_| async {
        let mut r = text(200, &"x".repeat(400_000));
        r.headers_mut()
            .insert("cache-control", http::HeaderValue::from_static("max-age=600"));
        r
    })
    .await;
    let cached = |memory: &str, max_object: &str, ban: &str| {
        format!(
            "[[routes]]\nname = \"c\"\npath = \"/c/\"\nupstream = \"app\"\ncache = true\n\
             [cache]\nmemory = \"{memory}\"\nmax_object_size = \"{max_object}\"\n\
             [protect.bans]\nduration = \"{ban}\"\n"
        )
    };
    let (proxy, listen) = start(origin.addr, &cached("4MiB", "512KiB", "1h")).await;
    let paths = ["/c/1", "/c/2", "/c/3", "/c/4"];
    for path in paths {
        assert_eq!(get(proxy.addr, path).await.status, StatusCode::OK);
    }
    assert_eq!(origin.requests.load(Ordering::SeqCst), 4);
    let banned: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    let until = portcullis::upstream::health::now_ms() + 3_600_000;
    proxy.snapshot.load().bans.as_ref().unwrap().ban(banned, until);

    let changed = cached("4MiB", "512KiB", "2h");
    reload(&proxy, &config(&listen, origin.addr, &changed)).await.unwrap();
    assert_eq!(get_from(9, proxy.addr).await, None, "still banned: closed at accept");
    let cache = proxy.snapshot.load().cache.clone().unwrap();
    assert_eq!(cache.store().keys(), 4, "the entries are kept");
    let entry = cache.store().bytes() / 4;
    drop(cache);

    // A budget of three entries evicts the least recently used (/c/1).
    let smaller = cached(&format!("{}", entry * 3 + 10), &format!("{}", entry + entry / 4), "2h");
    // A dry run builds the same snapshot, and evicts nothing.
    let dry = portcullis::Config::from_toml(&config(&listen, origin.addr, &smaller), "dry").unwrap();
    let plan = proxy.reloader.dry_run(dry).await.unwrap();
    assert!(plan.text().starts_with("flush       cache.memory:"), "{}", plan.text());
    assert_eq!(
        proxy.snapshot.load().cache.clone().unwrap().store().keys(),
        4,
        "a dry run changes nothing"
    );
    reload(&proxy, &config(&listen, origin.addr, &smaller)).await.unwrap();
    let cache = proxy.snapshot.load().cache.clone().unwrap();
    assert_eq!(cache.store().keys(), 3, "shrunk in place");
    drop(cache);
    for path in &paths[1..] {
        assert_eq!(get(proxy.addr, path).await.status, StatusCode::OK);
    }
    assert_eq!(origin.requests.load(Ordering::SeqCst), 4, "the three left are hits");
    assert_eq!(get(proxy.addr, "/c/1").await.status, StatusCode::OK);
    assert_eq!(origin.requests.load(Ordering::SeqCst), 5, "the evicted one is a miss");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_removed_listener_refuses_new_connections_while_its_request_finishes() {
    let (held, release) = held_origin().await;
    let extra = "[[listeners]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\n";
    let (proxy, listen) = start(held.addr, extra).await;
    let addrs = proxy.reloader.local_addrs().await;
    let extra_addr = addrs[1];
    let in_flight = tokio::spawn(async move { get(extra_addr, "/").await.status });
    while held.requests.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }

    let plan = reload(&proxy, &config(&listen, held.addr, "")).await.unwrap();
    assert_eq!(
        plan.text(),
        "remove      listener \"extra\": release 127.0.0.1:0\n1 change\n"
    );
    // The accept loop stops on its own task: connect until refused.
    let mut refused = false;
    for _ in 0..10_000 {
        if tokio::net::TcpStream::connect(extra_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the removed listener's socket is closed");
    release.send(true).unwrap();
    assert_eq!(in_flight.await.unwrap(), StatusCode::OK, "its request finished");
    assert_eq!(
        get(proxy.addr, "/").await.status,
        StatusCode::OK,
        "the other listener serves"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_changed_listener_keeps_its_socket_and_new_connections_get_the_new_settings() {
    let origin = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    let mut before = support::h2(proxy.addr).await;
    let req = || Request::get("http://x/").body(empty()).unwrap();
    assert_eq!(
        read(before.send_request(req()).await.unwrap()).await.status,
        StatusCode::OK
    );

    let http1_only = config(&listen, origin.addr, "").replacen(
        &format!("bind = \"{listen}\""),
        &format!("bind = \"{listen}\"\nprotocol = \"http1\""),
        1,
    );
    reload(&proxy, &http1_only).await.unwrap();
    assert_eq!(proxy.reloader.local_addrs().await, [proxy.addr], "the same socket");
    assert_eq!(
        read(before.send_request(req()).await.unwrap()).await.status,
        StatusCode::OK,
        "an open connection keeps what it had"
    );
    assert_eq!(
        get(proxy.addr, "/").await.status,
        StatusCode::OK,
        "HTTP/1.1 still served"
    );
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    assert!(
        sender.send_request(req()).await.is_err(),
        "a new connection is HTTP/1.1 only"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_renamed_listener_keeps_its_fixed_port_socket() {
    let origin = echo_origin().await;
    // A fixed port on an address no other test binds: free it, then name it.
    let fixed = {
        let probe = std::net::TcpListener::bind("127.0.0.77:0").unwrap();
        probe.local_addr().unwrap()
    };
    let named = |name: &str| {
        config(&fixed.to_string(), origin.addr, "").replacen(
            "[[listeners]]\n",
            &format!("[[listeners]]\nname = \"{name}\"\n"),
            1,
        )
    };
    let proxy = start_proxy(&named("old")).await;
    let mut open = h1(fixed).await;
    let plan = reload(&proxy, &named("new"))
        .await
        .expect("the address moves with its socket");
    assert_eq!(
        plan.text(),
        format!(
            "add         listener \"new\": bind {fixed}\nremove      listener \"old\": release {fixed}\n2 changes\n"
        )
    );
    assert_eq!(proxy.reloader.local_addrs().await, [fixed]);
    assert_eq!(get(fixed, "/").await.status, StatusCode::OK, "still accepting");
    let req = Request::get("/").header("host", "x").body(empty()).unwrap();
    assert_eq!(
        read(open.send_ready(req).await.unwrap()).await.status,
        StatusCode::OK,
        "and the open connection lives"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_port_that_cannot_be_bound_fails_the_reload_and_changes_nothing() {
    let origin = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    let before = proxy.snapshot.load_full();
    let clash = config(
        &listen,
        origin.addr,
        &format!("{NEW_ROUTE}[[listeners]]\nname = \"clash\"\nbind = \"{port}\"\n"),
    );
    let errors = reload(&proxy, &clash).await.unwrap_err().to_string();
    assert!(
        errors.contains(&format!("listeners[1].bind: cannot listen on {port}")),
        "{errors}"
    );
    assert!(Arc::ptr_eq(&before, &proxy.snapshot.load_full()), "nothing swapped");
    assert_eq!(proxy.reloader.local_addrs().await, [proxy.addr]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_watched_config_file_reloads_when_its_content_changes() {
    let origin = echo_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.toml");
    let watched = "[server]\nwatch_config = \"100ms\"\n";
    std::fs::write(&file, config("127.0.0.1:0", origin.addr, watched)).unwrap();
    let proxy = start_proxy_file(&file).await;
    let mut reloaded = proxy.reloader.subscribe();
    assert_eq!(get(proxy.addr, "/new").await.echoed().get("x-route"), None);

    std::fs::write(
        &file,
        config("127.0.0.1:0", origin.addr, &format!("{watched}{NEW_ROUTE}")),
    )
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), reloaded.changed())
        .await
        .expect("a reload within 10 s")
        .unwrap();
    assert_eq!(*reloaded.borrow(), 2);
    assert_eq!(get(proxy.addr, "/new").await.echoed().get("x-route"), Some("new"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_broken_config_keeps_the_running_one_and_says_why() {
    let origin = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    let before = proxy.snapshot.load_full();
    let broken = config(
        &listen,
        origin.addr,
        "[[routes]]\nname = \"bad\"\npath = \"/bad\"\nupstream = \"nowhere\"\n",
    );
    let errors = portcullis::Config::from_toml(&broken, "reload").expect_err("an unknown group");
    assert!(errors.to_string().contains("routes[2].upstream"), "{errors}");

    // Parses, but a key file that does not exist fails the build.
    let unbuildable = config(
        &listen,
        origin.addr,
        "[protect.challenge]\nkey_file = \"/nonexistent/portcullis-key\"\n",
    );
    let errors = reload(&proxy, &unbuildable).await.expect_err("a missing key file");
    assert!(errors.to_string().contains("protect.challenge.key_file"), "{errors}");
    assert!(Arc::ptr_eq(&before, &proxy.snapshot.load_full()), "nothing was swapped");
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK, "still serving");
    proxy.shutdown().await;
}

#[tokio::test]
async fn changes_a_reload_cannot_apply_are_refused_with_their_paths() {
    let origin = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    let before = proxy.snapshot.load_full();
    let caps = "[protect]\nmax_connections = 50\n[access_log]\ndestination = \"stdout\"\n";
    let other = config(&listen, origin.addr, caps);
    let errors = reload(&proxy, &other)
        .await
        .expect_err("connection caps and log outputs need a restart");
    let text = errors.to_string();
    assert!(
        text.contains(
            "protect.max_connections: none -> 50: a reload cannot apply this change yet; restart the proxy for it"
        ),
        "{text}"
    );
    assert!(text.contains("access_log: changed: a reload cannot apply"), "{text}");
    assert!(Arc::ptr_eq(&before, &proxy.snapshot.load_full()));
    // A change a reload can apply, beside the refused one, is not applied
    // either: a reload is whole or nothing.
    let mixed = format!("{}{NEW_ROUTE}", config(&listen, origin.addr, caps));
    assert!(reload(&proxy, &mixed).await.is_err());
    assert!(Arc::ptr_eq(&before, &proxy.snapshot.load_full()));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_under_load_never_fail_across_fifty_reloads_of_routes_servers_and_listeners() {
    let origin = echo_origin().await;
    let second = echo_origin().await;
    let (proxy, listen) = start(origin.addr, "").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let addr = proxy.addr;
        clients.push(tokio::spawn(async move {
            let h2 = i % 2 == 1;
            let mut h1c = if h2 { None } else { Some(h1(addr).await) };
            let mut h2c = if h2 { Some(support::h2(addr).await) } else { None };
            // Bounded: at most 20,000 requests per client.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = Request::get("/").header("host", "x").body(empty()).unwrap();
                let sent = match (&mut h1c, &mut h2c) {
                    (Some(c), _) => c.send_ready(req).await,
                    (_, Some(c)) => c.send_ready(req).await,
                    _ => unreachable!(),
                };
                let good = match sent {
                    Ok(response) => read(response).await.status == StatusCode::OK,
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let extra_listener = "[[listeners]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\n";
    for round in 0..50 {
        // Alternately add a route, a second server and a second listener,
        // and take them away.
        let toml = if round % 2 == 0 {
            config(&listen, origin.addr, &format!("{NEW_ROUTE}{extra_listener}")).replace(
                &format!("servers = [\"{}\"]", origin.addr),
                &format!("servers = [\"{}\", \"{}\"]", origin.addr, second.addr),
            )
        } else {
            config(&listen, origin.addr, "")
        };
        let before = ok.load(Ordering::Relaxed);
        reload(&proxy, &toml).await.unwrap();
        let addrs = proxy.reloader.local_addrs().await;
        assert_eq!(addrs[0], proxy.addr, "the first listener keeps its socket");
        let got = get(proxy.addr, "/new").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.echoed().get("x-route").is_some(), round % 2 == 0, "round {round}");
        if round % 2 == 0 {
            assert_eq!(addrs.len(), 2);
            let on_new = get(addrs[1], "/new").await;
            assert_eq!(on_new.echoed().get("x-route"), Some("new"), "the added listener serves");
        } else {
            assert_eq!(addrs.len(), 1, "the extra listener is gone");
        }
        // Let requests flow between reloads (waits on progress, not time).
        while ok.load(Ordering::Relaxed) < before + 20 {
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{} ok", ok.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) >= 1000);
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_reload_is_audited_and_counted_good_or_bad() {
    let origin = echo_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!(
        "[audit_log]\npath = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        audit.display().to_string()
    );
    let (proxy, listen) = start(origin.addr, &extra).await;
    reload(&proxy, &config(&listen, origin.addr, &format!("{extra}{NEW_ROUTE}")))
        .await
        .unwrap();
    let refused = config(
        &listen,
        origin.addr,
        &format!("{extra}[protect]\nmax_connections = 50\n"),
    );
    reload(&proxy, &refused).await.unwrap_err();
    let text = metrics(&proxy).await;
    assert!(
        text.contains("portcullis_reloads_total{kind=\"config\",result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_reloads_total{kind=\"config\",result=\"error\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_config_reloads_total{result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_config_reloads_total{result=\"error\"} 1"),
        "{text}"
    );
    proxy.shutdown().await;
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "process.start",
            "config.load",
            "config.load",
            "config.reload_failed",
            "process.stop"
        ]
    );
    assert_eq!(events[2]["trigger"], "test");
    assert_eq!(events[2]["routes"], serde_json::json!(["api", "site", "new"]));
    assert_eq!(events[3]["trigger"], "test");
    let errors = events[3]["errors"].as_array().unwrap();
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with("protect.max_connections: none -> 50: a reload cannot apply"),
        "{errors:?}"
    );
    assert_eq!(
        events[2]["changes"],
        serde_json::json!([{"action": "add", "subject": "route \"new\"", "detail": "any host /new (exact) -> app"}]),
        "the record says what changed"
    );
    let would = events[3]["changes"].as_array().unwrap();
    assert!(
        would
            .iter()
            .any(|d| d["subject"] == "protect.max_connections" && d["restart"] == true),
        "and what would have: {would:?}"
    );
}
