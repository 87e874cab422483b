//! Cache directives: `Cache-Control` (RFC 9111 section 5.2), its extensions
//! (`immutable` from RFC 8246, `stale-while-revalidate` and `stale-if-error`
//! from RFC 5861), the request-only `Pragma: no-cache` fallback (section 5.4)
//! and the targeted fields of RFC 9213.
//!
//! [`CacheControl`] is one parsed set of directives, read from every field
//! line of a header. The parser is lenient where the RFC asks recipients to
//! be (token or quoted-string arguments, any letter case, empty list
//! elements) and conservative where input is broken: an argument that cannot
//! be read never widens what the cache may do. A bad `max-age` or `s-maxage`
//! (`max-age=abc`, `max-age=-1`, two different values) is recorded in
//! [`CacheControl::max_age_invalid`] / [`CacheControl::s_maxage_invalid`]
//! and makes the response stale, the option section 4.2.1 leaves open
//! besides "use the first". A qualified `no-cache` / `private` whose field
//! list cannot be read applies to the whole response.
//!
//! [`response_control`] picks the directives a shared cache obeys for a
//! response: `Portcullis-Cache-Control`, else `CDN-Cache-Control`, else
//! `Cache-Control` (RFC 9213 section 2.1). The targeted fields are
//! Structured Field Dictionaries (RFC 8941) and are parsed as such by the
//! private `sf` module; one that fails to parse is ignored as if absent.

use std::borrow::Cow;

use http::header::{CACHE_CONTROL, PRAGMA};
use http::{HeaderMap, HeaderName, HeaderValue};

mod sf;
#[cfg(test)]
mod tests;

/// The targeted field only Portcullis obeys (RFC 9213 section 2). The proxy
/// should remove it before forwarding a response downstream.
pub static PORTCULLIS_CACHE_CONTROL: HeaderName = HeaderName::from_static("portcullis-cache-control");

/// The targeted field for CDN caches (RFC 9213 section 3).
pub static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Portcullis' target list, highest priority first (RFC 9213 section 2.1).
pub static TARGETED_FIELDS: [HeaderName; 2] = [
    HeaderName::from_static("portcullis-cache-control"),
    HeaderName::from_static("cdn-cache-control"),
];

/// The value every delta-seconds saturates at (RFC 9111 section 1.2.2).
pub const DELTA_SECONDS_MAX: u64 = 2_147_483_648;

/// A directive that applies to the whole response or, in its qualified form,
/// only to some of its fields (`no-cache="set-cookie"`, RFC 9111 sections
/// 5.2.2.4 and 5.2.2.7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FieldScope {
    /// The directive is not present.
    #[default]
    Absent,
    /// The unqualified form: the directive covers the whole response.
    Whole,
    /// The qualified form: the directive covers only these fields.
    Fields(Vec<HeaderName>),
}

impl FieldScope {
    /// True for the unqualified form.
    pub fn is_whole(&self) -> bool {
        matches!(self, FieldScope::Whole)
    }

    /// The fields named by the qualified form (none otherwise).
    pub fn fields(&self) -> &[HeaderName] {
        match self {
            FieldScope::Fields(fields) => fields,
            FieldScope::Absent | FieldScope::Whole => &[],
        }
    }

    /// Widens the scope with one more occurrence. The whole response wins
    /// over any field list, because it is the more restrictive reading.
    fn merge(&mut self, other: FieldScope) {
        let merged = match (std::mem::take(self), other) {
            (FieldScope::Whole, _) | (_, FieldScope::Whole) => FieldScope::Whole,
            (FieldScope::Absent, other) => other,
            (this, FieldScope::Absent) => this,
            (FieldScope::Fields(mut these), FieldScope::Fields(those)) => {
                for name in those {
                    if !these.contains(&name) {
                        these.push(name);
                    }
                }
                FieldScope::Fields(these)
            }
        };
        *self = merged;
    }
}

