//! Access log, request ids and metrics, through a real proxy and origins.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use portcullis::observe::{AccessLog, Metrics, Observe};
use serde_json::Value;
use support::*;
use tokio::sync::mpsc;

/// An access log sink that hands every record to the test.
struct LineSink {
    buffer: Vec<u8>,
    tx: mpsc::UnboundedSender<String>,
}

impl Write for LineSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        while let Some(at) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=at).collect();
            let _ = self.tx.send(String::from_utf8_lossy(&line[..at]).into_owned());
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A proxy whose access log records arrive on the returned channel.
async fn logged_proxy(toml: &str) -> (TestProxy, mpsc::UnboundedReceiver<String>) {
    let config = portcullis::Config::from_toml(toml, "test").expect("config");
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = LineSink { buffer: Vec::new(), tx };
    let observe = Observe::new(
        Some(AccessLog::to_writer(&config.access_log, Box::new(sink)).expect("log")),
        None,
        config.metrics.as_ref().map(|_| Arc::new(Metrics::new())),
    );
    (start_proxy_with(toml, observe).await, rx)
}

/// The next record (records are written when a response body is done,
/// which may be just after the client has read it).
async fn next_record(rx: &mut mpsc::UnboundedReceiver<String>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a record within 10 s")
        .expect("log open");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn config_for(origin: std::net::SocketAddr, extra: &str) -> String {
    Template::new(&[origin]).route("name = \"main\"").extra(extra).build()
}

#[tokio::test]
async fn json_record_fields_over_http1_and_http2() {
    let origin = echo_origin().await;
    let (proxy, mut records) = logged_proxy(&config_for(origin.addr, "")).await;

    let mut c = h1(proxy.addr).await;
    let req = Request::post("/upload/a%20b?x=1&token=secret-token")
        .header("host", "site.example")
        .header("user-agent", "test-agent/1.0")
        .header("referer", "https://ref.example/page?api_key=secret-key&q=2")
        .header("authorization", "Bearer secret-bearer")
        .header("cookie", "session=secret-cookie")
        .body(full("hello"))
        .expect("request");
    let got = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, 200);
    let id = got.header("x-request-id").expect("request id returned").to_owned();
    assert_eq!(got.echoed().get("x-request-id"), Some(id.as_str()), "same id upstream");

    let r = next_record(&mut records).await;
    assert_eq!(r["request_id"], id.as_str());
    assert_eq!(r["client_ip"], "127.0.0.1");
    assert_eq!(r["peer_ip"], Value::Null, "peer is the client");
    assert_eq!(r["method"], "POST");
    assert_eq!(r["scheme"], "http");
    assert_eq!(r["host"], "site.example");
    assert_eq!(r["path"], "/upload/a%20b");
    assert_eq!(r["query"], "x=1&token=REDACTED");
    assert_eq!(r["protocol"], "HTTP/1.1");
    assert_eq!(r["status"], 200);
    assert_eq!(r["bytes_in"], 5);
    assert_eq!(r["bytes_out"], got.body.len() as u64);
    assert!(r["duration_ms"].as_f64().expect("duration") > 0.0);
    let upstream_ms = r["upstream_header_ms"].as_f64().expect("upstream time");
    assert!(upstream_ms > 0.0 && upstream_ms <= r["duration_ms"].as_f64().expect("duration"));
    assert_eq!(r["upstream"], "app");
    assert_eq!(r["server"], origin.addr.to_string());
    assert_eq!(r["route"], "main");
    assert_eq!(r["retries"], 0);
    assert_eq!(r["cache"], Value::Null);
    assert_eq!(r["protection"], Value::Null);
    assert_eq!(r["tls_version"], Value::Null);
    assert_eq!(r["tls_cipher"], Value::Null);
    assert_eq!(r["user_agent"], "test-agent/1.0");
    assert_eq!(r["referer"], "https://ref.example/page?api_key=REDACTED&q=2");
    assert_eq!(r["error"], Value::Null);
    assert_eq!(r["complete"], true);
    let time = r["time"].as_str().expect("time");
    assert_eq!(time.len(), 24, "RFC 3339 with ms: {time}");
    assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.');
    let text = r.to_string();
    for secret in ["secret-token", "secret-key", "secret-bearer", "secret-cookie"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }

    let mut c2 = h2(proxy.addr).await;
    let req = Request::get("http://h2.example/x").body(empty()).expect("request");
    let got = read(c2.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, 200);
    let r = next_record(&mut records).await;
    assert_eq!(r["protocol"], "HTTP/2.0");
    assert_eq!(r["host"], "h2.example");
    assert_eq!(r["path"], "/x");
    assert_eq!(r["query"], Value::Null);
    assert_eq!(r["bytes_in"], 0);
    assert_eq!(r["request_id"], got.header("x-request-id").expect("id"));
}

