//! The benchmark's backend: echoes, and broadcasts on command.
//!
//! - Every data frame is echoed back verbatim. Behind tabmux the frame is
//!   `{"tab":"t3","data":P}`, which is exactly the envelope reply that
//!   addresses tab t3; for direct and nginx it is the tab's own message.
//!   Envelope events (`open`/`close`) are not echoed.
//! - Connections are grouped by the `session` query parameter. While
//!   broadcasting, every group gets one message every `1/rate` s: behind
//!   tabmux a group is one upstream connection, so one frame reaches all of
//!   the session's tabs; direct or through nginx, the backend must send it
//!   once per tab. That difference is the "upstream messages" figure.
//! - A control port answers one-line commands: `start`, `stop`, `stats`
//!   (`{"accepted":N,"sent":N}`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
struct State {
    accepted: AtomicU64,
    sent: AtomicU64,
    broadcasting: AtomicBool,
    next_id: AtomicU64,
    /// Senders to every open connection, by session group.
    groups: Mutex<HashMap<String, HashMap<u64, mpsc::UnboundedSender<Message>>>>,
}

/// Serves until killed.
pub async fn run(
    listen: SocketAddr,
    control: SocketAddr,
    envelope: bool,
    rate: u32,
) -> std::io::Result<()> {
    let state = Arc::new(State::default());
    let ws = TcpListener::bind(listen).await?;
    let ctl = TcpListener::bind(control).await?;
    tokio::spawn(control_loop(ctl, state.clone()));
    tokio::spawn(broadcaster(state.clone(), envelope, rate));
    loop {
        let (stream, _) = ws.accept().await?;
        tokio::spawn(connection(stream, state.clone()));
    }
}

async fn connection(stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    let mut group = String::new();
    let callback = |req: &Request, resp: Response| {
        group = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("session=")))
            .unwrap_or("")
            .to_string();
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    state.accepted.fetch_add(1, Ordering::Relaxed);
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Ok(mut g) = state.groups.lock() {
        g.entry(group.clone()).or_default().insert(id, tx);
    }
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(m @ Message::Text(_))) => {
                    if !m.to_text().is_ok_and(|t| t.contains("\"event\":")) && ws.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Ok(m @ Message::Binary(_))) => {
                    if ws.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            out = rx.recv() => match out {
                Some(m) => {
                    // Write what has queued up in one flush.
                    let mut batch = vec![m];
                    while let Ok(m) = rx.try_recv() {
                        batch.push(m);
                    }
                    let mut failed = false;
                    for m in batch {
                        failed |= ws.feed(m).await.is_err();
                    }
                    if failed || ws.flush().await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    if let Ok(mut g) = state.groups.lock() {
        if let Some(members) = g.get_mut(&group) {
            members.remove(&id);
        }
    }
}

/// Every `1/rate` s while broadcasting: one stamped message per group
/// (envelope) or per connection (plain).
async fn broadcaster(state: Arc<State>, envelope: bool, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    loop {
        tick.tick().await;
        if !state.broadcasting.load(Ordering::Relaxed) {
            continue;
        }
        let stamp = crate::unix_ns();
        let text = if envelope {
            format!("{{\"data\":{{\"t\":{stamp}}}}}")
        } else {
            format!("{{\"t\":{stamp}}}")
        };
        let msg = Message::text(text);
        let Ok(groups) = state.groups.lock() else {
            continue;
        };
        let mut sent = 0;
        for members in groups.values() {
            for tx in members.values() {
                sent += u64::from(tx.send(msg.clone()).is_ok());
            }
        }
        state.sent.fetch_add(sent, Ordering::Relaxed);
    }
}

async fn control_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match line.trim() {
                    "start" => {
                        state.broadcasting.store(true, Ordering::Relaxed);
                        "ok".to_string()
                    }
                    "stop" => {
                        state.broadcasting.store(false, Ordering::Relaxed);
                        "ok".to_string()
                    }
                    "stats" => format!(
                        "{{\"accepted\":{},\"sent\":{}}}",
                        state.accepted.load(Ordering::Relaxed),
                        state.sent.load(Ordering::Relaxed)
                    ),
                    other => format!("unknown command {other}"),
                };
                if write
                    .write_all(format!("{reply}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Sends one command to a backend's control port; returns its reply line.
pub async fn command(control: SocketAddr, cmd: &str) -> std::io::Result<String> {
    let stream = TcpStream::connect(control).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{cmd}\n").as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    Ok(lines.next_line().await?.unwrap_or_default())
}
