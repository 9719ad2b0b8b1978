//! One task per tab socket: browser ⇄ session.
//!
//! The task reads the tab's messages, wraps them in the envelope (here, not in
//! the session task, so that the JSON validation and encoding of many tabs run
//! in parallel) and passes them to the session in order. It writes what the
//! session queues for it, in bursts (one `flush`, so one `write`, per burst).
//! It ends when either side closes, and its [`TabLink`] reports the close code
//! as it drops.
//!
//! Why a hand-written poll loop over tungstenite's [`WebSocketContext`]
//! instead of tokio-tungstenite's stream and `select!`: this loop runs once
//! per message delivered to every tab, so its cost is multiplied by the fan-out,
//! and an idle tab's task is multiplied by every open tab. Profiling showed
//! three costs that this shape removes:
//! - after every delivery `select!` polled the tab's socket for reading
//!   through four I/O layers (tokio-tungstenite's waker proxies, hyper's
//!   upgraded connection, its rewind buffer, tokio), and tungstenite zeroed
//!   its read buffer each time. Here the socket is read only when tokio's
//!   readiness (an atomic load) says it may have data.
//! - each tab had its own keepalive timer; the session's timer now ticks its
//!   tabs through their queues.
//! - the `select!` state machine, with the write and read paths inline, made
//!   every idle tab's task about 1.6 KiB; this one is the struct below.

use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, WebSocketContext,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, Instrument};

use crate::config::{Envelope, Route};
use crate::envelope;
use crate::metrics::RouteMetrics;
use crate::queue::{Next, QueueReceiver};
use crate::session::{Joined, Liveness, TabLink};
use crate::upgrade::TabPermit;
use crate::upstream::{would_block, Unread};

/// How long tabmux waits for a tab to complete a close handshake, or for a
/// close frame to be written to a tab that is not reading.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Messages written to a tab before one flush.
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

/// Bytes tungstenite reads from a tab's socket at a time.
pub const TAB_READ_BUFFER: usize = 512;

/// A tab's connection once upgraded: plain TCP, TLS, or (should hyper ever
/// hand over another type) hyper's upgraded connection itself.
pub trait TabIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Pending (with the waker registered) while a read certainly finds
    /// nothing; Ready when it may find data or an error.
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()>;
}

impl TabIo for TcpStream {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        // tokio's cached readiness: no system call.
        self.poll_read_ready(cx).map(|_| ())
    }
}

impl TabIo for TlsStream<TcpStream> {
    fn poll_read_hint(&self, _: &mut Context<'_>) -> Poll<()> {
        // rustls may hold decrypted bytes the socket no longer shows.
        Poll::Ready(())
    }
}

impl TabIo for TokioIo<Upgraded> {
    fn poll_read_hint(&self, _: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
}

/// Starts a tab's task on the connection hyper upgraded. The task runs
/// until the tab closes, holding `permit` (its slot under `server.max_tabs`).
///
/// The tab takes its connection back from hyper, without the layers of an
/// upgraded connection. Its task is built here, outside any `async` block:
/// locals moved into an async state machine keep their space in it, and an
/// idle tab's task is what every open tab costs.
pub fn spawn(
    upgraded: Upgraded,
    joined: Joined,
    route: Arc<Route>,
    metrics: Arc<RouteMetrics>,
    permit: TabPermit,
) {
    let span = tracing::Span::current();
    let Joined { tab, out, link, .. } = joined;
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => {
            let task = TabTask::new(p.io.into_inner(), p.read_buf, tab, out, route, metrics);
            tokio::spawn(run(task, link, permit).instrument(span));
        }
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(p) => {
                let task = TabTask::new(p.io.into_inner(), p.read_buf, tab, out, route, metrics);
                tokio::spawn(run(task, link, permit).instrument(span));
            }
            Err(upgraded) => {
                let io = TokioIo::new(upgraded);
                let task = TabTask::new(io, Bytes::new(), tab, out, route, metrics);
                tokio::spawn(run(task, link, permit).instrument(span));
            }
        },
    }
}

