//! Freshness for a shared cache (RFC 9111 section 4.2): how long a response
//! stays fresh ([`freshness_lifetime`], sections 4.2.1 and 4.2.2), how old
//! a stored response is (the section 4.2.3 age functions, one per term of
//! the RFC's formula) and whether a stored response may answer a request,
//! fresh ([`acceptable`], with the request directives of section 5.2.1) or
//! stale ([`may_serve_stale_while_revalidate`], [`may_serve_stale_if_error`],
//! RFC 5861).
//!
//! Nothing here reads a clock: the request, response and current times are
//! passed in as `SystemTime`s and every result is whole seconds, capped at
//! [`DELTA_SECONDS_MAX`] as section 1.2.2 asks of overflowing calculations.

use std::time::SystemTime;

use http::header::{AGE, DATE, EXPIRES, LAST_MODIFIED};
use http::{HeaderMap, HeaderName, StatusCode};

use super::control::{CacheControl, DELTA_SECONDS_MAX, ResponseControl, parse_delta_seconds, trim_ows};

#[cfg(test)]
mod tests;

/// How heuristic freshness is computed (section 4.2.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeuristicSettings {
    /// The share of the time since `Last-Modified` a response stays fresh.
    pub fraction: f64,
    /// The longest heuristic lifetime, in seconds.
    pub max_seconds: u64,
}

impl Default for HeuristicSettings {
    /// 10 % as section 4.2.2 suggests, capped at one day: RFC 7234 asked for
    /// a warning past 24 hours of heuristic age, a sign that longer guesses
    /// surprise people.
    fn default() -> Self {
        HeuristicSettings {
            fraction: 0.1,
            max_seconds: 86_400,
        }
    }
}

/// Where a freshness lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshnessSource {
    /// `s-maxage` (a shared cache prefers it to everything else).
    SMaxAge,
    /// `max-age`.
    MaxAge,
    /// `Expires` minus `Date`.
    Expires,
    /// A fraction of the time since `Last-Modified`.
    Heuristic,
    /// Nothing: the lifetime is zero.
    None,
}

/// A freshness lifetime in seconds and its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub seconds: u64,
    pub source: FreshnessSource,
}

impl Lifetime {
    fn new(seconds: u64, source: FreshnessSource) -> Self {
        Lifetime { seconds, source }
    }

    /// Set by the origin (`s-maxage`, `max-age`, `Expires`), not guessed.
    pub fn is_explicit(&self) -> bool {
        matches!(
            self.source,
            FreshnessSource::SMaxAge | FreshnessSource::MaxAge | FreshnessSource::Expires
        )
    }
}

/// Status codes that are heuristically cacheable (RFC 9110 section 15.1).
pub fn is_heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The first field line of `name` that is a valid HTTP-date (IMF-fixdate,
/// RFC 850 or asctime, RFC 9110 section 5.6.7).
pub fn http_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    headers
        .get_all(name)
        .iter()
        .find_map(|value| httpdate::parse_http_date(value.to_str().ok()?.trim()).ok())
}

/// `date_value`: the `Date` field, or the time the response was received
/// when it is absent or invalid (RFC 9110 section 6.6.1).
pub fn date_value(headers: &HeaderMap, response_time: SystemTime) -> SystemTime {
    http_date(headers, &DATE).unwrap_or(response_time)
}

/// `Expires` as a time, or `None` for "already expired": an invalid value
/// (`0` included) means a time in the past (section 5.3). Several field
/// lines that disagree are treated the same way, the stale option of
/// section 4.2.1, as for a repeated `max-age`.
fn expires(headers: &HeaderMap) -> Option<SystemTime> {
    let mut found = None;
    for value in headers.get_all(EXPIRES) {
        let time = httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()?;
        if found.is_some_and(|earlier| earlier != time) {
            return None;
        }
        found = Some(time);
    }
    found
}

/// Whole seconds from `earlier` to `later`, zero if `later` is not later.
fn seconds_between(earlier: SystemTime, later: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .map_or(0, |d| d.as_secs())
        .min(DELTA_SECONDS_MAX)
}

