//! docs/protocol.md, "The `mqtt` envelope", through the real proxy in front of a
//! mock server (exact packets and faults): the handshake answered at once,
//! the CONNECT the upstream receives, refused and lost upstreams, a
//! refused CONNECT, MQTT 3.1, sizes. The real broker is in tests/mqtt.rs.

mod common;

use std::sync::Arc;

use common::mqtt::*;
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet,
};
use rumqttc::v5::mqttbytes::QoS;
use tabmux::envelope::mqtt::codec::{self, Level};
use tokio_tungstenite::tungstenite::Message;

/// A broker that answers every CONNECT with `code` (and picks `mqtt`).
fn answering(level: Level, code: ConnectReturnCode) -> Behavior {
    Behavior {
        pick_first_protocol: true,
        reply: Some(Arc::new(move |m: &Message| {
            let Message::Binary(b) = m else { return None };
            (b.first().map(|x| x >> 4) == Some(1)).then(|| {
                let ack = Packet::ConnAck(ConnAck {
                    session_present: false,
                    code,
                    properties: None,
                });
                Message::Binary(codec::write(level, &ack))
            })
        })),
        ..Default::default()
    }
}

async fn mqtt_proxy(mock: &Mock) -> TestProxy {
    proxy()
        .route(
            route("/mqtt", mock)
                .envelope("mqtt")
                .max_message_size(4096u64),
        )
        .start()
        .await
}

fn decode(level: Level, frame: &Message) -> Packet {
    let Message::Binary(b) = frame else {
        panic!("not binary: {frame:?}")
    };
    codec::read(level, b.clone()).expect("a packet")
}

#[tokio::test]
async fn the_handshake_is_answered_at_once_and_the_upstream_gets_the_first_connect_rewritten() {
    for level in [Level::V4, Level::V5] {
        let mock = Mock::behaving(answering(level, ConnectReturnCode::Success)).await;
        let proxy = mqtt_proxy(&mock).await;
        let spec = mqtt_tab("b");
        let mut tab = Client::tab(&proxy, &spec, level).await;
        assert_eq!(mock.attempts(), 0, "nothing dialled before the CONNECT");
        let mut hello = Hello::new(level, "mine").will("w", "bye", QoS::AtLeastOnce);
        hello.clean = false;
        hello.keep_alive = 17;
        tab.send(&hello.packet()).await;
        assert!(
            matches!(tab.recv().await, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success)
        );
        let up = mock.upstream(0);
        let headers = up.headers().await;
        assert_eq!(headers["sec-websocket-protocol"], "mqtt");
        assert_eq!(headers["x-tabmux-envelope"], "mqtt");
        let Packet::Connect(connect, will, _) = decode(level, &up.frames(1).await[0]) else {
            panic!("expected CONNECT")
        };
        assert_eq!(connect.client_id, "mine");
        assert_eq!(connect.keep_alive, 17);
        assert!(connect.clean_start, "{level:?}: a clean session upstream");
        assert!(will.is_none(), "{level:?}: the will stays with tabmux");
        if level == Level::V5 {
            let p = connect.properties.expect("properties");
            assert_eq!(
                p.max_packet_size,
                Some(4096),
                "the route's max_message_size"
            );
            assert_eq!(p.topic_alias_max, None);
        }
    }
}

#[tokio::test]
async fn a_tab_that_offers_no_subprotocol_is_answered_with_none_and_one_that_offers_others_is_refused(
) {
    let mock = Mock::behaving(answering(Level::V4, ConnectReturnCode::Success)).await;
    let proxy = mqtt_proxy(&mock).await;
    let tab = mqtt_tab("b").connect(&proxy).await;
    assert_eq!(tab.protocol, None, "as mosquitto answers");
    let (status, body) = mqtt_tab("b")
        .header("sec-websocket-protocol", "graphql-ws")
        .refused(&proxy)
        .await;
    assert_eq!(status.as_u16(), 400);
    assert!(body.contains("mqtt"), "{body}");
}

#[tokio::test]
async fn a_refused_or_unreachable_upstream_answers_the_connect_as_a_broker_would() {
    for (level, status, expected) in [
        (Level::V4, Some(401), ConnectReturnCode::NotAuthorized),
        (Level::V5, Some(403), ConnectReturnCode::NotAuthorized),
        (Level::V4, Some(500), ConnectReturnCode::ServiceUnavailable),
        (Level::V5, Some(502), ConnectReturnCode::ServerUnavailable),
        (Level::V5, None, ConnectReturnCode::ServerUnavailable),
    ] {
        let mock = Mock::behaving(Behavior {
            refuse: status,
            ..Default::default()
        })
        .await;
        let proxy = match status {
            Some(_) => mqtt_proxy(&mock).await,
            // Nothing listens there.
            None => {
                let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = gone.local_addr().unwrap();
                drop(gone);
                proxy()
                    .route(route_to("/mqtt", addr).envelope("mqtt"))
                    .start()
                    .await
            }
        };
        let (mut tab, ack) =
            Client::connected(&proxy, &mqtt_tab("b"), Hello::new(level, "x")).await;
        assert_eq!(ack.code, expected, "{level:?} {status:?}");
        tab.ended().await;
    }
}

