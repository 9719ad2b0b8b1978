//! `envelope = "pusher"` (docs/protocol.md, "The `pusher` envelope"): one Pusher
//! Channels connection (protocol 7) per session, multiplexed at the level of
//! the protocol's channels, so that to each tab the session looks like a
//! Pusher connection of its own.
//!
//! The state machine keeps what a Pusher server keeps per connection, once
//! for the session. This file holds the connection itself: the upstream's
//! `pusher:connection_established` (given to every tab), pings answered
//! here, the upstream's keepalive (a `pusher:ping` within half its
//! announced activity timeout, as a deadline), what a lost upstream closes
//! the tabs with, and the one request in flight: subscriptions and the
//! sign-in go upstream **one at a time**, because a `pusher:error` names no
//! channel, so only the one request in flight can be what it answers. Each
//! feature is in a file of its own:
//!
//! - [`channels`]: subscriptions shared by the tabs that ask (refcount),
//!   events routed to a channel's tabs alone, client events delivered to
//!   sibling tabs, and `linger`;
//! - [`presence`]: a presence channel's members, kept current;
//! - [`sign_in`]: one sign-in per session, and the user's events;
//! - [`cache`]: a cache channel's last event, for later tabs;
//! - [`frames`]: the fields of a frame and the frames composed here.
//!
//! What a tab receives is byte for byte what the upstream sent, except the
//! frames composed here (a locally answered subscription, a pong, a cached
//! sign-in, an error about the tab's own input, a client event delivered to
//! a sibling tab), which take the shape the protocol gives them.
//!
//! Its entry points are never inlined: the session's hot loop dispatches
//! to every envelope, and the `json` route's path must not be laid out
//! around this one's code (the hot code's size is measured, BENCHMARKS.md).
//! Unlike the other envelopes, a lost upstream is not redialled: the tabs
//! are closed with [`Pusher::upstream_lost`]'s cause, and their clients
//! reconnect (a new connection needs their channel authorizations anew).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use super::broadcast;
use super::{Effect, Effects, Forward, Refused, Saving, TabId, Target};
use crate::cause::{Cause, Lost};
use channels::{Channel, Upstream};
use frames::{data_object, nested_deeper_than, refuse, take_string};
use sign_in::SignIn;

pub use channels::{MAX_CHANNELS, MAX_CHANNEL_NAME, MAX_TAB_CHANNELS};

/// The deepest JSON a tab may send: a server's parser may fail on deeper
/// input, and its failure would close the session's connection.
pub const MAX_NESTING: usize = 32;

/// A Pusher event as it travels: the fields tabmux routes by. Anything else
/// is left as it is in the frame.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// What is sent upstream one at a time: what the server may answer with a
/// `pusher:error` that names no channel.
#[derive(Debug, Clone, PartialEq)]
enum Request {
    Subscribe(String),
    SignIn,
    /// A tab's client event: queued with its frame; once sent, in flight
    /// until the server answers the `pusher:ping` tabmux sent behind it
    /// (the `ping`-th it sent: servers answer in order, so an error before
    /// that pong is the event's).
    ClientEvent {
        tab: TabId,
        forward: Option<Forward>,
        ping: u64,
    },
}

/// The ping tabmux sends upstream (behind a client event, or to keep a
/// silent upstream alive).
const PING: &str = r#"{"event":"pusher:ping","data":{}}"#;

