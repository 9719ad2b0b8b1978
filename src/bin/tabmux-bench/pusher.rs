//! The `pusher` scenario: a real Pusher-protocol server (sockudo, from
//! crates.io: `cargo install sockudo --version 5.2.0 --locked
//! --no-default-features --features local`), browsers of 10 tabs each
//! subscribed to one channel, and events triggered through the server's
//! REST API at a fixed rate. Tabs connect directly, through nginx, or
//! through tabmux's `pusher` route; the figures are what the server sees
//! (connections, messages it sent) and what the proxy spends per delivered
//! event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures_util::stream::StreamExt;
use futures_util::SinkExt;
use http::HeaderValue;
use md5::Digest as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::load::{FanOut, Target, Ws};
use crate::procs::{self, Running};

pub const APP_ID: &str = "bench";
pub const APP_KEY: &str = "bench-key";
const APP_SECRET: &str = "bench-secret";
/// The channel every tab subscribes to.
const CHANNEL: &str = "bench";

/// The Pusher path tabs connect to.
pub fn path() -> String {
    format!("/app/{APP_KEY}")
}

/// sockudo's binary: `SOCKUDO_BIN`, cargo's bin directory, or the PATH.
fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SOCKUDO_BIN") {
        return bin.into();
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    match home.map(|h| h.join("bin").join("sockudo")) {
        Some(p) if p.exists() => p,
        _ => "sockudo".into(),
    }
}

/// Whether sockudo can be run (the scenario is left out otherwise).
pub fn available() -> bool {
    let bin = binary();
    bin.exists() || procs::which("sockudo")
}

/// A running sockudo, pinned to `core`.
pub struct Sockudo {
    pub running: Running,
    metrics: SocketAddr,
}

impl Sockudo {
    pub fn start(core: usize) -> anyhow::Result<Sockudo> {
        Sockudo::start_with(core, &[])
    }

    /// Started with more of sockudo's settings (environment variables).
    pub fn start_with(core: usize, env: &[(&str, &str)]) -> anyhow::Result<Sockudo> {
        let port = procs::free_port();
        let metrics = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
        let mut cmd = procs::command_pinned(core, &binary(), &[]);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("METRICS_ENABLED", "true")
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", metrics.port().to_string())
            .env("ADAPTER_DRIVER", "local")
            .env("CACHE_DRIVER", "memory")
            .env("QUEUE_DRIVER", "none")
            .env("APP_MANAGER_DRIVER", "memory")
            .env("RATE_LIMITER_ENABLED", "false")
            .env("RATE_LIMITER_DRIVER", "memory")
            .env("SOCKUDO_DEFAULT_APP_ID", APP_ID)
            .env("SOCKUDO_DEFAULT_APP_KEY", APP_KEY)
            .env("SOCKUDO_DEFAULT_APP_SECRET", APP_SECRET)
            .env("SOCKUDO_DEFAULT_APP_ENABLED", "true")
            .env("SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS", "100000")
            .env(
                "SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND",
                "100000",
            )
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd.spawn().context("cannot start sockudo")?;
        let running = Running::new(child, SocketAddr::from(([127, 0, 0, 1], port)))?;
        anyhow::ensure!(procs::wait_listening(metrics), "sockudo's metrics");
        Ok(Sockudo { running, metrics })
    }

    /// The sum of a metric's series in sockudo's scrape.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let (_, body) = crate::load::http(self.metrics, request).await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Triggers one `tick` event on the channel, stamped with the time,
    /// through the REST API (signed as Pusher's HTTP API is).
    pub async fn trigger(&self) -> anyhow::Result<()> {
        let data = crate::unix_ns().to_string();
        let body =
            serde_json::json!({"name": "tick", "channels": [CHANNEL], "data": data}).to_string();
        let path = format!("/apps/{APP_ID}/events");
        let md5 = hex(&md5::Md5::digest(body.as_bytes()));
        let timestamp = crate::unix_ns() / 1_000_000_000;
        let query = format!(
            "auth_key={APP_KEY}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}"
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, APP_SECRET.as_bytes());
        let signature =
            hex(ring::hmac::sign(&key, format!("POST\n{path}\n{query}").as_bytes()).as_ref());
        let request = format!(
            "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, answer) = crate::load::http(self.running.addr, &request).await?;
        anyhow::ensure!(status == 200, "trigger: HTTP {status}: {answer}");
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One tab of browser `session`: connected, greeted, subscribed.
async fn tab(target: &Target, session: usize) -> anyhow::Result<Ws> {
    let (mut ws, _) = greeted(target, session).await?;
    let subscribe = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": CHANNEL}});
    ws.send(Message::text(subscribe.to_string())).await?;
    until(&mut ws, "pusher_internal:subscription_succeeded").await?;
    Ok(ws)
}

/// One tab of browser `session`, past its `connection_established`; its
/// socket id.
pub async fn greeted(target: &Target, session: usize) -> anyhow::Result<(Ws, String)> {
    let url = format!(
        "ws://{}{}?protocol=7&client=js&version=8.4.0&flash=false",
        target.addr,
        path()
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("cookie", HeaderValue::from_str(&format!("sid=s{session}"))?);
    req.headers_mut()
        .insert("origin", HeaderValue::from_static("http://bench.local"));
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn crate::load::Io> = Box::new(tcp);
    let (mut ws, _) = tokio_tungstenite::client_async(req, io).await?;
    let greeting = until(&mut ws, "pusher:connection_established").await?;
    let greeting: serde_json::Value = serde_json::from_str(&greeting)?;
    let data: serde_json::Value = serde_json::from_str(greeting["data"].as_str().unwrap_or("{}"))?;
    let socket_id = data["socket_id"].as_str().unwrap_or("").to_string();
    Ok((ws, socket_id))
}

/// The `auth` of a private channel's subscribe, signed as an app's auth
/// endpoint signs it.
pub fn private_auth(socket_id: &str, channel: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, APP_SECRET.as_bytes());
    let signature = ring::hmac::sign(&key, format!("{socket_id}:{channel}").as_bytes());
    format!("{APP_KEY}:{}", hex(signature.as_ref()))
}

/// Reads until an event of that name; that frame.
pub async fn until(ws: &mut Ws, event: &str) -> anyhow::Result<String> {
    let needle = format!("\"{event}\"");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains(&needle) => {
                return Ok(t.as_str().to_string())
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed before {event}"),
        }
    }
}

/// The stamp in a `tick` event's data (`"data":"<unix ns>"`).
pub fn stamp(text: &str) -> Option<u64> {
    crate::load::stamp_after(text, "\"data\":\"")
}

/// The browsers' tabs, connected and subscribed, each timing the events
/// it receives.
pub async fn tabs(target: &Target, sessions: usize, per_session: usize) -> anyhow::Result<FanOut> {
    let sockets =
        crate::load::browsers(sessions, per_session, |session, _| tab(target, session)).await?;
    Ok(FanOut::timing(sockets, stamp))
}

/// `n` tabs of browser `session`, connected and subscribed, each timing
/// the events it receives.
pub async fn tabs_of(target: &Target, session: usize, n: usize) -> anyhow::Result<FanOut> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(tab(target, session).await?);
    }
    Ok(FanOut::timing(sockets, stamp))
}

/// Triggers events at `rate` a second for `secs`; returns how many.
pub async fn trigger_for(sockudo: &Sockudo, rate: u32, secs: u64) -> anyhow::Result<u64> {
    crate::load::at_rate(rate, secs, || sockudo.trigger()).await
}
