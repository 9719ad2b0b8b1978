//! The registry of live sessions, the join path, and a session task's life.
//!
//! The [`Registry`] maps session keys to running sessions. Its only job is
//! to make sure that a key has at most one session, however many tabs of it
//! arrive at once: the first tab inserts the session (whose task starts by
//! dialling), the others find it and queue their join behind the dial.
//! Joining tabs reach the task over a bounded channel of `Command`s.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, Instrument};

use super::actor::{Session, SessionStats};
use super::key::SessionKey;
use super::link::{going_away, Command, Joined};
use super::uplink::Uplink;
use super::SessionContext;
use crate::cause::Refusal;
use crate::config::Reconnect;
use crate::envelope::JoinInfo;
use crate::limits::{Limits, SessionPermit};
use crate::reconnect::Backoff;
use crate::upstream::DialParams;
use tokio_tungstenite::tungstenite::Message;

/// Capacity of a session's command channel, shared by all of its tabs.
const COMMAND_QUEUE: usize = 256;
/// How many times a join retries when it races with a session ending.
const JOIN_TRIES: usize = 3;

/// One line of [`Registry::snapshot`].
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    /// The session's public name (a keyed hash, never the cookie).
    pub name: String,
    /// Its route's path.
    pub route: Arc<str>,
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

/// A session key whose last upstream was lost without a redial (its tabs
/// were closed to reconnect on their own): its next session dials no
/// sooner than `not_before`.
#[derive(Debug, Clone, Copy)]
struct Loss {
    /// Losses in a row, for the backoff's growth.
    consecutive: u32,
    not_before: Instant,
}

/// What a tab brings in case it opens its session.
pub struct NewSession {
    /// Its part of the upstream handshake.
    pub dial: DialParams,
    /// How long the session outlives its last tab (none for a session of
    /// its own, `missing_cookie = "direct"`: no tab can ever rejoin it).
    pub linger: Duration,
    /// The limits a new session is counted against, and the client address
    /// it is counted for.
    pub limits: Arc<Limits>,
    pub client: std::net::IpAddr,
}

/// Loss records beyond which old ones are pruned.
const LOSSES_KEPT: usize = 10_000;

/// All live sessions of the process.
#[derive(Default)]
pub struct Registry {
    sessions: DashMap<SessionKey, SessionHandle>,
    /// Keys whose sessions lost their upstream and were not redialled
    /// (docs/protocol.md, "The `pusher` envelope": the clients reconnect, and their new session
    /// waits out the route's backoff before it dials).
    losses: DashMap<SessionKey, Loss>,
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

    /// Sessions that have tabs right now (lingering ones have none): the
    /// shutdown drain ranks these.
    pub fn with_tabs(&self) -> usize {
        self.sessions
            .iter()
            .filter(|entry| entry.value().stats.tabs.load(Ordering::Relaxed) > 0)
            .count()
    }