/// The freshness lifetime of a response in a shared cache (section 4.2.1):
/// `s-maxage`, else `max-age`, else `Expires - Date`, else a heuristic
/// (section 4.2.2) when the status is heuristically cacheable or the
/// response is `public`. An invalid or conflicting directive gives a zero
/// lifetime from that directive. With a targeted field in charge, `Expires`
/// is ignored (RFC 9213 section 2.1).
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    control: &ResponseControl,
    response_time: SystemTime,
    heuristic: &HeuristicSettings,
) -> Lifetime {
    let cc = &control.directives;
    if cc.s_maxage_invalid {
        return Lifetime::new(0, FreshnessSource::SMaxAge);
    }
    if let Some(seconds) = cc.s_maxage {
        return Lifetime::new(seconds, FreshnessSource::SMaxAge);
    }
    if cc.max_age_invalid {
        return Lifetime::new(0, FreshnessSource::MaxAge);
    }
    if let Some(seconds) = cc.max_age {
        return Lifetime::new(seconds, FreshnessSource::MaxAge);
    }
    if !control.source.is_targeted() && headers.contains_key(EXPIRES) {
        let seconds = expires(headers).map_or(0, |at| seconds_between(date_value(headers, response_time), at));
        return Lifetime::new(seconds, FreshnessSource::Expires);
    }
    if is_heuristically_cacheable(status) || cc.public {
        if let Some(modified) = http_date(headers, &LAST_MODIFIED) {
            let since = seconds_between(modified, date_value(headers, response_time));
            return Lifetime::new(heuristic_seconds(since, heuristic), FreshnessSource::Heuristic);
        }
    }
    Lifetime::new(0, FreshnessSource::None)
}

/// `fraction` of `since`, capped. A fraction that is negative or not a
/// number gives zero (a float-to-integer `as` saturates and maps NaN to 0).
fn heuristic_seconds(since: u64, settings: &HeuristicSettings) -> u64 {
    let fraction = if settings.fraction.is_finite() {
        settings.fraction.max(0.0)
    } else {
        0.0
    };
    ((since as f64 * fraction) as u64).min(settings.max_seconds)
}

/// `age_value` (sections 4.2.3 and 5.1): the first `Age` line that is
/// delta-seconds (surrounding whitespace allowed); zero when none is.
pub fn age_value(headers: &HeaderMap) -> u64 {
    headers
        .get_all(AGE)
        .iter()
        .find_map(|value| parse_delta_seconds(trim_ows(value.as_bytes())))
        .unwrap_or(0)
}

/// `apparent_age = max(0, response_time - date_value)`.
pub fn apparent_age(date_value: SystemTime, response_time: SystemTime) -> u64 {
    seconds_between(date_value, response_time)
}

/// `response_delay = response_time - request_time` (zero if negative).
pub fn response_delay(request_time: SystemTime, response_time: SystemTime) -> u64 {
    seconds_between(request_time, response_time)
}

/// `corrected_age_value = age_value + response_delay`.
pub fn corrected_age_value(age_value: u64, response_delay: u64) -> u64 {
    age_value.saturating_add(response_delay).min(DELTA_SECONDS_MAX)
}

/// `corrected_initial_age = max(apparent_age, corrected_age_value)`.
pub fn corrected_initial_age(apparent_age: u64, corrected_age_value: u64) -> u64 {
    apparent_age.max(corrected_age_value)
}

/// `resident_time = now - response_time`.
pub fn resident_time(response_time: SystemTime, now: SystemTime) -> u64 {
    seconds_between(response_time, now)
}

/// `current_age = corrected_initial_age + resident_time`.
pub fn current_age(corrected_initial_age: u64, resident_time: u64) -> u64 {
    corrected_initial_age
        .saturating_add(resident_time)
        .min(DELTA_SECONDS_MAX)
}

/// The `corrected_initial_age` of a response received at `response_time`
/// for a request sent at `request_time`: what a cache stores with the
/// response, to add its resident time to later.
pub fn initial_age(headers: &HeaderMap, request_time: SystemTime, response_time: SystemTime) -> u64 {
    let apparent = apparent_age(date_value(headers, response_time), response_time);
    let corrected = corrected_age_value(age_value(headers), response_delay(request_time, response_time));
    corrected_initial_age(apparent, corrected)
}

