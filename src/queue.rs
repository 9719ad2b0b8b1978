//! The queue from a session to one tab: bounded, never awaited by the
//! session, and cheap while idle.
//!
//! Why not tokio's bounded mpsc: it allocates a block of 32 message slots up
//! front (about 2 KiB with tungstenite's 56-byte `Message`), which profiling
//! showed to be one of the largest costs of an idle tab. This queue is one
//! small allocation; its buffer exists only while messages are waiting, and
//! is given back once a burst has drained.
//!
//! Its lock is a std `Mutex`, held only to push, pop or swap a waker, never
//! across an `.await`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio_tungstenite::tungstenite::Message;

/// A buffer larger than this is freed once the queue is empty again.
const KEEP_CAPACITY: usize = 8;

struct State {
    items: VecDeque<Message>,
    /// One side is gone.
    closed: bool,
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

/// The tab's end.
pub struct QueueReceiver {
    shared: Arc<Shared>,
}

impl QueueReceiver {
    /// The next message; None once the sender is gone and the queue drained.
    pub async fn recv(&mut self) -> Option<Message> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            if let Some(msg) = pop(&mut st) {
                return Poll::Ready(Some(msg));
            }
            if st.closed {
                return Poll::Ready(None);
            }
            match &st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        pop(&mut self.shared.lock())
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

    #[tokio::test]
    async fn bounded_in_order_and_closed_when_the_sender_goes() {
        let (tx, mut rx) = queue(2);
        tx.try_send(Message::text("a")).unwrap();
        tx.try_send(Message::text("b")).unwrap();
        assert_eq!(
            tx.try_send(Message::text("c")),
            Err(TrySendError::Full(Message::text("c")))
        );
        assert_eq!(rx.recv().await, Some(Message::text("a")));
        assert_eq!(rx.try_recv(), Some(Message::text("b")));
        assert_eq!(rx.try_recv(), None);
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, mut rx) = queue(4);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.try_send(Message::text("x")).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(Message::text("x")));
    }

    #[test]
    fn a_gone_receiver_refuses_and_buffers_are_given_back() {
        let (tx, mut rx) = queue(100);
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
