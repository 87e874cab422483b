//! Every error the proxy answers itself: its status, its `Proxy-Status`,
//! and a short body that leaks nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn assert_proxy_error(got: &Got, status: u16, kind: &str) {
    assert_eq!(got.status.as_u16(), status, "body: {}", got.text());
    assert_eq!(
        got.header("proxy-status"),
        Some(format!("portcullis; error={kind}").as_str())
    );
    // Short, and nothing internal (addresses, OS errors) in it.
    assert!(got.body.len() < 64, "{}", got.text());
    assert!(!got.text().contains("127.0.0.1"), "{}", got.text());
    assert!(!got.text().to_lowercase().contains("os error"), "{}", got.text());
}

#[tokio::test]
async fn refused_connection_is_502_connection_refused() {
    let dead = closed_port();
    let proxy = proxy_to(dead.addr).await;
    assert_proxy_error(&get(proxy.addr, "/").await, 502, "connection_refused");
}

#[tokio::test]
async fn connect_timeout_is_504_connection_timeout() {
    // A listener whose accept queue is full and never drained: the kernel
    // drops further SYNs, so a connect attempt hangs until our timeout.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = TcpSocket::new_v4().expect("socket");
        // Some of these may themselves hang: give each a short chance.
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), s.connect(addr)).await {
            fillers.push(stream);
        }
    }
    let config = basic_config(addr).replace("servers =", "connect_timeout = \"300ms\"\nservers =");
    let proxy = start_proxy(&config).await;
    let started = std::time::Instant::now();
    let got = get(proxy.addr, "/").await;
    assert_proxy_error(&got, 504, "connection_timeout");
    assert!(started.elapsed() >= Duration::from_millis(250));
    drop(listener);
}

#[tokio::test]
async fn slow_response_headers_are_504_http_response_timeout() {
    let (origin, _held) = held_origin().await;
    let config = basic_config(origin.addr).replace("servers =", "response_header_timeout = \"200ms\"\nservers =");
    let proxy = start_proxy(&config).await;
    assert_proxy_error(&get(proxy.addr, "/").await, 504, "http_response_timeout");
}

#[tokio::test]
async fn the_whole_request_timeout_also_bounds_the_response_head() {
    let (origin, _held) = held_origin().await;
    let config = format!("[timeouts]\nrequest = \"200ms\"\n{}", basic_config(origin.addr));
    let proxy = start_proxy(&config).await;
    assert_proxy_error(&get(proxy.addr, "/").await, 504, "http_response_timeout");
}

#[tokio::test]
async fn connection_closed_before_a_response_is_502_connection_terminated() {
    let (addr, _) = raw_origin(b"").await;
    let proxy = proxy_to(addr).await;
    assert_proxy_error(&get(proxy.addr, "/").await, 502, "connection_terminated");
}

