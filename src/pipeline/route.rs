//! route: host and path (normalised) to a route, and with it an upstream
//! group (`crate::routing`); 404 when nothing matches, 405 for a CONNECT on
//! a route that does not allow it.

use http::Request;
use hyper::body::Incoming;

use super::context::{Checked, Exchange, RawTarget};
use super::record::Trace;
use crate::error::ProxyError;
use crate::state::Snapshot;

/// The `route` phase: the route's index.
pub(super) fn route(
    req: &mut Request<Incoming>,
    checked: &mut Checked,
    snapshot: &Snapshot,
    trace: &mut Trace,
) -> Result<usize, ProxyError> {
    let path = req.uri().path();
    let is_connect = checked.kind == Exchange::Connect;
    // `OPTIONS *` and CONNECT (authority-form) are routed as `/`.
    let lookup_path = if path == "*" || is_connect { "/" } else { path };
    let host = checked.host.as_ref().and_then(|h| h.to_str().ok());
    let index = snapshot.router.route(host, lookup_path).ok_or(ProxyError::NoRoute)?;
    trace.route = Some(index);
    let route = &snapshot.config.routes[index];
    if is_connect && !route.allow_connect {
        return Err(ProxyError::MethodNotAllowed);
    }
    if let (true, Some(raw)) = (route.raw_path, checked.raw_target.take()) {
        req.extensions_mut().insert(RawTarget(raw));
    }
    Ok(index)
}
