//! docs/protocol.md, "The `mqtt` envelope", through the real proxy in front of a real
//! broker: Debian's mosquitto, started by each test on free ports (a TCP
//! listener for the outside publisher, a websockets one for tabmux), at both
//! protocol levels. `.ci/run` installs mosquitto and runs these:
//! `cargo test --test mqtt -- --ignored`.

mod common;

use common::mqtt::*;
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Packet, PubRel, RetainForwardRule,
    Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tabmux::envelope::mqtt::codec::Level;

const LEVELS: [Level; 2] = [Level::V4, Level::V5];

async fn mqtt_proxy(broker: &Broker) -> TestProxy {
    mqtt_proxy_with(broker, |r| r).await
}

async fn mqtt_proxy_with(broker: &Broker, f: impl FnOnce(RouteConfig) -> RouteConfig) -> TestProxy {
    let route = route_to("/mqtt", broker.ws)
        .upstream(&broker.url())
        .envelope("mqtt");
    proxy().route(f(route)).start().await
}

fn suback_codes(p: &Packet) -> Vec<SubscribeReasonCode> {
    match p {
        Packet::SubAck(s) => s.return_codes.clone(),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Subscribes a tab and waits for its SUBACK.
async fn subscribed(
    tab: &mut Client,
    pkid: u16,
    filter: &str,
    qos: QoS,
) -> Vec<SubscribeReasonCode> {
    tab.send(&subscribe(pkid, filter, qos)).await;
    let p = tab.recv().await;
    match &p {
        Packet::SubAck(s) => assert_eq!(s.pkid, pkid, "the tab's own packet id"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    suback_codes(&p)
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn tabs_that_share_a_fixed_client_id_share_one_connection_and_each_receives_once() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let spec = mqtt_tab("b");
        let mut tabs = Vec::new();
        for _ in 0..4 {
            let (mut tab, ack) =
                Client::connected(&proxy, &spec, Hello::new(level, "fixed-id")).await;
            assert_eq!(ack.code, ConnectReturnCode::Success);
            assert!(!ack.session_present);
            assert_eq!(
                subscribed(&mut tab, 7, "news/#", QoS::AtMostOnce).await,
                vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
            );
            tabs.push(tab);
        }
        assert_eq!(
            broker.connections(),
            1,
            "{level:?}: one connection for four tabs"
        );
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        outside
            .send(&publish("news/a", "hello", QoS::AtMostOnce, 0))
            .await;
        for tab in &mut tabs {
            let p = tab.recv_publish().await;
            assert_eq!(&p.topic[..], b"news/a");
            assert_eq!(&p.payload[..], b"hello");
            assert!(!p.retain);
        }
        // Exactly once each: a ping's answer comes next, not a copy.
        for tab in &mut tabs {
            tab.send(&Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
                .await;
            assert!(matches!(tab.recv().await, Packet::PingResp(_)), "{level:?}");
        }
        assert_eq!(
            broker.count("Sending PUBLISH to fixed-id"),
            1,
            "{level:?}: the broker sent it once"
        );
        assert_eq!(
            broker.count("PINGREQ"),
            0,
            "{level:?}: pings answered by tabmux"
        );
        assert_eq!(
            broker.connections(),
            2,
            "{level:?}: no takeover, no reconnect"
        );
    }
}

/// Asks a ping and expects its answer next: nothing else was sent to the
/// tab before it.
async fn nothing_more(tab: &mut Client, what: &str) {
    tab.send(&Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    match tab.recv().await {
        Packet::PingResp(_) => {}
        other => panic!("{what}: expected nothing more, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_later_tab_is_answered_by_tabmux_with_the_server_s_limits_and_a_client_id_of_its_own() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy(&broker).await;
    let spec = mqtt_tab("b");
    let (_first, server) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "")).await;
    let props = server
        .properties
        .clone()
        .expect("mosquitto's CONNACK properties");
    let assigned = props.assigned_client_identifier.clone();
    assert!(assigned.is_some(), "the server assigned the first tab's id");
    let (_later, ack) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "")).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present);
    let mine = ack.properties.expect("the server's limits");
    assert_eq!(mine.topic_alias_max, props.topic_alias_max);
    assert_eq!(mine.receive_max, props.receive_max);
    assert_eq!(mine.max_qos, props.max_qos);
    assert_eq!(mine.retain_available, props.retain_available);
    let own = mine
        .assigned_client_identifier
        .expect("an id of tabmux's own");
    assert_ne!(Some(own), assigned, "unique in the session");
    assert_eq!(broker.connections(), 1);

    // 3.1.1: an empty client id with a persistent session is refused, as
    // the server refuses it (CONNACK 2), to that tab alone.
    let spec = mqtt_tab("c");
    let (mut ok, _) = Client::connected(&proxy, &spec, Hello::new(Level::V4, "x")).await;
    let mut hello = Hello::new(Level::V4, "");
    hello.clean = false;
    let (mut refused, ack) = Client::connected(&proxy, &spec, hello).await;
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    refused.ended().await;
    nothing_more(&mut ok, "the sibling").await;
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_later_tab_gets_the_retained_messages_and_no_other_tab_gets_them_again() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        let mut kept = match publish("r/1", "kept", QoS::AtLeastOnce, 1) {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        };
        kept.retain = true;
        outside.send(&Packet::Publish(kept)).await;
        assert!(matches!(outside.recv().await, Packet::PubAck(_)));
        let spec = mqtt_tab("b");
        let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        subscribed(&mut a, 1, "r/#", QoS::AtLeastOnce).await;
        let r = a.recv_publish().await;
        assert!(r.retain, "{level:?}: the first tab's retained copy");
        a.puback(r.pkid).await;
        let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        subscribed(&mut b, 1, "r/#", QoS::AtLeastOnce).await;
        let r = b.recv_publish().await;
        assert!(r.retain, "{level:?}: the later tab's retained copy");
        assert_eq!(&r.payload[..], b"kept");
        b.puback(r.pkid).await;
        nothing_more(&mut a, "the first tab gets no second retained copy").await;
        assert_eq!(
            broker.count("Received SUBSCRIBE from id"),
            2,
            "{level:?}: an identical SUBSCRIBE again"
        );
        // A live message reaches both, with RETAIN 0.
        outside
            .send(&publish("r/1", "live", QoS::AtMostOnce, 0))
            .await;
        for tab in [&mut a, &mut b] {
            let p = tab.recv_publish().await;
            assert_eq!(&p.payload[..], b"live");
            assert!(!p.retain);
        }
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_tab_that_unsubscribes_stops_receiving_and_the_filter_goes_upstream_with_the_last() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let spec = mqtt_tab("b");
        let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        subscribed(&mut a, 1, "u/1", QoS::AtMostOnce).await;
        subscribed(&mut b, 1, "u/1", QoS::AtMostOnce).await;
        a.send(&unsubscribe(2, "u/1")).await;
        match a.recv().await {
            Packet::UnsubAck(u) => {
                assert_eq!(u.pkid, 2);
                if level == Level::V5 {
                    assert_eq!(
                        u.reasons,
                        vec![rumqttc::v5::mqttbytes::v5::UnsubAckReason::Success]
                    );
                }
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        outside.send(&publish("u/1", "m", QoS::AtMostOnce, 0)).await;
        assert_eq!(&b.recv_publish().await.payload[..], b"m");
        nothing_more(&mut a, "the tab that unsubscribed").await;
        assert_eq!(
            broker.count("Received UNSUBSCRIBE from id"),
            0,
            "{level:?}: a sibling holds it"
        );
        if level == Level::V5 {
            a.send(&unsubscribe(3, "u/1")).await;
            match a.recv().await {
                Packet::UnsubAck(u) => assert_eq!(
                    u.reasons,
                    vec![rumqttc::v5::mqttbytes::v5::UnsubAckReason::NoSubscriptionExisted]
                ),
                other => panic!("expected UNSUBACK, got {other:?}"),
            }
        }
        b.send(&unsubscribe(9, "u/1")).await;
        assert!(matches!(b.recv().await, Packet::UnsubAck(_)));
        broker.wait_count("Received UNSUBSCRIBE from id", 1).await;
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn colliding_packet_ids_are_each_tab_s_own_and_a_dup_resend_goes_upstream_once() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        outside.send(&subscribe(1, "c/#", QoS::AtMostOnce)).await;
        assert!(matches!(outside.recv().await, Packet::SubAck(_)));
        let spec = mqtt_tab("b");
        let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        // Both use packet id 1 at once.
        a.send(&publish("c/a", "from a", QoS::AtLeastOnce, 1)).await;
        b.send(&publish("c/b", "from b", QoS::AtLeastOnce, 1)).await;
        for tab in [&mut a, &mut b] {
            match tab.recv().await {
                Packet::PubAck(p) => assert_eq!(p.pkid, 1),
                other => panic!("expected PUBACK, got {other:?}"),
            }
            nothing_more(tab, "one PUBACK each").await;
        }
        let mut got = [outside.recv_publish().await, outside.recv_publish().await];
        got.sort_by(|x, y| x.topic.cmp(&y.topic));
        assert_eq!(&got[0].payload[..], b"from a");
        assert_eq!(&got[1].payload[..], b"from b");
        // QoS 2, resent before its PUBREL: PUBREC again, upstream once.
        let mut q2 = match publish("c/q2", "exactly once", QoS::ExactlyOnce, 5) {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        };
        a.send(&Packet::Publish(q2.clone())).await;
        assert!(matches!(a.recv().await, Packet::PubRec(r) if r.pkid == 5));
        q2.dup = true;
        a.send(&Packet::Publish(q2)).await;
        assert!(
            matches!(a.recv().await, Packet::PubRec(r) if r.pkid == 5),
            "{level:?}: PUBREC again"
        );
        a.send(&Packet::PubRel(PubRel::new(5, None))).await;
        assert!(matches!(a.recv().await, Packet::PubComp(c) if c.pkid == 5));
        assert_eq!(&outside.recv_publish().await.payload[..], b"exactly once");
        b.send(&publish("c/end", "end", QoS::AtMostOnce, 0)).await;
        assert_eq!(
            &outside.recv_publish().await.payload[..],
            b"end",
            "{level:?}: the QoS 2 message once"
        );
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_tab_that_acks_late_gets_the_rest_within_its_receive_maximum() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy(&broker).await;
    let spec = mqtt_tab("b");
    let mut hello = Hello::new(Level::V5, "id");
    hello.properties = Some(rumqttc::v5::mqttbytes::v5::ConnectProperties {
        receive_maximum: Some(1),
        ..tabmux::envelope::mqtt::empty_connect_properties()
    });
    let (mut slow, _) = Client::connected(&proxy, &spec, hello).await;
    let (mut quick, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "id")).await;
    subscribed(&mut slow, 1, "q/#", QoS::AtLeastOnce).await;
    subscribed(&mut quick, 1, "q/#", QoS::AtLeastOnce).await;
    let mut outside = Client::tcp(&broker, Hello::new(Level::V5, "outside")).await;
    for (i, text) in ["1", "2", "3"].iter().enumerate() {
        outside
            .send(&publish("q/x", text, QoS::AtLeastOnce, i as u16 + 1))
            .await;
        assert!(matches!(outside.recv().await, Packet::PubAck(_)));
    }
    // The quick tab has all three; the slow one one at a time.
    for text in ["1", "2", "3"] {
        let p = quick.recv_publish().await;
        assert_eq!(&p.payload[..], text.as_bytes());
        quick.puback(p.pkid).await;
    }
    for text in ["1", "2", "3"] {
        let p = slow.recv_publish().await;
        assert_eq!(&p.payload[..], text.as_bytes());
        assert_eq!(p.qos, QoS::AtLeastOnce);
        nothing_more(&mut slow, "beyond its Receive Maximum").await;
        slow.puback(p.pkid).await;
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_tab_s_will_is_published_when_it_vanishes_and_not_when_it_disconnects() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        outside.send(&subscribe(1, "w/#", QoS::AtMostOnce)).await;
        assert!(matches!(outside.recv().await, Packet::SubAck(_)));
        let spec = mqtt_tab("b");
        let will = |t: &str| Hello::new(level, "id").will(t, "gone", QoS::AtMostOnce);
        let (keeper, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        let (a, _) = Client::connected(&proxy, &spec, will("w/a")).await;
        let (mut b, _) = Client::connected(&proxy, &spec, will("w/b")).await;
        let (c, _) = Client::connected(&proxy, &spec, will("w/c")).await;
        a.abort();
        assert_eq!(&outside.recv_publish().await.topic[..], b"w/a", "{level:?}");
        b.send(&Packet::Disconnect(Disconnect::new(
            DisconnectReasonCode::NormalDisconnection,
        )))
        .await;
        assert_eq!(
            b.ended().await,
            "1000 ",
            "{level:?}: DISCONNECT closes the tab with 1000"
        );
        c.close().await;
        assert_eq!(
            &outside.recv_publish().await.topic[..],
            b"w/c",
            "{level:?}: b's will was never published"
        );
        assert_eq!(
            broker.connections(),
            2,
            "{level:?}: the session's connection stayed"
        );
        drop(keeper);
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn what_the_server_would_refuse_is_refused_to_that_tab_alone() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy_with(&broker, |r| r.set("max_qos", 1u64)).await;
        let spec = mqtt_tab("b");
        let (mut sibling, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        subscribed(&mut sibling, 1, "ok/#", QoS::AtMostOnce).await;
        let cases: Vec<(Vec<u8>, DisconnectReasonCode)> = vec![
            (
                tabmux::envelope::mqtt::codec::write(
                    level,
                    &publish("a/+", "x", QoS::AtMostOnce, 0),
                )
                .to_vec(),
                DisconnectReasonCode::ProtocolError,
            ),
            (
                tabmux::envelope::mqtt::codec::write(
                    level,
                    &publish("a", "x", QoS::ExactlyOnce, 3),
                )
                .to_vec(),
                DisconnectReasonCode::QoSNotSupported,
            ),
            // A PUBLISH whose topic length runs past its end.
            (
                vec![0x30, 0x03, 0x00, 0x09, b'a'],
                DisconnectReasonCode::MalformedPacket,
            ),
            // A SUBSCRIBE with an invalid filter.
            (
                tabmux::envelope::mqtt::codec::write(
                    level,
                    &subscribe(4, "a/#/b", QoS::AtMostOnce),
                )
                .to_vec(),
                DisconnectReasonCode::MalformedPacket,
            ),
        ];
        for (bytes, code) in cases {
            let (mut tab, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
            tab.send_bytes(&bytes).await;
            if level == Level::V5 {
                match tab.recv().await {
                    Packet::Disconnect(d) => assert_eq!(d.reason_code, code),
                    other => panic!("expected DISCONNECT {code:?}, got {other:?}"),
                }
            }
            assert_eq!(
                tab.ended().await,
                "1002 protocol error",
                "{level:?} {code:?}"
            );
            nothing_more(&mut sibling, "the sibling").await;
        }
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        outside
            .send(&publish("ok/1", "still here", QoS::AtMostOnce, 0))
            .await;
        assert_eq!(&sibling.recv_publish().await.payload[..], b"still here");
        assert_eq!(
            broker.connections(),
            2,
            "{level:?}: the session's connection was never closed"
        );
        assert_eq!(broker.count("disconnected"), 0, "{level:?}");
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn user_names_split_sessions_and_a_refused_connect_leaves_no_session() {
    let users = vec![
        ("alice".to_string(), "a-pass".to_string()),
        ("bob".to_string(), "b-pass".to_string()),
    ];
    let broker = Broker::start_with(BrokerSpec {
        users,
        ..Default::default()
    })
    .await;
    let proxy = mqtt_proxy(&broker).await;
    for level in LEVELS {
        let spec = mqtt_tab(&format!("browser-{level:?}"));
        let alice = || Hello::new(level, &format!("alice-{level:?}")).login("alice", "a-pass");
        let (mut a1, _) = Client::connected(&proxy, &spec, alice()).await;
        let (mut a2, _) = Client::connected(&proxy, &spec, alice()).await;
        let (mut b, ack) = Client::connected(
            &proxy,
            &spec,
            Hello::new(level, "bob-id").login("bob", "b-pass"),
        )
        .await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        for tab in [&mut a1, &mut a2, &mut b] {
            subscribed(tab, 1, "t", QoS::AtMostOnce).await;
        }
        let (mut wrong, ack) =
            Client::connected(&proxy, &spec, Hello::new(level, "x").login("alice", "nope")).await;
        assert_ne!(ack.code, ConnectReturnCode::Success, "{level:?}");
        wrong.ended().await;
        let mut outside =
            Client::tcp(&broker, Hello::new(level, "outside").login("bob", "b-pass")).await;
        outside.send(&publish("t", "m", QoS::AtMostOnce, 0)).await;
        for tab in [&mut a1, &mut a2, &mut b] {
            assert_eq!(&tab.recv_publish().await.payload[..], b"m");
        }
        drop(outside);
    }
    // Per level: alice's session, bob's, the refused one and the outside
    // client.
    assert_eq!(broker.count("New client connected"), 6);
    assert_eq!(
        broker.count("as alice-"),
        2,
        "one connection per user and level"
    );
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn on_5_0_a_tab_s_message_reaches_its_siblings_through_tabmux() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy(&broker).await;
    let spec = mqtt_tab("b");
    let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "id")).await;
    let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "id")).await;
    subscribed(&mut a, 1, "s/#", QoS::AtLeastOnce).await;
    b.send(&subscribe_with(
        1,
        "s/+",
        QoS::AtLeastOnce,
        RetainForwardRule::OnEverySubscribe,
        Some(42),
    ))
    .await;
    b.recv().await;
    a.send(&publish("s/1", "hi", QoS::AtLeastOnce, 9)).await;
    let mut to_a = a.until(|p| matches!(p, Packet::Publish(_))).await;
    assert!(
        to_a.iter()
            .any(|p| matches!(p, Packet::PubAck(x) if x.pkid == 9))
            || matches!(a.recv().await, Packet::PubAck(x) if x.pkid == 9)
    );
    let own = match to_a.pop() {
        Some(Packet::Publish(p)) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        &own.payload[..],
        b"hi",
        "the sender's own subscription did not ask No Local"
    );
    let p = b.recv_publish().await;
    assert_eq!(&p.payload[..], b"hi");
    assert_eq!(
        p.properties.map(|pp| pp.subscription_identifiers),
        Some(vec![42]),
        "the tab's own Subscription Identifier"
    );
    assert_eq!(
        broker.count("Sending PUBLISH to id"),
        0,
        "the server did not send it back"
    );
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn session_limits_at_the_connect_answer_connack_and_close_with_1013() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy_with(&broker, |r| r.max_tabs_per_session(1)).await;
    for level in LEVELS {
        let spec = mqtt_tab(&format!("limit-{level:?}"));
        let (_one, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        let (mut two, ack) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        match level {
            Level::V4 => assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable),
            Level::V5 => {
                assert_eq!(ack.code, ConnectReturnCode::QuotaExceeded);
                let reason = ack
                    .properties
                    .and_then(|p| p.reason_string)
                    .unwrap_or_default();
                assert!(reason.contains("max_tabs_per_session"), "{reason}");
            }
        }
        assert!(two.ended().await.starts_with("1013"), "{level:?}");
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_connect_in_many_messages_is_read_whole_and_none_in_time_is_1008() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy_with(&broker, |r| r.set("init_timeout", "300ms")).await;
    let spec = mqtt_tab("b");
    let mut tab = Client::tab(&proxy, &spec, Level::V5).await;
    let hello = Hello::new(Level::V5, "bytes").login("u", "p");
    let bytes = tabmux::envelope::mqtt::codec::write(Level::V5, &hello.packet());
    for byte in bytes.iter() {
        tab.send_bytes(&[*byte]).await;
    }
    assert!(matches!(tab.recv().await, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success));
    let mut silent = Client::tab(&proxy, &spec, Level::V5).await;
    assert_eq!(silent.ended().await, "1008 no CONNECT");
    let mut wrong = Client::tab(&proxy, &spec, Level::V4).await;
    wrong.send(&subscribe(1, "a", QoS::AtMostOnce)).await;
    assert!(wrong.ended().await.starts_with("1002"));
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_lost_broker_closes_every_tab_with_1012() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let spec = mqtt_tab("b");
        let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        drop(broker);
        assert_eq!(a.ended().await, "1012 upstream lost");
        assert_eq!(b.ended().await, "1012 upstream lost");
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn on_5_0_topic_aliases_are_resolved_per_tab_and_retain_handling_2_is_answered_by_tabmux() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy(&broker).await;
    let spec = mqtt_tab("b");
    let (mut a, ack) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "id")).await;
    let max = ack.properties.and_then(|p| p.topic_alias_max).unwrap_or(0);
    assert!(max >= 1, "mosquitto gives topic aliases ({max})");
    let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "id")).await;
    let mut outside = Client::tcp(&broker, Hello::new(Level::V5, "outside")).await;
    outside.send(&subscribe(1, "al/#", QoS::AtMostOnce)).await;
    assert!(matches!(outside.recv().await, Packet::SubAck(_)));
    let aliased = |topic: &str, payload: &str| {
        let Packet::Publish(mut p) = publish(topic, payload, QoS::AtMostOnce, 0) else {
            unreachable!()
        };
        p.properties = Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
            payload_format_indicator: None,
            message_expiry_interval: None,
            topic_alias: Some(1),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
            subscription_identifiers: Vec::new(),
            content_type: None,
        });
        Packet::Publish(p)
    };
    a.send(&aliased("al/one", "set")).await;
    a.send(&aliased("", "used")).await;
    for payload in ["set", "used"] {
        let p = outside.recv_publish().await;
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"al/one"[..], payload.as_bytes())
        );
    }
    // b never set alias 1: refused to b alone.
    b.send(&aliased("", "nope")).await;
    assert!(
        matches!(b.recv().await, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::ProtocolError)
    );
    b.ended().await;
    // Retain Handling 2 for a filter the session holds: no SUBSCRIBE upstream.
    subscribed(&mut a, 2, "al/#", QoS::AtMostOnce).await;
    let (mut c, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "id")).await;
    c.send(&subscribe_with(
        3,
        "al/#",
        QoS::AtMostOnce,
        RetainForwardRule::Never,
        None,
    ))
    .await;
    assert_eq!(
        suback_codes(&c.recv().await),
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(broker.count("Received SUBSCRIBE from id"), 1);
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn on_3_1_1_a_tab_s_message_comes_back_from_the_broker_once_to_each_subscribed_tab() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy(&broker).await;
    let spec = mqtt_tab("b");
    let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(Level::V4, "id")).await;
    let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(Level::V4, "id")).await;
    subscribed(&mut a, 1, "s/#", QoS::AtMostOnce).await;
    subscribed(&mut b, 1, "s/1", QoS::AtMostOnce).await;
    a.send(&publish("s/1", "hi", QoS::AtMostOnce, 0)).await;
    for tab in [&mut a, &mut b] {
        assert_eq!(&tab.recv_publish().await.payload[..], b"hi");
        nothing_more(tab, "once").await;
    }
    broker.wait_count("Sending PUBLISH to id", 1).await;
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_qos_2_message_to_a_tab_is_its_own_exchange() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let spec = mqtt_tab("b");
        let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(level, "id")).await;
        subscribed(&mut a, 1, "x", QoS::ExactlyOnce).await;
        subscribed(&mut b, 1, "x", QoS::AtMostOnce).await;
        let mut outside = Client::tcp(&broker, Hello::new(level, "outside")).await;
        outside
            .send(&publish("x", "twice?", QoS::ExactlyOnce, 1))
            .await;
        assert!(matches!(outside.recv().await, Packet::PubRec(_)));
        outside.send(&Packet::PubRel(PubRel::new(1, None))).await;
        assert!(matches!(outside.recv().await, Packet::PubComp(_)));
        let p = a.recv_publish().await;
        assert_eq!(p.qos, QoS::ExactlyOnce, "{level:?}");
        let q = b.recv_publish().await;
        assert_eq!(q.qos, QoS::AtMostOnce, "{level:?}: the lower of the grants");
        a.send(&Packet::PubRec(rumqttc::v5::mqttbytes::v5::PubRec::new(
            p.pkid, None,
        )))
        .await;
        assert!(matches!(a.recv().await, Packet::PubRel(r) if r.pkid == p.pkid));
        a.send(&Packet::PubComp(rumqttc::v5::mqttbytes::v5::PubComp::new(
            p.pkid, None,
        )))
        .await;
        nothing_more(&mut a, "the exchange is over").await;
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_silent_tab_is_closed_and_its_will_published_and_a_delayed_will_waits() {
    let broker = Broker::start().await;
    let proxy = mqtt_proxy(&broker).await;
    let mut outside = Client::tcp(&broker, Hello::new(Level::V5, "outside")).await;
    outside.send(&subscribe(1, "w/#", QoS::AtMostOnce)).await;
    assert!(matches!(outside.recv().await, Packet::SubAck(_)));
    let spec = mqtt_tab("b");
    let (_keeper, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "keeper")).await;
    // Keepalive 1 s: silent, it is closed after 1.5 s.
    let mut silent = Hello::new(Level::V5, "silent").will("w/silent", "gone", QoS::AtMostOnce);
    silent.keep_alive = 1;
    let (mut s, _) = Client::connected(&proxy, &spec, silent).await;
    assert_eq!(s.ended().await, "1001 idle timeout");
    assert_eq!(&outside.recv_publish().await.topic[..], b"w/silent");
    // A will delayed 1 s comes after its tab vanished.
    let mut delayed = Hello::new(Level::V5, "delayed").will("w/delayed", "gone", QoS::AtMostOnce);
    if let Some(w) = &mut delayed.will {
        w.properties = Some(rumqttc::v5::mqttbytes::v5::LastWillProperties {
            delay_interval: Some(1),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
    }
    let (d, _) = Client::connected(&proxy, &spec, delayed).await;
    d.abort();
    assert_eq!(&outside.recv_publish().await.topic[..], b"w/delayed");
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn a_tab_s_share_of_filters_is_256_and_the_rest_of_its_subscribe_is_served() {
    for level in LEVELS {
        let broker = Broker::start().await;
        let proxy = mqtt_proxy(&broker).await;
        let (mut tab, _) = Client::connected(&proxy, &mqtt_tab("b"), Hello::new(level, "id")).await;
        let filters: Vec<Filter> = (0..257)
            .map(|i| Filter {
                path: format!("f/{i}"),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        tab.send(&Packet::Subscribe(Subscribe {
            pkid: 1,
            filters,
            properties: None,
        }))
        .await;
        let codes = suback_codes(&tab.recv().await);
        assert_eq!(codes.len(), 257);
        assert!(codes[..256]
            .iter()
            .all(|c| *c == SubscribeReasonCode::Success(QoS::AtMostOnce)));
        let refused = match level {
            Level::V4 => SubscribeReasonCode::Failure,
            Level::V5 => SubscribeReasonCode::QuotaExceeded,
        };
        assert_eq!(codes[256], refused, "{level:?}");
        assert_eq!(broker.count("Received SUBSCRIBE from id"), 256, "{level:?}");
    }
}

#[tokio::test]
#[ignore = "needs mosquitto (.ci/run installs it)"]
async fn on_5_0_a_will_the_broker_would_refuse_is_refused_at_the_connect() {
    let spec = BrokerSpec {
        extra: vec!["max_qos 1".into(), "retain_available false".into()],
        ..Default::default()
    };
    let broker = Broker::start_with(spec).await;
    let proxy = mqtt_proxy(&broker).await;
    let tabs = mqtt_tab("b");
    let (mut first, ack) = Client::connected(&proxy, &tabs, Hello::new(Level::V5, "id")).await;
    let props = ack.properties.expect("the broker's limits");
    assert_eq!((props.max_qos, props.retain_available), (Some(1), Some(0)));
    let (mut high, ack) = Client::connected(
        &proxy,
        &tabs,
        Hello::new(Level::V5, "id").will("w", "x", QoS::ExactlyOnce),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::QoSNotSupported);
    high.ended().await;
    let mut retained = Hello::new(Level::V5, "id").will("w", "x", QoS::AtMostOnce);
    if let Some(w) = &mut retained.will {
        w.retain = true;
    }
    let (mut kept, ack) = Client::connected(&proxy, &tabs, retained).await;
    assert_eq!(ack.code, ConnectReturnCode::RetainNotSupported);
    kept.ended().await;
    // A PUBLISH above the broker's Maximum QoS: refused to that tab alone.
    let (mut qos2, _) = Client::connected(&proxy, &tabs, Hello::new(Level::V5, "id")).await;
    qos2.send(&publish("t", "x", QoS::ExactlyOnce, 1)).await;
    assert!(
        matches!(qos2.recv().await, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::QoSNotSupported)
    );
    nothing_more(&mut first, "the first tab").await;
    assert_eq!(broker.connections(), 1);
}
