//! Messages both ways: the server's to the tabs holding a filter they are
//! for, each with its own packet ids and QoS flow; a tab's to the server
//! with tabmux's packet ids, within the server's Receive Maximum.

use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, Packet, PubAck, PubAckReason, PubComp, PubRec, PubRecReason, PubRel,
    Publish, PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio_tungstenite::tungstenite::Message;

use super::codec::Level;
use super::{topic, Inbound, Mqtt, Outbound, Pending, Phase};
use crate::cause::Cause;
use crate::envelope::{Effect, Effects, Forward, Refused, Saving, TabId};

/// One copy of a message for one tab.
#[derive(Debug)]
struct Copy {
    tab: TabId,
    qos: QoS,
    retain: bool,
    sub_id: Option<usize>,
}

fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

impl Mqtt {
    /// The server's PUBLISH: to the tabs it is for, then answered.
    pub(super) fn upstream_publish(&mut self, p: Publish, out: &mut Effects) {
        let copies = self.copies_of_upstream(&p);
        let reached = self.fan_out(&p, copies, out);
        if reached > 1 {
            out.push(Effect::Avoided(Saving::Deliveries(reached - 1)));
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.upstream(&Packet::PubAck(PubAck::new(p.pkid, None)), out),
            QoS::ExactlyOnce => self.upstream(&Packet::PubRec(PubRec::new(p.pkid, None)), out),
        }
    }

    /// Who receives a message of the server's, and how.
    fn copies_of_upstream(&self, p: &Publish) -> Vec<Copy> {
        let mut copies = Vec::new();
        let by_id = self.level == Level::V5
            && self
                .server()
                .and_then(|s| s.subscription_identifiers_available)
                != Some(0);
        if by_id {
            let ids = p
                .properties
                .as_ref()
                .map(|pp| pp.subscription_identifiers.as_slice())
                .unwrap_or(&[]);
            for id in ids {
                let Some(path) = self.sub_ids.get(id) else {
                    continue;
                };
                let Some(filter) = self.filters.get(path) else {
                    continue;
                };
                for &tab in &filter.holders {
                    if p.retain && !filter.retain_to.contains(&tab) {
                        continue;
                    }
                    let Some(tf) = self.tabs.get(&tab).and_then(|t| t.filter(path)) else {
                        continue;
                    };
                    copies.push(Copy {
                        tab,
                        qos: lower(p.qos, tf.granted),
                        retain: p.retain,
                        sub_id: tf.sub_id,
                    });
                }
            }
            return copies;
        }
        // Each filter of the session is matched once; a tab gets one copy,
        // at its highest QoS among its matching filters.
        let topic = String::from_utf8_lossy(&p.topic);
        for (path, filter) in &self.filters {
            if filter.holders.is_empty() || !topic::matches(&topic, path) {
                continue;
            }
            for &tab in &filter.holders {
                let Some(tf) = self.tabs.get(&tab).and_then(|t| {
                    (t.phase == Phase::Connected)
                        .then(|| t.filter(path))
                        .flatten()
                }) else {
                    continue;
                };
                let retained = filter.retain_to.contains(&tab);
                match copies.iter_mut().find(|c: &&mut Copy| c.tab == tab) {
                    Some(c) => {
                        if (tf.granted as u8) > (c.qos as u8) {
                            c.qos = tf.granted;
                        }
                        c.retain |= retained;
                    }
                    None => copies.push(Copy {
                        tab,
                        qos: tf.granted,
                        // Here: whether the tab may have a RETAIN 1 copy.
                        retain: retained,
                        sub_id: None,
                    }),
                }
            }
        }
        // A RETAIN 1 message goes only to the tabs of a SUBSCRIBE that
        // brought it; the others get nothing of it.
        copies.retain(|c| c.retain || !p.retain);
        for c in &mut copies {
            c.qos = lower(p.qos, c.qos);
            c.retain = p.retain;
        }
        copies
    }

