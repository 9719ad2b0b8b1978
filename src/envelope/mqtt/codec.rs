//! MQTT packets read from and written to a byte stream, at either protocol
//! level, with one packet model.
//!
//! The codec is rumqttc's `mqttbytes` (3.1.1 and 5.0, maintained with the
//! client). The machine works on its 5.0 types at both levels: a 3.1.1
//! packet is read with the 3.1.1 codec and carried into the 5.0 model (no
//! properties, reason codes mapped), and written back the same way. What is
//! written here, and why the crate does not give it:
//!
//! - [`Stream`]: reassembly of a WebSocket byte stream, with the size
//!   limit checked from the fixed header before the body has come (the
//!   crate reads from a complete buffer);
//! - packets without a body (PINGREQ, PINGRESP, a DISCONNECT or AUTH with
//!   reason 0 and no properties): the crate's 5.0 reader refuses a
//!   DISCONNECT of remaining length 0, which 5.0 allows and clients send;
//! - a 5.0 DISCONNECT with a reason code and no properties: the crate
//!   writes it with a remaining length one short of its body, and its
//!   reader wants properties after the reason code;
//! - [`Identity`]: the CONNECT's level, user name and password as bytes,
//!   telling no user name from an empty one (the crate's `Login` does not);
//! - the conversion between the levels.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{
    self as v5, ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet, PingReq,
    PingResp, Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;

/// The protocol level of a connection (its CONNECT's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// MQTT 3.1.1 (level 4).
    V4,
    /// MQTT 5.0 (level 5).
    V5,
}

/// Why a stream cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// A packet over the size allowed (its whole size).
    TooLarge(usize),
    /// Not a packet of the protocol: the reason, for logs and a 5.0
    /// DISCONNECT's Reason String.
    Malformed(String),
}

/// One direction of a connection's bytes, reassembled into packets.
#[derive(Debug, Default)]
pub struct Stream {
    buf: BytesMut,
}

impl Stream {
    /// Takes a WebSocket message's bytes into the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes held (a packet not yet complete).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether no byte waits.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next whole packet, as its bytes, if it has come; `max` bounds a
    /// packet's whole size (checked as soon as its header has come).
    pub fn next_raw(&mut self, max: usize) -> Result<Option<BytesMut>, Bad> {
        let Some((header, remaining)) = fixed_header(&self.buf)? else {
            return Ok(None);
        };
        let total = header + remaining;
        if total > max {
            return Err(Bad::TooLarge(total));
        }
        if self.buf.len() < total {
            // Room for the rest at once, not by doubling.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let raw = self.buf.split_to(total);
        if self.buf.is_empty() {
            // A drained buffer keeps nothing for an idle connection.
            self.buf = BytesMut::new();
        }
        Ok(Some(raw))
    }

    /// The next whole packet, read at `level`.
    pub fn next(&mut self, level: Level, max: usize) -> Result<Option<Packet>, Bad> {
        match self.next_raw(max)? {
            Some(raw) => read(level, raw).map(Some),
            None => Ok(None),
        }
    }
}

/// The size of a packet's fixed header and its remaining length, once
/// both are there.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, Bad> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(Bad::Malformed("malformed remaining length".into()))
}

fn malformed(e: impl std::fmt::Display) -> Bad {
    Bad::Malformed(e.to_string())
}

/// Reads one whole packet (`raw`, from [`Stream::next_raw`]: read in
/// place, not copied).
pub fn read(level: Level, raw: impl Into<BytesMut>) -> Result<Packet, Bad> {
    let mut raw: BytesMut = raw.into();
    if raw.len() < 2 {
        return Err(Bad::Malformed("a packet of less than 2 bytes".into()));
    }
    let kind = raw[0] >> 4;
    if raw.len() == 2 {
        // No body: the crate's 5.0 reader takes only pings so.
        return match (kind, raw[0] & 0x0f) {
            (12, 0) => Ok(Packet::PingReq(PingReq)),
            (13, 0) => Ok(Packet::PingResp(PingResp)),
            (14, 0) => Ok(Packet::Disconnect(Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
                properties: None,
            })),
            // AUTH with reason 0 and no properties, read in its long form.
            (15, 0) if level == Level::V5 => {
                Packet::read(&mut BytesMut::from(&[0xf0, 2, 0, 0][..]), None).map_err(malformed)
            }
            _ => Err(Bad::Malformed(format!("packet type {kind} without a body"))),
        };
    }
    if level == Level::V5 && kind == 14 && raw.len() == 3 {
        // A DISCONNECT with its reason code alone (5.0 allows it; the
        // crate's reader wants properties after it).
        return DisconnectReasonCode::try_from(raw[2])
            .map(|reason_code| {
                Packet::Disconnect(Disconnect {
                    reason_code,
                    properties: None,
                })
            })
            .map_err(malformed);
    }
    let len = raw.len();
    match level {
        Level::V5 => Packet::read(&mut raw, None).map_err(malformed),
        Level::V4 => match kind {
            // The same at both levels when they carry no reason code.
            4..=7 => {
                if len != 4 {
                    return Err(Bad::Malformed("acknowledgement of a wrong size".into()));
                }
                Packet::read(&mut raw, None).map_err(malformed)
            }
            _ => v4::Packet::read(&mut raw, len)
                .map_err(malformed)
                .and_then(from_v4),
        },
    }
}

