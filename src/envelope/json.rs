//! The `json/1` envelope (docs/protocol.md, "The `json` envelope"): the state machine
//! and the encoders of what tabmux sends the backend.
//!
//! A tab's JSON payload is embedded **byte for byte**: validated, never
//! re-serialised. What the backend sends is decoded by
//! [`super::json_decode`], whose payloads are slices of the frame's own
//! buffer, shared by every tab they fan out to.

use std::fmt::Write as _;
use std::time::Instant;

use base64::Engine as _;
use tokio_tungstenite::tungstenite::Message;

use super::json_decode::{self, BackendFrame, Body, FrameError};
use super::{Effect, Effects, Forward, JoinInfo, TabId, Utf8Bytes};
use crate::cause::Cause;
use crate::config::{Payload, Route};

/// The `json` envelope's state: the route's settings, and whether the
/// upstream is there to hear `open` and `close` events.
#[derive(Debug)]
pub struct Json {
    payload: Payload,
    max_message_size: usize,
    /// False during an outage: events wait for the restore, which announces
    /// every tab still connected.
    up: bool,
}

impl Json {
    /// The machine of a session whose upstream is up.
    pub fn new(route: &Route) -> Json {
        Json::with(route.payload, route.max_message_size)
    }

    /// The machine for these settings (tests).
    pub fn with(payload: Payload, max_message_size: usize) -> Json {
        Json {
            payload,
            max_message_size,
            up: true,
        }
    }

    /// `{"tab":…,"event":"open",…}`, unless the upstream is down (the
    /// restore announces the tab then).
    pub fn tab_joined(&mut self, tab: TabId, info: &JoinInfo, out: &mut Effects) {
        if self.up {
            out.push(Effect::Upstream(Message::Text(open_event_of(tab, info))));
        }
    }

    /// A tab's text or binary message, wrapped, for the upstream; text that
    /// is not JSON (with `payload = "json"`) closes the tab with 1007.
    #[inline]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        _now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        let forward = match msg {
            Message::Text(text) => match data_text(tab, &text, self.payload) {
                Ok(frame) => Forward {
                    frame: Message::Text(frame),
                    payload: text.len(),
                },
                Err(NotJson) => return Err(Cause::InvalidJson),
            },
            Message::Binary(bytes) => Forward {
                frame: Message::Text(data_binary(tab, &bytes)),
                payload: bytes.len(),
            },
            // Only data messages reach an envelope (a tab's connection
            // answers control frames itself); another would pass unchanged,
            // as on `none` routes.
            other => Forward {
                payload: other.len(),
                frame: other,
            },
        };
        out.push(Effect::Forward(tab, forward));
        Ok(())
    }

    /// `{"tab":…,"event":"close","code":…}`, if the upstream is there to
    /// hear it.
    pub fn tab_left(&mut self, tab: TabId, code: u16, _now: Instant, out: &mut Effects) {
        if self.up {
            out.push(Effect::Upstream(Message::Text(close_event(tab, code))));
        }
    }

    /// A backend frame: a delivery, a close, or a malformed frame.
    #[inline]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut Effects) {
        let Message::Text(text) = msg else {
            return out.push(Effect::Malformed(FrameError::Binary));
        };
        match json_decode::decode(&text, self.payload) {
            Ok(BackendFrame::Deliver { to, body }) => {
                let len = body.len();
                if len > self.max_message_size {
                    return out.push(Effect::Close {
                        to,
                        cause: Cause::TooBig,
                    });
                }
                let msg = match body {
                    Body::Text(t) => Message::Text(t),
                    Body::Binary(b) => Message::Binary(b),
                };
                out.push(Effect::Deliver { to, msg, len });
            }
            Ok(BackendFrame::Close { to, code, reason }) => out.push(Effect::Close {
                to,
                cause: Cause::Backend { code, reason },
            }),
            Err(e) => out.push(Effect::Malformed(e)),
        }
    }

    /// The upstream is down: events wait.
    pub fn upstream_lost(&mut self) {
        self.up = false;
    }

    /// The upstream is back: an `open` event for every tab still connected,
    /// in join order, before any of their data.
    pub fn upstream_restored<'a>(
        &mut self,
        members: impl Iterator<Item = (TabId, &'a JoinInfo)>,
        out: &mut Effects,
    ) {
        self.up = true;
        for (tab, info) in members {
            out.push(Effect::Upstream(Message::Text(open_event_of(tab, info))));
        }
    }
}