/// `response_is_fresh = freshness_lifetime > current_age` (section 4.2).
pub fn is_fresh(lifetime: u64, current_age: u64) -> bool {
    lifetime > current_age
}

/// How far past its lifetime a response is (zero while fresh).
pub fn staleness(current_age: u64, lifetime: u64) -> u64 {
    current_age.saturating_sub(lifetime)
}

/// True when the response forbids serving it stale in a shared cache
/// (section 4.2.4): `must-revalidate`, `proxy-revalidate`, or `no-cache`,
/// which forbids even fresh reuse without validation.
fn stale_forbidden(response: &CacheControl) -> bool {
    response.must_revalidate || response.proxy_revalidate || response.no_cache.is_whole()
}

/// True when a stored response may be sent for this request without
/// contacting the origin: neither side asks for validation (`no-cache`),
/// the request's `max-age` and `min-fresh` hold (section 5.2.1), and the
/// response is fresh or, with the request's `max-stale`, stale within its
/// limit. `max-stale` is not honoured when the response forbids stale
/// service or carries `s-maxage`, which for a shared cache includes
/// `proxy-revalidate` (section 5.2.2.10), nor when its lifetime is not
/// `explicit` (a heuristic or none): a client may stretch what the origin
/// said, not what the cache guessed. A request `max-age` that was invalid
/// counts as `max-age=0`.
pub fn acceptable(
    current_age: u64,
    lifetime: u64,
    explicit: bool,
    request: &CacheControl,
    response: &CacheControl,
) -> bool {
    if request.no_cache.is_whole() || response.no_cache.is_whole() {
        return false;
    }
    let max_age = if request.max_age_invalid {
        Some(0)
    } else {
        request.max_age
    };
    if max_age.is_some_and(|max| current_age > max) {
        return false;
    }
    if let Some(min_fresh) = request.min_fresh {
        if lifetime < current_age.saturating_add(min_fresh) {
            return false;
        }
    }
    if is_fresh(lifetime, current_age) {
        return true;
    }
    let s_maxage = response.s_maxage.is_some() || response.s_maxage_invalid;
    if stale_forbidden(response) || s_maxage || !explicit {
        return false;
    }
    match request.max_stale {
        None => false,
        Some(None) => true,
        Some(Some(limit)) => staleness(current_age, lifetime) <= limit,
    }
}

/// True when the request wants a response validated now or fresher than a
/// stale one can be, so that no stale-serving permission applies to it.
pub fn request_refuses_stale(current_age: u64, request: &CacheControl) -> bool {
    request.no_cache.is_whole()
        || request.max_age_invalid
        || request.max_age.is_some_and(|max| current_age > max)
        || request.min_fresh.is_some()
}

/// True when a stale response may be served while it is revalidated in the
/// background (RFC 5861 section 3): it is stale by no more than the
/// response's `stale-while-revalidate`, the response does not forbid stale
/// service (section 4.2.4) and the request does not refuse it. `s-maxage`
/// does not block this: the origin granted the window explicitly, in the
/// same response, which we read as overriding the `proxy-revalidate` that
/// `s-maxage` implies.
pub fn may_serve_stale_while_revalidate(
    current_age: u64,
    lifetime: u64,
    request: &CacheControl,
    response: &CacheControl,
) -> bool {
    !is_fresh(lifetime, current_age)
        && !stale_forbidden(response)
        && !request_refuses_stale(current_age, request)
        && response
            .stale_while_revalidate
            .is_some_and(|window| staleness(current_age, lifetime) <= window)
}

/// True when a stale response may be served instead of an error (RFC 5861
/// section 4): it is stale by no more than the larger `stale-if-error` of
/// the response and the request, and the response does not forbid stale
/// service. A request that refuses stale responses (for example with
/// `no-cache`) gets one only if it carries `stale-if-error` itself.
pub fn may_serve_stale_if_error(
    current_age: u64,
    lifetime: u64,
    request: &CacheControl,
    response: &CacheControl,
) -> bool {
    if is_fresh(lifetime, current_age) || stale_forbidden(response) {
        return false;
    }
    if request.stale_if_error.is_none() && request_refuses_stale(current_age, request) {
        return false;
    }
    let window = match (response.stale_if_error, request.stale_if_error) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return false,
    };
    staleness(current_age, lifetime) <= window
}
