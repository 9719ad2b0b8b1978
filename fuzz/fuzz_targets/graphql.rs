//! Any frames from tabs and from the server, in any order, on a `graphql`
//! session of both subprotocols: the machine must not panic, and whatever
//! it sends upstream or to a tab must be JSON.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tabmux::envelope::graphql::{Graphql, Share, Subprotocol};
use tabmux::envelope::{Effect, TabId};
use tokio_tungstenite::tungstenite::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let protocol = if first & 1 == 0 {
        Subprotocol::TransportWs
    } else {
        Subprotocol::Legacy
    };
    let share = match first >> 1 & 3 {
        0 => Share::Off,
        1 => Share::Events,
        _ => Share::Live,
    };
    let mut m = Graphql::new(protocol, share, Duration::from_secs(1));
    let mut out = Vec::new();
    for tab in 1..=2 {
        m.tab_joined(TabId(tab), &mut out);
        m.tab_init(TabId(tab), Message::text(r#"{"type":"connection_init"}"#), &mut out);
    }
    m.upstream_frame(Message::text(r#"{"type":"connection_ack"}"#), &mut out);
    let now = Instant::now();
    // Frames separated by newlines; each one's first byte says who sends it.
    for frame in rest.split(|&b| b == b'\n') {
        let Some((&who, body)) = frame.split_first() else {
            continue;
        };
        let Ok(text) = std::str::from_utf8(body) else {
            continue;
        };
        let msg = Message::text(text.to_string());
        match who % 4 {
            0 => m.upstream_frame(msg, &mut out),
            1 | 2 => {
                let _ = m.tab_sent(TabId(u64::from(who % 4)), msg, || now, &mut out);
            }
            _ => m.tab_left(TabId(2), 1001, now, &mut out),
        }
    }
    m.on_timeout(now + Duration::from_secs(2), &mut out);
    for effect in &out {
        let msg = match effect {
            Effect::Upstream(m) | Effect::Answer { msg: m, .. } | Effect::Deliver { msg: m, .. } => m,
            Effect::Forward(_, f) => &f.frame,
            _ => continue,
        };
        if let Ok(text) = msg.to_text() {
            let json = serde_json::from_str::<serde_json::Value>(text);
            assert!(json.is_ok(), "not JSON: {text}");
        }
    }
});