/// The `pusher` envelope's state for one session.
#[derive(Debug)]
pub struct Pusher {
    /// The upstream's `pusher:connection_established`, once it came.
    established: Option<Message>,
    /// How often the upstream wants to hear from its client (from the
    /// greeting; 120 s until then).
    activity_timeout: Duration,
    /// Tabs that joined before the greeting came: they are given it then.
    greeting_due: Vec<TabId>,
    /// Every tab of the session, in join order.
    tabs: Vec<TabId>,
    channels: FxHashMap<String, Channel>,
    /// Requests waiting their turn, and the one in flight.
    queue: VecDeque<Request>,
    in_flight: Option<Request>,
    /// Since when the request in flight has waited for its answer (as of
    /// the first look at the time after it went).
    in_flight_since: Option<Instant>,
    sign_in: SignIn,
    /// Whether the upstream sent anything since the last ping decision.
    heard: bool,
    /// Since when the upstream has been silent, as of the last tick.
    silent_since: Option<Instant>,
    linger: Duration,
    /// Some channel's tabs have all left: it lingers (its deadline is
    /// looked for only while this is set).
    lingering: bool,
    /// The route's `client_events` and `client_event_rate`, and the
    /// session's current one-second window of client events (its start,
    /// and how many went upstream in it).
    client_events: bool,
    client_event_rate: u32,
    client_window: Option<(Instant, u32)>,
    /// `pusher:ping`s tabmux sent upstream, and `pusher:pong`s it received.
    pings: u64,
    pongs: u64,
    /// What the session's state keeps, in bytes, as last counted, and
    /// whether it may have changed since ([`Pusher::held`]).
    held: usize,
    recount: bool,
}

impl Pusher {
    /// The machine of a new session; `linger` is how long a channel whose
    /// tabs have all left stays subscribed upstream.
    pub fn new(linger: Duration) -> Pusher {
        Pusher {
            established: None,
            activity_timeout: Duration::from_secs(120),
            greeting_due: Vec::new(),
            tabs: Vec::new(),
            channels: FxHashMap::default(),
            queue: VecDeque::new(),
            in_flight: None,
            in_flight_since: None,
            sign_in: SignIn::None,
            heard: false,
            silent_since: None,
            linger,
            lingering: false,
            client_events: true,
            client_event_rate: 10,
            client_window: None,
            pings: 0,
            pongs: 0,
            held: 0,
            recount: false,
        }
    }

    /// What the session's Pusher state keeps, in bytes, for the buffer
    /// budget: the greeting, the channels (their frames, tabs and
    /// members, a cache channel's last event), the requests waiting their
    /// turn and the sign-in. Counted again only after something that may
    /// have changed it (not for an event routed to a channel's tabs).
    pub fn held(&mut self) -> usize {
        if std::mem::take(&mut self.recount) {
            self.held = self.count();
        }
        self.held
    }

    fn count(&self) -> usize {
        let frame = |m: Option<&Message>| m.map_or(0, Message::len);
        let tab = std::mem::size_of::<TabId>();
        let channels: usize = self
            .channels
            .iter()
            .map(|(name, ch)| ch.bytes(name) + std::mem::size_of::<String>())
            .sum();
        let queued: usize = self
            .queue
            .iter()
            .map(|r| {
                std::mem::size_of::<Request>()
                    + match r {
                        Request::Subscribe(name) => name.len(),
                        Request::ClientEvent { forward, .. } => {
                            frame(forward.as_ref().map(|f| &f.frame))
                        }
                        Request::SignIn => 0,
                    }
            })
            .sum();
        frame(self.established.as_ref())
            + (self.tabs.capacity() + self.greeting_due.capacity()) * tab
            + channels
            + queued
            + self.sign_in.bytes()
    }

    /// The route's `client_events` and `client_event_rate`.
    pub fn with_client_events(mut self, enabled: bool, rate: u32) -> Pusher {
        self.client_events = enabled;
        self.client_event_rate = rate;
        self
    }

    /// The activity timeout the upstream announced.
    pub fn activity_timeout(&self) -> Duration {
        self.activity_timeout
    }

    /// A tab joined: it is given the session's `connection_established`,
    /// as the upstream sent it (so it shares the session's socket id), or
    /// once it comes.
    #[inline(never)]
    pub fn tab_joined(&mut self, tab: TabId, out: &mut Effects) {
        self.tabs.push(tab);
        match &self.established {
            Some(greeting) => out.push(Effect::Answer {
                tab,
                msg: greeting.clone(),
            }),
            None => self.greeting_due.push(tab),
        }
    }

