//! Whether a shared cache may store a response (RFC 9111 section 3), which
//! of its header fields it must leave out (section 3.1) and how a 304
//! updates a stored response's fields (section 3.2).
//!
//! [`storable`] returns the reason a response is refused as a [`NotStored`]
//! whose [`NotStored::detail`] is a short token for the `detail` parameter
//! of `Cache-Status` (RFC 9211 section 2.8). This cache stores responses to
//! GET only (a HEAD can later be answered from a stored GET), never partial
//! (206) responses, and only final statuses.

use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE, ETAG, EXPIRES, LAST_MODIFIED, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, Method, StatusCode};

use super::control::{CacheControl, ResponseControl, request_control, response_control, trim_ows};
use super::freshness::is_heuristically_cacheable;
use super::vary::Vary;

#[cfg(test)]
mod tests;

/// Storage policy choices that the RFC leaves to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Store responses that have no explicit expiration but a heuristically
    /// cacheable status or `public` (section 4.2.2). Off, only explicit
    /// freshness (`s-maxage`, `max-age`, `Expires`) makes a response storable.
    pub heuristic: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings { heuristic: true }
    }
}

/// Why a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotStored {
    #[error("request method is not GET")]
    Method,
    #[error("response status is not storable")]
    Status,
    #[error("no-store in the request or response")]
    NoStore,
    #[error("response is private")]
    Private,
    #[error("request has Authorization and the response does not allow a shared cache to store it")]
    Authorization,
    #[error("must-understand with a status code the cache does not implement")]
    MustUnderstand,
    #[error("Vary: * never matches a later request")]
    VaryAny,
    #[error("response has no explicit freshness and no validator")]
    NoFreshness,
}

impl NotStored {
    /// A short token for `Cache-Status: ...; detail=...`.
    pub fn detail(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Authorization => "authorization",
            NotStored::MustUnderstand => "must-understand",
            NotStored::VaryAny => "vary-star",
            NotStored::NoFreshness => "no-freshness",
        }
    }
}

/// What the caller needs to store a response it was allowed to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storable {
    /// The directives the cache obeys for this response (RFC 9213).
    pub control: ResponseControl,
    /// The response's `Vary`.
    pub vary: Vary,
    /// Header fields present in the response that must not be stored.
    pub omit: Vec<HeaderName>,
}

/// Statuses whose caching requirements this cache implements, for
/// `must-understand` (section 5.2.2.3): those RFC 9110 defines, except 206
/// and 304, which it never stores.
fn understands_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200..=205 | 300..=303 | 305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505
    )
}

/// Decides whether a shared cache may store a response (section 3), in
/// this order: method (GET), status (final, not 206 or 304), `no-store` in
/// the request, `must-understand` / `no-store` in the response, `private`,
/// `Authorization` (section 3.5), `Vary: *`, and a source of freshness:
/// explicit, or a heuristically cacheable status (or `public`) with a
/// validator (`ETag` or `Last-Modified`). That last condition is stricter
/// than section 3 (which would store a 200 with nothing at all): such a
/// response could never be validated, only served stale.
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
    settings: &StoreSettings,
) -> Result<Storable, NotStored> {
    if method != Method::GET {
        return Err(NotStored::Method);
    }
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Err(NotStored::Status);
    }
    if request_control(request).no_store {
        return Err(NotStored::NoStore);
    }
    let control = response_control(response);
    let cc = &control.directives;
    if cc.must_understand {
        // A cache that understands the status ignores no-store (section
        // 5.2.2.3); one that does not must not store at all.
        if !understands_status(status) {
            return Err(NotStored::MustUnderstand);
        }
    } else if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private.is_whole() {
        return Err(NotStored::Private);
    }
    // An s-maxage that was repeated with another value or unreadable does
    // not count as the origin's permission.
    let s_maxage = cc.s_maxage.is_some() && !cc.s_maxage_invalid;
    if request.contains_key(AUTHORIZATION) && !(cc.public || s_maxage || cc.must_revalidate) {
        return Err(NotStored::Authorization);
    }
    let vary = Vary::from_headers(response);
    if vary.is_any() {
        return Err(NotStored::VaryAny);
    }
    let explicit = cc.s_maxage.is_some()
        || cc.s_maxage_invalid
        || cc.max_age.is_some()
        || cc.max_age_invalid
        || (!control.source.is_targeted() && response.contains_key(EXPIRES));
    // Without explicit freshness a response is stored only with a
    // validator: it can then be revalidated (or, with `Last-Modified`,
    // given a heuristic lifetime). One with neither could only ever be
    // served stale, which is how one user's page reached another.
    let validator = response.contains_key(ETAG) || response.contains_key(LAST_MODIFIED);
    let heuristic = settings.heuristic && (is_heuristically_cacheable(status) || cc.public) && validator;
    if !explicit && !heuristic {
        return Err(NotStored::NoFreshness);
    }
    let omit = fields_not_stored(response, cc);
    Ok(Storable { control, vary, omit })
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static PROXY_AUTHENTICATION_INFO: HeaderName = HeaderName::from_static("proxy-authentication-info");

/// The header fields present in `headers` that a shared cache must not
/// store (section 3.1): `Connection` and the fields it names, the other
/// hop-by-hop fields (RFC 9110 section 7.6.1), the proxy authentication
/// fields, and the fields named by qualified `no-cache` and `private`
/// (sections 5.2.2.4 and 5.2.2.7), so that the rest of the response can be
/// stored and reused without them.
pub fn fields_not_stored(headers: &HeaderMap, cc: &CacheControl) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = vec![
        CONNECTION,
        KEEP_ALIVE.clone(),
        PROXY_CONNECTION.clone(),
        TE,
        TRANSFER_ENCODING,
        UPGRADE,
        PROXY_AUTHENTICATE,
        PROXY_AUTHENTICATION_INFO.clone(),
        PROXY_AUTHORIZATION,
    ];
    for line in headers.get_all(CONNECTION) {
        for token in line.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(trim_ows(token)) {
                names.push(name);
            }
        }
    }
    names.extend(cc.no_cache.fields().iter().cloned());
    names.extend(cc.private.fields().iter().cloned());
    let mut present: Vec<HeaderName> = Vec::new();
    for name in names {
        if headers.contains_key(&name) && !present.contains(&name) {
            present.push(name);
        }
    }
    present
}

/// Fields a 304 never replaces in a stored response (section 3.2): the
/// stored content's own framing.
fn keeps_stored_value(name: &HeaderName) -> bool {
    name == CONTENT_LENGTH || name == CONTENT_RANGE
}

/// Freshens a stored response's header fields with those of a 304 (section
/// 3.2): every field of the 304 replaces all stored lines of that name,
/// except the fields that must not be stored and `Content-Length` /
/// `Content-Range`. Fields the updated directives now exclude (a new
/// `no-cache="..."`) are removed from the stored response as well.
pub fn update_from_304(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    let excluded = fields_not_stored(not_modified, &response_control(not_modified).directives);
    for name in not_modified.keys() {
        if excluded.contains(name) || keeps_stored_value(name) {
            continue;
        }
        stored.remove(name);
        for value in not_modified.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
    let control = response_control(stored);
    for name in fields_not_stored(stored, &control.directives) {
        stored.remove(&name);
    }
}
