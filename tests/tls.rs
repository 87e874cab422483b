//! TLS termination with certificates made at test time by rcgen: SNI,
//! versions, ALPN, hot reload, redirect, HSTS, handshake hygiene and every
//! certificate error.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().expect("ca key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "Portcullis Test CA");
    let cert = params.self_signed(&key).expect("ca cert");
    Ca {
        issuer: Issuer::new(params, key),
        der: cert.der().clone(),
        pem: cert.pem(),
    }
}

/// A leaf for `name` that expires in `days` days (and half a day more, so
/// the whole days left are `days` however long the test takes).
fn leaf_expiring(
    ca: &Ca,
    dir: &Path,
    file: &str,
    name: &str,
    days: i64,
) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days) + time::Duration::hours(12);
    leaf_until(ca, dir, file, &[name], None, Some(not_after))
}

/// Writes a leaf for `names` signed by `ca` into `dir/<file>.pem` and
/// `dir/<file>.key`; `expired` makes it end in 2021.
fn leaf(ca: &Ca, dir: &Path, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    if expired {
        let (from, to) = (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2021, 1, 1));
        leaf_until(ca, dir, file, names, Some(from), Some(to))
    } else {
        leaf_until(ca, dir, file, names, None, None)
    }
}

/// [`leaf`] with the validity given (`None`: rcgen's default).
fn leaf_until(
    ca: &Ca,
    dir: &Path,
    file: &str,
    names: &[&str],
    not_before: Option<time::OffsetDateTime>,
    not_after: Option<time::OffsetDateTime>,
) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    if let Some(t) = not_before {
        params.not_before = t;
    }
    if let Some(t) = not_after {
        params.not_after = t;
    }
    let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
    let cert_path = dir.join(format!("{file}.pem"));
    let key_path = dir.join(format!("{file}.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path, cert.der().clone())
}

fn client_config(ca: &Ca, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(portcullis::server::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn handshake(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

fn served_cert(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("peer certs")[0]
        .clone()
        .into_owned()
}

/// GET `https://site.test{path}` over HTTP/2, which ALPN must choose.
async fn get_over_h2(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>, path: &str) -> Got {
    let stream = handshake(addr, config, "site.test").await.expect("tls");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2");
    tokio::spawn(conn);
    let req = Request::get(format!("https://site.test{path}"))
        .body(empty())
        .expect("req");
    read(sender.send_ready(req).await.expect("send")).await
}

fn tls_config(origin: std::net::SocketAddr, certs: &[(&Path, &Path)], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = {:?}, key = {:?} }}",
                c.display().to_string(),
                k.display().to_string()
            )
        })
        .collect();
    Template::new(&[origin])
        .listener(&format!(
            "[listeners.tls]\ncertificates = [{}]\n{extra}",
            list.join(", ")
        ))
        .build()
}

#[tokio::test]
async fn sni_picks_exact_and_wildcard_certificates_and_a_default() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (dc, dk, default_der) = leaf(&ca, dir.path(), "default", &["default.test"], false);
    let (ac, ak, api_der) = leaf(&ca, dir.path(), "api", &["api.example.test"], false);
    let (wc, wk, wild_der) = leaf(&ca, dir.path(), "wild", &["*.example.test"], false);
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&dc, &dk), (&ac, &ak), (&wc, &wk)], "")).await;
    let config = client_config(&ca, &[b"http/1.1"]);
    for (sni, want) in [
        ("api.example.test", &api_der),
        ("www.example.test", &wild_der),
        ("default.test", &default_der),
    ] {
        let stream = handshake(proxy.addr, config.clone(), sni).await.expect("handshake");
        assert_eq!(&served_cert(&stream), want, "SNI {sni}");
    }
    // An IP address sends no SNI: the default certificate is served.
    let mut insecure = rustls::ClientConfig::builder_with_provider(portcullis::server::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    insecure.enable_sni = false;
    let stream = handshake(proxy.addr, Arc::new(insecure.clone()), "anything.test")
        .await
        .expect("no-SNI handshake");
    assert_eq!(served_cert(&stream), default_der);

    // Configured to refuse clients without SNI.
    let strict = start_proxy(&tls_config(origin.addr, &[(&dc, &dk)], "without_sni = \"refuse\"")).await;
    assert!(
        handshake(strict.addr, Arc::new(insecure), "anything.test")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn alpn_h2_reaches_an_http1_origin_with_the_https_scheme() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, _) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&c, &k)], "hsts_max_age = \"365d\"")).await;
    let got = get_over_h2(proxy.addr, client_config(&ca, &[b"h2", b"http/1.1"]), "/x").await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = got.echoed();
    assert_eq!(seen.line, "GET /x HTTP/1.1");
    assert_eq!(seen.get("x-forwarded-proto"), Some("https"));
    assert!(seen.get("forwarded").is_some_and(|f| f.ends_with("proto=https")));
    assert_eq!(got.header("strict-transport-security"), Some("max-age=31536000"));

    // Without ALPN: HTTP/1.1.
    let stream = handshake(proxy.addr, client_config(&ca, &[]), "site.test")
        .await
        .expect("tls");
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = Request::get("/y")
        .header("host", "site.test")
        .body(empty())
        .expect("req");
    let got = read(sender.send_ready(req).await.expect("send")).await;
    assert_eq!(got.echoed().line, "GET /y HTTP/1.1");
}