/// One set of cache directives, request or response. Absent directives are
/// `None`, `false` or [`FieldScope::Absent`]; delta-seconds values are
/// whole seconds, at most [`DELTA_SECONDS_MAX`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age` (sections 5.2.1.1 and 5.2.2.1): the first valid value.
    pub max_age: Option<u64>,
    /// A `max-age` was present with a value that is not delta-seconds, or
    /// twice with different values: freshness treats the response as stale
    /// and a request as `max-age=0`.
    pub max_age_invalid: bool,
    /// `s-maxage` (section 5.2.2.10): the first valid value.
    pub s_maxage: Option<u64>,
    /// Like [`CacheControl::max_age_invalid`], for `s-maxage`.
    pub s_maxage_invalid: bool,
    /// `no-cache` (sections 5.2.1.4 and 5.2.2.4).
    pub no_cache: FieldScope,
    /// `no-store` (sections 5.2.1.5 and 5.2.2.5).
    pub no_store: bool,
    /// `private` (section 5.2.2.7).
    pub private: FieldScope,
    /// `public` (section 5.2.2.9).
    pub public: bool,
    /// `must-revalidate` (section 5.2.2.2).
    pub must_revalidate: bool,
    /// `proxy-revalidate` (section 5.2.2.8).
    pub proxy_revalidate: bool,
    /// `must-understand` (section 5.2.2.3).
    pub must_understand: bool,
    /// `no-transform` (sections 5.2.1.6 and 5.2.2.6).
    pub no_transform: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
    /// `stale-while-revalidate` (RFC 5861 section 3): the smallest valid value.
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861 section 4): the smallest valid value.
    pub stale_if_error: Option<u64>,
    /// `max-stale` (section 5.2.1.2): `Some(None)` accepts any staleness,
    /// `Some(Some(n))` at most `n` seconds of it.
    pub max_stale: Option<Option<u64>>,
    /// `min-fresh` (section 5.2.1.3): the largest valid value.
    pub min_fresh: Option<u64>,
    /// `only-if-cached` (section 5.2.1.7).
    pub only_if_cached: bool,
}

/// A directive's argument as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg<'a> {
    /// No `=` followed the name.
    Absent,
    /// A token or the unescaped content of a quoted-string; may be empty.
    Value(Cow<'a, [u8]>),
    /// Something followed the name that is neither: an unterminated quoted
    /// string, text after the argument, a stray character.
    Malformed,
}

impl CacheControl {
    /// Parses every field line of a `Cache-Control`-syntax header as one
    /// list (RFC 9110 section 5.3: lines combine with commas).
    pub fn parse<'a, I>(lines: I) -> CacheControl
    where
        I: IntoIterator<Item = &'a HeaderValue>,
    {
        let mut cc = CacheControl::default();
        for line in lines {
            for (name, arg) in Directives::new(line.as_bytes()) {
                cc.apply(name, arg);
            }
        }
        cc
    }

    /// Parses all field lines named `name` in `headers`.
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> CacheControl {
        CacheControl::parse(headers.get_all(name))
    }

    /// True when either freshness directive was unreadable or conflicting.
    pub fn has_invalid_freshness(&self) -> bool {
        self.max_age_invalid || self.s_maxage_invalid
    }

    /// Records one directive. Names compare case-insensitively (section
    /// 5.2); unknown ones are ignored (section 5.2.3).
    fn apply(&mut self, name: &[u8], arg: Arg<'_>) {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        if is("max-age") {
            record_freshness(&mut self.max_age, &mut self.max_age_invalid, &arg);
        } else if is("s-maxage") {
            record_freshness(&mut self.s_maxage, &mut self.s_maxage_invalid, &arg);
        } else if is("no-cache") {
            self.no_cache.merge(scope(&arg));
        } else if is("private") {
            self.private.merge(scope(&arg));
        } else if is("no-store") {
            // Restrictive directives count whatever follows them: honouring
            // a malformed one can only make the cache store less.
            self.no_store = true;
        } else if is("must-revalidate") {
            self.must_revalidate = true;
        } else if is("proxy-revalidate") {
            self.proxy_revalidate = true;
        } else if is("no-transform") {
            self.no_transform = true;
        } else if is("only-if-cached") {
            self.only_if_cached = true;
        } else if is("public") {
            // Permissive directives count only in their exact form: a
            // malformed `public` must not make a response cacheable.
            self.public |= arg == Arg::Absent;
        } else if is("must-understand") {
            self.must_understand |= arg == Arg::Absent;
        } else if is("immutable") {
            self.immutable |= arg == Arg::Absent;
        } else if is("stale-while-revalidate") {
            if let Some(seconds) = delta(&arg) {
                self.stale_while_revalidate = Some(self.stale_while_revalidate.map_or(seconds, |s| s.min(seconds)));
            }
        } else if is("stale-if-error") {
            if let Some(seconds) = delta(&arg) {
                self.stale_if_error = Some(self.stale_if_error.map_or(seconds, |s| s.min(seconds)));
            }
        } else if is("max-stale") {
            let limit = match &arg {
                Arg::Absent => Some(None),
                Arg::Value(_) | Arg::Malformed => delta(&arg).map(Some),
            };
            // The smallest limit wins; "any staleness" is the largest.
            self.max_stale = match (self.max_stale, limit) {
                (old, None) => old,
                (None, new) => new,
                (Some(None), new) => new,
                (Some(Some(old)), Some(None)) => Some(Some(old)),
                (Some(Some(old)), Some(Some(new))) => Some(Some(old.min(new))),
            };
        } else if is("min-fresh") {
            if let Some(seconds) = delta(&arg) {
                self.min_fresh = Some(self.min_fresh.map_or(seconds, |s| s.max(seconds)));
            }
        }
    }
}

