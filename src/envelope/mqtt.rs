//! `envelope = "mqtt"` (docs/protocol.md, "The `mqtt` envelope"): one MQTT
//! connection per session, for MQTT 3.1.1 and 5.0, so that to each tab the
//! session looks like an MQTT connection of its own.
//!
//! A tab is placed in its session once its CONNECT has come (the session
//! key includes its protocol level, user name and password: see
//! `crate::placement`); the machine starts from there. The first tab's
//! CONNECT goes upstream without its will and with a clean session, and
//! the upstream's CONNACK answers it; later tabs are answered by tabmux.
//! Everything after is rewritten both ways: packet ids (each tab's are its
//! own; tabmux numbers the upstream's), subscriptions (one upstream
//! subscription per filter, refcounted by the tabs that hold it, lingering
//! after the last tab left), messages (to the tabs holding a filter the
//! message is for, each with its own packet id and QoS flow). Keepalives,
//! lingers and will delays are deadlines of the machine.
//!
//! - [`codec`]: packets from and to a byte stream, at either level;
//! - `connect`: a tab's CONNECT and its answer;
//! - `deadlines`: keepalives both ways, lingers, will delays;
//! - [`topic`]: topic names and filters;
//! - `subscribe`: subscriptions and their answers;
//! - `publish`: messages both ways and their QoS flows.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Disconnect, DisconnectReasonCode, Packet, PingResp, Publish,
};
use rumqttc::v5::mqttbytes::QoS;
use rustc_hash::FxHashMap;
use tokio_tungstenite::tungstenite::Message;

use super::{Effect, Effects, Refused, Saving, TabId, Target};
use crate::cause::{Cause, Lost};
use codec::{Bad, Level, Stream};
pub use connect::{empty_connack_properties, empty_connect_properties};

pub mod codec;
mod connect;
mod deadlines;
mod publish;
mod subscribe;
#[cfg(test)]
mod tests;
pub mod topic;

/// The most filters one session holds upstream (lingering ones included).
pub const MAX_FILTERS: usize = 1024;
/// The most filters one tab holds.
pub const MAX_TAB_FILTERS: usize = 256;
/// Packets a tab may send between its CONNECT and its CONNACK.
const MAX_EARLY: usize = 64;
/// A 3.1.1 connection's quota of unanswered QoS 1/2 messages (all its ids).
const V4_RECEIVE_MAXIMUM: u16 = u16::MAX;

/// What the route sets for its MQTT sessions.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `max_message_size`: the largest packet either way.
    pub max_packet: usize,
    /// `max_qos`: the highest QoS the server accepts from a client.
    pub max_qos: u8,
    /// `linger`: how long a filter no tab holds stays subscribed upstream.
    pub linger: Duration,
}

/// Where a tab stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Joined; its CONNECT has not been read yet.
    Joined,
    /// Its CONNECT was read; it waits for the upstream's CONNACK.
    Waiting,
    /// Answered with CONNACK 0: it speaks MQTT now.
    Connected,
    /// Refused or closed: nothing more is read from it.
    Done,
}

/// A tab's will, kept until it ends.
#[derive(Debug, Clone)]
struct Will {
    publish: Publish,
    /// 5.0 Will Delay Interval.
    delay: Duration,
    /// The tab's client id (assigned, if it gave none): a tab of the same
    /// id connecting within the delay cancels the will.
    client_id: String,
}

/// A will waiting out its delay.
#[derive(Debug)]
struct DelayedWill {
    at: Instant,
    client_id: String,
    publish: Publish,
}

/// A tab's own subscription.
#[derive(Debug, Clone)]
struct TabFilter {
    /// Shared with the session's own record of the filter.
    filter: Arc<str>,
    /// The QoS granted to the tab for it.
    granted: QoS,
    /// The tab's Subscription Identifier for it (5.0), if it gave one.
    sub_id: Option<usize>,
    /// 5.0 No Local: its own messages are not delivered back to it.
    no_local: bool,
}

/// A tab's QoS 1/2 PUBLISH on its way to the server.
#[derive(Debug, Default)]
struct Inbound {
    /// The server's PUBREC came (QoS 2): a resend is answered with it.
    rec: Option<Packet>,
    /// The server's PUBCOMP, until the tab's PUBREL asks for it.
    comp: Option<Packet>,
    /// The tab's PUBREL came before the server's PUBCOMP.
    released: bool,
}

