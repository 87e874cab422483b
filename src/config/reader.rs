//! A small reader over a parsed TOML tree that collects *every* problem with
//! its path instead of stopping at the first one.
//!
//! Why not `#[derive(Deserialize)]` with `deny_unknown_fields`: serde stops at
//! the first error, and its messages lose the path inside nested arrays. An
//! operator fixing a config wants the whole list at once, each line saying
//! where (`routes[2].upstream: unknown upstream "api"`). Each `Table` remembers
//! which keys were read, so whatever is left over is an unknown key, reported
//! with the nearest known key as a suggestion.

use std::cell::RefCell;
use std::fmt;
use std::time::Duration;

use toml::Value;

/// One problem in a config file, with the dotted path of the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one config file, in the order they were found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors while the tree is walked.
#[derive(Default)]
pub struct Errors {
    list: RefCell<Vec<ConfigError>>,
}

impl Errors {
    pub fn push(&self, path: impl Into<String>, message: impl Into<String>) {
        self.list.borrow_mut().push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.borrow().is_empty()
    }

    /// The value, or every error sorted by path (array indices numerically)
    /// so related problems read together whatever order they were found in.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        let mut list = self.list.into_inner();
        list.sort_by_cached_key(|e| sort_key(&e.path));
        if list.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(list))
        }
    }
}

/// `routes[10].x` sorts after `routes[9].x`: indices are zero-padded.
fn sort_key(path: &str) -> String {
    let mut key = String::with_capacity(path.len() + 16);
    let mut rest = path;
    while let Some(open) = rest.find('[') {
        key.push_str(&rest[..open]);
        let Some(close) = rest[open..].find(']') else { break };
        let index = &rest[open + 1..open + close];
        key.push_str(&format!("[{index:0>10}]"));
        rest = &rest[open + close + 1..];
    }
    key.push_str(rest);
    key
}

/// Joins a parent path and a key: `""` + `"a"` = `"a"`, `"a"` + `"b"` = `"a.b"`.
pub fn join(parent: &str, key: &str) -> String {
    let key = if key.is_empty() || key.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')) {
        format!("\"{key}\"")
    } else {
        key.to_owned()
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// A TOML table being read: every `get` marks the key as known.
pub struct Table<'a> {
    map: &'a toml::Table,
    pub path: String,
    errors: &'a Errors,
    known: RefCell<Vec<&'static str>>,
}

impl<'a> Table<'a> {
    /// Wraps `value` if it is a table; otherwise records a type error.
    pub fn new(value: &'a Value, path: String, errors: &'a Errors) -> Option<Self> {
        match value {
            Value::Table(map) => Some(Self::from_map(map, path, errors)),
            other => {
                errors.push(path, format!("expected a table, found {}", other.type_str()));
                None
            }
        }
    }

    pub fn from_map(map: &'a toml::Table, path: String, errors: &'a Errors) -> Self {
        Table {
            map,
            path,
            errors,
            known: RefCell::new(Vec::new()),
        }
    }

