//! Tab scheduling: which of a session's tabs to serve this turn.
//!
//! Each tab's socket is registered with a waker of the tab's own
//! ([`TabWake`]). When the socket is ready, the waker lists the tab in its
//! session's [`Ready`] set and wakes the session's task, which then serves
//! only the listed tabs: a session with a thousand idle tabs and one busy
//! one polls one socket per message, not a thousand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_util::task::{waker_ref, ArcWake};

use crate::envelope::TabId;

/// The tabs whose sockets woke their session. A std `Mutex`, held only to
/// push or swap, never across an `.await`.
#[derive(Default)]
pub struct Ready {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    tabs: Vec<TabId>,
    /// The session's task, waiting for a tab.
    session: Option<Waker>,
}

impl Ready {
    fn lock(&self) -> MutexGuard<'_, ReadyState> {
        // Every change under this lock is a single push or swap: a panic
        // cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the woken tabs into `into` (empty), or registers the session's
    /// waker while there are none. Counts against the task's budget, like
    /// tokio's own resources, so a session kept busy by its tabs still
    /// yields to other tasks.
    pub fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<TabId>) -> Poll<()> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut st = self.lock();
        if st.tabs.is_empty() {
            if !matches!(&st.session, Some(w) if w.will_wake(cx.waker())) {
                st.session = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        std::mem::swap(&mut st.tabs, into);
        coop.made_progress();
        Poll::Ready(())
    }
}

impl Ready {
    /// Lists again tabs taken but not served this turn (they are still
    /// marked listed, so their wakers will not list them twice).
    pub fn put_back(&self, tabs: &[TabId]) {
        self.lock().tabs.extend_from_slice(tabs);
    }
}

/// One tab's waker, registered with its socket.
pub struct TabWake {
    tab: TabId,
    /// Already listed in `ready` (cleared as the session serves the tab).
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl TabWake {
    pub fn new(tab: TabId, ready: Arc<Ready>) -> Arc<TabWake> {
        Arc::new(TabWake {
            tab,
            queued: AtomicBool::new(false),
            ready,
        })
    }

    /// The session is serving the tab: a later wake lists it again.
    pub fn served(&self) {
        self.queued.store(false, Ordering::Release);
    }

    /// Lists the tab to be served (again) without its socket waking it.
    pub fn schedule(self: &Arc<Self>) {
        ArcWake::wake_by_ref(self);
    }

    /// Runs `f` with a context whose waker is this tab's: whatever socket
    /// `f` polls wakes the session for this tab.
    #[inline]
    pub fn with_context<R>(self: &Arc<Self>, f: impl FnOnce(&mut Context<'_>) -> R) -> R {
        let waker = waker_ref(self);
        f(&mut Context::from_waker(&waker))
    }
}

impl ArcWake for TabWake {
    fn wake_by_ref(this: &Arc<Self>) {
        if this.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let session = {
            let mut st = this.ready.lock();
            st.tabs.push(this.tab);
            st.session.take()
        };
        if let Some(w) = session {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(ready: &Ready, into: &mut Vec<TabId>) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        ready.poll_take(&mut cx, into).is_ready()
    }

    #[test]
    fn a_tab_is_listed_once_until_it_is_served() {
        let ready = Arc::new(Ready::default());
        let one = TabWake::new(TabId(1), ready.clone());
        let two = TabWake::new(TabId(2), ready.clone());
        let mut woken = Vec::new();
        assert!(!take(&ready, &mut woken), "nothing woke yet");
        one.schedule();
        one.schedule();
        two.schedule();
        assert!(take(&ready, &mut woken));
        assert_eq!(woken, [TabId(1), TabId(2)]);
        woken.clear();
        one.schedule();
        assert!(!take(&ready, &mut woken), "still listed until served");
        one.served();
        one.schedule();
        assert!(take(&ready, &mut woken));
        assert_eq!(woken, [TabId(1)]);
    }
}
