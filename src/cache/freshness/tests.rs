//! Tests of freshness lifetimes, ages and stale reuse (RFC 9111 section 4.2, RFC 5861), as tables.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use std::time::Duration;

use http::StatusCode;

use super::*;
use crate::cache::control::{CacheControl, response_control};
use crate::cache::testutil::{at, date, headers};

fn cc(value: &str) -> CacheControl {
    CacheControl::parse([&http::HeaderValue::from_str(value).unwrap()])
}

fn lifetime(status: u16, pairs: &[(&str, &str)], response_time: SystemTime) -> Lifetime {
    let map = headers(pairs);
    let status = StatusCode::from_u16(status).unwrap();
    freshness_lifetime(
        status,
        &map,
        &response_control(&map),
        response_time,
        &HeuristicSettings::default(),
    )
}

/// Section 4.2.1 for a shared cache, section 4.2.2 heuristics and section
/// 5.3 Expires. Responses are received at `at(0)` unless a case says.
#[test]
fn freshness_lifetime_table() {
    use FreshnessSource as S;
    let dates = [
        date(0),
        date(60),
        date(600),
        date(-60),
        date(-1000),
        date(-365 * 86_400),
    ];
    let [d0, plus60, plus600, minus60, minus1000, minus_year] = dates.each_ref().map(String::as_str);
    type Case<'a> = (u16, Vec<(&'a str, &'a str)>, Lifetime);
    let cases: Vec<Case<'_>> = vec![
        (200, vec![("cache-control", "max-age=60")], Lifetime::new(60, S::MaxAge)),
        // A shared cache prefers s-maxage.
        (
            200,
            vec![("cache-control", "s-maxage=30, max-age=60")],
            Lifetime::new(30, S::SMaxAge),
        ),
        (
            200,
            vec![("cache-control", "max-age=60, s-maxage=90")],
            Lifetime::new(90, S::SMaxAge),
        ),
        // Section 5.3: max-age wins over Expires.
        (
            200,
            vec![("cache-control", "max-age=60"), ("date", d0), ("expires", plus600)],
            Lifetime::new(60, S::MaxAge),
        ),
        (
            200,
            vec![("date", d0), ("expires", plus600)],
            Lifetime::new(600, S::Expires),
        ),
        // Section 5.3: an invalid Expires, "0" included, is in the past.
        (200, vec![("date", d0), ("expires", "0")], Lifetime::new(0, S::Expires)),
        (
            200,
            vec![("date", d0), ("expires", "tomorrow")],
            Lifetime::new(0, S::Expires),
        ),
        (200, vec![("date", d0), ("expires", "")], Lifetime::new(0, S::Expires)),
        (
            200,
            vec![("date", d0), ("expires", minus60)],
            Lifetime::new(0, S::Expires),
        ),
        // Two Expires lines that disagree: stale, as for a repeated max-age.
        (
            200,
            vec![("date", d0), ("expires", plus60), ("expires", plus600)],
            Lifetime::new(0, S::Expires),
        ),
        (
            200,
            vec![("date", d0), ("expires", plus600), ("expires", plus600)],
            Lifetime::new(600, S::Expires),
        ),
        // An invalid Date is replaced by the response time.
        (
            200,
            vec![("date", "yesterday"), ("expires", plus600)],
            Lifetime::new(600, S::Expires),
        ),
        // Section 4.2.1: invalid freshness information means stale, and an
        // explicit (if broken) directive rules out Expires and heuristics.
        (
            200,
            vec![("cache-control", "max-age=abc"), ("date", d0), ("expires", plus600)],
            Lifetime::new(0, S::MaxAge),
        ),
        (
            200,
            vec![("cache-control", "max-age=60, max-age=120")],
            Lifetime::new(0, S::MaxAge),
        ),
        (
            200,
            vec![("cache-control", "s-maxage=x, max-age=60")],
            Lifetime::new(0, S::SMaxAge),
        ),
        (
            200,
            vec![("cache-control", "max-age=\"60\""), ("last-modified", minus1000)],
            Lifetime::new(60, S::MaxAge),
        ),
        (
            200,
            vec![("cache-control", "max-age=99999999999999999999")],
            Lifetime::new(DELTA_SECONDS_MAX, S::MaxAge),
        ),
        // Section 4.2.2: 10 % of Date - Last-Modified by default.
        (
            200,
            vec![("date", d0), ("last-modified", minus1000)],
            Lifetime::new(100, S::Heuristic),
        ),
        (
            200,
            vec![("last-modified", minus1000)],
            Lifetime::new(100, S::Heuristic),
        ),
        (
            404,
            vec![("date", d0), ("last-modified", minus1000)],
            Lifetime::new(100, S::Heuristic),
        ),
        (
            200,
            vec![("date", d0), ("last-modified", minus_year)],
            Lifetime::new(86_400, S::Heuristic),
        ),
        (
            200,
            vec![("date", d0), ("last-modified", plus60)],
            Lifetime::new(0, S::Heuristic),
        ),
        (
            200,
            vec![("date", d0), ("last-modified", "garbage")],
            Lifetime::new(0, S::None),
        ),
        (200, vec![("date", d0)], Lifetime::new(0, S::None)),
        // 302 is not heuristically cacheable (RFC 9110 section 15.1) ...
        (
            302,
            vec![("date", d0), ("last-modified", minus1000)],
            Lifetime::new(0, S::None),
        ),
        (
            500,
            vec![("date", d0), ("last-modified", minus1000)],
            Lifetime::new(0, S::None),
        ),
        // ... unless public (RFC 9111 section 5.2.2.9).
        (
            302,
            vec![("cache-control", "public"), ("date", d0), ("last-modified", minus1000)],
            Lifetime::new(100, S::Heuristic),
        ),
        // RFC 9213 section 2.1: with a targeted field, Expires is ignored.
        (
            200,
            vec![("cdn-cache-control", "max-age=30"), ("date", d0), ("expires", plus600)],
            Lifetime::new(30, S::MaxAge),
        ),
        (
            200,
            vec![
                ("cdn-cache-control", "public"),
                ("date", d0),
                ("expires", plus600),
                ("last-modified", minus1000),
            ],
            Lifetime::new(100, S::Heuristic),
        ),
        (
            200,
            vec![
                ("cache-control", "max-age=5"),
                ("portcullis-cache-control", "s-maxage=50"),
            ],
            Lifetime::new(50, S::SMaxAge),
        ),
    ];
    for (status, pairs, expected) in &cases {
        assert_eq!(lifetime(*status, pairs, at(0)), *expected, "{status} {pairs:?}");
    }
}

