//! Header rules of a forwarding proxy, pure functions over a `HeaderMap`:
//!
//! - hop-by-hop fields are removed (RFC 9110 section 7.6.1): `Connection`
//!   and every field it names, `Keep-Alive`, `TE` (except `trailers`),
//!   `Transfer-Encoding`, `Upgrade` unless the exchange is an upgrade, and
//!   `Proxy-Connection`;
//! - `Via` is appended (RFC 9110 section 7.6.3);
//! - `X-Forwarded-For` / `-Proto` / `-Host` and RFC 7239 `Forwarded` are
//!   extended when the peer is a trusted proxy and replaced otherwise, so a
//!   client cannot forge its address.

use std::net::IpAddr;

use http::header::{CONNECTION, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, header};

pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Removes hop-by-hop fields. With `upgrade`, keeps `Upgrade` and leaves
/// `Connection: upgrade` so the next hop sees the upgrade request.
/// Returns whether the sender accepted trailers (`TE: trailers`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) -> bool {
    strip_hop_by_hop_keeping(headers, upgrade, &[])
}

/// [`strip_hop_by_hop`], where `Connection` may not name the fields in
/// `keep` (the proxy's own request id and trace context: a client must not
/// be able to take them off the request the upstream sees).
pub fn strip_hop_by_hop_keeping(headers: &mut HeaderMap, upgrade: bool, keep: &[&HeaderName]) -> bool {
    const CONN: u8 = 1;
    const TE_: u8 = 2;
    const TRANSFER: u8 = 4;
    const UPGRADE_: u8 = 8;
    const KEEP: u8 = 16;
    const PROXY_CONN: u8 = 32;
    // One pass over the names (cheap comparisons, no hashing) finds which
    // hop-by-hop fields are present; most messages carry none or one, and
    // each absent one would otherwise cost a hash lookup to remove.
    let mut present = 0u8;
    for name in headers.keys() {
        present |= if name == CONNECTION {
            CONN
        } else if name == TE {
            TE_
        } else if name == TRANSFER_ENCODING {
            TRANSFER
        } else if name == UPGRADE {
            UPGRADE_
        } else if name == KEEP_ALIVE {
            KEEP
        } else if name == PROXY_CONNECTION {
            PROXY_CONN
        } else {
            0
        };
    }
    if present & CONN != 0 {
        for name in named_by_connection(headers, keep) {
            headers.remove(&name);
        }
        headers.remove(CONNECTION);
    }
    let mut trailers = false;
    if present & TE_ != 0 {
        trailers = accepts_trailers(headers);
        headers.remove(TE);
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
    if present & KEEP != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & PROXY_CONN != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & TRANSFER != 0 {
        headers.remove(TRANSFER_ENCODING);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE_ != 0 {
        headers.remove(UPGRADE);
    }
    trailers
}

/// The fields `Connection` names, which are hop-by-hop too. The usual
/// tokens (close, keep-alive, upgrade) name nothing else to remove, and
/// `Connection` may never strip what the proxy relies on (`Host`,
/// `Content-Length`, the fields in `keep`).
fn named_by_connection(headers: &HeaderMap, keep: &[&HeaderName]) -> Vec<HeaderName> {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if name != header::HOST && name != header::CONTENT_LENGTH && !keep.contains(&&name) {
                    named.push(name);
                }
            }
        }
    }
    named
}

/// True when a `TE` field accepts trailers.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    })
}

/// Request fields a client could use to change what an origin believes
/// about the request (its client, host, port, target or method) that no
/// cache key holds: on caching routes they never reach the origin unless
/// the route keys on them, so one client cannot poison what others get.
pub const UNKEYED_ON_CACHING_ROUTES: [&str; 15] = [
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-real-ip",
    "true-client-ip",
];

