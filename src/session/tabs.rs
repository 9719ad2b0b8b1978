//! A session's tab table: its members' slots, and writing to them without
//! ever waiting (the session's `actor` applies its envelope's effects
//! through it).
//!
//! A session writes to a tab straight into the tab's WebSocket buffer while
//! its socket has room (one flush per tab per turn), else into the tab's
//! outbox, bounded by `tab_queue`: a tab that stops reading never holds up
//! the upstream or another tab, and is closed as a slow consumer.

use std::sync::Arc;
use std::task::{Context, Poll};

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use super::link::{Command, Holder};
use super::ready::{Ready, TabWake};
use super::SessionContext;
use crate::budget::{Budget, Charge, Evictor, Verdict};
use crate::cause::{Cause, Side};
use crate::config::TabRate;
use crate::envelope::{JoinInfo, TabId, Target};
use crate::metrics::RouteMetrics;
use crate::queue::Outbox;
use crate::rate::Bucket;
use crate::tab::{Tab, Tick};
use tokio::time::Instant;

/// One member tab, as its session sees it (boxed in the tab table, so
/// that the table's spare capacity costs a pointer per entry).
pub(super) struct TabSlot {
    /// Its connection; None until its handshake is answered.
    pub conn: Option<Tab>,
    /// What could not be written to it yet (at most `tab_queue` messages,
    /// plus its envelope's greeting).
    pub outbox: Outbox,
    /// Its waker: registered with its socket, it lists the tab in the
    /// session's `ready` set.
    pub wake: Arc<TabWake>,
    /// Written to since the last flush (and listed in `Tabs::dirty`).
    dirty: bool,
    /// Its query and headers, for its envelope (the `open` event sent again
    /// after a redial).
    pub info: JoinInfo,
    /// What it holds of the buffer budget, as last reported.
    charge: Charge,
    /// What it may still send (`server.tab_rate`).
    pub rate: Bucket,
}

impl TabSlot {
    /// Runs `f` on the tab's connection and outbox, with the tab's own
    /// waker: whatever `f` polls wakes the session for this tab. None while
    /// the connection has not been handed over.
    #[inline]
    pub fn drive<R>(
        &mut self,
        f: impl FnOnce(&mut Tab, &mut Context<'_>, &mut Outbox) -> R,
    ) -> Option<R> {
        let conn = self.conn.as_mut()?;
        let outbox = &mut self.outbox;
        Some(self.wake.with_context(|cx| f(conn, cx, outbox)))
    }

    /// Sends `msg` to the tab: into its socket's buffer while the socket
    /// has room, else into its outbox. Lists the tab (once) for the flush
    /// at the end of the turn.
    fn send(&mut self, tab: TabId, msg: Message, dirty: &mut Vec<TabId>) {
        let Some(conn) = self.conn.as_mut() else {
            self.outbox.push(msg);
            return;
        };
        let outbox = &mut self.outbox;
        self.wake.with_context(|cx| conn.send(cx, msg, outbox));
        self.mark_dirty(tab, dirty);
    }

    /// The tab was written to: list it (once) for the flush at the end of
    /// the turn.
    fn mark_dirty(&mut self, tab: TabId, dirty: &mut Vec<TabId>) {
        if !self.dirty {
            self.dirty = true;
            dirty.push(tab);
        }
    }
}

/// The buffer budget as a session's holders report to it, and the way to
/// close one of them (a command to the session itself).
pub(super) struct Holders {
    pub budget: Arc<Budget>,
    pub commands: mpsc::Sender<Command>,
}

impl Holders {
    /// How the budget closes `holder`: a command to this session, sent
    /// from whichever task found the budget spent.
    pub fn evictor(&self, holder: Holder) -> Evictor {
        let tx = self.commands.clone();
        Box::new(move || {
            if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(Command::Evict(holder)) {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
            }
        })
    }

