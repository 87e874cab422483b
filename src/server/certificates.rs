//! The certificates of the TLS listeners: loading them (at start and in
//! `check`), the route hosts none covers, and reloading them (SIGHUP, the
//! file watcher), each reload logged, counted and audited.

use super::*;

/// Loads the certificates of every TLS listener (used by `check` and bind).
pub fn load_certificates(config: &Config) -> Result<Vec<Arc<tls::CertStore>>, ConfigErrors> {
    let mut stores = Vec::new();
    let mut errors = Vec::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        if let Some(t) = &listener.tls {
            match tls::CertStore::load(&listener.name, t) {
                Ok(store) => stores.push(Arc::new(store)),
                Err(mut e) => errors.append(&mut e),
            }
            if let Some(auth) = &t.client_auth {
                if let Err(message) = tls::load_roots(&auth.ca) {
                    errors.push(crate::config::ConfigError {
                        path: format!("listeners[{i}].tls.client_auth.ca"),
                        message,
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(stores)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Route hosts that no certificate of any TLS listener covers, as warnings
/// (`routes[0].host: no TLS certificate covers "a.example.com"`). Empty when
/// there is no TLS listener.
pub fn uncovered_route_hosts(config: &Config, stores: &[Arc<tls::CertStore>]) -> Vec<String> {
    if stores.is_empty() {
        return Vec::new();
    }
    let tables: Vec<_> = stores.iter().map(|s| s.current()).collect();
    let mut warnings = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        for host in &route.hosts {
            let name = match host {
                crate::config::HostPattern::Exact(name) => name.clone(),
                // A wildcard route is covered when one of its names would be.
                crate::config::HostPattern::Wildcard(suffix) => format!("portcullis-probe{suffix}"),
            };
            if !tables.iter().any(|t| t.covers(&name)) {
                let shown = match host {
                    crate::config::HostPattern::Exact(n) => n.clone(),
                    crate::config::HostPattern::Wildcard(suffix) => format!("*{suffix}"),
                };
                warnings.push(format!("routes[{i}].host: no TLS certificate covers \"{shown}\""));
            }
        }
    }
    warnings
}

/// Reloads the certificates of every TLS listener: new handshakes use the
/// new files, established connections keep theirs, and a listener whose
/// files fail keeps its old certificates. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CertReloader {
    /// One per TLS listener; replaced by a reload that adds or changes
    /// TLS listeners.
    pub(super) stores: Arc<ArcSwap<Vec<Arc<tls::CertStore>>>>,
    pub(super) observe: Arc<Observe>,
}

impl CertReloader {
    /// Reloads every store; returns the errors of the ones that failed.
    pub fn reload(&self) -> Result<usize, ConfigErrors> {
        self.reload_by("api")
    }

    /// [`reload`](Self::reload), recording `trigger` (such as `SIGHUP`) in
    /// the audit log.
    pub fn reload_by(&self, trigger: &str) -> Result<usize, ConfigErrors> {
        let mut errors = Vec::new();
        let stores = self.stores.load_full();
        for store in stores.iter() {
            if let Err(mut e) = reload_store(store, trigger, &self.observe) {
                errors.append(&mut e.0);
            }
        }
        if errors.is_empty() {
            Ok(stores.len())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The certificate store of every TLS listener now.
    pub fn stores(&self) -> Arc<Vec<Arc<tls::CertStore>>> {
        self.stores.load_full()
    }
}

/// Reloads one listener's certificates, logging, counting and auditing the
/// result.
pub(super) fn reload_store(store: &tls::CertStore, trigger: &str, observe: &Observe) -> Result<(), ConfigErrors> {
    let before = store.current().fingerprints.clone();
    let result = store.reload();
    let after = store.current().fingerprints.clone();
    let error = match &result {
        Ok(()) => {
            tracing::info!(listener = %store.listener, %trigger, fingerprints = ?after, "certificates reloaded");
            None
        }
        Err(e) => {
            let text = e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            tracing::error!(listener = %store.listener, %trigger, "certificate reload failed ({text}); keeping the current certificates");
            Some(text)
        }
    };
    if let Some(m) = &observe.metrics {
        m.reload("certificates", result.is_ok());
    }
    observe.audit(Event::CertificatesReload {
        trigger: trigger.to_owned(),
        listener: store.listener.clone(),
        result: if result.is_ok() { "ok" } else { "error" }.to_owned(),
        added: after.iter().filter(|f| !before.contains(f)).cloned().collect(),
        removed: before.iter().filter(|f| !after.contains(f)).cloned().collect(),
        error,
    });
    result.map_err(ConfigErrors)
}

/// Reloads a listener's certificates when their files change.
pub(super) async fn watch_certificates(
    store: Arc<tls::CertStore>,
    interval: Duration,
    stop: CancellationToken,
    observe: Arc<Observe>,
) {
    let mut seen = store.files_signature();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = store.files_signature();
        if now == seen {
            continue;
        }
        seen = now;
        // Logged, counted and audited by reload_store; the old
        // certificates stay in use on failure.
        let _ = reload_store(&store, "file-watch", &observe);
    }
}
