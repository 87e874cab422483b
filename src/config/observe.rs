//! The observability sections of the config file: `[access_log]`,
//! `[request_id]`, `[audit_log]` and `[metrics]`, read into the runtime
//! model below. docs/observability.md documents every field.

use std::net::SocketAddr;
use std::path::PathBuf;

use http::HeaderName;

use super::defaults;
use super::reader::Table;

/// Where access log records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDestination {
    Off,
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line with the selected fields.
    Json,
    /// NCSA Common Log Format.
    Common,
    /// Common Log Format plus referer and user agent.
    Combined,
}

/// The fields an access log record can carry (JSON format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogField {
    Time,
    RequestId,
    TraceId,
    ClientIp,
    PeerIp,
    Method,
    Scheme,
    Host,
    Path,
    Query,
    Protocol,
    Status,
    BytesIn,
    BytesOut,
    DurationMs,
    UpstreamHeaderMs,
    Upstream,
    Server,
    Route,
    Retries,
    Cache,
    Protection,
    TlsVersion,
    TlsCipher,
    UserAgent,
    Referer,
    Error,
    Complete,
    Headers,
}

impl LogField {
    /// Every field, in the order records write them; names as in the file.
    pub const ALL: &'static [(&'static str, LogField)] = &[
        ("time", LogField::Time),
        ("request_id", LogField::RequestId),
        ("trace_id", LogField::TraceId),
        ("client_ip", LogField::ClientIp),
        ("peer_ip", LogField::PeerIp),
        ("method", LogField::Method),
        ("scheme", LogField::Scheme),
        ("host", LogField::Host),
        ("path", LogField::Path),
        ("query", LogField::Query),
        ("protocol", LogField::Protocol),
        ("status", LogField::Status),
        ("bytes_in", LogField::BytesIn),
        ("bytes_out", LogField::BytesOut),
        ("duration_ms", LogField::DurationMs),
        ("upstream_header_ms", LogField::UpstreamHeaderMs),
        ("upstream", LogField::Upstream),
        ("server", LogField::Server),
        ("route", LogField::Route),
        ("retries", LogField::Retries),
        ("cache", LogField::Cache),
        ("protection", LogField::Protection),
        ("tls_version", LogField::TlsVersion),
        ("tls_cipher", LogField::TlsCipher),
        ("user_agent", LogField::UserAgent),
        ("referer", LogField::Referer),
        ("error", LogField::Error),
        ("complete", LogField::Complete),
        ("headers", LogField::Headers),
    ];

    pub fn name(self) -> &'static str {
        LogField::ALL.iter().find(|(_, f)| *f == self).map_or("?", |(n, _)| n)
    }
}

/// `[access_log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub destination: LogDestination,
    pub format: LogFormat,
    /// JSON fields written, in [`LogField::ALL`] order.
    pub fields: Vec<LogField>,
    /// Extra request headers written under `headers` (JSON format).
    pub headers: Vec<HeaderName>,
    /// Headers never written: a configured header in this list is written
    /// as `"[redacted]"`.
    pub redact_headers: Vec<HeaderName>,
    /// Query parameters whose values are replaced by `REDACTED` (matched
    /// case-insensitively), in the query and in `Referer`.
    pub redact_query_params: Vec<String>,
    /// Records waiting for the writer; beyond this they are dropped and
    /// counted, never waited for.
    pub buffer_records: usize,
    /// Bytes of records waiting for the writer, the same way: a record
    /// holds the client's header values, so a count alone bounds nothing.
    pub buffer_bytes: usize,
}

/// `[request_id]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestIdConfig {
    /// The header carrying the id to the upstream and back; `None` = off.
    pub header: Option<HeaderName>,
    /// Keep an incoming id when the peer is in `server.trusted_proxies`.
    pub trust_incoming: bool,
    /// Create a `traceparent` when the request has no valid one.
    pub create_traceparent: bool,
}

/// `[audit_log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLogConfig {
    pub path: PathBuf,
    /// A file holding the key of the HMAC-SHA256 signed checkpoints.
    pub hmac_key_file: Option<PathBuf>,
    /// A signed checkpoint after this many records (with a key).
    pub checkpoint_every: u64,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    pub path: String,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            destination: LogDestination::Off,
            format: LogFormat::Json,
            fields: LogField::ALL
                .iter()
                .map(|(_, f)| *f)
                .filter(|f| *f != LogField::Headers)
                .collect(),
            headers: Vec::new(),
            redact_headers: defaults::REDACT_HEADERS
                .iter()
                .map(|h| HeaderName::from_static(h))
                .collect(),
            redact_query_params: defaults::REDACT_QUERY_PARAMS.iter().map(|s| (*s).to_owned()).collect(),
            buffer_records: defaults::BUFFER_RECORDS as usize,
            buffer_bytes: defaults::BUFFER_BYTES as usize,
        }
    }
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        RequestIdConfig {
            header: Some(HeaderName::from_static(defaults::REQUEST_ID_HEADER)),
            trust_incoming: true,
            create_traceparent: false,
        }
    }
}

