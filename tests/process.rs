//! The real `portcullis` binary: bodies stream with bounded memory (2 GiB up
//! and 2 GiB down, peak RSS under 64 MiB), SIGTERM drains, then exits 0,
//! and a shed flood writes a log line a second, not one a request.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;

const TOTAL: u64 = 2 << 30;
const CHUNK: usize = 256 << 10;
const RSS_LIMIT_KIB: u64 = 64 << 10;

/// A generated body of `total` bytes: the same chunk over and over, so the
/// test itself holds no more than one chunk.
fn generated(total: u64) -> TestBody {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let count = total / CHUNK as u64;
    let frames = (0..count).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone())));
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// The proxy binary, killed when dropped.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    /// The proxy's log lines after the listening one.
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    fn start(config: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "-c", path.to_str().expect("path")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        // Readiness: the "listening" log line carries the bound address.
        let stderr = child.stderr.take().expect("stderr");
        // Killed on every exit path, including a failed assertion below.
        let (tx, log) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut process = ProxyProcess {
            child,
            addr: "0.0.0.0:0".parse().expect("placeholder"),
            log,
            _dir: dir,
        };
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("proxy exited before listening")
                .expect("read stderr");
            // The first listener's line (the metrics endpoint logs its own).
            if !line.contains("listener=") {
                continue;
            }
            if let Some(rest) = line.split("addr=").nth(1) {
                let text = rest.split_whitespace().next().unwrap_or("");
                break text
                    .parse()
                    .unwrap_or_else(|_| panic!("bad address in log line: {line}"));
            }
        };
        // Keep draining stderr so the proxy never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        process.addr = addr;
        process
    }

    /// Where the proxy's config file is.
    fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("portcullis.toml")
    }

    /// Waits for a log line containing `text`; returns it.
    async fn wait_for_log(&mut self, text: &str) -> String {
        loop {
            let line = next_line(&mut self.log).await;
            if line.contains(text) {
                return line;
            }
        }
    }

    /// Peak resident set size, from /proc.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_up_and_two_gib_down_with_bounded_memory() {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let origin = origin(move |req| {
        let counter = counter.clone();
        async move {
            if req.uri().path() == "/download" {
                let mut r = Response::new(generated(TOTAL));
                r.headers_mut().insert("content-length", HeaderValue::from(TOTAL));
                return r;
            }
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Some(data) = frame.expect("upload frame").data_ref() {
                    n += data.len() as u64;
                }
            }
            counter.store(n, Ordering::SeqCst);
            text(200, &n.to_string())
        }
    })
    .await;
    let config = format!(
        "[limits]\nmax_request_body_bytes = \"unlimited\"\n[timeouts]\nrequest = \"10m\"\n{}",
        basic_config(origin.addr)
    );
    let proxy = ProxyProcess::start(&config);

    // Upload, chunked (no Content-Length): the proxy cannot know the size.
    let mut client = h1(proxy.addr).await;
    let req = Request::post("/upload")
        .header("host", "test.local")
        .body(generated(TOTAL))
        .expect("req");
    let got = read(client.send_ready(req).await.expect("upload")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), TOTAL.to_string());
    assert_eq!(received.load(Ordering::SeqCst), TOTAL);

    // Download, counted as it arrives (never collected).
    let req = Request::get("/download")
        .header("host", "test.local")
        .body(empty())
        .expect("req");
    let response = client.send_ready(req).await.expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut downloaded = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.expect("download frame").data_ref() {
            downloaded += data.len() as u64;
        }
    }
    assert_eq!(downloaded, TOTAL);

    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS after 2 GiB up + 2 GiB down: {peak} KiB");
    assert!(
        peak < RSS_LIMIT_KIB,
        "proxy peak RSS {peak} KiB exceeds {RSS_LIMIT_KIB} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let (origin, release) = held_origin().await;
    let mut proxy = ProxyProcess::start(&basic_config(origin.addr));
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
    while origin.requests() < 1 {
        tokio::task::yield_now().await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // Listeners close at once: wait (bounded) until a connect is refused.
    let mut refused = false;
    for _ in 0..20_000 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "still accepting after SIGTERM");
    release.send(true).expect("release");
    let got = in_flight.await.expect("client");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), "released");
    let exit = tokio::task::spawn_blocking(move || proxy.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_a_broken_one_changes_nothing() {
    let origin = echo_origin().await;
    let mut proxy = ProxyProcess::start(&basic_config(origin.addr));
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    let added = format!(
        "{}\n[[routes]]\npath = \"/new\"\nupstream = \"app\"\nrequest_headers = {{ set = {{ \"x-route\" = \"new\" }} }}\n",
        basic_config(origin.addr)
    );
    std::fs::write(proxy.config_path(), &added).expect("write config");
    hup(proxy.child.id());
    proxy.wait_for_log("config reloaded").await;
    let got = get(proxy.addr, "/new").await;
    assert_eq!(got.echoed().get("x-route"), Some("new"));

    let broken = format!(
        "{}\n[[routes]]\npath = \"/x\"\nupstream = \"nowhere\"\n",
        basic_config(origin.addr)
    );
    std::fs::write(proxy.config_path(), broken).expect("write config");
    hup(proxy.child.id());
    proxy
        .wait_for_log("config reload failed; keeping the running config")
        .await;
    let line = proxy.wait_for_log("config reload: ").await;
    assert!(line.contains("routes[1].upstream"), "{line}");
    let got = get(proxy.addr, "/new").await;
    assert_eq!(got.echoed().get("x-route"), Some("new"), "the running config is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates() {
    use rustls::pki_types::{CertificateDer, ServerName};
    let dir = tempfile::tempdir().expect("dir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let write_cert = || {
        let generated = rcgen::generate_simple_self_signed(vec!["site.test".to_owned()]).expect("cert");
        std::fs::write(&cert, generated.cert.pem()).expect("write");
        std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write");
        generated.cert.der().clone()
    };
    let first = write_cert();
    let origin = echo_origin().await;
    let config = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\n[listeners.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [\"{}\"]\n",
        cert.display().to_string(),
        key.display().to_string(),
        origin.addr
    );
    let proxy = ProxyProcess::start(&config);
    let served = |addr: std::net::SocketAddr, trusted: CertificateDer<'static>| async move {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(portcullis::server::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("site.test").expect("name");
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await;
        tls.map(|s| {
            s.get_ref().1.peer_certificates().expect("certs")[0]
                .clone()
                .into_owned()
        })
    };
    assert_eq!(served(proxy.addr, first.clone()).await.expect("first handshake"), first);
    let second = write_cert();
    let status = Command::new("kill")
        .args(["-HUP", &proxy.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // The reload happens in the proxy's own time: retry (bounded) until seen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(cert) = served(proxy.addr, second.clone()).await {
            assert_eq!(cert, second);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn sigusr1_reopens_the_access_and_audit_logs_after_rotation() {
    let dir = tempfile::tempdir().expect("dir");
    let access = dir.path().join("access.log");
    let audit = dir.path().join("audit.jsonl");
    let origin = origin(|_| async { text(200, "ok") }).await;
    let config = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [\"{}\"]\n[access_log]\ndestination = {:?}\nformat = \"common\"\n[audit_log]\npath = {:?}\n",
        origin.addr,
        access.display().to_string(),
        audit.display().to_string()
    );
    let mut proxy = ProxyProcess::start(&config);
    let lines = |path: &std::path::Path| std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut sent = 0;
    while sent < 5 || lines(&access) < 5 {
        if sent < 5 {
            assert_eq!(get(proxy.addr, "/before").await.status, 200);
            sent += 1;
        }
        assert!(std::time::Instant::now() < deadline, "records not written");
        tokio::task::yield_now().await;
    }
    let (access_old, audit_old) = (dir.path().join("access.log.1"), dir.path().join("audit.jsonl.1"));
    std::fs::rename(&access, &access_old).expect("rotate access log");
    std::fs::rename(&audit, &audit_old).expect("rotate audit log");
    let status = Command::new("kill")
        .args(["-USR1", &proxy.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // The reopen happens in the proxy's own time: keep requesting (bounded)
    // until records land in a new file.
    while lines(&access) == 0 {
        assert_eq!(get(proxy.addr, "/after").await.status, 200);
        sent += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "SIGUSR1 did not reopen the access log"
        );
    }
    let status = Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(proxy.child.wait().expect("wait").success());
    assert_eq!(lines(&access_old) + lines(&access), sent, "no record lost or doubled");
    assert!(
        std::fs::read_to_string(&access)
            .expect("new log")
            .contains("\"GET /after HTTP/1.1\" 200 2")
    );
    // The audit chain runs on into the new file (its stop record).
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["audit", "verify"])
        .arg(&audit_old)
        .arg(&audit)
        .output()
        .expect("verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("intact: 3 record(s), seq 1..=3"), "{text}");
}

#[tokio::test]
async fn a_failed_request_is_logged_with_the_phase_that_failed() {
    let closed = closed_port();
    let mut proxy = ProxyProcess::start(&basic_config(closed.addr));
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::BAD_GATEWAY);
    let line = loop {
        let line = next_line(&mut proxy.log).await;
        if line.contains("request failed upstream") {
            break line;
        }
    };
    assert!(line.contains("phase=\"send\""), "{line}");
    assert!(line.contains("upstream refused the connection"), "{line}");
}

#[tokio::test]
async fn the_demo_serves_logs_counts_and_audits() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().expect("stdout");
    // Killed on every exit path, including a failed assertion.
    let mut child = KillOnDrop(child);
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut admin, mut token, mut config) = (None, None, None, None);
    loop {
        let line = next_line(&mut lines).await;
        if let Some(rest) = line.strip_prefix("Portcullis demo: the proxy listens on http://") {
            addr = rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if let Some(rest) = line.trim().strip_prefix("admin API:  http://") {
            admin = rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse::<SocketAddr>().ok());
            token = rest.rsplit(' ').next().map(str::to_owned);
        }
        if let Some(rest) = line.trim().strip_prefix("config:     ") {
            config = rest.split(' ').next().map(std::path::PathBuf::from);
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let (addr, admin) = (addr.expect("proxy address"), admin.expect("admin address"));
    let (token, config) = (token.expect("admin token"), config.expect("config file"));
    let got = get(addr, "/api/users").await;
    assert_eq!(got.status, 200);
    let id = got.header("x-request-id").expect("request id").to_owned();
    let record: serde_json::Value = serde_json::from_str(&next_line(&mut lines).await).expect("a JSON access log line");
    assert_eq!(record["request_id"], id.as_str());
    assert_eq!(record["route"], "api");
    let first = get(addr, "/static/a.txt").await;
    assert!(first.header("cache-status").is_some_and(|s| s.contains("stored")));
    next_line(&mut lines).await;
    let second = get(addr, "/static/a.txt").await;
    assert!(
        second
            .header("cache-status")
            .is_some_and(|s| s.starts_with("portcullis; hit"))
    );
    assert_eq!(second.body, first.body, "the same stored response");
    next_line(&mut lines).await;
    let admin_call = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .expect("req")
    };
    let mut m = h1(admin).await;
    let text = read(m.send_ready(admin_call("GET", "/metrics")).await.expect("scrape"))
        .await
        .text();
    assert!(
        text.contains("portcullis_requests_total{route=\"api\",method=\"GET\",status_class=\"2xx\"} 1"),
        "{text}"
    );
    let status = read(m.send_ready(admin_call("GET", "/v1/status")).await.expect("status")).await;
    assert_eq!(status.status, 200, "{}", status.text());
    // The drain the demo's help shows.
    let upstreams: serde_json::Value = serde_json::from_slice(
        &read(
            m.send_ready(admin_call("GET", "/v1/upstreams"))
                .await
                .expect("upstreams"),
        )
        .await
        .body,
    )
    .expect("JSON");
    let app = upstreams["upstreams"]
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["name"] == "app"))
        .expect("the app group");
    let server = app["servers"][0]["server"].as_str().expect("a server").to_owned();
    let drain = format!("/v1/upstreams/app/servers/{server}/drain");
    let drained = read(m.send_ready(admin_call("POST", &drain)).await.expect("drain")).await;
    assert_eq!(drained.status, 200, "{}", drained.text());

    // And the plan: the demo's own file, edited, against the running proxy.
    let edited = config.with_file_name("edited.toml");
    let text = std::fs::read_to_string(&config).expect("demo config");
    std::fs::write(
        &edited,
        format!("{text}\n[[routes]]\nname = \"new\"\npath = \"/new\"\nupstream = \"app\"\n"),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["plan"])
        .arg(&edited)
        .args(["--admin", &format!("http://{admin}")])
        .env("PORTCULLIS_ADMIN_TOKEN", &token)
        .output()
        .expect("plan");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "add         route \"new\": any host /new (prefix) -> app\n1 change\n"
    );
    assert_eq!(out.status.code(), Some(1), "changes: exit 1");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["plan"])
        .arg(&config)
        .args(["--admin", &format!("http://{admin}")])
        .output()
        .expect("plan");
    assert_eq!(out.status.code(), Some(2), "no token: refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let status = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let audit = loop {
        let line = next_line(&mut lines).await;
        if let Some(path) = line.strip_prefix("Audit log kept: ") {
            break std::path::PathBuf::from(path);
        }
    };
    assert!(child.0.wait().expect("wait").success());
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .expect("verify");
    assert_eq!(out.status.code(), Some(0));
    let verified = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        verified.starts_with("intact: 4 record(s)"),
        "start, config, the drain, stop: {verified}"
    );
    if let Some(dir) = audit.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn a_shed_flood_writes_a_line_a_second_not_a_line_a_request() {
    // An origin that never answers: the two requests it holds fill the
    // group's limit of 2 (no answer yet is overload), so every request
    // after them is shed.
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<()>();
    let hanging = origin(move |_req| {
        let arrived = arrived.clone();
        async move {
            let _ = arrived.send(());
            std::future::pending::<()>().await;
            text(200, "never")
        }
    })
    .await;
    let closed = closed_port();
    let config = Template::new(&[hanging.addr])
        .extra(&format!(
            "[[routes]]\npath = \"/down\"\nupstream = \"down\"\n[upstreams.down]\nservers = [\"{}\"]\n[protect.load_shedding]\nmode = \"enforce\"\nmin_limit = 2\nmax_limit = 2\ninitial_limit = 2\ntrusted_wait = \"0s\"\n",
            closed.addr
        ))
        .build();
    let mut proxy = ProxyProcess::start(&config);
    let addr = proxy.addr;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "/held").await }))
        .collect();
    for _ in 0..2 {
        arrivals.recv().await.expect("a held request at the origin");
    }
    let started = std::time::Instant::now();
    let mut c = h1(addr).await;
    let mut shed = 0;
    for _ in 0..1_000 {
        let req = Request::get("/").header("host", "a").body(empty()).expect("request");
        if read(c.send_ready(req).await.expect("send")).await.status == StatusCode::SERVICE_UNAVAILABLE {
            shed += 1;
        }
    }
    let seconds = started.elapsed().as_secs();
    assert_eq!(shed, 1_000, "the flood is shed");
    // A failure of another kind, logged after every shed line.
    assert_eq!(get(addr, "/down").await.status, StatusCode::BAD_GATEWAY);
    let mut shed_lines = 0;
    loop {
        let line = next_line(&mut proxy.log).await;
        if line.contains("request shed") {
            shed_lines += 1;
        }
        if line.contains("request failed upstream") {
            break;
        }
    }
    assert!(shed_lines >= 1, "shedding is logged");
    assert!(
        shed_lines <= seconds + 2,
        "{shed_lines} shed lines for 1,000 shed requests in {seconds} s: at most one a second"
    );
    for h in held {
        h.abort();
    }
}

async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(std::time::Duration::from_secs(10), lines.recv())
        .await
        .expect("output within 10 s")
        .expect("process still running")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
