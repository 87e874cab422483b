//! The runtime snapshot: everything a request needs, built from one
//! [`Config`] and held behind one `ArcSwap`.
//!
//! A request loads the snapshot once when it starts and keeps it to the end,
//! so a reload never tears a request between two configs. Reload is
//! `parse -> validate -> build -> swap`; a failed build leaves the current
//! snapshot in place.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;

use std::sync::atomic::AtomicU64;

use crate::cache::Cache;
use crate::config::{Config, ConfigErrors};
use crate::observe::{Observe, Observed};
use crate::protect::{Adaptive, Bans, Challenge, RouteLimiter, Shedder};
use crate::routing::Router;
use crate::upstream::Upstream;

/// One immutable generation of the runtime configuration.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    /// Same order as `config.upstreams`; routes refer to them by index.
    pub upstreams: Vec<Arc<Upstream>>,
    /// `Via` values for HTTP/1.0, HTTP/1.1 and HTTP/2, built once.
    pub via: Option<[HeaderValue; 3]>,
    /// The process-wide logs and metrics (they outlive snapshots).
    pub observe: Arc<Observe>,
    /// This snapshot's metric handles, when metrics are on.
    pub observed: Option<Observed>,
    /// Per-route counters for access log sampling, when the log is on.
    pub log_samples: Option<Vec<AtomicU64>>,
    /// Each route's rate limiter, if it has one (same order as routes).
    pub route_limits: Vec<Option<RouteLimiter>>,
    /// Issues and checks challenge cookies. FIXME: a full config reload
    /// (not built yet) must carry this over, or a random key would change
    /// and every issued cookie become invalid.
    pub challenge: Challenge,
    /// Spike detection and attack mode, when `[protect.adaptive]` is on
    /// (the same FIXME as `challenge` applies to reloads).
    pub adaptive: Option<Adaptive>,
    /// Each upstream group's load shedding, when `[protect.load_shedding]`
    /// is on (same order as `upstreams`).
    pub shedders: Vec<Option<Arc<Shedder>>>,
    /// Temporary bans, when `[protect.bans]` is on (the same FIXME as
    /// `challenge` applies to reloads: bans must be carried over).
    pub bans: Option<Arc<Bans>>,
    /// The shared HTTP cache, when a route caches. FIXME: a full config
    /// reload (not built yet) should carry the store over.
    pub cache: Option<Arc<Cache>>,
    /// The client certificate identity fields of every listener (and the
    /// defaults): removed from every request on every listener, set only
    /// from a verified certificate.
    pub identity_headers: Vec<http::HeaderName>,
    /// Fields only the proxy sets (identity fields, the request id):
    /// removed from request trailers too.
    pub owned_fields: Arc<[http::HeaderName]>,
}

impl Snapshot {
    /// Builds the runtime objects; resolves upstream names (the only I/O).
    #[allow(clippy::too_many_lines, reason = "builds the snapshot's parts one after the other")]
    pub async fn build(config: Config, observe: &Arc<Observe>) -> Result<Snapshot, ConfigErrors> {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        let mut errors = Vec::new();
        for upstream in &config.upstreams {
            let path = crate::config::reader::join("upstreams", &upstream.name);
            match Upstream::build(upstream, &path, observe.audit.clone()).await {
                Ok(u) => upstreams.push(u),
                Err(mut e) => errors.append(&mut e),
            }
        }
        let settings = &config.protect.challenge;
        let key = match &settings.key_file {
            Some(path) => match crate::secret::read_key(path, "challenge key") {
                Ok(k) => Some(k),
                Err(message) => {
                    errors.push(crate::config::ConfigError {
                        path: "protect.challenge.key_file".into(),
                        message,
                    });
                    None
                }
            },
            None => None,
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let challenge = Challenge::new(settings.lifetime.as_secs(), key.as_deref(), unix_now());
        let router = Router::with_case(&config.routes, config.server.path_case_insensitive);
        let via = config.server.via.as_ref().map(|pseudonym| {
            let make = |version: &str| {
                HeaderValue::from_str(&format!("{version} {}", pseudonym.to_str().unwrap_or("portcullis")))
                    .unwrap_or(HeaderValue::from_static("1.1 portcullis"))
            };
            [make("1.0"), make("1.1"), make("2")]
        });
        let observed = observe.metrics.as_ref().map(|m| Observed::build(m, &config));
        let log_samples = observe
            .access
            .as_ref()
            .map(|_| config.routes.iter().map(|_| AtomicU64::new(0)).collect());
        let route_limits = config
            .routes
            .iter()
            .map(|r| r.rate_limit.as_ref().map(RouteLimiter::new))
            .collect();
        let adaptive = config
            .protect
            .adaptive
            .as_ref()
            .map(|a| Adaptive::new(a, config.routes.iter().map(|r| r.name.clone()).collect()));
        let shedders = upstreams
            .iter()
            .map(|_| config.protect.load_shedding.as_ref().map(|c| Arc::new(Shedder::new(c))))
            .collect();
        let bans = config.protect.bans.as_ref().map(|b| {
            Arc::new(Bans::new(b, &config.server.trusted_proxies).with_ipv6_prefix(config.protect.ipv6_prefix))
        });
        let cache = config
            .routes
            .iter()
            .any(|r| r.cache.is_some())
            .then(|| Arc::new(Cache::new(&config.cache)));
        let mut identity_headers: Vec<http::HeaderName> = crate::config::defaults::CLIENT_CERT_HEADERS
            .iter()
            .map(|name| http::HeaderName::from_static(name))
            .collect();
        for auth in config
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref()?.client_auth.as_ref())
        {
            for name in [&auth.subject_header, &auth.fingerprint_header] {
                if !identity_headers.contains(name) {
                    identity_headers.push(name.clone());
                }
            }
        }
        let mut owned_fields = identity_headers.clone();
        owned_fields.extend(config.request_id.header.clone());
        Ok(Snapshot {
            identity_headers,
            owned_fields: owned_fields.into(),
            cache,
            shedders,
            bans,
            route_limits,
            challenge,
            adaptive,
            config,
            router,
            upstreams,
            via,
            observe: observe.clone(),
            observed,
            log_samples,
        })
    }
}

/// Seconds since the Unix epoch (challenge cookies carry wall-clock times).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current snapshot; swapped whole on reload.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
