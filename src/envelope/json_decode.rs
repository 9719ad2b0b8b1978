//! The `json/1` envelope's decoder: one backend frame in, a
//! [`BackendFrame`] or a [`FrameError`] saying why it was refused out. Pure
//! functions over bytes, fuzzed (`fuzz/fuzz_targets/envelope.rs`).
//!
//! A payload the backend sends is returned as a slice of the frame's own
//! buffer ([`Bytes::slice_ref`]) whenever it can be, so decoding copies
//! nothing and the one buffer is shared by every tab it fans out to.

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{TabId, Target, Utf8Bytes};
use crate::config::Payload;

/// Whether `s` has the syntax docs/protocol.md gives tab ids: 1 to 32 characters
/// from `[A-Za-z0-9_-]`.
pub fn is_valid_tab_id(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A message to deliver to tabs. Cloning it clones a reference, not the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Body {
    /// Payload size in bytes, compared with the route's `max_message_size`.
    pub fn len(&self) -> usize {
        match self {
            Body::Text(t) => t.len(),
            Body::Binary(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decoded upstream frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendFrame {
    Deliver {
        to: Target,
        body: Body,
    },
    Close {
        to: Target,
        code: u16,
        reason: String,
    },
}

/// Why an upstream frame was dropped. [`FrameError::label`] is the metric
/// label; `Display` is the log message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not valid JSON")]
    NotJson,
    #[error("not a JSON object")]
    NotObject,
    #[error("a binary frame (the json envelope carries text frames only)")]
    Binary,
    #[error("`tab` is not a tab id or a list of tab ids")]
    BadTab,
    #[error("no `data`, `data_b64` or `event`")]
    NoPayload,
    #[error("more than one of `data`, `data_b64` and `event`")]
    Ambiguous,
    #[error("unknown `event` (only \"close\" is accepted from the backend)")]
    UnknownEvent,
    #[error("a close event needs `tab`")]
    CloseWithoutTab,
    #[error("close `code` must be 1000 or 3000-4999")]
    BadCloseCode,
    #[error("`data_b64` is not standard padded base64")]
    BadBase64,
    #[error("a field appears twice or has the wrong type")]
    BadField,
}

impl FrameError {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::NotJson => "not_json",
            FrameError::NotObject => "not_object",
            FrameError::Binary => "binary",
            FrameError::BadTab => "bad_tab",
            FrameError::NoPayload => "no_payload",
            FrameError::Ambiguous => "ambiguous",
            FrameError::UnknownEvent => "unknown_event",
            FrameError::CloseWithoutTab => "close_without_tab",
            FrameError::BadCloseCode => "bad_close_code",
            FrameError::BadBase64 => "bad_base64",
            FrameError::BadField => "bad_field",
        }
    }
}

/// The fields tabmux reads; anything else the backend adds is ignored.
/// `tab` and `data` are kept raw so `data: null` is still a payload and a
/// payload is never re-serialised.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    tab: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data_b64: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "raw")]
    code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

fn raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes one upstream text frame. Payloads returned share its buffer
/// where possible.
pub fn decode(frame: &Utf8Bytes, payload: Payload) -> Result<BackendFrame, FrameError> {
    if let Some(decoded) = decode_common(frame, payload) {
        return decoded;
    }
    decode_any(frame, payload)
}

/// The frame backends send most, `{"tab":"t<digits>","data":<value>}`
/// written exactly so (no spaces outside the value), decoded by position:
/// only the value is parsed (to validate it). Whatever does not match, or
/// does not validate, is left to [`decode_any`], so both give the same
/// result for every frame (a property test checks it). Routing every
/// upstream frame through serde's field matching cost about as much as
/// everything else tabmux does with it. The frame is sliced as text (its
/// UTF-8 was checked when it was read), at ASCII boundaries.
fn decode_common(frame: &Utf8Bytes, payload: Payload) -> Option<Result<BackendFrame, FrameError>> {
    const HEAD: &str = "{\"tab\":\"t";
    const MIDDLE: &str = "\",\"data\":";
    let text = frame.as_str();
    let rest = text.strip_prefix(HEAD)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let data = rest[digits..].strip_prefix(MIDDLE)?.strip_suffix('}')?;
    let (first, last) = (data.bytes().next()?, data.bytes().next_back()?);
    if first.is_ascii_whitespace() || last.is_ascii_whitespace() {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(data).ok()?;
    // The name is the "t" and the digits between the quotes: no JSON string
    // to parse.
    let name = &text[HEAD.len() - 1..HEAD.len() + digits];
    let to = target_of(std::iter::once(name));
    Some(to.and_then(|to| {
        Ok(BackendFrame::Deliver {
            to,
            body: Body::Text(text_body(frame.as_ref(), data, payload)?),
        })
    }))
}

/// Any upstream frame, through serde.
fn decode_any(frame: &Utf8Bytes, payload: Payload) -> Result<BackendFrame, FrameError> {
    let text = frame.as_str();
    let first = text.bytes().find(|b| !b.is_ascii_whitespace());
    if first != Some(b'{') {
        // serde would accept a JSON array as a struct, so check first.
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(FrameError::NotObject),
            Err(_) => Err(FrameError::NotJson),
        };
    }
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            FrameError::BadField
        } else {
            FrameError::NotJson
        }
    })?;
    let to = match wire.tab {
        None => Target::All,
        Some(raw) => parse_target(raw.get())?,
    };
    match (wire.data, wire.data_b64, wire.event) {
        (Some(data), None, None) => Ok(BackendFrame::Deliver {
            to,
            body: Body::Text(text_body(frame.as_ref(), data.get(), payload)?),
        }),
        (None, Some(b64), None) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| FrameError::BadBase64)?;
            Ok(BackendFrame::Deliver {
                to,
                body: Body::Binary(Bytes::from(bytes)),
            })
        }
        (None, None, Some(event)) => {
            if event != "close" {
                return Err(FrameError::UnknownEvent);
            }
            if to == Target::All {
                return Err(FrameError::CloseWithoutTab);
            }
            let code = match wire.code {
                None => 1000,
                Some(raw) => raw
                    .get()
                    .parse::<u16>()
                    .map_err(|_| FrameError::BadCloseCode)?,
            };
            if !(code == 1000 || (3000..=4999).contains(&code)) {
                return Err(FrameError::BadCloseCode);
            }
            let reason =
                crate::cause::close_reason(wire.reason.map(Cow::into_owned).unwrap_or_default());
            Ok(BackendFrame::Close { to, code, reason })
        }
        (None, None, None) => Err(FrameError::NoPayload),
        _ => Err(FrameError::Ambiguous),
    }
}

