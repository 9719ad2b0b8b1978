//! `tabmux-bench`: tabmux side by side with a direct connection and with
//! nginx, on this machine, in one run.
//!
//! ```sh
//! cargo build --release && target/release/tabmux-bench run
//! ```
//!
//! Every figure is measured in rounds; in each round the contenders run one
//! after another (tabmux, direct, nginx, tabmux, direct, nginx, …), each
//! with a fresh backend and a fresh proxy process, and the report gives the
//! median over rounds. The proxy under test is pinned to core 1; the load
//! client and the backend share core 0. Everything stays on 127.0.0.1 and
//! is bounded in connections and time. See BENCHMARKS.md.

// tungstenite's handshake callback returns its large error type by design.
#![allow(clippy::result_large_err)]

mod backend;
mod fleet;
mod floor;
mod graphql;
mod hostile;
mod load;
mod mqtt;
mod procs;
mod pusher;
mod report;
mod servers;
mod siblings;

use report::{percentile, report, slope};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use load::Target;
use procs::{Contender, Running};

#[derive(Parser)]
#[command(
    name = "tabmux-bench",
    about = "Benchmark tabmux against direct connections and nginx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark and print the report.
    Run(RunArgs),
    /// Open N idle tabs (each sends and receives one message) against a
    /// proxy you started, and hold them for a while: for profiling.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        tabs: usize,
        #[arg(long, default_value_t = 10)]
        per_session: usize,
        /// How long to hold them, in seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Offer echo load (the cpu scenario's) to a proxy you started: for
    /// profiling.
    Rate {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10)]
        tabs: usize,
        /// Messages per second, over all tabs.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// (internal) the fan-out floor's writer (see `floor.rs`).
    FloorWriter {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        sockets: usize,
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        secs: u64,
    },
    /// (internal) the benchmark backend.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        control: SocketAddr,
        /// Speak the tabmux envelope's broadcast form.
        #[arg(long)]
        envelope: bool,
        /// Broadcasts per second per session while broadcasting.
        #[arg(long, default_value_t = 10)]
        rate: u32,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Rounds per scenario (the report gives medians over rounds).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Scenarios to run: memory, latency, cpu, fanout, storm, and (asked for
    /// by name) pusher (it needs sockudo), graphql (it needs Node.js and `npm ci`
    /// in tests/graphql), mqtt (it needs mosquitto), hostile (tabmux only) and fleet
    /// (tabmux behind haproxy).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,latency,cpu,fanout,storm"
    )]
    scenarios: Vec<String>,
    /// A much smaller run, to check the benchmark itself.
    #[arg(long)]
    quick: bool,
    /// Run even if the machine looks busy.
    #[arg(long)]
    force: bool,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/latest.json")]
    json: PathBuf,
    /// Contenders to run, in this order in every round: tabmux, direct,
    /// nginx, other (`other` needs `--other`, and is added when it is given).
    #[arg(long, value_delimiter = ',', default_value = "tabmux,direct,nginx")]
    contenders: Vec<String>,
    /// The tabmux binary to measure [default: the `tabmux` beside this
    /// program].
    #[arg(long)]
    tabmux: Option<PathBuf>,
    /// A second tabmux binary, measured in the same rounds as contender
    /// `other`: for before/after comparisons (a PGO build against the plain
    /// one, say).
    #[arg(long)]
    other: Option<PathBuf>,
    /// Tabs reach the proxies over `wss://` (a fresh self-signed
    /// certificate); direct tabs stay on `ws://`, as the backend has no TLS.
    #[arg(long)]
    tls: bool,
}

/// What every measurement of one run shares.
struct Plan {
    sizes: &'static Sizes,
    tabmux: PathBuf,
    other: Option<PathBuf>,
    /// With `--tls`: the proxies' certificate and key, and the tabs'
    /// connector that trusts it (built once per run).
    tls: Option<(procs::TlsFiles, tokio_rustls::TlsConnector)>,
    _tls_dir: Option<procs::TempDir>,
}

/// Nanoseconds since the Unix epoch: a clock every process here shares.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Backend {
            listen,
            control,
            envelope,
            rate,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(backend::run(listen, control, envelope, rate))
            .context("backend"),
        Command::Run(args) => run(args),
        Command::FloorWriter {
            connect,
            sockets,
            rate,
            secs,
        } => floor::writer(connect, sockets, rate, secs),
        Command::Rate {
            target,
            tabs,
            rate,
            secs,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let echoes = load::offered_rate(
                    &Target::plain(target),
                    tabs,
                    rate,
                    Duration::from_secs(secs),
                )
                .await?;
                eprintln!("{echoes} echoes in {secs} s");
                Ok(())
            }),
        Command::Hold {
            target,
            tabs,
            per_session,
            secs,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let held = load::idle_tabs(&Target::plain(target), tabs, per_session).await?;
                eprintln!("holding {} tabs for {secs} s", held.len());
                tokio::time::sleep(Duration::from_secs(secs)).await;
                Ok(())
            }),
    }
}

