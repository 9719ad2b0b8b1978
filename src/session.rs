//! Sessions: the tabs that share one upstream, and the task that owns it.
//!
//! Each session is one task (an actor) that owns the upstream socket, the
//! table of its tabs and the tabs' connections themselves: it reads each tab
//! when the tab's socket wakes it, and writes to each tab without waiting (a
//! tab whose socket is full gets its messages queued in its outbox, bounded
//! by `tab_queue`), so a tab that stops reading can never delay the upstream
//! reader or another tab. No lock is needed for routing: one task owns it.
//! Joining tabs reach it over a bounded channel of `Command`s.
//!
//! The [`Registry`] maps session keys to running sessions. Its only job is
//! to make sure that a key has at most one session, however many tabs of it
//! arrive at once: the first tab inserts the session (which starts dialling),
//! the others find it and queue their join behind the dial.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_util::task::{waker_ref, ArcWake};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderValue, StatusCode};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn, Instrument};

use crate::config::{Envelope, Route};
use crate::envelope::{self, BackendFrame, Body, FrameError, TabId, Target};
use crate::metrics::RouteMetrics;
use crate::queue::Outbox;
use crate::reconnect::{self, Backoff};
use crate::tab::{self, Tab};
use crate::upstream::{self, DialError, DialParams, UpstreamSocket};

/// A session key: a keyed hash (HMAC-SHA256) of route, session cookie,
/// requested subprotocols and forwarded query. The cookie itself is never
/// stored or shown; [`SessionKey::name`] is what logs and pages print.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// The session's public name: the first 8 bytes of the hash, in hex.
    pub fn name(&self) -> String {
        hex(&self.0[..8])
    }
}

/// Lower-case hex of `bytes`, in one allocation.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKey({})", self.name())
    }
}

/// Hashes session identities with a key made fresh for each process, so a
/// session name cannot be traced back to a cookie, nor compared across runs.
pub struct SessionHasher {
    key: ring::hmac::Key,
    direct: AtomicU64,
}

impl SessionHasher {
    /// A hasher with a random key.
    pub fn new() -> SessionHasher {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .expect("the system random number generator failed");
        SessionHasher {
            key,
            direct: AtomicU64::new(0),
        }
    }

    /// The key of a shared session. Each part is length-prefixed, so no two
    /// different identities can produce the same input.
    pub fn shared(
        &self,
        route: usize,
        cookie: &[u8],
        protocols: &[u8],
        query: &[u8],
    ) -> SessionKey {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(b"S");
        ctx.update(&(route as u64).to_be_bytes());
        for part in [cookie, protocols, query] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        SessionKey::from_tag(ctx.sign())
    }

    /// A key no other tab can ever produce (`missing_cookie = "direct"`).
    pub fn direct(&self) -> SessionKey {
        let n = self.direct.fetch_add(1, Ordering::Relaxed);
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(b"D");
        ctx.update(&n.to_be_bytes());
        SessionKey::from_tag(ctx.sign())
    }
}

impl Default for SessionHasher {
    fn default() -> Self {
        SessionHasher::new()
    }
}

impl SessionKey {
    fn from_tag(tag: ring::hmac::Tag) -> SessionKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        SessionKey(out)
    }
}

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
enum Command {
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
    /// A member's handshake was not completed (its connection never came).
    Leave { tab: TabId, code: u16 },
}

/// What a joining tab tells its session.
#[derive(Debug, Clone, Default)]
pub struct JoinInfo {
    /// The tab's raw query string (`""` if none), for the `open` event.
    pub query: String,
    /// Request headers the route copies into the `open` event.
    pub headers: Vec<(String, String)>,
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
/// (the handshake did not complete) tells the session the tab has left, with
/// code 1006: every `open` event gets its `close` event.
pub struct TabLink {
    tab: TabId,
    /// None once the connection has been handed over.
    tx: Option<mpsc::Sender<Command>>,
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
        conn.finish(tab::going_away(), Outbox::default());
    }
}

