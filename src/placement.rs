//! Tabs placed in their session by their first frame: on a `graphql` route
//! a connection is authenticated by the payload of its `connection_init`,
//! so the session a tab belongs to (the upstream connection it would open)
//! is known only once that frame has come (docs/protocol.md, "The `graphql`
//! envelope").
//!
//! The tab's handshake is answered at once, with the subprotocol it
//! offered; then this task reads the tab until its `connection_init`,
//! within the route's `init_timeout` (4408 otherwise), answering its pings
//! meanwhile. The session key is then made of the cookie, the subprotocol,
//! the query and the init payload as canonical JSON (key order and spacing
//! do not matter; nothing of it is kept), the tab joins that session
//! (dialling it if it is the first), and the session serves the tab from
//! there, starting with its `connection_init`. A refused join closes the
//! tab with the code a graphql-ws server would use: 4401 or 4403 for an
//! upstream that refused the handshake, 1012 for one that could not be
//! reached, 1013 naming the limit for a session limit.

use std::future::poll_fn;
use std::sync::Arc;

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

use crate::cause::{Cause, Refusal};
use crate::envelope::graphql::{wire, Subprotocol};
use crate::envelope::JoinInfo;
use crate::queue::Outbox;
use crate::session::NewSession;
use crate::shared::{RouteRuntime, Shared};
use crate::tab::Tab;
use crate::upstream::DialError;

/// Messages a tab may send before its `connection_init` (pings, pongs):
/// beyond, it is closed (4400).
const BEFORE_INIT: usize = 16;

/// What the tab's handshake decided, for placing it once its first frame
/// has come.
pub struct Placement {
    pub shared: Arc<Shared>,
    pub rt: Arc<RouteRuntime>,
    /// The session cookie's values (None: a session of its own,
    /// `missing_cookie = "direct"`).
    pub cookie: Option<Vec<u8>>,
    /// The subprotocol the tab was answered with (None: it offered neither).
    pub protocol: Option<Subprotocol>,
    /// The query string, as it keys the session.
    pub keyed_query: String,
    pub new: NewSession,
    pub info: JoinInfo,
}

/// Reads the tab until its `connection_init`, then joins it to its
/// session; or closes it.
pub async fn place(mut tab: Tab, p: Placement) {
    let Some(protocol) = p.protocol else {
        return close(tab, 4406, "Subprotocol not acceptable");
    };
    let route = &p.rt.route;
    let read = tokio::time::timeout(route.init_timeout, connection_init(&mut tab, protocol));
    let (init, canonical) = match read.await {
        Err(_) => return close(tab, 4408, "Connection initialisation timeout"),
        Ok(Err(cause)) => return tab.finish(cause, Outbox::default(), None),
        Ok(Ok(init)) => init,
    };
    let key = match &p.cookie {
        Some(cookie) => p.shared.hasher.shared_by_init(
            &route.path,
            cookie,
            protocol.name().as_bytes(),
            p.keyed_query.as_bytes(),
            canonical.as_bytes(),
        ),
        None => p.shared.hasher.direct(),
    };
    drop(canonical);
    tracing::Span::current().record("session", tracing::field::display(key.name()));
    match p
        .shared
        .registry
        .join(&p.rt.ctx, key, &p.new, p.info, Some(init))
        .await
    {
        Ok(joined) => {
            tab.set_id(joined.tab);
            joined.link.attach(Box::new(tab));
        }
        Err(refused) => {
            if let Some(label) = refused.row().label {
                p.rt.ctx.metrics.refused(label);
            }
            debug!(reason = %refused.row().body, "tab not placed");
            tab.finish(refused_cause(&refused), Outbox::default(), None);
        }
    }
}

/// How a tab whose join was refused is closed, as a graphql-ws server
/// would close it.
fn refused_cause(refused: &Refusal) -> Cause {
    let (code, reason) = match refused {
        Refusal::Dial(DialError::Refused(status)) if status.as_u16() == 401 => {
            (4401, "Unauthorized".to_string())
        }
        Refusal::Dial(DialError::Refused(_)) => (4403, "Forbidden".to_string()),
        Refusal::Dial(_) | Refusal::Gone => return Cause::UpstreamLost,
        // A limit of tabmux's: its refusal's text names it.
        other => {
            let reason = crate::cause::close_reason(other.row().body.into_owned());
            return Cause::Subprotocol { code: 1013, reason };
        }
    };
    Cause::Backend { code, reason }
}

/// Closes a tab that was never placed, with a code of the subprotocol.
fn close(tab: Tab, code: u16, reason: &str) {
    let cause = Cause::Subprotocol {
        code,
        reason: reason.into(),
    };
    tab.finish(cause, Outbox::default(), None);
}

/// The tab's `connection_init`, and its payload as canonical JSON (`null`
/// when it has none); pings before it are answered. Anything else before
/// it closes the tab as a graphql-ws server would (legacy: answered with an
/// `error`, as subscriptions-transport-ws answers).
async fn connection_init(tab: &mut Tab, protocol: Subprotocol) -> Result<(Message, String), Cause> {
    let legacy = protocol == Subprotocol::Legacy;
    let bad = |reason: String| Cause::Subprotocol {
        code: 4400,
        reason: crate::cause::close_reason(reason),
    };
    for _ in 0..BEFORE_INIT {
        let msg = poll_fn(|cx| tab.poll_message(cx, &mut 0)).await?;
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Binary(b) => std::str::from_utf8(b).unwrap_or(""),
            _ => continue,
        };
        let frame = match wire::read(text) {
            Ok(f) => f,
            Err(why) if legacy => {
                answer(tab, wire::legacy_error(None, &why)).await?;
                continue;
            }
            Err(why) => return Err(bad(why)),
        };
        match frame.kind.as_str() {
            "connection_init" => {
                let payload = frame.payload.map_or("null", |p| p.get());
                if !legacy && payload != "null" && !payload.starts_with('{') {
                    return Err(bad(
                        "\"connection_init\" message expects the 'payload' property to be an object or nullish or missing".into(),
                    ));
                }
                let value: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
                let mut canonical = String::with_capacity(payload.len());
                wire::canonical(&value, &mut canonical);
                return Ok((msg, canonical));
            }
            "ping" if !legacy => {
                let pong = wire::without_id("pong", frame.payload.map(|p| p.get()));
                answer(tab, pong).await?;
            }
            "pong" | "complete" if !legacy => {}
            "subscribe" if !legacy => {
                return Err(Cause::Subprotocol {
                    code: 4401,
                    reason: "Unauthorized".into(),
                })
            }
            "stop" if legacy => {}
            "connection_terminate" if legacy => {
                return Err(Cause::Subprotocol {
                    code: 1000,
                    reason: String::new(),
                })
            }
            kind if legacy => {
                let why = format!("{kind} before connection_init");
                answer(tab, wire::legacy_error(frame.id.as_deref(), &why)).await?;
            }
            kind => {
                let why = format!("Invalid message 'type' property \"{kind}\"");
                return Err(bad(why));
            }
        }
    }
    Err(bad(format!(
        "more than {BEFORE_INIT} messages before connection_init"
    )))
}

/// Writes one frame to a tab that is not in a session yet.
async fn answer(tab: &mut Tab, msg: Message) -> Result<(), Cause> {
    let mut outbox = Outbox::default();
    let mut msg = Some(msg);
    poll_fn(|cx| {
        if let Some(m) = msg.take() {
            tab.send(cx, m, &mut outbox);
        }
        tab.poll_write(cx, &mut outbox)
    })
    .await
}
