//! The admin API over real sockets: tokens and roles, every endpoint's
//! happy path and bad input, drain, purge, bans and modes acting on
//! traffic, the audit record of every change, what a reload does to
//! runtime changes, and `/readyz` at the start of a drain.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::sync::atomic::Ordering;

use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use support::*;

const OPS: &str = "ops-token-0123456789";
const VIEW: &str = "view-token-0123456789";

/// A token file with an operator and a read-only token, and the `[admin]`
/// section naming it.
struct Admin {
    _dir: tempfile::TempDir,
    section: String,
    audit: std::path::PathBuf,
}

fn admin_section() -> Admin {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("ops:operator:{OPS}\nview:read:{VIEW}\n")).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let section = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntokens_file = {:?}\n[audit_log]\npath = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        tokens.display().to_string(),
        audit.display().to_string()
    );
    Admin {
        _dir: dir,
        section,
        audit,
    }
}

/// One admin request; the answer's status and JSON body (`Null` when the
/// body is not JSON).
async fn call(proxy: &TestProxy, method: Method, path: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut conn = h1(proxy.admin_addr.expect("admin on")).await;
    let mut req = Request::builder().method(method).uri(path).header("host", "admin");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let got = read(conn.send_ready(req.body(full(body.to_owned())).unwrap()).await.unwrap()).await;
    (got.status, serde_json::from_slice(&got.body).unwrap_or(Value::Null))
}

async fn ops(proxy: &TestProxy, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    call(proxy, method, path, Some(OPS), body).await
}

