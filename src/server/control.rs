//! The one place a [`Change`] is applied: the admin API, SIGHUP and the
//! config file watch all call [`Control::apply`]. Every change is logged
//! and audited with its caller: a reload as `config.load` /
//! `config.reload_failed` (by the reloader, with its plan), every other
//! change as one `change` record holding the change itself and its
//! result.

use super::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::change::{Change, ChangeError, Purge, Step, mode_name_str};
use crate::upstream::health::now_ms;

/// Applies changes to a running proxy; cheap to clone.
#[derive(Clone)]
pub struct Control {
    pub(super) snapshot: SharedSnapshot,
    pub(super) reloader: Reloader,
    pub(super) certificates: CertReloader,
    pub(super) observe: Arc<Observe>,
    /// The file a reload without a text reads (`None`: a built-in config).
    pub(super) config_path: Option<PathBuf>,
    /// False once the proxy begins to shut down (`/readyz`).
    pub(super) ready: Arc<AtomicBool>,
    pub(super) started: std::time::Instant,
}

impl Control {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn certificates(&self) -> &CertReloader {
        &self.certificates
    }

    pub fn observe(&self) -> &Arc<Observe> {
        &self.observe
    }

    /// The config file a reload reads (`None`: a built-in config).
    pub fn config_file(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    /// Whether the proxy takes new work: false while it drains.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Reloads the config file whenever its content changes, checked every
    /// `server.watch_config` (read again after each check, so a reload can
    /// turn the watch on, off or change its pace), as the caller
    /// `file-watch`. A file that fails is reported once per content.
    pub async fn watch_config(self, stop: CancellationToken) {
        let Some(path) = self.config_path.clone() else { return };
        let digest = |path: &std::path::Path| std::fs::read(path).ok().map(|b| crate::secret::sha256_hex(&b));
        let mut seen = self.snapshot.load().config.source.as_ref().map(|(_, h)| h.clone());
        loop {
            let interval = self.snapshot.load().config.server.watch_config;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval.unwrap_or(Duration::from_secs(1))) => {}
            }
            if interval.is_none() {
                continue;
            }
            let now = digest(&path);
            let running = self.snapshot.load().config.source.as_ref().map(|(_, h)| h.clone());
            if now.is_none() || now == seen || now == running {
                // Unreadable, seen, or already running (a SIGHUP took it).
                seen = seen.or(now);
                continue;
            }
            seen = now;
            let reload = Change::Reload {
                file: Some(path.display().to_string()),
                dry_run: false,
                text: None,
            };
            // Logged, counted and audited by the reloader.
            let _ = self.apply(reload, "file-watch").await;
        }
    }

    /// The generation of the running config (1 at start, +1 per reload).
    pub fn generation(&self) -> u64 {
        self.reloader.generation()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Applies `change` on behalf of `caller` (`SIGHUP`, `file-watch`,
    /// `admin:<token name>`); the result is what the admin API answers.
    /// It runs on a task of its own, so a caller that goes away (a client
    /// that resets its stream) cannot stop a change half-way.
    pub async fn apply(&self, change: Change, caller: &str) -> Result<Value, ChangeError> {
        let (control, caller) = (self.clone(), caller.to_owned());
        match tokio::spawn(async move { control.apply_whole(change, &caller).await }).await {
            Ok(result) => result,
            Err(e) => Err(ChangeError::Conflict(format!("the change did not finish: {e}"))),
        }
    }

    async fn apply_whole(&self, change: Change, caller: &str) -> Result<Value, ChangeError> {
        if let Change::Reload { dry_run, text, .. } = &change {
            return self.reload(text.clone(), *dry_run, caller).await;
        }
        let result = self.apply_now(&change, caller);
        match &result {
            Ok(_) => tracing::info!(%caller, change = change.kind(), "change applied"),
            Err(e) => tracing::warn!(%caller, change = change.kind(), error = %e, "change refused"),
        }
        self.observe.audit(Event::Change {
            caller: caller.to_owned(),
            change,
            result: if result.is_ok() { "ok" } else { "error" }.into(),
            error: result.as_ref().err().map(ToString::to_string),
        });
        result
    }

    async fn reload(&self, text: Option<String>, dry_run: bool, caller: &str) -> Result<Value, ChangeError> {
        let config = match (text, &self.config_path) {
            (Some(text), _) => Config::from_toml(&text, "the request body"),
            (None, Some(path)) => Config::load(path),
            (None, None) => {
                return Err(ChangeError::Conflict(
                    "this proxy runs a built-in config (demo): send the new config as the request body".into(),
                ));
            }
        };
        let result = match config {
            Ok(config) if dry_run => self.reloader.dry_run(config).await,
            Ok(config) => self.reloader.apply(config, caller).await,
            Err(errors) => {
                if !dry_run {
                    self.reloader.refused(caller, self.config_path.as_deref(), &errors);
                }
                Err(errors)
            }
        };
        match result {
            Ok(plan) => Ok(json!({
                "applied": !dry_run,
                "changes": plan.differences,
                "text": plan.text(),
            })),
            Err(errors) => Err(ChangeError::Invalid(errors.0)),
        }
    }

    fn apply_now(&self, change: &Change, caller: &str) -> Result<Value, ChangeError> {
        let snapshot = self.snapshot.load_full();
        match change {
            Change::Reload { .. } => Err(ChangeError::Conflict("a reload is applied by Control::reload".into())),
            Change::ReloadCertificates => match self.certificates.reload_by(caller) {
                Ok(listeners) => Ok(json!({ "listeners": listeners })),
                Err(errors) => Err(ChangeError::Invalid(errors.0)),
            },
            Change::Drain { upstream, server } | Change::Undrain { upstream, server } => {
                let s = find_server(&snapshot, upstream, server)?;
                let drain = matches!(change, Change::Drain { .. });
                s.health.draining.store(drain, Ordering::Relaxed);
                Ok(json!({ "upstream": upstream, "server": server, "draining": drain,
                    "in_flight": s.health.in_flight.load(Ordering::Relaxed) }))
            }
            Change::Weight {
                upstream,
                server,
                weight,
            } => {
                let s = find_server(&snapshot, upstream, server)?;
                s.set_weight(*weight);
                Ok(json!({ "upstream": upstream, "server": server, "weight": s.weight() }))
            }
            Change::Purge(purge) => {
                let cache = snapshot
                    .cache
                    .as_ref()
                    .ok_or_else(|| ChangeError::Conflict("no route caches: there is nothing to purge".into()))?;
                let removed = match purge {
                    Purge::Url(url) => cache.purge_url(url),
                    Purge::Prefix(prefix) => cache.purge_prefix(prefix),
                    Purge::Tag(tag) => cache.purge_tag(tag),
                };
                Ok(json!({ "removed": removed }))
            }
            Change::Ban { client, seconds } => {
                let bans = bans_of(&snapshot)?;
                let until = now_ms().saturating_add(seconds.saturating_mul(1000));
                bans.ban(*client, until);
                Ok(json!({ "client": bans.shown(*client), "until_ms": until }))
            }
            Change::Unban { client } => {
                let bans = bans_of(&snapshot)?;
                if bans.unban(*client) {
                    Ok(json!({ "client": bans.shown(*client), "removed": true }))
                } else {
                    Err(ChangeError::NotFound(format!("{} is not banned", bans.shown(*client))))
                }
            }
            Change::Mode { step, mode } => {
                let off = || ChangeError::Conflict(format!("protect.{} is off in the config", step.name()));
                match step {
                    Step::Adaptive => snapshot.adaptive.as_ref().ok_or_else(off)?.step.set(*mode),
                    Step::Bans => snapshot.bans.as_ref().ok_or_else(off)?.mode.set(*mode),
                    Step::LoadShedding => {
                        let shedders: Vec<_> = snapshot.shedders.iter().flatten().collect();
                        if shedders.is_empty() {
                            return Err(off());
                        }
                        for shedder in shedders {
                            shedder.mode.set(*mode);
                        }
                    }
                }
                Ok(json!({ "step": step.name(), "mode": mode_name_str(*mode) }))
            }
        }
    }
}

fn find_server<'a>(
    snapshot: &'a Snapshot,
    upstream: &str,
    server: &str,
) -> Result<&'a Arc<crate::upstream::Server>, ChangeError> {
    let group = snapshot
        .upstreams
        .iter()
        .find(|u| u.config.name == upstream)
        .ok_or_else(|| ChangeError::NotFound(format!("no upstream group {upstream:?}")))?;
    group
        .servers
        .iter()
        .find(|s| s.label == server)
        .ok_or_else(|| ChangeError::NotFound(format!("group {upstream:?} has no server {server:?}")))
}

fn bans_of(snapshot: &Snapshot) -> Result<&Arc<crate::protect::Bans>, ChangeError> {
    snapshot
        .bans
        .as_ref()
        .ok_or_else(|| ChangeError::Conflict("protect.bans is off in the config".into()))
}
