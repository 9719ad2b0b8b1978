//! `tabmux demo`: a self-contained demonstration.
//!
//! Three servers on loopback:
//! - a **demo backend** that speaks the `json/1` envelope: it greets each tab
//!   by its id, answers pings to the asking tab only, broadcasts what any tab
//!   says, and tells every tab how many tabs its session has and how many
//!   upstream connections the backend sees;
//! - **tabmux** in front of it (the real proxy, configured from a TOML string);
//! - a **page server** that hands the browser a session cookie and the page.
//!
//! Open the page in several tabs of one browser: each shows its own id, the
//! session's tab count rising, and the backend's connection count staying at
//! one.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::{Config, Proxy};

/// The cookie the demo page sets and the demo route keys sessions by.
const COOKIE: &str = "tabmux_demo";

/// A running demo.
pub struct Demo {
    /// Open this in a browser.
    pub page: SocketAddr,
    /// The proxy's tab listener.
    pub proxy: SocketAddr,
    /// The proxy's admin listener (status page, metrics).
    pub admin: SocketAddr,
    /// Upstream connections the demo backend has open right now.
    pub backend_connections: Arc<AtomicUsize>,
}

/// Starts the demo: the page on `page`, the proxy on `proxy`, admin on
/// `admin` (port 0 picks a free port). Serves until the runtime stops.
pub async fn start(page: SocketAddr, proxy: SocketAddr, admin: SocketAddr) -> anyhow::Result<Demo> {
    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo backend")?;
    let backend_addr = backend.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(serve_backend(backend, connections.clone()));

    let page_listener = TcpListener::bind(page)
        .await
        .with_context(|| format!("cannot listen on {page} for the demo page"))?;
    let page = page_listener.local_addr()?;

    let toml = format!(
        r#"
[server]
listen = "{proxy}"
[admin]
listen = "{admin}"
[[route]]
path = "/ws"
upstream = "ws://{backend_addr}/demo"
session_cookie = "{COOKIE}"
allowed_origins = ["http://{page}", "http://localhost:{port}"]
linger = "5s"
"#,
        port = page.port()
    );
    let config = Config::from_toml(&toml, "demo", std::path::Path::new("."))
        .map_err(|e| anyhow::anyhow!("demo configuration: {e}"))?;
    let proxy = Proxy::bind(config).await?;
    let proxy_addr = proxy.local_addr();
    let admin_addr = proxy.admin_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    tokio::spawn(serve_page(page_listener, proxy_addr.port()));
    Ok(Demo {
        page,
        proxy: proxy_addr,
        admin: admin_addr,
        backend_connections: connections,
    })
}

// ------------------------------------------------------------ demo backend

async fn serve_backend(listener: TcpListener, connections: Arc<AtomicUsize>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(backend_connection(stream, connections.clone()));
    }
}

/// One upstream connection = one browser session. Tracks its tabs.
async fn backend_connection(stream: TcpStream, connections: Arc<AtomicUsize>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    connections.fetch_add(1, Ordering::SeqCst);
    let mut tabs = BTreeSet::new();
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let tab = frame["tab"].as_str().unwrap_or_default().to_string();
        let mut out = Vec::new();
        match (frame["event"].as_str(), &frame["data"]) {
            (Some("open"), _) => {
                tabs.insert(tab.clone());
                out.push(json!({"tab": tab, "data": {"type": "welcome", "you": tab}}));
                out.push(count(&tabs, &connections));
            }
            (Some("close"), _) => {
                tabs.remove(&tab);
                out.push(count(&tabs, &connections));
            }
            (None, data) if data["type"] == "ping" => {
                // An id-addressed reply: only the asking tab gets it.
                out.push(json!({"tab": tab, "data": {"type": "pong", "you": tab}}));
            }
            (None, data) if data["type"] == "say" => {
                let text = data["text"].as_str().unwrap_or_default();
                out.push(json!({"data": {"type": "said", "from": tab, "text": text}}));
            }
            _ => {}
        }
        for v in out {
            if ws.feed(Message::text(v.to_string())).await.is_err() {
                break;
            }
        }
        if ws.flush().await.is_err() {
            break;
        }
    }
    connections.fetch_sub(1, Ordering::SeqCst);
}