/// Writes a packet at `level` into a buffer of its own.
pub fn write(level: Level, packet: &Packet) -> Bytes {
    if let (Level::V5, Packet::Disconnect(d)) = (level, packet) {
        if d.properties.is_none() && d.reason_code != DisconnectReasonCode::NormalDisconnection {
            // rumqttc 0.25 writes this one with a remaining length one
            // short of its body; 5.0 allows the reason code alone.
            return Bytes::from(vec![0xe0, 1, d.reason_code as u8]);
        }
    }
    let mut buf = BytesMut::with_capacity(packet.size() + 8);
    let written = match level {
        Level::V5 => packet.write(&mut buf, None).is_ok(),
        Level::V4 => match to_v4(packet) {
            Some(Ok(p)) => p.write(&mut buf, usize::MAX).is_ok(),
            Some(Err(())) => false,
            None => packet.write(&mut buf, None).is_ok(),
        },
    };
    if !written {
        // Only what tabmux itself composed is written; a packet the codec
        // cannot write (a field out of its range) is logged and sent as
        // nothing rather than as a broken one.
        tracing::warn!(?packet, "an MQTT packet could not be written");
        return Bytes::new();
    }
    buf.freeze()
}

/// A 3.1.1 QoS in the 5.0 model.
fn qos_from_v4(q: rumqttc::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v4(q: QoS) -> rumqttc::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A 3.1.1 packet in the 5.0 model.
fn from_v4(p: v4::Packet) -> Result<Packet, Bad> {
    Ok(match p {
        v4::Packet::Connect(c) => {
            let will = c.last_will.map(|w| v5::LastWill {
                topic: Bytes::from(w.topic),
                message: w.message,
                qos: qos_from_v4(w.qos),
                retain: w.retain,
                properties: None,
            });
            let login = c.login.map(|l| v5::Login {
                username: l.username,
                password: l.password,
            });
            let connect = v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            };
            Packet::Connect(connect, will, login)
        }
        v4::Packet::ConnAck(a) => {
            use v4::ConnectReturnCode as C;
            let code = match a.code {
                C::Success => ConnectReturnCode::Success,
                C::RefusedProtocolVersion => ConnectReturnCode::RefusedProtocolVersion,
                C::BadClientId => ConnectReturnCode::BadClientId,
                C::ServiceUnavailable => ConnectReturnCode::ServiceUnavailable,
                C::BadUserNamePassword => ConnectReturnCode::BadUserNamePassword,
                C::NotAuthorized => ConnectReturnCode::NotAuthorized,
            };
            Packet::ConnAck(ConnAck {
                session_present: a.session_present,
                code,
                properties: None,
            })
        }
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos_from_v4(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v5::Filter {
                    path: f.path,
                    qos: qos_from_v4(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: v5::RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::SubAck(s) => Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => {
                        SubscribeReasonCode::Success(qos_from_v4(q))
                    }
                    v4::SubscribeReasonCode::Failure => SubscribeReasonCode::Failure,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons: Vec::new(),
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(PingReq),
        v4::Packet::PingResp => Packet::PingResp(PingResp),
        v4::Packet::Disconnect => Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties: None,
        }),
        other => return Err(Bad::Malformed(format!("unexpected {other:?}"))),
    })
}

/// A 5.0-model packet as 3.1.1 writes it: None for the packets that are
/// the same at both levels (acknowledgements without a reason, pings);
/// `Err` for one 3.1.1 has no form for (AUTH, a DISCONNECT to a client).
fn to_v4(p: &Packet) -> Option<Result<v4::Packet, ()>> {
    Some(Ok(match p {
        Packet::Connect(c, will, login) => v4::Packet::Connect(v4::Connect {
            protocol: rumqttc::mqttbytes::Protocol::V4,
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            clean_session: c.clean_start,
            last_will: will.as_ref().map(|w| {
                v4::LastWill::new(
                    String::from_utf8_lossy(&w.topic),
                    w.message.to_vec(),
                    qos_to_v4(w.qos),
                    w.retain,
                )
            }),
            login: login
                .as_ref()
                .map(|l| v4::Login::new(l.username.clone(), l.password.clone())),
        }),
        Packet::ConnAck(a) => {
            use v4::ConnectReturnCode as C;
            use ConnectReturnCode as R;
            let code = match a.code {
                R::Success => C::Success,
                R::RefusedProtocolVersion | R::UnsupportedProtocolVersion => {
                    C::RefusedProtocolVersion
                }
                R::BadClientId | R::ClientIdentifierNotValid => C::BadClientId,
                R::BadUserNamePassword => C::BadUserNamePassword,
                R::NotAuthorized | R::Banned => C::NotAuthorized,
                _ => C::ServiceUnavailable,
            };
            v4::Packet::ConnAck(v4::ConnAck::new(code, a.session_present))
        }
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_to_v4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::Subscribe(s) => v4::Packet::Subscribe(v4::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|f| v4::SubscribeFilter::new(f.path.clone(), qos_to_v4(f.qos)))
                .collect(),
        }),
        Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos_to_v4(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::Unsubscribe(u) => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters.clone(),
        }),
        Packet::UnsubAck(u) => v4::Packet::UnsubAck(v4::UnsubAck { pkid: u.pkid }),
        Packet::Disconnect(_) => v4::Packet::Disconnect,
        Packet::Auth(_) => return Some(Err(())),
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::PingReq(_)
        | Packet::PingResp(_) => return None,
    }))
}