impl Drop for TabLink {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        let cmd = Command::Leave {
            tab: self.tab,
            code: 1006,
        };
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

/// The tabs whose sockets woke their session: each tab's waker adds the
/// tab's id here and wakes the session's task, which then serves only
/// those tabs. A std `Mutex`, held only to push or swap, never across an
/// `.await`.
#[derive(Default)]
struct Ready {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    tabs: Vec<TabId>,
    /// The session's task, waiting for a tab.
    session: Option<Waker>,
}

impl Ready {
    fn lock(&self) -> MutexGuard<'_, ReadyState> {
        // Every change under this lock is a single push or swap: a panic
        // cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the woken tabs into `into` (empty), or registers the session's
    /// waker while there are none. Counts against the task's budget, like
    /// tokio's own resources, so a session kept busy by its tabs still
    /// yields to other tasks.
    fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<TabId>) -> Poll<()> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut st = self.lock();
        if st.tabs.is_empty() {
            if !matches!(&st.session, Some(w) if w.will_wake(cx.waker())) {
                st.session = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        std::mem::swap(&mut st.tabs, into);
        coop.made_progress();
        Poll::Ready(())
    }
}

/// One tab's waker, registered with its socket.
struct TabWake {
    tab: TabId,
    /// Already listed in `ready` (cleared as the session serves the tab).
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl ArcWake for TabWake {
    fn wake_by_ref(this: &Arc<Self>) {
        if this.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let session = {
            let mut st = this.ready.lock();
            st.tabs.push(this.tab);
            st.session.take()
        };
        if let Some(w) = session {
            w.wake();
        }
    }
}

/// Capacity of a session's command channel, shared by all of its tabs.
const COMMAND_QUEUE: usize = 256;
/// Commands, or upstream frames, handled before the writes are flushed.
const BATCH: usize = 64;
/// Messages read from one tab before the session turns to the others.
const TAB_BURST: usize = 16;
/// How many times a join retries when it races with a session ending.
const JOIN_TRIES: usize = 3;

/// Everything a session task needs from the proxy.
#[derive(Clone)]
pub struct SessionContext {
    /// The route's position in the configuration.
    pub index: usize,
    pub route: Arc<Route>,
    pub registry: Arc<Registry>,
    /// Shared by the route's sessions and tabs.
    pub metrics: Arc<RouteMetrics>,
    /// Its sender is dropped when the proxy shuts down.
    pub shutdown: watch::Receiver<()>,
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
async fn run(
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
            session.serve(&mut rx).await;
            ctx.metrics.session_ended(session.peak);
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
            Command::Leave { .. } => {}
        }
    }
    ctx.metrics.sessions_active.dec();
    ctx.registry.ended.notify_waiters();
}

/// One member tab, as its session sees it (boxed in the tab table, so
/// that the table's spare capacity costs a pointer per entry).
struct TabSlot {
    /// Its connection; None until its handshake is answered.
    conn: Option<Tab>,
    /// What could not be written to it yet (at most `tab_queue` messages,
    /// plus the greeting replay).
    outbox: Outbox,
    /// Its waker: registered with its socket, it lists the tab in the
    /// session's `ready` set.
    wake: Arc<TabWake>,
    /// Written to since the last flush (and listed in `Session::dirty`).
    dirty: bool,
    /// Its query and headers, for the `open` event sent again after a redial.
    info: JoinInfo,
}

impl TabSlot {
    /// The tab was written to: list it (once) for the flush at the end of
    /// the turn.
    fn mark_dirty(&mut self, tab: TabId, dirty: &mut Vec<TabId>) {
        if !self.dirty {
            self.dirty = true;
            dirty.push(tab);
        }
    }
}

/// Whether a peer (a tab, or the upstream) has been heard from, checked at
/// the session's keepalive ticks: both idle timeouts use it.
pub(crate) struct Liveness {
    /// Whether the peer sent anything since the last tick.
    seen: bool,
    /// When it last did, as of a tick.
    last_seen: Instant,
}

impl Liveness {
    pub(crate) fn new() -> Liveness {
        Liveness {
            seen: false,
            last_seen: Instant::now(),
        }
    }

    /// The peer sent something.
    pub(crate) fn heard(&mut self) {
        self.seen = true;
    }

    /// At a tick: whether the peer has been silent for `idle` or longer.
    pub(crate) fn silent_for(&mut self, idle: std::time::Duration) -> bool {
        let now = Instant::now();
        if std::mem::take(&mut self.seen) {
            self.last_seen = now;
        }
        now.duration_since(self.last_seen) >= idle
    }
}

/// Why a session stopped serving.
enum End {
    /// The linger time after the last tab passed.
    Linger,
    /// The proxy is shutting down.
    Shutdown,
    /// The upstream was lost with no tab left to keep it for.
    LostIdle,
    /// Every redial of the route's budget failed.
    BudgetSpent,
    /// Tabs sent more than `reconnect_buffer` while the upstream was down.
    BufferFull,
}

/// The upstream is down and being redialled.
struct Outage {
    backoff: Backoff,
    /// The wait before the next redial.
    wait: Pin<Box<Sleep>>,
    /// The redial under way, once `wait` has passed.
    dialing: Option<Pin<Box<dyn Future<Output = DialResult> + Send>>>,
    /// What tabs sent meanwhile, in order.
    buffer: reconnect::Buffer,
    /// The first tab's handshake details, for the redials.
    params: DialParams,
}

type DialResult = Result<(UpstreamSocket, Option<HeaderValue>), DialError>;

/// One turn of the session loop.
enum Event {
    Shutdown,
    Command(Option<Command>),
    Upstream(Option<Result<Message, WsError>>),
    /// Boxed: a socket is large, and redials are rare.
    Redialed(Box<DialResult>),
    /// Tabs woke the session (listed in `Session::woken`).
    Tabs,
    Tick,
    Linger,
}

/// The state a session task owns.
struct Session<'c> {
    ctx: &'c SessionContext,
    key: SessionKey,
    /// The upstream, or None during an outage.
    upstream: Option<UpstreamSocket>,
    protocol: Option<HeaderValue>,
    /// The first tab's handshake details, reused for every redial.
    dial: DialParams,
    /// A sender to this session's own command channel, cloned into each
    /// tab's [`TabLink`].
    commands: mpsc::Sender<Command>,
    /// Completes (with an error, its sender being dropped) when the proxy
    /// shuts down.
    shutdown: watch::Receiver<()>,
    /// Keyed by ids tabmux assigns, so a fast non-keyed hash is safe here.
    tabs: FxHashMap<TabId, Box<TabSlot>>,
    /// Tabs whose sockets woke the session, filled by their wakers.
    ready: Arc<Ready>,
    /// The tabs being served this turn (taken from `ready`).
    woken: Vec<TabId>,
    /// Tabs written to this turn, to flush at its end.
    dirty: Vec<TabId>,
    /// Tabs that tabmux closed before their connection was handed over:
    /// what they were sent, and their close frame, for when it arrives.
    closed_early: FxHashMap<TabId, (Outbox, CloseFrame)>,
    /// The next tab id; ids are never reused on one upstream connection.
    next_tab: u64,
    /// `envelope = "none"`: the first `replay_first` upstream frames.
    replay: Vec<Message>,
    /// Upstream frames decided on but not yet written (flushed per batch).
    to_upstream: Vec<Message>,
    /// Armed while the session has no tabs.
    linger: Option<Pin<Box<Sleep>>>,
    /// Set while the upstream is down (boxed: rare, and large).
    outage: Option<Box<Outage>>,
    /// Pings the upstream and checks it is alive, every `ping_interval`.
    keepalive: Interval,
    /// Whether the upstream has been heard from lately (its idle timeout).
    upstream_alive: Liveness,
    /// tungstenite may hold upstream bytes it has read (see
    /// [`UpstreamSocket::poll_next`]).
    upstream_buffered: bool,
    /// Published for the status page after every turn of the loop.
    stats: Arc<SessionStats>,
    /// The most tabs this session had at once.
    peak: usize,
}

