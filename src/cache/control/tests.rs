//! Tests of the Cache-Control and targeted-field parsers (RFC 9111 section 5.2, RFC 9213), case by case.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use http::HeaderName;
use http::header::CACHE_CONTROL;

use super::*;
use crate::cache::testutil::headers;

fn parse(value: &str) -> CacheControl {
    CacheControl::from_headers(&headers(&[("cache-control", value)]), &CACHE_CONTROL)
}

fn names(list: &[&str]) -> FieldScope {
    FieldScope::Fields(
        list.iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
            .collect(),
    )
}

type Expect = fn(&mut CacheControl);

/// Every directive, well formed and broken, against the struct it yields.
/// References are to RFC 9111 unless noted.
#[test]
fn parse_table_section_5_2() {
    let cases: &[(&str, Expect)] = &[
        ("", |_| {}),
        (",,, ,", |_| {}),
        ("max-age=60", |c| c.max_age = Some(60)),
        // Section 5.2: directive names are case-insensitive.
        ("MAX-AGE=60", |c| c.max_age = Some(60)),
        ("Max-Age=60", |c| c.max_age = Some(60)),
        // Section 5.2: recipients accept the quoted form of a token argument.
        ("max-age=\"60\"", |c| c.max_age = Some(60)),
        // A quoted-pair inside the quoted form is unescaped.
        ("max-age=\"6\\0\"", |c| c.max_age = Some(60)),
        // Section 4.2.1: a repeated directive with another value is stale.
        ("max-age=60, max-age=120", |c| {
            c.max_age = Some(60);
            c.max_age_invalid = true;
        }),
        ("max-age=60, max-age=60", |c| c.max_age = Some(60)),
        // Section 4.2.1: invalid freshness information means stale.
        ("max-age=abc", |c| c.max_age_invalid = true),
        ("max-age=-1", |c| c.max_age_invalid = true),
        ("max-age=+60", |c| c.max_age_invalid = true),
        ("max-age=", |c| c.max_age_invalid = true),
        ("max-age", |c| c.max_age_invalid = true),
        ("max-age=\"\"", |c| c.max_age_invalid = true),
        ("max-age=\" 60\"", |c| c.max_age_invalid = true),
        ("max-age=6.5", |c| c.max_age_invalid = true),
        ("max-age=\"60", |c| c.max_age_invalid = true),
        ("max-age=60 30", |c| c.max_age_invalid = true),
        ("max-age=60;x", |c| c.max_age_invalid = true),
        ("max-age=\"60\"junk", |c| c.max_age_invalid = true),
        ("max-age=abc, max-age=60", |c| {
            c.max_age = Some(60);
            c.max_age_invalid = true;
        }),
        // Section 1.2.2: delta-seconds saturate at 2^31.
        ("max-age=99999999999999999999", |c| c.max_age = Some(DELTA_SECONDS_MAX)),
        ("max-age=2147483647", |c| c.max_age = Some(2_147_483_647)),
        ("max-age=2147483649", |c| c.max_age = Some(DELTA_SECONDS_MAX)),
        ("max-age=007", |c| c.max_age = Some(7)),
        // Whitespace around `=` is not in the grammar but is read anyway.
        ("max-age = 60", |c| c.max_age = Some(60)),
        ("s-maxage=30, max-age=60", |c| {
            c.s_maxage = Some(30);
            c.max_age = Some(60);
        }),
        ("s-maxage=x", |c| c.s_maxage_invalid = true),
        ("s-maxage=10, S-MAXAGE=20", |c| {
            c.s_maxage = Some(10);
            c.s_maxage_invalid = true;
        }),
        // Section 5.2.2.4: no-cache, unqualified and qualified.
        ("no-cache", |c| c.no_cache = FieldScope::Whole),
        ("no-cache=\"set-cookie, x-foo\"", |c| {
            c.no_cache = names(&["set-cookie", "x-foo"])
        }),
        ("no-cache=\"Set-Cookie\"", |c| c.no_cache = names(&["set-cookie"])),
        ("no-cache=set-cookie", |c| c.no_cache = names(&["set-cookie"])),
        ("no-cache=\" set-cookie ,, x-foo ,\"", |c| {
            c.no_cache = names(&["set-cookie", "x-foo"])
        }),
        ("no-cache=\"a\", no-cache=\"b, a\"", |c| c.no_cache = names(&["a", "b"])),
        ("no-cache=\"set-cookie\", no-cache", |c| c.no_cache = FieldScope::Whole),
        ("no-cache, no-cache=\"set-cookie\"", |c| c.no_cache = FieldScope::Whole),
        // An unreadable or empty field list restricts the whole response.
        ("no-cache=\"\"", |c| c.no_cache = FieldScope::Whole),
        ("no-cache=", |c| c.no_cache = FieldScope::Whole),
        ("no-cache=\"a b\"", |c| c.no_cache = FieldScope::Whole),
        ("no-cache=\"a\\\"b\"", |c| c.no_cache = FieldScope::Whole),
        ("no-cache=\"set-cookie", |c| c.no_cache = FieldScope::Whole),
        ("no-cache=\"set-cookie\" x", |c| c.no_cache = FieldScope::Whole),
        // Section 5.2.2.7: private.
        ("private, max-age=60", |c| {
            c.private = FieldScope::Whole;
            c.max_age = Some(60);
        }),
        ("private=\"set-cookie\"", |c| c.private = names(&["set-cookie"])),
        ("PRIVATE=\"x-user\", public", |c| {
            c.private = names(&["x-user"]);
            c.public = true;
        }),
        ("public", |c| c.public = true),
        // A permission with an argument is malformed and not granted.
        ("public=yes", |_| {}),
        ("public max-age=60", |_| {}),
        ("immutable=1, must-understand=1", |_| {}),
        // A restriction counts however it is written.
        ("no-store", |c| c.no_store = true),
        ("no-store=1", |c| c.no_store = true),
        ("no-store foo", |c| c.no_store = true),
        ("must-revalidate, proxy-revalidate", |c| {
            c.must_revalidate = true;
            c.proxy_revalidate = true;
        }),
        ("must-understand, no-store", |c| {
            c.must_understand = true;
            c.no_store = true;
        }),
        ("immutable, no-transform", |c| {
            c.immutable = true;
            c.no_transform = true;
        }),
        // RFC 5861.
        ("stale-while-revalidate=30, stale-if-error=600", |c| {
            c.stale_while_revalidate = Some(30);
            c.stale_if_error = Some(600);
        }),
        ("stale-while-revalidate=30, stale-while-revalidate=10", |c| {
            c.stale_while_revalidate = Some(10)
        }),
        ("stale-while-revalidate=abc", |_| {}),
        ("stale-if-error", |_| {}),
        ("stale-if-error=\"60\"", |c| c.stale_if_error = Some(60)),
        // Section 5.2.1: request directives.
        ("max-stale", |c| c.max_stale = Some(None)),
        ("max-stale=60", |c| c.max_stale = Some(Some(60))),
        ("max-stale=60, max-stale", |c| c.max_stale = Some(Some(60))),
        ("max-stale, max-stale=60, max-stale=30", |c| {
            c.max_stale = Some(Some(30))
        }),
        ("max-stale=abc", |_| {}),
        ("max-stale=", |_| {}),
        ("min-fresh=10, min-fresh=20", |c| c.min_fresh = Some(20)),
        ("min-fresh=x", |_| {}),
        ("only-if-cached", |c| c.only_if_cached = true),
        // Stray separators and garbage elements are skipped (RFC 9110
        // section 5.6.1 allows empty list elements).
        (", max-age=60,, ,public,", |c| {
            c.max_age = Some(60);
            c.public = true;
        }),
        ("=60, public", |c| c.public = true),
        ("\"quoted\", public", |c| c.public = true),
        ("\"a,b\", public", |c| c.public = true),
        ("x-ext, public, x-other=\"v, w\"", |c| c.public = true),
        ("foo=\"a,b\", max-age=5", |c| c.max_age = Some(5)),
        // An unterminated quote swallows the rest of the line.
        ("foo=\"unterminated, max-age=5", |_| {}),
        ("\u{00ff}, public", |c| c.public = true),
        ("max-age=60\t,\tpublic", |c| {
            c.max_age = Some(60);
            c.public = true;
        }),
    ];
    for (input, expect) in cases {
        let mut expected = CacheControl::default();
        expect(&mut expected);
        assert_eq!(parse(input), expected, "Cache-Control: {input}");
    }
}

