//! Why a tab was refused, why it ended, why an upstream was lost: causes as
//! data, three tables.
//!
//! - Every way a tab can end is a [`Cause`], and [`Cause::row`] gives each
//!   its close code, close reason, metric label and the side that ended it
//!   (pingora's errors carry their side the same way: "who closed, and why"
//!   is the first question of every incident).
//! - Every way a tab's handshake can be refused is a [`Refusal`], and
//!   [`Refusal::row`] gives each its HTTP status, plain-text body, metric
//!   label and side.
//! - Every way an upstream is lost is a [`Lost`], and [`Lost::row`] gives
//!   its metric label and side.
//!
//! Tabs, sessions, metrics and log lines all read them from here; nothing
//! decides on a string.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::limits::Limit;
use crate::upstream::DialError;

/// The most a close frame's reason may hold, in bytes.
pub const MAX_CLOSE_REASON: usize = 123;

/// `reason`, cut at a character boundary to what a close frame carries.
pub fn close_reason(mut reason: String) -> String {
    if reason.len() > MAX_CLOSE_REASON {
        let mut end = MAX_CLOSE_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// Which side ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The browser tab (its close frame, or its connection vanishing).
    Tab,
    /// tabmux, by a rule of its own (a limit, a malformed message, shutdown).
    Proxy,
    /// The backend, through its session's upstream.
    Backend,
}

/// Why a tab ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The tab sent a close frame with this code (1005 when it had none).
    TabClosed(u16),
    /// The tab's connection ended without a close frame, or failed.
    TabVanished,
    /// `payload = "json"` and the tab sent text that is not JSON.
    InvalidJson,
    /// The tab sent a text message that is not UTF-8.
    InvalidUtf8,
    /// A message to or from the tab is over the route's `max_message_size`.
    TooBig,
    /// The tab broke the WebSocket protocol.
    ProtocolError,
    /// More than `tab_queue` messages, or `tab_queue_bytes` bytes, waited
    /// for the tab.
    SlowConsumer,
    /// The process's `buffer_budget` was spent and the tab (or its
    /// session) held the most.
    MemoryBudget,
    /// The tab sent more than `server.tab_rate` for longer than
    /// `idle_timeout` (held back all that time).
    RateLimit,
    /// The tab was silent (not even a pong) for `idle_timeout`.
    Idle,
    /// The proxy is shutting down.
    Shutdown,
    /// The upstream was lost and the route's reconnect budget is spent.
    UpstreamUnavailable,
    /// Tabs sent more than `reconnect_buffer` while the upstream was down.
    ReconnectBufferFull,
    /// The upstream was lost and the protocol's clients reconnect
    /// themselves (Pusher's 4200, "reconnect at once").
    Reconnect,
    /// The upstream was lost and the protocol's clients retry (GraphQL:
    /// 1012, which graphql-ws clients reconnect on).
    UpstreamLost,
    /// The tab broke its subprotocol's rules (or never spoke it), closed
    /// as that protocol's server closes it (graphql-ws: 4400, 4401, 4406,
    /// 4408, 4409, 4429), or a session limit reached after the handshake
    /// was answered (1013, naming the limit).
    Subprotocol { code: u16, reason: String },
    /// The backend asked for the close, with this code and reason.
    Backend { code: u16, reason: String },
}

/// One row of the table: how a [`Cause`] shows on the wire and in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row<'a> {
    /// The close code (the tab's own, for [`Side::Tab`]).
    pub code: u16,
    /// The close frame's reason ("" where none is sent).
    pub reason: &'a str,
    /// The `reason` label of `tabmux_tab_closes_total` (tabs closed by
    /// tabmux; the tab's own closes are not counted there).
    pub label: &'static str,
    pub side: Side,
}

