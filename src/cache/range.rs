//! Byte ranges of a fully stored response (RFC 9110 section 14): one
//! satisfiable range gets 206, a request none of whose ranges can be
//! satisfied gets 416, and anything else (several ranges, another unit, a
//! malformed field, an `If-Range` that does not match) gets the whole
//! response with 200, which section 14.2 allows.

use http::HeaderMap;
use http::header::{ETAG, IF_RANGE, LAST_MODIFIED, RANGE};

use super::validators::EntityTag;

/// What to send for a request against a stored body of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole body, 200.
    Full,
    /// Bytes `start..=end`, 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Decides how to answer `request` from a stored response with
/// `stored` fields and a body of `len` bytes.
pub fn answer(request: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let mut lines = request.get_all(RANGE).iter();
    let Some(first) = lines.next() else {
        return RangeAnswer::Full;
    };
    if lines.next().is_some() || !if_range_holds(request, stored) {
        return RangeAnswer::Full;
    }
    let Ok(text) = first.to_str() else {
        return RangeAnswer::Full;
    };
    let Some((unit, set)) = text.trim().split_once('=') else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAnswer::Full;
    }
    let specs: Vec<&str> = set.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut parsed = Vec::with_capacity(specs.len());
    for spec in &specs {
        match parse_spec(spec) {
            Some(range) => parsed.push(range),
            None => return RangeAnswer::Full,
        }
    }
    let satisfiable: Vec<(u64, u64)> = parsed.iter().filter_map(|r| r.resolve(len)).collect();
    match satisfiable.as_slice() {
        [] if !parsed.is_empty() => RangeAnswer::Unsatisfiable,
        [(start, end)] if parsed.len() == 1 => RangeAnswer::Partial {
            start: *start,
            end: *end,
        },
        // Several ranges: the whole body (multipart/byteranges is not built).
        _ => RangeAnswer::Full,
    }
}

#[derive(Debug, Clone, Copy)]
enum Spec {
    /// `first-` or `first-last`.
    From(u64, Option<u64>),
    /// `-suffix`: the last bytes.
    Suffix(u64),
}

impl Spec {
    fn resolve(self, len: u64) -> Option<(u64, u64)> {
        match self {
            Spec::From(first, _) if first >= len => None,
            Spec::From(first, last) => Some((first, last.map_or(len - 1, |l| l.min(len - 1)))),
            Spec::Suffix(0) => None,
            Spec::Suffix(_) if len == 0 => None,
            Spec::Suffix(n) => Some((len.saturating_sub(n), len - 1)),
        }
    }
}

fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_spec(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    if first.is_empty() {
        return digits(last).map(Spec::Suffix);
    }
    let first = digits(first)?;
    if last.is_empty() {
        return Some(Spec::From(first, None));
    }
    let last = digits(last)?;
    (last >= first).then_some(Spec::From(first, Some(last)))
}

/// `If-Range` (section 13.1.5): the range applies only when the stored
/// response still has the given strong entity tag or exact date.
fn if_range_holds(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(IF_RANGE) else {
        return true;
    };
    let bytes = condition.as_bytes();
    if bytes.starts_with(b"\"") || bytes.starts_with(b"W/") {
        let Some(wanted) = EntityTag::parse(bytes) else {
            return false;
        };
        let current = stored.get(ETAG).and_then(|v| EntityTag::parse(v.as_bytes()));
        return current.is_some_and(|c| c.strong_eq(&wanted));
    }
    match (condition.to_str(), stored.get(LAST_MODIFIED).map(|v| v.to_str())) {
        (Ok(a), Some(Ok(b))) => match (httpdate::parse_http_date(a.trim()), httpdate::parse_http_date(b.trim())) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(range: &str, if_range: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RANGE, HeaderValue::from_str(range).expect("value"));
        if let Some(v) = if_range {
            h.insert(IF_RANGE, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    /// RFC 9110 section 14.1.2 (byte ranges) and 14.2 (Range).
    #[test]
    fn byte_range_table() {
        use RangeAnswer::*;
        let stored = HeaderMap::new();
        let cases: &[(&str, u64, RangeAnswer)] = &[
            ("bytes=0-9", 100, Partial { start: 0, end: 9 }),
            ("bytes=90-", 100, Partial { start: 90, end: 99 }),
            ("bytes=-10", 100, Partial { start: 90, end: 99 }),
            ("bytes=-500", 100, Partial { start: 0, end: 99 }),
            ("bytes=50-500", 100, Partial { start: 50, end: 99 }),
            ("BYTES = 0-0", 100, Partial { start: 0, end: 0 }),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=0-1,5-6", 100, Full),
            ("bytes=9-1", 100, Full),
            ("bytes=a-b", 100, Full),
            ("bytes=1", 100, Full),
            ("bytes=", 100, Full),
            ("items=0-1", 100, Full),
            ("bytes=18446744073709551616-", 100, Full),
            ("bytes=+1-2", 100, Full),
        ];
        for (range, len, want) in cases {
            assert_eq!(answer(&req(range, None), &stored, *len), *want, "{range} of {len}");
        }
    }

    /// RFC 9110 section 13.1.5: If-Range needs a strong match or the
    /// exact Last-Modified date.
    #[test]
    fn if_range_table() {
        let mut stored = HeaderMap::new();
        stored.insert(ETAG, HeaderValue::from_static("\"v1\""));
        stored.insert(LAST_MODIFIED, HeaderValue::from_static("Tue, 15 Nov 1994 12:45:26 GMT"));
        let partial = RangeAnswer::Partial { start: 0, end: 0 };
        let cases: &[(&str, RangeAnswer)] = &[
            ("\"v1\"", partial),
            ("\"v2\"", RangeAnswer::Full),
            ("W/\"v1\"", RangeAnswer::Full),
            ("Tue, 15 Nov 1994 12:45:26 GMT", partial),
            ("Tue, 15 Nov 1994 12:45:27 GMT", RangeAnswer::Full),
            ("garbage", RangeAnswer::Full),
        ];
        for (condition, want) in cases {
            assert_eq!(
                answer(&req("bytes=0-0", Some(condition)), &stored, 10),
                *want,
                "{condition}"
            );
        }
    }
}
