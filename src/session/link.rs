//! What passes between the join path and a session's task: the commands a
//! tab's handshake sends its session, and what the session answers.

use http::HeaderValue;
use tokio::sync::{mpsc, oneshot};

use crate::cause::{Cause, Refusal};
use crate::envelope::{JoinInfo, TabId};
use crate::queue::Outbox;
use crate::tab::Tab;
use tokio_tungstenite::tungstenite::Message;

/// Messages from the join path to a session task.
pub(super) enum Command {
    /// A tab wants in. Answered once the upstream is up (or failed).
    /// (Its details are boxed, like the connection in `Attach`, so that the
    /// channel's first block of 32 commands, allocated with every session,
    /// stays small.)
    Join {
        info: Box<JoinInfo>,
        /// The frame that placed the tab (a `graphql` tab's
        /// `connection_init`), for the envelope.
        init: Option<Box<Message>>,
        reply: oneshot::Sender<Result<Joined, Refusal>>,
        /// `max_tabs_per_session` in force when the tab came (a reload
        /// applies to tabs that join existing sessions too).
        max_tabs: usize,
    },
    /// A member's connection, once its handshake is answered: the session
    /// serves it from now on.
    Attach(Box<Tab>),
    /// A member's handshake was not completed: its connection never came.
    Leave(TabId),
    /// The buffer budget is spent and this holder holds the most: close it
    /// (1013 "memory budget").
    Evict(Holder),
}

/// Who holds bytes of the buffer budget in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holder {
    /// One tab: its queue, unwritten bytes, partly received message.
    Tab(TabId),
    /// The session: its reconnect buffer and its upstream's unwritten
    /// messages (its tabs' together).
    Session,
}

/// A tab's membership in a session, handed to the tab's handshake.
pub struct Joined {
    pub tab: TabId,
    /// The subprotocol the upstream chose; every tab is answered with it.
    pub protocol: Option<HeaderValue>,
    /// Hands the tab's connection to the session; reports the tab's leave
    /// if dropped instead.
    pub link: TabLink,
}

/// The way from a joined tab's handshake to its session. Dropping it
/// (the handshake did not complete) tells the session the tab has left, as
/// vanished (1006): every `open` event gets its `close` event.
pub struct TabLink {
    tab: TabId,
    /// None once the connection has been handed over.
    tx: Option<mpsc::Sender<Command>>,
}

impl TabLink {
    pub(super) fn new(tab: TabId, tx: mpsc::Sender<Command>) -> TabLink {
        TabLink { tab, tx: Some(tx) }
    }

    /// Hands the tab's connection to its session. If the session is gone
    /// (the proxy is shutting down), the tab is closed as going away.
    pub fn attach(mut self, conn: Box<Tab>) {
        let Some(tx) = self.tx.take() else { return };
        match tx.try_send(Command::Attach(conn)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(cmd)) => going_away(cmd),
            // The session is busy: hand it over once there is room.
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                tokio::spawn(async move {
                    if let Err(mpsc::error::SendError(cmd)) = tx.send(cmd).await {
                        going_away(cmd);
                    }
                });
            }
        }
    }
}

/// Closes the connection of an `Attach` the session did not take.
pub(super) fn going_away(cmd: Command) {
    if let Command::Attach(conn) = cmd {
        conn.finish(Cause::Shutdown, Outbox::default(), None);
    }
}

impl Drop for TabLink {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        let cmd = Command::Leave(self.tab);
        match tx.try_send(cmd) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                // The session is busy: deliver the leave later rather than lose it.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
            }
        }
    }
}
