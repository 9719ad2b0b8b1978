//! Redial policy after an upstream loss: when to try again, and what to hold
//! for the backend meanwhile. Pure state, no sockets, so it is unit-tested
//! on its own.
//!
//! - [`Backoff`] gives the delay before each redial: exponential, capped, with
//!   *full jitter* (a uniformly random delay between zero and the cap of that
//!   attempt). Sessions that lose the same backend at the same instant thus
//!   spread their redials over the whole window instead of dialling in
//!   lockstep; the first redial is jittered too.
//! - [`Buffer`] holds what tabs send while the upstream is down, in order,
//!   bounded by the route's `reconnect_buffer` in tab payload bytes.

use std::collections::VecDeque;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;

use crate::config::Reconnect;
use crate::envelope::TabId;

/// The redial schedule of one outage.
#[derive(Debug)]
pub struct Backoff {
    policy: Reconnect,
    /// Redials already made (each failed one uses one of `attempts`).
    made: u32,
    rng: u64,
}

impl Backoff {
    /// A schedule seeded from the system's random source.
    pub fn new(policy: Reconnect) -> Backoff {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 8];
        // A failing RNG leaves a fixed seed: still capped, just less spread.
        let _ = ring::rand::SystemRandom::new().fill(&mut seed);
        Backoff::with_seed(policy, u64::from_le_bytes(seed))
    }

    /// A schedule with a fixed seed (tests).
    pub fn with_seed(policy: Reconnect, seed: u64) -> Backoff {
        Backoff {
            policy,
            made: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// The delay before the next redial, or None when the budget is spent.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.made >= self.policy.attempts {
            return None;
        }
        let cap = self.cap(self.made);
        self.made += 1;
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(
            self.random() % nanos.saturating_add(1),
        ))
    }

    /// Redials made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// The delay after the `n`th consecutive loss (from 0), with full
    /// jitter, whatever the attempts budget: for sessions whose clients
    /// reconnect on their own, so that their next dial is spaced too.
    pub fn delay_after(&mut self, n: u32) -> Duration {
        let nanos = u64::try_from(self.cap(n).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.random() % nanos.saturating_add(1))
    }

    /// The upper bound of the delay before redial `n` (counting from 0):
    /// `initial * 2^n`, at most `max`.
    fn cap(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.policy
            .initial
            .checked_mul(factor)
            .map_or(self.policy.max, |d| d.min(self.policy.max))
    }

    /// xorshift64*: plenty for spreading delays, and no extra dependency.
    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Tab messages held while the upstream is down.
#[derive(Debug)]
pub struct Buffer {
    items: VecDeque<(TabId, Message, usize)>,
    bytes: usize,
    limit: usize,
}

/// The buffer would pass its limit: the session ends with 1013.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Buffer {
    pub fn new(limit: usize) -> Buffer {
        Buffer {
            items: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Holds `msg` (whose tab payload is `payload` bytes), or refuses it if
    /// that would pass the limit.
    pub fn push(&mut self, tab: TabId, msg: Message, payload: usize) -> Result<(), Full> {
        let total = self.bytes.saturating_add(payload);
        if total > self.limit {
            return Err(Full);
        }
        self.bytes = total;
        self.items.push_back((tab, msg, payload));
        Ok(())
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Everything held, in the order it was sent, with payload sizes.
    pub fn drain(&mut self) -> impl Iterator<Item = (TabId, Message, usize)> + '_ {
        self.bytes = 0;
        self.items.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32) -> Reconnect {
        Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            attempts,
        }
    }

    #[test]
    fn delays_stay_under_an_exponential_cap_and_the_budget_ends() {
        let mut b = Backoff::with_seed(policy(8), 42);
        let caps_ms = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for cap in caps_ms {
            let d = b.next_delay().expect("within budget");
            assert!(d <= Duration::from_millis(cap), "{d:?} > {cap}ms");
        }
        assert_eq!(b.made(), 8);
        assert_eq!(b.next_delay(), None);
    }

    #[test]
    fn zero_attempts_means_no_redial() {
        assert_eq!(Backoff::with_seed(policy(0), 1).next_delay(), None);
    }

    #[test]
    fn a_thousand_sessions_do_not_redial_in_lockstep() {
        // Every session's first redial lands somewhere in [0, initial]:
        // spread over the window, not at one instant.
        let firsts: Vec<Duration> = (0..1000u64)
            .map(|seed| {
                Backoff::with_seed(policy(8), seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .next_delay()
                    .unwrap()
            })
            .collect();
        let mut per_ms = [0usize; 101];
        for d in &firsts {
            per_ms[d.as_millis() as usize] += 1;
        }
        let busiest = per_ms.iter().max().unwrap();
        assert!(
            *busiest < 40,
            "{busiest} of 1000 first redials fell in one millisecond"
        );
        assert!(firsts.iter().all(|d| *d <= Duration::from_millis(100)));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::with_seed(policy(100), 7);
        for _ in 0..100 {
            assert!(b.next_delay().unwrap() <= Duration::from_secs(5));
        }
    }

    #[test]
    fn buffer_is_bounded_in_payload_bytes_and_keeps_order() {
        let mut buf = Buffer::new(10);
        buf.push(TabId(1), Message::text("aaaa"), 4).unwrap();
        buf.push(TabId(2), Message::text("bbbbbb"), 6).unwrap();
        assert_eq!(buf.push(TabId(1), Message::text("c"), 1), Err(Full));
        assert_eq!(buf.bytes(), 10);
        let order: Vec<TabId> = buf.drain().map(|(t, _, _)| t).collect();
        assert_eq!(order, vec![TabId(1), TabId(2)]);
        assert_eq!(buf.bytes(), 0);
    }
}
