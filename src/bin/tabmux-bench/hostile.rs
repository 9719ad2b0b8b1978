//! The `hostile` scenario (issue 15): tabmux with `buffer_budget = "64MiB"`
//! under a memory attack, beside a well-behaved session.
//!
//! - `holders` tabs each send half of a 1 MB message and stall (what they
//!   sent is held while the rest is awaited); a closed one comes back a
//!   second later, as a reconnecting client would;
//! - `floods` tabs that never read send 64 KiB messages to the echo backend
//!   as fast as they can (what comes back waits in tabmux until the tab is
//!   a slow consumer, or the budget closes it); they come back likewise;
//! - meanwhile one calm tab measures round trips, 500 a second (within the
//!   default `tab_rate`, which holds the attackers back).
//!
//! The attackers connect from 127.0.0.2 and the calm tab from 127.0.0.1:
//! an attacker's address is not its victim's, and `per_ip` limits (the
//! address's shared `per_ip.rate` among them) are per address.
//!
//! Reported: the proxy's resident memory idle, its peak over idle during
//! the attack (the budget says at most 64 MiB + 32 MiB of overhead), its
//! level over idle 3 s and 10 s after the attackers left (memory
//! returned), and the
//! calm tab's round-trip p50/p99 without and with the attack. Only tabmux
//! runs it: the other contenders have no budget to hold to.
//!
//! Then, where sockudo is installed, the `pusher-siblings` case
//! (siblings.rs): a tab flooding client events beside calm sibling tabs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::load::{self, Target};
use crate::procs;
use crate::report::percentile;
use crate::Figures;

/// The scenario's sizes.
pub struct Sizes {
    pub holders: usize,
    pub floods: usize,
    /// Round trips measured, quiet and under attack.
    pub samples: usize,
}

/// The budget the scenario holds tabmux to.
const BUDGET_MIB: f64 = 64.0;
/// A holder's message, of which it sends half.
const MESSAGE: usize = 1_000_000;
/// A flooder's message.
const FLOOD: usize = 64 * 1024;
/// The calm tab's pace.
const CALM_EVERY: Duration = Duration::from_millis(2);
/// How long a closed attacker waits before it comes back.
const COMEBACK: Duration = Duration::from_secs(1);

/// Counts of what the attackers saw.
#[derive(Default)]
struct Seen {
    /// Holders closed with 1013 ("memory budget").
    budget_closes: AtomicU64,
    /// Attacking connections opened (first ones and comebacks).
    connections: AtomicU64,
}

