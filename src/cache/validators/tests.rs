//! Tests of entity-tag comparison and 304 decisions (RFC 9110 sections 8.8 and 13), as tables.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use http::Method;

use super::*;
use crate::cache::testutil::{at, date, headers};

fn tag(weak: bool, opaque: &str) -> EntityTag {
    EntityTag::new(weak, opaque.as_bytes()).unwrap()
}

/// RFC 9110 section 8.8.3: `[ W/ ] DQUOTE *etagc DQUOTE`.
#[test]
fn entity_tag_parse_section_8_8_3() {
    type Parsed<'a> = Option<(bool, &'a [u8])>;
    let cases: &[(&[u8], Parsed<'_>)] = &[
        (b"\"abc\"", Some((false, b"abc"))),
        (b"W/\"abc\"", Some((true, b"abc"))),
        (b"\"\"", Some((false, b""))),
        (b"W/\"\"", Some((true, b""))),
        (b"  \"abc\"\t", Some((false, b"abc"))),
        (b"\"a!#~\"", Some((false, b"a!#~"))),
        // obs-text is allowed.
        (b"\"\xff\x80\"", Some((false, b"\xff\x80"))),
        // `W/` is case-sensitive.
        (b"w/\"abc\"", None),
        (b"W/ \"abc\"", None),
        (b"W/abc", None),
        (b"abc", None),
        (b"\"abc", None),
        (b"abc\"", None),
        (b"\"a\"b\"", None),
        (b"\"a\" \"b\"", None),
        (b"\"a b\"", None),
        (b"\"a\x7f\"", None),
        (b"\"a\x00\"", None),
        // There is no escaping: a backslash is an ordinary etagc.
        (b"\"a\\\"", Some((false, b"a\\"))),
        (b"", None),
        (b"W/", None),
        (b"*", None),
    ];
    for (input, expected) in cases {
        let got = EntityTag::parse(input);
        let got = got.as_ref().map(|t| (t.is_weak(), t.opaque()));
        assert_eq!(got, *expected, "{:?}", String::from_utf8_lossy(input));
    }
    assert!(EntityTag::new(false, b"a\"b").is_none());
    assert!(EntityTag::new(false, b"a b").is_none());
}

/// The example table of RFC 9110 section 8.8.3.2.
#[test]
fn comparison_table_section_8_8_3_2() {
    let cases = [
        (tag(true, "1"), tag(true, "1"), false, true),
        (tag(true, "1"), tag(true, "2"), false, false),
        (tag(true, "1"), tag(false, "1"), false, true),
        (tag(false, "1"), tag(false, "1"), true, true),
        // Not in the RFC's table: different strong tags.
        (tag(false, "1"), tag(false, "2"), false, false),
    ];
    for (a, b, strong, weak) in &cases {
        assert_eq!(a.strong_eq(b), *strong, "strong {a:?} {b:?}");
        assert_eq!(b.strong_eq(a), *strong, "strong {b:?} {a:?}");
        assert_eq!(a.weak_eq(b), *weak, "weak {a:?} {b:?}");
        assert_eq!(b.weak_eq(a), *weak, "weak {b:?} {a:?}");
    }
}

/// RFC 9110 section 13.1.2: `"*" / #entity-tag`. A malformed field is kept
/// as such and matches nothing.
#[test]
fn if_none_match_parse_section_13_1_2() {
    let cases: &[(&[&str], Option<IfNoneMatch>)] = &[
        (&[], None),
        (&["*"], Some(IfNoneMatch::Any)),
        (&[" * "], Some(IfNoneMatch::Any)),
        (&["\"a\""], Some(IfNoneMatch::Tags(vec![tag(false, "a")]))),
        (
            &["\"a\", W/\"b\""],
            Some(IfNoneMatch::Tags(vec![tag(false, "a"), tag(true, "b")])),
        ),
        (
            &[", \"a\",,\t\"b\" ,"],
            Some(IfNoneMatch::Tags(vec![tag(false, "a"), tag(false, "b")])),
        ),
        // A comma is an etagc: it belongs to the tag inside quotes.
        (&["\"a,b\""], Some(IfNoneMatch::Tags(vec![tag(false, "a,b")]))),
        (
            &["\"a\"", "\"b\""],
            Some(IfNoneMatch::Tags(vec![tag(false, "a"), tag(false, "b")])),
        ),
        (&[""], Some(IfNoneMatch::Tags(vec![]))),
        (&["\"a\" junk"], Some(IfNoneMatch::Malformed)),
        (&["\"a\"\"b\""], Some(IfNoneMatch::Malformed)),
        (&["a"], Some(IfNoneMatch::Malformed)),
        (&["\"a"], Some(IfNoneMatch::Malformed)),
        (&["*, \"a\""], Some(IfNoneMatch::Malformed)),
        (&["*", "\"a\""], Some(IfNoneMatch::Malformed)),
        (&["\"a\"", "bad"], Some(IfNoneMatch::Malformed)),
        (&["**"], Some(IfNoneMatch::Malformed)),
    ];
    for (lines, expected) in cases {
        let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("if-none-match", *l)).collect();
        assert_eq!(IfNoneMatch::from_headers(&headers(&pairs)), *expected, "{lines:?}");
    }
}

