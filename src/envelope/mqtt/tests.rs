//! The `mqtt` envelope's rows that are about time, quotas and aliases
//! (docs/protocol.md), as plain values: the machine keeps no clock, so the
//! tests give it the time. The rows a real broker shows are in
//! tests/mqtt.rs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectReasonCode, Filter as WireFilter, LastWill, LastWillProperties, Packet, PubAck,
    PubAckReason, Publish, PublishProperties, RetainForwardRule, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::envelope::Effect;

const LINGER: Duration = Duration::from_secs(10);

fn t(n: u64) -> TabId {
    TabId(n)
}

fn machine(level: Level) -> Mqtt {
    let mut m = Mqtt::new(Settings {
        max_packet: 1 << 20,
        max_qos: 2,
        linger: LINGER,
    });
    m.level = level;
    m
}

fn hello(level: Level, id: &str, keep_alive: u16, will: Option<LastWill>) -> Bytes {
    let connect = Connect {
        keep_alive,
        client_id: id.into(),
        clean_start: true,
        properties: (level == Level::V5).then(empty_connect_properties),
    };
    codec::write(level, &Packet::Connect(connect, will, None))
}

fn server_ack(receive_max: Option<u16>, topic_alias_max: Option<u16>) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
        properties: Some(ConnAckProperties {
            receive_max,
            topic_alias_max,
            ..empty_connack_properties()
        }),
    })
}

/// A session whose tabs 1..=n connected at `now` (keepalive `ka`), past the
/// server's CONNACK.
fn session(level: Level, n: u64, ka: u16, ack: Packet, now: Instant) -> Mqtt {
    let mut m = machine(level);
    let mut out = Vec::new();
    for i in 1..=n {
        m.tab_placed(t(i), &hello(level, "id", ka, None), now, &mut out);
    }
    from_upstream(&mut m, &ack);
    m
}

fn from_upstream(m: &mut Mqtt, p: &Packet) -> Vec<Effect> {
    let mut out = Vec::new();
    let level = m.level;
    m.upstream_frame(Message::Binary(codec::write(level, p)), &mut out);
    out
}

fn from_tab(m: &mut Mqtt, tab: u64, p: &Packet, now: Instant) -> Vec<Effect> {
    let mut out = Vec::new();
    let level = m.level;
    let msg = Message::Binary(codec::write(level, p));
    m.tab_sent(t(tab), msg, || now, &mut out).unwrap();
    out
}

fn read(level: Level, msg: &Message) -> Packet {
    let Message::Binary(b) = msg else {
        panic!("not binary: {msg:?}")
    };
    codec::read(level, b.clone()).expect("a packet")
}

/// The packets sent upstream.
fn upstream(level: Level, out: &[Effect]) -> Vec<Packet> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Forward(_, f) => Some(read(level, &f.frame)),
            Effect::Upstream(m) => Some(read(level, m)),
            _ => None,
        })
        .collect()
}

/// The packets sent to tab `n`.
fn to_tab(level: Level, out: &[Effect], n: u64) -> Vec<Packet> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Answer { tab, msg } if *tab == t(n) => Some(read(level, msg)),
            Effect::Deliver {
                to: Target::Tabs { ids, .. },
                msg,
                ..
            } if ids.contains(&t(n)) => Some(read(level, msg)),
            _ => None,
        })
        .collect()
}

fn closed(out: &[Effect], n: u64) -> Option<Cause> {
    out.iter().find_map(|e| match e {
        Effect::Close {
            to: Target::Tabs { ids, .. },
            cause,
        } if ids.contains(&t(n)) => Some(cause.clone()),
        _ => None,
    })
}

fn publish(topic: &str, qos: QoS, pkid: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid,
        payload: Bytes::from_static(b"x"),
        properties: None,
    }
}

fn subscribe(pkid: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![WireFilter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }],
        properties: None,
    })
}

