//! The request target as the proxy understands it: one normalised path,
//! and a host checked against RFC 3986. Pure: no I/O, no allocation when
//! the target is already in normal form (the common case).
//!
//! Every decision that depends on the path (routing, IP lists, rate
//! limits, challenges, `rewrite_prefix`, the cache key) is taken on the
//! normalised path, and that is also what the upstream receives, so the
//! proxy and the origin never disagree about which resource a request
//! names. [`normalize_path`] applies RFC 3986 section 6.2.2 and the rules
//! web frameworks use:
//! - percent-encoded unreserved characters (`%61` = `a`, `%2E` = `.`) are
//!   decoded, other escapes keep their byte with upper-case hex;
//! - `.` and `..` segments are removed (section 5.2.4; `..` never climbs
//!   above the root);
//! - empty segments are merged (`//a` = `/a`), a trailing `/` is kept;
//! - ambiguous spellings are refused, because origins read them in
//!   different ways: an encoded `/` or `\` (`%2F`, `%5C`; unless
//!   `encoded_slash = "keep"`, which keeps them opaque, never as a
//!   separator), a raw `\`, an encoded NUL, a malformed escape, and a dot
//!   segment with parameters (`..;x`, which Java servlet containers read
//!   as `..`).
//!
//! [`valid_authority`] accepts `host [ ":" port ]` where host is an IPv6
//! literal in brackets, an IPv4 address or a DNS name (labels of letters,
//! digits, `-` and `_`, an optional trailing dot), and port is at most
//! 65535; anything else (userinfo, a second colon, a comma, an escape) is
//! refused, so a wildcard host can only match whole labels.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding")]
    BadEscape,
    #[error("an encoded NUL")]
    Nul,
    #[error("an encoded '/' or '\\'")]
    EncodedSlash,
    #[error("a '\\' in the path")]
    Backslash,
    #[error("a dot segment with parameters")]
    DotParameters,
}

/// What to do with `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodedSlash {
    /// Refuse the request (400): the safe default.
    #[default]
    Refuse,
    /// Keep them encoded, as ordinary bytes of their segment.
    Keep,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// True when a path needs no work: no escape, no backslash, no empty
/// segment and no segment starting with a dot.
fn is_plain(path: &[u8]) -> bool {
    let mut previous_slash = false;
    for &b in path {
        match b {
            b'%' | b'\\' => return false,
            b'/' if previous_slash => return false,
            b'.' if previous_slash => return false,
            _ => {}
        }
        previous_slash = b == b'/';
    }
    true
}

/// The normal form of an origin-form path (it starts with `/`); any other
/// form (`*`, empty) is returned as it is.
pub fn normalize_path(path: &str, encoded_slash: EncodedSlash) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || is_plain(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    // Output segments as byte ranges of `out`, so `..` can drop the last.
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut starts: Vec<usize> = Vec::new();
    let mut segment: Vec<u8> = Vec::new();
    let raw_segments: Vec<&[u8]> = bytes[1..].split(|&b| b == b'/').collect();
    let last = raw_segments.len() - 1;
    let mut trailing_slash = false;
    for (i, raw) in raw_segments.iter().enumerate() {
        decode_segment(raw, encoded_slash, &mut segment)?;
        match segment.as_slice() {
            b"." => trailing_slash = i == last,
            b".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                trailing_slash = i == last;
            }
            [] => trailing_slash = i == last,
            s if is_dot_with_parameters(s) => return Err(PathError::DotParameters),
            s => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(s);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    // Only ASCII was added, and escapes were decoded only to unreserved
    // (ASCII) bytes: the result is as valid UTF-8 as the input.
    match String::from_utf8(out) {
        Ok(s) if s == path => Ok(Cow::Borrowed(path)),
        Ok(s) => Ok(Cow::Owned(s)),
        Err(_) => Err(PathError::BadEscape),
    }
}

/// Decodes one raw segment into `segment`: unreserved escapes decoded,
/// others kept with upper-case hex, the ambiguous ones refused.
fn decode_segment(raw: &[u8], encoded_slash: EncodedSlash, segment: &mut Vec<u8>) -> Result<(), PathError> {
    segment.clear();
    let mut has_encoded_slash = false;
    let mut k = 0;
    while k < raw.len() {
        match raw[k] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    raw.get(k + 1).copied().and_then(hex_value),
                    raw.get(k + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let value = hi << 4 | lo;
                if value == 0 {
                    return Err(PathError::Nul);
                }
                if is_unreserved(value) {
                    segment.push(value);
                } else {
                    if value == b'/' || value == b'\\' {
                        if encoded_slash == EncodedSlash::Refuse {
                            return Err(PathError::EncodedSlash);
                        }
                        has_encoded_slash = true;
                    }
                    segment.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[(value >> 4) as usize],
                        HEX_UPPER[(value & 15) as usize],
                    ]);
                }
                k += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b => {
                segment.push(b);
                k += 1;
            }
        }
    }
    if has_encoded_slash && hides_dot_segment(segment) {
        // `..%2F` would become a `..` segment at an origin that decodes
        // the slash.
        return Err(PathError::EncodedSlash);
    }
    Ok(())
}