/// A message tabmux sends a tab with QoS 1/2, until the tab answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outbound {
    /// Awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// QoS 2: PUBREL sent, awaiting PUBCOMP.
    Released,
}

/// One tab of the session: what every idle tab keeps, inline in its
/// session's map (so it is small: an idle tab's memory is a headline
/// figure), and what its message flows need, boxed once it has any.
#[derive(Debug)]
struct TabMq {
    phase: Phase,
    /// Bytes not yet a whole packet.
    stream: Stream,
    /// It gave an empty client id (it is assigned one).
    empty_id: bool,
    will: Option<Box<Will>>,
    /// It sent DISCONNECT with reason 0: its will is not published.
    clean_end: bool,
    /// It was answered CONNACK 0 (only then is its will published).
    accepted: bool,
    /// 5.0: its Receive Maximum (QoS 1/2 messages awaiting its answer).
    receive_max: u16,
    /// Closed silent at this long without a packet (1.5 × its keepalive).
    silence: Option<Duration>,
    last_heard: Instant,
    filters: Vec<TabFilter>,
    /// 5.0: its Maximum Packet Size (what tabmux may send it).
    max_packet: Option<usize>,
    flows: Option<Box<Flows>>,
}

/// A tab's message flows, allocated once it has any.
#[derive(Debug, Default)]
struct Flows {
    /// Its QoS 1/2 PUBLISHes on their way, by its packet id.
    inbound: FxHashMap<u16, Inbound>,
    /// tabmux's QoS 1/2 messages to it awaiting its answer, by the id
    /// tabmux gave them.
    outbound: FxHashMap<u16, Outbound>,
    /// Messages for it beyond its Receive Maximum, in order.
    queue: VecDeque<Publish>,
    queued_bytes: usize,
    last_pkid: u16,
    /// 5.0 topic aliases it set.
    aliases: FxHashMap<u16, Bytes>,
    /// What it sent after its CONNECT, before its CONNACK (a client need
    /// not wait for it): acted on once it is accepted.
    early: Vec<Packet>,
}

impl Flows {
    /// A packet id for a message to the tab, free among those awaiting
    /// answer.
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            if !self.outbound.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }
}

impl TabMq {
    fn new(now: Instant) -> TabMq {
        TabMq {
            phase: Phase::Joined,
            stream: Stream::default(),
            empty_id: false,
            will: None,
            clean_end: false,
            accepted: false,
            receive_max: V4_RECEIVE_MAXIMUM,
            silence: None,
            last_heard: now,
            filters: Vec::new(),
            max_packet: None,
            flows: None,
        }
    }

    /// Its flows, allocated on first use.
    fn flows(&mut self) -> &mut Flows {
        self.flows.get_or_insert_with(Box::default)
    }

    fn filter(&self, filter: &str) -> Option<&TabFilter> {
        self.filters.iter().find(|f| &*f.filter == filter)
    }
}

/// What an upstream packet id is waiting for.
#[derive(Debug)]
enum Pending {
    /// A SUBSCRIBE for this filter.
    Subscribe(Arc<str>),
    /// An UNSUBSCRIBE.
    Unsubscribe,
    /// A tab's QoS 1/2 PUBLISH (or a will, `tab` None); `sibling` is the
    /// message to deliver to the session's tabs once the server accepts it
    /// (5.0, where upstream subscriptions ask No Local).
    Publish {
        tab: Option<TabId>,
        tab_pkid: u16,
        sibling: Option<Box<Publish>>,
    },
}

