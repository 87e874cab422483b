//! Reloading the whole config while serving: read -> parse -> the same
//! [`validate`] as `check` and start-up -> a new snapshot built from the
//! kept state -> one swap. In-flight requests finish on the snapshot they
//! started with; new requests, including the next one on an open
//! keep-alive connection, use the new one. A config that fails anywhere
//! leaves the running snapshot and the kept state untouched.
//!
//! What a reload applies: routes, upstream groups and servers, protection
//! rules (rate limits, IP lists of routes, bans, challenge, attack mode,
//! load shedding), the cache rules, request ids, `[server]` settings, and
//! for new connections timeouts, limits and the listeners (added ones
//! bound before the swap, removed ones drained, kept ones keep their
//! sockets: `listeners.rs`). What it cannot apply yet, and refuses with
//! the path of each change (the plan's `restart` differences): the caps
//! and lists the connection table was built with, and the log, metrics
//! and admin outputs, which are opened once per process.
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
    /// The running certificates: what a new config changes in them, and
    /// the stores of the TLS listeners a reload adds or changes.
    certificates: CertReloader,
    /// The running listeners, changed by a reload.
    listeners: Arc<tokio::sync::Mutex<super::listeners::Listeners>>,
    /// 1 for the config the proxy started with, +1 at every reload.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Follows the generation, for whoever waits on a reload.
    reloaded: tokio::sync::watch::Sender<u64>,
}

/// Certificates that expire within this are named by the plan.
const EXPIRY_WARNING_SECONDS: i64 = 30 * 86_400;

impl Reloader {
    pub(super) fn new(
        snapshot: SharedSnapshot,
        kept: Kept,
        observe: Arc<Observe>,
        certificates: CertReloader,
        listeners: Arc<tokio::sync::Mutex<super::listeners::Listeners>>,
    ) -> Reloader {
        Reloader {
            snapshot,
            kept: Arc::new(tokio::sync::Mutex::new(kept)),
            observe,
            certificates,
            listeners,
            generation: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            reloaded: tokio::sync::watch::Sender::new(1),
        }
    }

    /// Where every listener is bound now, in config order.
    pub async fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners.lock().await.local_addrs()
    }

    /// A receiver that sees the generation of every reload swapped in.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
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
        // The sockets a dry run binds, to see that it can, close here.
        self.prepare(&config, &kept).await.map(|(plan, _, _)| plan)
    }

    /// Validates `config` and swaps it in, or returns every error with its
    /// path and changes nothing. Returns the plan of what changed. Logged,
    /// counted (`portcullis_reloads_total{kind="config"}`) and audited
    /// either way, with `trigger` (such as `SIGHUP`) and the plan.
    pub async fn apply(&self, config: Config, trigger: &str) -> Result<Plan, ConfigErrors> {
        let mut kept = self.kept.lock().await;
        let path = config.source.as_ref().map(|(p, _)| p.clone());
        let (plan, validated, listeners) = match self.prepare(&config, &kept).await {
            Ok(ready) => ready,
            Err(errors) => {
                let plan = Plan::between(&self.snapshot.load().config, &config);
                self.record(trigger, path.as_deref(), Err(&errors), &plan);
                return Err(errors);
            }
        };
        let previous = self.snapshot.load_full();
        // Taken before the swap: once the snapshot is in, nothing awaits
        // until the listeners are committed too.
        let mut running = self.listeners.lock().await;
        let next = Arc::new(validated.snapshot);
        self.snapshot.store(next.clone());
        if let Some(cache) = &next.cache {
            cache.fit_store();
        }
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *kept = validated.kept;
        running.commit(listeners);
        self.replace_stores(&previous.config, &config, &validated.stores, running.context());
        drop(running);
        drop(kept);
        for warning in &validated.warnings {
            tracing::warn!("{warning}");
        }
        let mut summary = config_summary(&config, &validated.stores, trigger);
        if let Event::ConfigLoad { changes, .. } = &mut summary {
            changes.clone_from(&plan.differences);
        }
        self.record(trigger, path.as_deref(), Ok(&summary), &plan);
        self.reloaded.send_replace(generation);
        Ok(plan)
    }

    /// Validates `config` against the running one: the plan (with the
    /// certificate differences) and what validation built, or every error,
    /// those a reload cannot apply first.
    async fn prepare(
        &self,
        config: &Config,
        kept: &Kept,
    ) -> Result<(Plan, Validated, super::listeners::Prepared), ConfigErrors> {
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
        let validated = match validate(config, &self.observe, kept).await {
            Ok(validated) if errors.is_empty() => validated,
            Ok(_) => return Err(ConfigErrors(errors)),
            Err(mut e) => {
                errors.append(&mut e.0);
                return Err(ConfigErrors(errors));
            }
        };
        let listeners = self
            .listeners
            .lock()
            .await
            .prepare(config, &self.observe, &validated.server_configs, &current.config)
            .await
            .map_err(ConfigErrors)?;
        let running = self.certificates.stores();
        let serving = next_stores(&current.config, config, &running, &validated.stores);
        certificate_differences(&mut plan, &running, &serving);
        Ok((plan, validated, listeners))
    }

    /// Puts in the certificate reloader the stores [`next_stores`] chose,
    /// watching the new ones that ask for it.
    fn replace_stores(
        &self,
        old: &Config,
        new: &Config,
        loaded: &[Arc<tls::CertStore>],
        context: Option<&super::listeners::Context>,
    ) {
        let running = self.certificates.stores();
        let next = next_stores(old, new, &running, loaded);
        for store in next.iter().filter(|n| !running.iter().any(|r| Arc::ptr_eq(r, n))) {
            if let (Some(interval), Some(context)) = (store.watch_interval, context) {
                context.tasks.spawn(watch_certificates(
                    store.clone(),
                    interval,
                    context.stop.clone(),
                    self.observe.clone(),
                ));
            }
        }
        self.certificates.stores.store(Arc::new(next));
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

/// The certificate store of each TLS listener after a reload: the running
/// one where the listener's TLS settings are unchanged (its acceptor is
/// kept, so are its certificates until a certificate reload), the newly
/// loaded one otherwise; the admin API's stays (a restart changes it).
fn next_stores(
    old: &Config,
    new: &Config,
    running: &[Arc<tls::CertStore>],
    loaded: &[Arc<tls::CertStore>],
) -> Vec<Arc<tls::CertStore>> {
    let mut next: Vec<Arc<tls::CertStore>> = running
        .iter()
        .filter(|s| s.listener == super::admin::CERTIFICATES)
        .cloned()
        .collect();
    for listener in new.listeners.iter().filter(|l| l.tls.is_some()) {
        let unchanged = old
            .listeners
            .iter()
            .any(|o| o.name == listener.name && o.tls == listener.tls);
        let from = if unchanged { running } else { loaded };
        if let Some(store) = from.iter().find(|s| s.listener == listener.name) {
            next.push(store.clone());
        }
    }
    next
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