#[tokio::test]
async fn errors_are_logged_with_their_proxy_status_and_no_upstream() {
    let closed = closed_port();
    let dead = closed.addr;
    let (proxy, mut records) = logged_proxy(&config_for(dead, "")).await;
    let got = get(proxy.addr, "/down").await;
    assert_eq!(got.status, 502);
    let r = next_record(&mut records).await;
    assert_eq!(r["status"], 502);
    assert_eq!(r["error"], "connection_refused");
    assert_eq!(r["upstream_header_ms"], Value::Null);
    assert_eq!(r["server"], dead.to_string());
    assert_eq!(r["complete"], true);
}

#[tokio::test]
async fn configured_headers_are_logged_and_sensitive_ones_redacted() {
    let origin = echo_origin().await;
    let extra = r#"
[access_log]
fields = ["status", "headers"]
headers = ["x-tenant", "authorization", "cookie", "x-absent"]
"#;
    let (proxy, mut records) = logged_proxy(&config_for(origin.addr, extra)).await;
    let mut c = h1(proxy.addr).await;
    let req = Request::get("/")
        .header("host", "a")
        .header("x-tenant", "acme")
        .header("authorization", "Basic c2VjcmV0")
        .header("cookie", "id=c2VjcmV0")
        .body(empty())
        .expect("request");
    read(c.send_ready(req).await.expect("send")).await;
    let r = next_record(&mut records).await;
    assert_eq!(
        r,
        serde_json::json!({"status": 200, "headers": {"x-tenant": "acme", "authorization": "[redacted]", "cookie": "[redacted]", "x-absent": null}})
    );
}

#[tokio::test]
async fn combined_log_format_through_the_proxy() {
    let origin = origin(|_| async { text(200, "12345") }).await;
    let extra = "[access_log]\nformat = \"combined\"\n";
    let config = portcullis::Config::from_toml(&config_for(origin.addr, extra), "test").expect("config");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let observe = Observe::new(
        Some(AccessLog::to_writer(&config.access_log, Box::new(LineSink { buffer: Vec::new(), tx })).expect("log")),
        None,
        None,
    );
    let proxy = start_proxy_with(&config_for(origin.addr, extra), observe).await;
    let mut c = h1(proxy.addr).await;
    let req = Request::get("/p?a=1")
        .header("host", "a")
        .header("user-agent", "ua \"quoted\"")
        .body(empty())
        .expect("request");
    read(c.send_ready(req).await.expect("send")).await;
    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("record")
        .expect("open");
    let (head, tail) = line.split_once(" [").expect("time opens with [");
    assert_eq!(head, "127.0.0.1 - -");
    let (time, rest) = tail.split_once("] ").expect("time closes with ]");
    assert_eq!(time.len(), "28/Nov/2026:14:03:13 +0000".len(), "{time}");
    assert!(time.ends_with(" +0000"));
    assert_eq!(rest, "\"GET /p?a=1 HTTP/1.1\" 200 5 \"-\" \"ua \\\"quoted\\\"\"");
}

#[tokio::test]
async fn sampling_keeps_one_in_n_successes_and_every_error() {
    let origin = origin(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/fail" {
            text(500, "no")
        } else {
            text(200, "ok")
        }
    })
    .await;
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
upstream = "app"
log_sample = 5
[upstreams.app]
servers = ["{}"]
[access_log]
fields = ["path", "status"]
"#,
        origin.addr
    );
    let (proxy, mut records) = logged_proxy(&toml).await;
    let mut c = h1(proxy.addr).await;
    for i in 0..10 {
        let path = if i % 2 == 0 { "/ok" } else { "/fail" };
        let req = Request::get(path).header("host", "a").body(empty()).expect("request");
        read(c.send_ready(req).await.expect("send")).await;
    }
    // A last request whose record, once seen, proves the earlier ones are
    // all out (records are written in order per connection).
    let req = Request::get("/fail")
        .header("host", "a")
        .body(empty())
        .expect("request");
    read(c.send_ready(req).await.expect("send")).await;
    let mut seen = Vec::new();
    loop {
        let r = next_record(&mut records).await;
        seen.push((r["path"].as_str().unwrap_or("").to_owned(), r["status"].as_u64()));
        if seen.iter().filter(|(p, _)| p == "/fail").count() == 6 {
            break;
        }
    }
    let ok = seen.iter().filter(|(p, _)| p == "/ok").count();
    assert_eq!(ok, 1, "1 in 5 of the 5 successes: {seen:?}");
    assert_eq!(seen.len(), 7, "{seen:?}");
}

