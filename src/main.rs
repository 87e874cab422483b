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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
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
            Command::Demo { listen, tls_listen } => demo(listen, tls_listen).await,
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

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", path.display()))?;
    let proxy = Proxy::bind(config)
        .await
        .with_context(|| format!("cannot start with {}", path.display()))?;
    reload_certificates_on_sighup(proxy.certificates());
    proxy.run(shutdown_signal()).await;
    Ok(())
}

/// SIGHUP reloads every TLS certificate from its files; a broken file keeps
/// the certificates in use and logs why.
fn reload_certificates_on_sighup(certificates: portcullis::server::CertReloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed here, before any connection is served, so a SIGHUP can
        // never hit the default action (terminate).
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates will not reload on it");
                return;
            }
        };
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading certificates");
                if let Err(errors) = certificates.reload() {
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
    let result = match Config::load(&path) {
        Ok(config) => {
            let certs = portcullis::server::load_certificates(&config).map(|stores| {
                for warning in portcullis::server::uncovered_route_hosts(&config, &stores) {
                    eprintln!("warning: {warning}");
                }
            });
            let built = portcullis::state::Snapshot::build(config.clone()).await.map(|_| ());
            match (certs, built) {
                (Ok(()), Ok(())) => Ok(config),
                (Err(mut a), Err(b)) => {
                    a.0.extend(b.0);
                    Err(a)
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
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

async fn demo(listen: std::net::SocketAddr, tls_listen: std::net::SocketAddr) -> anyhow::Result<()> {
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
    let config = portcullis::demo::config(
        listen,
        Some((tls_listen, &cert, &key)),
        [app1.addr, app2.addr],
        api.addr,
    )
    .map_err(|e| anyhow::anyhow!("demo config is invalid (a bug):\n{e}"))?;
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
    println!();
    println!("Try:");
    println!("  curl -i http://{addr}/              # round robin over app-1 and app-2 (repeat it)");
    println!("  curl -i http://{addr}/api/users     # routed to api, /api/ rewritten to /");
    println!("  curl -i --http2-prior-knowledge http://{addr}/   # HTTP/2 cleartext");
    println!("  curl -k -i --http2 https://{tls_addr}/        # HTTPS, HTTP/2 by ALPN");
    println!();
    println!("Press Ctrl-C to stop.");
    reload_certificates_on_sighup(proxy.certificates());
    proxy.run(shutdown_signal()).await;
    let _ = std::fs::remove_dir_all(&dir);
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
