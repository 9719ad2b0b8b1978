//! `envelope = "graphql"` (docs/protocol.md, "The `graphql` envelope"): one
//! GraphQL-over-WebSocket connection per session, for both subprotocols
//! (`graphql-transport-ws`, and the legacy `graphql-ws` of
//! subscriptions-transport-ws), so that to each tab the session looks like a
//! connection of its own.
//!
//! A tab is placed in its session only once its `connection_init` has come
//! (the session key includes the init payload: see `crate::upgrade`); the
//! machine starts from there. The first tab's `connection_init` goes
//! upstream unchanged, and the upstream's `connection_ack` answers it and
//! every later tab. Operations are rewritten both ways: each upstream
//! operation has an id of tabmux's (never reused on the connection), and
//! each tab attached to it is answered with its own id. Where the route
//! shares subscriptions (`share_subscriptions`), tabs asking for the same
//! subscription (the same query, operation name, variables and
//! extensions, equal as JSON values) share one upstream operation; with
//! `live` a later tab is first given the last result. An operation whose
//! tabs all left without completing it lingers upstream for the route's
//! `linger` (a deadline), so that a reloaded page reattaches to it.
//!
//! - [`wire`]: reading and composing frames;
//! - [`document`]: what kind of operation a document asks for.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio_tungstenite::tungstenite::Message;

use super::{Effect, Effects, Forward, Saving, TabId, Target};
use crate::cause::{Cause, Lost};
use document::Kind;
use wire::Frame;

/// The most upstream operations one session may have (lingering ones
/// included).
pub const MAX_OPERATIONS: usize = 1024;
/// The most active ids one tab may have (shared ones included).
pub const MAX_TAB_OPERATIONS: usize = 256;

/// The subprotocol a tab speaks (and its session's upstream with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    /// `graphql-transport-ws`: the graphql-ws library.
    TransportWs,
    /// `graphql-ws`: subscriptions-transport-ws (legacy).
    Legacy,
}

impl Subprotocol {
    /// Its name in `Sec-WebSocket-Protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::TransportWs => "graphql-transport-ws",
            Subprotocol::Legacy => "graphql-ws",
        }
    }

    /// The subprotocol to answer a tab that requested `requested` (a
    /// comma-separated list): `graphql-transport-ws` when it offers it,
    /// else the legacy one, else none.
    pub fn choose(requested: &str) -> Option<Subprotocol> {
        let offered: Vec<&str> = requested.split(',').map(str::trim).collect();
        [Subprotocol::TransportWs, Subprotocol::Legacy]
            .into_iter()
            .find(|p| offered.contains(&p.name()))
    }
}

/// `share_subscriptions`: whether tabs that ask for the same subscription
/// share one upstream operation, and what a later tab is given first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Share {
    /// Nothing is shared.
    #[default]
    Off,
    /// Shared; a later tab gets what comes after it attached.
    Events,
    /// Shared; a later tab first gets the last result (live queries, whose
    /// every result is whole).
    Live,
}

/// A tab's close for breaking the subprotocol, with the code and reason a
/// graphql-ws server closes with (the reason cut to what a close frame
/// carries, as graphql-ws cuts it: it may quote the tab's own input).
fn protocol_close(tab: TabId, code: u16, reason: String) -> Effect {
    Effect::Close {
        to: Target::one(tab),
        cause: Cause::Subprotocol {
            code,
            reason: crate::cause::close_reason(reason),
        },
    }
}

/// One upstream operation.
#[derive(Debug)]
struct Operation {
    /// The tabs attached, in the order they came (each keeps its own id
    /// for it: [`TabState`]).
    tabs: Vec<TabId>,
    /// Its identity when shared (see [`wire::share_key`]).
    key: Option<Box<str>>,
    /// `live`: the last result's payload, for a later tab.
    last: Option<Box<str>>,
    /// Since when it has had no tab because its last tab left without
    /// completing it: completed upstream once `linger` has passed.
    orphaned: Option<Instant>,
}