/// RFC 9110 section 5.3: field lines combine into one list.
#[test]
fn field_lines_combine() {
    let cases: &[(&[&str], Expect)] = &[
        (&["max-age=60", "private"], |c| {
            c.max_age = Some(60);
            c.private = FieldScope::Whole;
        }),
        (&["max-age=60", "max-age=30"], |c| {
            c.max_age = Some(60);
            c.max_age_invalid = true;
        }),
        // An unterminated quote does not reach into the next line.
        (&["no-cache=\"x", "public"], |c| {
            c.no_cache = FieldScope::Whole;
            c.public = true;
        }),
    ];
    for (lines, expect) in cases {
        let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("cache-control", *l)).collect();
        let mut expected = CacheControl::default();
        expect(&mut expected);
        assert_eq!(
            CacheControl::from_headers(&headers(&pairs), &CACHE_CONTROL),
            expected,
            "{lines:?}"
        );
    }
}

#[test]
fn delta_seconds_section_1_2_2() {
    let cases: &[(&[u8], Option<u64>)] = &[
        (b"0", Some(0)),
        (b"60", Some(60)),
        (b"2147483648", Some(DELTA_SECONDS_MAX)),
        (b"2147483649", Some(DELTA_SECONDS_MAX)),
        (b"18446744073709551616", Some(DELTA_SECONDS_MAX)),
        (b"99999999999999999999x", None),
        (b"", None),
        (b"-1", None),
        (b" 1", None),
        (b"1 ", None),
        (b"1e3", None),
        (b"\xd9\xa1", None),
    ];
    for (input, expected) in cases {
        assert_eq!(
            parse_delta_seconds(input),
            *expected,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn pragma_no_cache_only_without_cache_control_section_5_4() {
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[("pragma", "no-cache")], true),
        (&[("pragma", "NO-CACHE")], true),
        (&[("pragma", "x-foo, no-cache")], true),
        (&[("pragma", "x-foo")], false),
        (&[("pragma", "no-cache"), ("cache-control", "max-age=10")], false),
        // A Cache-Control line, even empty, means the client speaks HTTP/1.1.
        (&[("pragma", "no-cache"), ("cache-control", "")], false),
        // A request no-cache has no argument: a qualified one is plain.
        (&[("cache-control", "no-cache=\"x\"")], true),
        (&[], false),
    ];
    for (pairs, no_cache) in cases {
        let cc = request_control(&headers(pairs));
        assert_eq!(cc.no_cache.is_whole(), *no_cache, "{pairs:?}");
    }
    assert!(pragma_no_cache(&headers(&[("pragma", "no-cache")])));
    assert!(!pragma_no_cache(&headers(&[("pragma", "no-cachex")])));
}

/// RFC 9213 section 2.1: the first valid, non-empty field on the target
/// list wins, and section 2.2: a field that fails to parse as a Structured
/// Field Dictionary is ignored.
#[test]
fn targeted_field_selection_rfc_9213() {
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(Pairs<'_>, ControlSource, Expect)] = &[
        (&[], ControlSource::CacheControl, |_| {}),
        (&[("cache-control", "max-age=10")], ControlSource::CacheControl, |c| {
            c.max_age = Some(10)
        }),
        (
            &[("cache-control", "max-age=10"), ("cdn-cache-control", "max-age=60")],
            ControlSource::Cdn,
            |c| c.max_age = Some(60),
        ),
        (
            &[
                ("cache-control", "max-age=10"),
                ("cdn-cache-control", "max-age=60"),
                ("portcullis-cache-control", "max-age=5"),
            ],
            ControlSource::Portcullis,
            |c| c.max_age = Some(5),
        ),
        // Structured field keys are lower-case only: the field is invalid.
        (
            &[
                ("portcullis-cache-control", "Max-Age=5"),
                ("cdn-cache-control", "max-age=60"),
            ],
            ControlSource::Cdn,
            |c| c.max_age = Some(60),
        ),
        (
            &[("cdn-cache-control", "max-age=60,"), ("cache-control", "max-age=10")],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        (
            &[("cdn-cache-control", ""), ("cache-control", "max-age=10")],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        (
            &[("cdn-cache-control", "   "), ("cache-control", "max-age=10")],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        // Integers have at most 15 digits (RFC 8941 section 3.3.1).
        (
            &[
                ("cdn-cache-control", "max-age=99999999999999999999"),
                ("cache-control", "max-age=10"),
            ],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        (
            &[("cdn-cache-control", "max-age=\"60"), ("cache-control", "max-age=10")],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        (
            &[
                ("cdn-cache-control", "max-age=60 public"),
                ("cache-control", "max-age=10"),
            ],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        (
            &[
                ("cdn-cache-control", "max-age=60, , public"),
                ("cache-control", "max-age=10"),
            ],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        (
            &[
                ("cdn-cache-control", "no-cache=\"a\\b\""),
                ("cache-control", "max-age=10"),
            ],
            ControlSource::CacheControl,
            |c| c.max_age = Some(10),
        ),
        // A repeated key takes its last value (RFC 8941 section 4.2.2).
        (
            &[("cdn-cache-control", "max-age=60, max-age=30")],
            ControlSource::Cdn,
            |c| c.max_age = Some(30),
        ),
        (&[("cdn-cache-control", "max-age=-1")], ControlSource::Cdn, |c| {
            c.max_age_invalid = true
        }),
        (&[("cdn-cache-control", "max-age=1.5")], ControlSource::Cdn, |c| {
            c.max_age_invalid = true
        }),
        (&[("cdn-cache-control", "max-age=\"60\"")], ControlSource::Cdn, |c| {
            c.max_age = Some(60)
        }),
        (&[("cdn-cache-control", "max-age")], ControlSource::Cdn, |c| {
            c.max_age_invalid = true
        }),
        (
            &[("cdn-cache-control", "no-store=?0, max-age=60")],
            ControlSource::Cdn,
            |c| c.max_age = Some(60),
        ),
        (&[("cdn-cache-control", "no-store=?1")], ControlSource::Cdn, |c| {
            c.no_store = true
        }),
        (
            &[("cdn-cache-control", "private=\"set-cookie\"")],
            ControlSource::Cdn,
            |c| c.private = names(&["set-cookie"]),
        ),
        (
            &[("cdn-cache-control", "max-age=60;x=1;y, public")],
            ControlSource::Cdn,
            |c| {
                c.max_age = Some(60);
                c.public = true;
            },
        ),
        (
            &[("cdn-cache-control", "a=(1 \"b\" c);p, b=:aGk=:, max-age=60")],
            ControlSource::Cdn,
            |c| c.max_age = Some(60),
        ),
        (
            &[("cdn-cache-control", " max-age=60,\tpublic ")],
            ControlSource::Cdn,
            |c| {
                c.max_age = Some(60);
                c.public = true;
            },
        ),
        // Field lines combine with ", " before parsing.
        (
            &[("cdn-cache-control", "max-age=60"), ("cdn-cache-control", "public")],
            ControlSource::Cdn,
            |c| {
                c.max_age = Some(60);
                c.public = true;
            },
        ),
        // A valid field without known directives still overrides.
        (
            &[("cdn-cache-control", "foo=1"), ("cache-control", "no-store")],
            ControlSource::Cdn,
            |_| {},
        ),
        (
            &[
                ("cdn-cache-control", "private"),
                ("cache-control", "public, max-age=10"),
            ],
            ControlSource::Cdn,
            |c| c.private = FieldScope::Whole,
        ),
    ];
    for (pairs, source, expect) in cases {
        let mut expected = CacheControl::default();
        expect(&mut expected);
        let got = response_control(&headers(pairs));
        assert_eq!(got.source, *source, "{pairs:?}");
        assert_eq!(got.directives, expected, "{pairs:?}");
        assert_eq!(got.source.is_targeted(), *source != ControlSource::CacheControl);
    }
}

#[test]
fn targeted_field_names_are_recognizable() {
    assert!(is_targeted_field(&PORTCULLIS_CACHE_CONTROL));
    assert!(is_targeted_field(&CDN_CACHE_CONTROL));
    assert!(is_targeted_field(&HeaderName::from_static("cdn-cache-control")));
    assert!(!is_targeted_field(&CACHE_CONTROL));
    assert!(!is_targeted_field(&HeaderName::from_static("surrogate-control")));
    assert_eq!(TARGETED_FIELDS[0], PORTCULLIS_CACHE_CONTROL);
    assert_eq!(TARGETED_FIELDS[1], CDN_CACHE_CONTROL);
}

#[test]
fn field_scope_accessors() {
    assert!(FieldScope::Whole.is_whole());
    assert!(!FieldScope::Absent.is_whole());
    assert!(!names(&["a"]).is_whole());
    assert!(FieldScope::Whole.fields().is_empty());
    assert_eq!(names(&["a", "b"]).fields().len(), 2);
}
