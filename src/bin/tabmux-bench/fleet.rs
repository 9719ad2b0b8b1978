//! The `fleet` scenario (issue 16): tabmux processes behind real haproxy,
//! with the shipped `deploy/haproxy.cfg`, and browsers of two tabs each
//! that reconnect at once when closed, as pusher-js and most clients do.
//!
//! - **A process joins** (3 → 4): with every session's tabs on the three,
//!   each session opens one more tab through haproxy configured with four.
//!   A session whose new tab hashes to the new process gets a second
//!   upstream there (its old tabs keep the first): `moved_pct` of them.
//! - **A rolling restart** of the three (SIGTERM, wait for the exit, start
//!   again, wait until haproxy has it back), once with `drain_spread = "0s"`
//!   and once with `"5s"`: the upstream dials the backend sees beyond the
//!   first, and their peak per second (a sliding 1 s window sampled every
//!   100 ms).
//!
//! Needs haproxy (`apt-get install haproxy`); tabmux only.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::backend;
use crate::procs;
use crate::Figures;

/// The scenario's sizes.
pub struct Sizes {
    pub sessions: usize,
}

const TABS: usize = 2;
const HAPROXY_CFG: &str = include_str!("../../../deploy/haproxy.cfg");

/// Whether haproxy is installed.
pub fn available() -> bool {
    haproxy_path().is_some()
}

fn haproxy_path() -> Option<&'static str> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

pub async fn run(exe: &Path, sizes: &Sizes, f: &mut Figures) -> anyhow::Result<()> {
    anyhow::ensure!(
        available(),
        "the fleet scenario needs haproxy (apt-get install haproxy)"
    );
    let moved = join(exe, sizes.sessions).await?;
    f.insert("moved_pct".into(), moved * 100.0 / sizes.sessions as f64);
    for (name, spread) in [("no_spread", "0s"), ("spread_5s", "5s")] {
        let (redials, peak) = rolling_restart(exe, sizes.sessions, spread).await?;
        f.insert(format!("restart_redials_{name}"), redials as f64);
        f.insert(format!("restart_peak_dials_per_s_{name}"), peak as f64);
    }
    Ok(())
}

/// A tabmux process of the fleet, on fixed ports (haproxy names them).
struct Member {
    tabs: SocketAddr,
    admin: SocketAddr,
    dir: procs::TempDir,
    child: Option<Child>,
}

impl Member {
    fn new(exe: &Path, backend: SocketAddr, spread: &str) -> anyhow::Result<Member> {
        let dir = procs::TempDir::new("fleet")?;
        let tabs = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
        let config = format!(
            "[server]\nlisten = \"{tabs}\"\nproxy_protocol = true\n\
             per_ip = {{ tabs = 100000, sessions = 50000, \
             rate = {{ messages = 100000000, bytes = \"64GiB\" }} }}\n\
             shutdown_timeout = \"10s\"\ndrain_spread = \"{spread}\"\n\
             [admin]\nlisten = \"{admin}\"\n[log]\nlevel = \"warn\"\n\
             [[route]]\npath = \"/ws\"\nupstream = \"ws://{backend}/ws\"\n\
             allowed_origins = [\"http://bench.local\"]\n"
        );
        std::fs::write(dir.path().join("proxy.toml"), config)?;
        let mut m = Member {
            tabs,
            admin,
            dir,
            child: None,
        };
        m.start(exe)?;
        Ok(m)
    }

