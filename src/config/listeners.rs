//! `[[listeners]]` and `[listeners.tls]`: where the proxy listens, TLS
//! termination and client certificates; the model and its reading.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderName;

use super::IpFilter;
use super::defaults;
use super::protect;
use super::reader::{Errors, Table, positive_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge only.
    H2c,
    /// Both, told apart by the HTTP/2 connection preface.
    Auto,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub protocol: ListenerProtocol,
    /// TLS termination; `None` for a cleartext listener.
    pub tls: Option<TlsConfig>,
    /// Cleartext listener that answers every request with a 308 to
    /// `https://` on this port.
    pub redirect_https_port: Option<u16>,
    /// Checked at accept, before the `[protect]` lists.
    pub ip_filter: IpFilter,
    /// Connections start with a PROXY protocol v1 or v2 header naming the
    /// real client; accepted only from `server.trusted_proxies`.
    pub proxy_protocol: bool,
}

/// `[listeners.tls]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateFiles>,
    /// Clients without SNI get the first certificate, or are refused.
    pub refuse_without_sni: bool,
    pub handshake_timeout: Duration,
    /// `Strict-Transport-Security: max-age=...` on every response.
    pub hsts_max_age: Option<Duration>,
    /// Client certificates (mTLS); `None` = not asked for.
    pub client_auth: Option<ClientAuth>,
    /// Check the certificate files this often and reload when they change.
    pub watch_interval: Option<Duration>,
}

/// `[listeners.tls.client_auth]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuth {
    /// Without a certificate the handshake fails (else it is optional).
    pub required: bool,
    /// PEM bundle of the CAs that issue client certificates.
    pub ca: std::path::PathBuf,
    /// Headers carrying the verified subject and SHA-256 fingerprint to the
    /// upstream; the same headers from the client are always removed.
    pub subject_header: HeaderName,
    pub fingerprint_header: HeaderName,
}

/// One certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Where it was configured (`listeners[0].tls.certificates[1]`), for errors.
    pub path: String,
}

#[allow(
    clippy::too_many_lines,
    reason = "reads one [[listeners]] table key by key, in the order docs/config.md lists them"
)]
pub(super) fn read_listeners(top: &Table<'_>, errors: &Errors) -> Vec<ListenerConfig> {
    let mut listeners = Vec::new();
    let Some(items) = top.array("listeners") else {
        if top.get("listeners").is_none() {
            errors.push(
                "listeners",
                "at least one listener is required, such as [[listeners]] bind = \"0.0.0.0:8080\"",
            );
        }
        return listeners;
    };
    if items.is_empty() {
        errors.push("listeners", "at least one listener is required");
    }
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("listeners[{i}]");
        let Some(t) = Table::new(item, path.clone(), errors) else {
            continue;
        };
        let name = t.str("name").map_or_else(|| path.clone(), str::to_owned);
        let protocol = t
            .choice(
                "protocol",
                &[
                    ("auto", ListenerProtocol::Auto),
                    ("http1", ListenerProtocol::Http1),
                    ("h2c", ListenerProtocol::H2c),
                ],
            )
            .unwrap_or(ListenerProtocol::Auto);
        let mut bind = Vec::new();
        match t.str_or_strs("bind") {
            None if t.get("bind").is_none() => {
                t.error("bind", "required: the address to listen on, such as \"0.0.0.0:8080\"")
            }
            None => {}
            Some(list) => {
                if list.is_empty() {
                    t.error("bind", "must list at least one address");
                }
                for (addr_path, text) in list {
                    match text.parse::<SocketAddr>() {
                        Ok(addr) => {
                            if addr.port() != 0 {
                                if let Some(first) = seen.get(&addr) {
                                    errors.push(&addr_path, format!("address {addr} is already used by {first}"));
                                    continue;
                                }
                                seen.insert(addr, addr_path.clone());
                            }
                            bind.push(addr);
                        }
                        Err(_) => errors.push(
                            addr_path,
                            format!("invalid socket address \"{text}\", expected IP:port such as \"0.0.0.0:8080\" or \"[::]:8080\""),
                        ),
                    }
                }
            }
        }
        let tls = t.table("tls").map(read_tls);
        let redirect_https_port = match (t.bool("redirect_to_https"), t.uint("https_port")) {
            (Some(true), port) => {
                let port = port.unwrap_or(443);
                if port == 0 || port > 65535 {
                    t.error(
                        "https_port",
                        format!("must be a port between 1 and 65535, found {port}"),
                    );
                }
                Some(port.clamp(1, 65535) as u16)
            }
            (_, Some(_)) => {
                t.error("https_port", "only applies with redirect_to_https = true");
                None
            }
            _ => None,
        };
        if tls.is_some() && redirect_https_port.is_some() {
            t.error("redirect_to_https", "a TLS listener cannot redirect to itself");
        }
        if tls.is_some() && protocol != ListenerProtocol::Auto {
            t.error(
                "protocol",
                "a TLS listener chooses HTTP/2 or HTTP/1.1 by ALPN: leave protocol out",
            );
        }
        let ip_filter = protect::read_ip_filter(&t);
        let proxy_protocol = t.bool("proxy_protocol").unwrap_or(false);
        t.finish();
        listeners.push(ListenerConfig {
            name,
            bind,
            protocol,
            tls,
            redirect_https_port,
            ip_filter,
            proxy_protocol,
        });
    }
    listeners
}