/// A writer that blocks until released: a stalled disk or pipe.
struct Stalled(std::sync::mpsc::Receiver<()>);

impl Write for Stalled {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.recv();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_stalled_writer_costs_records_not_requests() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let toml = config_for(
        origin.addr,
        "[access_log]\nbuffer_records = 4\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let config = portcullis::Config::from_toml(&toml, "test").expect("config");
    let (release, stalled) = std::sync::mpsc::channel();
    let access = AccessLog::to_writer(&config.access_log, Box::new(Stalled(stalled))).expect("log");
    let observe = Observe::new(Some(access), None, Some(Arc::new(Metrics::new())));
    let proxy = start_proxy_with(&toml, observe).await;
    let requests = 50;
    let mut c = h1(proxy.addr).await;
    let all = async {
        for _ in 0..requests {
            let req = Request::get("/").header("host", "a").body(empty()).expect("request");
            assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("requests are never held up by the log");
    let log = proxy.observe.access.as_ref().expect("log");
    // At most the queue (4) and the record the writer holds are kept; the
    // last records may still be on their way to the queue.
    let dropped = || log.counters.dropped.load(Ordering::Relaxed);
    for _ in 0..1000 {
        if dropped() >= requests - 5 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(dropped() >= requests - 5, "dropped {}", dropped());
    let metrics = scrape(proxy.metrics_addr.expect("metrics")).await;
    let counted = sample(&metrics, "portcullis_access_log_dropped_total", &[]).expect("dropped metric");
    assert!(counted >= (requests - 5) as f64, "{counted}");
    // Let the writer go.
    for _ in 0..requests {
        let _ = release.send(());
    }
}

/// Regression (issue 13): the queue was bounded by records only, and a
/// record holds the client's header values (escaped, so up to 4x larger).
#[tokio::test]
async fn the_access_log_queue_is_bounded_in_bytes() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let toml = config_for(
        origin.addr,
        "[access_log]\nbuffer_records = 1048576\nbuffer_bytes = \"64KiB\"\n",
    );
    let config = portcullis::Config::from_toml(&toml, "test").expect("config");
    let (release, stalled) = std::sync::mpsc::channel();
    let access = AccessLog::to_writer(&config.access_log, Box::new(Stalled(stalled))).expect("log");
    let observe = Observe::new(Some(access), None, None);
    let proxy = start_proxy_with(&toml, observe).await;
    let agent = "a".repeat(16 << 10);
    let mut c = h1(proxy.addr).await;
    for _ in 0..40 {
        let req = Request::get("/")
            .header("host", "a")
            .header("user-agent", agent.as_str())
            .body(empty())
            .expect("request");
        assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);
    }
    let log = proxy.observe.access.as_ref().expect("log");
    assert!(log.queued_bytes() <= 64 << 10, "queued {}", log.queued_bytes());
    assert!(
        log.counters.dropped.load(Ordering::Relaxed) > 0,
        "records over the bound are dropped"
    );
    for _ in 0..40 {
        let _ = release.send(());
    }
}

#[tokio::test]
async fn request_ids_from_untrusted_clients_are_replaced_and_trusted_ones_kept() {
    let origin = echo_origin().await;
    let send = |addr, id: Option<&'static str>| async move {
        let mut c = h1(addr).await;
        let mut req = Request::get("/").header("host", "a");
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        read(c.send_ready(req.body(empty()).expect("request")).await.expect("send")).await
    };

    let untrusted = start_proxy(&config_for(origin.addr, "")).await;
    let got = send(untrusted.addr, Some("client-chosen")).await;
    let id = got.header("x-request-id").expect("id").to_owned();
    assert_ne!(id, "client-chosen");
    assert_eq!(got.echoed().all("x-request-id"), vec![id.as_str()], "one id upstream");
    assert_eq!(id.len(), 36);
    assert_eq!(id.as_bytes()[14], b'7', "UUIDv7: {id}");
    let other = send(untrusted.addr, None).await;
    assert_ne!(other.header("x-request-id"), Some(id.as_str()), "fresh per request");

    let trusted = start_proxy(&config_for(
        origin.addr,
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    ))
    .await;
    let got = send(trusted.addr, Some("edge-42")).await;
    assert_eq!(got.header("x-request-id"), Some("edge-42"));
    assert_eq!(got.echoed().get("x-request-id"), Some("edge-42"));
    let bad = send(trusted.addr, Some("has\"quote")).await;
    assert_ne!(
        bad.header("x-request-id"),
        Some("has\"quote"),
        "malformed ids are replaced"
    );

    let custom = start_proxy(&config_for(
        origin.addr,
        "[request_id]\nheader = \"x-correlation-id\"\n",
    ))
    .await;
    let got = send(custom.addr, None).await;
    let id = got.header("x-correlation-id").expect("custom header").to_owned();
    assert_eq!(got.echoed().get("x-correlation-id"), Some(id.as_str()));
    assert_eq!(got.header("x-request-id"), None);

    let off = start_proxy(&config_for(origin.addr, "[request_id]\nheader = \"\"\n")).await;
    let got = send(off.addr, None).await;
    assert_eq!(got.header("x-request-id"), None);
    assert_eq!(got.echoed().get("x-request-id"), None);
}

#[tokio::test]
async fn traceparent_passes_through_or_is_created() {
    let origin = echo_origin().await;
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let send = |addr, tp: Option<&'static str>| async move {
        let mut c = h1(addr).await;
        let mut req = Request::get("/").header("host", "a");
        if let Some(tp) = tp {
            req = req.header("traceparent", tp);
        }
        read(c.send_ready(req.body(empty()).expect("request")).await.expect("send")).await
    };
    let pass = start_proxy(&config_for(origin.addr, "")).await;
    assert_eq!(
        send(pass.addr, Some(valid)).await.echoed().get("traceparent"),
        Some(valid)
    );
    assert_eq!(
        send(pass.addr, Some("junk")).await.echoed().get("traceparent"),
        Some("junk")
    );
    assert_eq!(send(pass.addr, None).await.echoed().get("traceparent"), None);

