//! A tab's CONNECT and its answer: the first goes upstream (rewritten),
//! the server's CONNACK answers the tabs waiting, later tabs are answered
//! by tabmux; what the server would refuse of a CONNECT is refused to that
//! tab alone.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill, Login,
    Packet, Publish, PublishProperties,
};
use tokio_tungstenite::tungstenite::Message;

use super::codec::{self, Bad, Level};
use super::{Mqtt, Phase, Will, V4_RECEIVE_MAXIMUM};
use crate::cause::Cause;
use crate::envelope::{Effect, Effects, Refused, Saving, TabId};

impl Mqtt {
    /// A tab's first packet: its CONNECT.
    pub(super) fn connect(&mut self, tab: TabId, raw: BytesMut, now: Instant, out: &mut Effects) {
        self.recount = true;
        let level = match codec::identity(&raw) {
            Some(id) if id.level == 5 && &id.protocol_name[..] == b"MQTT" => Level::V5,
            Some(id) if id.level == 4 && &id.protocol_name[..] == b"MQTT" => Level::V4,
            // Placement answers other levels; here it is malformed.
            _ => return self.refuse_bad(tab, Bad::Malformed("not a CONNECT".into()), out),
        };
        if self.first.is_none() && !self.connect_sent {
            self.level = level;
        }
        let packet = match codec::read(level, raw) {
            Ok(Packet::Connect(c, will, login)) => (c, will, login),
            Ok(_) => return self.refuse_bad(tab, Bad::Malformed("not a CONNECT".into()), out),
            Err(bad) => return self.refuse_bad(tab, bad, out),
        };
        let (connect, will, login) = packet;
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        state.phase = Phase::Waiting;
        state.empty_id = connect.client_id.is_empty();
        state.last_heard = now;
        if let Some(props) = &connect.properties {
            state.max_packet = props.max_packet_size.map(|m| m as usize);
            state.receive_max = props.receive_maximum.unwrap_or(V4_RECEIVE_MAXIMUM);
        }
        let keepalive = Duration::from_secs(u64::from(connect.keep_alive));
        state.silence = (!keepalive.is_zero()).then(|| keepalive * 3 / 2);
        state.will = will.map(|w| {
            Box::new(Will {
                delay: w
                    .properties
                    .as_ref()
                    .and_then(|p| p.delay_interval)
                    .map_or(Duration::ZERO, |s| Duration::from_secs(u64::from(s))),
                publish: will_publish(w),
                client_id: connect.client_id.clone(),
            })
        });
        if !connect.client_id.is_empty() {
            // A tab of this client id is back: its delayed will is not sent.
            self.wills.retain(|w| w.client_id != connect.client_id);
        }
        self.deadline = None;
        // 3.1.1, where the server announces nothing: a will above the
        // route's `max_qos` closes the tab without a CONNACK, as mosquitto
        // does, before anything goes upstream.
        let will_qos = self
            .tabs
            .get(&tab)
            .and_then(|t| t.will.as_ref())
            .map(|w| w.publish.qos as u8);
        if self.level == Level::V4 && will_qos.is_some_and(|q| q > self.settings.max_qos) {
            out.push(Effect::Refused(Refused::Qos));
            return self.close(tab, Cause::ProtocolError, out);
        }
        // 3.1.1: an empty client id needs a clean session.
        if self.level == Level::V4 && connect.client_id.is_empty() && !connect.clean_start {
            let refused = connack(ConnectReturnCode::BadClientId, None);
            self.answer(tab, &refused, out);
            return self.close(tab, refused_cause(), out);
        }
        if self.connack.is_some() {
            out.push(Effect::Avoided(Saving::Connection));
            return self.accept(tab, false, out);
        }
        if let Some(refused) = self.refused.clone() {
            self.answer(tab, &Packet::ConnAck(refused), out);
            return self.close(tab, refused_cause(), out);
        }
        if !self.connect_sent {
            self.connect_sent = true;
            self.first = Some(tab);
            self.enhanced = connect
                .properties
                .as_ref()
                .is_some_and(|p| p.authentication_method.is_some());
            let upstream = upstream_connect(connect, login, self.settings.max_packet);
            self.keepalive = upstream_keepalive(&upstream);
            self.upstream(&upstream, out);
        } else {
            out.push(Effect::Avoided(Saving::Connection));
        }
    }

