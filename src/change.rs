//! Every change an operator can make to a running proxy, as one closed
//! type: the admin API turns each mutating request into a [`Change`],
//! SIGHUP and the file watch make a [`Change::Reload`], and one function
//! (`server::Control::apply`) applies them all. The audit log records the
//! value (its JSON form, `"change": "drain"` and its fields), so the API,
//! the audit log and `portcullis plan` speak one vocabulary.
//!
//! What a change made at runtime becomes at the next reload (documented in
//! docs/admin-api.md, tested in tests/admin.rs): a drain and a weight stay
//! with the server while the group keeps it (a weight until the file
//! changes that server's weight); bans last their time; a step's mode
//! lasts until the file changes that step's settings; purged entries stay
//! purged.

use std::net::IpAddr;

use serde::Serialize;

use crate::config::ProtectMode;

/// One change to a running proxy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Replace the whole config: the file again, or a text given to the
    /// admin API. With `dry_run`, only the plan is returned.
    Reload {
        #[serde(skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        dry_run: bool,
        /// The new config's text (admin API); `None`: read the file again.
        /// Not recorded: the `config.load` record has its SHA-256 and plan.
        #[serde(skip)]
        text: Option<String>,
    },
    /// Reload the TLS certificates of every listener from their files.
    ReloadCertificates,
    /// No new requests to the server; those in flight finish.
    Drain {
        upstream: String,
        server: String,
    },
    Undrain {
        upstream: String,
        server: String,
    },
    /// Balance with this weight instead of the configured one (`None`:
    /// back to the configured one).
    Weight {
        upstream: String,
        server: String,
        weight: Option<u32>,
    },
    /// Remove cached responses.
    Purge(Purge),
    /// Refuse a client (an IPv4 address, or the IPv6 network of
    /// `protect.ipv6_prefix` bits around it) for `seconds`.
    Ban {
        client: IpAddr,
        seconds: u64,
    },
    Unban {
        client: IpAddr,
    },
    /// Run a step of the mitigation ladder in shadow or enforce mode.
    Mode {
        step: Step,
        #[serde(serialize_with = "mode_name")]
        mode: ProtectMode,
    },
}

/// What a purge removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "by", content = "value")]
pub enum Purge {
    /// One URL, `scheme://host/path?query`, with all its variants.
    Url(String),
    /// Every key starting with this.
    Prefix(String),
    /// Every response tagged so (`Surrogate-Key`, `Cache-Tag`).
    Tag(String),
}

/// A step of the mitigation ladder that has a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `[protect.adaptive]`: tightened rates and challenges in attack mode.
    Adaptive,
    /// `[protect.bans]`.
    Bans,
    /// `[protect.load_shedding]`.
    LoadShedding,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::Adaptive, Step::Bans, Step::LoadShedding];

    /// The name in paths and the config (`protect.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Step::Adaptive => "adaptive",
            Step::Bans => "bans",
            Step::LoadShedding => "load_shedding",
        }
    }

    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl Change {
    /// The word the audit log and the metrics use.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Reload { .. } => "reload",
            Change::ReloadCertificates => "reload_certificates",
            Change::Drain { .. } => "drain",
            Change::Undrain { .. } => "undrain",
            Change::Weight { .. } => "weight",
            Change::Purge(_) => "purge",
            Change::Ban { .. } => "ban",
            Change::Unban { .. } => "unban",
            Change::Mode { .. } => "mode",
        }
    }
}

/// `"shadow"` or `"enforce"`.
pub fn mode_name_str(mode: ProtectMode) -> &'static str {
    match mode {
        ProtectMode::Shadow => "shadow",
        ProtectMode::Enforce => "enforce",
    }
}

fn mode_name<S: serde::Serializer>(mode: &ProtectMode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(mode_name_str(*mode))
}

/// Why a change was not applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChangeError {
    /// The change names something that does not exist (a group, a server).
    #[error("{0}")]
    NotFound(String),
    /// The change cannot apply to this proxy as configured (bans are off,
    /// no route caches).
    #[error("{0}")]
    Conflict(String),
    /// The new config is invalid: every error with its path.
    #[error("the config is invalid")]
    Invalid(Vec<crate::config::ConfigError>),
}
