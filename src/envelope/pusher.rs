//! `envelope = "pusher"` (docs/protocol.md, "The `pusher` envelope"): one Pusher
//! Channels connection (protocol 7) per session, multiplexed at the level of
//! the protocol's channels, so that to each tab the session looks like a
//! Pusher connection of its own.
//!
//! The state machine keeps what a Pusher server keeps per connection, once
//! for the session: the upstream's `pusher:connection_established`, each
//! channel's subscription (the tabs subscribed to it, its presence members,
//! the last event of a cache channel), the sign-in, and the upstream's
//! activity. Subscriptions (and the sign-in) go upstream **one at a time**:
//! a `pusher:error` names no channel, so only the one request in flight can
//! be what it answers.
//!
//! What a tab receives is byte for byte what the upstream sent, except the
//! frames composed here (a locally answered subscription, a pong, a cached
//! sign-in, an error about the tab's own input, a client event delivered to
//! a sibling tab), which take the shape the protocol gives them.
//!
//! Its entry points are never inlined: the session's hot loop dispatches
//! to every envelope, and the `json` route's path must not be laid out
//! around this one's code (the hot code's size is measured, BENCHMARKS.md).
//!
//! What the session does for it beyond the other envelopes: a tab's own
//! effects are carried out once its slot is free, leaves and ticks come
//! with the time, and a lost upstream closes the tabs with
//! [`Pusher::upstream_lost`]'s cause instead of being redialled. Still to
//! come (issue 14): the dial backoff per session key after a loss, the
//! savings metrics, and tests against a real Pusher server and pusher-js.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{Effect, Effects, Forward, Saving, TabId, Target};
use crate::cause::{Cause, Lost};
use frames::{
    broadcast, cached_or_miss, client_event, data_channel, data_field, data_object, deliver,
    error_to, id_of, is_cache, is_presence, member_added, members_from, succeeded_for_later_tab,
    unsubscribe_frame, user_id_of,
};

/// The longest channel name a tab may use (Pusher's own limit is 164
/// characters; a little room for compatible servers).
pub const MAX_CHANNEL_NAME: usize = 200;

/// The most channels one session may have (subscribed, pending or
/// lingering): every one is state kept for a client.
pub const MAX_CHANNELS: usize = 1024;

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
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
}

/// Where a channel's subscription stands upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// Waiting for its turn (another request is in flight).
    Queued,
    /// Sent; the answer has not come.
    InFlight,
    /// The upstream confirmed it.
    Subscribed,
}

/// One channel of the session.
#[derive(Debug)]
struct Channel {
    upstream: Upstream,
    /// The first tab's `pusher:subscribe`, sent upstream unchanged.
    subscribe: Message,
    /// Tabs subscribed, in the order they subscribed.
    tabs: Vec<TabId>,
    /// Tabs waiting for the subscription's answer.
    waiting: Vec<TabId>,
    /// The upstream's `subscription_succeeded`, for later tabs of a channel
    /// that is not a presence channel (those are given the members as they
    /// stand instead).
    succeeded: Option<Message>,
    /// A presence channel's members, kept current.
    presence: Option<Presence>,
    /// A cache channel's last event (None: a miss).
    last_event: Option<Message>,
    /// Since when the channel has had no tab because its last tab left
    /// (closed or reloaded) without unsubscribing: it is unsubscribed
    /// upstream once the route's `linger` has passed.
    orphaned: Option<Instant>,
}

impl Channel {
    fn is_empty(&self) -> bool {
        self.tabs.is_empty() && self.waiting.is_empty()
    }

    fn has(&self, tab: TabId) -> bool {
        self.tabs.contains(&tab) || self.waiting.contains(&tab)
    }
}

/// A presence channel's member list, as the upstream gave it and updated it.
#[derive(Debug, Default)]
struct Presence {
    /// Member ids in the order they came.
    ids: Vec<String>,
    /// Member id → user info.
    hash: serde_json::Map<String, Value>,
    /// The session's own user id (from the first subscribe's
    /// `channel_data`), added to client events delivered to sibling tabs.
    me: Option<String>,
}

/// What is sent upstream one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Subscribe(String),
    SignIn,
}

