//! The admin API: JSON over HTTP/1.1 and HTTP/2 (cleartext, prior
//! knowledge) on its own listener (`[admin] listen`). docs/admin-api.md
//! describes it and docs/admin-api.yaml is its OpenAPI 3.1 description,
//! which `tests/admin.rs` checks against this router.
//!
//! Every request but `/healthz` and `/readyz` needs a bearer token
//! ([`tokens`]): `GET` needs the `read` role, everything else `operator`.
//! A request is parsed here into a [`Change`] (bad input: 400 with a
//! message) and applied by [`Control::apply`], the one place changes are
//! applied and audited. Request bodies are limited to 1 MiB.

mod tokens;
mod views;

pub use tokens::{Caller, Role, Tokens};

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Control;
use crate::change::{Change, ChangeError, Purge, Step};
use crate::config::ProtectMode;

/// The name the admin API's certificates go by (in the certificate
/// reloader, `/v1/certificates` and the audit log); brackets keep it apart
/// from any listener's name.
pub const CERTIFICATES: &str = "[admin]";

/// The most a request body may hold (a whole config for a reload).
const MAX_BODY: usize = 1 << 20;
/// Connections the admin API serves at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// The longest a ban may be asked for.
const MAX_BAN_SECONDS: u64 = 30 * 86_400;

/// The admin API of one proxy.
pub struct Admin {
    pub control: Control,
    pub tokens: Tokens,
}

type Answer = Response<Full<Bytes>>;

/// TLS termination for the admin API: the acceptor and the handshake
/// timeout.
pub type Tls = (tokio_rustls::TlsAcceptor, std::time::Duration);

/// Serves the admin API on `listener` until `stop` fires (over TLS with
/// `tls`).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, tls: Option<Tls>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("admin API: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let (admin, stop, tls) = (admin.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&admin, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // HTTP/1: the header timer also ends idle keep-alive; HTTP/2:
            // pings end a connection whose peer stopped answering.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(16)
                .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
                .keep_alive_timeout(std::time::Duration::from_secs(10));
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                }
                Some((acceptor, timeout)) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, acceptor.accept(stream)).await else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        });
    }
}

/// Answers one request, counting its result.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Answer {
    let answer = route(admin, req).await;
    if let Some(metrics) = &admin.control.observe().metrics {
        metrics.admin_request(match answer.status() {
            s if s.is_success() => "ok",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "bad_request",
        });
    }
    answer
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let control = &admin.control;
    // Unauthenticated, as load balancers probe them.
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => return plain(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            return if control.ready() {
                reply(StatusCode::OK, &json!({ "ready": true }))
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "ready": false, "reason": "draining" }),
                )
            };
        }
        _ => {}
    }
    let Some(segments) = segments(&path) else {
        return error(StatusCode::BAD_REQUEST, "the path is not valid percent-encoded UTF-8");
    };
    let Some(endpoint) = Endpoint::find(&segments) else {
        return error(StatusCode::NOT_FOUND, &format!("no endpoint {path}"));
    };
    let Some(caller) = admin.tokens.check(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes),
    ) else {
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        return r;
    };
    if !endpoint.allows(&method) {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} does not answer {method}"),
        );
        if let Ok(allow) = http::HeaderValue::from_str(endpoint.methods()) {
            r.headers_mut().insert(header::ALLOW, allow);
        }
        return r;
    }
    if admin.tokens.is_open() {
        if let Err(message) = local_only(&req) {
            return error(StatusCode::FORBIDDEN, message);
        }
    }
    let reading = method == Method::GET || method == Method::HEAD;
    // The config text may hold header values such as upstream credentials.
    let needs_operator = !reading || endpoint == Endpoint::Config;
    if needs_operator && caller.role < Role::Operator {
        return error(
            StatusCode::FORBIDDEN,
            &format!(
                "token {:?} may only read: a change needs an operator token",
                caller.name
            ),
        );
    }
    if reading {
        return read(endpoint, control);
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the request body is over 1 MiB"),
    };
    let change = match parse_change(endpoint, &segments, &query, &body) {
        Ok(change) => change,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    answer(control.apply(change, &format!("admin:{}", caller.name)).await)
}

/// The answer to an applied change.
fn answer(result: Result<Value, ChangeError>) -> Answer {
    match result {
        Ok(value) => reply(StatusCode::OK, &value),
        Err(ChangeError::NotFound(m)) => error(StatusCode::NOT_FOUND, &m),
        Err(ChangeError::Conflict(m)) => error(StatusCode::CONFLICT, &m),
        Err(ChangeError::Invalid(errors)) => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "error": "the config is invalid; the running config is unchanged",
                "errors": errors.iter().map(|e| json!({ "path": e.path, "message": e.message })).collect::<Vec<_>>(),
            }),
        ),
    }
}