/// The `mqtt` envelope's state for one session.
#[derive(Debug)]
pub struct Mqtt {
    settings: Settings,
    /// The session's protocol level (every tab's: it keys the session).
    level: Level,
    /// The upstream's bytes, reassembled.
    up: Stream,
    /// The first tab's CONNECT went upstream.
    connect_sent: bool,
    /// The tab whose CONNECT went upstream (it gets the CONNACK as sent).
    first: Option<TabId>,
    /// That CONNECT asked for enhanced authentication (5.0 Authentication
    /// Method): the session is that tab's alone, and AUTH passes through.
    enhanced: bool,
    /// The upstream's CONNACK, once it accepted the connection.
    connack: Option<ConnAck>,
    /// The upstream's CONNACK, once it refused the connection: a tab that
    /// comes before the session is gone is answered with it.
    refused: Option<ConnAck>,
    /// The upstream's keepalive, and whether anything was sent since its
    /// last check (a PINGREQ goes when nothing was).
    keepalive: Option<Duration>,
    ping_at: Option<Instant>,
    sent_since: bool,
    /// When tabmux's PINGREQ went, while nothing has come from the server
    /// since: the server is lost one keepalive after it.
    ping_sent: Option<Instant>,
    /// The server answered nothing for a keepalive after a PINGREQ, or
    /// sent what is not a packet: the upstream is lost.
    silent: bool,
    tabs: FxHashMap<TabId, TabMq>,
    /// The session's filters, held upstream.
    filters: FxHashMap<Arc<str>, subscribe::Filter>,
    /// 5.0: the filter each Subscription Identifier of tabmux's names.
    sub_ids: FxHashMap<usize, Arc<str>>,
    last_sub_id: usize,
    /// Upstream packet ids awaiting their answer.
    pending: FxHashMap<u16, Pending>,
    last_pkid: u16,
    /// QoS 1/2 PUBLISHes awaiting the server's answer, and those waiting
    /// for a slot of the server's Receive Maximum.
    in_flight: usize,
    waiting: VecDeque<(u16, Publish)>,
    /// Tab SUBSCRIBEs awaiting the server's answers, by request number.
    requests: FxHashMap<u64, subscribe::Request>,
    last_request: u64,
    wills: Vec<DelayedWill>,
    /// The earliest deadline the machine gave (recomputed when it comes).
    deadline: Option<Instant>,
    /// What the state keeps beyond the streams and the tabs' queues (its
    /// filters, wills, aliases, early packets, messages waiting for the
    /// server's quota), counted again only after a change to them.
    held: usize,
    recount: bool,
    /// Packets the last tab message completed beyond its first (rates
    /// count packets).
    extra_packets: u32,
}

impl Mqtt {
    pub fn new(settings: Settings) -> Mqtt {
        Mqtt {
            settings,
            level: Level::V4,
            up: Stream::default(),
            connect_sent: false,
            first: None,
            enhanced: false,
            connack: None,
            refused: None,
            keepalive: None,
            ping_at: None,
            sent_since: false,
            ping_sent: None,
            silent: false,
            tabs: FxHashMap::default(),
            filters: FxHashMap::default(),
            sub_ids: FxHashMap::default(),
            last_sub_id: 0,
            pending: FxHashMap::default(),
            last_pkid: 0,
            in_flight: 0,
            waiting: VecDeque::new(),
            requests: FxHashMap::default(),
            last_request: 0,
            wills: Vec::new(),
            deadline: None,
            held: 0,
            recount: false,
            extra_packets: 0,
        }
    }

    /// What the session's MQTT state keeps, in bytes, for the buffer
    /// budget: partial packets, messages queued per tab, filters, wills,
    /// topic aliases, messages waiting for the server's quota.
    pub fn held(&mut self) -> usize {
        if self.recount {
            self.recount = false;
            let tabs: usize = self
                .tabs
                .values()
                .map(|t| {
                    t.will.as_ref().map_or(0, |w| w.publish.size())
                        + t.filters.iter().map(|f| f.filter.len() + 48).sum::<usize>()
                        + t.flows.as_ref().map_or(0, |f| {
                            std::mem::size_of::<Flows>()
                                + f.aliases.values().map(|a| a.len() + 16).sum::<usize>()
                                + f.early.iter().map(Packet::size).sum::<usize>()
                        })
                })
                .sum();
            let filters: usize = self.filters.keys().map(|f| 2 * f.len() + 96).sum();
            let waiting: usize = self.waiting.iter().map(|(_, p)| p.size()).sum();
            let wills: usize = self.wills.iter().map(|w| w.publish.size()).sum();
            self.held = tabs + filters + waiting + wills;
        }
        // What moves with every message: partial packets and queues.
        let moving: usize = self
            .tabs
            .values()
            .map(|t| t.stream.held() + t.flows.as_ref().map_or(0, |f| f.queued_bytes))
            .sum();
        self.held + moving + self.up.held()
    }

    /// The server's CONNACK properties, if any.
    fn server(&self) -> Option<&ConnAckProperties> {
        self.connack.as_ref()?.properties.as_ref()
    }

