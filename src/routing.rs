//! Host and path matching: pure, no I/O, built once per config snapshot.
//!
//! Precedence, most specific first:
//! 1. host: an exact host beats the longest matching `*.suffix` wildcard,
//!    which beats routes without a host;
//! 2. within a host, an exact path beats the longest matching prefix.
//!
//! If the most specific host has no route for the path, the next less
//! specific host is tried, so a catch-all route still catches. A prefix
//! matches on segment boundaries: `/api` matches `/api` and `/api/x` but not
//! `/apix`; a prefix ending in `/` matches anything below it.

use std::collections::HashMap;

use crate::config::{HostPattern, PathMatch, RouteConfig};

/// Routes of one host pattern, ordered for lookup.
#[derive(Debug, Default)]
struct PathTable {
    exact: HashMap<Box<str>, usize>,
    /// Longest prefix first.
    prefixes: Vec<(Box<str>, usize)>,
}

impl PathTable {
    fn insert(&mut self, path: &str, kind: PathMatch, route: usize) {
        match kind {
            PathMatch::Exact => {
                self.exact.entry(path.into()).or_insert(route);
            }
            PathMatch::Prefix => {
                if !self.prefixes.iter().any(|(p, _)| &**p == path) {
                    self.prefixes.push((path.into(), route));
                }
            }
        }
    }

    fn finish(&mut self) {
        // Stable sort keeps declaration order among equal lengths.
        self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    }

    fn lookup(&self, path: &str) -> Option<usize> {
        if let Some(&route) = self.exact.get(path) {
            return Some(route);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|&(_, route)| route)
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// Segment-aware prefix match.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The routing table of one snapshot.
#[derive(Debug, Default)]
pub struct Router {
    exact_hosts: HashMap<Box<str>, PathTable>,
    /// `(".example.com", table)`, longest suffix first.
    wildcard_hosts: Vec<(Box<str>, PathTable)>,
    any_host: PathTable,
    /// Paths compared without ASCII case (`server.path_case`), for origins
    /// that serve `/ADMIN/x` as `/admin/x` (Express, ASP.NET, IIS).
    case_insensitive: bool,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        Self::with_case(routes, false)
    }

    /// A router that compares paths without ASCII case when
    /// `case_insensitive`.
    pub fn with_case(routes: &[RouteConfig], case_insensitive: bool) -> Router {
        let mut router = Router {
            case_insensitive,
            ..Router::default()
        };
        for (index, route) in routes.iter().enumerate() {
            let path = if case_insensitive {
                std::borrow::Cow::Owned(route.path.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(route.path.as_str())
            };
            if route.hosts.is_empty() {
                router.any_host.insert(&path, route.path_match, index);
            }
            for host in &route.hosts {
                let table = match host {
                    HostPattern::Exact(name) => router.exact_hosts.entry(name.as_str().into()).or_default(),
                    HostPattern::Wildcard(suffix) => {
                        match router.wildcard_hosts.iter().position(|(s, _)| **s == **suffix) {
                            Some(i) => &mut router.wildcard_hosts[i].1,
                            None => {
                                router
                                    .wildcard_hosts
                                    .push((suffix.as_str().into(), PathTable::default()));
                                let last = router.wildcard_hosts.len() - 1;
                                &mut router.wildcard_hosts[last].1
                            }
                        }
                    }
                };
                table.insert(&path, route.path_match, index);
            }
        }
        router.exact_hosts.values_mut().for_each(PathTable::finish);
        router.wildcard_hosts.iter_mut().for_each(|(_, t)| t.finish());
        router.wildcard_hosts.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        router.any_host.finish();
        router
    }

    /// Finds the route index for a request. `host` is the raw `Host` /
    /// `:authority` value (port and case are normalized here).
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let lowered;
        let path = if self.case_insensitive && path.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = path.to_ascii_lowercase();
            lowered.as_str()
        } else {
            path
        };
        if let Some(host) = host.and_then(normalize_host) {
            let host = host.as_ref();
            if !self.exact_hosts.is_empty() {
                if let Some(r) = self.exact_hosts.get(host).and_then(|t| t.lookup(path)) {
                    return Some(r);
                }
            }
            for (suffix, table) in &self.wildcard_hosts {
                // `*.example.com` needs at least one label before the suffix.
                if host.len() > suffix.len() && host.ends_with(&**suffix) {
                    if let Some(r) = table.lookup(path) {
                        return Some(r);
                    }
                }
            }
        }
        if self.any_host.is_empty() {
            return None;
        }
        self.any_host.lookup(path)
    }
}

