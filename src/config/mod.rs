//! Configuration: `file.toml -> toml tree -> read + validate -> Config`.
//!
//! The file is parsed into a generic TOML tree, then [`parse`] walks it with
//! [`reader::Table`], which collects every problem with its path (unknown
//! keys, wrong types, bad values, dangling references) so `portcullis check`,
//! start-up and reload all report the same complete list. The result is the
//! runtime model below: plain Rust types with no serde, every default filled
//! in, every reference resolved to an index.
//!
//! Names of upstream servers are resolved later, when the runtime snapshot is
//! built (see `state.rs`), because that needs I/O.

mod cache;
mod observe;
mod parse;
mod protect;
pub mod reader;
pub mod units;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;

pub use crate::upstream::balance::{Algorithm, HashKey};
pub use crate::upstream::health::{CheckKind, CheckSettings, OutlierSettings, RetrySettings};
pub use cache::{CacheConfig, CredentialsPolicy, QueryKey, RouteCache};
pub use observe::{
    AccessLogConfig, AuditLogConfig, LogDestination, LogField, LogFormat, MetricsConfig, RequestIdConfig,
};
pub use parse::{defaults, parse};
pub use protect::{
    AdaptiveConfig, BanConfig, ChallengeConfig, ChallengeWhen, IpFilter, LoadSheddingConfig, ProtectConfig,
    ProtectMode, Rate, RateKey, RateLimitConfig, parse_rate,
};
pub use reader::{ConfigError, ConfigErrors};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub access_log: AccessLogConfig,
    pub request_id: RequestIdConfig,
    pub audit_log: Option<AuditLogConfig>,
    pub metrics: Option<MetricsConfig>,
    pub protect: ProtectConfig,
    /// `[cache]`: the shared store (used by routes with `cache`).
    pub cache: CacheConfig,
    /// The file the config came from and its SHA-256 (hex), for the audit log.
    pub source: Option<(std::path::PathBuf, String)>,
}

/// Process-wide settings (`[server]`).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long in-flight requests may run after shutdown starts.
    pub drain_timeout: Duration,
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
}

/// Timeouts (`[timeouts]`); each has a safe default.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect to an upstream server.
    pub connect: Duration,
    /// From the first byte of a request to its last header byte.
    pub header_read: Duration,
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
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_header_bytes: usize,
    pub max_header_count: usize,
    /// `None` means unlimited.
    pub max_request_body_bytes: Option<u64>,
    pub max_uri_length: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge only.
    H2c,
    /// Both, told apart by the HTTP/2 connection preface.
    Auto,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub protocol: ListenerProtocol,
    /// TLS termination; `None` for a cleartext listener.
    pub tls: Option<TlsConfig>,
    /// Cleartext listener that answers every request with a 308 to
    /// `https://` on this port.
    pub redirect_https_port: Option<u16>,
    /// Checked at accept, before the `[protect]` lists.
    pub ip_filter: IpFilter,
    /// Connections start with a PROXY protocol v1 or v2 header naming the
    /// real client; accepted only from `server.trusted_proxies`.
    pub proxy_protocol: bool,
}

/// `[listeners.tls]`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateFiles>,
    /// Clients without SNI get the first certificate, or are refused.
    pub refuse_without_sni: bool,
    pub handshake_timeout: Duration,
    /// `Strict-Transport-Security: max-age=...` on every response.
    pub hsts_max_age: Option<Duration>,
    /// Client certificates (mTLS); `None` = not asked for.
    pub client_auth: Option<ClientAuth>,
    /// Check the certificate files this often and reload when they change.
    pub watch_interval: Option<Duration>,
}

/// `[listeners.tls.client_auth]`.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Without a certificate the handshake fails (else it is optional).
    pub required: bool,
    /// PEM bundle of the CAs that issue client certificates.
    pub ca: std::path::PathBuf,
    /// Headers carrying the verified subject and SHA-256 fingerprint to the
    /// upstream; the same headers from the client are always removed.
    pub subject_header: HeaderName,
    pub fingerprint_header: HeaderName,
}

/// One certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Where it was configured (`listeners[0].tls.certificates[1]`), for errors.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathMatch {
    Prefix,
    Exact,
}

/// A host pattern of a route: `example.com` or `*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// The suffix after `*`, with its leading dot: `.example.com`.
    Wildcard(String),
}

#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    /// Replaces any existing values.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Appends beside existing values.
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `routes[N]`, or the route's `name` when given: used in logs.
    pub name: String,
    /// Empty means any host.
    pub hosts: Vec<HostPattern>,
    pub path: String,
    pub path_match: PathMatch,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Replaces the matched path prefix before forwarding.
    pub rewrite_prefix: Option<String>,
    /// Forward the client's `Host`; otherwise the upstream server's address.
    pub preserve_host: bool,
    /// Forward `CONNECT` requests (tunnels) instead of answering 405.
    pub allow_connect: bool,
    /// Send the request target upstream as the client wrote it; routing
    /// and protection still use the normalised path.
    pub raw_path: bool,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// Access log sampling: one in this many responses below 400 is
    /// written; every 4xx and 5xx is.
    pub log_sample: u32,
    /// Clients outside it get 403.
    pub ip_filter: IpFilter,
    /// Requests over it get 429.
    pub rate_limit: Option<RateLimitConfig>,
    /// When clients without a valid challenge cookie get a 307 that sets one.
    pub challenge: ChallengeWhen,
    /// Responses are cached (RFC 9111) when set.
    /// Shared with the requests that go to the origin (no copy per miss).
    pub cache: Option<std::sync::Arc<RouteCache>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2: with prior knowledge in cleartext (`"h2c"`), or negotiated by
    /// ALPN over TLS (`"h2"`).
    H2,
}

/// `[upstreams.NAME.tls]`: TLS to the upstream servers.
#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
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

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("{}: cannot read config file: {e}", path.display()),
            }])
        })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        config.source = Some((path.to_owned(), crate::observe::audit::sha256_hex(text.as_bytes())));
        Ok(config)
    }

    /// Parses and validates config text; `origin` names it in syntax errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let position = e.span().map(|span| line_col(text, span.start));
            let message = e.message().trim_end_matches('\n').to_owned();
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: match position {
                    Some((line, col)) => format!("{origin}:{line}:{col}: TOML syntax error: {message}"),
                    None => format!("{origin}: TOML syntax error: {message}"),
                },
            }])
        })?;
        parse(&table)
    }

    pub fn upstream_by_name(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}
