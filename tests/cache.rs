//! The HTTP cache over real sockets (RFC 9111, RFC 5861, RFC 9211, RFC
//! 9213): each test scripts the origin's answers and counts what reaches
//! it. Staleness is made with the origin's `Age` (a response with
//! `max-age=1` and `Age: 5` is stale on arrival), never by waiting.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use portcullis::cache::Cache;
use support::*;
use tokio::sync::{mpsc, watch};

/// An origin whose answer `script` builds from the request head (and a
/// request counter); every request head is reported on the channel.
async fn scripted<F>(script: F) -> (Origin, mpsc::UnboundedReceiver<http::request::Parts>)
where
    F: Fn(&http::request::Parts, usize) -> Response<TestBody> + Send + Sync + 'static,
{
    let (seen, heads) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let origin = origin(move |req| {
        let (seen, script, count) = (seen.clone(), script.clone(), count.clone());
        async move {
            let (parts, _) = req.into_parts();
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let response = script(&parts, n);
            let _ = seen.send(parts);
            response
        }
    })
    .await;
    (origin, heads)
}

/// Header fields as (name, value) pairs.
type Fields = &'static [(&'static str, &'static str)];

/// A response with `body` and the given fields.
fn reply(status: u16, fields: &[(&str, &str)], body: &str) -> Response<TestBody> {
    let mut r = text(status, body);
    for (name, value) in fields {
        r.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    r
}

/// One listener, one caching route (`route` is its `cache` value), the
/// `[cache]` section given.
fn config(upstream: SocketAddr, route: &str, cache: &str) -> String {
    Template::new(&[upstream])
        .route(&format!("cache = {route}"))
        .extra(&format!("[cache]\n{cache}"))
        .build()
}

async fn caching_proxy(upstream: SocketAddr) -> TestProxy {
    start_proxy(&config(upstream, "true", "")).await
}

fn cache_of(proxy: &TestProxy) -> Arc<Cache> {
    proxy
        .snapshot
        .load()
        .cache
        .clone()
        .expect("a caching route builds the cache")
}

/// Sends `method path` with `fields` on a new HTTP/1.1 connection.
async fn send(addr: SocketAddr, method: Method, path: &str, fields: &[(&str, &str)]) -> Got {
    let mut c = h1(addr).await;
    let mut req = Request::builder().method(method).uri(path).header("host", "test.local");
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    read(c.send_ready(req.body(empty()).expect("request")).await.expect("send")).await
}

async fn get_with(addr: SocketAddr, path: &str, fields: &[(&str, &str)]) -> Got {
    send(addr, Method::GET, path, fields).await
}

fn status_of(got: &Got) -> String {
    got.header("cache-status").unwrap_or("").to_owned()
}

/// Every `Cache-Status` line, in order.
fn statuses(got: &Got) -> Vec<&str> {
    got.headers
        .get_all("cache-status")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

/// A request field's value as the origin received it, or `default`.
fn field(head: &http::request::Parts, name: &str, default: &str) -> String {
    head.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(default)
        .to_owned()
}

fn age_of(got: &Got) -> Option<u64> {
    got.header("age").and_then(|a| a.parse().ok())
}

/// An origin that reports each request's arrival, holds it until
/// `release` is set to `true`, then answers with `answer()`.
async fn held<F>(answer: F) -> (Origin, watch::Sender<bool>, mpsc::UnboundedReceiver<()>)
where
    F: Fn() -> Response<TestBody> + Send + Sync + 'static,
{
    let (release, released) = watch::channel(false);
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let answer = Arc::new(answer);
    let origin = origin(move |_| {
        let (mut released, answer) = (released.clone(), answer.clone());
        let _ = arrived.send(());
        async move {
            let _ = released.wait_for(|r| *r).await;
            answer()
        }
    })
    .await;
    (origin, release, arrivals)
}

/// Waits until `n` requests wait on flights.
async fn waiting(cache: &Cache, n: usize) {
    let mut stats = cache.flight_stats();
    tokio::time::timeout(Duration::from_secs(30), stats.wait_for(|s| s.waiting == n))
        .await
        .expect("the requests wait in time")
        .expect("cache alive");
}

/// Waits until `n` flights have landed (a response stored, passed or
/// given up), so a test knows a background store is done.
async fn landed(cache: &Cache, n: u64) {
    let mut stats = cache.flight_stats();
    tokio::time::timeout(Duration::from_secs(10), stats.wait_for(|s| s.landed >= n))
        .await
        .expect("flights landed in time")
        .expect("cache alive");
}

#[tokio::test]
async fn a_stored_response_is_served_with_age_and_cache_status() {
    let (origin, _) = scripted(|_, n| reply(200, &[("cache-control", "max-age=600")], &format!("v{n}"))).await;
    let proxy = caching_proxy(origin.addr).await;

    let first = get(proxy.addr, "/a").await;
    assert_eq!(first.text(), "v1");
    let status = status_of(&first);
    assert!(
        status.starts_with("portcullis; fwd=uri-miss; fwd-status=200; stored; ttl="),
        "{status}"
    );
    landed(&cache_of(&proxy), 1).await;

    let second = get(proxy.addr, "/a").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.text(), "v1", "served from the store");
    assert!(
        status_of(&second).starts_with("portcullis; hit; ttl="),
        "{}",
        status_of(&second)
    );
    assert!(age_of(&second).is_some(), "Age on every response from the cache");
    assert_eq!(second.header("content-length"), Some("2"));
    assert_eq!(origin.requests(), 1);

    let other = get(proxy.addr, "/b").await;
    assert_eq!(other.text(), "v2", "another URL is another key");
}

/// RFC 9111 section 3 and 5.2.2: what a shared cache must not store.
#[tokio::test]
async fn responses_a_shared_cache_must_not_store_are_fetched_each_time() {
    let cases: &[(Fields, Fields, &str)] = &[
        (&[], &[("cache-control", "no-store, max-age=600")], "no-store"),
        (&[], &[("cache-control", "private, max-age=600")], "private"),
        (
            &[("cache-control", "no-store")],
            &[("cache-control", "max-age=600")],
            "no-store",
        ),
        (
            &[("authorization", "Bearer x")],
            &[("cache-control", "max-age=600")],
            "authorization",
        ),
        (&[], &[("cache-control", "max-age=600"), ("vary", "*")], "vary-star"),
        (
            &[],
            &[("cache-control", "max-age=600"), ("set-cookie", "s=1")],
            "set-cookie",
        ),
        (
            &[],
            &[
                ("portcullis-cache-control", "no-store"),
                ("cache-control", "max-age=600"),
            ],
            "no-store",
        ),
        (&[], &[], "no-freshness"),
    ];
    for (request, response, detail) in cases {
        let response: Vec<(String, String)> = response.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect();
        let (origin, _) = scripted(move |_, _| {
            let fields: Vec<(&str, &str)> = response.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            // 201 is not heuristically cacheable: no freshness means none.
            reply(201, &fields, "x")
        })
        .await;
        let proxy = caching_proxy(origin.addr).await;
        for _ in 0..2 {
            let got = get_with(proxy.addr, "/p", request).await;
            assert!(
                status_of(&got).ends_with(&format!("detail={detail}")),
                "{detail}: {}",
                status_of(&got)
            );
            assert!(
                got.header("portcullis-cache-control").is_none(),
                "our targeted field is removed"
            );
        }
        assert_eq!(origin.requests(), 2, "{detail}: never served from the store");
    }
}

/// Section 3.5: `public`, `s-maxage` or `must-revalidate` let a shared
/// cache store a response to a request with `Authorization` (with the
/// route's `credentials = "rfc9111"`). By default only the first two,
/// which mark the response for shared caches, do: `must-revalidate` says
/// nothing about who may see the response (docs/caching.md).
#[tokio::test]
async fn authorization_is_stored_when_the_response_allows_it() {
    for (allow, by_default) in [
        ("public, max-age=600", true),
        ("s-maxage=600", true),
        ("must-revalidate, max-age=600", false),
    ] {
        for (route, stored) in [("{ credentials = \"rfc9111\" }", true), ("true", by_default)] {
            let (origin, _) = scripted(move |_, _| reply(200, &[("cache-control", allow)], "x")).await;
            let proxy = start_proxy(&config(origin.addr, route, "")).await;
            let first = get_with(proxy.addr, "/p", &[("authorization", "Bearer x")]).await;
            if route != "true" {
                landed(&cache_of(&proxy), 1).await;
            }
            // A request with credentials leads no flight: its copy is
            // stored as its body ends, before the client has the body.
            assert_eq!(cache_of(&proxy).store().keys(), usize::from(stored), "{allow} {route}");
            if !stored {
                assert!(
                    status_of(&first).ends_with("detail=credentials"),
                    "{allow}: {}",
                    status_of(&first)
                );
            }
            let again = get_with(proxy.addr, "/p", &[("authorization", "Bearer x")]).await;
            assert_eq!(
                status_of(&again).contains("hit"),
                stored,
                "{allow} {route}: {}",
                status_of(&again)
            );
            assert_eq!(origin.requests(), if stored { 1 } else { 2 }, "{allow} {route}");
        }
    }
}

/// Section 4.2.1: `s-maxage` over `max-age` over `Expires`; an invalid
/// `Expires` means stale. RFC 9213: the targeted field over all of them.
#[tokio::test]
async fn freshness_comes_from_the_right_field() {
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[("cache-control", "max-age=0, s-maxage=600")], true),
        (&[("cache-control", "max-age=600, s-maxage=0")], false),
        (&[("expires", "Thu, 01 Jan 2099 00:00:00 GMT")], true),
        (&[("expires", "0")], false),
        (&[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")], false),
        (
            &[("cache-control", "max-age=0"), ("cdn-cache-control", "max-age=600")],
            true,
        ),
        (
            &[
                ("cdn-cache-control", "max-age=600"),
                ("portcullis-cache-control", "max-age=0"),
            ],
            false,
        ),
        (&[("cache-control", "max-age=600"), ("age", "700")], false),
        (&[("cache-control", "max-age=\"600\"")], true),
        (&[("cache-control", "max-age=600, max-age=60")], false),
    ];
    for (fields, fresh) in cases {
        let owned: Vec<(String, String)> = fields.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect();
        let (origin, _) = scripted(move |_, _| {
            let f: Vec<(&str, &str)> = owned.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            reply(200, &f, "x")
        })
        .await;
        let proxy = caching_proxy(origin.addr).await;
        get(proxy.addr, "/f").await;
        landed(&cache_of(&proxy), 1).await;
        let again = get(proxy.addr, "/f").await;
        let hit = status_of(&again).starts_with("portcullis; hit");
        assert_eq!(hit, *fresh, "{fields:?}: {}", status_of(&again));
        assert_eq!(origin.requests(), if *fresh { 1 } else { 2 }, "{fields:?}");
    }
}

/// Section 4.2.3: the stored response's age includes the origin's `Age`.
#[tokio::test]
async fn age_counts_the_upstream_age() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=6000"), ("age", "100")], "x")).await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/").await;
    landed(&cache_of(&proxy), 1).await;
    let hit = get(proxy.addr, "/").await;
    let age = age_of(&hit).expect("Age");
    assert!((100..110).contains(&age), "age {age}");
    let status = status_of(&hit);
    let ttl: i64 = status.rsplit("ttl=").next().and_then(|t| t.parse().ok()).expect("ttl");
    assert!((5890..=5900).contains(&ttl), "{status}");
}

