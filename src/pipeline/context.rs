//! The facts the phases pass each other about one request: what kind of
//! exchange it starts ([`Exchange`]), what `validate` found ([`Checked`]),
//! the client's raw target for `raw_path` routes ([`RawTarget`]), and what
//! the exchange needs beyond the request head ([`Outbound`]), and the
//! [`Phase`] a request is in (named in the log line of a failure).

use http::HeaderValue;
use http::uri::PathAndQuery;
use tokio::time::Instant;

/// What kind of exchange a request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange {
    Plain,
    /// HTTP/1.1 `Upgrade` (WebSocket and others): 101, then a tunnel.
    Upgrade,
    /// Classic `CONNECT host:port`: 2xx, then a tunnel.
    Connect,
    /// RFC 8441 / 9220 extended CONNECT over HTTP/2 (`:protocol`), carried to
    /// an HTTP/1.1 upstream as an `Upgrade` request.
    ExtendedConnect,
}

impl Exchange {
    /// The request switches protocols (a tunnel follows a success).
    pub(super) fn is_upgrade(self) -> bool {
        self != Exchange::Plain
    }
}

/// What `validate` found out about a request.
pub(super) struct Checked {
    /// The host the client asked for (`Host` or `:authority`), valid.
    pub host: Option<HeaderValue>,
    pub kind: Exchange,
    /// The target as the client sent it, when normalising changed it.
    pub raw_target: Option<PathAndQuery>,
}

/// The client's request target, kept for a `raw_path` route.
#[derive(Clone)]
pub(super) struct RawTarget(pub PathAndQuery);

/// What the exchange needs to know of the request beyond its head.
pub(super) struct Outbound<'a> {
    pub route_index: usize,
    pub host: Option<&'a HeaderValue>,
    pub kind: Exchange,
    /// When the request arrived (the whole-request deadline counts from it).
    pub started: Instant,
}

/// The phases of docs/request-lifecycle.md, one file each under
/// `src/pipeline/` (select and send are `exchange.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Validate,
    Route,
    Protect,
    Admit,
    Cache,
    Rewrite,
    Select,
    Send,
    Respond,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 9] = [
        Phase::Validate,
        Phase::Route,
        Phase::Protect,
        Phase::Admit,
        Phase::Cache,
        Phase::Rewrite,
        Phase::Select,
        Phase::Send,
        Phase::Respond,
    ];

    /// The phase's name, as in the docs and the file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Validate => "validate",
            Phase::Route => "route",
            Phase::Protect => "protect",
            Phase::Admit => "admit",
            Phase::Cache => "cache",
            Phase::Rewrite => "rewrite",
            Phase::Select => "select",
            Phase::Send => "send",
            Phase::Respond => "respond",
        }
    }
}
