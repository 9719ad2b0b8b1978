//! PROTOCOL.md, "Envelope `mqtt`", through the real proxy in front of a real
//! broker: Debian's mosquitto, started by each test on free ports (a TCP
//! listener for the outside publisher, a websockets one for tabmux), at both
//! protocol levels. `.ci/run` installs mosquitto and runs these:
//! `cargo test --test mqtt -- --ignored`.

mod common;

use common::mqtt::*;
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet, PubRel, RetainForwardRule,
    SubscribeReasonCode,
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
