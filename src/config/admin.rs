//! `[admin]`: the admin API's listener and where its tokens come from; the
//! model and its reading. The tokens themselves are never in the config
//! file: `tokens_file` names a file, `tokens_env` an environment variable,
//! read when the config is validated (`server::validate`).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::reader::Table;

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A file of `name:role:token` lines (`role` is `read` or `operator`).
    pub tokens_file: Option<PathBuf>,
    /// An environment variable holding `name:role:token` entries,
    /// separated by commas or whitespace.
    pub tokens_env: Option<String>,
    /// `[admin.tls]`: the same keys as a listener's `[listeners.tls]`.
    pub tls: Option<super::TlsConfig>,
}

impl AdminConfig {
    /// Whether any token source is configured (without one the API only
    /// listens on a loopback address, open to local callers).
    pub fn has_tokens(&self) -> bool {
        self.tokens_file.is_some() || self.tokens_env.is_some()
    }
}

pub fn read_admin(table: Option<Table<'_>>) -> Option<AdminConfig> {
    let t = table?;
    let listen = t.listen("the admin API's address");
    let tokens_file = t.str("tokens_file").map(PathBuf::from);
    let tokens_env = t.str("tokens_env").map(str::to_owned);
    if let Some(name) = &tokens_env {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            t.error("tokens_env", format!("\"{name}\" is not an environment variable name"));
        }
    }
    let tls = t.table("tls").map(super::listeners::read_tls);
    let config = AdminConfig {
        listen: listen?,
        tokens_file,
        tokens_env,
        tls,
    };
    if !config.listen.ip().is_loopback() && !config.has_tokens() {
        t.error(
            "listen",
            format!(
                "{} is not a loopback address: set tokens_file or tokens_env, or anyone who reaches it could change the proxy",
                config.listen
            ),
        );
    }
    t.finish();
    Some(config)
}