/// Section 4.2.2: heuristic freshness from `Last-Modified`, only for
/// heuristically cacheable statuses and without explicit freshness.
#[tokio::test]
async fn heuristic_freshness_applies_only_where_allowed() {
    for (status, cached) in [(200, true), (404, true), (201, false), (302, false)] {
        let (origin, _) =
            scripted(move |_, _| reply(status, &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")], "x")).await;
        let proxy = caching_proxy(origin.addr).await;
        get(proxy.addr, "/h").await;
        landed(&cache_of(&proxy), 1).await;
        let again = get(proxy.addr, "/h").await;
        assert_eq!(
            status_of(&again).starts_with("portcullis; hit"),
            cached,
            "{status}: {}",
            status_of(&again)
        );
    }
}

/// Section 5.2.1: request directives, and `Pragma: no-cache` (5.4).
#[tokio::test]
async fn request_directives_are_honoured() {
    let (origin, _) = scripted(|_, n| {
        reply(
            200,
            &[("cache-control", "max-age=600"), ("age", "100")],
            &format!("v{n}"),
        )
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    assert_eq!(get(proxy.addr, "/r").await.text(), "v1");
    landed(&cache_of(&proxy), 1).await;

    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[], true),
        (&[("cache-control", "no-cache")], false),
        (&[("pragma", "no-cache")], false),
        (&[("pragma", "no-cache"), ("cache-control", "max-stale")], true),
        (&[("cache-control", "max-age=50")], false),
        (&[("cache-control", "max-age=5000")], true),
        (&[("cache-control", "min-fresh=1000")], false),
        (&[("cache-control", "min-fresh=10")], true),
        (&[("cache-control", "no-store")], true),
    ];
    for (fields, hit) in cases {
        let got = get_with(proxy.addr, "/r", fields).await;
        assert_eq!(
            status_of(&got).starts_with("portcullis; hit"),
            *hit,
            "{fields:?}: {}",
            status_of(&got)
        );
        if !hit {
            assert!(
                status_of(&got).contains("fwd=request"),
                "{fields:?}: {}",
                status_of(&got)
            );
        }
    }

    let miss = get_with(proxy.addr, "/never", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(miss.status, StatusCode::GATEWAY_TIMEOUT, "only-if-cached on a miss");
    assert_eq!(status_of(&miss), "portcullis; detail=only-if-cached");
    let hit = get_with(proxy.addr, "/r", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(hit.status, StatusCode::OK);
}

/// `max-stale` lets a client take a stale response (section 5.2.1.2).
#[tokio::test]
async fn max_stale_serves_a_stale_response() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=10"), ("age", "100")], "old")).await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/s").await;
    landed(&cache_of(&proxy), 1).await;
    let ok = get_with(proxy.addr, "/s", &[("cache-control", "max-stale=1000")]).await;
    assert!(
        status_of(&ok).starts_with("portcullis; hit; ttl=-"),
        "{}",
        status_of(&ok)
    );
    let too_old = get_with(proxy.addr, "/s", &[("cache-control", "max-stale=5")]).await;
    assert!(status_of(&too_old).contains("fwd=stale"), "{}", status_of(&too_old));
}

#[tokio::test]
async fn a_route_can_ignore_client_no_cache() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=600")], "x")).await;
    let proxy = start_proxy(&config(origin.addr, "{ ignore_client_no_cache = true }", "")).await;
    get(proxy.addr, "/").await;
    landed(&cache_of(&proxy), 1).await;
    for fields in [&[("cache-control", "no-cache")][..], &[("pragma", "no-cache")][..]] {
        let got = get_with(proxy.addr, "/", fields).await;
        assert!(status_of(&got).starts_with("portcullis; hit"), "{}", status_of(&got));
    }
    assert_eq!(origin.requests(), 1);
}

/// Section 4.1: variants by the fields `Vary` names coexist; `Vary: *`
/// never matches.
#[tokio::test]
async fn vary_keeps_variants_apart() {
    let (origin, _) = scripted(|head, _| {
        let lang = field(head, "accept-language", "none");
        reply(
            200,
            &[("cache-control", "max-age=600"), ("vary", "Accept-Language")],
            &lang,
        )
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    assert_eq!(
        get_with(proxy.addr, "/v", &[("accept-language", "fr")]).await.text(),
        "fr"
    );
    landed(&cache, 1).await;
    let de = get_with(proxy.addr, "/v", &[("accept-language", "de")]).await;
    assert_eq!(de.text(), "de");
    assert!(status_of(&de).contains("fwd=vary-miss"), "{}", status_of(&de));
    landed(&cache, 2).await;
    for lang in ["fr", "de"] {
        let got = get_with(proxy.addr, "/v", &[("accept-language", lang)]).await;
        assert_eq!(got.text(), lang, "each variant answers its own requests");
        assert!(status_of(&got).starts_with("portcullis; hit"));
    }
    assert_eq!(
        get(proxy.addr, "/v").await.text(),
        "none",
        "absent field is its own variant"
    );
    assert_eq!(origin.requests(), 3);
}

/// Section 4.3: a stale response is revalidated with its validators; the
/// 304 refreshes the stored fields (section 3.2) and the entry.
#[tokio::test]
async fn a_304_refreshes_the_stored_response() {
    let (origin, mut heads) = scripted(|head, n| {
        if n == 1 {
            return reply(
                200,
                &[
                    ("cache-control", "max-age=1"),
                    ("age", "5"),
                    ("etag", "\"v1\""),
                    ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
                    ("x-version", "1"),
                ],
                "body-1",
            );
        }
        assert_eq!(
            head.headers.get("if-none-match").map(|v| v.as_bytes()),
            Some(&b"\"v1\""[..])
        );
        assert!(head.headers.contains_key("if-modified-since"));
        let mut r = reply(304, &[("cache-control", "max-age=600"), ("x-version", "2")], "");
        *r.body_mut() = empty();
        r
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/e").await;
    landed(&cache_of(&proxy), 1).await;

    let refreshed = get(proxy.addr, "/e").await;
    assert_eq!(refreshed.status, StatusCode::OK);
    assert_eq!(refreshed.text(), "body-1", "the stored body, validated");
    assert_eq!(refreshed.header("x-version"), Some("2"), "fields updated from the 304");
    assert!(
        status_of(&refreshed).starts_with("portcullis; fwd=stale; fwd-status=304; stored"),
        "{}",
        status_of(&refreshed)
    );

    let hit = get(proxy.addr, "/e").await;
    assert_eq!(hit.header("x-version"), Some("2"));
    assert!(
        status_of(&hit).starts_with("portcullis; hit"),
        "fresh again: {}",
        status_of(&hit)
    );
    assert_eq!(origin.requests(), 2);
    heads.recv().await.expect("first head");
    let second = heads.recv().await.expect("second head");
    assert_eq!(
        second.headers.get("if-none-match").map(|v| v.as_bytes()),
        Some(&b"\"v1\""[..])
    );
}

/// RFC 9110 section 13.1 via the cache: conditional requests answered 304
/// from a stored response (weak comparison for If-None-Match).
#[tokio::test]
async fn conditional_requests_are_answered_from_the_store() {
    let (origin, _) = scripted(|_, _| {
        reply(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("etag", "\"v1\""),
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ],
            "x",
        )
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    // The first, conditional, request fills the store and is answered 304
    // from it: the origin is asked for the whole response.
    let first = get_with(proxy.addr, "/c", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(first.status, StatusCode::NOT_MODIFIED, "{}", status_of(&first));
    landed(&cache_of(&proxy), 1).await;
    let cases: &[(&str, &str, StatusCode)] = &[
        ("if-none-match", "\"v1\"", StatusCode::NOT_MODIFIED),
        ("if-none-match", "W/\"v1\"", StatusCode::NOT_MODIFIED),
        ("if-none-match", "\"v0\", \"v1\"", StatusCode::NOT_MODIFIED),
        ("if-none-match", "*", StatusCode::NOT_MODIFIED),
        ("if-none-match", "\"v2\"", StatusCode::OK),
        (
            "if-modified-since",
            "Tue, 02 Jan 2024 00:00:00 GMT",
            StatusCode::NOT_MODIFIED,
        ),
        ("if-modified-since", "Sun, 31 Dec 2023 00:00:00 GMT", StatusCode::OK),
        ("if-modified-since", "not a date", StatusCode::OK),
    ];
    for (name, value, want) in cases {
        let got = get_with(proxy.addr, "/c", &[(name, value)]).await;
        assert_eq!(got.status, *want, "{name}: {value}");
        assert!(status_of(&got).starts_with("portcullis; hit"), "{}", status_of(&got));
        if *want == StatusCode::NOT_MODIFIED {
            assert!(got.body.is_empty());
            assert_eq!(got.header("etag"), Some("\"v1\""));
        }
    }
    assert_eq!(origin.requests(), 1);
}

/// Section 4.4: a successful unsafe request invalidates the target URI and
/// same-origin `Location` / `Content-Location`; a failed one does not.
#[tokio::test]
async fn unsafe_methods_invalidate() {
    let (origin, _) = scripted(|head, n| match head.method {
        Method::GET => reply(200, &[("cache-control", "max-age=600")], &format!("v{n}")),
        _ if head.uri.path() == "/fail" => reply(500, &[], "no"),
        _ => reply(
            201,
            &[
                ("location", "/other"),
                ("content-location", "http://elsewhere.example/third"),
            ],
            "made",
        ),
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    for (i, path) in ["/item", "/other", "/third", "/fail"].iter().enumerate() {
        get(proxy.addr, path).await;
        landed(&cache, i as u64 + 1).await;
    }
    let before = origin.requests();
    let post = send(proxy.addr, Method::POST, "/item", &[]).await;
    assert_eq!(post.status, StatusCode::CREATED);
    assert_eq!(status_of(&post), "portcullis; fwd=method");
    let failed = send(proxy.addr, Method::DELETE, "/fail", &[]).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);

    let hits: Vec<bool> = futures_hits(proxy.addr, &["/item", "/other", "/third", "/fail"]).await;
    assert_eq!(
        hits,
        vec![false, false, true, true],
        "target and same-origin Location invalidated; other origin and failed request not"
    );
    assert_eq!(origin.requests(), before + 2 + 2);
}

async fn futures_hits(addr: SocketAddr, paths: &[&str]) -> Vec<bool> {
    let mut out = Vec::new();
    for path in paths {
        out.push(status_of(&get(addr, path).await).starts_with("portcullis; hit"));
    }
    out
}

/// A stampede of 1,000 concurrent requests to a cold key is one origin
/// request; every client gets the same body.
#[tokio::test]
async fn a_stampede_of_1000_is_one_origin_request() {
    let (origin, release, _) = held(|| reply(200, &[("cache-control", "max-age=600")], "the one answer")).await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);

    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(h2(proxy.addr).await);
    }
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://test.local/cold").body(empty()).expect("request");
            read(c.send_ready(req).await.expect("send")).await
        }));
    }
    // Everyone but the leader waits on its flight before the origin answers.
    waiting(&cache, 999).await;
    release.send_replace(true);
    let mut hits = 0;
    for task in tasks {
        let got = task.await.expect("client");
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.text(), "the one answer");
        if status_of(&got).contains("collapsed") {
            hits += 1;
        }
    }
    assert_eq!(origin.requests(), 1, "one origin request for 1,000 clients");
    assert_eq!(hits, 999, "the others were collapsed onto it");
}

/// Waiters of a response that turns out not storable go to the origin
/// themselves (at once, not one after another).
#[tokio::test]
async fn waiters_on_an_uncacheable_response_go_alone() {
    let (origin, release, _) = held(|| reply(200, &[("cache-control", "private")], "mine")).await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move { get(addr, "/p").await }));
    }
    waiting(&cache, 4).await;
    release.send_replace(true);
    for task in tasks {
        let got = task.await.expect("client");
        assert_eq!(got.text(), "mine");
        assert!(status_of(&got).ends_with("detail=private"), "{}", status_of(&got));
    }
    assert_eq!(origin.requests(), 5);
}

