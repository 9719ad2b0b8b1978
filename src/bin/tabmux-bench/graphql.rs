//! The `graphql` scenario: a real GraphQL over WebSocket server (graphql-ws
//! on Node.js: tests/graphql/server.mjs; `npm ci` in tests/graphql installs
//! it), browsers of 10 tabs each subscribed to one event stream
//! (`subscription { ticks }`, each tab with its own operation id), and
//! updates published at a fixed rate through the server's `/publish`. Tabs
//! connect directly, through nginx, or through tabmux's `graphql` route
//! with `share_subscriptions = "events"`. Figures: what the server holds
//! and sends (connections, subscriptions, messages), deliveries and their
//! latency, the proxy's CPU per delivered update; and, for tabmux, the
//! memory of an idle GraphQL tab (connected, acknowledged, subscribed), by
//! the slope through two sizes as the `memory` scenario measures a json
//! tab.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::SinkExt;
use futures_util::StreamExt;
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::load::{Target, Ws};
use crate::procs::{self, Running};

/// Where the server script and its packages are.
fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/graphql")
}

/// Whether the server can be run (the scenario is left out otherwise).
pub fn available() -> bool {
    procs::which("node") && dir().join("node_modules/graphql-ws").exists()
}

/// The running server, pinned to `core`.
pub struct Server {
    pub running: Running,
}

impl Server {
    pub fn start(core: usize) -> anyhow::Result<Server> {
        let port = procs::free_port();
        let node = PathBuf::from("node");
        let mut cmd = procs::command_pinned(core, &node, &["server.mjs".to_string()]);
        cmd.current_dir(dir())
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("cannot start node")?;
        let running = Running::new(child, SocketAddr::from(([127, 0, 0, 1], port)))?;
        Ok(Server { running })
    }

    /// A figure of the server's `/stats`.
    pub async fn stat(&self, name: &str) -> anyhow::Result<f64> {
        let request = "GET /stats HTTP/1.0\r\nHost: x\r\n\r\n";
        let (_, body) = crate::load::http(self.running.addr, request).await?;
        let stats: serde_json::Value = serde_json::from_str(&body)?;
        stats[name].as_f64().context("no such figure")
    }

    /// Waits (bounded) until the server holds `n` subscriptions.
    pub async fn wait_subscriptions(&self, n: usize) -> anyhow::Result<()> {
        for _ in 0..1000 {
            if self.stat("subscriptions").await? >= n as f64 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("the server never held {n} subscriptions")
    }

    /// Publishes one update, stamped with the time.
    pub async fn publish(&self) -> anyhow::Result<()> {
        let request = format!(
            "POST /publish?text={} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            crate::unix_ns()
        );
        let (status, _) = crate::load::http(self.running.addr, &request).await?;
        anyhow::ensure!(status == 200, "publish: HTTP {status}");
        Ok(())
    }
}

/// The route tabmux serves the scenario on.
pub fn route(server: SocketAddr) -> String {
    format!(
        "[[route]]\npath = \"/graphql\"\nupstream = \"ws://{server}/graphql\"\nsession_cookie = \"sid\"\n\
         allowed_origins = [\"http://bench.local\"]\nenvelope = \"graphql\"\n\
         share_subscriptions = \"events\"\n"
    )
}

/// One tab of browser `session`: connected, acknowledged, subscribed to
/// the event stream under an id of its own (`n`).
async fn tab(target: &Target, session: usize, n: usize) -> anyhow::Result<Ws> {
    let url = format!("ws://{}/graphql", target.addr);
    let mut req = url.into_client_request()?;
    let headers = req.headers_mut();
    headers.insert("cookie", HeaderValue::from_str(&format!("sid=s{session}"))?);
    headers.insert("origin", HeaderValue::from_static("http://bench.local"));
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn crate::load::Io> = Box::new(tcp);
    let (mut ws, _) = tokio_tungstenite::client_async(req, io).await?;
    let init = r#"{"type":"connection_init","payload":{"token":"bench"}}"#;
    ws.send(Message::text(init)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains("connection_ack") => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed before connection_ack"),
        }
    }
    let subscribe = format!(
        r#"{{"id":"op-{n}","type":"subscribe","payload":{{"query":"subscription {{ ticks }}"}}}}"#
    );
    ws.send(Message::text(subscribe)).await?;
    Ok(ws)
}

/// The stamp in a `next` (`"ticks":"<unix ns>"`).
pub fn stamp(text: &str) -> Option<u64> {
    crate::load::stamp_after(text, "\"ticks\":\"")
}

/// `sessions` browsers of `per_session` tabs, subscribed.
pub async fn tabs(target: &Target, sessions: usize, per_session: usize) -> anyhow::Result<Vec<Ws>> {
    crate::load::browsers(sessions, per_session, |session, n| tab(target, session, n)).await
}

/// Publishes at `rate` a second for `secs`; how many.
pub async fn publish_for(server: &Server, rate: u32, secs: u64) -> anyhow::Result<u64> {
    crate::load::at_rate(rate, secs, || server.publish()).await
}
