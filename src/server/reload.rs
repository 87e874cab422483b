//! Reloading the whole config while serving: read -> parse -> the same
//! [`validate`] as `check` and start-up -> a new snapshot built from the
//! kept state -> one swap. In-flight requests finish on the snapshot they
//! started with; new requests, including the next one on an open
//! keep-alive connection, use the new one. A config that fails anywhere
//! leaves the running snapshot and the kept state untouched.
//!
//! What a reload applies: routes, upstream groups and servers, protection
//! rules (rate limits, IP lists of routes, bans, challenge, attack mode,
//! load shedding), the cache rules, timeouts (for new connections), request
//! ids, `[server]` settings. What it cannot apply yet, and refuses with
//! the path of each change: the listeners (their sockets and TLS), the
//! `[limits]` and connection caps that the listeners and the connection
//! table were built with, and the log and metrics outputs, which are opened
//! once per process. Certificates are reloaded by the certificate reloader
//! (SIGHUP runs both).

use super::*;
use std::path::Path;

use crate::config::ConfigError;
use crate::observe::audit::Event;

/// Reloads the config of a running proxy; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    snapshot: SharedSnapshot,
    /// The state the next snapshot is built from; the lock also makes
    /// reloads one at a time (it is never taken by a request).
    kept: Arc<tokio::sync::Mutex<Kept>>,
    observe: Arc<Observe>,
}

impl Reloader {
    pub(super) fn new(snapshot: SharedSnapshot, kept: Kept, observe: Arc<Observe>) -> Reloader {
        Reloader {
            snapshot,
            kept: Arc::new(tokio::sync::Mutex::new(kept)),
            observe,
        }
    }

    /// The state the next snapshot would be built from (tests, inspection).
    pub async fn kept(&self) -> Kept {
        self.kept.lock().await.clone()
    }

    /// Reads `path` and applies it; see [`apply`](Self::apply).
    pub async fn reload_file(&self, path: &Path, trigger: &str) -> Result<(), ConfigErrors> {
        match Config::load(path) {
            Ok(config) => self.apply(config, trigger).await,
            Err(errors) => {
                self.record(trigger, Some(path), Err(&errors));
                Err(errors)
            }
        }
    }

    /// Validates `config` and swaps it in, or returns every error with its
    /// path and changes nothing. Logged, counted
    /// (`portcullis_reloads_total{kind="config"}`) and audited either way,
    /// with `trigger` (such as `SIGHUP`).
    pub async fn apply(&self, config: Config, trigger: &str) -> Result<(), ConfigErrors> {
        let mut kept = self.kept.lock().await;
        let current = self.snapshot.load_full();
        let mut errors = needs_restart(&current.config, &config);
        let validated = match validate(&config, &self.observe, &kept).await {
            Ok(validated) if errors.is_empty() => Some(validated),
            Ok(_) => None,
            Err(mut e) => {
                errors.append(&mut e.0);
                None
            }
        };
        let path = config.source.as_ref().map(|(p, _)| p.as_path());
        let Some(validated) = validated else {
            let errors = ConfigErrors(errors);
            self.record(trigger, path, Err(&errors));
            return Err(errors);
        };
        self.snapshot.store(Arc::new(validated.snapshot));
        *kept = validated.kept;
        drop(kept);
        for warning in &validated.warnings {
            tracing::warn!("{warning}");
        }
        self.record(trigger, path, Ok(&config_summary(&config, &validated.stores, trigger)));
        Ok(())
    }

    fn record(&self, trigger: &str, path: Option<&Path>, result: Result<&Event, &ConfigErrors>) {
        if let Some(metrics) = &self.observe.metrics {
            metrics.reload("config", result.is_ok());
        }
        match result {
            Ok(summary) => {
                tracing::info!(%trigger, "config reloaded");
                self.observe.audit(summary.clone());
            }
            Err(errors) => {
                tracing::error!(%trigger, "config reload failed; keeping the running config");
                for e in &errors.0 {
                    tracing::error!("config reload: {e}");
                }
                self.observe.audit(Event::ConfigReloadFailed {
                    trigger: trigger.to_owned(),
                    file: path.map(|p| p.display().to_string()),
                    errors: errors.0.iter().map(ToString::to_string).collect(),
                });
            }
        }
    }
}

/// The parts of `new` that differ from `old` and that a reload cannot
/// apply yet, each as an error with its path.
fn needs_restart(old: &Config, new: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut check = |path: &str, same: bool| {
        if !same {
            errors.push(ConfigError {
                path: path.to_owned(),
                message: "changed, and a reload cannot apply this change yet: restart the proxy for it".into(),
            });
        }
    };
    check("listeners", old.listeners == new.listeners);
    check("limits", old.limits == new.limits);
    check("access_log", old.access_log == new.access_log);
    check("audit_log", old.audit_log == new.audit_log);
    check("metrics", old.metrics == new.metrics);
    let (a, b) = (&old.protect, &new.protect);
    check("protect.max_connections", a.max_connections == b.max_connections);
    check(
        "protect.max_connections_per_ip",
        a.max_connections_per_ip == b.max_connections_per_ip,
    );
    check(
        "protect.new_connections_per_ip",
        a.new_connections_per_ip == b.new_connections_per_ip,
    );
    check("protect.evict_idle_after", a.evict_idle_after == b.evict_idle_after);
    check("protect.allow / protect.deny", a.ip_filter == b.ip_filter);
    check("protect.ipv6_prefix", a.ipv6_prefix == b.ipv6_prefix);
    check(
        "protect.h2_max_concurrent_streams",
        a.h2_max_concurrent_streams == b.h2_max_concurrent_streams,
    );
    errors
}
