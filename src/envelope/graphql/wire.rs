//! The frames of GraphQL over WebSocket as tabmux reads and composes them:
//! a frame's `type`, `id` and `payload` (the payload left as raw JSON, so
//! that what passes through is never re-encoded), checked as graphql-ws's
//! message validation checks them, and the frames tabmux composes with an
//! id of its own choosing.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::Subprotocol;

/// A frame's fields, borrowed from its text.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// A frame read: its type, its id (a string, if it has one), its payload
/// (raw JSON, `None` when absent).
#[derive(Debug)]
pub struct Frame<'a> {
    pub kind: String,
    pub id: Option<String>,
    pub payload: Option<&'a RawValue>,
}

/// Reads a frame's `type`, `id` and `payload`; an error says what is wrong
/// (in the words of graphql-ws's validation, for a 4400 close's reason).
pub fn read(text: &str) -> Result<Frame<'_>, String> {
    let fields: Fields<'_> = serde_json::from_str(text)
        .map_err(|_| "Invalid message received: not a JSON object".to_string())?;
    let Some(kind) = fields.kind else {
        return Err("Message is missing the 'type' property".into());
    };
    let kind: String = serde_json::from_str(kind.get())
        .map_err(|_| "Message expects the 'type' property to be a string".to_string())?;
    let id =
        match fields.id {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str::<String>(raw.get()).map_err(|_| {
                format!("\"{kind}\" message expects the 'id' property to be a string")
            })?),
        };
    let payload = fields.payload.filter(|p| p.get() != "null");
    Ok(Frame { kind, id, payload })
}

/// Whether raw JSON is an object.
pub fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// The id an operation's frame must carry: present and not empty.
pub fn required_id(frame: &Frame<'_>) -> Result<String, String> {
    match &frame.id {
        Some(id) if !id.is_empty() => Ok(id.clone()),
        Some(_) => Err(format!(
            "\"{}\" message requires a non-empty 'id' property",
            frame.kind
        )),
        None => Err(format!(
            "\"{}\" message expects the 'id' property to be a string",
            frame.kind
        )),
    }
}

/// The fields of an operation's payload that name it: equal payloads (as
/// JSON values) are one operation.
#[derive(Deserialize)]
pub struct Request<'a> {
    #[serde(borrow, default)]
    pub query: Option<&'a RawValue>,
    #[serde(rename = "operationName", borrow, default)]
    pub operation_name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub variables: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub extensions: Option<&'a RawValue>,
}

/// An operation's request, checked as graphql-ws checks a `subscribe`:
/// its query and operation name, and its fields as they came (for
/// [`share_key`]).
pub struct Checked<'a> {
    pub query: String,
    pub operation_name: Option<String>,
    pub request: Request<'a>,
}

/// Checks a `subscribe` (legacy: `start`) payload.
pub fn check_request<'a>(kind: &str, payload: Option<&'a RawValue>) -> Result<Checked<'a>, String> {
    let Some(payload) = payload.filter(|p| is_object(p)) else {
        return Err(format!(
            "\"{kind}\" message expects the 'payload' property to be an object"
        ));
    };
    let req: Request<'_> = serde_json::from_str(payload.get())
        .map_err(|_| format!("\"{kind}\" message payload is not a JSON object"))?;
    let query = req
        .query
        .and_then(|q| serde_json::from_str::<String>(q.get()).ok())
        .ok_or_else(|| {
            format!("\"{kind}\" message payload expects the 'query' property to be a string")
        })?;
    let nullish_or = |raw: Option<&RawValue>, ok: fn(&str) -> bool| {
        raw.is_none_or(|r| r.get() == "null" || ok(r.get()))
    };
    if !nullish_or(req.variables, |r| r.starts_with('{')) {
        return Err(format!(
            "\"{kind}\" message payload expects the 'variables' property to be an object or nullish or missing"
        ));
    }
    if !nullish_or(req.extensions, |r| r.starts_with('{')) {
        return Err(format!(
            "\"{kind}\" message payload expects the 'extensions' property to be an object or nullish or missing"
        ));
    }
    if !nullish_or(req.operation_name, |r| r.starts_with('"')) {
        return Err(format!(
            "\"{kind}\" message payload expects the 'operationName' property to be a string or nullish or missing"
        ));
    }
    let operation_name = req
        .operation_name
        .and_then(|n| serde_json::from_str::<String>(n.get()).ok());
    Ok(Checked {
        query,
        operation_name,
        request: req,
    })
}

/// The identity of an operation's payload, for sharing: its `query`,
/// `operationName`, `variables` and `extensions` as canonical JSON (keys
/// sorted, no spacing; a missing field is `null`, as graphql-ws takes it).
pub fn share_key(req: &Request<'_>) -> Option<String> {
    let mut out = String::new();
    for field in [req.query, req.operation_name, req.variables, req.extensions] {
        let value: Value = match field {
            Some(raw) => serde_json::from_str(raw.get()).ok()?,
            None => Value::Null,
        };
        canonical(&value, &mut out);
        out.push('\u{1}');
    }
    Some(out)
}

/// Writes `v` as canonical JSON: object keys sorted, no spacing. Two
/// values equal as JSON values write the same text.
pub fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (n, k) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A frame with an id and a payload, as tabmux composes it: `{"id":…,
/// "type":…,"payload":…}` with the payload's raw JSON unchanged.
pub fn with_id(kind: &str, id: &str, payload: Option<&str>) -> Message {
    let id = Value::String(id.to_owned()).to_string();
    let mut s = String::with_capacity(id.len() + kind.len() + payload.map_or(0, str::len) + 32);
    s.push_str("{\"id\":");
    s.push_str(&id);
    s.push_str(",\"type\":\"");
    s.push_str(kind);
    s.push('"');
    if let Some(p) = payload {
        s.push_str(",\"payload\":");
        s.push_str(p);
    }
    s.push('}');
    Message::text(s)
}

/// A frame without an id: `{"type":…}`, with its payload if any.
pub fn without_id(kind: &str, payload: Option<&str>) -> Message {
    Message::text(match payload {
        Some(p) => format!("{{\"type\":\"{kind}\",\"payload\":{p}}}"),
        None => format!("{{\"type\":\"{kind}\"}}"),
    })
}

/// What the subprotocol calls a frame type.
pub struct Words {
    /// Starts an operation.
    pub start: &'static str,
    /// Stops one (from a tab).
    pub stop: &'static str,
    /// A result.
    pub next: &'static str,
}

impl Subprotocol {
    pub fn words(self) -> Words {
        match self {
            Subprotocol::TransportWs => Words {
                start: "subscribe",
                stop: "complete",
                next: "next",
            },
            Subprotocol::Legacy => Words {
                start: "start",
                stop: "stop",
                next: "data",
            },
        }
    }
}

/// The legacy subprotocol's answer to a frame it refuses: an `error` for
/// the operation, as subscriptions-transport-ws sends it.
pub fn legacy_error(id: Option<&str>, message: &str) -> Message {
    let payload = serde_json::json!({ "message": message }).to_string();
    match id {
        Some(id) => with_id("error", id, Some(&payload)),
        None => without_id("error", Some(&payload)),
    }
}
