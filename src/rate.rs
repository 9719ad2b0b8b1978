//! `server.tab_rate` and `server.per_ip.rate`: what one tab, and all the
//! tabs of one client address, may send a second (docs/protocol.md,
//! "Limits").
//!
//! Each tab has two token buckets, messages and bytes, each holding two
//! seconds of its rate (the burst allowed). A message is read while both
//! hold something; bytes are charged as they are read from the socket
//! (frame headers included, and the part of a message that is left
//! hanging), and the message once it is whole (so one message larger than
//! what is left still goes, and the tab then waits longer). When either is
//! empty the session stops reading from the tab: the tab's bytes stay in
//! its socket, and TCP pushes back on the sender, which is how one tab is
//! kept from taking the proxy's time from the tabs beside it. Reading
//! resumes once a tenth of a second of both rates has come back (so a
//! flooding tab wakes its session about ten times a second, not once per
//! message). A tab still sending more than its rate after the route's
//! `idle_timeout` of being held back is closed with 1008 `rate limit`.
//!
//! A client address has one more allowance, [`Pool`], shared by all of its
//! tabs whatever their sessions (`server.per_ip.rate`): a tab is read while
//! both its own buckets and its address's pool hold something, so an
//! address that keeps opening tabs, each with a fresh burst, is held to its
//! address's rate all the same. The pool is one atomic count of allowance,
//! in picoseconds of the rate: a message costs a second's share of the
//! message rate plus its bytes' share of the byte rate. Its tabs are read
//! again once a hundredth of a second of it is back: they wake together,
//! so that is what they read at once.
//!
//! A tab's buckets are pure arithmetic over a clock the session gives in
//! milliseconds, and a pool's refill takes its time as an argument, so both
//! are unit-tested with plain numbers. Both are refilled lazily, when one
//! runs empty, so a tab within its rates costs no clock read per message
//! (one atomic subtraction from its address's pool). A tab's state is 16
//! bytes: it lives in every tab's slot, whose size is a headline memory
//! figure; its pool is reached through its permit.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::TabRate;

/// Reading resumes once this share of a second of both rates is back.
const RESUME: f32 = 0.1;
/// The burst: this many seconds of the rate.
const BURST: f32 = 2.0;

/// A tab's buckets.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    /// Messages left (below zero: owed, after a large charge).
    messages: f32,
    /// Bytes left.
    bytes: f32,
    /// When they were last refilled (ms on the session's clock; wraps
    /// after 49 days, and only differences are taken).
    at: u32,
    /// When the tab was first held back in its current run, plus one; 0
    /// while it is not (it has sent nothing beyond its rate since it last
    /// had nothing more to send).
    held_since: u32,
}

/// What to do with a tab before reading from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Read (and charge what is read).
    Read,
    /// Do not read; look again after this long.
    Hold(Duration),
    /// Held back for longer than the idle timeout: close it (1008).
    Close,
}

impl Bucket {
    /// A full bucket (a tab may start with its burst).
    pub fn new(rate: &TabRate, now: u32) -> Bucket {
        Bucket {
            messages: rate.messages as f32 * BURST,
            bytes: rate.bytes as f32 * BURST,
            at: now,
            held_since: 0,
        }
    }

    /// Refills the buckets for the time since their last refill: None if
    /// both hold something now, else how long until a tenth of a second of
    /// both rates is back.
    fn refill(&mut self, rate: &TabRate, now: u32) -> Option<Duration> {
        let elapsed = now.wrapping_sub(self.at);
        if elapsed != 0 {
            let seconds = elapsed as f32 / 1000.0;
            let (m, b) = (rate.messages as f32, rate.bytes as f32);
            self.messages = (self.messages + m * seconds).min(m * BURST);
            self.bytes = (self.bytes + b * seconds).min(b * BURST);
            self.at = now;
        }
        if self.messages > 0.0 && self.bytes > 0.0 {
            return None;
        }
        let wait =
            |left: f32, per_second: f32| ((RESUME * per_second - left) / per_second).max(0.0);
        let seconds =
            wait(self.messages, rate.messages as f32).max(wait(self.bytes, rate.bytes as f32));
        // Whole milliseconds, the session's clock's unit (at least one).
        let ms = (seconds * 1000.0 - 0.001).ceil().max(1.0);
        Some(Duration::from_millis(ms as u64))
    }

