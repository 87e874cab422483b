//! `[server]`, `[timeouts]` and `[limits]`: the process-wide settings, their
//! model and their reading (defaults in `parse::defaults`).

use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use toml::Value;

use super::defaults;
use super::reader::{Errors, Table, bounded, positive_duration};
use super::units::parse_cidr;

/// Process-wide settings (`[server]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// How long in-flight requests may run after shutdown starts.
    pub drain_timeout: Duration,
    /// Between `/readyz` turning false and the listeners closing at
    /// shutdown, so the load balancer in front stops sending first.
    pub shutdown_delay: Duration,
    /// Reload the config file when its content changes, checking this
    /// often (`None`: only on SIGHUP and the admin API).
    pub watch_config: Option<Duration>,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The pseudonym written in `Via`; `None` means no `Via` is added.
    pub via: Option<HeaderValue>,
    /// Request methods the proxy forwards; any other is answered 501.
    pub allowed_methods: Vec<http::Method>,
    /// `%2F` / `%5C` in a path: refused (400) or kept opaque.
    pub encoded_slash: crate::target::EncodedSlash,
    /// Routes match paths without ASCII case (`path_case = "insensitive"`).
    pub path_case_insensitive: bool,
    /// `Upgrade` protocols passed to upstreams (lower case); a request
    /// asking for another is forwarded as a plain request.
    pub upgrade_protocols: Vec<String>,
    /// An HTTP/1.1 request with both `Content-Length` and
    /// `Transfer-Encoding` is refused with 400 (`true`, the default), or
    /// read as chunked with the connection closed after it (RFC 9112 6.1).
    pub reject_conflicting_framing: bool,
}

/// Timeouts (`[timeouts]`); each has a safe default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// TCP connect to an upstream server.
    pub connect: Duration,
    /// From the first byte of a request to its last header byte.
    pub header_read: Duration,
    /// From the request head to the last byte of a body read whole
    /// (`limits.buffer_request_body`) before the request goes on.
    pub body_read: Duration,
    /// How long an idle downstream keep-alive connection is kept.
    pub keepalive_idle: Duration,
    /// From the request being sent upstream to the response headers.
    pub upstream_response_header: Duration,
    /// The whole exchange, including both bodies (not upgraded tunnels).
    pub request: Duration,
    /// How long a write to a client may make no progress (the client
    /// stopped reading) before the connection is closed.
    pub send: Duration,
    /// How long an upgraded tunnel (WebSocket, CONNECT) may carry no byte
    /// either way before it is closed.
    pub tunnel_idle: Duration,
}

/// Limits on what a client may send (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_request_header_bytes: usize,
    pub max_header_count: usize,
    /// `None` means unlimited.
    pub max_request_body_bytes: Option<u64>,
    pub max_uri_length: usize,
    /// Request bodies up to this size are read whole before an upstream
    /// is chosen (0: never); larger ones stream.
    pub buffer_request_body: u64,
    /// Memory all buffered request bodies may hold together.
    pub request_buffer_memory: u64,
}

#[allow(
    clippy::too_many_lines,
    reason = "reads the [server] table key by key, in the order docs/config.md lists them"
)]
pub(super) fn read_server(table: Option<Table<'_>>, errors: &Errors) -> ServerSettings {
    let mut server = ServerSettings {
        drain_timeout: defaults::DRAIN_TIMEOUT,
        shutdown_delay: Duration::ZERO,
        watch_config: None,
        trusted_proxies: Vec::new(),
        via: Some(HeaderValue::from_static(defaults::VIA)),
        allowed_methods: defaults::METHODS
            .iter()
            .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
            .collect(),
        encoded_slash: crate::target::EncodedSlash::Refuse,
        path_case_insensitive: false,
        upgrade_protocols: defaults::UPGRADE_PROTOCOLS.iter().map(|p| (*p).to_owned()).collect(),
        reject_conflicting_framing: true,
    };
    let Some(t) = table else { return server };
    if let Some(list) = t.str_or_strs("allowed_methods") {
        let mut methods = Vec::new();
        for (path, text) in list {
            // Methods are case-sensitive tokens (RFC 9110 9.1).
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
                errors.push(
                    path,
                    format!("\"{text}\" is not a method name (upper-case letters, '-' and '_')"),
                );
                continue;
            }
            match http::Method::from_bytes(text.as_bytes()) {
                Ok(m) => methods.push(m),
                Err(_) => errors.push(path, format!("\"{text}\" is not a method name")),
            }
        }
        if methods.is_empty() {
            t.error("allowed_methods", "must allow at least one method");
        } else {
            server.allowed_methods = methods;
        }
    }
    if let Some(d) = t.duration("drain_timeout") {
        server.drain_timeout = d;
    }
    if let Some(d) = t.duration("watch_config") {
        if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
            t.error("watch_config", "must be between 100ms and 1h");
        } else {
            server.watch_config = Some(d);
        }
    }
    if let Some(d) = t.duration("shutdown_delay") {
        if d > Duration::from_secs(300) {
            t.error("shutdown_delay", "must be at most 5m");
        } else {
            server.shutdown_delay = d;
        }
    }
    if let Some(choice) = t.choice(
        "encoded_slash",
        &[
            ("refuse", crate::target::EncodedSlash::Refuse),
            ("keep", crate::target::EncodedSlash::Keep),
        ],
    ) {
        server.encoded_slash = choice;
    }
    if let Some(insensitive) = t.choice("path_case", &[("sensitive", false), ("insensitive", true)]) {
        server.path_case_insensitive = insensitive;
    }
    if let Some(reject) = t.choice("conflicting_framing", &[("reject", true), ("chunked", false)]) {
        server.reject_conflicting_framing = reject;
    }
    if let Some(list) = t.str_or_strs("upgrade_protocols") {
        let mut protocols = Vec::new();
        for (path, text) in list {
            // RFC 9110 section 7.8: a token, optionally with "/version".
            let valid = !text.is_empty()
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
            if valid {
                protocols.push(text.to_ascii_lowercase());
            } else {
                errors.push(path, format!("\"{}\" is not a protocol name", text.escape_debug()));
            }
        }
        server.upgrade_protocols = protocols;
    }
    if let Some(list) = t.str_or_strs("trusted_proxies") {
        for (path, text) in list {
            match parse_cidr(text) {
                Some(net) => server.trusted_proxies.push(net),
                None => errors.push(path, format!("invalid IP address or CIDR \"{text}\"")),
            }
        }
    }
    if let Some(via) = t.str("via") {
        if via.is_empty() {
            server.via = None;
        } else if via.bytes().all(|b| b.is_ascii_graphic()) {
            server.via = HeaderValue::from_str(via).ok();
        } else {
            t.error(
                "via",
                format!("\"{via}\" must be one token of visible ASCII (no spaces), or \"\" for no Via"),
            );
        }
    }
    t.finish();
    server
}

