//! rewrite: the request as the upstream receives it. [`fields`] is the
//! part that does not depend on the server chosen (hop-by-hop fields,
//! forwarding fields, `Via`, client-certificate identity, unkeyed fields on
//! caching routes, route edits); on caching routes it runs before the cache
//! phase, so keys and `Vary` see what the origin sees. [`target`] is the
//! part that depends on the group (the target, version and `Host`).

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Version};
use tokio::time::Instant;

use super::ConnInfo;
use super::context::{Exchange, Outbound, RawTarget};
use crate::body::RequestBody;
use crate::config::{RouteConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::forwarding::{self, Hop};
use crate::state::Snapshot;
use crate::upstream::Upstream;

/// The group-dependent part of rewrite: an extended CONNECT becomes the
/// HTTP/1.1 upgrade it stands for, the target gets the route's prefix
/// rewrite (or the client's raw target), and the version and `Host` are
/// the group's.
pub(super) fn target(
    parts: &mut http::request::Parts,
    route: &RouteConfig,
    upstream: &Upstream,
    outbound: &Outbound<'_>,
) -> Result<(), ProxyError> {
    if outbound.kind == Exchange::ExtendedConnect {
        extended_connect_to_upgrade(parts);
    }
    let raw = parts.extensions.remove::<RawTarget>();
    parts.uri = upstream_uri(
        &parts.uri,
        raw.as_ref().map(|r| &r.0),
        route,
        upstream.config.protocol,
        outbound.host,
        outbound.kind == Exchange::Connect,
        upstream.config.tls.is_some(),
    )?;
    parts.version = match upstream.config.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2 => Version::HTTP_2,
    };
    set_upstream_host(parts, upstream.config.protocol, outbound.host);
    Ok(())
}

/// rewrite, the part that does not depend on the server chosen: the
/// request's fields as the upstream will see them (hop-by-hop removed,
/// forwarding fields, `Via`, the client certificate's fields, the route's
/// edits). Done before the cache phase, so cache keys and `Vary` see what
/// the origin sees.
pub(super) fn fields(
    headers: &mut http::HeaderMap,
    version: Version,
    kind: Exchange,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    route: &RouteConfig,
    host: Option<&HeaderValue>,
) {
    let traceparent = HeaderName::from_static("traceparent");
    match &snapshot.config.request_id.header {
        Some(id) => forwarding::strip_hop_by_hop_keeping(headers, kind == Exchange::Upgrade, &[id, &traceparent]),
        None => forwarding::strip_hop_by_hop_keeping(headers, kind == Exchange::Upgrade, &[&traceparent]),
    };
    headers.remove(header::EXPECT);
    forwarding::set_forwarding(
        headers,
        &Hop {
            peer: &conn.forwarded,
            trusted: conn.trusted,
            proto: conn.scheme,
            host,
        },
    );
    if let Some(options) = &route.cache {
        // What the cache key does not hold must not change the answer.
        for name in &options.unkeyed {
            headers.remove(name);
        }
        if conn.trusted {
            if !options.keyed_forwarded_host {
                match host {
                    Some(h) => headers.insert(forwarding::X_FORWARDED_HOST.clone(), h.clone()),
                    None => headers.remove(&forwarding::X_FORWARDED_HOST),
                };
            }
            if !options.keyed_forwarded {
                forwarding::set_forwarded_this_hop(
                    headers,
                    &Hop {
                        peer: &conn.forwarded,
                        trusted: true,
                        proto: conn.scheme,
                        host,
                    },
                );
            }
        }
    }
    if let Some(via) = &snapshot.via {
        forwarding::append_via(headers, &via[via_index(version)]);
    }
    // Only the proxy vouches for a client certificate: the identity
    // fields of every listener are removed, whichever listener this is.
    for name in &snapshot.identity_headers {
        headers.remove(name);
    }
    if let (Some((subject_header, fingerprint_header)), Some((subject, fingerprint))) =
        (&conn.client_cert_headers, &conn.client_cert)
    {
        headers.insert(subject_header.clone(), subject.clone());
        headers.insert(fingerprint_header.clone(), fingerprint.clone());
    }
    route.request_headers.apply(headers);
}

