//! The session's upstream between its turns: the outage (waiting out the
//! backoff, redialling, holding what tabs send meanwhile), and the futures
//! the session's loop waits on for its upstream and timers.

use std::future::{poll_fn, Future};
use std::pin::Pin;

use http::HeaderValue;
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::warn;

use super::{SessionContext, SessionEnd};
use crate::envelope::{Forward, TabId};
use crate::reconnect::{self, Backoff};
use crate::upstream::{self, DialError, DialParams, UpstreamSocket};

/// The upstream is down and being redialled.
pub(super) struct Outage {
    pub backoff: Backoff,
    /// The wait before the next redial.
    pub wait: Pin<Box<Sleep>>,
    /// The redial under way, once `wait` has passed.
    pub dialing: Option<Pin<Box<dyn Future<Output = DialResult> + Send>>>,
    /// What tabs sent meanwhile, in order.
    pub buffer: reconnect::Buffer,
    /// The first tab's handshake details, for the redials.
    pub params: DialParams,
}

pub(super) type DialResult = Result<(UpstreamSocket, Option<HeaderValue>), DialError>;

/// A tab's message, wrapped by its envelope: to the upstream, or into the
/// reconnect buffer during an outage. (A function of the session's fields,
/// not a method: the session is serving the tab's slot meanwhile.)
pub(super) fn pass_on(
    ctx: &SessionContext,
    outage: &mut Option<Box<Outage>>,
    to_upstream: &mut Vec<Message>,
    tab: TabId,
    forward: Forward,
) -> Result<(), SessionEnd> {
    let Forward { frame, payload } = forward;
    match outage {
        None => {
            ctx.metrics.to_upstream(payload);
            to_upstream.push(frame);
        }
        Some(outage) => {
            if outage.buffer.push(tab, frame, payload).is_err() {
                warn!(limit = ctx.route.reconnect_buffer, "reconnect buffer full");
                return Err(SessionEnd::BufferFull);
            }
        }
    }
    Ok(())
}

/// The next upstream frame, or never while the upstream is down. Reads only
/// when there may be something to read (see [`UpstreamSocket::poll_next`]):
/// most of the session's wake-ups are for its commands.
pub(super) async fn next_frame(
    upstream: &mut Option<UpstreamSocket>,
    buffered: &mut bool,
) -> Option<Result<Message, WsError>> {
    match upstream {
        Some(up) => poll_fn(|cx| up.poll_next(cx, buffered)).await,
        None => std::future::pending().await,
    }
}

/// Waits out the backoff, then dials; never completes outside an outage.
/// Cancel-safe: the wait and the dial live in `outage`, not in this future.
pub(super) async fn redial(outage: &mut Option<Box<Outage>>, ctx: &SessionContext) -> DialResult {
    let Some(outage) = outage.as_mut() else {
        return std::future::pending().await;
    };
    if outage.dialing.is_none() {
        outage.wait.as_mut().await;
        let route = ctx.route.clone();
        let params = outage.params.clone();
        outage.dialing = Some(Box::pin(
            async move { upstream::dial(&route, &params).await },
        ));
    }
    match outage.dialing.as_mut() {
        Some(dial) => dial.await,
        None => std::future::pending().await,
    }
}

/// Completes when the linger timer (if armed) passes.
pub(super) async fn expire(linger: &mut Option<Pin<Box<Sleep>>>) {
    match linger.as_mut() {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// The close frame tabmux ends an upstream with.
pub(super) fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}
