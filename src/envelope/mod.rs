//! Envelopes: what a session does with frames, as pure state machines.
//!
//! Each envelope of docs/protocol.md is one state machine that owns no socket and
//! no clock. Its session feeds it events (a tab joined, sent, left; the
//! upstream sent a frame, was lost, was restored; a deadline came, with the
//! time) and it answers with [`Effect`]s (forward a tab's message, send
//! upstream, deliver to these tabs, answer one tab, close tabs with a
//! [`Cause`]), pushed in the order they are decided into one buffer the
//! session owns, and with its next deadline ([`Machine::next_deadline`]),
//! as quinn-proto's `poll_timeout` does. The session applies the effects to
//! real sockets once the call has returned, never while the machine runs;
//! a unit test reads the same buffer and compares plain values.
//!
//! [`Machine`] dispatches by an enum, not a generic, so that the session's
//! hot loop exists once in the binary whatever the route's envelope.
//!
//! - [`json`]: `json/1`, the tab-id envelope, and its encoders;
//!   [`json_decode`] turns a backend frame into a [`BackendFrame`].
//! - [`none`]: frames pass unchanged; a greeting is replayed to later tabs.
//! - [`pusher`]: Pusher Channels, multiplexed by channel.
//! - [`graphql`]: GraphQL over WebSocket, multiplexed by operation.
//! - [`mqtt`]: MQTT 3.1.1 and 5.0, multiplexed by topic filter.

pub mod graphql;
pub mod json;
pub mod json_decode;
pub mod mqtt;
pub mod none;
pub mod pusher;

use std::fmt;
use std::time::Instant;

use tokio_tungstenite::tungstenite::Message;
/// The validated text of a frame: what the decoder takes and encoders build.
pub use tokio_tungstenite::tungstenite::Utf8Bytes;

pub use json::{close_event, data_binary, data_text, open_event, NotJson};
pub use json_decode::{decode, is_valid_tab_id, BackendFrame, Body, FrameError};

use crate::cause::{Cause, Lost};
use crate::config::{self, Route};

/// A tab id. tabmux assigns them per upstream connection as `t1`, `t2`, …
/// (never reused on one connection, so their order is the join order); the
/// wire form is `t` followed by the number in decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TabId(pub u64);

impl TabId {
    /// Parses the wire form of an id tabmux could have assigned. Any other
    /// string (even one that is a syntactically valid id) names no tab.
    pub fn parse(s: &str) -> Option<TabId> {
        let digits = s.strip_prefix('t')?;
        // "t0" is never assigned and "t07" is not how "t7" is written.
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        digits.parse().ok().map(TabId)
    }
}

impl fmt::Display for TabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// What a joining tab tells its session's envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinInfo {
    /// The tab's raw query string (`""` if none).
    pub query: String,
    /// Request headers the route copies into the `open` event.
    pub headers: Vec<(String, String)>,
}

/// Whom a frame is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every tab of the session.
    All,
    /// The listed tabs, each once. `foreign` counts names that are
    /// well-formed but could never have been assigned by tabmux: they name
    /// no tab and are dropped like ids of tabs that left.
    Tabs { ids: Vec<TabId>, foreign: usize },
}

impl Target {
    /// One tab.
    pub fn one(tab: TabId) -> Target {
        Target::Tabs {
            ids: vec![tab],
            foreign: 0,
        }
    }
}

/// A tab's message, ready for the upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// The frame to send upstream.
    pub frame: Message,
    /// The size of what the tab sent (what metrics and `reconnect_buffer`
    /// count).
    pub payload: usize,
}

/// What an envelope decided, for its session to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A tab's message, for the upstream (or the reconnect buffer while
    /// the upstream is down, where it is kept as the tab's).
    Forward(TabId, Forward),
    /// Send a frame of the envelope's own upstream (an `open` or `close`
    /// event, a subscribe it composed).
    Upstream(Message),
    /// Deliver one backend message to tabs: one buffer, shared by all.
    /// `len` is its payload size.
    Deliver {
        to: Target,
        msg: Message,
        len: usize,
    },
    /// Send one tab a frame the envelope holds or composed (a greeting).
    Answer { tab: TabId, msg: Message },
    /// Close tabs with this cause.
    Close { to: Target, cause: Cause },
    /// An upstream frame broke the envelope's rules and was dropped.
    Malformed(FrameError),
    /// Something a tab asked for was answered without the upstream: a
    /// saving to count.
    Avoided(Saving),
    /// A tab's request was refused at the edge, before the server saw it
    /// (its answer is an [`Effect::Answer`] or a close): counted by reason.
    Refused(Refused),
}