/// Records a `max-age` / `s-maxage` occurrence: the first valid value is
/// kept, and an invalid or different later one marks the directive invalid.
fn record_freshness(value: &mut Option<u64>, invalid: &mut bool, arg: &Arg<'_>) {
    match (delta(arg), *value) {
        (None, _) => *invalid = true,
        (Some(new), None) => *value = Some(new),
        (Some(new), Some(old)) => *invalid |= new != old,
    }
}

/// The argument as delta-seconds, if it is one.
fn delta(arg: &Arg<'_>) -> Option<u64> {
    match arg {
        Arg::Value(bytes) => parse_delta_seconds(bytes),
        Arg::Absent | Arg::Malformed => None,
    }
}

/// The scope of a `no-cache` / `private` occurrence. A field list that is
/// empty or names something that is not a field name is read as the whole
/// response: the sender asked for some restriction, and the whole response
/// is the restriction that certainly covers it.
fn scope(arg: &Arg<'_>) -> FieldScope {
    let Arg::Value(list) = arg else {
        return FieldScope::Whole;
    };
    let mut fields = Vec::new();
    for element in list.split(|&b| b == b',') {
        let element = trim_ows(element);
        if element.is_empty() {
            continue;
        }
        match HeaderName::from_bytes(element) {
            Ok(name) if !fields.contains(&name) => fields.push(name),
            Ok(_) => {}
            Err(_) => return FieldScope::Whole,
        }
    }
    if fields.is_empty() {
        FieldScope::Whole
    } else {
        FieldScope::Fields(fields)
    }
}

/// Parses delta-seconds (RFC 9111 section 1.2.2): one or more ASCII digits,
/// nothing else. Values too large saturate at [`DELTA_SECONDS_MAX`].
pub fn parse_delta_seconds(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in bytes {
        let digit = match byte {
            b'0'..=b'9' => u64::from(byte - b'0'),
            _ => return None,
        };
        value = value.saturating_mul(10).saturating_add(digit).min(DELTA_SECONDS_MAX);
    }
    Some(value)
}

/// `tchar` (RFC 9110 section 5.6.2).
pub(crate) fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Removes optional whitespace (SP / HTAB) at both ends.
pub(crate) fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or(&[])
}

/// Iterates over `name [= argument]` elements of one field line, skipping
/// empty list elements and elements that do not start with a token.
struct Directives<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Directives<'a> {
    fn new(input: &'a [u8]) -> Self {
        Directives { input, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_while(&mut self, keep: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&keep) {
            self.pos += 1;
        }
    }

    fn skip_ows(&mut self) {
        self.skip_while(|b| b == b' ' || b == b'\t');
    }

    /// Moves past the rest of the current list element: up to the next
    /// comma that is not inside a quoted string, or the end.
    fn skip_element(&mut self) {
        let mut quoted = false;
        while let Some(byte) = self.peek() {
            self.pos += 1;
            match byte {
                b'\\' if quoted => self.pos += 1,
                b'"' => quoted = !quoted,
                b',' if !quoted => return,
                _ => {}
            }
        }
    }

    /// Reads a quoted-string whose opening quote is at `pos`, unescaping
    /// quoted-pairs. `None` when the closing quote is missing.
    fn quoted(&mut self) -> Option<Vec<u8>> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let byte = self.peek()?;
            self.pos += 1;
            match byte {
                b'"' => return Some(out),
                b'\\' => {
                    out.push(self.peek()?);
                    self.pos += 1;
                }
                other => out.push(other),
            }
        }
    }
}

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a [u8], Arg<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.skip_while(|b| b == b' ' || b == b'\t' || b == b',');
            self.peek()?;
            let start = self.pos;
            self.skip_while(is_tchar);
            let name = self.input.get(start..self.pos).unwrap_or(&[]);
            if name.is_empty() {
                // A stray `=`, quote or other non-token: drop the element.
                self.skip_element();
                continue;
            }
            // The grammar has no whitespace around `=`; accepting it costs
            // nothing and reads what the sender obviously meant.
            self.skip_ows();
            let arg = match self.peek() {
                None | Some(b',') => return Some((name, Arg::Absent)),
                Some(b'=') => {
                    self.pos += 1;
                    self.skip_ows();
                    if self.peek() == Some(b'"') {
                        match self.quoted() {
                            Some(text) => Arg::Value(Cow::Owned(text)),
                            None => {
                                self.pos = self.input.len();
                                return Some((name, Arg::Malformed));
                            }
                        }
                    } else {
                        let value_start = self.pos;
                        self.skip_while(is_tchar);
                        Arg::Value(Cow::Borrowed(self.input.get(value_start..self.pos).unwrap_or(&[])))
                    }
                }
                Some(_) => Arg::Malformed,
            };
            self.skip_ows();
            return match self.peek() {
                None | Some(b',') => Some((name, arg)),
                Some(_) => {
                    self.skip_element();
                    Some((name, Arg::Malformed))
                }
            };
        }
    }
}

