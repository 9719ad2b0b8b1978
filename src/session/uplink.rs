//! The session's upstream half: its socket and what it owns. The first dial,
//! reading frames
//! (only when there may be some, see [`UpstreamSocket::poll_next`]),
//! writing what the turn decided (one burst per turn), a tab's message
//! passed on (or held in the reconnect buffer during an outage), losing
//! the upstream, the outage (waiting out the backoff, redialling), and
//! regaining it. What the session does about each (the envelope told, tabs
//! closed or announced again) is the actor's (`actor/upstream.rs`).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::link::Holder;
use super::tabs::Holders;
use super::{SessionContext, SessionEnd};
use crate::budget::Charge;
use crate::cause::{Closing, Lost};
use crate::envelope::{Forward, TabId};
use crate::reconnect::{self, Backoff};
use crate::upstream::{self, DialError, DialParams, UpstreamSocket};
use crate::wsio::Liveness;

/// The session's upstream connection, and its outage while it is down.
pub(super) struct Uplink {
    /// The upstream, or None during an outage.
    pub socket: Option<UpstreamSocket>,
    /// The subprotocol the upstream chose on the first dial (tabs keep it).
    pub protocol: Option<HeaderValue>,
    /// The first tab's handshake details, reused for every redial.
    dial: DialParams,
    /// Frames decided on but not yet written (flushed once per turn).
    pub queue: Vec<Message>,
    /// Whether the upstream has been heard from lately (its idle timeout).
    pub alive: Liveness,
    /// tungstenite may hold upstream bytes it has read (see
    /// [`UpstreamSocket::poll_next`]).
    pub buffered: bool,
    /// The close frame the backend sent, once it sent one.
    close: Option<Box<Closing>>,
    /// Set while the upstream is down (boxed: rare, and large).
    pub outage: Option<Box<Outage>>,
}

/// The upstream is down and being redialled.
pub(super) struct Outage {
    backoff: Backoff,
    /// The wait before the next redial.
    wait: Pin<Box<Sleep>>,
    /// The redial under way, once `wait` has passed.
    dialing: Option<Pin<Box<dyn Future<Output = DialResult> + Send>>>,
    /// What tabs sent meanwhile, in order.
    pub buffer: reconnect::Buffer,
    /// The first tab's handshake details, for the redials.
    params: DialParams,
}

pub(super) type DialResult = Result<(UpstreamSocket, Option<HeaderValue>), DialError>;

impl Uplink {
    /// The session's first dial, counted: its upstream half, or why it
    /// failed (every tab waiting on it is refused with that). Its caller
    /// boxes it: the dial's state (TCP, TLS and WebSocket handshakes) is
    /// about 7 KiB, needed once; inline, every session's task would keep
    /// room for it.
    pub async fn dial(ctx: &SessionContext, params: DialParams) -> Result<Uplink, DialError> {
        match upstream::dial(&ctx.route, &params).await {
            Ok((socket, protocol)) => {
                ctx.metrics.dial("ok");
                ctx.metrics.upstream_up();
                debug!("upstream connected");
                Ok(Uplink::new(socket, protocol, params))
            }
            Err(e) => {
                ctx.metrics.dial(e.label());
                info!(error = %e, "upstream dial failed");
                Err(e)
            }
        }
    }

    fn new(socket: UpstreamSocket, protocol: Option<HeaderValue>, dial: DialParams) -> Uplink {
        Uplink {
            socket: Some(socket),
            protocol,
            dial,
            queue: Vec::new(),
            alive: Liveness::new(),
            // Bytes that followed the handshake may already be buffered.
            buffered: true,
            close: None,
            outage: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.socket.is_some()
    }

    /// A frame tungstenite already holds, if any (Pending: none).
    pub fn poll_buffered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        if !self.buffered {
            return Poll::Pending;
        }
        let Some(up) = self.socket.as_mut() else {
            return Poll::Pending;
        };
        up.poll_next(cx, &mut self.buffered)
    }

    /// The backend sent its close frame: the stream ends on the next read.
    pub fn closing(&mut self, closing: Closing) {
        self.close = Some(Box::new(closing));
    }

    /// The stream ended: why, with the close frame it sent if any.
    pub fn closed(&mut self) -> Lost {
        Lost::Closed(self.close.take().map(|c| *c))
    }

    /// A tab's message, wrapped by its envelope: to the upstream, or into
    /// the reconnect buffer during an outage (kept as the tab's). Inlined
    /// into the session's one place that applies effects.
    #[inline(always)]
    pub fn forward(
        &mut self,
        ctx: &SessionContext,
        tab: TabId,
        forward: Forward,
    ) -> Result<(), SessionEnd> {
        let Forward { frame, payload } = forward;
        match &mut self.outage {
            None => {
                ctx.metrics.to_upstream(payload);
                self.queue.push(frame);
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

    /// Writes what is queued. A write that cannot finish within `idle` (the
    /// backend stopped reading) is a loss; while it waits, what it holds
    /// counts against the buffer budget as the session's (`charge`).
    pub async fn flush(
        &mut self,
        idle: Duration,
        holders: &Holders,
        charge: &mut Charge,
    ) -> Result<(), Lost> {
        let Some(up) = self.socket.as_mut() else {
            self.queue.clear();
            return Ok(());
        };
        if self.queue.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.queue);
        let unwritten: usize = pending.iter().map(Message::len).sum();
        let write = up.send_all(pending);
        tokio::pin!(write);
        // Nearly every write completes at once; only one that has to wait
        // pays for a timer, and holds its messages against the budget
        // meanwhile (the session reads no tab until it is done).
        let written = match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => {
                let held = held_while(holders, charge, unwritten);
                let r = Box::pin(tokio::time::timeout(idle, write)).await;
                holders.budget.set(charge, held, || Box::new(|| {}));
                r
            }
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Lost::Failed(e)),
            Err(_) => Err(Lost::Stalled),
        }
    }

