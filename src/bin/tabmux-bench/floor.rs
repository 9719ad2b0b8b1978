//! The kernel floor of a fan-out delivery: what one small loopback `write`
//! costs on this machine, with nothing else around it.
//!
//! A child process (pinned to the proxy's core) connects `sockets` plain TCP
//! connections to this process, then, `rate` times a second, writes one
//! 48-byte WebSocket text frame to every connection with a blocking
//! `write(2)`: no event loop, no framing work, no queues. This process (on
//! the load client's core) reads and discards everything, as the load client
//! reads deliveries. The child reports its own CPU time per write. Any proxy
//! that delivers a message to a tab over its own TCP connection pays at
//! least this per delivery.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::procs::{self, Cpu};

/// A text frame of 46 payload bytes, as a server sends it (unmasked).
fn frame() -> Vec<u8> {
    let payload = br#"{"tab":"t1","data":{"t":1763758800000000000}}"#;
    let mut f = vec![0x81, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

/// CPU microseconds (user, system) per write, measured by the writer.
pub async fn measure(sockets: usize, rate: u32, secs: u64) -> anyhow::Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let acceptor = {
        let received = received.clone();
        tokio::spawn(async move {
            for _ in 0..sockets {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let received = received.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        })
    };
    let exe = std::env::current_exe()?;
    let args = [
        "floor-writer".to_string(),
        "--connect".into(),
        addr.to_string(),
        "--sockets".into(),
        sockets.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--secs".into(),
        secs.to_string(),
    ];
    let mut child = procs::command_pinned(1, &exe, &args)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("writer stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let _ = child.wait();
    acceptor.abort();
    let mut it = line.split_whitespace().map(|v| v.parse::<f64>());
    let (Some(Ok(user)), Some(Ok(system)), Some(Ok(writes))) = (it.next(), it.next(), it.next())
    else {
        anyhow::bail!("floor writer said {line:?}");
    };
    let expected = writes as u64 * frame().len() as u64;
    // Everything written must have arrived before the figure counts.
    for _ in 0..200 {
        if received.load(Ordering::Relaxed) >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::ensure!(
        received.load(Ordering::Relaxed) >= expected,
        "the floor reader got {} of {expected} bytes",
        received.load(Ordering::Relaxed)
    );
    Ok((user / writes, system / writes))
}

/// The child: connects, writes, and prints "user_us system_us writes".
pub fn writer(connect: SocketAddr, sockets: usize, rate: u32, secs: u64) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let s = TcpStream::connect(connect)?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let frame = frame();
    let period = Duration::from_secs(1) / rate.max(1);
    let rounds = u64::from(rate) * secs;
    let me = [std::process::id()];
    let start_cpu = procs::cpu_us(&me);
    let start = Instant::now();
    let mut writes = 0u64;
    for round in 0..rounds {
        for s in &mut conns {
            s.write_all(&frame)?;
            writes += 1;
        }
        if let Some(wait) = (period * (round as u32 + 1)).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let cpu: Cpu = procs::cpu_us(&me) - start_cpu;
    println!("{} {} {writes}", cpu.user, cpu.system);
    Ok(())
}