#[test]
fn stored_etag_needs_exactly_one_valid_value() {
    assert_eq!(stored_etag(&headers(&[("etag", "\"a\"")])), Some(tag(false, "a")));
    assert_eq!(stored_etag(&headers(&[("etag", "W/\"a\"")])), Some(tag(true, "a")));
    assert_eq!(stored_etag(&headers(&[("etag", "a")])), None);
    assert_eq!(stored_etag(&headers(&[("etag", "\"a\""), ("etag", "\"b\"")])), None);
    assert_eq!(stored_etag(&headers(&[])), None);
}

/// RFC 9110 section 13.2.2 order, as a cache applies it (RFC 9111 section
/// 4.3.2). The stored response was received at `at(0)`.
#[test]
fn not_modified_table() {
    let dates = [date(-100), date(-50), date(0), date(50)];
    let [before, lm, same, after] = dates.each_ref().map(String::as_str);
    let rfc850 = "Tuesday, 14-Nov-23 22:12:30 GMT";
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let stored_full: Pairs<'_> = &[("etag", "\"abc\""), ("last-modified", lm), ("date", same)];
    let cases: &[(Method, Pairs<'_>, Pairs<'_>, bool)] = &[
        (Method::GET, &[("if-none-match", "\"abc\"")], stored_full, true),
        (Method::HEAD, &[("if-none-match", "\"abc\"")], stored_full, true),
        // Section 13.1.2: weak comparison.
        (Method::GET, &[("if-none-match", "W/\"abc\"")], stored_full, true),
        (
            Method::GET,
            &[("if-none-match", "\"abc\"")],
            &[("etag", "W/\"abc\"")],
            true,
        ),
        (Method::GET, &[("if-none-match", "\"x\", \"abc\"")], stored_full, true),
        (Method::GET, &[("if-none-match", "\"x\"")], stored_full, false),
        (Method::GET, &[("if-none-match", "*")], stored_full, true),
        (Method::GET, &[("if-none-match", "*")], &[], true),
        (
            Method::GET,
            &[("if-none-match", "\"abc\"")],
            &[("last-modified", lm)],
            false,
        ),
        (Method::GET, &[("if-none-match", "\"abc\"")], &[("etag", "bad")], false),
        // Only GET and HEAD get a 304.
        (Method::POST, &[("if-none-match", "*")], stored_full, false),
        (Method::PUT, &[("if-modified-since", after)], stored_full, false),
        // Malformed If-None-Match: no match, and If-Modified-Since is not
        // consulted because If-None-Match is present (section 13.1.3).
        (Method::GET, &[("if-none-match", "\"abc")], stored_full, false),
        (
            Method::GET,
            &[("if-none-match", "\"abc\" x"), ("if-modified-since", after)],
            stored_full,
            false,
        ),
        (
            Method::GET,
            &[("if-none-match", "\"x\""), ("if-modified-since", after)],
            stored_full,
            false,
        ),
        (
            Method::GET,
            &[("if-none-match", "\"abc\""), ("if-modified-since", before)],
            stored_full,
            true,
        ),
        // Section 13.1.3: modified at or before the given date is a 304.
        (Method::GET, &[("if-modified-since", lm)], stored_full, true),
        (Method::GET, &[("if-modified-since", after)], stored_full, true),
        (Method::GET, &[("if-modified-since", before)], stored_full, false),
        (Method::GET, &[("if-modified-since", rfc850)], stored_full, true),
        // Invalid or repeated dates are ignored.
        (Method::GET, &[("if-modified-since", "yesterday")], stored_full, false),
        (Method::GET, &[("if-modified-since", "0")], stored_full, false),
        (
            Method::GET,
            &[("if-modified-since", after), ("if-modified-since", after)],
            stored_full,
            false,
        ),
        // RFC 9111 section 4.3.2: without Last-Modified, the stored Date,
        // else the time the response was received.
        (Method::GET, &[("if-modified-since", same)], &[("date", same)], true),
        (Method::GET, &[("if-modified-since", lm)], &[("date", same)], false),
        (
            Method::GET,
            &[("if-modified-since", lm)],
            &[("last-modified", "garbage"), ("date", before)],
            true,
        ),
        (Method::GET, &[("if-modified-since", same)], &[], true),
        (Method::GET, &[("if-modified-since", lm)], &[], false),
        (Method::GET, &[], stored_full, false),
    ];
    for (method, request, stored, expected) in cases {
        let got = not_modified(method, &headers(request), &headers(stored), at(0));
        assert_eq!(got, *expected, "{method} {request:?} stored {stored:?}");
    }
}

/// RFC 9111 section 4.3.2: If-Match and If-Unmodified-Since are for the
/// origin.
#[test]
fn origin_only_preconditions() {
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[("if-match", "\"a\"")], true),
        (&[("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT")], true),
        (&[("if-none-match", "\"a\"")], false),
        (&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")], false),
        (&[], false),
    ];
    for (pairs, expected) in cases {
        assert_eq!(has_origin_only_preconditions(&headers(pairs)), *expected, "{pairs:?}");
    }
}
