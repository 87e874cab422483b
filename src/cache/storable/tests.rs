//! Tests of what a shared cache may store and which fields it keeps (RFC 9111 section 3), as tables.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use http::HeaderValue;

use super::*;
use crate::cache::control::ControlSource;
use crate::cache::testutil::headers;

type Pairs<'a> = &'a [(&'a str, &'a str)];
type Case<'a> = (Method, Pairs<'a>, u16, Pairs<'a>, StoreSettings, Result<(), NotStored>);

/// RFC 9111 section 3 for a shared cache, one condition per case.
#[test]
fn storable_table_section_3() {
    use NotStored as N;
    let on = StoreSettings::default();
    let off = StoreSettings { heuristic: false };
    let auth: Pairs<'_> = &[("authorization", "Bearer x")];
    let cases: &[Case<'_>] = &[
        (Method::GET, &[], 200, &[("cache-control", "max-age=60")], on, Ok(())),
        // Method: only GET responses are stored.
        (
            Method::HEAD,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Method),
        ),
        (
            Method::POST,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Method),
        ),
        // Status: final, not partial, not 304.
        (
            Method::GET,
            &[],
            100,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Status),
        ),
        (
            Method::GET,
            &[],
            103,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Status),
        ),
        (
            Method::GET,
            &[],
            206,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Status),
        ),
        (
            Method::GET,
            &[],
            304,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Status),
        ),
        // Freshness: explicit, or a heuristically cacheable status (or
        // public) with a validator; never nothing at all.
        (Method::GET, &[], 200, &[], on, Err(N::NoFreshness)),
        (Method::GET, &[], 404, &[], on, Err(N::NoFreshness)),
        (Method::GET, &[], 200, &[("etag", "\"a\"")], on, Ok(())),
        (
            Method::GET,
            &[],
            404,
            &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")],
            on,
            Ok(()),
        ),
        (Method::GET, &[], 200, &[("etag", "\"a\"")], off, Err(N::NoFreshness)),
        (Method::GET, &[], 200, &[], off, Err(N::NoFreshness)),
        (Method::GET, &[], 302, &[], on, Err(N::NoFreshness)),
        (Method::GET, &[], 500, &[], on, Err(N::NoFreshness)),
        (Method::GET, &[], 302, &[("cache-control", "max-age=60")], off, Ok(())),
        (Method::GET, &[], 500, &[("cache-control", "s-maxage=5")], off, Ok(())),
        (
            Method::GET,
            &[],
            302,
            &[("expires", "Sun, 06 Nov 1994 08:49:37 GMT")],
            off,
            Ok(()),
        ),
        // An invalid Expires is still explicit (already expired, section 5.3).
        (Method::GET, &[], 302, &[("expires", "0")], off, Ok(())),
        (Method::GET, &[], 302, &[("cache-control", "max-age=abc")], off, Ok(())),
        (
            Method::GET,
            &[],
            302,
            &[("cache-control", "public")],
            on,
            Err(N::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            302,
            &[("cache-control", "public"), ("etag", "\"a\"")],
            on,
            Ok(()),
        ),
        (
            Method::GET,
            &[],
            302,
            &[("cache-control", "public")],
            off,
            Err(N::NoFreshness),
        ),
        // no-store in the request (section 5.2.1.5) or response (5.2.2.5).
        (
            Method::GET,
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::NoStore),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-store, max-age=60")],
            on,
            Err(N::NoStore),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("cache-control", "No-Store")],
            on,
            Err(N::NoStore),
        ),
        // Section 5.2.2.3: must-understand overrides no-store for a status
        // the cache implements, and forbids storage otherwise.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "must-understand, no-store, max-age=60")],
            on,
            Ok(()),
        ),
        (
            Method::GET,
            &[],
            299,
            &[("cache-control", "must-understand, no-store, max-age=60")],
            on,
            Err(N::MustUnderstand),
        ),
        (
            Method::GET,
            &[],
            299,
            &[("cache-control", "must-understand, max-age=60")],
            on,
            Err(N::MustUnderstand),
        ),
        (Method::GET, &[], 299, &[("cache-control", "max-age=60")], on, Ok(())),
        // Section 5.2.2.7: a shared cache does not store private responses.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "private, max-age=60")],
            on,
            Err(N::Private),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "private=\"x\", private")],
            on,
            Err(N::Private),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "private=\"set-cookie\", max-age=60")],
            on,
            Ok(()),
        ),
        // Section 3.5: Authorization needs public, s-maxage or must-revalidate.
        (
            Method::GET,
            auth,
            200,
            &[("cache-control", "max-age=60")],
            on,
            Err(N::Authorization),
        ),
        (Method::GET, auth, 200, &[], on, Err(N::Authorization)),
        (
            Method::GET,
            auth,
            200,
            &[("cache-control", "public, max-age=60")],
            on,
            Ok(()),
        ),
        (Method::GET, auth, 200, &[("cache-control", "s-maxage=60")], on, Ok(())),
        (
            Method::GET,
            auth,
            200,
            &[("cache-control", "must-revalidate, max-age=60")],
            on,
            Ok(()),
        ),
        (
            Method::GET,
            auth,
            200,
            &[("cache-control", "proxy-revalidate, max-age=60")],
            on,
            Err(N::Authorization),
        ),
        (
            Method::GET,
            auth,
            200,
            &[("cache-control", "s-maxage=60, s-maxage=30")],
            on,
            Err(N::Authorization),
        ),
        (
            Method::GET,
            auth,
            200,
            &[("cache-control", "s-maxage=x")],
            on,
            Err(N::Authorization),
        ),
        // Section 4.1: Vary: * never matches, so it is not worth storing.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "*")],
            on,
            Err(N::VaryAny),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept")],
            on,
            Ok(()),
        ),
        // RFC 9213 section 2.1: a targeted field replaces Cache-Control ...
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")],
            on,
            Ok(()),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("cdn-cache-control", "no-store")],
            on,
            Err(N::NoStore),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "public"), ("portcullis-cache-control", "private")],
            on,
            Err(N::Private),
        ),
        // ... and Expires.
        (
            Method::GET,
            &[],
            302,
            &[
                ("expires", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("cdn-cache-control", "must-revalidate"),
            ],
            on,
            Err(N::NoFreshness),
        ),
        // ... unless it fails to parse.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60,")],
            on,
            Err(N::NoStore),
        ),
    ];
    for (method, request, status, response, settings, expected) in cases {
        let status = StatusCode::from_u16(*status).unwrap();
        let got = storable(method, &headers(request), status, &headers(response), settings).map(|_| ());
        assert_eq!(
            got, *expected,
            "{method} {request:?} {status} {response:?} {settings:?}"
        );
    }
}

