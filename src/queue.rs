//! A tab's outbox: the messages its session could not write to it yet.
//!
//! A session writes a message straight into the tab's WebSocket buffer when
//! the tab's socket has room, so most messages never wait here. They wait
//! while the tab's socket is full (a tab reading slowly) and before the tab's
//! connection is handed over after the 101 answer. The outbox's length is
//! what `tab_queue` bounds: a tab with more waiting is a slow consumer.
//!
//! Since messages wait only in those cases, the outbox is a plain
//! `VecDeque` (32 bytes, no buffer while empty); a buffer grown by a burst
//! is given back once the burst has drained.

use std::collections::VecDeque;

use tokio_tungstenite::tungstenite::Message;

/// A buffer larger than this is freed once the outbox is empty again.
const KEEP_CAPACITY: usize = 8;

/// Messages waiting for a tab, oldest first. Empty, it holds no buffer.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Message>,
    /// Payload bytes waiting (what `tab_queue_bytes` bounds).
    bytes: usize,
}

impl Outbox {
    /// Number of waiting messages.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Payload bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Adds `msg` after the others.
    pub fn push(&mut self, msg: Message) {
        self.bytes += msg.len();
        self.queue.push_back(msg);
    }

    /// Puts `msg` back in front (a write that could not take it).
    pub fn push_front(&mut self, msg: Message) {
        self.bytes += msg.len();
        self.queue.push_front(msg);
    }

    /// The oldest message.
    pub fn pop(&mut self) -> Option<Message> {
        let msg = self.queue.pop_front()?;
        self.bytes -= msg.len();
        if self.queue.is_empty() && self.queue.capacity() > KEEP_CAPACITY {
            self.queue = VecDeque::new();
        }
        Some(msg)
    }

    /// Drops everything waiting, and the buffer.
    pub fn clear(&mut self) {
        self.queue = VecDeque::new();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[test]
    fn order_is_kept_and_an_empty_outbox_holds_no_buffer() {
        let mut out = Outbox::default();
        assert!(out.is_empty());
        assert_eq!(out.queue.capacity(), 0);
        out.push(text("a"));
        out.push(text("b"));
        out.push(text("c"));
        assert_eq!(out.len(), 3);
        assert_eq!(out.bytes(), 3);
        assert_eq!(out.pop(), Some(text("a")));
        out.push_front(text("z"));
        assert_eq!(out.pop(), Some(text("z")));
        assert_eq!(out.pop(), Some(text("b")));
        assert_eq!(out.pop(), Some(text("c")));
        assert_eq!(out.pop(), None);
        assert_eq!(out.len(), 0);
        assert_eq!(out.bytes(), 0);
    }

    #[test]
    fn a_burst_gives_its_buffer_back_once_drained() {
        let mut out = Outbox::default();
        for i in 0..100 {
            out.push(text(&i.to_string()));
        }
        assert!(out.queue.capacity() > KEEP_CAPACITY);
        for i in 0..100 {
            assert_eq!(out.pop(), Some(text(&i.to_string())));
        }
        assert_eq!(out.queue.capacity(), 0);
        out.push(text("x"));
        out.clear();
        assert!(out.is_empty());
        assert_eq!(out.bytes(), 0);
    }
}
