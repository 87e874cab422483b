//! Robustness of every parser in the cache rules: deterministic
//! pseudo-random inputs built from the characters that matter to the
//! grammars, fed to each entry point. A panic fails the test, and the
//! invariants checked below must hold whatever the input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::control::{CDN_CACHE_CONTROL, DELTA_SECONDS_MAX, request_control, response_control};
use super::freshness::{HeuristicSettings, age_value, freshness_lifetime, initial_age};
use super::storable::{StoreSettings, fields_not_stored, storable, update_from_304};
use super::testutil::at;
use super::validators::{EntityTag, IfNoneMatch, not_modified};
use super::vary::{Vary, secondary_key};

const ALPHABET: &[u8] = b"\"\\,=; \t()*:?W/-.0123456789aemx-agno-cheprivts\x80\xff";

const FRAGMENTS: &[&[u8]] = &[
    b"max-age",
    b"s-maxage",
    b"no-cache",
    b"no-store",
    b"private",
    b"public",
    b"must-understand",
    b"stale-if-error",
    b"max-stale",
    b"=60",
    b"=\"",
    b"\"set-cookie, x-foo\"",
    b"99999999999999999999",
    b", ",
    b"W/\"a\"",
    b"\"a\"",
    b"*",
    b"x-foo",
    b"Sun, 06 Nov 1994 08:49:37 GMT",
    b"?0",
    b";p=1",
    b"(1 2)",
];

/// A small linear congruential generator: the same inputs on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// Up to 12 pieces, each a grammar fragment or a single byte.
    fn bytes(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..self.next() % 12 {
            let pick = self.next() as usize;
            if pick % 2 == 0 {
                out.extend_from_slice(FRAGMENTS.get(pick / 2 % FRAGMENTS.len()).copied().unwrap_or(b""));
            } else if let Some(&byte) = ALPHABET.get(pick / 2 % ALPHABET.len()) {
                out.push(byte);
            }
        }
        out
    }
}

#[test]
fn no_input_panics_and_invariants_hold() {
    let names = [
        "cache-control",
        "cdn-cache-control",
        "portcullis-cache-control",
        "pragma",
        "expires",
        "date",
        "last-modified",
        "age",
        "etag",
        "vary",
        "connection",
        "if-none-match",
        "if-modified-since",
        "set-cookie",
        "x-foo",
    ];
    let mut rng = Lcg(42);
    for _ in 0..20_000 {
        let mut map = HeaderMap::new();
        for name in names {
            if rng.next() % 3 == 0 {
                continue;
            }
            if let Ok(value) = HeaderValue::from_bytes(&rng.bytes()) {
                map.append(HeaderName::from_static(name), value);
            }
        }
        let control = response_control(&map);
        let cc = &control.directives;
        assert!(cc.max_age.is_none_or(|v| v <= DELTA_SECONDS_MAX), "{map:?}");
        assert!(cc.s_maxage.is_none_or(|v| v <= DELTA_SECONDS_MAX), "{map:?}");
        let _ = request_control(&map);
        let _ = super::control::parse_targeted(&map, &CDN_CACHE_CONTROL);
        assert!(age_value(&map) <= DELTA_SECONDS_MAX);
        let lifetime = freshness_lifetime(StatusCode::OK, &map, &control, at(0), &HeuristicSettings::default());
        assert!(lifetime.seconds <= DELTA_SECONDS_MAX);
        assert!(initial_age(&map, at(0), at(1)) <= DELTA_SECONDS_MAX);
        let _ = EntityTag::parse(&rng.bytes());
        let _ = IfNoneMatch::from_headers(&map);
        let _ = not_modified(&Method::GET, &map, &map, SystemTime::UNIX_EPOCH);
        let vary = Vary::from_headers(&map);
        assert_eq!(secondary_key(&vary, &map).is_none(), vary.is_any());
        let _ = storable(&Method::GET, &map, StatusCode::OK, &map, &StoreSettings::default());
        // Whatever is excluded is present, and gone after an update.
        let omit = fields_not_stored(&map, cc);
        assert!(omit.iter().all(|name| map.contains_key(name)));
        let mut stored = map.clone();
        update_from_304(&mut stored, &map);
        let after = fields_not_stored(&stored, &response_control(&stored).directives);
        assert!(after.is_empty(), "{after:?} left in {stored:?}");
    }
}