#[tokio::test]
async fn sessions_resume_and_uncovered_hosts_are_warned() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, _) = leaf(&ca, dir.path(), "site", &["site.test", "*.site.test"], false);
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&c, &k)], "")).await;
    let client = client_config(&ca, &[b"http/1.1"]);
    for round in 0..2 {
        let mut stream = handshake(proxy.addr, client.clone(), "site.test").await.expect("tls");
        let kind = stream.get_ref().1.handshake_kind();
        let expected = if round == 0 {
            rustls::HandshakeKind::Full
        } else {
            rustls::HandshakeKind::Resumed
        };
        assert_eq!(kind, Some(expected), "round {round}");
        // Read the ticket the server sends after the handshake.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
    }

    let text = tls_config(origin.addr, &[(&c, &k)], "").replace(
        "[[routes]]\n",
        "[[routes]]\nhost = [\"site.test\", \"a.site.test\", \"other.test\", \"*.site.test\", \"*.x.test\"]\n",
    );
    let config = portcullis::Config::from_toml(&text, "test").expect("config");
    let stores = portcullis::server::load_certificates(&config).expect("certs");
    assert_eq!(
        portcullis::server::uncovered_route_hosts(&config, &stores),
        vec![
            "routes[0].host: no TLS certificate covers \"other.test\"".to_owned(),
            "routes[0].host: no TLS certificate covers \"*.x.test\"".to_owned(),
        ]
    );
}

#[tokio::test]
async fn old_tls_versions_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, _) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&c, &k)], "")).await;
    let port = proxy.addr.port().to_string();
    let target = format!("127.0.0.1:{port}");
    let run = |flags: Vec<&str>| {
        let target = target.clone();
        let flags: Vec<String> = flags.into_iter().map(str::to_owned).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args(["s_client", "-connect", &target, "-servername", "site.test"])
                .args(&flags)
                .stdin(std::process::Stdio::null())
                .output()
        })
    };
    let Ok(Ok(modern)) = run(vec!["-tls1_3"]).await else {
        assert!(std::env::var("CI").is_err(), "openssl is required in CI");
        eprintln!("openssl not found: skipping the old-version probes outside CI");
        return;
    };
    assert!(
        String::from_utf8_lossy(&modern.stdout).contains("TLSv1.3"),
        "TLS 1.3 works"
    );
    for old in ["-tls1", "-tls1_1"] {
        let out = run(vec![old, "-cipher", "DEFAULT@SECLEVEL=0"])
            .await
            .expect("join")
            .expect("openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Cipher is (NONE)"), "{old} must be refused:\n{text}");
    }
    // A TLS 1.2 client offering only a suite without forward secrecy is refused.
    let out = run(vec!["-tls1_2", "-cipher", "AES128-SHA256"])
        .await
        .expect("join")
        .expect("openssl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Cipher is (NONE)"));
}