    /// `messages` (0 or 1) and `bytes` were read: bytes as they are read,
    /// a message once it is whole (so a message sent in part, and held,
    /// is charged for what was read of it).
    #[inline]
    pub fn charge(&mut self, messages: u32, bytes: usize) {
        self.messages -= messages as f32;
        self.bytes -= bytes as f32;
    }

    /// Decides whether to read: while both buckets and the address's pool
    /// hold something that is all (no clock is read on the way of every
    /// message); only an empty one is refilled, for the time since its last
    /// refill (`now` is the session's clock, read then). A tab held by its
    /// address alone is held back, and closed after `idle` of it, as one
    /// held by its own rate; held by both, it waits the longer of the two.
    #[inline]
    pub fn check(
        &mut self,
        rate: &TabRate,
        pool: &Pool,
        now: impl FnOnce() -> u32,
        idle: Duration,
    ) -> Verdict {
        if self.messages > 0.0 && self.bytes > 0.0 && pool.has_room() {
            return Verdict::Read;
        }
        self.pooled(rate, pool, now(), idle)
    }

    /// An empty bucket or pool: both refilled; held back for the longer of
    /// the two waits (by its own rate, its address's, or both alike).
    #[cold]
    #[inline(never)]
    fn pooled(&mut self, rate: &TabRate, pool: &Pool, now: u32, idle: Duration) -> Verdict {
        match self.refill(rate, now).max(pool.refill(clock_ms())) {
            None => Verdict::Read,
            Some(wait) => self.hold(wait, now, idle),
        }
    }

    /// Held back for `wait`; closed once held for longer than `idle`.
    fn hold(&mut self, wait: Duration, now: u32, idle: Duration) -> Verdict {
        if self.held_since == 0 {
            self.held_since = now.wrapping_add(1).max(1);
        } else if u64::from(now.wrapping_sub(self.held_since.wrapping_sub(1)))
            > idle.as_millis() as u64
        {
            return Verdict::Close;
        }
        Verdict::Hold(wait)
    }

    /// The tab had nothing more to send: it is within its rate again.
    #[inline]
    pub fn drained(&mut self) {
        self.held_since = 0;
    }
}

/// Picoseconds in a second: the pool's unit is a picosecond of its rate.
const PS: u64 = 1_000_000_000_000;

/// One client address's allowance, shared by its tabs (`server.per_ip.rate`).
#[derive(Debug)]
pub struct Pool {
    /// Allowance left, in picoseconds of the rate (below zero: owed, after
    /// messages read by several tabs at once or a large one).
    left: AtomicI64,
    /// When it was last refilled, in ms of [`clock_ms`].
    at: AtomicU64,
    /// What a message costs, and each byte read (picoseconds);
    /// a reload sets them anew.
    per_message: AtomicU64,
    per_byte: AtomicU64,
}

impl Pool {
    /// A full pool (a new address may start with its burst).
    pub fn new(rate: &TabRate) -> Pool {
        Pool::at(rate, clock_ms())
    }

    fn at(rate: &TabRate, now: u64) -> Pool {
        let pool = Pool {
            left: AtomicI64::new(burst()),
            at: AtomicU64::new(now),
            per_message: AtomicU64::new(0),
            per_byte: AtomicU64::new(0),
        };
        pool.set_rate(rate);
        pool
    }

    fn set_rate(&self, rate: &TabRate) {
        let per = |n: u64| PS / n.max(1);
        let (m, b) = (per(rate.messages.into()), per(rate.bytes));
        self.per_message.store(m, Ordering::Relaxed);
        self.per_byte.store(b, Ordering::Relaxed);
    }

    #[inline]
    fn has_room(&self) -> bool {
        self.left.load(Ordering::Relaxed) > 0
    }

