//! The session's upstream half: its frames, its writes, its keepalive, and
//! losing and regaining it (the redial itself and the outage's state are in
//! `session/outage.rs`).

use std::future::{poll_fn, Future};
use std::task::Poll;

use http::HeaderValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use super::*;

impl Session<'_> {
    /// An upstream frame: data goes to the envelope, and the tabs its
    /// effects closed leave. Its bytes count toward the session's turn.
    pub(super) fn upstream_frame(&mut self, msg: Message) -> Result<(), SessionEnd> {
        self.turn_bytes += msg.len();
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                self.envelope.upstream_frame(msg, apply!(self));
                self.tabs.greeting = self.envelope.greeting_len();
                return self.leave_listed();
            }
            // The stream ends on the next read; its code says why.
            Message::Close(frame) => {
                let closing = frame.map_or(Closing::code(1005), |f| Closing {
                    code: u16::from(f.code),
                    reason: f.reason.to_string(),
                });
                self.upstream_close = Some(Box::new(closing));
            }
            // Pings are answered by tungstenite.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Ok(())
    }

    /// Handles the upstream frames tungstenite already holds, up to a
    /// batch, so that a burst from the backend reaches each tab as one write.
    pub(super) async fn more_upstream_frames(&mut self) -> Result<(), SessionEnd> {
        for _ in 1..BATCH {
            if !self.upstream_buffered || self.turn_bytes >= TURN_BYTES {
                break;
            }
            let Some(up) = self.upstream.as_mut() else {
                break;
            };
            let buffered = &mut self.upstream_buffered;
            match poll_fn(|cx| Poll::Ready(up.poll_next(cx, buffered))).await {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(msg))) => {
                    self.upstream_alive.heard();
                    self.upstream_frame(msg)?;
                }
                Poll::Ready(Some(Err(e))) => return self.lose(Lost::Failed(e)),
                Poll::Ready(None) => return self.lose_closed(),
            }
        }
        Ok(())
    }

    /// Writes what is pending to the upstream. A write that cannot finish
    /// within `idle_timeout` (the backend stopped reading) is a loss.
    pub(super) async fn flush_upstream(&mut self) -> Result<(), Lost> {
        let Some(up) = self.upstream.as_mut() else {
            self.to_upstream.clear();
            return Ok(());
        };
        if self.to_upstream.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.to_upstream);
        let unwritten: usize = pending.iter().map(Message::len).sum();
        let write = up.send_all(pending);
        tokio::pin!(write);
        // Nearly every write completes at once; only one that has to wait
        // pays for a timer, and holds its messages against the budget
        // meanwhile (the session reads no tab until it is done).
        let written = match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => {
                let held = held_while(&self.tabs.holders, &mut self.charge, unwritten);
                let r = Box::pin(tokio::time::timeout(self.ctx.route.idle_timeout, write)).await;
                self.tabs
                    .holders
                    .budget
                    .set(&mut self.charge, held, || Box::new(|| {}));
                r
            }
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Lost::Failed(e)),
            Err(_) => Err(Lost::Stalled),
        }
    }

    /// Keepalive: every tab is pinged (or leaves if it went silent); a
    /// silent upstream is lost, otherwise pinged. One timer per session,
    /// none per tab.
    pub(super) fn tick(&mut self) -> Result<(), SessionEnd> {
        let idle = self.ctx.route.idle_timeout;
        self.tabs.tick(idle);
        self.envelope.tick(Instant::now().into_std(), apply!(self));
        self.leave_listed()?;
        if self.upstream.is_none() {
            return Ok(());
        }
        if self.upstream_alive.silent_for(idle) {
            return self.lose(Lost::Silent);
        }
        self.to_upstream.push(Message::Ping(Default::default()));
        Ok(())
    }

    // ---- losing and regaining the upstream

    /// The upstream's stream ended: lost, with the close frame it sent, if
    /// any.
    pub(super) fn lose_closed(&mut self) -> Result<(), SessionEnd> {
        let close = self.upstream_close.take().map(|c| *c);
        self.lose(Lost::Closed(close))
    }

    /// The upstream is gone: start redialling, unless no tab needs it.
    pub(super) fn lose(&mut self, why: Lost) -> Result<(), SessionEnd> {
        if self.upstream.take().is_none() {
            return Ok(());
        }
        self.ctx.metrics.upstream_down();
        self.to_upstream.clear();
        self.upstream_close = None;
        if let Some(cause) = self.envelope.upstream_lost(&why) {
            // This envelope's clients reconnect themselves: no redial.
            info!(reason = %why, tabs = self.tabs.len(), cause = %cause, "upstream lost; closing its tabs");
            self.gone = Some(Box::new(cause));
            return Err(SessionEnd::UpstreamGone);
        }
        if self.tabs.is_empty() {
            debug!(reason = %why, "upstream lost while no tab was connected; ending the session");
            return Err(SessionEnd::LostIdle);
        }
        warn!(reason = %why, tabs = self.tabs.len(), "upstream lost; redialling");
        let mut backoff = Backoff::new(self.ctx.route.reconnect);
        let Some(delay) = backoff.next_delay() else {
            return Err(SessionEnd::BudgetSpent);
        };
        self.outage = Some(Box::new(Outage {
            backoff,
            wait: Box::pin(tokio::time::sleep(delay)),
            dialing: None,
            buffer: reconnect::Buffer::new(self.ctx.route.reconnect_buffer),
            params: self.dial.clone(),
        }));
        Ok(())
    }

    pub(super) fn redial_failed(&mut self, e: &DialError) -> Result<(), SessionEnd> {
        self.ctx.metrics.redial(e.label());
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

    /// The upstream is back: the envelope announces the tabs still
    /// connected, in join order, then what they sent meanwhile goes, in
    /// order.
    pub(super) fn restored(&mut self, socket: UpstreamSocket, protocol: Option<HeaderValue>) {
        let Some(mut outage) = self.outage.take() else {
            return;
        };
        self.ctx.metrics.redial("ok");
        self.ctx.metrics.upstream_up();
        info!(after = outage.backoff.made(), "upstream re-established");
        if protocol != self.protocol {
            warn!(
                "the upstream chose a different subprotocol after the redial; tabs keep the first"
            );
        }
        self.upstream = Some(socket);
        // Bytes that followed the handshake may already be buffered.
        self.upstream_buffered = true;
        self.upstream_alive = Liveness::new();
        let ids = self.tabs.ids();
        let map = &self.tabs.map;
        let members = ids.iter().filter_map(|id| Some((*id, &map.get(id)?.info)));
        let mut opens = Vec::new();
        self.envelope.upstream_restored(members, &mut opens);
        for effect in opens {
            Effects::effect(apply!(self), effect);
        }
        self.tabs.greeting = self.envelope.greeting_len();
        let mut orphaned = 0;
        for (tab, msg, payload) in outage.buffer.drain() {
            if self.tabs.map.contains_key(&tab) {
                self.ctx.metrics.to_upstream(payload);
                self.to_upstream.push(msg);
            } else {
                orphaned += 1;
            }
        }
        if orphaned > 0 {
            // Their tabs left during the outage; the backend never saw them go.
            self.ctx.metrics.dropped("tab_left_during_outage", orphaned);
        }
    }

    /// The envelope's deadline came: it does its time-driven work (pings
    /// its upstream, lets lingering channels go).
    pub(super) fn on_deadline(&mut self) -> Result<(), SessionEnd> {
        self.deadline = None;
        self.envelope
            .on_timeout(Instant::now().into_std(), apply!(self));
        self.leave_listed()
    }

    /// Sets the envelope's timer to its next deadline, if that moved (the
    /// timer is kept and reset, not made anew). Only an envelope that keeps
    /// time reads the clock; for the others this is one check, inline (the
    /// hot code's size is measured, BENCHMARKS.md).
    #[inline]
    pub(super) fn rearm_deadline(&mut self) {
        if self.envelope.keeps_time() {
            self.rearm_deadline_now();
        }
    }

    #[cold]
    #[inline(never)]
    fn rearm_deadline_now(&mut self) {
        let next = self
            .envelope
            .next_deadline(|| Instant::now().into_std())
            .map(Instant::from_std);
        match (next, self.deadline.as_mut()) {
            (None, _) => self.deadline = None,
            (Some(at), Some(sleep)) if sleep.deadline() == at => {}
            (Some(at), Some(sleep)) => sleep.as_mut().reset(at),
            (Some(at), None) => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
}
