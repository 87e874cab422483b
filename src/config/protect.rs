//! The protection settings: `[protect]` (connection limits and IP lists
//! applied at accept) and, per route, `allow` / `deny` and `rate_limit`.
//! docs/protection.md documents every field.

use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

use super::defaults;
use super::reader::Table;

/// A rate: `count` events per `period`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Rate {
    /// The time one event's allowance takes to come back.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }
}

/// Parses `"100/s"`, `"6000/min"`, `"20/h"` (count per second, minute or
/// hour; count from 1 to 1,000,000,000).
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("\"{text}\" is not a rate such as \"100/s\", \"6000/min\" or \"20/h\"");
    let (count, unit) = text.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 || count > 1_000_000_000 {
        return Err(format!("\"{text}\": the count must be between 1 and 1000000000"));
    }
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok((count, period))
}

/// What a rate limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    /// The client's network: IPv4 addresses masked to `v4` bits, IPv6 to
    /// `v6` bits (`"ip_prefix:24"` sets IPv4 and uses /64 for IPv6).
    IpPrefix {
        v4: u8,
        v6: u8,
    },
    Header(HeaderName),
    Cookie(String),
}

/// `routes[].rate_limit`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub rate: Rate,
    pub key: RateKey,
}

/// Allow and deny lists: deny wins; a non-empty allow list admits only
/// its networks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpFilter {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl IpFilter {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn permits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// `[protect]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtectConfig {
    /// Client connections open at once, all listeners together.
    pub max_connections: Option<usize>,
    /// At `max_connections`, a new connection evicts one quiet (no request
    /// in flight) for at least this long; `None`: never evict.
    pub evict_idle_after: Option<Duration>,
    /// Client connections open at once from one IP address.
    pub max_connections_per_ip: Option<u32>,
    /// New connections per IP address.
    pub new_connections_per_ip: Option<Rate>,
    /// Checked at accept, before any byte is read.
    pub ip_filter: IpFilter,
    /// Slow uploads: a request body must arrive at this many bytes per
    /// second on average, after `body_rate_grace`; else 408.
    pub min_body_rate: Option<u64>,
    pub body_rate_grace: Duration,
    /// The challenge cookie of routes with `challenge = true`.
    pub challenge: ChallengeConfig,
    /// Spike detection and attack mode; `None` = off.
    pub adaptive: Option<AdaptiveConfig>,
    /// Requests one client connection may carry, then it is closed
    /// (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY); `None` = unlimited.
    pub max_requests_per_connection: Option<u64>,
    /// Origin load shedding (`[protect.load_shedding]`); `None` = off.
    pub load_shedding: Option<LoadSheddingConfig>,
    /// Temporary bans (`[protect.bans]`); `None` = off.
    pub bans: Option<BanConfig>,
    /// HTTP/2 streams a client connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may cancel (RST_STREAM) per second on one
    /// connection before it is closed (Rapid Reset, CVE-2023-44487).
    pub h2_max_resets_per_second: u32,
    /// The prefix length that makes one IPv6 client for the per-IP caps,
    /// rates, limits, attack detection and bans: a host usually holds a
    /// whole /64 and can rotate within it.
    pub ipv6_prefix: u8,
}

/// `[protect.load_shedding]`: an adaptive concurrency limit per upstream
/// group (protect/shedding.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSheddingConfig {
    pub mode: ProtectMode,
    pub initial_limit: u32,
    pub min_limit: u32,
    pub max_limit: u32,
    /// Latency, as a multiple of the no-load baseline, the origin may
    /// reach before the limit shrinks.
    pub tolerance: f64,
    /// Share of the limit kept for trusted clients (seen before the
    /// spike, or with a valid challenge cookie).
    pub reserve: f64,
    pub retry_after: Duration,
    /// How long a trusted client's request may wait for room when the
    /// limit is reached (zero: never waits).
    pub trusted_wait: Duration,
}

impl Default for LoadSheddingConfig {
    fn default() -> Self {
        LoadSheddingConfig {
            mode: ProtectMode::Enforce,
            initial_limit: defaults::SHEDDING_INITIAL_LIMIT,
            min_limit: defaults::SHEDDING_MIN_LIMIT,
            max_limit: defaults::SHEDDING_MAX_LIMIT,
            tolerance: defaults::SHEDDING_TOLERANCE,
            reserve: defaults::SHEDDING_RESERVE,
            retry_after: defaults::SHEDDING_RETRY_AFTER,
            trusted_wait: defaults::SHEDDING_TRUSTED_WAIT,
        }
    }
}

