//! The access log: one record per request, as JSON lines or in the
//! Common / Combined Log Format, written by a thread of its own.
//!
//! A request formats its record into a per-thread buffer and appends the
//! bytes to a shared batch under a short lock: when `buffer_records`
//! records are already waiting (a slow disk, a stalled pipe) it is dropped
//! and counted instead, so logging never slows a request down. The writer
//! thread is not woken per record (a wake-up costs more than formatting
//! the record): it wakes when a batch reaches 64 KiB, on a flush or reopen
//! request, or every 100 ms, and writes the whole batch with one
//! `write_all`. A reopen request (SIGUSR1, after logrotate moved the file)
//! is handled before the next batch.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::{AccessLogConfig, LogDestination, LogField, LogFormat};

/// What one record says; borrowed from the finished exchange. Values that
/// come from request headers are raw bytes (they need not be UTF-8).
#[derive(Debug)]
pub struct Entry<'a> {
    pub time: SystemTime,
    pub request_id: Option<&'a [u8]>,
    pub trace_id: Option<&'a str>,
    pub client_ip: IpAddr,
    pub peer_ip: IpAddr,
    pub method: &'a str,
    pub scheme: &'a str,
    pub host: Option<&'a [u8]>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub protocol: &'static str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub upstream_header: Option<Duration>,
    pub upstream: Option<&'a str>,
    pub server: Option<&'a str>,
    pub route: Option<&'a str>,
    pub retries: u32,
    pub cache: Option<&'a str>,
    pub protection: Option<&'a str>,
    pub tls: Option<(&'a str, &'a str)>,
    pub user_agent: Option<&'a [u8]>,
    pub referer: Option<&'a [u8]>,
    pub error: Option<&'a str>,
    /// The response body was sent to its end (false: the client went away
    /// or the upstream body failed).
    pub complete: bool,
    /// The configured extra headers, in config order.
    pub headers: &'a [Option<http::HeaderValue>],
}

/// Counters of the writer, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct LogCounters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

/// Records waiting for the writer, and requests to it.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    records: u64,
    reopen: bool,
    closed: bool,
    flushed: Vec<tokio::sync::oneshot::Sender<()>>,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled only when the writer has work it should not wait for
    /// (a full batch, a flush, a reopen, close), never per record.
    wake: Condvar,
}

/// The access log of a running proxy. Cheap to share (`Arc`).
pub struct AccessLog {
    config: AccessLogConfig,
    shared: Arc<Shared>,
    pub counters: Arc<LogCounters>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("destination", &self.config.destination)
            .finish()
    }
}

/// Where the writer thread writes.
enum Sink {
    Stdout(std::io::Stdout),
    File(PathBuf, std::fs::File),
    Custom(Box<dyn Write + Send>),
}

impl Sink {
    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(s) => s,
            Sink::File(_, f) => f,
            Sink::Custom(w) => w,
        }
    }
}

