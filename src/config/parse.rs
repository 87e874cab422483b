//! Reads the TOML tree into [`Config`], filling defaults and validating every
//! field; all problems are collected, none stops the walk.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use toml::Value;

use super::observe;
use super::protect;
use super::reader::{ConfigErrors, Errors, Table};
use super::units;
use super::*;

/// Defaults, in one place so docs/config.md can be checked against them.
pub mod defaults {
    use std::time::Duration;

    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const VIA: &str = "portcullis";
    /// RFC 9110 section 9 methods, plus PATCH (RFC 5789), without TRACE:
    /// a TRACE answer echoes the request, credentials included, and
    /// origins rarely need it through a proxy.
    pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "PATCH"];
    /// Upgrade protocols passed through (RFC 6455 WebSocket).
    pub const UPGRADE_PROTOCOLS: &[&str] = &["websocket"];
    pub const CONNECT: Duration = Duration::from_secs(5);
    pub const HEADER_READ: Duration = Duration::from_secs(15);
    pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
    pub const UPSTREAM_RESPONSE_HEADER: Duration = Duration::from_secs(60);
    pub const REQUEST: Duration = Duration::from_secs(15 * 60);
    /// nginx's `send_timeout` is 60 s as well.
    pub const SEND: Duration = Duration::from_secs(60);
    /// WebSocket applications ping far more often than this.
    pub const TUNNEL_IDLE: Duration = Duration::from_secs(10 * 60);
    pub const MAX_REQUEST_HEADER_BYTES: u64 = 32 << 10;
    pub const MAX_HEADER_COUNT: u64 = 100;
    pub const MAX_REQUEST_BODY_BYTES: u64 = 100 << 20;
    pub const MAX_URI_LENGTH: u64 = 8 << 10;
    pub const POOL_SIZE: u64 = 64;
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const OUTLIER_CONSECUTIVE_FAILURES: u64 = 5;
    pub const OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(30);
    pub const OUTLIER_MAX_EJECTION: Duration = Duration::from_secs(300);
    pub const OUTLIER_MAX_EJECTED_PERCENT: u64 = 50;
    pub const MAX_RETRIES: u64 = 2;
    pub const RETRY_BUDGET_PERCENT: u64 = 20;
    pub const RETRY_MIN_PER_SECOND: u64 = 3;
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
    pub const CHECK_HEALTHY_THRESHOLD: u64 = 2;
    pub const CHECK_UNHEALTHY_THRESHOLD: u64 = 3;
    /// The client certificate's subject and fingerprint fields.
    pub const CLIENT_CERT_SUBJECT_HEADER: &str = "x-client-cert-subject";
    pub const CLIENT_CERT_FINGERPRINT_HEADER: &str = "x-client-cert-sha256";
    pub const CLIENT_CERT_HEADERS: [&str; 2] = [CLIENT_CERT_SUBJECT_HEADER, CLIENT_CERT_FINGERPRINT_HEADER];
}

/// Walks the whole tree and returns the config or every error found.
pub fn parse(root: &toml::Table) -> Result<Config, ConfigErrors> {
    let errors = Errors::default();
    let top = Table::from_map(root, String::new(), &errors);

    let server = read_server(top.table("server"), &errors);
    let timeouts = read_timeouts(top.table("timeouts"));
    let limits = read_limits(top.table("limits"));
    let listeners = read_listeners(&top, &errors);
    let upstreams = read_upstreams(&top, &timeouts, &errors);
    let routes = read_routes(&top, &upstreams, &errors);
    let access_log = observe::read_access_log(top.table("access_log"));
    let request_id = observe::read_request_id(top.table("request_id"));
    let audit_log = observe::read_audit_log(top.table("audit_log"));
    let metrics = observe::read_metrics(top.table("metrics"));
    let protect = protect::read_protect(top.table("protect"));
    let cache = super::cache::read_cache(top.table("cache"));
    top.finish();
    for (i, listener) in listeners.iter().enumerate() {
        if listener.proxy_protocol && server.trusted_proxies.is_empty() {
            errors.push(
                format!("listeners[{i}].proxy_protocol"),
                "needs server.trusted_proxies: the load balancers allowed to send the header",
            );
        }
    }

    errors.into_result(Config {
        server,
        timeouts,
        limits,
        listeners,
        routes,
        upstreams,
        access_log,
        request_id,
        audit_log,
        metrics,
        protect,
        cache,
        source: None,
    })
}