fn will(delay: Option<u32>) -> LastWill {
    LastWill {
        topic: Bytes::from_static(b"w"),
        message: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: delay.map(|d| LastWillProperties {
            delay_interval: Some(d),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    }
}

#[test]
fn the_first_connect_goes_upstream_without_its_will_clean_and_without_topic_aliases() {
    let mut m = machine(Level::V5);
    let mut out = Vec::new();
    let mut c = codec::read(Level::V5, hello(Level::V5, "me", 30, Some(will(None)))).unwrap();
    if let Packet::Connect(connect, _, _) = &mut c {
        connect.clean_start = false;
        connect.properties = Some(ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: Some(20),
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        });
    }
    m.tab_placed(t(1), &codec::write(Level::V5, &c), Instant::now(), &mut out);
    let up = upstream(Level::V5, &out);
    let Packet::Connect(connect, will, _) = &up[0] else {
        panic!("{up:?}")
    };
    assert!(will.is_none(), "no will upstream");
    assert!(connect.clean_start);
    assert_eq!(connect.client_id, "me");
    assert_eq!(connect.keep_alive, 30);
    let p = connect.properties.as_ref().unwrap();
    assert_eq!(p.session_expiry_interval, None);
    assert_eq!(p.topic_alias_max, None);
    assert_eq!(p.max_packet_size, Some(1 << 20));
}

#[test]
fn the_upstream_is_pinged_only_after_half_its_keepalive_without_a_packet() {
    let start = Instant::now();
    let mut m = session(Level::V4, 1, 10, server_ack(None, None), start);
    let first = m.next_deadline(start).expect("a keepalive deadline");
    assert_eq!(first, start + Duration::from_secs(5));
    let mut out = Vec::new();
    m.on_timeout(first, &mut out);
    assert!(matches!(
        upstream(Level::V4, &out)[..],
        [Packet::PingReq(_)]
    ));
    // A tab's message goes meanwhile: no ping at the next check.
    let second = m.next_deadline(first).unwrap();
    from_tab(
        &mut m,
        1,
        &Packet::Publish(publish("a", QoS::AtMostOnce, 0)),
        first,
    );
    let mut out = Vec::new();
    m.on_timeout(second, &mut out);
    assert!(upstream(Level::V4, &out).is_empty(), "{out:?}");
}

#[test]
fn a_silent_tab_is_closed_at_one_and_a_half_times_its_keepalive_and_its_will_published() {
    let start = Instant::now();
    let mut m = machine(Level::V4);
    let mut out = Vec::new();
    m.tab_placed(t(1), &hello(Level::V4, "a", 0, None), start, &mut out);
    m.tab_placed(
        t(2),
        &hello(Level::V4, "b", 4, Some(will(None))),
        start,
        &mut out,
    );
    from_upstream(
        &mut m,
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: None,
        }),
    );
    let at = m.next_deadline(start).unwrap();
    assert_eq!(at, start + Duration::from_secs(6));
    let mut out = Vec::new();
    m.on_timeout(at - Duration::from_millis(1), &mut out);
    assert_eq!(closed(&out, 2), None, "not before");
    m.on_timeout(at, &mut out);
    assert_eq!(closed(&out, 2), Some(Cause::Idle));
    let mut out = Vec::new();
    m.tab_left(t(2), 1006, at, &mut out);
    let up = upstream(Level::V4, &out);
    assert!(
        matches!(&up[..], [Packet::Publish(p)] if &p.topic[..] == b"w"),
        "{up:?}"
    );
}

#[test]
fn a_will_waits_out_its_delay_and_is_dropped_when_the_client_id_comes_back() {
    let start = Instant::now();
    let mut m = session(Level::V5, 1, 0, server_ack(None, None), start);
    let mut out = Vec::new();
    m.tab_placed(
        t(2),
        &hello(Level::V5, "w1", 0, Some(will(Some(5)))),
        start,
        &mut out,
    );
    m.tab_placed(
        t(3),
        &hello(Level::V5, "w2", 0, Some(will(Some(5)))),
        start,
        &mut out,
    );
    let mut out = Vec::new();
    m.tab_left(t(2), 1006, start, &mut out);
    m.tab_left(t(3), 1006, start, &mut out);
    assert!(upstream(Level::V5, &out).is_empty(), "not at once");
    // w2 is back within the delay: its will is not sent.
    m.tab_placed(
        t(4),
        &hello(Level::V5, "w2", 0, None),
        start + Duration::from_secs(1),
        &mut out,
    );
    let at = m.next_deadline(start).unwrap();
    assert_eq!(at, start + Duration::from_secs(5));
    let mut out = Vec::new();
    m.on_timeout(at, &mut out);
    let up = upstream(Level::V5, &out);
    assert_eq!(up.len(), 1, "{up:?}");
}