    pub fn errors(&self) -> &'a Errors {
        self.errors
    }

    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The raw value of `key`, if present.
    pub fn get(&self, key: &'static str) -> Option<&'a Value> {
        self.known.borrow_mut().push(key);
        self.map.get(key)
    }

    pub fn error(&self, key: &str, message: impl Into<String>) {
        self.errors.push(self.path_of(key), message);
    }

    fn typed<T>(&self, key: &'static str, want: &str, pick: impl Fn(&'a Value) -> Option<T>) -> Option<T> {
        let value = self.get(key)?;
        let picked = pick(value);
        if picked.is_none() {
            self.error(key, format!("expected {want}, found {}", value.type_str()));
        }
        picked
    }

    /// The required `listen` address of an endpoint (`what` names it in
    /// the error when it is missing).
    pub fn listen(&self, what: &str) -> Option<std::net::SocketAddr> {
        match self.str("listen") {
            Some(text) => match text.parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(
                        "listen",
                        format!("\"{text}\" is not an address such as \"127.0.0.1:9090\""),
                    );
                    None
                }
            },
            None => {
                self.error("listen", format!("required: {what}, such as \"127.0.0.1:9090\""));
                None
            }
        }
    }

    pub fn str(&self, key: &'static str) -> Option<&'a str> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn bool(&self, key: &'static str) -> Option<bool> {
        self.typed(key, "a boolean", Value::as_bool)
    }

    /// A non-negative integer that fits in `u64`.
    pub fn uint(&self, key: &'static str) -> Option<u64> {
        let value = self.typed(key, "an integer", Value::as_integer)?;
        match u64::try_from(value) {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(key, format!("must not be negative, found {value}"));
                None
            }
        }
    }

    pub fn table(&self, key: &'static str) -> Option<Table<'a>> {
        let value = self.get(key)?;
        Table::new(value, self.path_of(key), self.errors)
    }

    pub fn array(&self, key: &'static str) -> Option<&'a [Value]> {
        self.typed(key, "an array", |v| v.as_array().map(Vec::as_slice))
    }

    /// A string, or an array of strings; each element with its own path.
    pub fn str_or_strs(&self, key: &'static str) -> Option<Vec<(String, &'a str)>> {
        let value = self.get(key)?;
        let path = self.path_of(key);
        match value {
            Value::String(s) => Some(vec![(path, s.as_str())]),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    match item.as_str() {
                        Some(s) => out.push((item_path, s)),
                        None => self
                            .errors
                            .push(item_path, format!("expected a string, found {}", item.type_str())),
                    }
                }
                Some(out)
            }
            other => {
                self.errors.push(
                    path,
                    format!("expected a string or an array of strings, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A string that must be one of `choices`.
    pub fn choice<T: Copy>(&self, key: &'static str, choices: &[(&str, T)]) -> Option<T> {
        let text = self.str(key)?;
        match choices.iter().find(|(name, _)| *name == text) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.error(
                    key,
                    format!("unknown value \"{text}\", expected one of {}", names.join(", ")),
                );
                None
            }
        }
    }

    pub fn duration(&self, key: &'static str) -> Option<std::time::Duration> {
        let text = self.str(key)?;
        match super::units::parse_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(key, e);
                None
            }
        }
    }

    /// A size given as an integer of bytes or as a string with a unit.
    pub fn size(&self, key: &'static str) -> Option<u64> {
        let value = self.get(key)?;
        match value {
            Value::Integer(n) => match u64::try_from(*n) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.error(key, format!("must not be negative, found {n}"));
                    None
                }
            },
            Value::String(s) => match super::units::parse_size(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.error(key, e);
                    None
                }
            },
            other => {
                self.error(
                    key,
                    format!(
                        "expected a size such as \"64KiB\" or an integer, found {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// Reports every key of the table that no `get` asked for.
    pub fn finish(self) {
        let known = self.known.into_inner();
        for key in self.map.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let message = match closest(key, &known) {
                Some(near) => format!("unknown key (did you mean \"{near}\"?)"),
                None => {
                    let mut sorted = known.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    format!("unknown key, expected one of: {}", sorted.join(", "))
                }
            };
            self.errors.push(join(&self.path, key), message);
        }
    }
}

/// The known key nearest to a misspelt one, if it is near enough to be a typo.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads an optional timeout of at least a millisecond: zero would fail
/// every request, and timers work in whole milliseconds (a shorter one
/// would make the connection watchdog spin).
pub fn positive_duration(t: &Table<'_>, key: &'static str, default: Duration) -> Duration {
    match t.duration(key) {
        Some(d) if d < Duration::from_millis(1) => {
            t.error(key, "must be at least 1ms");
            default
        }
        Some(d) => d,
        None => default,
    }
}

/// Reads an optional bounded size.
pub fn bounded(t: &Table<'_>, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
    match t.size(key) {
        Some(v) if v < min || v > max => {
            t.error(
                key,
                format!(
                    "must be between {} and {}, found {}",
                    super::units::format_size(min),
                    super::units::format_size(max),
                    super::units::format_size(v)
                ),
            );
            default
        }
        Some(v) => v,
        None => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_sort_by_path_with_numeric_indices() {
        assert!(sort_key("routes[2].a") < sort_key("routes[10].a"));
        assert!(sort_key("routes[2]") < sort_key("routes[2].a"));
    }

    #[test]
    fn suggestions_for_typos() {
        assert_eq!(closest("bnd", &["bind", "protocol"]), Some("bind"));
        assert_eq!(closest("upstrem", &["upstream", "host"]), Some("upstream"));
        assert_eq!(closest("zzzzzz", &["bind", "protocol"]), None);
    }

    #[test]
    fn paths_quote_odd_keys() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("upstreams", "my api"), "upstreams.\"my api\"");
        assert_eq!(join("a", "b_c-d"), "a.b_c-d");
    }
}