impl<'c> Session<'c> {
    fn new(
        ctx: &'c SessionContext,
        key: SessionKey,
        upstream: UpstreamSocket,
        protocol: Option<HeaderValue>,
        dial: DialParams,
        commands: mpsc::Sender<Command>,
        stats: Arc<SessionStats>,
    ) -> Self {
        let period = ctx.route.ping_interval;
        let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Session {
            ctx,
            key,
            upstream: Some(upstream),
            protocol,
            dial,
            commands,
            shutdown: ctx.shutdown.clone(),
            tabs: FxHashMap::default(),
            ready: Arc::default(),
            woken: Vec::new(),
            dirty: Vec::new(),
            closed_early: FxHashMap::default(),
            next_tab: 1,
            replay: Vec::new(),
            to_upstream: Vec::new(),
            linger: None,
            outage: None,
            keepalive,
            upstream_alive: Liveness::new(),
            upstream_buffered: true,
            stats,
            peak: 0,
        }
    }

    fn route(&self) -> &Route {
        &self.ctx.route
    }

    /// Serves until the session ends, then closes what is left.
    async fn serve(&mut self, rx: &mut mpsc::Receiver<Command>) {
        // The proxy's shutdown, one future for the session's whole life: a
        // new one each turn would add and remove a waiter on a notifier all
        // sessions share, twice per message. It is polled last, only when
        // everything else waits, to register for the wake-up (each poll
        // takes the notifier's lock); each turn starts with an atomic load
        // instead, so a steady stream of commands cannot hide a shutdown.
        let mut shutdown = self.shutdown.clone();
        let stopping = shutdown.changed();
        tokio::pin!(stopping);
        let end = loop {
            let event = if !matches!(self.shutdown.has_changed(), Ok(false)) {
                Event::Shutdown
            } else {
                tokio::select! {
                    biased;
                    cmd = rx.recv() => Event::Command(cmd),
                    frame = next_frame(&mut self.upstream, &mut self.upstream_buffered) => Event::Upstream(frame),
                    () = poll_fn(|cx| self.ready.poll_take(cx, &mut self.woken)) => Event::Tabs,
                    result = redial(&mut self.outage, self.ctx) => Event::Redialed(Box::new(result)),
                    _ = self.keepalive.tick() => Event::Tick,
                    () = expire(&mut self.linger) => Event::Linger,
                    _ = &mut stopping => Event::Shutdown,
                }
            };
            let outcome = match event {
                Event::Shutdown => Err(End::Shutdown),
                // The registry holds a sender, so the channel cannot close
                // while the session is listed.
                Event::Command(None) => Err(End::Linger),
                Event::Command(Some(cmd)) => self.commands_batch(cmd, rx),
                Event::Upstream(Some(Ok(msg))) => {
                    self.upstream_alive.heard();
                    self.upstream_frame(msg);
                    match self.more_upstream_frames().await {
                        // The upstream comes first in the loop: tabs that
                        // are waiting are served in the same turn, so that a
                        // busy backend cannot starve them.
                        Ok(()) => self.serve_ready_tabs().await,
                        lost => lost,
                    }
                }
                Event::Upstream(Some(Err(e))) => self.lose(&e.to_string()),
                Event::Upstream(None) => self.lose("the backend closed the connection"),
                Event::Redialed(result) => match *result {
                    Ok((socket, protocol)) => {
                        self.restored(socket, protocol);
                        Ok(())
                    }
                    Err(e) => self.redial_failed(&e),
                },
                Event::Tabs => self.serve_tabs(),
                Event::Tick => self.tick(),
                Event::Linger => Err(End::Linger),
            };
            let outcome = outcome.and_then(|()| self.flush_tabs());
            self.publish();
            if let Err(end) = outcome {
                break end;
            }
            if let Err(why) = self.flush_upstream().await {
                if let Err(end) = self.lose(&why) {
                    break end;
                }
            }
        };
        self.finish(end).await;
    }