/// Removes from a request's trailer section every field a trailer must
/// not carry (RFC 9110 section 6.5.1: framing, routing, request
/// modifiers, authentication, content handling), the hop-by-hop and
/// forwarding fields, and `owned` (fields only the proxy sets: client
/// certificate identity, request id). Origins that merge trailers into
/// the header section would otherwise take them for the proxy's word.
pub fn clean_request_trailers(trailers: &mut HeaderMap, owned: &[HeaderName]) {
    let refused: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| !allowed_in_request_trailer(name) || owned.contains(name))
        .cloned()
        .collect();
    for name in refused {
        trailers.remove(&name);
    }
}

fn allowed_in_request_trailer(name: &HeaderName) -> bool {
    const REFUSED: &[&str] = &[
        "authorization",
        "cache-control",
        "connection",
        "cookie",
        "expect",
        "forwarded",
        "host",
        "keep-alive",
        "max-forwards",
        "pragma",
        "range",
        "set-cookie",
        "te",
        "trailer",
        "transfer-encoding",
        "true-client-ip",
        "upgrade",
        "via",
        "x-real-ip",
    ];
    const REFUSED_PREFIXES: &[&str] = &["content-", "if-", "proxy-", "x-forwarded-"];
    let text = name.as_str();
    !REFUSED.contains(&text) && !REFUSED_PREFIXES.iter().any(|p| text.starts_with(p))
}

/// True when an HTTP/1.1 request asks to switch protocols.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
                .unwrap_or(false)
        })
}

/// Appends `Via` (the value is pre-built per protocol version).
pub fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    headers.append(header::VIA, via.clone());
}

/// The client side of a hop, computed once per connection.
#[derive(Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The peer address as an `X-Forwarded-For` value.
    pub xff: HeaderValue,
    /// `for=...` of a `Forwarded` element (IPv6 quoted and bracketed).
    pub forwarded_for: String,
}

impl Peer {
    pub fn new(ip: IpAddr) -> Peer {
        let ip = ip.to_canonical();
        let text = ip.to_string();
        let forwarded_for = match ip {
            IpAddr::V4(_) => format!("for={text}"),
            IpAddr::V6(_) => format!("for=\"[{text}]\""),
        };
        // An IP address is always a valid header value.
        let xff = HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("unknown"));
        Peer { ip, xff, forwarded_for }
    }
}

/// What the proxy knows about the hop it received the request on.
pub struct Hop<'a> {
    pub peer: &'a Peer,
    /// The peer is a configured trusted proxy: its forwarding headers stand.
    pub trusted: bool,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The `Host` the client asked for.
    pub host: Option<&'a HeaderValue>,
}

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `Forwarded` for the next hop. From an untrusted peer each is replaced
/// (`insert` drops every earlier value); from a trusted one each is extended.
pub fn set_forwarding(headers: &mut HeaderMap, hop: &Hop<'_>) {
    let peer = hop.peer;
    let xff = if hop.trusted {
        joined(headers, &X_FORWARDED_FOR)
    } else {
        None
    };
    match xff {
        Some(mut chain) => {
            chain.push_str(", ");
            chain.push_str(peer.xff.to_str().unwrap_or(""));
            insert_string(headers, &X_FORWARDED_FOR, chain);
        }
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), peer.xff.clone());
        }
    }

    if !hop.trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(hop.proto));
    }
    if !hop.trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        match hop.host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST.clone(), host.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }

    let earlier = if hop.trusted { joined(headers, &FORWARDED) } else { None };
    set_forwarded(headers, hop, earlier);
}

/// Replaces `Forwarded` with this hop's element alone, dropping what a
/// trusted proxy wrote before it (on caching routes its `host=` would be
/// an input no cache key holds).
pub fn set_forwarded_this_hop(headers: &mut HeaderMap, hop: &Hop<'_>) {
    set_forwarded(headers, hop, None);
}

