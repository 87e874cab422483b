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

use crate::config::{Config, ConfigErrors};
use crate::observe::{Observe, Observed};
use crate::protect::RouteLimiter;
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
}

impl Snapshot {
    /// Builds the runtime objects; resolves upstream names (the only I/O).
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
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let router = Router::new(&config.routes);
        let via = config.server.via.as_ref().map(|pseudonym| {
            let make = |version: &str| {
                HeaderValue::from_str(&format!("{version} {}", pseudonym.to_str().unwrap_or("portcullis")))
                    .unwrap_or(HeaderValue::from_static("1.1 portcullis"))
            };
            [make("1.0"), make("1.1"), make("2")]
        });
        let observed = observe
            .metrics
            .as_ref()
            .map(|m| Observed::build(m, &config, &upstreams));
        let log_samples = observe
            .access
            .as_ref()
            .map(|_| config.routes.iter().map(|_| AtomicU64::new(0)).collect());
        let route_limits = config
            .routes
            .iter()
            .map(|r| r.rate_limit.as_ref().map(RouteLimiter::new))
            .collect();
        Ok(Snapshot {
            route_limits,
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

/// The current snapshot; swapped whole on reload.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