    /// A tab sent a frame: what goes upstream (and when), what the tab or
    /// its siblings are answered. Nothing a tab sends closes it here: what
    /// the protocol refuses is answered with a `pusher:error`.
    #[inline(never)]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        let payload = msg.len();
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            _ => {
                refuse(
                    tab,
                    Refused::Malformed,
                    None,
                    "binary frames are not Pusher events",
                    out,
                );
                return Ok(());
            }
        };
        if nested_deeper_than(text, MAX_NESTING) {
            refuse(
                tab,
                Refused::Nesting,
                None,
                "JSON nested deeper than 32",
                out,
            );
            return Ok(());
        }
        let wire: Wire<'_> = match serde_json::from_str(text) {
            Ok(w) => w,
            Err(_) => {
                refuse(
                    tab,
                    Refused::Malformed,
                    None,
                    "not a Pusher event (JSON with an `event`)",
                    out,
                );
                return Ok(());
            }
        };
        let event = wire.event.as_ref();
        match event {
            "pusher:ping" => {
                out.push(Effect::Avoided(Saving::Ping));
                out.push(Effect::Answer {
                    tab,
                    msg: Message::text(r#"{"event":"pusher:pong","data":{}}"#),
                });
                Ok(())
            }
            "pusher:subscribe" => {
                self.recount = true;
                // Its data parsed once, for the fields tabmux checks.
                let mut data = data_object(wire.data).unwrap_or_default();
                let Some(channel) = take_string(&mut data, "channel") else {
                    refuse(
                        tab,
                        Refused::Malformed,
                        None,
                        "pusher:subscribe without a channel",
                        out,
                    );
                    return Ok(());
                };
                let channel_data = take_string(&mut data, "channel_data");
                let auth = take_string(&mut data, "auth").is_some();
                self.subscribe(tab, channel, auth, channel_data, msg, out);
                Ok(())
            }
            "pusher:unsubscribe" => {
                let channel =
                    data_object(wire.data).and_then(|mut d| take_string(&mut d, "channel"));
                let Some(channel) = channel else {
                    refuse(
                        tab,
                        Refused::Malformed,
                        None,
                        "pusher:unsubscribe without a channel",
                        out,
                    );
                    return Ok(());
                };
                self.recount = true;
                self.unsubscribe(tab, &channel, out);
                Ok(())
            }
            "pusher:signin" => {
                self.recount = true;
                self.sign_in(tab, msg, out);
                Ok(())
            }
            _ => {
                // A client event goes upstream once it was delivered to
                // the sibling tabs (or not at all, if the tab was answered
                // with an error); anything else is the server's business,
                // unchanged.
                let client = event.starts_with("client-");
                if client && !self.client_event(tab, &wire, now, out) {
                    return Ok(());
                }
                let forward = Forward {
                    frame: msg,
                    payload,
                };
                if client {
                    self.recount = true;
                    // The server may refuse it with an error naming no
                    // channel: it waits its turn, one request in flight.
                    let forward = Some(forward);
                    self.request(
                        Request::ClientEvent {
                            tab,
                            forward,
                            ping: 0,
                        },
                        out,
                    );
                } else {
                    out.push(Effect::Forward(tab, forward));
                }
                Ok(())
            }
        }
    }

    /// Queues a request, or sends it when nothing is in flight.
    fn request(&mut self, request: Request, out: &mut Effects) {
        self.queue.push_back(request);
        self.send_next(out);
    }

    /// Sends the next request, if none is in flight (and the upstream has
    /// greeted: a server reads nothing before).
    fn send_next(&mut self, out: &mut Effects) {
        if self.in_flight.is_some() || self.established.is_none() {
            return;
        }
        while let Some(mut request) = self.queue.pop_front() {
            let frame = match &mut request {
                Request::ClientEvent { tab, forward, ping } => {
                    // The event, then a ping whose pong closes its turn.
                    if let Some(forward) = forward.take() {
                        out.push(Effect::Forward(*tab, forward));
                    }
                    self.pings += 1;
                    *ping = self.pings;
                    Message::text(PING)
                }
                Request::Subscribe(name) => match self.channels.get_mut(name) {
                    // A queued channel has its frame (let go once answered).
                    Some(ch) if ch.upstream == Upstream::Queued => match ch.subscribe.clone() {
                        Some(frame) => {
                            ch.upstream = Upstream::InFlight;
                            frame
                        }
                        None => continue,
                    },
                    // Unsubscribed while it waited.
                    _ => continue,
                },
                Request::SignIn => match self.sign_in.frame() {
                    Some(frame) => frame,
                    None => continue,
                },
            };
            out.push(Effect::Upstream(frame));
            self.in_flight = Some(request);
            self.in_flight_since = None;
            return;
        }
    }

    /// A tab left the session: it leaves its channels, which stay
    /// subscribed upstream for `linger` once they have no tab (a reload
    /// neither resubscribes nor makes a presence channel's other members
    /// see this user leave and come back).
    #[inline(never)]
    pub fn tab_left(&mut self, tab: TabId, _code: u16, now: Instant, _out: &mut Effects) {
        self.recount = true;
        self.tabs.retain(|&t| t != tab);
        self.greeting_due.retain(|&t| t != tab);
        self.leave_channels(tab, now);
        self.sign_in.tab_left(tab);
    }

    /// An upstream frame.
    #[inline(never)]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut Effects) {
        self.heard = true;
        let Message::Text(text) = &msg else {
            // Pusher speaks text; a binary frame goes to every tab as the
            // server sent it.
            let len = msg.len();
            return out.push(Effect::Deliver {
                to: Target::All,
                msg,
                len,
            });
        };
        // Read from a second handle on the same buffer, so that `msg` can
        // be handed on whole.
        let text = text.clone();
        let Ok(wire) = serde_json::from_str::<Wire<'_>>(text.as_str()) else {
            return out.push(Effect::Malformed(super::FrameError::NotJson));
        };
        // What the state keeps may change, except for an event routed to a
        // channel's tabs (a cache channel's is remembered: see there).
        let routed = wire.channel.is_some() && !wire.event.starts_with("pusher");
        self.recount |= !routed;
        // Borrowed from the frame: no copy of the channel's name per event.
        match (wire.event.as_ref(), wire.channel.as_deref()) {
            ("pusher:connection_established", _) => {
                if let Some(t) = data_object(wire.data)
                    .and_then(|d| d.get("activity_timeout")?.as_u64())
                    .filter(|&t| t > 0)
                {
                    self.activity_timeout = Duration::from_secs(t);
                }
                for tab in std::mem::take(&mut self.greeting_due) {
                    out.push(Effect::Answer {
                        tab,
                        msg: msg.clone(),
                    });
                }
                self.established = Some(msg);
                self.send_next(out);
            }
            ("pusher:ping", _) => {
                out.push(Effect::Upstream(Message::text(
                    r#"{"event":"pusher:pong","data":{}}"#,
                )));
            }
            ("pusher:pong", _) => {
                self.pongs += 1;
                // The pong behind a client event: its turn is over.
                if matches!(&self.in_flight, Some(Request::ClientEvent { ping, .. }) if *ping <= self.pongs)
                {
                    self.in_flight = None;
                    self.send_next(out);
                }
            }
            ("pusher_internal:subscription_succeeded", Some(name)) => {
                self.subscribed(name, msg, wire.data, out)
            }
            ("pusher:subscription_error", Some(name)) => self.refused(name, msg, out),
            ("pusher:error", None) => match self.in_flight.clone() {
                // It answers the request in flight.
                Some(Request::Subscribe(name)) => self.refused(&name, msg, out),
                Some(Request::SignIn) => self.sign_in_refused(msg, out),
                // The client event's refusal: its sender's alone (its turn
                // ends with the pong).
                Some(Request::ClientEvent { tab, .. }) => out.push(Effect::Answer { tab, msg }),
                None => broadcast(msg, out),
            },
            ("pusher:signin_success", _) => self.signed_in(msg, out),
            ("pusher_internal:member_added", Some(name)) => {
                self.member_event(name, true, msg, wire.data, out)
            }
            ("pusher_internal:member_removed", Some(name)) => {
                self.member_event(name, false, msg, wire.data, out)
            }
            ("pusher:cache_miss", Some(name)) => {
                self.forget_last(name);
                self.channel_event(name, msg, out);
            }
            (_, Some(name)) if name.starts_with("#server-to-user-") => self.user_event(msg, out),
            (_, Some(name)) => {
                self.remember(name, &msg);
                self.channel_event(name, msg, out);
            }
            // pusher:error and the like, answering nothing pending.
            (_, None) => broadcast(msg, out),
        }
    }

    /// The upstream is gone: what its tabs are closed with. A code the
    /// client must act on (4000–4199, 4300 and above: refused, back off)
    /// passes through with the server's reason, so that each client applies
    /// the policy it would on a direct connection and its close event says
    /// what the server said; any other loss is 4200, "reconnect at once".
    pub fn upstream_lost(&self, lost: &Lost) -> Cause {
        match lost {
            Lost::Closed(Some(c)) if (4000..4200).contains(&c.code) || c.code >= 4300 => {
                Cause::Backend {
                    code: c.code,
                    reason: c.reason.clone(),
                }
            }
            _ => Cause::Reconnect,
        }
    }

    /// When the machine next needs the time: half the upstream's activity
    /// timeout after it was last heard from (its keepalive), when the
    /// first lingering channel's linger ends, or when the request in flight
    /// has waited [`REQUEST_TURN`] for its answer.
    pub fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        if std::mem::take(&mut self.heard) || self.silent_since.is_none() {
            self.silent_since = Some(now);
        }
        let keepalive = self
            .established
            .as_ref()
            .and(self.silent_since)
            .map(|since| since + self.activity_timeout / 2);
        let turn_ends = match self.in_flight {
            Some(_) => Some(*self.in_flight_since.get_or_insert(now) + REQUEST_TURN),
            None => None,
        };
        keepalive
            .into_iter()
            .chain(self.linger_deadline())
            .chain(turn_ends)
            .min()
    }

    /// A keepalive tick: the upstream is pinged when it has been silent for
    /// half its activity timeout (so within it), and channels whose tabs
    /// all left longer than `linger` ago are unsubscribed.
    #[inline(never)]
    pub fn tick(&mut self, now: Instant, out: &mut Effects) {
        self.recount = true;
        if std::mem::take(&mut self.heard) {
            self.silent_since = Some(now);
        }
        let since = *self.silent_since.get_or_insert(now);
        if self.established.is_some() && now.duration_since(since) >= self.activity_timeout / 2 {
            out.push(Effect::Upstream(Message::text(PING)));
            self.pings += 1;
            self.silent_since = Some(now);
        }
        self.end_lingering(now, out);
        self.end_stalled_turn(now, out);
    }

    /// A request the server has not answered in [`REQUEST_TURN`] gives up
    /// its turn, so that one unanswered subscribe does not hold every later
    /// request of the session back (separate connections would not wait on
    /// each other). Its tabs go on waiting for its answer, which is still
    /// taken if it comes.
    fn end_stalled_turn(&mut self, now: Instant, out: &mut Effects) {
        let stalled = self
            .in_flight_since
            .is_some_and(|since| now.duration_since(since) >= REQUEST_TURN);
        if self.in_flight.is_some() && stalled {
            self.in_flight = None;
            self.in_flight_since = None;
            self.send_next(out);
        }
    }
}

/// How long a request in flight keeps its turn without an answer: as long
/// as pusher-js waits for a pong before it gives a connection up.
pub const REQUEST_TURN: Duration = Duration::from_secs(30);

mod cache;
mod channels;
mod frames;
mod presence;
mod sign_in;
#[cfg(test)]
mod tests;
