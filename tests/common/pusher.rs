//! The Pusher Channels protocol on top of the mock: a backend that greets
//! like a Pusher server and answers subscribes and pings, and tabs that
//! speak Pusher as pusher-js does.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::mock::{Behavior, Upstream};
use super::tab::{Tab, TabSpec};

/// The app key of the Pusher routes in tests.
pub const APP_KEY: &str = "app-key";

/// The socket id the mock server gives its (one) connection.
pub const SOCKET_ID: &str = "1234.5678";

/// The path pusher-js connects to, with its query.
pub fn pusher_path() -> String {
    format!("/app/{APP_KEY}?protocol=7&client=js&version=8.4.0&flash=false")
}

/// A tab of session `session` on the Pusher route.
pub fn pusher_tab(session: &str) -> TabSpec {
    TabSpec::new(session).path(&pusher_path())
}

/// The mock server's greeting.
pub fn established() -> String {
    let data = json!({"socket_id": SOCKET_ID, "activity_timeout": 120}).to_string();
    json!({"event": "pusher:connection_established", "data": data}).to_string()
}

/// A backend that greets like a Pusher server announcing `activity_timeout`
/// seconds, then answers nothing.
pub fn quiet_server(activity_timeout: u64) -> Behavior {
    let data = json!({"socket_id": SOCKET_ID, "activity_timeout": activity_timeout}).to_string();
    let greeting = json!({"event": "pusher:connection_established", "data": data});
    Behavior {
        greeting: vec![Message::text(greeting.to_string())],
        ..Default::default()
    }
}

/// A backend that greets like a Pusher server, confirms every subscribe
/// (a presence channel with the subscriber as its one member) and answers
/// pings, as sockudo does.
pub fn pusher_server() -> Behavior {
    Behavior {
        greeting: vec![Message::text(established())],
        reply: Some(Arc::new(pusher_reply)),
        ..Default::default()
    }
}

pub fn pusher_reply(m: &Message) -> Option<Message> {
    let v: Value = serde_json::from_str(m.to_text().ok()?).ok()?;
    match v["event"].as_str()? {
        "pusher:ping" => Some(Message::text(r#"{"event":"pusher:pong","data":{}}"#)),
        "pusher:subscribe" => {
            let channel = v["data"]["channel"].as_str()?;
            let data = if channel.starts_with("presence-") {
                let me: Value = serde_json::from_str(v["data"]["channel_data"].as_str()?).ok()?;
                let id = me["user_id"].clone();
                let hash = json!({ id.as_str()?: me["user_info"] });
                json!({"presence": {"ids": [id], "hash": hash, "count": 1}}).to_string()
            } else {
                "{}".to_string()
            };
            let ok = json!({"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": data});
            Some(Message::text(ok.to_string()))
        }
        _ => None,
    }
}

/// `pusher:subscribe` as pusher-js sends it.
pub fn subscribe(channel: &str) -> String {
    json!({"event": "pusher:subscribe", "data": {"auth": "", "channel": channel}}).to_string()
}

/// `pusher:unsubscribe` as pusher-js sends it.
pub fn unsubscribe(channel: &str) -> String {
    json!({"event": "pusher:unsubscribe", "data": {"channel": channel}}).to_string()
}

/// An event on `channel` as a Pusher server sends it.
pub fn event(channel: &str, name: &str, data: Value) -> Message {
    let frame = json!({"event": name, "channel": channel, "data": data.to_string()});
    Message::text(frame.to_string())
}

impl Tab {
    /// The next Pusher event this tab receives, as JSON.
    pub async fn recv_event(&mut self) -> Value {
        self.recv_json().await
    }

    /// Receives events until one named `name`; returns it.
    pub async fn recv_until(&mut self, name: &str) -> Value {
        loop {
            let v = self.recv_event().await;
            if v["event"] == name {
                return v;
            }
        }
    }
}

impl Upstream {
    /// Waits until the server has received an event named `name`.
    pub async fn wait_event(&self, name: &str) {
        self.wait(&format!("a {name} at the server"), |c| {
            c.frames
                .iter()
                .filter_map(|m| serde_json::from_str::<Value>(m.to_text().ok()?).ok())
                .any(|v| v["event"] == name)
                .then_some(())
        })
        .await
    }

    /// The Pusher events the server received so far named `name`.
    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.now(|c| {
            c.frames
                .iter()
                .filter_map(|m| serde_json::from_str::<Value>(m.to_text().ok()?).ok())
                .filter(|v| v["event"] == name)
                .collect()
        })
        .unwrap_or_default()
    }
}
