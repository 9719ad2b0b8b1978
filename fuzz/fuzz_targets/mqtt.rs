//! Any bytes from two tabs and from the broker, cut into WebSocket messages
//! anywhere, in any order, on an `mqtt` session at either protocol level:
//! the machine must not panic, and every message it sends a tab or the
//! upstream must be exactly one packet that reads back at the session's
//! level.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Connect, ConnectReturnCode, Packet};
use tabmux::envelope::mqtt::codec::{self, Level, Stream};
use tabmux::envelope::mqtt::{Mqtt, Settings};
use tabmux::envelope::{Effect, TabId};
use tokio_tungstenite::tungstenite::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let level = if first & 1 == 0 { Level::V4 } else { Level::V5 };
    let mut m = Mqtt::new(Settings {
        max_packet: 4096,
        max_qos: first >> 1 & 3,
        linger: Duration::from_secs(1),
    });
    let now = Instant::now();
    let mut out = Vec::new();
    for tab in 1..=2 {
        let connect = Connect {
            keep_alive: u16::from(first >> 3),
            client_id: format!("c{tab}"),
            clean_start: true,
            properties: None,
        };
        let bytes = codec::write(level, &Packet::Connect(connect, None, None));
        m.tab_placed(TabId(tab), &bytes, now, &mut out);
    }
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
        properties: None,
    });
    m.upstream_frame(Message::Binary(codec::write(level, &ack)), &mut out);
    // Chunks: who sends (tab 1, tab 2, the broker, a leave or the time),
    // its length, its bytes.
    let mut t = now;
    while let [who, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        let msg = Message::Binary(chunk.to_vec().into());
        match who % 5 {
            0 => m.upstream_frame(msg, &mut out),
            1 | 2 => {
                let _ = m.tab_sent(TabId(u64::from(who % 5)), msg, || t, &mut out);
            }
            3 => m.tab_left(TabId(u64::from(who >> 4 & 1) + 1), 1006, t, &mut out),
            _ => {
                t += Duration::from_millis(u64::from(*len) * 100);
                if m.next_deadline(t).is_some_and(|d| d <= t) {
                    m.on_timeout(t, &mut out);
                }
            }
        }
    }
    for effect in &out {
        let msg = match effect {
            Effect::Upstream(m) | Effect::Answer { msg: m, .. } | Effect::Deliver { msg: m, .. } => m,
            Effect::Forward(_, f) => &f.frame,
            _ => continue,
        };
        let Message::Binary(b) = msg else {
            panic!("not binary: {msg:?}")
        };
        let mut s = Stream::default();
        s.push(b);
        let packet = s.next(level, usize::MAX);
        assert!(matches!(packet, Ok(Some(_))), "not a packet: {b:?} {packet:?}");
        assert!(s.is_empty(), "more than one packet: {b:?}");
    }
});
