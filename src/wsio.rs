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
    /// Follows the frames read, when the caller counts partial messages.
    partial: Option<&'a mut Partial>,
    /// Bytes this adapter may read before it says "would block" without
    /// asking the stream (see [`PollIo::capped`]).
    cap: usize,
    /// The cap was reached: the stream may hold more, and no waker was
    /// registered for it.
    pub capped: bool,
}

impl<'a, 'b, S: AsyncRead + AsyncWrite + Unpin> PollIo<'a, 'b, S> {
    pub fn new(stream: &'a mut S, cx: &'a mut Context<'b>) -> Self {
        PollIo {
            stream,
            cx,
            fed: 0,
            partial: None,
            cap: usize::MAX,
            capped: false,
        }
    }

    /// Reads at most about `cap` bytes (the read that crosses it is kept
    /// whole), then says "would block" with [`PollIo::capped`] set: the
    /// caller comes back for the rest (a bounded amount of work per poll).
    pub fn capped_at(mut self, cap: usize) -> Self {
        self.cap = cap;
        self
    }

    /// Like [`PollIo::new`], with what is read fed to `partial`.
    pub fn tracking(stream: &'a mut S, cx: &'a mut Context<'b>, partial: &'a mut Partial) -> Self {
        PollIo {
            stream,
            cx,
            fed: 0,
            partial: Some(partial),
            cap: usize::MAX,
            capped: false,
        }
    }
}

impl<S: AsyncRead + Unpin> Read for PollIo<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.fed >= self.cap {
            self.capped = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                self.fed += buf.filled().len();
                if let Some(partial) = self.partial.as_deref_mut() {
                    partial.feed(buf.filled());
                }
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

/// Follows the frames of a client's byte stream as it is read, to know how
/// many bytes of an unfinished message tungstenite holds (the buffer budget
/// counts a message while it arrives, not once it is complete). A data
/// frame's bytes, header included, count until the frame that ends its
/// message is complete; control frames (at most 131 bytes) are not
/// counted. A frame header cut across two reads is followed byte by byte.
/// Twelve bytes, since every tab has one: a frame length past `u32::MAX`
/// is held as `u32::MAX` (tungstenite refuses such a frame anyway, above
/// `max_message_size`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Partial {
    /// In a payload: its bytes still to come. In an extended length field:
    /// the length read so far.
    left: u32,
    /// Bytes of the unfinished message so far.
    held: u32,
    /// Header bytes still to come in the current step.
    need: u8,
    step: Step,
    /// The current frame is a data frame (0x80) that ends its message
    /// (0x40); it is masked (0x01).
    flags: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The next byte starts a frame.
    #[default]
    First,
    /// The length byte.
    Length,
    /// The extended length (`need` bytes).
    Extended,
    /// The mask key (`need` bytes).
    Mask,
    /// The payload (`left` bytes).
    Payload,
}

const DATA: u8 = 0x80;
const FINAL: u8 = 0x40;
const MASKED: u8 = 0x01;

impl Partial {
    /// Bytes of the message being received; 0 between messages.
    pub fn held(&self) -> usize {
        self.held as usize
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(&first) = bytes.first() {
            if self.step == Step::First {
                if let Some(header) = self.whole_header(bytes) {
                    // The common case: a frame's header read whole.
                    if self.flags & DATA != 0 {
                        self.held = self.held.saturating_add(header as u32);
                    }
                    bytes = &bytes[header..];
                    if self.left == 0 {
                        self.frame_done();
                    }
                    continue;
                }
            }
            let n = if self.step == Step::Payload {
                let n = bytes.len().min(self.left as usize);
                self.left -= n as u32;
                n
            } else {
                self.header_byte(first);
                1
            };
            if self.flags & DATA != 0 {
                self.held = self
                    .held
                    .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            }
            bytes = &bytes[n..];
            if self.step == Step::Payload && self.left == 0 {
                self.frame_done();
            }
        }
    }

    /// The frame is complete; so is its message if it was final.
    fn frame_done(&mut self) {
        self.step = Step::First;
        if self.flags & (DATA | FINAL) == DATA | FINAL {
            self.held = 0;
        }
    }

    /// At a frame's start with its whole header in `bytes`: takes the
    /// header in one step (the payload is next) and returns its length.
    #[inline]
    fn whole_header(&mut self, bytes: &[u8]) -> Option<usize> {
        let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
        let (extended, left) = match b1 & 0x7f {
            126 => (
                2,
                u32::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
            ),
            127 => {
                let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
                (
                    8,
                    u32::try_from(u64::from_be_bytes(raw)).unwrap_or(u32::MAX),
                )
            }
            n => (0, u32::from(n)),
        };
        let masked = b1 & 0x80 != 0;
        let header = 2 + extended + if masked { 4 } else { 0 };
        if bytes.len() < header {
            return None;
        }
        let data = if b0 & 0x0f < 8 { DATA } else { 0 };
        let last = if b0 & 0x80 != 0 { FINAL } else { 0 };
        self.flags = data | last | if masked { MASKED } else { 0 };
        self.left = left;
        self.step = Step::Payload;
        Some(header)
    }

