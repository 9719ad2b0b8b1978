//! Subscriptions: one upstream subscription per filter, held by the tabs
//! that subscribed to it, answered to each tab in its own SUBACK.

use std::sync::Arc;
use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::{
    Filter as WireFilter, Packet, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;

use super::codec::Level;
use super::{topic, Mqtt, Pending, Phase, TabFilter, MAX_FILTERS, MAX_TAB_FILTERS};
use crate::envelope::{Effects, Refused, Saving, TabId};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;

/// One filter of the session, subscribed upstream.
#[derive(Debug)]
pub(super) struct Filter {
    /// The highest QoS a tab asked for it.
    qos: QoS,
    /// What the server granted, once it answered.
    granted: Option<QoS>,
    /// 5.0: tabmux's Subscription Identifier for it.
    pub(super) sub_id: usize,
    /// The tabs that hold it.
    pub(super) holders: Vec<TabId>,
    /// The SUBSCRIBE upstream and the tabs it answers.
    in_flight: Option<(u16, Vec<Waiter>)>,
    /// Tabs answered by the next SUBSCRIBE.
    next: Vec<Waiter>,
    /// The tabs of the latest answered SUBSCRIBE that asked for its
    /// retained messages (a RETAIN 1 copy goes to them alone).
    pub(super) retain_to: Vec<TabId>,
    /// Since when no tab holds it because its last tab left.
    pub(super) orphaned: Option<Instant>,
}

/// A tab's filter waiting for the server's answer.
#[derive(Debug)]
struct Waiter {
    tab: TabId,
    request: u64,
    index: usize,
    asked: TabFilter,
    /// The tab receives the retained messages the answer brings.
    retained: bool,
}

/// A tab's SUBSCRIBE, until every filter has its answer.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) tab: TabId,
    pkid: u16,
    codes: Vec<Option<SubscribeReasonCode>>,
    open: usize,
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}

impl Mqtt {
    /// A tab's SUBSCRIBE.
    pub(super) fn tab_subscribe(&mut self, tab: TabId, s: Subscribe, out: &mut Effects) {
        let v5 = self.level == Level::V5;
        if s.pkid == 0 {
            return self.refuse_packet(tab, DisconnectReasonCode::MalformedPacket, out);
        }
        for f in &s.filters {
            if !topic::valid_filter(&f.path) {
                return self.refuse_packet(tab, DisconnectReasonCode::MalformedPacket, out);
            }
            if v5 && f.nolocal && f.path.starts_with("$share/") {
                return self.refuse_packet(tab, DisconnectReasonCode::ProtocolError, out);
            }
        }
        let sub_id = s.properties.as_ref().and_then(|p| p.id);
        self.last_request += 1;
        let request = self.last_request;
        self.requests.insert(
            request,
            Request {
                tab,
                pkid: s.pkid,
                codes: vec![None; s.filters.len()],
                open: s.filters.len(),
            },
        );
        let mut adding = 0;
        for (index, f) in s.filters.into_iter().enumerate() {
            let Some(state) = self.tabs.get(&tab) else {
                return;
            };
            let holds = state.filter(&f.path).is_some();
            let quota = if v5 {
                SubscribeReasonCode::QuotaExceeded
            } else {
                SubscribeReasonCode::Failure
            };
            if !holds && state.filters.len() + adding >= MAX_TAB_FILTERS {
                out.push(crate::envelope::Effect::Refused(Refused::TabFilters));
                self.resolve(request, index, quota, out);
                continue;
            }
            // One allocation per filter, shared by the tabs that hold it.
            let path: Arc<str> = match self.filters.get_key_value(f.path.as_str()) {
                Some((known, _)) => known.clone(),
                None => Arc::from(f.path.as_str()),
            };
            if !self.filters.contains_key(&path) && self.filters.len() >= MAX_FILTERS {
                out.push(crate::envelope::Effect::Refused(Refused::SessionFilters));
                self.resolve(request, index, quota, out);
                continue;
            }
            if !holds {
                adding += 1;
            }
            let asked = TabFilter {
                filter: path.clone(),
                granted: f.qos,
                sub_id,
                no_local: f.nolocal,
            };
            let rule = f.retain_forward_rule;
            let local = rule == RetainForwardRule::Never
                || (rule == RetainForwardRule::OnNewSubscribe && holds);
            let mut waiter = Waiter {
                tab,
                request,
                index,
                asked,
                retained: !local,
            };
            match self.filters.get_mut(&path) {
                Some(filter) if local => {
                    filter.orphaned = None;
                    match (filter.granted, &mut filter.in_flight) {
                        (Some(granted), _) => {
                            out.push(crate::envelope::Effect::Avoided(Saving::Subscription));
                            let code =
                                SubscribeReasonCode::Success(min_qos(waiter.asked.qos(), granted));
                            waiter.asked.granted = min_qos(waiter.asked.granted, granted);
                            self.hold(tab, waiter.asked);
                            self.resolve(request, index, code, out);
                        }
                        (None, Some((_, batch))) => batch.push(waiter),
                        (None, None) => filter.next.push(waiter),
                    }
                }
                Some(filter) => {
                    filter.orphaned = None;
                    filter.qos = max_qos(filter.qos, f.qos);
                    if filter.in_flight.is_some() {
                        filter.next.push(waiter);
                    } else {
                        let qos = filter.qos;
                        self.send_subscribe(
                            &path,
                            qos,
                            RetainForwardRule::OnEverySubscribe,
                            vec![waiter],
                            out,
                        );
                    }
                }
                None => {
                    self.last_sub_id += 1;
                    let sub_id = self.last_sub_id;
                    self.sub_ids.insert(sub_id, path.clone());
                    self.filters.insert(
                        path.clone(),
                        Filter {
                            qos: f.qos,
                            granted: None,
                            sub_id,
                            holders: Vec::new(),
                            in_flight: None,
                            next: Vec::new(),
                            retain_to: Vec::new(),
                            orphaned: None,
                        },
                    );
                    self.send_subscribe(&path, f.qos, rule, vec![waiter], out);
                }
            }
        }
    }