fn read_server(table: Option<Table<'_>>, errors: &Errors) -> ServerSettings {
    let mut server = ServerSettings {
        drain_timeout: defaults::DRAIN_TIMEOUT,
        trusted_proxies: Vec::new(),
        via: Some(HeaderValue::from_static(defaults::VIA)),
        allowed_methods: defaults::METHODS
            .iter()
            .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
            .collect(),
        encoded_slash: crate::target::EncodedSlash::Refuse,
        path_case_insensitive: false,
        upgrade_protocols: defaults::UPGRADE_PROTOCOLS.iter().map(|p| (*p).to_owned()).collect(),
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

pub(super) fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Reads an optional timeout of at least a millisecond: zero would fail
/// every request, and timers work in whole milliseconds (a shorter one
/// would make the connection watchdog spin).
fn positive_duration(t: &Table<'_>, key: &'static str, default: Duration) -> Duration {
    match t.duration(key) {
        Some(d) if d < Duration::from_millis(1) => {
            t.error(key, "must be at least 1ms");
            default
        }
        Some(d) => d,
        None => default,
    }
}

fn read_timeouts(table: Option<Table<'_>>) -> Timeouts {
    let mut timeouts = Timeouts {
        connect: defaults::CONNECT,
        header_read: defaults::HEADER_READ,
        keepalive_idle: defaults::KEEPALIVE_IDLE,
        upstream_response_header: defaults::UPSTREAM_RESPONSE_HEADER,
        request: defaults::REQUEST,
        send: defaults::SEND,
        tunnel_idle: defaults::TUNNEL_IDLE,
    };
    let Some(t) = table else { return timeouts };
    timeouts.connect = positive_duration(&t, "connect", timeouts.connect);
    timeouts.header_read = positive_duration(&t, "header_read", timeouts.header_read);
    timeouts.keepalive_idle = positive_duration(&t, "keepalive_idle", timeouts.keepalive_idle);
    timeouts.upstream_response_header =
        positive_duration(&t, "upstream_response_header", timeouts.upstream_response_header);
    timeouts.request = positive_duration(&t, "request", timeouts.request);
    timeouts.send = positive_duration(&t, "send", timeouts.send);
    timeouts.tunnel_idle = positive_duration(&t, "tunnel_idle", timeouts.tunnel_idle);
    t.finish();
    timeouts
}

/// Reads an optional bounded size.
fn bounded(t: &Table<'_>, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
    match t.size(key) {
        Some(v) if v < min || v > max => {
            t.error(
                key,
                format!(
                    "must be between {} and {}, found {}",
                    units::format_size(min),
                    units::format_size(max),
                    units::format_size(v)
                ),
            );
            default
        }
        Some(v) => v,
        None => default,
    }
}

fn read_limits(table: Option<Table<'_>>) -> Limits {
    let mut limits = Limits {
        max_request_header_bytes: defaults::MAX_REQUEST_HEADER_BYTES as usize,
        max_header_count: defaults::MAX_HEADER_COUNT as usize,
        max_request_body_bytes: Some(defaults::MAX_REQUEST_BODY_BYTES),
        max_uri_length: defaults::MAX_URI_LENGTH as usize,
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
    t.finish();
    limits
}

fn read_listeners(top: &Table<'_>, errors: &Errors) -> Vec<ListenerConfig> {
    let mut listeners = Vec::new();
    let Some(items) = top.array("listeners") else {
        if top.get("listeners").is_none() {
            errors.push(
                "listeners",
                "at least one listener is required, such as [[listeners]] bind = \"0.0.0.0:8080\"",
            );
        }
        return listeners;
    };
    if items.is_empty() {
        errors.push("listeners", "at least one listener is required");
    }
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("listeners[{i}]");
        let Some(t) = Table::new(item, path.clone(), errors) else {
            continue;
        };
        let name = t.str("name").map_or_else(|| path.clone(), str::to_owned);
        let protocol = t
            .choice(
                "protocol",
                &[
                    ("auto", ListenerProtocol::Auto),
                    ("http1", ListenerProtocol::Http1),
                    ("h2c", ListenerProtocol::H2c),
                ],
            )
            .unwrap_or(ListenerProtocol::Auto);
        let mut bind = Vec::new();
        match t.str_or_strs("bind") {
            None if t.get("bind").is_none() => {
                t.error("bind", "required: the address to listen on, such as \"0.0.0.0:8080\"")
            }
            None => {}
            Some(list) => {
                if list.is_empty() {
                    t.error("bind", "must list at least one address");
                }
                for (addr_path, text) in list {
                    match text.parse::<SocketAddr>() {
                        Ok(addr) => {
                            if addr.port() != 0 {
                                if let Some(first) = seen.get(&addr) {
                                    errors.push(&addr_path, format!("address {addr} is already used by {first}"));
                                    continue;
                                }
                                seen.insert(addr, addr_path.clone());
                            }
                            bind.push(addr);
                        }
                        Err(_) => errors.push(
                            addr_path,
                            format!("invalid socket address \"{text}\", expected IP:port such as \"0.0.0.0:8080\" or \"[::]:8080\""),
                        ),
                    }
                }
            }
        }
        let tls = t.table("tls").map(read_tls);
        let redirect_https_port = match (t.bool("redirect_to_https"), t.uint("https_port")) {
            (Some(true), port) => {
                let port = port.unwrap_or(443);
                if port == 0 || port > 65535 {
                    t.error(
                        "https_port",
                        format!("must be a port between 1 and 65535, found {port}"),
                    );
                }
                Some(port.clamp(1, 65535) as u16)
            }
            (_, Some(_)) => {
                t.error("https_port", "only applies with redirect_to_https = true");
                None
            }
            _ => None,
        };
        if tls.is_some() && redirect_https_port.is_some() {
            t.error("redirect_to_https", "a TLS listener cannot redirect to itself");
        }
        if tls.is_some() && protocol != ListenerProtocol::Auto {
            t.error(
                "protocol",
                "a TLS listener chooses HTTP/2 or HTTP/1.1 by ALPN: leave protocol out",
            );
        }
        let ip_filter = protect::read_ip_filter(&t);
        let proxy_protocol = t.bool("proxy_protocol").unwrap_or(false);
        t.finish();
        listeners.push(ListenerConfig {
            name,
            bind,
            protocol,
            tls,
            redirect_https_port,
            ip_filter,
            proxy_protocol,
        });
    }
    listeners
}

fn read_tls(t: Table<'_>) -> TlsConfig {
    let mut certificates = Vec::new();
    match t.array("certificates") {
        None if t.get("certificates").is_none() => t.error(
            "certificates",
            "required: [{ cert = \"chain.pem\", key = \"key.pem\" }]",
        ),
        None => {}
        Some([]) => t.error("certificates", "must list at least one certificate"),
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{}[{i}]", t.path_of("certificates"));
                let Some(c) = Table::new(item, path.clone(), t.errors()) else {
                    continue;
                };
                let cert = c.str("cert");
                let key = c.str("key");
                if cert.is_none() && c.get("cert").is_none() {
                    c.error("cert", "required: path of the PEM certificate chain (leaf first)");
                }
                if key.is_none() && c.get("key").is_none() {
                    c.error("key", "required: path of the PEM private key");
                }
                c.finish();
                if let (Some(cert), Some(key)) = (cert, key) {
                    certificates.push(CertificateFiles {
                        cert: cert.into(),
                        key: key.into(),
                        path,
                    });
                }
            }
        }
    }
    let refuse_without_sni = t
        .choice("without_sni", &[("default", false), ("refuse", true)])
        .unwrap_or(false);
    let client_auth = t.table("client_auth").and_then(|c| {
        let required = c.choice("mode", &[("required", true), ("optional", false)]);
        if required.is_none() && c.get("mode").is_none() {
            c.error("mode", "required: \"required\" or \"optional\"");
        }
        let ca = c.str("ca");
        if ca.is_none() && c.get("ca").is_none() {
            c.error("ca", "required: PEM bundle of the CAs that issue client certificates");
        }
        let header = |key: &'static str, default: &'static str| match c.str(key) {
            Some(name) => HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|_| {
                c.error(key, format!("invalid header name \"{name}\""));
                HeaderName::from_static(default)
            }),
            None => HeaderName::from_static(default),
        };
        let subject_header = header("subject_header", defaults::CLIENT_CERT_SUBJECT_HEADER);
        let fingerprint_header = header("fingerprint_header", defaults::CLIENT_CERT_FINGERPRINT_HEADER);
        c.finish();
        Some(ClientAuth {
            required: required?,
            ca: ca?.into(),
            subject_header,
            fingerprint_header,
        })
    });
    let tls = TlsConfig {
        certificates,
        refuse_without_sni,
        handshake_timeout: positive_duration(&t, "handshake_timeout", defaults::TLS_HANDSHAKE_TIMEOUT),
        hsts_max_age: t.duration("hsts_max_age"),
        client_auth,
        watch_interval: match t.duration("watch_interval") {
            Some(d) if d < Duration::from_millis(100) => {
                t.error("watch_interval", "must be at least 100ms");
                None
            }
            other => other,
        },
    };
    t.finish();
    tls
}

