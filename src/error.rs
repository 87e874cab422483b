//! The proxy's error type: what failed ([`ProxyError`]), which side
//! ([`ProxyError::side`]), mapped to a status code and an RFC 9209
//! `Proxy-Status` error type in one place ([`ProxyError::status`]). The
//! response itself is built by the pipeline's respond phase; this module
//! knows nothing of bodies.
//!
//! Error responses are short plain text and never carry internal details
//! (addresses, OS error strings): those go to the log.

use http::{HeaderValue, StatusCode};

/// Why the proxy answered instead of the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    // Downstream (the client's request is at fault).
    #[error("malformed request")]
    BadRequest,
    #[error("request header section too large")]
    HeadersTooLarge,
    #[error("request target too long")]
    UriTooLong,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request body arrived too slowly")]
    RequestTimeout,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("method not implemented")]
    MethodNotImplemented,
    #[error("transfer coding not implemented")]
    TransferCodingNotImplemented,
    #[error("no route matches the request")]
    NoRoute,
    #[error("client address not allowed")]
    Forbidden,
    #[error("client banned")]
    Banned,
    #[error("only-if-cached and nothing suitable is stored")]
    OnlyIfCached,
    #[error("rate limit exceeded")]
    RateLimited {
        /// Seconds until a request would be allowed (for `Retry-After`).
        retry_after: u32,
    },

    // Upstream (the origin or the path to it failed).
    #[error("upstream refused the connection")]
    ConnectionRefused,
    #[error("upstream connect timed out")]
    ConnectionTimeout,
    #[error("upstream closed the connection before responding")]
    ConnectionTerminated,
    #[error("upstream name resolution failed")]
    DnsError,
    #[error("no upstream address is reachable")]
    DestinationUnavailable,
    #[error("upstream response headers timed out")]
    ResponseTimeout,
    #[error("upstream sent an invalid response")]
    UpstreamProtocol,
    #[error("upstream refused the upgrade")]
    UpgradeFailed,
    #[error("upstream TLS certificate rejected")]
    TlsCertificate,
    #[error("upstream TLS handshake failed")]
    TlsProtocol,
    #[error("no healthy server in the upstream group")]
    NoHealthyServer,
    #[error("upstream group or server at its request limit")]
    ConnectionLimit,
    #[error("upstream group at its adaptive concurrency limit (load shed)")]
    Overloaded {
        /// Seconds after which to try again (for `Retry-After`).
        retry_after: u32,
    },

    // Internal.
    #[error("proxy internal error")]
    Internal,
    /// The proxy ran out of file descriptors, buffers or local ports.
    #[error("proxy out of local resources (file descriptors, ports or memory)")]
    LocalResources,
}

