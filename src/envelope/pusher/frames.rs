//! The frames the `pusher` envelope reads and composes: the fields of a
//! frame's `data`, presence member lists, and the frames tabmux answers
//! with itself (errors, a later tab's subscription, a cache miss, a client
//! event for a sibling tab).

use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{Channel, Presence, Wire};
use crate::envelope::{Effect, Effects, TabId, Target};

/// Every tab of the session.
pub(super) fn broadcast(msg: Message, out: &mut impl Effects) {
    let len = msg.len();
    out.effect(Effect::Deliver {
        to: Target::All,
        msg,
        len,
    });
}

/// The listed tabs, if any.
pub(super) fn deliver(tabs: Vec<TabId>, msg: Message, out: &mut impl Effects) {
    if tabs.is_empty() {
        return;
    }
    let len = msg.len();
    out.effect(Effect::Deliver {
        to: Target::Tabs {
            ids: tabs,
            foreign: 0,
        },
        msg,
        len,
    });
}

/// `pusher:error` to one tab, about its own input.
pub(super) fn error_to(tab: TabId, why: &str) -> Effect {
    let frame = json!({"event": "pusher:error", "data": {"code": null, "message": why}});
    Effect::Answer {
        tab,
        msg: Message::text(frame.to_string()),
    }
}

pub(super) fn unsubscribe_frame(name: &str) -> Message {
    Message::text(json!({"event": "pusher:unsubscribe", "data": {"channel": name}}).to_string())
}

/// A client event as the server delivers it to the other connections on
/// its channel: on a presence channel with the sender's `user_id` (which
/// some compatible servers leave out, so tabmux adds it).
pub(super) fn client_event(wire: &Wire<'_>, me: Option<&str>) -> Message {
    let mut event = serde_json::Map::new();
    event.insert("event".into(), Value::String(wire.event.to_string()));
    if let Some(c) = &wire.channel {
        event.insert("channel".into(), Value::String(c.to_string()));
    }
    if let Some(data) = wire.data {
        let value = serde_json::from_str(data.get()).unwrap_or(Value::Null);
        event.insert("data".into(), value);
    }
    let user_id = match (wire.user_id, me) {
        (Some(raw), _) => serde_json::from_str(raw.get()).ok(),
        (None, Some(me)) => Some(Value::String(me.to_owned())),
        (None, None) => None,
    };
    if let Some(u) = user_id {
        event.insert("user_id".into(), u);
    }
    Message::text(Value::Object(event).to_string())
}

/// What a tab that subscribes to an already subscribed channel is
/// answered: the upstream's own answer, or on a presence channel the
/// members as they stand now.
pub(super) fn succeeded_for_later_tab(name: &str, ch: &Channel) -> Message {
    match (&ch.presence, &ch.succeeded) {
        (Some(p), _) => {
            let data = json!({"presence": {"ids": p.ids, "hash": p.hash, "count": p.ids.len()}});
            let frame = json!({
                "event": "pusher_internal:subscription_succeeded",
                "channel": name,
                "data": data.to_string(),
            });
            Message::text(frame.to_string())
        }
        (None, Some(upstream)) => upstream.clone(),
        (None, None) => Message::text(
            json!({"event": "pusher_internal:subscription_succeeded", "channel": name, "data": "{}"})
                .to_string(),
        ),
    }
}

/// A cache channel's last event, or `pusher:cache_miss`.
pub(super) fn cached_or_miss(name: &str, ch: &Channel) -> Message {
    ch.last_event.clone().unwrap_or_else(|| {
        Message::text(
            json!({"event": "pusher:cache_miss", "channel": name, "data": "{}"}).to_string(),
        )
    })
}

pub(super) fn is_presence(name: &str) -> bool {
    name.starts_with("presence-")
}

pub(super) fn is_cache(name: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// A frame's `data` as an object: given as one (from clients), or as a
/// JSON string holding one (from servers).
pub(super) fn data_object(data: Option<&RawValue>) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(data?.get()).ok()? {
        Value::Object(m) => Some(m),
        Value::String(s) => match serde_json::from_str(&s).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn data_field(data: Option<&RawValue>, field: &str) -> Option<String> {
    match data_object(data)?.remove(field)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

pub(super) fn data_channel(data: Option<&RawValue>) -> Option<String> {
    data_field(data, "channel")
}

/// The `user_id` in a presence subscription's `channel_data`.
pub(super) fn user_id_of(channel_data: &str) -> Option<String> {
    let v: Value = serde_json::from_str(channel_data).ok()?;
    id_of(v.get("user_id")?)
}

/// A member id: a string, or a number as the protocol also allows.
pub(super) fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn members_from(p: &mut Presence, data: &serde_json::Map<String, Value>) {
    let Some(presence) = data.get("presence") else {
        return;
    };
    if let Some(hash) = presence.get("hash").and_then(Value::as_object) {
        p.hash = hash.clone();
    }
    p.ids = match presence.get("ids").and_then(Value::as_array) {
        Some(ids) => ids.iter().filter_map(id_of).collect(),
        None => p.hash.keys().cloned().collect(),
    };
}

pub(super) fn member_added(p: &mut Presence, data: &serde_json::Map<String, Value>) {
    let Some(id) = data.get("user_id").and_then(id_of) else {
        return;
    };
    if !p.ids.contains(&id) {
        p.ids.push(id.clone());
    }
    let info = data.get("user_info").cloned().unwrap_or(Value::Null);
    p.hash.insert(id, info);
}