#[test]
fn a_filter_left_without_unsubscribing_is_unsubscribed_upstream_after_the_linger() {
    let start = Instant::now();
    let mut m = session(Level::V4, 1, 0, server_ack(None, None), start);
    let out = from_tab(&mut m, 1, &subscribe(1, "a/#"), start);
    let Packet::Subscribe(s) = &upstream(Level::V4, &out)[0] else {
        panic!()
    };
    from_upstream(
        &mut m,
        &Packet::SubAck(rumqttc::v5::mqttbytes::v5::SubAck {
            pkid: s.pkid,
            return_codes: vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
            properties: None,
        }),
    );
    let mut out = Vec::new();
    m.tab_left(t(1), 1001, start, &mut out);
    assert!(upstream(Level::V4, &out).is_empty());
    let at = m.next_deadline(start).unwrap();
    assert_eq!(at, start + LINGER);
    let mut out = Vec::new();
    m.on_timeout(at, &mut out);
    assert!(
        matches!(&upstream(Level::V4, &out)[..], [Packet::Unsubscribe(u)] if u.filters == ["a/#"])
    );
}

#[test]
fn topic_aliases_are_resolved_per_tab() {
    let now = Instant::now();
    let mut m = session(Level::V5, 2, 0, server_ack(None, Some(10)), now);
    let with_alias = |topic: &str, alias: u16| {
        let mut p = publish(topic, QoS::AtMostOnce, 0);
        p.properties = Some(PublishProperties {
            payload_format_indicator: None,
            message_expiry_interval: None,
            topic_alias: Some(alias),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
            subscription_identifiers: Vec::new(),
            content_type: None,
        });
        Packet::Publish(p)
    };
    from_tab(&mut m, 1, &with_alias("a/b", 1), now);
    let out = from_tab(&mut m, 1, &with_alias("", 1), now);
    let up = upstream(Level::V5, &out);
    let Packet::Publish(p) = &up[0] else { panic!() };
    assert_eq!(&p.topic[..], b"a/b", "the full topic upstream");
    assert_eq!(p.properties.as_ref().and_then(|pp| pp.topic_alias), None);
    // Tab 2 never set alias 1.
    let out = from_tab(&mut m, 2, &with_alias("", 1), now);
    assert!(matches!(
        &to_tab(Level::V5, &out, 2)[..],
        [Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::ProtocolError,
            ..
        })]
    ));
    assert_eq!(closed(&out, 2), Some(Cause::ProtocolError));
    // Above the maximum.
    let out = from_tab(&mut m, 1, &with_alias("x", 11), now);
    assert!(matches!(
        &to_tab(Level::V5, &out, 1)[..],
        [Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::TopicAliasInvalid,
            ..
        })]
    ));
}

#[test]
fn the_server_s_receive_maximum_holds_for_the_session_and_a_tab_past_its_quota_is_answered_0x97() {
    let now = Instant::now();
    let mut m = session(Level::V5, 2, 0, server_ack(Some(1), None), now);
    let out = from_tab(
        &mut m,
        1,
        &Packet::Publish(publish("a", QoS::AtLeastOnce, 7)),
        now,
    );
    let up = upstream(Level::V5, &out);
    let Packet::Publish(first) = &up[0] else {
        panic!()
    };
    let out = from_tab(
        &mut m,
        2,
        &Packet::Publish(publish("b", QoS::AtLeastOnce, 7)),
        now,
    );
    assert!(upstream(Level::V5, &out).is_empty(), "waits for the quota");
    // Tab 1 has one on its way: a second is past the Receive Maximum it was given.
    let out = from_tab(
        &mut m,
        1,
        &Packet::Publish(publish("c", QoS::AtLeastOnce, 8)),
        now,
    );
    assert!(matches!(
        &to_tab(Level::V5, &out, 1)[..],
        [Packet::PubAck(PubAck {
            pkid: 8,
            reason: PubAckReason::QuotaExceeded,
            ..
        })]
    ));
    let out = from_upstream(&mut m, &Packet::PubAck(PubAck::new(first.pkid, None)));
    assert!(matches!(
        &to_tab(Level::V5, &out, 1)[..],
        [Packet::PubAck(PubAck { pkid: 7, .. })]
    ));
    let up = upstream(Level::V5, &out);
    assert!(
        matches!(&up[..], [Packet::Publish(p)] if &p.topic[..] == b"b"),
        "{up:?}"
    );
}

