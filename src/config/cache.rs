//! `[cache]` (the shared store) and each route's `cache` (`true`, or a
//! table of key and serving options). See docs/caching.md.

use std::time::Duration;

use http::HeaderName;

use super::defaults;
use super::reader::Table;

/// `[cache]`: the one in-memory store every caching route shares.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Byte budget of the store (bodies, fields and per-entry overhead).
    pub memory: u64,
    /// Responses larger than this stream through without being stored; at
    /// most half of `memory`.
    pub max_object_size: u64,
    /// How long a request waits for another request fetching the same key
    /// before it goes to the origin itself.
    pub lock_timeout: Duration,
    /// Heuristic freshness: this share of the time since `Last-Modified`...
    pub heuristic_fraction: f64,
    /// ...capped at this.
    pub heuristic_max: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory: defaults::CACHE_MEMORY,
            max_object_size: defaults::CACHE_MAX_OBJECT_SIZE,
            lock_timeout: defaults::CACHE_LOCK_TIMEOUT,
            heuristic_fraction: defaults::CACHE_HEURISTIC_FRACTION,
            heuristic_max: defaults::CACHE_HEURISTIC_MAX,
        }
    }
}

/// What part of the query string goes into the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKey {
    /// As the client sent it.
    Keep,
    /// Parameters sorted, so `?a=1&b=2` and `?b=2&a=1` share an entry.
    Sort,
    /// Not at all: every query shares the path's entry.
    Ignore,
}

/// A route's cache settings; a route without them never caches.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCache {
    pub query: QueryKey,
    /// Query parameters left out of the key (tracking parameters).
    pub ignore_params: Vec<String>,
    /// Request fields added to the key (beside what `Vary` asks for).
    pub key_headers: Vec<HeaderName>,
    /// Cookies added to the key, by name.
    pub key_cookies: Vec<String>,
    /// Serve from cache even when the client sends `no-cache` (or
    /// `Pragma: no-cache`), as if it had not.
    pub ignore_client_no_cache: bool,
    /// A stale response may answer when the origin fails for this long
    /// after it expired, even without `stale-if-error` from the origin.
    pub stale_if_error: Duration,
    /// Pass `Surrogate-Key` / `Cache-Tag` to clients (they are removed by
    /// default: they are for the cache).
    pub expose_tags: bool,
    /// Store responses that set cookies (off by default: one client's
    /// cookie must not be served to another).
    pub store_set_cookie: bool,
    /// How requests with `Cookie` or `Authorization` share the store.
    pub credentials: CredentialsPolicy,
    /// Worked out from `key_headers` at load: the forwarding fields no key
    /// holds, removed from requests to the origin, and whether the trusted
    /// `X-Forwarded-Host` / `Forwarded` are kept (keyed) or replaced.
    pub unkeyed: Vec<HeaderName>,
    pub keyed_forwarded_host: bool,
    pub keyed_forwarded: bool,
}

/// A route's rule for requests that carry credentials (`Cookie`,
/// `Authorization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialsPolicy {
    /// Such a request is answered from the store, and its response
    /// stored for others, only when the origin marked the response for
    /// shared caches (`public`, `s-maxage`, a targeted field) or it varies
    /// on those fields. Origins that personalise a page by cookie rarely
    /// say so; this keeps their pages apart.
    #[default]
    PublicOnly,
    /// RFC 9111 as written: `Authorization` per section 3.5, cookies not
    /// considered.
    Rfc9111,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            query: QueryKey::Keep,
            ignore_params: Vec::new(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            ignore_client_no_cache: false,
            stale_if_error: Duration::ZERO,
            expose_tags: false,
            store_set_cookie: false,
            credentials: CredentialsPolicy::PublicOnly,
            unkeyed: crate::forwarding::UNKEYED_ON_CACHING_ROUTES
                .iter()
                .map(|name| HeaderName::from_static(name))
                .collect(),
            keyed_forwarded_host: false,
            keyed_forwarded: false,
        }
    }
}