/// A tab's task: serves the tab, then ends it (a close handshake, boxed:
/// it runs once per tab, and its timer and handshake state would otherwise
/// be part of every idle tab's task). Dropping it drops the link (which
/// reports the leave with the close code) and then the tab's slot.
///
/// Written out rather than as an `async fn`, whose state machine kept a
/// second copy of the task state it was given.
struct TabFuture<S> {
    task: Option<TabTask<S>>,
    ending: Option<Pin<Box<dyn Future<Output = u16> + Send>>>,
    link: TabLink,
    _permit: TabPermit,
}

fn run<S: TabIo>(task: TabTask<S>, link: TabLink, permit: TabPermit) -> TabFuture<S> {
    TabFuture {
        task: Some(task),
        ending: None,
        link,
        _permit: permit,
    }
}

impl<S: TabIo> Future for TabFuture<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(task) = this.task.as_mut() {
            let Poll::Ready(end) = task.poll_serve(cx, &this.link) else {
                return Poll::Pending;
            };
            if let Some(task) = this.task.take() {
                this.ending = Some(Box::pin(task.end(end)));
            }
        }
        if let Some(ending) = this.ending.as_mut() {
            let Poll::Ready(code) = ending.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            this.ending = None;
            debug!(code, "tab closed");
            this.link.set_close_code(code);
        }
        Poll::Ready(())
    }
}

/// The state of one tab task.
struct TabTask<S> {
    io: S,
    ws: WebSocketContext,
    tab: envelope::TabId,
    /// What the session queued for this tab (its kill order, its keepalive
    /// ticks).
    out: QueueReceiver,
    route: Arc<Route>,
    metrics: Arc<RouteMetrics>,
    /// Whether the tab has been heard from lately (its idle timeout).
    alive: Liveness,
    /// tungstenite may hold bytes already read from the socket: read before
    /// asking the socket's readiness.
    read_buffered: bool,
    /// Bytes handed to tungstenite that its messages so far may not account
    /// for: when none are left, a read could only come back empty (and
    /// tungstenite zeroes its read buffer before every read).
    unread: Unread,
    /// A write could not complete: flush before taking more from the queue.
    write_blocked: bool,
    /// A tab message waiting for room in the session's queue; the tab is not
    /// read meanwhile.
    sending: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

/// How a tab's loop ended.
enum End {
    /// Close the tab from tabmux's side with this frame.
    Close(CloseFrame),
    /// The tab started the close handshake with this code; finish it.
    Finish(u16),
    /// The connection is unusable; the `close` event carries this code.
    Gone(u16),
}

/// tungstenite's blocking-style `Read`/`Write` over a tokio stream for the
/// duration of one poll: `Pending` becomes `WouldBlock` (the waker is then
/// registered by the stream).
struct Io<'a, 'b, S> {
    stream: &'a mut S,
    cx: &'a mut Context<'b>,
    /// Bytes read through this adapter.
    fed: usize,
}

impl<S: AsyncRead + Unpin> Read for Io<'_, '_, S> {
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

impl<S: AsyncWrite + Unpin> Write for Io<'_, '_, S> {
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

impl<S: TabIo> TabTask<S> {
    /// `read` holds bytes the client sent after its handshake that hyper had
    /// already read.
    fn new(
        io: S,
        read: Bytes,
        tab: envelope::TabId,
        out: QueueReceiver,
        route: Arc<Route>,
        metrics: Arc<RouteMetrics>,
    ) -> Self {
        let config = Some(ws_config(&route));
        let read_buffered = !read.is_empty();
        let unread = Unread::new(read.len());
        let ws = if read_buffered {
            WebSocketContext::from_partially_read(read.to_vec(), Role::Server, config)
        } else {
            WebSocketContext::new(Role::Server, config)
        };
        // (Even empty, `read` may hold hyper's whole read buffer: it is
        // dropped here.)
        TabTask {
            io,
            ws,
            tab,
            out,
            route,
            metrics,
            alive: Liveness::new(),
            read_buffered,
            unread,
            write_blocked: false,
            sending: None,
        }
    }

    fn io<'a, 'b>(stream: &'a mut S, cx: &'a mut Context<'b>) -> Io<'a, 'b, S> {
        Io { stream, cx, fed: 0 }
    }

    /// Serves the tab until one side ends it.
    fn poll_serve(&mut self, cx: &mut Context<'_>, link: &TabLink) -> Poll<End> {
        if let Poll::Ready(end) = self.poll_out(cx) {
            return Poll::Ready(end);
        }
        self.poll_in(cx, link)
    }

