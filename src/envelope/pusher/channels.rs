//! Channels: one subscription upstream per channel, shared by the tabs that
//! subscribe to it (a refcount: the tabs, in the order they came), events
//! routed to those tabs alone, client events delivered to sibling tabs as
//! the server would, and `linger` (a channel whose tabs all left without
//! unsubscribing stays subscribed upstream that long, so a reload neither
//! resubscribes nor shows a presence channel's members this user leaving
//! and coming back).

use std::time::{Duration, Instant};

use serde_json::json;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use super::cache::{cached_or_miss, is_cache};
use super::frames::{client_event, refuse, unsubscribe_frame};
use super::presence::{is_presence, Presence};
use super::{Pusher, Request, Wire};
use crate::envelope::deliver;
use crate::envelope::{Effect, Effects, Refused, Saving, TabId, Target};

/// The longest channel name a tab may use: Pusher's own limit (a stricter
/// server's refusal is the subscribe's answer).
pub const MAX_CHANNEL_NAME: usize = 164;

/// The most channels one session may have (subscribed, pending or
/// lingering): every one is state kept for a client.
pub const MAX_CHANNELS: usize = 1024;

/// The most channels one tab may be subscribed to (or waiting for), so that
/// one tab cannot take every channel of its session from its siblings.
pub const MAX_TAB_CHANNELS: usize = 256;

/// The largest `channel_data` of a presence subscribe.
pub const MAX_CHANNEL_DATA: usize = 1024;

/// The most data (its JSON text) a client event may carry: Pusher's limit.
pub const MAX_CLIENT_EVENT_DATA: usize = 10 * 1024;

/// The code of the `pusher:error` the server answers a client event it
/// refuses.
const CLIENT_EVENT_ERROR: Option<u16> = Some(4301);

/// Why a subscribe is refused at the edge, before the server sees it (what
/// the server would refuse, or could fail on); None if it may go on.
fn refused_subscribe(
    name: &str,
    auth: bool,
    channel_data: Option<&str>,
) -> Option<(Refused, &'static str)> {
    // The user's own channel, which a client subscribes to once signed in.
    let user_channel = name.strip_prefix("#server-to-user-");
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-=@,.;".contains(c);
    if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
        let why = "channel name is empty or over 164 characters";
        return Some((Refused::ChannelName, why));
    }
    if !user_channel.unwrap_or(name).chars().all(allowed) {
        let why = "channel name has characters outside A-Z a-z 0-9 _ - = @ , . ;";
        return Some((Refused::ChannelName, why));
    }
    let private = name.starts_with("private-") || is_presence(name);
    if private && !auth {
        return Some((Refused::Auth, "a private or presence channel needs auth"));
    }
    if is_presence(name) {
        match channel_data {
            None => {
                let why = "a presence channel needs channel_data";
                return Some((Refused::ChannelData, why));
            }
            Some(d) if d.len() > MAX_CHANNEL_DATA => {
                return Some((Refused::ChannelData, "channel_data is over 1 KB"))
            }
            Some(_) => {}
        }
    }
    None
}

/// Where a channel's subscription stands upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upstream {
    /// Waiting for its turn (another request is in flight).
    Queued,
    /// Sent; the answer has not come.
    InFlight,
    /// The upstream confirmed it.
    Subscribed,
}

/// One channel of the session.
#[derive(Debug)]
pub(super) struct Channel {
    pub upstream: Upstream,
    /// The first tab's `pusher:subscribe`, sent upstream unchanged; let go
    /// once the upstream answered (a later tab is answered here).
    pub subscribe: Option<Message>,
    /// Tabs subscribed, in the order they subscribed.
    pub tabs: Vec<TabId>,
    /// Tabs waiting for the subscription's answer.
    waiting: Vec<TabId>,
    /// The upstream's `subscription_succeeded`, for later tabs of a channel
    /// that is not a presence channel (those are given the members as they
    /// stand instead).
    succeeded: Option<Message>,
    /// A presence channel's members, kept current.
    pub presence: Option<Presence>,
    /// A cache channel's last event (None: a miss).
    pub last_event: Option<Message>,
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

    /// What the channel keeps, in bytes (for the buffer budget): its name,
    /// its frames, its tabs and its members.
    pub(super) fn bytes(&self, name: &str) -> usize {
        let frame = |m: &Option<Message>| m.as_ref().map_or(0, Message::len);
        std::mem::size_of::<Channel>()
            + name.len()
            + frame(&self.subscribe)
            + frame(&self.succeeded)
            + frame(&self.last_event)
            + (self.tabs.capacity() + self.waiting.capacity()) * std::mem::size_of::<TabId>()
            + self.presence.as_ref().map_or(0, Presence::bytes)
    }