fn read_upstream_tls(t: Table<'_>) -> UpstreamTls {
    let client_cert = match (t.str("client_cert"), t.str("client_key")) {
        (Some(c), Some(k)) => Some((c.into(), k.into())),
        (None, None) => None,
        (Some(_), None) => {
            t.error("client_key", "required with client_cert");
            None
        }
        (None, Some(_)) => {
            t.error("client_cert", "required with client_key");
            None
        }
    };
    let server_name = t
        .str("server_name")
        .and_then(|n| match rustls::pki_types::ServerName::try_from(n) {
            Ok(_) => Some(n.to_owned()),
            Err(_) => {
                t.error("server_name", format!("\"{n}\" is not a DNS name or IP address"));
                None
            }
        });
    let tls = UpstreamTls {
        ca: t.str("ca").map(Into::into),
        server_name,
        client_cert,
    };
    t.finish();
    tls
}

fn read_upstreams(top: &Table<'_>, timeouts: &Timeouts, errors: &Errors) -> Vec<UpstreamConfig> {
    let mut upstreams = Vec::new();
    let Some(table) = top.table("upstreams") else {
        return upstreams;
    };
    // Every key of [upstreams] is a group name: read them all, then `finish`
    // has nothing left over.
    let mut names: Vec<&String> = Vec::new();
    let map = match top.get("upstreams") {
        Some(Value::Table(map)) => map,
        _ => return upstreams,
    };
    for name in map.keys() {
        names.push(name);
    }
    for name in names {
        let path = table.path_of(name);
        let Some(value) = map.get(name) else { continue };
        let Some(t) = Table::new(value, path.clone(), errors) else {
            continue;
        };
        if let Err(why) = check_name(name) {
            errors.push(&path, why);
        }
        let protocol_name = t
            .choice("protocol", &[("http1", "http1"), ("h2c", "h2c"), ("h2", "h2")])
            .unwrap_or("http1");
        let tls = t.table("tls").map(read_upstream_tls);
        let protocol = match (protocol_name, tls.is_some()) {
            ("h2c", true) => {
                t.error("protocol", "\"h2c\" is HTTP/2 in cleartext: with [tls] use \"h2\"");
                UpstreamProtocol::H2
            }
            ("h2", false) => {
                t.error(
                    "protocol",
                    "\"h2\" is HTTP/2 over TLS: add a [tls] table, or use \"h2c\" for cleartext",
                );
                UpstreamProtocol::H2
            }
            ("h2" | "h2c", _) => UpstreamProtocol::H2,
            _ => UpstreamProtocol::Http1,
        };
        let servers = read_servers(&t, errors);
        let pool_size = match t.uint("pool_size") {
            Some(n) if n > 100_000 => {
                t.error("pool_size", format!("must be at most 100000, found {n}"));
                defaults::POOL_SIZE
            }
            Some(n) => n,
            None => defaults::POOL_SIZE,
        } as usize;
        let response_header_timeout =
            positive_duration(&t, "response_header_timeout", timeouts.upstream_response_header);
        let algorithm = read_algorithm(&t);
        let sticky_cookie = t.str("sticky_cookie").and_then(|c| {
            if c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                t.error(
                    "sticky_cookie",
                    format!("\"{c}\" is not a cookie name (letters, digits, '_', '-')"),
                );
                None
            } else {
                Some(c.to_owned())
            }
        });
        let (retry, per_try_timeout) = read_retry(t.table("retry"), response_header_timeout);
        let upstream = UpstreamConfig {
            name: name.clone(),
            servers,
            protocol,
            pool_size,
            idle_timeout: positive_duration(&t, "idle_timeout", defaults::POOL_IDLE_TIMEOUT),
            resolve_interval: positive_duration(&t, "resolve_interval", defaults::RESOLVE_INTERVAL),
            connect_timeout: positive_duration(&t, "connect_timeout", timeouts.connect),
            response_header_timeout,
            tls,
            algorithm,
            sticky_cookie,
            health_check: t.table("health_check").map(read_health_check),
            outlier: read_outlier(t.table("outlier")),
            slow_start: t.duration("slow_start").unwrap_or(Duration::ZERO),
            retry,
            per_try_timeout,
            max_requests: optional_limit(&t, "max_requests"),
            max_requests_per_server: optional_limit(&t, "max_requests_per_server"),
        };
        t.finish();
        upstreams.push(upstream);
    }
    upstreams
}