#[tokio::test]
async fn hot_reload_changes_new_handshakes_and_keeps_old_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, first) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    let origin = echo_origin().await;
    let config = portcullis::Config::from_toml(&tls_config(origin.addr, &[(&c, &k)], ""), "test").expect("config");
    let proxy = portcullis::Proxy::bind(config).await.expect("bind");
    let addr = proxy.local_addrs()[0];
    let certificates = proxy.certificates();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    let client = client_config(&ca, &[b"http/1.1"]);

    let old = handshake(addr, client.clone(), "site.test").await.expect("tls");
    assert_eq!(served_cert(&old), first);
    let (mut old_sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old))
        .await
        .expect("h1");
    tokio::spawn(conn);

    // New files in place, then reload.
    let (_, _, second) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    assert_ne!(first, second);
    certificates.reload().expect("reload");
    // A fresh client config: no session to resume, so a full handshake.
    let new = handshake(addr, client_config(&ca, &[b"http/1.1"]), "site.test")
        .await
        .expect("tls");
    assert_eq!(served_cert(&new), second, "new handshakes get the new certificate");
    let req = Request::get("/still")
        .header("host", "site.test")
        .body(empty())
        .expect("req");
    let got = read(old_sender.send_ready(req).await.expect("old connection still works")).await;
    assert_eq!(got.status, StatusCode::OK);

    // A broken file: reload fails, the current certificate stays.
    std::fs::write(&c, "not a certificate").expect("break");
    let errors = certificates.reload().expect_err("broken reload");
    assert!(errors.to_string().contains("holds no PEM certificate"), "{errors}");
    let after = handshake(addr, client_config(&ca, &[b"http/1.1"]), "site.test")
        .await
        .expect("tls after a failed reload");
    drop(client);
    assert_eq!(served_cert(&after), second);
    let _ = stop.send(());
}

#[tokio::test]
async fn plain_listener_redirects_to_https_with_308() {
    let origin = echo_origin().await;
    let config = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\nredirect_to_https = true\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    );
    let proxy = start_proxy(&config).await;
    let mut client = h1(proxy.addr).await;
    let req = Request::post("/cart?id=7")
        .header("host", "shop.test:8080")
        .body(full("x"))
        .expect("req");
    let got = read(client.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(got.header("location"), Some("https://shop.test/cart?id=7"));
    assert_eq!(origin.requests(), 0);
    let other_port = start_proxy(&config.replace(
        "redirect_to_https = true",
        "redirect_to_https = true\nhttps_port = 8443",
    ))
    .await;
    let got = get(other_port.addr, "/a").await;
    assert_eq!(got.header("location"), Some("https://test.local:8443/a"));
}

