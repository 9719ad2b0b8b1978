//! A real Pusher-protocol server for the tests: sockudo (crates.io,
//! `cargo install sockudo --version 5.2.0`; `.ci/run` installs it), started
//! by the test on free loopback ports with one app, and its REST API
//! (signed as Pusher's HTTP API is) and Prometheus metrics.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use md5::Digest as _;
use tokio::net::TcpStream;

use super::guard;
use super::pusher::APP_KEY;

pub const APP_ID: &str = "app-id";
pub const APP_SECRET: &str = "app-secret";

/// A running sockudo; dropping it stops it.
pub struct Sockudo {
    child: Child,
    /// Where it serves WebSockets and its REST API.
    pub addr: SocketAddr,
    metrics: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The sockudo binary: `SOCKUDO_BIN`, or `sockudo` on the PATH (cargo's
/// bin directory included).
fn binary() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("SOCKUDO_BIN") {
        return bin.into();
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin").join("sockudo"));
    match cargo_bin {
        Some(path) if path.exists() => path,
        _ => "sockudo".into(),
    }
}

/// Waits until something accepts connections at `addr`.
async fn accepting(addr: SocketAddr, what: &str) {
    guard(what, async {
        while TcpStream::connect(addr).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await
}

impl Sockudo {
    pub async fn start() -> Sockudo {
        Sockudo::start_with(&[]).await
    }

    /// Started with more environment settings (`env`, after the others).
    pub async fn start_with(env: &[(&str, &str)]) -> Sockudo {
        let (port, metrics_port) = (free_port(), free_port());
        let child = Command::new(binary())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("METRICS_ENABLED", "true")
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", metrics_port.to_string())
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
            .env("SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES", "true")
            .env("SOCKUDO_DEFAULT_APP_ENABLE_USER_AUTHENTICATION", "true")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start sockudo ({}): {e}", binary().display()));
        let sockudo = Sockudo {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        };
        accepting(sockudo.addr, "sockudo to listen").await;
        accepting(sockudo.metrics, "sockudo's metrics to listen").await;
        sockudo
    }

    /// The app's WebSocket URL, for a route's `upstream`.
    pub fn url(&self) -> String {
        format!("ws://{}/app/{APP_KEY}", self.addr)
    }

    /// Pusher connections open, by sockudo's own count (`sockudo_connected`).
    pub async fn connections(&self) -> f64 {
        let (_, body) = super::admin_get(self.metrics, "/metrics").await;
        body.lines()
            .filter(|l| l.starts_with("sockudo_connected"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until sockudo counts `n` connections.
    pub async fn wait_connections(&self, n: f64) {
        guard(&format!("sockudo to count {n} connections"), async {
            while self.connections().await != n {
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// Triggers `event` on `channel` through the REST API, as a backend
    /// does; returns the HTTP status.
    pub async fn trigger(&self, channel: &str, event: &str, data: &str) -> u16 {
        let body =
            serde_json::json!({"name": event, "channels": [channel], "data": data}).to_string();
        self.post(&format!("/apps/{APP_ID}/events"), &body).await
    }

    /// A signed POST of `body` (JSON) to the REST API; its HTTP status.
    async fn post(&self, path: &str, body: &str) -> u16 {
        let body_md5 = hex(&md5::Md5::digest(body.as_bytes()));
        let query = signed("POST", path, &[("body_md5", body_md5)]);
        let request = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        super::raw_http(self.addr, &request).await.0
    }

    /// Terminates every connection of user `user` through the REST API, as
    /// a backend does (a signed-in user's "log out everywhere"); returns
    /// the HTTP status.
    pub async fn terminate_user(&self, user: &str) -> u16 {
        let path = format!("/apps/{APP_ID}/users/{user}/terminate_connections");
        self.post(&path, "{}").await
    }

    /// Whether `channel` is occupied (has a subscriber), by the REST API.
    pub async fn occupied(&self, channel: &str) -> bool {
        let path = format!("/apps/{APP_ID}/channels/{channel}");
        let query = signed("GET", &path, &[]);
        let request = format!(
            "GET {path}?{query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        let (status, body) = super::raw_http(self.addr, &request).await;
        assert_eq!(status, 200, "{body}");
        body.contains(r#""occupied":true"#)
    }
}

impl Drop for Sockudo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The query string of a signed Pusher HTTP API request.
fn signed(method: &str, path: &str, extra: &[(&str, String)]) -> String {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut params: Vec<(String, String)> = vec![
        ("auth_key".into(), APP_KEY.into()),
        ("auth_timestamp".into(), timestamp.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    params.sort();
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let query = query.join("&");
    let signature = hmac_hex(&format!("{method}\n{path}\n{query}"));
    format!("{query}&auth_signature={signature}")
}

/// A private or presence channel's `auth` for `socket_id`, as an app
/// server's authorization endpoint signs it.
pub fn channel_auth(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    let mut to_sign = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        to_sign.push(':');
        to_sign.push_str(data);
    }
    format!("{APP_KEY}:{}", hmac_hex(&to_sign))
}

/// A `pusher:signin`'s `auth` for `socket_id` and `user_data`, as an app
/// server's user authentication endpoint signs it.
pub fn user_auth(socket_id: &str, user_data: &str) -> String {
    format!(
        "{APP_KEY}:{}",
        hmac_hex(&format!("{socket_id}::user::{user_data}"))
    )
}

fn hmac_hex(message: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, APP_SECRET.as_bytes());
    hex(ring::hmac::sign(&key, message.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
