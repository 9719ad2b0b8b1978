//! Memory returned to the system after a burst (PROTOCOL.md, "Limits").
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
//!   once a second when the buffer budget's account has fallen by at least
//!   [`TRIM_AFTER`] since the last call (a burst is over), and never while
//!   nothing was freed.
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
/// How far the account must fall before the heap is trimmed.
pub const TRIM_AFTER: usize = 1 << 20;
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

/// Gives freed heap pages back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims the heap after each burst of held bytes, until `stop` fires.
pub async fn trim_after_bursts(budget: Arc<Budget>, mut stop: watch::Receiver<()>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = budget.held();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let now = budget.held();
        peak = peak.max(now);
        if peak - now >= TRIM_AFTER {
            // Off the runtime's threads: a large heap takes a while.
            let _ = tokio::task::spawn_blocking(trim).await;
            peak = now;
        }
    }
}