    /// Reports what `slot` holds; true if the tab must close because the
    /// budget is spent and nothing bigger can be closed instead.
    #[inline]
    pub fn account(&self, tab: TabId, slot: &mut TabSlot) -> bool {
        let held = slot.outbox.bytes() + slot.conn.as_ref().map_or(0, Tab::held);
        let verdict = self
            .budget
            .set(&mut slot.charge, held, || self.evictor(Holder::Tab(tab)));
        verdict == Verdict::CloseSelf
    }
}

/// The tab table of a session, and what its turn decided about tabs.
pub(super) struct Tabs {
    /// Keyed by ids tabmux assigns, so a fast non-keyed hash is safe here.
    pub map: FxHashMap<TabId, Box<TabSlot>>,
    /// Tabs whose sockets woke the session, filled by their wakers.
    pub ready: Arc<Ready>,
    /// The tabs being served this turn (taken from `ready`).
    pub woken: Vec<TabId>,
    /// Tabs written to this turn, to flush at its end.
    dirty: Vec<TabId>,
    /// Tabs that tabmux closed before their connection was handed over:
    /// what they were sent, and why they were closed, for when it arrives.
    pub closed_early: FxHashMap<TabId, (Outbox, Cause)>,
    /// The last tab id given; ids are never reused on one upstream.
    last_id: u64,
    /// Messages a tab's outbox may hold beyond `tab_queue`: its envelope's
    /// greeting, sent ahead of everything else.
    pub greeting: usize,
    /// Tabs to leave, with why, once the effect or flush that decided it is
    /// done (the session tells the envelope of each).
    pub leaving: Vec<(TabId, Cause)>,
    /// The buffer budget, which every slot reports to.
    pub holders: Holders,
    /// The start of the session's clock for rates (see [`ms_since`]).
    epoch: Instant,
}

impl Drop for Tabs {
    /// However the session ends, its tabs' shares of the budget are given
    /// back.
    fn drop(&mut self) {
        for slot in self.map.values_mut() {
            self.holders.budget.release(&mut slot.charge);
        }
    }
}

impl Tabs {
    pub fn new(holders: Holders) -> Tabs {
        Tabs {
            epoch: Instant::now(),
            map: FxHashMap::default(),
            ready: Arc::default(),
            woken: Vec::new(),
            dirty: Vec::new(),
            closed_early: FxHashMap::default(),
            last_id: 0,
            greeting: 0,
            leaving: Vec::new(),
            holders,
        }
    }

    /// Number of member tabs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A new member, not yet connected (its handshake is being answered).
    pub fn add(&mut self, info: JoinInfo, rate: &TabRate) -> TabId {
        self.last_id += 1;
        let tab = TabId(self.last_id);
        let wake = TabWake::new(tab, self.ready.clone());
        self.map.insert(
            tab,
            Box::new(TabSlot {
                conn: None,
                outbox: Outbox::default(),
                wake,
                dirty: false,
                info,
                charge: Charge::default(),
                rate: Bucket::new(rate, ms_since(self.epoch)),
            }),
        );
        tab
    }

