//! The queue from a session to one tab: bounded, never awaited by the
//! session, and cheap while idle.
//!
//! Why not tokio's bounded mpsc: it allocates a block of 32 message slots up
//! front (about 2 KiB with tungstenite's 56-byte `Message`), which profiling
//! showed to be one of the largest costs of an idle tab. This queue is one
//! small allocation; its buffer exists only while messages are waiting, and
//! is given back once a burst has drained.
//!
//! The session can also *kill* the tab through it: a close frame that
//! overtakes everything queued (a slow consumer). The tab task sees it
//! through the same lock and waker it already uses for messages, so an idle
//! tab polls nothing extra.
//!
//! Its lock is a std `Mutex`, held only to push, pop or swap a waker, never
//! across an `.await`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A buffer larger than this is freed once the queue is empty again.
const KEEP_CAPACITY: usize = 8;

struct State {
    items: VecDeque<Message>,
    /// One side is gone.
    closed: bool,
    /// Close the tab now, ahead of the queued messages.
    kill: Option<CloseFrame>,
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
            items: VecDeque::new(),
            closed: false,
            kill: None,
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
            if st.items.len() >= self.capacity {
                return Err(TrySendError::Full(msg));
            }
            st.items.push_back(msg);
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
        let waker = {
            let mut st = self.shared.lock();
            st.kill = Some(frame);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// What the tab task is told next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A message to write.
    Message(Message),
    /// Close now with this frame (queued messages are dropped).
    Kill(CloseFrame),
    /// The session is gone and the queue is drained.
    Closed,
}

/// The tab's end. All methods take `&self`: the tab task may wait for a
/// kill while a write it started holds the queue too.
pub struct QueueReceiver {
    shared: Arc<Shared>,
}

impl QueueReceiver {
    /// The kill, else the next message, else the end.
    pub async fn recv(&self) -> Next {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            if let Some(frame) = st.kill.take() {
                return Poll::Ready(Next::Kill(frame));
            }
            if let Some(msg) = pop(&mut st) {
                return Poll::Ready(Next::Message(msg));
            }
            if st.closed {
                return Poll::Ready(Next::Closed);
            }
            park(&mut st, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Resolves when the session kills the tab.
    pub async fn killed(&self) -> CloseFrame {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            match st.kill.take() {
                Some(frame) => Poll::Ready(frame),
                None => {
                    park(&mut st, cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The next message if one is waiting (and no kill is).
    pub fn try_recv(&self) -> Option<Message> {
        let mut st = self.shared.lock();
        if st.kill.is_some() {
            return None;
        }
        pop(&mut st)
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
        st.items = VecDeque::new();
    }
}

fn pop(st: &mut State) -> Option<Message> {
    let msg = st.items.pop_front();
    if st.items.is_empty() && st.items.capacity() > KEEP_CAPACITY {
        // A burst has drained: give its buffer back.
        st.items = VecDeque::new();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    fn frame(code: u16) -> CloseFrame {
        CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
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
        assert_eq!(rx.recv().await, Next::Message(Message::text("a")));
        assert_eq!(rx.try_recv(), Some(Message::text("b")));
        assert_eq!(rx.try_recv(), None);
        drop(tx);
        assert_eq!(rx.recv().await, Next::Closed);
    }

    #[tokio::test]
    async fn a_kill_overtakes_queued_messages_and_wakes_a_waiting_writer() {
        let (tx, rx) = queue(2);
        tx.try_send(Message::text("a")).unwrap();
        tx.kill(frame(1008));
        assert_eq!(rx.try_recv(), None);
        assert_eq!(rx.recv().await, Next::Kill(frame(1008)));
        let rx = Arc::new(rx);
        let waiting = rx.clone();
        let waiter = tokio::spawn(async move { waiting.killed().await });
        tokio::task::yield_now().await;
        tx.kill(frame(1008));
        assert_eq!(waiter.await.unwrap(), frame(1008));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, rx) = queue(4);
        let waiter = tokio::spawn(async move { rx.recv().await });
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
        while rx.try_recv().is_some() {}
        assert_eq!(tx.shared.lock().items.capacity(), 0);
        drop(rx);
        assert!(matches!(
            tx.try_send(Message::text("y")),
            Err(TrySendError::Closed(_))
        ));
    }
}
