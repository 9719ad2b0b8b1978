//! `envelope = "none"` (docs/protocol.md, "The `none` envelope"): for backends that
//! cannot be changed. Tab frames go upstream unchanged, every upstream frame
//! goes to every tab, and the first `replay_first` upstream frames (a
//! protocol's greeting) are replayed, in order, to each tab that joins later.

use std::time::Instant;

use tokio_tungstenite::tungstenite::Message;

use super::{Effect, Effects, Forward, TabId, Target};
use crate::cause::Cause;
use crate::config::Route;

/// The `none` envelope's state: the greeting kept for later tabs.
#[derive(Debug)]
pub struct Passthrough {
    replay_first: usize,
    max_message_size: usize,
    /// The first `replay_first` frames of the current upstream connection.
    replay: Vec<Message>,
}

impl Passthrough {
    pub fn new(route: &Route) -> Passthrough {
        Passthrough::with(route.replay_first, route.max_message_size)
    }

    /// The machine for these settings (tests).
    pub fn with(replay_first: usize, max_message_size: usize) -> Passthrough {
        Passthrough {
            replay_first,
            max_message_size,
            replay: Vec::new(),
        }
    }

    /// A later tab is sent the greeting, ahead of everything else.
    pub fn tab_joined(&mut self, tab: TabId, out: &mut Effects) {
        for msg in &self.replay {
            out.push(Effect::Answer {
                tab,
                msg: msg.clone(),
            });
        }
    }

    /// What a tab sends goes upstream as it is.
    #[inline]
    pub fn tab_sent(
        &mut self,
        tab: TabId,
        msg: Message,
        _now: impl FnOnce() -> Instant,
        out: &mut Effects,
    ) -> Result<(), Cause> {
        out.push(Effect::Forward(
            tab,
            Forward {
                payload: msg.len(),
                frame: msg,
            },
        ));
        Ok(())
    }

    /// A tab left: nothing to tell the upstream, which never knew of it.
    pub fn tab_left(&mut self, _tab: TabId, _code: u16, _now: Instant, _out: &mut Effects) {}

    /// Every frame reaches every tab; a frame over `max_message_size`
    /// reaches none and closes them all (1009).
    #[inline]
    pub fn upstream_frame(&mut self, msg: Message, out: &mut Effects) {
        let len = msg.len();
        if len > self.max_message_size {
            return out.push(Effect::Close {
                to: Target::All,
                cause: Cause::TooBig,
            });
        }
        // Kept only once it is known to be deliverable: a later tab must
        // not be sent what no tab may receive.
        if self.replay.len() < self.replay_first {
            self.replay.push(msg.clone());
        }
        out.push(Effect::Deliver {
            to: Target::All,
            msg,
            len,
        });
    }

    /// A new connection greets anew: later tabs get its greeting.
    pub fn upstream_restored(&mut self) {
        self.replay.clear();
    }

    /// Frames a joining tab is sent beyond `tab_queue`.
    pub fn greeting_len(&self) -> usize {
        self.replay.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(msg: Message) -> Effect {
        let len = msg.len();
        Effect::Deliver {
            to: Target::All,
            msg,
            len,
        }
    }

    #[test]
    fn tab_frames_go_upstream_unchanged() {
        for msg in [Message::text("{not json"), Message::binary(vec![0u8, 1])] {
            let mut out = Vec::new();
            Passthrough::with(0, 64)
                .tab_sent(TabId(3), msg.clone(), Instant::now, &mut out)
                .unwrap();
            let forward = Forward {
                payload: msg.len(),
                frame: msg,
            };
            assert_eq!(out, [Effect::Forward(TabId(3), forward)]);
        }
    }

    #[test]
    fn every_upstream_frame_goes_to_every_tab() {
        let mut m = Passthrough::with(0, 64);
        let mut out = Vec::new();
        m.upstream_frame(Message::text("a"), &mut out);
        m.upstream_frame(Message::binary(vec![7u8]), &mut out);
        assert_eq!(
            out,
            [all(Message::text("a")), all(Message::binary(vec![7u8]))]
        );
        out.clear();
        m.tab_joined(TabId(1), &mut out);
        assert_eq!(out, [], "no greeting without replay_first");
    }

    #[test]
    fn the_first_frames_are_replayed_in_order_to_later_tabs() {
        let mut m = Passthrough::with(2, 64);
        let mut out = Vec::new();
        for s in ["hello", "ready", "event"] {
            m.upstream_frame(Message::text(s), &mut out);
        }
        assert_eq!(m.greeting_len(), 2);
        out.clear();
        m.tab_joined(TabId(4), &mut out);
        assert_eq!(
            out,
            [
                Effect::Answer {
                    tab: TabId(4),
                    msg: Message::text("hello")
                },
                Effect::Answer {
                    tab: TabId(4),
                    msg: Message::text("ready")
                },
            ]
        );
        // A new upstream connection greets anew.
        m.upstream_restored();
        assert_eq!(m.greeting_len(), 0);
        m.upstream_frame(Message::text("hello again"), &mut out);
        out.clear();
        m.tab_joined(TabId(5), &mut out);
        assert_eq!(
            out,
            [Effect::Answer {
                tab: TabId(5),
                msg: Message::text("hello again")
            }]
        );
    }

    #[test]
    fn a_frame_over_max_message_size_closes_every_tab_and_is_not_kept() {
        let mut m = Passthrough::with(1, 4);
        let mut out = Vec::new();
        m.upstream_frame(Message::text("too long"), &mut out);
        assert_eq!(
            out,
            [Effect::Close {
                to: Target::All,
                cause: Cause::TooBig
            }]
        );
        assert_eq!(m.greeting_len(), 0, "an undeliverable frame is no greeting");
    }
}