/// `servers = ["a:80", { address = "b:80", weight = 3 }]`.
fn read_servers(t: &Table<'_>, errors: &Errors) -> Vec<ServerAddr> {
    let mut servers = Vec::new();
    let Some(value) = t.get("servers") else {
        t.error("servers", "required: a list of servers such as [\"10.0.0.1:8080\"]");
        return servers;
    };
    let path = t.path_of("servers");
    let items: Vec<&Value> = match value {
        Value::String(_) => vec![value],
        Value::Array(items) => items.iter().collect(),
        other => {
            errors.push(
                path,
                format!("expected an array of servers, found {}", other.type_str()),
            );
            return servers;
        }
    };
    if items.is_empty() {
        errors.push(&path, "must list at least one server");
    }
    for (i, item) in items.into_iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let (text, weight) = match item {
            Value::String(s) => (s.as_str(), 1),
            Value::Table(_) => {
                let Some(st) = Table::new(item, item_path.clone(), errors) else {
                    continue;
                };
                let address = st.str("address");
                let weight = match st.uint("weight") {
                    Some(w) if w == 0 || w > 10_000 => {
                        st.error("weight", format!("must be between 1 and 10000, found {w}"));
                        1
                    }
                    Some(w) => w as u32,
                    None => 1,
                };
                if address.is_none() && st.get("address").is_none() {
                    st.error("address", "required: host:port of the server");
                }
                st.finish();
                match address {
                    Some(a) => (a, weight),
                    None => continue,
                }
            }
            other => {
                errors.push(
                    item_path,
                    format!("expected a string or a table, found {}", other.type_str()),
                );
                continue;
            }
        };
        match parse_server(text) {
            Ok(mut addr) => {
                addr.weight = weight;
                if servers
                    .iter()
                    .any(|s: &ServerAddr| s.host == addr.host && s.port == addr.port)
                {
                    errors.push(item_path, format!("server \"{text}\" is listed twice"));
                } else {
                    servers.push(addr);
                }
            }
            Err(why) => errors.push(item_path, why),
        }
    }
    servers
}