pub async fn run(exe: &Path, sizes: &Sizes, f: &mut Figures) -> anyhow::Result<()> {
    let (_backend, _) = procs::envelope_backend()?;
    let listen = _backend.addr;
    // HOSTILE_SERVER_KEYS adds `[server]` lines (one per line), to try
    // other limits against the same attack (BENCHMARKS.md, "Tenth pass").
    let extra = std::env::var("HOSTILE_SERVER_KEYS").unwrap_or_default();
    let server = &format!(
        "buffer_budget = \"64MiB\"\nper_ip = {{ tabs = 5000, sessions = 1000 }}\n{extra}\n"
    );
    let route = format!(
        "[[route]]\npath = \"/ws\"\nupstream = \"ws://{listen}/ws\"\nsession_cookie = \"sid\"\n\
         allowed_origins = [\"http://bench.local\"]\nmax_tabs_per_session = 32\n"
    );
    let proxy = procs::start_tabmux_config(1, exe, server, &route, None)?;
    let pids = proxy.pids();
    let target = Target::plain(proxy.addr);

    // The calm tab sends 500 messages a second, within the default
    // `tab_rate` (which the attackers are held to).
    let quiet = sorted(load::latency_paced(&target, 200, sizes.samples, CALM_EVERY).await?);
    let idle = procs::rss_kib(&pids);

    // The attack, on a thread and runtime of its own (its work must not
    // delay the calm tab's round trips in this one).
    let seen = Arc::new(Seen::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let attack = {
        let (seen, addr) = (seen.clone(), proxy.addr);
        let (holders, floods) = (sizes.holders, sizes.floods);
        std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                for i in 0..holders {
                    tokio::spawn(holder(addr, 1000 + i / 20, seen.clone()));
                }
                for i in 0..floods {
                    tokio::spawn(flooder(addr, 2000 + i / 10, seen.clone()));
                }
                let _ = stopped.await;
            });
            // Dropping the runtime ends every attacker and its socket.
            Ok(())
        })
    };
    let peak = Arc::new(AtomicU64::new(idle));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pids) = (peak.clone(), sampling.clone(), pids.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(procs::rss_kib(&pids), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // Let the attack build up, then measure the calm tab through it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attacked = sorted(load::latency_paced(&target, 50, sizes.samples, CALM_EVERY).await?);
    let _ = stop.send(());
    attack
        .join()
        .map_err(|_| anyhow::anyhow!("the attack thread panicked"))??;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    // The heap is trimmed once a burst is over (the account stopped
    // falling): looked at 3 s and 10 s after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = procs::rss_kib(&pids);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after_10s = procs::rss_kib(&pids);

    let mib = |kib: u64| kib as f64 / 1024.0;
    f.insert("rss_idle_mib".into(), mib(idle));
    let peak = peak.load(Ordering::Relaxed);
    f.insert("rss_peak_over_idle_mib".into(), mib(peak) - mib(idle));
    f.insert("rss_after_over_idle_mib".into(), mib(after) - mib(idle));
    f.insert("rss_10s_over_idle_mib".into(), mib(after_10s) - mib(idle));
    f.insert(
        "peak_within_budget".into(),
        f64::from(u8::from(mib(peak) - mib(idle) <= BUDGET_MIB + 32.0)),
    );
    for (name, rtts) in [("quiet", &quiet), ("attack", &attacked)] {
        f.insert(
            format!("p50_us_{name}"),
            percentile(rtts, 0.50) as f64 / 1e3,
        );
        f.insert(
            format!("p99_us_{name}"),
            percentile(rtts, 0.99) as f64 / 1e3,
        );
    }
    f.insert(
        "budget_closes".into(),
        seen.budget_closes.load(Ordering::Relaxed) as f64,
    );
    f.insert(
        "attack_connections".into(),
        seen.connections.load(Ordering::Relaxed) as f64,
    );
    drop(proxy);
    // The `pusher-siblings` case, where sockudo is installed.
    crate::siblings::run(exe, f).await
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// Sends half of a 1 MB message and waits; comes back when closed.
async fn holder(addr: SocketAddr, session: usize, seen: Arc<Seen>) {
    let mut half = header(MESSAGE);
    half.push(b'"');
    half.resize(half.len() + MESSAGE / 2, b'h');
    loop {
        let Ok(mut s) = open(addr, session, None).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        seen.connections.fetch_add(1, Ordering::Relaxed);
        if s.write_all(&half).await.is_err() {
            continue;
        }
        if close_code(&mut s).await == Some(1013) {
            seen.budget_closes.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(COMEBACK).await;
    }
}

/// Floods the echo backend and never reads; comes back when closed.
async fn flooder(addr: SocketAddr, session: usize, seen: Arc<Seen>) {
    let mut message = header(FLOOD);
    message.push(b'"');
    message.resize(message.len() + FLOOD - 2, b'f');
    message.push(b'"');
    loop {
        let Ok(mut s) = open(addr, session, Some(16 * 1024)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        seen.connections.fetch_add(1, Ordering::Relaxed);
        while s.write_all(&message).await.is_ok() {}
        tokio::time::sleep(COMEBACK).await;
    }
}

/// A tab's connection after its 101, on a socket with `recv_buffer` bytes
/// of receive buffer if given.
async fn open(
    addr: SocketAddr,
    session: usize,
    recv_buffer: Option<u32>,
) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // The attackers come from an address of their own, as they would: the
    // calm tab's address is not theirs (`per_ip` limits are per address).
    if addr.ip().is_loopback() {
        socket.bind(SocketAddr::from(([127, 0, 0, 2], 0)))?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let mut s = socket.connect(addr).await?;
    let request = format!(
        "GET /ws?session={session} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: sid=h{session}\r\n\
         Origin: http://bench.local\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
        anyhow::ensure!(head.len() < 4096, "an oversized answer");
    }
    anyhow::ensure!(head.starts_with(b"HTTP/1.1 101"), "refused");
    Ok(s)
}

/// The header of one masked text frame of `len` bytes (mask key zero, so
/// the payload goes as is).
fn header(len: usize) -> Vec<u8> {
    let mut out = vec![0x81, 0x80 | 127];
    out.extend_from_slice(&(len as u64).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// Reads the server's frames until its close frame; its code.
async fn close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.ok()?;
        let len = match h[1] & 0x7f {
            126 => u64::from(s.read_u16().await.ok()?),
            127 => s.read_u64().await.ok()?,
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).ok()?];
        s.read_exact(&mut payload).await.ok()?;
        if h[0] & 0x0f == 0x8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
    }
}