#[tokio::test]
async fn a_connect_the_broker_refuses_closes_the_waiting_tabs_and_leaves_no_session() {
    for level in [Level::V4, Level::V5] {
        let mock = Mock::behaving(answering(level, ConnectReturnCode::BadUserNamePassword)).await;
        let proxy = mqtt_proxy(&mock).await;
        let spec = mqtt_tab("b");
        let (mut tab, ack) =
            Client::connected(&proxy, &spec, Hello::new(level, "x").login("u", "bad")).await;
        assert_eq!(
            ack.code,
            ConnectReturnCode::BadUserNamePassword,
            "as the server sent it"
        );
        tab.ended().await;
        // The broker closes after a refusal; a CONNECT meanwhile is
        // answered with its refusal, and once the session is gone the next
        // one dials again.
        mock.upstream(0).close();
        // (A CONNECT that comes as the session ends may find it gone: its
        // tab is closed, 1001, and its client reconnects.)
        guard("a second dial", async {
            while mock.attempts() < 2 {
                let hello = Hello::new(level, "x").login("u", "bad");
                let mut again = Client::tab(&proxy, &spec, level).await;
                again.send(&hello.packet()).await;
                match again.next().await {
                    Ok(Packet::ConnAck(ack)) => {
                        assert_eq!(ack.code, ConnectReturnCode::BadUserNamePassword)
                    }
                    Ok(other) => panic!("expected CONNACK, got {other:?}"),
                    Err(end) => assert_eq!(end, "1001 going away"),
                }
                again.ended().await;
            }
        })
        .await;
    }
}

#[tokio::test]
async fn mqtt_3_1_is_answered_connack_1() {
    let mock = Mock::behaving(answering(Level::V4, ConnectReturnCode::Success)).await;
    let proxy = mqtt_proxy(&mock).await;
    let mut tab = Client::tab(&proxy, &mqtt_tab("b"), Level::V4).await;
    // CONNECT, protocol name MQIsdp, level 3, clean, keepalive 60, id "a".
    let mut connect = vec![0x10, 15, 0, 6];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[3, 2, 0, 60, 0, 1, b'a']);
    tab.send_bytes(&connect).await;
    assert!(
        matches!(tab.recv().await, Packet::ConnAck(a) if a.code == ConnectReturnCode::RefusedProtocolVersion)
    );
    tab.ended().await;
    assert_eq!(mock.attempts(), 0);
}

#[tokio::test]
async fn a_packet_over_the_size_allowed_closes_that_tab_alone() {
    let mock = Mock::behaving(answering(Level::V5, ConnectReturnCode::Success)).await;
    let proxy = mqtt_proxy(&mock).await;
    let spec = mqtt_tab("b");
    let (mut big, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "x")).await;
    let (mut sibling, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "x")).await;
    // Its header says 5000 bytes: refused before the rest comes.
    big.send_bytes(&[0x30, 0x88, 0x27, 0, 1, b'a']).await;
    match big.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::PacketTooLarge),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert_eq!(big.ended().await, "1009 message too big");
    sibling
        .send(&Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    assert!(matches!(sibling.recv().await, Packet::PingResp(_)));
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn a_server_s_disconnect_reaches_every_tab_before_1012() {
    let mock = Mock::behaving(answering(Level::V5, ConnectReturnCode::Success)).await;
    let proxy = mqtt_proxy(&mock).await;
    let spec = mqtt_tab("b");
    let (mut a, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "x")).await;
    let (mut b, _) = Client::connected(&proxy, &spec, Hello::new(Level::V5, "x")).await;
    let up = mock.upstream(0);
    let bye = Disconnect::new(DisconnectReasonCode::ServerShuttingDown);
    up.send(Message::Binary(codec::write(
        Level::V5,
        &Packet::Disconnect(bye),
    )));
    up.close();
    for tab in [&mut a, &mut b] {
        match tab.recv().await {
            Packet::Disconnect(d) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::ServerShuttingDown)
            }
            other => panic!("expected the server's DISCONNECT, got {other:?}"),
        }
        assert_eq!(tab.ended().await, "1012 upstream lost");
    }
}

#[tokio::test]
async fn a_server_that_answers_no_pingreq_for_a_keepalive_is_lost() {
    // The mock answers the CONNECT and nothing else: no PINGRESP.
    let mock = Mock::behaving(answering(Level::V4, ConnectReturnCode::Success)).await;
    let proxy = mqtt_proxy(&mock).await;
    let mut hello = Hello::new(Level::V4, "x");
    hello.keep_alive = 1;
    let (mut tab, _) = Client::connected(&proxy, &mqtt_tab("b"), hello).await;
    // tabmux pings the server after half a keepalive of silence (the tab's
    // own pings are answered by tabmux, so they are not traffic upstream);
    // the tab pings once then, so that its own keepalive outlasts the
    // server's, which is given up one keepalive after the PINGREQ.
    let up = mock.upstream(0);
    up.frames(2).await;
    tab.send(&Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    assert!(matches!(tab.recv().await, Packet::PingResp(_)));
    assert_eq!(tab.ended().await, "1012 upstream lost");
    let frames = mock.upstream(0).frames(2).await;
    assert!(matches!(decode(Level::V4, &frames[1]), Packet::PingReq(_)));
}

#[tokio::test]
async fn a_server_that_sends_what_is_not_a_packet_is_lost() {
    let mock = Mock::behaving(answering(Level::V4, ConnectReturnCode::Success)).await;
    let proxy = mqtt_proxy(&mock).await;
    let (mut tab, _) = Client::connected(&proxy, &mqtt_tab("b"), Hello::new(Level::V4, "x")).await;
    let up = mock.upstream(0);
    up.send(Message::Binary(
        vec![0x30, 0x80, 0x80, 0x80, 0x80, 0x01].into(),
    ));
    assert_eq!(tab.ended().await, "1012 upstream lost");
    // The upstream connection ends (dropped, as a silent one is).
    up.closed().await;
}
