//! Request ids and W3C trace context.
//!
//! Every request gets an id: a fresh UUIDv7 (RFC 9562 section 5.7: a
//! millisecond timestamp, then random bits, so ids sort by time), or the id
//! a trusted proxy in front already gave it. The id goes to the upstream
//! and back to the client in the same header, and into the access log.
//!
//! `traceparent` (W3C Trace Context) passes through untouched; with
//! `traceparent = "create"` a request without a valid one gets one whose
//! trace id is the request id, so logs and traces join on one value.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

/// Longest incoming request id accepted from a trusted proxy.
pub const MAX_INCOMING_LEN: usize = 200;

thread_local! {
    /// Per-thread generator state, seeded once from the operating system.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // No system randomness: fall back to the clock and the thread, which
        // still gives distinct streams per thread and per start.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let thread = std::thread::current().id();
        return nanos ^ crate::upstream::balance::hash64(format!("{thread:?}").as_bytes());
    }
    u64::from_le_bytes(bytes) | 1
}

/// splitmix64: fast, and good enough for identifiers that only need to be
/// unique, not secret.
fn next_random() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// A new UUIDv7 as 16 bytes.
pub fn uuid_v7_bytes(unix_ms: u64) -> [u8; 16] {
    let random_a = next_random();
    let random_b = next_random();
    let mut out = [0u8; 16];
    out[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    out[6..14].copy_from_slice(&random_a.to_be_bytes());
    out[14..].copy_from_slice(&random_b.to_be_bytes()[..2]);
    out[6] = 0x70 | (out[6] & 0x0F); // version 7
    out[8] = 0x80 | (out[8] & 0x3F); // variant 10
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A new request id: a UUIDv7 in its canonical 36-character form.
pub fn new_id() -> HeaderValue {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let bytes = uuid_v7_bytes(unix_ms);
    let mut text = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = HEX[(b >> 4) as usize];
        text[at + 1] = HEX[(b & 15) as usize];
        at += 2;
    }
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("00000000-0000-7000-8000-000000000000"))
}

/// An incoming id is kept only if it is short visible ASCII (no spaces, no
/// quotes or backslashes, which would need escaping in every log format).
pub fn valid_incoming(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_INCOMING_LEN
        && bytes.iter().all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\')
}

/// Whether a `traceparent` value is well-formed (W3C Trace Context level 1,
/// section 3.2): `version-traceid-parentid-flags` in lower-case hex, version
/// not `ff`, ids not all zeros. Later versions may append fields.
pub fn valid_traceparent(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    if b.len() < 55 {
        return false;
    }
    let hex = |s: &[u8]| s.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    let version = &b[0..2];
    if !hex(version) || version == b"ff" {
        return false;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let (trace, parent, flags) = (&b[3..35], &b[36..52], &b[53..55]);
    if !hex(trace) || !hex(parent) || !hex(flags) {
        return false;
    }
    if trace.iter().all(|c| *c == b'0') || parent.iter().all(|c| *c == b'0') {
        return false;
    }
    // Version 00 has exactly four fields; later versions may add more after '-'.
    if version == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    }
}

/// A new `traceparent` whose trace id is the request id's 32 hex digits
/// (when it is a UUID) and whose parent id is random; not sampled.
pub fn new_traceparent(request_id: &HeaderValue) -> HeaderValue {
    let mut trace: Vec<u8> = request_id
        .as_bytes()
        .iter()
        .filter(|b| b.is_ascii_hexdigit())
        .map(u8::to_ascii_lowercase)
        .collect();
    if trace.len() != 32 || trace.iter().all(|c| *c == b'0') {
        trace.clear();
        for _ in 0..2 {
            trace.extend(format!("{:016x}", next_random()).bytes());
        }
    }
    let parent = next_random() | 1;
    let text = format!("00-{}-{parent:016x}-00", String::from_utf8_lossy(&trace));
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    ))
}

/// The trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &HeaderValue) -> Option<&str> {
    valid_traceparent(traceparent)
        .then(|| traceparent.to_str().ok().map(|s| &s[3..35]))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_v7_layout_rfc9562_section_5_7() {
        let id = new_id();
        let text = id.to_str().expect("ascii");
        assert_eq!(text.len(), 36);
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert!(parts[2].starts_with('7'), "version nibble: {text}");
        assert!(
            matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "variant bits: {text}"
        );
    }

    #[test]
    fn uuid_v7_starts_with_the_millisecond_timestamp() {
        let bytes = uuid_v7_bytes(0x0123_4567_89ab);
        assert_eq!(&bytes[..6], &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab]);
        assert_eq!(bytes[6] >> 4, 7);
        assert_eq!(bytes[8] >> 6, 0b10);
    }

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(new_id()));
        }
        let early = uuid_v7_bytes(1_000);
        let late = uuid_v7_bytes(2_000);
        assert!(early < late);
    }

    #[test]
    fn incoming_ids_are_checked() {
        let ok = |s: &str| valid_incoming(&HeaderValue::from_str(s).expect("header"));
        assert!(ok("abc-123"));
        assert!(ok(&"a".repeat(MAX_INCOMING_LEN)));
        assert!(!ok(&"a".repeat(MAX_INCOMING_LEN + 1)));
        assert!(!ok("has space"));
        assert!(!ok("quote\"d"));
        assert!(!ok("back\\slash"));
        assert!(!ok(""));
    }

    #[test]
    fn traceparent_parsing_w3c_trace_context_section_3_2() {
        let ok = |s: &str| valid_traceparent(&HeaderValue::from_str(s).expect("header"));
        assert!(ok("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(ok("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert!(!ok("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert!(!ok("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!ok("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!ok("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
        assert!(!ok("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!ok("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
        assert!(!ok("garbage"));
    }

    #[test]
    fn created_traceparent_carries_the_request_id() {
        let id = HeaderValue::from_static("0192f0a4-7b3c-7def-8a12-3456789abcde");
        let tp = new_traceparent(&id);
        assert!(valid_traceparent(&tp), "{tp:?}");
        assert_eq!(trace_id(&tp), Some("0192f0a47b3c7def8a123456789abcde"));
        let odd = new_traceparent(&HeaderValue::from_static("not-a-uuid"));
        assert!(valid_traceparent(&odd), "{odd:?}");
    }
}