/// Why a tab's request was refused at the edge: what the server would
/// refuse, or could fail on (`tabmux_edge_refusals_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a frame of the envelope's protocol (not JSON, no event, a
    /// field missing or of the wrong type, binary where text is spoken).
    Malformed,
    /// JSON nested deeper than the envelope allows.
    Nesting,
    /// A channel name outside the protocol's rules.
    ChannelName,
    /// A private or presence subscribe without `auth`.
    Auth,
    /// A presence subscribe without `channel_data`, or with too much.
    ChannelData,
    /// The tab's share of its session's channels is taken.
    TabChannels,
    /// The session's channels are all taken.
    SessionChannels,
    /// About a channel the tab is not subscribed to.
    NotSubscribed,
    /// Client events are off on the route.
    ClientEventsOff,
    /// A client event on a channel that is neither private nor presence.
    ClientEventChannel,
    /// A client event whose data is over the protocol's size.
    ClientEventSize,
    /// A client event past the session's `client_event_rate`.
    ClientEventRate,
    /// The tab's share of its session's operations is taken.
    TabOperations,
    /// The session's operations are all taken.
    SessionOperations,
    /// The tab's share of its session's MQTT filters is taken.
    TabFilters,
    /// The session's MQTT filters are all taken.
    SessionFilters,
    /// An MQTT packet over the size allowed.
    TooLarge,
    /// An MQTT QoS above what the server accepts.
    Qos,
    /// An MQTT RETAIN where the server keeps no retained messages.
    Retain,
    /// An MQTT QoS 1/2 PUBLISH beyond the tab's Receive Maximum.
    Quota,
}

impl Refused {
    /// Every reason, in the order of [`Refused::label`].
    pub const ALL: [Refused; 20] = [
        Refused::Malformed,
        Refused::Nesting,
        Refused::ChannelName,
        Refused::Auth,
        Refused::ChannelData,
        Refused::TabChannels,
        Refused::SessionChannels,
        Refused::NotSubscribed,
        Refused::ClientEventsOff,
        Refused::ClientEventChannel,
        Refused::ClientEventSize,
        Refused::ClientEventRate,
        Refused::TabOperations,
        Refused::SessionOperations,
        Refused::TabFilters,
        Refused::SessionFilters,
        Refused::TooLarge,
        Refused::Qos,
        Refused::Retain,
        Refused::Quota,
    ];

    /// Its `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Nesting => "nesting",
            Refused::ChannelName => "channel_name",
            Refused::Auth => "auth",
            Refused::ChannelData => "channel_data",
            Refused::TabChannels => "tab_channels",
            Refused::SessionChannels => "session_channels",
            Refused::NotSubscribed => "not_subscribed",
            Refused::ClientEventsOff => "client_events_off",
            Refused::ClientEventChannel => "client_event_channel",
            Refused::ClientEventSize => "client_event_size",
            Refused::ClientEventRate => "client_event_rate",
            Refused::TabOperations => "tab_operations",
            Refused::SessionOperations => "session_operations",
            Refused::TabFilters => "tab_filters",
            Refused::SessionFilters => "session_filters",
            Refused::TooLarge => "too_large",
            Refused::Qos => "qos",
            Refused::Retain => "retain",
            Refused::Quota => "quota",
        }
    }
}

/// What a tab's request that tabmux answered itself would have cost upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saving {
    /// A subscription (Pusher: the channel was subscribed already).
    Subscription,
    /// A ping.
    Ping,
    /// More deliveries than the fan-out counts: messages the server would
    /// have sent that it never sent at all (a client event tabmux
    /// delivered to sibling tabs: the server sent it to none of them; a
    /// GraphQL result written for tabs with different ids, one buffer
    /// each: the server sent one).
    Deliveries(u32),
    /// An upstream CONNECT (MQTT: a later tab's, answered by tabmux). The
    /// time later tabs stay connected is counted for every route, as
    /// connection-seconds avoided.
    Connection,
}

/// Delivers `msg` to every tab of the session.
pub(crate) fn broadcast(msg: Message, out: &mut Effects) {
    let len = msg.len();
    out.push(Effect::Deliver {
        to: Target::All,
        msg,
        len,
    });
}

/// Delivers `msg` to the listed tabs, if any.
pub(crate) fn deliver(tabs: Vec<TabId>, msg: Message, out: &mut Effects) {
    if tabs.is_empty() {
        return;
    }
    let len = msg.len();
    out.push(Effect::Deliver {
        to: Target::Tabs {
            ids: tabs,
            foreign: 0,
        },
        msg,
        len,
    });
}

/// The buffer an envelope pushes its effects into, in the order it decides
/// them: the session's own (reused, so it allocates only when it grows),
/// or a test's.
pub type Effects = Vec<Effect>;

/// A session's envelope state machine, whichever the route's envelope is.
#[derive(Debug)]
pub enum Machine {
    Json(json::Json),
    None(none::Passthrough),
    /// Boxed: a Pusher session's state is larger than the others', and
    /// the enum is inline in every session's task.
    Pusher(Box<pusher::Pusher>),
    Graphql(Box<graphql::Graphql>),
    Mqtt(Box<mqtt::Mqtt>),
}