/// `[protect.bans]`: a client that collects `strikes` (challenges it did
/// not pass, requests refused by a route's rate limit) within `window` is
/// banned for `duration`, at most `max_per_minute` clients a minute, never
/// one in `never_ban`.
#[derive(Debug, Clone, PartialEq)]
pub struct BanConfig {
    pub mode: ProtectMode,
    pub strikes: u32,
    pub window: Duration,
    pub duration: Duration,
    /// Clients tracked at once (strike counters and bans together).
    pub max_tracked: usize,
    /// Networks never banned (an API partner, an allowed crawler, a NAT).
    pub never_ban: Vec<IpNet>,
    /// Automatic bans made per minute at most.
    pub max_per_minute: u32,
}

impl Default for BanConfig {
    fn default() -> Self {
        BanConfig {
            mode: ProtectMode::Enforce,
            strikes: defaults::BAN_STRIKES,
            window: defaults::BAN_WINDOW,
            duration: defaults::BAN_DURATION,
            max_tracked: defaults::BAN_MAX_TRACKED,
            never_ban: Vec::new(),
            max_per_minute: defaults::BAN_MAX_PER_MINUTE,
        }
    }
}

/// What attack mode does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtectMode {
    /// Detect, log, audit and count what would be done; change nothing.
    Shadow,
    /// Detect and act: refuse the heaviest sources of a few-source attack,
    /// challenge clients on `challenge = "attack"` routes.
    Enforce,
}

/// `[protect.adaptive]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub mode: ProtectMode,
    pub window: Duration,
    pub spike_factor: f64,
    /// Requests per second below which nothing is a spike.
    pub min_rate: f64,
    pub enter_after: u32,
    pub leave_after: u32,
    /// The rate each heavy source of a few-source attack is held to while
    /// attack mode is on (ladder step 1: tighten, per offending key).
    pub suspect_rate: Rate,
    /// Traffic each scope learns from before judging spikes (0: judge from
    /// the first window).
    pub learn: Duration,
    /// An absolute ceiling (requests per second) that makes a spike
    /// whatever the baseline, while learning too.
    pub max_rate: Option<f64>,
    /// How far apart two calm visits must be for a client to be trusted
    /// by load shedding's reserve (the client memory's generation).
    pub trust_after: Duration,
}

/// When a route challenges clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChallengeWhen {
    #[default]
    Never,
    Always,
    /// Only while attack mode is on (and enforced).
    DuringAttack,
}

fn read_adaptive(table: Option<Table<'_>>) -> Option<AdaptiveConfig> {
    let t = table?;
    let mut config = AdaptiveConfig {
        mode: ProtectMode::Shadow,
        window: defaults::ADAPTIVE_WINDOW,
        spike_factor: defaults::ADAPTIVE_SPIKE_FACTOR,
        min_rate: defaults::ADAPTIVE_MIN_RATE,
        enter_after: defaults::ADAPTIVE_ENTER_AFTER,
        leave_after: defaults::ADAPTIVE_LEAVE_AFTER,
        suspect_rate: Rate {
            count: defaults::ADAPTIVE_SUSPECT_RATE.0,
            period: defaults::ADAPTIVE_SUSPECT_RATE.1,
            burst: defaults::ADAPTIVE_SUSPECT_RATE.2,
        },
        learn: defaults::ADAPTIVE_LEARN,
        max_rate: None,
        trust_after: defaults::ADAPTIVE_TRUST_AFTER,
    };
    let mode = read_mode(&t, ProtectMode::Shadow);
    if let Some(w) = t.duration("window") {
        if w < Duration::from_millis(100) || w > Duration::from_secs(300) {
            t.error("window", "must be between 100ms and 5m");
        } else {
            config.window = w;
        }
    }
    read_number(&t, "spike_factor", 1.0, 1000.0, &mut config.spike_factor);
    if let Some(n) = t.uint("min_rate") {
        config.min_rate = n as f64;
    }
    for (key, slot) in [
        ("enter_after", &mut config.enter_after),
        ("leave_after", &mut config.leave_after),
    ] {
        if let Some(n) = t.uint(key) {
            if (1..=1000).contains(&n) {
                *slot = n as u32;
            } else {
                t.error(key, format!("must be between 1 and 1000 windows, found {n}"));
            }
        }
    }
    if let Some(d) = t.duration("learn") {
        if d > Duration::from_secs(3600) {
            t.error("learn", "must be at most 1h (0s judges from the first window)");
        } else {
            config.learn = d;
        }
    }
    if let Some(n) = t.uint("max_rate") {
        if n == 0 {
            t.error("max_rate", "must be at least 1 request per second");
        } else {
            config.max_rate = Some(n as f64);
        }
    }
    if let Some(d) = t.duration("trust_after") {
        if d < config.window || d > Duration::from_secs(3600) {
            t.error("trust_after", "must be between the window and 1h");
        } else {
            config.trust_after = d;
        }
    }
    if let Some(rate) = read_rate(&t, "suspect_rate", "suspect_burst") {
        config.suspect_rate = rate;
    } else if t.get("suspect_burst").is_some() && t.get("suspect_rate").is_none() {
        t.error("suspect_burst", "needs suspect_rate");
    }
    t.finish();
    Some(AdaptiveConfig { mode: mode?, ..config })
}

