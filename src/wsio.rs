//! tungstenite over non-blocking sockets: the helpers that tabs
//! ([`crate::tab`]) and the upstream ([`crate::upstream`]) share.
//!
//! Both drive tungstenite's protocol state themselves, from inside their
//! session's task, instead of through tokio-tungstenite's stream: the
//! socket is read only when tokio's readiness says it may hold data, and
//! tungstenite (which zeroes its read buffer before every read) is not
//! asked to read what cannot be there. tungstenite expects blocking
//! `Read`/`Write`; here a socket that would wait answers `WouldBlock`
//! instead, and the caller registers for readiness.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Whether a WebSocket error is only "the socket is not ready".
pub fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// tungstenite's blocking-style `Read`/`Write` over a tokio stream for the
/// duration of one poll: `Pending` becomes `WouldBlock` (the stream has then
/// registered the waker of `cx`).
pub struct PollIo<'a, 'b, S> {
    stream: &'a mut S,
    cx: &'a mut Context<'b>,
    /// Bytes read through this adapter (see [`Unread::fed`]).
    pub fed: usize,
}

impl<'a, 'b, S: AsyncRead + AsyncWrite + Unpin> PollIo<'a, 'b, S> {
    pub fn new(stream: &'a mut S, cx: &'a mut Context<'b>) -> Self {
        PollIo { stream, cx, fed: 0 }
    }
}

impl<S: AsyncRead + Unpin> Read for PollIo<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                self.fed += buf.filled().len();
                Ok(buf.filled().len())
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for PollIo<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.stream).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Bytes handed to tungstenite that the messages it returned may not account
/// for, counted so that it never says "none" while any are left: each
/// message is taken to have cost the fewest bytes any framing of it could
/// (one frame, the shortest length field; a fragmented or unusually framed
/// message costs more, which only leaves a count that stays above zero, and
/// a read that finds nothing, as before). At zero, tungstenite's buffer is
/// empty and a read could only come back empty, so it is not tried:
/// tungstenite zeroes its read buffer before every read. Four bytes, since
/// every open tab has one: a count that would pass `u32::MAX` becomes
/// "unknown" for good.
#[derive(Debug, Clone, Copy)]
pub struct Unread(u32);

impl Unread {
    const UNKNOWN: u32 = u32::MAX;

    /// `buffered` bytes are already in tungstenite's buffer.
    pub fn new(buffered: usize) -> Self {
        let mut unread = Unread(0);
        unread.fed(buffered);
        unread
    }

    /// Nothing is known: reads are always tried.
    pub fn unknown() -> Self {
        Unread(Self::UNKNOWN)
    }

    /// tungstenite read `n` more bytes.
    pub fn fed(&mut self, n: usize) {
        self.0 = u32::try_from(n)
            .ok()
            .and_then(|n| self.0.checked_add(n))
            .unwrap_or(Self::UNKNOWN);
    }

    /// tungstenite returned a message of `payload` bytes (`masked`: it came
    /// from a client, whose frames carry a 4-byte mask key).
    pub fn took(&mut self, payload: usize, masked: bool) {
        if self.0 != Self::UNKNOWN {
            let cost = u32::try_from(min_cost(payload, masked)).unwrap_or(u32::MAX);
            self.0 = self.0.saturating_sub(cost);
        }
    }

    /// Whether tungstenite may still hold bytes.
    pub fn maybe_buffered(&self) -> bool {
        self.0 > 0
    }

    /// tungstenite returned `msg`: whether to read again without waiting
    /// for the socket (it may hold more, or owe an answer: tungstenite
    /// queues the reply to a ping or a close and sends it on its next read).
    pub fn read_again(&mut self, msg: &Message, masked: bool) -> bool {
        self.took(msg.len(), masked);
        self.maybe_buffered() || matches!(msg, Message::Ping(_) | Message::Close(_))
    }
}

/// The fewest bytes on the wire a message of `payload` bytes can take: the
/// shortest header for it in one frame; split into fragments, every fragment
/// has a header (and a mask key, from a client), and for 65,536 bytes or
/// more at least one fragment of 126 bytes or more (4) and another (2).
fn min_cost(payload: usize, masked: bool) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 6,
    } + if masked { 4 } else { 0 };
    payload as u64 + header
}

/// Whether a peer (a tab, or the upstream) has been heard from, checked at
/// the session's keepalive ticks: both idle timeouts use it.
pub struct Liveness {
    /// Whether the peer sent anything since the last tick.
    seen: bool,
    /// When it last did, as of a tick.
    last_seen: Instant,
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            seen: false,
            last_seen: Instant::now(),
        }
    }

    /// The peer sent something.
    pub fn heard(&mut self) {
        self.seen = true;
    }

    /// At a tick: whether the peer has been silent for `idle` or longer.
    pub fn silent_for(&mut self, idle: Duration) -> bool {
        let now = Instant::now();
        if std::mem::take(&mut self.seen) {
            self.last_seen = now;
        }
        now.duration_since(self.last_seen) >= idle
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes on the wire of a message sent as fragments of these sizes,
    /// each with the shortest length field.
    fn wire(fragments: &[usize], masked: bool) -> u64 {
        fragments
            .iter()
            .map(|&p| {
                let length = match p {
                    0..=125 => 0,
                    126..=65_535 => 2,
                    _ => 8,
                };
                (2 + length + if masked { 4 } else { 0 } + p) as u64
            })
            .sum()
    }

    const SIZES: [usize; 12] = [
        0, 1, 124, 125, 126, 127, 250, 251, 65_535, 65_536, 65_537, 200_000,
    ];

    #[test]
    fn a_single_frame_below_64_kib_is_counted_exactly() {
        for masked in [false, true] {
            for n in SIZES.into_iter().filter(|&n| n < 65_536) {
                assert_eq!(min_cost(n, masked), wire(&[n], masked), "{n}");
            }
        }
    }

    #[test]
    fn no_framing_costs_less_than_counted() {
        for masked in [false, true] {
            for n in SIZES {
                assert!(min_cost(n, masked) <= wire(&[n], masked), "{n}");
                // Two and three fragments, split at every interesting point
                // (including empty fragments).
                for a in SIZES.into_iter().chain([n / 2, n.saturating_sub(125)]) {
                    let a = a.min(n);
                    assert!(
                        min_cost(n, masked) <= wire(&[a, n - a], masked),
                        "{n} = {a} + …"
                    );
                    for b in SIZES.into_iter().map(|b| b.min(n - a)) {
                        let parts = [a, b, n - a - b];
                        assert!(min_cost(n, masked) <= wire(&parts, masked), "{parts:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn unread_reaches_zero_only_when_everything_was_taken() {
        let mut unread = Unread::new(wire(&[10], true) as usize);
        unread.fed(wire(&[300], true) as usize);
        unread.took(10, true);
        assert!(
            unread.maybe_buffered(),
            "the second message is still buffered"
        );
        unread.took(300, true);
        assert!(!unread.maybe_buffered());
        // A fragmented message leaves the count above zero: reads go on
        // being tried, as before.
        unread.fed(wire(&[3, 4], true) as usize);
        unread.took(7, true);
        assert!(unread.maybe_buffered());
        // A count that would overflow becomes unknown, for good.
        let mut unread = Unread::new(u32::MAX as usize - 1);
        unread.fed(10);
        unread.took(1_000_000, false);
        assert!(unread.maybe_buffered());
    }
}
