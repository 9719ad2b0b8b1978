//! A tab's connection: browser ⇄ session.
//!
//! A tab has no task of its own. Its session's task serves it: it reads the
//! tab's messages when the tab's socket has some (the socket wakes the
//! session through a waker of the tab's own, so the session polls only the
//! tabs that woke it), wraps them in the envelope, and writes what the
//! backend sends it straight into its WebSocket buffer, flushed once per
//! turn of the session. Only the closing handshake, which may wait on a
//! slow tab, runs in a task of its own.
//!
//! Why not a task per tab, as before: a message then crossed two tasks in
//! each direction (tab task, channel, session task and back, each a wake-up
//! and a poll); without that hand-off a round trip takes about 13 % fewer
//! instructions and half the user CPU time on a cold path (BENCHMARKS.md,
//! "Fourth pass"). A session's tabs now share one core, which is the one
//! their upstream is served on anyway.
//!
//! Why a hand-written reader over tungstenite's [`WebSocketContext`] rather
//! than tokio-tungstenite's stream: after every delivery the stream polled
//! the tab's socket for reading through four I/O layers (tokio-tungstenite's
//! waker proxies, hyper's upgraded connection, its rewind buffer, tokio), and
//! tungstenite zeroed its read buffer each time. Here the socket is read
//! only when tokio's readiness (an atomic load) says it may have data.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, Instrument};

use crate::budget::{allocated, Held};
use crate::cause::Cause;
use crate::config::Route;
use crate::envelope::TabId;
use crate::limits::TabPermit;
use crate::queue::Outbox;
use crate::wsio::{would_block, Liveness, Partial, PollIo, Unread};

/// How long tabmux waits for a tab to complete a close handshake, or for a
/// close frame to be written to a tab that is not reading.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Messages moved from the outbox into the WebSocket buffer before a flush.
const BURST: usize = 64;

/// The WebSocket settings of a tab connection, sized for very many mostly idle
/// tabs: tungstenite's defaults allocate a 128 KiB read buffer per socket.
/// Messages and frames above the route's `max_message_size` are refused (1009).
pub fn ws_config(route: &Route) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(TAB_READ_BUFFER)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(route.max_message_size.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(route.max_message_size))
        .max_frame_size(Some(route.max_message_size))
}

/// Bytes read from a tab's socket in one call for its next message, at
/// most (about): a large message, or a half-sent one, is read over several
/// turns of its session, so that one tab's bytes cannot make a long turn
/// for the tabs and sessions waiting behind it.
pub const TAB_READ_CAP: usize = 16 * 1024;

/// Bytes tungstenite reads from a tab's socket at a time.
pub const TAB_READ_BUFFER: usize = 512;

/// A tab's connection once upgraded: plain TCP, TLS, or (should hyper ever
/// hand over another type) hyper's upgraded connection itself.
pub enum TabSocket {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Upgraded(Box<TokioIo<Upgraded>>),
}

impl TabSocket {
    /// Pending (with the waker registered) while a read certainly finds
    /// nothing; Ready when it may find data or an error.
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            // tokio's cached readiness: no system call.
            TabSocket::Tcp(s) => s.poll_read_ready(cx).map(|_| ()),
            // rustls may hold decrypted bytes the socket no longer shows.
            TabSocket::Tls(_) | TabSocket::Upgraded(_) => Poll::Ready(()),
        }
    }
}