    /// The live sessions, as the status page shows them.
    pub fn snapshot(&self) -> Vec<SessionSnapshot> {
        self.sessions
            .iter()
            .map(|entry| {
                let st = &entry.value().stats;
                SessionSnapshot {
                    name: entry.key().name(),
                    route: st.route.clone(),
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

    /// A session of `key` lost its upstream and closed its tabs: the next
    /// one waits the route's backoff for this many losses in a row.
    fn lost(&self, key: SessionKey, policy: Reconnect) -> Duration {
        let now = Instant::now();
        if self.losses.len() >= LOSSES_KEPT {
            // Records of keys no tab came back for, long past.
            let stale = now.checked_sub(Duration::from_secs(600)).unwrap_or(now);
            self.losses
                .retain(|k, l| l.not_before > stale || self.sessions.contains_key(k));
        }
        let consecutive = self.losses.get(&key).map_or(0, |l| l.consecutive);
        let delay = Backoff::new(policy).delay_after(consecutive);
        let loss = Loss {
            consecutive: consecutive.saturating_add(1),
            not_before: now + delay,
        };
        self.losses.insert(key, loss);
        delay
    }

    /// A session of `key` ended otherwise: losses no longer count.
    fn settled(&self, key: &SessionKey) {
        self.losses.remove(key);
    }

    /// When a new session of `key` may dial, if it must wait.
    fn not_before(&self, key: &SessionKey) -> Option<Instant> {
        let at = self.losses.get(key)?.not_before;
        (at > Instant::now()).then_some(at)
    }

    /// Joins the tab to the session `key` of the route `ctx`, creating the
    /// session (and dialling its upstream) if there is none, when the
    /// session limits allow another. Returns once the tab is a member, or
    /// refused.
    pub async fn join(
        self: &Arc<Self>,
        ctx: &SessionContext,
        key: SessionKey,
        new: &NewSession,
        info: JoinInfo,
        init: Option<Message>,
    ) -> Result<Joined, Refusal> {
        for _ in 0..JOIN_TRIES {
            let handle = match self.sessions.entry(key) {
                Entry::Occupied(found) => found.get().clone(),
                // The shard lock is held only for this insert: spawning does
                // not wait, and the dial happens inside the new task.
                Entry::Vacant(vacant) => {
                    let permit = new.limits.session(new.client).map_err(Refusal::Limit)?;
                    let handle = self.spawn(ctx.clone(), key, new, permit);
                    vacant.insert(handle).clone()
                }
            };
            let (reply, answer) = oneshot::channel();
            let cmd = Command::Join {
                info: Box::new(info.clone()),
                init: init.clone().map(Box::new),
                reply,
                max_tabs: ctx.route.max_tabs_per_session,
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
        new: &NewSession,
        permit: SessionPermit,
    ) -> SessionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let stats = Arc::new(SessionStats {
            route: ctx.route.path.as_str().into(),
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
            Opened {
                dial: new.dial.clone(),
                linger: new.linger,
                _permit: permit,
            },
            tx.clone(),
            rx,
            stats.clone(),
        );
        tokio::spawn(task.instrument(span));
        SessionHandle { id, stats, tx }
    }
}

/// What a session is started with.
pub(super) struct Opened {
    pub dial: DialParams,
    pub linger: Duration,
    /// Its slot under the session limits, given back when the task ends.
    pub _permit: SessionPermit,
}

/// The session task: dial, serve, then unlist and refuse late joiners.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    registry: Arc<Registry>,
    ctx: SessionContext,
    key: SessionKey,
    id: u64,
    opened: Opened,
    commands: mpsc::Sender<Command>,
    mut rx: mpsc::Receiver<Command>,
    stats: Arc<SessionStats>,
) {
    ctx.metrics.sessions_active.inc();
    if let Some(at) = registry.not_before(&key) {
        // The key's last upstream was lost: its tabs reconnected at once,
        // the dial waits out the backoff (and their handshakes with it).
        debug!("waiting out the reconnect backoff before dialling");
        Box::pin(tokio::time::sleep_until(at)).await;
    }
    let Opened {
        dial,
        linger,
        _permit,
    } = opened;
    // The dial's result is consumed in this statement: held across the
    // session's life, it would reserve an upstream half's room in every
    // session's task beside the session's own.
    let mut late = Refusal::Gone;
    let mut session = match Box::pin(Uplink::dial(&ctx, dial)).await {
        Ok(uplink) => Some(Session::new(&ctx, key, uplink, commands, stats)),
        Err(e) => {
            // Every tab queued behind the dial gets the same answer.
            late = Refusal::Dial(e);
            None
        }
    };
    if let Some(session) = session.as_mut() {
        session.linger_for = linger;
        let (peak, lost) = session.serve(&mut rx).await;
        ctx.metrics.session_ended(peak);
        if lost {
            let delay = registry.lost(key, ctx.route.reconnect);
            debug!(?delay, "the session's next dial waits");
        } else {
            registry.settled(&key);
        }
        // A tab that raced with the end retries and starts a new session.
    }
    drop(session);
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
            Command::Leave(_) | Command::Evict(_) => {}
        }
    }
    ctx.metrics.sessions_active.dec();
    registry.ended.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionHasher;

    const POLICY: Reconnect = Reconnect {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(4),
        attempts: 8,
    };

    #[tokio::test(start_paused = true)]
    async fn a_lost_keys_next_dial_waits_a_growing_backoff_until_it_settles() {
        let registry = Registry::default();
        let key = SessionHasher::new().direct();
        assert_eq!(registry.not_before(&key), None, "nothing lost yet");
        for n in 0..6u32 {
            let delay = registry.lost(key, POLICY);
            let cap = Duration::from_secs(1 << n.min(2));
            assert!(delay <= cap, "loss {n}: {delay:?} over {cap:?}");
            assert_eq!(registry.losses.get(&key).unwrap().consecutive, n + 1);
            let waits = registry.not_before(&key);
            assert_eq!(waits.is_some(), !delay.is_zero());
        }
        // A session of the key that ends otherwise: its next dial is free.
        registry.settled(&key);
        assert_eq!(registry.not_before(&key), None);
        assert!(registry.losses.is_empty());
        // Once the wait has passed, the key dials at once.
        registry.lost(key, POLICY);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(registry.not_before(&key), None);
    }
}