/// A broadcast of the session's tab count and the backend's connection count.
fn count(tabs: &BTreeSet<String>, connections: &AtomicUsize) -> Value {
    json!({"data": {
        "type": "count",
        "tabs": tabs.len(),
        "upstreams": connections.load(Ordering::SeqCst),
    }})
}

// ------------------------------------------------------------ page server

async fn serve_page(listener: TcpListener, proxy_port: u16) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service = service_fn(move |req| page(req, proxy_port));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn page(
    req: Request<Incoming>,
    proxy_port: u16,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/" {
        return Ok(Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found\n")))
            .unwrap_or_default());
    }
    let has_cookie = crate::upgrade::find_cookie(req.headers(), COOKIE).is_some();
    let html = PAGE.replace("__PROXY_PORT__", &proxy_port.to_string());
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store");
    if !has_cookie {
        // One session per browser: every tab of it sends this cookie.
        let id = random_id();
        response = response.header(
            header::SET_COOKIE,
            format!("{COOKIE}={id}; Path=/; SameSite=Lax; HttpOnly"),
        );
    }
    Ok(response
        .body(Full::new(Bytes::from(html)))
        .unwrap_or_default())
}

/// 128 random bits in hex, for the demo session cookie.
fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // A failing system RNG leaves zeros: harmless for a demo cookie.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    crate::session::hex(&bytes)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tabmux demo</title>
<style>
 body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;color:#222}
 .big{font-size:2.2rem;font-weight:700} .grid{display:grid;grid-template-columns:1fr 1fr 1fr;gap:1rem}
 .card{border:1px solid #ddd;border-radius:.5rem;padding:.8rem} .label{color:#666;font-size:.85rem}
 #log{border:1px solid #eee;height:12rem;overflow:auto;padding:.5rem;font:13px monospace;background:#fafafa;white-space:pre-wrap}
 button,input{font:inherit;padding:.3rem .6rem}
</style></head><body>
<h1>tabmux demo</h1>
<p>Open this page in several tabs of this browser. Every tab has its own WebSocket to tabmux,
but the backend sees <b>one</b> connection for all of them.</p>
<div class="grid">
 <div class="card"><div class="label">this tab</div><div class="big" id="you">…</div></div>
 <div class="card"><div class="label">tabs open in this browser</div><div class="big" id="tabs">…</div></div>
 <div class="card"><div class="label">upstream connections the backend sees</div><div class="big" id="ups">…</div></div>
</div>
<p><button id="ping">Ping (reply to this tab only)</button>
 <input id="text" placeholder="say something to every tab"> <button id="say">Send to all tabs</button></p>
<div id="log"></div>
<script>
const log = (s) => { const d = document.getElementById('log'); d.textContent += s + "\n"; d.scrollTop = d.scrollHeight; };
const ws = new WebSocket(`ws://${location.hostname}:__PROXY_PORT__/ws`);
ws.onopen = () => log('connected');
ws.onclose = (e) => log(`closed (${e.code})`);
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.type === 'welcome') document.getElementById('you').textContent = m.you;
  if (m.type === 'count') { document.getElementById('tabs').textContent = m.tabs; document.getElementById('ups').textContent = m.upstreams; }
  if (m.type === 'pong') log(`pong for ${m.you} (only this tab got it)`);
  if (m.type === 'said') log(`${m.from} says: ${m.text}`);
};
document.getElementById('ping').onclick = () => ws.send(JSON.stringify({type: 'ping'}));
document.getElementById('say').onclick = () => {
  const t = document.getElementById('text'); ws.send(JSON.stringify({type: 'say', text: t.value})); t.value = '';
};
</script></body></html>
"#;
