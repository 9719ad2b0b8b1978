//! Envelopes: what a session does with frames, as pure state machines.
//!
//! Each envelope of PROTOCOL.md is one state machine that owns no socket and
//! no clock. Its session feeds it events (a tab joined, sent, left; the
//! upstream sent a frame, was lost, was restored; a keepalive tick) and it
//! answers with [`Effect`]s (send upstream, deliver to these tabs, answer one
//! tab, close tabs with a [`Cause`]), handed to an [`Effects`] sink as they
//! are decided. The session applies them to real sockets; a unit test
//! collects them in a `Vec<Effect>` and compares plain values.
//!
//! [`Machine`] dispatches by an enum, not a generic, so that the session's
//! hot loop exists once in the binary whatever the route's envelope.
//!
//! - [`json`]: `json/1`, the tab-id envelope, and its encoders;
//!   [`json_decode`] turns a backend frame into a [`BackendFrame`].
//! - [`none`]: frames pass unchanged; a greeting is replayed to later tabs.
//! - [`pusher`]: Pusher Channels, multiplexed by channel (a state machine
//!   with its tests; not yet offered as a route's envelope).

pub mod json;
pub mod json_decode;
pub mod none;
pub mod pusher;

use std::fmt;

use tokio_tungstenite::tungstenite::Message;
/// The validated text of a frame: what the decoder takes and encoders build.
pub use tokio_tungstenite::tungstenite::Utf8Bytes;

pub use json::{close_event, data_binary, data_text, open_event, NotJson};
pub use json_decode::{decode, is_valid_tab_id, BackendFrame, Body, FrameError};

use crate::cause::Cause;
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
    /// Send a frame of the envelope's own upstream (an `open` or `close`
    /// event); a tab's messages are returned as a [`Forward`] instead.
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
}

/// Where an envelope hands its effects, in the order it decides them.
pub trait Effects {
    fn effect(&mut self, effect: Effect);
}

/// Tests collect effects as plain values.
impl Effects for Vec<Effect> {
    fn effect(&mut self, effect: Effect) {
        self.push(effect);
    }
}

/// A session's envelope state machine, whichever the route's envelope is.
#[derive(Debug)]
pub enum Machine {
    Json(json::Json),
    None(none::Passthrough),
}

impl Machine {
    /// The machine for a route, for a session whose upstream is up.
    pub fn new(route: &Route) -> Machine {
        match route.envelope {
            config::Envelope::Json => Machine::Json(json::Json::new(route)),
            config::Envelope::None => Machine::None(none::Passthrough::new(route)),
        }
    }

    /// A tab joined the session.
    pub fn tab_joined(&mut self, tab: TabId, info: &JoinInfo, out: &mut impl Effects) {
        match self {
            Machine::Json(m) => m.tab_joined(tab, info, out),
            Machine::None(m) => m.tab_joined(tab, out),
        }
    }

    /// A tab sent a data message (text or binary): what goes upstream, or
    /// why the tab is closed instead.
    #[inline]
    pub fn tab_sent(&mut self, tab: TabId, msg: Message) -> Result<Forward, Cause> {
        match self {
            Machine::Json(m) => m.tab_sent(tab, msg),
            Machine::None(_) => Ok(none::Passthrough::tab_sent(msg)),
        }
    }

    /// A tab left the session; `code` is its connection's close code.
    pub fn tab_left(&mut self, tab: TabId, code: u16, out: &mut impl Effects) {
        match self {
            Machine::Json(m) => m.tab_left(tab, code, out),
            Machine::None(_) => {}
        }
    }

    /// The upstream sent a data frame (text or binary).
    #[inline]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut impl Effects) {
        match self {
            Machine::Json(m) => m.upstream_frame(msg, out),
            Machine::None(m) => m.upstream_frame(msg, out),
        }
    }

    /// The upstream is down (it is being redialled).
    pub fn upstream_lost(&mut self) {
        match self {
            Machine::Json(m) => m.upstream_lost(),
            Machine::None(_) => {}
        }
    }

    /// The upstream is back; `members` are the tabs still connected, in the
    /// order they joined.
    pub fn upstream_restored<'a>(
        &mut self,
        members: impl Iterator<Item = (TabId, &'a JoinInfo)>,
        out: &mut impl Effects,
    ) {
        match self {
            Machine::Json(m) => m.upstream_restored(members, out),
            Machine::None(m) => m.upstream_restored(),
        }
    }

    /// A keepalive tick of the session (every `ping_interval`). Neither
    /// `json` nor `none` keeps time; an envelope with a keepalive of its
    /// own (Pusher's `pusher:ping`) acts here.
    pub fn tick(&mut self, _out: &mut impl Effects) {
        match self {
            Machine::Json(_) | Machine::None(_) => {}
        }
    }

    /// Frames a tab may be sent on joining beyond the route's `tab_queue`
    /// (a greeting replay): its outbox may hold this many more.
    pub fn greeting_len(&self) -> usize {
        match self {
            Machine::Json(_) => 0,
            Machine::None(m) => m.greeting_len(),
        }
    }
}
