//! The `portcullis` command line: parse arguments, set up logging, load the
//! config, run the proxy until a signal. All the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portcullis::{Config, Proxy};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A memory-safe reverse proxy for HTTP/1.1 and HTTP/2"
)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// The config file.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
    },
    /// Validate a config file: print every error with its path.
    Check {
        /// The config file.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
    },
    /// Show what applying a config would change, before a reload: exit 0
    /// when nothing would, 1 when something would, 2 when NEW is invalid.
    Plan {
        /// The config to apply.
        new: PathBuf,
        /// Compare with this config file.
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        against: Option<PathBuf>,
        /// Compare with the running config of this proxy's admin API
        /// (http://host:port; the token in PORTCULLIS_ADMIN_TOKEN).
        #[arg(long)]
        admin: Option<String>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the proxy in front of three built-in demo origins, with the
    /// admin API on.
    #[command(after_help = DEMO_HELP)]
    Demo {
        /// Where the proxy listens (cleartext HTTP/1.1 and h2c).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where the proxy listens with TLS (a self-signed certificate made
        /// at start).
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_listen: std::net::SocketAddr,
        /// Where the admin API listens (with /metrics); its token is made
        /// at start and printed.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: std::net::SocketAddr,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit log files (oldest first): exit 0 when
    /// intact, 1 at the first modified, deleted, inserted or reordered
    /// record (named with its line), 2 when the files cannot be read.
    Verify {
        /// The HMAC key file, to check the signed checkpoints.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The head file to check the end against (default: FILE.head beside
        /// the last file, when it exists).
        #[arg(long)]
        head: Option<PathBuf>,
        /// Audit log files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

const DEMO_HELP: &str = "The demo prints its admin token at start; with it in $TOKEN:
  curl -H \"Authorization: Bearer $TOKEN\" http://127.0.0.1:9090/v1/status
  curl -X POST -H \"Authorization: Bearer $TOKEN\" http://127.0.0.1:9090/v1/upstreams/app/servers/<server>/drain
  PORTCULLIS_ADMIN_TOKEN=$TOKEN portcullis plan edited.toml --admin http://127.0.0.1:9090";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => return Ok(check(config).await),
            Command::Plan {
                new,
                against,
                admin,
                json,
            } => return Ok(plan(new, against, admin, json).await),
            Command::Demo {
                listen,
                tls_listen,
                admin_listen,
            } => demo(listen, tls_listen, admin_listen).await,
            Command::Audit {
                command: AuditCommand::Verify { key_file, head, files },
            } => return Ok(audit_verify(key_file, head, files)),
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Diagnostics go to stderr through a bounded queue and a writer thread
/// (tracing-appender's non-blocking writer, lossy: lines beyond its queue
/// are dropped), so a slow terminal or a full pipe never stalls a request
/// thread. The guard flushes what is queued when `main` returns.
fn init_logging(verbose: u8) -> tracing_appender::non_blocking::WorkerGuard {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        .init();
    guard
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", path.display()))?;
    let proxy = Proxy::bind(config)
        .await
        .with_context(|| format!("cannot start with {}", path.display()))?;
    reload_on_sighup(proxy.control());
    reopen_logs_on_sigusr1(proxy.observe());
    proxy.run(shutdown_signal()).await;
    Ok(())
}

/// SIGUSR1 reopens the access and audit log files (after logrotate moved
/// them); the audit chain continues into the new file.
fn reopen_logs_on_sigusr1(observe: std::sync::Arc<portcullis::observe::Observe>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGUSR1; log files will not be reopened on it");
                return;
            }
        };
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                tracing::info!("SIGUSR1: reopening log files");
                observe.reopen();
            }
        });
    }
}

/// `audit verify`: the chain's state in one line, exit 0 / 1 / 2.
fn audit_verify(key_file: Option<PathBuf>, head: Option<PathBuf>, files: Vec<PathBuf>) -> ExitCode {
    use portcullis::observe::audit;
    let key = match key_file.as_deref().map(audit::read_key).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match audit::verify(&files, key.as_ref(), head.as_deref()) {
        Ok(intact) => {
            let mut line = format!(
                "intact: {} record(s), seq {}..={}",
                intact.records, intact.first_seq, intact.last_seq
            );
            if intact.checkpoints_verified > 0 {
                line.push_str(&format!(
                    ", {} signed checkpoint(s) verified",
                    intact.checkpoints_verified
                ));
            }
            if intact.checkpoints_unchecked > 0 {
                line.push_str(&format!(
                    ", {} checkpoint(s) not checked (no --key-file)",
                    intact.checkpoints_unchecked
                ));
            }
            line.push_str(if intact.head_checked {
                ", end confirmed by the head file"
            } else {
                ", no head file: records cut from the end would go unnoticed"
            });
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(audit::VerifyError::Tampered(t)) => {
            println!("TAMPERED: {t}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// SIGHUP reloads the config file (whatever a reload can apply; a broken
/// file, or a change only a restart applies, keeps the running config and
/// logs every error with its path), then every TLS certificate from its
/// files (a broken file keeps the certificates in use). Both are changes
/// applied by `Control::apply`, as the admin API's are.
fn reload_on_sighup(control: portcullis::server::Control) {
    #[cfg(unix)]
    {
        use portcullis::change::Change;
        use tokio::signal::unix::{SignalKind, signal};
        // Installed here, before any connection is served, so a SIGHUP can
        // never hit the default action (terminate).
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the config will not reload on it");
                return;
            }
        };
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config and the certificates");
                // Errors are logged, counted and audited where they are applied.
                let reload = Change::Reload {
                    file: control.config_file().map(|p| p.display().to_string()),
                    dry_run: false,
                    text: None,
                };
                let _ = control.apply(reload, "SIGHUP").await;
                let _ = control.apply(Change::ReloadCertificates, "SIGHUP").await;
            }
        });
    }
}

