//! A tab's outbox: the messages its session could not write to it yet.
//!
//! A session writes a message straight into the tab's WebSocket buffer when
//! the tab's socket has room, so most messages never wait here. They wait
//! while the tab's socket is full (a tab reading slowly) and before the tab's
//! connection is handed over after the 101 answer. The outbox's length is
//! what `tab_queue` bounds: a tab with more waiting is a slow consumer.
//!
//! Why not a `VecDeque` alone: it allocates room for four messages (about
//! 220 bytes) on the first push and keeps it. The oldest message is held
//! inline, so one message at a time needs no allocation, and a buffer grown
//! by a burst is given back once the burst has drained.

use std::collections::VecDeque;

use tokio_tungstenite::tungstenite::Message;

/// A buffer larger than this is freed once the outbox is empty again.
const KEEP_CAPACITY: usize = 8;

/// Messages waiting for a tab, oldest first.
#[derive(Default)]
pub struct Outbox {
    /// The oldest waiting message, kept out of `more` so that the usual case
    /// touches no second allocation (and an idle tab keeps no buffer at all).
    first: Option<Message>,
    /// The messages after `first`, in order.
    more: VecDeque<Message>,
}

impl Outbox {
    /// Number of waiting messages.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Adds `msg` after the others.
    pub fn push(&mut self, msg: Message) {
        if self.first.is_none() {
            self.first = Some(msg);
        } else {
            self.more.push_back(msg);
        }
    }

    /// Puts `msg` back in front (a write that could not take it).
    pub fn push_front(&mut self, msg: Message) {
        if let Some(first) = self.first.replace(msg) {
            self.more.push_front(first);
        }
    }

    /// The oldest message.
    pub fn pop(&mut self) -> Option<Message> {
        let msg = self.first.take()?;
        self.first = self.more.pop_front();
        if self.first.is_none() && self.more.capacity() > KEEP_CAPACITY {
            self.more = VecDeque::new();
        }
        Some(msg)
    }

    /// Drops everything waiting, and the buffer.
    pub fn clear(&mut self) {
        self.first = None;
        self.more = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[test]
    fn order_is_kept_across_the_inline_slot_and_one_message_needs_no_buffer() {
        let mut out = Outbox::default();
        assert!(out.is_empty());
        out.push(text("a"));
        assert_eq!(out.more.capacity(), 0, "one message needs no buffer");
        out.push(text("b"));
        out.push(text("c"));
        assert_eq!(out.len(), 3);
        assert_eq!(out.pop(), Some(text("a")));
        out.push_front(text("z"));
        assert_eq!(out.pop(), Some(text("z")));
        assert_eq!(out.pop(), Some(text("b")));
        assert_eq!(out.pop(), Some(text("c")));
        assert_eq!(out.pop(), None);
        assert_eq!(out.len(), 0);
    }

    #[test]
    fn a_burst_gives_its_buffer_back_once_drained() {
        let mut out = Outbox::default();
        for i in 0..100 {
            out.push(text(&i.to_string()));
        }
        assert!(out.more.capacity() > KEEP_CAPACITY);
        for i in 0..100 {
            assert_eq!(out.pop(), Some(text(&i.to_string())));
        }
        assert_eq!(out.more.capacity(), 0);
        out.push(text("x"));
        out.clear();
        assert!(out.is_empty());
    }
}