fn audit_events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn tokens_and_roles_are_enforced_and_failures_counted() {
    let origin = echo_origin().await;
    let a = admin_section();
    let proxy = start_proxy(&Template::new(&[origin.addr]).extra(&a.section).build()).await;

    let (status, body) = call(&proxy, Method::GET, "/v1/status", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "a valid bearer token is required");
    let (status, _) = call(&proxy, Method::GET, "/v1/status", Some("ops-token-0123456780"), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a wrong token");

    let (status, body) = call(&proxy, Method::GET, "/v1/status", Some(VIEW), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["generation"], 1);
    assert_eq!(body["ready"], true);

    let drain = format!("/v1/upstreams/app/servers/{}/drain", origin.addr);
    let (status, body) = call(&proxy, Method::POST, &drain, Some(VIEW), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("may only read"));
    assert!(
        !proxy.snapshot.load().upstreams[0].servers[0]
            .health
            .draining
            .load(Ordering::Relaxed),
        "nothing changed"
    );

    // Unauthenticated, as load balancers expect.
    assert_eq!(call(&proxy, Method::GET, "/healthz", None, "").await.0, StatusCode::OK);
    assert_eq!(
        call(&proxy, Method::GET, "/readyz", None, "").await.1,
        json!({"ready": true})
    );

    // Wrong method, unknown path.
    assert_eq!(
        ops(&proxy, Method::DELETE, "/v1/status", "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        ops(&proxy, Method::GET, "/v1/nothing", "").await.0,
        StatusCode::NOT_FOUND
    );

    // The Prometheus text, on the admin listener too.
    let mut conn = h1(proxy.admin_addr.unwrap()).await;
    let req = Request::get("/metrics")
        .header("host", "admin")
        .header("authorization", format!("Bearer {VIEW}"))
        .body(empty())
        .unwrap();
    let text = read(conn.send_ready(req).await.unwrap()).await.text();
    assert!(
        text.contains("portcullis_admin_requests_total{result=\"unauthorized\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_admin_requests_total{result=\"forbidden\"} 1"),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_tokens_only_local_non_browser_callers_are_served() {
    let origin = echo_origin().await;
    let proxy = start_proxy(
        &Template::new(&[origin.addr])
            .extra("[admin]\nlisten = \"127.0.0.1:0\"\n")
            .build(),
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    let ask = |host: &str, origin_header: Option<&str>| {
        let mut req = Request::post(format!("/v1/upstreams/app/servers/{}/drain", origin.addr)).header("host", host);
        if let Some(o) = origin_header {
            req = req.header("origin", o);
        }
        req.body(empty()).unwrap()
    };
    let mut conn = h1(admin).await;
    let page = read(
        conn.send_ready(ask("127.0.0.1", Some("http://evil.example")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        page.status,
        StatusCode::FORBIDDEN,
        "a cross-site form post from a browser"
    );
    let rebound = read(conn.send_ready(ask("evil.example", None)).await.unwrap()).await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN, "DNS rebinding: a foreign Host");
    assert!(
        !proxy.snapshot.load().upstreams[0].servers[0]
            .health
            .draining
            .load(Ordering::Relaxed)
    );
    let local = read(conn.send_ready(ask("localhost:9090", None)).await.unwrap()).await;
    assert_eq!(local.status, StatusCode::OK, "curl on this host: {}", local.text());
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_config_text_needs_an_operator_token() {
    let origin = echo_origin().await;
    let a = admin_section();
    let proxy = start_proxy(&Template::new(&[origin.addr]).extra(&a.section).build()).await;
    assert_eq!(
        call(&proxy, Method::GET, "/v1/config", Some(VIEW), "").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&proxy, Method::GET, "/v1/config", Some(OPS), "").await.0,
        StatusCode::OK
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_speaks_http2() {
    let origin = echo_origin().await;
    let a = admin_section();
    let proxy = start_proxy(&Template::new(&[origin.addr]).extra(&a.section).build()).await;
    let mut conn = h2(proxy.admin_addr.unwrap()).await;
    let req = Request::get("http://admin/v1/upstreams")
        .header("authorization", format!("Bearer {VIEW}"))
        .body(empty())
        .unwrap();
    let got = read(conn.send_request(req).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["upstreams"][0]["name"], "app");
    assert_eq!(body["upstreams"][0]["servers"][0]["server"], origin.addr.to_string());
    assert_eq!(body["upstreams"][0]["servers"][0]["status"], "healthy");
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_tokens_the_api_refuses_a_public_address_and_names_bad_token_files() {
    let origin = echo_origin().await;
    let public = Template::new(&[origin.addr])
        .extra("[admin]\nlisten = \"0.0.0.0:0\"\n")
        .build();
    let errors = portcullis::Config::from_toml(&public, "t").unwrap_err().to_string();
    assert!(
        errors.contains("admin.listen: 0.0.0.0:0 is not a loopback address"),
        "{errors}"
    );

    let missing = Template::new(&[origin.addr])
        .extra("[admin]\nlisten = \"127.0.0.1:0\"\ntokens_file = \"/nonexistent/tokens\"\n")
        .build();
    let config = portcullis::Config::from_toml(&missing, "t").unwrap();
    let errors = match portcullis::Proxy::bind(config).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing token file must stop the start"),
    };
    assert!(
        errors.contains("admin.tokens_file: /nonexistent/tokens: cannot read"),
        "{errors}"
    );
}

#[tokio::test]
async fn a_drained_server_gets_no_new_requests_while_its_own_finish() {
    let (held, release) = held_origin().await;
    let other = echo_origin().await;
    let a = admin_section();
    let config = Template::new(&[held.addr, other.addr])
        .group("algorithm = \"round_robin\"")
        .extra(&a.section)
        .build();
    let proxy = start_proxy(&config).await;
    // Requests until one is held at `held`.
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move {
        loop {
            let got = get(addr, "/").await;
            if got.text() == "released" {
                return got.status;
            }
        }
    });
    while held.requests.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }

    let drain = format!("/v1/upstreams/app/servers/{}/drain", held.addr);
    let (status, body) = ops(&proxy, Method::POST, &drain, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["draining"], true);
    assert_eq!(body["in_flight"], 1, "its request is still in flight");
    let (_, view) = ops(&proxy, Method::GET, "/v1/upstreams", "").await;
    assert_eq!(view["upstreams"][0]["servers"][0]["status"], "draining");

    let before = held.requests.load(Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
    }
    assert_eq!(held.requests.load(Ordering::SeqCst), before, "the balancer skips it");
    release.send(true).unwrap();
    assert_eq!(
        in_flight.await.unwrap(),
        StatusCode::OK,
        "the drained server's request finished"
    );

    let undrain = format!("/v1/upstreams/app/servers/{}/undrain", held.addr);
    assert_eq!(ops(&proxy, Method::POST, &undrain, "").await.0, StatusCode::OK);
    for _ in 0..4 {
        get(proxy.addr, "/").await;
    }
    assert!(held.requests.load(Ordering::SeqCst) > before, "back in rotation");

    // Unknown names.
    let (status, body) = ops(&proxy, Method::POST, "/v1/upstreams/nope/servers/x:1/drain", "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no upstream group \"nope\""))
    );
    let (status, _) = ops(&proxy, Method::POST, "/v1/upstreams/app/servers/10.9.9.9:1/drain", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    proxy.shutdown().await;
    let kinds: Vec<Value> = audit_events(&a.audit)
        .into_iter()
        .filter(|e| e["event"] == "change")
        .map(|e| json!([e["caller"], e["change"], e["result"]]))
        .collect();
    assert_eq!(
        kinds,
        [
            json!(["admin:ops", "drain", "ok"]),
            json!(["admin:ops", "undrain", "ok"]),
            json!(["admin:ops", "drain", "error"]),
            json!(["admin:ops", "drain", "error"]),
        ],
        "one audit record per change, refused ones too"
    );
}

#[tokio::test]
async fn weights_are_set_reset_and_checked() {
    let origin = echo_origin().await;
    let a = admin_section();
    let proxy = start_proxy(&Template::new(&[origin.addr]).extra(&a.section).build()).await;
    let path = format!("/v1/upstreams/app/servers/{}/weight", origin.addr);
    let (status, body) = ops(&proxy, Method::PUT, &path, "{\"weight\": 7}").await;
    assert_eq!((status, &body["weight"]), (StatusCode::OK, &json!(7)));
    let (_, view) = ops(&proxy, Method::GET, "/v1/upstreams", "").await;
    assert_eq!(view["upstreams"][0]["servers"][0]["weight"], 7);
    assert_eq!(view["upstreams"][0]["servers"][0]["configured_weight"], 1);
    let (status, body) = ops(&proxy, Method::PUT, &path, "{\"weight\": null}").await;
    assert_eq!(
        (status, &body["weight"]),
        (StatusCode::OK, &json!(1)),
        "back to the configured one"
    );
    for bad in ["{\"weight\": 0}", "{\"weight\": -1}", "{\"weight\": \"7\"}", "7", "{"] {
        let (status, body) = ops(&proxy, Method::PUT, &path, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body["error"].is_string(), "{bad}: a message");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn purge_removes_entries_by_url_prefix_and_tag() {
    let origin = origin(|req| async move {
        let mut r = text(200, req.uri().path());
        r.headers_mut()
            .insert("cache-control", http::HeaderValue::from_static("max-age=600"));
        r.headers_mut()
            .insert("surrogate-key", http::HeaderValue::from_static("t1"));
        r
    })
    .await;
    let a = admin_section();
    let config = Template::new(&[origin.addr])
        .route("cache = true")
        .extra(&a.section)
        .build();
    let proxy = start_proxy(&config).await;
    for path in ["/a", "/b/1", "/b/2", "/c"] {
        get(proxy.addr, path).await;
    }
    assert_eq!(origin.requests.load(Ordering::SeqCst), 4);
    let (_, stats) = ops(&proxy, Method::GET, "/v1/cache", "").await;
    assert_eq!(stats["keys"], 4);

    let (status, body) = ops(
        &proxy,
        Method::POST,
        "/v1/cache/purge",
        "{\"url\": \"http://test.local/a\"}",
    )
    .await;
    assert_eq!((status, &body["removed"]), (StatusCode::OK, &json!(1)), "{body}");
    get(proxy.addr, "/a").await;
    assert_eq!(origin.requests.load(Ordering::SeqCst), 5, "purged: a miss");
    let (_, body) = ops(
        &proxy,
        Method::POST,
        "/v1/cache/purge",
        "{\"prefix\": \"http://test.local/b/\"}",
    )
    .await;
    assert_eq!(body["removed"], 2);
    let (_, body) = ops(&proxy, Method::POST, "/v1/cache/purge", "{\"tag\": \"t1\"}").await;
    assert_eq!(body["removed"], 2, "/a and /c carry the tag");
    assert_eq!(
        ops(&proxy, Method::POST, "/v1/cache/purge", "{\"path\": \"/a\"}")
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn bans_are_listed_added_removed_and_checked() {
    let origin = echo_origin().await;
    let a = admin_section();
    let config = Template::new(&[origin.addr])
        .top("[protect.bans]\nduration = \"1h\"")
        .extra(&a.section)
        .build();
    let proxy = start_proxy(&config).await;
    let (status, body) = ops(
        &proxy,
        Method::POST,
        "/v1/bans",
        "{\"client\": \"127.0.0.9\", \"duration\": \"10m\"}",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(get_from(9, proxy.addr).await, None, "banned: closed at accept");
    assert_eq!(get_from(10, proxy.addr).await, Some(StatusCode::OK));
    let (_, list) = ops(&proxy, Method::GET, "/v1/bans", "").await;
    assert_eq!(list["bans"][0]["client"], "127.0.0.9");
    assert_eq!(list["bans"][0]["seconds_left"], 600);

    for bad in [
        "{\"client\": \"127.0.0.0/8\", \"duration\": \"10m\"}",
        "{\"client\": \"127.0.0.9\", \"duration\": \"ten\"}",
        "{\"client\": \"127.0.0.9\", \"duration\": \"90d\"}",
        "{\"duration\": \"1m\"}",
    ] {
        let (status, body) = ops(&proxy, Method::POST, "/v1/bans", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(
        ops(&proxy, Method::DELETE, "/v1/bans/127.0.0.9", "").await.0,
        StatusCode::OK
    );
    assert_eq!(get_from(9, proxy.addr).await, Some(StatusCode::OK), "admitted again");
    assert_eq!(
        ops(&proxy, Method::DELETE, "/v1/bans/127.0.0.9", "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ops(&proxy, Method::DELETE, "/v1/bans/not-an-ip", "").await.0,
        StatusCode::BAD_REQUEST
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_switched_mode_lasts_until_the_file_changes_that_step() {
    let origin = echo_origin().await;
    let a = admin_section();
    let make = |duration: &str| {
        Template::new(&[origin.addr])
            .top(&format!(
                "[protect.bans]\nmode = \"enforce\"\nduration = \"{duration}\""
            ))
            .extra(&a.section)
            .build()
    };
    let proxy = start_proxy(&make("1h")).await;
    let (status, body) = ops(
        &proxy,
        Method::PUT,
        "/v1/protection/bans/mode",
        "{\"mode\": \"shadow\"}",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, view) = ops(&proxy, Method::GET, "/v1/protection", "").await;
    assert_eq!(view["modes"]["bans"], "shadow");
    assert_eq!(view["modes"]["adaptive"], "off");
    let (status, body) = ops(
        &proxy,
        Method::PUT,
        "/v1/protection/adaptive/mode",
        "{\"mode\": \"enforce\"}",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // A reload that leaves [protect.bans] alone keeps the switch...
    let reload = |text: String| {
        let control = proxy.control.clone();
        async move {
            control
                .apply(
                    portcullis::change::Change::Reload {
                        file: None,
                        dry_run: false,
                        text: Some(text),
                    },
                    "test",
                )
                .await
        }
    };
    let same = make("1h").replace("[[routes]]", "[[routes]]\nname = \"renamed\"");
    reload(same).await.unwrap();
    let (_, view) = ops(&proxy, Method::GET, "/v1/protection", "").await;
    assert_eq!(view["modes"]["bans"], "shadow", "kept");
    // ...one that changes it takes the file's word.
    reload(make("2h").replace("[[routes]]", "[[routes]]\nname = \"renamed\""))
        .await
        .unwrap();
    let (_, view) = ops(&proxy, Method::GET, "/v1/protection", "").await;
    assert_eq!(view["modes"]["bans"], "enforce", "the newer word");
    proxy.shutdown().await;
}

#[tokio::test]
async fn reload_through_the_api_plans_applies_and_refuses_with_the_errors() {
    let origin = echo_origin().await;
    let a = admin_section();
    let base = Template::new(&[origin.addr]).extra(&a.section).build();
    let proxy = start_proxy(&base).await;
    let new_route = format!(
        "{base}\n[[routes]]\nname = \"new\"\npath = \"/new\"\nupstream = \"app\"\nrequest_headers = {{ set = {{ \"x-route\" = \"new\" }} }}\n"
    );

    let (status, body) = ops(&proxy, Method::POST, "/v1/config/reload?dry_run=1", &new_route).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], false);
    assert_eq!(
        body["changes"],
        json!([{"action": "add", "subject": "route \"new\"", "detail": "any host /new (prefix) -> app"}])
    );
    assert_eq!(
        get(proxy.addr, "/new").await.echoed().get("x-route"),
        None,
        "a dry run changes nothing"
    );

    let broken = new_route.replace(
        "upstream = \"app\"\nrequest_headers",
        "upstream = \"nowhere\"\nrequest_headers",
    );
    let (status, body) = ops(&proxy, Method::POST, "/v1/config/reload", &broken).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["path"], "routes[1].upstream");
    assert!(
        body["errors"][0]["message"].as_str().unwrap().contains("nowhere"),
        "{body}"
    );

    let (status, body) = ops(&proxy, Method::POST, "/v1/config/reload", &new_route).await;
    assert_eq!((status, &body["applied"]), (StatusCode::OK, &json!(true)), "{body}");
    assert_eq!(get(proxy.addr, "/new").await.echoed().get("x-route"), Some("new"));
    let (_, status_view) = ops(&proxy, Method::GET, "/v1/status", "").await;
    assert_eq!(status_view["generation"], 2);
    let (_, config) = ops(&proxy, Method::GET, "/v1/config", "").await;
    assert_eq!(config["text"], new_route.as_str(), "the running config's text");

    // A built-in config (no file) needs the text in the body.
    let (status, body) = ops(&proxy, Method::POST, "/v1/config/reload", "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    proxy.shutdown().await;
    let records: Vec<Value> = audit_events(&a.audit)
        .into_iter()
        .filter(|e| e["event"] == "config.load" || e["event"] == "config.reload_failed")
        .map(|e| json!([e["event"], e["trigger"]]))
        .collect();
    assert_eq!(
        records,
        [
            json!(["config.load", "start"]),
            json!(["config.reload_failed", "admin:ops"]),
            json!(["config.load", "admin:ops"]),
        ],
        "a dry run is not a change; every reload is one record with its caller"
    );
}

#[tokio::test]
async fn status_certificates_cache_and_protection_views_answer_when_off_too() {
    let origin = echo_origin().await;
    let a = admin_section();
    let proxy = start_proxy(&Template::new(&[origin.addr]).extra(&a.section).build()).await;
    let (_, cache) = ops(&proxy, Method::GET, "/v1/cache", "").await;
    assert_eq!(cache, json!({"enabled": false}));
    let (status, body) = ops(&proxy, Method::POST, "/v1/cache/purge", "{\"url\": \"http://a/\"}").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, certs) = ops(&proxy, Method::GET, "/v1/certificates", "").await;
    assert_eq!(certs, json!({"listeners": []}));
    let (status, body) = ops(&proxy, Method::POST, "/v1/certificates/reload", "").await;
    assert_eq!((status, &body["listeners"]), (StatusCode::OK, &json!(0)));
    let (_, bans) = ops(&proxy, Method::GET, "/v1/bans", "").await;
    assert_eq!(bans["enabled"], false);
    let (status, _) = ops(
        &proxy,
        Method::POST,
        "/v1/bans",
        "{\"client\": \"127.0.0.9\", \"duration\": \"1m\"}",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "bans are off");
    let (_, protection) = ops(&proxy, Method::GET, "/v1/protection", "").await;
    assert_eq!(
        protection["modes"],
        json!({"adaptive": "off", "bans": "off", "load_shedding": "off"})
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn readyz_goes_false_at_the_start_of_a_drain() {
    let (held, release) = held_origin().await;
    let a = admin_section();
    let mut proxy = start_proxy(&Template::new(&[held.addr]).extra(&a.section).build()).await;
    let addr = proxy.addr;
    let request = tokio::spawn(async move { get(addr, "/").await.status });
    while held.requests.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let admin = proxy.admin_addr.unwrap();
    let shutdown = proxy.begin_shutdown();
    while proxy.control.ready() {
        tokio::task::yield_now().await;
    }
    // The drain waits for the held request: the API still answers.
    let mut conn = h1(admin).await;
    let got = read(
        conn.send_ready(Request::get("/readyz").header("host", "a").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    release.send(true).unwrap();
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    shutdown.await.unwrap();
}

#[tokio::test]
async fn the_openapi_file_lists_exactly_the_routes_the_server_answers() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.openapi.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut listed: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            listed.push((path.clone(), method.to_uppercase()));
        }
    }
    listed.sort();
    let mut routed: Vec<(String, String)> = portcullis::server::admin::ROUTES
        .iter()
        .map(|(p, m)| ((*p).to_owned(), (*m).to_owned()))
        .collect();
    routed.sort();
    assert_eq!(listed, routed, "docs/admin-api.openapi.json and the router disagree");

    // Each one answers on a running server: never "no endpoint", never
    // "wrong method", never a 5xx.
    let origin = echo_origin().await;
    let a = admin_section();
    let proxy = start_proxy(&Template::new(&[origin.addr]).extra(&a.section).build()).await;
    for (path, method) in &routed {
        let path = path
            .replace("{group}", "app")
            .replace("{server}", &origin.addr.to_string())
            .replace("{client}", "192.0.2.1")
            .replace("{step}", "bans");
        let (status, body) = ops(&proxy, method.parse().unwrap(), &path, "{}").await;
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !status.is_server_error(),
            "{method} {path}: {status} {body}"
        );
        assert!(
            !body["error"].as_str().is_some_and(|e| e.starts_with("no endpoint")),
            "{method} {path}: {body}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn with_a_shutdown_delay_the_listeners_accept_while_readyz_says_draining() {
    let origin = echo_origin().await;
    let a = admin_section();
    let config = Template::new(&[origin.addr])
        .top("[server]\nshutdown_delay = \"5m\"")
        .extra(&a.section)
        .build();
    let mut proxy = start_proxy(&config).await;
    // The shutdown task sleeps out the delay; the test ends before it does.
    let _shutdown = proxy.begin_shutdown();
    while proxy.control.ready() {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        call(&proxy, Method::GET, "/readyz", None, "").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(proxy.addr, "/").await.status,
        StatusCode::OK,
        "a new connection is still served"
    );
}
