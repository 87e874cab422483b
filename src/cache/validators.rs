//! Validators and conditional requests answered by a cache: entity tags
//! ([`EntityTag`], RFC 9110 section 8.8.3) with strong and weak comparison
//! (section 8.8.3.2), `If-None-Match` ([`IfNoneMatch`], section 13.1.2) and
//! `If-Modified-Since` (section 13.1.3), combined by [`not_modified`] in the
//! order of section 13.2.2 to decide whether a stored response can answer a
//! client's conditional request with 304 (RFC 9111 section 4.3.2).
//!
//! `If-Match` and `If-Unmodified-Since` are not applicable to a cache (RFC
//! 9111 section 4.3.2); [`has_origin_only_preconditions`] lets the caller
//! forward such requests instead.

use std::time::SystemTime;

use http::header::{DATE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED};
use http::{HeaderMap, Method};

use super::freshness::http_date;

#[cfg(test)]
mod tests;

/// An entity tag: `W/"opaque"` (weak) or `"opaque"` (strong).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityTag {
    weak: bool,
    opaque: Vec<u8>,
}

/// `etagc = %x21 / %x23-7E / obs-text` (RFC 9110 section 8.8.3).
fn is_etagc(byte: u8) -> bool {
    byte == 0x21 || (0x23..=0x7e).contains(&byte) || byte >= 0x80
}

impl EntityTag {
    /// An entity tag from its opaque part (without quotes), if every byte is
    /// an `etagc`.
    pub fn new(weak: bool, opaque: &[u8]) -> Option<EntityTag> {
        opaque.iter().all(|&b| is_etagc(b)).then(|| EntityTag {
            weak,
            opaque: opaque.to_vec(),
        })
    }

    /// Parses one entity tag, surrounded by optional whitespace and nothing
    /// else. `W/` is case-sensitive (RFC 9110 section 8.8.3).
    pub fn parse(bytes: &[u8]) -> Option<EntityTag> {
        let mut reader = Reader { input: bytes, pos: 0 };
        reader.skip_ows();
        let tag = reader.entity_tag()?;
        reader.skip_ows();
        reader.at_end().then_some(tag)
    }

    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// The opaque part, without quotes.
    pub fn opaque(&self) -> &[u8] {
        &self.opaque
    }

    /// Strong comparison: both strong and the opaque parts equal.
    pub fn strong_eq(&self, other: &EntityTag) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison: the opaque parts equal, weakness ignored.
    pub fn weak_eq(&self, other: &EntityTag) -> bool {
        self.opaque == other.opaque
    }
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// `entity-tag = [ weak ] opaque-tag`.
    fn entity_tag(&mut self) -> Option<EntityTag> {
        let weak = self.input.get(self.pos..).is_some_and(|rest| rest.starts_with(b"W/"));
        if weak {
            self.pos += 2;
        }
        if self.peek()? != b'"' {
            return None;
        }
        self.pos += 1;
        let start = self.pos;
        while self.peek()? != b'"' {
            self.pos += 1;
        }
        let opaque = self.input.get(start..self.pos)?;
        self.pos += 1;
        EntityTag::new(weak, opaque)
    }
}

/// A parsed `If-None-Match` (RFC 9110 section 13.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfNoneMatch {
    /// `*`: matches any current representation.
    Any,
    /// A list of entity tags (possibly empty).
    Tags(Vec<EntityTag>),
    /// Not `*` and not a list of entity tags, in any of its field lines.
    /// It matches nothing: the client then gets the full response, which
    /// is always a correct answer, and a broken list never turns into a 304
    /// the client cannot use.
    Malformed,
}

impl IfNoneMatch {
    /// Parses every `If-None-Match` line; `None` when the field is absent.
    pub fn from_headers(headers: &HeaderMap) -> Option<IfNoneMatch> {
        let mut lines = headers.get_all(IF_NONE_MATCH).iter().peekable();
        lines.peek()?;
        let mut any = false;
        let mut tags = Vec::new();
        for line in lines {
            let bytes = line.as_bytes();
            if bytes.trim_ascii() == b"*" {
                any = true;
            } else if let Some(mut list) = parse_list(bytes) {
                tags.append(&mut list);
            } else {
                return Some(IfNoneMatch::Malformed);
            }
        }
        Some(match (any, tags.is_empty()) {
            (true, true) => IfNoneMatch::Any,
            // `*` is only valid alone.
            (true, false) => IfNoneMatch::Malformed,
            (false, _) => IfNoneMatch::Tags(tags),
        })
    }

    /// True when the field matches a stored response with entity tag
    /// `current`, using weak comparison (section 13.1.2).
    pub fn matches(&self, current: Option<&EntityTag>) -> bool {
        match self {
            IfNoneMatch::Any => true,
            IfNoneMatch::Tags(tags) => current.is_some_and(|current| tags.iter().any(|t| t.weak_eq(current))),
            IfNoneMatch::Malformed => false,
        }
    }
}

/// `#entity-tag`: entity tags separated by commas, empty elements allowed
/// (RFC 9110 section 5.6.1). `None` if anything else is in the way.
fn parse_list(bytes: &[u8]) -> Option<Vec<EntityTag>> {
    let mut reader = Reader { input: bytes, pos: 0 };
    let mut tags = Vec::new();
    loop {
        while matches!(reader.peek(), Some(b' ' | b'\t' | b',')) {
            reader.pos += 1;
        }
        if reader.at_end() {
            return Some(tags);
        }
        tags.push(reader.entity_tag()?);
        reader.skip_ows();
        match reader.peek() {
            None | Some(b',') => {}
            Some(_) => return None,
        }
    }
}

/// The stored response's `ETag`, if it has exactly one valid one.
pub fn stored_etag(headers: &HeaderMap) -> Option<EntityTag> {
    let mut lines = headers.get_all(ETAG).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    EntityTag::parse(first.as_bytes())
}

/// True when the request carries preconditions meant for the origin server
/// (`If-Match`, `If-Unmodified-Since`), which a cache must not evaluate
/// (RFC 9111 section 4.3.2): the caller should forward such a request.
pub fn has_origin_only_preconditions(request: &HeaderMap) -> bool {
    request.contains_key(IF_MATCH) || request.contains_key(IF_UNMODIFIED_SINCE)
}

/// The `If-Modified-Since` date, if the field is a single valid HTTP-date;
/// anything else is ignored (RFC 9110 section 13.1.3).
fn if_modified_since(request: &HeaderMap) -> Option<SystemTime> {
    let mut lines = request.get_all(IF_MODIFIED_SINCE).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(first.to_str().ok()?.trim()).ok()
}

/// True when a stored response (headers `stored`, received at
/// `stored_response_time`) can answer the client's conditional request with
/// 304 Not Modified. Following RFC 9110 section 13.2.2, for GET and HEAD
/// only: `If-None-Match` decides when present (weak comparison, `*`
/// matches); otherwise `If-Modified-Since` is compared with the stored
/// `Last-Modified`, or its `Date`, or the time it was received (RFC 9111
/// section 4.3.2). An invalid `If-Modified-Since` is ignored.
pub fn not_modified(
    method: &Method,
    request: &HeaderMap,
    stored: &HeaderMap,
    stored_response_time: SystemTime,
) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    if let Some(condition) = IfNoneMatch::from_headers(request) {
        return condition.matches(stored_etag(stored).as_ref());
    }
    let Some(since) = if_modified_since(request) else {
        return false;
    };
    let modified = http_date(stored, &LAST_MODIFIED)
        .or_else(|| http_date(stored, &DATE))
        .unwrap_or(stored_response_time);
    modified <= since
}