    /// `messages` and `bytes` were read from one of the address's tabs
    /// (as [`Bucket::charge`]). One charge costs at most two bursts (so
    /// what is owed stays far from the count's bounds however many tabs
    /// read at once).
    #[inline]
    pub fn charge(&self, messages: u32, bytes: usize) {
        let cost = (u64::from(messages) * self.per_message.load(Ordering::Relaxed))
            .saturating_add((bytes as u64).saturating_mul(self.per_byte.load(Ordering::Relaxed)));
        let cost = cost.min(2 * burst() as u64) as i64;
        self.left.fetch_sub(cost, Ordering::Relaxed);
    }

    /// Refills the pool for the time since its last refill (by whichever
    /// tab of the address comes first: the others then find nothing more
    /// to add). None if it has room now; else how long until a hundredth
    /// of a second of the rate is back ([`POOL_RESUME`]).
    fn refill(&self, now: u64) -> Option<Duration> {
        let add = allowance(now.saturating_sub(self.at.swap(now, Ordering::Relaxed)));
        let left = match self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_add(add).min(burst()))
            }) {
            Ok(was) | Err(was) => was.saturating_add(add).min(burst()),
        };
        if left > 0 {
            return None;
        }
        // A hundredth of a second of the rate: the tabs held by an address
        // wake together, so what they read at once is what came back.
        let short = POOL_RESUME - left;
        Some(Duration::from_millis(
            (short as u64).div_ceil(PS / 1000).max(1),
        ))
    }

    /// Whether it holds its whole burst again at `now` (what it would hold
    /// if refilled then).
    pub fn is_full(&self, now: u64) -> bool {
        let add = allowance(now.saturating_sub(self.at.load(Ordering::Relaxed)));
        self.left.load(Ordering::Relaxed).saturating_add(add) >= burst()
    }

    /// Applies a reloaded rate.
    pub fn configure(&self, rate: &TabRate) {
        self.set_rate(rate);
    }
}

/// A held address's tabs are read again once this much of its rate is
/// back (a hundredth of a second, in picoseconds): its tabs wake together,
/// so this is what they read at once, and a small share keeps that from
/// stalling the sessions beside them.
const POOL_RESUME: i64 = (PS / 100) as i64;

/// The allowance `ms` milliseconds bring back (picoseconds of the rate).
fn allowance(ms: u64) -> i64 {
    i64::try_from(ms.saturating_mul(PS / 1000)).unwrap_or(i64::MAX)
}

/// The pool's capacity: two seconds of its rate.
fn burst() -> i64 {
    (PS as f64 * f64::from(BURST)) as i64
}