fn open_file(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// A batch this large wakes the writer before its next tick.
const BATCH_BYTES: usize = 64 * 1024;
/// The writer writes what is pending at least this often.
const TICK: Duration = Duration::from_millis(100);

thread_local! {
    /// Each thread formats into its own buffer, reused record after record.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl AccessLog {
    /// Opens the configured destination; `None` when the log is off.
    pub fn open(config: &AccessLogConfig) -> Result<Option<AccessLog>, String> {
        let sink = match &config.destination {
            LogDestination::Off => return Ok(None),
            LogDestination::Stdout => Sink::Stdout(std::io::stdout()),
            LogDestination::File(path) => Sink::File(
                path.clone(),
                open_file(path).map_err(|e| format!("{}: cannot open access log: {e}", path.display()))?,
            ),
        };
        Self::start(config.clone(), sink).map(Some)
    }

    /// An access log writing to `writer` (tests, embedding).
    pub fn to_writer(config: &AccessLogConfig, writer: Box<dyn Write + Send>) -> Result<AccessLog, String> {
        Self::start(config.clone(), Sink::Custom(writer))
    }

    fn start(config: AccessLogConfig, sink: Sink) -> Result<AccessLog, String> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let counters = Arc::new(LogCounters::default());
        let (thread_shared, thread_counters) = (shared.clone(), counters.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&thread_shared, sink, &thread_counters))
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        Ok(AccessLog {
            config,
            shared,
            counters,
        })
    }

    /// Bytes of records waiting for the writer now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.pending.lock().map_or(0, |p| p.bytes.len())
    }

    /// Formats and queues one record; drops it (counted) if
    /// `buffer_records` records or `buffer_bytes` bytes are already waiting. Never waits for I/O:
    /// the lock is held for one copy of the formatted bytes.
    pub fn write(&self, entry: &Entry<'_>) {
        SCRATCH.with(|scratch| {
            let mut line = scratch.borrow_mut();
            line.clear();
            self.format_into(entry, &mut line);
            let Ok(mut pending) = self.shared.pending.lock() else {
                return;
            };
            if pending.records >= self.config.buffer_records as u64
                || pending.bytes.len() + line.len() > self.config.buffer_bytes
            {
                drop(pending);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let was_small = pending.bytes.len() < BATCH_BYTES;
            pending.bytes.extend_from_slice(&line);
            pending.records += 1;
            if was_small && pending.bytes.len() >= BATCH_BYTES {
                self.shared.wake.notify_one();
            }
        });
    }

    /// Reopens the file at its path before the next write (logrotate).
    pub fn reopen(&self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.reopen = true;
            self.shared.wake.notify_one();
        }
    }

    /// Waits until every record queued before this call is written out.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.flushed.push(done);
            self.shared.wake.notify_one();
        }
        let _ = wait.await;
    }

    pub fn config(&self) -> &AccessLogConfig {
        &self.config
    }

    /// One record as bytes, with its newline.
    pub fn format(&self, e: &Entry<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.format_into(e, &mut out);
        out
    }

    fn format_into(&self, e: &Entry<'_>, out: &mut Vec<u8>) {
        match self.config.format {
            LogFormat::Json => self.json(e, out),
            LogFormat::Common => self.clf(e, false, out),
            LogFormat::Combined => self.clf(e, true, out),
        }
        out.push(b'\n');
    }

    fn json(&self, e: &Entry<'_>, out: &mut Vec<u8>) {
        out.push(b'{');
        let redacted_query = e.query.map(|q| redact_query(q, &self.config.redact_query_params));
        let mut first = true;
        for field in &self.config.fields {
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(field.name().as_bytes());
            out.extend_from_slice(b"\":");
            match field {
                LogField::Time => json_str(out, super::clock::rfc3339_ms(e.time).as_bytes()),
                LogField::RequestId => json_opt(out, e.request_id),
                LogField::TraceId => json_opt(out, e.trace_id.map(str::as_bytes)),
                LogField::ClientIp => json_str(out, e.client_ip.to_string().as_bytes()),
                LogField::PeerIp => {
                    if e.peer_ip == e.client_ip {
                        out.extend_from_slice(b"null");
                    } else {
                        json_str(out, e.peer_ip.to_string().as_bytes());
                    }
                }
                LogField::Method => json_str(out, e.method.as_bytes()),
                LogField::Scheme => json_str(out, e.scheme.as_bytes()),
                LogField::Host => json_opt(out, e.host),
                LogField::Path => json_str(out, e.path.as_bytes()),
                LogField::Query => json_opt(out, redacted_query.as_deref().map(str::as_bytes)),
                LogField::Protocol => json_str(out, e.protocol.as_bytes()),
                LogField::Status => out.extend_from_slice(e.status.to_string().as_bytes()),
                LogField::BytesIn => out.extend_from_slice(e.bytes_in.to_string().as_bytes()),
                LogField::BytesOut => out.extend_from_slice(e.bytes_out.to_string().as_bytes()),
                LogField::DurationMs => json_ms(out, e.duration),
                LogField::UpstreamHeaderMs => match e.upstream_header {
                    Some(d) => json_ms(out, d),
                    None => out.extend_from_slice(b"null"),
                },
                LogField::Upstream => json_opt(out, e.upstream.map(str::as_bytes)),
                LogField::Server => json_opt(out, e.server.map(str::as_bytes)),
                LogField::Route => json_opt(out, e.route.map(str::as_bytes)),
                LogField::Retries => out.extend_from_slice(e.retries.to_string().as_bytes()),
                LogField::Cache => json_opt(out, e.cache.map(str::as_bytes)),
                LogField::Protection => json_opt(out, e.protection.map(str::as_bytes)),
                LogField::TlsVersion => json_opt(out, e.tls.map(|t| t.0.as_bytes())),
                LogField::TlsCipher => json_opt(out, e.tls.map(|t| t.1.as_bytes())),
                LogField::UserAgent => json_opt(out, e.user_agent),
                LogField::Referer => {
                    let referer = e.referer.map(|r| self.redact_referer(r));
                    json_opt(out, referer.as_deref());
                }
                LogField::Error => json_opt(out, e.error.map(str::as_bytes)),
                LogField::Complete => out.extend_from_slice(if e.complete { b"true" } else { b"false" }),
                LogField::Headers => {
                    out.push(b'{');
                    for (i, (name, value)) in self.config.headers.iter().zip(e.headers).enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        json_str(out, name.as_str().as_bytes());
                        out.push(b':');
                        if self.config.redact_headers.contains(name) && value.is_some() {
                            json_str(out, b"[redacted]");
                        } else {
                            json_opt(out, value.as_ref().map(|v| v.as_bytes()));
                        }
                    }
                    out.push(b'}');
                }
            }
        }
        out.push(b'}');
    }

    /// `client - - [time] "METHOD target PROTOCOL" status bytes` (+
    /// `"referer" "user-agent"` for Combined). The user field is always
    /// `-`: credentials are never logged.
    fn clf(&self, e: &Entry<'_>, combined: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(e.client_ip.to_string().as_bytes());
        out.extend_from_slice(b" - - [");
        out.extend_from_slice(super::clock::clf(e.time).as_bytes());
        out.extend_from_slice(b"] \"");
        clf_escape(out, e.method.as_bytes());
        out.push(b' ');
        clf_escape(out, e.path.as_bytes());
        if let Some(q) = e.query {
            out.push(b'?');
            clf_escape(out, redact_query(q, &self.config.redact_query_params).as_bytes());
        }
        out.push(b' ');
        out.extend_from_slice(e.protocol.as_bytes());
        out.extend_from_slice(b"\" ");
        out.extend_from_slice(e.status.to_string().as_bytes());
        out.push(b' ');
        if e.bytes_out == 0 {
            out.push(b'-');
        } else {
            out.extend_from_slice(e.bytes_out.to_string().as_bytes());
        }
        if combined {
            for value in [
                e.referer.map(|r| self.redact_referer(r)),
                e.user_agent.map(<[u8]>::to_vec),
            ] {
                out.extend_from_slice(b" \"");
                match value {
                    Some(v) => clf_escape(out, &v),
                    None => out.push(b'-'),
                }
                out.push(b'"');
            }
        }
    }

    fn redact_referer(&self, referer: &[u8]) -> Vec<u8> {
        match referer.iter().position(|b| *b == b'?') {
            Some(at) => match std::str::from_utf8(&referer[at + 1..]) {
                Ok(query) => {
                    let mut out = referer[..=at].to_vec();
                    out.extend_from_slice(redact_query(query, &self.config.redact_query_params).as_bytes());
                    out
                }
                // Not text: nothing can be said about its parameters.
                Err(_) => referer[..=at].iter().copied().chain(*b"REDACTED").collect(),
            },
            None => referer.to_vec(),
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The writer writes what is left, then ends.
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.closed = true;
            self.shared.wake.notify_one();
        }
    }
}