    /// Makes the session's state visible to the status page.
    fn publish(&mut self) {
        self.peak = self.peak.max(self.tabs.len());
        self.stats.tabs.store(self.tabs.len(), Ordering::Relaxed);
        self.stats
            .connected
            .store(self.upstream.is_some(), Ordering::Relaxed);
    }

    /// Handles `first` and whatever else is already waiting, so a burst of
    /// tab messages becomes one upstream flush.
    fn commands_batch(
        &mut self,
        first: Command,
        rx: &mut mpsc::Receiver<Command>,
    ) -> Result<(), End> {
        self.command(first)?;
        for _ in 1..BATCH {
            match rx.try_recv() {
                Ok(cmd) => self.command(cmd)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Closes what is left when the session ends.
    async fn finish(&mut self, end: End) {
        let (code, reason, label) = match end {
            End::Linger => {
                debug!("linger time passed with no tab; closing the upstream");
                (None, "", "")
            }
            End::LostIdle => (None, "", ""),
            End::Shutdown => (Some(1001), "going away", "shutdown"),
            End::BudgetSpent => (Some(1011), "upstream unavailable", "upstream_lost"),
            End::BufferFull => (Some(1013), "reconnect buffer full", "buffer_full"),
        };
        if let Some(code) = code {
            if !self.tabs.is_empty() {
                info!(
                    code,
                    tabs = self.tabs.len(),
                    "closing the session's tabs: {label}"
                );
            }
            for tab in self.member_ids() {
                self.ctx.metrics.tab_closed(label);
                self.close_tab(tab, code, reason);
            }
        }
        if self.upstream.is_some() {
            // Close events first (shutdown), then a clean close.
            let _ = self.flush_upstream().await;
            if let Some(mut up) = self.upstream.take() {
                let _ =
                    tokio::time::timeout(self.route().dial_timeout, up.close(normal_close())).await;
                self.ctx.metrics.upstream_down();
            }
        }
    }

    /// The member tabs in join order.
    fn member_ids(&self) -> Vec<TabId> {
        let mut ids: Vec<TabId> = self.tabs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The upstream is gone: start redialling, unless no tab needs it.
    fn lose(&mut self, why: &str) -> Result<(), End> {
        if self.upstream.take().is_none() {
            return Ok(());
        }
        self.ctx.metrics.upstream_down();
        self.to_upstream.clear();
        if self.tabs.is_empty() {
            debug!(reason = %why, "upstream lost while no tab was connected; ending the session");
            return Err(End::LostIdle);
        }
        warn!(reason = %why, tabs = self.tabs.len(), "upstream lost; redialling");
        let mut backoff = Backoff::new(self.route().reconnect);
        let Some(delay) = backoff.next_delay() else {
            return Err(End::BudgetSpent);
        };
        self.outage = Some(Box::new(Outage {
            backoff,
            wait: Box::pin(tokio::time::sleep(delay)),
            dialing: None,
            buffer: reconnect::Buffer::new(self.route().reconnect_buffer),
            params: self.dial.clone(),
        }));
        Ok(())
    }

    fn redial_failed(&mut self, e: &DialError) -> Result<(), End> {
        self.ctx.metrics.redial(e.label());
        let Some(outage) = self.outage.as_mut() else {
            return Ok(());
        };
        outage.dialing = None;
        match outage.backoff.next_delay() {
            Some(delay) => {
                info!(error = %e, attempt = outage.backoff.made() - 1, "redial failed");
                outage.wait.as_mut().reset(Instant::now() + delay);
                Ok(())
            }
            None => {
                warn!(error = %e, "redial failed; reconnect budget spent");
                Err(End::BudgetSpent)
            }
        }
    }

    /// The upstream is back: announce every connected tab again, in join
    /// order, then send what they sent meanwhile, in order.
    fn restored(&mut self, socket: UpstreamSocket, protocol: Option<HeaderValue>) {
        let Some(mut outage) = self.outage.take() else {
            return;
        };
        self.ctx.metrics.redial("ok");
        self.ctx.metrics.upstream_up();
        info!(after = outage.backoff.made(), "upstream re-established");
        if protocol != self.protocol {
            warn!(
                "the upstream chose a different subprotocol after the redial; tabs keep the first"
            );
        }
        self.upstream = Some(socket);
        // Bytes that followed the handshake may already be buffered.
        self.upstream_buffered = true;
        self.upstream_alive = Liveness::new();
        // A new connection greets anew; later tabs get this greeting.
        self.replay.clear();
        if self.route().envelope == Envelope::Json {
            for tab in self.member_ids() {
                let info = &self.tabs[&tab].info;
                let open = open_event(tab, info);
                self.to_upstream.push(Message::Text(open));
            }
        }
        let mut orphaned = 0;
        for (tab, msg, payload) in outage.buffer.drain() {
            if self.tabs.contains_key(&tab) {
                self.ctx.metrics.to_upstream(payload);
                self.to_upstream.push(msg);
            } else {
                orphaned += 1;
            }
        }
        if orphaned > 0 {
            // Their tabs left during the outage; the backend never saw them go.
            self.ctx.metrics.dropped("tab_left_during_outage", orphaned);
        }
    }

    /// Keepalive: every tab is pinged (or closed if it went silent); a
    /// silent upstream is lost, otherwise pinged. One timer per session,
    /// none per tab.
    fn tick(&mut self) -> Result<(), End> {
        let idle = self.route().idle_timeout;
        let mut silent = Vec::new();
        for (&tab, slot) in &mut self.tabs {
            let Some(conn) = slot.conn.as_mut() else {
                continue;
            };
            let waker = waker_ref(&slot.wake);
            let mut cx = Context::from_waker(&waker);
            match conn.tick(&mut cx, idle, &slot.outbox) {
                tab::Tick::Pinged => slot.mark_dirty(tab, &mut self.dirty),
                tab::Tick::Busy => {}
                tab::Tick::Silent => silent.push(tab),
            }
        }
        for tab in silent {
            self.ctx.metrics.tab_closed("idle");
            self.close_tab(tab, 1001, "idle timeout");
        }
        if self.upstream.is_none() {
            return Ok(());
        }
        if self.upstream_alive.silent_for(self.route().idle_timeout) {
            return self.lose("idle timeout: the upstream sent nothing, not even a pong");
        }
        self.to_upstream.push(Message::Ping(Bytes::new()));
        Ok(())
    }

    /// Handles the upstream frames tungstenite already holds, up to a
    /// batch, so that a burst from the backend reaches each tab as one write.
    async fn more_upstream_frames(&mut self) -> Result<(), End> {
        for _ in 1..BATCH {
            if !self.upstream_buffered {
                break;
            }
            let Some(up) = self.upstream.as_mut() else {
                break;
            };
            let buffered = &mut self.upstream_buffered;
            match poll_fn(|cx| Poll::Ready(up.poll_next(cx, buffered))).await {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(msg))) => {
                    self.upstream_alive.heard();
                    self.upstream_frame(msg);
                }
                Poll::Ready(Some(Err(e))) => return self.lose(&e.to_string()),
                Poll::Ready(None) => return self.lose("the backend closed the connection"),
            }
        }
        Ok(())
    }

    /// Writes what is pending to the upstream. A write that cannot finish
    /// within `idle_timeout` (the backend stopped reading) is a loss.
    async fn flush_upstream(&mut self) -> Result<(), String> {
        let Some(up) = self.upstream.as_mut() else {
            self.to_upstream.clear();
            return Ok(());
        };
        if self.to_upstream.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.to_upstream);
        let write = up.send_all(pending);
        tokio::pin!(write);
        // Nearly every write completes at once; only one that has to wait
        // pays for a timer.
        let written = match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => {
                Box::pin(tokio::time::timeout(self.ctx.route.idle_timeout, write)).await
            }
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the upstream stopped reading (write timed out)".into()),
        }
    }