/// RFC 9110 section 5.6.7: all three HTTP-date formats are read.
#[test]
fn expires_in_each_http_date_format() {
    let origin_date = "Sun, 06 Nov 1994 08:49:37 GMT";
    let received = httpdate::parse_http_date(origin_date).unwrap();
    for expires in [
        "Sun, 06 Nov 1994 08:50:37 GMT",
        "Sunday, 06-Nov-94 08:50:37 GMT",
        "Sun Nov  6 08:50:37 1994",
    ] {
        let got = lifetime(200, &[("date", origin_date), ("expires", expires)], received);
        assert_eq!(got, Lifetime::new(60, FreshnessSource::Expires), "{expires}");
    }
}

/// Without Date, Expires is measured from the response time (section 4.2.1).
#[test]
fn expires_without_date_uses_response_time() {
    let expires = date(300);
    let got = lifetime(200, &[("expires", expires.as_str())], at(100));
    assert_eq!(got, Lifetime::new(200, FreshnessSource::Expires));
}

#[test]
fn heuristic_settings_section_4_2_2() {
    let map = headers(&[("date", date(0).as_str()), ("last-modified", date(-1000).as_str())]);
    let cases = [
        (0.5, 10_000, 500),
        (0.5, 300, 300),
        (0.0, 10_000, 0),
        (-1.0, 10_000, 0),
        (f64::NAN, 10_000, 0),
        (f64::INFINITY, 10_000, 0),
        (2.0, u64::MAX, 2000),
    ];
    for (fraction, max_seconds, expected) in cases {
        let settings = HeuristicSettings { fraction, max_seconds };
        let got = freshness_lifetime(StatusCode::OK, &map, &response_control(&map), at(0), &settings);
        assert_eq!(
            got,
            Lifetime::new(expected, FreshnessSource::Heuristic),
            "{fraction} {max_seconds}"
        );
    }
    let default = HeuristicSettings {
        fraction: 0.1,
        max_seconds: 86_400,
    };
    assert_eq!(HeuristicSettings::default(), default);
}

#[test]
fn heuristically_cacheable_statuses_rfc_9110_15_1() {
    let cacheable = [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];
    for code in 100..=599 {
        let status = StatusCode::from_u16(code).unwrap();
        assert_eq!(is_heuristically_cacheable(status), cacheable.contains(&code), "{code}");
    }
}