    /// Sends each copy; QoS 0 copies that are alike share one buffer.
    /// Returns the number of sends (buffers) made.
    fn fan_out(&mut self, p: &Publish, copies: Vec<Copy>, out: &mut Effects) -> u32 {
        let mut sends = 0;
        let mut done = vec![false; copies.len()];
        for i in 0..copies.len() {
            if done[i] {
                continue;
            }
            let c = &copies[i];
            let mut msg = p.clone();
            msg.dup = false;
            msg.retain = c.retain;
            msg.qos = c.qos;
            if let Some(props) = &mut msg.properties {
                props.topic_alias = None;
                props.subscription_identifiers = c.sub_id.into_iter().collect();
            } else if let Some(id) = c.sub_id {
                msg.properties = Some(publish_properties_with(id));
            }
            if c.qos != QoS::AtMostOnce {
                done[i] = true;
                sends += 1;
                self.send_qos(c.tab, msg, out);
                continue;
            }
            msg.pkid = 0;
            let bytes = self.bytes(&Packet::Publish(msg));
            let mut tabs = Vec::new();
            for (j, other) in copies.iter().enumerate().skip(i) {
                if done[j]
                    || other.qos != QoS::AtMostOnce
                    || other.retain != c.retain
                    || other.sub_id != c.sub_id
                {
                    continue;
                }
                done[j] = true;
                if self.fits(other.tab, bytes.len()) {
                    tabs.push(other.tab);
                }
            }
            if !tabs.is_empty() {
                sends += 1;
                crate::envelope::deliver(tabs, Message::Binary(bytes), out);
            }
        }
        sends
    }

    /// Whether a packet of `len` bytes may be sent to a tab (its 5.0
    /// Maximum Packet Size; the server discards what is larger).
    fn fits(&self, tab: TabId, len: usize) -> bool {
        self.tabs
            .get(&tab)
            .is_some_and(|t| t.max_packet.is_none_or(|m| len <= m))
    }

    /// A QoS 1/2 message for one tab: sent with an id of its own, or
    /// queued beyond its Receive Maximum.
    fn send_qos(&mut self, tab: TabId, mut msg: Publish, out: &mut Effects) {
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        if state.flows().outbound.len() >= usize::from(state.receive_max) {
            state.flows().queued_bytes += msg.size();
            state.flows().queue.push_back(msg);
            return;
        }
        let pkid = state.flows().next_pkid();
        state.flows().outbound.insert(pkid, Outbound::Sent);
        msg.pkid = pkid;
        let bytes = self.bytes(&Packet::Publish(msg));
        if !self.fits(tab, bytes.len()) {
            if let Some(state) = self.tabs.get_mut(&tab) {
                state.flows().outbound.remove(&pkid);
            }
            return;
        }
        crate::envelope::deliver(vec![tab], Message::Binary(bytes), out);
    }

    /// A tab answered a message of tabmux's: PUBACK or PUBCOMP end it,
    /// PUBREC is answered with PUBREL; a queued message may go then.
    pub(super) fn tab_ack(&mut self, tab: TabId, pkid: u16, rec: bool, out: &mut Effects) {
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        match state.flows().outbound.get(&pkid) {
            // (A PUBREC again is answered PUBREL again.)
            Some(_) if rec => {
                state.flows().outbound.insert(pkid, Outbound::Released);
                self.answer(tab, &Packet::PubRel(PubRel::new(pkid, None)), out);
                return;
            }
            Some(_) => {
                state.flows().outbound.remove(&pkid);
            }
            None => return,
        }
        if let Some(next) = state.flows().queue.pop_front() {
            state.flows().queued_bytes = state.flows().queued_bytes.saturating_sub(next.size());
            self.send_qos(tab, next, out);
        }
    }

