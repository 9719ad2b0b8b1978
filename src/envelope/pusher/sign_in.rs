//! User authentication (`pusher:signin`): one sign-in per session. The
//! first tab's goes upstream (one request at a time, see the module above);
//! tabs that ask while it is pending wait for its answer, and tabs that ask
//! later are given the upstream's `pusher:signin_success` as it came. Events
//! the server sends to the user (`#server-to-user-…`) reach the tabs that
//! signed in.

use tokio_tungstenite::tungstenite::Message;

use super::{Pusher, Request};
use crate::envelope::deliver;
use crate::envelope::{Effect, Effects, TabId};

/// The session's sign-in.
#[derive(Debug)]
pub(super) enum SignIn {
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

impl SignIn {
    /// The frame to send upstream, while one is pending.
    pub fn frame(&self) -> Option<Message> {
        match self {
            SignIn::Pending { frame, .. } => Some(frame.clone()),
            _ => None,
        }
    }

    /// What the sign-in keeps, in bytes: its frame or its answer.
    pub fn bytes(&self) -> usize {
        match self {
            SignIn::None => 0,
            SignIn::Pending { frame: m, tabs } | SignIn::Done { success: m, tabs } => {
                m.len() + tabs.capacity() * std::mem::size_of::<TabId>()
            }
        }
    }

    /// A tab left: it waits for no answer and gets no user event.
    pub fn tab_left(&mut self, tab: TabId) {
        match self {
            SignIn::Pending { tabs, .. } | SignIn::Done { tabs, .. } => tabs.retain(|&t| t != tab),
            SignIn::None => {}
        }
    }
}

impl Pusher {
    /// A tab's `pusher:signin`.
    pub(super) fn sign_in(&mut self, tab: TabId, msg: Message, out: &mut Effects) {
        match &mut self.sign_in {
            SignIn::Done { success, tabs } => {
                if !tabs.contains(&tab) {
                    tabs.push(tab);
                }
                out.push(Effect::Answer {
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

    /// `pusher:signin_success`: the waiting tabs are given it, and so is
    /// every tab that asks later.
    pub(super) fn signed_in(&mut self, msg: Message, out: &mut Effects) {
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

    /// A `pusher:error` that answers the sign-in in flight: its waiting
    /// tabs are told, and a later `pusher:signin` tries again.
    pub(super) fn sign_in_refused(&mut self, msg: Message, out: &mut Effects) {
        self.in_flight = None;
        if let SignIn::Pending { tabs, .. } = std::mem::replace(&mut self.sign_in, SignIn::None) {
            deliver(tabs, msg, out);
        }
        self.send_next(out);
    }

    /// An event for the signed-in user reaches the tabs that signed in.
    pub(super) fn user_event(&self, msg: Message, out: &mut Effects) {
        let tabs = match &self.sign_in {
            SignIn::Done { tabs, .. } => tabs.clone(),
            _ => Vec::new(),
        };
        deliver(tabs, msg, out);
    }
}
