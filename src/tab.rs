//! One task per tab socket: browser ⇄ session.
//!
//! The task reads the tab's messages, wraps them in the envelope (here, not in
//! the session task, so that the JSON validation and encoding of many tabs run
//! in parallel) and passes them to the session in order. It writes what the
//! session queues for it, in bursts (`feed` then one `flush`). It ends when
//! either side closes, and its [`TabLink`] reports the close code as it drops.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::config::{Envelope, Route};
use crate::envelope;
use crate::metrics::RouteMetrics;
use crate::session::Joined;

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
        .write_buffer_size(0)
        .max_write_buffer_size(route.max_message_size.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(route.max_message_size))
        .max_frame_size(Some(route.max_message_size))
}

/// Bytes tungstenite reads from a tab's socket at a time.
pub const TAB_READ_BUFFER: usize = 1024;

/// Runs a tab until it closes.
pub async fn run(mut ws: TabSocket, joined: Joined, route: Arc<Route>, metrics: RouteMetrics) {
    let Joined {
        tab,
        mut out,
        kill,
        mut link,
        ..
    } = joined;
    let mut kill = Some(kill);
    let code = loop {
        tokio::select! {
            biased;
            // A full queue: close now, ahead of the queued messages.
            frame = killed(&mut kill) => {
                let code = u16::from(frame.code);
                close(&mut ws, Some(frame)).await;
                break code;
            }
            msg = out.recv() => {
                let Some(msg) = msg else {
                    // The session ended without a word: it is shutting down.
                    close(&mut ws, Some(close_frame(1001, "going away"))).await;
                    break 1001;
                };
                if let Message::Close(frame) = msg {
                    let code = frame.as_ref().map_or(1000, |f| u16::from(f.code));
                    close(&mut ws, frame).await;
                    break code;
                }
                // A tab that stops reading can block this write; the kill
                // signal must still get through, so race them.
                let written = tokio::select! {
                    biased;
                    frame = killed(&mut kill) => Err(frame),
                    r = write_burst(&mut ws, msg, &mut out) => Ok(r),
                };
                match written {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(frame))) => {
                        let code = frame.as_ref().map_or(1000, |f| u16::from(f.code));
                        close(&mut ws, frame).await;
                        break code;
                    }
                    Ok(Err(_)) => break 1006,
                    Err(frame) => {
                        let code = u16::from(frame.code);
                        close(&mut ws, Some(frame)).await;
                        break code;
                    }
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(msg)) => match from_tab(&route, tab, msg) {
                    Inbound::Forward(m) => {
                        if !link.send(m).await {
                            close(&mut ws, Some(close_frame(1001, "going away"))).await;
                            break 1001;
                        }
                    }
                    Inbound::Ignore => {}
                    Inbound::Closed(code) => {
                        // tungstenite queued the reply; finish the handshake.
                        finish(&mut ws).await;
                        break code;
                    }
                    Inbound::Refuse(code, reason) => {
                        metrics.tab_closed("invalid_json");
                        close(&mut ws, Some(close_frame(code, reason))).await;
                        break code;
                    }
                },
                Some(Err(e)) => {
                    let (code, reason, label) = read_error(&e);
                    if code != 1006 {
                        metrics.tab_closed(label);
                        close(&mut ws, Some(close_frame(code, reason))).await;
                    }
                    debug!(error = %e, code, "tab read failed");
                    break code;
                }
                None => break 1006,
            },
        }
    };
    debug!(code, "tab closed");
    link.set_close_code(code);
}

/// Resolves when the session closes this tab ahead of its queue. A dropped
/// sender (the session removed the tab the ordinary way, or ended) means it
/// never will, so the receiver is retired rather than polled again.
async fn killed(kill: &mut Option<oneshot::Receiver<CloseFrame>>) -> CloseFrame {
    if let Some(rx) = kill.as_mut() {
        if let Ok(frame) = rx.await {
            *kill = None;
            return frame;
        }
        *kill = None;
    }
    std::future::pending().await
}

/// What to do with one message read from a tab.
enum Inbound {
    Forward(Message),
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
        (Envelope::None, msg) => Inbound::Forward(msg),
        (Envelope::Json, Message::Text(text)) => {
            match envelope::data_text(tab, &text, route.payload) {
                Ok(frame) => Inbound::Forward(Message::Text(frame)),
                Err(envelope::NotJson) => Inbound::Refuse(1007, "message is not valid JSON"),
            }
        }
        (Envelope::Json, Message::Binary(bytes)) => {
            Inbound::Forward(Message::Text(envelope::data_binary(tab, &bytes)))
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
    out: &mut mpsc::Receiver<Message>,
) -> Result<Option<Option<CloseFrame>>, WsError> {
    ws.feed(first).await?;
    let mut closing = None;
    for _ in 1..BURST {
        match out.try_recv() {
            Ok(Message::Close(frame)) => {
                closing = Some(frame);
                break;
            }
            Ok(msg) => ws.feed(msg).await?,
            Err(_) => break,
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

/// Starts a close handshake from tabmux's side and waits (briefly) for the
/// tab's reply.
async fn close(ws: &mut TabSocket, frame: Option<CloseFrame>) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(frame).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Completes a close handshake the tab started (sends the queued reply).
async fn finish(ws: &mut TabSocket) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
