//! validate: what hyper's parser does not enforce itself, before anything
//! depends on the request: the method allow-list (501), the target and
//! header limits (414, 431), framing (501, and 400 for an upgrade that
//! declares a body), a valid host (400), and the path in its normal form
//! (`crate::target`; ambiguous paths 400). A redirect-to-HTTPS listener
//! answers here too.

use std::borrow::Cow;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::context::{Checked, Exchange};
use super::respond::error_response;
use crate::body::ProxyBody;
use crate::config::{Config, Limits};
use crate::error::ProxyError;
use crate::forwarding;

/// Marks an HTTP/1.1 request whose head had both `Content-Length` and
/// `Transfer-Encoding` (hyper keeps only the latter, so the connection
/// sees it in the raw bytes and marks the request).
#[derive(Debug, Clone, Copy)]
pub struct ConflictingFraming;

/// The `validate` phase: refuses what must not go further, normalises the
/// path, and says what the request is.
pub(super) fn request(req: &mut Request<Incoming>, config: &Config) -> Result<Checked, ProxyError> {
    if req.extensions().get::<ConflictingFraming>().is_some() {
        // RFC 9112 6.1 allows refusing it: a proxy should (hyper has
        // already marked the connection to close after this response).
        return Err(ProxyError::BadRequest);
    }
    if !config.server.allowed_methods.contains(req.method()) {
        return Err(ProxyError::MethodNotImplemented);
    }
    limits(req, &config.limits)?;
    let host = request_host(req)?;
    let kind = exchange_kind(req, &config.server.upgrade_protocols);
    if kind.is_upgrade() && declares_body(req)? {
        // A tunnel carries no request body: the declared bytes would be
        // read by the origin as the next request (request smuggling).
        return Err(ProxyError::BadRequest);
    }
    let raw_target = normalize_target(req, config.server.encoded_slash)?;
    Ok(Checked { host, kind, raw_target })
}

/// `308 Permanent Redirect` to the same host, path and query over HTTPS
/// (308 keeps the method and body, unlike 301).
pub(super) fn redirect_to_https(req: &Request<Incoming>, port: u16) -> Response<ProxyBody> {
    let Ok(Some(host)) = request_host(req) else {
        return error_response(ProxyError::BadRequest);
    };
    let host = host.to_str().ok().map(|h| match h.rfind(':') {
        Some(i) if !h.ends_with(']') => &h[..i],
        _ => h,
    });
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return error_response(ProxyError::BadRequest);
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            response.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => return error_response(ProxyError::BadRequest),
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

/// An upgrade (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT) counts as one
/// only for a protocol in `server.upgrade_protocols`; an HTTP/1.1 request
/// asking for another is served as a plain request (RFC 9110 section 7.8:
/// a server may ignore `Upgrade`), an extended CONNECT for another is a
/// plain CONNECT.
fn exchange_kind(req: &Request<Incoming>, allowed: &[String]) -> Exchange {
    let allowed_protocol = |name: &str| allowed.iter().any(|p| p.eq_ignore_ascii_case(name.trim()));
    if req.method() == Method::CONNECT {
        match req.extensions().get::<hyper::ext::Protocol>() {
            Some(protocol) if allowed_protocol(protocol.as_str()) => Exchange::ExtendedConnect,
            _ => Exchange::Connect,
        }
    } else if req.version() <= Version::HTTP_11
        && forwarding::is_upgrade_request(req.headers())
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .all(|v| v.to_str().is_ok_and(|text| text.split(',').all(allowed_protocol)))
    {
        Exchange::Upgrade
    } else {
        Exchange::Plain
    }
}

/// True when the request declares a body (`Content-Length` above zero, or
/// any `Transfer-Encoding`).
fn declares_body(req: &Request<Incoming>) -> Result<bool, ProxyError> {
    Ok(req.headers().contains_key(header::TRANSFER_ENCODING) || content_length(req)?.is_some_and(|n| n > 0))
}

/// Replaces the request's path with its normal form ([`crate::target`]);
/// returns the target as the client sent it when that changed anything.
/// A path that cannot be normalised safely is a bad request.
fn normalize_target(
    req: &mut Request<Incoming>,
    encoded_slash: crate::target::EncodedSlash,
) -> Result<Option<PathAndQuery>, ProxyError> {
    let uri = req.uri();
    // An absolute-form target without a path (`GET http://host?x`) names `/`.
    let empty = uri.path().is_empty() && uri.authority().is_some() && req.method() != Method::CONNECT;
    let normal = match crate::target::normalize_path(uri.path(), encoded_slash) {
        Ok(Cow::Borrowed(_)) if empty => "/".to_owned(),
        Ok(Cow::Borrowed(_)) => return Ok(None),
        Ok(Cow::Owned(normal)) => normal,
        Err(why) => {
            tracing::debug!(phase = "validate", path = %uri.path(), %why, "request path refused");
            return Err(ProxyError::BadRequest);
        }
    };
    let raw = uri.path_and_query().cloned();
    let mut target = normal;
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(target).map_err(|_| ProxyError::BadRequest)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest)?;
    Ok(raw)
}

