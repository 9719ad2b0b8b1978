//! What the session does when its upstream speaks, goes quiet, goes away
//! or comes back: the envelope hears of it, and tabs are served, closed or
//! announced again. The upstream's socket, writes, outage and redial are
//! `session/uplink.rs`.

use std::future::poll_fn;
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
                self.envelope.upstream_frame(msg, &mut self.effects);
                self.tabs.greeting = self.envelope.greeting_len();
                self.apply_effects()?;
                return self.leave_listed();
            }
            // The stream ends on the next read; its code says why.
            Message::Close(frame) => {
                let closing = frame.map_or(Closing::code(1005), |f| Closing {
                    code: u16::from(f.code),
                    reason: f.reason.to_string(),
                });
                self.uplink.closing(closing);
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
            if self.turn_bytes >= TURN_BYTES {
                break;
            }
            let uplink = &mut self.uplink;
            match poll_fn(|cx| Poll::Ready(uplink.poll_buffered(cx))).await {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(msg))) => {
                    self.uplink.alive.heard();
                    self.upstream_frame(msg)?;
                }
                Poll::Ready(Some(Err(e))) => return self.lose(Lost::Failed(e)),
                Poll::Ready(None) => return self.lose_closed(),
            }
        }
        Ok(())
    }

    /// Keepalive: every tab is pinged (or leaves if it went silent); a
    /// silent upstream is lost, otherwise pinged. One timer per session,
    /// none per tab.
    pub(super) fn tick(&mut self) -> Result<(), SessionEnd> {
        let idle = self.ctx.route.idle_timeout;
        self.tabs.tick(idle);
        self.envelope
            .tick(Instant::now().into_std(), &mut self.effects);
        self.apply_effects()?;
        self.leave_listed()?;
        if !self.uplink.keepalive(idle) {
            return self.lose(Lost::Silent);
        }
        Ok(())
    }

    // ---- losing and regaining the upstream

    /// The upstream's stream ended: lost, with the close frame it sent, if
    /// any.
    pub(super) fn lose_closed(&mut self) -> Result<(), SessionEnd> {
        let why = self.uplink.closed();
        self.lose(why)
    }

    /// The upstream is gone: start redialling, unless no tab needs it.
    pub(super) fn lose(&mut self, why: Lost) -> Result<(), SessionEnd> {
        if !self.uplink.lost() {
            return Ok(());
        }
        self.ctx.metrics.upstream_down();
        self.ctx.metrics.upstream_lost(&why);
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
        self.uplink.begin_outage(self.ctx)
    }

    pub(super) fn redial_failed(&mut self, e: &DialError) -> Result<(), SessionEnd> {
        self.uplink.redial_failed(self.ctx, e)
    }

    /// The upstream is back: the envelope announces the tabs still
    /// connected, in join order, then what they sent meanwhile goes, in
    /// order.
    pub(super) fn restored(&mut self, socket: UpstreamSocket, protocol: Option<HeaderValue>) {
        let Some(mut outage) = self.uplink.restored(self.ctx, socket, protocol) else {
            return;
        };
        let ids = self.tabs.ids();
        let map = &self.tabs.map;
        let members = ids.iter().filter_map(|id| Some((*id, &map.get(id)?.info)));
        self.envelope.upstream_restored(members, &mut self.effects);
        // Open events only, which cannot fail: the upstream is back.
        let _ = self.apply_effects();
        self.tabs.greeting = self.envelope.greeting_len();
        let mut orphaned = 0;
        for (tab, msg, payload) in outage.buffer.drain() {
            if self.tabs.map.contains_key(&tab) {
                self.ctx.metrics.to_upstream(payload);
                self.uplink.queue.push(msg);
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
            .on_timeout(Instant::now().into_std(), &mut self.effects);
        self.apply_effects()?;
        if self.envelope.upstream_silent() {
            return self.lose(Lost::Silent);
        }
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
