//! Sessions: the tabs that share one upstream, and the task that owns it.
//!
//! A tab that arrives is keyed ([`key`]), finds or starts its session in
//! the [`registry`] (the first tab's session dials before it is answered),
//! and is then served by its session's task (`actor`): one task per
//! session owns the upstream socket, the tab table (`tabs`) with the tabs'
//! sockets, and the route's envelope state machine ([`crate::envelope`]).
//! The upstream half (`uplink`: the socket, its writes, the outage and the
//! redial) is one field of the task; a lost upstream is redialled (unless
//! the envelope closes the tabs instead). The task reads a tab only when
//! the tab's socket woke it (`ready`), and writes to tabs without ever
//! waiting, so a tab that stops reading can never delay the upstream or
//! another tab.
//!
//! A tab's frame to the backend: [`crate::tab`] reads it, `actor` hands it
//! to the envelope ([`crate::envelope::json`] wraps it into an effect),
//! applies the effect, and `uplink` queues the frame for the upstream
//! socket, written once per turn.

mod actor;
pub mod key;
mod link;
mod ready;
pub mod registry;
mod tabs;
mod uplink;

use std::sync::Arc;

use tokio::sync::watch;

pub use crate::envelope::JoinInfo;
pub use actor::SessionStats;
pub use key::{hex, SessionHasher, SessionKey};
pub use link::{Joined, TabLink};
pub use registry::{NewSession, Registry, SessionSnapshot};

use crate::cause::Cause;
use crate::config::Route;
use crate::metrics::RouteMetrics;

/// Why a session stops serving. Plain data (no heap, no drop code in the
/// session's loop); [`SessionEnd::tab_cause`] says what its tabs are
/// closed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The linger time after the last tab passed.
    Linger,
    /// The upstream was lost with no tab left to keep it for.
    LostIdle,
    /// The proxy is shutting down.
    Shutdown,
    /// The upstream was lost and every redial of the budget failed.
    BudgetSpent,
    /// Tabs sent more than `reconnect_buffer` while the upstream was down.
    BufferFull,
    /// The buffer budget is spent and the session holds the most.
    MemoryBudget,
    /// The upstream was lost and the envelope closes the tabs instead of
    /// redialling (the cause is in `Session::gone`).
    UpstreamGone,
}

impl SessionEnd {
    /// The cause the session's remaining tabs are closed with, if any.
    pub(crate) fn tab_cause(self) -> Option<Cause> {
        match self {
            SessionEnd::Linger | SessionEnd::LostIdle | SessionEnd::UpstreamGone => None,
            SessionEnd::Shutdown => Some(Cause::Shutdown),
            SessionEnd::BudgetSpent => Some(Cause::UpstreamUnavailable),
            SessionEnd::BufferFull => Some(Cause::ReconnectBufferFull),
            SessionEnd::MemoryBudget => Some(Cause::MemoryBudget),
        }
    }
}

/// What a session task needs from the proxy: its route and the route's
/// metrics, and the shutdown signal.
#[derive(Clone)]
pub struct SessionContext {
    pub route: Arc<Route>,
    /// Shared by the route's sessions and tabs.
    pub metrics: Arc<RouteMetrics>,
    /// Its sender is dropped when the proxy shuts down.
    pub shutdown: watch::Receiver<()>,
    /// The process's buffer budget.
    pub budget: Arc<crate::budget::Budget>,
    /// `server.drain_spread`: the window over which sessions close their
    /// tabs on shutdown.
    pub drain_spread: std::time::Duration,
    /// The drain's order, shared by every session of the process.
    pub drain_order: Arc<DrainOrder>,
    /// `server.tab_rate`: what one tab may send a second.
    pub tab_rate: crate::config::TabRate,
}

/// The order in which sessions close their tabs on shutdown, spaced
/// evenly by rank over `server.drain_spread`: the k-th of n sessions to
/// begin its drain closes at k/n of the window. (A hash of the session key
/// used to pick the moment; five sessions over 2 s then closed within
/// 0.46 s of each other. Ranks are even whatever n is.)
#[derive(Debug, Default)]
pub struct DrainOrder {
    /// How many sessions the drain began with.
    sessions: std::sync::atomic::AtomicUsize,
    /// Ranks taken so far.
    taken: std::sync::atomic::AtomicUsize,
}

impl DrainOrder {
    /// The drain begins, with `sessions` sessions alive.
    pub fn begin(&self, sessions: usize) {
        self.sessions
            .store(sessions, std::sync::atomic::Ordering::Release);
    }

    /// The next rank's moment: how long after the drain's start the
    /// session asking closes its tabs. A session that came after the count
    /// (its handshake was under way) closes at the window's end.
    pub fn next_moment(&self, spread: std::time::Duration) -> std::time::Duration {
        use std::sync::atomic::Ordering;
        let k = self.taken.fetch_add(1, Ordering::AcqRel) + 1;
        let n = self.sessions.load(Ordering::Acquire).max(k);
        spread.mul_f64(k as f64 / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use tokio::sync::mpsc;

    use super::*;
    use crate::upstream::DialParams;

    #[test]
    fn drain_moments_are_spaced_evenly_by_rank() {
        let order = DrainOrder::default();
        order.begin(5);
        let spread = std::time::Duration::from_secs(2);
        let moments: Vec<_> = (0..6).map(|_| order.next_moment(spread)).collect();
        let ms: Vec<u128> = moments.iter().map(|d| d.as_millis()).collect();
        // One more than counted (a late handshake) closes at the end.
        assert_eq!(ms, [400, 800, 1200, 1600, 2000, 2000]);
    }

    /// Every open tab costs one of these (boxed; the tab's connection is
    /// inside it), so it is a headline memory figure: keep it in check.
    #[test]
    fn a_tab_slot_stays_small() {
        let size = tabs::slot_size();
        // 496 since a tab holds its client address (per-address limits),
        // its share of the buffer budget, and its partial-message count;
        // 512 since it holds its rate's buckets (`server.tab_rate`).
        assert!(size <= 512, "a tab's slot is {size} bytes");
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
        let route_linger = route.linger;
        let route_path: Arc<str> = route.path.as_str().into();
        let (_stop, shutdown) = watch::channel(());
        let ctx = SessionContext {
            metrics: Arc::new(crate::metrics::Metrics::default().route(&route.path)),
            route,
            shutdown,
            budget: crate::budget::Budget::new(1 << 20),
            drain_spread: std::time::Duration::ZERO,
            drain_order: Arc::default(),
            tab_rate: Default::default(),
        };
        let (tx, rx) = mpsc::channel(1);
        let stats = Arc::new(SessionStats {
            route: route_path.clone(),
            tabs: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            started: std::time::Instant::now(),
        });
        let key = SessionHasher::new().direct();
        let task = registry::run(
            Arc::default(),
            ctx,
            key,
            0,
            registry::Opened {
                dial: DialParams::default(),
                linger: route_linger,
                _permit: crate::limits::Limits::new(&config.server)
                    .session(std::net::Ipv4Addr::LOCALHOST.into())
                    .unwrap(),
            },
            tx,
            rx,
            stats,
        );
        let size = std::mem::size_of_val(&task);
        // 2616 since a session holds its limits' permit, its linger time
        // and its share of the buffer budget; 2696 since its context holds
        // the tab rate and the drain's order, and its tabs a clock; 2776
        // since it waits for its envelope's deadline and yields after a
        // full turn.
        assert!(size <= 2816, "a session's task is {size} bytes");
    }
}
