//! The session task's loop: one task owns the upstream socket, the tab
//! table and the tabs' sockets, and its envelope's state machine.
//!
//! Each turn waits for one event (a command from the join path, an upstream
//! frame, tabs whose sockets woke it, a redial's result, the keepalive tick,
//! the linger deadline, shutdown), hands frames to the envelope, carries out
//! the envelope's effects, then flushes every tab written to and the
//! upstream once. No lock is needed for routing: one task owns it all.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::key::SessionKey;
use super::link::{Command, Joined, TabLink};
use super::ready::TabWake;
use super::tabs::{members, Holders, Tabs};
use super::uplink::{next_frame, redial, DialResult, Uplink};
use super::{SessionContext, SessionEnd};
use crate::budget::Charge;
use crate::cause::{Cause, Closing, Lost, Refusal, Side};
use crate::envelope::{Effect, Effects, FrameError, JoinInfo, Machine, Saving, TabId, Target};
use crate::queue::Outbox;
use crate::rate::Verdict;
use crate::tab::Tab;
use crate::upstream::{DialError, UpstreamSocket};

mod edge;

/// Commands, or upstream frames, handled before the writes are flushed.
const BATCH: usize = 64;
/// Messages read from one tab before the session turns to the others.
const TAB_BURST: usize = 16;
/// Payload bytes read from one tab before the session turns to the others
/// (the work a message costs grows with its size: 16 messages of 1 MiB
/// would be a long turn for the tabs waiting behind it).
const TAB_BURST_BYTES: usize = 16 * 1024;
/// Payload bytes a session reads (from its tabs and its upstream) in one
/// turn before it lets the other tasks of its worker run: the tabs it did
/// not get to wait for its next turn, and it yields. One busy session then
/// delays another by about a turn of this size, however many tabs it has.
const TURN_BYTES: usize = 32 * 1024;

/// A tab past its rate is served again after `wait`, by a timer of its
/// own: its socket is not read meanwhile, so nothing else would wake it.
/// Only tabs past their rate pay for the task, about ten times a second.
#[cold]
#[inline(never)]
fn hold_back(wake: &Arc<TabWake>, wait: std::time::Duration) {
    let wake = wake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        wake.schedule();
    });
}

/// What the status page may read about a live session. Its task keeps it
/// current; readers only load.
pub struct SessionStats {
    /// The route's path.
    pub route: Arc<str>,
    pub tabs: AtomicUsize,
    /// Whether its upstream is up (false while dialling or redialling).
    pub connected: AtomicBool,
    pub started: std::time::Instant,
}

/// One turn of the session loop.
enum Event {
    Shutdown,
    Command(Option<Command>),
    Upstream(Option<Result<Message, WsError>>),
    /// Boxed: a socket is large, and redials are rare.
    Redialed(Box<DialResult>),
    /// Tabs woke the session (listed in `Tabs::woken`).
    Tabs,
    Tick,
    /// The envelope's deadline came.
    Deadline,
    Linger,
}

/// The state a session task owns.
pub(super) struct Session<'c> {
    ctx: &'c SessionContext,
    key: SessionKey,
    /// What the route's envelope makes of frames.
    envelope: Machine,
    tabs: Tabs,
    /// The upstream half: its socket, what waits to be written, the
    /// outage.
    uplink: Uplink,
    /// A sender to this session's own command channel, cloned into each
    /// tab's [`TabLink`].
    commands: mpsc::Sender<Command>,
    /// Completes (with an error, its sender being dropped) when the proxy
    /// shuts down.
    shutdown: watch::Receiver<()>,
    /// Armed while the session has no tabs.
    linger: Option<Pin<Box<Sleep>>>,
    /// The envelope's own timer, set to its next deadline (a Pusher
    /// channel's linger, the upstream's keepalive); None once it fired.
    deadline: Option<Pin<Box<Sleep>>>,
    /// What the session itself holds of the buffer budget.
    charge: Charge,
    /// The proxy is shutting down and this session waits for its turn to
    /// close its tabs (`server.drain_spread`; the linger timer holds it).
    draining: bool,
    /// How long the session outlives its last tab: the route's `linger`,
    /// or none for a session of its own (`missing_cookie = "direct"`).
    pub(super) linger_for: Duration,
    /// Pings the upstream and checks it is alive, every `ping_interval`.
    keepalive: Interval,
    /// Why the tabs are closed when the envelope does not redial a lost
    /// upstream (boxed: set once, at the end).
    gone: Option<Box<Cause>>,
    /// What the envelope decided in its last call, carried out in order
    /// once the call has returned ([`Session::apply_effects`]); empty
    /// between calls, and kept for its capacity.
    effects: Effects,
    /// Published for the status page after every turn of the loop.
    stats: Arc<SessionStats>,
    /// The most tabs this session had at once.
    peak: usize,
    /// Payload bytes read this turn (see [`TURN_BYTES`]).
    turn_bytes: usize,
}