/// `Forwarded` (RFC 7239): `earlier` elements, then `for=node;host="...";proto=...`.
fn set_forwarded(headers: &mut HeaderMap, hop: &Hop<'_>, earlier: Option<String>) {
    let peer = hop.peer;
    let host = hop.host.and_then(|h| h.to_str().ok());
    let mut value = String::with_capacity(
        earlier.as_ref().map_or(0, |e| e.len() + 2) + peer.forwarded_for.len() + host.map_or(0, str::len) + 24,
    );
    if let Some(earlier) = &earlier {
        value.push_str(earlier);
        value.push_str(", ");
    }
    value.push_str(&peer.forwarded_for);
    if let Some(host) = host {
        value.push_str(";host=");
        quoted(&mut value, host);
    }
    value.push_str(";proto=");
    value.push_str(hop.proto);
    insert_string(headers, &FORWARDED, value);
}

/// All values of a field joined with ", " (None if absent or not text).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for value in headers.get_all(name) {
        let text = value.to_str().ok()?.trim();
        if text.is_empty() {
            continue;
        }
        match &mut out {
            Some(s) => {
                s.push_str(", ");
                s.push_str(text);
            }
            None => out = Some(text.to_owned()),
        }
    }
    out
}

/// Inserts a value built in a `String` without copying it again.
fn insert_string(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Writes an RFC 9110 quoted-string.
fn quoted(out: &mut String, text: &str) {
    if !text.contains(['"', '\\']) {
        out.push('"');
        out.push_str(text);
        out.push('"');
        return;
    }
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip, trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ]);
        let trailers = strip_hop_by_hop(&mut h, false);
        assert!(trailers);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn connection_tokens_are_case_insensitive_and_may_repeat() {
        let mut h = map(&[
            ("connection", "Keep-Alive"),
            ("connection", " X-A ,x-b"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        assert!(!strip_hop_by_hop(&mut h, false));
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-c"]);
    }

    #[test]
    fn upgrade_keeps_upgrade_and_connection() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn connection_cannot_strip_host() {
        let mut h = map(&[
            ("connection", "host, content-length"),
            ("host", "a"),
            ("content-length", "3"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key("host") && h.contains_key("content-length"));
    }

    #[test]
    fn request_trailers_keep_only_what_a_trailer_may_carry() {
        let mut h = map(&[
            ("x-checksum", "42"),
            ("grpc-status", "0"),
            ("host", "evil"),
            ("content-length", "9"),
            ("content-type", "x"),
            ("if-match", "*"),
            ("authorization", "Basic x"),
            ("cookie", "a=b"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("proxy-authorization", "x"),
            ("x-client-cert-subject", "CN=admin"),
        ]);
        clean_request_trailers(&mut h, &[HeaderName::from_static("x-client-cert-subject")]);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-checksum", "grpc-status"]);
    }

    #[test]
    fn connection_cannot_strip_kept_fields() {
        let id = HeaderName::from_static("x-request-id");
        let mut h = map(&[
            ("connection", "x-request-id, x-other"),
            ("x-request-id", "1"),
            ("x-other", "2"),
        ]);
        strip_hop_by_hop_keeping(&mut h, false, &[&id]);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-request-id"]);
    }

    #[test]
    fn untrusted_peer_headers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let host = HeaderValue::from_static("example.com");
        set_forwarding(
            &mut h,
            &Hop {
                peer: &Peer::new("10.1.2.3".parse().expect("ip")),
                trusted: false,
                proto: "http",
                host: Some(&host),
            },
        );
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["forwarded"], "for=10.1.2.3;host=\"example.com\";proto=http");
    }

    #[test]
    fn trusted_peer_headers_are_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.1.1.1;proto=https"),
        ]);
        let host = HeaderValue::from_static("a.test:8080");
        set_forwarding(
            &mut h,
            &Hop {
                peer: &Peer::new("::1".parse().expect("ip")),
                trusted: true,
                proto: "http",
                host: Some(&host),
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.test:8080");
        assert_eq!(
            h["forwarded"],
            "for=1.1.1.1;proto=https, for=\"[::1]\";host=\"a.test:8080\";proto=http"
        );
    }
}
