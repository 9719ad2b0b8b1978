//! The `json` envelope on top of the mock: upstream frames read as JSON
//! values, envelope frames sent, tabs joined by their `open` events.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use super::mock::{Behavior, Upstream};
use super::proxy::TestProxy;
use super::tab::{Tab, TabSpec};

impl Upstream {
    /// Waits until the connection has received `n` frames; returns them as
    /// JSON values.
    pub async fn json(&self, n: usize) -> Vec<serde_json::Value> {
        self.wait(&format!("{n} frames"), |c| {
            (c.frames.len() >= n).then(|| c.frames.iter().map(to_json).collect())
        })
        .await
    }

    /// Waits for a frame matching `pred`; returns it.
    pub async fn find(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait(what, |c| c.frames.iter().map(to_json).find(|v| pred(v)))
            .await
    }

    /// A frame matching `pred`, if one has arrived (no waiting).
    pub fn try_find(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.now(|c| c.frames.iter().map(to_json).find(|v| pred(v)))
            .flatten()
    }

    /// Waits for the `nth` open event (from 0).
    pub async fn nth_open(&self, nth: usize) -> serde_json::Value {
        self.wait(&format!("open event #{nth}"), |c| {
            c.frames
                .iter()
                .map(to_json)
                .filter(|v| v["event"] == "open")
                .nth(nth)
        })
        .await
    }

    /// Sends a JSON text frame to tabmux.
    pub fn send_json(&self, v: serde_json::Value) {
        self.send(Message::text(v.to_string()));
    }

    /// Opens a tab and waits for its `open` event on this connection (the
    /// next one no earlier `join` claimed); returns the tab and its id.
    pub async fn join(&self, proxy: &TestProxy, spec: &TabSpec) -> (Tab, String) {
        let tab = spec.connect(proxy).await;
        let nth = self.wait("the connection", |c| Some(c.claimed)).await;
        let open = self.nth_open(nth).await;
        self.now(|c| c.claimed += 1);
        (tab, open["tab"].as_str().unwrap().to_string())
    }
}

/// A frame as JSON; panics on anything but a JSON text frame.
pub fn to_json(m: &Message) -> serde_json::Value {
    match m {
        Message::Text(t) => serde_json::from_str(t.as_str())
            .unwrap_or_else(|e| panic!("upstream frame is not JSON ({e}): {t}")),
        other => panic!("expected a text frame upstream, got {other:?}"),
    }
}

/// A backend that sends every tab's `data` back to that tab, keeping no
/// record of frames (for long runs).
pub fn echo() -> Behavior {
    Behavior {
        reply: Some(Arc::new(echo_reply)),
        forget: true,
        ..Default::default()
    }
}

/// The echo of a tab's data frame: the same data, back to that tab.
fn echo_reply(m: &Message) -> Option<Message> {
    let v: serde_json::Value = serde_json::from_str(m.to_text().ok()?).ok()?;
    let data = v.get("data")?;
    let reply = serde_json::json!({"tab": v.get("tab")?, "data": data});
    Some(Message::text(reply.to_string()))
}
