//! Secondary cache keys from `Vary` (RFC 9111 section 4.1, RFC 9110
//! section 12.5.5). [`Vary`] is the parsed field of a stored response;
//! [`SecondaryKey`] holds the values the request that produced it had for
//! those fields; [`matches`] tells whether a new request selects the same
//! stored response.
//!
//! Values are normalized only in ways section 4.1 allows for every field:
//! field lines are combined with ", " and optional whitespace around each
//! line is trimmed. An absent field is distinct from an empty one, and
//! `Vary: *` never matches.

use http::header::VARY;
use http::{HeaderMap, HeaderName};

use super::control::trim_ows;

#[cfg(test)]
mod tests;

/// A response's `Vary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// The listed request fields, lower-case, sorted and without duplicates;
    /// empty when the response does not vary.
    Fields(Vec<HeaderName>),
    /// `*`, or a member that is not a field name: the response varies on
    /// something outside the request fields and can never be reused.
    Any,
}

impl Vary {
    /// Parses every `Vary` line of a response. A member that is not a valid
    /// field name makes the whole field `*`: guessing which fields it meant
    /// could serve one client's variant to another.
    pub fn from_headers(headers: &HeaderMap) -> Vary {
        let mut fields: Vec<HeaderName> = Vec::new();
        for line in headers.get_all(VARY) {
            for member in line.as_bytes().split(|&b| b == b',') {
                let member = trim_ows(member);
                if member.is_empty() {
                    continue;
                }
                if member == b"*" {
                    return Vary::Any;
                }
                match HeaderName::from_bytes(member) {
                    Ok(name) => fields.push(name),
                    Err(_) => return Vary::Any,
                }
            }
        }
        fields.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        fields.dedup();
        Vary::Fields(fields)
    }

    pub fn is_any(&self) -> bool {
        matches!(self, Vary::Any)
    }

    /// True when the response varies on `name`.
    pub fn names(&self, name: &HeaderName) -> bool {
        match self {
            Vary::Fields(fields) => fields.contains(name),
            Vary::Any => true,
        }
    }
}

/// The values a request had for the fields a response varies on, in the
/// order of [`Vary::Fields`]; `None` for an absent field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SecondaryKey(pub Vec<(HeaderName, Option<Vec<u8>>)>);

impl SecondaryKey {
    /// Bytes the key holds (names and values), for the store's budget.
    pub fn size(&self) -> u64 {
        self.0
            .iter()
            .map(|(name, value)| (name.as_str().len() + value.as_ref().map_or(0, Vec::len) + 24) as u64)
            .sum()
    }
}

/// One request field, normalized: its lines trimmed of optional whitespace
/// and joined with ", "; `None` when the request does not have it.
pub fn field_value(request: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut lines = request.get_all(name).iter().peekable();
    lines.peek()?;
    let mut value = Vec::new();
    for (i, line) in lines.enumerate() {
        if i > 0 {
            value.extend_from_slice(b", ");
        }
        value.extend_from_slice(trim_ows(line.as_bytes()));
    }
    Some(value)
}

/// The secondary key of `request` for `vary`; `None` for `Vary: *`.
pub fn secondary_key(vary: &Vary, request: &HeaderMap) -> Option<SecondaryKey> {
    match vary {
        Vary::Any => None,
        Vary::Fields(fields) => Some(SecondaryKey(
            fields
                .iter()
                .map(|name| (name.clone(), field_value(request, name)))
                .collect(),
        )),
    }
}

/// True when `new_request` selects a response stored with `stored_vary` for
/// a request whose values were `stored_values` (section 4.1).
pub fn matches(stored_vary: &Vary, stored_values: &SecondaryKey, new_request: &HeaderMap) -> bool {
    secondary_key(stored_vary, new_request).is_some_and(|key| key == *stored_values)
}