/// What keys a tab's session in its CONNECT: its protocol level, and its
/// user name and password as bytes (None when the flag is not set: no
/// user name is not an empty one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub level: u8,
    pub protocol_name: Bytes,
    pub username: Option<Bytes>,
    pub password: Option<Bytes>,
    /// A 5.0 Authentication Method is present (enhanced authentication).
    pub enhanced_auth: bool,
}

impl Identity {
    /// The bytes that key the session: each field length-prefixed.
    pub fn key(&self) -> Vec<u8> {
        let mut key = vec![self.level];
        for field in [&self.username, &self.password] {
            match field {
                None => key.push(0),
                Some(b) => {
                    key.push(1);
                    key.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    key.extend_from_slice(b);
                }
            }
        }
        key
    }
}

/// Reads the identity of a whole CONNECT packet (`raw`, fixed header
/// included); None when it is not one that parses so far.
pub fn identity(raw: &[u8]) -> Option<Identity> {
    let (header, _) = fixed_header(raw).ok()??;
    let mut b = Bytes::copy_from_slice(raw.get(header..)?);
    let name = string(&mut b)?;
    if b.remaining() < 4 {
        return None;
    }
    let level = b.get_u8();
    let flags = b.get_u8();
    b.advance(2);
    let mut enhanced_auth = false;
    if level == 5 {
        let (len_len, len) = varint(&b)?;
        b.advance(len_len);
        if b.remaining() < len {
            return None;
        }
        let mut props = b.split_to(len);
        // Authentication Method is property 0x15; walk the properties.
        while props.has_remaining() {
            let id = props.get_u8();
            match id {
                0x11 | 0x27 => skip(&mut props, 4)?,
                0x21 | 0x22 => skip(&mut props, 2)?,
                0x17 | 0x19 => skip(&mut props, 1)?,
                0x15 => {
                    enhanced_auth = true;
                    string(&mut props)?;
                }
                0x16 => {
                    string(&mut props)?;
                }
                0x26 => {
                    string(&mut props)?;
                    string(&mut props)?;
                }
                _ => return None,
            }
        }
    }
    string(&mut b)?; // client id
    if flags & 0x04 != 0 {
        if level == 5 {
            let (len_len, len) = varint(&b)?;
            skip(&mut b, len_len + len)?;
        }
        string(&mut b)?;
        string(&mut b)?;
    }
    let username = if flags & 0x80 != 0 {
        Some(string(&mut b)?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(string(&mut b)?)
    } else {
        None
    };
    Some(Identity {
        level,
        protocol_name: name,
        username,
        password,
        enhanced_auth,
    })
}

fn skip(b: &mut Bytes, n: usize) -> Option<()> {
    (b.remaining() >= n).then(|| b.advance(n))
}

/// A length-prefixed field.
fn string(b: &mut Bytes) -> Option<Bytes> {
    if b.remaining() < 2 {
        return None;
    }
    let len = usize::from(b.get_u16());
    (b.remaining() >= len).then(|| b.split_to(len))
}

/// A variable byte integer: its size and value.
fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = *b.get(i)?;
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((i + 1, value));
        }
    }
    None
}
