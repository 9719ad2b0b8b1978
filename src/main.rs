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
    /// Run a self-contained demo: a demo backend, the proxy, and a page to
    /// open in several tabs.
    Demo {
        /// Where the demo page is served; the proxy takes the next port and
        /// the admin listener the one after.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Write a self-signed development certificate (dev.crt, dev.key).
    GenCert {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// Writes a line to standard output, ignoring a closed pipe
/// (`tabmux check | head -1` must not panic).
macro_rules! outln {
    () => {
        out("\n")
    };
    ($($arg:tt)*) => {
        out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes to standard output, ignoring errors (a closed pipe included).
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// `--features jemalloc`: the allocator BENCHMARKS.md compares glibc's
/// with (not the default).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    tabmux::memory::configure();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::GenCert { dir }) => match tabmux::tls::write_dev_cert(&dir) {
            Ok((cert, key)) => {
                outln!(
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
        Some(Command::Demo { listen }) => demo(listen),
        None => run(&cli.config),
    }
}

fn demo(listen: std::net::SocketAddr) -> ExitCode {
    init_logging(LogFormat::Pretty, "info");
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let mut signals = match signals() {
            Ok(s) => s,
            Err(code) => return code,
        };
        let next = |n: u16| {
            std::net::SocketAddr::new(listen.ip(), listen.port().checked_add(n).unwrap_or(0))
        };
        match tabmux::demo::start(listen, next(1), next(2)).await {
            Ok(d) => {
                outln!();
                outln!(
                    "  tabmux demo: open http://{}/ in several tabs of one browser",
                    d.page
                );
                outln!(
                    "  tabs connect through ws://{}/ws; status and metrics: http://{}/",
                    d.proxy,
                    d.admin
                );
                outln!("  Ctrl-C to stop");
                outln!();
                signals.next().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tabmux: demo: {e:#}");
                ExitCode::from(1)
            }
        }
    })
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
            outln!("{}: ok ({} route(s))", path.display(), config.routes.len());
            out(&config.summary());
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
    let log = init_logging(config.log.format, &config.log.level);
    match tabmux::limits::raise_open_files() {
        Ok(f) => tracing::info!(
            found = f.found,
            set = f.set,
            hard = f.hard,
            "open-file limit: {} found, {} set (the hard limit)",
            f.found,
            f.set
        ),
        Err(e) => tracing::warn!(error = %e, "open-file limit could not be read or raised"),
    }
    let runtime = match runtime(config.server.worker_threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let mut signals = match signals() {
            Ok(s) => s,
            Err(code) => return code,
        };
        let hangups = match hangups() {
            Ok(h) => h,
            Err(code) => return code,
        };
        let proxy = match Proxy::bind(config).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tabmux: {e}");
                return ExitCode::from(1);
            }
        };
        tokio::spawn(reload_on_hangup(
            hangups,
            proxy.shared(),
            path.to_path_buf(),
            log,
        ));
        proxy
            .run(async move {
                signals.next().await;
                // A second signal during the drain means "now".
                tokio::spawn(async move {
                    signals.next().await;
                    eprintln!("tabmux: second signal: exiting without finishing the drain");
                    std::process::exit(1);
                });
            })
            .await;
        ExitCode::SUCCESS
    })
}

/// The runtime tabmux serves on: `threads` workers (by default one per
/// core this process may run on). With one, a single-threaded runtime: the
/// same work without the cross-thread scheduling a pool of one would still
/// pay for on every wake-up.
fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    built.map_err(|e| {
        eprintln!("tabmux: cannot start the runtime: {e}");
        ExitCode::from(1)
    })
}

/// Installs the signal handlers, or says why it could not.
fn signals() -> Result<Signals, ExitCode> {
    Signals::install().map_err(|e| {
        eprintln!("tabmux: cannot install signal handlers: {e}");
        ExitCode::from(1)
    })
}

/// SIGTERM and SIGINT (Ctrl-C), registered when created: a signal that
/// arrives before anything awaits it is still caught, not fatal.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside the runtime.
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Completes on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat, level: &str) -> Option<tabmux::logging::LogHandle> {
    tabmux::logging::init(format, level)
}

/// SIGHUP, registered before the listeners bind (its default action would
/// end the process).
#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangups = ();

fn hangups() -> Result<Hangups, ExitCode> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::hangup()).map_err(|e| {
            eprintln!("tabmux: cannot install the SIGHUP handler: {e}");
            ExitCode::from(1)
        })
    }
    #[cfg(not(unix))]
    Ok(())
}

/// On each SIGHUP, re-reads the configuration file: a valid one is put in
/// force for what arrives from then on (docs/protocol.md, "Lifetime"); one with
/// problems changes nothing, and each problem is logged at its
/// `file:line:column`.
#[cfg_attr(not(unix), allow(unused_variables, unused_mut))]
async fn reload_on_hangup(
    mut hangups: Hangups,
    shared: std::sync::Arc<tabmux::shared::Shared>,
    path: std::path::PathBuf,
    log: Option<tabmux::logging::LogHandle>,
) {
    #[cfg(unix)]
    while hangups.recv().await.is_some() {
        let result = match tabmux::Config::load(&path) {
            Ok(config) => {
                let level = config.log.level.clone();
                if config.server.worker_threads != shared.server.worker_threads {
                    tracing::warn!(
                        "server.worker_threads changed: it applies at the next start, not on reload"
                    );
                }
                match shared.reload(config) {
                    Ok(()) => {
                        if let Some(log) = &log {
                            log.set_level(&level);
                        }
                        Ok(())
                    }
                    Err(problems) => Err(problems),
                }
            }
            Err(e) => Err(e.problems.iter().map(ToString::to_string).collect()),
        };
        match result {
            Ok(()) => {
                shared.metrics.reloaded("ok");
                tracing::info!(file = %path.display(), "configuration reloaded: it applies to what arrives from now on");
            }
            Err(problems) => {
                shared.metrics.reloaded("error");
                for p in &problems {
                    tracing::error!("{p}");
                }
                tracing::error!(
                    problems = problems.len(),
                    "configuration not reloaded: the running one stays"
                );
            }
        }
    }
}
