//! `[[routes]]`: host and path matching, rewrites, header edits and each
//! route's protection and cache settings; the model and its reading.

use std::collections::HashMap;
use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use toml::Value;

use super::protect;
use super::reader::{Errors, Table};
use super::upstreams::UpstreamConfig;
use super::{ChallengeWhen, IpFilter, RateLimitConfig, RouteCache};

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

#[derive(Debug, Clone, Default, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
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

#[allow(
    clippy::too_many_lines,
    reason = "reads one [[routes]] table key by key, in the order docs/config.md lists them"
)]
pub(super) fn read_routes(top: &Table<'_>, upstreams: &[UpstreamConfig], errors: &Errors) -> Vec<RouteConfig> {
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
    // route name -> first route index.
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(t) = Table::new(item, path.clone(), errors) else {
            continue;
        };
        let name = t.str("name").map_or_else(|| path.clone(), str::to_owned);
        if let Some(first) = names.insert(name.clone(), i) {
            t.error(
                "name",
                format!(
                    "\"{name}\" is also the name of routes[{first}]: route names must be unique (logs, metrics and reloads refer to a route by its name)"
                ),
            );
        }

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

pub(super) fn read_header_edits(table: Option<Table<'_>>) -> HeaderEdits {
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