    /// What a tab that subscribes to this channel once it is subscribed is
    /// answered: the upstream's own answer, or on a presence channel the
    /// members as they stand now.
    fn succeeded_for_later_tab(&self, name: &str) -> Message {
        match (&self.presence, &self.succeeded) {
            (Some(p), _) => p.succeeded(name),
            (None, Some(upstream)) => upstream.clone(),
            (None, None) => Message::text(
                json!({"event": "pusher_internal:subscription_succeeded", "channel": name, "data": "{}"})
                    .to_string(),
            ),
        }
    }
}

impl Pusher {
    /// A tab's `pusher:subscribe` to `name`: answered here if the channel is
    /// subscribed already (or waits with the first tab's answer), else
    /// queued upstream, the first tab's frame unchanged.
    pub(super) fn subscribe(
        &mut self,
        tab: TabId,
        name: String,
        auth: bool,
        channel_data: Option<String>,
        msg: Message,
        out: &mut Effects,
    ) {
        if let Some((reason, why)) = refused_subscribe(&name, auth, channel_data.as_deref()) {
            return refuse(tab, reason, None, why, out);
        }
        let mine = self.channels.values().filter(|ch| ch.has(tab)).count();
        if mine >= MAX_TAB_CHANNELS && !self.channels.get(&name).is_some_and(|ch| ch.has(tab)) {
            let why = "too many channels for this tab";
            return refuse(tab, Refused::TabChannels, None, why, out);
        }
        if let Some(ch) = self.channels.get_mut(&name) {
            if ch.has(tab) {
                // pusher-js never does this; a second answer would reset a
                // presence channel's members in the client.
                return;
            }
            ch.orphaned = None;
            out.push(Effect::Avoided(Saving::Subscription));
            match ch.upstream {
                Upstream::Subscribed => {
                    ch.tabs.push(tab);
                    let answer = ch.succeeded_for_later_tab(&name);
                    out.push(Effect::Answer { tab, msg: answer });
                    if is_cache(&name) {
                        out.push(Effect::Answer {
                            tab,
                            msg: cached_or_miss(&name, ch.last_event.as_ref()),
                        });
                    }
                }
                Upstream::Queued | Upstream::InFlight => ch.waiting.push(tab),
            }
            return;
        }
        if self.channels.len() >= MAX_CHANNELS {
            let why = "too many channels in this session";
            return refuse(tab, Refused::SessionChannels, None, why, out);
        }
        let presence = is_presence(&name).then(|| Presence::new(channel_data.as_deref()));
        self.channels.insert(
            name.clone(),
            Channel {
                upstream: Upstream::Queued,
                subscribe: Some(msg),
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

    /// A tab's `pusher:unsubscribe`: the channel goes upstream once its
    /// last tab left it.
    pub(super) fn unsubscribe(&mut self, tab: TabId, name: &str, out: &mut Effects) {
        let Some(ch) = self.channels.get_mut(name).filter(|c| c.has(tab)) else {
            let why = format!("not subscribed to channel {name}");
            return refuse(tab, Refused::NotSubscribed, None, &why, out);
        };
        ch.tabs.retain(|&t| t != tab);
        ch.waiting.retain(|&t| t != tab);
        if ch.is_empty() {
            self.drop_channel(name, out);
        }
    }

    /// A tab's client event (`client-…`): if the server would accept it,
    /// delivered to the tab's siblings on that channel (the server delivers
    /// it to every other connection, and the session is one) and true (it
    /// goes upstream); else the tab alone is answered with the error the
    /// server would send, and false. The server accepts one on a private or
    /// presence channel the tab is subscribed to, with at most 10 KiB of
    /// data, when the route allows client events, and at most
    /// `client_event_rate` of them in any one-second window of the session.
    pub(super) fn client_event(
        &mut self,
        tab: TabId,
        wire: &Wire<'_>,
        now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> bool {
        let Some(channel) = wire.channel.as_deref() else {
            let why = "a client event needs a channel";
            refuse(tab, Refused::Malformed, None, why, out);
            return false;
        };
        let data_len = wire.data.map_or(0, |d| d.get().len());
        let refused = if !self.client_events {
            let why = "Client event error: Client events are not enabled for this app";
            Some((Refused::ClientEventsOff, why.to_string()))
        } else if !(channel.starts_with("private-") || is_presence(channel)) {
            let why = "Client event error: Client events can only be sent to private or presence channels";
            Some((Refused::ClientEventChannel, why.into()))
        } else if data_len > MAX_CLIENT_EVENT_DATA {
            let why = format!(
                "Client event error: Event payload size ({data_len} bytes) exceeds limit (10KB)"
            );
            Some((Refused::ClientEventSize, why))
        } else {
            None
        };
        if let Some((reason, why)) = refused {
            refuse(tab, reason, CLIENT_EVENT_ERROR, &why, out);
            return false;
        }
        let Some(ch) = self.channels.get(channel).filter(|c| c.tabs.contains(&tab)) else {
            let why = format!("not subscribed to channel {channel}");
            refuse(tab, Refused::NotSubscribed, None, &why, out);
            return false;
        };
        // The session's one-second window: a fixed window, as the server's
        // (a token bucket would let through more than it does).
        let now = now();
        let (start, sent) = match self.client_window {
            Some((start, sent)) if now.duration_since(start) < Duration::from_secs(1) => {
                (start, sent)
            }
            _ => (now, 0),
        };
        if sent >= self.client_event_rate {
            self.client_window = Some((start, sent));
            let why = "Client event rejected due to rate limit";
            refuse(tab, Refused::ClientEventRate, CLIENT_EVENT_ERROR, why, out);
            return false;
        }
        self.client_window = Some((start, sent + 1));
        let siblings: Vec<TabId> = ch.tabs.iter().copied().filter(|&t| t != tab).collect();
        if !siblings.is_empty() {
            let me = ch.presence.as_ref().and_then(|p| p.me.as_deref());
            let frame = client_event(wire, me);
            let len = frame.len();
            out.push(Effect::Deliver {
                to: Target::Tabs {
                    ids: siblings,
                    foreign: 0,
                },
                msg: frame,
                len,
            });
            // The fan-out counts n - 1 of the n deliveries as saved; the
            // server made none of them.
            out.push(Effect::Avoided(Saving::Deliveries(1)));
        }
        true
    }

    /// Forgets a channel no tab is in: unsubscribed upstream if it was
    /// subscribed; one in flight is unsubscribed when its answer comes.
    pub(super) fn drop_channel(&mut self, name: &str, out: &mut Effects) {
        let Some(ch) = self.channels.get(name) else {
            return;
        };
        match ch.upstream {
            Upstream::Subscribed => {
                out.push(Effect::Upstream(unsubscribe_frame(name)));
                self.channels.remove(name);
            }
            Upstream::Queued => {
                self.channels.remove(name);
            }
            // The answer will find it empty.
            Upstream::InFlight => {}
        }
    }

    /// `pusher_internal:subscription_succeeded`: the waiting tabs are given
    /// it, and a channel that lost its tabs meanwhile is dropped.
    pub(super) fn subscribed(
        &mut self,
        name: &str,
        msg: Message,
        data: Option<&RawValue>,
        out: &mut Effects,
    ) {
        if self.in_flight == Some(Request::Subscribe(name.to_owned())) {
            self.in_flight = None;
        }
        let Some(ch) = self.channels.get_mut(name) else {
            // Unsubscribed meanwhile and forgotten: undo upstream.
            out.push(Effect::Upstream(unsubscribe_frame(name)));
            return self.send_next(out);
        };
        ch.upstream = Upstream::Subscribed;
        ch.subscribe = None;
        match ch.presence.as_mut() {
            Some(p) => p.members_from(data),
            None => ch.succeeded = Some(msg.clone()),
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
    pub(super) fn refused(&mut self, name: &str, msg: Message, out: &mut Effects) {
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

    /// An event on a channel reaches the tabs subscribed to it, and no other.
    pub(super) fn channel_event(&mut self, name: &str, msg: Message, out: &mut Effects) {
        if let Some(ch) = self.channels.get(name) {
            deliver(ch.tabs.clone(), msg, out);
        }
    }

    /// A tab left the session at `now`: it leaves its channels, and those
    /// it was the last tab of begin to linger.
    pub(super) fn leave_channels(&mut self, tab: TabId, now: Instant) {
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
    }

    /// When the first lingering channel's linger ends (looked for only
    /// while some channel lingers).
    pub(super) fn linger_deadline(&mut self) -> Option<Instant> {
        if !self.lingering {
            return None;
        }
        let first = self
            .channels
            .values()
            .filter(|ch| ch.is_empty())
            .filter_map(|ch| ch.orphaned)
            .min();
        self.lingering = first.is_some();
        first.map(|t| t + self.linger)
    }

    /// Channels whose tabs all left `linger` or longer before `now` are
    /// unsubscribed.
    pub(super) fn end_lingering(&mut self, now: Instant, out: &mut Effects) {
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
