//! TLS material with rustls (aws-lc-rs provider): certificate loading and
//! checks, SNI selection, hot reload, the per-listener `ServerConfig`, and
//! the roots and client certificates the upstream connector uses. The
//! listeners (`server/`) terminate TLS with it; upstream groups connect
//! with it.
//!
//! Each TLS listener owns a [`CertStore`]: the certificate files it was
//! configured with and the current [`CertTable`] behind an `ArcSwap`. The
//! rustls resolver reads the table at every handshake, so a reload (SIGHUP,
//! or [`CertStore::reload`] from the admin API) changes what new handshakes
//! get while established connections keep theirs. A reload that fails on
//! any file keeps the old table whole.
//!
//! Every certificate problem is an error naming the file and the cause:
//! unreadable, not PEM, unsupported or mismatched key, expired or not yet
//! valid, chain out of order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

use crate::config::{CertificateFiles, ConfigError, TlsConfig};

/// The crypto provider, chosen once: aws-lc-rs (post-quantum X25519MLKEM768
/// key exchange, AES-GCM and ChaCha20-Poly1305, all forward secret).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Resumption cache size per listener (sessions), for TLS 1.2 and stateful
/// TLS 1.3 resumption; TLS 1.3 tickets need no server memory.
const SESSION_CACHE: usize = 20_000;

/// A loaded, checked certificate.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// DNS names it covers (subjectAltName, else the common name), lowercase.
    pub names: Vec<String>,
    /// SHA-256 of the leaf, hex: printed in logs and by the demo.
    pub fingerprint: String,
    /// The leaf's `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// What the admin API and `plan` show of one certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    pub fingerprint: String,
    pub names: Vec<String>,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// The certificates of a listener, indexed for SNI.
#[derive(Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `(".example.com", key)`, longest suffix first.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
    pub fingerprints: Vec<String>,
    pub names: Vec<String>,
    /// Each certificate, in file order.
    pub certs: Vec<CertInfo>,
}

impl CertTable {
    fn new(certs: Vec<LoadedCert>) -> CertTable {
        let mut table = CertTable::default();
        for cert in certs {
            if table.default.is_none() {
                table.default = Some(cert.key.clone());
            }
            for name in &cert.names {
                match name.strip_prefix('*') {
                    Some(suffix) => table.wildcard.push((suffix.to_owned(), cert.key.clone())),
                    None => {
                        table.exact.entry(name.clone()).or_insert_with(|| cert.key.clone());
                    }
                }
                table.names.push(name.clone());
            }
            table.certs.push(CertInfo {
                fingerprint: cert.fingerprint.clone(),
                names: cert.names.clone(),
                not_after: cert.not_after,
            });
            table.fingerprints.push(cert.fingerprint);
        }
        table.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        table
    }

    /// The certificate for an SNI name: exact, then the longest wildcard
    /// (one label only, as browsers match), then the default.
    fn lookup(&self, name: Option<&str>, refuse_without_sni: bool) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name else {
            return if refuse_without_sni { None } else { self.default.clone() };
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        for (suffix, key) in &self.wildcard {
            if let Some(label) = name.strip_suffix(suffix.as_str()) {
                if !label.is_empty() && !label.contains('.') {
                    return Some(key.clone());
                }
            }
        }
        self.default.clone()
    }

    /// Whether some certificate covers `host` (exact or wildcard).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.exact.contains_key(&host)
            || self.wildcard.iter().any(|(suffix, _)| {
                host.strip_suffix(suffix.as_str())
                    .is_some_and(|l| !l.is_empty() && !l.contains('.'))
            })
    }
}

/// The certificates of one listener, reloadable.
pub struct CertStore {
    pub listener: String,
    files: Vec<CertificateFiles>,
    table: ArcSwap<CertTable>,
    refuse_without_sni: bool,
    /// Poll the files this often and reload on change (`watch_interval`).
    pub watch_interval: Option<std::time::Duration>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("listener", &self.listener).finish()
    }
}

impl CertStore {
    /// Loads every certificate of a listener; all problems are returned.
    pub fn load(listener: &str, config: &TlsConfig) -> Result<CertStore, Vec<ConfigError>> {
        let table = load_table(&config.certificates)?;
        Ok(CertStore {
            listener: listener.to_owned(),
            files: config.certificates.clone(),
            table: ArcSwap::from_pointee(table),
            refuse_without_sni: config.refuse_without_sni,
            watch_interval: config.watch_interval,
        })
    }

    /// Modification time and length of every file, to notice a change
    /// without reading them (a missing file reads as `None`).
    pub fn files_signature(&self) -> Vec<Option<(std::time::SystemTime, u64)>> {
        self.files
            .iter()
            .flat_map(|f| [&f.cert, &f.key])
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    /// Reads the files again; on any error the current certificates stay.
    pub fn reload(&self) -> Result<(), Vec<ConfigError>> {
        let table = load_table(&self.files)?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    pub fn current(&self) -> Arc<CertTable> {
        self.table.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.table.load().lookup(hello.server_name(), self.refuse_without_sni)
    }
}

fn load_table(files: &[CertificateFiles]) -> Result<CertTable, Vec<ConfigError>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match load_cert(&f.cert, &f.key) {
            Ok(cert) => loaded.push(cert),
            Err(message) => errors.push(ConfigError {
                path: f.path.clone(),
                message,
            }),
        }
    }
    if errors.is_empty() {
        Ok(CertTable::new(loaded))
    } else {
        Err(errors)
    }
}