fn read_algorithm(t: &Table<'_>) -> Algorithm {
    let choices = [
        ("p2c_ewma", 0u8),
        ("round_robin", 1),
        ("least_requests", 2),
        ("random", 3),
        ("consistent_hash", 4),
    ];
    let key = t.str("hash_key");
    let algorithm = match t.choice("algorithm", &choices).unwrap_or(0) {
        1 => Algorithm::RoundRobin,
        2 => Algorithm::LeastRequests,
        3 => Algorithm::Random,
        4 => {
            let hash_key = match key {
                None => {
                    t.error("hash_key", "required with algorithm = \"consistent_hash\": \"client_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\"");
                    HashKey::ClientIp
                }
                Some(k) => parse_hash_key(k).unwrap_or_else(|why| {
                    t.error("hash_key", why);
                    HashKey::ClientIp
                }),
            };
            return Algorithm::ConsistentHash(hash_key);
        }
        _ => Algorithm::P2cEwma,
    };
    if key.is_some() {
        t.error("hash_key", "only applies to algorithm = \"consistent_hash\"");
    }
    algorithm
}

fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    match text.split_once(':') {
        None if text == "client_ip" => Ok(HashKey::ClientIp),
        None if text == "path" => Ok(HashKey::Path),
        Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("invalid header name \"{name}\"")),
        Some(("cookie", name)) if !name.trim().is_empty() => Ok(HashKey::Cookie(name.trim().to_owned())),
        _ => Err(format!(
            "unknown hash key \"{text}\", expected \"client_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\""
        )),
    }
}

fn read_retry(table: Option<Table<'_>>, response_header_timeout: Duration) -> (RetrySettings, Duration) {
    let mut retry = RetrySettings {
        max_retries: defaults::MAX_RETRIES as u32,
        budget_percent: defaults::RETRY_BUDGET_PERCENT as u32,
        min_per_second: defaults::RETRY_MIN_PER_SECOND as u32,
    };
    let Some(t) = table else {
        return (retry, response_header_timeout);
    };
    retry.max_retries = bounded(&t, "max_retries", defaults::MAX_RETRIES, 0, 10) as u32;
    retry.budget_percent = bounded(&t, "budget_percent", defaults::RETRY_BUDGET_PERCENT, 0, 100) as u32;
    retry.min_per_second = bounded(&t, "min_per_second", defaults::RETRY_MIN_PER_SECOND, 0, 10_000) as u32;
    let per_try = positive_duration(&t, "per_try_timeout", response_header_timeout).min(response_header_timeout);
    t.finish();
    (retry, per_try)
}

