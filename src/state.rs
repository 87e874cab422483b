//! The runtime snapshot: everything a request needs, built from one
//! [`Config`] and held behind one `ArcSwap`, and the [`Kept`] state that
//! outlives snapshots.
//!
//! A request loads the snapshot once when it starts and keeps it to the end,
//! so a swap never tears a request between two configs. A snapshot is
//! immutable: what changes while it serves (limiter buckets, health, the
//! cache store, bans, the detector's baselines) lives in parts that
//! [`Snapshot::build`] takes from a [`Kept`], keyed by name (route name,
//! upstream group name) together with the settings the part was built from.
//! A part whose name and settings are unchanged is carried over, the same
//! `Arc`; a new or changed one is built fresh. `build` never mutates the
//! `Kept` it reads: it returns the next one, which the caller keeps only if
//! the new snapshot is used, so a config that fails leaves nothing behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use http::HeaderValue;
use ipnet::IpNet;

use crate::cache::Cache;
use crate::config::{
    AdaptiveConfig, BanConfig, CacheConfig, Config, ConfigErrors, LoadSheddingConfig, RateLimitConfig, UpstreamConfig,
};
use crate::observe::{Observe, Observed};
use crate::protect::{Adaptive, Bans, Challenge, RouteLimiter, Shedder};
use crate::routing::Router;
use crate::upstream::Upstream;

/// One immutable generation of the runtime configuration.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    /// Same order as `config.upstreams`; routes refer to them by index
    /// (kept by group name: pools, health, latency, ejections).
    pub upstreams: Vec<Arc<Upstream>>,
    /// `Via` values for HTTP/1.0, HTTP/1.1 and HTTP/2, built once.
    pub via: Option<[HeaderValue; 3]>,
    /// The process-wide logs and metrics (they outlive snapshots).
    pub observe: Arc<Observe>,
    /// This snapshot's metric handles, when metrics are on.
    pub observed: Option<Observed>,
    /// Per-route counters for access log sampling, when the log is on.
    pub log_samples: Option<Vec<AtomicU64>>,
    /// Each route's rate limiter, if it has one (same order as routes;
    /// kept by route name).
    pub route_limits: Vec<Option<Arc<RouteLimiter>>>,
    /// Issues and checks challenge cookies (kept while the lifetime and
    /// key are unchanged, so issued cookies stay valid).
    pub challenge: Arc<Challenge>,
    /// Spike detection and attack mode, when `[protect.adaptive]` is on
    /// (kept while its settings and the route names are unchanged).
    pub adaptive: Option<Arc<Adaptive>>,
    /// Each upstream group's load shedding, when `[protect.load_shedding]`
    /// is on (same order as `upstreams`; kept by group name).
    pub shedders: Vec<Option<Arc<Shedder>>>,
    /// Temporary bans, when `[protect.bans]` is on (kept).
    pub bans: Option<Arc<Bans>>,
    /// The shared HTTP cache, when a route caches (kept while `[cache]` is
    /// unchanged).
    pub cache: Option<Arc<Cache>>,
    /// The client certificate identity fields of every listener (and the
    /// defaults): removed from every request on every listener, set only
    /// from a verified certificate.
    pub identity_headers: Vec<http::HeaderName>,
    /// Fields only the proxy sets (identity fields, the request id):
    /// removed from request trailers too.
    pub owned_fields: Arc<[http::HeaderName]>,
    /// The memory read-ahead request bodies may hold, one permit a byte
    /// (`limits.request_buffer_memory`; kept while it is unchanged).
    pub body_budget: Arc<tokio::sync::Semaphore>,
}

/// A part of the runtime state and the settings it was built from.
struct Part<S, V> {
    settings: S,
    value: Arc<V>,
}

impl<S, V> Clone for Part<S, V>
where
    S: Clone,
{
    fn clone(&self) -> Self {
        Part {
            settings: self.settings.clone(),
            value: self.value.clone(),
        }
    }
}

/// The settings bans are built from.
type BanSettings = (BanConfig, Vec<IpNet>, u8);
/// The settings the challenge is built from: the lifetime in seconds and
/// the key read from `key_file` (`None`: a random key).
type ChallengeSettings = (u64, Option<Vec<u8>>);
/// The settings the detector is built from, with the route names it
/// counts.
type AdaptiveSettings = (AdaptiveConfig, Vec<String>);

/// The state that outlives snapshots, keyed by name: what a reload carries
/// over. Empty at start-up (`Kept::default()`).
#[derive(Default, Clone)]
pub struct Kept {
    upstreams: HashMap<String, Part<UpstreamConfig, Upstream>>,
    route_limits: HashMap<String, Part<RateLimitConfig, RouteLimiter>>,
    shedders: HashMap<String, Part<LoadSheddingConfig, Shedder>>,
    bans: Option<Part<BanSettings, Bans>>,
    challenge: Option<Part<ChallengeSettings, Challenge>>,
    adaptive: Option<Part<AdaptiveSettings, Adaptive>>,
    cache: Option<Part<CacheConfig, Cache>>,
    body_budget: Option<Part<u64, tokio::sync::Semaphore>>,
}