/// The request target for the upstream: origin-form for HTTP/1.1,
/// absolute for HTTP/2, with the route's prefix rewrite applied.
fn upstream_uri(
    original: &Uri,
    raw: Option<&PathAndQuery>,
    route: &RouteConfig,
    protocol: UpstreamProtocol,
    host: Option<&HeaderValue>,
    is_connect: bool,
    tls: bool,
) -> Result<Uri, ProxyError> {
    if is_connect {
        // authority-form, as the client sent it
        return Ok(original.clone());
    }
    let path_and_query = match &route.rewrite_prefix {
        Some(replacement) => {
            let path = original.path();
            let rest = path.get(route.path.len()..).unwrap_or("");
            let mut new = String::with_capacity(replacement.len() + rest.len() + 16);
            new.push_str(replacement);
            if replacement.ends_with('/') {
                new.push_str(rest.strip_prefix('/').unwrap_or(rest));
            } else {
                new.push_str(rest);
            }
            if let Some(query) = original.query() {
                new.push('?');
                new.push_str(query);
            }
            PathAndQuery::try_from(new).map_err(|_| ProxyError::BadRequest)?
        }
        None => match raw.or(original.path_and_query()) {
            Some(pq) => pq.clone(),
            None => PathAndQuery::from_static("/"),
        },
    };
    match protocol {
        UpstreamProtocol::Http1 => {
            if raw.is_none()
                && route.rewrite_prefix.is_none()
                && original.scheme().is_none()
                && original.authority().is_none()
            {
                return Ok(original.clone());
            }
            Ok(Uri::from(path_and_query))
        }
        UpstreamProtocol::H2 => {
            let authority = host.and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            Uri::builder()
                .scheme(if tls { "https" } else { "http" })
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
                .map_err(|_| ProxyError::BadRequest)
        }
    }
}

/// Sets `Host` (HTTP/1.1) for the client's host; HTTP/2 carries it in the
/// URI's authority, set by [`upstream_uri`].
fn set_upstream_host(parts: &mut http::request::Parts, protocol: UpstreamProtocol, host: Option<&HeaderValue>) {
    match (protocol, host) {
        (UpstreamProtocol::Http1, Some(h)) => {
            parts.headers.insert(header::HOST, h.clone());
        }
        (UpstreamProtocol::Http1, None) | (UpstreamProtocol::H2, _) => {
            parts.headers.remove(header::HOST);
        }
    }
}

/// `preserve_host = false`: the chosen server's `host:port` instead.
pub(super) fn set_server_host(req: &mut Request<RequestBody>, protocol: UpstreamProtocol, server_host: &HeaderValue) {
    match protocol {
        UpstreamProtocol::Http1 => {
            req.headers_mut().insert(header::HOST, server_host.clone());
        }
        UpstreamProtocol::H2 => {
            let mut parts = req.uri().clone().into_parts();
            if let Ok(authority) = http::uri::Authority::try_from(server_host.as_bytes()) {
                parts.authority = Some(authority);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}

/// Rewrites an extended CONNECT into the HTTP/1.1 upgrade request it
/// stands for (RFC 8441 section 5): `GET` with `Upgrade: <protocol>`, and
/// for WebSocket a fresh `Sec-WebSocket-Key` (the HTTP/2 side has none).
fn extended_connect_to_upgrade(parts: &mut http::request::Parts) {
    let protocol = parts
        .extensions
        .remove::<hyper::ext::Protocol>()
        .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
        .unwrap_or(HeaderValue::from_static("websocket"));
    parts.method = Method::GET;
    if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
    }
    parts.headers.insert(header::UPGRADE, protocol);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// A WebSocket handshake nonce: 16 unpredictable bytes, base64.
fn websocket_key() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
        half.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

pub(super) fn via_index(version: Version) -> usize {
    match version {
        Version::HTTP_09 | Version::HTTP_10 => 0,
        Version::HTTP_11 => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_16_bytes_of_base64_and_differ() {
        let a = websocket_key();
        let b = websocket_key();
        assert_eq!(a.len(), 24);
        assert!(a.to_str().expect("ascii").ends_with("=="));
        assert_ne!(a, b);
    }
}