impl ProxyError {
    /// The status code and RFC 9209 error type; `None` for errors the client
    /// caused, which get no `Proxy-Status` error (RFC 9209 section 2.1.1).
    pub fn status(self) -> (StatusCode, Option<&'static str>) {
        use ProxyError::*;
        match self {
            BadRequest => (StatusCode::BAD_REQUEST, Some("http_request_error")),
            HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, Some("http_request_error")),
            UriTooLong => (StatusCode::URI_TOO_LONG, Some("http_request_error")),
            BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Some("http_request_error")),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, Some("http_request_error")),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, Some("http_request_denied")),
            MethodNotImplemented => (StatusCode::NOT_IMPLEMENTED, Some("http_request_denied")),
            TransferCodingNotImplemented => (StatusCode::NOT_IMPLEMENTED, Some("http_request_error")),
            NoRoute => (StatusCode::NOT_FOUND, Some("destination_not_found")),
            Forbidden | Banned => (StatusCode::FORBIDDEN, Some("http_request_denied")),
            // RFC 9111 section 5.2.1.7: 504, and not an upstream failure.
            OnlyIfCached => (StatusCode::GATEWAY_TIMEOUT, None),
            RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, Some("http_request_denied")),
            ConnectionRefused => (StatusCode::BAD_GATEWAY, Some("connection_refused")),
            ConnectionTimeout => (StatusCode::GATEWAY_TIMEOUT, Some("connection_timeout")),
            ConnectionTerminated => (StatusCode::BAD_GATEWAY, Some("connection_terminated")),
            DnsError => (StatusCode::BAD_GATEWAY, Some("dns_error")),
            DestinationUnavailable => (StatusCode::BAD_GATEWAY, Some("destination_unavailable")),
            ResponseTimeout => (StatusCode::GATEWAY_TIMEOUT, Some("http_response_timeout")),
            UpstreamProtocol => (StatusCode::BAD_GATEWAY, Some("http_protocol_error")),
            UpgradeFailed => (StatusCode::BAD_GATEWAY, Some("http_upgrade_failed")),
            TlsCertificate => (StatusCode::BAD_GATEWAY, Some("tls_certificate_error")),
            TlsProtocol => (StatusCode::BAD_GATEWAY, Some("tls_protocol_error")),
            NoHealthyServer => (StatusCode::SERVICE_UNAVAILABLE, Some("destination_unavailable")),
            ConnectionLimit => (StatusCode::SERVICE_UNAVAILABLE, Some("connection_limit_reached")),
            Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, Some("connection_limit_reached")),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, Some("proxy_internal_error")),
            LocalResources => (StatusCode::SERVICE_UNAVAILABLE, Some("proxy_internal_error")),
        }
    }

    /// Which side failed: the client's request, the upstream (or the path
    /// to it), or the proxy itself. Decided per kind, never from the
    /// status (a 504 can be the origin's slowness or a client's
    /// `only-if-cached`).
    pub fn side(self) -> Side {
        use ProxyError::*;
        match self {
            BadRequest
            | HeadersTooLarge
            | UriTooLong
            | BodyTooLarge
            | RequestTimeout
            | MethodNotAllowed
            | MethodNotImplemented
            | TransferCodingNotImplemented
            | NoRoute
            | Forbidden
            | Banned
            | OnlyIfCached
            | RateLimited { .. } => Side::Downstream,
            ConnectionRefused
            | ConnectionTimeout
            | ConnectionTerminated
            | DnsError
            | DestinationUnavailable
            | ResponseTimeout
            | UpstreamProtocol
            | UpgradeFailed
            | TlsCertificate
            | TlsProtocol
            | NoHealthyServer
            | ConnectionLimit
            | Overloaded { .. } => Side::Upstream,
            Internal | LocalResources => Side::Proxy,
        }
    }

    /// True when the failure is on the upstream side.
    pub fn is_upstream(self) -> bool {
        self.side() == Side::Upstream
    }
}

/// Which side of the proxy an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request was refused or broken.
    Downstream,
    /// The upstream, or the path to it, failed.
    Upstream,
    /// The proxy itself (out of resources, a bug).
    Proxy,
}

pub static PROXY_STATUS: http::HeaderName = http::HeaderName::from_static("proxy-status");

pub fn proxy_status_value(kind: &'static str) -> HeaderValue {
    // Built from static parts only: no allocation-time failure is possible,
    // but fall back to the bare name rather than panic.
    HeaderValue::from_str(&format!("portcullis; error={kind}")).unwrap_or(HeaderValue::from_static("portcullis"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_upstream_error_is_upstream_and_has_a_proxy_status_type() {
        use ProxyError::*;
        for e in [
            ConnectionRefused,
            ConnectionTimeout,
            ConnectionTerminated,
            DnsError,
            ResponseTimeout,
            UpstreamProtocol,
        ] {
            assert!(e.status().0.is_server_error());
            assert!(e.status().1.is_some());
            assert!(e.is_upstream());
        }
        assert!(!BadRequest.is_upstream());
        assert_eq!(OnlyIfCached.side(), Side::Downstream, "a 504 the client asked for");
        assert_eq!(LocalResources.side(), Side::Proxy, "a 503 of the proxy's own");
    }
}