impl Machine {
    /// The machine for a route, for a session whose upstream is up and
    /// chose `protocol`.
    pub fn new(route: &Route, protocol: Option<&http::HeaderValue>) -> Machine {
        match route.envelope {
            config::Envelope::Graphql => {
                let legacy = protocol.is_some_and(|p| p.as_bytes() == b"graphql-ws");
                let protocol = if legacy {
                    graphql::Subprotocol::Legacy
                } else {
                    graphql::Subprotocol::TransportWs
                };
                Machine::Graphql(Box::new(graphql::Graphql::new(
                    protocol,
                    route.share_subscriptions,
                    route.linger,
                )))
            }
            config::Envelope::Mqtt => Machine::Mqtt(Box::new(mqtt::Mqtt::new(mqtt::Settings {
                max_packet: route.max_message_size,
                max_qos: route.max_qos,
                linger: route.linger,
            }))),
            config::Envelope::Json => Machine::Json(json::Json::new(route)),
            config::Envelope::None => Machine::None(none::Passthrough::new(route)),
            config::Envelope::Pusher => Machine::Pusher(Box::new(
                pusher::Pusher::new(route.linger)
                    .with_client_events(route.client_events, route.client_event_rate),
            )),
        }
    }

    /// A tab joined the session.
    pub fn tab_joined(&mut self, tab: TabId, info: &JoinInfo, out: &mut Effects) {
        match self {
            Machine::Json(m) => m.tab_joined(tab, info, out),
            Machine::None(m) => m.tab_joined(tab, out),
            Machine::Pusher(m) => m.tab_joined(tab, out),
            Machine::Graphql(m) => m.tab_joined(tab, out),
            // Its CONNECT follows, with the time.
            Machine::Mqtt(_) => {}
        }
    }

    /// The frame that placed a tab in its session (a `graphql` tab's
    /// `connection_init`; an `mqtt` tab's CONNECT, with whatever followed
    /// it), right after [`Machine::tab_joined`], at `now`.
    pub fn tab_placed(&mut self, tab: TabId, init: Message, now: Instant, out: &mut Effects) {
        match self {
            Machine::Graphql(m) => m.tab_init(tab, init, out),
            Machine::Mqtt(m) => {
                if let Message::Binary(bytes) = &init {
                    m.tab_placed(tab, bytes, now, out);
                }
            }
            _ => {}
        }
    }

