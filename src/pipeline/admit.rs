//! admit: what a request may bring. A declared body over the limit is
//! refused (413) before a byte of it is read (and before `100 Continue`);
//! an upgrade to an HTTP/2 group is refused (502); the body that goes on is
//! counted against the limit and the minimum rate, and a small one is read
//! whole ([`buffer`]) before load shedding and the choice of an upstream,
//! so a slow client costs the proxy a buffer and a timer, never an origin
//! connection. Load shedding, the other half of the phase, is
//! `protect::check_load`.

use http::Request;
use hyper::body::Incoming;

use super::context::Exchange;
use super::record::Trace;
use super::validate::content_length;
use crate::body::RequestBody;
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::state::Snapshot;

/// The `admit` phase's refusals.
pub(super) fn admit(
    req: &Request<Incoming>,
    snapshot: &Snapshot,
    route_index: usize,
    kind: Exchange,
) -> Result<(), ProxyError> {
    let config = &snapshot.config;
    if let (Some(limit), Some(declared)) = (config.limits.max_request_body_bytes, content_length(req)?) {
        if declared > limit {
            return Err(ProxyError::BodyTooLarge);
        }
    }
    let upstream = &snapshot.upstreams[config.routes[route_index].upstream];
    if kind.is_upgrade() && upstream.config.protocol == UpstreamProtocol::H2 {
        // Tunnels to HTTP/2 upstreams would need extended CONNECT upstream,
        // which origins rarely enable: refused plainly instead.
        return Err(ProxyError::UpgradeFailed);
    }
    Ok(())
}

/// The client's body as it goes upstream: none for a tunnel, else counted
/// against `max_request_body_bytes`, into the access log, and against
/// `protect.min_body_rate`, with its trailers cleaned.
pub(super) fn request_body(body: Incoming, snapshot: &Snapshot, kind: Exchange, trace: &Trace) -> RequestBody {
    if kind.is_upgrade() {
        return RequestBody::empty();
    }
    let config = &snapshot.config;
    RequestBody::new(body, config.limits.max_request_body_bytes)
        .owned_fields(snapshot.owned_fields.clone())
        .counted(trace.bytes_in.clone())
        .min_rate(
            config
                .protect
                .min_body_rate
                .map(|rate| (rate, config.protect.body_rate_grace)),
        )
}

/// Reads a request body of at most `limits.buffer_request_body` bytes
/// whole before the request goes on, and the first
/// `buffer_request_body` bytes of a longer one (which streams the rest
/// after them), against the process's buffer memory
/// (`limits.request_buffer_memory`) and by `deadline`: a body that
/// trickles never reaches an origin. Refusals: 408 for a body too
/// slow (`min_body_rate`) or not complete by the deadline, 413 over the
/// size limit, 503 when the buffer memory is all in use, 400 when the
/// client went away.
pub(super) async fn buffer(
    body: &mut RequestBody,
    snapshot: &Snapshot,
    kind: Exchange,
    deadline: tokio::time::Instant,
) -> Result<(), ProxyError> {
    let max = snapshot.config.limits.buffer_request_body;
    if max == 0 || kind.is_upgrade() || http_body::Body::is_end_stream(body) {
        return Ok(());
    }
    match tokio::time::timeout_at(deadline, body.prefetch(max, &snapshot.body_budget)).await {
        Err(_) => Err(ProxyError::RequestTimeout),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(if error.is::<crate::body::BufferFull>() {
            if let Some(left_out) = crate::observe::diag::SHED.admit_now() {
                tracing::warn!(
                    phase = "admit",
                    left_out,
                    "request refused: the request buffer memory is all in use"
                );
            }
            ProxyError::Overloaded { retry_after: 1 }
        } else if error.is::<crate::body::BodyTooSlow>() {
            ProxyError::RequestTimeout
        } else if error.is::<crate::body::BodyTooLarge>() {
            ProxyError::BodyTooLarge
        } else {
            ProxyError::BadRequest
        }),
    }
}
