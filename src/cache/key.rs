//! The primary cache key: method-independent (RFC 9111 section 2: a HEAD
//! is answered from a stored GET), `scheme://host/path?query`, with the
//! route's query options applied and the configured request fields and
//! cookies appended after a newline (a byte no URI holds), so a purge by
//! URL or URL prefix still finds every entry of a URL.

use http::{HeaderMap, Uri};

use crate::config::{QueryKey, RouteCache};

/// Separates the URL part of a key from the extra parts.
pub const EXTRA_SEPARATOR: char = '\n';

/// The URL part of a key: `scheme://host` (host lower-cased) + path +
/// query as the route's options shape it.
pub fn url_key(scheme: &str, host: &str, uri: &Uri, options: &RouteCache) -> String {
    let path = uri.path();
    let mut key = String::with_capacity(scheme.len() + host.len() + path.len() + 24);
    key.push_str(scheme);
    key.push_str("://");
    for c in host.chars() {
        key.push(c.to_ascii_lowercase());
    }
    key.push_str(if path.is_empty() { "/" } else { path });
    let Some(query) = uri.query() else {
        return key;
    };
    let kept = |param: &&str| {
        let name = param.split_once('=').map_or(*param, |(n, _)| n);
        !param.is_empty() && !options.ignore_params.iter().any(|p| p == name)
    };
    match options.query {
        QueryKey::Ignore => {}
        QueryKey::Keep if options.ignore_params.is_empty() => {
            key.push('?');
            key.push_str(query);
        }
        QueryKey::Keep => push_params(&mut key, query.split('&').filter(kept)),
        QueryKey::Sort => {
            let mut params: Vec<&str> = query.split('&').filter(kept).collect();
            params.sort_unstable();
            push_params(&mut key, params.into_iter());
        }
    }
    key
}

/// The request target without the query parameters the key leaves out
/// (all of them with `query = "ignore"`); `None` when nothing changes.
pub fn strip_unkeyed(uri: &Uri, options: &RouteCache) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = match options.query {
        QueryKey::Ignore => Vec::new(),
        _ if options.ignore_params.is_empty() => return None,
        _ => query
            .split('&')
            .filter(|param| {
                let name = param.split_once('=').map_or(*param, |(n, _)| n);
                !options.ignore_params.iter().any(|p| p == name)
            })
            .collect(),
    };
    let mut target = uri.path().to_owned();
    if !kept.is_empty() {
        target.push('?');
        target.push_str(&kept.join("&"));
    }
    if target.len() == uri.path().len() + 1 + query.len() {
        return None;
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().ok()?);
    Uri::from_parts(parts).ok()
}

fn push_params<'a>(key: &mut String, params: impl Iterator<Item = &'a str>) {
    let mut first = true;
    for param in params {
        key.push(if first { '?' } else { '&' });
        key.push_str(param);
        first = false;
    }
}

/// The whole primary key: the URL part, then each configured header and
/// cookie value (absent ones as an empty value).
pub fn primary_key(url: String, headers: &HeaderMap, options: &RouteCache) -> String {
    if options.key_headers.is_empty() && options.key_cookies.is_empty() {
        return url;
    }
    let mut key = url;
    key.push(EXTRA_SEPARATOR);
    for name in &options.key_headers {
        key.push_str(name.as_str());
        key.push(':');
        let mut first = true;
        for value in headers.get_all(name) {
            if !first {
                key.push(',');
            }
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
            first = false;
        }
        key.push(EXTRA_SEPARATOR);
    }
    for name in &options.key_cookies {
        key.push_str("cookie:");
        key.push_str(name);
        key.push('=');
        if let Some(value) = cookie(headers, name) {
            key.push_str(value);
        }
        key.push(EXTRA_SEPARATOR);
    }
    key
}

/// The first value of cookie `name` in the request's `Cookie` fields.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then_some(v)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn options(query: QueryKey, ignore: &[&str]) -> RouteCache {
        RouteCache {
            query,
            ignore_params: ignore.iter().map(|s| (*s).to_owned()).collect(),
            ..RouteCache::default()
        }
    }

    #[test]
    fn url_keys_follow_the_query_options() {
        let cases: &[(QueryKey, &[&str], &str, &str)] = &[
            (QueryKey::Keep, &[], "/a?b=2&a=1", "http://example.com/a?b=2&a=1"),
            (QueryKey::Sort, &[], "/a?b=2&a=1", "http://example.com/a?a=1&b=2"),
            (QueryKey::Ignore, &[], "/a?b=2&a=1", "http://example.com/a"),
            (
                QueryKey::Keep,
                &["utm_source"],
                "/a?utm_source=x&b=2",
                "http://example.com/a?b=2",
            ),
            (QueryKey::Sort, &["utm"], "/a?z&utm=1&&a", "http://example.com/a?a&z"),
            (QueryKey::Keep, &["a"], "/a?a=1", "http://example.com/a"),
            (QueryKey::Keep, &[], "/", "http://example.com/"),
        ];
        for (query, ignore, target, want) in cases {
            let uri: Uri = target.parse().expect("uri");
            assert_eq!(
                url_key("http", "Example.COM", &uri, &options(*query, ignore)),
                *want,
                "{target} with {query:?} {ignore:?}"
            );
        }
    }

    #[test]
    fn unkeyed_parameters_are_stripped_from_the_target() {
        let cases: &[(QueryKey, &[&str], &str, Option<&str>)] = &[
            (QueryKey::Keep, &[], "/a?x=1", None),
            (QueryKey::Sort, &[], "/a?x=1", None),
            (QueryKey::Ignore, &[], "/a?x=1", Some("/a")),
            (QueryKey::Ignore, &[], "/a", None),
            (QueryKey::Keep, &["utm"], "/a?utm=1&b=2&utm=3", Some("/a?b=2")),
            (QueryKey::Keep, &["utm"], "/a?b=2", None),
            (QueryKey::Sort, &["utm"], "/a?utm=%3Cscript%3E", Some("/a")),
        ];
        for (query, ignore, target, want) in cases {
            let uri: Uri = target.parse().expect("uri");
            let got = strip_unkeyed(&uri, &options(*query, ignore));
            assert_eq!(got.as_ref().map(|u| u.to_string()), want.map(str::to_owned), "{target}");
        }
    }

    #[test]
    fn configured_headers_and_cookies_extend_the_key() {
        let mut o = RouteCache::default();
        o.key_headers.push(http::HeaderName::from_static("x-tenant"));
        o.key_cookies.push("lang".into());
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_static("acme"));
        h.insert("cookie", HeaderValue::from_static("session=1; lang=fr"));
        let a = primary_key("http://h/x".into(), &h, &o);
        assert_eq!(a, "http://h/x\nx-tenant:acme\ncookie:lang=fr\n");
        h.insert("cookie", HeaderValue::from_static("lang=de"));
        let b = primary_key("http://h/x".into(), &h, &o);
        assert_ne!(a, b);
        assert!(b.starts_with("http://h/x\n"), "a purge of the URL finds it");
        let plain = primary_key("http://h/x".into(), &h, &RouteCache::default());
        assert_eq!(plain, "http://h/x");
    }
}
