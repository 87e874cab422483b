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
//! the path of each change (the plan's `restart` differences): the
//! listeners (their sockets and TLS), the `[limits]` and connection caps
//! that the listeners and the connection table were built with, and the
//! log, metrics and admin outputs, which are opened once per process.
//! Certificates are reloaded by the certificate reloader (SIGHUP runs
//! both). Every reload computes the [`Plan`] of what changes: the caller
//! gets it, the audit record carries it, and a dry run returns only it.

use super::*;
use std::path::Path;

use crate::config::ConfigError;
use crate::observe::audit::Event;
use crate::plan::{Action, Plan};

/// Reloads the config of a running proxy; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    snapshot: SharedSnapshot,
    /// The state the next snapshot is built from; the lock also makes
    /// reloads one at a time (it is never taken by a request).
    kept: Arc<tokio::sync::Mutex<Kept>>,
    observe: Arc<Observe>,
    /// The running certificates, to say what a new config changes in them.
    certificates: Arc<Vec<Arc<tls::CertStore>>>,
    /// 1 for the config the proxy started with, +1 at every reload.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

/// Certificates that expire within this are named by the plan.
const EXPIRY_WARNING_SECONDS: i64 = 30 * 86_400;

impl Reloader {
    pub(super) fn new(
        snapshot: SharedSnapshot,
        kept: Kept,
        observe: Arc<Observe>,
        certificates: Arc<Vec<Arc<tls::CertStore>>>,
    ) -> Reloader {
        Reloader {
            snapshot,
            kept: Arc::new(tokio::sync::Mutex::new(kept)),
            observe,
            certificates,
            generation: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }

    /// The generation of the running config: 1 at start, +1 per reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a reload that failed before there was a config to apply
    /// (it did not parse).
    pub fn refused(&self, trigger: &str, path: Option<&Path>, errors: &ConfigErrors) {
        self.record(trigger, path, Err(errors), &Plan::default());
    }

    /// The state the next snapshot would be built from (tests, inspection).
    pub async fn kept(&self) -> Kept {
        self.kept.lock().await.clone()
    }

    /// Reads `path` and applies it; see [`apply`](Self::apply).
    pub async fn reload_file(&self, path: &Path, trigger: &str) -> Result<Plan, ConfigErrors> {
        match Config::load(path) {
            Ok(config) => self.apply(config, trigger).await,
            Err(errors) => {
                self.refused(trigger, Some(path), &errors);
                Err(errors)
            }
        }
    }

    /// What applying `config` would change, after the same validation as
    /// [`apply`](Self::apply); nothing is swapped, logged or audited.
    pub async fn dry_run(&self, config: Config) -> Result<Plan, ConfigErrors> {
        let kept = self.kept.lock().await;
        self.prepare(&config, &kept).await.map(|(plan, _)| plan)
    }

    /// Validates `config` and swaps it in, or returns every error with its
    /// path and changes nothing. Returns the plan of what changed. Logged,
    /// counted (`portcullis_reloads_total{kind="config"}`) and audited
    /// either way, with `trigger` (such as `SIGHUP`) and the plan.
    pub async fn apply(&self, config: Config, trigger: &str) -> Result<Plan, ConfigErrors> {
        let mut kept = self.kept.lock().await;
        let path = config.source.as_ref().map(|(p, _)| p.clone());
        let (plan, validated) = match self.prepare(&config, &kept).await {
            Ok(ready) => ready,
            Err(errors) => {
                let plan = Plan::between(&self.snapshot.load().config, &config);
                self.record(trigger, path.as_deref(), Err(&errors), &plan);
                return Err(errors);
            }
        };
        self.snapshot.store(Arc::new(validated.snapshot));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *kept = validated.kept;
        drop(kept);
        for warning in &validated.warnings {
            tracing::warn!("{warning}");
        }
        let mut summary = config_summary(&config, &validated.stores, trigger);
        if let Event::ConfigLoad { changes, .. } = &mut summary {
            changes.clone_from(&plan.differences);
        }
        self.record(trigger, path.as_deref(), Ok(&summary), &plan);
        Ok(plan)
    }

    /// Validates `config` against the running one: the plan (with the
    /// certificate differences) and what validation built, or every error,
    /// those a reload cannot apply first.
    async fn prepare(&self, config: &Config, kept: &Kept) -> Result<(Plan, Validated), ConfigErrors> {
        let current = self.snapshot.load_full();
        let mut plan = Plan::between(&current.config, config);
        let mut errors: Vec<ConfigError> = plan
            .restarts()
            .map(|d| ConfigError {
                path: d.subject.clone(),
                message: format!(
                    "{}: a reload cannot apply this change yet; restart the proxy for it",
                    if d.detail.is_empty() { "changed" } else { &d.detail }
                ),
            })
            .collect();
        match validate(config, &self.observe, kept).await {
            Ok(validated) if errors.is_empty() => {
                certificate_differences(&mut plan, &self.certificates, &validated.stores);
                Ok((plan, validated))
            }
            Ok(_) => Err(ConfigErrors(errors)),
            Err(mut e) => {
                errors.append(&mut e.0);
                Err(ConfigErrors(errors))
            }
        }
    }

    fn record(&self, trigger: &str, path: Option<&Path>, result: Result<&Event, &ConfigErrors>, plan: &Plan) {
        if let Some(metrics) = &self.observe.metrics {
            metrics.reload("config", result.is_ok());
        }
        match result {
            Ok(summary) => {
                tracing::info!(%trigger, changes = plan.differences.len(), "config reloaded");
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
                    changes: plan.differences.clone(),
                });
            }
        }
    }
}

