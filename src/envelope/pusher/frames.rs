//! The frames the `pusher` envelope reads and composes whatever the
//! feature: the fields of a frame's `data`, deliveries, and the frames
//! tabmux composes itself (an error about a tab's own input, an
//! unsubscribe, a client event for a sibling tab). A feature's own frames
//! are in its file.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::Wire;
use crate::envelope::{Effect, Effects, Refused, TabId};

/// A tab's input refused at the edge: `pusher:error` to that tab alone,
/// with `code` (null when the server's own refusal has none) and `why`,
/// counted by `reason`.
pub(super) fn refuse(tab: TabId, reason: Refused, code: Option<u16>, why: &str, out: &mut Effects) {
    let frame = json!({"event": "pusher:error", "data": {"code": code, "message": why}});
    out.push(Effect::Refused(reason));
    out.push(Effect::Answer {
        tab,
        msg: Message::text(frame.to_string()),
    });
}

pub(super) fn unsubscribe_frame(name: &str) -> Message {
    Message::text(json!({"event": "pusher:unsubscribe", "data": {"channel": name}}).to_string())
}

/// A client event as the server delivers it to the other connections on
/// its channel: on a presence channel with the `user_id` of the session's
/// member there (which some compatible servers leave out, so tabmux adds
/// it). A `user_id` the tab sent is dropped: the tab does not choose whom
/// its siblings see as the sender.
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
    if let Some(me) = me {
        event.insert("user_id".into(), Value::String(me.to_owned()));
    }
    Message::text(Value::Object(event).to_string())
}

/// Whether JSON `text` nests arrays and objects deeper than `max` (a scan
/// of its brackets outside strings, before anything parses it).
pub(super) fn nested_deeper_than(text: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
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

/// A string field of a frame's `data` object, taken out of it.
pub(super) fn take_string(
    data: &mut serde_json::Map<String, Value>,
    field: &str,
) -> Option<String> {
    match data.remove(field)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}