/// Every operation as docs/admin-api.openapi.json lists it (`HEAD` is
/// answered wherever `GET` is); `tests/admin.rs` checks the two agree and
/// that the router answers each.
pub const ROUTES: &[(&str, &str)] = &[
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/metrics", "GET"),
    ("/v1/status", "GET"),
    ("/v1/config", "GET"),
    ("/v1/config/reload", "POST"),
    ("/v1/upstreams", "GET"),
    ("/v1/upstreams/{group}/servers/{server}/drain", "POST"),
    ("/v1/upstreams/{group}/servers/{server}/undrain", "POST"),
    ("/v1/upstreams/{group}/servers/{server}/weight", "PUT"),
    ("/v1/cache", "GET"),
    ("/v1/cache/purge", "POST"),
    ("/v1/bans", "GET"),
    ("/v1/bans", "POST"),
    ("/v1/bans/{client}", "DELETE"),
    ("/v1/protection", "GET"),
    ("/v1/protection/{step}/mode", "PUT"),
    ("/v1/certificates", "GET"),
    ("/v1/certificates/reload", "POST"),
];

/// Without tokens every local caller is an operator, so a web page open
/// in a browser on this host must not be one: requests that carry the
/// marks browsers add (`Origin`, `Sec-Fetch-Site`) are refused, and so is
/// a `Host` other than a loopback name (DNS rebinding).
fn local_only(req: &Request<Incoming>) -> Result<(), &'static str> {
    let headers = req.headers();
    if headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site") {
        return Err("the admin API has no tokens: requests from a browser page are refused");
    }
    let host = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| headers.get(header::HOST)?.to_str().ok().map(str::to_owned))
        .unwrap_or_default();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host.as_str(), |(name, _)| name),
    };
    let loopback = name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err("the admin API has no tokens: only a loopback Host is served")
    }
}

/// The endpoints, by path shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Status,
    Config,
    Reload,
    Upstreams,
    Drain,
    Undrain,
    Weight,
    Cache,
    Purge,
    Bans,
    Ban,
    Protection,
    Mode,
    Certificates,
    ReloadCertificates,
}

impl Endpoint {
    fn find(s: &[String]) -> Option<Endpoint> {
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        Some(match s.as_slice() {
            ["metrics"] => Endpoint::Metrics,
            ["v1", "status"] => Endpoint::Status,
            ["v1", "config"] => Endpoint::Config,
            ["v1", "config", "reload"] => Endpoint::Reload,
            ["v1", "upstreams"] => Endpoint::Upstreams,
            ["v1", "upstreams", _, "servers", _, "drain"] => Endpoint::Drain,
            ["v1", "upstreams", _, "servers", _, "undrain"] => Endpoint::Undrain,
            ["v1", "upstreams", _, "servers", _, "weight"] => Endpoint::Weight,
            ["v1", "cache"] => Endpoint::Cache,
            ["v1", "cache", "purge"] => Endpoint::Purge,
            ["v1", "bans"] => Endpoint::Bans,
            ["v1", "bans", _] => Endpoint::Ban,
            ["v1", "protection"] => Endpoint::Protection,
            ["v1", "protection", _, "mode"] => Endpoint::Mode,
            ["v1", "certificates"] => Endpoint::Certificates,
            ["v1", "certificates", "reload"] => Endpoint::ReloadCertificates,
            _ => return None,
        })
    }

    fn methods(self) -> &'static str {
        match self {
            Endpoint::Metrics
            | Endpoint::Status
            | Endpoint::Config
            | Endpoint::Upstreams
            | Endpoint::Cache
            | Endpoint::Protection
            | Endpoint::Certificates => "GET, HEAD",
            Endpoint::Reload | Endpoint::Drain | Endpoint::Undrain | Endpoint::Purge | Endpoint::ReloadCertificates => {
                "POST"
            }
            Endpoint::Weight | Endpoint::Mode => "PUT",
            Endpoint::Bans => "GET, HEAD, POST",
            Endpoint::Ban => "DELETE",
        }
    }

    fn allows(self, method: &Method) -> bool {
        self.methods().split(", ").any(|m| m == method.as_str())
    }
}

