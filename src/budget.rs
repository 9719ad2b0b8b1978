//! `server.buffer_budget`: one account of every message byte the process
//! holds for its clients (docs/protocol.md, "Limits").
//!
//! Holders report what they hold with [`Budget::set`]; a report that takes
//! the total past the budget closes the biggest holder (1013 "memory
//! budget") and the others go on. The holders:
//!
//! - **a tab**: its outbox (messages waiting for it), what tungstenite holds
//!   unwritten for it while its socket is full, and the message it is part
//!   way through sending (counted as its frames arrive, see
//!   [`crate::wsio::Partial`]);
//! - **a session**: its reconnect buffer, and the messages its upstream has
//!   not taken yet while the upstream's socket is full. When a session is
//!   the biggest holder, its tabs are closed (the bytes are theirs together).
//!
//! Bytes passing through (written to a socket in the same turn they were
//! read) are never held, so the hot path only compares a tab's holding
//! with its last report: no shared counter is touched per message.
//!
//! Finding the biggest holder: holders of at least [`BIG`] bytes are listed
//! by id with the way to close them; a small holder is never worth closing
//! while a big one exists. When none is listed (the budget is spent by very
//! many small holders) the holder whose report crossed the budget is closed.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap;

/// Holders of at least this many bytes are listed as eviction candidates.
pub const BIG: usize = 64 * 1024;

/// Closes a holder (sends its session the command to).
pub type Evictor = Box<dyn FnOnce() + Send>;

/// A listed holder.
struct Big {
    bytes: usize,
    /// None once it has been told to close.
    evict: Option<Evictor>,
}

/// The process's account.
pub struct Budget {
    held: AtomicUsize,
    /// The highest `held` since [`Budget::take_peak`] last reset it: kept
    /// at every report, so a burst that comes and goes between two looks of
    /// [`crate::memory`] is still seen.
    peak: AtomicUsize,
    limit: AtomicUsize,
    /// Bytes of holders told to close and not yet gone: they are not
    /// counted again when deciding whether another must close.
    evicting: AtomicUsize,
    big: Mutex<FxHashMap<u32, Big>>,
    next_id: AtomicU32,
}

/// One holder's share of the account. Not dropped on its own: its holder
/// reports 0 ([`Budget::release`]) when it ends.
#[derive(Debug, Default)]
pub struct Charge {
    bytes: u32,
    /// Its id in the list of big holders, or 0.
    id: u32,
}

impl Charge {
    /// The bytes last reported.
    pub fn bytes(&self) -> usize {
        self.bytes as usize
    }
}

/// What a report decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the budget (or another holder was told to close).
    Fine,
    /// Past the budget, and no bigger holder to close: the reporter closes.
    CloseSelf,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            evicting: AtomicUsize::new(0),
            big: Mutex::new(FxHashMap::default()),
            next_id: AtomicU32::new(1),
        })
    }

    /// Bytes held in the whole process.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The highest account since the last call, which starts the next
    /// period at the account as it is now.
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.held(), Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A reloaded `buffer_budget` (what is held already stays).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    fn list(&self) -> MutexGuard<'_, FxHashMap<u32, Big>> {
        self.big
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A holder now holds `bytes`. `evictor` makes the way to close it,
    /// asked for only when it becomes a big holder.
    #[inline]
    pub fn set(
        &self,
        charge: &mut Charge,
        bytes: usize,
        evictor: impl FnOnce() -> Evictor,
    ) -> Verdict {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        if bytes == charge.bytes {
            return Verdict::Fine;
        }
        self.set_slow(charge, bytes, evictor)
    }

    #[inline(never)]
    fn set_slow(
        &self,
        charge: &mut Charge,
        bytes: u32,
        evictor: impl FnOnce() -> Evictor,
    ) -> Verdict {
        let (old, new) = (charge.bytes as usize, bytes as usize);
        charge.bytes = bytes;
        let total = if new > old {
            let total = self.held.fetch_add(new - old, Ordering::AcqRel) + (new - old);
            self.peak.fetch_max(total, Ordering::Relaxed);
            total
        } else {
            self.held.fetch_sub(old - new, Ordering::AcqRel) - (old - new)
        };
        if new >= BIG || charge.id != 0 {
            let mut list = self.list();
            if charge.id == 0 {
                charge.id = self.next_id();
                let evict = Some(evictor());
                list.insert(charge.id, Big { bytes: new, evict });
            } else if new == 0 {
                if let Some(gone) = list.remove(&charge.id) {
                    if gone.evict.is_none() {
                        self.evicting.fetch_sub(gone.bytes, Ordering::AcqRel);
                    }
                }
                charge.id = 0;
            } else if let Some(entry) = list.get_mut(&charge.id) {
                if entry.evict.is_none() {
                    // Told to close already: its bytes stay set aside.
                    if new > entry.bytes {
                        self.evicting.fetch_add(new - entry.bytes, Ordering::AcqRel);
                    } else {
                        self.evicting.fetch_sub(entry.bytes - new, Ordering::AcqRel);
                    }
                }
                entry.bytes = new;
            }
        }
        if new > old && total > self.limit() {
            return self.over(charge.id);
        }
        Verdict::Fine
    }

    fn next_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// The account is past the budget: the biggest listed holder not yet
    /// told is told to close, unless the ones told already free enough.
    #[cold]
    fn over(&self, reporter: u32) -> Verdict {
        let mut list = self.list();
        let counted = self
            .held()
            .saturating_sub(self.evicting.load(Ordering::Acquire));
        if counted <= self.limit() {
            return Verdict::Fine;
        }
        let biggest = list
            .iter()
            .filter(|(_, b)| b.evict.is_some())
            .max_by_key(|(_, b)| b.bytes)
            .map(|(&id, _)| id);
        let Some(id) = biggest else {
            // Only small holders, or all told already: the reporter goes,
            // unless it is listed and told (it is going).
            let told = list.get(&reporter).is_some_and(|b| b.evict.is_none());
            return if told {
                Verdict::Fine
            } else {
                Verdict::CloseSelf
            };
        };
        let Some(entry) = list.get_mut(&id) else {
            return Verdict::Fine;
        };
        self.evicting.fetch_add(entry.bytes, Ordering::AcqRel);
        let evict = entry.evict.take();
        drop(list);
        if let Some(evict) = evict {
            evict();
        }
        Verdict::Fine
    }

    /// A holder ends: its share is given back.
    pub fn release(&self, charge: &mut Charge) {
        self.set(charge, 0, || Box::new(|| {}));
    }
}

