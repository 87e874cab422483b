//! Reads the TOML tree into [`Config`], filling defaults and validating every
//! field; all problems are collected, none stops the walk.

use super::listeners::read_listeners;
use super::observe;
use super::protect;
use super::reader::{ConfigErrors, Errors, Table};
use super::routes::read_routes;
use super::server::{read_limits, read_server, read_timeouts};
use super::upstreams::read_upstreams;
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
    /// A body read whole (at most 64 KiB by default) must be in within
    /// this: 2 KiB/s for a full buffer, far below any real client.
    pub const BODY_READ: Duration = Duration::from_secs(30);
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
    /// Request bodies read whole before an upstream is chosen: forms and
    /// API payloads (nginx reads every body before it connects upstream;
    /// 64 KiB keeps uploads streaming and memory small).
    pub const BUFFER_REQUEST_BODY: u64 = 64 << 10;
    /// All buffered request bodies together: 1,024 full buffers.
    pub const REQUEST_BUFFER_MEMORY: u64 = 64 << 20;
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
    // [access_log], [request_id], [audit_log], [metrics]
    pub const REDACT_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie"];
    pub const REDACT_QUERY_PARAMS: &[&str] = &[
        "access_token",
        "api_key",
        "apikey",
        "password",
        "secret",
        "token",
        "sig",
        "signature",
    ];
    pub const BUFFER_RECORDS: u64 = 16 * 1024;
    /// 16,384 records of a kilobyte.
    pub const BUFFER_BYTES: u64 = 16 << 20;
    pub const REQUEST_ID_HEADER: &str = "x-request-id";
    pub const CHECKPOINT_EVERY: u64 = 100;
    pub const METRICS_PATH: &str = "/metrics";
    // [cache]
    pub const CACHE_MEMORY: u64 = 256 << 20;
    pub const CACHE_MAX_OBJECT_SIZE: u64 = 8 << 20;
    pub const CACHE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
    /// 10 % as RFC 9111 section 4.2.2 suggests ...
    pub const CACHE_HEURISTIC_FRACTION: f64 = 0.1;
    /// ... capped at a day: RFC 7234 asked for a warning past 24 hours of
    /// heuristic age, a sign that longer guesses surprise people.
    pub const CACHE_HEURISTIC_MAX: Duration = Duration::from_secs(86_400);
    // [protect]
    pub const EVICT_IDLE_AFTER: Duration = Duration::from_secs(1);
    pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);
    pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
    pub const H2_MAX_RESETS_PER_SECOND: u32 = 100;
    pub const IPV6_PREFIX: u8 = 64;
    pub const CHALLENGE_COOKIE: &str = "__portcullis_challenge";
    pub const CHALLENGE_LIFETIME: Duration = Duration::from_secs(3600);
    pub const ADAPTIVE_WINDOW: Duration = Duration::from_secs(5);
    pub const ADAPTIVE_SPIKE_FACTOR: f64 = 3.0;
    pub const ADAPTIVE_MIN_RATE: f64 = 50.0;
    pub const ADAPTIVE_ENTER_AFTER: u32 = 2;
    pub const ADAPTIVE_LEAVE_AFTER: u32 = 6;
    /// Traffic a scope learns from before it judges (docs/protection.md).
    pub const ADAPTIVE_LEARN: Duration = Duration::from_secs(60);
    /// Time between the two calm visits that earn a client trust.
    pub const ADAPTIVE_TRUST_AFTER: Duration = Duration::from_secs(300);
    /// One request per second, no burst, for an attack's sources.
    pub const ADAPTIVE_SUSPECT_RATE: (u32, Duration, u32) = (1, Duration::from_secs(1), 1);
    pub const SHEDDING_INITIAL_LIMIT: u32 = 100;
    pub const SHEDDING_MIN_LIMIT: u32 = 10;
    pub const SHEDDING_MAX_LIMIT: u32 = 1000;
    pub const SHEDDING_TOLERANCE: f64 = 2.0;
    pub const SHEDDING_RESERVE: f64 = 0.25;
    pub const SHEDDING_RETRY_AFTER: Duration = Duration::from_secs(1);
    pub const SHEDDING_TRUSTED_WAIT: Duration = Duration::from_secs(1);
    pub const BAN_STRIKES: u32 = 100;
    pub const BAN_WINDOW: Duration = Duration::from_secs(60);
    pub const BAN_DURATION: Duration = Duration::from_secs(600);
    pub const BAN_MAX_TRACKED: usize = 100_000;
    /// Automatic bans per minute at most: a wrong verdict cannot shut out
    /// a whole population at once.
    pub const BAN_MAX_PER_MINUTE: u32 = 100;
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
    let admin = super::admin::read_admin(top.table("admin"));
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
        admin,
        protect,
        cache,
        source: None,
        text: None,
    })
}