#[tokio::test]
async fn garbage_and_plain_http_on_the_tls_port_do_not_disturb_a_good_client() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, _) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&c, &k)], "handshake_timeout = \"500ms\"")).await;
    // A good client holds a connection open while the noise happens.
    let good = handshake(proxy.addr, client_config(&ca, &[b"http/1.1"]), "site.test")
        .await
        .expect("tls");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(good))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let noise: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x01\x00", // truncated ClientHello
        &[0xff; 300],
        b"\x16\x03\x03\xff\xff garbage",
    ];
    for bytes in noise {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        let _ = s.write_all(bytes).await;
        let mut out = Vec::new();
        // The proxy closes each one (at the latest after the handshake timeout).
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "a bad handshake was left open");
        let req = Request::get("/ok")
            .header("host", "site.test")
            .body(empty())
            .expect("req");
        let got = read(sender.send_ready(req).await.expect("good client")).await;
        assert_eq!(got.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn certificate_problems_name_the_file_and_the_cause() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (good_c, good_k, _) = leaf(&ca, dir.path(), "good", &["good.test"], false);
    let (exp_c, exp_k, _) = leaf(&ca, dir.path(), "expired", &["old.test"], true);
    let (_, other_k, _) = leaf(&ca, dir.path(), "other", &["other.test"], false);
    let not_pem = dir.path().join("garbage.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    let missing = dir.path().join("missing.pem");
    // A chain in the wrong order: the CA first, then the leaf.
    let wrong_order = dir.path().join("wrong-order.pem");
    let leaf_pem = std::fs::read_to_string(&good_c).expect("read");
    let ca_pem_text = ca.pem.clone();
    std::fs::write(&wrong_order, format!("{ca_pem_text}{leaf_pem}")).expect("write");

    let cases: Vec<(PathBuf, PathBuf, String)> = vec![
        (
            missing.clone(),
            good_k.clone(),
            format!("cannot read {}", missing.display()),
        ),
        (
            not_pem.clone(),
            good_k.clone(),
            format!("{} holds no PEM certificate", not_pem.display()),
        ),
        (
            good_c.clone(),
            not_pem.clone(),
            format!("{} holds no PEM private key", not_pem.display()),
        ),
        (
            good_c.clone(),
            other_k.clone(),
            format!(
                "private key {} does not match certificate {}",
                other_k.display(),
                good_c.display()
            ),
        ),
        (
            exp_c.clone(),
            exp_k.clone(),
            format!("certificate {} expired on", exp_c.display()),
        ),
        (
            wrong_order.clone(),
            good_k.clone(),
            format!("{}: chain order wrong", wrong_order.display()),
        ),
    ];
    for (cert, key, expected) in cases {
        let text = tls_config("127.0.0.1:9".parse().expect("addr"), &[(&cert, &key)], "");
        let config = portcullis::Config::from_toml(&text, "test").expect("config parses");
        let errors = match portcullis::server::load_certificates(&config) {
            Ok(_) => panic!("{} / {} should fail", cert.display(), key.display()),
            Err(e) => e,
        };
        let message = errors.to_string();
        assert!(message.starts_with("listeners[0].tls.certificates[0]: "), "{message}");
        assert!(message.contains(&expected), "expected {expected:?} in {message:?}");
        // And the proxy refuses to start with it.
        assert!(portcullis::Proxy::bind(config).await.is_err());
    }
}

/// Accepts any server certificate: only for the no-SNI probes above.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        portcullis::server::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config_with_cert(ca: &Ca, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(portcullis::server::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((c, k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
                .expect("pem")
                .collect::<Result<_, _>>()
                .expect("chain");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(k).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client cert")
        }
    };
    Arc::new(config)
}

async fn get_over(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    headers: &[(&str, &str)],
) -> std::io::Result<Got> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let mut req = Request::get("/").header("host", "site.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = sender
        .send_ready(req.body(empty()).expect("req"))
        .await
        .map_err(std::io::Error::other)?;
    Ok(read(response).await)
}

#[tokio::test]
async fn client_certificates_required_or_optional() {
    let dir = tempfile::tempdir().expect("dir");
    let server_ca = ca();
    let client_ca = ca();
    let (c, k, _) = leaf(&server_ca, dir.path(), "site", &["site.test"], false);
    let (cc, ck, _) = leaf(&client_ca, dir.path(), "alice", &["alice.clients.test"], false);
    let stranger_ca = ca();
    let (sc, sk, _) = leaf(&stranger_ca, dir.path(), "mallory", &["mallory.test"], false);
    let bundle = dir.path().join("client-ca.pem");
    std::fs::write(&bundle, client_ca.pem.clone()).expect("bundle");
    let origin = echo_origin().await;
    let auth = |mode: &str| {
        format!(
            "[listeners.tls.client_auth]\nmode = \"{mode}\"\nca = {:?}\n",
            bundle.display().to_string()
        )
    };
    let required = start_proxy(&tls_config(origin.addr, &[(&c, &k)], &auth("required"))).await;

    // No certificate: refused (the failure may surface at the first read in TLS 1.3).
    let refused = match handshake(required.addr, client_config_with_cert(&server_ca, None), "site.test").await {
        Err(_) => true,
        Ok(stream) => get_over(stream, &[]).await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");
    // A certificate from another CA: refused too.
    let refused = match handshake(
        required.addr,
        client_config_with_cert(&server_ca, Some((&sc, &sk))),
        "site.test",
    )
    .await
    {
        Err(_) => true,
        Ok(stream) => get_over(stream, &[]).await.is_err(),
    };
    assert!(refused, "a certificate from an unknown CA must be refused");

    // A good certificate: the upstream learns who it is, and a forged header is replaced.
    let stream = handshake(
        required.addr,
        client_config_with_cert(&server_ca, Some((&cc, &ck))),
        "site.test",
    )
    .await
    .expect("tls with a client certificate");
    let got = get_over(stream, &[("x-client-cert-subject", "CN=admin")])
        .await
        .expect("request");
    let seen = got.echoed();
    assert_eq!(seen.all("x-client-cert-subject"), vec!["CN=alice.clients.test"]);
    assert_eq!(
        seen.get("x-client-cert-sha256").map(|f| f.len()),
        Some(95),
        "hex pairs with colons"
    );

    // Optional: no certificate is fine, and forged identity headers never pass.
    let optional = start_proxy(&tls_config(origin.addr, &[(&c, &k)], &auth("optional"))).await;
    let stream = handshake(optional.addr, client_config_with_cert(&server_ca, None), "site.test")
        .await
        .expect("tls");
    let got = get_over(
        stream,
        &[("x-client-cert-subject", "CN=admin"), ("x-client-cert-sha256", "00")],
    )
    .await
    .expect("request");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echoed().get("x-client-cert-subject"), None);
    assert_eq!(got.echoed().get("x-client-cert-sha256"), None);
}

