//! What the origin and the client see through the proxy: header rules,
//! protocols, bodies, trailers, upgrades and connection reuse.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut builder = Request::builder().method(method).uri(path).header("host", "test.local");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(empty()).expect("request")
}

#[tokio::test]
async fn hop_by_hop_fields_are_removed_both_ways_and_via_is_added() {
    let origin = origin(|req| async move {
        let mut r = echo(req).await;
        let h = r.headers_mut();
        h.insert("connection", HeaderValue::from_static("x-resp-hop"));
        h.insert("x-resp-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        r
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h1(proxy.addr).await;
    let req = request(
        Method::GET,
        "/hop",
        &[
            ("connection", "keep-alive, X-Drop-Me"),
            ("x-drop-me", "secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers, deflate"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
        ],
    );
    let got = read(client.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = got.echoed();
    for gone in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(seen.get(gone), None, "{gone} must not reach the origin");
    }
    assert_eq!(seen.get("te"), Some("trailers"));
    assert_eq!(seen.get("x-end-to-end"), Some("kept"));
    assert_eq!(seen.get("via"), Some("1.1 portcullis"));
    for gone in ["x-resp-hop", "keep-alive", "proxy-connection"] {
        assert!(got.header(gone).is_none(), "{gone} must not reach the client");
    }
    assert_eq!(got.header("x-end-to-end"), Some("kept"));
    assert_eq!(got.header("via"), Some("1.1 portcullis"));
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h1(proxy.addr).await;
    let req = request(
        Method::GET,
        "/",
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("via", "1.0 upstream-cache"),
        ],
    );
    let seen = read(client.send_ready(req).await.expect("send")).await.echoed();
    assert_eq!(seen.get("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.get("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.get("x-forwarded-host"), Some("test.local"));
    assert_eq!(
        seen.get("forwarded"),
        Some("for=127.0.0.1;host=\"test.local\";proto=http")
    );
    // Via is a record of hops, not a trust claim: it is appended.
    assert_eq!(seen.all("via"), vec!["1.0 upstream-cache", "1.1 portcullis"]);
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_proxy_are_extended() {
    let origin = echo_origin().await;
    let config = format!(
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\", \"::1\"]\n{}",
        basic_config(origin.addr)
    );
    let proxy = start_proxy(&config).await;
    let mut client = h1(proxy.addr).await;
    let req = request(
        Method::GET,
        "/",
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
            ("forwarded", "for=203.0.113.7;proto=https"),
        ],
    );
    let seen = read(client.send_ready(req).await.expect("send")).await.echoed();
    assert_eq!(seen.get("x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
    assert_eq!(seen.get("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.get("x-forwarded-host"), Some("public.example"));
    assert_eq!(
        seen.get("forwarded"),
        Some("for=203.0.113.7;proto=https, for=127.0.0.1;host=\"test.local\";proto=http")
    );
}

#[tokio::test]
async fn host_is_preserved_by_default_and_can_be_replaced() {
    let origin = echo_origin().await;
    let config = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
path = "/own-host"
upstream = "app"
preserve_host = false

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["{}"]
"#,
        origin.addr
    );
    let proxy = start_proxy(&config).await;
    let seen = get(proxy.addr, "/x").await.echoed();
    assert_eq!(seen.get("host"), Some("test.local"));
    let seen = get(proxy.addr, "/own-host").await.echoed();
    assert_eq!(seen.get("host"), Some(origin.addr.to_string().as_str()));
    assert_eq!(seen.get("x-forwarded-host"), Some("test.local"));
}

#[tokio::test]
async fn routes_rewrite_the_prefix_and_edit_headers() {
    let origin = origin(|req| async move {
        let mut r = echo(req).await;
        r.headers_mut().insert("server", HeaderValue::from_static("origin/1.0"));
        r.headers_mut().insert("x-internal", HeaderValue::from_static("secret"));
        r
    })
    .await;
    let config = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
path = "/api/"
upstream = "app"
rewrite_prefix = "/v2/"
request_headers = {{ set = {{ "x-env" = "test" }}, add = {{ "x-tag" = "b" }}, remove = ["x-debug"] }}
response_headers = {{ set = {{ "server" = "portcullis" }}, remove = ["x-internal"] }}

[[routes]]
path = "/old"
upstream = "app"
rewrite_prefix = "/"

[upstreams.app]
servers = ["{}"]
"#,
        origin.addr
    );
    let proxy = start_proxy(&config).await;
    let mut client = h1(proxy.addr).await;
    let req = request(
        Method::GET,
        "/api/users?id=7&x=%20",
        &[("x-env", "prod"), ("x-tag", "a"), ("x-debug", "1")],
    );
    let got = read(client.send_ready(req).await.expect("send")).await;
    let seen = got.echoed();
    assert_eq!(seen.line, "GET /v2/users?id=7&x=%20 HTTP/1.1");
    assert_eq!(seen.all("x-env"), vec!["test"]);
    assert_eq!(seen.all("x-tag"), vec!["a", "b"]);
    assert_eq!(seen.get("x-debug"), None);
    assert_eq!(got.header("server"), Some("portcullis"));
    assert_eq!(got.header("x-internal"), None);

    assert_eq!(get(proxy.addr, "/old").await.echoed().line, "GET / HTTP/1.1");
    assert_eq!(get(proxy.addr, "/old/a/b").await.echoed().line, "GET /a/b HTTP/1.1");
    // Not a segment match: /oldx goes nowhere (no catch-all route).
    assert_eq!(get(proxy.addr, "/oldx").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn hosts_route_by_exact_name_then_wildcard_then_default() {
    let a = origin(|_| async { text(200, "a") }).await;
    let b = origin(|_| async { text(200, "b") }).await;
    let c = origin(|_| async { text(200, "c") }).await;
    let config = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
host = "a.test"
upstream = "a"

[[routes]]
host = ["*.b.test", "b.test"]
upstream = "b"

[[routes]]
upstream = "c"

[upstreams.a]
servers = ["{}"]
[upstreams.b]
servers = ["{}"]
[upstreams.c]
servers = ["{}"]
"#,
        a.addr, b.addr, c.addr
    );
    let proxy = start_proxy(&config).await;
    for (host, want) in [
        ("a.test", "a"),
        ("A.TEST:8080", "a"),
        ("x.b.test", "b"),
        ("b.test", "b"),
        ("x.a.test", "c"),
        ("other", "c"),
    ] {
        let mut client = h1(proxy.addr).await;
        let req = Request::get("/").header("host", host).body(empty()).expect("req");
        let got = read(client.send_ready(req).await.expect("send")).await;
        assert_eq!(got.text(), want, "host {host}");
    }
}

#[tokio::test]
async fn head_and_options_asterisk_are_forwarded() {
    let origin = origin(|req| async move {
        if req.method() == Method::HEAD {
            let mut r = Response::new(empty());
            r.headers_mut().insert("content-length", HeaderValue::from_static("5"));
            return r;
        }
        echo(req).await
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h1(proxy.addr).await;
    let got = read(client.send_ready(request(Method::HEAD, "/h", &[])).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-length"), Some("5"));
    assert!(got.body.is_empty());

    let out = raw(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("OPTIONS * HTTP/1.1\n"), "{out}");
}

#[tokio::test]
async fn connect_is_refused_unless_the_route_allows_it() {
    let origin = origin(|mut req| async move {
        assert_eq!(req.method(), Method::CONNECT);
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.expect("upgrade"));
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        Response::new(empty())
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let out = raw(
        proxy.addr,
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 405, "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("proxy-status: portcullis; error=http_request_denied"),
        "{out}"
    );
    assert_eq!(origin.requests(), 0);

    let allowed = start_proxy(&format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"app\"\nallow_connect = true\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    ))
    .await;
    let mut client = h1(allowed.addr).await;
    let req = Request::connect("db.internal:5432")
        .header("host", "db.internal:5432")
        .body(empty())
        .expect("req");
    let response = client.send_ready(req).await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(response).await.expect("client upgrade"));
    tunnel.write_all(b"through the tunnel").await.expect("write");
    let mut buf = [0u8; 18];
    tunnel.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"through the tunnel");
}

/// A body whose frames the test produces one by one.
fn channel_body() -> (tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let stream = tokio_stream_from(rx);
    (tx, StreamBody::new(stream).boxed())
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn chunked_bodies_stream_in_both_directions() {
    // The origin answers with a chunked body of its own, produced while the
    // request body is still being read.
    let origin = origin(|req| async move {
        let mut body = req.into_body();
        let (tx, response_body) = channel_body();
        tokio::spawn(async move {
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from(format!("got {}\n", data.len())))))
                        .await;
                }
            }
            let _ = tx.send(Ok(Frame::data(Bytes::from(format!("total {total}\n"))))).await;
        });
        Response::new(response_body)
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h1(proxy.addr).await;
    let (tx, body) = channel_body();
    let req = Request::post("/upload")
        .header("host", "test.local")
        .body(body)
        .expect("req");
    let response = client.send_ready(req);
    let sender = tokio::spawn(async move {
        for chunk in ["alpha", "beta", "gamma"] {
            tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.expect("send chunk");
        }
    });
    let got = read(response.await.expect("send")).await;
    sender.await.expect("sender");
    assert_eq!(got.header("transfer-encoding"), Some("chunked"));
    assert!(got.text().ends_with("total 14\n"), "{}", got.text());
}

#[tokio::test]
async fn trailers_pass_through_http2_end_to_end() {
    // gRPC-style: request trailers in, response body + grpc-status trailer out.
    let origin = origin_with(Proto::H2, |req| async move {
        let collected = req.into_body().collect().await.expect("body");
        let seen = collected.trailers().and_then(|t| t.get("x-checksum")).cloned();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        if let Some(v) = seen {
            trailers.insert("x-seen-checksum", v);
        }
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
    })
    .await;
    let config = basic_config(origin.addr).replace("servers =", "protocol = \"h2c\"\nservers =");
    let proxy = start_proxy(&config).await;
    let mut client = h2(proxy.addr).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("http://test.local/pkg.Service/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .expect("req");
    let got = read(client.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(&got.body[..], b"\0\0\0\0\x02hi");
    let trailers = got.trailers.expect("response trailers");
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(trailers.get("x-seen-checksum").map(|v| v.as_bytes()), Some(&b"abc"[..]));
}

#[tokio::test]
async fn trailers_pass_through_http1_chunked() {
    let origin = origin(|_req| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-digest", HeaderValue::from_static("sha-256=abc"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"payload"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        r.headers_mut().insert("trailer", HeaderValue::from_static("x-digest"));
        r
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h1(proxy.addr).await;
    let got = read(
        client
            .send_ready(request(Method::GET, "/t", &[("te", "trailers")]))
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(got.text(), "payload");
    let trailers = got.trailers.expect("trailers over HTTP/1.1");
    assert_eq!(
        trailers.get("x-digest").map(|v| v.as_bytes()),
        Some(&b"sha-256=abc"[..])
    );
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"POST /up HTTP/1.1\r\nHost: test.local\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write head");
    let mut buf = vec![0u8; 25];
    stream.read_exact(&mut buf).await.expect("read 100");
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.expect("write body");
    let mut out = vec![0u8; 4096];
    let mut text = String::new();
    while !text.contains("hello") {
        let n = stream.read(&mut out).await.expect("read");
        assert!(n > 0, "closed early: {text}");
        text.push_str(&String::from_utf8_lossy(&out[..n]));
    }
    assert_eq!(status_of(&text), 200);
    assert!(
        !text.to_ascii_lowercase().contains("expect:"),
        "Expect is handled by the proxy: {text}"
    );

    // Refused up front: no 100 Continue, the body is never read.
    let limited = start_proxy(&format!(
        "[limits]\nmax_request_body_bytes = 4\n{}",
        basic_config(origin.addr)
    ))
    .await;
    let out = raw(
        limited.addr,
        b"POST /up HTTP/1.1\r\nHost: test.local\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 413, "{out}");
    assert!(!out.contains("100 Continue"), "{out}");
}

#[tokio::test]
async fn http2_client_reaches_an_http1_origin() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h2(proxy.addr).await;
    let req = Request::post("http://test.local/h2?q=1")
        .body(full("h2 body"))
        .expect("req");
    let got = read(client.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = got.echoed();
    assert_eq!(seen.line, "POST /h2?q=1 HTTP/1.1");
    assert_eq!(seen.get("host"), Some("test.local"));
    assert_eq!(seen.get("via"), Some("2 portcullis"));
    assert_eq!(seen.body, "h2 body");
}

#[tokio::test]
async fn http1_client_reaches_an_h2c_origin() {
    let origin = origin_with(Proto::H2, echo).await;
    let config = basic_config(origin.addr).replace("servers =", "protocol = \"h2c\"\nservers =");
    let proxy = start_proxy(&config).await;
    for i in 0..5 {
        let got = get(proxy.addr, &format!("/to-h2/{i}")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.echoed().line, format!("GET http://test.local/to-h2/{i} HTTP/2.0"));
    }
    // One multiplexed upstream connection carries every request.
    assert_eq!(origin.connections(), 1);
}

#[tokio::test]
async fn listener_protocols_can_be_restricted() {
    let origin = echo_origin().await;
    let h1_only = start_proxy(&basic_config(origin.addr).replace("bind =", "protocol = \"http1\"\nbind =")).await;
    assert_eq!(get(h1_only.addr, "/").await.status, StatusCode::OK);
    let h2_only = start_proxy(&basic_config(origin.addr).replace("bind =", "protocol = \"h2c\"\nbind =")).await;
    let mut client = h2(h2_only.addr).await;
    let got = read(
        client
            .send_ready(Request::get("http://test.local/").body(empty()).expect("req"))
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    // An HTTP/1.1 request on the h2c-only listener gets no HTTP/1.1 answer.
    let out = raw(h2_only.addr, b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n").await;
    assert!(!out.starts_with("HTTP/1.1 200"), "{out}");
}

/// A WebSocket-style origin: answers an upgrade with 101 and echoes bytes
/// prefixed with `echo:` until the client closes. Refuses requests without
/// a `Sec-WebSocket-Key`.
async fn websocket_origin() -> Origin {
    origin(|mut req| async move {
        if req.headers().get("sec-websocket-key").is_none() {
            return text(400, "no key");
        }
        let asked = req.headers().get("upgrade").cloned();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.expect("origin upgrade"));
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut reply = b"echo:".to_vec();
                        reply.extend_from_slice(&buf[..n]);
                        if io.write_all(&reply).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", asked.unwrap_or(HeaderValue::from_static("websocket")));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        r.headers_mut().insert(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        r
    })
    .await
}

#[tokio::test]
async fn websocket_upgrade_carries_bytes_both_ways_until_close() {
    let origin = websocket_origin().await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h1(proxy.addr).await;
    let req = request(
        Method::GET,
        "/chat",
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    );
    let response = client.send_ready(req).await.expect("send");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response.headers().get("upgrade").map(|v| v.as_bytes()),
        Some(&b"websocket"[..])
    );
    assert_eq!(
        response.headers().get("sec-websocket-accept").map(|v| v.as_bytes()),
        Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
    );
    let mut ws = TokioIo::new(hyper::upgrade::on(response).await.expect("client upgrade"));
    for message in ["one", "two", "three"] {
        ws.write_all(message.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 5 + message.len()];
        ws.read_exact(&mut buf).await.expect("read");
        assert_eq!(buf, format!("echo:{message}").as_bytes());
    }
    // Closing our side ends the tunnel: the origin sees EOF and closes too.
    ws.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), ws.read_to_end(&mut rest))
        .await
        .expect("tunnel closes");
    assert_eq!(n.expect("read to end"), 0);
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let origin = origin(|_| async { text(200, "pooled") }).await;
    let proxy = proxy_to(origin.addr).await;
    // Sequential requests over several client connections share upstream ones.
    for _ in 0..5 {
        let mut client = h1(proxy.addr).await;
        for _ in 0..10 {
            let got = read(client.send_ready(request(Method::GET, "/", &[])).await.expect("send")).await;
            assert_eq!(got.text(), "pooled");
        }
    }
    assert_eq!(origin.requests(), 50);
    assert_eq!(
        origin.connections(),
        1,
        "sequential requests reuse one upstream connection"
    );

    // Concurrent clients need at most one upstream connection each.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = h1(addr).await;
            for _ in 0..20 {
                let got = read(client.send_ready(request(Method::GET, "/", &[])).await.expect("send")).await;
                assert_eq!(got.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(origin.requests(), 210);
    assert!(
        origin.connections() <= 9,
        "{} upstream connections for 210 requests",
        origin.connections()
    );
}

#[tokio::test]
async fn idle_pool_is_bounded_by_pool_size() {
    let (origin, release) = held_origin().await;
    let config = basic_config(origin.addr).replace("servers =", "pool_size = 2\nservers =");
    let proxy = start_proxy(&config).await;
    // Six requests in flight at once need six upstream connections ...
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move { get(addr, "/").await.status }));
    }
    while origin.requests() < 6 {
        tokio::task::yield_now().await;
    }
    release.send(true).expect("release");
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    // ... but only two stay idle afterwards.
    let snapshot = proxy.snapshot.load();
    let pool = &snapshot.upstreams[0].servers[0].pool;
    assert_eq!(origin.connections(), 6);
    assert!(pool.idle_count() <= 2, "idle {}", pool.idle_count());
}

#[tokio::test]
async fn http2_extended_connect_reaches_an_http1_websocket_origin() {
    let origin = websocket_origin().await;
    let proxy = proxy_to(origin.addr).await;
    let mut client = h2(proxy.addr).await;
    // A first request makes sure the server's SETTINGS (with
    // ENABLE_CONNECT_PROTOCOL) have arrived.
    let got = read(
        client
            .send_ready(Request::get("http://test.local/").body(empty()).expect("req"))
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST, "a plain GET is not an upgrade");
    let mut req = Request::connect("http://test.local/chat")
        .header("sec-websocket-version", "13")
        .body(empty())
        .expect("req");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = client.send_ready(req).await.expect("send");
    assert_eq!(response.status(), StatusCode::OK, "RFC 8441: 200 on the HTTP/2 side");
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let mut ws = TokioIo::new(hyper::upgrade::on(response).await.expect("client upgrade"));
    ws.write_all(b"over h2").await.expect("write");
    let mut buf = [0u8; 12];
    ws.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"echo:over h2");
}