    fn command(&mut self, cmd: Command) -> Result<(), End> {
        match cmd {
            Command::Join { info, reply } => self.join(*info, reply),
            Command::Attach(conn) => self.attach(conn),
            Command::Leave { tab, code } => {
                self.closed_early.remove(&tab);
                if self.tabs.get(&tab).is_some_and(|slot| slot.conn.is_none()) {
                    self.tabs.remove(&tab);
                    return self.removed(tab, code);
                }
            }
        }
        Ok(())
    }

    /// A member's connection arrives: the session serves it from now on,
    /// starting with what was queued for it and whatever it already sent.
    fn attach(&mut self, conn: Box<Tab>) {
        let id = conn.id();
        if let Some(slot) = self.tabs.get_mut(&id) {
            slot.conn = Some(*conn);
            ArcWake::wake_by_ref(&slot.wake);
        } else if let Some((outbox, frame)) = self.closed_early.remove(&id) {
            conn.finish(tab::End::Close(frame), outbox);
        } else {
            conn.finish(tab::going_away(), Outbox::default());
        }
    }

    /// Serves the tabs whose sockets woke the session, if any did.
    async fn serve_ready_tabs(&mut self) -> Result<(), End> {
        let woken = poll_fn(|cx| Poll::Ready(self.ready.poll_take(cx, &mut self.woken))).await;
        match woken {
            Poll::Ready(()) => self.serve_tabs(),
            Poll::Pending => Ok(()),
        }
    }

    /// Serves the tabs whose sockets woke the session (listed in `woken`).
    fn serve_tabs(&mut self) -> Result<(), End> {
        let mut woken = std::mem::take(&mut self.woken);
        let served = woken.iter().try_for_each(|&tab| self.serve_tab(tab));
        woken.clear();
        self.woken = woken;
        served
    }

