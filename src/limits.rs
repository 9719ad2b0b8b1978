//! Process-wide limits, counted with RAII permits: a permit is given back
//! when it is dropped, however its holder ends (a panic or an early return
//! cannot leak a slot).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Counts tabs in the whole process against `server.max_tabs`.
pub struct TabLimiter {
    open: AtomicUsize,
    max: usize,
    /// Notified each time a slot is given back (the shutdown drain waits on it).
    pub released: Notify,
}

impl TabLimiter {
    pub fn new(max: usize) -> Arc<TabLimiter> {
        Arc::new(TabLimiter {
            open: AtomicUsize::new(0),
            max,
            released: Notify::new(),
        })
    }

    /// Tabs open (or being admitted) right now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a slot, or returns None when the proxy is full.
    pub fn try_acquire(self: &Arc<Self>) -> Option<TabPermit> {
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(TabPermit(self.clone())),
                Err(now) => n = now,
            }
        }
    }
}

/// One slot of [`TabLimiter`], given back when dropped (however the tab ends).
pub struct TabPermit(Arc<TabLimiter>);

impl Drop for TabPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_given_back_when_dropped() {
        let limiter = TabLimiter::new(2);
        let a = limiter.try_acquire().expect("first");
        let _b = limiter.try_acquire().expect("second");
        assert!(limiter.try_acquire().is_none(), "at max_tabs");
        drop(a);
        assert_eq!(limiter.open(), 1);
        assert!(limiter.try_acquire().is_some());
    }
}
