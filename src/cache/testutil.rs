//! Helpers shared by the cache rule tests: header maps from literal pairs
//! and fixed instants, so no test reads the clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

/// A header map from `(name, value)` pairs; a repeated name adds a field
/// line. Values are raw bytes, so tests can feed obs-text.
pub(super) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("test header name");
        let value = HeaderValue::from_bytes(value.as_bytes()).expect("test header value");
        map.append(name, value);
    }
    map
}

/// A fixed instant: 2023-11-14T22:13:20Z plus `seconds`.
pub(super) fn at(seconds: i64) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    if seconds >= 0 {
        base + Duration::from_secs(seconds.unsigned_abs())
    } else {
        base - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// `at(seconds)` as an IMF-fixdate.
pub(super) fn date(seconds: i64) -> String {
    httpdate::fmt_http_date(at(seconds))
}