/// Certificates added and removed (by fingerprint, per listener) and those
/// of the new config that expire within 30 days.
fn certificate_differences(plan: &mut Plan, old: &[Arc<tls::CertStore>], new: &[Arc<tls::CertStore>]) {
    let now = crate::state::unix_now() as i64;
    for store in new {
        let table = store.current();
        let before = old
            .iter()
            .find(|s| s.listener == store.listener)
            .map(|s| s.current().fingerprints.clone())
            .unwrap_or_default();
        for cert in &table.certs {
            let subject = format!("certificate {:?} {}", store.listener, cert.names.join(" "));
            if !before.contains(&cert.fingerprint) {
                plan.push(Action::Add, subject.clone(), format!("sha256 {}", cert.fingerprint));
            }
            let left = cert.not_after - now;
            if left < EXPIRY_WARNING_SECONDS {
                plan.push(
                    Action::Change,
                    subject,
                    format!("expires in {} days", left.max(0) / 86_400),
                );
            }
        }
        for fingerprint in before.iter().filter(|f| !table.fingerprints.contains(f)) {
            plan.push(
                Action::Remove,
                format!("certificate {:?}", store.listener),
                format!("sha256 {fingerprint}"),
            );
        }
    }
    for store in old.iter().filter(|o| !new.iter().any(|n| n.listener == o.listener)) {
        for fingerprint in &store.current().fingerprints {
            plan.push(
                Action::Remove,
                format!("certificate {:?}", store.listener),
                format!("sha256 {fingerprint}"),
            );
        }
    }
}

/// `portcullis plan NEW --against OLD`: what applying `new` in place of
/// `old` would change, after the same validation as a reload (`new`
/// invalid: every error). Restart-only differences are in the plan, marked.
pub async fn plan(old: &Config, new: &Config) -> Result<Plan, ConfigErrors> {
    let validated = validate(new, &Observe::disabled(), &Kept::default()).await?;
    let mut plan = Plan::between(old, new);
    // The old certificates as they are on disk now (unreadable: none).
    let before = load_certificates(old).unwrap_or_default();
    certificate_differences(&mut plan, &before, &validated.stores);
    Ok(plan)
}
