//! `server.tab_rate`: what one tab may send a second (docs/protocol.md,
//! "Limits").
//!
//! Each tab has two token buckets, messages and payload bytes, each holding
//! two seconds of its rate (the burst allowed). A message is read while
//! both hold something, and charged once read (so one message larger than
//! what is left still goes, and the tab then waits longer). When either is
//! empty the session stops reading from the tab: the tab's bytes stay in
//! its socket, and TCP pushes back on the sender, which is how one tab is
//! kept from taking the proxy's time from the tabs beside it. Reading
//! resumes once a tenth of a second of both rates has come back (so a
//! flooding tab wakes its session about ten times a second, not once per
//! message). A tab still sending more than its rate after the route's
//! `idle_timeout` of being held back is closed with 1008 `rate limit`.
//!
//! Pure arithmetic over a clock the session gives in milliseconds, so it is
//! unit-tested with plain numbers. The buckets are refilled lazily, when one
//! runs empty, so a tab within its rate costs no clock read per message. The state is 16 bytes per tab: it lives
//! in every tab's slot, whose size is a headline memory figure.

use std::time::Duration;

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
    /// Payload bytes left.
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

    /// Decides whether to read. While both buckets hold something that is
    /// all (no clock is read on the way of every message); only an empty
    /// one is refilled, for the time since its last refill (`now` is the
    /// session's clock, read then).
    #[inline]
    pub fn check(&mut self, rate: &TabRate, now: impl FnOnce() -> u32, idle: Duration) -> Verdict {
        if self.messages > 0.0 && self.bytes > 0.0 {
            return Verdict::Read;
        }
        self.refill(rate, now(), idle)
    }

    #[cold]
    #[inline(never)]
    fn refill(&mut self, rate: &TabRate, now: u32, idle: Duration) -> Verdict {
        let elapsed = now.wrapping_sub(self.at);
        if elapsed != 0 {
            let seconds = elapsed as f32 / 1000.0;
            let (m, b) = (rate.messages as f32, rate.bytes as f32);
            self.messages = (self.messages + m * seconds).min(m * BURST);
            self.bytes = (self.bytes + b * seconds).min(b * BURST);
            self.at = now;
        }
        if self.messages > 0.0 && self.bytes > 0.0 {
            return Verdict::Read;
        }
        self.hold(rate, now, idle)
    }

    fn hold(&mut self, rate: &TabRate, now: u32, idle: Duration) -> Verdict {
        if self.held_since == 0 {
            self.held_since = now.wrapping_add(1).max(1);
        } else if u64::from(now.wrapping_sub(self.held_since.wrapping_sub(1)))
            > idle.as_millis() as u64
        {
            return Verdict::Close;
        }
        // Until a tenth of a second of both rates is back.
        let wait =
            |left: f32, per_second: f32| ((RESUME * per_second - left) / per_second).max(0.0);
        let seconds =
            wait(self.messages, rate.messages as f32).max(wait(self.bytes, rate.bytes as f32));
        // Whole milliseconds, the session's clock's unit (at least one).
        let ms = (seconds * 1000.0 - 0.001).ceil().max(1.0);
        Verdict::Hold(Duration::from_millis(ms as u64))
    }

    /// A message of `len` payload bytes was read.
    #[inline]
    pub fn charge(&mut self, len: usize) {
        self.messages -= 1.0;
        self.bytes -= len as f32;
    }

    /// The tab had nothing more to send: it is within its rate again.
    #[inline]
    pub fn drained(&mut self) {
        self.held_since = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: TabRate = TabRate {
        messages: 100,
        bytes: 10_000,
    };
    const IDLE: Duration = Duration::from_secs(5);

    /// Reads messages of `len` bytes at `now` until held; returns how many.
    fn read_until_held(b: &mut Bucket, now: u32, len: usize) -> (usize, Verdict) {
        let mut n = 0;
        loop {
            match b.check(&RATE, || now, IDLE) {
                Verdict::Read => {
                    b.charge(len);
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
        match b.check(&RATE, || 0, IDLE) {
            Verdict::Hold(d) => assert_eq!(d.as_millis(), 1100),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            b.check(&RATE, || 1000, IDLE),
            Verdict::Hold(Duration::from_millis(100))
        );
        assert_eq!(b.check(&RATE, || 1101, IDLE), Verdict::Read);
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
}