    /// Writes what waits for one tab, then passes on what it sent (a burst
    /// at most; the tab is served again next turn if it has more).
    fn serve_tab(&mut self, id: TabId) -> Result<(), End> {
        let ctx = self.ctx;
        let Some(slot) = self.tabs.get_mut(&id) else {
            return Ok(());
        };
        slot.wake.queued.store(false, Ordering::Release);
        let Some(conn) = slot.conn.as_mut() else {
            return Ok(());
        };
        let waker = waker_ref(&slot.wake);
        let mut cx = Context::from_waker(&waker);
        let mut ended = match conn.poll_write(&mut cx, &mut slot.outbox) {
            Poll::Ready(Err(end)) => Some(end),
            _ => None,
        };
        if ended.is_none() {
            for n in 0..=TAB_BURST {
                if n == TAB_BURST {
                    // Fair to the other tabs: come back next turn.
                    ArcWake::wake_by_ref(&slot.wake);
                    break;
                }
                match conn.poll_message(&mut cx, &ctx.route, &ctx.metrics) {
                    Poll::Pending => break,
                    Poll::Ready(Ok((msg, payload))) => {
                        pass_on(
                            ctx,
                            &mut self.outage,
                            &mut self.to_upstream,
                            id,
                            msg,
                            payload,
                        )?;
                    }
                    Poll::Ready(Err(end)) => {
                        ended = Some(end);
                        break;
                    }
                }
            }
        }
        // After its messages, the close event of a tab that ended.
        match ended {
            Some(end) => self.tab_ended(id, end),
            None => Ok(()),
        }
    }