pub(super) fn read_timeouts(table: Option<Table<'_>>) -> Timeouts {
    let mut timeouts = Timeouts {
        connect: defaults::CONNECT,
        header_read: defaults::HEADER_READ,
        body_read: defaults::BODY_READ,
        keepalive_idle: defaults::KEEPALIVE_IDLE,
        upstream_response_header: defaults::UPSTREAM_RESPONSE_HEADER,
        request: defaults::REQUEST,
        send: defaults::SEND,
        tunnel_idle: defaults::TUNNEL_IDLE,
    };
    let Some(t) = table else { return timeouts };
    timeouts.connect = positive_duration(&t, "connect", timeouts.connect);
    timeouts.header_read = positive_duration(&t, "header_read", timeouts.header_read);
    timeouts.body_read = positive_duration(&t, "body_read", timeouts.body_read);
    timeouts.keepalive_idle = positive_duration(&t, "keepalive_idle", timeouts.keepalive_idle);
    timeouts.upstream_response_header =
        positive_duration(&t, "upstream_response_header", timeouts.upstream_response_header);
    timeouts.request = positive_duration(&t, "request", timeouts.request);
    timeouts.send = positive_duration(&t, "send", timeouts.send);
    timeouts.tunnel_idle = positive_duration(&t, "tunnel_idle", timeouts.tunnel_idle);
    t.finish();
    timeouts
}

pub(super) fn read_limits(table: Option<Table<'_>>) -> Limits {
    let mut limits = Limits {
        max_request_header_bytes: defaults::MAX_REQUEST_HEADER_BYTES as usize,
        max_header_count: defaults::MAX_HEADER_COUNT as usize,
        max_request_body_bytes: Some(defaults::MAX_REQUEST_BODY_BYTES),
        max_uri_length: defaults::MAX_URI_LENGTH as usize,
        buffer_request_body: defaults::BUFFER_REQUEST_BODY,
        request_buffer_memory: defaults::REQUEST_BUFFER_MEMORY,
    };
    let Some(t) = table else { return limits };
    limits.max_request_header_bytes = bounded(
        &t,
        "max_request_header_bytes",
        defaults::MAX_REQUEST_HEADER_BYTES,
        1 << 10,
        1 << 20,
    ) as usize;
    limits.max_header_count = bounded(&t, "max_header_count", defaults::MAX_HEADER_COUNT, 1, 1000) as usize;
    // "unlimited" is spelled out rather than 0, which reads like "no body".
    match t.get("max_request_body_bytes") {
        Some(Value::String(s)) if s == "unlimited" => limits.max_request_body_bytes = None,
        Some(_) => {
            limits.max_request_body_bytes = t.size("max_request_body_bytes").or(limits.max_request_body_bytes);
        }
        None => {}
    }
    // The http crate refuses URIs over 64 KiB whatever we configure.
    limits.max_uri_length = bounded(&t, "max_uri_length", defaults::MAX_URI_LENGTH, 16, 65_534) as usize;
    if let Some(n) = t.size("buffer_request_body") {
        if n > 64 << 20 {
            t.error("buffer_request_body", "must be at most 64MiB (larger bodies stream)");
        } else {
            limits.buffer_request_body = n;
        }
    }
    if let Some(n) = t.size("request_buffer_memory") {
        if n < limits.buffer_request_body || n > 1 << 40 {
            t.error(
                "request_buffer_memory",
                "must be at least buffer_request_body and at most 1TiB",
            );
        } else {
            limits.request_buffer_memory = n;
        }
    }
    t.finish();
    limits
}