/// RFC 5861 section 3: a stale response within `stale-while-revalidate`
/// is served at once and refreshed in the background, once.
#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let (release, released) = watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let origin = origin(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let mut released = released.clone();
        async move {
            if n == 1 {
                return reply(
                    200,
                    &[("cache-control", "max-age=1, stale-while-revalidate=600"), ("age", "5")],
                    "old",
                );
            }
            let _ = released.wait_for(|r| *r).await;
            reply(200, &[("cache-control", "max-age=600")], "new")
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    get(proxy.addr, "/s").await;
    landed(&cache, 1).await;

    // The origin holds the refresh: these are all answered stale, at once.
    for _ in 0..5 {
        let got = get(proxy.addr, "/s").await;
        assert_eq!(got.text(), "old");
        assert!(
            status_of(&got).contains("detail=stale-while-revalidate"),
            "{}",
            status_of(&got)
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one background refresh");
    release.send_replace(true);
    landed(&cache, 2).await;
    let fresh = get(proxy.addr, "/s").await;
    assert_eq!(fresh.text(), "new");
    assert!(status_of(&fresh).starts_with("portcullis; hit"));
    assert_eq!(origin.requests(), 2);
}

/// Regression (issue 13 review): a background refresh started by a request
/// with a cookie must follow the credentials rule, or the origin's answer
/// to that cookie (a logged-in page) replaces the shared entry.
#[tokio::test]
async fn a_refresh_for_a_cookie_holder_does_not_store_its_page_for_everyone() {
    let origin = origin(|req| async move {
        match req.headers().get("cookie") {
            None => reply(
                200,
                &[
                    ("cache-control", "public, max-age=1, stale-while-revalidate=600"),
                    ("age", "5"),
                ],
                "public page",
            ),
            Some(_) => reply(200, &[("cache-control", "max-age=600")], "alice's page"),
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    get(proxy.addr, "/p").await;
    landed(&cache, 1).await;
    // Alice gets the stale public page and starts the refresh.
    let alice = get_with(proxy.addr, "/p", &[("cookie", "session=alice")]).await;
    assert_eq!(alice.text(), "public page");
    landed(&cache, 2).await;
    let anonymous = get(proxy.addr, "/p").await;
    assert_ne!(anonymous.text(), "alice's page", "{}", status_of(&anonymous));
}

/// RFC 5861 section 4: `stale-if-error` answers from the store when the
/// origin fails (5xx) or is down; without it the error stands.
#[tokio::test]
async fn stale_if_error_serves_when_the_origin_fails() {
    let (origin, _) = scripted(|head, n| {
        let cc = if head.uri.path() == "/plain" {
            "max-age=1"
        } else {
            "max-age=1, stale-if-error=600"
        };
        if n <= 2 {
            reply(200, &[("cache-control", cc), ("age", "5")], "kept")
        } else {
            reply(503, &[], "down")
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    get(proxy.addr, "/sie").await;
    get(proxy.addr, "/plain").await;
    landed(&cache, 2).await;

    let on_503 = get(proxy.addr, "/sie").await;
    assert_eq!(on_503.status, StatusCode::OK);
    assert_eq!(on_503.text(), "kept");
    assert!(
        status_of(&on_503).ends_with("fwd-status=503; detail=stale-if-error"),
        "{}",
        status_of(&on_503)
    );
    assert!(age_of(&on_503).is_some());
    assert_eq!(get(proxy.addr, "/plain").await.status, StatusCode::SERVICE_UNAVAILABLE);

    origin.kill();
    let down = get(proxy.addr, "/sie").await;
    assert_eq!(down.status, StatusCode::OK, "served stale with the origin down");
    assert_eq!(down.text(), "kept");
    assert!(
        status_of(&down).ends_with("detail=stale-if-error"),
        "{}",
        status_of(&down)
    );
    assert_eq!(get(proxy.addr, "/plain").await.status, StatusCode::BAD_GATEWAY);
}

/// A route's `stale_if_error` grace stands in for the directive; it never
/// overrides what forbids stale service (`must-revalidate`, `s-maxage`,
/// which implies `proxy-revalidate`) or a client's `max-age`.
#[tokio::test]
async fn the_route_grace_serves_stale_on_error_where_allowed() {
    let (origin, _) = scripted(|head, n| {
        let cc = match head.uri.path() {
            "/strict" => "max-age=1, must-revalidate",
            "/smax" => "s-maxage=1",
            _ => "max-age=1",
        };
        if n <= 3 {
            reply(200, &[("cache-control", cc), ("age", "5")], "kept")
        } else {
            reply(502, &[], "down")
        }
    })
    .await;
    let proxy = start_proxy(&config(origin.addr, "{ stale_if_error = \"1h\" }", "")).await;
    let cache = cache_of(&proxy);
    for path in ["/g", "/strict", "/smax"] {
        get(proxy.addr, path).await;
    }
    landed(&cache, 3).await;
    let cases: &[(&str, Fields, StatusCode)] = &[
        ("/strict", &[], StatusCode::BAD_GATEWAY),
        ("/smax", &[], StatusCode::BAD_GATEWAY),
        ("/g", &[("cache-control", "max-age=0")], StatusCode::BAD_GATEWAY),
        ("/g", &[], StatusCode::OK),
    ];
    for (path, fields, want) in cases {
        let got = get_with(proxy.addr, path, fields).await;
        assert_eq!(got.status, *want, "{path} {fields:?}");
    }
}

/// RFC 9110 section 14: one range from a stored response is a 206; an
/// unsatisfiable one a 416; several ranges get the whole 200.
#[tokio::test]
async fn ranges_are_answered_from_the_store() {
    let body: String = (0..100).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let stored = body.clone();
    let (origin, _) =
        scripted(move |_, _| reply(200, &[("cache-control", "max-age=600"), ("etag", "\"r\"")], &stored)).await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/r").await;
    landed(&cache_of(&proxy), 1).await;

    let part = get_with(proxy.addr, "/r", &[("range", "bytes=10-19")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.text(), &body[10..20]);
    assert_eq!(part.header("content-range"), Some("bytes 10-19/100"));
    assert_eq!(part.header("content-length"), Some("10"));

    let suffix = get_with(proxy.addr, "/r", &[("range", "bytes=-5")]).await;
    assert_eq!(suffix.text(), &body[95..]);

    let none = get_with(proxy.addr, "/r", &[("range", "bytes=200-")]).await;
    assert_eq!(none.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(none.header("content-range"), Some("bytes */100"));

    let many = get_with(proxy.addr, "/r", &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(many.status, StatusCode::OK);
    assert_eq!(many.body.len(), 100);

    let changed = get_with(proxy.addr, "/r", &[("range", "bytes=0-1"), ("if-range", "\"other\"")]).await;
    assert_eq!(changed.status, StatusCode::OK, "If-Range mismatch: the whole response");
    assert_eq!(origin.requests(), 1);
}

/// HEAD is answered from a stored GET (section 4: method-independent key).
#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=600")], "twelve bytes")).await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/h").await;
    landed(&cache_of(&proxy), 1).await;
    let head = send(proxy.addr, Method::HEAD, "/h", &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("12"));
    assert!(status_of(&head).starts_with("portcullis; hit"));
    assert_eq!(origin.requests(), 1);
}

/// Purge by URL, prefix and tag; tags are removed from responses unless
/// the route exposes them.
#[tokio::test]
async fn purge_by_url_prefix_and_tag() {
    let (origin, _) = scripted(|head, n| {
        let tag = if head.uri.path().starts_with("/news") {
            "news"
        } else {
            "other"
        };
        reply(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("surrogate-key", &format!("{tag} all")),
                ("cache-tag", "ct"),
            ],
            &format!("v{n}"),
        )
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    let paths = ["/news/1", "/news/2", "/img/a", "/img/b?x=1"];
    for (i, path) in paths.iter().enumerate() {
        let got = get(proxy.addr, path).await;
        assert!(got.header("surrogate-key").is_none() && got.header("cache-tag").is_none());
        landed(&cache, i as u64 + 1).await;
    }
    assert_eq!(cache.purge_url("http://test.local/img/a"), 1);
    assert_eq!(cache.purge_tag("news"), 2);
    assert_eq!(cache.purge_prefix("http://test.local/img/"), 1);
    assert_eq!(cache.store().keys(), 0);
    for path in paths {
        assert!(
            !status_of(&get(proxy.addr, path).await).starts_with("portcullis; hit"),
            "{path} purged"
        );
    }
    assert_eq!(cache.purge_tag("ct"), 4, "Cache-Tag values tag too");

    let exposed_origin = scripted(|_, _| reply(200, &[("cache-control", "max-age=60"), ("surrogate-key", "a")], "x"))
        .await
        .0;
    let exposed = start_proxy(&config(exposed_origin.addr, "{ expose_tags = true }", "")).await;
    assert_eq!(get(exposed.addr, "/").await.header("surrogate-key"), Some("a"));
}

/// Key options: sorted or ignored query strings, tracking parameters left
/// out, a header in the key.
#[tokio::test]
async fn key_options_shape_what_shares_an_entry() {
    let (origin, _) = scripted(|_, n| reply(200, &[("cache-control", "max-age=600")], &format!("v{n}"))).await;
    let proxy = start_proxy(&config(
        origin.addr,
        r#"{ query = "sort", ignore_params = ["utm_source"], key_headers = ["x-tenant"] }"#,
        "",
    ))
    .await;
    let cache = cache_of(&proxy);
    assert_eq!(get(proxy.addr, "/k?a=1&b=2").await.text(), "v1");
    landed(&cache, 1).await;
    assert_eq!(
        get(proxy.addr, "/k?b=2&a=1&utm_source=mail").await.text(),
        "v1",
        "same key"
    );
    assert_eq!(
        get_with(proxy.addr, "/k?a=1&b=2", &[("x-tenant", "acme")]).await.text(),
        "v2",
        "the tenant header is part of the key"
    );
    assert_eq!(origin.requests(), 2);
}

/// Objects over `max_object_size` stream through without being stored or
/// buffered whole: the proxy's memory stays far below the body size.
#[tokio::test]
async fn objects_over_the_max_size_stream_through_with_bounded_memory() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 1024; // 64 MiB
    let origin = origin(|_| async {
        let stream = futures_util::stream::iter(
            (0..CHUNKS).map(|_| Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from(vec![b'z'; CHUNK])))),
        );
        let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
        r.headers_mut()
            .insert("cache-control", "max-age=600".parse().expect("value"));
        r
    })
    .await;
    let proxy = start_proxy(&config(origin.addr, "true", "max_object_size = \"1MiB\"")).await;
    let before = rss_bytes();
    let mut c = h1(proxy.addr).await;
    let req = Request::get("/big")
        .header("host", "test.local")
        .body(empty())
        .expect("request");
    let response = c.send_ready(req).await.expect("send");
    let status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = response.into_body();
    let mut total = 0usize;
    let mut peak = before;
    while let Some(frame) = body.frame().await {
        total += frame.expect("frame").data_ref().map_or(0, |d| d.len());
        if total % (8 << 20) < CHUNK {
            peak = peak.max(rss_bytes());
        }
    }
    assert_eq!(total, CHUNK * CHUNKS);
    assert!(status.contains("stored"), "chunked: admitted at the head, {status}");
    let cache = cache_of(&proxy);
    landed(&cache, 1).await;
    assert_eq!(cache.store().keys(), 0, "not stored");
    assert_eq!(cache.buffering(), 0, "every copied or queued byte released");
    let grown = peak.saturating_sub(before);
    assert!(grown < 24 << 20, "RSS grew {grown} bytes for a 64 MiB body");
    let again = get(proxy.addr, "/big").await;
    assert!(!status_of(&again).contains("hit"));
}

/// A declared length over the maximum is known at once.
#[tokio::test]
async fn a_declared_length_over_the_max_is_not_stored() {
    let big = "y".repeat(2 << 20);
    let (origin, _) = scripted(move |_, _| reply(200, &[("cache-control", "max-age=600")], &big)).await;
    let proxy = start_proxy(&config(origin.addr, "true", "max_object_size = \"1MiB\"")).await;
    let got = get(proxy.addr, "/b").await;
    assert_eq!(got.body.len(), 2 << 20);
    assert!(status_of(&got).ends_with("detail=too-big"), "{}", status_of(&got));
}

/// The memory budget holds under a flood of distinct keys.
#[tokio::test]
async fn the_memory_budget_holds_under_a_flood_of_distinct_keys() {
    let body = "k".repeat(4096);
    let (origin, _) = scripted(move |_, _| reply(200, &[("cache-control", "max-age=600")], &body)).await;
    let proxy = start_proxy(&config(
        origin.addr,
        "true",
        "memory = \"1MiB\"\nmax_object_size = \"64KiB\"",
    ))
    .await;
    let cache = cache_of(&proxy);
    let mut c = h1(proxy.addr).await;
    for i in 0..2000 {
        let req = Request::get(format!("/flood/{i}"))
            .header("host", "test.local")
            .body(empty())
            .expect("request");
        let got = read(c.send_ready(req).await.expect("send")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(cache.store().bytes() <= 1 << 20, "budget passed at {i}");
    }
    landed(&cache, 2000).await;
    let keys = cache.store().keys();
    assert!(keys > 100 && keys < 300, "{keys} keys of ~4.4 KiB in 1 MiB");
    assert!(cache.store().bytes() <= 1 << 20);
    let newest = get(proxy.addr, "/flood/1999").await;
    assert!(
        status_of(&newest).starts_with("portcullis; hit"),
        "the most recent stay"
    );
    let oldest = get(proxy.addr, "/flood/0").await;
    assert!(
        !status_of(&oldest).starts_with("portcullis; hit"),
        "the least recent went"
    );
}

/// The cache shows in metrics and in the access log's `cache` field.
#[tokio::test]
async fn cache_results_are_counted() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=600")], "x")).await;
    let toml = config(origin.addr, "true", "") + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = start_proxy(&toml).await;
    get(proxy.addr, "/m").await;
    landed(&cache_of(&proxy), 1).await;
    get(proxy.addr, "/m").await;
    send(proxy.addr, Method::POST, "/m", &[]).await;
    let text = metrics(&proxy).await;
    for line in [
        "portcullis_cache_requests_total{route=\"routes[0]\",result=\"hit\"} 1",
        "portcullis_cache_requests_total{route=\"routes[0]\",result=\"miss\"} 1",
        "portcullis_cache_requests_total{route=\"routes[0]\",result=\"bypass\"} 1",
        "portcullis_cache_entries 0",
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
    assert!(
        text.contains("portcullis_cache_size_bytes 0"),
        "POST invalidated:\n{text}"
    );
}

/// A route without `cache` never caches and adds no `Cache-Status`.
#[tokio::test]
async fn routes_without_cache_are_untouched() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=600")], "x")).await;
    let proxy = proxy_to(origin.addr).await;
    for _ in 0..2 {
        assert!(get(proxy.addr, "/").await.header("cache-status").is_none());
    }
    assert_eq!(origin.requests(), 2);
    assert!(proxy.snapshot.load().cache.is_none());
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

// Regressions from the review of the cache phase: each test is named
// after the problem it reproduces.

/// A 304 that brings `Set-Cookie` (or `private`) must not put the cookie
/// into the shared entry: the entry leaves the store instead.
#[tokio::test]
async fn a_304_with_set_cookie_does_not_share_the_cookie() {
    let (origin, _) = scripted(|head, _| {
        if !head.headers.contains_key("if-none-match") {
            return reply(
                200,
                &[("cache-control", "max-age=1"), ("age", "5"), ("etag", "\"a\"")],
                "page",
            );
        }
        let mut r = reply(
            304,
            &[
                ("etag", "\"a\""),
                ("cache-control", "max-age=600"),
                ("set-cookie", "sid=ALICE"),
            ],
            "",
        );
        *r.body_mut() = empty();
        r
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/p").await;
    landed(&cache_of(&proxy), 1).await;
    let alice = get(proxy.addr, "/p").await;
    assert_eq!(alice.text(), "page");
    assert_eq!(
        alice.header("set-cookie"),
        Some("sid=ALICE"),
        "the client that caused it gets it"
    );
    assert!(
        status_of(&alice).ends_with("detail=set-cookie"),
        "{}",
        status_of(&alice)
    );
    assert_eq!(cache_of(&proxy).store().keys(), 0, "the entry left the store");
    let bob = get(proxy.addr, "/p").await;
    assert_eq!(bob.header("set-cookie"), None, "never served to another client");
}

/// Keys and `Vary` are computed on the fields the origin sees, so a
/// client cannot pick another client's variant by sending a field the
/// proxy sets.
#[tokio::test]
async fn vary_uses_the_fields_sent_upstream_not_the_clients() {
    let (origin, _) = scripted(|head, _| {
        let tier = field(head, "x-tier", "none");
        reply(200, &[("cache-control", "max-age=600"), ("vary", "X-Tier")], &tier)
    })
    .await;
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
upstream = "app"
cache = true
request_headers = {{ set = {{ "x-tier" = "gold" }} }}

[upstreams.app]
servers = ["{}"]
"#,
        origin.addr
    );
    let proxy = start_proxy(&toml).await;
    assert_eq!(get_with(proxy.addr, "/v", &[("x-tier", "evil")]).await.text(), "gold");
    landed(&cache_of(&proxy), 1).await;
    let other = get(proxy.addr, "/v").await;
    assert_eq!(other.text(), "gold");
    assert!(
        status_of(&other).starts_with("portcullis; hit"),
        "same forwarded value, same variant"
    );
    assert_eq!(origin.requests(), 1);
}

/// Behind a trusted TLS terminator, `X-Forwarded-Proto` is part of the
/// URL: an http redirect is never served to https clients.
#[tokio::test]
async fn http_and_https_behind_a_terminator_have_separate_keys() {
    let (origin, _) = scripted(|head, _| {
        let proto = field(head, "x-forwarded-proto", "");
        reply(200, &[("cache-control", "max-age=600")], &proto)
    })
    .await;
    let toml = config(origin.addr, "true", "") + "\n[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let proxy = start_proxy(&toml).await;
    let cache = cache_of(&proxy);
    assert_eq!(
        get_with(proxy.addr, "/s", &[("x-forwarded-proto", "http")])
            .await
            .text(),
        "http"
    );
    landed(&cache, 1).await;
    assert_eq!(
        get_with(proxy.addr, "/s", &[("x-forwarded-proto", "https")])
            .await
            .text(),
        "https"
    );
    landed(&cache, 2).await;
    let again = get_with(proxy.addr, "/s", &[("x-forwarded-proto", "https")]).await;
    assert_eq!(again.text(), "https");
    assert!(status_of(&again).starts_with("portcullis; hit"));
    assert_eq!(cache.purge_url("https://test.local/s"), 1);
}

/// A 304 answering the client's own validators (passed through with a
/// range) is not a revalidation of the stored response (section 4.3.4).
#[tokio::test]
async fn a_304_to_the_clients_validators_does_not_refresh_the_entry() {
    let (origin, mut heads) = scripted(|_, n| {
        if n == 1 {
            return reply(
                200,
                &[("cache-control", "max-age=1"), ("age", "5"), ("etag", "\"a\"")],
                "v1",
            );
        }
        let mut r = reply(304, &[("etag", "\"b\""), ("cache-control", "max-age=3600")], "");
        *r.body_mut() = empty();
        r
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/r").await;
    landed(&cache_of(&proxy), 1).await;
    let ranged = get_with(proxy.addr, "/r", &[("range", "bytes=0-0"), ("if-none-match", "\"b\"")]).await;
    assert_eq!(
        ranged.status,
        StatusCode::NOT_MODIFIED,
        "the origin's answer passes through"
    );
    heads.recv().await.expect("first");
    let sent = heads.recv().await.expect("second");
    assert_eq!(
        sent.headers.get("if-none-match").map(|v| v.as_bytes()),
        Some(&b"\"b\""[..])
    );
    let plain = get(proxy.addr, "/r").await;
    assert!(
        !status_of(&plain).starts_with("portcullis; hit"),
        "v1 not made fresh: {}",
        status_of(&plain)
    );
}

/// A 416 or 412 to a range or precondition is never stored, nor replaces
/// the stored response (no cache-poisoned denial of service).
#[tokio::test]
async fn answers_to_ranges_and_preconditions_never_replace_the_entry() {
    let (origin, _) = scripted(|head, _| {
        if head.headers.contains_key("range") {
            reply(416, &[("cache-control", "public, max-age=3600")], "")
        } else if head.headers.contains_key("if-match") {
            reply(412, &[("cache-control", "public, max-age=3600")], "")
        } else {
            reply(200, &[("cache-control", "public, max-age=3600")], "good")
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/app.js").await;
    landed(&cache_of(&proxy), 1).await;
    let range = get_with(
        proxy.addr,
        "/app.js",
        &[("cache-control", "max-age=0"), ("range", "bytes=999999-")],
    )
    .await;
    assert_eq!(range.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let pre = get_with(proxy.addr, "/app.js", &[("if-match", "\"x\"")]).await;
    assert_eq!(pre.status, StatusCode::PRECONDITION_FAILED);
    assert!(status_of(&pre).ends_with("detail=precondition"), "{}", status_of(&pre));
    let miss_pre = get_with(proxy.addr, "/other.js", &[("if-match", "\"x\"")]).await;
    assert_eq!(miss_pre.status, StatusCode::PRECONDITION_FAILED);
    let after = get(proxy.addr, "/app.js").await;
    assert_eq!(after.text(), "good");
    assert!(status_of(&after).starts_with("portcullis; hit"));
    assert!(!status_of(&get(proxy.addr, "/other.js").await).starts_with("portcullis; hit"));
}

/// A client's own `no-store` (or any request-side reason) cannot evict a
/// stored response.
#[tokio::test]
async fn a_client_cannot_evict_an_entry_with_request_directives() {
    let (origin, _) = scripted(|_, _| reply(200, &[("cache-control", "max-age=600")], "kept")).await;
    let proxy = caching_proxy(origin.addr).await;
    get(proxy.addr, "/e").await;
    landed(&cache_of(&proxy), 1).await;
    for fields in [
        &[("cache-control", "no-cache, no-store")][..],
        &[("cache-control", "no-cache"), ("authorization", "Basic eA==")][..],
    ] {
        let got = get_with(proxy.addr, "/e", fields).await;
        assert!(status_of(&got).contains("fwd=request"), "{}", status_of(&got));
        let after = get(proxy.addr, "/e").await;
        assert!(
            status_of(&after).starts_with("portcullis; hit"),
            "{fields:?} evicted it"
        );
    }
}

/// The leader of a flight reads the body at the origin's pace: a client
/// that never reads does not hold up the requests waiting on it.
#[tokio::test]
async fn a_slow_leader_does_not_hold_up_waiters() {
    // Far more than the loopback socket buffers hold.
    let body = "b".repeat(48 << 20);
    let (origin, release, mut arrivals) = held(move || reply(200, &[("cache-control", "max-age=600")], &body)).await;
    let proxy = start_proxy(&config(
        origin.addr,
        "true",
        "memory = \"128MiB\"\nmax_object_size = \"64MiB\"",
    ))
    .await;
    let cache = cache_of(&proxy);
    // The leader sends its request and never reads a byte of the answer.
    let mut leader = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut leader, b"GET /big HTTP/1.1\r\nhost: test.local\r\n\r\n")
        .await
        .expect("write");
    arrivals.recv().await.expect("the leader's request reached the origin");
    let addr = proxy.addr;
    let waiter = tokio::spawn(async move { get(addr, "/big").await });
    waiting(&cache, 1).await;
    release.send_replace(true);
    let got = tokio::time::timeout(Duration::from_secs(4), waiter)
        .await
        .expect("served before the 5 s lock timeout")
        .expect("client");
    assert_eq!(got.body.len(), 48 << 20);
    landed(&cache, 1).await;
    // The copy is stored and released; what the leader has not taken is
    // still counted, and never more than the body.
    let queued = cache.buffering();
    assert!(queued > 0 && queued <= 48 << 20, "{queued}");
    assert!(status_of(&got).contains("collapsed"), "{}", status_of(&got));
    assert_eq!(origin.requests(), 1);
    drop(leader);
}

/// Query parameters left out of the key are not sent to the origin, so
/// they cannot change what is stored for everyone.
#[tokio::test]
async fn unkeyed_parameters_never_reach_the_origin() {
    let (origin, mut heads) =
        scripted(|head, _| reply(200, &[("cache-control", "max-age=600")], head.uri.query().unwrap_or(""))).await;
    let proxy = start_proxy(&config(origin.addr, r#"{ ignore_params = ["utm_source"] }"#, "")).await;
    let got = get(proxy.addr, "/?a=1&utm_source=%3Cscript%3E").await;
    assert_eq!(got.text(), "a=1");
    assert_eq!(heads.recv().await.expect("head").uri.to_string(), "/?a=1");
}

/// A GET with a body is not looked up or stored: its URL alone does not
/// name the answer.
#[tokio::test]
async fn a_get_with_a_body_bypasses_the_cache() {
    let (origin, _) = scripted(|_, n| reply(200, &[("cache-control", "max-age=600")], &format!("v{n}"))).await;
    let proxy = caching_proxy(origin.addr).await;
    let mut c = h1(proxy.addr).await;
    let req = Request::get("/q")
        .header("host", "test.local")
        .body(full("query"))
        .expect("request");
    let got = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(got.text(), "v1");
    assert_eq!(status_of(&got), "portcullis; fwd=bypass; detail=request-body");
    assert_eq!(cache_of(&proxy).store().keys(), 0);
}

/// The background refresh of `stale-while-revalidate` is a plain GET with
/// the stored validators, whatever the client that triggered it asked.
#[tokio::test]
async fn the_background_refresh_is_a_plain_get() {
    let (origin, mut heads) = scripted(|_, n| {
        if n == 1 {
            reply(
                200,
                &[
                    ("cache-control", "max-age=1, stale-while-revalidate=600"),
                    ("age", "5"),
                    ("etag", "\"a\""),
                ],
                "0123456789",
            )
        } else {
            reply(
                200,
                &[("cache-control", "max-age=600"), ("etag", "\"b\"")],
                "abcdefghij",
            )
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    get(proxy.addr, "/w").await;
    landed(&cache, 1).await;
    let part = send(
        proxy.addr,
        Method::HEAD,
        "/w",
        &[("range", "bytes=0-1"), ("if-none-match", "\"zzz\"")],
    )
    .await;
    assert_eq!(part.status, StatusCode::OK, "HEAD is answered from the store");
    landed(&cache, 2).await;
    heads.recv().await.expect("first");
    let refresh = heads.recv().await.expect("refresh");
    assert_eq!(refresh.method, Method::GET);
    assert!(!refresh.headers.contains_key("range"));
    assert_eq!(
        refresh.headers.get("if-none-match").map(|v| v.as_bytes()),
        Some(&b"\"a\""[..])
    );
    let fresh = get_with(proxy.addr, "/w", &[("range", "bytes=0-1")]).await;
    assert_eq!(fresh.text(), "ab", "the refreshed body, ranged from the store");
}

/// A response still arriving when its URL is invalidated is not stored
/// afterwards.
#[tokio::test]
async fn an_invalidation_during_a_fetch_wins() {
    let (chunks_in, chunks_out) = mpsc::unbounded_channel::<bytes::Bytes>();
    let chunks_out = Arc::new(tokio::sync::Mutex::new(Some(chunks_out)));
    let origin = origin(move |req| {
        let chunks_out = chunks_out.clone();
        async move {
            if req.method() != Method::GET {
                return reply(204, &[], "");
            }
            let rx = chunks_out.lock().await.take();
            let Some(rx) = rx else {
                return reply(200, &[("cache-control", "max-age=600")], "second");
            };
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, BoxError>(http_body::Frame::data(b)), rx))
            });
            let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert("cache-control", "max-age=600".parse().expect("value"));
            r
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    let addr = proxy.addr;
    let first = tokio::spawn(async move { get(addr, "/i").await });
    chunks_in.send(bytes::Bytes::from_static(b"fir")).expect("chunk");
    // The POST succeeds while the GET's body is still arriving.
    let post = send(proxy.addr, Method::POST, "/i", &[]).await;
    assert_eq!(post.status, StatusCode::NO_CONTENT);
    chunks_in.send(bytes::Bytes::from_static(b"st")).expect("chunk");
    drop(chunks_in);
    assert_eq!(first.await.expect("client").text(), "first");
    landed(&cache, 1).await;
    assert_eq!(cache.store().keys(), 0, "the invalidated response was not stored");
}

/// `Cache-Status` from a cache closer to the origin is kept; ours follows.
#[tokio::test]
async fn cache_status_is_appended_to_an_upstream_caches() {
    let (origin, _) = scripted(|_, _| {
        reply(
            200,
            &[("cache-control", "max-age=600"), ("cache-status", "origin-cache; hit")],
            "x",
        )
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let first = get(proxy.addr, "/c").await;
    let all = statuses(&first);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0], "origin-cache; hit");
    assert!(all[1].starts_with("portcullis; fwd=uri-miss"));
    landed(&cache_of(&proxy), 1).await;
    let hit = get(proxy.addr, "/c").await;
    let all = statuses(&hit);
    assert_eq!(all[0], "origin-cache; hit");
    assert!(all.last().expect("ours").starts_with("portcullis; hit"));
    let post = send(proxy.addr, Method::POST, "/c", &[]).await;
    let all = statuses(&post);
    assert_eq!(all, ["origin-cache; hit", "portcullis; fwd=method"]);
}

/// The origin failing in the middle of a body others wait for abandons
/// the flight: one waiter tries again and the rest are served from it,
/// rather than all of them going to the failing origin at once.
#[tokio::test]
async fn an_origin_failure_mid_body_lets_one_waiter_retry() {
    let (release, released) = watch::channel(false);
    let (arrived, mut arrivals) = mpsc::unbounded_channel::<usize>();
    let counter = Arc::new(AtomicUsize::new(0));
    let origin = origin(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = arrived.send(n);
        let mut released = released.clone();
        async move {
            if n > 1 {
                return reply(200, &[("cache-control", "max-age=600")], "whole");
            }
            let _ = released.wait_for(|r| *r).await;
            // "part", then (after one yield, so the head and the first
            // chunk are flushed) a failure.
            let stream = futures_util::stream::unfold(0, |i| async move {
                match i {
                    0 => Some((
                        Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from_static(b"part"))),
                        1,
                    )),
                    1 => {
                        tokio::task::yield_now().await;
                        Some((Err("origin broke".into()), 2))
                    }
                    _ => None,
                }
            });
            let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert("cache-control", "max-age=600".parse().expect("value"));
            r
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    let addr = proxy.addr;
    let leader = tokio::spawn(async move {
        let mut c = h1(addr).await;
        let req = Request::get("/f")
            .header("host", "test.local")
            .body(empty())
            .expect("request");
        match c.send_ready(req).await {
            Ok(response) => response.status() == StatusCode::OK && response.into_body().collect().await.is_err(),
            Err(_) => true,
        }
    });
    assert_eq!(arrivals.recv().await, Some(1), "the leader reached the origin");
    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get(addr, "/f").await }))
        .collect();
    waiting(&cache, 5).await;
    release.send_replace(true);
    assert!(
        leader.await.expect("leader"),
        "the leader's client gets the head, then the failure"
    );
    for w in waiters {
        assert_eq!(w.await.expect("waiter").text(), "whole");
    }
    assert_eq!(origin.requests(), 2, "one retry, not one per waiter");
}

/// A request sent before its URL is invalidated does not store its
/// (older) answer after the invalidation.
#[tokio::test]
async fn an_invalidation_before_the_answer_arrives_wins() {
    let (release, released) = watch::channel(false);
    let (seen, mut arrivals) = mpsc::unbounded_channel::<Method>();
    let origin = origin(move |req| {
        let mut released = released.clone();
        let seen = seen.clone();
        async move {
            let _ = seen.send(req.method().clone());
            if req.method() != Method::GET {
                return reply(204, &[], "");
            }
            let _ = released.wait_for(|r| *r).await;
            reply(200, &[("cache-control", "max-age=600")], "old")
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let cache = cache_of(&proxy);
    let addr = proxy.addr;
    let get_task = tokio::spawn(async move { get(addr, "/i").await });
    assert_eq!(arrivals.recv().await, Some(Method::GET));
    assert_eq!(
        send(proxy.addr, Method::PUT, "/i", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    release.send_replace(true);
    assert_eq!(get_task.await.expect("get").text(), "old");
    landed(&cache, 1).await;
    assert_eq!(cache.store().keys(), 0);
}

/// Ignored query parameters are stripped only from GET and HEAD.
#[tokio::test]
async fn other_methods_keep_their_query() {
    let (origin, mut heads) = scripted(|_, _| reply(204, &[], "")).await;
    let proxy = start_proxy(&config(origin.addr, r#"{ query = "ignore" }"#, "")).await;
    send(proxy.addr, Method::DELETE, "/items?id=5", &[]).await;
    assert_eq!(heads.recv().await.expect("head").uri.to_string(), "/items?id=5");
}

/// With nobody waiting, a response streams to its client as it arrives
/// (it is copied for the store on the way).
#[tokio::test]
async fn a_miss_nobody_waits_for_streams() {
    let (release, released) = watch::channel(false);
    let origin = origin(move |_| {
        let released = released.clone();
        async move {
            let stream = futures_util::stream::unfold((0, released), |(i, mut released)| async move {
                match i {
                    0 => Some((
                        Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from_static(b"first "))),
                        (1, released),
                    )),
                    1 => {
                        let _ = released.wait_for(|r| *r).await;
                        Some((
                            Ok(http_body::Frame::data(bytes::Bytes::from_static(b"second"))),
                            (2, released),
                        ))
                    }
                    _ => None,
                }
            });
            let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert("cache-control", "max-age=600".parse().expect("value"));
            r
        }
    })
    .await;
    let proxy = caching_proxy(origin.addr).await;
    let mut c = h1(proxy.addr).await;
    let req = Request::get("/s")
        .header("host", "test.local")
        .body(empty())
        .expect("request");
    let mut body = c.send_ready(req).await.expect("head before the body ends").into_body();
    let first = body.frame().await.expect("a frame").expect("ok");
    assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"first "[..]));
    release.send_replace(true);
    while body.frame().await.is_some() {}
    landed(&cache_of(&proxy), 1).await;
    assert_eq!(get(proxy.addr, "/s").await.text(), "first second", "stored on the way");
}
