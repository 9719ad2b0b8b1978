//! What the machine does with time: the upstream's keepalive (a PINGREQ
//! after half a keepalive without traffic; lost one keepalive after an
//! unanswered one), tabs silent past 1.5 times theirs, filters past their
//! linger, wills past their delay. The session wakes the machine at
//! [`Mqtt::next_deadline`].

use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::{Packet, PingReq};

use super::{DelayedWill, Mqtt, Phase};
use crate::cause::Cause;
use crate::envelope::{Effects, TabId};

impl Mqtt {
    /// Whether the server answered nothing for a keepalive after a PINGREQ
    /// of tabmux's, or sent what is not a packet: the session then treats
    /// its upstream as lost.
    pub fn upstream_silent(&self) -> bool {
        self.silent
    }

    /// When the machine next needs the time: a tab's silence, the
    /// upstream's keepalive, a filter's linger, a will's delay.
    pub fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        if self.silent {
            // Lost: the session reads it at this deadline.
            return Some(now);
        }
        if let Some(d) = self.deadline {
            return Some(d);
        }
        let mut first: Option<Instant> = None;
        let mut consider = |t: Instant| {
            first = Some(first.map_or(t, |f: Instant| f.min(t)));
        };
        for t in self.tabs.values() {
            if let (Some(s), Phase::Connected | Phase::Waiting) = (t.silence, t.phase) {
                consider(t.last_heard + s);
            }
        }
        if let (Some(ka), true) = (self.keepalive, self.connack.is_some()) {
            let at = *self.ping_at.get_or_insert(now + ka / 2);
            consider(at);
            if let Some(sent) = self.ping_sent {
                consider(sent + ka);
            }
        }
        for f in self.filters.values() {
            if let Some(since) = f.orphaned {
                consider(since + self.settings.linger);
            }
        }
        for w in &self.wills {
            consider(w.at);
        }
        self.deadline = first;
        first
    }

    /// A deadline has come at `now`.
    #[inline(never)]
    pub fn on_timeout(&mut self, now: Instant, out: &mut Effects) {
        self.deadline = None;
        self.recount = true;
        let silent: Vec<TabId> = self
            .tabs
            .iter()
            .filter(|(_, t)| {
                matches!(t.phase, Phase::Connected | Phase::Waiting)
                    && t.silence.is_some_and(|s| now >= t.last_heard + s)
            })
            .map(|(&t, _)| t)
            .collect();
        for tab in silent {
            // Closed without a packet, as mosquitto closes it; its will
            // is published as it leaves.
            self.close(tab, Cause::Idle, out);
        }
        if let (Some(ka), Some(at)) = (self.keepalive, self.ping_at) {
            if self.ping_sent.is_some_and(|sent| now >= sent + ka) {
                // Nothing came for a keepalive after a PINGREQ: lost (the
                // session reads `upstream_silent` once this call returns).
                self.silent = true;
            }
            if now >= at {
                if !self.sent_since {
                    self.upstream(&Packet::PingReq(PingReq), out);
                    self.ping_sent.get_or_insert(now);
                }
                self.sent_since = false;
                self.ping_at = Some(now + ka / 2);
            }
        }
        self.expire_lingers(now, out);
        let due: Vec<DelayedWill> = {
            let (due, keep) = std::mem::take(&mut self.wills)
                .into_iter()
                .partition(|w| w.at <= now);
            self.wills = keep;
            due
        };
        for w in due {
            self.publish_will(w.publish, out);
        }
    }
}
