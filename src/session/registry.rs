//! The registry of live sessions, the join path, and a session task's life.
//!
//! The [`Registry`] maps session keys to running sessions. Its only job is
//! to make sure that a key has at most one session, however many tabs of it
//! arrive at once: the first tab inserts the session (whose task starts by
//! dialling), the others find it and queue their join behind the dial.
//! Joining tabs reach the task over a bounded channel of [`Command`]s.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use http::{HeaderValue, StatusCode};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, Instrument};

use super::actor::Session;
use super::key::SessionKey;
use super::SessionContext;
use crate::cause::Cause;
use crate::envelope::{JoinInfo, TabId};
use crate::queue::Outbox;
use crate::tab::Tab;
use crate::upstream::{self, DialError, DialParams};

/// Capacity of a session's command channel, shared by all of its tabs.
const COMMAND_QUEUE: usize = 256;
/// How many times a join retries when it races with a session ending.
const JOIN_TRIES: usize = 3;

/// What the status page may read about a live session. Its task keeps it
/// current; readers only load.
pub struct SessionStats {
    /// The route's position in the configuration.
    pub route: usize,
    pub tabs: AtomicUsize,
    /// Whether its upstream is up (false while dialling or redialling).
    pub connected: AtomicBool,
    pub started: std::time::Instant,
}

/// One line of [`Registry::snapshot`].
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    /// The session's public name (a keyed hash, never the cookie).
    pub name: String,
    pub route: usize,
    pub tabs: usize,
    pub connected: bool,
    pub age: std::time::Duration,
}

/// A running session, as the registry and its tabs see it.
#[derive(Clone)]
struct SessionHandle {
    /// Tells this session from a later one under the same key.
    id: u64,
    stats: Arc<SessionStats>,
    /// Commands to the session task. The registry and every tab hold a
    /// clone; the session closes its receiving end when it ends, so a send
    /// that fails means "that session is gone".
    tx: mpsc::Sender<Command>,
}

/// All live sessions of the process.
#[derive(Default)]
pub struct Registry {
    sessions: DashMap<SessionKey, SessionHandle>,
    next_id: AtomicU64,
    /// Notified each time a session task ends (the shutdown drain waits on it).
    pub ended: Notify,
}

impl Registry {
    /// Number of live sessions (dialling or connected).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The live sessions, as the status page shows them.
    pub fn snapshot(&self) -> Vec<SessionSnapshot> {
        self.sessions
            .iter()
            .map(|entry| {
                let st = &entry.value().stats;
                SessionSnapshot {
                    name: entry.key().name(),
                    route: st.route,
                    tabs: st.tabs.load(Ordering::Relaxed),
                    connected: st.connected.load(Ordering::Relaxed),
                    age: st.started.elapsed(),
                }
            })
            .collect()
    }

    fn remove(&self, key: &SessionKey, id: u64) {
        self.sessions.remove_if(key, |_, h| h.id == id);
    }
}

/// Messages from the join path to a session task.
pub(super) enum Command {
    /// A tab wants in. Answered once the upstream is up (or failed).
    /// (Its details are boxed, like the connection in `Attach`, so that the
    /// channel's first block of 32 commands, allocated with every session,
    /// stays small.)
    Join {
        info: Box<JoinInfo>,
        reply: oneshot::Sender<Result<Joined, Refusal>>,
    },
    /// A member's connection, once its handshake is answered: the session
    /// serves it from now on.
    Attach(Box<Tab>),
    /// A member's handshake was not completed: its connection never came.
    Leave(TabId),
}

/// Why a tab could not join.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("this session is at its tab limit (max_tabs_per_session)")]
    SessionFull,
    #[error("{0}")]
    Dial(DialError),
    #[error("the session ended while the tab was joining; try again")]
    Gone,
}

impl Refusal {
    /// The HTTP status the tab's handshake fails with.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::SessionFull => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Dial(e) => e.status(),
            Refusal::Gone => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
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
}

impl TabLink {
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
fn going_away(cmd: Command) {
    if let Command::Attach(conn) = cmd {
        conn.finish(Cause::Shutdown, Outbox::default());
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

/// Joins the tab to the session `key`, creating the session (and dialling its
/// upstream) if there is none. Returns once the tab is a member, or refused.
pub async fn join(
    ctx: &SessionContext,
    key: SessionKey,
    dial: DialParams,
    info: JoinInfo,
) -> Result<Joined, Refusal> {
    for _ in 0..JOIN_TRIES {
        let handle = ctx
            .registry
            .sessions
            .entry(key)
            // The shard lock is held only for this insert: spawning does not
            // wait, and the dial happens inside the new task.
            .or_insert_with(|| spawn(ctx.clone(), key, dial.clone()))
            .clone();
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Join {
            info: Box::new(info.clone()),
            reply,
        };
        if handle.tx.send(cmd).await.is_err() {
            // The session ended after we found it; make sure it is unlisted.
            ctx.registry.remove(&key, handle.id);
            continue;
        }
        match answer.await {
            Ok(result) => return result,
            Err(_) => continue,
        }
    }
    Err(Refusal::Gone)
}

fn spawn(ctx: SessionContext, key: SessionKey, dial: DialParams) -> SessionHandle {
    let id = ctx.registry.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let stats = Arc::new(SessionStats {
        route: ctx.index,
        tabs: AtomicUsize::new(0),
        connected: AtomicBool::new(false),
        started: std::time::Instant::now(),
    });
    // A root span: the session outlives the tab that started it.
    let span = tracing::info_span!(parent: None, "session", session = %key.name(), route = %ctx.route.path);
    tokio::spawn(run(ctx, key, id, dial, tx.clone(), rx, stats.clone()).instrument(span));
    SessionHandle { id, stats, tx }
}

/// The session task: dial, serve, then unlist and refuse late joiners.
pub(super) async fn run(
    ctx: SessionContext,
    key: SessionKey,
    id: u64,
    dial: DialParams,
    commands: mpsc::Sender<Command>,
    mut rx: mpsc::Receiver<Command>,
    stats: Arc<SessionStats>,
) {
    ctx.metrics.sessions_active.inc();
    // Boxed: the dial's state (TCP, TLS and WebSocket handshakes) is about
    // 7 KiB, needed once; inline, every session's task would keep room for it.
    let late = match Box::pin(upstream::dial(&ctx.route, &dial)).await {
        Ok((socket, protocol)) => {
            ctx.metrics.dial("ok");
            ctx.metrics.upstream_up();
            debug!("upstream connected");
            let mut session = Session::new(&ctx, key, socket, protocol, dial, commands, stats);
            let peak = session.serve(&mut rx).await;
            ctx.metrics.session_ended(peak);
            // A tab that raced with the end retries and starts a new session.
            Refusal::Gone
        }
        Err(e) => {
            ctx.metrics.dial(e.label());
            info!(error = %e, "upstream dial failed");
            // Every tab queued behind the dial gets the same answer.
            Refusal::Dial(e)
        }
    };
    // Unlist first, so new tabs start a new session instead of finding this
    // one; then answer whatever is queued or raced in.
    ctx.registry.remove(&key, id);
    rx.close();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Join { reply, .. } => {
                let _ = reply.send(Err(late.clone()));
            }
            cmd @ Command::Attach(_) => going_away(cmd),
            Command::Leave(_) => {}
        }
    }
    ctx.metrics.sessions_active.dec();
    ctx.registry.ended.notify_waiters();
}