    fn start(&mut self, exe: &Path) -> anyhow::Result<()> {
        let config = self.dir.path().join("proxy.toml").display().to_string();
        let child = procs::spawn_pinned(1, exe, &["--config".into(), config])?;
        anyhow::ensure!(procs::wait_listening(self.tabs), "tabmux did not start");
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM, and wait for the exit (the drain).
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        for _ in 0..300 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// haproxy with the shipped file, over these members (a fourth server
/// line is added for a fourth).
struct Haproxy {
    child: Child,
    /// Holds its configuration file.
    _dir: procs::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy(bind: SocketAddr, members: &[&Member]) -> anyhow::Result<Haproxy> {
    let dir = procs::TempDir::new("haproxy")?;
    let mut config = HAPROXY_CFG.to_string();
    for i in 4..=members.len() {
        config.push_str(&format!(
            "    server tabmux{i} \"${{TABMUX_{i}}}\" port \"${{TABMUX_{i}_ADMIN_PORT}}\"\n"
        ));
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(haproxy_path().context("haproxy")?);
    cmd.arg("-db").arg("-f").arg(&path);
    cmd.env("TABMUX_LB_BIND", bind.to_string());
    for i in 1..=3.max(members.len()) {
        // Unused server lines of the shipped file point at nothing.
        let (tabs, admin) = members
            .get(i - 1)
            .map_or(("127.0.0.1:1".to_string(), 1), |m| {
                (m.tabs.to_string(), m.admin.port())
            });
        cmd.env(format!("TABMUX_{i}"), tabs);
        cmd.env(format!("TABMUX_{i}_ADMIN_PORT"), admin.to_string());
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    anyhow::ensure!(procs::wait_listening(bind), "haproxy did not start");
    Ok(Haproxy { child, _dir: dir })
}

async fn accepted(control: SocketAddr) -> anyhow::Result<u64> {
    let line = backend::command(control, "stats").await?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    v["accepted"].as_u64().context("backend stats")
}

/// One tab of browser `session` through `lb`, held until it is closed;
/// then, unless `stop` says so, it comes back at once.
async fn tab(lb: SocketAddr, session: usize, again: bool, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        if let Ok(mut ws) = connect(lb, session).await {
            loop {
                tokio::select! {
                    msg = ws.next() => if !matches!(msg, Some(Ok(_))) { break },
                    _ = stop.changed() => return,
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !again {
            return;
        }
    }
}

async fn connect(
    lb: SocketAddr,
    session: usize,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let mut req = format!("ws://{lb}/ws").into_client_request()?;
    let h = req.headers_mut();
    h.insert(
        "cookie",
        HeaderValue::from_str(&format!("sessionid=browser-{session}"))?,
    );
    h.insert("origin", HeaderValue::from_static("http://bench.local"));
    let tcp = tokio::net::TcpStream::connect(lb).await?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    Ok(ws)
}

/// Waits until the backend has accepted `n` connections and no more come
/// for half a second.
async fn settle(control: SocketAddr, n: u64) -> anyhow::Result<u64> {
    let mut last = 0;
    let mut still = 0;
    for _ in 0..600 {
        let now = accepted(control).await?;
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if now >= n && still >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(last)
}

/// Waits until haproxy has had time to see `m` up (`rise 1`, `inter 1s`).
async fn ready(m: &Member) {
    for _ in 0..100 {
        if procs::wait_listening(m.admin) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

fn fleet_of(
    exe: &Path,
    backend: SocketAddr,
    n: usize,
    spread: &str,
) -> anyhow::Result<Vec<Member>> {
    (0..n).map(|_| Member::new(exe, backend, spread)).collect()
}

/// 3 → 4: the sessions that get a second upstream when their next tab
/// arrives after the fourth process joins.
async fn join(exe: &Path, sessions: usize) -> anyhow::Result<f64> {
    let (_backend, control) = procs::envelope_backend()?;
    let backend_addr = _backend.addr;
    let members = fleet_of(exe, backend_addr, 4, "0s")?;
    let lb3 = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let lb4 = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let _h3 = haproxy(lb3, &members[..3].iter().collect::<Vec<_>>())?;
    let _h4 = haproxy(lb4, &members.iter().collect::<Vec<_>>())?;
    ready(&members[3]).await;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for s in 0..sessions {
        for _ in 0..TABS {
            tasks.push(tokio::spawn(tab(lb3, s, true, stopped.clone())));
        }
    }
    let first = settle(control, sessions as u64).await?;
    for s in 0..sessions {
        tasks.push(tokio::spawn(tab(lb4, s, false, stopped.clone())));
    }
    let after = settle(control, first).await?;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok((after - first) as f64)
}

/// A rolling restart of three processes: dials beyond the first, and the
/// peak dials in any 1 s window.
async fn rolling_restart(exe: &Path, sessions: usize, spread: &str) -> anyhow::Result<(u64, u64)> {
    let (_backend, control) = procs::envelope_backend()?;
    let mut members = fleet_of(exe, _backend.addr, 3, spread)?;
    let lb = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let _h = haproxy(lb, &members.iter().collect::<Vec<_>>())?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for s in 0..sessions {
        for _ in 0..TABS {
            tasks.push(tokio::spawn(tab(lb, s, true, stopped.clone())));
        }
    }
    let first = settle(control, sessions as u64).await?;
    // Sample the backend's accepts every 100 ms while restarting.
    let samples = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let (sampling, sampled) = watch::channel(false);
    let sampler = {
        let samples = samples.clone();
        let mut sampled = sampled.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if let Ok(n) = accepted(control).await {
                            samples.lock().unwrap().push(n);
                        }
                    }
                    _ = sampled.changed() => return,
                }
            }
        })
    };
    for m in members.iter_mut() {
        m.stop().await;
        m.start(exe)?;
        ready(m).await;
    }
    let last = settle(control, first).await?;
    let _ = sampling.send(true);
    let _ = sampler.await;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let samples = samples.lock().unwrap().clone();
    let peak = samples.windows(11).map(|w| w[10] - w[0]).max().unwrap_or(0);
    Ok((last - first, peak))
}