/// Section 5.1: the first valid delta-seconds; invalid or missing is 0.
#[test]
fn age_value_section_5_1() {
    let cases: &[(&[&str], u64)] = &[
        (&[], 0),
        (&["60"], 60),
        (&["abc"], 0),
        (&["-5"], 0),
        (&[""], 0),
        (&["1.5"], 0),
        (&[" 60 "], 60),
        (&["abc", "30"], 30),
        (&["30", "40"], 30),
        (&["99999999999"], DELTA_SECONDS_MAX),
    ];
    for (lines, expected) in cases {
        let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("age", *l)).collect();
        assert_eq!(age_value(&headers(&pairs)), *expected, "{lines:?}");
    }
}

/// The section 4.2.3 calculation, term by term, with fixed times: the
/// request leaves at 0, the response arrives at 2 with `Date` 3 seconds
/// before the request and `Age: 10`, and is used at 62.
#[test]
fn age_calculation_section_4_2_3() {
    let request_time = at(0);
    let response_time = at(2);
    let now = at(62);
    let stored = headers(&[("date", date(-3).as_str()), ("age", "10")]);

    let date_value = date_value(&stored, response_time);
    assert_eq!(date_value, at(-3));
    let apparent = apparent_age(date_value, response_time);
    assert_eq!(apparent, 5);
    let delay = response_delay(request_time, response_time);
    assert_eq!(delay, 2);
    let corrected = corrected_age_value(age_value(&stored), delay);
    assert_eq!(corrected, 12);
    let initial = corrected_initial_age(apparent, corrected);
    assert_eq!(initial, 12);
    assert_eq!(initial_age(&stored, request_time, response_time), 12);
    let resident = resident_time(response_time, now);
    assert_eq!(resident, 60);
    assert_eq!(current_age(initial, resident), 72);
}

#[test]
fn age_calculation_edge_cases() {
    // An origin clock ahead of ours: apparent age is never negative.
    assert_eq!(apparent_age(at(100), at(2)), 0);
    let ahead = headers(&[("date", date(100).as_str())]);
    assert_eq!(initial_age(&ahead, at(0), at(2)), 2);
    // Apparent age wins when it is the larger.
    let old = headers(&[("date", date(-50).as_str()), ("age", "10")]);
    assert_eq!(initial_age(&old, at(0), at(2)), 52);
    // Without Date, date_value is the response time.
    assert_eq!(date_value(&headers(&[]), at(7)), at(7));
    assert_eq!(initial_age(&headers(&[("age", "5")]), at(0), at(1)), 6);
    // Times out of order count as zero, not as a panic.
    assert_eq!(response_delay(at(5), at(1)), 0);
    assert_eq!(resident_time(at(10), at(3)), 0);
    // Partial seconds are truncated.
    assert_eq!(response_delay(at(0), at(2) + Duration::from_millis(900)), 2);
    // Section 1.2.2: overflowing sums saturate at 2^31.
    assert_eq!(corrected_age_value(DELTA_SECONDS_MAX, 5), DELTA_SECONDS_MAX);
    assert_eq!(current_age(u64::MAX, u64::MAX), DELTA_SECONDS_MAX);
    assert_eq!(current_age(10, 5), 15);
    assert_eq!(corrected_initial_age(3, 9), 9);
}

#[test]
fn fresh_means_lifetime_greater_than_age_section_4_2() {
    assert!(is_fresh(60, 59));
    assert!(!is_fresh(60, 60));
    assert!(!is_fresh(0, 0));
    assert_eq!(staleness(70, 60), 10);
    assert_eq!(staleness(50, 60), 0);
}