#[tokio::test]
async fn garbage_from_the_origin_is_502_http_protocol_error() {
    let (addr, _) = raw_origin(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let proxy = proxy_to(addr).await;
    assert_proxy_error(&get(proxy.addr, "/").await, 502, "http_protocol_error");
}

#[tokio::test]
async fn a_truncated_body_from_the_origin_aborts_the_client_response() {
    let (addr, _) = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part").await;
    let proxy = proxy_to(addr).await;
    let mut client = h1(proxy.addr).await;
    let req = Request::get("/")
        .header("host", "test.local")
        .body(empty())
        .expect("req");
    let response = client.send_ready(req).await.expect("head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    assert!(
        response.into_body().collect().await.is_err(),
        "the client must see the body fail, not end short"
    );
}

#[tokio::test]
async fn no_matching_route_is_404_destination_not_found() {
    let origin = echo_origin().await;
    let config = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\nhost = \"only.test\"\nupstream = \"app\"\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    );
    let proxy = start_proxy(&config).await;
    assert_proxy_error(&get(proxy.addr, "/").await, 404, "destination_not_found");
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn malformed_requests_are_400_and_never_forwarded() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    let cases: &[(&str, &[u8])] = &[
        ("garbage request line", b"HELLO\r\n\r\n"),
        ("bad header name", b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"),
        ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        ),
        (
            "absolute target disagreeing with Host",
            b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        ),
        (
            "conflicting Content-Length",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n",
        ),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n"),
        (
            "bare CR in a header value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
        ),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunk size overflow",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let out = raw(proxy.addr, bytes).await;
        assert_eq!(status_of(&out), 400, "{what}: {out}");
    }
    // Codings other than chunked alone are not forwarded (RFC 9112 6.1).
    let out = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 501, "{out}");
    assert_eq!(origin.requests(), 0, "nothing malformed reaches the origin");
    // The proxy is still serving.
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let origin = echo_origin().await;
    let config = format!(
        "[limits]\nmax_request_header_bytes = \"4KiB\"\nmax_header_count = 20\n{}",
        basic_config(origin.addr)
    );
    for protocol in ["auto", "http1"] {
        let proxy = start_proxy(&config.replace("bind =", &format!("protocol = \"{protocol}\"\nbind ="))).await;
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "x".repeat(5000)
        );
        assert_eq!(
            status_of(&raw(proxy.addr, big.as_bytes()).await),
            431,
            "{protocol}: bytes"
        );
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
        for i in 0..30 {
            many.push_str(&format!("X-H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            status_of(&raw(proxy.addr, many.as_bytes()).await),
            431,
            "{protocol}: count"
        );
        // Just under the limits passes.
        let fine = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "x".repeat(3000)
        );
        assert_eq!(
            status_of(&raw(proxy.addr, fine.as_bytes()).await),
            200,
            "{protocol}: under the limit"
        );
    }
    // HTTP/2 clients get the same limit.
    let proxy = start_proxy(&config).await;
    let mut client = h2(proxy.addr).await;
    let mut req = Request::get("http://test.local/").body(empty()).expect("req");
    for i in 0..30 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).expect("name"),
            http::HeaderValue::from_static("v"),
        );
    }
    let got = read(client.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(origin.requests(), 2, "only the two requests under the limits");
}

#[tokio::test]
async fn long_uri_is_414() {
    let origin = echo_origin().await;
    let config = format!("[limits]\nmax_uri_length = 100\n{}", basic_config(origin.addr));
    let proxy = start_proxy(&config).await;
    let got = get(proxy.addr, &format!("/{}", "a".repeat(150))).await;
    assert_eq!(got.status, StatusCode::URI_TOO_LONG);
    assert_eq!(
        get(proxy.addr, &format!("/{}", "a".repeat(50))).await.status,
        StatusCode::OK
    );
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn body_over_the_limit_is_413_declared_or_chunked() {
    let origin = echo_origin().await;
    let config = format!("[limits]\nmax_request_body_bytes = 10\n{}", basic_config(origin.addr));
    let proxy = start_proxy(&config).await;
    let declared = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nConnection: close\r\n\r\n01234567890",
    )
    .await;
    assert_eq!(status_of(&declared), 413, "{declared}");
    assert_eq!(
        origin.requests(),
        0,
        "a declared oversized body is refused before forwarding"
    );

    let chunked = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\n012345\r\n6\r\n678901\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&chunked), 413, "{chunked}");

    let fine = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status_of(&fine), 200, "{fine}");
    assert!(fine.ends_with("0123456789"), "{fine}");
}

#[tokio::test]
async fn random_bytes_never_disturb_the_proxy() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    // A fixed pseudo-random sequence: the same inputs every run.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let prefixes: [&[u8]; 4] = [
        b"",
        b"GET / HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    for round in 0..40 {
        let mut bytes = prefixes[round % prefixes.len()].to_vec();
        let len = (next() % 300) as usize;
        bytes.extend((0..len).map(|_| next() as u8));
        bytes.extend_from_slice(b"\r\n\r\n");
        let _ = raw(proxy.addr, &bytes).await;
    }
    assert_eq!(get(proxy.addr, "/still-alive").await.status, StatusCode::OK);
}