/// An HTTPS origin (echo) with a certificate for `names` from `ca`, speaking
/// HTTP/2 or HTTP/1.1 as ALPN decides.
async fn tls_origin(ca: &Ca, dir: &Path, names: &[&str]) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let (c, k, _) = leaf(ca, dir, "origin", names, false);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c)
        .expect("pem")
        .collect::<Result<_, _>>()
        .expect("chain");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&k).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(portcullis::server::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service =
                    hyper::service::service_fn(|req| async move { Ok::<_, std::convert::Infallible>(echo(req).await) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn ca_bundle(ca: &Ca, dir: &Path, file: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, ca.pem.clone()).expect("write bundle");
    path
}

#[tokio::test]
async fn upstream_tls_verifies_the_origin_and_negotiates_h2() {
    let dir = tempfile::tempdir().expect("dir");
    let other = ca();
    let ca = ca();
    let origin = tls_origin(&ca, dir.path(), &["origin.internal"]).await;
    let bundle = ca_bundle(&ca, dir.path(), "upstream-ca.pem");
    let upstream = |protocol: &str, extra: &str| {
        format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [\"{origin}\"]\nprotocol = \"{protocol}\"\n[upstreams.app.tls]\nca = {:?}\n{extra}\n",
            bundle.display().to_string()
        )
    };
    // Re-encrypted over HTTP/1.1, the origin's name given for SNI and checks.
    let proxy = start_proxy(&upstream("http1", "server_name = \"origin.internal\"")).await;
    let got = get(proxy.addr, "/secure").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.echoed().line, "GET /secure HTTP/1.1");

    // HTTP/2 by ALPN.
    let proxy = start_proxy(&upstream("h2", "server_name = \"origin.internal\"")).await;
    let got = get(proxy.addr, "/h2").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.echoed().line, "GET https://test.local/h2 HTTP/2.0");

    // Without server_name the certificate is checked against 127.0.0.1: refused.
    let proxy = start_proxy(&upstream("http1", "")).await;
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        got.header("proxy-status"),
        Some("portcullis; error=tls_certificate_error")
    );

    // A CA that did not issue the origin's certificate: refused.
    let wrong = ca_bundle(&other, dir.path(), "wrong-ca.pem");
    let proxy = start_proxy(
        &upstream("http1", "server_name = \"origin.internal\"")
            .replace(&bundle.display().to_string(), &wrong.display().to_string()),
    )
    .await;
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        got.header("proxy-status"),
        Some("portcullis; error=tls_certificate_error")
    );

    // Config mistakes are reported with their paths.
    let errors = portcullis::Config::from_toml(&upstream("h2c", ""), "test").expect_err("h2c with tls");
    assert!(
        errors
            .to_string()
            .contains("upstreams.app.protocol: \"h2c\" is HTTP/2 in cleartext"),
        "{errors}"
    );
}