/// The writer thread: sleeps until a full batch, a request or its tick,
/// then writes everything pending in one `write_all`.
fn write_loop(shared: &Shared, mut sink: Sink, counters: &LogCounters) {
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let (records, reopen, closed, flushed) = {
            let Ok(mut pending) = shared.pending.lock() else { return };
            while pending.bytes.len() < BATCH_BYTES && !pending.reopen && !pending.closed && pending.flushed.is_empty()
            {
                match shared.wake.wait_timeout(pending, TICK) {
                    Ok((guard, timeout)) => {
                        pending = guard;
                        if timeout.timed_out() && !pending.bytes.is_empty() {
                            break;
                        }
                    }
                    Err(_) => return,
                }
            }
            std::mem::swap(&mut batch, &mut pending.bytes);
            let records = std::mem::take(&mut pending.records);
            let reopen = std::mem::take(&mut pending.reopen);
            (records, reopen, pending.closed, std::mem::take(&mut pending.flushed))
        };
        if reopen {
            reopen_sink(&mut sink);
        }
        if !batch.is_empty() {
            let out = sink.out();
            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => counters.written.fetch_add(records, Ordering::Relaxed),
                Err(e) => {
                    tracing::debug!(error = %e, "access log write failed");
                    counters.dropped.fetch_add(records, Ordering::Relaxed)
                }
            };
            batch.clear();
            // Keep one batch worth of capacity, not the largest ever seen.
            batch.shrink_to(BATCH_BYTES * 2);
        }
        for done in flushed {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

fn reopen_sink(sink: &mut Sink) {
    if let Sink::File(path, writer) = sink {
        match open_file(path) {
            Ok(new) => *writer = new,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot reopen the access log; still writing the old file")
            }
        }
    }
}