impl Cause {
    /// The table.
    pub fn row(&self) -> Row<'_> {
        use Side::*;
        let (code, reason, label, side) = match self {
            Cause::TabClosed(code) => (*code, "", "tab_closed", Tab),
            Cause::TabVanished => (1006, "", "tab_vanished", Tab),
            Cause::InvalidJson => (1007, "message is not valid JSON", "invalid_json", Proxy),
            Cause::InvalidUtf8 => (1007, "invalid UTF-8", "invalid_utf8", Proxy),
            Cause::TooBig => (1009, "message too big", "too_big", Proxy),
            Cause::ProtocolError => (1002, "protocol error", "protocol_error", Proxy),
            Cause::SlowConsumer => (1008, "slow consumer", "slow_consumer", Proxy),
            Cause::MemoryBudget => (1013, "memory budget", "memory_budget", Proxy),
            Cause::RateLimit => (1008, "rate limit", "rate_limit", Proxy),
            Cause::Idle => (1001, "idle timeout", "idle", Proxy),
            Cause::Shutdown => (1001, "going away", "shutdown", Proxy),
            Cause::UpstreamUnavailable => (1011, "upstream unavailable", "upstream_lost", Proxy),
            Cause::ReconnectBufferFull => (1013, "reconnect buffer full", "buffer_full", Proxy),
            Cause::Reconnect => (4200, "upstream lost; reconnect", "reconnect", Proxy),
            Cause::UpstreamLost => (1012, "upstream lost", "upstream_lost", Proxy),
            Cause::Subprotocol { code, reason } => (*code, reason.as_str(), "subprotocol", Proxy),
            Cause::Backend { code, reason } => (*code, reason.as_str(), "backend", Backend),
        };
        Row {
            code,
            reason,
            label,
            side,
        }
    }

    /// The close code of the tab's connection (what the backend's `close`
    /// event carries).
    pub fn code(&self) -> u16 {
        self.row().code
    }

    /// The close frame tabmux sends the tab; None when the tab ended the
    /// connection itself.
    pub fn close_frame(&self) -> Option<CloseFrame> {
        let row = self.row();
        (row.side != Side::Tab).then(|| CloseFrame {
            code: CloseCode::from(row.code),
            reason: row.reason.into(),
        })
    }

    /// How a failed read from a tab ends it.
    pub fn of_read_error(e: &WsError) -> Cause {
        use tokio_tungstenite::tungstenite::error::ProtocolError as P;
        match e {
            WsError::Capacity(_) => Cause::TooBig,
            WsError::Utf8(_) => Cause::InvalidUtf8,
            // The TCP connection ended without a close frame: the tab vanished.
            WsError::Protocol(P::ResetWithoutClosingHandshake) => Cause::TabVanished,
            WsError::Protocol(_) => Cause::ProtocolError,
            _ => Cause::TabVanished,
        }
    }

    /// Every label [`Cause::row`] gives a tab that tabmux closed (the
    /// metric's help text lists them).
    pub const PROXY_LABELS: [&'static str; 14] = [
        "invalid_json",
        "invalid_utf8",
        "too_big",
        "protocol_error",
        "slow_consumer",
        "memory_budget",
        "rate_limit",
        "idle",
        "shutdown",
        "upstream_lost",
        "buffer_full",
        "reconnect",
        "subprotocol",
        "backend",
    ];
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = self.row();
        match row.side {
            Side::Tab => write!(f, "the tab ended its connection ({})", row.code),
            _ => write!(f, "{} ({} {})", row.label, row.code, row.reason),
        }
    }
}

/// Why a session's upstream connection was lost.
#[derive(Debug)]
pub enum Lost {
    /// The backend closed the connection (with its close frame, if it
    /// sent one).
    Closed(Option<Closing>),
    /// Reading or writing failed.
    Failed(WsError),
    /// Nothing came from the backend, not even a pong, for `idle_timeout`.
    Silent,
    /// A write could not finish within `idle_timeout`: the backend stopped
    /// reading.
    Stalled,
}