#[tokio::test]
async fn changed_certificate_files_are_picked_up_when_watched() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, first) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&c, &k)], "watch_interval = \"100ms\"")).await;
    let stream = handshake(proxy.addr, client_config(&ca, &[]), "site.test")
        .await
        .expect("tls");
    assert_eq!(served_cert(&stream), first);
    let (_, _, second) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    // Wait (bounded) for the watcher to notice: each try is a full handshake.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stream = handshake(proxy.addr, client_config(&ca, &[]), "site.test")
            .await
            .expect("tls");
        if served_cert(&stream) == second {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the changed files were never loaded"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn tls_requests_are_logged_and_counted_and_reloads_audited() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, _) = leaf(&ca, dir.path(), "site", &["site.test"], false);
    let origin = echo_origin().await;
    let log = dir.path().join("access.log");
    let audit = dir.path().join("audit.jsonl");
    let toml = format!(
        "{}\n[access_log]\ndestination = {:?}\n[audit_log]\npath = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        tls_config(origin.addr, &[(&c, &k)], ""),
        log.display().to_string(),
        audit.display().to_string()
    );
    let config = portcullis::Config::from_toml(&toml, "test").expect("config");
    let proxy = portcullis::Proxy::bind(config).await.expect("bind");
    let addr = proxy.local_addrs()[0];
    let certificates = proxy.certificates();
    let observe = proxy.observe();
    let metrics_addr = proxy.metrics_addr().expect("metrics");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));

    let got = get_over_h2(addr, client_config(&ca, &[b"h2"]), "/secure").await;
    assert_eq!(got.status, StatusCode::OK);
    // A failed handshake (the client trusts another CA).
    assert!(
        handshake(addr, client_config(&self::ca(), &[b"h2"]), "site.test")
            .await
            .is_err()
    );

    // New certificate files, reloaded: audited with what changed.
    let before = certificates.stores()[0].current().fingerprints.clone();
    leaf(&ca, dir.path(), "site", &["site.test"], false);
    certificates.reload_by("test").expect("reload");
    let after = certificates.stores()[0].current().fingerprints.clone();

    let mut metrics = String::new();
    for _ in 0..200 {
        observe.flush().await;
        let mut m = h1(metrics_addr).await;
        let req = Request::get("/metrics").header("host", "m").body(empty()).expect("req");
        metrics = read(m.send_ready(req).await.expect("scrape")).await.text();
        if metrics.contains("portcullis_tls_handshake_failures_total{")
            && std::fs::read_to_string(&log).is_ok_and(|t| !t.is_empty())
        {
            break;
        }
    }
    let record: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .expect("access log")
            .lines()
            .next()
            .expect("a record"),
    )
    .expect("JSON");
    assert_eq!(record["scheme"], "https");
    assert_eq!(record["protocol"], "HTTP/2.0");
    assert_eq!(record["tls_version"], "TLSv1_3");
    assert!(
        record["tls_cipher"].as_str().is_some_and(|c| c.starts_with("TLS13_")),
        "{record}"
    );
    assert!(
        metrics.contains("portcullis_tls_handshakes_total{listener=\"listeners[0]\",version=\"TLSv1_3\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_tls_handshake_failures_total{listener=\"listeners[0]\",reason=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_reloads_total{kind=\"certificates\",result=\"ok\"} 1"),
        "{metrics}"
    );

    let _ = stop.send(());
    running.await.expect("proxy");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let load = records
        .iter()
        .find(|r| r["event"] == "config.load")
        .expect("config.load");
    assert_eq!(load["certificates"][0]["fingerprints"], serde_json::json!(before));
    let reload = records
        .iter()
        .find(|r| r["event"] == "certificates.reload")
        .expect("certificates.reload");
    assert_eq!(reload["trigger"], "test");
    assert_eq!(reload["result"], "ok");
    assert_eq!(reload["added"], serde_json::json!(after));
    assert_eq!(reload["removed"], serde_json::json!(before));
}