/// Replaces the values of the named query parameters by `REDACTED`
/// (names compared case-insensitively, before percent-decoding).
pub fn redact_query(query: &str, names: &[String]) -> String {
    if names.is_empty() {
        return query.to_owned();
    }
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let key = pair.split('=').next().unwrap_or("");
        if names.iter().any(|n| n.eq_ignore_ascii_case(key)) {
            out.push_str(key);
            out.push_str("=REDACTED");
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// Copies `bytes`, escaping `"` and `\` with a backslash and every byte
/// outside printable ASCII as `prefix` + two hex digits, so a record is
/// always one valid line whatever a client sent.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8], prefix: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => {
                out.extend_from_slice(prefix);
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 15) as usize]);
            }
        }
    }
}

/// A JSON string of arbitrary bytes (control and non-ASCII bytes as
/// `\u00XX`).
fn json_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    escape_into(out, bytes, b"\\u00");
    out.push(b'"');
}

fn json_opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => json_str(out, b),
        None => out.extend_from_slice(b"null"),
    }
}

/// Milliseconds with microsecond precision: `12.345`.
fn json_ms(out: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    out.extend_from_slice(format!("{}.{:03}", micros / 1000, micros % 1000).as_bytes());
}

/// Apache's escaping for log fields: `"` and `\` escaped, anything not
/// printable ASCII as `\xhh`.
fn clf_escape(out: &mut Vec<u8>, bytes: &[u8]) {
    escape_into(out, bytes, b"\\x");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::UNIX_EPOCH;

    fn entry<'a>(headers: &'a [Option<http::HeaderValue>]) -> Entry<'a> {
        Entry {
            time: UNIX_EPOCH + Duration::from_millis(1_795_874_593_045),
            request_id: Some(b"id-1"),
            trace_id: None,
            client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            peer_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            method: "GET",
            scheme: "http",
            host: Some(b"example.com"),
            path: "/a b\"c",
            query: Some("x=1&token=abc&Password=p"),
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 0,
            bytes_out: 1234,
            duration: Duration::from_micros(12_345),
            upstream_header: Some(Duration::from_micros(999)),
            upstream: Some("app"),
            server: Some("127.0.0.1:9000"),
            route: Some("routes[0]"),
            retries: 0,
            cache: None,
            protection: None,
            tls: None,
            user_agent: Some(b"curl/8.0 \x01\xff"),
            referer: Some(b"https://ref.example/p?q=1&api_key=k"),
            error: None,
            complete: true,
            headers,
        }
    }

    fn log(format: LogFormat) -> AccessLog {
        let config = AccessLogConfig {
            format,
            ..AccessLogConfig::default()
        };
        AccessLog::to_writer(&config, Box::new(std::io::sink())).expect("start")
    }

    #[test]
    fn common_log_format_is_exact() {
        let line = log(LogFormat::Common).format(&entry(&[]));
        assert_eq!(
            String::from_utf8(line).expect("utf8"),
            "192.0.2.7 - - [28/Nov/2026:14:03:13 +0000] \"GET /a b\\\"c?x=1&token=REDACTED&Password=REDACTED HTTP/1.1\" 200 1234\n"
        );
    }

    #[test]
    fn combined_log_format_is_exact() {
        let line = log(LogFormat::Combined).format(&entry(&[]));
        assert_eq!(
            String::from_utf8(line).expect("utf8"),
            "192.0.2.7 - - [28/Nov/2026:14:03:13 +0000] \"GET /a b\\\"c?x=1&token=REDACTED&Password=REDACTED HTTP/1.1\" 200 1234 \"https://ref.example/p?q=1&api_key=REDACTED\" \"curl/8.0 \\x01\\xff\"\n"
        );
    }

    #[test]
    fn json_records_parse_and_escape_everything() {
        let line = log(LogFormat::Json).format(&entry(&[]));
        let text = String::from_utf8(line).expect("json is ASCII");
        assert!(text.ends_with('\n') && !text.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["time"], "2026-11-28T14:03:13.045Z");
        assert_eq!(v["path"], "/a b\"c");
        assert_eq!(v["query"], "x=1&token=REDACTED&Password=REDACTED");
        assert_eq!(v["user_agent"], "curl/8.0 \u{1}\u{ff}");
        assert_eq!(v["duration_ms"], 12.345);
        assert_eq!(v["upstream_header_ms"], 0.999);
        assert_eq!(v["peer_ip"], serde_json::Value::Null);
        assert_eq!(v["status"], 200);
        assert_eq!(v["complete"], true);
        assert!(v.get("headers").is_none());
    }

    #[test]
    fn configured_headers_are_written_unless_redacted() {
        let config = AccessLogConfig {
            headers: vec![
                http::HeaderName::from_static("x-tenant"),
                http::HeaderName::from_static("authorization"),
                http::HeaderName::from_static("x-missing"),
            ],
            fields: vec![LogField::Status, LogField::Headers],
            ..AccessLogConfig::default()
        };
        let log = AccessLog::to_writer(&config, Box::new(std::io::sink())).expect("start");
        let values = [
            Some(http::HeaderValue::from_static("acme")),
            Some(http::HeaderValue::from_static("Bearer secret")),
            None,
        ];
        let text = String::from_utf8(log.format(&entry(&values))).expect("utf8");
        assert_eq!(
            text,
            "{\"status\":200,\"headers\":{\"x-tenant\":\"acme\",\"authorization\":\"[redacted]\",\"x-missing\":null}}\n"
        );
        assert!(!text.contains("secret"));
    }

    #[test]
    fn query_redaction_table() {
        let names = vec!["token".to_owned(), "sig".to_owned()];
        for (input, want) in [
            ("a=1", "a=1"),
            ("token=x", "token=REDACTED"),
            ("TOKEN=x&a=2", "TOKEN=REDACTED&a=2"),
            ("token", "token=REDACTED"),
            ("a=1&&sig=2=3", "a=1&&sig=REDACTED"),
            ("tokens=1", "tokens=1"),
        ] {
            assert_eq!(redact_query(input, &names), want, "{input}");
        }
    }
}