#[test]
fn filters_beyond_a_tab_s_share_are_refused_in_its_suback() {
    let now = Instant::now();
    for level in [Level::V4, Level::V5] {
        let mut m = session(level, 1, 0, server_ack(None, None), now);
        for i in 0..MAX_TAB_FILTERS {
            let out = from_tab(&mut m, 1, &subscribe(1, &format!("f/{i}")), now);
            let Packet::Subscribe(s) = &upstream(level, &out)[0] else {
                panic!()
            };
            from_upstream(
                &mut m,
                &Packet::SubAck(rumqttc::v5::mqttbytes::v5::SubAck {
                    pkid: s.pkid,
                    return_codes: vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
                    properties: None,
                }),
            );
        }
        let out = from_tab(&mut m, 1, &subscribe(2, "one/more"), now);
        assert!(upstream(level, &out).is_empty());
        let Packet::SubAck(s) = &to_tab(level, &out, 1)[0] else {
            panic!()
        };
        let expected = match level {
            Level::V4 => SubscribeReasonCode::Failure,
            Level::V5 => SubscribeReasonCode::QuotaExceeded,
        };
        assert_eq!(s.return_codes, vec![expected]);
        assert!(out.contains(&Effect::Refused(Refused::TabFilters)));
    }
}

#[test]
fn packets_sent_before_the_connack_are_acted_on_once_it_comes() {
    let now = Instant::now();
    let mut m = machine(Level::V4);
    let mut out = Vec::new();
    let mut bytes = hello(Level::V4, "a", 0, None).to_vec();
    bytes.extend_from_slice(&codec::write(Level::V4, &subscribe(3, "early")));
    m.tab_placed(t(1), &bytes, now, &mut out);
    assert_eq!(upstream(Level::V4, &out).len(), 1, "the CONNECT alone");
    let out = from_upstream(&mut m, &server_ack(None, None));
    assert!(
        matches!(&upstream(Level::V4, &out)[..], [Packet::Subscribe(s)] if s.filters[0].path == "early")
    );
    assert!(matches!(
        &to_tab(Level::V4, &out, 1)[..],
        [Packet::ConnAck(_)]
    ));
}

#[test]
fn what_the_session_keeps_is_counted() {
    let now = Instant::now();
    let mut m = session(Level::V4, 1, 0, server_ack(None, None), now);
    let before = m.held();
    // Half a packet waits in the tab's stream.
    let mut out = Vec::new();
    let p = codec::write(
        Level::V4,
        &Packet::Publish(publish(&"t".repeat(5000), QoS::AtMostOnce, 0)),
    );
    m.tab_sent(t(1), Message::Binary(p.slice(..3000)), || now, &mut out)
        .unwrap();
    assert!(m.held() >= before + 3000, "{} {}", m.held(), before);
    m.tab_sent(t(1), Message::Binary(p.slice(3000..)), || now, &mut out)
        .unwrap();
    assert!(m.held() < before + 3000);
}

#[test]
fn every_packet_of_a_message_counts_against_the_rate() {
    let now = Instant::now();
    let mut m = session(Level::V4, 1, 0, server_ack(None, None), now);
    let ping = codec::write(
        Level::V4,
        &Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq),
    );
    let three = [&ping[..], &ping[..], &ping[..]].concat();
    let mut out = Vec::new();
    m.tab_sent(t(1), Message::Binary(three.into()), || now, &mut out)
        .unwrap();
    assert_eq!(m.take_extra_packets(), 2);
    assert_eq!(to_tab(Level::V4, &out, 1).len(), 3, "three PINGRESPs");
    // Half a packet, then its rest: one packet, no extra.
    m.tab_sent(t(1), Message::Binary(ping.slice(..1)), || now, &mut out)
        .unwrap();
    m.tab_sent(t(1), Message::Binary(ping.slice(1..)), || now, &mut out)
        .unwrap();
    assert_eq!(m.take_extra_packets(), 0);
}

#[test]
fn tabs_waiting_for_the_server_s_connack_get_it_as_sent_and_only_the_first_its_assigned_id() {
    let now = Instant::now();
    let mut m = machine(Level::V5);
    let mut out = Vec::new();
    m.tab_placed(t(1), &hello(Level::V5, "", 0, None), now, &mut out);
    m.tab_placed(t(2), &hello(Level::V5, "", 0, None), now, &mut out);
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
        properties: Some(ConnAckProperties {
            assigned_client_identifier: Some("auto-1".into()),
            response_information: Some("r".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..empty_connack_properties()
        }),
    });
    let out = from_upstream(&mut m, &ack);
    let Packet::ConnAck(first) = &to_tab(Level::V5, &out, 1)[0] else {
        panic!()
    };
    assert_eq!(
        first,
        &match ack {
            Packet::ConnAck(a) => a,
            _ => unreachable!(),
        }
    );
    let Packet::ConnAck(second) = &to_tab(Level::V5, &out, 2)[0] else {
        panic!()
    };
    let p = second.properties.as_ref().unwrap();
    assert_eq!(p.assigned_client_identifier.as_deref(), Some("tabmux-t2"));
    assert_eq!(
        p.response_information.as_deref(),
        Some("r"),
        "as the server sent it"
    );
    assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
}