#[tokio::test]
async fn a_config_reload_changes_a_listeners_certificates_and_adds_a_tls_listener() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c1, k1, first) = leaf(&ca, dir.path(), "one", &["site.test"], false);
    let (c2, k2, second) = leaf_expiring(&ca, dir.path(), "two", "site.test", 10);
    // As logs show fingerprints: hex pairs joined by colons.
    let fingerprint = |der: &CertificateDer<'_>| {
        let hex = portcullis::secret::sha256_hex(der);
        hex.as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(":")
    };
    let origin = echo_origin().await;
    let proxy = start_proxy(&tls_config(origin.addr, &[(&c1, &k1)], "")).await;
    let client = || client_config(&ca, &[b"http/1.1"]);
    assert_eq!(
        served_cert(&handshake(proxy.addr, client(), "site.test").await.expect("tls")),
        first
    );

    // The listener's certificate list changes in the file: a new store and
    // acceptor for new handshakes, on the same socket; and a second TLS
    // listener appears.
    let mut text = tls_config(origin.addr, &[(&c2, &k2)], "");
    text.push_str(&format!(
        "[[listeners]]\nname = \"more\"\nbind = \"127.0.0.1:0\"\n[listeners.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        c1.display().to_string(),
        k1.display().to_string()
    ));
    let config = portcullis::Config::from_toml(&text, "test").expect("config");
    let plan = proxy.reloader.apply(config, "test").await.expect("reload");
    let (one, two) = (fingerprint(&first), fingerprint(&second));
    assert_eq!(
        plan.text(),
        format!(
            "change      listener \"listeners[0]\": tls\n\
             add         listener \"more\": bind 127.0.0.1:0\n\
             add         certificate \"listeners[0]\" site.test: sha256 {two}\n\
             change      certificate \"listeners[0]\" site.test: expires in 10 days\n\
             remove      certificate \"listeners[0]\": sha256 {one}\n\
             add         certificate \"more\" site.test: sha256 {one}\n6 changes\n"
        )
    );
    let addrs = proxy.reloader.local_addrs().await;
    assert_eq!(addrs[0], proxy.addr);
    assert_eq!(
        served_cert(&handshake(proxy.addr, client(), "site.test").await.expect("tls")),
        second
    );
    assert_eq!(
        served_cert(&handshake(addrs[1], client(), "site.test").await.expect("tls")),
        first
    );
    // The certificate reloader knows both listeners' stores now.
    let listeners: Vec<String> = proxy
        .control
        .certificates()
        .stores()
        .iter()
        .map(|s| s.listener.clone())
        .collect();
    assert_eq!(listeners, ["listeners[0]", "more"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_serves_over_tls_and_lists_its_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca();
    let (c, k, served) = leaf(&ca, dir.path(), "admin", &["admin.test"], false);
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ops:operator:0123456789abcdefgh\n").expect("tokens");
    let origin = echo_origin().await;
    let text = Template::new(&[origin.addr])
        .extra(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntokens_file = {:?}\n[admin.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
            tokens.display().to_string(),
            c.display().to_string(),
            k.display().to_string()
        ))
        .build();
    let proxy = start_proxy(&text).await;
    let admin = proxy.admin_addr.expect("admin");
    let stream = handshake(admin, client_config(&ca, &[b"http/1.1"]), "admin.test")
        .await
        .expect("TLS to the admin API");
    assert_eq!(served_cert(&stream), served);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = Request::get("/v1/certificates")
        .header("host", "admin.test")
        .header("authorization", "Bearer 0123456789abcdefgh")
        .body(empty())
        .expect("req");
    let got = read(sender.send_ready(req).await.expect("send")).await;
    assert_eq!(got.status, StatusCode::OK);
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(body["listeners"][0]["listener"], "[admin]");
    assert_eq!(body["listeners"][0]["certificates"][0]["names"][0], "admin.test");
    // A reload does not count the admin API's certificate as removed.
    let config =
        portcullis::Config::from_toml(&text.replace("[[routes]]", "[[routes]]\nname = \"r\""), "t").expect("config");
    let plan = proxy.reloader.apply(config, "test").await.expect("reload");
    assert_eq!(
        plan.text(),
        "add         route \"r\": any host / (prefix) -> app\nremove      route \"routes[0]\"\n2 changes\n"
    );
    // Plain HTTP to the TLS port gets nothing.
    assert!(portcullis_plain_fails(admin).await);
    proxy.shutdown().await;
}

async fn portcullis_plain_fails(addr: std::net::SocketAddr) -> bool {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return true;
    };
    tokio::spawn(conn);
    let req = Request::get("/healthz").header("host", "a").body(empty()).expect("req");
    sender.send_ready(req).await.is_err()
}