/// Reads, parses and checks one certificate chain and key.
pub fn load_cert(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, String> {
    let cert_pem = std::fs::read(cert_path).map_err(|e| format!("cannot read {}: {e}", cert_path.display()))?;
    let key_pem = std::fs::read(key_path).map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{} holds no PEM private key: {e}", key_path.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_path.display()))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| format!("{}: cannot parse the certificate: {e}", cert_path.display()))?;
    let validity = leaf.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(format!(
            "certificate {} expired on {}",
            cert_path.display(),
            validity.not_after
        ));
    }
    if validity.not_before > now {
        return Err(format!(
            "certificate {} is not valid before {}",
            cert_path.display(),
            validity.not_before
        ));
    }
    for (i, pair) in chain.windows(2).enumerate() {
        let (Ok((_, child)), Ok((_, parent))) = (
            x509_parser::parse_x509_certificate(&pair[0]),
            x509_parser::parse_x509_certificate(&pair[1]),
        ) else {
            return Err(format!(
                "{}: cannot parse certificate {} of the chain",
                cert_path.display(),
                i + 2
            ));
        };
        if child.issuer().as_raw() != parent.subject().as_raw() {
            return Err(format!(
                "{}: chain order wrong: certificate {} was not issued by certificate {} (the leaf comes first, then each issuer)",
                cert_path.display(),
                i + 1,
                i + 2
            ));
        }
    }
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified.keys_match().map_err(|_| {
        format!(
            "private key {} does not match certificate {}",
            key_path.display(),
            cert_path.display()
        )
    })?;

    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = leaf.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
            names.push(cn.to_ascii_lowercase());
        }
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        fingerprint: fingerprint(&chain[0]),
        not_after: validity.not_after.timestamp(),
    })
}

/// A certificate's SHA-256 fingerprint as it is usually shown: hex pairs
/// joined by colons (`ab:cd:...`).
fn fingerprint(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The rustls configuration of a listener: TLS 1.3 and 1.2 only, the
/// provider's forward-secret AEAD suites, ALPN h2 then http/1.1, session
/// resumption by rotating tickets and a bounded cache.
pub fn server_config(store: Arc<CertStore>, tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => builder.with_client_cert_verifier(client_verifier(auth)?),
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The server's suite order (the provider's: AES-GCM, then ChaCha20)
    // wins over the client's, as TLS scanners expect.
    config.ignore_client_order = true;
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    // aws-lc-rs tickets: keys rotate every 6 hours, the previous key is
    // still accepted for resumption of recent sessions.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| format!("TLS ticketer: {e}"))?;
    Ok(Arc::new(config))
}

/// Reads a PEM bundle of CA certificates into a root store.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

fn client_verifier(
    auth: &crate::config::ClientAuth,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let roots = load_roots(&auth.ca)?;
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = if auth.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|e| format!("{}: {e}", auth.ca.display()))
}

/// The verified client certificate of a connection, as header values:
/// the subject (RFC 4514 string) and the SHA-256 fingerprint of the leaf.
pub fn client_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<(http::HeaderValue, http::HeaderValue)> {
    let leaf = certs?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let subject = http::HeaderValue::from_str(&parsed.subject().to_string()).ok()?;
    let fingerprint = http::HeaderValue::from_str(&fingerprint(leaf)).ok()?;
    Some((subject, fingerprint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_lookup_prefers_exact_then_one_label_wildcards() {
        let key = |n: u8| {
            let signing = provider()
                .key_provider
                .load_private_key(
                    PrivateKeyDer::from_pem_slice(rcgen::KeyPair::generate().expect("key").serialize_pem().as_bytes())
                        .expect("pem"),
                )
                .expect("signing key");
            Arc::new(CertifiedKey::new(vec![CertificateDer::from(vec![n])], signing))
        };
        let (a, b, c) = (key(1), key(2), key(3));
        let mut table = CertTable {
            default: Some(a.clone()),
            ..Default::default()
        };
        table.exact.insert("api.example.com".into(), b.clone());
        table.wildcard.push((".example.com".into(), c.clone()));
        let pick = |name: Option<&str>| table.lookup(name, false).map(|k| k.cert[0].as_ref().to_vec());
        assert_eq!(pick(Some("api.example.com")), Some(vec![2]));
        assert_eq!(pick(Some("API.Example.com.")), Some(vec![2]));
        assert_eq!(pick(Some("www.example.com")), Some(vec![3]));
        assert_eq!(
            pick(Some("a.b.example.com")),
            Some(vec![1]),
            "a wildcard covers one label"
        );
        assert_eq!(pick(Some("example.com")), Some(vec![1]));
        assert_eq!(pick(None), Some(vec![1]));
        assert!(table.lookup(None, true).is_none());
        assert!(table.covers("www.example.com") && !table.covers("example.org"));
    }
}