    /// Answers a tab's CONNECT once the server accepted the session's:
    /// CONNACK, or what the server would refuse its will for. A tab that
    /// was waiting for the server's CONNACK (`as_sent`) gets it as the
    /// server sent it (its Assigned Client Identifier only if it is the
    /// tab whose CONNECT went upstream); a later tab gets tabmux's, with
    /// the server's limits.
    fn accept(&mut self, tab: TabId, as_sent: bool, out: &mut Effects) {
        let max_qos = self.max_qos();
        let retain_available = self.retain_available();
        let level = self.level;
        let first = self.first == Some(tab);
        let Some(server) = self.connack.clone() else {
            return;
        };
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        if let Some(will) = &state.will {
            let qos = will.publish.qos as u8;
            let refusal = match level {
                Level::V5 if qos > max_qos => Some(ConnectReturnCode::QoSNotSupported),
                Level::V5 if will.publish.retain && !retain_available => {
                    Some(ConnectReturnCode::RetainNotSupported)
                }
                // 3.1.1: mosquitto closes without a CONNACK.
                Level::V4 if qos > max_qos => {
                    state.will = None;
                    out.push(Effect::Refused(Refused::Qos));
                    return self.close(tab, Cause::ProtocolError, out);
                }
                _ => None,
            };
            if let Some(code) = refusal {
                state.will = None;
                out.push(Effect::Refused(
                    if code == ConnectReturnCode::QoSNotSupported {
                        Refused::Qos
                    } else {
                        Refused::Retain
                    },
                ));
                let refused = connack(code, None);
                self.answer(tab, &refused, out);
                return self.close(tab, refused_cause(), out);
            }
        }
        state.phase = Phase::Connected;
        state.accepted = true;
        let props = server.properties.as_ref();
        if let Some(p) = props {
            if let Some(ka) = p.server_keep_alive {
                let ka = Duration::from_secs(u64::from(ka));
                state.silence = (!ka.is_zero()).then(|| ka * 3 / 2);
            }
        }
        let answer = if first {
            let answer = server;
            if state.empty_id {
                let assigned = answer.properties.as_ref();
                if let (Some(id), Some(will)) = (
                    assigned.and_then(|p| p.assigned_client_identifier.clone()),
                    state.will.as_mut(),
                ) {
                    will.client_id = id;
                }
            }
            answer
        } else {
            let mut properties = if as_sent {
                props.cloned().map(|mut p| {
                    p.assigned_client_identifier = None;
                    p
                })
            } else {
                props.map(later_tab_properties)
            };
            if state.empty_id && level == Level::V5 {
                let id = format!("tabmux-{tab}");
                if let Some(will) = state.will.as_mut() {
                    will.client_id = id.clone();
                }
                properties
                    .get_or_insert_with(empty_connack_properties)
                    .assigned_client_identifier = Some(id);
            }
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
                properties,
            }
        };
        self.answer(tab, &Packet::ConnAck(answer), out);
        let early = self
            .tabs
            .get_mut(&tab)
            .map(|t| {
                t.flows
                    .as_mut()
                    .map(|f| std::mem::take(&mut f.early))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let now = self.tabs.get(&tab).map(|t| t.last_heard);
        for packet in early {
            if let Some(now) = now {
                self.tab_packet(tab, packet, now, out);
            }
        }
    }

    /// The server's CONNACK: the tabs waiting are answered; a refusal
    /// closes them (the server closes the connection after it).
    pub(super) fn upstream_connack(&mut self, ack: ConnAck, out: &mut Effects) {
        let waiting: Vec<TabId> = self
            .tabs
            .iter()
            .filter(|(_, t)| t.phase == Phase::Waiting)
            .map(|(&t, _)| t)
            .collect();
        if ack.code != ConnectReturnCode::Success {
            let msg = Message::Binary(self.bytes(&Packet::ConnAck(ack.clone())));
            self.refused = Some(ack);
            for tab in waiting {
                out.push(Effect::Answer {
                    tab,
                    msg: msg.clone(),
                });
                self.close(tab, refused_cause(), out);
            }
            return;
        }
        if let Some(ka) = ack.properties.as_ref().and_then(|p| p.server_keep_alive) {
            let ka = Duration::from_secs(u64::from(ka));
            self.keepalive = (!ka.is_zero()).then_some(ka);
        }
        self.connack = Some(ack);
        // The keepalive counts from here.
        self.sent_since = false;
        self.ping_at = None;
        self.deadline = None;
        for tab in waiting {
            self.accept(tab, true, out);
        }
    }
}

/// The upstream CONNECT: the first tab's, without its will, clean, with
/// no topic aliases from the server and the route's Maximum Packet Size.
fn upstream_connect(mut connect: Connect, login: Option<Login>, max_packet: usize) -> Packet {
    connect.clean_start = true;
    // (3.1.1 writes no properties.)
    let p = connect
        .properties
        .get_or_insert_with(empty_connect_properties);
    p.session_expiry_interval = None;
    p.topic_alias_max = None;
    p.max_packet_size = Some(max_packet.min(u32::MAX as usize) as u32);
    Packet::Connect(connect, None, login)
}

/// The keepalive in force upstream, from its CONNECT.
fn upstream_keepalive(connect: &Packet) -> Option<Duration> {
    match connect {
        Packet::Connect(c, _, _) if c.keep_alive > 0 => {
            Some(Duration::from_secs(u64::from(c.keep_alive)))
        }
        _ => None,
    }
}

/// A will as the PUBLISH it becomes (5.0: its properties as the
/// PUBLISH's).
fn will_publish(w: LastWill) -> Publish {
    let properties = w.properties.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic,
        pkid: 0,
        payload: w.message,
        properties,
    }
}

/// A CONNACK of tabmux's.
fn connack(code: ConnectReturnCode, properties: Option<ConnAckProperties>) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties,
    })
}

/// How a tab refused at its CONNECT is closed (after its CONNACK).
fn refused_cause() -> Cause {
    Cause::Subprotocol {
        code: 1000,
        reason: String::new(),
    }
}

/// CONNECT properties, none set.
pub fn empty_connect_properties() -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

/// CONNACK properties, none set.
pub fn empty_connack_properties() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// What a later tab's CONNACK carries of the server's: its limits and
/// abilities, and its User Properties.
fn later_tab_properties(p: &ConnAckProperties) -> ConnAckProperties {
    ConnAckProperties {
        receive_max: p.receive_max,
        max_qos: p.max_qos,
        retain_available: p.retain_available,
        max_packet_size: p.max_packet_size,
        topic_alias_max: p.topic_alias_max,
        user_properties: p.user_properties.clone(),
        wildcard_subscription_available: p.wildcard_subscription_available,
        subscription_identifiers_available: p.subscription_identifiers_available,
        shared_subscription_available: p.shared_subscription_available,
        server_keep_alive: p.server_keep_alive,
        ..empty_connack_properties()
    }
}
