//! Memory returned to the system after a burst (docs/protocol.md, "Limits").
//!
//! With glibc's allocator (Rust's default on Linux) two things kept freed
//! memory in the process after a burst of large messages (issue 15: 340 MB
//! still resident after the tabs that caused it had closed):
//!
//! - glibc serves a large allocation with its own `mmap` (given back whole
//!   by `free`) only above a threshold that *rises* each time such a block
//!   is freed, up to 32 MiB: after a few 1 MB messages, the next ones come
//!   from the heap, and stay there once freed. [`configure`] fixes the
//!   threshold at 128 KiB, which also turns the adjustment off;
//! - smaller blocks freed in the middle of a heap stay resident until
//!   `malloc_trim` gives their pages back. [`trim_after_bursts`] calls it
//!   once a burst is over: when the buffer budget's account, or the
//!   allocator's bytes in use, has fallen by at least [`TRIM_AFTER`] from
//!   its highest point since the last trim, and has stopped falling. Never
//!   while nothing was freed, so an idle or steady process is not trimmed.
//!
//! The highest point is kept by the account itself at every report
//! ([`Budget::take_peak`]). It used to be sampled here once a second, and
//! a burst that came and went between two samples (a flood that filled
//! the queues of tabs that then vanished, within the second) was never
//! seen: its memory stayed in the allocator until the next burst.
//! Waiting until the account stops falling lets the memory freed with it
//! (a closing tab's buffers, just after its share is given back) reach the
//! allocator before the trim, so one trim returns the whole burst.
//!
//! The choice against an allocator with its own decay (jemalloc) is
//! measured in BENCHMARKS.md ("Eighth pass"). Elsewhere than glibc both are
//! no-ops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::budget::Budget;

/// Allocations of this size or more get their own mapping.
pub const MMAP_THRESHOLD: usize = 128 * 1024;
/// How far the account must fall from its highest point before the heap
/// is trimmed: enough that a trim is worth its cost (34 ms for 1 GiB
/// freed, 44 ms for 1 GiB half freed, 3 ms when nothing is free, measured
/// by `examples/trim_cost.rs`, BENCHMARKS.md), and rare under steady
/// traffic.
pub const TRIM_AFTER: usize = 16 << 20;
/// Still falling: the account fell by more than this since the last look.
const SETTLING: usize = 1 << 20;
/// How often the account is looked at.
const EVERY: Duration = Duration::from_secs(1);
/// Sets the allocator up for a long-running proxy; call once, first thing.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a setting of the allocator; called before
    // any thread of ours allocates concurrently.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

/// Bytes the allocator has handed out and not had back (glibc's
/// `mallinfo2`: heap chunks in use plus their own mappings), or None where
/// the allocator does not say.
pub fn in_use() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some(info.uordblks + info.hblkhd)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc"))))]
    {
        None
    }
}

/// Gives freed heap pages back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When to trim, from one look a second at two figures: the buffer
/// budget's account (its highest point kept exactly, see
/// [`Budget::take_peak`]) and the allocator's bytes in use ([`in_use`],
/// sampled), which also sees what is freed outside the account (the state
/// a session keeps, buffers of tabs that closed).
#[derive(Debug, Default)]
pub struct Trimmer {
    account: Fall,
    in_use: Fall,
}

/// One figure's highest point since the last trim, and its last value.
#[derive(Debug, Default)]
struct Fall {
    peak: usize,
    last: usize,
}

impl Fall {
    /// Takes a look (`peak` is the figure's highest point since the last
    /// look, `now` its value); returns how far it has fallen from its
    /// highest point since the last trim, and whether it still moves: it
    /// rose since the last look, or is still falling, by more than
    /// [`SETTLING`] and more than an eighth of its fall (traffic's small ups
    /// and downs hold no trim back). A figure that rose is in a burst, or
    /// an attack that keeps reusing what it frees: trimming then would be
    /// wasted, and it takes the allocator's lock for milliseconds.
    fn look(&mut self, peak: usize, now: usize) -> (usize, bool) {
        let rose = peak.max(now).saturating_sub(self.last);
        self.peak = self.peak.max(peak).max(now);
        let fallen = self.peak - now;
        let step = self.last.saturating_sub(now);
        self.last = now;
        let moved = |by: usize| by > SETTLING && by > fallen / 8;
        (fallen, moved(step) || moved(rose))
    }
}