/// Milliseconds on a process-wide clock, for the pools (shared between
/// sessions, so not on any session's clock).
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: TabRate = TabRate {
        messages: 100,
        bytes: 10_000,
    };
    const IDLE: Duration = Duration::from_secs(5);

    /// An address's pool that never runs out in these tests.
    fn roomy() -> Pool {
        Pool::new(&TabRate {
            messages: u32::MAX,
            bytes: u64::MAX,
        })
    }

    /// Reads messages of `len` bytes at `now` until held; returns how many.
    fn read_until_held(b: &mut Bucket, now: u32, len: usize) -> (usize, Verdict) {
        let mut n = 0;
        loop {
            match b.check(&RATE, &roomy(), || now, IDLE) {
                Verdict::Read => {
                    b.charge(1, len);
                    n += 1;
                }
                v => return (n, v),
            }
        }
    }

    #[test]
    fn a_burst_of_two_seconds_then_held_until_a_tenth_is_back() {
        let mut b = Bucket::new(&RATE, 0);
        let (n, v) = read_until_held(&mut b, 0, 1);
        assert_eq!(n, 200, "two seconds of messages");
        assert_eq!(v, Verdict::Hold(Duration::from_millis(100)));
        // A tenth of a second later: a tenth of a second's worth.
        let (n, _) = read_until_held(&mut b, 100, 1);
        assert_eq!(n, 10);
    }

    #[test]
    fn bytes_hold_a_tab_back_too_and_a_big_message_is_owed() {
        let mut b = Bucket::new(&RATE, 0);
        // 20,000 bytes of burst: one 30,000-byte message still goes ...
        assert_eq!(read_until_held(&mut b, 0, 30_000).0, 1);
        // ... and the tab then waits for the 10,000 owed and a tenth more.
        match b.check(&RATE, &roomy(), || 0, IDLE) {
            Verdict::Hold(d) => assert_eq!(d.as_millis(), 1100),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            b.check(&RATE, &roomy(), || 1000, IDLE),
            Verdict::Hold(Duration::from_millis(100))
        );
        assert_eq!(b.check(&RATE, &roomy(), || 1101, IDLE), Verdict::Read);
    }

    #[test]
    fn closed_only_after_the_idle_timeout_of_steady_excess() {
        let mut b = Bucket::new(&RATE, 0);
        read_until_held(&mut b, 0, 1);
        // Sending at twice the rate for 5 s: held each time, never drained.
        let mut now = 0;
        while now <= 5000 {
            now += 100;
            let (_, v) = read_until_held(&mut b, now, 1);
            if now <= 5000 {
                assert!(matches!(v, Verdict::Hold(_)), "at {now} ms: {v:?}");
            } else {
                assert_eq!(v, Verdict::Close, "at {now} ms");
            }
        }
        // A tab that drains between bursts is never closed.
        let mut b = Bucket::new(&RATE, 0);
        for second in 0..20u32 {
            read_until_held(&mut b, second * 1000, 1);
            b.drained();
        }
    }

    #[test]
    fn an_idle_tab_refills_to_its_burst_and_no_more() {
        let mut b = Bucket::new(&RATE, 0);
        read_until_held(&mut b, 0, 1);
        assert_eq!(read_until_held(&mut b, 60_000, 1).0, 200);
        // Across the clock's wrap.
        let mut b = Bucket::new(&RATE, u32::MAX - 50);
        read_until_held(&mut b, u32::MAX - 50, 1);
        assert_eq!(read_until_held(&mut b, 49, 1).0, 10);
    }

    #[test]
    fn an_address_s_tabs_share_its_pool() {
        // One message a second for the whole address: a burst of two,
        // whichever tabs send them, and however fresh their own buckets.
        let pool = Pool::new(&TabRate {
            messages: 1,
            bytes: u64::MAX,
        });
        let mut read = 0;
        for _ in 0..10 {
            let mut tab = Bucket::new(&RATE, 0);
            while tab.check(&RATE, &pool, || 0, IDLE) == Verdict::Read {
                tab.charge(1, 1);
                pool.charge(1, 1);
                read += 1;
            }
        }
        // Two, and a third only if this test stalled for half a second.
        assert!((2..=3).contains(&read), "{read} read from ten fresh tabs");
    }

    #[test]
    fn a_pool_refills_at_its_rate_and_says_how_long_to_wait() {
        let rate = TabRate {
            messages: 10,
            bytes: 1000,
        };
        let pool = Pool::at(&rate, 0);
        // A message of 100 bytes costs 0.1 s + 0.1 s of the rate: a burst of
        // two seconds is ten of them.
        let mut n = 0;
        while pool.refill(0).is_none() {
            pool.charge(1, 100);
            n += 1;
        }
        assert_eq!(n, 10);
        assert_eq!(pool.refill(0), Some(Duration::from_millis(10)));
        // A hundredth of a second later: room again, for one more.
        assert_eq!(pool.refill(10), None);
        assert!(!pool.is_full(10));
        pool.charge(1, 100);
        assert_eq!(pool.refill(10), Some(Duration::from_millis(200)));
        // Never more than the burst, however long it was idle; a large
        // message is owed, at most two bursts of it.
        assert_eq!(pool.refill(1_000_000), None);
        assert!(pool.is_full(1_000_000));
        pool.charge(1, usize::MAX);
        assert_eq!(pool.refill(1_000_000), Some(Duration::from_millis(2010)));
        assert!(!pool.is_full(1_003_999) && pool.is_full(1_004_000));
        // A reload applies at once.
        pool.configure(&TabRate {
            messages: 1000,
            bytes: u64::MAX,
        });
        assert_eq!(pool.refill(1_003_000), None);
        pool.charge(1, 0);
        assert!(pool.has_room(), "a thousandth of a second per message now");
    }
}