/// `challenge = true | false | "attack"` of a route.
pub fn read_challenge_when(t: &Table<'_>) -> ChallengeWhen {
    match t.get("challenge") {
        None => ChallengeWhen::Never,
        Some(toml::Value::Boolean(true)) => ChallengeWhen::Always,
        Some(toml::Value::Boolean(false)) => ChallengeWhen::Never,
        Some(toml::Value::String(s)) if s == "attack" => ChallengeWhen::DuringAttack,
        Some(other) => {
            t.error(
                "challenge",
                format!("expected true, false or \"attack\", found {other}"),
            );
            ChallengeWhen::Never
        }
    }
}

/// `[protect.challenge]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChallengeConfig {
    pub cookie: String,
    /// How long a cookie is valid; the random key rotates this often.
    pub lifetime: Duration,
    /// A key shared by several instances (at least 16 bytes); without
    /// one, each process makes its own.
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for ChallengeConfig {
    fn default() -> Self {
        ChallengeConfig {
            cookie: defaults::CHALLENGE_COOKIE.into(),
            lifetime: defaults::CHALLENGE_LIFETIME,
            key_file: None,
        }
    }
}

fn read_challenge(table: Option<Table<'_>>) -> ChallengeConfig {
    let mut config = ChallengeConfig::default();
    let Some(t) = table else { return config };
    if let Some(name) = t.str("cookie") {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            t.error(
                "cookie",
                format!("\"{name}\" is not a cookie name (letters, digits, '_', '-', '.')"),
            );
        } else {
            config.cookie = name.to_owned();
        }
    }
    if let Some(d) = t.duration("lifetime") {
        if d < Duration::from_secs(60) {
            t.error("lifetime", "must be at least 1m");
        } else {
            config.lifetime = d;
        }
    }
    config.key_file = t.str("key_file").map(std::path::PathBuf::from);
    t.finish();
    config
}

/// Parses a byte rate: `"1KiB/s"`, `"500/s"` (bytes per second).
pub fn parse_byte_rate(text: &str) -> Result<u64, String> {
    let bad = || format!("\"{text}\" is not a byte rate such as \"1KiB/s\"");
    let size = text.trim().strip_suffix("/s").ok_or_else(bad)?;
    let bytes = super::units::parse_size(size.trim()).map_err(|_| bad())?;
    if bytes == 0 {
        return Err(format!("\"{text}\": must be at least 1 byte per second"));
    }
    Ok(bytes)
}

fn cidrs(t: &Table<'_>, key: &'static str) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (path, text) in t.str_or_strs(key).unwrap_or_default() {
        match super::units::parse_cidr(text) {
            Some(net) => out.push(net),
            None => t.errors().push(path, format!("invalid IP address or CIDR \"{text}\"")),
        }
    }
    out
}

/// `allow` and `deny` of a table.
pub fn read_ip_filter(t: &Table<'_>) -> IpFilter {
    IpFilter {
        allow: cidrs(t, "allow"),
        deny: cidrs(t, "deny"),
    }
}