    /// The server's Receive Maximum for the session.
    fn server_receive_max(&self) -> usize {
        usize::from(
            self.server()
                .and_then(|p| p.receive_max)
                .unwrap_or(V4_RECEIVE_MAXIMUM),
        )
    }

    /// The highest QoS a tab may publish with: the route's `max_qos`, and
    /// on 5.0 the server's Maximum QoS when lower.
    fn max_qos(&self) -> u8 {
        let server = self.server().and_then(|p| p.max_qos).unwrap_or(2);
        self.settings.max_qos.min(server)
    }

    /// Whether the server keeps retained messages (5.0 Retain Available).
    fn retain_available(&self) -> bool {
        self.server().and_then(|p| p.retain_available) != Some(0)
    }

    /// The largest packet a tab may send: the route's, and the server's
    /// 5.0 Maximum Packet Size when lower.
    fn max_from_tab(&self) -> usize {
        let server = self
            .server()
            .and_then(|p| p.max_packet_size)
            .map_or(usize::MAX, |m| m as usize);
        self.settings.max_packet.min(server)
    }

    /// Writes a packet at the session's level.
    fn bytes(&self, packet: &Packet) -> Bytes {
        codec::write(self.level, packet)
    }

    /// Sends one tab a packet.
    fn answer(&self, tab: TabId, packet: &Packet, out: &mut Effects) {
        out.push(Effect::Answer {
            tab,
            msg: Message::Binary(self.bytes(packet)),
        });
    }

    /// Sends the upstream a packet tabmux composed.
    fn upstream(&mut self, packet: &Packet, out: &mut Effects) {
        self.sent_since = true;
        out.push(Effect::Upstream(Message::Binary(self.bytes(packet))));
    }