fn read(endpoint: Endpoint, control: &Control) -> Answer {
    let value = match endpoint {
        Endpoint::Metrics => {
            let Some(metrics) = &control.observe().metrics else {
                return error(StatusCode::NOT_FOUND, "metrics are off");
            };
            control.observe().sync_counters();
            let mut r = plain(StatusCode::OK, &metrics.render(&control.snapshot()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
            );
            return r;
        }
        Endpoint::Status => views::status(control),
        Endpoint::Config => views::config(control),
        Endpoint::Upstreams => views::upstreams(control),
        Endpoint::Cache => views::cache(control),
        Endpoint::Bans => views::bans(control),
        Endpoint::Protection => views::protection(control),
        Endpoint::Certificates => views::certificates(control),
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "use POST, PUT or DELETE"),
    };
    reply(StatusCode::OK, &value)
}

/// The [`Change`] a mutating request asks for, or why it is bad input.
fn parse_change(endpoint: Endpoint, s: &[String], query: &str, body: &[u8]) -> Result<Change, String> {
    let server = || (s[2].clone(), s[4].clone());
    Ok(match endpoint {
        Endpoint::Reload => {
            let dry_run = match query_value(query, "dry_run") {
                None | Some("0" | "false") => false,
                Some("1" | "true" | "") => true,
                Some(other) => return Err(format!("dry_run must be 1 or 0, not {other:?}")),
            };
            let text = if body.is_empty() {
                None
            } else {
                Some(String::from_utf8(body.to_vec()).map_err(|_| "the config text is not UTF-8".to_owned())?)
            };
            Change::Reload {
                file: None,
                dry_run,
                text,
            }
        }
        Endpoint::ReloadCertificates => Change::ReloadCertificates,
        Endpoint::Drain => {
            let (upstream, server) = server();
            Change::Drain { upstream, server }
        }
        Endpoint::Undrain => {
            let (upstream, server) = server();
            Change::Undrain { upstream, server }
        }
        Endpoint::Weight => {
            let (upstream, server) = server();
            Change::Weight {
                upstream,
                server,
                weight: parse_weight(body)?,
            }
        }
        Endpoint::Purge => {
            let value = json_body(body, &["url", "prefix", "tag"])?;
            let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
            match (field("url"), field("prefix"), field("tag")) {
                (Some(url), None, None) if !url.is_empty() => Change::Purge(Purge::Url(url)),
                (None, Some(prefix), None) if !prefix.is_empty() => Change::Purge(Purge::Prefix(prefix)),
                (None, None, Some(tag)) if !tag.is_empty() => Change::Purge(Purge::Tag(tag)),
                _ => return Err("the body must hold one non-empty string: \"url\", \"prefix\" or \"tag\"".into()),
            }
        }
        Endpoint::Bans => parse_ban(body)?,
        Endpoint::Ban => Change::Unban {
            client: parse_ip(&s[2])?,
        },
        Endpoint::Mode => {
            let step = Step::from_name(&s[2])
                .ok_or_else(|| format!("no ladder step {:?}: adaptive, bans or load_shedding", s[2]))?;
            let mode = match json_body(body, &["mode"])?.get("mode").and_then(Value::as_str) {
                Some("shadow") => ProtectMode::Shadow,
                Some("enforce") => ProtectMode::Enforce,
                _ => return Err("the body must be {\"mode\": \"shadow\"} or {\"mode\": \"enforce\"}".into()),
            };
            Change::Mode { step, mode }
        }
        _ => return Err("this endpoint only reads".into()),
    })
}

fn parse_weight(body: &[u8]) -> Result<Option<u32>, String> {
    match json_body(body, &["weight"])?.get("weight") {
        Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(w @ 1..=10_000) => Ok(Some(w as u32)),
            _ => Err(format!(
                "weight must be a whole number from 1 to 10000, or null, not {n}"
            )),
        },
        _ => Err("the body must be {\"weight\": N} (1 to 10000) or {\"weight\": null}".into()),
    }
}

fn parse_ban(body: &[u8]) -> Result<Change, String> {
    let value = json_body(body, &["client", "duration"])?;
    let client = value
        .get("client")
        .and_then(Value::as_str)
        .ok_or("the body must name a \"client\" (an IP address)")?;
    let client = parse_ip(client)?;
    let duration = value
        .get("duration")
        .and_then(Value::as_str)
        .ok_or("the body must give a \"duration\", such as \"10m\"")?;
    let seconds = crate::config::units::parse_duration(duration)
        .map_err(|e| format!("duration: {e}"))?
        .as_secs();
    if seconds == 0 || seconds > MAX_BAN_SECONDS {
        return Err(format!("duration must be from 1s to 30d, not {duration:?}"));
    }
    Ok(Change::Ban { client, seconds })
}