pub fn read_cache(table: Option<Table<'_>>) -> CacheConfig {
    let mut c = CacheConfig::default();
    let Some(t) = table else {
        return c;
    };
    if let Some(n) = t.size("memory") {
        if n < 1 << 20 {
            t.error("memory", format!("must be at least 1MiB, found {n} bytes"));
        } else {
            c.memory = n;
        }
    }
    if let Some(n) = t.size("max_object_size") {
        if n == 0 {
            t.error("max_object_size", "must be more than 0");
        } else {
            c.max_object_size = n;
        }
    }
    // A response being stored is held twice while its client is behind:
    // the copy, and the part read ahead for the client.
    if c.max_object_size > c.memory / 2 {
        t.error(
            "max_object_size",
            format!("must be at most half of memory ({} bytes)", c.memory / 2),
        );
    }
    if let Some(d) = t.duration("lock_timeout") {
        if d > Duration::from_secs(60) {
            t.error("lock_timeout", "must be at most 60s");
        } else {
            c.lock_timeout = d;
        }
    }
    if let Some(value) = t.get("heuristic_fraction") {
        match value.as_float().or_else(|| value.as_integer().map(|i| i as f64)) {
            Some(f) if (0.0..=1.0).contains(&f) => c.heuristic_fraction = f,
            Some(f) => t.error("heuristic_fraction", format!("must be between 0 and 1, found {f}")),
            None => t.error(
                "heuristic_fraction",
                format!("expected a number, found {}", value.type_str()),
            ),
        }
    }
    if let Some(d) = t.duration("heuristic_max") {
        c.heuristic_max = d;
    }
    t.finish();
    c
}

/// A route's `cache`: `true` / `false`, or a table (present means on).
pub fn read_route_cache(t: &Table<'_>) -> Option<RouteCache> {
    let value = t.get("cache")?;
    if let Some(on) = value.as_bool() {
        return on.then(RouteCache::default);
    }
    let c = Table::new(value, t.path_of("cache"), t.errors())?;
    let mut out = RouteCache::default();
    if let Some(q) = c.choice(
        "query",
        &[
            ("keep", QueryKey::Keep),
            ("sort", QueryKey::Sort),
            ("ignore", QueryKey::Ignore),
        ],
    ) {
        out.query = q;
    }
    for (path, name) in c.str_or_strs("ignore_params").unwrap_or_default() {
        if name.is_empty() || name.bytes().any(|b| b == b'&' || b == b'=' || b.is_ascii_control()) {
            c.errors().push(
                path,
                format!("\"{}\" is not a query parameter name", name.escape_debug()),
            );
        } else {
            out.ignore_params.push(name.to_owned());
        }
    }
    for (path, name) in c.str_or_strs("key_headers").unwrap_or_default() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => out.key_headers.push(h),
            Err(_) => c
                .errors()
                .push(path, format!("\"{}\" is not a header name", name.escape_debug())),
        }
    }
    for (path, name) in c.str_or_strs("key_cookies").unwrap_or_default() {
        if name.is_empty() || name.bytes().any(|b| b == b'=' || b == b';' || b <= b' ' || b >= 0x7f) {
            c.errors()
                .push(path, format!("\"{}\" is not a cookie name", name.escape_debug()));
        } else {
            out.key_cookies.push(name.to_owned());
        }
    }
    if let Some(b) = c.bool("ignore_client_no_cache") {
        out.ignore_client_no_cache = b;
    }
    if let Some(d) = c.duration("stale_if_error") {
        out.stale_if_error = d;
    }
    if let Some(b) = c.bool("expose_tags") {
        out.expose_tags = b;
    }
    if let Some(b) = c.bool("store_set_cookie") {
        out.store_set_cookie = b;
    }
    if let Some(policy) = c.choice(
        "credentials",
        &[
            ("public-only", CredentialsPolicy::PublicOnly),
            ("rfc9111", CredentialsPolicy::Rfc9111),
        ],
    ) {
        out.credentials = policy;
    }
    c.finish();
    out.unkeyed.retain(|name| !out.key_headers.contains(name));
    out.keyed_forwarded_host = out.key_headers.contains(&crate::forwarding::X_FORWARDED_HOST);
    out.keyed_forwarded = out.key_headers.contains(&crate::forwarding::FORWARDED);
    Some(out)
}