fn read_outlier(table: Option<Table<'_>>) -> OutlierSettings {
    let mut outlier = OutlierSettings {
        consecutive_failures: defaults::OUTLIER_CONSECUTIVE_FAILURES as u32,
        base_ejection: defaults::OUTLIER_BASE_EJECTION,
        max_ejection: defaults::OUTLIER_MAX_EJECTION,
        max_ejected_percent: defaults::OUTLIER_MAX_EJECTED_PERCENT as u32,
    };
    let Some(t) = table else { return outlier };
    outlier.consecutive_failures = bounded(
        &t,
        "consecutive_failures",
        defaults::OUTLIER_CONSECUTIVE_FAILURES,
        0,
        1000,
    ) as u32;
    outlier.base_ejection = positive_duration(&t, "base_ejection_time", outlier.base_ejection);
    outlier.max_ejection = positive_duration(&t, "max_ejection_time", outlier.max_ejection);
    if outlier.max_ejection < outlier.base_ejection {
        t.error("max_ejection_time", "must not be shorter than base_ejection_time");
    }
    outlier.max_ejected_percent =
        bounded(&t, "max_ejected_percent", defaults::OUTLIER_MAX_EJECTED_PERCENT, 0, 100) as u32;
    t.finish();
    outlier
}

fn read_health_check(t: Table<'_>) -> CheckSettings {
    let kind = t.choice("type", &[("http", true), ("tcp", false)]).unwrap_or(true);
    let kind = if kind {
        let method = match t.str("method") {
            Some(m) => http::Method::from_bytes(m.as_bytes()).unwrap_or_else(|_| {
                t.error("method", format!("invalid method \"{m}\""));
                http::Method::GET
            }),
            None => http::Method::GET,
        };
        let path = match t.str("path") {
            Some(p) if p.starts_with('/') && http::uri::PathAndQuery::try_from(p).is_ok() => p.to_owned(),
            Some(p) => {
                t.error("path", format!("\"{p}\" must be a path starting with \"/\""));
                "/".to_owned()
            }
            None => "/".to_owned(),
        };
        let status = match t.get("expected_status") {
            None => (200, 399),
            Some(Value::Integer(n)) if (100..=599).contains(n) => (*n as u16, *n as u16),
            Some(Value::String(range)) => match range
                .split_once('-')
                .map(|(a, b)| (a.trim().parse::<u16>(), b.trim().parse::<u16>()))
            {
                Some((Ok(a), Ok(b))) if (100..=599).contains(&a) && (a..=599).contains(&b) => (a, b),
                _ => {
                    t.error(
                        "expected_status",
                        format!("\"{range}\" is not a status range such as \"200-399\""),
                    );
                    (200, 399)
                }
            },
            Some(other) => {
                t.error(
                    "expected_status",
                    format!(
                        "expected a status (200) or a range (\"200-399\"), found {}",
                        other.type_str()
                    ),
                );
                (200, 399)
            }
        };
        CheckKind::Http {
            method,
            path,
            host: t.str("host").map(str::to_owned),
            status,
            body_contains: t.str("body_contains").map(str::to_owned),
        }
    } else {
        CheckKind::Tcp
    };
    let settings = CheckSettings {
        kind,
        interval: positive_duration(&t, "interval", defaults::CHECK_INTERVAL),
        timeout: positive_duration(&t, "timeout", defaults::CHECK_TIMEOUT),
        healthy_threshold: bounded(&t, "healthy_threshold", defaults::CHECK_HEALTHY_THRESHOLD, 1, 100) as u32,
        unhealthy_threshold: bounded(&t, "unhealthy_threshold", defaults::CHECK_UNHEALTHY_THRESHOLD, 1, 100) as u32,
    };
    t.finish();
    settings
}

fn optional_limit(t: &Table<'_>, key: &'static str) -> Option<u32> {
    match t.uint(key) {
        Some(0) => {
            t.error(key, "must be at least 1 (leave it out for no limit)");
            None
        }
        Some(n) => Some(n.min(u64::from(u32::MAX)) as u32),
        None => None,
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(format!(
            "name \"{name}\" may only use letters, digits, '_', '-' and '.'"
        ));
    }
    Ok(())
}

/// Parses `IP:port`, `[IPv6]:port` or `name:port`.
pub fn parse_server(text: &str) -> Result<ServerAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("invalid server \"{text}\": port 0 is not a server port"));
        }
        return Ok(ServerAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
            literal: Some(addr),
            weight: 1,
        });
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "invalid server \"{text}\": missing port, expected host:port such as \"10.0.0.1:8080\""
        ));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid server \"{text}\": port \"{port}\" is not a number between 1 and 65535"))?;
    if port == 0 {
        return Err(format!("invalid server \"{text}\": port 0 is not a server port"));
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid_name {
        return Err(format!(
            "invalid server \"{text}\": \"{host}\" is neither an IP address nor a DNS name"
        ));
    }
    Ok(ServerAddr {
        host: host.to_ascii_lowercase(),
        port,
        literal: None,
        weight: 1,
    })
}