    /// A SUBSCRIBE for one filter goes upstream, answering `batch`.
    fn send_subscribe(
        &mut self,
        path: &str,
        qos: QoS,
        rule: RetainForwardRule,
        batch: Vec<Waiter>,
        out: &mut Effects,
    ) {
        let pkid = self.next_pkid();
        let v5 = self.level == Level::V5;
        let ids = self
            .server()
            .and_then(|p| p.subscription_identifiers_available)
            != Some(0);
        let Some(filter) = self.filters.get_mut(path) else {
            return;
        };
        let properties = (v5 && ids).then(|| SubscribeProperties {
            id: Some(filter.sub_id),
            user_properties: Vec::new(),
        });
        filter.in_flight = Some((pkid, batch));
        self.pending.insert(pkid, Pending::Subscribe(path.into()));
        let packet = Packet::Subscribe(Subscribe {
            pkid,
            filters: vec![WireFilter {
                path: path.to_string(),
                qos,
                nolocal: v5 && !path.starts_with("$share/"),
                preserve_retain: false,
                retain_forward_rule: rule,
            }],
            properties,
        });
        self.upstream(&packet, out);
    }

    /// The server answered a SUBSCRIBE of tabmux's.
    pub(super) fn upstream_suback(&mut self, s: SubAck, out: &mut Effects) {
        let Some(Pending::Subscribe(path)) = self.pending.remove(&s.pkid) else {
            return;
        };
        let Some(filter) = self.filters.get_mut(&path) else {
            return;
        };
        let Some((_, batch)) = filter.in_flight.take() else {
            return;
        };
        let code = s
            .return_codes
            .first()
            .copied()
            .unwrap_or(SubscribeReasonCode::Failure);
        let granted = match code {
            SubscribeReasonCode::Success(q) => Some(q),
            _ => None,
        };
        if let Some(q) = granted {
            filter.granted = Some(q);
            filter.retain_to = batch.iter().filter(|w| w.retained).map(|w| w.tab).collect();
        }
        let next = std::mem::take(&mut filter.next);
        for w in batch {
            if !self.tabs.contains_key(&w.tab) {
                continue;
            }
            let answer = match granted {
                Some(q) => {
                    let mut asked = w.asked;
                    let code = SubscribeReasonCode::Success(min_qos(asked.granted, q));
                    asked.granted = min_qos(asked.granted, q);
                    self.hold(w.tab, asked);
                    code
                }
                None => code,
            };
            self.resolve(w.request, w.index, answer, out);
        }
        let Some(filter) = self.filters.get_mut(&path) else {
            return;
        };
        if !next.is_empty() {
            let qos = filter.qos;
            return self.send_subscribe(&path, qos, RetainForwardRule::OnEverySubscribe, next, out);
        }
        if filter.holders.is_empty() {
            if granted.is_some() {
                // Its tabs left while it was being subscribed.
                self.unsubscribe_upstream(&path, out);
            } else {
                // Refused and held by none: not held.
                self.forget_filter(&path);
            }
        }
    }