/// A share that leaves its holder's table with it (a closing tab's
/// connection, whose buffers live until its close handshake is done): given
/// back when dropped.
pub struct Held {
    budget: Arc<Budget>,
    charge: Charge,
}

impl Budget {
    /// `charge`, to be given back when the returned value is dropped.
    pub fn hold(self: &Arc<Self>, charge: Charge) -> Held {
        Held {
            budget: self.clone(),
            charge,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.release(&mut self.charge);
    }
}

/// The bytes a buffer holding `n` bytes of one message takes, if it grew
/// by doubling as it was filled (tungstenite's read and write buffers do):
/// the budget counts what is allocated, not only what is used.
pub fn allocated(n: usize) -> usize {
    match n {
        0 => 0,
        n => n.checked_next_power_of_two().unwrap_or(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn flag() -> (Arc<AtomicBool>, impl FnOnce() -> Evictor) {
        let told = Arc::new(AtomicBool::new(false));
        let t = told.clone();
        (told, move || -> Evictor {
            Box::new(move || t.store(true, Ordering::SeqCst))
        })
    }

    #[test]
    fn the_biggest_holder_is_told_and_the_others_go_on() {
        let budget = Budget::new(1 << 20);
        let (mut a, mut b, mut c) = (Charge::default(), Charge::default(), Charge::default());
        let (a_told, a_ev) = flag();
        let (b_told, b_ev) = flag();
        assert_eq!(budget.set(&mut a, 600 << 10, a_ev), Verdict::Fine);
        assert_eq!(budget.set(&mut b, 300 << 10, b_ev), Verdict::Fine);
        assert_eq!(budget.held(), 900 << 10);
        // c's report crosses the budget: a, the biggest, is told.
        let (c_told, c_ev) = flag();
        assert_eq!(budget.set(&mut c, 200 << 10, c_ev), Verdict::Fine);
        assert!(a_told.load(Ordering::SeqCst));
        assert!(!b_told.load(Ordering::SeqCst) && !c_told.load(Ordering::SeqCst));
        // While a is going, its bytes are set aside: c grows within what is left.
        assert_eq!(
            budget.set(&mut c, 250 << 10, || Box::new(|| {})),
            Verdict::Fine
        );
        assert!(!b_told.load(Ordering::SeqCst));
        // a gone: everything it held is given back.
        budget.release(&mut a);
        assert_eq!(budget.held(), 550 << 10);
        assert_eq!(budget.evicting.load(Ordering::SeqCst), 0);
        assert!(budget.list().len() == 2);
        budget.release(&mut b);
        budget.release(&mut c);
        assert_eq!(budget.held(), 0);
        assert!(budget.list().is_empty());
    }

    #[test]
    fn with_only_small_holders_the_reporter_closes() {
        let budget = Budget::new(100 << 10);
        let mut holders: Vec<Charge> = (0..3).map(|_| Charge::default()).collect();
        for h in &mut holders[..2] {
            assert_eq!(budget.set(h, 40 << 10, || Box::new(|| {})), Verdict::Fine);
        }
        assert_eq!(
            budget.set(&mut holders[2], 40 << 10, || Box::new(|| {})),
            Verdict::CloseSelf
        );
        // Shrinking never closes anyone.
        assert_eq!(
            budget.set(&mut holders[0], 1, || Box::new(|| {})),
            Verdict::Fine
        );
    }
}
