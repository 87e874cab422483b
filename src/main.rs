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
    /// Run the proxy in front of three built-in demo origins.
    Demo {
        /// Where the proxy listens (cleartext HTTP/1.1 and h2c).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where the proxy listens with TLS (a self-signed certificate made
        /// at start).
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_listen: std::net::SocketAddr,
        /// Where the Prometheus metrics endpoint listens.
        #[arg(long, default_value = "127.0.0.1:9090")]
        metrics_listen: std::net::SocketAddr,
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
            Command::Demo {
                listen,
                tls_listen,
                metrics_listen,
            } => demo(listen, tls_listen, metrics_listen).await,
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
    reload_on_sighup(Some(path.clone()), proxy.reloader(), proxy.certificates());
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
/// files (a broken file keeps the certificates in use).
fn reload_on_sighup(
    path: Option<PathBuf>,
    reloader: portcullis::server::Reloader,
    certificates: portcullis::server::CertReloader,
) {
    #[cfg(unix)]
    {
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
                // Errors are logged, counted and audited by the reloader.
                if let Some(path) = &path {
                    let _ = reloader.reload_file(path, "SIGHUP").await;
                }
                if let Err(errors) = certificates.reload_by("SIGHUP") {
                    for e in &errors.0 {
                        tracing::error!("certificate reload: {e}");
                    }
                }
            }
        });
    }
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
    metrics_listen: std::net::SocketAddr,
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
    let mut config = portcullis::demo::config(
        listen,
        Some((tls_listen, &cert, &key)),
        [app1.addr, app2.addr],
        api.addr,
    )
    .map_err(|e| anyhow::anyhow!("demo config is invalid (a bug):\n{e}"))?;
    let audit_path = dir.join("audit.jsonl");
    config.access_log.destination = portcullis::config::LogDestination::Stdout;
    config.audit_log = Some(portcullis::config::AuditLogConfig {
        path: audit_path.clone(),
        hmac_key_file: None,
        checkpoint_every: 100,
    });
    config.metrics = Some(portcullis::config::MetricsConfig {
        listen: metrics_listen,
        path: "/metrics".into(),
    });
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
    let metrics_addr = proxy.metrics_addr().unwrap_or(metrics_listen);
    println!("  access log: JSON lines on stdout, one per request (below)");
    println!("  audit log:  {}", audit_path.display());
    println!("  metrics:    http://{metrics_addr}/metrics");
    println!();
    println!("Try:");
    println!("  curl -i http://{addr}/              # round robin over app-1 and app-2 (repeat it)");
    println!("  curl -i http://{addr}/api/users     # routed to api, /api/ rewritten to /");
    println!("  curl -i http://{addr}/static/a.txt  # cached for 60 s: repeat it (Cache-Status, Age)");
    println!("  curl -i --http2-prior-knowledge http://{addr}/   # HTTP/2 cleartext");
    println!("  curl -k -i --http2 https://{tls_addr}/        # HTTPS, HTTP/2 by ALPN");
    println!("  curl -s http://{metrics_addr}/metrics | grep portcullis_requests");
    let exe = std::env::current_exe().map_or_else(|_| "portcullis".to_owned(), |p| p.display().to_string());
    println!("  {exe} audit verify {}", audit_path.display());
    println!();
    println!("Press Ctrl-C to stop.");
    // The demo's config is built in, not a file: SIGHUP reloads certificates.
    reload_on_sighup(None, proxy.reloader(), proxy.certificates());
    reopen_logs_on_sigusr1(proxy.observe());
    proxy.run(shutdown_signal()).await;
    // The audit log stays for a look after the demo; the key pair does not.
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(&cert);
    println!("Audit log kept: {}", audit_path.display());
    Ok(())
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
