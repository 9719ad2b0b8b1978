//! Starting the processes under test, pinned to cores, and reading their CPU
//! time and memory from /proc.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which way tabs reach the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    Tabmux,
    Direct,
    Nginx,
    /// A second tabmux binary (`--other`), for before/after comparisons.
    Other,
}

impl Contender {
    pub const ALL: [Contender; 4] = [
        Contender::Tabmux,
        Contender::Direct,
        Contender::Nginx,
        Contender::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Tabmux => "tabmux",
            Contender::Direct => "direct",
            Contender::Nginx => "nginx",
            Contender::Other => "other",
        }
    }

    /// Whether tabs reach the backend through tabmux (which speaks the
    /// envelope to it).
    pub fn is_tabmux(self) -> bool {
        matches!(self, Contender::Tabmux | Contender::Other)
    }
}

/// The certificate and key a proxy serves `wss://` with (`--tls`).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Runs `program args…` pinned to `core` (when taskset exists).
pub fn spawn_pinned(core: usize, program: &Path, args: &[String]) -> std::io::Result<Child> {
    command_pinned(core, program, args)
        .stdout(Stdio::null())
        .spawn()
}

/// The command for `program args…` pinned to `core` (when taskset exists),
/// with no input and its errors discarded.
pub fn command_pinned(core: usize, program: &Path, args: &[String]) -> Command {
    let mut cmd = if which("taskset") {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(core.to_string()).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    cmd
}

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Pins the calling process to `core`.
pub fn pin_self(core: usize) {
    if which("taskset") {
        let _ = Command::new("taskset")
            .args(["-cp", &core.to_string(), &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A process under test, killed when dropped.
pub struct Running {
    pub child: Child,
    /// Where tabs connect.
    pub addr: SocketAddr,
    _dir: Option<TempDir>,
}

impl Running {
    /// Wraps a started process once it accepts connections on `addr`.
    pub fn new(mut child: Child, addr: SocketAddr) -> std::io::Result<Running> {
        if !wait_listening(addr) {
            let _ = child.kill();
            return Err(std::io::Error::other(format!("nothing listens on {addr}")));
        }
        Ok(Running {
            child,
            addr,
            _dir: None,
        })
    }

    /// The pids whose CPU and memory count: the process and its children
    /// (nginx's workers).
    pub fn pids(&self) -> Vec<u32> {
        let root = self.child.id();
        // taskset execs the program, so the child's pid is the program's.
        let mut pids = vec![root];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if parent_of(pid) == Some(root) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM first (nginx stops its workers), then make sure.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of some processes, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub user: u64,
    pub system: u64,
}

impl Cpu {
    pub fn total(self) -> u64 {
        self.user + self.system
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// CPU time (user and system) of the pids, in microseconds.
pub fn cpu_us(pids: &[u32]) -> Cpu {
    let tick_us = 1_000_000 / 100; // CLK_TCK is 100 on Linux.
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the name: state(0) ppid(1) … utime(11) stime(12).
            Some(Cpu {
                user: f.get(11)?.parse::<u64>().ok()? * tick_us,
                system: f.get(12)?.parse::<u64>().ok()? * tick_us,
            })
        })
        .fold(Cpu::default(), |a, b| Cpu {
            user: a.user + b.user,
            system: a.system + b.system,
        })
}

/// Resident memory of the pids, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// The bench's backend speaking the envelope (see backend.rs), on core 0;
/// also returns its control address.
pub fn envelope_backend() -> std::io::Result<(Running, SocketAddr)> {
    backend(&["--envelope".to_string()])
}

/// The bench's backend (see backend.rs) with `extra` arguments, on core 0,
/// on two free ports; also returns its control address. A port found free
/// can be taken before the backend binds it (a run once failed so): it is
/// tried on new ports, three times.
pub fn backend(extra: &[String]) -> std::io::Result<(Running, SocketAddr)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let control = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut args: Vec<String> = ["backend", "--listen", &listen.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--control".to_string(), control.to_string()]);
        args.extend(extra.iter().cloned());
        let child = spawn_pinned(0, &std::env::current_exe()?, &args)?;
        match Running::new(child, listen) {
            Ok(running) => return Ok((running, control)),
            Err(e) if attempt >= 3 => return Err(e),
            Err(_) => continue,
        }
    }
}

/// Starts the tabmux binary `exe` in front of `backend`, pinned to `core`.
pub fn start_tabmux(
    core: usize,
    exe: &Path,
    backend: SocketAddr,
    tabs_per_session: usize,
    tls: Option<&TlsFiles>,
) -> std::io::Result<Running> {
    let route = format!(
        r#"[[route]]
path = "/ws"
upstream = "ws://{backend}/ws"
session_cookie = "sid"
allowed_origins = ["http://bench.local"]
max_tabs_per_session = {tabs_per_session}
"#
    );
    start_tabmux_route(core, exe, &route, tls)
}

/// Starts the tabmux binary `exe` with this `[[route]]` table, pinned to
/// `core`.
pub fn start_tabmux_route(
    core: usize,
    exe: &Path,
    route: &str,
    tls: Option<&TlsFiles>,
) -> std::io::Result<Running> {
    start_tabmux_config(core, exe, ONE_ADDRESS, route, tls)
}

/// Every tab of the benchmark comes from 127.0.0.1: the per-address limits
/// (1,000 tabs and 100 sessions by default) are lifted to the process's.
/// And a benchmark tab sends as fast as it is answered (a round trip takes
/// about 0.15 ms), past the 1,000 messages a second a tab may send by
/// default: `tab_rate` and the address's shared `per_ip.rate` are lifted
/// too (their buckets are still kept and checked for every message, so
/// their cost is measured).
const ONE_ADDRESS: &str = "per_ip = { tabs = 100000, sessions = 50000 }\n";
const UNLIMITED_RATE: &str = "tab_rate = { messages = 100000000, bytes = \"64GiB\" }\n";
const UNLIMITED_ADDRESS: &str = "per_ip = { tabs = 100000, sessions = 50000, \
     rate = { messages = 100000000, bytes = \"64GiB\" } }\n";

/// The same, with more `[server]` keys (`server`, one per line).
pub fn start_tabmux_config(
    core: usize,
    exe: &Path,
    server: &str,
    route: &str,
    tls: Option<&TlsFiles>,
) -> std::io::Result<Running> {
    let dir = TempDir::new("tabmux")?;
    let port = free_port();
    let tls = tls.map_or(String::new(), |t| {
        format!(
            "tls = {{ cert = {:?}, key = {:?} }}\n",
            t.cert.display().to_string(),
            t.key.display().to_string()
        )
    });
    let config = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{server}{tls}[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
{route}"#
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &config)?;
    if server == ONE_ADDRESS {
        // The limits lifted, newest first: a tabmux from before them (a
        // "before" binary in a comparison) knows no `per_ip.rate`, or no
        // `tab_rate`, or no `per_ip`, and has no such limit to lift.
        let lifted = [
            format!("{UNLIMITED_ADDRESS}{UNLIMITED_RATE}"),
            format!("{ONE_ADDRESS}{UNLIMITED_RATE}"),
            ONE_ADDRESS.to_string(),
            String::new(),
        ];
        for lift in lifted {
            std::fs::write(&path, config.replace(ONE_ADDRESS, &lift))?;
            if accepts(exe, &path) {
                break;
            }
        }
    }
    let child = spawn_pinned(core, exe, &["--config".into(), path.display().to_string()])?;
    finish_start(child, port, Some(dir))
}

/// Whether `tabmux check` accepts the file.
fn accepts(exe: &Path, config: &Path) -> bool {
    Command::new(exe)
        .args(["check", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts nginx (one worker unless `workers` says more) in front of
/// `backend`, pinned to `core`.
pub fn start_nginx(
    core: usize,
    backend: SocketAddr,
    workers: usize,
    tls: Option<&TlsFiles>,
) -> std::io::Result<Running> {
    let dir = TempDir::new("nginx")?;
    let port = free_port();
    let d = dir.path().display();
    let (ssl, certificate) = tls.map_or((String::new(), String::new()), |t| {
        (
            " ssl".into(),
            format!(
                "ssl_certificate {}; ssl_certificate_key {};",
                t.cert.display(),
                t.key.display()
            ),
        )
    });
    let config = format!(
        r#"worker_processes {workers};
worker_rlimit_nofile 20000;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 20000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream backend {{ server {backend}; }}
  server {{
    listen 127.0.0.1:{port}{ssl} backlog=4096 reuseport;
    {certificate}
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h;
      proxy_buffering off;
      tcp_nodelay on;
    }}
  }}
}}
"#
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config)?;
    let nginx = nginx_path().ok_or_else(|| std::io::Error::other("nginx is not installed"))?;
    let args = [
        "-p".into(),
        d.to_string(),
        "-c".into(),
        path.display().to_string(),
    ];
    let child = spawn_pinned(core, &nginx, &args)?;
    finish_start(child, port, Some(dir))
}

fn finish_start(child: Child, port: u16, dir: Option<TempDir>) -> std::io::Result<Running> {
    let mut running = Running::new(child, SocketAddr::from(([127, 0, 0, 1], port)))?;
    running._dir = dir;
    Ok(running)
}

/// nginx's binary, if installed.
pub fn nginx_path() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A binary built beside this one (the same target directory).
pub fn sibling(name: &str) -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(std::io::Error::other(format!(
            "{} not found: build it with `cargo build --release`",
            path.display()
        )))
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tabmux-bench-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