#[test]
fn a_will_the_server_would_refuse_is_refused_at_the_connect_to_that_tab_alone() {
    let now = Instant::now();
    let mut qos2 = will(None);
    qos2.qos = QoS::ExactlyOnce;
    // 3.1.1 with max_qos 1: closed without a CONNACK, nothing upstream.
    let mut m = machine(Level::V4);
    m.settings.max_qos = 1;
    let mut out = Vec::new();
    m.tab_placed(
        t(1),
        &hello(Level::V4, "a", 0, Some(qos2.clone())),
        now,
        &mut out,
    );
    assert!(upstream(Level::V4, &out).is_empty());
    assert!(to_tab(Level::V4, &out, 1).is_empty());
    assert_eq!(closed(&out, 1), Some(Cause::ProtocolError));
    // 5.0: the server's Maximum QoS 1 and Retain Available 0, in its CONNACK.
    let mut m = session(
        Level::V5,
        1,
        0,
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: Some(ConnAckProperties {
                max_qos: Some(1),
                retain_available: Some(0),
                ..empty_connack_properties()
            }),
        }),
        now,
    );
    let mut retained = will(None);
    retained.retain = true;
    for (n, w, code) in [
        (2, qos2, ConnectReturnCode::QoSNotSupported),
        (3, retained, ConnectReturnCode::RetainNotSupported),
    ] {
        let mut out = Vec::new();
        m.tab_placed(t(n), &hello(Level::V5, "b", 0, Some(w)), now, &mut out);
        assert!(
            matches!(&to_tab(Level::V5, &out, n)[..], [Packet::ConnAck(a)] if a.code == code),
            "{out:?}"
        );
        assert!(closed(&out, n).is_some());
        let mut out = Vec::new();
        m.tab_left(t(n), 1000, now, &mut out);
        assert!(upstream(Level::V5, &out).is_empty(), "no will published");
    }
}

#[test]
fn an_idle_tab_s_record_stays_small() {
    // Inline in its session's map for every idle tab of the process (its
    // flows are boxed once it has any): BENCHMARKS.md, "Thirteenth pass".
    assert!(
        std::mem::size_of::<TabMq>() <= 136,
        "{}",
        std::mem::size_of::<TabMq>()
    );
}

#[test]
fn a_server_that_answers_nothing_for_a_keepalive_after_a_pingreq_is_lost() {
    let start = Instant::now();
    for answered in [false, true] {
        let mut m = session(Level::V4, 1, 10, server_ack(None, None), start);
        let at = m.next_deadline(start).unwrap();
        let mut out = Vec::new();
        m.on_timeout(at, &mut out);
        assert!(matches!(
            upstream(Level::V4, &out)[..],
            [Packet::PingReq(_)]
        ));
        if answered {
            from_upstream(
                &mut m,
                &Packet::PingResp(rumqttc::v5::mqttbytes::v5::PingResp),
            );
        }
        // Deadlines until a keepalive after the PINGREQ.
        let mut now = at;
        while now < at + Duration::from_secs(10) {
            now = m.next_deadline(now).unwrap();
            m.on_timeout(now, &mut out);
        }
        assert_eq!(m.upstream_silent(), !answered, "answered: {answered}");
    }
}

#[test]
fn a_server_that_sends_what_is_not_a_packet_is_lost_at_once() {
    let now = Instant::now();
    let mut m = session(Level::V4, 1, 0, server_ack(None, None), now);
    let mut out = Vec::new();
    // A packet type 0 with a remaining length of five bytes of 0x80.
    m.upstream_frame(
        Message::Binary(vec![0x30, 0x80, 0x80, 0x80, 0x80, 0x01].into()),
        &mut out,
    );
    assert!(matches!(out[..], [Effect::Malformed(_)]));
    assert_eq!(m.next_deadline(now), Some(now), "at once");
    m.on_timeout(now, &mut out);
    assert!(m.upstream_silent());
}