    let create = start_proxy(&config_for(origin.addr, "[request_id]\ntraceparent = \"create\"\n")).await;
    assert_eq!(
        send(create.addr, Some(valid)).await.echoed().get("traceparent"),
        Some(valid)
    );
    let got = send(create.addr, None).await;
    let id = got.header("x-request-id").expect("id").replace('-', "");
    let tp = got.echoed().get("traceparent").expect("created").to_owned();
    assert_eq!(tp.len(), 55, "{tp}");
    assert_eq!(&tp[3..35], id, "trace id is the request id");
    let replaced = send(create.addr, Some("junk")).await;
    assert_ne!(replaced.echoed().get("traceparent"), Some("junk"));
}

/// GET the metrics endpoint; the text must parse as Prometheus text
/// exposition format 0.0.4.
async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let mut c = h1(addr).await;
    let req = Request::get("/metrics")
        .header("host", "m")
        .body(empty())
        .expect("request");
    let got = read(c.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_exposition(&got.text())
}

/// A strict parser of the text format: every sample belongs to a family
/// declared by `# TYPE` before it, names and labels are well-formed, values
/// are numbers, histogram buckets are cumulative and end at `+Inf` = count.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            let name = parts.next().unwrap_or("");
            assert!(name_ok(name), "bad name in {line:?}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "bad type: {line:?}"
                );
                types.insert(name.to_owned(), t.to_owned());
            } else {
                assert_eq!(kind, "HELP", "unknown comment: {line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line:?}")),
        };
        let name = series.split('{').next().unwrap_or("");
        assert!(name_ok(name), "bad sample name: {line:?}");
        let family = types.keys().any(|f| {
            name == f
                || [("_total"), ("_bucket"), ("_sum"), ("_count"), ("_info")]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.as_str()))
        });
        assert!(family, "sample before its # TYPE: {line:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels: {line:?}"));
                for pair in split_labels(inner) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line:?}"));
                    assert!(name_ok(k), "bad label name: {line:?}");
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "bad label value: {line:?}"
                    );
                }
            }
        }
        samples.insert(series.to_owned(), value);
    }
    // Histograms: cumulative buckets, +Inf equal to the count.
    for (family, t) in &types {
        if t != "histogram" {
            continue;
        }
        let mut by_series: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for (series, value) in &samples {
            if let Some(labels) = series.strip_prefix(&format!("{family}_bucket{{")) {
                let (le_at, _) = labels.match_indices("le=\"").next().expect("le label");
                let rest = &labels[le_at + 4..];
                let le_text = &rest[..rest.find('"').expect("le value")];
                let le = if le_text == "+Inf" {
                    f64::INFINITY
                } else {
                    le_text.parse().expect("le")
                };
                let key = labels.replace(&format!("le=\"{le_text}\""), "");
                by_series.entry(key).or_default().push((le, *value));
            }
        }
        for (key, mut buckets) in by_series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{key}: not cumulative"
            );
            assert_eq!(
                buckets.last().map(|b| b.0),
                Some(f64::INFINITY),
                "{family}: no +Inf bucket"
            );
        }
    }
    samples
}