    /// The session's side: the kill, the keepalive, then queued messages,
    /// written in bursts. Pending once the queue is empty or the tab's
    /// socket is full.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        // Whether the queue was found empty (with the waker registered)
        // since the last flush began: then a completed flush is the end.
        let mut drained = false;
        loop {
            if self.write_blocked {
                match self.poll_flush(cx) {
                    Poll::Ready(Ok(())) if drained => {
                        self.write_blocked = false;
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => self.write_blocked = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(End::Gone(1006)),
                    // A tab that stopped reading must still be closable, and
                    // takes nothing else from its queue meanwhile (so that
                    // the queue fills and the session sees a slow consumer).
                    Poll::Pending => {
                        return self
                            .out
                            .poll_kill(cx)
                            .map(|kill| kill.map_or_else(going_away, End::Close))
                    }
                }
            }
            let mut written = 0;
            while written < BURST {
                let msg = match self.out.poll_next(cx) {
                    Poll::Pending => {
                        drained = true;
                        break;
                    }
                    Poll::Ready(Next::Kill(frame)) => return Poll::Ready(End::Close(frame)),
                    // The session ended without a word: it is going away.
                    Poll::Ready(Next::Closed) => return Poll::Ready(going_away()),
                    Poll::Ready(Next::Message(Message::Close(frame))) => {
                        // Written after the messages before it (the close
                        // flushes them).
                        let frame = frame.unwrap_or_else(|| close_frame(1000, ""));
                        return Poll::Ready(End::Close(frame));
                    }
                    Poll::Ready(Next::Tick) => match self.tick() {
                        Some(end) => return Poll::Ready(end),
                        None => Message::Ping(Bytes::new()),
                    },
                    Poll::Ready(Next::Message(msg)) => msg,
                };
                // A message that finds the socket full stays in tungstenite's
                // buffer and goes out with the next flush.
                match self.ws.write(&mut Self::io(&mut self.io, cx), msg) {
                    Ok(()) => written += 1,
                    Err(e) if would_block(&e) => {
                        written += 1;
                        break;
                    }
                    Err(_) => return Poll::Ready(End::Gone(1006)),
                }
            }
            if written == 0 {
                return Poll::Pending;
            }
            // Flushed at the top of the loop (and again if blocked).
            self.write_blocked = true;
        }
    }

    /// Writes what tungstenite holds.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.ws.flush(&mut Self::io(&mut self.io, cx)) {
            Err(e) if would_block(&e) => Poll::Pending,
            r => Poll::Ready(r),
        }
    }

    /// The next message from the tab, or Pending.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, WsError>> {
        let mut io = Self::io(&mut self.io, cx);
        let read = self.ws.read(&mut io);
        self.unread.fed(io.fed);
        match read {
            Err(e) if would_block(&e) => Poll::Pending,
            Ok(msg) => {
                // A browser's frames are masked.
                self.read_buffered = self.unread.read_again(&msg, true);
                Poll::Ready(Ok(msg))
            }
            r => Poll::Ready(r),
        }
    }