fn read_routes(top: &Table<'_>, upstreams: &[UpstreamConfig], errors: &Errors) -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    let Some(items) = top.array("routes") else {
        if top.get("routes").is_none() {
            errors.push(
                "routes",
                "at least one route is required, such as [[routes]] upstream = \"app\"",
            );
        }
        return routes;
    };
    if items.is_empty() {
        errors.push("routes", "at least one route is required");
    }
    // (host pattern or "" for any, path, match) -> first route index.
    let mut seen: HashMap<(HostPattern, String, PathMatch), usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(t) = Table::new(item, path.clone(), errors) else {
            continue;
        };
        let name = t.str("name").map_or_else(|| path.clone(), str::to_owned);

        let mut hosts = Vec::new();
        for (host_path, text) in t.str_or_strs("host").unwrap_or_default() {
            match parse_host_pattern(text) {
                Ok(Some(p)) => hosts.push(p),
                Ok(None) => {}
                Err(why) => errors.push(host_path, why),
            }
        }

        let route_path = match t.str("path") {
            Some(p) if !p.starts_with('/') => {
                t.error("path", format!("\"{p}\" must start with \"/\""));
                "/".to_owned()
            }
            Some(p)
                if p.bytes()
                    .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#') =>
            {
                t.error(
                    "path",
                    format!(
                        "\"{}\" must not contain spaces, control characters, '?' or '#'",
                        p.escape_debug()
                    ),
                );
                "/".to_owned()
            }
            Some(p) => match crate::target::normalize_path(p, crate::target::EncodedSlash::Keep) {
                // Requests are matched on their normal form: a route path
                // in another form could never match.
                Ok(normal) if normal == p => p.to_owned(),
                Ok(normal) => {
                    t.error(
                        "path",
                        format!("\"{p}\" is not in normal form (requests are matched normalised): write \"{normal}\""),
                    );
                    "/".to_owned()
                }
                Err(why) => {
                    t.error("path", format!("\"{p}\" can never match: it holds {why}"));
                    "/".to_owned()
                }
            },
            None => "/".to_owned(),
        };
        let path_match = t
            .choice(
                "path_match",
                &[("prefix", PathMatch::Prefix), ("exact", PathMatch::Exact)],
            )
            .unwrap_or(PathMatch::Prefix);

        let upstream = match t.str("upstream") {
            Some(u) => match upstreams.iter().position(|g| g.name == u) {
                Some(index) => Some(index),
                None => {
                    let known: Vec<String> = upstreams.iter().map(|g| format!("\"{}\"", g.name)).collect();
                    let hint = if known.is_empty() {
                        "no [upstreams] are defined".to_owned()
                    } else {
                        format!("defined: {}", known.join(", "))
                    };
                    t.error("upstream", format!("unknown upstream \"{u}\" ({hint})"));
                    None
                }
            },
            None => {
                if t.get("upstream").is_none() {
                    t.error("upstream", "required: the name of an [upstreams] group");
                }
                None
            }
        };

        let rewrite_prefix = match t.str("rewrite_prefix") {
            Some(_) if path_match == PathMatch::Exact => {
                t.error("rewrite_prefix", "only applies to path_match = \"prefix\"");
                None
            }
            Some(r) if !r.starts_with('/') => {
                t.error("rewrite_prefix", format!("\"{r}\" must start with \"/\""));
                None
            }
            Some(r)
                if r.bytes()
                    .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#') =>
            {
                t.error(
                    "rewrite_prefix",
                    "must not contain spaces, control characters, '?' or '#'",
                );
                None
            }
            other => other.map(str::to_owned),
        };
        let preserve_host = t.bool("preserve_host").unwrap_or(true);
        let allow_connect = t.bool("allow_connect").unwrap_or(false);
        let raw_path = t.bool("raw_path").unwrap_or(false);
        if raw_path && rewrite_prefix.is_some() {
            t.error(
                "raw_path",
                "cannot be combined with rewrite_prefix, which rewrites the normalised path",
            );
        }
        if raw_path && t.get("cache").is_some_and(|c| c.as_bool() != Some(false)) {
            t.error(
                "raw_path",
                "cannot be combined with cache: the origin would see what the cache key leaves out",
            );
        }
        let request_headers = read_header_edits(t.table("request_headers"));
        let response_headers = read_header_edits(t.table("response_headers"));
        let log_sample = match t.uint("log_sample") {
            Some(n) if (1..=1_000_000).contains(&n) => n as u32,
            Some(n) => {
                t.error("log_sample", format!("must be between 1 and 1000000, found {n}"));
                1
            }
            None => 1,
        };
        let ip_filter = protect::read_ip_filter(&t);
        let rate_limit = protect::read_rate_limit(t.table("rate_limit"));
        let challenge = protect::read_challenge_when(&t);
        let cache = super::cache::read_route_cache(&t).map(std::sync::Arc::new);
        t.finish();

        let keys: Vec<HostPattern> = if hosts.is_empty() {
            vec![HostPattern::Exact(String::new())]
        } else {
            hosts.clone()
        };
        for key in keys {
            let full = (key, route_path.clone(), path_match);
            if let Some(first) = seen.get(&full) {
                errors.push(
                    &path,
                    format!("same host, path and path_match as routes[{first}]: it could never match"),
                );
                break;
            }
            seen.insert(full, i);
        }

        if let Some(upstream) = upstream {
            routes.push(RouteConfig {
                name,
                hosts,
                path: route_path,
                path_match,
                upstream,
                rewrite_prefix,
                preserve_host,
                allow_connect,
                raw_path,
                request_headers,
                response_headers,
                log_sample,
                ip_filter,
                rate_limit,
                challenge,
                cache,
            });
        }
    }
    routes
}