#[test]
fn storable_carries_control_vary_and_omitted_fields() {
    let response = headers(&[
        ("cdn-cache-control", "max-age=60, private=\"set-cookie\""),
        ("set-cookie", "a=b"),
        ("vary", "Accept-Encoding"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("content-type", "text/plain"),
    ]);
    let stored = storable(
        &Method::GET,
        &headers(&[]),
        StatusCode::OK,
        &response,
        &StoreSettings::default(),
    )
    .unwrap();
    assert_eq!(stored.control.source, ControlSource::Cdn);
    assert_eq!(stored.control.directives.max_age, Some(60));
    assert_eq!(
        stored.vary,
        Vary::Fields(vec![HeaderName::from_static("accept-encoding")])
    );
    let mut omit: Vec<&str> = stored.omit.iter().map(HeaderName::as_str).collect();
    omit.sort_unstable();
    assert_eq!(omit, ["connection", "set-cookie", "x-hop"]);
}

#[test]
fn cache_status_details_rfc_9211() {
    let cases = [
        (NotStored::Method, "method"),
        (NotStored::Status, "status"),
        (NotStored::NoStore, "no-store"),
        (NotStored::Private, "private"),
        (NotStored::Authorization, "authorization"),
        (NotStored::MustUnderstand, "must-understand"),
        (NotStored::VaryAny, "vary-star"),
        (NotStored::NoFreshness, "no-freshness"),
    ];
    for (reason, detail) in cases {
        assert_eq!(reason.detail(), detail);
        // A detail is a token, so it can go into the field unquoted.
        assert!(detail.bytes().all(crate::cache::control::is_tchar), "{detail}");
        assert!(!reason.to_string().is_empty());
    }
}

/// Section 3.1: hop-by-hop and Connection-listed fields, proxy
/// authentication fields, and qualified no-cache / private fields.
#[test]
fn fields_not_stored_section_3_1() {
    let cases: &[(Pairs<'_>, &[&str])] = &[
        (&[("content-type", "text/plain"), ("etag", "\"a\"")], &[]),
        (
            &[
                ("connection", "close, X-Hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
                ("te", "trailers"),
                ("proxy-connection", "keep-alive"),
                ("content-type", "text/plain"),
            ],
            &[
                "connection",
                "keep-alive",
                "proxy-connection",
                "te",
                "transfer-encoding",
                "upgrade",
                "x-hop",
            ],
        ),
        (
            &[
                ("proxy-authenticate", "Basic"),
                ("proxy-authentication-info", "x"),
                ("www-authenticate", "Basic"),
            ],
            &["proxy-authenticate", "proxy-authentication-info"],
        ),
        (
            &[
                ("cache-control", "no-cache=\"set-cookie, x-foo\", private=\"x-user\""),
                ("set-cookie", "a=b"),
                ("x-user", "u"),
                ("x-other", "o"),
            ],
            &["set-cookie", "x-user"],
        ),
        // Unqualified directives name no fields; junk in Connection is skipped.
        (
            &[
                ("cache-control", "no-cache, private"),
                ("connection", "a b, , x-hop"),
                ("set-cookie", "a=b"),
            ],
            &["connection"],
        ),
    ];
    for (pairs, expected) in cases {
        let map = headers(pairs);
        let control = response_control(&map);
        let mut got: Vec<&str> = Vec::new();
        let names = fields_not_stored(&map, &control.directives);
        got.extend(names.iter().map(HeaderName::as_str));
        got.sort_unstable();
        assert_eq!(got, *expected, "{pairs:?}");
    }
}

fn values<'a>(map: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    map.get_all(name).iter().map(|v| v.to_str().unwrap()).collect()
}

/// Section 3.2: a 304's fields replace the stored ones, except the
/// excluded ones and Content-Length.
#[test]
fn update_from_304_section_3_2() {
    let mut stored = headers(&[
        ("content-length", "10"),
        ("etag", "\"a\""),
        ("cache-control", "max-age=60"),
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("link", "</a>"),
        ("link", "</b>"),
        ("set-cookie", "s=1"),
        ("x-old", "kept"),
    ]);
    let not_modified = headers(&[
        ("content-length", "0"),
        ("content-range", "bytes */10"),
        ("etag", "\"b\""),
        ("cache-control", "max-age=120, no-cache=\"set-cookie\""),
        ("date", "Sun, 06 Nov 1994 09:49:37 GMT"),
        ("link", "</c>"),
        ("x-new", "added"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
    ]);
    update_from_304(&mut stored, &not_modified);
    assert_eq!(values(&stored, "content-length"), ["10"]);
    assert_eq!(values(&stored, "content-range"), Vec::<&str>::new());
    assert_eq!(values(&stored, "etag"), ["\"b\""]);
    assert_eq!(
        values(&stored, "cache-control"),
        ["max-age=120, no-cache=\"set-cookie\""]
    );
    assert_eq!(values(&stored, "date"), ["Sun, 06 Nov 1994 09:49:37 GMT"]);
    assert_eq!(values(&stored, "link"), ["</c>"]);
    assert_eq!(values(&stored, "x-old"), ["kept"]);
    assert_eq!(values(&stored, "x-new"), ["added"]);
    // The updated no-cache="set-cookie" withdraws the stored cookie.
    assert!(!stored.contains_key("set-cookie"));
    for hop in ["connection", "x-hop", "keep-alive"] {
        assert!(!stored.contains_key(hop), "{hop}");
    }
}

#[test]
fn update_from_304_keeps_multi_line_values() {
    let mut stored = headers(&[("vary", "accept")]);
    let mut not_modified = HeaderMap::new();
    not_modified.append("vary", HeaderValue::from_static("accept"));
    not_modified.append("vary", HeaderValue::from_static("accept-encoding"));
    update_from_304(&mut stored, &not_modified);
    assert_eq!(values(&stored, "vary"), ["accept", "accept-encoding"]);
}
