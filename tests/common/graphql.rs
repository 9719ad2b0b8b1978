//! A real GraphQL over WebSocket server for the tests (tests/graphql/server.mjs:
//! graphql-ws on `/graphql`, subscriptions-transport-ws on `/legacy`, on the
//! machine's Node.js; `npm ci` in tests/graphql installs them, and `.ci/run`
//! does), started by the test on a free loopback port; and the frames a
//! GraphQL client sends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use super::{guard, raw_http, Tab, TabSpec, TestProxy};

/// The subprotocols.
pub const MODERN: &str = "graphql-transport-ws";
pub const LEGACY: &str = "graphql-ws";

/// A running server; dropping it stops it.
pub struct GraphqlServer {
    child: Child,
    pub addr: SocketAddr,
}

impl GraphqlServer {
    pub async fn start() -> GraphqlServer {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/graphql");
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (tests/graphql needs Node.js and `npm ci`)");
        let stdout = child.stdout.take().expect("its stdout");
        let port = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).ok()?;
            line.trim().strip_prefix("listening ")?.parse::<u16>().ok()
        });
        let port = guard("the GraphQL server to listen", port)
            .await
            .expect("the reader")
            .expect("`listening <port>` (run `npm ci` in tests/graphql)");
        GraphqlServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// `ws://…/graphql` (graphql-ws) or `ws://…/legacy`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// What the server holds and has sent (its `/stats`).
    pub async fn stats(&self) -> Value {
        let (_, body) = raw_http(
            self.addr,
            "GET /stats HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// Waits until `check` holds for the server's stats.
    pub async fn wait(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        guard(what, async {
            loop {
                let stats = self.stats().await;
                if check(&stats) {
                    return stats;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// Publishes `text` on the `ticks` event stream.
    pub async fn publish(&self, text: &str) {
        let request = format!(
            "POST /publish?text={text} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let (status, _) = raw_http(self.addr, &request).await;
        assert_eq!(status, 200);
    }
}

impl Drop for GraphqlServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tab of browser `session` on `path`, offering `protocol`.
pub fn gql_tab(session: &str, path: &str, protocol: &str) -> TabSpec {
    TabSpec::new(session)
        .path(path)
        .header("sec-websocket-protocol", protocol)
}

/// A tab connected and past its `connection_ack` (init `payload`).
pub async fn acked(spec: &TabSpec, proxy: &TestProxy, payload: Value) -> Tab {
    let mut tab = spec.connect(proxy).await;
    tab.send_json(json!({"type": "connection_init", "payload": payload}))
        .await;
    let ack = tab.recv_json().await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    tab
}

pub fn subscribe(id: &str, query: &str) -> Value {
    json!({"id": id, "type": "subscribe", "payload": {"query": query}})
}

pub fn start(id: &str, query: &str) -> Value {
    json!({"id": id, "type": "start", "payload": {"query": query}})
}

impl Tab {
    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Frames until one of type `kind` (legacy keep-alives skipped); it.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv_json().await;
            if v["type"] == kind {
                return v;
            }
            assert_eq!(v["type"], "ka", "waiting for {kind}: {v}");
        }
    }

    /// The next frame that is not a legacy keep-alive.
    pub async fn recv_op(&mut self) -> Value {
        loop {
            let v = self.recv_json().await;
            if v["type"] != "ka" {
                return v;
            }
        }
    }
}