    /// A tab sent a data message (text or binary): its effects (what goes
    /// upstream, if anything, as [`Effect::Forward`]; `pusher` may also
    /// answer the tab or deliver to its siblings), or why the tab is closed
    /// instead. Every envelope has this signature; `now` is called only by
    /// an envelope that needs the time (`pusher`, for client events), so
    /// `json` and `none` cost no clock read.
    #[inline]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        match self {
            Machine::Json(m) => m.tab_sent(tab, msg, now, out),
            Machine::None(m) => m.tab_sent(tab, msg, now, out),
            Machine::Pusher(m) => m.tab_sent(tab, msg, now, out),
            Machine::Graphql(m) => m.tab_sent(tab, msg, now, out),
            Machine::Mqtt(m) => m.tab_sent(tab, msg, now, out),
        }
    }

    /// Messages of `tab_rate` the last [`Machine::tab_sent`] counts beyond
    /// the one it was given (`mqtt`: the packets beyond the first that the
    /// message completed; rates count MQTT packets).
    #[inline]
    pub fn extra_messages(&mut self) -> u32 {
        match self {
            Machine::Mqtt(m) => m.take_extra_packets(),
            _ => 0,
        }
    }

    /// A tab left the session at `now`; `code` is its connection's close
    /// code. Every envelope has this signature.
    pub fn tab_left(&mut self, tab: TabId, code: u16, now: Instant, out: &mut Effects) {
        match self {
            Machine::Json(m) => m.tab_left(tab, code, now, out),
            Machine::None(m) => m.tab_left(tab, code, now, out),
            Machine::Pusher(m) => m.tab_left(tab, code, now, out),
            Machine::Graphql(m) => m.tab_left(tab, code, now, out),
            Machine::Mqtt(m) => m.tab_left(tab, code, now, out),
        }
    }

    /// The upstream sent a data frame (text or binary).
    #[inline]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut Effects) {
        match self {
            Machine::Json(m) => m.upstream_frame(msg, out),
            Machine::None(m) => m.upstream_frame(msg, out),
            Machine::Pusher(m) => m.upstream_frame(msg, out),
            Machine::Graphql(m) => m.upstream_frame(msg, out),
            Machine::Mqtt(m) => m.upstream_frame(msg, out),
        }
    }

    /// The upstream is lost: None when the session redials it (tabs stay),
    /// or the cause every tab is closed with instead (`pusher`: its clients
    /// reconnect themselves, and a new connection needs their channel
    /// authorizations anew).
    pub fn upstream_lost(&mut self, lost: &Lost) -> Option<Cause> {
        match self {
            Machine::Json(m) => {
                m.upstream_lost();
                None
            }
            Machine::None(_) => None,
            Machine::Pusher(m) => Some(m.upstream_lost(lost)),
            Machine::Graphql(m) => Some(m.upstream_lost(lost)),
            Machine::Mqtt(m) => Some(m.upstream_lost(lost)),
        }
    }

    /// The upstream is back; `members` are the tabs still connected, in the
    /// order they joined.
    pub fn upstream_restored<'a>(
        &mut self,
        members: impl Iterator<Item = (TabId, &'a JoinInfo)>,
        out: &mut Effects,
    ) {
        match self {
            Machine::Json(m) => m.upstream_restored(members, out),
            Machine::None(m) => m.upstream_restored(),
            // Never redialled.
            Machine::Pusher(_) | Machine::Graphql(_) | Machine::Mqtt(_) => {}
        }
    }

    /// When the machine next needs the time, if it keeps any (`pusher`: its
    /// upstream's keepalive, a channel's linger); the session wakes it then
    /// with [`Machine::on_timeout`], whatever `ping_interval` is. `now` is
    /// called only by a machine that keeps time, so `json` and `none` cost
    /// no clock read.
    #[inline]
    pub fn next_deadline(&mut self, now: impl FnOnce() -> Instant) -> Option<Instant> {
        match self {
            Machine::Json(_) | Machine::None(_) => None,
            Machine::Pusher(m) => m.next_deadline(now()),
            Machine::Graphql(m) => m.next_deadline(),
            Machine::Mqtt(m) => m.next_deadline(now()),
        }
    }

    /// Whether the machine has deadlines at all (`json` and `none` have
    /// none).
    #[inline]
    pub fn keeps_time(&self) -> bool {
        matches!(
            self,
            Machine::Pusher(_) | Machine::Graphql(_) | Machine::Mqtt(_)
        )
    }

    /// Whether the machine keeps state for its session beyond what passes
    /// through (`pusher`: channels, members, requests waiting their turn;
    /// `graphql`: operations, a live one's last result): then the session
    /// reports [`Machine::held`] to the buffer budget.
    #[inline]
    pub fn keeps_state(&self) -> bool {
        matches!(
            self,
            Machine::Pusher(_) | Machine::Graphql(_) | Machine::Mqtt(_)
        )
    }

    /// What the machine keeps for its session, in bytes (counted in the
    /// buffer budget as the session's).
    pub fn held(&mut self) -> usize {
        match self {
            Machine::Json(_) | Machine::None(_) => 0,
            Machine::Pusher(m) => m.held(),
            Machine::Graphql(m) => m.held(),
            Machine::Mqtt(m) => m.held(),
        }
    }

    /// Whether the machine found its upstream dead at its last deadline
    /// (`mqtt`: no answer for a keepalive after its PINGREQ): the session
    /// then loses the upstream as silent.
    pub fn upstream_silent(&self) -> bool {
        matches!(self, Machine::Mqtt(m) if m.upstream_silent())
    }

    /// A deadline given by [`Machine::next_deadline`] has come, at `now`.
    pub fn on_timeout(&mut self, now: Instant, out: &mut Effects) {
        match self {
            Machine::Graphql(m) => m.on_timeout(now, out),
            Machine::Mqtt(m) => m.on_timeout(now, out),
            _ => self.tick(now, out),
        }
    }

    /// A keepalive tick of the session (every `ping_interval`), at `now`.
    /// Neither `json` nor `none` keeps time; `pusher` pings its upstream
    /// with `pusher:ping` and unsubscribes channels left past `linger`.
    pub fn tick(&mut self, now: Instant, out: &mut Effects) {
        match self {
            Machine::Json(_) | Machine::None(_) => {}
            Machine::Pusher(m) => m.tick(now, out),
            // Its deadlines are its lingers (the upstream's keepalive is
            // the session's WebSocket ping).
            Machine::Graphql(m) => m.on_timeout(now, out),
            // Its keepalives are deadlines of its own.
            Machine::Mqtt(m) => m.on_timeout(now, out),
        }
    }

    /// Frames a tab may be sent on joining beyond the route's `tab_queue`
    /// (a greeting replay): its outbox may hold this many more.
    pub fn greeting_len(&self) -> usize {
        match self {
            Machine::Json(_) => 0,
            Machine::None(m) => m.greeting_len(),
            // `connection_established`; the `connection_ack`.
            Machine::Pusher(_) | Machine::Graphql(_) | Machine::Mqtt(_) => 1,
        }
    }
}
