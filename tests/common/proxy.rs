//! The proxy under test: a configuration built in code ([`proxy`],
//! [`route`]), started in this process on `127.0.0.1:0` or as the real
//! binary in a child process, and its admin endpoints.
//!
//! ```ignore
//! let proxy = proxy()
//!     .max_tabs(2)
//!     .route(route("/ws", &mock).linger("0s").envelope("none"))
//!     .start()
//!     .await;
//! ```

use std::net::SocketAddr;
use std::path::Path;

use tabmux::{Config, Proxy};
use tokio::net::TcpStream;

use super::guard;
use super::mock::Mock;

/// A running proxy. Dropping it stops it.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestProxy {
    /// A proxy started elsewhere (the demo), to connect tabs to.
    pub fn at(addr: SocketAddr, admin: SocketAddr) -> TestProxy {
        TestProxy {
            addr,
            admin,
            _stop: None,
        }
    }
}

/// A value written into the configuration in TOML syntax.
pub trait Toml {
    fn toml(&self) -> String;
}

impl Toml for &str {
    fn toml(&self) -> String {
        // A JSON string is a TOML basic string.
        serde_json::to_string(self).unwrap()
    }
}

impl Toml for bool {
    fn toml(&self) -> String {
        self.to_string()
    }
}

macro_rules! toml_numbers {
    ($($t:ty),*) => { $(impl Toml for $t { fn toml(&self) -> String { self.to_string() } })* };
}
toml_numbers!(i32, u32, u64, usize, i64);

impl Toml for &[&str] {
    fn toml(&self) -> String {
        let items: Vec<String> = self.iter().map(|s| s.toml()).collect();
        format!("[{}]", items.join(", "))
    }
}

/// TOML written as is (an inline table, say).
pub struct Raw<'a>(pub &'a str);

impl Toml for Raw<'_> {
    fn toml(&self) -> String {
        self.0.to_string()
    }
}

/// One `key = value` line.
fn line(key: &str, value: impl Toml) -> String {
    format!("{key} = {}\n", value.toml())
}

/// A proxy's configuration, built in code: `[server]` listens on
/// `127.0.0.1:0`, `[admin]` too.
#[derive(Clone, Default)]
pub struct ProxyConfig {
    server: String,
    log: String,
    admin: String,
    routes: Vec<RouteConfig>,
    /// The open-file limit (soft and hard) the spawned binary starts with.
    open_files: Option<u64>,
}

/// A configuration to build on.
pub fn proxy() -> ProxyConfig {
    ProxyConfig::default()
}

impl ProxyConfig {
    /// Any `[server]` key.
    pub fn server(mut self, key: &str, value: impl Toml) -> Self {
        self.server += &line(key, value);
        self
    }

    /// Any `[admin]` key.
    pub fn admin(mut self, key: &str, value: impl Toml) -> Self {
        self.admin += &line(key, value);
        self
    }

    /// Spawns the binary with this open-file limit, soft and hard (so it
    /// cannot raise it).
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    pub fn max_tabs(self, n: u64) -> Self {
        self.server("max_tabs", n)
    }

    pub fn handshake_timeout(self, d: &str) -> Self {
        self.server("handshake_timeout", d)
    }

    pub fn shutdown_timeout(self, d: &str) -> Self {
        self.server("shutdown_timeout", d)
    }

    pub fn worker_threads(self, n: u64) -> Self {
        self.server("worker_threads", n)
    }

    /// Serves `wss://` with this certificate and key.
    pub fn tls(mut self, cert: &str, key: &str) -> Self {
        self.server += &format!("tls = {{ cert = {}, key = {} }}\n", cert.toml(), key.toml());
        self
    }

    /// A `[log]` table.
    pub fn log(mut self, format: &str, level: &str) -> Self {
        self.log = line("format", format) + &line("level", level);
        self
    }

    pub fn route(mut self, route: RouteConfig) -> Self {
        self.routes.push(route);
        self
    }