/// Strips the port and a trailing dot and lowercases, borrowing when the host
/// is already in normal form (the common case).
fn normalize_host(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let without_port = if raw.starts_with('[') {
        // [v6]:port
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => return None,
        }
    } else {
        match raw.rfind(':') {
            Some(colon) => &raw[..colon],
            None => raw,
        }
    };
    let host = without_port.strip_suffix('.').unwrap_or(without_port);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderEdits;

    fn route(hosts: &[&str], path: &str, kind: PathMatch) -> RouteConfig {
        RouteConfig {
            name: String::new(),
            hosts: hosts
                .iter()
                .map(|h| match h.strip_prefix('*') {
                    Some(suffix) => HostPattern::Wildcard(suffix.to_owned()),
                    None => HostPattern::Exact((*h).to_owned()),
                })
                .collect(),
            path: path.to_owned(),
            path_match: kind,
            upstream: 0,
            rewrite_prefix: None,
            preserve_host: true,
            allow_connect: false,
            raw_path: false,
            request_headers: HeaderEdits::default(),
            response_headers: HeaderEdits::default(),
            log_sample: 1,
            ip_filter: Default::default(),
            rate_limit: None,
            challenge: Default::default(),
            cache: None,
        }
    }

    #[test]
    fn precedence_table() {
        use PathMatch::*;
        let routes = vec![
            route(&[], "/", Prefix),                        // 0
            route(&[], "/api", Prefix),                     // 1
            route(&[], "/api/health", Exact),               // 2
            route(&["example.com"], "/", Prefix),           // 3
            route(&["*.example.com"], "/", Prefix),         // 4
            route(&["*.eu.example.com"], "/", Prefix),      // 5
            route(&["example.com"], "/static/", Prefix),    // 6
            route(&["*.example.com"], "/only-wild", Exact), // 7
        ];
        let router = Router::new(&routes);
        let cases: &[(Option<&str>, &str, Option<usize>)] = &[
            (None, "/", Some(0)),
            (None, "/api", Some(1)),
            (None, "/api/v1", Some(1)),
            (None, "/apix", Some(0)),
            (None, "/api/health", Some(2)),
            (None, "/api/health/x", Some(1)),
            (Some("example.com"), "/x", Some(3)),
            (Some("EXAMPLE.com:8080"), "/x", Some(3)),
            (Some("example.com."), "/static/a.css", Some(6)),
            (Some("example.com"), "/static", Some(3)),
            (Some("www.example.com"), "/x", Some(4)),
            (Some("a.b.example.com"), "/x", Some(4)),
            (Some("x.eu.example.com"), "/x", Some(5)),
            (Some("eu.example.com"), "/x", Some(4)),
            (Some("other.org"), "/api/x", Some(1)),
            (Some("[::1]:8080"), "/", Some(0)),
            (Some("www.example.com"), "/only-wild", Some(7)),
            (Some(""), "/", Some(0)),
        ];
        for (host, path, want) in cases {
            assert_eq!(router.route(*host, path), *want, "host {host:?} path {path}");
        }
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let router = Router::new(&[route(&["example.com"], "/app", PathMatch::Prefix)]);
        assert_eq!(router.route(Some("example.com"), "/other"), None);
        assert_eq!(router.route(Some("other.com"), "/app"), None);
        assert_eq!(router.route(Some("example.com"), "/app/1"), Some(0));
    }

    #[test]
    fn paths_can_be_compared_without_case() {
        let routes = vec![
            route(&[], "/", PathMatch::Prefix),
            route(&[], "/Admin/", PathMatch::Prefix),
            route(&[], "/login", PathMatch::Exact),
        ];
        let sensitive = Router::new(&routes);
        assert_eq!(sensitive.route(None, "/ADMIN/x"), Some(0));
        let insensitive = Router::with_case(&routes, true);
        for (path, want) in [
            ("/ADMIN/x", 1),
            ("/admin/x", 1),
            ("/Admin/x", 1),
            ("/LOGIN", 2),
            ("/other", 0),
        ] {
            assert_eq!(insensitive.route(None, path), Some(want), "{path}");
        }
    }

    #[test]
    fn prefix_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(prefix_matches("/", "/anything"));
    }
}