    /// A tab now holds a filter (replacing its options if it held it).
    fn hold(&mut self, tab: TabId, asked: TabFilter) {
        let Some(filter) = self.filters.get_mut(&asked.filter) else {
            return;
        };
        filter.orphaned = None;
        if !filter.holders.contains(&tab) {
            filter.holders.push(tab);
        }
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        match state.filters.iter_mut().find(|f| f.filter == asked.filter) {
            Some(f) => *f = asked,
            None => state.filters.push(asked),
        }
    }

    /// One filter of a tab's SUBSCRIBE has its answer; the SUBACK goes
    /// once all have.
    fn resolve(
        &mut self,
        request: u64,
        index: usize,
        code: SubscribeReasonCode,
        out: &mut Effects,
    ) {
        let Some(r) = self.requests.get_mut(&request) else {
            return;
        };
        if let Some(slot) = r.codes.get_mut(index) {
            if slot.replace(code).is_none() {
                r.open -= 1;
            }
        }
        if r.open > 0 {
            return;
        }
        let Some(r) = self.requests.remove(&request) else {
            return;
        };
        let connected = self
            .tabs
            .get(&r.tab)
            .is_some_and(|t| t.phase == Phase::Connected);
        if !connected {
            return;
        }
        let suback = Packet::SubAck(SubAck {
            pkid: r.pkid,
            return_codes: r.codes.into_iter().flatten().collect(),
            properties: None,
        });
        self.answer(r.tab, &suback, out);
    }

    /// A tab's UNSUBSCRIBE: answered at once; a filter no tab holds any
    /// more is unsubscribed upstream.
    pub(super) fn tab_unsubscribe(
        &mut self,
        tab: TabId,
        u: Unsubscribe,
        _now: Instant,
        out: &mut Effects,
    ) {
        if u.pkid == 0 || u.filters.is_empty() || !u.filters.iter().all(|f| topic::valid_filter(f))
        {
            // No filter, an invalid one, or no packet id: malformed, as
            // the server reads it.
            return self.refuse_packet(tab, DisconnectReasonCode::MalformedPacket, out);
        }
        let mut reasons = Vec::with_capacity(u.filters.len());
        for path in &u.filters {
            let held = self.tabs.get_mut(&tab).is_some_and(|state| {
                let before = state.filters.len();
                state.filters.retain(|f| &*f.filter != path.as_str());
                state.filters.len() != before
            });
            reasons.push(if held {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
            if !held {
                continue;
            }
            let Some(filter) = self.filters.get_mut(path.as_str()) else {
                continue;
            };
            filter.holders.retain(|&t| t != tab);
            filter.retain_to.retain(|&t| t != tab);
            if filter.holders.is_empty() && filter.in_flight.is_none() && filter.next.is_empty() {
                self.unsubscribe_upstream(path, out);
            }
        }
        let unsuback = Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        });
        self.answer(tab, &unsuback, out);
    }

    /// A tab that left releases a filter: once no tab holds it, it
    /// lingers for the route's `linger`.
    pub(super) fn release(&mut self, path: &str, tab: TabId, now: Instant, _out: &mut Effects) {
        let Some(filter) = self.filters.get_mut(path) else {
            return;
        };
        filter.holders.retain(|&t| t != tab);
        filter.retain_to.retain(|&t| t != tab);
        if filter.holders.is_empty() {
            filter.orphaned = Some(now);
            self.deadline = None;
        }
    }

    /// Filters whose linger has passed are unsubscribed upstream.
    pub(super) fn expire_lingers(&mut self, now: Instant, out: &mut Effects) {
        let linger = self.settings.linger;
        let expired: Vec<Arc<str>> = self
            .filters
            .iter()
            .filter(|(_, f)| {
                f.holders.is_empty()
                    && f.in_flight.is_none()
                    && f.orphaned.is_some_and(|t| now >= t + linger)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for path in expired {
            self.unsubscribe_upstream(&path, out);
        }
    }

    fn unsubscribe_upstream(&mut self, path: &str, out: &mut Effects) {
        self.forget_filter(path);
        let pkid = self.next_pkid();
        self.pending.insert(pkid, Pending::Unsubscribe);
        let packet = Packet::Unsubscribe(Unsubscribe {
            pkid,
            filters: vec![path.to_string()],
            properties: None,
        });
        self.upstream(&packet, out);
    }

    fn forget_filter(&mut self, path: &str) {
        if let Some(f) = self.filters.remove(path) {
            self.sub_ids.remove(&f.sub_id);
        }
    }
}

impl TabFilter {
    fn qos(&self) -> QoS {
        self.granted
    }
}
