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
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, Instrument};

use super::actor::{Session, SessionStats};
use super::key::SessionKey;
use super::link::{going_away, Command, Joined, Refusal};
use super::SessionContext;
use crate::envelope::JoinInfo;
use crate::upstream::{self, DialParams};

/// Capacity of a session's command channel, shared by all of its tabs.
const COMMAND_QUEUE: usize = 256;
/// How many times a join retries when it races with a session ending.
const JOIN_TRIES: usize = 3;

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

    /// Joins the tab to the session `key` of the route `ctx`, creating the
    /// session (and dialling its upstream) if there is none. Returns once
    /// the tab is a member, or refused.
    pub async fn join(
        self: &Arc<Self>,
        ctx: &SessionContext,
        key: SessionKey,
        dial: DialParams,
        info: JoinInfo,
    ) -> Result<Joined, Refusal> {
        for _ in 0..JOIN_TRIES {
            let handle = self
                .sessions
                .entry(key)
                // The shard lock is held only for this insert: spawning does
                // not wait, and the dial happens inside the new task.
                .or_insert_with(|| self.spawn(ctx.clone(), key, dial.clone()))
                .clone();
            let (reply, answer) = oneshot::channel();
            let cmd = Command::Join {
                info: Box::new(info.clone()),
                reply,
            };
            if handle.tx.send(cmd).await.is_err() {
                // The session ended after we found it; make sure it is unlisted.
                self.remove(&key, handle.id);
                continue;
            }
            match answer.await {
                Ok(result) => return result,
                Err(_) => continue,
            }
        }
        Err(Refusal::Gone)
    }

    fn spawn(
        self: &Arc<Self>,
        ctx: SessionContext,
        key: SessionKey,
        dial: DialParams,
    ) -> SessionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let stats = Arc::new(SessionStats {
            route: ctx.index,
            tabs: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            started: std::time::Instant::now(),
        });
        // A root span: the session outlives the tab that started it.
        let span = tracing::info_span!(parent: None, "session", session = %key.name(), route = %ctx.route.path);
        let task = run(
            self.clone(),
            ctx,
            key,
            id,
            dial,
            tx.clone(),
            rx,
            stats.clone(),
        );
        tokio::spawn(task.instrument(span));
        SessionHandle { id, stats, tx }
    }
}

/// The session task: dial, serve, then unlist and refuse late joiners.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    registry: Arc<Registry>,
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
    registry.remove(&key, id);
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
    registry.ended.notify_waiters();
}
