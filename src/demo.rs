//! `portcullis demo`: three small origins on loopback ephemeral ports and a
//! config that puts the proxy in front of them, so a newcomer sees the proxy
//! work with one command and no file.
//!
//! - `app-1` and `app-2` form the `app` group (round robin) behind `/`;
//! - `api` answers JSON behind `/api/` (the prefix is rewritten to `/`).
//!
//! Each origin answers with its name, the request it received, and the
//! forwarding headers the proxy added, so the proxy's work is visible.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigErrors};

/// A running demo origin.
pub struct Origin {
    pub name: &'static str,
    pub addr: SocketAddr,
}

/// Starts one origin named `name` on `127.0.0.1:0`; it serves until the
/// runtime stops.
pub async fn start_origin(name: &'static str) -> std::io::Result<Origin> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(name, req));
                if let Err(e) = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(origin = name, error = %e, "demo origin connection error");
                }
            });
        }
    });
    Ok(Origin { name, addr })
}

async fn answer(name: &'static str, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let json = name == "api";
    let body = if json {
        format!(
            "{{\"origin\":\"{name}\",\"method\":\"{}\",\"path\":\"{}\",\"x_forwarded_for\":\"{}\",\"via\":\"{}\"}}\n",
            req.method(),
            escape(req.uri().path()),
            escape(&header("x-forwarded-for")),
            escape(&header("via")),
        )
    } else {
        format!(
            "Hello from {name}!\n\nYou asked for {} {} (as {:?} from the proxy)\nHost:              {}\nX-Forwarded-For:   {}\nX-Forwarded-Proto: {}\nForwarded:         {}\nVia:               {}\n",
            req.method(),
            req.uri(),
            req.version(),
            header("host"),
            header("x-forwarded-for"),
            header("x-forwarded-proto"),
            header("forwarded"),
            header("via"),
        )
    };
    let cacheable = req.uri().path().starts_with("/static/");
    let body = if cacheable {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{body}Made at:           {now} (Unix time; cacheable for 60 s)\n")
    } else {
        body
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    if cacheable {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    }
    let content_type = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert("x-origin", HeaderValue::from_static(name));
    Ok(response)
}

fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c if c.is_control() => vec![],
            c => vec![c],
        })
        .collect()
}

/// Days the demo's certificate is valid: short-lived like the
/// certificates ACME brings (rcgen's default lasts until the year 4096,
/// which scanners rightly report), and past the 30 days under which
/// `plan` warns of an expiry, so the demo's plans show only real changes.
pub const DEMO_CERT_DAYS: i64 = 45;

/// Writes a fresh self-signed certificate for `localhost` and `127.0.0.1`,
/// valid from an hour ago for [`DEMO_CERT_DAYS`], into `dir`; returns the
/// certificate and key paths.
pub fn self_signed_certificate(dir: &std::path::Path) -> std::io::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(std::io::Error::other)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(DEMO_CERT_DAYS);
    let signing_key = rcgen::KeyPair::generate().map_err(std::io::Error::other)?;
    let generated = params.self_signed(&signing_key).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let cert = dir.join("demo-cert.pem");
    let key = dir.join("demo-key.pem");
    std::fs::write(&cert, generated.pem())?;
    std::fs::write(&key, signing_key.serialize_pem())?;
    Ok((cert, key))
}

/// A random admin token for the demo: 24 bytes from the system's
/// generator, as hex.
pub fn random_token() -> std::io::Result<String> {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system random generator failed"))?;
    Ok(crate::secret::hex(&bytes))
}

/// The demo's config: `listen` (and, with `tls`, an HTTPS listener) in front
/// of the three origins.
pub fn config(
    listen: SocketAddr,
    tls: Option<(SocketAddr, &std::path::Path, &std::path::Path)>,
    app: [SocketAddr; 2],
    api: SocketAddr,
) -> Result<Config, ConfigErrors> {
    Config::from_toml(&config_text(listen, tls, app, api), "demo")
}

/// The demo's config as TOML text (`portcullis demo` writes it to a file,
/// with its log and admin sections, so it can be edited and reloaded).
pub fn config_text(
    listen: SocketAddr,
    tls: Option<(SocketAddr, &std::path::Path, &std::path::Path)>,
    app: [SocketAddr; 2],
    api: SocketAddr,
) -> String {
    let tls_listener = match tls {
        Some((addr, cert, key)) => format!(
            "[[listeners]]\nname = \"https\"\nbind = \"{addr}\"\n[listeners.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        None => String::new(),
    };
    format!(
        r#"
[server]
drain_timeout = "5s"

[[listeners]]
name = "http"
bind = "{listen}"
protocol = "auto"

{tls_listener}

[[routes]]
name = "api"
path = "/api/"
upstream = "api"
rewrite_prefix = "/"

[[routes]]
name = "app"
path = "/"
upstream = "app"

[[routes]]
name = "static"
path = "/static/"
upstream = "app"
cache = true

[upstreams.app]
servers = ["{}", "{}"]
algorithm = "round_robin"

[upstreams.api]
servers = ["{api}"]
"#,
        app[0], app[1]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_certificate_is_short_lived_and_valid_now() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = super::self_signed_certificate(dir.path()).expect("certificate");
        let loaded = crate::tls::load_cert(&cert, &key).expect("the proxy loads it");
        let now = crate::state::unix_now() as i64;
        let days_left = (loaded.not_after - now) as f64 / 86_400.0;
        assert!(
            days_left > super::DEMO_CERT_DAYS as f64 - 0.1 && days_left <= super::DEMO_CERT_DAYS as f64,
            "valid for {} days, found {days_left:.2}",
            super::DEMO_CERT_DAYS
        );
        assert!(loaded.names.contains(&"localhost".to_owned()), "{:?}", loaded.names);
    }
}
