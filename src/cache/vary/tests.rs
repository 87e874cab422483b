//! Tests of secondary keys from `Vary` (RFC 9111 section 4.1).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use super::*;
use crate::cache::testutil::headers;

fn fields(list: &[&str]) -> Vary {
    Vary::Fields(
        list.iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
            .collect(),
    )
}

/// RFC 9110 section 12.5.5: `"*" / #field-name`, names case-insensitive.
#[test]
fn vary_parse_table() {
    let cases: &[(&[&str], Vary)] = &[
        (&[], fields(&[])),
        (&[""], fields(&[])),
        (&["accept-encoding"], fields(&["accept-encoding"])),
        (&["Accept-Encoding"], fields(&["accept-encoding"])),
        // Sorted and deduplicated, so equal lists give equal keys.
        (
            &["accept-language, Accept-Encoding"],
            fields(&["accept-encoding", "accept-language"]),
        ),
        (
            &["accept-encoding, accept-language"],
            fields(&["accept-encoding", "accept-language"]),
        ),
        (&["accept, ACCEPT , accept"], fields(&["accept"])),
        (&[", ,accept,"], fields(&["accept"])),
        (&["accept", "cookie"], fields(&["accept", "cookie"])),
        (&["*"], Vary::Any),
        (&[" * "], Vary::Any),
        (&["accept, *"], Vary::Any),
        (&["accept", "*"], Vary::Any),
        // A member that is not a field name is treated as `*`.
        (&["acc ept"], Vary::Any),
        (&["accept, \"x\""], Vary::Any),
        (&["a*"], fields(&["a*"])),
    ];
    for (lines, expected) in cases {
        let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("vary", *l)).collect();
        assert_eq!(Vary::from_headers(&headers(&pairs)), *expected, "{lines:?}");
        assert_eq!(expected.is_any(), matches!(expected, Vary::Any));
    }
}

#[test]
fn field_value_normalization_section_4_1() {
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(Pairs<'_>, Option<&[u8]>)] = &[
        (&[], None),
        (&[("accept", "")], Some(b"")),
        (&[("accept", "text/html")], Some(b"text/html")),
        (&[("accept", "  text/html\t")], Some(b"text/html")),
        (
            &[("accept", "text/html"), ("accept", " image/png ")],
            Some(b"text/html, image/png"),
        ),
        (&[("accept", ""), ("accept", "")], Some(b", ")),
        (&[("other", "x")], None),
    ];
    let accept = HeaderName::from_static("accept");
    for (pairs, expected) in cases {
        assert_eq!(field_value(&headers(pairs), &accept).as_deref(), *expected, "{pairs:?}");
    }
}

/// RFC 9111 section 4.1: every nominated field must match after
/// normalization, absent only matches absent, and `*` never matches.
#[test]
fn matches_table_section_4_1() {
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(&[&str], Pairs<'_>, Pairs<'_>, bool)] = &[
        (
            &["accept-encoding"],
            &[("accept-encoding", "gzip")],
            &[("accept-encoding", "gzip")],
            true,
        ),
        (
            &["accept-encoding"],
            &[("accept-encoding", "gzip")],
            &[("accept-encoding", "br")],
            false,
        ),
        (
            &["Accept-Encoding"],
            &[("accept-encoding", "gzip")],
            &[("Accept-Encoding", "gzip")],
            true,
        ),
        (&["accept-encoding"], &[], &[], true),
        (&["accept-encoding"], &[], &[("accept-encoding", "")], false),
        (&["accept-encoding"], &[("accept-encoding", "")], &[], false),
        (
            &["accept-encoding"],
            &[("accept-encoding", "")],
            &[("accept-encoding", "")],
            true,
        ),
        (&["accept-encoding"], &[("accept-encoding", "gzip")], &[], false),
        // Combining field lines and trimming whitespace.
        (
            &["accept-encoding"],
            &[("accept-encoding", "gzip"), ("accept-encoding", "br")],
            &[("accept-encoding", "gzip, br")],
            true,
        ),
        (
            &["accept-encoding"],
            &[("accept-encoding", " gzip ")],
            &[("accept-encoding", "gzip")],
            true,
        ),
        // No field-specific normalization: token case and order count.
        (
            &["accept-encoding"],
            &[("accept-encoding", "GZIP")],
            &[("accept-encoding", "gzip")],
            false,
        ),
        (
            &["accept-encoding"],
            &[("accept-encoding", "gzip, br")],
            &[("accept-encoding", "br, gzip")],
            false,
        ),
        // Fields not nominated do not matter.
        (
            &["accept-encoding"],
            &[("accept-encoding", "gzip"), ("user-agent", "a")],
            &[("accept-encoding", "gzip"), ("user-agent", "b")],
            true,
        ),
        (&[], &[("accept", "a")], &[("accept", "b")], true),
        (
            &["accept", "accept-language"],
            &[("accept", "a"), ("accept-language", "en")],
            &[("accept", "a"), ("accept-language", "fr")],
            false,
        ),
        (&["*"], &[], &[], false),
        (&["accept, *"], &[("accept", "a")], &[("accept", "a")], false),
    ];
    for (vary_lines, stored_request, new_request, expected) in cases {
        let pairs: Vec<(&str, &str)> = vary_lines.iter().map(|l| ("vary", *l)).collect();
        let vary = Vary::from_headers(&headers(&pairs));
        // The stored key of a `*` response does not exist; any key must fail.
        let stored_key = secondary_key(&vary, &headers(stored_request)).unwrap_or(SecondaryKey(vec![]));
        assert_eq!(
            matches(&vary, &stored_key, &headers(new_request)),
            *expected,
            "vary {vary_lines:?} stored {stored_request:?} new {new_request:?}"
        );
    }
}

#[test]
fn secondary_key_lists_every_nominated_field() {
    let vary = fields(&["accept", "accept-encoding"]);
    let key = secondary_key(&vary, &headers(&[("accept-encoding", "gzip")])).unwrap();
    assert_eq!(
        key,
        SecondaryKey(vec![
            (HeaderName::from_static("accept"), None),
            (HeaderName::from_static("accept-encoding"), Some(b"gzip".to_vec())),
        ])
    );
    assert_eq!(secondary_key(&Vary::Any, &headers(&[])), None);
}