    /// An upstream packet id free among those awaiting answer.
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            if !self.pending.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }

    /// A tab joined (its CONNECT comes next, with [`Mqtt::tab_placed`]).
    #[inline(never)]
    pub fn tab_joined(&mut self, tab: TabId, now: Instant) {
        self.tabs.insert(tab, TabMq::new(now));
    }

    /// The bytes that placed a tab in its session: its CONNECT (and
    /// whatever followed it in the same messages).
    #[inline(never)]
    pub fn tab_placed(&mut self, tab: TabId, bytes: &[u8], now: Instant, out: &mut Effects) {
        if !self.tabs.contains_key(&tab) {
            self.tab_joined(tab, now);
        }
        self.read_tab(tab, bytes, now, out);
    }

    /// A tab sent a WebSocket message: its bytes join its stream, and each
    /// whole packet is acted on.
    #[inline(never)]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        let bytes: &[u8] = match &msg {
            Message::Binary(b) => b,
            // Text is taken as bytes, as mosquitto takes it.
            Message::Text(t) => t.as_bytes(),
            _ => return Ok(()),
        };
        self.extra_packets = 0;
        self.read_tab(tab, bytes, now(), out);
        Ok(())
    }

    fn read_tab(&mut self, tab: TabId, bytes: &[u8], now: Instant, out: &mut Effects) {
        let max = self.max_from_tab();
        let level = self.level;
        {
            let Some(state) = self.tabs.get_mut(&tab) else {
                return;
            };
            if state.phase == Phase::Done {
                return;
            }
            state.last_heard = now;
            state.stream.push(bytes);
        }
        let mut packets = 0u32;
        loop {
            if packets > 1 {
                self.extra_packets = packets - 1;
            }
            let Some(state) = self.tabs.get_mut(&tab) else {
                return;
            };
            if state.phase == Phase::Done {
                return;
            }
            // The first packet decides the level of a tab's session.
            let at = if state.phase == Phase::Joined {
                None
            } else {
                Some(level)
            };
            let raw = match state.stream.next_raw(max) {
                Ok(Some(raw)) => raw,
                Ok(None) => return,
                Err(bad) => return self.refuse_bad(tab, bad, out),
            };
            packets += 1;
            let Some(at) = at else {
                self.connect(tab, raw, now, out);
                continue;
            };
            match codec::read(at, raw) {
                Ok(packet) => self.tab_packet(tab, packet, now, out),
                Err(bad) => return self.refuse_bad(tab, bad, out),
            }
        }
    }

    /// A tab's packet that tabmux cannot read: refused to that tab alone.
    fn refuse_bad(&mut self, tab: TabId, bad: Bad, out: &mut Effects) {
        let (code, cause) = match bad {
            Bad::TooLarge(_) => (DisconnectReasonCode::PacketTooLarge, Cause::TooBig),
            Bad::Malformed(_) => (DisconnectReasonCode::MalformedPacket, Cause::ProtocolError),
        };
        let reason = if matches!(cause, Cause::TooBig) {
            Refused::TooLarge
        } else {
            Refused::Malformed
        };
        self.refuse(tab, reason, code, cause, out);
    }

    /// Refuses a tab what the server would refuse: 5.0 with a DISCONNECT,
    /// then closed; 3.1.1 closed without a packet.
    fn refuse(
        &mut self,
        tab: TabId,
        reason: Refused,
        code: DisconnectReasonCode,
        cause: Cause,
        out: &mut Effects,
    ) {
        out.push(Effect::Refused(reason));
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        let connected = state.phase == Phase::Connected;
        state.phase = Phase::Done;
        if self.level == Level::V5 && connected {
            self.answer(tab, &Packet::Disconnect(Disconnect::new(code)), out);
        }
        out.push(Effect::Close {
            to: Target::one(tab),
            cause,
        });
    }

    /// Refuses a packet the server would refuse as malformed or a protocol
    /// error (`code`): [`Mqtt::refuse`], counted as malformed, closed 1002.
    fn refuse_packet(&mut self, tab: TabId, code: DisconnectReasonCode, out: &mut Effects) {
        self.refuse(tab, Refused::Malformed, code, Cause::ProtocolError, out);
    }

    /// Closes a tab (its will is published when it leaves).
    fn close(&mut self, tab: TabId, cause: Cause, out: &mut Effects) {
        if let Some(state) = self.tabs.get_mut(&tab) {
            state.phase = Phase::Done;
        }
        out.push(Effect::Close {
            to: Target::one(tab),
            cause,
        });
    }

    /// A packet from a tab that is connected (or waiting for its CONNACK).
    fn tab_packet(&mut self, tab: TabId, packet: Packet, now: Instant, out: &mut Effects) {
        if !matches!(&packet, Packet::Publish(p) if p.qos == QoS::AtMostOnce && p.properties.is_none())
        {
            self.recount = true;
        }
        if let Packet::Auth(auth) = packet {
            // Enhanced authentication (a session of one tab): its AUTH
            // packets pass through, before the CONNACK too.
            if self.enhanced {
                self.upstream(&Packet::Auth(auth), out);
                return;
            }
            return self.refuse_packet(tab, DisconnectReasonCode::ProtocolError, out);
        }
        if let Some(state) = self.tabs.get_mut(&tab) {
            if state.phase == Phase::Waiting && !matches!(packet, Packet::Disconnect(_)) {
                // A client need not wait for its CONNACK (3.1.1 and 5.0,
                // §3.1.4): what it sent meanwhile is acted on once it is
                // accepted, within a bound.
                if state.flows().early.len() < MAX_EARLY {
                    state.flows().early.push(packet);
                    return;
                }
                return self.refuse_packet(tab, DisconnectReasonCode::ReceiveMaximumExceeded, out);
            }
        }
        match packet {
            Packet::PingReq(_) => {
                out.push(Effect::Avoided(Saving::Ping));
                self.answer(tab, &Packet::PingResp(PingResp), out);
            }
            Packet::Publish(p) => self.tab_publish(tab, p, out),
            Packet::PubAck(a) => self.tab_ack(tab, a.pkid, false, out),
            Packet::PubRec(r) => self.tab_ack(tab, r.pkid, true, out),
            Packet::PubComp(c) => self.tab_ack(tab, c.pkid, false, out),
            Packet::PubRel(r) => self.tab_release(tab, r.pkid, out),
            Packet::Subscribe(s) => self.tab_subscribe(tab, s, out),
            Packet::Unsubscribe(u) => self.tab_unsubscribe(tab, u, now, out),
            Packet::Disconnect(d) => {
                let with_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                if let Some(state) = self.tabs.get_mut(&tab) {
                    state.clean_end = !with_will;
                }
                self.close(
                    tab,
                    Cause::Subprotocol {
                        code: 1000,
                        reason: String::new(),
                    },
                    out,
                );
            }
            // A second CONNECT, an AUTH outside enhanced authentication,
            // or a packet only a server sends.
            _ => self.refuse_packet(tab, DisconnectReasonCode::ProtocolError, out),
        }
    }

    /// Packets the last tab message completed beyond its first.
    #[inline]
    pub fn take_extra_packets(&mut self) -> u32 {
        std::mem::take(&mut self.extra_packets)
    }

    /// A tab left: its subscriptions are released (lingering), its will
    /// published unless it ended with DISCONNECT 0, its flows dropped.
    #[inline(never)]
    pub fn tab_left(&mut self, tab: TabId, _code: u16, now: Instant, out: &mut Effects) {
        self.recount = true;
        let Some(state) = self.tabs.remove(&tab) else {
            return;
        };
        if self.first == Some(tab) && self.connack.is_none() {
            // Its CONNECT is upstream; the CONNACK answers the others.
            self.first = None;
        }
        for f in &state.filters {
            self.release(&f.filter, tab, now, out);
        }
        self.requests.retain(|_, r| r.tab != tab);
        // A tab refused at its CONNECT never had a connection: no will.
        if !state.clean_end && state.accepted {
            if let Some(will) = state.will {
                let will = *will;
                if will.delay.is_zero() {
                    self.publish_will(will.publish, out);
                } else {
                    self.wills.push(DelayedWill {
                        at: now + will.delay,
                        client_id: will.client_id,
                        publish: will.publish,
                    });
                    self.deadline = None;
                }
            }
        }
    }

    /// An upstream WebSocket message: its bytes join the upstream's
    /// stream, and each whole packet is acted on.
    #[inline(never)]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut Effects) {
        let bytes: &[u8] = match &msg {
            Message::Binary(b) => b,
            Message::Text(t) => t.as_bytes(),
            _ => return,
        };
        self.ping_sent = None;
        self.up.push(bytes);
        loop {
            // What the server sends is bounded by the Maximum Packet Size
            // its CONNECT gave it.
            match self.up.next(self.level, self.settings.max_packet) {
                Ok(Some(packet)) => self.upstream_packet(packet, out),
                Ok(None) => return,
                Err(bad) => {
                    // The stream cannot be read past it: the upstream is
                    // lost at once (the next deadline is now).
                    tracing::warn!(?bad, "the MQTT server sent what is not a packet");
                    self.up = Stream::default();
                    self.silent = true;
                    self.deadline = None;
                    return out.push(Effect::Malformed(super::FrameError::NotJson));
                }
            }
        }
    }

    fn upstream_packet(&mut self, packet: Packet, out: &mut Effects) {
        if !matches!(packet, Packet::Publish(_)) {
            self.recount = true;
        }
        match packet {
            Packet::ConnAck(ack) => self.upstream_connack(ack, out),
            Packet::Publish(p) => self.upstream_publish(p, out),
            Packet::PubAck(a) => {
                let (pkid, reason) = (a.pkid, a.reason as u8);
                self.server_answered(pkid, Packet::PubAck(a), reason < 0x80, true, out)
            }
            Packet::PubRec(r) => self.server_received(r, out),
            Packet::PubComp(c) => self.server_completed(c, out),
            Packet::PubRel(r) => {
                let comp = rumqttc::v5::mqttbytes::v5::PubComp::new(r.pkid, None);
                self.upstream(&Packet::PubComp(comp), out);
            }
            Packet::SubAck(s) => self.upstream_suback(s, out),
            Packet::UnsubAck(u) => {
                self.pending.remove(&u.pkid);
            }
            Packet::PingResp(_) => {}
            Packet::Disconnect(d) => {
                // The close follows: every 5.0 tab is told why first.
                if self.level == Level::V5 {
                    let msg = Message::Binary(self.bytes(&Packet::Disconnect(d)));
                    super::broadcast(msg, out);
                }
            }
            Packet::Auth(a) => {
                // Enhanced authentication: a session of one tab.
                let tabs: Vec<TabId> = self.tabs.keys().copied().collect();
                let msg = Message::Binary(self.bytes(&Packet::Auth(a)));
                super::deliver(tabs, msg, out);
            }
            _ => out.push(Effect::Malformed(super::FrameError::NotJson)),
        }
    }

    /// The upstream is gone: every tab is closed with 1012 (their clients
    /// reconnect). Their wills are not published.
    pub fn upstream_lost(&mut self, _lost: &Lost) -> Cause {
        for t in self.tabs.values_mut() {
            t.clean_end = true;
        }
        Cause::UpstreamLost
    }
}