fn header_names(t: &Table<'_>, key: &'static str) -> Option<Vec<HeaderName>> {
    let list = t.str_or_strs(key)?;
    let mut names = Vec::new();
    for (path, text) in list {
        match HeaderName::from_bytes(text.as_bytes()) {
            Ok(name) => names.push(name),
            Err(_) => t.errors().push(path, format!("\"{text}\" is not a header name")),
        }
    }
    Some(names)
}

pub fn read_access_log(table: Option<Table<'_>>) -> AccessLogConfig {
    let mut config = AccessLogConfig::default();
    let Some(t) = table else { return config };
    if let Some(dest) = t.str("destination") {
        config.destination = match dest {
            "off" => LogDestination::Off,
            "stdout" => LogDestination::Stdout,
            "" => {
                t.error("destination", "expected \"stdout\", \"off\" or a file path");
                LogDestination::Off
            }
            path => LogDestination::File(PathBuf::from(path)),
        };
    }
    if let Some(format) = t.choice(
        "format",
        &[
            ("json", LogFormat::Json),
            ("common", LogFormat::Common),
            ("combined", LogFormat::Combined),
        ],
    ) {
        config.format = format;
    }
    if let Some(list) = t.str_or_strs("fields") {
        let mut fields = Vec::new();
        for (path, text) in list {
            match LogField::ALL.iter().find(|(n, _)| *n == text) {
                Some((_, f)) => fields.push(*f),
                None => {
                    let names: Vec<&str> = LogField::ALL.iter().map(|(n, _)| *n).collect();
                    t.errors().push(
                        path,
                        format!("unknown field \"{text}\", expected one of: {}", names.join(", ")),
                    );
                }
            }
        }
        // Written in one fixed order whatever the order in the file.
        config.fields = LogField::ALL
            .iter()
            .map(|(_, f)| *f)
            .filter(|f| fields.contains(f))
            .collect();
        if config.fields.is_empty() {
            t.error("fields", "must name at least one field");
        }
    }
    if let Some(names) = header_names(&t, "headers") {
        config.headers = names;
        // `headers` is the last field of every record.
        if !config.headers.is_empty() && !config.fields.contains(&LogField::Headers) {
            config.fields.push(LogField::Headers);
        }
    }
    if let Some(names) = header_names(&t, "redact_headers") {
        config.redact_headers = names;
    }
    if let Some(list) = t.str_or_strs("redact_query_params") {
        config.redact_query_params = list.into_iter().map(|(_, s)| s.to_ascii_lowercase()).collect();
    }
    if let Some(n) = t.uint("buffer_records") {
        if (1..=1 << 20).contains(&n) {
            config.buffer_records = n as usize;
        } else {
            t.error("buffer_records", format!("must be between 1 and 1048576, found {n}"));
        }
    }
    if let Some(n) = t.size("buffer_bytes") {
        if (64 << 10..=1 << 30).contains(&n) {
            config.buffer_bytes = n as usize;
        } else {
            t.error(
                "buffer_bytes",
                format!("must be between 64KiB and 1GiB, found {}", super::units::format_size(n)),
            );
        }
    }
    t.finish();
    config
}

pub fn read_request_id(table: Option<Table<'_>>) -> RequestIdConfig {
    let mut config = RequestIdConfig::default();
    let Some(t) = table else { return config };
    if let Some(name) = t.str("header") {
        config.header = if name.is_empty() {
            None
        } else {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    t.error("header", format!("\"{name}\" is not a header name"));
                    config.header
                }
            }
        };
    }
    if let Some(b) = t.bool("trust_incoming") {
        config.trust_incoming = b;
    }
    if let Some(create) = t.choice("traceparent", &[("pass", false), ("create", true)]) {
        config.create_traceparent = create;
    }
    t.finish();
    config
}

pub fn read_audit_log(table: Option<Table<'_>>) -> Option<AuditLogConfig> {
    let t = table?;
    let path = t.str("path");
    if path.is_none() {
        t.error("path", "required: the audit log file");
    }
    let hmac_key_file = t.str("hmac_key_file").map(PathBuf::from);
    let mut checkpoint_every = defaults::CHECKPOINT_EVERY;
    if let Some(n) = t.uint("checkpoint_every") {
        if n == 0 {
            t.error("checkpoint_every", "must be at least 1");
        } else {
            checkpoint_every = n;
        }
    }
    t.finish();
    Some(AuditLogConfig {
        path: PathBuf::from(path.filter(|p| !p.is_empty())?),
        hmac_key_file,
        checkpoint_every,
    })
}

pub fn read_metrics(table: Option<Table<'_>>) -> Option<MetricsConfig> {
    let t = table?;
    let listen = t.listen("the address of the metrics endpoint");
    let mut path = defaults::METRICS_PATH.to_owned();
    if let Some(p) = t.str("path") {
        if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()) {
            path = p.to_owned();
        } else {
            t.error("path", format!("\"{p}\" must start with \"/\" and have no spaces"));
        }
    }
    t.finish();
    Some(MetricsConfig { listen: listen?, path })
}