    /// The tab's side: reads its messages and passes them to the session.
    /// Pending once nothing more can be read now.
    fn poll_in(&mut self, cx: &mut Context<'_>, link: &TabLink) -> Poll<End> {
        loop {
            if let Some(sending) = self.sending.as_mut() {
                match sending.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(true) => self.sending = None,
                    Poll::Ready(false) => return Poll::Ready(going_away()),
                }
            }
            if !self.read_buffered && self.io.poll_read_hint(cx).is_pending() {
                return Poll::Pending;
            }
            let msg = match self.poll_read(cx) {
                Poll::Pending => {
                    self.read_buffered = false;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(msg)) => msg,
                Poll::Ready(Err(e)) => return Poll::Ready(self.read_failed(&e)),
            };
            self.alive.heard();
            match from_tab(&self.route, self.tab, msg) {
                Inbound::Forward(m, payload) => match link.try_send(m, payload) {
                    Ok(()) => {}
                    // Usually the session's queue has room; only when it is
                    // full does the tab wait (and its socket read with it).
                    Err(Some(m)) => self.sending = Some(link.send_later(m, payload)),
                    Err(None) => return Poll::Ready(going_away()),
                },
                Inbound::Ignore => {}
                // tungstenite queued the reply; `end` sends it.
                Inbound::Closed(code) => return Poll::Ready(End::Finish(code)),
                Inbound::Refuse(code, reason) => {
                    self.metrics.tab_closed("invalid_json");
                    return Poll::Ready(End::Close(close_frame(code, reason)));
                }
            }
        }
    }

    /// How a failed read ends the tab.
    fn read_failed(&self, e: &WsError) -> End {
        let (code, reason, label) = read_error(e);
        debug!(error = %e, code, "tab read failed");
        if code == 1006 {
            return End::Gone(1006);
        }
        self.metrics.tab_closed(label);
        End::Close(close_frame(code, reason))
    }

    /// Keepalive: a silent tab is closed; otherwise it is pinged.
    fn tick(&mut self) -> Option<End> {
        if self.alive.silent_for(self.route.idle_timeout) {
            self.metrics.tab_closed("idle");
            return Some(End::Close(close_frame(1001, "idle timeout")));
        }
        None
    }

    /// Ends the tab: completes or starts the close handshake (waiting
    /// briefly for the tab), and returns the code for the `close` event.
    async fn end(mut self, end: End) -> u16 {
        let (code, frame) = match end {
            End::Gone(code) => return code,
            End::Finish(code) => (code, None),
            End::Close(frame) => (u16::from(frame.code), Some(frame)),
        };
        let mut frame = frame;
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            poll_fn(|cx| {
                if let Some(frame) = frame.take() {
                    // Queues the close frame after anything unwritten.
                    let r = self.ws.close(&mut Self::io(&mut self.io, cx), Some(frame));
                    if matches!(&r, Err(e) if !would_block(e)) {
                        return Poll::Ready(());
                    }
                }
                match self.poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(())) => {}
                }
                // Until the tab's reply (or the end of the connection); a
                // reply tungstenite owes the tab is written as it reads.
                loop {
                    match self.poll_read(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                    }
                }
            }),
        )
        .await;
        code
    }
}

/// What to do with one message read from a tab.
enum Inbound {
    /// Pass on this message; the tab's payload was this many bytes.
    Forward(Message, usize),
    Ignore,
    /// The tab sent a close frame with this code (1005 if it had none).
    Closed(u16),
    /// tabmux closes the tab with this code.
    Refuse(u16, &'static str),
}

fn from_tab(route: &Route, tab: envelope::TabId, msg: Message) -> Inbound {
    match (route.envelope, msg) {
        (_, Message::Close(frame)) => Inbound::Closed(frame.map_or(1005, |f| u16::from(f.code))),
        (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Inbound::Ignore,
        (Envelope::None, msg) => {
            let len = msg.len();
            Inbound::Forward(msg, len)
        }
        (Envelope::Json, Message::Text(text)) => {
            match envelope::data_text(tab, &text, route.payload) {
                Ok(frame) => Inbound::Forward(Message::Text(frame), text.len()),
                Err(envelope::NotJson) => Inbound::Refuse(1007, "message is not valid JSON"),
            }
        }
        (Envelope::Json, Message::Binary(bytes)) => {
            let frame = envelope::data_binary(tab, &bytes);
            Inbound::Forward(Message::Text(frame), bytes.len())
        }
    }
}

/// The close code for a failed read, its reason, and its metric label.
fn read_error(e: &WsError) -> (u16, &'static str, &'static str) {
    match e {
        WsError::Capacity(_) => (1009, "message too big", "too_big"),
        WsError::Utf8(_) => (1007, "invalid UTF-8", "invalid_utf8"),
        // The TCP connection ended without a close frame: the tab vanished.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => (1006, "", ""),
        WsError::Protocol(_) => (1002, "protocol error", "protocol_error"),
        _ => (1006, "", ""),
    }
}

/// How a tab ends when its session is gone (the proxy is going away).
fn going_away() -> End {
    End::Close(close_frame(1001, "going away"))
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Every open tab's task is this future (plus tokio's header and the
    /// tracing span), so it is a headline memory figure: keep it in check.
    #[test]
    fn a_plain_tab_task_stays_small() {
        let size = std::mem::size_of::<TabFuture<TcpStream>>();
        assert!(size <= 512, "a plain tab's task is {size} bytes");
    }
}
