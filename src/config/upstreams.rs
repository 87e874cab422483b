//! `[upstreams.NAME]`: server groups, their balancing, pools, TLS, active
//! and passive health and retries; the model and its reading. The health
//! settings are plain values here; `upstream::health` runs them.

use std::net::SocketAddr;
use std::time::Duration;

use super::defaults;
use super::reader::{Errors, Table, bounded, positive_duration};
use super::{Algorithm, HashKey, Timeouts};
use http::HeaderName;
use toml::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2: with prior knowledge in cleartext (`"h2c"`), or negotiated by
    /// ALPN over TLS (`"h2"`).
    H2,
}

/// `[upstreams.NAME.tls]`: TLS to the upstream servers.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// PEM bundle of trusted CAs; `None` = the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// The name sent in SNI and checked in the certificate; `None` = each
    /// server's host as configured.
    pub server_name: Option<String>,
    /// Client certificate chain and key, for upstreams that require mTLS.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// An upstream server as written: a literal address, or a name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
    /// Set when `host` is an IP literal: no resolution needed.
    pub literal: Option<SocketAddr>,
    /// Relative share of traffic (default 1).
    pub weight: u32,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.literal {
            Some(addr) => write!(f, "{addr}"),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub servers: Vec<ServerAddr>,
    pub protocol: UpstreamProtocol,
    /// Most idle connections kept per server.
    pub pool_size: usize,
    pub idle_timeout: Duration,
    /// How often names are resolved again.
    pub resolve_interval: Duration,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    pub tls: Option<UpstreamTls>,
    pub algorithm: Algorithm,
    /// Name of the cookie that pins a client to a server, if any.
    pub sticky_cookie: Option<String>,
    pub health_check: Option<CheckSettings>,
    pub outlier: OutlierSettings,
    /// Weight ramp after a server (re)joins; zero means none.
    pub slow_start: Duration,
    pub retry: RetrySettings,
    /// Timeout of each try (at most the response header timeout).
    pub per_try_timeout: Duration,
    /// Circuit breakers: most requests in flight to the group / one server.
    pub max_requests: Option<u32>,
    pub max_requests_per_server: Option<u32>,
}

/// Outlier detection settings (`[upstreams.NAME.outlier]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive connect failures or gateway errors (502, 503, 504) that eject a server; 0
    /// turns passive health off.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of a group is ejected at once.
    pub max_ejected_percent: u32,
}

/// Retry settings (`[upstreams.NAME.retry]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    pub max_retries: u32,
    /// Retries may add at most this percentage of requests ...
    pub budget_percent: u32,
    /// ... but at least this many per second are always allowed.
    pub min_per_second: u32,
}

/// Active health check settings (`[upstreams.NAME.health_check]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Http {
        method: http::Method,
        path: String,
        host: Option<String>,
        /// Inclusive status range counted as healthy.
        status: (u16, u16),
        body_contains: Option<String>,
    },
}

pub(super) fn read_upstream_tls(t: Table<'_>) -> UpstreamTls {
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

#[allow(
    clippy::too_many_lines,
    reason = "reads one [upstreams.NAME] table key by key, in the order docs/config.md lists them"
)]
pub(super) fn read_upstreams(top: &Table<'_>, timeouts: &Timeouts, errors: &Errors) -> Vec<UpstreamConfig> {
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
pub(super) fn read_servers(t: &Table<'_>, errors: &Errors) -> Vec<ServerAddr> {
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

pub(super) fn read_algorithm(t: &Table<'_>) -> Algorithm {
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

pub(super) fn read_retry(table: Option<Table<'_>>, response_header_timeout: Duration) -> (RetrySettings, Duration) {
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

pub(super) fn read_outlier(table: Option<Table<'_>>) -> OutlierSettings {
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

pub(super) fn read_health_check(t: Table<'_>) -> CheckSettings {
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
}
