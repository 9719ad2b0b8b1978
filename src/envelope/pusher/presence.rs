//! Presence channels (`presence-…`): each keeps the member list the
//! upstream gave and then updated, so that a later tab is answered with the
//! members as they stand (not the list of when the first tab subscribed),
//! and the session's own user id, which client events delivered to sibling
//! tabs carry as the sender's.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::frames::data_object;
use super::Pusher;
use crate::envelope::Effects;

/// A presence channel's member list, as the upstream gave it and updated it.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// Member ids in the order they came.
    ids: Vec<String>,
    /// Member id → user info.
    hash: serde_json::Map<String, Value>,
    /// The session's own user id (from the first subscribe's
    /// `channel_data`), added to client events delivered to sibling tabs.
    pub me: Option<String>,
    /// What `ids` and `hash` keep, in bytes (kept as they change).
    members_bytes: usize,
}

/// What a member keeps, in bytes: its id (twice: in `ids` and as a key)
/// and its user info.
fn member_bytes(id: &str, info: &Value) -> usize {
    2 * (id.len() + std::mem::size_of::<String>()) + value_bytes(info)
}

/// What a JSON value keeps in memory, in bytes (close enough for the
/// buffer budget: its nodes and its strings).
fn value_bytes(v: &Value) -> usize {
    std::mem::size_of::<Value>()
        + match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(value_bytes).sum(),
            Value::Object(o) => o
                .iter()
                .map(|(k, v)| k.len() + std::mem::size_of::<String>() + value_bytes(v))
                .sum(),
            _ => 0,
        }
}

pub(super) fn is_presence(name: &str) -> bool {
    name.starts_with("presence-")
}

impl Presence {
    /// The state of a presence channel whose first subscribe carried
    /// `channel_data`.
    pub fn new(channel_data: Option<&str>) -> Presence {
        Presence {
            me: channel_data.and_then(user_id_of),
            ..Presence::default()
        }
    }

    /// The members, from the upstream's `subscription_succeeded`.
    pub fn members_from(&mut self, data: Option<&RawValue>) {
        let Some(data) = data_object(data) else {
            return;
        };
        let Some(presence) = data.get("presence") else {
            return;
        };
        if let Some(hash) = presence.get("hash").and_then(Value::as_object) {
            self.hash = hash.clone();
        }
        self.ids = match presence.get("ids").and_then(Value::as_array) {
            Some(ids) => ids.iter().filter_map(id_of).collect(),
            None => self.hash.keys().cloned().collect(),
        };
        self.members_bytes = self.hash.iter().map(|(id, v)| member_bytes(id, v)).sum();
    }

    /// What the channel's presence state keeps, in bytes.
    pub fn bytes(&self) -> usize {
        self.members_bytes + self.me.as_ref().map_or(0, String::len)
    }

    fn added(&mut self, data: &serde_json::Map<String, Value>) {
        let Some(id) = data.get("user_id").and_then(id_of) else {
            return;
        };
        if !self.ids.contains(&id) {
            self.ids.push(id.clone());
        }
        let info = data.get("user_info").cloned().unwrap_or(Value::Null);
        self.members_bytes += member_bytes(&id, &info);
        if let Some(old) = self.hash.insert(id.clone(), info) {
            self.members_bytes = self.members_bytes.saturating_sub(member_bytes(&id, &old));
        }
    }

    fn removed(&mut self, data: &serde_json::Map<String, Value>) {
        if let Some(id) = data.get("user_id").and_then(id_of) {
            self.ids.retain(|i| *i != id);
            if let Some(old) = self.hash.remove(&id) {
                self.members_bytes = self.members_bytes.saturating_sub(member_bytes(&id, &old));
            }
        }
    }

    /// What a tab that subscribes later is answered: the members as they
    /// stand now.
    pub fn succeeded(&self, name: &str) -> Message {
        let data =
            json!({"presence": {"ids": self.ids, "hash": self.hash, "count": self.ids.len()}});
        let frame = json!({
            "event": "pusher_internal:subscription_succeeded",
            "channel": name,
            "data": data.to_string(),
        });
        Message::text(frame.to_string())
    }
}

impl Pusher {
    /// `pusher_internal:member_added` (`added`) or `member_removed`: the
    /// channel's list is kept current, and the event reaches its tabs.
    pub(super) fn member_event(
        &mut self,
        name: &str,
        added: bool,
        msg: Message,
        data: Option<&RawValue>,
        out: &mut Effects,
    ) {
        let presence = self
            .channels
            .get_mut(name)
            .and_then(|ch| ch.presence.as_mut());
        if let (Some(p), Some(d)) = (presence, data_object(data)) {
            if added {
                p.added(&d);
            } else {
                p.removed(&d);
            }
        }
        self.channel_event(name, msg, out);
    }
}

/// The `user_id` in a presence subscription's `channel_data`.
fn user_id_of(channel_data: &str) -> Option<String> {
    let v: Value = serde_json::from_str(channel_data).ok()?;
    id_of(v.get("user_id")?)
}

/// A member id: a string, or a number as the protocol also allows.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