impl Trimmer {
    /// One look: `peak` is the account's highest point since the last look,
    /// `now` the account now, `in_use` the allocator's figure if it gives
    /// one. True when a burst is over (both figures have fallen, and
    /// neither moved since the last look): trim.
    pub fn look(&mut self, peak: usize, now: usize, in_use: Option<usize>) -> bool {
        let (account_fallen, account_moving) = self.account.look(peak, now);
        let (used_fallen, used_moving) = match in_use {
            Some(used) => self.in_use.look(used, used),
            None => (0, false),
        };
        let fallen = account_fallen.max(used_fallen);
        if fallen >= TRIM_AFTER && !account_moving && !used_moving {
            self.account.peak = now;
            self.in_use.peak = in_use.unwrap_or(0);
            return true;
        }
        false
    }
}

/// Trims the heap after each burst of held bytes, until `stop` fires.
pub async fn trim_after_bursts(budget: Arc<Budget>, mut stop: watch::Receiver<()>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = Trimmer::default();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let peak = budget.take_peak();
        // Off the runtime's threads too: the allocator's figures take up
        // to 2 ms on a fragmented heap (examples/trim_cost.rs).
        let used = tokio::task::spawn_blocking(in_use).await.ok().flatten();
        if trimmer.look(peak, budget.held(), used) {
            // Off the runtime's threads: a large heap takes a while.
            let took = tokio::task::spawn_blocking(|| {
                let start = std::time::Instant::now();
                trim();
                start.elapsed()
            })
            .await;
            tracing::debug!(?took, "heap trimmed after a burst");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_burst_between_two_looks_is_trimmed_once_it_is_over() {
        let mut t = Trimmer::default();
        assert!(!t.look(0, 0, None));
        // Up to 200 MiB and back to nothing, all within one second: trimmed
        // at the next look, when nothing rose since.
        assert!(!t.look(200 * MIB, 0, None));
        assert!(t.look(0, 0, None));
        // Nothing more to give back.
        assert!(!t.look(0, 0, None));
    }

    #[test]
    fn no_trim_while_the_account_is_still_falling() {
        let mut t = Trimmer::default();
        assert!(!t.look(200 * MIB, 200 * MIB, None));
        assert!(!t.look(200 * MIB, 120 * MIB, None), "still falling");
        assert!(!t.look(120 * MIB, 40 * MIB, None), "still falling");
        assert!(t.look(40 * MIB, 40 * MIB, None), "settled: trim");
    }

    #[test]
    fn steady_or_rising_figures_are_never_trimmed() {
        let mut t = Trimmer::default();
        for n in 0..50 {
            // Small ups and downs under traffic, and growth.
            let used = Some(100 * MIB + n * MIB + (n % 2) * 3 * MIB);
            assert!(!t.look(n * MIB + 3 * MIB, n * MIB, used));
        }
    }

    #[test]
    fn an_attack_that_keeps_reusing_what_it_frees_is_not_trimmed_until_it_ends() {
        let mut t = Trimmer::default();
        // The account at its budget, evictions freeing 16 MiB and more each
        // second, refilled at once.
        for n in 0..20 {
            assert!(
                !t.look(64 * MIB, 44 * MIB + (n % 3) * MIB, None),
                "look {n}"
            );
        }
        // The attack ends.
        assert!(!t.look(64 * MIB, 0, None));
        assert!(t.look(0, 0, None));
    }

    #[test]
    fn memory_freed_outside_the_account_is_trimmed_too() {
        let mut t = Trimmer::default();
        // Sessions' state grows to 250 MiB; the account never moves.
        assert!(!t.look(0, 0, Some(10 * MIB)));
        assert!(!t.look(0, 0, Some(250 * MIB)));
        // The sessions end: their state is freed.
        assert!(!t.look(0, 0, Some(90 * MIB)), "still falling");
        // Traffic wobbles on; the fall is over.
        assert!(t.look(0, 0, Some(12 * MIB)) || t.look(0, 0, Some(11 * MIB)));
        assert!(!t.look(0, 0, Some(12 * MIB)), "nothing more to give back");
    }
}
