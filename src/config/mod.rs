//! Configuration: `file.toml -> toml tree -> read + validate -> Config`.
//!
//! The file is parsed into a generic TOML tree, then [`parse`] walks it with
//! [`reader::Table`], which collects every problem with its path (unknown
//! keys, wrong types, bad values, dangling references) so `portcullis check`
//! and start-up (and the reload to come) report the same complete list. Each section's
//! model sits beside its reading: `server.rs` (`[server]`, `[timeouts]`,
//! `[limits]`), `listeners.rs`, `routes.rs`, `upstreams.rs`, `protect.rs`,
//! `cache.rs`, `observe.rs`; `parse.rs` walks them in order and holds every
//! default (`parse::defaults`). The result is plain Rust types with no serde,
//! every default filled in; routes name their upstream group by index,
//! while routes and groups are known to the runtime state by name.
//!
//! Names of upstream servers are resolved later, when the runtime snapshot is
//! built (see `state.rs`), because that needs I/O.

mod admin;
mod cache;
mod listeners;
mod observe;
mod parse;
mod protect;
pub mod reader;
mod routes;
mod server;
pub mod units;
mod upstreams;

use std::path::Path;

pub use crate::upstream::balance::{Algorithm, HashKey};
pub use admin::AdminConfig;
pub use cache::{CacheConfig, CredentialsPolicy, QueryKey, RouteCache};
pub use listeners::{CertificateFiles, ClientAuth, ListenerConfig, ListenerProtocol, TlsConfig};
pub use observe::{
    AccessLogConfig, AuditLogConfig, LogDestination, LogField, LogFormat, MetricsConfig, RequestIdConfig,
};
pub use parse::{defaults, parse};
pub use protect::{
    AdaptiveConfig, BanConfig, ChallengeConfig, ChallengeWhen, IpFilter, LoadSheddingConfig, ProtectConfig,
    ProtectMode, Rate, RateKey, RateLimitConfig, parse_rate,
};
pub use reader::{ConfigError, ConfigErrors};
pub use routes::{HeaderEdits, HostPattern, PathMatch, RouteConfig};
pub use server::{Limits, ServerSettings, Timeouts};
pub use upstreams::{
    CheckKind, CheckSettings, OutlierSettings, RetrySettings, ServerAddr, UpstreamConfig, UpstreamProtocol,
    UpstreamTls, parse_server,
};

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerSettings,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub access_log: AccessLogConfig,
    pub request_id: RequestIdConfig,
    pub audit_log: Option<AuditLogConfig>,
    pub metrics: Option<MetricsConfig>,
    /// `[admin]`: the admin API, off when absent.
    pub admin: Option<AdminConfig>,
    pub protect: ProtectConfig,
    /// `[cache]`: the shared store (used by routes with `cache`).
    pub cache: CacheConfig,
    /// The file the config came from and its SHA-256 (hex), for the audit log.
    pub source: Option<(std::path::PathBuf, String)>,
    /// The text it was read from (the admin API shows it; the file holds
    /// no secrets, only the paths of the files that do).
    pub text: Option<std::sync::Arc<str>>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("{}: cannot read config file: {e}", path.display()),
            }])
        })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        config.source = Some((path.to_owned(), crate::secret::sha256_hex(text.as_bytes())));
        Ok(config)
    }

    /// Parses and validates config text; `origin` names it in syntax errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let position = e.span().map(|span| line_col(text, span.start));
            let message = e.message().trim_end_matches('\n').to_owned();
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: match position {
                    Some((line, col)) => format!("{origin}:{line}:{col}: TOML syntax error: {message}"),
                    None => format!("{origin}: TOML syntax error: {message}"),
                },
            }])
        })?;
        let mut config = parse(&table)?;
        config.text = Some(text.into());
        Ok(config)
    }

    pub fn upstream_by_name(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}
