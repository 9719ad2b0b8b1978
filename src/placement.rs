//! Tabs placed in their session by their first frame: on a `graphql` route
//! a connection is authenticated by the payload of its `connection_init`,
//! on an `mqtt` route by its CONNECT, so the session a tab belongs to (the
//! upstream connection it would open) is known only once that frame has
//! come (docs/protocol.md, "The `graphql` envelope", "The `mqtt`
//! envelope"). MQTT is `place_mqtt`, at the end.
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

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

use crate::cause::{Cause, Refusal};
use crate::envelope::graphql::{wire, Subprotocol};
use crate::envelope::mqtt::codec as mqtt_codec;
use crate::envelope::JoinInfo;
use crate::queue::Outbox;
use crate::session::key::SessionKey;
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
    /// An `mqtt` route: whether the tab was answered with `mqtt` (else
    /// with no subprotocol). None on a `graphql` route.
    pub mqtt: Option<bool>,
    /// The query string, as it keys the session.
    pub keyed_query: String,
    pub new: NewSession,
    pub info: JoinInfo,
}

/// Reads the tab until its `connection_init`, then joins it to its
/// session; or closes it.
pub async fn place(mut tab: Tab, p: Placement) {
    if let Some(offered) = p.mqtt {
        return place_mqtt(tab, p, offered).await;
    }
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
    if let Err((tab, refused)) = join(tab, p, key, init).await {
        tab.finish(refused_cause(&refused), Outbox::default(), None);
    }
}

/// Joins a placed tab to the session `key` (dialling it if it is the
/// first), with the frame that placed it, and hands its connection over;
/// or gives the tab back with the refusal (counted and logged here).
async fn join(
    mut tab: Tab,
    p: Placement,
    key: SessionKey,
    init: Message,
) -> Result<(), (Tab, Refusal)> {
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
            Ok(())
        }
        Err(refused) => {
            if let Some(label) = refused.row().label {
                p.rt.ctx.metrics.refused(label);
            }
            debug!(reason = %refused.row().body, "tab not placed");
            Err((tab, refused))
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

/// Messages a tab may send before its CONNECT is whole (mqtt.js in node
/// sends one per field: 17 for a CONNECT with a will and a login).
const BEFORE_CONNECT: usize = 64;

/// Reads an `mqtt` tab until its CONNECT is whole, then joins it to the
/// session of its CONNECT's identity (docs/protocol.md, "The `mqtt`
/// envelope"); or answers it as a broker would and closes it.
async fn place_mqtt(mut tab: Tab, p: Placement, offered: bool) {
    let route = &p.rt.route;
    let read = tokio::time::timeout(
        route.init_timeout,
        first_packet(&mut tab, route.max_message_size),
    );
    let (bytes, connect_len) = match read.await {
        Err(_) => return close(tab, 1008, "no CONNECT"),
        Ok(Err(cause)) => return tab.finish(cause, Outbox::default(), None),
        Ok(Ok(read)) => read,
    };
    let identity = mqtt_codec::identity(&bytes[..connect_len]);
    let identity = match identity {
        Some(id) if (id.level == 4 || id.level == 5) && &id.protocol_name[..] == b"MQTT" => id,
        // MQTT 3.1 (MQIsdp) and other levels: CONNACK 1, unacceptable
        // protocol version, as 3.1.1 servers answer it.
        Some(_) => {
            let _ = answer(
                &mut tab,
                Message::Binary(Bytes::from_static(&[0x20, 2, 0, 1])),
            )
            .await;
            return close(tab, 1002, "unacceptable protocol version");
        }
        None => {
            return tab.finish(Cause::ProtocolError, Outbox::default(), None);
        }
    };
    let subprotocol: &[u8] = if offered { b"mqtt" } else { b"" };
    let key = match &p.cookie {
        // Enhanced authentication: a session of its own.
        Some(cookie) if !identity.enhanced_auth => p.shared.hasher.shared_by_init(
            &route.path,
            cookie,
            subprotocol,
            p.keyed_query.as_bytes(),
            &identity.key(),
        ),
        _ => p.shared.hasher.direct(),
    };
    let level = identity.level;
    drop(identity);
    if let Err((mut tab, refused)) = join(tab, p, key, Message::Binary(bytes)).await {
        let (connack, cause) = mqtt_refusal(&refused, level);
        let _ = answer(&mut tab, Message::Binary(connack)).await;
        tab.finish(cause, Outbox::default(), None);
    }
}

/// The CONNACK a refused join answers, and how the tab is closed then.
fn mqtt_refusal(refused: &Refusal, level: u8) -> (Bytes, Cause) {
    use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, ConnectReturnCode, Packet};
    let (code, cause) = match refused {
        Refusal::Dial(DialError::Refused(status)) if matches!(status.as_u16(), 401 | 403) => {
            (ConnectReturnCode::NotAuthorized, None)
        }
        Refusal::Dial(_) | Refusal::Gone => (ConnectReturnCode::ServerUnavailable, None),
        other => {
            let reason = crate::cause::close_reason(other.row().body.into_owned());
            (
                ConnectReturnCode::QuotaExceeded,
                Some(Cause::Subprotocol { code: 1013, reason }),
            )
        }
    };
    let level = if level == 5 {
        mqtt_codec::Level::V5
    } else {
        mqtt_codec::Level::V4
    };
    let properties = match (&cause, level) {
        (Some(Cause::Subprotocol { reason, .. }), mqtt_codec::Level::V5) => {
            Some(ConnAckProperties {
                reason_string: Some(reason.clone()),
                ..crate::envelope::mqtt::empty_connack_properties()
            })
        }
        _ => None,
    };
    let packet = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties,
    });
    let cause = cause.unwrap_or(Cause::Subprotocol {
        code: 1000,
        reason: String::new(),
    });
    (mqtt_codec::write(level, &packet), cause)
}

/// The tab's bytes until its first packet is whole, and that packet's
/// length; a first packet that is not a CONNECT closes the tab, as a
/// broker closes it.
async fn first_packet(tab: &mut Tab, max: usize) -> Result<(Bytes, usize), Cause> {
    let mut buf = BytesMut::new();
    for _ in 0..BEFORE_CONNECT {
        let msg = poll_fn(|cx| tab.poll_message(cx, &mut 0)).await?;
        match &msg {
            Message::Binary(b) => buf.extend_from_slice(b),
            Message::Text(t) => buf.extend_from_slice(t.as_bytes()),
            _ => continue,
        }
        if buf.first().is_some_and(|b| b >> 4 != 1) {
            return Err(Cause::ProtocolError);
        }
        match mqtt_codec::fixed_header(&buf) {
            Err(_) => return Err(Cause::ProtocolError),
            Ok(None) => {}
            Ok(Some((header, remaining))) => {
                let len = header + remaining;
                if len > max {
                    return Err(Cause::TooBig);
                }
                if buf.len() >= len {
                    return Ok((buf.freeze(), len));
                }
            }
        }
    }
    Err(Cause::ProtocolError)
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
