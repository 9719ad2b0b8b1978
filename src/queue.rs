//! The queue from a session to one tab: bounded, never awaited by the
//! session, and cheap while idle.
//!
//! Why not tokio's bounded mpsc: it allocates a block of 32 message slots up
//! front (about 2 KiB with tungstenite's 56-byte `Message`), which profiling
//! showed to be one of the largest costs of an idle tab. This queue is one
//! small allocation holding the next message inline; a buffer exists only
//! while more than one message waits, and is given back once a burst has
//! drained.
//!
//! The session can also *kill* the tab through it: a close frame that
//! overtakes everything queued (a slow consumer). The tab task sees it
//! through the same lock and waker it already uses for messages, so an idle
//! tab polls nothing extra.
//!
//! The session's keepalive tick reaches the tab the same way (a flag, no
//! message and no timer per tab).
//!
//! Its lock is a std `Mutex`, held only to push, pop or swap a waker, never
//! across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A buffer larger than this is freed once the queue is empty again.
const KEEP_CAPACITY: usize = 8;

struct State {
    /// The oldest waiting message. Kept out of `more` so that the usual
    /// case, one message at a time, touches no second allocation (and an
    /// idle tab keeps no buffer at all).
    first: Option<Message>,
    /// The messages after `first`, in order.
    more: VecDeque<Message>,
    /// One side is gone.
    closed: bool,
    /// Close the tab now, ahead of the queued messages.
    kill: Option<CloseFrame>,
    /// The session's keepalive ticked: ping the tab (or close it if idle).
    tick: bool,
    /// The receiver, waiting for a message.
    waker: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue
        // inconsistent (every change is a single push, pop or swap).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates a queue that holds at most `capacity` messages.
pub fn queue(capacity: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            first: None,
            more: VecDeque::new(),
            closed: false,
            kill: None,
            tick: false,
            waker: None,
        }),
    });
    (
        QueueSender {
            shared: shared.clone(),
            capacity,
        },
        QueueReceiver { shared },
    )
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// `capacity` messages are already waiting.
    Full(Message),
    /// The receiver is gone.
    Closed(Message),
}

/// The session's end. Dropping it ends the receiver once drained.
pub struct QueueSender {
    shared: Arc<Shared>,
    capacity: usize,
}

impl QueueSender {
    /// Queues `msg` without waiting.
    pub fn try_send(&self, msg: Message) -> Result<(), TrySendError> {
        let waker = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(TrySendError::Closed(msg));
            }
            if st.len() >= self.capacity {
                return Err(TrySendError::Full(msg));
            }
            st.push(msg);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl QueueSender {
    /// Closes the tab with `frame` ahead of whatever is queued.
    pub fn kill(&self, frame: CloseFrame) {
        self.signal(|st| st.kill = Some(frame));
    }

    /// The keepalive ticked (ahead of queued messages; ticks that the tab
    /// has not seen yet count once).
    pub fn tick(&self) {
        self.signal(|st| st.tick = true);
    }

    fn signal(&self, set: impl FnOnce(&mut State)) {
        let waker = {
            let mut st = self.shared.lock();
            set(&mut st);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        self.signal(|st| st.closed = true);
    }
}

/// What the tab task is told next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A message to write.
    Message(Message),
    /// Close now with this frame (queued messages are dropped).
    Kill(CloseFrame),
    /// The keepalive ticked.
    Tick,
    /// The session is gone and the queue is drained.
    Closed,
}

/// The tab's end. All methods take `&self`: the tab task may wait for a
/// kill while a write it started holds the queue too.
pub struct QueueReceiver {
    shared: Arc<Shared>,
}

impl QueueReceiver {
    /// The kill, else a tick, else the next message, else the end; or
    /// Pending, with the task's waker registered.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        let mut st = self.shared.lock();
        if let Some(frame) = st.kill.take() {
            return Poll::Ready(Next::Kill(frame));
        }
        if std::mem::take(&mut st.tick) {
            return Poll::Ready(Next::Tick);
        }
        if let Some(msg) = pop(&mut st) {
            return Poll::Ready(Next::Message(msg));
        }
        if st.closed {
            return Poll::Ready(Next::Closed);
        }
        park(&mut st, cx.waker());
        Poll::Pending
    }

    /// Ready when the session kills the tab (`Some`) or is gone (`None`),
    /// for a tab whose writes are blocked, which takes nothing else from the
    /// queue.
    pub fn poll_kill(&self, cx: &mut Context<'_>) -> Poll<Option<CloseFrame>> {
        let mut st = self.shared.lock();
        if let Some(frame) = st.kill.take() {
            return Poll::Ready(Some(frame));
        }
        if st.closed {
            return Poll::Ready(None);
        }
        park(&mut st, cx.waker());
        Poll::Pending
    }
}