    /// The configuration file's text.
    pub fn toml(&self) -> String {
        let mut out = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            self.server, self.admin
        );
        if !self.log.is_empty() {
            out += &format!("[log]\n{}", self.log);
        }
        for r in &self.routes {
            out += &r.toml();
        }
        out
    }

    /// Starts the proxy in this process.
    pub async fn start(&self) -> TestProxy {
        self.start_in(Path::new(".")).await
    }

    /// Starts the proxy in this process; relative paths resolve against
    /// `base`.
    pub async fn start_in(&self, base: &Path) -> TestProxy {
        start_proxy_in(&self.toml(), base).await
    }

    /// Runs the real binary with this configuration; returns the child and
    /// where it listens, read from its log.
    pub fn spawn(&self) -> (Spawned, TestProxy) {
        let (child, proxy, _) = spawn_tabmux(&self.toml(), self.open_files);
        (child, proxy)
    }

    /// Like [`ProxyConfig::spawn`], also returning the configuration
    /// file's path (to rewrite it and send SIGHUP).
    pub fn spawn_file(&self) -> (Spawned, TestProxy, std::path::PathBuf) {
        spawn_tabmux(&self.toml(), self.open_files)
    }
}

/// A `[[route]]` table, built in code. It allows the origin
/// `http://app.test`, which tabs send by default.
#[derive(Clone)]
pub struct RouteConfig {
    path: String,
    upstream: String,
    origins: Vec<String>,
    keys: String,
}

/// A route at `path` in front of the mock (its `/backend` path).
pub fn route(path: &str, upstream: &Mock) -> RouteConfig {
    route_to(path, upstream.addr)
}

/// A route at `path` in front of whatever listens at `addr`.
pub fn route_to(path: &str, addr: SocketAddr) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        upstream: format!("ws://{addr}/backend"),
        origins: vec!["http://app.test".into()],
        keys: String::new(),
    }
}

impl RouteConfig {
    /// Any route key.
    pub fn set(mut self, key: &str, value: impl Toml) -> Self {
        self.keys += &line(key, value);
        self
    }

    /// The upstream URL in full (a `wss://` one, one with a query).
    pub fn upstream(mut self, url: &str) -> Self {
        self.upstream = url.into();
        self
    }

    pub fn allowed_origins(mut self, origins: &[&str]) -> Self {
        self.origins = origins.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn envelope(self, e: &str) -> Self {
        self.set("envelope", e)
    }

    pub fn payload(self, p: &str) -> Self {
        self.set("payload", p)
    }

    pub fn missing_cookie(self, m: &str) -> Self {
        self.set("missing_cookie", m)
    }

    pub fn forward_query(self, yes: bool) -> Self {
        self.set("forward_query", yes)
    }

    pub fn replay_first(self, n: u64) -> Self {
        self.set("replay_first", n)
    }

    pub fn linger(self, d: &str) -> Self {
        self.set("linger", d)
    }

    pub fn max_tabs_per_session(self, n: u64) -> Self {
        self.set("max_tabs_per_session", n)
    }

    /// Bytes, or a size such as `"128KiB"`.
    pub fn max_message_size(self, size: impl Toml) -> Self {
        self.set("max_message_size", size)
    }

    pub fn tab_queue(self, n: u64) -> Self {
        self.set("tab_queue", n)
    }

    pub fn reconnect_buffer(self, size: impl Toml) -> Self {
        self.set("reconnect_buffer", size)
    }

    /// The redial backoff and budget.
    pub fn reconnect(mut self, initial: &str, max: &str, attempts: u32) -> Self {
        self.keys += &format!(
            "reconnect = {{ initial = {}, max = {}, attempts = {attempts} }}\n",
            initial.toml(),
            max.toml()
        );
        self
    }

    pub fn dial_timeout(self, d: &str) -> Self {
        self.set("dial_timeout", d)
    }

    pub fn ping_interval(self, d: &str) -> Self {
        self.set("ping_interval", d)
    }

    pub fn idle_timeout(self, d: &str) -> Self {
        self.set("idle_timeout", d)
    }

    pub fn open_event_headers(self, names: &[&str]) -> Self {
        self.set("open_event_headers", names)
    }

    pub fn upstream_origin(self, o: &str) -> Self {
        self.set("upstream_origin", o)
    }

    pub fn upstream_user_agent(self, ua: &str) -> Self {
        self.set("upstream_user_agent", ua)
    }

    /// Extra CA roots for a `wss://` upstream.
    pub fn ca(self, path: &str) -> Self {
        self.set("ca", path)
    }

    fn toml(&self) -> String {
        let origins: Vec<&str> = self.origins.iter().map(String::as_str).collect();
        format!(
            "[[route]]\n{}{}{}{}",
            line("path", self.path.as_str()),
            line("upstream", self.upstream.as_str()),
            line("allowed_origins", origins.as_slice()),
            self.keys
        )
    }
}

/// One proxy with one default route in front of `upstream`.
pub async fn proxy_for(upstream: &Mock) -> TestProxy {
    proxy().route(route("/ws", upstream)).start().await
}

/// Starts a proxy from configuration text (tests of the text itself).
pub async fn start_proxy(toml: &str) -> TestProxy {
    start_proxy_in(toml, Path::new(".")).await
}

async fn start_proxy_in(toml: &str, base: &Path) -> TestProxy {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let config = Config::from_toml(toml, "test.toml", base)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"));
    let proxy = Proxy::bind(config).await.expect("bind");
    let addr = proxy.local_addr();
    let admin = proxy.admin_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    TestProxy {
        addr,
        admin,
        _stop: Some(stop),
    }
}

/// The binary the child-process tests run: `TABMUX_BIN` when set (so CI can
/// soak the profile-guided build), else the one cargo built for the tests.
pub fn tabmux_bin() -> std::path::PathBuf {
    std::env::var_os("TABMUX_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tabmux").into())
}

