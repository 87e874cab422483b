//! respond: the fields the proxy adds to every response it sends (`Via`,
//! the route's edits, the sticky-session cookie: [`decorate`], [`sticky`]),
//! and what the client gets when the proxy answers itself, an error of any
//! phase, built in one place from the error's kind ([`error_response`]).

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, Version};

use super::exchange::Picked;
use super::rewrite::via_index;
use crate::body::ProxyBody;
use crate::config::RouteConfig;
use crate::error::{PROXY_STATUS, ProxyError, proxy_status_value};
use crate::forwarding;
use crate::state::Snapshot;
use crate::upstream::Upstream;

/// `Via` and the route's response edits, on the origin's response and on
/// one the cache made alike.
pub(super) fn decorate(headers: &mut HeaderMap, snapshot: &Snapshot, route: &RouteConfig, version: Version) {
    if let Some(via) = &snapshot.via {
        forwarding::append_via(headers, &via[via_index(version)]);
    }
    route.response_headers.apply(headers);
}

/// The sticky-session cookie, when the group pins clients and this one
/// was not pinned to the server that answered.
pub(super) fn sticky(headers: &mut HeaderMap, upstream: &Upstream, picked: &Picked) {
    let Some(cookie) = &upstream.config.sticky_cookie else {
        return;
    };
    let id = &upstream.servers[picked.server].sticky_id;
    if picked.pinned.as_deref() == Some(id.as_str()) {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{cookie}={id}; Path=/; HttpOnly; SameSite=Lax")) {
        headers.append(header::SET_COOKIE, v);
    }
}

/// The response the client sees for `error`: a short plain-text body
/// that leaks nothing, `Proxy-Status` with the RFC 9209 error type, and the
/// fields some errors need (`Retry-After`, `Allow`, `Connection: close`).
pub fn error_response(error: ProxyError) -> Response<ProxyBody> {
    let (status, kind) = error.status();
    let text = format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or("Error"));
    let mut response = Response::new(ProxyBody::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(kind) = kind {
        headers.insert(PROXY_STATUS.clone(), proxy_status_value(kind));
    }
    if matches!(error, ProxyError::RequestTimeout | ProxyError::Banned) {
        // The rest of the body is still on its way: the connection
        // cannot carry another request. A banned client's next
        // connection is closed at accept, the cheapest refusal.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let ProxyError::RateLimited { retry_after } | ProxyError::Overloaded { retry_after } = error {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    if matches!(error, ProxyError::MethodNotAllowed) {
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_upstream_error_has_a_proxy_status() {
        use ProxyError::*;
        for e in [
            ConnectionRefused,
            ConnectionTimeout,
            ConnectionTerminated,
            DnsError,
            ResponseTimeout,
            UpstreamProtocol,
        ] {
            let r = error_response(e);
            assert!(r.status().is_server_error());
            let ps = r.headers()[&PROXY_STATUS].to_str().expect("ascii");
            assert!(ps.starts_with("portcullis; error="), "{ps}");
        }
        let limited = error_response(RateLimited { retry_after: 3 });
        assert_eq!(limited.headers()[header::RETRY_AFTER], "3");
    }
}