/// Registers the one consumer task's waker (it is the same task whichever
/// method waits, so one slot is enough).
fn park(st: &mut State, waker: &Waker) {
    match &st.waker {
        Some(w) if w.will_wake(waker) => {}
        _ => st.waker = Some(waker.clone()),
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        st.first = None;
        st.more = VecDeque::new();
    }
}

fn pop(st: &mut State) -> Option<Message> {
    let msg = st.first.take()?;
    st.first = st.more.pop_front();
    if st.more.is_empty() && st.more.capacity() > KEEP_CAPACITY {
        // A burst has drained: give its buffer back.
        st.more = VecDeque::new();
    }
    Some(msg)
}

impl State {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn push(&mut self, msg: Message) {
        if self.first.is_none() {
            self.first = Some(msg);
        } else {
            self.more.push_back(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    fn frame(code: u16) -> CloseFrame {
        CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        }
    }

    async fn next(rx: &QueueReceiver) -> Next {
        poll_fn(|cx| rx.poll_next(cx)).await
    }

    /// The next item if one is ready now.
    fn now(rx: &QueueReceiver) -> Option<Next> {
        let mut cx = Context::from_waker(Waker::noop());
        match rx.poll_next(&mut cx) {
            Poll::Ready(n) => Some(n),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn bounded_in_order_and_closed_when_the_sender_goes() {
        let (tx, rx) = queue(2);
        tx.try_send(Message::text("a")).unwrap();
        tx.try_send(Message::text("b")).unwrap();
        assert_eq!(
            tx.try_send(Message::text("c")),
            Err(TrySendError::Full(Message::text("c")))
        );
        assert_eq!(next(&rx).await, Next::Message(Message::text("a")));
        assert_eq!(now(&rx), Some(Next::Message(Message::text("b"))));
        assert_eq!(now(&rx), None);
        drop(tx);
        assert_eq!(next(&rx).await, Next::Closed);
    }

    #[tokio::test]
    async fn a_kill_overtakes_queued_messages_and_wakes_a_blocked_writer() {
        let (tx, rx) = queue(2);
        tx.try_send(Message::text("a")).unwrap();
        tx.kill(frame(1008));
        assert_eq!(next(&rx).await, Next::Kill(frame(1008)));
        let rx = Arc::new(rx);
        let waiting = rx.clone();
        let waiter = tokio::spawn(async move { poll_fn(|cx| waiting.poll_kill(cx)).await });
        tokio::task::yield_now().await;
        tx.kill(frame(1008));
        assert_eq!(waiter.await.unwrap(), Some(frame(1008)));
        // A session that goes away also ends the wait.
        let waiting = rx.clone();
        let waiter = tokio::spawn(async move { poll_fn(|cx| waiting.poll_kill(cx)).await });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiter.await.unwrap(), None);
    }

    #[tokio::test]
    async fn ticks_come_before_messages_and_count_once() {
        let (tx, rx) = queue(4);
        tx.try_send(Message::text("a")).unwrap();
        tx.tick();
        tx.tick();
        assert_eq!(now(&rx), Some(Next::Tick));
        assert_eq!(now(&rx), Some(Next::Message(Message::text("a"))));
        assert_eq!(now(&rx), None);
        let waiter = tokio::spawn(async move { next(&rx).await });
        tokio::task::yield_now().await;
        tx.tick();
        assert_eq!(waiter.await.unwrap(), Next::Tick);
    }

    #[test]
    fn order_is_kept_across_the_inline_slot_and_one_message_needs_no_buffer() {
        let (tx, rx) = queue(8);
        tx.try_send(Message::text("a")).unwrap();
        assert_eq!(tx.shared.lock().more.capacity(), 0);
        tx.try_send(Message::text("b")).unwrap();
        assert_eq!(now(&rx), Some(Next::Message(Message::text("a"))));
        tx.try_send(Message::text("c")).unwrap();
        tx.try_send(Message::text("d")).unwrap();
        for want in ["b", "c", "d"] {
            assert_eq!(now(&rx), Some(Next::Message(Message::text(want))));
        }
        assert_eq!(now(&rx), None);
        tx.try_send(Message::text("e")).unwrap();
        assert_eq!(now(&rx), Some(Next::Message(Message::text("e"))));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, rx) = queue(4);
        let waiter = tokio::spawn(async move { next(&rx).await });
        tokio::task::yield_now().await;
        tx.try_send(Message::text("x")).unwrap();
        assert_eq!(waiter.await.unwrap(), Next::Message(Message::text("x")));
    }

    #[test]
    fn a_gone_receiver_refuses_and_buffers_are_given_back() {
        let (tx, rx) = queue(100);
        for i in 0..50 {
            tx.try_send(Message::text(i.to_string())).unwrap();
        }
        while now(&rx).is_some_and(|n| matches!(n, Next::Message(_))) {}
        assert_eq!(tx.shared.lock().more.capacity(), 0);
        drop(rx);
        assert!(matches!(
            tx.try_send(Message::text("y")),
            Err(TrySendError::Closed(_))
        ));
    }
}