/// A rate with an optional burst key (`burst` defaults to the count, so a
/// client may spend one period's allowance at once).
fn read_rate(t: &Table<'_>, rate_key: &'static str, burst_key: &'static str) -> Option<Rate> {
    let burst = match t.uint(burst_key) {
        Some(b) if (1..=1_000_000_000).contains(&b) => Some(b as u32),
        Some(b) => {
            t.error(burst_key, format!("must be between 1 and 1000000000, found {b}"));
            None
        }
        None => None,
    };
    let (count, period) = match parse_rate(t.str(rate_key)?) {
        Ok(v) => v,
        Err(e) => {
            t.error(rate_key, e);
            return None;
        }
    };
    Some(Rate {
        count,
        period,
        burst: burst.unwrap_or(count),
    })
}

impl Default for ProtectConfig {
    fn default() -> Self {
        ProtectConfig {
            max_connections: None,
            evict_idle_after: Some(defaults::EVICT_IDLE_AFTER),
            max_connections_per_ip: None,
            new_connections_per_ip: None,
            ip_filter: IpFilter::default(),
            min_body_rate: None,
            body_rate_grace: defaults::BODY_RATE_GRACE,
            challenge: ChallengeConfig::default(),
            adaptive: None,
            max_requests_per_connection: None,
            load_shedding: None,
            bans: None,
            h2_max_concurrent_streams: defaults::H2_MAX_CONCURRENT_STREAMS,
            h2_max_resets_per_second: defaults::H2_MAX_RESETS_PER_SECOND,
            ipv6_prefix: defaults::IPV6_PREFIX,
        }
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "reads the [protect] table key by key, in the order docs/protection.md lists them"
)]
pub fn read_protect(table: Option<Table<'_>>) -> ProtectConfig {
    let mut config = ProtectConfig::default();
    let Some(t) = table else { return config };
    if let Some(n) = t.uint("max_connections") {
        if n == 0 || n > 10_000_000 {
            t.error("max_connections", format!("must be between 1 and 10000000, found {n}"));
        } else {
            config.max_connections = Some(n as usize);
        }
    }
    if let Some(n) = t.uint("max_connections_per_ip") {
        if n == 0 || n > 1_000_000 {
            t.error(
                "max_connections_per_ip",
                format!("must be between 1 and 1000000, found {n}"),
            );
        } else {
            config.max_connections_per_ip = Some(n as u32);
        }
    }
    match t.get("evict_idle_after") {
        Some(toml::Value::String(s)) if s == "off" => config.evict_idle_after = None,
        Some(_) => {
            if let Some(d) = t.duration("evict_idle_after") {
                config.evict_idle_after = Some(d);
            }
        }
        None => {}
    }
    config.new_connections_per_ip = read_rate(&t, "new_connections_per_ip", "new_connections_burst");
    if config.new_connections_per_ip.is_none() && t.get("new_connections_burst").is_some() {
        t.error("new_connections_burst", "needs new_connections_per_ip");
    }
    config.ip_filter = read_ip_filter(&t);
    if let Some(text) = t.str("min_body_rate") {
        match parse_byte_rate(text) {
            Ok(rate) => config.min_body_rate = Some(rate),
            Err(e) => t.error("min_body_rate", e),
        }
    }
    if let Some(grace) = t.duration("body_rate_grace") {
        config.body_rate_grace = grace;
    }
    config.challenge = read_challenge(t.table("challenge"));
    config.adaptive = read_adaptive(t.table("adaptive"));
    if let Some(n) = t.uint("max_requests_per_connection") {
        if n == 0 {
            t.error("max_requests_per_connection", "must be at least 1");
        } else {
            config.max_requests_per_connection = Some(n);
        }
    }
    for (key, slot, max) in [
        (
            "h2_max_concurrent_streams",
            &mut config.h2_max_concurrent_streams,
            100_000,
        ),
        (
            "h2_max_resets_per_second",
            &mut config.h2_max_resets_per_second,
            1_000_000,
        ),
    ] {
        if let Some(n) = t.uint(key) {
            if n == 0 || n > max {
                t.error(key, format!("must be between 1 and {max}, found {n}"));
            } else {
                *slot = n as u32;
            }
        }
    }
    if let Some(n) = t.uint("ipv6_prefix") {
        if (16..=128).contains(&n) {
            config.ipv6_prefix = n as u8;
        } else {
            t.error("ipv6_prefix", format!("must be between 16 and 128, found {n}"));
        }
    }
    config.load_shedding = read_load_shedding(t.table("load_shedding"));
    config.bans = read_bans(t.table("bans"));
    t.finish();
    config
}