fn split_labels(inner: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in inner.char_indices() {
        match c {
            '\\' if quoted && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => quoted = !quoted,
            ',' if !quoted => {
                out.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        escaped = false;
    }
    if start < inner.len() {
        out.push(&inner[start..]);
    }
    out
}

/// The value of `name` with exactly these labels (in any order).
fn sample(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples.iter().find_map(|(series, v)| {
        let inner = series.strip_prefix(name)?;
        let inner = if inner.is_empty() {
            ""
        } else {
            inner.strip_prefix('{')?.strip_suffix('}')?
        };
        let mut have: Vec<&str> = split_labels(inner);
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        have.sort_unstable();
        want.sort_unstable();
        (have == want.iter().map(String::as_str).collect::<Vec<_>>()).then_some(*v)
    })
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let toml = format!(
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
[[routes]]
name = "main"
host = "a"
upstream = "app"
[upstreams.app]
servers = ["{}"]
[metrics]
listen = "127.0.0.1:0"
"#,
        origin.addr
    );
    let proxy = start_proxy(&toml).await;
    let metrics_addr = proxy.metrics_addr.expect("metrics endpoint");
    let before = scrape(metrics_addr).await;
    assert_eq!(
        sample(
            &before,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &before,
            "portcullis_upstream_server_up",
            &[("upstream", "app"), ("server", &origin.addr.to_string())]
        ),
        Some(1.0)
    );

    let mut c = h1(proxy.addr).await;
    for host in ["a", "a", "nowhere"] {
        let req = Request::get("/").header("host", host).body(empty()).expect("request");
        read(c.send_ready(req).await.expect("send")).await;
    }
    let ok = [("route", "main"), ("method", "GET"), ("status_class", "2xx")];
    let not_found = [("route", ""), ("method", "GET"), ("status_class", "4xx")];
    // Counted when each response body is done: wait for the scrape to show it.
    let mut after = HashMap::new();
    for _ in 0..200 {
        after = scrape(metrics_addr).await;
        if sample(&after, "portcullis_requests_total", &ok) == Some(2.0)
            && sample(&after, "portcullis_requests_total", &not_found) == Some(1.0)
        {
            break;
        }
    }
    assert_eq!(sample(&after, "portcullis_requests_total", &ok), Some(2.0));
    assert_eq!(sample(&after, "portcullis_requests_total", &not_found), Some(1.0));
    assert_eq!(
        sample(
            &after,
            "portcullis_request_duration_seconds_count",
            &[("route", "main")]
        ),
        Some(2.0)
    );
    let server = origin.addr.to_string();
    assert_eq!(
        sample(
            &after,
            "portcullis_upstream_response_duration_seconds_count",
            &[("upstream", "app"), ("server", &server)]
        ),
        Some(2.0)
    );
    assert!(sample(&after, "portcullis_connections_accepted_total", &[("listener", "web")]) >= Some(1.0));
    assert_eq!(
        sample(&after, "portcullis_connections_open", &[("listener", "web")]),
        Some(1.0)
    );
    for name in after.keys() {
        let base = name.split('{').next().unwrap_or("");
        assert!(base.starts_with("portcullis_"), "{base}");
    }

    // Only the configured path; only GET / HEAD.
    let mut m = h1(metrics_addr).await;
    let req = Request::get("/other")
        .header("host", "m")
        .body(empty())
        .expect("request");
    assert_eq!(read(m.send_ready(req).await.expect("send")).await.status, 404);
    let req = Request::post("/metrics")
        .header("host", "m")
        .body(empty())
        .expect("request");
    assert_eq!(read(m.send_ready(req).await.expect("send")).await.status, 405);
}

#[tokio::test]
async fn reopen_moves_writing_to_a_new_file_without_losing_records() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let toml = config_for(
        origin.addr,
        &format!(
            "[access_log]\ndestination = {:?}\nfields = [\"path\"]\n",
            path.display().to_string()
        ),
    );
    let proxy = start_proxy(&toml).await;
    let log = proxy.observe.clone();
    let written = |n: u64| {
        let log = log.clone();
        async move {
            for _ in 0..1000 {
                log.flush().await;
                if log
                    .access
                    .as_ref()
                    .expect("log")
                    .counters
                    .written
                    .load(Ordering::Relaxed)
                    >= n
                {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("{n} records not written");
        }
    };

    // Traffic keeps flowing on its own connection while the file rotates.
    let addr = proxy.addr;
    let traffic = tokio::spawn(async move {
        let mut c = h1(addr).await;
        for i in 0..200 {
            let req = Request::get(format!("/r{i}"))
                .header("host", "a")
                .body(empty())
                .expect("request");
            assert_eq!(read(c.send_ready(req).await.expect("send")).await.status, 200);
            tokio::task::yield_now().await;
        }
    });
    written(20).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    proxy.observe.reopen();
    traffic.await.expect("traffic");
    written(200).await;

    let old = std::fs::read_to_string(&rotated).expect("old file");
    let new = std::fs::read_to_string(&path).expect("new file created");
    let mut paths: Vec<String> = old
        .lines()
        .chain(new.lines())
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["path"]
                .as_str()
                .expect("path")
                .to_owned()
        })
        .collect();
    assert!(old.lines().count() >= 20, "old file kept its records");
    assert!(new.lines().count() >= 1, "new file receives records after the reopen");
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), 200, "every request logged exactly once across both files");
}