/// True when a request's `Pragma` carries `no-cache` (RFC 9111 section 5.4).
pub fn pragma_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(PRAGMA)
        .iter()
        .flat_map(|line| Directives::new(line.as_bytes()))
        .any(|(name, _)| name.eq_ignore_ascii_case(b"no-cache"))
}

/// The directives of a request. Without any `Cache-Control` line,
/// `Pragma: no-cache` counts as `Cache-Control: no-cache`: RFC 9111
/// section 5.4 deprecates Pragma, but HTTP/1.0 clients still send it and
/// honouring it costs at most a revalidation. The request `no-cache` takes
/// no argument (section 5.2.1.4), so a qualified one counts as plain.
pub fn request_control(headers: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::from_headers(headers, &CACHE_CONTROL);
    if matches!(cc.no_cache, FieldScope::Fields(_)) {
        cc.no_cache = FieldScope::Whole;
    }
    if !headers.contains_key(CACHE_CONTROL) && pragma_no_cache(headers) {
        cc.no_cache = FieldScope::Whole;
    }
    cc
}

/// Which field a response's directives came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlSource {
    /// `Portcullis-Cache-Control`.
    Portcullis,
    /// `CDN-Cache-Control`.
    Cdn,
    /// `Cache-Control` (possibly absent: then no directives at all).
    CacheControl,
}

impl ControlSource {
    /// True for a targeted field: `Cache-Control` and `Expires` are then
    /// ignored (RFC 9213 section 2.1).
    pub fn is_targeted(self) -> bool {
        !matches!(self, ControlSource::CacheControl)
    }
}

/// The directives a shared cache obeys for one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseControl {
    pub directives: CacheControl,
    pub source: ControlSource,
}

/// Picks the response directives Portcullis obeys: the first targeted field
/// on its list with a valid, non-empty value, else `Cache-Control` (RFC 9213
/// section 2.1).
pub fn response_control(headers: &HeaderMap) -> ResponseControl {
    let targeted = [
        (&PORTCULLIS_CACHE_CONTROL, ControlSource::Portcullis),
        (&CDN_CACHE_CONTROL, ControlSource::Cdn),
    ];
    for (name, source) in targeted {
        if let Some(directives) = parse_targeted(headers, name) {
            return ResponseControl { directives, source };
        }
    }
    ResponseControl {
        directives: CacheControl::from_headers(headers, &CACHE_CONTROL),
        source: ControlSource::CacheControl,
    }
}

/// Parses a targeted field as a Structured Field Dictionary (RFC 9213
/// section 2.2). `None` when the field is absent, empty or fails to parse.
pub fn parse_targeted(headers: &HeaderMap, name: &HeaderName) -> Option<CacheControl> {
    let mut lines = headers.get_all(name).iter().peekable();
    lines.peek()?;
    // Field lines of a structured field combine with ", " (RFC 8941
    // section 4.2) before parsing.
    let mut joined = Vec::new();
    for (i, line) in lines.enumerate() {
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(line.as_bytes());
    }
    let members = sf::parse_dictionary(&joined)?;
    if members.is_empty() {
        return None;
    }
    let mut cc = CacheControl::default();
    for (key, item) in members {
        let arg = match item {
            sf::Item::Boolean(true) => Arg::Absent,
            // `no-store=?0` says the directive is off.
            sf::Item::Boolean(false) => continue,
            sf::Item::Integer(n) => Arg::Value(Cow::Owned(n.to_string().into_bytes())),
            sf::Item::String(text) => Arg::Value(Cow::Owned(text)),
            sf::Item::Token(text) => Arg::Value(Cow::Owned(text)),
            sf::Item::Other => Arg::Malformed,
        };
        cc.apply(&key, arg);
    }
    Some(cc)
}

/// True for a targeted field Portcullis consumes.
pub fn is_targeted_field(name: &HeaderName) -> bool {
    TARGETED_FIELDS.contains(name)
}