/// `mode = "off" | "shadow" | "enforce"` of a ladder step: `None` = off.
fn read_mode(t: &Table<'_>, default: ProtectMode) -> Option<ProtectMode> {
    t.choice(
        "mode",
        &[
            ("off", None),
            ("shadow", Some(ProtectMode::Shadow)),
            ("enforce", Some(ProtectMode::Enforce)),
        ],
    )
    .unwrap_or(Some(default))
}

/// A count between `min` and `max`, or an error naming the key.
fn read_count(t: &Table<'_>, key: &'static str, min: u64, max: u64, slot: &mut u32) {
    if let Some(n) = t.uint(key) {
        if (min..=max).contains(&n) {
            *slot = n as u32;
        } else {
            t.error(key, format!("must be between {min} and {max}, found {n}"));
        }
    }
}

/// A number (integer or float) between `min` and `max`.
fn read_number(t: &Table<'_>, key: &'static str, min: f64, max: f64, slot: &mut f64) {
    if let Some(v) = t.get(key) {
        match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
            Some(f) if (min..=max).contains(&f) => *slot = f,
            _ => t.error(key, format!("must be a number from {min} to {max}")),
        }
    }
}

fn read_load_shedding(table: Option<Table<'_>>) -> Option<LoadSheddingConfig> {
    let t = table?;
    let mut c = LoadSheddingConfig::default();
    let mode = read_mode(&t, c.mode);
    read_count(&t, "min_limit", 1, 1_000_000, &mut c.min_limit);
    read_count(&t, "max_limit", 1, 1_000_000, &mut c.max_limit);
    let initial_given = t.get("initial_limit").is_some();
    read_count(&t, "initial_limit", 1, 1_000_000, &mut c.initial_limit);
    if c.min_limit > c.max_limit {
        t.error(
            "min_limit",
            format!("must not exceed max_limit ({} > {})", c.min_limit, c.max_limit),
        );
    }
    if !initial_given {
        c.initial_limit = c.initial_limit.clamp(c.min_limit, c.max_limit.max(c.min_limit));
    } else if c.initial_limit < c.min_limit || c.initial_limit > c.max_limit {
        t.error("initial_limit", "must be between min_limit and max_limit");
    }
    read_number(&t, "tolerance", 1.0, 100.0, &mut c.tolerance);
    read_number(&t, "reserve", 0.0, 0.9, &mut c.reserve);
    if let Some(d) = t.duration("retry_after") {
        if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
            t.error("retry_after", "must be between 1s and 1h");
        } else {
            c.retry_after = d;
        }
    }
    if let Some(d) = t.duration("trusted_wait") {
        if d > Duration::from_secs(60) {
            t.error("trusted_wait", "must be at most 1m");
        } else {
            c.trusted_wait = d;
        }
    }
    t.finish();
    Some(LoadSheddingConfig { mode: mode?, ..c })
}

fn read_bans(table: Option<Table<'_>>) -> Option<BanConfig> {
    let t = table?;
    let mut c = BanConfig::default();
    let mode = read_mode(&t, c.mode);
    read_count(&t, "strikes", 1, 1_000_000, &mut c.strikes);
    for (key, slot) in [("window", &mut c.window), ("duration", &mut c.duration)] {
        if let Some(d) = t.duration(key) {
            if d < Duration::from_secs(1) || d > Duration::from_secs(7 * 24 * 3600) {
                t.error(key, "must be between 1s and 7d");
            } else {
                *slot = d;
            }
        }
    }
    if let Some(n) = t.uint("max_tracked") {
        if (100..=10_000_000).contains(&n) {
            c.max_tracked = n as usize;
        } else {
            t.error("max_tracked", format!("must be between 100 and 10000000, found {n}"));
        }
    }
    c.never_ban = cidrs(&t, "never_ban");
    read_count(&t, "max_per_minute", 1, 1_000_000, &mut c.max_per_minute);
    t.finish();
    Some(BanConfig { mode: mode?, ..c })
}

