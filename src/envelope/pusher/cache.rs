//! Cache channels (`cache-…`, `private-cache-…`, `private-encrypted-cache-…`,
//! `presence-cache-…`): each keeps its last event, so that a tab that
//! subscribes later is given it, or `pusher:cache_miss`, as the server
//! gives a new subscriber.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::Pusher;

pub(super) fn is_cache(name: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// What a tab that subscribes to cache channel `name` later is given: its
/// last event, or `pusher:cache_miss`.
pub(super) fn cached_or_miss(name: &str, last_event: Option<&Message>) -> Message {
    last_event.cloned().unwrap_or_else(|| {
        Message::text(
            json!({"event": "pusher:cache_miss", "channel": name, "data": "{}"}).to_string(),
        )
    })
}

impl Pusher {
    /// An event on channel `name`: kept as its last if it is a cache
    /// channel.
    pub(super) fn remember(&mut self, name: &str, msg: &Message) {
        if is_cache(name) {
            self.recount = true;
            if let Some(ch) = self.channels.get_mut(name) {
                ch.last_event = Some(msg.clone());
            }
        }
    }

    /// `pusher:cache_miss`: the channel has no last event.
    pub(super) fn forget_last(&mut self, name: &str) {
        if let Some(ch) = self.channels.get_mut(name) {
            ch.last_event = None;
        }
    }
}