/// An id a tab chose for an operation: inline when it fits (graphql-ws's
/// are UUIDs, 36 bytes; Apollo's legacy client counts), so that an idle
/// tab's operation is no allocation of its own (small blocks scattered
/// among the tabs' buffers kept about 0.35 KiB per tab resident:
/// BENCHMARKS.md, "Twelfth pass").
#[derive(Debug)]
enum OpId {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<str>),
}

/// The longest id kept inline.
const INLINE_ID: usize = 38;

impl OpId {
    fn new(id: String) -> OpId {
        if id.len() <= INLINE_ID {
            let mut bytes = [0u8; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            OpId::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            OpId::Heap(id.into_boxed_str())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied from a `String`, cut at its own length: UTF-8.
            OpId::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or("")
            }
            OpId::Heap(s) => s,
        }
    }
}

/// One tab of the session: its first operation inline, the others in a
/// list (a tab has a few; every idle tab of the process holds one of
/// these, inside its session's map).
#[derive(Debug, Default)]
struct TabState {
    /// The ack has reached it.
    acked: bool,
    /// Its active ids, and the upstream operation each is attached to.
    first: Option<(OpId, u64)>,
    more: Vec<(OpId, u64)>,
}

impl TabState {
    fn ids(&self) -> impl Iterator<Item = &(OpId, u64)> {
        self.first.iter().chain(self.more.iter())
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn get(&self, id: &str) -> Option<u64> {
        self.ids()
            .find(|(i, _)| i.as_str() == id)
            .map(|&(_, up)| up)
    }

    /// Its id for upstream operation `upstream`.
    fn id_for(&self, upstream: u64) -> Option<&str> {
        self.ids()
            .find(|&&(_, up)| up == upstream)
            .map(|(i, _)| i.as_str())
    }

    fn add(&mut self, id: String, upstream: u64) {
        let entry = (OpId::new(id), upstream);
        match self.first {
            None => self.first = Some(entry),
            Some(_) => self.more.push(entry),
        }
    }

    /// Removes the entry `matches` picks; its id and operation.
    fn take(&mut self, matches: impl Fn(&(OpId, u64)) -> bool) -> Option<(OpId, u64)> {
        if self.first.as_ref().is_some_and(&matches) {
            let taken = self.first.take();
            if !self.more.is_empty() {
                self.first = Some(self.more.swap_remove(0));
            }
            return taken;
        }
        let at = self.more.iter().position(matches)?;
        Some(self.more.swap_remove(at))
    }

    fn remove(&mut self, id: &str) -> Option<u64> {
        self.take(|(i, _)| i.as_str() == id).map(|(_, up)| up)
    }

    fn remove_op(&mut self, upstream: u64) -> Option<OpId> {
        self.take(|&(_, up)| up == upstream).map(|(id, _)| id)
    }

    /// Every id, with its operation (the tab is leaving).
    fn drain(self) -> impl Iterator<Item = (OpId, u64)> {
        self.first.into_iter().chain(self.more)
    }
}

/// The `graphql` envelope's state for one session.
#[derive(Debug)]
pub struct Graphql {
    protocol: Subprotocol,
    share: Share,
    linger: Duration,
    /// The upstream's `connection_ack`, once it came.
    ack: Option<Message>,
    /// The first tab's `connection_init` went upstream.
    init_sent: bool,
    tabs: FxHashMap<TabId, TabState>,
    ops: FxHashMap<u64, Operation>,
    /// Shared operations by identity.
    shared: FxHashMap<Box<str>, u64>,
    /// The last upstream id given (ids are never reused on a connection).
    last_id: u64,
    /// Some operation lingers (its deadline is looked for only then).
    lingering: bool,
    /// What the state keeps, in bytes, kept as it changes.
    held: usize,
}

impl Graphql {
    pub fn new(protocol: Subprotocol, share: Share, linger: Duration) -> Graphql {
        Graphql {
            protocol,
            share,
            linger,
            ack: None,
            init_sent: false,
            tabs: FxHashMap::default(),
            ops: FxHashMap::default(),
            shared: FxHashMap::default(),
            last_id: 0,
            lingering: false,
            held: 0,
        }
    }