/// The session's sign-in.
#[derive(Debug)]
enum SignIn {
    None,
    /// Sent upstream (or queued); these tabs are waiting for the answer.
    Pending {
        frame: Message,
        tabs: Vec<TabId>,
    },
    /// The upstream's `pusher:signin_success`, and the tabs given it.
    Done {
        success: Message,
        tabs: Vec<TabId>,
    },
}

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
    sign_in: SignIn,
    /// Whether the upstream sent anything since the last ping decision.
    heard: bool,
    /// Since when the upstream has been silent, as of the last tick.
    silent_since: Option<Instant>,
    linger: Duration,
    /// Some channel's tabs have all left: it lingers (its deadline is
    /// looked for only while this is set).
    lingering: bool,
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
            sign_in: SignIn::None,
            heard: false,
            silent_since: None,
            linger,
            lingering: false,
        }
    }

    /// The activity timeout the upstream announced.
    pub fn activity_timeout(&self) -> Duration {
        self.activity_timeout
    }

    /// A tab joined: it is given the session's `connection_established`,
    /// as the upstream sent it (so it shares the session's socket id), or
    /// once it comes.
    #[inline(never)]
    pub fn tab_joined(&mut self, tab: TabId, out: &mut impl Effects) {
        self.tabs.push(tab);
        match &self.established {
            Some(greeting) => out.effect(Effect::Answer {
                tab,
                msg: greeting.clone(),
            }),
            None => self.greeting_due.push(tab),
        }
    }

    /// A tab sent a frame: what goes upstream (and when), what the tab or
    /// its siblings are answered.
    #[inline(never)]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        out: &mut impl Effects,
    ) -> Result<Option<Forward>, Cause> {
        let payload = msg.len();
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            _ => {
                out.effect(error_to(tab, "binary frames are not Pusher events"));
                return Ok(None);
            }
        };
        let wire: Wire<'_> = match serde_json::from_str(text) {
            Ok(w) => w,
            Err(_) => {
                out.effect(error_to(tab, "not a Pusher event (JSON with an `event`)"));
                return Ok(None);
            }
        };
        let event = wire.event.as_ref();
        match event {
            "pusher:ping" => {
                out.effect(Effect::Avoided(Saving::Ping));
                out.effect(Effect::Answer {
                    tab,
                    msg: Message::text(r#"{"event":"pusher:pong","data":{}}"#),
                });
                Ok(None)
            }
            "pusher:subscribe" => {
                let Some(channel) = data_channel(wire.data) else {
                    out.effect(error_to(tab, "pusher:subscribe without a channel"));
                    return Ok(None);
                };
                let channel_data = data_field(wire.data, "channel_data");
                self.subscribe(tab, channel, channel_data, msg, out);
                Ok(None)
            }
            "pusher:unsubscribe" => {
                let Some(channel) = data_channel(wire.data) else {
                    out.effect(error_to(tab, "pusher:unsubscribe without a channel"));
                    return Ok(None);
                };
                self.unsubscribe(tab, &channel, out);
                Ok(None)
            }
            "pusher:signin" => {
                self.sign_in(tab, msg, out);
                Ok(None)
            }
            _ if event.starts_with("client-") => {
                let Some(channel) = wire.channel.as_deref() else {
                    out.effect(error_to(tab, "a client event needs a channel"));
                    return Ok(None);
                };
                let Some(ch) = self.channels.get(channel).filter(|c| c.tabs.contains(&tab)) else {
                    let why = format!("not subscribed to channel {channel}");
                    out.effect(error_to(tab, &why));
                    return Ok(None);
                };
                // The server delivers a client event to every other
                // connection subscribed: here, the sibling tabs.
                let siblings: Vec<TabId> = ch.tabs.iter().copied().filter(|&t| t != tab).collect();
                if !siblings.is_empty() {
                    let me = ch.presence.as_ref().and_then(|p| p.me.as_deref());
                    let frame = client_event(&wire, me);
                    let len = frame.len();
                    out.effect(Effect::Deliver {
                        to: Target::Tabs {
                            ids: siblings,
                            foreign: 0,
                        },
                        msg: frame,
                        len,
                    });
                    // The fan-out counts n - 1 of the n deliveries as
                    // saved; the server made none of them.
                    out.effect(Effect::Avoided(Saving::Delivery));
                }
                Ok(Some(Forward {
                    frame: msg,
                    payload,
                }))
            }
            // Anything else is the server's business, unchanged.
            _ => Ok(Some(Forward {
                frame: msg,
                payload,
            })),
        }
    }

    fn subscribe(
        &mut self,
        tab: TabId,
        name: String,
        channel_data: Option<String>,
        msg: Message,
        out: &mut impl Effects,
    ) {
        if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
            out.effect(error_to(tab, "channel name is empty or too long"));
            return;
        }
        if let Some(ch) = self.channels.get_mut(&name) {
            if ch.has(tab) {
                // pusher-js never does this; a second answer would reset a
                // presence channel's members in the client.
                return;
            }
            ch.orphaned = None;
            out.effect(Effect::Avoided(Saving::Subscription));
            match ch.upstream {
                Upstream::Subscribed => {
                    ch.tabs.push(tab);
                    let answer = succeeded_for_later_tab(&name, ch);
                    out.effect(Effect::Answer { tab, msg: answer });
                    if is_cache(&name) {
                        out.effect(Effect::Answer {
                            tab,
                            msg: cached_or_miss(&name, ch),
                        });
                    }
                }
                Upstream::Queued | Upstream::InFlight => ch.waiting.push(tab),
            }
            return;
        }
        if self.channels.len() >= MAX_CHANNELS {
            out.effect(error_to(tab, "too many channels in this session"));
            return;
        }
        let presence = is_presence(&name).then(|| Presence {
            me: channel_data.as_deref().and_then(user_id_of),
            ..Presence::default()
        });
        self.channels.insert(
            name.clone(),
            Channel {
                upstream: Upstream::Queued,
                subscribe: msg,
                tabs: Vec::new(),
                waiting: vec![tab],
                succeeded: None,
                presence,
                last_event: None,
                orphaned: None,
            },
        );
        self.request(Request::Subscribe(name), out);
    }

    fn unsubscribe(&mut self, tab: TabId, name: &str, out: &mut impl Effects) {
        let Some(ch) = self.channels.get_mut(name).filter(|c| c.has(tab)) else {
            out.effect(error_to(tab, &format!("not subscribed to channel {name}")));
            return;
        };
        ch.tabs.retain(|&t| t != tab);
        ch.waiting.retain(|&t| t != tab);
        if ch.is_empty() {
            self.drop_channel(name, out);
        }
    }

    fn sign_in(&mut self, tab: TabId, msg: Message, out: &mut impl Effects) {
        match &mut self.sign_in {
            SignIn::Done { success, tabs } => {
                if !tabs.contains(&tab) {
                    tabs.push(tab);
                }
                out.effect(Effect::Answer {
                    tab,
                    msg: success.clone(),
                });
            }
            SignIn::Pending { tabs, .. } => {
                if !tabs.contains(&tab) {
                    tabs.push(tab);
                }
            }
            SignIn::None => {
                self.sign_in = SignIn::Pending {
                    frame: msg,
                    tabs: vec![tab],
                };
                self.request(Request::SignIn, out);
            }
        }
    }

    /// Queues a request, or sends it when nothing is in flight.
    fn request(&mut self, request: Request, out: &mut impl Effects) {
        self.queue.push_back(request);
        self.send_next(out);
    }

    /// Sends the next request, if none is in flight (and the upstream has
    /// greeted: a server reads nothing before).
    fn send_next(&mut self, out: &mut impl Effects) {
        if self.in_flight.is_some() || self.established.is_none() {
            return;
        }
        while let Some(request) = self.queue.pop_front() {
            let frame = match &request {
                Request::Subscribe(name) => match self.channels.get_mut(name) {
                    Some(ch) if ch.upstream == Upstream::Queued => {
                        ch.upstream = Upstream::InFlight;
                        ch.subscribe.clone()
                    }
                    // Unsubscribed while it waited.
                    _ => continue,
                },
                Request::SignIn => match &self.sign_in {
                    SignIn::Pending { frame, .. } => frame.clone(),
                    _ => continue,
                },
            };
            out.effect(Effect::Upstream(frame));
            self.in_flight = Some(request);
            return;
        }
    }

    /// Forgets a channel no tab is in: unsubscribed upstream if it was
    /// subscribed; one in flight is unsubscribed when its answer comes.
    fn drop_channel(&mut self, name: &str, out: &mut impl Effects) {
        let Some(ch) = self.channels.get(name) else {
            return;
        };
        match ch.upstream {
            Upstream::Subscribed => {
                out.effect(Effect::Upstream(unsubscribe_frame(name)));
                self.channels.remove(name);
            }
            Upstream::Queued => {
                self.channels.remove(name);
            }
            // The answer will find it empty.
            Upstream::InFlight => {}
        }
    }

    /// A tab left the session: it leaves its channels, which stay
    /// subscribed upstream for `linger` once they have no tab (a reload
    /// neither resubscribes nor makes a presence channel's other members
    /// see this user leave and come back).
    #[inline(never)]
    pub fn tab_left(&mut self, tab: TabId, now: Instant) {
        self.tabs.retain(|&t| t != tab);
        self.greeting_due.retain(|&t| t != tab);
        for ch in self.channels.values_mut() {
            if !ch.has(tab) {
                continue;
            }
            ch.tabs.retain(|&t| t != tab);
            ch.waiting.retain(|&t| t != tab);
            if ch.is_empty() {
                ch.orphaned = Some(now);
                self.lingering = true;
            }
        }
        match &mut self.sign_in {
            SignIn::Pending { tabs, .. } | SignIn::Done { tabs, .. } => tabs.retain(|&t| t != tab),
            SignIn::None => {}
        }
    }

    /// An upstream frame.
    #[inline(never)]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut impl Effects) {
        self.heard = true;
        let Message::Text(text) = &msg else {
            // Pusher speaks text; a binary frame goes to every tab as the
            // server sent it.
            let len = msg.len();
            return out.effect(Effect::Deliver {
                to: Target::All,
                msg,
                len,
            });
        };
        // Read from a second handle on the same buffer, so that `msg` can
        // be handed on whole.
        let text = text.clone();
        let Ok(wire) = serde_json::from_str::<Wire<'_>>(text.as_str()) else {
            return out.effect(Effect::Malformed(super::FrameError::NotJson));
        };
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
                    out.effect(Effect::Answer {
                        tab,
                        msg: msg.clone(),
                    });
                }
                self.established = Some(msg);
                self.send_next(out);
            }
            ("pusher:ping", _) => {
                out.effect(Effect::Upstream(Message::text(
                    r#"{"event":"pusher:pong","data":{}}"#,
                )));
            }
            ("pusher:pong", _) => {}
            ("pusher_internal:subscription_succeeded", Some(name)) => {
                self.subscribed(name, msg, wire.data, out)
            }
            ("pusher:subscription_error", Some(name)) => self.refused(name, msg, out),
            ("pusher:error", None) => match self.in_flight.clone() {
                // It answers the request in flight.
                Some(Request::Subscribe(name)) => self.refused(&name, msg, out),
                Some(Request::SignIn) => self.sign_in_refused(msg, out),
                None => broadcast(msg, out),
            },
            ("pusher:signin_success", _) => self.signed_in(msg, out),
            ("pusher_internal:member_added", Some(name)) => {
                if let Some(p) = self.presence(name) {
                    if let Some(d) = data_object(wire.data) {
                        member_added(p, &d);
                    }
                }
                self.channel_event(name, msg, out);
            }
            ("pusher_internal:member_removed", Some(name)) => {
                if let Some(p) = self.presence(name) {
                    if let Some(id) = data_object(wire.data).and_then(|d| id_of(d.get("user_id")?))
                    {
                        p.ids.retain(|i| *i != id);
                        p.hash.remove(&id);
                    }
                }
                self.channel_event(name, msg, out);
            }
            ("pusher:cache_miss", Some(name)) => {
                if let Some(ch) = self.channels.get_mut(name) {
                    ch.last_event = None;
                }
                self.channel_event(name, msg, out);
            }
            (_, Some(name)) if name.starts_with("#server-to-user-") => {
                let tabs = match &self.sign_in {
                    SignIn::Done { tabs, .. } => tabs.clone(),
                    _ => Vec::new(),
                };
                deliver(tabs, msg, out);
            }
            (_, Some(name)) => {
                if is_cache(name) {
                    if let Some(ch) = self.channels.get_mut(name) {
                        ch.last_event = Some(msg.clone());
                    }
                }
                self.channel_event(name, msg, out);
            }
            // pusher:error and the like, answering nothing pending.
            (_, None) => broadcast(msg, out),
        }
    }

    fn presence(&mut self, name: &str) -> Option<&mut Presence> {
        self.channels.get_mut(name)?.presence.as_mut()
    }

    fn subscribed(
        &mut self,
        name: &str,
        msg: Message,
        data: Option<&RawValue>,
        out: &mut impl Effects,
    ) {
        if self.in_flight == Some(Request::Subscribe(name.to_owned())) {
            self.in_flight = None;
        }
        let Some(ch) = self.channels.get_mut(name) else {
            // Unsubscribed meanwhile and forgotten: undo upstream.
            out.effect(Effect::Upstream(unsubscribe_frame(name)));
            return self.send_next(out);
        };
        ch.upstream = Upstream::Subscribed;
        if let Some(p) = ch.presence.as_mut() {
            if let Some(d) = data_object(data) {
                members_from(p, &d);
            }
        } else {
            ch.succeeded = Some(msg.clone());
        }
        let waiting = std::mem::take(&mut ch.waiting);
        ch.tabs.extend(waiting.iter().copied());
        deliver(waiting, msg, out);
        if ch.is_empty() {
            self.drop_channel(name, out);
        }
        self.send_next(out);
    }

    /// A subscription was refused: its waiting tabs are told, and the
    /// channel is forgotten (a later subscribe tries again).
    fn refused(&mut self, name: &str, msg: Message, out: &mut impl Effects) {
        if self.in_flight == Some(Request::Subscribe(name.to_owned())) {
            self.in_flight = None;
        }
        if let Some(ch) = self.channels.remove(name) {
            let mut tabs = ch.waiting;
            tabs.extend(ch.tabs);
            deliver(tabs, msg, out);
        }
        self.send_next(out);
    }

    fn signed_in(&mut self, msg: Message, out: &mut impl Effects) {
        if self.in_flight == Some(Request::SignIn) {
            self.in_flight = None;
        }
        let tabs = match std::mem::replace(&mut self.sign_in, SignIn::None) {
            SignIn::Pending { tabs, .. } => tabs,
            SignIn::Done { tabs, .. } => tabs,
            SignIn::None => Vec::new(),
        };
        deliver(tabs.clone(), msg.clone(), out);
        self.sign_in = SignIn::Done { success: msg, tabs };
        self.send_next(out);
    }

    fn sign_in_refused(&mut self, msg: Message, out: &mut impl Effects) {
        self.in_flight = None;
        if let SignIn::Pending { tabs, .. } = std::mem::replace(&mut self.sign_in, SignIn::None) {
            deliver(tabs, msg, out);
        }
        self.send_next(out);
    }

    /// An event on a channel reaches the tabs subscribed to it, and no other.
    fn channel_event(&mut self, name: &str, msg: Message, out: &mut impl Effects) {
        if let Some(ch) = self.channels.get(name) {
            deliver(ch.tabs.clone(), msg, out);
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
    /// timeout after it was last heard from (its keepalive), or when the
    /// first lingering channel's linger ends.
    pub fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        if std::mem::take(&mut self.heard) || self.silent_since.is_none() {
            self.silent_since = Some(now);
        }
        let keepalive = self
            .established
            .as_ref()
            .and(self.silent_since)
            .map(|since| since + self.activity_timeout / 2);
        let linger = if self.lingering {
            let first = self
                .channels
                .values()
                .filter(|ch| ch.is_empty())
                .filter_map(|ch| ch.orphaned)
                .min();
            self.lingering = first.is_some();
            first.map(|t| t + self.linger)
        } else {
            None
        };
        keepalive.into_iter().chain(linger).min()
    }

    /// A keepalive tick: the upstream is pinged when it has been silent for
    /// half its activity timeout (so within it), and channels whose tabs
    /// all left longer than `linger` ago are unsubscribed.
    #[inline(never)]
    pub fn tick(&mut self, now: Instant, out: &mut impl Effects) {
        if std::mem::take(&mut self.heard) {
            self.silent_since = Some(now);
        }
        let since = *self.silent_since.get_or_insert(now);
        if self.established.is_some() && now.duration_since(since) >= self.activity_timeout / 2 {
            out.effect(Effect::Upstream(Message::text(
                r#"{"event":"pusher:ping","data":{}}"#,
            )));
            self.silent_since = Some(now);
        }
        let expired: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, ch)| {
                ch.is_empty()
                    && ch
                        .orphaned
                        .is_some_and(|t| now.duration_since(t) >= self.linger)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            self.drop_channel(&name, out);
        }
    }
}

mod frames;
#[cfg(test)]
mod tests;