impl AsyncRead for TabSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TabSocket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            TabSocket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            TabSocket::Upgraded(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TabSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TabSocket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            TabSocket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            TabSocket::Upgraded(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TabSocket::Tcp(s) => Pin::new(s).poll_flush(cx),
            TabSocket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TabSocket::Upgraded(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TabSocket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            TabSocket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TabSocket::Upgraded(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A tab's connection, as its session serves it.
pub struct Tab {
    io: TabSocket,
    ws: WebSocketContext,
    id: TabId,
    /// Whether the tab has been heard from lately (its idle timeout).
    alive: Liveness,
    /// tungstenite may hold bytes already read from the socket: read before
    /// asking the socket's readiness.
    read_buffered: bool,
    /// Bytes handed to tungstenite that its messages so far may not account
    /// for: when none are left, a read could only come back empty (and
    /// tungstenite zeroes its read buffer before every read).
    unread: Unread,
    /// tungstenite holds bytes not yet written: flush them.
    unflushed: bool,
    /// The last flush found the socket full: new messages wait in the
    /// outbox (where `tab_queue` counts them) until it drains.
    blocked: bool,
    /// A write failed: the connection is gone.
    broken: bool,
    /// Bytes handed to tungstenite since its last complete flush (held for
    /// the tab while its socket is full).
    unwritten: u32,
    /// The message the tab is part way through sending.
    partial: Partial,
    permit: TabPermit,
}

/// What a keepalive tick did to a tab.
pub enum Tick {
    /// A ping is buffered: flush the tab.
    Pinged,
    /// Messages are waiting to be written: no ping needed.
    Busy,
    /// The tab has been silent for its idle timeout: close it.
    Silent,
}

impl Tab {
    /// The tab's connection, taken back from hyper without the layers of an
    /// upgraded connection. The tab holds `permit` (its slot under
    /// `server.max_tabs`) until its connection is closed.
    pub fn from_upgraded(upgraded: Upgraded, id: TabId, route: &Route, permit: TabPermit) -> Tab {
        let (io, read) = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => (TabSocket::Tcp(p.io.into_inner()), p.read_buf),
            Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
                Ok(p) => (TabSocket::Tls(Box::new(p.io.into_inner())), p.read_buf),
                Err(upgraded) => (
                    TabSocket::Upgraded(Box::new(TokioIo::new(upgraded))),
                    Bytes::new(),
                ),
            },
        };
        Tab::new(io, read, id, route, permit)
    }

    /// `read` holds bytes the client sent after its handshake that hyper had
    /// already read.
    fn new(io: TabSocket, read: Bytes, id: TabId, route: &Route, permit: TabPermit) -> Self {
        let config = Some(ws_config(route));
        let unread = Unread::new(read.len());
        let mut partial = Partial::default();
        partial.feed(&read);
        let ws = if !read.is_empty() {
            WebSocketContext::from_partially_read(read.to_vec(), Role::Server, config)
        } else {
            WebSocketContext::new(Role::Server, config)
        };
        // (Even empty, `read` may hold hyper's whole read buffer: it is
        // dropped here.)
        Tab {
            io,
            ws,
            id,
            alive: Liveness::new(),
            // The session's first look at the tab reads whatever is there.
            read_buffered: true,
            unread,
            unflushed: false,
            blocked: false,
            broken: false,
            unwritten: 0,
            partial,
            permit,
        }
    }

    pub fn id(&self) -> TabId {
        self.id
    }

    /// The id its session gave it, for a tab placed in its session after
    /// its handshake (`crate::placement`).
    pub fn set_id(&mut self, id: TabId) {
        self.id = id;
    }

    /// Message bytes held for this tab outside its outbox: what tungstenite
    /// has not written while the socket is full, and the message the tab is
    /// part way through sending (the buffer budget counts both).
    #[inline]
    pub fn held(&self) -> usize {
        let unwritten = if self.blocked {
            self.unwritten as usize
        } else {
            0
        };
        // As allocated: tungstenite's buffers grow by doubling.
        allocated(unwritten) + allocated(self.partial.held())
    }

    fn io<'a, 'b>(stream: &'a mut TabSocket, cx: &'a mut Context<'b>) -> PollIo<'a, 'b, TabSocket> {
        PollIo::new(stream, cx)
    }

    /// Sends `msg` to the tab: into tungstenite's buffer (flushed by
    /// [`Tab::poll_write`]) if the socket has room, else into `outbox`.
    pub fn send(&mut self, cx: &mut Context<'_>, msg: Message, outbox: &mut Outbox) {
        if self.blocked || self.broken || !outbox.is_empty() {
            outbox.push(msg);
            return;
        }
        self.write_frame(cx, msg, outbox);
    }

    /// Hands `msg` to tungstenite (flushed by [`Tab::poll_write`]). False
    /// when the socket is full: the frame is then kept, in tungstenite's
    /// buffer or back in front of `outbox`. A failure marks the tab broken,
    /// for the next [`Tab::poll_write`] to report.
    fn write_frame(&mut self, cx: &mut Context<'_>, msg: Message, outbox: &mut Outbox) -> bool {
        self.unflushed = true;
        let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
        match self.ws.write(&mut Self::io(&mut self.io, cx), msg) {
            Ok(()) => {
                self.unwritten = self.unwritten.saturating_add(len);
                return true;
            }
            // tungstenite kept the frame; the socket is full.
            Err(e) if would_block(&e) => self.unwritten = self.unwritten.saturating_add(len),
            Err(WsError::WriteBufferFull(back)) => outbox.push_front(*back),
            Err(_) => self.broken = true,
        }
        self.blocked = true;
        false
    }

    /// Writes what tungstenite holds and what waits in `outbox`, in bursts
    /// (one flush, so one `write`, per burst). Ready once everything is
    /// written; Pending while the socket is full (the tab's waker is then
    /// registered for room).
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        outbox: &mut Outbox,
    ) -> Poll<Result<(), Cause>> {
        if self.broken {
            return Poll::Ready(Err(Cause::TabVanished));
        }
        loop {
            if self.unflushed {
                match self.ws.flush(&mut Self::io(&mut self.io, cx)) {
                    Ok(()) => {
                        self.unflushed = false;
                        self.blocked = false;
                        self.unwritten = 0;
                    }
                    Err(e) if would_block(&e) => {
                        self.blocked = true;
                        return Poll::Pending;
                    }
                    Err(_) => return Poll::Ready(Err(Cause::TabVanished)),
                }
            }
            if outbox.is_empty() {
                return Poll::Ready(Ok(()));
            }
            for _ in 0..BURST {
                let Some(msg) = outbox.pop() else { break };
                if !self.write_frame(cx, msg, outbox) {
                    // The flush above waits for room.
                    break;
                }
            }
            if self.broken {
                return Poll::Ready(Err(Cause::TabVanished));
            }
        }
    }

    /// The next data message (text or binary) from the tab; or why the
    /// tab ends (it closed, broke the protocol, vanished); or Pending once
    /// nothing more can be read now. Pings and pongs are answered here, and
    /// count as signs of life.
    ///
    /// `fed` grows by the bytes read from the socket (the session's turn
    /// counts them, whole messages or part of one).
    pub fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
        fed: &mut usize,
    ) -> Poll<Result<Message, Cause>> {
        loop {
            if !self.read_buffered && self.io.poll_read_hint(cx).is_pending() {
                return Poll::Pending;
            }
            let msg = match self.poll_read(cx, fed) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(msg)) => msg,
                Poll::Ready(Err(e)) => {
                    debug!(tab = %self.id, error = %e, "tab read failed");
                    return Poll::Ready(Err(Cause::of_read_error(&e)));
                }
            };
            self.alive.heard();
            match msg {
                Message::Text(_) | Message::Binary(_) => return Poll::Ready(Ok(msg)),
                // tungstenite queued the reply; the ending sends it.
                Message::Close(frame) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return Poll::Ready(Err(Cause::TabClosed(code)));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// The allowance the tab shares with its address's other tabs
    /// (`server.per_ip.rate`).
    #[inline]
    pub fn pool(&self) -> &crate::rate::Pool {
        self.permit.pool()
    }

    /// Whether more of what the tab sent may be waiting to be read by the
    /// session (tungstenite holds some, or the last read stopped at its
    /// cap).
    #[inline]
    pub fn more_to_read(&self) -> bool {
        self.read_buffered
    }

    /// The next message from the tab's socket, or Pending: nothing more
    /// to read now (the socket will wake the session), or [`TAB_READ_CAP`]
    /// bytes read this call (the tab wakes itself, to be read again next
    /// turn).
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        fed: &mut usize,
    ) -> Poll<Result<Message, WsError>> {
        let mut io = PollIo::tracking(&mut self.io, cx, &mut self.partial).capped_at(TAB_READ_CAP);
        let read = self.ws.read(&mut io);
        let capped = io.capped;
        self.unread.fed(io.fed);
        *fed += io.fed;
        match read {
            Err(e) if would_block(&e) => {
                self.read_buffered = capped;
                if capped {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            Ok(msg) => {
                // A browser's frames are masked.
                self.read_buffered = self.unread.read_again(&msg, true);
                Poll::Ready(Ok(msg))
            }
            r => Poll::Ready(r),
        }
    }

    /// Keepalive: a tab silent for `idle` is to be closed; otherwise it is
    /// pinged, unless messages are waiting for it anyway.
    pub fn tick(&mut self, cx: &mut Context<'_>, idle: Duration, outbox: &Outbox) -> Tick {
        if self.alive.silent_for(idle) {
            return Tick::Silent;
        }
        if self.blocked || self.broken || !outbox.is_empty() {
            return Tick::Busy;
        }
        self.send(cx, Message::Ping(Bytes::new()), &mut Outbox::default());
        Tick::Pinged
    }

    /// Ends the tab's connection for `cause`: writes what `outbox` holds,
    /// then starts the close handshake (tabmux's close) or completes it (the
    /// tab's), waiting briefly for the tab in a task of its own. A vanished
    /// connection is just dropped. Dropping the tab closes the socket and
    /// frees its slot.
    ///
    /// `held` is the tab's share of the buffer budget: given back once its
    /// buffers are. A tab closed for the budget itself gives them back at
    /// once: its close frame is written if the socket takes it, and the
    /// rest of the close is done on the bare socket.
    pub fn finish(self, cause: Cause, outbox: Outbox, held: Option<Held>) {
        if cause == Cause::TabVanished {
            debug!(tab = %self.id, "tab connection gone");
            return;
        }
        if cause == Cause::MemoryBudget {
            drop(outbox);
            self.abandon(cause, held);
            return;
        }
        tokio::spawn(self.close(cause, outbox, held).in_current_span());
    }

    /// Writes the close frame if the socket has room now, frees the tab's
    /// buffers (and its share of the budget), and ends the connection on
    /// the bare socket: its write side shut, what the tab still sends read
    /// and dropped (so the close reaches it instead of a reset), for at most
    /// the close grace.
    fn abandon(mut self, cause: Cause, held: Option<Held>) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut io = Self::io(&mut self.io, &mut cx);
        if self.ws.close(&mut io, cause.close_frame()).is_ok() {
            let _ = self.ws.flush(&mut io);
        }
        let Tab { io, ws, permit, .. } = self;
        drop(ws);
        drop(held);
        tokio::spawn(drain(io, permit).in_current_span());
    }

    async fn close(mut self, cause: Cause, mut outbox: Outbox, held: Option<Held>) {
        // Given back when the close is done, with the buffers.
        let _held = held;
        let code = cause.code();
        let mut frame = cause.close_frame();
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            poll_fn(|cx| {
                // What the tab was sent before the close, in order.
                match self.poll_write(cx, &mut outbox) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(())) => {}
                }
                if let Some(frame) = frame.take() {
                    // Queues the close frame after anything unwritten.
                    let r = self.ws.close(&mut Self::io(&mut self.io, cx), Some(frame));
                    if matches!(&r, Err(e) if !would_block(e)) {
                        return Poll::Ready(());
                    }
                }
                self.poll_close_reply(cx)
            }),
        )
        .await;
        debug!(tab = %self.id, code, "tab closed");
    }

    /// Flushes the close handshake, then reads until the tab's reply (or the
    /// end of the connection); a reply tungstenite owes the tab is written
    /// as it reads.
    fn poll_close_reply(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.ws.flush(&mut Self::io(&mut self.io, cx)) {
            Err(e) if would_block(&e) => return Poll::Pending,
            Err(_) => return Poll::Ready(()),
            Ok(()) => {}
        }
        loop {
            match self.poll_read(cx, &mut 0) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(()),
            }
        }
    }
}

/// The end of a connection whose WebSocket state is gone: shut the write
/// side, read and drop until the peer closes (or the grace passes).
async fn drain(mut io: TabSocket, _permit: TabPermit) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 2048];
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open tab's connection is this struct (inside its slot in the
    /// session), so it is a headline memory figure: keep it in check.
    #[test]
    fn a_tab_stays_small() {
        let size = std::mem::size_of::<Tab>();
        assert!(size <= 384, "a tab is {size} bytes");
    }
}