fn open_event_of(tab: TabId, info: &JoinInfo) -> Utf8Bytes {
    let headers: Vec<(&str, &str)> = info
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    open_event(tab, &info.query, &headers)
}

// ---------------------------------------------------------------- encoders

/// `{"tab":"t7","event":"open","query":"…"}`, with `"headers":{…}` when the
/// route selects request headers for it.
pub fn open_event(tab: TabId, query: &str, headers: &[(&str, &str)]) -> Utf8Bytes {
    let mut out = String::with_capacity(48 + query.len());
    let _ = write!(out, "{{\"tab\":\"{tab}\",\"event\":\"open\",\"query\":");
    push_json_string(&mut out, query);
    if !headers.is_empty() {
        out.push_str(",\"headers\":{");
        for (i, (name, value)) in headers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, name);
            out.push(':');
            push_json_string(&mut out, value);
        }
        out.push('}');
    }
    out.push('}');
    out.into()
}

/// `{"tab":"t7","event":"close","code":1001}`.
pub fn close_event(tab: TabId, code: u16) -> Utf8Bytes {
    format!("{{\"tab\":\"{tab}\",\"event\":\"close\",\"code\":{code}}}").into()
}

/// The tab's text is not valid JSON (`payload = "json"`); the tab is closed
/// with 1007.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson;

/// `{"tab":"t7","data":P}` for a tab's text message. With `payload = "json"`
/// the text must be JSON and is embedded byte for byte; with `"text"` it is
/// embedded as a JSON string.
pub fn data_text(tab: TabId, text: &str, payload: Payload) -> Result<Utf8Bytes, NotJson> {
    let mut out = String::with_capacity(text.len() + 32);
    // Pushed piece by piece: this runs for every tab message, and the
    // formatting machinery cost as much as the rest of the wrapping.
    out.push_str("{\"tab\":\"t");
    out.push_str(itoa::Buffer::new().format(tab.0));
    out.push_str("\",\"data\":");
    match payload {
        Payload::Json => {
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
                return Err(NotJson);
            }
            out.push_str(text);
        }
        Payload::Text => push_json_string(&mut out, text),
    }
    out.push('}');
    Ok(out.into())
}

/// `{"tab":"t7","data_b64":"…"}` for a tab's binary message.
pub fn data_binary(tab: TabId, bytes: &[u8]) -> Utf8Bytes {
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 40);
    let _ = write!(out, "{{\"tab\":\"{tab}\",\"data_b64\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut out);
    out.push_str("\"}");
    out.into()
}

