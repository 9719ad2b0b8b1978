//! One task per tab socket: browser ⇄ session.
//!
//! The task reads the tab's messages, wraps them in the envelope (here, not in
//! the session task, so that the JSON validation and encoding of many tabs run
//! in parallel) and passes them to the session in order. It writes what the
//! session queues for it, in bursts (`feed` then one `flush`). It ends when
//! either side closes, and its [`TabLink`] reports the close code as it drops.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::config::{Envelope, Route};
use crate::envelope;
use crate::metrics::RouteMetrics;
use crate::queue::{Next, QueueReceiver};
use crate::session::{Joined, TabLink};

/// A tab's WebSocket, over the connection hyper upgraded.
pub type TabSocket = WebSocketStream<TokioIo<Upgraded>>;

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

/// Runs a tab until it closes.
pub async fn run(ws: TabSocket, joined: Joined, route: Arc<Route>, metrics: Arc<RouteMetrics>) {
    let Joined {
        tab, out, mut link, ..
    } = joined;
    let period = route.ping_interval;
    let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut task = TabTask {
        ws,
        tab,
        out,
        route,
        metrics,
        keepalive,
        seen: false,
        last_seen: Instant::now(),
    };
    let code = task.serve(&link).await;
    debug!(code, "tab closed");
    // The link reports the leave with this code as it drops, here.
    link.set_close_code(code);
}

/// The state of one tab task.
struct TabTask {
    ws: TabSocket,
    tab: envelope::TabId,
    /// What the session queued for this tab (and its kill order).
    out: QueueReceiver,
    route: Arc<Route>,
    metrics: Arc<RouteMetrics>,
    /// Pings the tab and checks it is alive, every `ping_interval`.
    keepalive: Interval,
    /// Whether the tab sent anything since the last tick, and when it last
    /// did as of a tick.
    seen: bool,
    last_seen: Instant,
}

/// One turn of the tab loop.
enum Step {
    Out(Next),
    In(Option<Result<Message, WsError>>),
    Tick,
}

impl TabTask {
    /// Serves the tab; returns the close code its `close` event carries.
    async fn serve(&mut self, link: &TabLink) -> u16 {
        loop {
            let step = tokio::select! {
                biased;
                next = self.out.recv() => Step::Out(next),
                msg = self.ws.next() => Step::In(msg),
                _ = self.keepalive.tick() => Step::Tick,
            };
            let done = match step {
                // A full queue: close now, ahead of the queued messages.
                Step::Out(Next::Kill(frame)) => Some(self.close(frame).await),
                // The session ended without a word: it is going away.
                Step::Out(Next::Closed) => Some(self.close(close_frame(1001, "going away")).await),
                Step::Out(Next::Message(Message::Close(frame))) => {
                    let frame = frame.unwrap_or_else(|| close_frame(1000, ""));
                    Some(self.close(frame).await)
                }
                Step::Out(Next::Message(msg)) => self.write(msg).await,
                Step::In(msg) => self.read(msg, link).await,
                // Boxed for the same reason as `close`: it runs rarely.
                Step::Tick => Box::pin(self.tick()).await,
            };
            if let Some(code) = done {
                return code;
            }
        }
    }

    /// Handles what the tab sent. Returns a close code when the tab is done.
    async fn read(&mut self, msg: Option<Result<Message, WsError>>, link: &TabLink) -> Option<u16> {
        self.seen = true;
        match msg {
            Some(Ok(msg)) => match from_tab(&self.route, self.tab, msg) {
                Inbound::Forward(m, payload) => {
                    // Usually the session's queue has room; only when it is
                    // full does the tab wait (and its socket read with it).
                    let sent = match link.try_send(m, payload) {
                        Ok(()) => true,
                        Err(Some(m)) => Box::pin(link.send(m, payload)).await,
                        Err(None) => false,
                    };
                    if sent {
                        None
                    } else {
                        Some(self.close(close_frame(1001, "going away")).await)
                    }
                }
                Inbound::Ignore => None,
                Inbound::Closed(code) => {
                    // tungstenite queued the reply; finish the handshake.
                    finish(&mut self.ws).await;
                    Some(code)
                }
                Inbound::Refuse(code, reason) => {
                    self.metrics.tab_closed("invalid_json");
                    Some(self.close(close_frame(code, reason)).await)
                }
            },
            Some(Err(e)) => {
                let (code, reason, label) = read_error(&e);
                debug!(error = %e, code, "tab read failed");
                if code == 1006 {
                    return Some(1006);
                }
                self.metrics.tab_closed(label);
                Some(self.close(close_frame(code, reason)).await)
            }
            None => Some(1006),
        }
    }

    /// Keepalive: a silent tab is closed; otherwise ping it.
    async fn tick(&mut self) -> Option<u16> {
        let now = Instant::now();
        if self.seen {
            self.seen = false;
            self.last_seen = now;
        }
        if now.duration_since(self.last_seen) >= self.route.idle_timeout {
            self.metrics.tab_closed("idle");
            return Some(self.close(close_frame(1001, "idle timeout")).await);
        }
        self.write(Message::Ping(Bytes::new())).await
    }

    /// Writes `first` and whatever else is queued. A tab that stops reading
    /// can block this write and must still be closable, so a write that has
    /// to wait races the kill order; one that completes at once (nearly
    /// all) does not pay for that.
    async fn write(&mut self, first: Message) -> Option<u16> {
        let written = {
            let out = &self.out;
            let burst = write_burst(&mut self.ws, first, out);
            tokio::pin!(burst);
            match poll_fn(|cx| Poll::Ready(burst.as_mut().poll(cx))).await {
                Poll::Ready(r) => Ok(r),
                Poll::Pending => tokio::select! {
                    biased;
                    frame = out.killed() => Err(frame),
                    r = &mut burst => Ok(r),
                },
            }
        };
        match written {
            Ok(Ok(None)) => None,
            Ok(Ok(Some(frame))) => Some(self.close(frame).await),
            Ok(Err(_)) => Some(1006),
            Err(frame) => Some(self.close(frame).await),
        }
    }

    /// Starts a close handshake from tabmux's side and waits (briefly) for
    /// the tab's reply. Returns the code, for the `close` event.
    ///
    /// Boxed: it runs once per tab, and its timer and handshake state would
    /// otherwise be part of every idle tab's task.
    fn close(&mut self, frame: CloseFrame) -> Pin<Box<dyn Future<Output = u16> + Send + '_>> {
        Box::pin(self.close_now(frame))
    }

    async fn close_now(&mut self, frame: CloseFrame) -> u16 {
        let code = u16::from(frame.code);
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
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

/// Writes `first` and whatever else is queued (up to a burst), then flushes.
/// Returns the close frame if the session queued one after the messages.
async fn write_burst(
    ws: &mut TabSocket,
    first: Message,
    out: &QueueReceiver,
) -> Result<Option<CloseFrame>, WsError> {
    ws.feed(first).await?;
    let mut closing = None;
    for _ in 1..BURST {
        match out.try_recv() {
            Some(Message::Close(frame)) => {
                closing = Some(frame.unwrap_or_else(|| close_frame(1000, "")));
                break;
            }
            Some(msg) => ws.feed(msg).await?,
            None => break,
        }
    }
    ws.flush().await?;
    Ok(closing)
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}

/// Completes a close handshake the tab started (sends the queued reply).
async fn finish(ws: &mut TabSocket) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