#[tokio::test]
async fn methods_outside_the_allow_list_are_501_and_never_forwarded() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    for line in [
        "get / HTTP/1.1",
        "FOO / HTTP/1.1",
        "PROPFIND / HTTP/1.1",
        "Get / HTTP/1.1",
    ] {
        let out = raw(
            proxy.addr,
            format!("{line}\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&out), 501, "{line}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("proxy-status: portcullis; error=http_request_denied"),
            "{out}"
        );
    }
    assert_eq!(origin.requests(), 0);
    for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let out = raw(
            proxy.addr,
            format!("{method} / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&out), 200, "{method}: {out}");
    }

    // WebDAV methods once the operator allows them.
    let config = format!(
        "[server]\nallowed_methods = [\"GET\", \"PROPFIND\"]\n{}",
        basic_config(origin.addr)
    );
    let dav = start_proxy(&config).await;
    let out = raw(
        dav.addr,
        b"PROPFIND /files HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("PROPFIND /files HTTP/1.1"), "{out}");
    let out = raw(
        dav.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 501, "{out}");
}

/// Both framings in a head, in either order and case.
const BOTH_FRAMINGS: [&str; 3] = [
    "Content-Length: 5\r\nTransfer-Encoding: chunked",
    "Transfer-Encoding: chunked\r\nContent-Length: 5",
    "transfer-encoding: chunked\r\ncontent-length: 5",
];

/// CL.TE / TE.CL: a parser trusting `Content-Length` would see the chunked
/// terminator plus "GET /smuggled..." as the next request.
fn smuggling_attempt(framings: &str) -> String {
    format!("POST /first HTTP/1.1\r\nHost: a\r\n{framings}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
}

#[tokio::test]
async fn both_framings_are_refused_with_400_by_default() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    for head in BOTH_FRAMINGS {
        let out = raw(proxy.addr, smuggling_attempt(head).as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "one answer, then closed: {out}");
    }
    // On a keep-alive connection too, after normal requests (each sent
    // once the answer to the one before is in); a request with one
    // framing is not touched.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let mut statuses = Vec::new();
    for request in [
        &b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"[..],
        b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"POST /both HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        stream.write_all(request).await.expect("write");
        statuses.push(read_one_response(&mut stream).await);
    }
    assert_eq!(statuses, vec![200, 200, 400]);
    assert_eq!(
        origin.requests(),
        2,
        "only the requests with one framing reached the origin"
    );
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`;
/// its status.
async fn read_one_response(stream: &mut tokio::net::TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return status_of(&text);
            }
        }
    }
}

#[tokio::test]
async fn the_lenient_reading_of_both_framings_cannot_smuggle_a_second_request() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&format!(
        "{}\n[server]\nconflicting_framing = \"chunked\"\n",
        basic_config(origin.addr)
    ))
    .await;
    for head in BOTH_FRAMINGS {
        let out = raw(proxy.addr, smuggling_attempt(head).as_bytes()).await;
        assert_eq!(status_of(&out), 200, "{out}");
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            1,
            "one response, then the connection closed: {out}"
        );
        assert!(out.contains("POST /first HTTP/1.1"), "{out}");
        assert!(
            !out.contains("content-length: 5"),
            "the conflicting length is not forwarded: {out}"
        );
    }
    assert_eq!(
        origin.requests(),
        BOTH_FRAMINGS.len(),
        "only the first request of each attempt; nothing smuggled"
    );
}

#[tokio::test]
async fn http_0_9_and_unknown_versions_get_400_and_a_close() {
    let origin = echo_origin().await;
    let proxy = proxy_to(origin.addr).await;
    for (what, bytes) in [
        ("HTTP/0.9", &b"GET /\r\n\r\n"[..]),
        ("HTTP/1.2", &b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"[..]),
        ("HTTP/3.0", &b"GET / HTTP/3.0\r\nHost: a\r\n\r\n"[..]),
        ("no version", &b"GET / \r\nHost: a\r\n\r\n"[..]),
    ] {
        // `raw` reads until the proxy closes: the close is part of the answer.
        let out = raw(proxy.addr, bytes).await;
        assert_eq!(status_of(&out), 400, "{what}: {out:?}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{what}: {out:?}"
        );
    }
    assert_eq!(origin.requests(), 0);
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
}