    /// Flushes the tabs written to this turn.
    fn flush_tabs(&mut self) -> Result<(), End> {
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut flushed = Ok(());
        for &id in &dirty {
            let Some(slot) = self.tabs.get_mut(&id) else {
                continue;
            };
            slot.dirty = false;
            let Some(conn) = slot.conn.as_mut() else {
                continue;
            };
            let waker = waker_ref(&slot.wake);
            let mut cx = Context::from_waker(&waker);
            // Pending: the socket is full, and wakes the tab when it drains.
            if let Poll::Ready(Err(end)) = conn.poll_write(&mut cx, &mut slot.outbox) {
                flushed = self.tab_ended(id, end);
                if flushed.is_err() {
                    break;
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
        flushed
    }

    /// A tab's connection ended from its side (or failed): it leaves, and
    /// its closing handshake goes on without the session.
    fn tab_ended(&mut self, tab: TabId, end: tab::End) -> Result<(), End> {
        let Some(slot) = self.tabs.remove(&tab) else {
            return Ok(());
        };
        let code = end.code();
        if let Some(conn) = slot.conn {
            conn.finish(end, Outbox::default());
        }
        self.removed(tab, code)
    }

    /// A tab that was a member is gone (with `code`).
    fn removed(&mut self, tab: TabId, code: u16) -> Result<(), End> {
        debug!(tab = %tab, code, "tab left");
        self.ctx.metrics.tab_left();
        self.left(tab, code);
        if self.tabs.is_empty() && self.outage.is_some() {
            debug!("the last tab left during an outage; ending the session");
            return Err(End::LostIdle);
        }
        Ok(())
    }

    /// The most messages a tab's outbox may hold.
    fn outbox_limit(&self) -> usize {
        self.route().tab_queue + self.replay.len()
    }

    fn join(&mut self, info: JoinInfo, reply: oneshot::Sender<Result<Joined, Refusal>>) {
        if self.tabs.len() >= self.route().max_tabs_per_session {
            let _ = reply.send(Err(Refusal::SessionFull));
            return;
        }
        let tab = TabId(self.next_tab);
        self.next_tab += 1;
        let joined = Joined {
            tab,
            protocol: self.protocol.clone(),
            link: TabLink {
                tab,
                tx: Some(self.commands.clone()),
            },
        };
        if reply.send(Ok(joined)).is_err() {
            // The tab's handshake was abandoned while it waited, so it never
            // joined: no open event. Dropping the returned `Joined` sends a
            // Leave for a tab that is not in the table, which is ignored.
            return;
        }
        // The greeting replay, ahead of everything else.
        let mut outbox = Outbox::default();
        for msg in &self.replay {
            outbox.push(msg.clone());
        }
        let wake = Arc::new(TabWake {
            tab,
            queued: AtomicBool::new(false),
            ready: self.ready.clone(),
        });
        // During an outage the open event goes out with the others once the
        // upstream is back.
        if self.upstream.is_some() && self.route().envelope == Envelope::Json {
            self.to_upstream.push(Message::Text(open_event(tab, &info)));
        }
        self.tabs.insert(
            tab,
            Box::new(TabSlot {
                conn: None,
                outbox,
                wake,
                dirty: false,
                info,
            }),
        );
        self.ctx.metrics.tab_joined();
        self.linger = None;
        debug!(tab = %tab, tabs = self.tabs.len(), "tab joined");
    }

    /// A tab is no longer a member: tell the backend (if it is there to
    /// hear it), and start lingering if it was the last.
    fn left(&mut self, tab: TabId, code: u16) {
        if self.upstream.is_some() && self.route().envelope == Envelope::Json {
            self.to_upstream
                .push(Message::Text(envelope::close_event(tab, code)));
        }
        if self.tabs.is_empty() {
            let deadline = Instant::now() + self.route().linger;
            self.linger = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
    }

    /// Closes a tab from tabmux's side with `code`: removes it, sends the
    /// close frame behind what it was already sent (or, if its outbox is
    /// full, at once), and reports the `close` event.
    fn close_tab(&mut self, tab: TabId, code: u16, reason: &str) {
        let limit = self.outbox_limit();
        let Some(mut slot) = self.tabs.remove(&tab) else {
            return;
        };
        self.ctx.metrics.tab_left();
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        if slot.outbox.len() >= limit {
            slot.outbox.clear();
        }
        match slot.conn {
            Some(conn) => conn.finish(tab::End::Close(frame), slot.outbox),
            None => {
                self.closed_early.insert(tab, (slot.outbox, frame));
            }
        }
        debug!(tab = %tab, code, reason, "tabmux closed the tab");
        self.left(tab, code);
    }

    /// Delivers one upstream message to `tabs` (None: every member),
    /// sharing its buffer, and counts the deliveries (and the savings they
    /// make). A tab whose queue is full is a slow consumer and is closed.
    ///
    /// A broadcast walks the tab table itself: no list of ids, no lookups.
    fn fan_out(&mut self, tabs: Option<Vec<TabId>>, msg: Message, len: usize) {
        let limit = self.outbox_limit();
        let mut delivered = 0;
        let mut slow = Vec::new();
        let dirty = &mut self.dirty;
        // Cloning the message clones a reference count, never the payload.
        let mut offer = |tab: TabId, slot: &mut TabSlot| {
            if slot.outbox.len() >= limit {
                slow.push(tab);
                return;
            }
            delivered += 1;
            let Some(conn) = slot.conn.as_mut() else {
                slot.outbox.push(msg.clone());
                return;
            };
            let waker = waker_ref(&slot.wake);
            let mut cx = Context::from_waker(&waker);
            conn.send(&mut cx, msg.clone(), &mut slot.outbox);
            slot.mark_dirty(tab, dirty);
        };
        match &tabs {
            None => {
                for (&tab, slot) in &mut self.tabs {
                    offer(tab, slot);
                }
            }
            Some(ids) => {
                for &tab in ids {
                    if let Some(slot) = self.tabs.get_mut(&tab) {
                        offer(tab, slot);
                    }
                }
            }
        }
        for tab in slow {
            self.ctx.metrics.tab_closed("slow_consumer");
            info!(tab = %tab, "slow consumer: tab queue full");
            self.close_tab(tab, 1008, "slow consumer");
        }
        self.ctx.metrics.delivered(delivered, len, tabs.is_none());
    }

    fn upstream_frame(&mut self, msg: Message) {
        let data = matches!(msg, Message::Text(_) | Message::Binary(_));
        if !data {
            // Ping/pong are answered by tungstenite; a close frame ends the
            // stream on the next read.
            return;
        }
        match self.route().envelope {
            Envelope::None => self.upstream_raw_frame(msg),
            Envelope::Json => match msg {
                Message::Text(text) => match envelope::decode(&text, self.route().payload) {
                    Ok(frame) => self.backend_frame(frame),
                    Err(e) => self.malformed(e),
                },
                _ => self.malformed(FrameError::Binary),
            },
        }
    }

    /// `envelope = "none"`: every frame to every tab, greeting kept for replay.
    fn upstream_raw_frame(&mut self, msg: Message) {
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        if len > self.route().max_message_size {
            let all = self.targets(Target::All);
            self.too_big(&all);
            return;
        }
        // Kept only once it is known to be deliverable: a later tab must
        // not be sent what no tab may receive.
        if self.replay.len() < self.route().replay_first {
            self.replay.push(msg.clone());
        }
        self.fan_out(None, msg, len);
    }

    fn backend_frame(&mut self, frame: BackendFrame) {
        match frame {
            BackendFrame::Deliver { to, body } => {
                let len = body.len();
                if len > self.route().max_message_size {
                    let ids = self.targets(to);
                    self.too_big(&ids);
                    return;
                }
                // One buffer for every tab.
                let msg = match body {
                    Body::Text(t) => Message::Text(t),
                    Body::Binary(b) => Message::Binary(b),
                };
                let ids = match to {
                    Target::All => None,
                    tabs => Some(self.targets(tabs)),
                };
                self.fan_out(ids, msg, len);
            }
            BackendFrame::Close { to, code, reason } => {
                for tab in self.targets(to) {
                    self.ctx.metrics.tab_closed("backend");
                    self.close_tab(tab, code, &reason);
                }
            }
        }
    }

    /// The member tabs a frame is for (the frame's own list, filtered in
    /// place). Ids of tabs that left (or never existed) are counted as
    /// unroutable.
    fn targets(&self, to: Target) -> Vec<TabId> {
        match to {
            Target::All => self.tabs.keys().copied().collect(),
            Target::Tabs { mut ids, foreign } => {
                let named = ids.len();
                ids.retain(|id| self.tabs.contains_key(id));
                let missing = (named - ids.len() + foreign) as u64;
                if missing > 0 {
                    self.ctx.metrics.dropped("unroutable", missing);
                    debug!(missing, "frame addressed to tabs that are not connected");
                }
                ids
            }
        }
    }

    fn too_big(&mut self, tabs: &[TabId]) {
        info!(
            tabs = tabs.len(),
            max = self.route().max_message_size,
            "upstream payload over max_message_size; closing its tabs with 1009"
        );
        for &tab in tabs {
            self.ctx.metrics.tab_closed("too_big");
            self.close_tab(tab, 1009, "message too big");
        }
    }

    fn malformed(&self, e: FrameError) {
        self.ctx.metrics.dropped(e.label(), 1);
        warn!(session = %self.key.name(), error = %e, "dropped a malformed frame from the backend");
    }
}

fn open_event(tab: TabId, info: &JoinInfo) -> tokio_tungstenite::tungstenite::Utf8Bytes {
    let headers: Vec<(&str, &str)> = info
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    envelope::open_event(tab, &info.query, &headers)
}

/// The next upstream frame, or never while the upstream is down. Reads only
/// when there may be something to read (see [`UpstreamSocket::poll_next`]):
/// most of the session's wake-ups are for its commands.
async fn next_frame(
    upstream: &mut Option<UpstreamSocket>,
    buffered: &mut bool,
) -> Option<Result<Message, WsError>> {
    match upstream {
        Some(up) => poll_fn(|cx| up.poll_next(cx, buffered)).await,
        None => std::future::pending().await,
    }
}

/// A tab sent a message: already wrapped in the envelope for `json` routes,
/// exactly as sent for `none` routes; `payload` is the size of what the tab
/// sent (what `reconnect_buffer` counts). It goes to the upstream, or into
/// the reconnect buffer during an outage. (A function of the session's
/// fields, not a method: the session is serving the tab's slot meanwhile.)
fn pass_on(
    ctx: &SessionContext,
    outage: &mut Option<Box<Outage>>,
    to_upstream: &mut Vec<Message>,
    tab: TabId,
    msg: Message,
    payload: usize,
) -> Result<(), End> {
    match outage {
        None => {
            ctx.metrics.to_upstream(payload);
            to_upstream.push(msg);
        }
        Some(outage) => {
            if outage.buffer.push(tab, msg, payload).is_err() {
                warn!(limit = ctx.route.reconnect_buffer, "reconnect buffer full");
                return Err(End::BufferFull);
            }
        }
    }
    Ok(())
}

/// Waits out the backoff, then dials; never completes outside an outage.
/// Cancel-safe: the wait and the dial live in `outage`, not in this future.
async fn redial(outage: &mut Option<Box<Outage>>, ctx: &SessionContext) -> DialResult {
    let Some(outage) = outage.as_mut() else {
        return std::future::pending().await;
    };
    if outage.dialing.is_none() {
        outage.wait.as_mut().await;
        let route = ctx.route.clone();
        let params = outage.params.clone();
        outage.dialing = Some(Box::pin(
            async move { upstream::dial(&route, &params).await },
        ));
    }
    match outage.dialing.as_mut() {
        Some(dial) => dial.await,
        None => std::future::pending().await,
    }
}

/// Completes when the linger timer (if armed) passes.
async fn expire(linger: &mut Option<Pin<Box<Sleep>>>) {
    match linger.as_mut() {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// The close frame tabmux ends an upstream with.
fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open tab costs one of these (boxed; the tab's connection is
    /// inside it), so it is a headline memory figure: keep it in check.
    #[test]
    fn a_tab_slot_stays_small() {
        let size = std::mem::size_of::<TabSlot>();
        assert!(size <= 448, "a tab's slot is {size} bytes");
    }

    /// A session's task is allocated whole for the session's life: what is
    /// awaited only once (the dial) or rarely (an outage, a blocked write)
    /// is boxed, so that it does not reserve its space in every session.
    /// (Unboxed, the dial alone made the task 9.6 KiB.)
    #[test]
    fn a_session_task_stays_small() {
        let toml = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                    [[route]]\npath = \"/ws\"\nupstream = \"ws://127.0.0.1:9/\"\n\
                    allowed_origins = [\"http://a.test\"]\n";
        let config = crate::Config::from_toml(toml, "test", std::path::Path::new(".")).unwrap();
        let route = config.routes[0].clone();
        let (_stop, shutdown) = watch::channel(());
        let ctx = SessionContext {
            index: 0,
            metrics: Arc::new(crate::metrics::Metrics::default().route(&route.path)),
            route,
            registry: Arc::default(),
            shutdown,
        };
        let (tx, rx) = mpsc::channel(1);
        let stats = Arc::new(SessionStats {
            route: 0,
            tabs: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            started: std::time::Instant::now(),
        });
        let key = SessionHasher::new().direct();
        let task = run(ctx, key, 0, DialParams::default(), tx, rx, stats);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2560, "a session's task is {size} bytes");
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn session_names_are_16_hex_digits_and_keyed() {
        let a = SessionHasher::new();
        let name = a.shared(0, b"cookie", b"", b"").name();
        assert_eq!(name.len(), 16);
        assert!(name.bytes().all(|c| c.is_ascii_hexdigit()));
        // Same identity, same key: same name; another process key: another.
        assert_eq!(name, a.shared(0, b"cookie", b"", b"").name());
        assert_ne!(
            name,
            SessionHasher::new().shared(0, b"cookie", b"", b"").name()
        );
    }
}