    /// The start of the session's clock for rates (see [`ms_since`]).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// The member tabs in join order.
    pub fn ids(&self) -> Vec<TabId> {
        let mut ids: Vec<TabId> = self.map.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The most messages a tab's outbox may hold.
    fn outbox_limit(&self, tab_queue: usize) -> usize {
        tab_queue + self.greeting
    }

    /// Delivers one message to `to`, sharing its buffer (cloning a message
    /// clones a reference count, never the payload), and counts the
    /// deliveries (and the savings they make). A tab whose queue is full is
    /// a slow consumer, and leaves.
    ///
    /// A broadcast walks the tab table itself: no list of ids, no lookups.
    /// Inlined into the session's one place that applies effects (the hot
    /// code's size is measured, BENCHMARKS.md).
    #[inline(always)]
    pub(super) fn deliver(&mut self, to: Target, msg: Message, len: usize, ctx: &SessionContext) {
        let limit = self.outbox_limit(ctx.route.tab_queue);
        let bytes_limit = ctx.route.tab_queue_bytes;
        let mut delivered = 0;
        let (dirty, leaving, holders) = (&mut self.dirty, &mut self.leaving, &self.holders);
        let mut offer = |tab: TabId, slot: &mut TabSlot| {
            if !slot.outbox.is_empty() && slow(tab, slot, limit, bytes_limit, msg.len()) {
                leaving.push((tab, Cause::SlowConsumer));
                return;
            }
            delivered += 1;
            slot.send(tab, msg.clone(), dirty);
            // Only a tab whose messages wait holds anything.
            if !slot.outbox.is_empty() && holders.account(tab, slot) {
                leaving.push((tab, Cause::MemoryBudget));
            }
        };
        let broadcast = to == Target::All;
        match to {
            Target::All => {
                for (&tab, slot) in &mut self.map {
                    offer(tab, slot);
                }
            }
            to => {
                for tab in members(&self.map, to, &ctx.metrics) {
                    if let Some(slot) = self.map.get_mut(&tab) {
                        offer(tab, slot);
                    }
                }
            }
        }
        ctx.metrics.delivered(delivered, len, broadcast);
    }

    /// Sends one tab a frame its envelope composed (a greeting).
    pub(super) fn answer(&mut self, tab: TabId, msg: Message) {
        if let Some(slot) = self.map.get_mut(&tab) {
            slot.send(tab, msg, &mut self.dirty);
        }
    }

    /// Keepalive: each tab is pinged, unless messages are waiting for it
    /// anyway; a tab silent for `idle` is listed to leave.
    pub fn tick(&mut self, idle: std::time::Duration) {
        for (&tab, slot) in &mut self.map {
            match slot.drive(|conn, cx, outbox| conn.tick(cx, idle, outbox)) {
                Some(Tick::Pinged) => slot.mark_dirty(tab, &mut self.dirty),
                Some(Tick::Silent) => self.leaving.push((tab, Cause::Idle)),
                Some(Tick::Busy) | None => {}
            }
        }
    }

    /// Flushes the tabs written to this turn. A tab whose connection broke
    /// is listed in `leaving`.
    pub fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &tab in &dirty {
            let Some(slot) = self.map.get_mut(&tab) else {
                continue;
            };
            slot.dirty = false;
            // Pending: the socket is full, and wakes the tab when it drains.
            if let Some(Poll::Ready(Err(cause))) =
                slot.drive(|conn, cx, outbox| conn.poll_write(cx, outbox))
            {
                self.leaving.push((tab, cause));
            } else if self.holders.account(tab, slot) {
                self.leaving.push((tab, Cause::MemoryBudget));
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Takes a tab out of the table and ends its connection for `cause`:
    /// a close frame from tabmux goes behind what the tab was already sent
    /// (or, if its outbox is full, at once); a close the tab started is
    /// completed; a vanished connection is dropped. False if the tab was
    /// not a member.
    pub fn remove(&mut self, tab: TabId, cause: &Cause, tab_queue: usize) -> bool {
        let limit = self.outbox_limit(tab_queue);
        let Some(slot) = self.map.remove(&tab) else {
            return false;
        };
        let TabSlot {
            conn,
            mut outbox,
            charge,
            ..
        } = *slot;
        // The share leaves with the connection, and is given back with its
        // buffers (at once if there is none).
        let held = self.holders.budget.hold(charge);
        // What waits for a tab that is not reading (or is gone) is dropped,
        // and its close frame goes at once.
        let unread = matches!(cause, Cause::SlowConsumer | Cause::MemoryBudget);
        if unread || outbox.len() >= limit || cause.row().side == Side::Tab {
            outbox.clear();
        }
        match conn {
            Some(conn) => conn.finish(cause.clone(), outbox, Some(held)),
            // The tab will be closed as soon as its connection arrives.
            None if cause.row().side != Side::Tab => {
                self.closed_early.insert(tab, (outbox, cause.clone()));
            }
            None => {}
        }
        true
    }
}

/// Milliseconds since `epoch`: the session's clock for rates (wraps after
/// 49 days; only differences are taken).
pub(super) fn ms_since(epoch: Instant) -> u32 {
    epoch.elapsed().as_millis() as u32
}

/// Whether a tab whose messages already wait has no room for `len` more
/// bytes: more than `tab_queue` messages, or more than `tab_queue_bytes`
/// bytes, would then wait for it.
#[cold]
#[inline(never)]
fn slow(tab: TabId, slot: &TabSlot, limit: usize, bytes_limit: usize, len: usize) -> bool {
    let full = slot.outbox.len() >= limit || slot.outbox.bytes() + len > bytes_limit;
    if full {
        info!(
            tab = %tab,
            messages = slot.outbox.len(),
            bytes = slot.outbox.bytes(),
            "slow consumer: tab queue full"
        );
    }
    full
}

/// The member tabs among `to`; ids of tabs that left (or never existed)
/// are counted as unroutable.
pub(super) fn members(
    map: &FxHashMap<TabId, Box<TabSlot>>,
    to: Target,
    metrics: &RouteMetrics,
) -> Vec<TabId> {
    match to {
        Target::All => map.keys().copied().collect(),
        Target::Tabs { mut ids, foreign } => {
            let named = ids.len();
            ids.retain(|id| map.contains_key(id));
            let missing = (named - ids.len() + foreign) as u64;
            if missing > 0 {
                unroutable(metrics, missing);
            }
            ids
        }
    }
}

#[cold]
#[inline(never)]
fn unroutable(metrics: &RouteMetrics, missing: u64) {
    metrics.dropped("unroutable", missing);
    debug!(missing, "frame addressed to tabs that are not connected");
}

/// The size of a tab's slot (a unit test keeps it in check).
#[cfg(test)]
pub(super) fn slot_size() -> usize {
    std::mem::size_of::<TabSlot>()
}