/// Section 5.2.1 request directives and section 4.2.4 stale prohibitions.
#[test]
fn acceptable_table() {
    let cases: &[(u64, u64, &str, &str, bool)] = &[
        (10, 60, "", "", true),
        (60, 60, "", "", false),
        (70, 60, "", "", false),
        (10, 60, "no-cache", "", false),
        (10, 60, "", "no-cache", false),
        // A qualified no-cache only withholds fields (section 5.2.2.4).
        (10, 60, "", "no-cache=\"set-cookie\"", true),
        (10, 60, "max-age=5", "", false),
        (10, 60, "max-age=10", "", true),
        // An invalid request max-age counts as max-age=0.
        (0, 60, "max-age=abc", "", true),
        (1, 60, "max-age=abc", "", false),
        (10, 60, "min-fresh=50", "", true),
        (10, 60, "min-fresh=51", "", false),
        (70, 60, "max-stale", "", true),
        (70, 60, "max-stale=10", "", true),
        (71, 60, "max-stale=10", "", false),
        (70, 60, "max-stale=abc", "", false),
        (70, 60, "max-stale", "must-revalidate", false),
        (70, 60, "max-stale", "proxy-revalidate", false),
        // Section 5.2.2.10: s-maxage implies proxy-revalidate.
        (70, 60, "max-stale", "s-maxage=60", false),
        (70, 60, "max-stale, min-fresh=1", "", false),
        (10, 60, "max-stale", "must-revalidate", true),
    ];
    for (age, life, request, response, expected) in cases {
        assert_eq!(
            acceptable(*age, *life, true, &cc(request), &cc(response)),
            *expected,
            "age {age} lifetime {life} request {request:?} response {response:?}"
        );
    }
    // A lifetime the cache guessed (heuristic) or none is never stretched
    // by max-stale; fresh is fresh either way.
    for (age, life, request, expected) in [
        (70, 60, "max-stale", false),
        (70, 60, "max-stale=100", false),
        (10, 60, "max-stale", true),
        (0, 0, "max-stale", false),
    ] {
        assert_eq!(
            acceptable(age, life, false, &cc(request), &cc("")),
            expected,
            "heuristic: age {age} lifetime {life} request {request:?}"
        );
    }
}

/// RFC 5861 section 3, limited by RFC 9111 section 4.2.4.
#[test]
fn stale_while_revalidate_table() {
    let cases: &[(u64, u64, &str, &str, bool)] = &[
        (70, 60, "", "stale-while-revalidate=30", true),
        (90, 60, "", "stale-while-revalidate=30", true),
        (91, 60, "", "stale-while-revalidate=30", false),
        (50, 60, "", "stale-while-revalidate=30", false),
        (70, 60, "", "", false),
        (70, 60, "", "stale-while-revalidate=30, must-revalidate", false),
        (70, 60, "", "stale-while-revalidate=30, proxy-revalidate", false),
        (70, 60, "", "stale-while-revalidate=30, no-cache", false),
        // Our choice: the explicit window overrides s-maxage's implied
        // proxy-revalidate.
        (70, 60, "", "s-maxage=60, stale-while-revalidate=30", true),
        (70, 60, "no-cache", "stale-while-revalidate=30", false),
        (70, 60, "max-age=65", "stale-while-revalidate=30", false),
        (70, 60, "max-age=70", "stale-while-revalidate=30", true),
        (70, 60, "min-fresh=1", "stale-while-revalidate=30", false),
        (70, 60, "max-age=x", "stale-while-revalidate=30", false),
    ];
    for (age, life, request, response, expected) in cases {
        assert_eq!(
            may_serve_stale_while_revalidate(*age, *life, &cc(request), &cc(response)),
            *expected,
            "age {age} lifetime {life} request {request:?} response {response:?}"
        );
    }
}

/// RFC 5861 section 4, limited by RFC 9111 section 4.2.4.
#[test]
fn stale_if_error_table() {
    let cases: &[(u64, u64, &str, &str, bool)] = &[
        (70, 60, "", "stale-if-error=600", true),
        (660, 60, "", "stale-if-error=600", true),
        (661, 60, "", "stale-if-error=600", false),
        (50, 60, "", "stale-if-error=600", false),
        (70, 60, "", "", false),
        (70, 60, "", "stale-if-error=600, must-revalidate", false),
        (70, 60, "", "stale-if-error=600, proxy-revalidate", false),
        (70, 60, "", "stale-if-error=600, no-cache", false),
        (70, 60, "", "stale-if-error=600, s-maxage=60", true),
        // The request's own window (RFC 5861 section 4: request scope).
        (70, 60, "stale-if-error=20", "", true),
        (81, 60, "stale-if-error=20", "", false),
        (150, 60, "stale-if-error=100", "stale-if-error=20", true),
        (70, 60, "stale-if-error=100", "must-revalidate", false),
        (70, 60, "no-cache", "stale-if-error=600", false),
        (70, 60, "no-cache, stale-if-error=60", "stale-if-error=600", true),
    ];
    for (age, life, request, response, expected) in cases {
        assert_eq!(
            may_serve_stale_if_error(*age, *life, &cc(request), &cc(response)),
            *expected,
            "age {age} lifetime {life} request {request:?} response {response:?}"
        );
    }
}