/// Runs the real binary with this configuration (which should listen on
/// port 0); returns the child and where it listens, read from its log.
/// A spawned tabmux, killed when dropped: a test that fails half-way
/// leaves no process behind.
pub struct Spawned(Option<std::process::Child>);

impl Spawned {
    /// The child itself, no longer killed on drop (to wait for its exit).
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("a spawned child")
    }
}

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().expect("a spawned child")
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("a spawned child")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_tabmux(toml: &str, open_files: Option<u64>) -> (Spawned, TestProxy, std::path::PathBuf) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tabmux-child-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let mut command = std::process::Command::new(tabmux_bin());
    command
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(n) = open_files {
        let lim = libc::rlimit {
            rlim_cur: n as libc::rlim_t,
            rlim_max: n as libc::rlim_t,
        };
        // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr_after = |line: &str, marker: &str| -> Option<SocketAddr> {
        let rest = line.split(marker).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    let (mut tabs, mut admin) = (None, None);
    let mut early = Vec::new();
    while tabs.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("tabmux exited before listening")
            .unwrap();
        early.push(line.clone());
        tabs = tabs
            .or_else(|| addr_after(&line, "tabs: listening on ws://"))
            .or_else(|| addr_after(&line, "tabs: listening on wss://"));
        admin = admin.or_else(|| addr_after(&line, "admin: listening on http://"));
    }
    // Keep draining its output so the child never blocks on a full pipe,
    // into `log.txt` beside the configuration (tests read it).
    let log_path = dir.join("log.txt");
    std::thread::spawn(move || {
        use std::io::Write;
        let Ok(mut log) = std::fs::File::create(log_path) else {
            return;
        };
        for line in early {
            let _ = writeln!(log, "{line}");
        }
        for line in lines.map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
        }
    });
    (
        Spawned(Some(child)),
        TestProxy::at(tabs.unwrap(), admin.unwrap()),
        path,
    )
}

/// A plain HTTP GET to the admin listener; returns status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    raw_http(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends raw request bytes and reads the whole response; returns its status
/// and body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    guard("an HTTP response", s.read_to_end(&mut buf))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Everything after the head (a body may itself hold blank lines).
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A route's counter with a `reason` label (`/ws` route), scraped now.
pub async fn reason_count(proxy: &TestProxy, name: &str, reason: &str) -> Option<f64> {
    let text = admin_get(proxy.admin, "/metrics").await.1;
    metric(
        &text,
        &format!("{name}{{route=\"/ws\",reason=\"{reason}\"}}"),
    )
}

/// The value of one metric line (exact label set) in a Prometheus scrape.
pub fn metric(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

/// Resident memory of a process (the spawned binary), in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A memory figure of the process's `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// The process's peak resident memory so far (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Waits until the process's resident memory is at most `mib`.
pub async fn memory_returned(pid: u32, mib: f64) {
    super::guard("the memory to be returned", async {
        while rss_mib(pid) > mib {
            tokio::task::yield_now().await;
        }
    })
    .await;
}