/// `.;x` or `..;x`: a dot segment to a servlet container.
fn is_dot_with_parameters(segment: &[u8]) -> bool {
    segment.starts_with(b".;") || segment.starts_with(b"..;")
}

/// A segment kept with `%2F` / `%5C` inside that would hold a dot segment
/// once an origin decodes them.
fn hides_dot_segment(segment: &[u8]) -> bool {
    let text = String::from_utf8_lossy(segment).replace("%5C", "%2F");
    text.split("%2F")
        .any(|part| part == "." || part == ".." || is_dot_with_parameters(part.as_bytes()))
}

/// True when `authority` is `host [ ":" port ]` as the module describes.
pub fn valid_authority(authority: &[u8]) -> bool {
    let (host, port) = if authority.first() == Some(&b'[') {
        let Some(end) = authority.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &authority[1..end];
        let valid_v6 = std::str::from_utf8(literal)
            .ok()
            .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
            .is_some();
        if !valid_v6 {
            return false;
        }
        match &authority[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&authority[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match authority.iter().position(|&b| b == b':') {
            Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
            None => (authority, None),
        }
    };
    if let Some(port) = port {
        if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let value = port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        if value > 65_535 {
            return false;
        }
    }
    if host.first() == Some(&b'[') {
        return true;
    }
    valid_dns_name(host)
}

/// Labels of letters, digits, `-` and `_`, 1 to 63 bytes each, at most
/// 253 bytes in all, with an optional trailing dot. IPv4 addresses are
/// names of this form too.
fn valid_dns_name(host: &[u8]) -> bool {
    let host = host.strip_suffix(b".").unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> Result<String, PathError> {
        normalize_path(path, EncodedSlash::Refuse).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/a", "/a/b/", "/a.b/c.d", "/a-b_c~d", "*", "", "/é"] {
            assert!(
                matches!(normalize_path(path, EncodedSlash::Refuse), Ok(Cow::Borrowed(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn normalisation_table() {
        for (input, want) in [
            ("/./admin/x", "/admin/x"),
            ("//admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/foo/../admin/x", "/admin/x"),
            ("/%2e%2e/admin", "/admin"),
            ("/%2E/a", "/a"),
            ("/a/b/../../../c", "/c"),
            ("/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/a/", "/a/"),
            ("/a//", "/a/"),
            ("/a/.", "/a/"),
            ("/a/b/..", "/a/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
            ("/%7e%41", "/~A"),
            ("/%3a%3A", "/%3A%3A"),
            ("/%c3%a9", "/%C3%A9"),
            ("/a;b/c", "/a;b/c"),
            ("/a%20b", "/a%20b"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (input, why) in [
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::Nul),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
            ("/a/..;/b", PathError::DotParameters),
            ("/a/.;x/b", PathError::DotParameters),
            ("/a/%2e%2e;x/b", PathError::DotParameters),
        ] {
            assert_eq!(norm(input), Err(why), "{input}");
        }
    }

    #[test]
    fn kept_encoded_slashes_are_opaque_but_never_hide_dots() {
        let keep = |p| normalize_path(p, EncodedSlash::Keep).map(Cow::into_owned);
        assert_eq!(keep("/api/group%2fproject/x").as_deref(), Ok("/api/group%2Fproject/x"));
        assert_eq!(keep("/a%5Cb").as_deref(), Ok("/a%5Cb"));
        for hidden in ["/public/..%2Fadmin", "/a/%2F..", "/a/.%2fb", "/a/..%5c", "/a/x%2F..;y"] {
            assert_eq!(keep(hidden), Err(PathError::EncodedSlash), "{hidden}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for input in ["/./a//b/../c/", "/%61/%2e/x", "/a/%c3%a9/..", "/x/y/z/../../.."] {
            let once = norm(input).expect("normal");
            assert_eq!(norm(&once).as_deref(), Ok(once.as_str()), "{input}");
        }
    }

    #[test]
    fn authorities() {
        for good in [
            "example.com",
            "EXAMPLE.com:8080",
            "a.example.com.",
            "x_y.example.com",
            "localhost",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::1]:443",
            "a:",
        ] {
            assert!(valid_authority(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            ":80",
            "app.example.com:@evil.com",
            "evil.com,a.example.com",
            "user@host",
            "a:80:80",
            "a:8o",
            "a:99999",
            "a:123456",
            "a..b",
            ".a",
            "a/b",
            "a b",
            "[::1",
            "[not-v6]",
            "[::1]x",
            "[::1]:x",
            "a%2f",
            "..",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(!valid_authority(long_label.as_bytes()));
        let long_name = vec!["abc"; 70].join(".");
        assert!(!valid_authority(long_name.as_bytes()));
    }
}