    /// A keepalive ping, unless the upstream is down; false if it has been
    /// silent for `idle` (lost).
    pub fn keepalive(&mut self, idle: Duration) -> bool {
        if self.socket.is_none() {
            return true;
        }
        if self.alive.silent_for(idle) {
            return false;
        }
        self.queue.push(Message::Ping(Default::default()));
        true
    }

    /// The upstream is gone: false if it already was.
    pub fn lost(&mut self) -> bool {
        if self.socket.take().is_none() {
            return false;
        }
        self.queue.clear();
        self.close = None;
        true
    }

    /// The outage begins: the first redial after the backoff's first delay.
    pub fn begin_outage(&mut self, ctx: &SessionContext) -> Result<(), SessionEnd> {
        let mut backoff = Backoff::new(ctx.route.reconnect);
        let Some(delay) = backoff.next_delay() else {
            return Err(SessionEnd::BudgetSpent);
        };
        self.outage = Some(Box::new(Outage {
            backoff,
            wait: Box::pin(tokio::time::sleep(delay)),
            dialing: None,
            buffer: reconnect::Buffer::new(ctx.route.reconnect_buffer),
            params: self.dial.clone(),
        }));
        Ok(())
    }

    /// A redial failed: the next one after the backoff's next delay, or the
    /// session ends once the reconnect budget is spent.
    pub fn redial_failed(&mut self, ctx: &SessionContext, e: &DialError) -> Result<(), SessionEnd> {
        ctx.metrics.redial(e.label());
        let Some(outage) = self.outage.as_mut() else {
            return Ok(());
        };
        outage.dialing = None;
        match outage.backoff.next_delay() {
            Some(delay) => {
                info!(error = %e, attempt = outage.backoff.made() - 1, "redial failed");
                outage.wait.as_mut().reset(Instant::now() + delay);
                Ok(())
            }
            None => {
                warn!(error = %e, "redial failed; reconnect budget spent");
                Err(SessionEnd::BudgetSpent)
            }
        }
    }

    /// A redial succeeded: the upstream is `socket` again. The outage
    /// ended, with what tabs sent meanwhile (None if there was none).
    pub fn restored(
        &mut self,
        ctx: &SessionContext,
        socket: UpstreamSocket,
        protocol: Option<HeaderValue>,
    ) -> Option<Box<Outage>> {
        let outage = self.outage.take()?;
        ctx.metrics.redial("ok");
        ctx.metrics.upstream_up();
        info!(after = outage.backoff.made(), "upstream re-established");
        if protocol != self.protocol {
            warn!(
                "the upstream chose a different subprotocol after the redial; tabs keep the first"
            );
        }
        self.socket = Some(socket);
        self.buffered = true;
        self.alive = Liveness::new();
        Some(outage)
    }

    /// What the reconnect buffer holds, for the budget.
    pub fn buffered_bytes(&self) -> usize {
        self.outage.as_ref().map_or(0, |o| o.buffer.bytes())
    }

    /// The session ends: what is queued is written (close events), then a
    /// clean close, each within the route's `dial_timeout`.
    pub async fn close(&mut self, ctx: &SessionContext, holders: &Holders, charge: &mut Charge) {
        if self.socket.is_none() {
            return;
        }
        let _ = self.flush(ctx.route.idle_timeout, holders, charge).await;
        if let Some(mut up) = self.socket.take() {
            let _ = tokio::time::timeout(ctx.route.dial_timeout, up.close(normal_close())).await;
            ctx.metrics.upstream_down();
        }
    }
}

/// The next upstream frame, or never while the upstream is down. Reads only
/// when there may be something to read (see [`UpstreamSocket::poll_next`]):
/// most of the session's wake-ups are for its commands. (Free functions of
/// the fields they use, this and [`redial`]: the session's loop waits on
/// both at once.)
pub(super) async fn next_frame(
    socket: &mut Option<UpstreamSocket>,
    buffered: &mut bool,
) -> Option<Result<Message, WsError>> {
    match socket {
        Some(up) => poll_fn(|cx| up.poll_next(cx, buffered)).await,
        None => std::future::pending().await,
    }
}

/// Waits out the backoff, then dials; never completes outside an outage.
/// Cancel-safe: the wait and the dial live in the outage, not in this
/// future.
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

/// Holds `unwritten` bytes against the budget as the session's while a
/// write waits; what the session held before.
fn held_while(holders: &Holders, charge: &mut Charge, unwritten: usize) -> usize {
    let before = charge.bytes();
    let _ = holders.budget.set(charge, before + unwritten, || {
        holders.evictor(Holder::Session)
    });
    before
}

/// The close frame tabmux ends an upstream with.
fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}