/// `example.com`, `*.example.com`, or `*` (any host, same as no host).
fn parse_host_pattern(text: &str) -> Result<Option<HostPattern>, String> {
    if text == "*" {
        return Ok(None);
    }
    let lower = text.to_ascii_lowercase();
    let lower = lower.trim_end_matches('.');
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower),
    };
    if name.contains(':') && !name.starts_with('[') {
        return Err(format!("invalid host \"{text}\": a route host must not include a port"));
    }
    let valid = !name.is_empty()
        && (name.parse::<IpAddr>().is_ok()
            || (name.starts_with('[') && name.ends_with(']'))
            || name.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            }));
    if !valid {
        return Err(format!(
            "invalid host \"{text}\": expected a name such as \"example.com\" or a wildcard such as \"*.example.com\""
        ));
    }
    Ok(Some(if wildcard {
        HostPattern::Wildcard(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_owned())
    }))
}

fn read_header_edits(table: Option<Table<'_>>) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    let Some(t) = table else { return edits };
    let errors = t.errors();
    for (key, target) in [("set", &mut edits.set), ("add", &mut edits.add)] {
        let Some(map) = t.table(key) else { continue };
        let pairs: Vec<(&String, &Value)> = match t.get(key) {
            Some(Value::Table(m)) => m.iter().collect(),
            _ => Vec::new(),
        };
        for (name, value) in pairs {
            let path = map.path_of(name);
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                errors.push(path, format!("invalid header name \"{name}\""));
                continue;
            };
            match value.as_str().map(HeaderValue::from_str) {
                Some(Ok(v)) => target.push((header, v)),
                Some(Err(_)) => errors.push(path, "header value must be visible ASCII without control characters"),
                None => errors.push(path, format!("expected a string, found {}", value.type_str())),
            }
        }
    }
    for (path, name) in t.str_or_strs("remove").unwrap_or_default() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => edits.remove.push(h),
            Err(_) => errors.push(path, format!("invalid header name \"{name}\"")),
        }
    }
    t.finish();
    edits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_literals_and_names() {
        let s = parse_server("127.0.0.1:80").expect("literal");
        assert_eq!(s.literal, Some("127.0.0.1:80".parse().expect("addr")));
        let s = parse_server("[::1]:8080").expect("v6");
        assert_eq!(s.port, 8080);
        let s = parse_server("API.internal:9000").expect("name");
        assert_eq!((s.host.as_str(), s.port, s.literal), ("api.internal", 9000, None));
        for bad in ["api", "api:", "api:0", "api:99999", ":80", "a b:80", "a..b:80"] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            parse_host_pattern("Example.COM."),
            Ok(Some(HostPattern::Exact("example.com".into())))
        );
        assert_eq!(
            parse_host_pattern("*.example.com"),
            Ok(Some(HostPattern::Wildcard(".example.com".into())))
        );
        assert_eq!(parse_host_pattern("*"), Ok(None));
        for bad in ["", "example.com:80", "a*.b", "*.", "ex ample.com", "a/b"] {
            assert!(parse_host_pattern(bad).is_err(), "{bad}");
        }
    }
}