pub(super) fn read_tls(t: Table<'_>) -> TlsConfig {
    let mut certificates = Vec::new();
    match t.array("certificates") {
        None if t.get("certificates").is_none() => t.error(
            "certificates",
            "required: [{ cert = \"chain.pem\", key = \"key.pem\" }]",
        ),
        None => {}
        Some([]) => t.error("certificates", "must list at least one certificate"),
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{}[{i}]", t.path_of("certificates"));
                let Some(c) = Table::new(item, path.clone(), t.errors()) else {
                    continue;
                };
                let cert = c.str("cert");
                let key = c.str("key");
                if cert.is_none() && c.get("cert").is_none() {
                    c.error("cert", "required: path of the PEM certificate chain (leaf first)");
                }
                if key.is_none() && c.get("key").is_none() {
                    c.error("key", "required: path of the PEM private key");
                }
                c.finish();
                if let (Some(cert), Some(key)) = (cert, key) {
                    certificates.push(CertificateFiles {
                        cert: cert.into(),
                        key: key.into(),
                        path,
                    });
                }
            }
        }
    }
    let refuse_without_sni = t
        .choice("without_sni", &[("default", false), ("refuse", true)])
        .unwrap_or(false);
    let client_auth = t.table("client_auth").and_then(|c| {
        let required = c.choice("mode", &[("required", true), ("optional", false)]);
        if required.is_none() && c.get("mode").is_none() {
            c.error("mode", "required: \"required\" or \"optional\"");
        }
        let ca = c.str("ca");
        if ca.is_none() && c.get("ca").is_none() {
            c.error("ca", "required: PEM bundle of the CAs that issue client certificates");
        }
        let header = |key: &'static str, default: &'static str| match c.str(key) {
            Some(name) => HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|_| {
                c.error(key, format!("invalid header name \"{name}\""));
                HeaderName::from_static(default)
            }),
            None => HeaderName::from_static(default),
        };
        let subject_header = header("subject_header", defaults::CLIENT_CERT_SUBJECT_HEADER);
        let fingerprint_header = header("fingerprint_header", defaults::CLIENT_CERT_FINGERPRINT_HEADER);
        c.finish();
        Some(ClientAuth {
            required: required?,
            ca: ca?.into(),
            subject_header,
            fingerprint_header,
        })
    });
    let tls = TlsConfig {
        certificates,
        refuse_without_sni,
        handshake_timeout: positive_duration(&t, "handshake_timeout", defaults::TLS_HANDSHAKE_TIMEOUT),
        hsts_max_age: t.duration("hsts_max_age"),
        client_auth,
        watch_interval: match t.duration("watch_interval") {
            Some(d) if d < Duration::from_millis(100) => {
                t.error("watch_interval", "must be at least 100ms");
                None
            }
            other => other,
        },
    };
    t.finish();
    tls
}