    /// What the session's GraphQL state keeps, in bytes, for the buffer
    /// budget: its operations (ids, shared identities, a live operation's
    /// last result) and the ack.
    pub fn held(&self) -> usize {
        self.held + self.ack.as_ref().map_or(0, Message::len)
    }

    /// A tab joined.
    #[inline(never)]
    pub fn tab_joined(&mut self, tab: TabId, _out: &mut Effects) {
        self.tabs.insert(tab, TabState::default());
    }

    /// The `connection_init` that placed a tab in the session: the first
    /// goes upstream unchanged; a tab that comes once the ack is known is
    /// answered with it; the others wait for it.
    #[inline(never)]
    pub fn tab_init(&mut self, tab: TabId, init: Message, out: &mut Effects) {
        let Some(state) = self.tabs.get_mut(&tab) else {
            return;
        };
        match &self.ack {
            Some(ack) => {
                state.acked = true;
                out.push(Effect::Answer {
                    tab,
                    msg: ack.clone(),
                });
            }
            None if !self.init_sent => {
                self.init_sent = true;
                out.push(Effect::Upstream(init));
            }
            None => {}
        }
    }

    /// A tab sent a frame.
    #[inline(never)]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        _now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        let payload_len = msg.len();
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Binary(b) => std::str::from_utf8(b).unwrap_or(""),
            _ => return Ok(()),
        };
        let frame = match wire::read(text) {
            Ok(f) => f,
            Err(why) => return self.refuse(tab, None, why, out),
        };
        let legacy = self.protocol == Subprotocol::Legacy;
        let words = self.protocol.words();
        match frame.kind.as_str() {
            "connection_init" if legacy => {
                // subscriptions-transport-ws answers each with an ack.
                if let Some(ack) = &self.ack {
                    out.push(Effect::Answer {
                        tab,
                        msg: ack.clone(),
                    });
                }
            }
            "connection_init" => out.push(protocol_close(
                tab,
                4429,
                "Too many initialisation requests".into(),
            )),
            "ping" if !legacy => {
                if frame.payload.is_some_and(|p| !wire::is_object(p)) {
                    let why = "\"ping\" message expects the 'payload' property to be an object or nullish or missing";
                    return self.refuse(tab, None, why.into(), out);
                }
                out.push(Effect::Avoided(Saving::Ping));
                let payload = frame.payload.map(|p| p.get());
                out.push(Effect::Answer {
                    tab,
                    msg: wire::without_id("pong", payload),
                });
            }
            "pong" if !legacy => {}
            "connection_terminate" if legacy => out.push(protocol_close(tab, 1000, String::new())),
            kind if kind == words.start => self.start(tab, &frame, payload_len, out),
            kind if kind == words.stop => match wire::required_id(&frame) {
                Ok(id) => self.stop(tab, &id, out),
                Err(why) => return self.refuse(tab, None, why, out),
            },
            kind => {
                let why = format!("Invalid message 'type' property \"{kind}\"");
                return self.refuse(tab, frame.id.as_deref(), why, out);
            }
        }
        Ok(())
    }

    /// A frame the subprotocol refuses: graphql-transport-ws closes the tab
    /// with 4400 and the reason; the legacy one answers an `error` for the
    /// operation, as subscriptions-transport-ws does.
    fn refuse(
        &mut self,
        tab: TabId,
        id: Option<&str>,
        why: String,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        out.push(Effect::Refused(super::Refused::Malformed));
        match self.protocol {
            Subprotocol::TransportWs => out.push(protocol_close(tab, 4400, why)),
            Subprotocol::Legacy => out.push(Effect::Answer {
                tab,
                msg: wire::legacy_error(id, &why),
            }),
        }
        Ok(())
    }

    /// A tab starts an operation (`subscribe`; legacy `start`).
    fn start(&mut self, tab: TabId, frame: &Frame<'_>, payload_len: usize, out: &mut Effects) {
        let legacy = self.protocol == Subprotocol::Legacy;
        let id = match wire::required_id(frame) {
            Ok(id) => id,
            Err(why) => {
                let _ = self.refuse(tab, None, why, out);
                return;
            }
        };
        let checked = match wire::check_request(&frame.kind, frame.payload) {
            Ok(c) => c,
            Err(why) => {
                let _ = self.refuse(tab, Some(&id), why, out);
                return;
            }
        };
        let Some(state) = self.tabs.get(&tab) else {
            return;
        };
        if !state.acked && !legacy {
            out.push(protocol_close(tab, 4401, "Unauthorized".into()));
            return;
        }
        if state.get(&id).is_some() {
            if legacy {
                // subscriptions-transport-ws stops the old one first.
                self.stop(tab, &id, out);
            } else {
                let why = format!("Subscriber for {id} already exists");
                out.push(protocol_close(tab, 4409, why));
                return;
            }
        }
        if self.tabs.get(&tab).map_or(0, TabState::len) >= MAX_TAB_OPERATIONS {
            out.push(Effect::Refused(super::Refused::TabOperations));
            let why = format!("too many operations for this tab ({MAX_TAB_OPERATIONS})");
            return self.limit_reached(tab, &id, why, out);
        }
        let payload = frame.payload.map(|p| p.get()).unwrap_or("{}");
        // Only subscriptions are shared: a payload the session shares
        // already is one (its document was parsed when it went upstream);
        // any other is parsed, once, to learn its operation's type.
        let key = match self.share {
            Share::Off => None,
            Share::Events | Share::Live => wire::share_key(&checked.request),
        };
        if let Some(&upstream) = key.as_deref().and_then(|k| self.shared.get(k)) {
            // What was parsed goes first: the tab's lasting state is not
            // carved out above it (the heap would keep its holes).
            drop((key, checked));
            return self.attach(tab, id, upstream, out);
        }
        let subscription =
            document::operation_kind(&checked.query, checked.operation_name.as_deref())
                == Some(Kind::Subscription);
        let key = key.filter(|_| subscription);
        if self.ops.len() >= MAX_OPERATIONS {
            out.push(Effect::Refused(super::Refused::SessionOperations));
            let why = format!("too many operations in this session ({MAX_OPERATIONS})");
            return self.limit_reached(tab, &id, why, out);
        }
        self.last_id += 1;
        let upstream = self.last_id;
        let words = self.protocol.words();
        let forward = Forward {
            frame: wire::with_id(words.start, &upstream.to_string(), Some(payload)),
            payload: payload_len,
        };
        out.push(Effect::Forward(tab, forward));
        let key: Option<Box<str>> = key.map(Into::into);
        if let Some(k) = &key {
            self.shared.insert(k.clone(), upstream);
        }
        self.held += key.as_ref().map_or(0, |k| 2 * k.len()) + id.len() + OPERATION_BYTES;
        self.ops.insert(
            upstream,
            Operation {
                tabs: vec![tab],
                key,
                last: None,
                orphaned: None,
            },
        );
        if let Some(state) = self.tabs.get_mut(&tab) {
            state.add(id, upstream);
        }
    }

    /// A limit refused a tab's operation: graphql-transport-ws closes the
    /// tab (4400, the reason naming the limit); legacy answers an error.
    fn limit_reached(&mut self, tab: TabId, id: &str, why: String, out: &mut Effects) {
        match self.protocol {
            Subprotocol::TransportWs => out.push(protocol_close(tab, 4400, why)),
            Subprotocol::Legacy => out.push(Effect::Answer {
                tab,
                msg: wire::legacy_error(Some(id), &why),
            }),
        }
    }

    /// A tab attaches to a shared operation already upstream: nothing goes
    /// upstream; with `live`, it is first given the last result.
    fn attach(&mut self, tab: TabId, id: String, upstream: u64, out: &mut Effects) {
        let Some(op) = self.ops.get_mut(&upstream) else {
            return;
        };
        out.push(Effect::Avoided(Saving::Subscription));
        op.orphaned = None;
        if self.share == Share::Live {
            if let Some(last) = &op.last {
                let next = self.protocol.words().next;
                out.push(Effect::Answer {
                    tab,
                    msg: wire::with_id(next, &id, Some(last)),
                });
            }
        }
        self.held += id.len() + TAB_ID_BYTES;
        op.tabs.push(tab);
        if let Some(state) = self.tabs.get_mut(&tab) {
            state.add(id, upstream);
        }
    }

    /// A tab stops one of its operations (`complete`; legacy `stop`): it
    /// gets nothing more for it, and the operation is completed upstream
    /// once no tab is attached.
    fn stop(&mut self, tab: TabId, id: &str, out: &mut Effects) {
        let Some(upstream) = self.tabs.get_mut(&tab).and_then(|s| s.remove(id)) else {
            // An id that is not active: graphql-ws ignores it.
            return;
        };
        self.held = self.held.saturating_sub(id.len() + TAB_ID_BYTES);
        let Some(op) = self.ops.get_mut(&upstream) else {
            return;
        };
        op.tabs.retain(|&t| t != tab);
        if op.tabs.is_empty() {
            self.complete_upstream(upstream, out);
        }
    }

    /// Completes an operation upstream and forgets it.
    fn complete_upstream(&mut self, upstream: u64, out: &mut Effects) {
        let stop = self.protocol.words().stop;
        out.push(Effect::Upstream(wire::with_id(
            stop,
            &upstream.to_string(),
            None,
        )));
        self.forget(upstream);
    }

    /// Forgets an operation (ended upstream, or completed).
    fn forget(&mut self, upstream: u64) {
        let Some(op) = self.ops.remove(&upstream) else {
            return;
        };
        if let Some(k) = &op.key {
            self.shared.remove(k);
        }
        let mut freed = op.key.as_ref().map_or(0, |k| 2 * k.len())
            + op.last.as_ref().map_or(0, |l| l.len())
            + OPERATION_BYTES;
        for tab in op.tabs {
            if let Some(id) = self.tabs.get_mut(&tab).and_then(|s| s.remove_op(upstream)) {
                freed += id.as_str().len() + TAB_ID_BYTES;
            }
        }
        self.held = self.held.saturating_sub(freed);
    }

    /// A tab left: it leaves its operations; those it was the last tab of
    /// linger upstream for `linger`.
    #[inline(never)]
    pub fn tab_left(&mut self, tab: TabId, _code: u16, now: Instant, _out: &mut Effects) {
        let Some(state) = self.tabs.remove(&tab) else {
            return;
        };
        for (id, upstream) in state.drain() {
            self.held = self.held.saturating_sub(id.as_str().len() + TAB_ID_BYTES);
            if let Some(op) = self.ops.get_mut(&upstream) {
                op.tabs.retain(|&t| t != tab);
                if op.tabs.is_empty() {
                    op.orphaned = Some(now);
                    self.lingering = true;
                }
            }
        }
    }

    /// An upstream frame.
    #[inline(never)]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut Effects) {
        let Message::Text(text) = &msg else {
            return out.push(Effect::Malformed(super::FrameError::NotJson));
        };
        let text = text.clone();
        let Ok(frame) = wire::read(text.as_str()) else {
            return out.push(Effect::Malformed(super::FrameError::NotJson));
        };
        let legacy = self.protocol == Subprotocol::Legacy;
        match frame.kind.as_str() {
            "connection_ack" => {
                for (&tab, state) in self.tabs.iter_mut() {
                    if !state.acked {
                        state.acked = true;
                        out.push(Effect::Answer {
                            tab,
                            msg: msg.clone(),
                        });
                    }
                }
                self.ack = Some(msg);
            }
            "ping" if !legacy => out.push(Effect::Upstream(wire::without_id(
                "pong",
                frame.payload.map(|p| p.get()),
            ))),
            "pong" if !legacy => {}
            // Legacy keep-alive: every tab's client times out without it.
            "ka" if legacy => super::broadcast(msg, out),
            // Legacy: the init was refused; the waiting tabs are told
            // (the upstream's close follows).
            "connection_error" if legacy => {
                let waiting: Vec<TabId> = self
                    .tabs
                    .iter()
                    .filter(|(_, s)| !s.acked)
                    .map(|(&t, _)| t)
                    .collect();
                super::deliver(waiting, msg, out);
            }
            kind => {
                let Some(upstream) = frame.id.as_deref().and_then(|i| i.parse::<u64>().ok()) else {
                    return out.push(Effect::Malformed(super::FrameError::NotJson));
                };
                // A result keeps the operation going; `error` and
                // `complete` end it. Another frame with an operation's id
                // (a server's own, such as AppSync's `start_ack`) reaches
                // its tabs the same way, and keeps it going.
                let next = kind == self.protocol.words().next;
                let ends = kind == "error" || kind == "complete";
                let payload = frame.payload.map(|p| p.get());
                self.result(upstream, kind, payload, next, ends, out);
            }
        }
    }

    /// A result (`next`, legacy `data`), `error` or `complete` for an
    /// operation: to each attached tab with its own id (tabs that share an
    /// id share one buffer); `error` and `complete` (`ends`) end the
    /// operation.
    fn result(
        &mut self,
        upstream: u64,
        kind: &str,
        payload: Option<&str>,
        next: bool,
        ends: bool,
        out: &mut Effects,
    ) {
        let Some(op) = self.ops.get_mut(&upstream) else {
            // Completed here meanwhile.
            return;
        };
        let tabs = &self.tabs;
        let id_of = |tab: &TabId| tabs.get(tab).and_then(|s| s.id_for(upstream));
        let mut groups = 0;
        for (i, tab) in op.tabs.iter().enumerate() {
            let Some(id) = id_of(tab) else { continue };
            if op.tabs[..i].iter().any(|t| id_of(t) == Some(id)) {
                continue;
            }
            let ids: Vec<TabId> = op.tabs[i..]
                .iter()
                .filter(|t| id_of(t) == Some(id))
                .copied()
                .collect();
            super::deliver(ids, wire::with_id(kind, id, payload), out);
            groups += 1;
        }
        if groups > 1 {
            // The fan-out counts n - k of n deliveries as saved (k
            // buffers); the server made one, not k.
            out.push(Effect::Avoided(Saving::Deliveries(groups - 1)));
        }
        if next && self.share == Share::Live && op.key.is_some() {
            let old = op.last.as_ref().map_or(0, |l| l.len());
            let new = payload.unwrap_or("null");
            self.held = (self.held + new.len()).saturating_sub(old);
            op.last = Some(new.into());
        }
        if ends {
            self.forget(upstream);
        }
    }

    /// The upstream is gone: every tab is closed, with the server's code
    /// and reason when it closed with one from 4000 (or, on the legacy
    /// subprotocol, before its ack), else with 1012 (graphql-ws clients
    /// retry it).
    pub fn upstream_lost(&self, lost: &Lost) -> Cause {
        // On the legacy subprotocol, a server that refused the init
        // (`connection_error`) closes with a code of its own choosing
        // (subscriptions-transport-ws: 1011): the waiting tabs get it.
        let refused_init = self.protocol == Subprotocol::Legacy && self.ack.is_none();
        match lost {
            Lost::Closed(Some(c)) if c.code >= 4000 || refused_init => Cause::Backend {
                code: c.code,
                reason: c.reason.clone(),
            },
            _ => Cause::UpstreamLost,
        }
    }

    /// When the first lingering operation's linger ends.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        if !self.lingering {
            return None;
        }
        let first = self.ops.values().filter_map(|op| op.orphaned).min();
        self.lingering = first.is_some();
        first.map(|t| t + self.linger)
    }

    /// Operations whose tabs all left `linger` or longer before `now` are
    /// completed upstream.
    #[inline(never)]
    pub fn on_timeout(&mut self, now: Instant, out: &mut Effects) {
        let expired: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| {
                op.orphaned
                    .is_some_and(|t| now.duration_since(t) >= self.linger)
            })
            .map(|(&id, _)| id)
            .collect();
        for upstream in expired {
            self.complete_upstream(upstream, out);
        }
    }
}

/// What an operation keeps beside its strings, in bytes (close enough).
const OPERATION_BYTES: usize = std::mem::size_of::<Operation>() + 64;
/// What a tab's id for an operation keeps beside its text.
const TAB_ID_BYTES: usize = 48;

pub mod document;
#[cfg(test)]
mod tests;
pub mod wire;
