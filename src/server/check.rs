//! One validation of a config, with everything that needs I/O: the
//! certificates of every TLS listener (and the rustls configs built from
//! them), the directories and key files of the logs, and the snapshot
//! itself (upstream names resolved, key files read). `portcullis check`,
//! start-up and reload (and later the admin API) all call [`validate`];
//! nothing else validates. Binding the ports is left to start-up. The
//! admin API's token files are read here too, so `check` reports them.

use super::*;
use crate::config::ConfigError;

/// A config that passed every check, with what the checks built.
pub struct Validated {
    /// The certificate store of each TLS listener, in listener order.
    pub stores: Vec<Arc<tls::CertStore>>,
    /// The rustls config of each listener (`None`: cleartext).
    pub server_configs: Vec<Option<Arc<rustls::ServerConfig>>>,
    /// Problems that do not stop the config (a route host no certificate
    /// covers).
    pub warnings: Vec<String>,
    pub snapshot: Snapshot,
    /// The state to build the next snapshot from.
    pub kept: Kept,
    /// The admin API's tokens, when `[admin]` is on.
    pub tokens: Option<admin::Tokens>,
    /// The admin API's certificates and rustls config, with `[admin.tls]`.
    pub admin_tls: Option<(Arc<tls::CertStore>, Arc<rustls::ServerConfig>)>,
}

/// Validates `config` fully, reporting every error with its path; the
/// snapshot is built with `observe` (start-up passes the real one, `check`
/// a disabled one) from the parts in `kept` (start-up and `check`:
/// `Kept::default()`; `kept` itself is never changed).
pub async fn validate(config: &Config, observe: &Arc<Observe>, kept: &Kept) -> Result<Validated, ConfigErrors> {
    let mut errors = crate::observe::check_files(config);
    let stores = match load_certificates(config) {
        Ok(stores) => stores,
        Err(mut e) => {
            errors.append(&mut e.0);
            Vec::new()
        }
    };
    let warnings = uncovered_route_hosts(config, &stores);
    let (tokens, admin_tls) = admin_parts(config, &mut errors);
    let mut server_configs = Vec::new();
    let mut next_store = stores.iter();
    for (i, listener) in config.listeners.iter().enumerate() {
        let built = match (&listener.tls, errors.is_empty()) {
            (Some(t), true) => match next_store.next() {
                Some(store) => match tls::server_config(store.clone(), t) {
                    Ok(server_config) => Some(server_config),
                    Err(message) => {
                        errors.push(ConfigError {
                            path: format!("listeners[{i}].tls"),
                            message,
                        });
                        None
                    }
                },
                None => None,
            },
            _ => None,
        };
        server_configs.push(built);
    }
    let snapshot = match Snapshot::build(config.clone(), observe, kept).await {
        Ok(snapshot) => Some(snapshot),
        Err(mut e) => {
            errors.append(&mut e.0);
            None
        }
    };
    match snapshot {
        Some((snapshot, kept)) if errors.is_empty() => Ok(Validated {
            stores,
            server_configs,
            warnings,
            snapshot,
            kept,
            tokens,
            admin_tls,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// The admin API's tokens and TLS material, when `[admin]` is on; every
/// problem goes to `errors`.
#[allow(clippy::type_complexity, reason = "a pair of optional parts, named at the one call")]
fn admin_parts(
    config: &Config,
    errors: &mut Vec<ConfigError>,
) -> (
    Option<admin::Tokens>,
    Option<(Arc<tls::CertStore>, Arc<rustls::ServerConfig>)>,
) {
    let admin_tls = match config.admin.as_ref().and_then(|a| a.tls.as_ref()) {
        None => None,
        Some(t) => match tls::CertStore::load(admin::CERTIFICATES, t) {
            Ok(store) => {
                let store = Arc::new(store);
                match tls::server_config(store.clone(), t) {
                    Ok(server_config) => Some((store, server_config)),
                    Err(message) => {
                        errors.push(ConfigError {
                            path: "admin.tls".into(),
                            message,
                        });
                        None
                    }
                }
            }
            Err(mut e) => {
                errors.append(&mut e);
                None
            }
        },
    };
    let tokens = match config.admin.as_ref().map(admin::Tokens::load) {
        None => None,
        Some(Ok(tokens)) => Some(tokens),
        Some(Err(mut e)) => {
            errors.append(&mut e);
            None
        }
    };
    (tokens, admin_tls)
}