/// `plan`: the differences, exit 0 (none) / 1 (some) / 2 (NEW invalid, or
/// the admin API unreachable).
async fn plan(new: PathBuf, against: Option<PathBuf>, admin: Option<String>, json: bool) -> ExitCode {
    let result = match (against, admin) {
        (Some(old), _) => plan_against(&new, &old).await,
        (None, Some(url)) => plan_admin(&new, &url).await,
        (None, None) => Err(vec!["give --against OLD.toml or --admin URL".to_owned()]),
    };
    match result {
        Ok(plan) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&plan).unwrap_or_default());
            } else {
                print!("{}", plan.text());
            }
            if plan.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{}: cannot plan ({} error(s))", new.display(), errors.len());
            ExitCode::from(2)
        }
    }
}

async fn plan_against(new: &std::path::Path, old: &std::path::Path) -> Result<portcullis::plan::Plan, Vec<String>> {
    let strings = |e: portcullis::config::ConfigErrors| e.0.iter().map(ToString::to_string).collect::<Vec<_>>();
    let old = Config::load(old).map_err(strings)?;
    let new = Config::load(new).map_err(strings)?;
    portcullis::server::plan(&old, &new).await.map_err(strings)
}

/// Asks the admin API at `url` for a dry run of `new`'s text.
async fn plan_admin(new: &std::path::Path, url: &str) -> Result<portcullis::plan::Plan, Vec<String>> {
    use http_body_util::BodyExt as _;
    let fail = |m: String| vec![m];
    let text = std::fs::read_to_string(new).map_err(|e| fail(format!("{}: cannot read: {e}", new.display())))?;
    let authority = url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| fail(format!("--admin {url}: expected http://host:port")))?;
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| fail(format!("cannot reach the admin API at {authority}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("admin API at {authority}: {e}")))?;
    tokio::spawn(conn);
    let mut request = http::Request::post("/v1/config/reload?dry_run=1").header("host", authority);
    if let Ok(token) = std::env::var("PORTCULLIS_ADMIN_TOKEN") {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(text)))
        .map_err(|e| fail(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(format!("admin API at {authority}: {e}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(format!("admin API at {authority}: {e}")))?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if status == http::StatusCode::UNPROCESSABLE_ENTITY {
        let errors = value["errors"].as_array().cloned().unwrap_or_default();
        return Err(errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["path"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect());
    }
    if !status.is_success() {
        let message = value["error"].as_str().unwrap_or("no message");
        return Err(fail(format!("admin API answered {status}: {message}")));
    }
    let differences = serde_json::from_value(value["changes"].clone())
        .map_err(|e| fail(format!("admin API answered an unexpected plan: {e}")))?;
    Ok(portcullis::plan::Plan { differences })
}

/// `check`: exit 0 and a one-line summary when valid, exit 2 and every
/// error (one per line, with its path) when not.
async fn check(path: PathBuf) -> ExitCode {
    // The same validation as start-up (portcullis::server::validate): the
    // command line only prints what it says.
    let result = match Config::load(&path) {
        Ok(config) => portcullis::server::validate(
            &config,
            &portcullis::observe::Observe::disabled(),
            &portcullis::state::Kept::default(),
        )
        .await
        .map(|validated| {
            for warning in &validated.warnings {
                eprintln!("warning: {warning}");
            }
            config
        }),
        Err(e) => Err(e),
    };
    match result {
        Ok(config) => {
            println!(
                "{}: ok ({} listener(s), {} route(s), {} upstream(s))",
                path.display(),
                config.listeners.len(),
                config.routes.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            ExitCode::from(2)
        }
    }
}

async fn demo(
    listen: std::net::SocketAddr,
    tls_listen: std::net::SocketAddr,
    admin_listen: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let app1 = portcullis::demo::start_origin("app-1")
        .await
        .context("cannot start demo origin")?;
    let app2 = portcullis::demo::start_origin("app-2")
        .await
        .context("cannot start demo origin")?;
    let api = portcullis::demo::start_origin("api")
        .await
        .context("cannot start demo origin")?;
    let dir = std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id()));
    let (cert, key) = portcullis::demo::self_signed_certificate(&dir).context("cannot write the demo certificate")?;
    // The config is a real file, so it can be edited, planned and reloaded.
    let token = portcullis::demo::random_token().context("cannot make the demo admin token")?;
    let tokens = dir.join("admin-tokens");
    write_private(&tokens, &format!("demo:operator:{token}\n")).context("cannot write the demo admin token")?;
    let audit_path = dir.join("audit.jsonl");
    let config_path = dir.join("portcullis.toml");
    let text = format!(
        "{}\n[access_log]\ndestination = \"stdout\"\n\n[audit_log]\npath = {:?}\n\n[admin]\nlisten = \"{admin_listen}\"\ntokens_file = {:?}\n",
        portcullis::demo::config_text(
            listen,
            Some((tls_listen, &cert, &key)),
            [app1.addr, app2.addr],
            api.addr
        ),
        audit_path.display().to_string(),
        tokens.display().to_string(),
    );
    std::fs::write(&config_path, text).context("cannot write the demo config")?;
    let config = Config::load(&config_path).map_err(|e| anyhow::anyhow!("demo config is invalid (a bug):\n{e}"))?;
    let proxy = Proxy::bind(config).await.context("cannot start the demo proxy")?;
    let addrs = proxy.local_addrs();
    let addr = addrs.first().copied().unwrap_or(listen);
    let tls_addr = addrs.get(1).copied().unwrap_or(tls_listen);
    let fingerprint = proxy
        .certificates()
        .stores()
        .first()
        .and_then(|s| s.current().fingerprints.first().cloned())
        .unwrap_or_default();
    println!("Portcullis demo: the proxy listens on http://{addr} and https://{tls_addr}");
    println!(
        "  TLS certificate: self-signed for localhost, made just now ({})",
        cert.display()
    );
    println!("  SHA-256 fingerprint: {fingerprint}");
    for origin in [&app1, &app2, &api] {
        println!("  origin {:<6} on http://{}", origin.name, origin.addr);
    }
    let admin = proxy.admin_addr().unwrap_or(admin_listen);
    println!(
        "  config:     {} (edit it, then plan and reload)",
        config_path.display()
    );
    println!("  access log: JSON lines on stdout, one per request (below)");
    println!("  audit log:  {}", audit_path.display());
    println!("  admin API:  http://{admin} (and /metrics), token {token}");
    print_demo_tries(addr, tls_addr, admin, &token, app1.addr, &config_path, &audit_path);
    println!("Press Ctrl-C to stop.");
    reload_on_sighup(proxy.control());
    reopen_logs_on_sigusr1(proxy.observe());
    proxy.run(shutdown_signal()).await;
    // The audit log stays for a look after the demo; the keys do not.
    for secret in [&key, &cert, &tokens] {
        let _ = std::fs::remove_file(secret);
    }
    println!("Audit log kept: {}", audit_path.display());
    Ok(())
}

/// The demo's "Try:" lines: requests, then the admin API (status, a
/// drain, a plan against the running proxy).
fn print_demo_tries(
    addr: std::net::SocketAddr,
    tls_addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    token: &str,
    app1: std::net::SocketAddr,
    config_path: &std::path::Path,
    audit_path: &std::path::Path,
) {
    println!();
    println!("Try:");
    println!("  curl -i http://{addr}/              # round robin over app-1 and app-2 (repeat it)");
    println!("  curl -i http://{addr}/api/users     # routed to api, /api/ rewritten to /");
    println!("  curl -i http://{addr}/static/a.txt  # cached for 60 s: repeat it (Cache-Status, Age)");
    println!("  curl -i --http2-prior-knowledge http://{addr}/   # HTTP/2 cleartext");
    println!("  curl -k -i --http2 https://{tls_addr}/        # HTTPS, HTTP/2 by ALPN");
    println!("  export TOKEN={token}");
    println!("  curl -H \"Authorization: Bearer $TOKEN\" http://{admin}/v1/status");
    println!(
        "  curl -X POST -H \"Authorization: Bearer $TOKEN\" http://{admin}/v1/upstreams/app/servers/{}/drain",
        app1
    );
    let exe = std::env::current_exe().map_or_else(|_| "portcullis".to_owned(), |p| p.display().to_string());
    println!(
        "  PORTCULLIS_ADMIN_TOKEN=$TOKEN {exe} plan {} --admin http://{admin}",
        config_path.display()
    );
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" http://{admin}/metrics | grep portcullis_requests");
    println!("  {exe} audit verify {}", audit_path.display());
    println!();
    println!();
}

/// Writes a file only its owner can read (the demo's admin token).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the proxy");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