fn push_json_string(out: &mut String, s: &str) {
    // Serialising a &str into JSON cannot fail.
    let quoted = serde_json::to_string(s).unwrap_or_default();
    out.push_str(&quoted);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::envelope::Target;

    fn now() -> Instant {
        Instant::now()
    }

    fn machine() -> Json {
        Json::with(Payload::Json, 16)
    }

    fn up(s: &str) -> Effect {
        Effect::Upstream(Message::text(s))
    }

    fn info(query: &str) -> JoinInfo {
        JoinInfo {
            query: query.into(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn encoders_match_the_protocol_tables() {
        assert_eq!(
            open_event(TabId(7), "room=5", &[]).as_str(),
            r#"{"tab":"t7","event":"open","query":"room=5"}"#
        );
        assert_eq!(
            open_event(TabId(1), "a=\"b\"", &[("accept-language", "fr")]).as_str(),
            r#"{"tab":"t1","event":"open","query":"a=\"b\"","headers":{"accept-language":"fr"}}"#
        );
        assert_eq!(
            close_event(TabId(7), 1001).as_str(),
            r#"{"tab":"t7","event":"close","code":1001}"#
        );
        assert_eq!(
            data_binary(TabId(2), &[0, 255, 1]).as_str(),
            r#"{"tab":"t2","data_b64":"AP8B"}"#
        );
    }

    #[test]
    fn tab_json_is_embedded_byte_for_byte() {
        let p = r#" { "b" : 1.50, "a":"\u00e9" } "#;
        let out = data_text(TabId(3), p, Payload::Json).unwrap();
        assert_eq!(out.as_str(), format!(r#"{{"tab":"t3","data":{p}}}"#));
        assert_eq!(data_text(TabId(3), "{oops", Payload::Json), Err(NotJson));
        assert_eq!(data_text(TabId(3), "", Payload::Json), Err(NotJson));
        assert_eq!(
            data_text(TabId(3), "say \"hi\"", Payload::Text)
                .unwrap()
                .as_str(),
            r#"{"tab":"t3","data":"say \"hi\""}"#
        );
    }

    // ---- "tabmux to backend", row by row

    #[test]
    fn a_tab_that_joins_is_announced_with_its_query_and_headers() {
        let mut m = machine();
        let mut out = Vec::new();
        let with_headers = JoinInfo {
            query: "room=5".into(),
            headers: vec![("accept-language".into(), "fr".into())],
        };
        m.tab_joined(TabId(7), &with_headers, &mut out);
        m.tab_joined(TabId(8), &info(""), &mut out);
        assert_eq!(
            out,
            [
                up(
                    r#"{"tab":"t7","event":"open","query":"room=5","headers":{"accept-language":"fr"}}"#
                ),
                up(r#"{"tab":"t8","event":"open","query":""}"#),
            ]
        );
    }

    /// What `m` forwards for one message of tab `tab`.
    fn forwarded(m: &mut Json, tab: u64, msg: Message) -> Forward {
        let mut out = Vec::new();
        m.tab_sent(TabId(tab), msg, Instant::now, &mut out).unwrap();
        match out.as_slice() {
            [Effect::Forward(t, f)] if *t == TabId(tab) => f.clone(),
            other => panic!("expected one forward of t{tab}, got {other:?}"),
        }
    }

    #[test]
    fn text_and_binary_messages_are_wrapped() {
        let mut m = machine();
        let text = forwarded(&mut m, 7, Message::text(r#"{"a":1}"#));
        assert_eq!(text.frame, Message::text(r#"{"tab":"t7","data":{"a":1}}"#));
        assert_eq!(text.payload, 7);
        let bin = forwarded(&mut m, 7, Message::binary(vec![0u8, 255, 1]));
        assert_eq!(
            bin.frame,
            Message::text(r#"{"tab":"t7","data_b64":"AP8B"}"#)
        );
        assert_eq!(bin.payload, 3);
        let mut text = Json::with(Payload::Text, 16);
        let s = forwarded(&mut text, 2, Message::text("hi \"x\""));
        assert_eq!(s.frame, Message::text(r#"{"tab":"t2","data":"hi \"x\""}"#));
    }

    #[test]
    fn text_that_is_not_json_closes_the_tab_with_1007() {
        let mut m = machine();
        let mut out = Vec::new();
        let e = m
            .tab_sent(TabId(1), Message::text("{oops"), Instant::now, &mut out)
            .unwrap_err();
        assert_eq!(out, [], "nothing goes upstream");
        assert_eq!(e, Cause::InvalidJson);
        assert_eq!(e.code(), 1007);
    }

    #[test]
    fn a_tab_that_leaves_sends_one_close_event_with_its_code() {
        let mut m = machine();
        let mut out = Vec::new();
        m.tab_left(TabId(7), 1001, now(), &mut out);
        m.tab_left(TabId(8), 1006, now(), &mut out);
        assert_eq!(
            out,
            [
                up(r#"{"tab":"t7","event":"close","code":1001}"#),
                up(r#"{"tab":"t8","event":"close","code":1006}"#),
            ]
        );
    }

    #[test]
    fn during_an_outage_events_wait_and_the_restore_announces_every_tab_in_order() {
        let mut m = machine();
        let mut out = Vec::new();
        m.upstream_lost();
        m.tab_joined(TabId(3), &info("late"), &mut out);
        m.tab_left(TabId(2), 1001, now(), &mut out);
        assert_eq!(out, [], "nothing while the upstream is down");
        let (one, three) = (info("a=1"), info("late"));
        m.upstream_restored([(TabId(1), &one), (TabId(3), &three)].into_iter(), &mut out);
        assert_eq!(
            out,
            [
                up(r#"{"tab":"t1","event":"open","query":"a=1"}"#),
                up(r#"{"tab":"t3","event":"open","query":"late"}"#),
            ]
        );
        out.clear();
        m.tab_left(TabId(1), 1000, now(), &mut out);
        assert_eq!(out, [up(r#"{"tab":"t1","event":"close","code":1000}"#)]);
    }

    // ---- "backend to tabmux", row by row

    fn from_backend(m: &mut Json, frame: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        m.upstream_frame(Message::text(frame), &mut out);
        out
    }

    fn deliver(ids: &[u64], msg: Message, len: usize) -> Effect {
        Effect::Deliver {
            to: Target::Tabs {
                ids: ids.iter().map(|&n| TabId(n)).collect(),
                foreign: 0,
            },
            msg,
            len,
        }
    }

    #[test]
    fn unicast_multicast_and_broadcast_are_deliveries() {
        let mut m = machine();
        assert_eq!(
            from_backend(&mut m, r#"{"tab":"t7","data":{"x":1}}"#),
            [deliver(&[7], Message::text(r#"{"x":1}"#), 7)]
        );
        assert_eq!(
            from_backend(&mut m, r#"{"tab":["t9","t7"],"data":1}"#),
            [deliver(&[7, 9], Message::text("1"), 1)]
        );
        assert_eq!(
            from_backend(&mut m, r#"{"data":"hi"}"#),
            [Effect::Deliver {
                to: Target::All,
                msg: Message::text(r#""hi""#),
                len: 4
            }]
        );
        // payload = "text": a JSON string is delivered as the string itself.
        let mut text = Json::with(Payload::Text, 16);
        assert_eq!(
            from_backend(&mut text, r#"{"tab":"t1","data":"hi"}"#),
            [deliver(&[1], Message::text("hi"), 2)]
        );
    }

    #[test]
    fn binary_deliveries_are_decoded_from_base64() {
        let mut m = machine();
        assert_eq!(
            from_backend(&mut m, r#"{"tab":"t2","data_b64":"AP8B"}"#),
            [deliver(
                &[2],
                Message::Binary(Bytes::from_static(&[0, 255, 1])),
                3
            )]
        );
    }

    #[test]
    fn the_backend_closes_a_tab_with_its_code_and_reason() {
        let mut m = machine();
        assert_eq!(
            from_backend(
                &mut m,
                r#"{"tab":"t7","event":"close","code":4001,"reason":"bye"}"#
            ),
            [Effect::Close {
                to: Target::one(TabId(7)),
                cause: Cause::Backend {
                    code: 4001,
                    reason: "bye".into()
                }
            }]
        );
    }

    #[test]
    fn a_payload_over_max_message_size_closes_its_tabs_with_1009() {
        let mut m = machine();
        let big = format!(r#"{{"tab":["t1","t2"],"data":"{}"}}"#, "x".repeat(20));
        assert_eq!(
            from_backend(&mut m, &big),
            [Effect::Close {
                to: Target::Tabs {
                    ids: vec![TabId(1), TabId(2)],
                    foreign: 0
                },
                cause: Cause::TooBig
            }]
        );
        let broadcast = format!(r#"{{"data":"{}"}}"#, "x".repeat(20));
        assert_eq!(
            from_backend(&mut m, &broadcast),
            [Effect::Close {
                to: Target::All,
                cause: Cause::TooBig
            }]
        );
    }

    #[test]
    fn frames_that_break_the_rules_are_malformed() {
        let mut m = machine();
        assert_eq!(
            from_backend(&mut m, "nope"),
            [Effect::Malformed(FrameError::NotJson)]
        );
        assert_eq!(
            from_backend(&mut m, r#"{"tab":"t1"}"#),
            [Effect::Malformed(FrameError::NoPayload)]
        );
        let mut out = Vec::new();
        m.upstream_frame(Message::binary(vec![1u8]), &mut out);
        assert_eq!(out, [Effect::Malformed(FrameError::Binary)]);
    }

    #[test]
    fn frames_for_tabs_tabmux_never_named_keep_their_count() {
        let mut m = machine();
        assert_eq!(
            from_backend(&mut m, r#"{"tab":["t1","someone"],"data":0}"#),
            [Effect::Deliver {
                to: Target::Tabs {
                    ids: vec![TabId(1)],
                    foreign: 1
                },
                msg: Message::text("0"),
                len: 1
            }]
        );
    }
}