/// The body as a JSON object holding only `fields`.
fn json_body(body: &[u8], fields: &[&str]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("the body must be a JSON object".into());
    };
    if let Some(unknown) = object.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown:?}; expected {}", fields.join(", ")));
    }
    Ok(value)
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address such as 192.0.2.7 or 2001:db8::7"))
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| match pair.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if pair == name => Some(""),
        _ => None,
    })
}

/// The path's segments, percent-decoded (a server such as `[::1]:8080`
/// is written `%5B::1%5D:8080`); `None` when the encoding is bad.
fn segments(path: &str) -> Option<Vec<String>> {
    path.trim_matches('/')
        .split('/')
        .map(|segment| {
            let bytes = segment.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let hex = bytes.get(i + 1..i + 3)?;
                    let text = std::str::from_utf8(hex).ok()?;
                    out.push(u8::from_str_radix(text, 16).ok()?);
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).ok()
        })
        .collect()
}

fn reply(status: StatusCode, value: &Value) -> Answer {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, message: &str) -> Answer {
    reply(status, &json!({ "error": message }))
}

fn plain(status: StatusCode, text: &str) -> Answer {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "test code fails loudly")]
    use super::*;

    #[test]
    fn every_listed_route_is_routed_with_its_methods() {
        for (pattern, method) in ROUTES {
            let path = pattern
                .replace("{group}", "app")
                .replace("{server}", "a:1")
                .replace("{client}", "1.2.3.4")
                .replace("{step}", "bans");
            if matches!(path.as_str(), "/healthz" | "/readyz") {
                continue;
            }
            let endpoint = Endpoint::find(&segments(&path).unwrap()).unwrap_or_else(|| panic!("{path}"));
            assert!(endpoint.allows(&method.parse().unwrap()), "{method} {path}");
        }
    }

    #[test]
    fn paths_are_percent_decoded_and_bad_encodings_refused() {
        assert_eq!(
            segments("/v1/upstreams/app/servers/%5B::1%5D:80/drain").unwrap(),
            ["v1", "upstreams", "app", "servers", "[::1]:80", "drain"]
        );
        assert_eq!(segments("/v1/bans/%zz"), None);
        assert_eq!(segments("/v1/bans/%ff"), None, "not UTF-8");
        assert_eq!(segments("/v1/bans/%4"), None, "cut short");
    }

    #[test]
    fn bad_input_is_refused_with_a_message() {
        let s = |p: &str| segments(p).unwrap();
        let weight = s("/v1/upstreams/app/servers/a:1/weight");
        for body in [
            &b"{}"[..],
            b"{\"weight\": 0}",
            b"{\"weight\": 10001}",
            b"{\"weight\": 1.5}",
            b"[]",
            b"nope",
        ] {
            assert!(parse_change(Endpoint::Weight, &weight, "", body).is_err(), "{body:?}");
        }
        let ban = s("/v1/bans");
        for body in [
            &b"{\"client\": \"1.2.3\", \"duration\": \"1m\"}"[..],
            b"{\"client\": \"1.2.3.4\", \"duration\": \"forever\"}",
            b"{\"client\": \"1.2.3.4\", \"duration\": \"0s\"}",
            b"{\"client\": \"1.2.3.4\", \"duration\": \"31d\"}",
            b"{\"client\": \"1.2.3.4\"}",
        ] {
            assert!(parse_change(Endpoint::Bans, &ban, "", body).is_err(), "{body:?}");
        }
        assert_eq!(
            parse_change(
                Endpoint::Bans,
                &ban,
                "",
                b"{\"client\": \"1.2.3.4\", \"duration\": \"10m\"}"
            )
            .unwrap(),
            Change::Ban {
                client: "1.2.3.4".parse().unwrap(),
                seconds: 600
            }
        );
        let purge = s("/v1/cache/purge");
        for body in [
            &b"{}"[..],
            b"{\"url\": \"\"}",
            b"{\"url\": \"a\", \"tag\": \"b\"}",
            b"{\"url\": 1}",
        ] {
            assert!(parse_change(Endpoint::Purge, &purge, "", body).is_err(), "{body:?}");
        }
        let mode = s("/v1/protection/nope/mode");
        assert!(parse_change(Endpoint::Mode, &mode, "", b"{\"mode\": \"shadow\"}").is_err());
        let mode = s("/v1/protection/bans/mode");
        assert!(parse_change(Endpoint::Mode, &mode, "", b"{\"mode\": \"off\"}").is_err());
        assert!(parse_change(Endpoint::Reload, &s("/v1/config/reload"), "dry_run=yes", b"").is_err());
        assert!(parse_change(Endpoint::Ban, &s("/v1/bans/999.1.1.1"), "", b"").is_err());
    }
}