/// The backend's close frame: its code (1005 when it carried none) and
/// its reason, which some envelopes pass on to the tabs (a Pusher server's
/// 4009 "You got disconnected by the app.").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    pub code: u16,
    pub reason: String,
}

impl Closing {
    /// A close frame with `code` and no reason.
    pub fn code(code: u16) -> Closing {
        Closing {
            code,
            reason: String::new(),
        }
    }
}

impl Lost {
    /// Its row: the `reason` label of `tabmux_upstream_lost_total`, and the
    /// side that ended the connection (tabmux, for a backend it gave up on).
    pub fn row(&self) -> (&'static str, Side) {
        match self {
            Lost::Closed(_) => ("closed", Side::Backend),
            Lost::Failed(_) => ("failed", Side::Backend),
            Lost::Silent => ("silent", Side::Proxy),
            Lost::Stalled => ("stalled", Side::Proxy),
        }
    }

    /// Every label [`Lost::row`] gives.
    pub const LABELS: [&'static str; 4] = ["closed", "failed", "silent", "stalled"];
}

/// Why a tab's handshake was refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// Not a WebSocket upgrade at all.
    NotWebSocket,
    /// A malformed WebSocket handshake, and what is wrong with it.
    Handshake(&'static str),
    /// An `Origin` outside the route's allow list.
    Origin,
    /// No session cookie (the route's name for it).
    Cookie(String),
    /// A limit on tabs or sessions (the process's or the client address's).
    Limit(Limit),
    /// The session is at `max_tabs_per_session`.
    SessionFull,
    /// The session's upstream could not be dialled.
    Dial(DialError),
    /// The session ended while the tab was joining.
    Gone,
}

/// One row of the refusals' table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRow {
    pub status: StatusCode,
    /// The plain-text body: what was refused, never an address or an
    /// operating-system error (the log has those).
    pub body: Cow<'static, str>,
    /// The `reason` label of `tabmux_admissions_refused_total` (None: not
    /// counted, a request that is not a WebSocket handshake at all).
    pub label: Option<&'static str>,
    /// Whose doing: the tab's request, a rule of tabmux, the backend.
    pub side: Side,
}