/// Limits and framing rules that hyper's parser does not enforce itself.
fn limits(req: &Request<Incoming>, limits: &Limits) -> Result<(), ProxyError> {
    // Request smuggling. With both Content-Length and Transfer-Encoding,
    // hyper reads the body as chunked, drops Content-Length and closes the
    // connection after the response (RFC 9112 6.1), so nothing can follow
    // on it. The only transfer coding forwarded is `chunked` alone: others
    // would reach the upstream still encoded (RFC 9112 6.1: 501).
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let only_chunked =
            codings.next().is_none() && first.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !only_chunked {
            return Err(ProxyError::TransferCodingNotImplemented);
        }
    }
    let uri = req.uri();
    let target_len =
        uri.path_and_query().map_or(0, |p| p.as_str().len()) + uri.authority().map_or(0, |a| a.as_str().len());
    if target_len > limits.max_uri_length {
        return Err(ProxyError::UriTooLong);
    }
    if req.headers().len() > limits.max_header_count {
        return Err(ProxyError::HeadersTooLarge);
    }
    let mut head_bytes = req.method().as_str().len() + target_len + 12;
    for (name, value) in req.headers() {
        head_bytes += name.as_str().len() + value.len() + 4;
    }
    if head_bytes > limits.max_request_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// The host the client asked for: `:authority` on HTTP/2, `Host` on
/// HTTP/1.1 (exactly one, and agreeing with an absolute-form target),
/// valid as RFC 3986 `host [ ":" port ]` ([`crate::target::valid_authority`]).
fn request_host(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let host = request_host_unchecked(req)?;
    match &host {
        Some(h) if !crate::target::valid_authority(h.as_bytes()) => Err(ProxyError::BadRequest),
        _ => Ok(host),
    }
}

fn request_host_unchecked(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let authority = req.uri().authority();
    if req.version() == Version::HTTP_2 {
        return match authority {
            Some(a) => HeaderValue::from_str(a.as_str())
                .map(Some)
                .map_err(|_| ProxyError::BadRequest),
            None => Ok(req.headers().get(header::HOST).cloned()),
        };
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest);
    }
    match (host, authority) {
        (None, _) if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest),
        (Some(h), Some(a)) if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) => Err(ProxyError::BadRequest),
        (Some(h), _) if h.is_empty() || h.as_bytes().iter().any(|b| b.is_ascii_whitespace()) => {
            Err(ProxyError::BadRequest)
        }
        (Some(h), _) => Ok(Some(h.clone())),
        (None, Some(a)) => HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest),
        (None, None) => Ok(None),
    }
}

/// The declared body length; a malformed `Content-Length` is a bad request
/// (hyper already refuses conflicting values on HTTP/1.1).
pub(super) fn content_length(req: &Request<Incoming>) -> Result<Option<u64>, ProxyError> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest),
    }
}
