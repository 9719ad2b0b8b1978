//! The `tabmux` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tabmux::config::{Config, LogFormat};
use tabmux::Proxy;

#[derive(Parser)]
#[command(
    name = "tabmux",
    version,
    about = "One upstream WebSocket per browser session, shared by all of its tabs"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration file and exit (0 if valid, 2 if not).
    Check,
    /// Write a self-signed development certificate (dev.crt, dev.key).
    GenCert {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::GenCert { dir }) => match tabmux::tls::write_dev_cert(&dir) {
            Ok((cert, key)) => {
                println!(
                    "wrote {} and {} (self-signed, for development only)",
                    cert.display(),
                    key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tabmux: gen-cert: {e:#}");
                ExitCode::from(1)
            }
        },
        None => run(&cli.config),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        eprintln!(
            "tabmux: {} problem(s) in {}",
            e.problems.len(),
            path.display()
        );
        ExitCode::from(2)
    })
}

fn check(path: &std::path::Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            println!("{}: ok ({} route(s))", path.display(), config.routes.len());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log.format, &config.log.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tabmux: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let proxy = match Proxy::bind(config).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tabmux: {e}");
                return ExitCode::from(1);
            }
        };
        proxy.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