    /// A tab's PUBLISH: checked as the server checks it, then upstream
    /// with tabmux's packet id.
    pub(super) fn tab_publish(&mut self, tab: TabId, mut p: Publish, out: &mut Effects) {
        let v5 = self.level == Level::V5;
        if !topic::valid_topic(&p.topic) {
            return self.refuse_packet(tab, DisconnectReasonCode::ProtocolError, out);
        }
        let alias = p.properties.as_mut().and_then(|pp| pp.topic_alias.take());
        if let Some(alias) = alias {
            let max = self.server().and_then(|s| s.topic_alias_max).unwrap_or(0);
            if !v5 || alias == 0 || alias > max {
                return self.refuse_packet(tab, DisconnectReasonCode::TopicAliasInvalid, out);
            }
            let Some(state) = self.tabs.get_mut(&tab) else {
                return;
            };
            if p.topic.is_empty() {
                match state.flows().aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return self.refuse_packet(tab, DisconnectReasonCode::ProtocolError, out)
                    }
                }
            } else {
                state.flows().aliases.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return self.refuse_packet(tab, DisconnectReasonCode::ProtocolError, out);
        }
        if p.qos as u8 > self.max_qos() {
            return self.refuse(
                tab,
                Refused::Qos,
                DisconnectReasonCode::QoSNotSupported,
                Cause::ProtocolError,
                out,
            );
        }
        if p.retain && !self.retain_available() {
            return self.refuse(
                tab,
                Refused::Retain,
                DisconnectReasonCode::RetainNotSupported,
                Cause::ProtocolError,
                out,
            );
        }
        let payload = p.payload.len();
        if p.qos == QoS::AtMostOnce {
            let sibling = v5.then(|| p.clone());
            self.forward(tab, p, payload, out);
            if let Some(s) = sibling {
                self.deliver_local(Some(tab), &s, out);
            }
            return;
        }
        let quota = usize::from(
            self.server()
                .and_then(|s| s.receive_max)
                .unwrap_or(super::V4_RECEIVE_MAXIMUM),
        );
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        if let Some(known) = state.flows().inbound.get(&p.pkid) {
            // A resend (DUP) of one on its way: not sent again; a QoS 2
            // one the server received is answered PUBREC again.
            if let Some(rec) = known.rec.clone() {
                self.answer(tab, &rec, out);
            }
            return;
        }
        if state.flows().inbound.len() >= quota {
            out.push(Effect::Refused(Refused::Quota));
            let answer = match p.qos {
                QoS::AtLeastOnce => Packet::PubAck(PubAck {
                    pkid: p.pkid,
                    reason: PubAckReason::QuotaExceeded,
                    properties: None,
                }),
                _ => Packet::PubRec(PubRec {
                    pkid: p.pkid,
                    reason: PubRecReason::QuotaExceeded,
                    properties: None,
                }),
            };
            return self.answer(tab, &answer, out);
        }
        state.flows().inbound.insert(p.pkid, Inbound::default());
        let up = self.next_pkid();
        self.pending.insert(
            up,
            Pending::Publish {
                tab: Some(tab),
                tab_pkid: p.pkid,
                sibling: v5.then(|| Box::new(p.clone())),
            },
        );
        p.pkid = up;
        p.dup = false;
        if self.in_flight < self.server_receive_max() {
            self.in_flight += 1;
            self.forward(tab, p, payload, out);
        } else {
            self.waiting.push_back((up, p));
        }
    }

    /// Sends a tab's PUBLISH upstream.
    fn forward(&mut self, tab: TabId, p: Publish, payload: usize, out: &mut Effects) {
        self.sent_since = true;
        let frame = Message::Binary(self.bytes(&Packet::Publish(p)));
        out.push(Effect::Forward(tab, Forward { frame, payload }));
    }

    /// A slot of the server's Receive Maximum is free: the next waiting
    /// PUBLISH goes.
    fn next_waiting(&mut self, out: &mut Effects) {
        self.in_flight = self.in_flight.saturating_sub(1);
        while self.in_flight < self.server_receive_max() {
            let Some((up, p)) = self.waiting.pop_front() else {
                return;
            };
            let tab = match self.pending.get(&up) {
                Some(Pending::Publish { tab: Some(tab), .. }) => *tab,
                _ => continue,
            };
            self.in_flight += 1;
            let payload = p.payload.len();
            self.forward(tab, p, payload, out);
        }
    }

    /// The server's PUBACK for a tab's QoS 1 PUBLISH.
    pub(super) fn server_answered(
        &mut self,
        pkid: u16,
        answer: Packet,
        accepted: bool,
        _ends: bool,
        out: &mut Effects,
    ) {
        let Some(Pending::Publish {
            tab,
            tab_pkid,
            sibling,
            ..
        }) = self.pending.remove(&pkid)
        else {
            return;
        };
        self.next_waiting(out);
        if let Some(tab) = tab {
            if let Some(state) = self.tabs.get_mut(&tab) {
                state.flows().inbound.remove(&tab_pkid);
                self.answer(tab, &with_pkid(answer, tab_pkid), out);
            }
        }
        if accepted {
            if let Some(s) = sibling {
                self.deliver_local(tab, &s, out);
            }
        }
    }

    /// The server's PUBREC for a tab's QoS 2 PUBLISH: the tab is told, and
    /// the server released at once.
    pub(super) fn server_received(&mut self, r: PubRec, out: &mut Effects) {
        let Some(Pending::Publish { tab, tab_pkid, .. }) = self.pending.get(&r.pkid) else {
            return;
        };
        let (tab, tab_pkid) = (*tab, *tab_pkid);
        let refused = (r.reason as u8) >= 0x80 && r.reason != PubRecReason::Success;
        let rec = with_pkid(Packet::PubRec(r.clone()), tab_pkid);
        if refused {
            self.pending.remove(&r.pkid);
            self.next_waiting(out);
        } else {
            self.upstream(&Packet::PubRel(PubRel::new(r.pkid, None)), out);
        }
        let Some(tab) = tab else {
            return;
        };
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        if refused {
            state.flows().inbound.remove(&tab_pkid);
        } else if let Some(i) = state.flows().inbound.get_mut(&tab_pkid) {
            i.rec = Some(rec.clone());
        }
        self.answer(tab, &rec, out);
    }

    /// The server's PUBCOMP for a tab's QoS 2 PUBLISH: the tab has it when
    /// its PUBREL comes (or at once if it came).
    pub(super) fn server_completed(&mut self, c: PubComp, out: &mut Effects) {
        let Some(Pending::Publish {
            tab,
            tab_pkid,
            sibling,
            ..
        }) = self.pending.remove(&c.pkid)
        else {
            return;
        };
        self.next_waiting(out);
        if let Some(s) = sibling {
            self.deliver_local(tab, &s, out);
        }
        let Some(tab) = tab else { return };
        let comp = with_pkid(Packet::PubComp(c), tab_pkid);
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        match state.flows().inbound.get_mut(&tab_pkid) {
            Some(i) if i.released => {
                state.flows().inbound.remove(&tab_pkid);
                self.answer(tab, &comp, out);
            }
            Some(i) => i.comp = Some(comp),
            None => {}
        }
    }

    /// A tab's PUBREL for its QoS 2 PUBLISH.
    pub(super) fn tab_release(&mut self, tab: TabId, pkid: u16, out: &mut Effects) {
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        match state.flows().inbound.get_mut(&pkid) {
            Some(i) => match i.comp.take() {
                Some(comp) => {
                    state.flows().inbound.remove(&pkid);
                    self.answer(tab, &comp, out);
                }
                None => i.released = true,
            },
            // Already complete (a resent PUBREL): complete again.
            None => self.answer(tab, &Packet::PubComp(PubComp::new(pkid, None)), out),
        }
    }

    /// 5.0: a message of the session (a tab's, or a will) reaches the
    /// session's tabs holding a matching filter, as the server would send
    /// it (upstream subscriptions ask No Local): one copy per matching
    /// filter, at the lower QoS, RETAIN 0, with the tab's Subscription
    /// Identifier; not to the sender where its subscription asked No Local.
    pub(super) fn deliver_local(&mut self, from: Option<TabId>, p: &Publish, out: &mut Effects) {
        if self.level != Level::V5 {
            return;
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let mut copies = Vec::new();
        for (&tab, state) in &self.tabs {
            if state.phase != Phase::Connected {
                continue;
            }
            for tf in &state.filters {
                // A shared subscription's messages are the server's to
                // give (to one member of the group), not tabmux's.
                if tf.filter.starts_with("$share/")
                    || !topic::matches(&topic, &tf.filter)
                    || (from == Some(tab) && tf.no_local)
                {
                    continue;
                }
                copies.push(Copy {
                    tab,
                    qos: lower(p.qos, tf.granted),
                    retain: false,
                    sub_id: tf.sub_id,
                });
            }
        }
        let mut msg = p.clone();
        msg.retain = false;
        // Every copy is a delivery the server did not make: the fan-out
        // counts n - k of the n copies it sent in k buffers; these are the k.
        let sends = self.fan_out(&msg, copies, out);
        if sends > 0 {
            out.push(Effect::Avoided(Saving::Deliveries(sends)));
        }
    }

    /// A tab's will goes upstream as a PUBLISH of the session.
    pub(super) fn publish_will(&mut self, mut p: Publish, out: &mut Effects) {
        if self.connack.is_none() {
            return;
        }
        let sibling = (self.level == Level::V5).then(|| p.clone());
        if p.qos != QoS::AtMostOnce {
            let up = self.next_pkid();
            self.pending.insert(
                up,
                Pending::Publish {
                    tab: None,
                    tab_pkid: 0,
                    sibling: sibling.clone().map(Box::new),
                },
            );
            p.pkid = up;
            self.in_flight += 1;
            self.upstream(&Packet::Publish(p), out);
            return;
        }
        self.upstream(&Packet::Publish(p), out);
        if let Some(s) = sibling {
            self.deliver_local(None, &s, out);
        }
    }
}

/// An acknowledgement with another packet id.
fn with_pkid(mut packet: Packet, pkid: u16) -> Packet {
    match &mut packet {
        Packet::PubAck(a) => a.pkid = pkid,
        Packet::PubRec(r) => r.pkid = pkid,
        Packet::PubComp(c) => c.pkid = pkid,
        Packet::PubRel(r) => r.pkid = pkid,
        _ => {}
    }
    packet
}

fn publish_properties_with(id: usize) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: vec![id],
        content_type: None,
    }
}