mod upstream;

/// Completes when the timer (if armed) passes.
async fn expire(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer.as_mut() {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

impl<'c> Session<'c> {
    pub(super) fn new(
        ctx: &'c SessionContext,
        key: SessionKey,
        uplink: Uplink,
        commands: mpsc::Sender<Command>,
        stats: Arc<SessionStats>,
    ) -> Self {
        let period = ctx.route.ping_interval;
        let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Session {
            ctx,
            key,
            envelope: Machine::new(&ctx.route, uplink.protocol.as_ref()),
            tabs: Tabs::new(Holders {
                budget: ctx.budget.clone(),
                commands: commands.clone(),
            }),
            uplink,
            commands,
            shutdown: ctx.shutdown.clone(),
            linger: None,
            deadline: None,
            linger_for: ctx.route.linger,
            charge: Charge::default(),
            draining: false,
            keepalive,
            gone: None,
            effects: Effects::new(),
            stats,
            peak: 0,
            turn_bytes: 0,
        }
    }

    /// Serves until the session ends, then closes what is left. Returns the
    /// most tabs the session had at once, and whether it ended by losing
    /// its upstream without redialling it.
    pub(super) async fn serve(&mut self, rx: &mut mpsc::Receiver<Command>) -> (usize, bool) {
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
            let event = if !self.draining && !matches!(self.shutdown.has_changed(), Ok(false)) {
                Event::Shutdown
            } else {
                tokio::select! {
                    biased;
                    cmd = rx.recv() => Event::Command(cmd),
                    frame = next_frame(&mut self.uplink.socket, &mut self.uplink.buffered) => Event::Upstream(frame),
                    () = poll_fn(|cx| self.tabs.ready.poll_take(cx, &mut self.tabs.woken)) => Event::Tabs,
                    result = redial(&mut self.uplink.outage, self.ctx) => Event::Redialed(Box::new(result)),
                    _ = self.keepalive.tick() => Event::Tick,
                    () = expire(&mut self.deadline), if self.deadline.is_some() => Event::Deadline,
                    () = expire(&mut self.linger) => Event::Linger,
                    _ = &mut stopping, if !self.draining => Event::Shutdown,
                }
            };
            let outcome = match event {
                Event::Shutdown => self.begin_shutdown(),
                // The registry holds a sender, so the channel cannot close
                // while the session is listed.
                Event::Command(None) => Err(SessionEnd::Linger),
                Event::Command(Some(cmd)) => self.commands_batch(cmd, rx),
                Event::Upstream(Some(Ok(msg))) => {
                    self.uplink.alive.heard();
                    let more = match self.upstream_frame(msg) {
                        Ok(()) => self.more_upstream_frames().await,
                        ended => ended,
                    };
                    match more {
                        // The upstream comes first in the loop: tabs that
                        // are waiting are served in the same turn, so that a
                        // busy backend cannot starve them.
                        Ok(()) => self.serve_ready_tabs().await,
                        lost => lost,
                    }
                }
                Event::Upstream(Some(Err(e))) => self.lose(Lost::Failed(e)),
                Event::Upstream(None) => self.lose_closed(),
                Event::Redialed(result) => match *result {
                    Ok((socket, protocol)) => {
                        self.restored(socket, protocol);
                        Ok(())
                    }
                    Err(e) => self.redial_failed(&e),
                },
                Event::Tabs => self.serve_tabs(),
                Event::Tick => self.tick(),
                Event::Deadline => self.on_deadline(),
                // While draining, the linger timer is the session's turn.
                Event::Linger if self.draining => Err(SessionEnd::Shutdown),
                Event::Linger => Err(SessionEnd::Linger),
            };
            let outcome = outcome.and_then(|()| self.flush_tabs());
            // The reconnect buffer: only during an outage (and once after);
            // an envelope's state (`pusher`, `graphql`), every turn.
            let outcome = if self.uplink.outage.is_some()
                || self.charge.bytes() != 0
                || self.envelope.keeps_state()
            {
                outcome.and_then(|()| self.account(0))
            } else {
                outcome
            };
            self.publish();
            if let Err(end) = outcome {
                break end;
            }
            let flushed = self
                .uplink
                .flush(
                    self.ctx.route.idle_timeout,
                    &self.tabs.holders,
                    &mut self.charge,
                )
                .await;
            if let Err(lost) = flushed {
                if let Err(end) = self.lose(lost) {
                    break end;
                }
            }
            self.rearm_deadline();
            // A full turn: the worker's other tasks (other sessions, and
            // this session's own tabs put back) come first.
            if std::mem::take(&mut self.turn_bytes) >= TURN_BYTES {
                tokio::task::yield_now().await;
            }
        };
        self.finish(end).await;
        self.tabs.holders.budget.release(&mut self.charge);
        (self.peak, end == SessionEnd::UpstreamGone)
    }

    /// Makes the session's state visible to the status page.
    fn publish(&mut self) {
        self.peak = self.peak.max(self.tabs.len());
        self.stats.tabs.store(self.tabs.len(), Ordering::Relaxed);
        self.stats
            .connected
            .store(self.uplink.is_up(), Ordering::Relaxed);
    }

    /// Handles `first` and whatever else is already waiting, so a burst of
    /// commands becomes one upstream flush.
    fn commands_batch(
        &mut self,
        first: Command,
        rx: &mut mpsc::Receiver<Command>,
    ) -> Result<(), SessionEnd> {
        self.command(first)?;
        for _ in 1..BATCH {
            match rx.try_recv() {
                Ok(cmd) => self.command(cmd)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn command(&mut self, cmd: Command) -> Result<(), SessionEnd> {
        match cmd {
            Command::Join {
                info,
                init,
                reply,
                max_tabs,
            } => {
                self.join(*info, init.map(|m| *m), reply, max_tabs);
                Ok(())
            }
            Command::Attach(conn) => {
                self.attach(conn);
                Ok(())
            }
            Command::Evict(holder) => self.evict(holder),
            Command::Leave(tab) => {
                // The handshake of a tab tabmux closed early did not
                // complete either: nothing is kept for it.
                self.tabs.closed_early.remove(&tab);
                // A member whose connection never came leaves as vanished
                // (one whose connection came has handed its link over).
                let waiting = self.tabs.map.get(&tab).is_some_and(|s| s.conn.is_none());
                if waiting {
                    return self.leave(tab, Cause::TabVanished);
                }
                Ok(())
            }
        }
    }

    /// Closes what is left when the session ends.
    async fn finish(&mut self, end: SessionEnd) {
        if end == SessionEnd::Linger {
            debug!("linger time passed with no tab; closing the upstream");
        }
        if let Some(cause) = end.tab_cause().or_else(|| self.gone.take().map(|c| *c)) {
            if !self.tabs.is_empty() {
                info!(tabs = self.tabs.len(), cause = %cause, "closing the session's tabs");
            }
            for tab in self.tabs.ids() {
                // The session ends anyway.
                let _ = self.leave(tab, cause.clone());
            }
        }
        // Close events first (shutdown), then a clean close. Boxed: it runs
        // once, at the end, and would otherwise reserve its space in every
        // session's task.
        Box::pin(
            self.uplink
                .close(self.ctx, &self.tabs.holders, &mut self.charge),
        )
        .await;
    }

    // ---- tabs joining, sending, leaving

    fn join(
        &mut self,
        info: JoinInfo,
        init: Option<Message>,
        reply: oneshot::Sender<Result<Joined, Refusal>>,
        max_tabs: usize,
    ) {
        if self.draining {
            let _ = reply.send(Err(Refusal::Gone));
            return;
        }
        if self.tabs.len() >= max_tabs {
            let _ = reply.send(Err(Refusal::SessionFull));
            return;
        }
        // The slot first (a greeting is queued in it), its details after
        // the envelope has read them.
        let tab = self.tabs.add(JoinInfo::default(), &self.ctx.tab_rate);
        let joined = Joined {
            tab,
            protocol: self.uplink.protocol.clone(),
            link: TabLink::new(tab, self.commands.clone()),
        };
        if reply.send(Ok(joined)).is_err() {
            // The tab's handshake was abandoned while it waited, so it never
            // joined: no open event. Dropping the returned `Joined` sends a
            // Leave, which finds no tab waiting for its connection.
            self.tabs.map.remove(&tab);
            return;
        }
        self.ctx.metrics.tab_joined();
        self.linger = None;
        self.envelope.tab_joined(tab, &info, &mut self.effects);
        if let Some(init) = init {
            self.envelope
                .tab_placed(tab, init, Instant::now().into_std(), &mut self.effects);
        }
        // Only a forward can fail, and joining forwards nothing.
        let _ = self.apply_effects();
        if let Some(slot) = self.tabs.map.get_mut(&tab) {
            slot.info = info;
        }
        self.tabs.greeting = self.envelope.greeting_len();
        debug!(tab = %tab, tabs = self.tabs.len(), "tab joined");
    }

    /// A member's connection arrives: the session serves it from now on,
    /// starting with what was queued for it and whatever it already sent.
    fn attach(&mut self, conn: Box<Tab>) {
        let id = conn.id();
        if let Some(slot) = self.tabs.map.get_mut(&id) {
            slot.conn = Some(*conn);
            slot.wake.schedule();
        } else if let Some((outbox, cause)) = self.tabs.closed_early.remove(&id) {
            conn.finish(cause, outbox, None);
        } else {
            conn.finish(Cause::Shutdown, Outbox::default(), None);
        }
    }

    /// Serves the tabs whose sockets woke the session, if any did.
    async fn serve_ready_tabs(&mut self) -> Result<(), SessionEnd> {
        let tabs = &mut self.tabs;
        let woken = poll_fn(|cx| Poll::Ready(tabs.ready.poll_take(cx, &mut tabs.woken))).await;
        match woken {
            Poll::Ready(()) => self.serve_tabs(),
            Poll::Pending => Ok(()),
        }
    }

    /// Serves the tabs whose sockets woke the session (listed in `woken`),
    /// until the turn has read [`TURN_BYTES`]: the others are listed again,
    /// for the next turn.
    fn serve_tabs(&mut self) -> Result<(), SessionEnd> {
        let mut woken = std::mem::take(&mut self.tabs.woken);
        let mut served = Ok(());
        for (n, &tab) in woken.iter().enumerate() {
            if self.turn_bytes >= TURN_BYTES {
                self.tabs.ready.put_back(&woken[n..]);
                break;
            }
            served = self.serve_tab(tab);
            if served.is_err() {
                break;
            }
        }
        woken.clear();
        self.tabs.woken = woken;
        served
    }

    /// Writes what waits for one tab, then hands what it sent to the
    /// envelope, and on to the upstream (a burst at most, in messages and
    /// bytes; the tab is served again next turn if it has more), as far as
    /// its rate allows (`server.tab_rate`: beyond, it is not read from
    /// until it is back under, and its socket holds what it sends).
    fn serve_tab(&mut self, id: TabId) -> Result<(), SessionEnd> {
        let epoch = self.tabs.epoch();
        let now = || super::tabs::ms_since(epoch);
        let Some(slot) = self.tabs.map.get_mut(&id) else {
            return Ok(());
        };
        slot.wake.served();
        let rate = &self.ctx.tab_rate;
        let idle = self.ctx.route.idle_timeout;
        let (envelope, effects) = (&mut self.envelope, &mut self.effects);
        // The time, for an envelope that asks (not read otherwise).
        let clock = || Instant::now().into_std();
        let mut bucket = slot.rate;
        let mut held = None;
        let turn_bytes = &mut self.turn_bytes;
        let served = slot.drive(|conn, cx, outbox| {
            if let Poll::Ready(Err(cause)) = conn.poll_write(cx, outbox) {
                return Some(cause);
            }
            match bucket.check(rate, conn.pool(), now, idle) {
                Verdict::Read => {}
                Verdict::Hold(wait) => {
                    held = Some(wait);
                    return None;
                }
                Verdict::Close => return Some(Cause::RateLimit),
            }
            let mut bytes = 0;
            for _ in 0..TAB_BURST {
                // What was read counts, whole messages or part of one.
                let mut fed = 0;
                let polled = conn.poll_message(cx, &mut fed);
                bytes += fed;
                *turn_bytes += fed;
                match polled {
                    Poll::Pending => {
                        // Part of a message counts as it is read.
                        if fed != 0 {
                            bucket.charge(0, fed);
                            conn.pool().charge(0, fed);
                        }
                        // Nothing more waits (not a read that stopped at its
                        // cap): the tab is within its rate again.
                        if !conn.more_to_read() {
                            bucket.drained();
                        }
                        return None;
                    }
                    Poll::Ready(Ok(msg)) => {
                        bucket.charge(1, fed);
                        conn.pool().charge(1, fed);
                        if let Err(cause) = envelope.tab_sent(id, msg, clock, effects) {
                            return Some(cause);
                        }
                        // An MQTT message may hold several packets: each
                        // counts as a message of `tab_rate`.
                        let extra = envelope.extra_messages();
                        if extra != 0 {
                            bucket.charge(extra, 0);
                            conn.pool().charge(extra, 0);
                        }
                        // Out of its rate (or its address's), or its share
                        // of this turn: the next look decides (now, or once
                        // it is back under).
                        if bytes >= TAB_BURST_BYTES
                            || bucket.check(rate, conn.pool(), now, idle) != Verdict::Read
                        {
                            break;
                        }
                    }
                    Poll::Ready(Err(cause)) => return Some(cause),
                }
            }
            // Fair to the other tabs: come back next turn (the context's
            // waker is the tab's).
            cx.waker().wake_by_ref();
            None
        });
        if let Some(wait) = held {
            hold_back(&slot.wake, wait);
        }
        slot.rate = bucket;
        // What it holds now (part of a message, say), for the budget.
        if self.tabs.holders.account(id, slot) {
            self.tabs.leaving.push((id, Cause::MemoryBudget));
        }
        // What its messages decided, now that its slot is free; then the
        // close event of a tab that ended.
        self.apply_effects()?;
        match served {
            Some(Some(cause)) => self.leave(id, cause),
            Some(None) | None => self.leave_listed(),
        }
    }

    /// Carries out, in order, the effects the envelope pushed in its last
    /// calls: the one way they are applied, always once the call has
    /// returned. Only a forward can end the session (the reconnect buffer
    /// is full); the effects after it are then moot. One function for every
    /// caller (the tabs' path and the upstream's share its code: the hot
    /// code's size is measured, BENCHMARKS.md), with the common case, one
    /// effect (a `json` route's forward or delivery), first.
    #[inline(never)]
    fn apply_effects(&mut self) -> Result<(), SessionEnd> {
        if self.effects.len() > 1 {
            return self.apply_several();
        }
        match self.effects.pop() {
            Some(effect) => self.apply().effect(effect),
            None => Ok(()),
        }
    }

    #[inline(never)]
    fn apply_several(&mut self) -> Result<(), SessionEnd> {
        let mut effects = std::mem::take(&mut self.effects);
        let mut apply = self.apply();
        let applied = effects
            .drain(..)
            .try_for_each(|effect| apply.effect(effect));
        effects.clear();
        self.effects = effects;
        applied
    }

    /// What applies effects: the session's tabs and upstream half.
    #[inline]
    fn apply(&mut self) -> Apply<'_> {
        Apply {
            tabs: &mut self.tabs,
            uplink: &mut self.uplink,
            ctx: self.ctx,
            key: self.key,
        }
    }

    /// Flushes the tabs written to this turn; a tab whose connection broke
    /// leaves.
    fn flush_tabs(&mut self) -> Result<(), SessionEnd> {
        self.tabs.flush();
        self.leave_listed()
    }

    /// `tab` leaves the session for `cause` (and so do the tabs listed
    /// meanwhile).
    fn leave(&mut self, tab: TabId, cause: Cause) -> Result<(), SessionEnd> {
        self.tabs.leaving.push((tab, cause));
        self.leave_listed()
    }

    /// The tabs listed in `Tabs::leaving` (by effects, flushes, ticks, or
    /// [`Session::leave`]) leave, in the order listed: the one way out for a
    /// tab, whoever ended it. Its connection ends (see [`Tabs::remove`]),
    /// tabmux's closes are counted by cause, the envelope hears of it, and
    /// the session lingers once the last has left. A loop, not recursion:
    /// what the envelope decides on hearing of one is listed behind it.
    ///
    /// Called after every frame, and nearly always with nothing listed: the
    /// check is inline, the work out of line, so that the hot path keeps
    /// only the check (the hot code's size is measured, BENCHMARKS.md).
    #[inline]
    fn leave_listed(&mut self) -> Result<(), SessionEnd> {
        if self.tabs.leaving.is_empty() {
            return Ok(());
        }
        self.leave_listed_now()
    }

    #[cold]
    #[inline(never)]
    fn leave_listed_now(&mut self) -> Result<(), SessionEnd> {
        while !self.tabs.leaving.is_empty() {
            for (tab, cause) in std::mem::take(&mut self.tabs.leaving) {
                if !self.tabs.remove(tab, &cause, self.ctx.route.tab_queue) {
                    continue;
                }
                let row = cause.row();
                debug!(tab = %tab, code = row.code, cause = %cause, "tab left");
                if row.side != Side::Tab {
                    self.ctx.metrics.tab_closed(row.label);
                }
                self.ctx.metrics.tab_left();
                let now = Instant::now().into_std();
                self.envelope
                    .tab_left(tab, row.code, now, &mut self.effects);
                self.apply_effects()?;
                if self.tabs.is_empty() {
                    if self.draining {
                        return Err(SessionEnd::Shutdown);
                    }
                    if self.uplink.outage.is_some() {
                        debug!("the last tab left during an outage; ending the session");
                        return Err(SessionEnd::LostIdle);
                    }
                    let deadline = Instant::now() + self.linger_for;
                    self.linger = Some(Box::pin(tokio::time::sleep_until(deadline)));
                }
            }
        }
        Ok(())
    }
}

/// Carries out an envelope's effects on the session's tabs and upstream
/// queue (or its reconnect buffer, while the upstream is down). Tabs to
/// close are only listed: the session leaves them once the effects are
/// applied, telling the envelope of each.
struct Apply<'a> {
    pub tabs: &'a mut Tabs,
    pub uplink: &'a mut Uplink,
    pub ctx: &'a SessionContext,
    pub key: SessionKey,
}

impl Apply<'_> {
    /// One effect. Only a forward can end the session (its reconnect
    /// buffer is full).
    #[inline]
    pub fn effect(&mut self, effect: Effect) -> Result<(), SessionEnd> {
        match effect {
            Effect::Forward(tab, forward) => return self.uplink.forward(self.ctx, tab, forward),
            Effect::Deliver { to, msg, len } => self.tabs.deliver(to, msg, len, self.ctx),
            rare => return self.rare(rare),
        }
        Ok(())
    }

    // The rare effects, out of line: the hot paths are a forward and a
    // delivery.
    #[cold]
    #[inline(never)]
    fn rare(&mut self, effect: Effect) -> Result<(), SessionEnd> {
        match effect {
            Effect::Upstream(msg) => {
                // Sent unless the upstream is down (then dropped at the
                // flush: an envelope sends its own again once restored).
                if self.uplink.is_up() {
                    self.ctx.metrics.to_upstream(msg.len());
                }
                self.uplink.queue.push(msg)
            }
            Effect::Refused(reason) => self.ctx.metrics.edge_refused(reason),
            Effect::Answer { tab, msg } => self.tabs.answer(tab, msg),
            Effect::Close { to, cause } => self.close(to, cause),
            Effect::Malformed(e) => self.malformed(e),
            Effect::Avoided(saving) => self.avoided(saving),
            // The common ones, taken inline by `effect`.
            Effect::Forward(tab, forward) => return self.uplink.forward(self.ctx, tab, forward),
            Effect::Deliver { to, msg, len } => self.tabs.deliver(to, msg, len, self.ctx),
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn close(&mut self, to: Target, cause: Cause) {
        let tabs = members(&self.tabs.map, to, &self.ctx.metrics);
        if cause.row().side == Side::Proxy {
            info!(tabs = tabs.len(), cause = %cause, "closing tabs");
        }
        let leaving = tabs.into_iter().map(|tab| (tab, cause.clone()));
        self.tabs.leaving.extend(leaving);
    }

    #[cold]
    #[inline(never)]
    fn avoided(&mut self, saving: Saving) {
        let m = &self.ctx.metrics;
        let (counter, n) = match saving {
            Saving::Subscription => (&m.subscriptions_avoided, 1),
            Saving::Ping => (&m.pings_avoided, 1),
            Saving::Deliveries(n) => (&m.messages_avoided, u64::from(n)),
            Saving::Connection => (&m.connects_avoided, 1),
        };
        counter.inc_by(n);
    }

    #[cold]
    #[inline(never)]
    fn malformed(&mut self, e: FrameError) {
        self.ctx.metrics.dropped(e.label(), 1);
        warn!(session = %self.key.name(), error = %e, "dropped a malformed frame from the backend");
    }
}