fn parse_target(raw: &str) -> Result<Target, FrameError> {
    let names: Vec<Cow<'_, str>> = if raw.starts_with('[') {
        serde_json::from_str(raw).map_err(|_| FrameError::BadTab)?
    } else {
        vec![serde_json::from_str(raw).map_err(|_| FrameError::BadTab)?]
    };
    target_of(names.iter().map(|n| n.as_ref()))
}

/// The tabs a list of names addresses: ids tabmux could have assigned, once
/// each; well-formed names it could not have are counted as foreign.
fn target_of<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Result<Target, FrameError> {
    let mut ids = Vec::with_capacity(names.len());
    let mut foreign = 0;
    for name in names {
        if !is_valid_tab_id(name) {
            return Err(FrameError::BadTab);
        }
        match TabId::parse(name) {
            Some(id) => ids.push(id),
            None => foreign += 1,
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(Target::Tabs { ids, foreign })
}

/// The text a tab receives for payload `data` (its raw JSON text in `frame`).
fn text_body(frame: &Bytes, data: &str, payload: Payload) -> Result<Utf8Bytes, FrameError> {
    let bytes = if payload == Payload::Text && data.starts_with('"') {
        // A JSON string is delivered as the string itself. When it has no
        // escapes, that is the bytes between the quotes: share them.
        let inner = &data[1..data.len() - 1];
        if inner.contains('\\') {
            let s: String = serde_json::from_str(data).map_err(|_| FrameError::NotJson)?;
            Bytes::from(s)
        } else {
            frame.slice_ref(inner.as_bytes())
        }
    } else {
        frame.slice_ref(data.as_bytes())
    };
    // Slices of valid UTF-8 at JSON token boundaries are valid UTF-8; this
    // checks it once per frame, not once per tab.
    Utf8Bytes::try_from(bytes).map_err(|_| FrameError::NotJson)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::json::{data_binary, data_text};

    fn dec(s: &str) -> Result<BackendFrame, FrameError> {
        decode(&s.into(), Payload::Json)
    }

    fn text(s: &str) -> Body {
        Body::Text(s.into())
    }

    fn tabs(ids: &[u64]) -> Target {
        Target::Tabs {
            ids: ids.iter().map(|&n| TabId(n)).collect(),
            foreign: 0,
        }
    }

    #[test]
    fn tab_ids_round_trip_and_reject_lookalikes() {
        assert_eq!(TabId(7).to_string(), "t7");
        assert_eq!(TabId::parse("t7"), Some(TabId(7)));
        for s in [
            "t0",
            "t07",
            "t",
            "x7",
            "T7",
            "t7a",
            "t-1",
            "t99999999999999999999999",
        ] {
            assert_eq!(TabId::parse(s), None, "{s}");
        }
        assert!(is_valid_tab_id("abc_DEF-123"));
        assert!(!is_valid_tab_id(""));
        assert!(!is_valid_tab_id(&"a".repeat(33)));
        assert!(!is_valid_tab_id("t 7"));
    }

    #[test]
    fn unicast_multicast_broadcast() {
        assert_eq!(
            dec(r#"{"tab":"t7","data":{"x":[1, 2]}}"#),
            Ok(BackendFrame::Deliver {
                to: tabs(&[7]),
                body: text(r#"{"x":[1, 2]}"#)
            })
        );
        assert_eq!(
            dec(r#"{"tab":["t9","t7","t9"],"data":1}"#),
            Ok(BackendFrame::Deliver {
                to: tabs(&[7, 9]),
                body: text("1")
            })
        );
        assert_eq!(
            dec(r#"{"data":null,"extra":true}"#),
            Ok(BackendFrame::Deliver {
                to: Target::All,
                body: text("null")
            })
        );
        assert_eq!(
            dec(r#"{"tab":["t1","someone-else"],"data":"x"}"#),
            Ok(BackendFrame::Deliver {
                to: Target::Tabs {
                    ids: vec![TabId(1)],
                    foreign: 1
                },
                body: text("\"x\"")
            })
        );
    }

    #[test]
    fn payload_shares_the_frame_buffer() {
        let frame = Utf8Bytes::from_static(r#"{"data":{"big":"payload"}}"#);
        let Ok(BackendFrame::Deliver {
            body: Body::Text(t),
            ..
        }) = decode(&frame, Payload::Json)
        else {
            panic!("not a delivery")
        };
        let start = t.as_ptr() as usize - frame.as_ptr() as usize;
        assert_eq!(&frame[start..start + t.len()], r#"{"big":"payload"}"#);
    }

    #[test]
    fn text_payload_delivers_strings_unquoted() {
        let d = |s: &str| decode(&s.into(), Payload::Text);
        assert_eq!(
            d(r#"{"data":"plain"}"#),
            Ok(BackendFrame::Deliver {
                to: Target::All,
                body: text("plain")
            })
        );
        assert_eq!(
            d(r#"{"data":"a\"b\n\u00e9"}"#),
            Ok(BackendFrame::Deliver {
                to: Target::All,
                body: text("a\"b\n\u{e9}")
            })
        );
        // A non-string payload is still its raw JSON text.
        assert_eq!(
            d(r#"{"data":[1]}"#),
            Ok(BackendFrame::Deliver {
                to: Target::All,
                body: text("[1]")
            })
        );
    }

    #[test]
    fn binary_and_close() {
        assert_eq!(
            dec(r#"{"tab":"t2","data_b64":"AP8B"}"#),
            Ok(BackendFrame::Deliver {
                to: tabs(&[2]),
                body: Body::Binary(Bytes::from_static(&[0, 255, 1]))
            })
        );
        assert_eq!(
            dec(r#"{"tab":"t7","event":"close","code":4001,"reason":"bye"}"#),
            Ok(BackendFrame::Close {
                to: tabs(&[7]),
                code: 4001,
                reason: "bye".into()
            })
        );
        let long = format!(
            r#"{{"tab":"t7","event":"close","reason":"{}"}}"#,
            "é".repeat(100)
        );
        let Ok(BackendFrame::Close { code, reason, .. }) = dec(&long) else {
            panic!()
        };
        assert_eq!(code, 1000);
        assert!(reason.len() <= crate::cause::MAX_CLOSE_REASON && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_frames_say_why() {
        let cases = [
            ("nope", FrameError::NotJson),
            ("[1,2]", FrameError::NotObject),
            ("\"s\"", FrameError::NotObject),
            (r#"{"tab":"t1""#, FrameError::NotJson),
            (r#"{"tab":"t1"}"#, FrameError::NoPayload),
            (r#"{"tab":7,"data":1}"#, FrameError::BadTab),
            (r#"{"tab":null,"data":1}"#, FrameError::BadTab),
            (r#"{"tab":"no spaces","data":1}"#, FrameError::BadTab),
            (r#"{"tab":["t1",2],"data":1}"#, FrameError::BadTab),
            (r#"{"data":1,"data_b64":"AA=="}"#, FrameError::Ambiguous),
            (r#"{"data":1,"data":2}"#, FrameError::BadField),
            (r#"{"data_b64":5}"#, FrameError::BadField),
            (
                r#"{"tab":"t1","event":"close","code":"4001"}"#,
                FrameError::BadCloseCode,
            ),
            (r#"{"tab":"t1","event":"open"}"#, FrameError::UnknownEvent),
            (r#"{"event":"close"}"#, FrameError::CloseWithoutTab),
            (
                r#"{"tab":"t1","event":"close","code":1001}"#,
                FrameError::BadCloseCode,
            ),
            (
                r#"{"tab":"t1","event":"close","code":70000}"#,
                FrameError::BadCloseCode,
            ),
            (r#"{"data_b64":"AP8"}"#, FrameError::BadBase64),
            (r#"{"data_b64":"!!!!"}"#, FrameError::BadBase64),
        ];
        for (frame, want) in cases {
            assert_eq!(dec(frame), Err(want), "{frame}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::Bool),
                any::<i64>().prop_map(|n| serde_json::json!(n)),
                ".{0,12}".prop_map(serde_json::Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4)
                        .prop_map(serde_json::Value::Array),
                    proptest::collection::btree_map(".{0,6}", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        #[test]
        fn the_common_frame_takes_the_positional_path() {
            let frame = Utf8Bytes::from_static(r#"{"tab":"t3","data":{"n":1,"s":"x"}}"#);
            assert!(decode_common(&frame, Payload::Json).is_some());
            for other in [
                r#"{"tab":"t3","data":{"n":1} }"#,
                r#"{"data":1,"tab":"t3"}"#,
                r#"{"tab":["t3"],"data":1}"#,
                r#"{"tab":"t3","data":{"n":1}}}"#,
            ] {
                assert!(decode_common(&Utf8Bytes::from_static(other), Payload::Json).is_none());
            }
        }

        proptest! {
            /// What a tab sends reaches the backend exactly, and what the
            /// backend sends back in the same shape reaches the tab exactly.
            #[test]
            fn json_payloads_survive_both_directions(v in json_value(), n in 1u64..1_000_000) {
                let text = serde_json::to_string_pretty(&v).unwrap();
                let up = data_text(TabId(n), &text, Payload::Json).unwrap();
                let parsed: serde_json::Value = serde_json::from_str(&up).unwrap();
                prop_assert_eq!(&parsed["tab"], &serde_json::json!(format!("t{n}")));
                prop_assert_eq!(&parsed["data"], &v);
                let down = decode(&up, Payload::Json).unwrap();
                prop_assert_eq!(down, BackendFrame::Deliver { to: tabs(&[n]), body: text.as_str().into_body() });
            }

            #[test]
            fn text_payloads_survive_both_directions(s in ".{0,40}", n in 1u64..1000) {
                let up = data_text(TabId(n), &s, Payload::Text).unwrap();
                let down = decode(&up, Payload::Text).unwrap();
                prop_assert_eq!(down, BackendFrame::Deliver { to: tabs(&[n]), body: s.as_str().into_body() });
            }

            #[test]
            fn binary_payloads_survive_both_directions(b in proptest::collection::vec(any::<u8>(), 0..64)) {
                let up = data_binary(TabId(1), &b);
                let down = decode(&up, Payload::Json).unwrap();
                prop_assert_eq!(down, BackendFrame::Deliver { to: tabs(&[1]), body: Body::Binary(Bytes::from(b)) });
            }

            /// The positional decoder of the common frame agrees with
            /// serde's on every frame it takes, and on near misses.
            #[test]
            fn the_common_frame_decodes_as_serde_would(
                v in json_value(),
                pretty in any::<bool>(),
                tab in prop_oneof![
                    (0u64..100_000).prop_map(|n| format!("t{n}")),
                    Just("t".to_string()),
                    Just("t01".to_string()),
                    Just("t99999999999999999999999".to_string()),
                ],
                around in prop_oneof![Just(""), Just(" "), Just("}"), Just(",\"data\":1"), Just(",\"event\":\"close\"")],
                payload in prop_oneof![Just(Payload::Json), Just(Payload::Text)],
            ) {
                let data = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
                for frame in [
                    format!("{{\"tab\":\"{tab}\",\"data\":{data}{around}}}"),
                    format!("{{\"tab\":\"{tab}\",\"data\":{around}{data}}}"),
                ] {
                    let frame = Utf8Bytes::from(frame);
                    prop_assert_eq!(decode(&frame, payload), decode_any(&frame, payload), "{:?}", frame);
                }
            }

            /// The decoder never panics, whatever the backend sends.
            #[test]
            fn decode_never_panics(s in ".{0,200}") {
                let _ = decode(&s.clone().into(), Payload::Json);
                let _ = decode(&s.into(), Payload::Text);
            }
        }

        trait IntoBody {
            fn into_body(self) -> Body;
        }
        impl IntoBody for &str {
            fn into_body(self) -> Body {
                Body::Text(self.into())
            }
        }
    }
}