impl Refusal {
    /// The table.
    pub fn row(&self) -> RefusalRow {
        use Side::*;
        let (status, body, label, side): (_, Cow<'static, str>, _, _) = match self {
            Refusal::NotWebSocket => (
                StatusCode::UPGRADE_REQUIRED,
                "this path serves WebSocket connections only".into(),
                None,
                Tab,
            ),
            Refusal::Handshake(why) => (
                StatusCode::BAD_REQUEST,
                (*why).into(),
                Some("handshake"),
                Tab,
            ),
            Refusal::Origin => (
                StatusCode::FORBIDDEN,
                "origin not allowed".into(),
                Some("origin"),
                Tab,
            ),
            Refusal::Cookie(name) => (
                StatusCode::UNAUTHORIZED,
                format!("missing session cookie `{name}`").into(),
                Some("cookie"),
                Tab,
            ),
            Refusal::Limit(limit) => {
                let (label, body) = match limit {
                    Limit::Tabs => ("max_tabs", "tabmux is at its tab limit (max_tabs)"),
                    Limit::AddressTabs => (
                        "per_ip_tabs",
                        "too many tabs from this address (per_ip.tabs)",
                    ),
                    Limit::Sessions => (
                        "max_sessions",
                        "tabmux is at its session limit (max_sessions)",
                    ),
                    Limit::AddressSessions => (
                        "per_ip_sessions",
                        "too many sessions from this address (per_ip.sessions)",
                    ),
                };
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    body.into(),
                    Some(label),
                    Proxy,
                )
            }
            Refusal::SessionFull => (
                StatusCode::TOO_MANY_REQUESTS,
                "this session is at its tab limit (max_tabs_per_session)".into(),
                Some("max_tabs_per_session"),
                Proxy,
            ),
            Refusal::Dial(e) => {
                // 401/403/404 from the upstream pass through; a timeout is
                // 504; anything else 502.
                let (status, body): (_, Cow<'static, str>) = match e {
                    DialError::Refused(s) => {
                        let pass = [
                            StatusCode::UNAUTHORIZED,
                            StatusCode::FORBIDDEN,
                            StatusCode::NOT_FOUND,
                        ];
                        let status = if pass.contains(s) {
                            *s
                        } else {
                            StatusCode::BAD_GATEWAY
                        };
                        let body =
                            format!("upstream refused the handshake with HTTP {}", s.as_u16());
                        (status, body.into())
                    }
                    DialError::Unreachable(_) => {
                        (StatusCode::BAD_GATEWAY, "upstream unreachable".into())
                    }
                    DialError::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream did not complete the handshake within dial_timeout".into(),
                    ),
                    DialError::Handshake(_) => {
                        (StatusCode::BAD_GATEWAY, "upstream handshake failed".into())
                    }
                    DialError::Tls(_) => (
                        StatusCode::BAD_GATEWAY,
                        "upstream TLS handshake failed".into(),
                    ),
                };
                (status, body, Some("upstream"), Backend)
            }
            Refusal::Gone => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the session ended while the tab was joining; try again".into(),
                Some("upstream"),
                Proxy,
            ),
        };
        RefusalRow {
            status,
            body,
            label,
            side,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.row().body)
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Closed(Some(c)) => write!(f, "the backend closed the connection ({})", c.code),
            Lost::Closed(None) => write!(f, "the backend closed the connection"),
            Lost::Failed(e) => write!(f, "{e}"),
            Lost::Silent => write!(
                f,
                "idle timeout: the upstream sent nothing, not even a pong"
            ),
            Lost::Stalled => write!(f, "the upstream stopped reading (write timed out)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_proxy_cause() -> Vec<Cause> {
        vec![
            Cause::InvalidJson,
            Cause::InvalidUtf8,
            Cause::TooBig,
            Cause::ProtocolError,
            Cause::SlowConsumer,
            Cause::MemoryBudget,
            Cause::RateLimit,
            Cause::Idle,
            Cause::Shutdown,
            Cause::UpstreamUnavailable,
            Cause::UpstreamLost,
            Cause::ReconnectBufferFull,
            Cause::Reconnect,
            Cause::Subprotocol {
                code: 4400,
                reason: "Invalid message received".into(),
            },
            Cause::Backend {
                code: 4001,
                reason: "bye".into(),
            },
        ]
    }

    #[test]
    fn the_table_matches_the_protocol() {
        let rows: Vec<(u16, String, &str)> = every_proxy_cause()
            .iter()
            .map(|c| (c.code(), c.row().reason.to_string(), c.row().label))
            .collect();
        let want = [
            (1007, "message is not valid JSON", "invalid_json"),
            (1007, "invalid UTF-8", "invalid_utf8"),
            (1009, "message too big", "too_big"),
            (1002, "protocol error", "protocol_error"),
            (1008, "slow consumer", "slow_consumer"),
            (1013, "memory budget", "memory_budget"),
            (1008, "rate limit", "rate_limit"),
            (1001, "idle timeout", "idle"),
            (1001, "going away", "shutdown"),
            (1011, "upstream unavailable", "upstream_lost"),
            (1012, "upstream lost", "upstream_lost"),
            (1013, "reconnect buffer full", "buffer_full"),
            (4200, "upstream lost; reconnect", "reconnect"),
            (4400, "Invalid message received", "subprotocol"),
            (4001, "bye", "backend"),
        ];
        assert_eq!(rows.len(), want.len());
        for (got, want) in rows.iter().zip(want) {
            assert_eq!((got.0, got.1.as_str(), got.2), want);
        }
    }

    #[test]
    fn every_label_tabmux_closes_with_is_listed() {
        let mut labels: Vec<&str> = every_proxy_cause().iter().map(|c| c.row().label).collect();
        // Two causes share `upstream_lost` (1011 and 1012).
        labels.dedup();
        assert_eq!(labels, Cause::PROXY_LABELS);
    }

    #[test]
    fn only_tabmux_and_the_backend_send_close_frames() {
        assert_eq!(Cause::TabClosed(1000).close_frame(), None);
        assert_eq!(Cause::TabVanished.close_frame(), None);
        assert_eq!(Cause::TabClosed(4000).code(), 4000);
        assert_eq!(Cause::TabVanished.code(), 1006);
        for cause in every_proxy_cause() {
            let frame = cause.close_frame().expect("a close frame");
            assert_eq!(u16::from(frame.code), cause.code());
            assert_eq!(frame.reason.as_str(), cause.row().reason);
        }
    }

    #[test]
    fn every_refusal_has_its_row() {
        let rows: Vec<(u16, String, Option<&str>, Side)> = [
            Refusal::NotWebSocket,
            Refusal::Handshake("missing Sec-WebSocket-Key"),
            Refusal::Origin,
            Refusal::Cookie("sid".into()),
            Refusal::Limit(Limit::AddressTabs),
            Refusal::SessionFull,
            Refusal::Dial(DialError::Refused(StatusCode::FORBIDDEN)),
            Refusal::Dial(DialError::Refused(StatusCode::INTERNAL_SERVER_ERROR)),
            Refusal::Dial(DialError::Unreachable("10.0.0.1:443: refused".into())),
            Refusal::Dial(DialError::Timeout),
            Refusal::Gone,
        ]
        .iter()
        .map(|r| {
            let row = r.row();
            (
                row.status.as_u16(),
                row.body.into_owned(),
                row.label,
                row.side,
            )
        })
        .collect();
        let want: [(u16, &str, Option<&str>, Side); 11] = [
            (
                426,
                "this path serves WebSocket connections only",
                None,
                Side::Tab,
            ),
            (
                400,
                "missing Sec-WebSocket-Key",
                Some("handshake"),
                Side::Tab,
            ),
            (403, "origin not allowed", Some("origin"), Side::Tab),
            (
                401,
                "missing session cookie `sid`",
                Some("cookie"),
                Side::Tab,
            ),
            (
                429,
                "too many tabs from this address (per_ip.tabs)",
                Some("per_ip_tabs"),
                Side::Proxy,
            ),
            (
                429,
                "this session is at its tab limit (max_tabs_per_session)",
                Some("max_tabs_per_session"),
                Side::Proxy,
            ),
            (
                403,
                "upstream refused the handshake with HTTP 403",
                Some("upstream"),
                Side::Backend,
            ),
            (
                502,
                "upstream refused the handshake with HTTP 500",
                Some("upstream"),
                Side::Backend,
            ),
            // Never the address or the operating system's words.
            (502, "upstream unreachable", Some("upstream"), Side::Backend),
            (
                504,
                "upstream did not complete the handshake within dial_timeout",
                Some("upstream"),
                Side::Backend,
            ),
            (
                503,
                "the session ended while the tab was joining; try again",
                Some("upstream"),
                Side::Proxy,
            ),
        ];
        for (got, want) in rows.iter().zip(want) {
            assert_eq!((got.0, got.1.as_str(), got.2, got.3), want);
        }
    }

    #[test]
    fn every_loss_has_its_row() {
        let losses = [Lost::Closed(None), Lost::Silent, Lost::Stalled];
        let rows: Vec<(&str, Side)> = losses.iter().map(Lost::row).collect();
        assert_eq!(
            rows,
            [
                ("closed", Side::Backend),
                ("silent", Side::Proxy),
                ("stalled", Side::Proxy)
            ]
        );
    }
}