/// The part in `old` if it was built from `settings`, else a new one; the
/// result is recorded in `next`.
fn keep<S: PartialEq + Clone, V>(
    old: Option<&Part<S, V>>,
    next: &mut Option<Part<S, V>>,
    settings: S,
    make: impl FnOnce(&S) -> V,
) -> Arc<V> {
    let part = match old {
        Some(part) if part.settings == settings => part.clone(),
        _ => Part {
            value: Arc::new(make(&settings)),
            settings,
        },
    };
    let value = part.value.clone();
    *next = Some(part);
    value
}

/// [`keep`] for parts kept by name.
fn keep_named<S: PartialEq + Clone, V>(
    old: &HashMap<String, Part<S, V>>,
    next: &mut HashMap<String, Part<S, V>>,
    name: &str,
    settings: S,
    make: impl FnOnce(&S) -> V,
) -> Arc<V> {
    let mut slot = None;
    let value = keep(old.get(name), &mut slot, settings, make);
    if let Some(part) = slot {
        next.insert(name.to_owned(), part);
    }
    value
}

impl Snapshot {
    /// Builds the runtime objects, taking every part whose name and
    /// settings are unchanged from `kept`; resolves the names of new or
    /// changed upstream groups (the only I/O). Returns the snapshot and the
    /// [`Kept`] to build the next one from.
    #[allow(clippy::too_many_lines, reason = "builds the snapshot's parts one after the other")]
    pub async fn build(config: Config, observe: &Arc<Observe>, kept: &Kept) -> Result<(Snapshot, Kept), ConfigErrors> {
        let mut next = Kept::default();
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        let mut errors = Vec::new();
        for upstream in &config.upstreams {
            if let Some(part) = kept.upstreams.get(&upstream.name).filter(|p| p.settings == *upstream) {
                upstreams.push(part.value.clone());
                next.upstreams.insert(upstream.name.clone(), part.clone());
                continue;
            }
            let path = crate::config::reader::join("upstreams", &upstream.name);
            let previous = kept.upstreams.get(&upstream.name).map(|p| &*p.value);
            match Upstream::build(upstream, &path, observe.audit.clone(), previous).await {
                Ok(u) => {
                    let part = Part {
                        settings: upstream.clone(),
                        value: u.clone(),
                    };
                    next.upstreams.insert(upstream.name.clone(), part);
                    upstreams.push(u);
                }
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
        let challenge = keep(
            kept.challenge.as_ref(),
            &mut next.challenge,
            (settings.lifetime.as_secs(), key),
            |(lifetime, key)| Challenge::new(*lifetime, key.as_deref(), unix_now()),
        );
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
            .map(|r| {
                let limit = r.rate_limit.as_ref()?;
                Some(keep_named(
                    &kept.route_limits,
                    &mut next.route_limits,
                    &r.name,
                    limit.clone(),
                    RouteLimiter::new,
                ))
            })
            .collect();
        let adaptive = config.protect.adaptive.as_ref().map(|a| {
            let names = config.routes.iter().map(|r| r.name.clone()).collect();
            keep(
                kept.adaptive.as_ref(),
                &mut next.adaptive,
                (a.clone(), names),
                |(a, names)| match &kept.adaptive {
                    Some(old) => Adaptive::carried_over(&old.value, a, names.clone()),
                    None => Adaptive::new(a, names.clone()),
                },
            )
        });
        let shedders = config
            .upstreams
            .iter()
            .map(|u| {
                let shedding = config.protect.load_shedding.as_ref()?;
                Some(keep_named(
                    &kept.shedders,
                    &mut next.shedders,
                    &u.name,
                    shedding.clone(),
                    Shedder::new,
                ))
            })
            .collect();
        let bans = config.protect.bans.as_ref().map(|b| {
            let settings = (
                b.clone(),
                config.server.trusted_proxies.clone(),
                config.protect.ipv6_prefix,
            );
            keep(kept.bans.as_ref(), &mut next.bans, settings, |(b, trusted, prefix)| {
                let bans = Bans::new(b, trusted).with_ipv6_prefix(*prefix);
                if let Some(old) = &kept.bans {
                    bans.carry_over(&old.value, crate::upstream::health::now_ms());
                }
                bans
            })
        });
        let cache = config.routes.iter().any(|r| r.cache.is_some()).then(|| {
            keep(
                kept.cache.as_ref(),
                &mut next.cache,
                config.cache.clone(),
                |settings| match &kept.cache {
                    Some(old) => Cache::carried_over(&old.value, settings),
                    None => Cache::new(settings),
                },
            )
        });
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
        let body_budget = keep(
            kept.body_budget.as_ref(),
            &mut next.body_budget,
            config.limits.request_buffer_memory,
            |bytes| {
                tokio::sync::Semaphore::new(
                    usize::try_from(*bytes)
                        .unwrap_or(usize::MAX)
                        .min(tokio::sync::Semaphore::MAX_PERMITS),
                )
            },
        );
        let snapshot = Snapshot {
            body_budget,
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
        };
        Ok((snapshot, next))
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