    fn header_byte(&mut self, b: u8) {
        match self.step {
            Step::First => {
                let data = if b & 0x0f < 8 { DATA } else { 0 };
                let last = if b & 0x80 != 0 { FINAL } else { 0 };
                self.flags = data | last;
                self.step = Step::Length;
            }
            Step::Length => {
                if b & 0x80 != 0 {
                    self.flags |= MASKED;
                }
                self.left = u32::from(b & 0x7f);
                match b & 0x7f {
                    126 | 127 => {
                        self.need = if b & 0x7f == 126 { 2 } else { 8 };
                        self.left = 0;
                        self.step = Step::Extended;
                    }
                    _ => self.after_length(),
                }
            }
            Step::Extended => {
                self.left = self.left.saturating_mul(256).saturating_add(u32::from(b));
                self.need -= 1;
                if self.need == 0 {
                    self.after_length();
                }
            }
            Step::Mask => {
                self.need -= 1;
                if self.need == 0 {
                    self.step = Step::Payload;
                }
            }
            Step::Payload => {}
        }
    }

    fn after_length(&mut self) {
        if self.flags & MASKED != 0 {
            self.need = 4;
            self.step = Step::Mask;
        } else {
            self.step = Step::Payload;
        }
    }
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

    /// A frame as a client sends it (masked; opcode 1 text, 0 continuation,
    /// 9 ping), with the shortest length field.
    fn client_frame(fin: bool, opcode: u8, payload: usize) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload {
            0..=125 => out.push(0x80 | payload as u8),
            126..=65_535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend(std::iter::repeat_n(b'x', payload));
        out
    }

    #[test]
    fn a_partial_message_is_held_until_its_last_frame_is_complete() {
        // A fragmented message with a ping between its fragments, then a
        // whole message: fed in every chunk size, the count is the same.
        let first = client_frame(false, 1, 70_000);
        let ping = client_frame(true, 9, 3);
        let last = client_frame(true, 0, 10);
        let whole = client_frame(true, 2, 0);
        let stream: Vec<u8> = [&first[..], &ping, &last, &whole].concat();
        for chunk in [1, 2, 3, 7, 512, 4096, stream.len()] {
            let mut p = Partial::default();
            let mut fed = 0;
            let mut max = 0;
            for piece in stream.chunks(chunk) {
                p.feed(piece);
                fed += piece.len();
                max = max.max(p.held());
                if fed == first.len() || fed == first.len() + ping.len() {
                    assert_eq!(p.held(), first.len(), "chunk {chunk}: first fragment");
                }
            }
            assert_eq!(p.held(), 0, "chunk {chunk}: everything complete");
            assert!(max < first.len() + last.len(), "chunk {chunk}: {max}");
        }
        // Half of a 1 MB frame: half of it (and its header) is held.
        let big = client_frame(true, 2, 1 << 20);
        let mut p = Partial::default();
        p.feed(&big[..big.len() / 2]);
        assert_eq!(p.held(), big.len() / 2);
        p.feed(&big[big.len() / 2..]);
        assert_eq!(p.held(), 0);
        assert_eq!(std::mem::size_of::<Partial>(), 12);
    }

    proptest::proptest! {
        /// However a stream of frames is cut into reads, the count after
        /// each read is what following it byte by byte gives.
        #[test]
        fn any_cut_of_the_stream_counts_alike(
            frames in proptest::collection::vec((proptest::bool::ANY, 0u8..3, 0usize..70_000), 1..6),
            cuts in proptest::collection::vec(1usize..9_000, 1..40),
        ) {
            let stream: Vec<u8> = frames
                .iter()
                .flat_map(|&(fin, kind, len)| {
                    let opcode = [0x0, 0x1, 0x9][kind as usize];
                    let len = if opcode == 0x9 { len % 126 } else { len };
                    client_frame(fin || opcode == 0x9, opcode, len)
                })
                .collect();
            let mut byte_by_byte = Vec::with_capacity(stream.len() + 1);
            let mut p = Partial::default();
            byte_by_byte.push(p.held());
            for b in &stream {
                p.feed(std::slice::from_ref(b));
                byte_by_byte.push(p.held());
            }
            let mut p = Partial::default();
            let (mut at, mut i) = (0, 0);
            while at < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - at);
                p.feed(&stream[at..at + n]);
                at += n;
                i += 1;
                proptest::prop_assert_eq!(p.held(), byte_by_byte[at], "at byte {}", at);
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