/// Figures of one contender in one scenario, by name.
type Figures = BTreeMap<String, f64>;

/// Every observation: scenario → contender → figure → one value per round.
type Results = BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>;

fn run(args: RunArgs) -> anyhow::Result<()> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let one_min: f64 = load
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if one_min > 1.0 && !args.force {
        anyhow::bail!(
            "the machine is busy (1-minute load average {one_min:.2} on {} cores): \
             figures would be noise. Wait until it is quiet, or pass --force.",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    let plan = Plan::new(&args)?;
    let contenders = contenders(&args)?;
    procs::pin_self(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results: Results = BTreeMap::new();
    for scenario in &args.scenarios {
        for round in 0..args.rounds {
            for &c in &contenders {
                eprintln!(
                    "{scenario}: round {} of {}, {}",
                    round + 1,
                    args.rounds,
                    c.name()
                );
                let figures = rt
                    .block_on(scenario_once(&plan, scenario, c))
                    .with_context(|| format!("{scenario} with {}", c.name()))?;
                let slot = results
                    .entry(scenario.clone())
                    .or_default()
                    .entry(c.name().into())
                    .or_default();
                for (k, v) in figures {
                    slot.entry(k).or_default().push(v);
                }
            }
        }
    }
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    print!("{}", report(&results, &args, one_min));
    Ok(())
}

/// The contenders `args` asks for, in order, leaving out nginx (with a
/// message) when it is not installed.
fn contenders(args: &RunArgs) -> anyhow::Result<Vec<Contender>> {
    let mut names = args.contenders.clone();
    if args.other.is_some() && !names.iter().any(|n| n == "other") {
        names.push("other".into());
    }
    let mut out = Vec::new();
    for name in &names {
        let c = Contender::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .with_context(|| {
                format!("unknown contender {name:?} (tabmux, direct, nginx, other)")
            })?;
        if c == Contender::Other && args.other.is_none() {
            anyhow::bail!("contender `other` needs --other PATH (a tabmux binary)");
        }
        if c == Contender::Nginx && procs::nginx_path().is_none() {
            eprintln!("nginx is not installed (apt-get install nginx-light): leaving it out");
            continue;
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    if out.is_empty() {
        anyhow::bail!("no contender to run");
    }
    Ok(out)
}

impl Plan {
    fn new(args: &RunArgs) -> anyhow::Result<Plan> {
        let tabmux = match &args.tabmux {
            Some(path) => path.clone(),
            None => procs::sibling("tabmux")?,
        };
        for exe in std::iter::once(&tabmux).chain(&args.other) {
            anyhow::ensure!(exe.is_file(), "no tabmux binary at {}", exe.display());
        }
        let (tls, tls_dir) = if args.tls {
            let dir = procs::TempDir::new("tls")?;
            let (cert, key) = tabmux::tls::write_dev_cert(dir.path())?;
            let connector = load::tls_connector(&cert)?;
            (Some((procs::TlsFiles { cert, key }, connector)), Some(dir))
        } else {
            (None, None)
        };
        Ok(Plan {
            sizes: if args.quick { &QUICK } else { &FULL },
            tabmux,
            other: args.other.clone(),
            tls,
            _tls_dir: tls_dir,
        })
    }
}

/// The backend and (unless direct) the proxy for one measurement.
struct Setup {
    _backend: Running,
    control: SocketAddr,
    backend_pids: Vec<u32>,
    proxy: Option<Running>,
    /// Where tabs connect.
    target: Target,
}

impl Setup {
    fn start(plan: &Plan, c: Contender, tabs: usize, per_session: usize) -> anyhow::Result<Setup> {
        Setup::start_at(plan, c, tabs, per_session, 10)
    }

    /// The same, the backend broadcasting `rate` times a second per session
    /// (when told to start).
    fn start_at(
        plan: &Plan,
        c: Contender,
        tabs: usize,
        per_session: usize,
        rate: u32,
    ) -> anyhow::Result<Setup> {
        let mut args = vec!["--rate".to_string(), rate.to_string()];
        if c.is_tabmux() {
            args.push("--envelope".into());
        }
        let (backend, control) = procs::backend(&args)?;
        let listen = backend.addr;
        let backend_pids = backend.pids();
        // One nginx worker can hold about 9,000 proxied connections under
        // this machine's 20,000 open files per process; beyond, two.
        let tls = plan.tls.as_ref().map(|(files, _)| files);
        let per_session = per_session.max(32);
        let proxy = match c {
            Contender::Tabmux => Some(procs::start_tabmux(
                1,
                &plan.tabmux,
                listen,
                per_session,
                tls,
            )?),
            Contender::Other => {
                let exe = plan.other.as_deref().context("no --other binary")?;
                Some(procs::start_tabmux(1, exe, listen, per_session, tls)?)
            }
            Contender::Nginx => Some(procs::start_nginx(
                1,
                listen,
                if tabs > 9000 { 2 } else { 1 },
                tls,
            )?),
            Contender::Direct => None,
        };
        let target = match (&proxy, &plan.tls) {
            (None, _) => Target::plain(listen),
            (Some(p), None) => Target::plain(p.addr),
            (Some(p), Some((_, connector))) => Target::tls(p.addr, connector),
        };
        Ok(Setup {
            _backend: backend,
            control,
            backend_pids,
            proxy,
            target,
        })
    }

    fn proxy_pids(&self) -> Vec<u32> {
        self.proxy.as_ref().map(Running::pids).unwrap_or_default()
    }

    async fn backend_stat(&self, key: &str) -> anyhow::Result<f64> {
        let line = backend::command(self.control, "stats").await?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        v[key].as_f64().context("backend stats")
    }
}

/// Sizes of the scenarios (full, or `--quick`).
struct Sizes {
    memory: &'static [usize],
    latency_samples: usize,
    cpu_rate: u64,
    cpu_secs: u64,
    /// Sessions, tabs per session and broadcasts a second per session. The
    /// first is the scenario as specified; the next, smaller, shows the
    /// costs when neither core is saturated (figures suffixed
    /// `@N_sessions`); the last has the `pusher` scenario's browsers and
    /// event rate, to compare with it like for like (suffixed `@NxT`).
    fan: &'static [(usize, usize, u32)],
    fan_secs: u64,
    storm_tabs: usize,
    storm_sessions: usize,
    /// `pusher`: browsers of `fan`-like 10 tabs, events a second, seconds.
    pusher_sessions: usize,
    pusher_rate: u32,
    pusher_secs: u64,
    /// `hostile`: the attackers and the calm tab's round trips.
    hostile: hostile::Sizes,
    /// `fleet`: browsers (of two tabs) behind haproxy.
    fleet: fleet::Sizes,
}

const FULL: Sizes = Sizes {
    memory: &[1000, 5000, 15000],
    latency_samples: 20_000,
    cpu_rate: 20_000,
    cpu_secs: 5,
    fan: &[(100, 100, 10), (20, 100, 10), (50, 10, 20)],
    fan_secs: 5,
    storm_tabs: 5000,
    storm_sessions: 500,
    pusher_sessions: 50,
    pusher_rate: 20,
    pusher_secs: 5,
    hostile: hostile::Sizes {
        holders: 200,
        floods: 50,
        samples: 5_000,
    },
    fleet: fleet::Sizes { sessions: 600 },
};

const QUICK: Sizes = Sizes {
    memory: &[200, 500, 1000],
    latency_samples: 2_000,
    cpu_rate: 5_000,
    cpu_secs: 1,
    fan: &[(10, 20, 10), (4, 20, 10), (5, 10, 10)],
    fan_secs: 1,
    storm_tabs: 500,
    storm_sessions: 50,
    pusher_sessions: 5,
    pusher_rate: 10,
    pusher_secs: 1,
    hostile: hostile::Sizes {
        holders: 20,
        floods: 5,
        samples: 500,
    },
    fleet: fleet::Sizes { sessions: 60 },
};

async fn scenario_once(plan: &Plan, scenario: &str, c: Contender) -> anyhow::Result<Figures> {
    let sizes = plan.sizes;
    let mut f = Figures::new();
    match scenario {
        "memory" => {
            // RSS growth per tab at each size, each on fresh processes; then
            // the least-squares slope through the sizes, which leaves out
            // the fixed costs of the first tabs.
            let mut proxy_pts: Vec<(f64, f64)> = Vec::new();
            let mut backend_pts: Vec<(f64, f64)> = Vec::new();
            for &n in sizes.memory {
                let setup = Setup::start(plan, c, n, 10)?;
                let proxy_pids = setup.proxy_pids();
                let (p0, b0) = (
                    procs::rss_kib(&proxy_pids),
                    procs::rss_kib(&setup.backend_pids),
                );
                let tabs = load::idle_tabs(&setup.target, n, 10).await?;
                // Let the proxy finish its side of the last handshakes.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (p1, b1) = (
                    procs::rss_kib(&proxy_pids),
                    procs::rss_kib(&setup.backend_pids),
                );
                drop(tabs);
                let (dp, db) = (p1 as f64 - p0 as f64, b1 as f64 - b0 as f64);
                if setup.proxy.is_some() {
                    f.insert(format!("proxy_kib_per_tab@{n}"), dp / n as f64);
                    proxy_pts.push((n as f64, dp));
                }
                f.insert(format!("backend_kib_per_tab@{n}"), db / n as f64);
                backend_pts.push((n as f64, db));
            }
            if proxy_pts.len() > 1 {
                f.insert("proxy_kib_per_tab_slope".into(), slope(&proxy_pts));
            }
            f.insert("backend_kib_per_tab_slope".into(), slope(&backend_pts));
        }
        "latency" => {
            let setup = Setup::start(plan, c, 1, 1)?;
            let pids = setup.proxy_pids();
            let cpu0 = procs::cpu_us(&pids);
            let warmup = 1000;
            let mut rtts = load::latency(&setup.target, warmup, sizes.latency_samples).await?;
            // The proxy's CPU per round trip when every message finds it
            // idle: the cold path, unlike the `cpu` scenario's steady load.
            let cpu = procs::cpu_us(&pids) - cpu0;
            rtts.sort_unstable();
            for (name, q) in [("p50_us", 0.50), ("p99_us", 0.99), ("p999_us", 0.999)] {
                f.insert(name.into(), percentile(&rtts, q) as f64 / 1000.0);
            }
            if setup.proxy.is_some() {
                let trips = (warmup + sizes.latency_samples) as f64;
                f.insert("cpu_us_per_round_trip".into(), cpu.total() as f64 / trips);
                f.insert("cpu_us_per_round_trip_user".into(), cpu.user as f64 / trips);
            }
        }
        "cpu" => {
            let setup = Setup::start(plan, c, 10, 10)?;
            let pids = setup.proxy_pids();
            let cpu0 = procs::cpu_us(&pids);
            let echoes = load::offered_rate(
                &setup.target,
                10,
                sizes.cpu_rate,
                Duration::from_secs(sizes.cpu_secs),
            )
            .await?;
            let cpu = procs::cpu_us(&pids) - cpu0;
            // Each echoed message crossed the proxy twice.
            let frames = 2 * echoes;
            f.insert("echoes_per_s".into(), echoes as f64 / sizes.cpu_secs as f64);
            if setup.proxy.is_some() {
                let per = |us: u64| us as f64 / frames.max(1) as f64;
                f.insert("cpu_us_per_frame".into(), per(cpu.total()));
                f.insert("cpu_us_per_frame_system".into(), per(cpu.system));
            }
        }
        "fanout" => {
            let first_tabs = sizes.fan[0].1;
            for (i, &(sessions, per_session, rate)) in sizes.fan.iter().enumerate() {
                let suffix = match i {
                    0 => String::new(),
                    _ if per_session == first_tabs => format!("@{sessions}_sessions"),
                    _ => format!("@{sessions}x{per_session}"),
                };
                fan_out(plan, c, (sessions, per_session, rate), &suffix, &mut f).await?;
            }
        }
        "storm" => {
            let setup = Setup::start(
                plan,
                c,
                sizes.storm_tabs,
                sizes.storm_tabs / sizes.storm_sessions,
            )?;
            let pids = setup.proxy_pids();
            let cpu0 = procs::cpu_us(&pids);
            let (elapsed, tabs) =
                load::join_storm(&setup.target, sizes.storm_tabs, sizes.storm_sessions).await?;
            let cpu = procs::cpu_us(&pids) - cpu0;
            f.insert(
                "tabs_per_s".into(),
                tabs.len() as f64 / elapsed.as_secs_f64(),
            );
            if setup.proxy.is_some() {
                // The proxy's cost of admitting a tab: its handshake and
                // (tabmux) its share of the session's upstream dial.
                let per = cpu.total() as f64 / tabs.len().max(1) as f64;
                f.insert("cpu_us_per_tab".into(), per);
            }
            f.insert(
                "upstream_dials".into(),
                setup.backend_stat("accepted").await?,
            );
            drop(tabs);
        }
        "pusher" => servers::pusher_once(plan, c, &mut f).await?,
        "graphql" => servers::graphql_once(plan, c, &mut f).await?,
        "mqtt" => servers::mqtt_once(plan, c, &mut f).await?,
        "hostile" => match c {
            Contender::Tabmux => hostile::run(&plan.tabmux, &sizes.hostile, &mut f).await?,
            Contender::Other => {
                let exe = plan.other.as_deref().context("no --other binary")?;
                hostile::run(exe, &sizes.hostile, &mut f).await?
            }
            // No budget to hold them to.
            Contender::Direct | Contender::Nginx => {}
        },
        "fleet" => match c {
            Contender::Tabmux => fleet::run(&plan.tabmux, &sizes.fleet, &mut f).await?,
            Contender::Other => {
                let exe = plan.other.as_deref().context("no --other binary")?;
                fleet::run(exe, &sizes.fleet, &mut f).await?
            }
            Contender::Direct | Contender::Nginx => {}
        },
        other => anyhow::bail!("unknown scenario {other}"),
    }
    Ok(f)
}

/// Scenario 4 at one size: `sessions` sessions of `per_session` tabs,
/// each broadcast to `rate` times a second; figures named with `suffix`.
async fn fan_out(
    plan: &Plan,
    c: Contender,
    (sessions, per_session, rate): (usize, usize, u32),
    suffix: &str,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let sizes = plan.sizes;
    let tabs = sessions * per_session;
    let setup = Setup::start_at(plan, c, tabs, per_session, rate)?;
    let pids = setup.proxy_pids();
    let fan = load::FanOut::connect(&setup.target, sessions, per_session).await?;
    let sent0 = setup.backend_stat("sent").await?;
    let cpu0 = procs::cpu_us(&pids);
    backend::command(setup.control, "start").await?;
    tokio::time::sleep(Duration::from_secs(sizes.fan_secs)).await;
    backend::command(setup.control, "stop").await?;
    load::settle(&fan.deliveries).await;
    let cpu = procs::cpu_us(&pids) - cpu0;
    let sent = setup.backend_stat("sent").await? - sent0;
    let mut lat = fan.finish().await;
    lat.sort_unstable();
    let deliveries = lat.len() as f64;
    f.insert(format!("deliveries{suffix}"), deliveries);
    f.insert(format!("upstream_messages{suffix}"), sent);
    f.insert(
        format!("p50_ms{suffix}"),
        percentile(&lat, 0.5) as f64 / 1000.0,
    );
    f.insert(
        format!("p99_ms{suffix}"),
        percentile(&lat, 0.99) as f64 / 1000.0,
    );
    if setup.proxy.is_some() {
        let per = |us: u64| us as f64 / deliveries.max(1.0);
        f.insert(format!("cpu_us_per_delivery{suffix}"), per(cpu.total()));
        f.insert(
            format!("cpu_us_per_delivery_system{suffix}"),
            per(cpu.system),
        );
    }
    drop(setup);
    if c == Contender::Direct {
        // No proxy at all: the kernel's cost of one delivery, for
        // the same number of sockets and rate (see floor.rs).
        let (user, system) = floor::measure(tabs, rate, sizes.fan_secs).await?;
        f.insert(format!("floor_cpu_us_per_write{suffix}"), user + system);
        f.insert(format!("floor_cpu_us_per_write_system{suffix}"), system);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tabmux-bench run` with these arguments, parsed.
    pub(crate) fn run_args(args: &[&str]) -> RunArgs {
        let argv = ["tabmux-bench", "run"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("arguments parse").command {
            Command::Run(args) => args,
            _ => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn contenders_follow_the_list_and_other_needs_a_binary() {
        let picked = contenders(&run_args(&["--contenders", "direct,tabmux,direct"])).unwrap();
        assert_eq!(picked, [Contender::Direct, Contender::Tabmux]);

        let with_other = contenders(&run_args(&["--contenders", "tabmux", "--other", "/x"]));
        assert_eq!(with_other.unwrap(), [Contender::Tabmux, Contender::Other]);

        let err = contenders(&run_args(&["--contenders", "tabmux,other"])).unwrap_err();
        assert!(err.to_string().contains("--other"), "{err}");
        let err = contenders(&run_args(&["--contenders", "haproxy"])).unwrap_err();
        assert!(err.to_string().contains("unknown contender"), "{err}");
    }
}
