//! The admin API's bearer tokens: read from a file or an environment
//! variable named by `[admin]` (never from the config file), kept as
//! SHA-256 digests and compared in constant time.
//!
//! Each entry is `name:role:token`: `name` is what the audit log records
//! as the caller, `role` is `read` (every `GET`) or `operator` (also every
//! change), `token` at least 16 characters. A file holds one entry per
//! line (`#` starts a comment); a variable holds entries separated by
//! commas or whitespace.

use std::path::Path;

use crate::config::{AdminConfig, ConfigError};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read the state (`GET`).
    Read,
    /// Read and change.
    Operator,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

struct Entry {
    name: String,
    role: Role,
    digest: aws_lc_rs::digest::Digest,
}

/// The tokens of one admin API; `open` when none are configured (the API
/// then listens on loopback only, and every local caller is an operator).
pub struct Tokens {
    entries: Vec<Entry>,
    open: bool,
}

impl std::fmt::Debug for Tokens {
    /// Names and roles only: never a digest.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field(
                "names",
                &self.entries.iter().map(|e| (&e.name, e.role)).collect::<Vec<_>>(),
            )
            .field("open", &self.open)
            .finish()
    }
}

const MIN_TOKEN: usize = 16;

impl Tokens {
    /// Reads the configured sources; every problem is an error with its
    /// config path (the token itself is never in a message).
    pub fn load(config: &AdminConfig) -> Result<Tokens, Vec<ConfigError>> {
        Self::load_with(config, |name| std::env::var(name).ok())
    }

    /// [`load`](Self::load) with the environment given by `env`.
    pub fn load_with(config: &AdminConfig, env: impl Fn(&str) -> Option<String>) -> Result<Tokens, Vec<ConfigError>> {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        if let Some(path) = &config.tokens_file {
            match read_file(path) {
                Ok(text) => parse(&text, "admin.tokens_file", &mut entries, &mut errors),
                Err(message) => errors.push(error("admin.tokens_file", message)),
            }
        }
        if let Some(var) = &config.tokens_env {
            match env(var) {
                Some(text) => {
                    let lines = text.split([',', ' ', '\t', '\n']).collect::<Vec<_>>().join("\n");
                    parse(&lines, "admin.tokens_env", &mut entries, &mut errors);
                }
                None => errors.push(error(
                    "admin.tokens_env",
                    format!("the environment variable {var} is not set"),
                )),
            }
        }
        if config.has_tokens() && entries.is_empty() && errors.is_empty() {
            errors.push(error(
                if config.tokens_file.is_some() {
                    "admin.tokens_file"
                } else {
                    "admin.tokens_env"
                },
                "holds no token: add a line such as ops:operator:<a random string of 16 or more characters>",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Tokens {
            entries,
            open: !config.has_tokens(),
        })
    }

    /// The caller a request's `Authorization` value names, if it is a
    /// valid bearer token (or the API is open).
    pub fn check(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        if self.open {
            return Some(Caller {
                name: "local".into(),
                role: Role::Operator,
            });
        }
        let value = authorization?;
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))?
            .trim_ascii();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
        // Every entry is compared, equal or not, so the time taken says
        // nothing about which one matched.
        let mut found = None;
        for entry in &self.entries {
            if aws_lc_rs::constant_time::verify_slices_are_equal(entry.digest.as_ref(), digest.as_ref()).is_ok() {
                found = Some(entry);
            }
        }
        found.map(|e| Caller {
            name: e.name.clone(),
            role: e.role,
        })
    }

    /// Whether the API is open (no tokens configured).
    pub fn is_open(&self) -> bool {
        self.open
    }
}

fn error(path: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn read_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read the admin tokens: {e}", path.display()))
}

fn parse(text: &str, path: &str, entries: &mut Vec<Entry>, errors: &mut Vec<ConfigError>) {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{path} entry {}", n + 1);
        let mut parts = line.splitn(3, ':');
        let (Some(name), Some(role), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
            errors.push(error(&at, "is not name:role:token"));
            continue;
        };
        let role = match role {
            "read" => Role::Read,
            "operator" => Role::Operator,
            other => {
                errors.push(error(
                    &at,
                    format!("role {other:?} is neither \"read\" nor \"operator\""),
                ));
                continue;
            }
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            errors.push(error(
                &at,
                format!("name {name:?} must be letters, digits, '-', '_' or '.'"),
            ));
            continue;
        }
        if token.len() < MIN_TOKEN {
            errors.push(error(
                &at,
                format!("the token of {name:?} is shorter than {MIN_TOKEN} characters"),
            ));
            continue;
        }
        if entries.iter().any(|e| e.name == name) {
            errors.push(error(&at, format!("name {name:?} is used twice")));
            continue;
        }
        entries.push(Entry {
            name: name.to_owned(),
            role,
            digest: aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code fails loudly")]
    use super::*;

    fn tokens(text: &str) -> Result<Tokens, Vec<ConfigError>> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, text).unwrap();
        Tokens::load(&AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tokens_file: Some(file),
            tokens_env: None,
            tls: None,
        })
    }

    #[test]
    fn tokens_name_their_caller_and_role() {
        let t = tokens("# ops\nops:operator:0123456789abcdef\nview:read:fedcba9876543210\n").unwrap();
        assert_eq!(
            t.check(Some(b"Bearer 0123456789abcdef")),
            Some(Caller {
                name: "ops".into(),
                role: Role::Operator
            })
        );
        assert_eq!(
            t.check(Some(b"Bearer fedcba9876543210")).map(|c| c.role),
            Some(Role::Read)
        );
        assert_eq!(t.check(Some(b"Bearer 0123456789abcdeX")), None);
        assert_eq!(t.check(Some(b"0123456789abcdef")), None, "not a bearer value");
        assert_eq!(t.check(None), None);
        assert!(!t.is_open());
    }

    #[test]
    fn tokens_come_from_an_environment_variable_too() {
        let config = AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tokens_file: None,
            tokens_env: Some("TOKENS".into()),
            tls: None,
        };
        let t = Tokens::load_with(&config, |name| {
            (name == "TOKENS").then(|| "ci:read:0123456789abcdef, ops:operator:fedcba9876543210".to_owned())
        })
        .unwrap();
        assert_eq!(
            t.check(Some(b"Bearer 0123456789abcdef")).map(|c| c.name),
            Some("ci".into())
        );
        assert_eq!(
            t.check(Some(b"Bearer fedcba9876543210")).map(|c| c.role),
            Some(Role::Operator)
        );
        let missing = Tokens::load_with(&config, |_| None).unwrap_err();
        assert_eq!(
            missing[0].to_string(),
            "admin.tokens_env: the environment variable TOKENS is not set"
        );
    }

    #[test]
    fn bad_entries_are_errors_with_their_line_and_never_show_the_token() {
        let errors = tokens("ops:operator:short\nx:admin:0123456789abcdef\nnocolons\nops:read:0123456789abcdef\nops:read:0123456789abcdeg\n").unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "admin.tokens_file entry 1: the token of \"ops\" is shorter than 16 characters",
                "admin.tokens_file entry 2: role \"admin\" is neither \"read\" nor \"operator\"",
                "admin.tokens_file entry 3: is not name:role:token",
                "admin.tokens_file entry 5: name \"ops\" is used twice",
            ]
        );
        assert!(tokens("# nothing\n").is_err(), "an empty file is an error");
    }
}