pub fn read_rate_limit(table: Option<Table<'_>>) -> Option<RateLimitConfig> {
    let t = table?;
    let rate = read_rate(&t, "rate", "burst");
    if t.get("rate").is_none() {
        t.error("rate", "required: a rate such as \"100/s\"");
    }
    let key = match t.str("key") {
        None | Some("client_ip") => RateKey::ClientIp,
        Some(text) => match parse_key(text) {
            Ok(k) => k,
            Err(e) => {
                t.error("key", e);
                RateKey::ClientIp
            }
        },
    };
    t.finish();
    Some(RateLimitConfig { rate: rate?, key })
}

fn parse_key(text: &str) -> Result<RateKey, String> {
    let bad = || {
        format!(
            "unknown key \"{text}\", expected \"client_ip\", \"ip_prefix:BITS\" (IPv4 bits; IPv6 uses /64), \"ip_prefix:V4BITS:V6BITS\", \"header:NAME\" or \"cookie:NAME\""
        )
    };
    if let Some(bits) = text.strip_prefix("ip_prefix:") {
        let mut parts = bits.split(':');
        let v4: u8 = parts.next().and_then(|b| b.parse().ok()).ok_or_else(bad)?;
        let v6: u8 = match parts.next() {
            Some(b) => b.parse().map_err(|_| bad())?,
            None => 64,
        };
        if parts.next().is_some() || v4 > 32 || v6 > 128 {
            return Err(bad());
        }
        return Ok(RateKey::IpPrefix { v4, v6 });
    }
    if let Some(name) = text.strip_prefix("header:") {
        return HeaderName::from_bytes(name.as_bytes())
            .map(RateKey::Header)
            .map_err(|_| format!("\"{name}\" is not a header name"));
    }
    if let Some(name) = text.strip_prefix("cookie:") {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'=' && b != b';') {
            return Err(format!("\"{name}\" is not a cookie name"));
        }
        return Ok(RateKey::Cookie(name.to_owned()));
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("100/s"), Ok((100, Duration::from_secs(1))));
        assert_eq!(parse_rate("6000/min"), Ok((6000, Duration::from_secs(60))));
        assert_eq!(parse_rate(" 20 / h "), Ok((20, Duration::from_secs(3600))));
        for bad in [
            "",
            "100",
            "/s",
            "0/s",
            "-1/s",
            "1.5/s",
            "10/day",
            "99999999999/s",
            "ten/s",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn byte_rates_parse() {
        assert_eq!(parse_byte_rate("1KiB/s"), Ok(1024));
        assert_eq!(parse_byte_rate("500/s"), Ok(500));
        for bad in ["", "1KiB", "0/s", "fast/s", "-1/s", "1KiB/min"] {
            assert!(parse_byte_rate(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn keys_parse() {
        assert_eq!(parse_key("ip_prefix:24"), Ok(RateKey::IpPrefix { v4: 24, v6: 64 }));
        assert_eq!(parse_key("ip_prefix:16:48"), Ok(RateKey::IpPrefix { v4: 16, v6: 48 }));
        assert_eq!(
            parse_key("header:x-api-key"),
            Ok(RateKey::Header(HeaderName::from_static("x-api-key")))
        );
        assert_eq!(parse_key("cookie:session"), Ok(RateKey::Cookie("session".into())));
        for bad in [
            "ip_prefix:33",
            "ip_prefix:24:129",
            "ip_prefix:",
            "header:bad name",
            "cookie:",
            "cookie:a=b",
            "ip",
            "ip_prefix:1:2:3",
        ] {
            assert!(parse_key(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        let filter = IpFilter {
            allow: vec![net("10.0.0.0/8"), net("2001:db8::/32")],
            deny: vec![net("10.0.0.66/32")],
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(filter.permits(ip("10.1.2.3")));
        assert!(!filter.permits(ip("10.0.0.66")));
        assert!(!filter.permits(ip("192.0.2.1")));
        assert!(filter.permits(ip("2001:db8::1")));
        assert!(
            filter.permits(ip("::ffff:10.1.2.3")),
            "IPv4-mapped IPv6 is the IPv4 address"
        );
        assert!(IpFilter::default().permits(ip("192.0.2.1")));
    }
}