#[tokio::test]
async fn client_ip_comes_from_forwarded_for_only_behind_a_trusted_proxy() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let fields = "[access_log]\nfields = [\"client_ip\", \"peer_ip\"]\n";
    let send = |addr| async move {
        let mut c = h1(addr).await;
        let req = Request::get("/")
            .header("host", "a")
            .header("x-forwarded-for", "198.51.100.1, 203.0.113.9")
            .body(empty())
            .expect("request");
        read(c.send_ready(req).await.expect("send")).await;
    };
    let (untrusted, mut records) = logged_proxy(&config_for(origin.addr, fields)).await;
    send(untrusted.addr).await;
    assert_eq!(
        next_record(&mut records).await,
        serde_json::json!({"client_ip": "127.0.0.1", "peer_ip": null})
    );
    // Behind a trusted proxy: the right-most address it did not add itself.
    let trusted_config = config_for(
        origin.addr,
        &format!("{fields}[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n"),
    );
    let (trusted, mut records) = logged_proxy(&trusted_config).await;
    send(trusted.addr).await;
    assert_eq!(
        next_record(&mut records).await,
        serde_json::json!({"client_ip": "203.0.113.9", "peer_ip": "127.0.0.1"})
    );
}

/// On a caching route the record names how the cache served the request,
/// and a response fed to its client by the cache (a miss that others
/// could wait on) is logged complete once it was delivered.
#[tokio::test]
async fn cache_results_are_logged_and_fed_responses_complete() {
    let origin = origin(|req| async move {
        let body = if req.uri().path() == "/empty" {
            ""
        } else {
            "some content"
        };
        let mut r = text(200, body);
        r.headers_mut()
            .insert("cache-control", "max-age=600".parse().expect("value"));
        r
    })
    .await;
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
name = "main"
upstream = "app"
cache = true

[upstreams.app]
servers = ["{}"]
"#,
        origin.addr
    );
    let (proxy, mut records) = logged_proxy(&toml).await;
    for (path, cache) in [("/a", "miss"), ("/a", "hit"), ("/empty", "miss"), ("/empty", "hit")] {
        let got = get(proxy.addr, path).await;
        assert_eq!(got.status, 200);
        let r = next_record(&mut records).await;
        assert_eq!(r["cache"], cache, "{path}: {r}");
        assert_eq!(r["complete"], true, "{path} {cache}: {r}");
    }
}
