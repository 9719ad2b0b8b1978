//! Dialling the one upstream WebSocket of a session.
//!
//! [`dial`] connects (TCP, then TLS for `wss://`), sends the WebSocket
//! handshake with the headers docs/protocol.md lists, and maps every failure to a
//! [`DialError`] that knows which HTTP status the waiting tab gets. The whole
//! dial runs under the route's `dial_timeout`.

use std::io::{self, Read, Write};
use std::task::{Context, Poll};

use futures_util::{SinkExt, StreamExt};

use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::client::{generate_key, Response};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, HandshakeError, Message, WebSocket};
use tokio_tungstenite::WebSocketStream;

use crate::config::Route;
use crate::wsio::{would_block, Unread};

/// The session's upstream socket.
///
/// Over plain TCP it is tungstenite's protocol state driven directly with
/// non-blocking reads and writes, readiness awaited only when one would
/// block: every message between the session and the backend passes here,
/// and tokio-tungstenite's stream costs a pass through its waker proxies and
/// a zeroed 4 KiB read buffer on every poll. Over TLS it is tokio-tungstenite's
/// stream (rustls has no non-blocking read of its own).
pub enum UpstreamSocket {
    Plain(Box<WebSocket<NonBlocking>>),
    Tls(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

/// The most of a handshake answer kept to find where its frames begin.
const HANDSHAKE_COPY: usize = 16 * 1024;

/// A TCP stream as `Read + Write` that never waits: `WouldBlock` instead,
/// and which way it would have waited.
pub struct NonBlocking {
    tcp: TcpStream,
    blocked: Interest,
    /// During the handshake, the bytes read (to find where the response
    /// ends and frames begin); None after it.
    handshake: Option<Vec<u8>>,
    /// Bytes read that tungstenite's messages may not account for.
    unread: Unread,
}

impl Read for NonBlocking {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A read that fills less than `buf` has drained the socket: forget
        // its readiness now (as tokio's own `poll_read` does), or the next
        // read would be a system call that finds nothing. Forgetting it
        // inside the same `try_io` as the read cannot lose a newer event.
        let tcp = &self.tcp;
        let len = buf.len();
        let mut got = None;
        let r = tcp.try_io(Interest::READABLE, || {
            let n = tcp.try_read(buf)?;
            got = Some(n);
            if n > 0 && n < len {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match (r, got) {
            (Ok(n), _) | (Err(_), Some(n)) => {
                self.unread.fed(n);
                if let Some(seen) = self.handshake.as_mut() {
                    if seen.len() + n <= HANDSHAKE_COPY {
                        seen.extend_from_slice(&buf[..n]);
                    } else {
                        // An outsized answer: the count stays unknown.
                        self.handshake = None;
                    }
                }
                Ok(n)
            }
            (Err(e), None) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.blocked = Interest::READABLE;
                }
                Err(e)
            }
        }
    }
}

impl Write for NonBlocking {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.tcp.try_write(buf);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.blocked = Interest::WRITABLE;
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl UpstreamSocket {
    /// The next frame; None once the connection is closed. The socket is
    /// read only when tokio's readiness says it may have data, or when
    /// tungstenite may still hold frames it read (`buffered`).
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        buffered: &mut bool,
    ) -> Poll<Option<Result<Message, WsError>>> {
        match self {
            UpstreamSocket::Plain(ws) => loop {
                if !*buffered {
                    match ws.get_ref().tcp.poll_read_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(WsError::Io(e)))),
                        Poll::Ready(Ok(())) => {}
                    }
                }
                match ws.read() {
                    Ok(msg) => {
                        *buffered = ws.get_mut().unread.read_again(&msg, false);
                        return Poll::Ready(Some(Ok(msg)));
                    }
                    // Readiness is cleared now: the next turn registers the
                    // waker (or finds data that arrived meanwhile).
                    Err(e) if would_block(&e) => *buffered = false,
                    Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                        return Poll::Ready(None)
                    }
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            },
            // rustls may hold decrypted bytes the socket no longer shows:
            // always worth a read.
            UpstreamSocket::Tls(ws) => ws.poll_next_unpin(cx),
        }
    }

    /// Writes `messages`, then flushes.
    pub async fn send_all(&mut self, messages: Vec<Message>) -> Result<(), WsError> {
        match self {
            UpstreamSocket::Plain(ws) => {
                for msg in messages {
                    let mut msg = msg;
                    loop {
                        match ws.write(msg) {
                            // A frame that finds the socket full is kept in
                            // tungstenite's buffer for the flush.
                            Ok(()) => break,
                            Err(e) if would_block(&e) => break,
                            Err(WsError::WriteBufferFull(back)) => {
                                flush_plain(ws).await?;
                                msg = *back;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                flush_plain(ws).await
            }
            UpstreamSocket::Tls(ws) => {
                for msg in messages {
                    ws.feed(msg).await?;
                }
                ws.flush().await
            }
        }
    }

    /// Sends a close frame and flushes it.
    pub async fn close(&mut self, frame: CloseFrame) -> Result<(), WsError> {
        match self {
            UpstreamSocket::Plain(ws) => {
                match ws.close(Some(frame)) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(e),
                }
                flush_plain(ws).await
            }
            UpstreamSocket::Tls(ws) => WebSocketStream::close(ws, Some(frame)).await,
        }
    }
}

/// Flushes tungstenite's buffer, waiting for the socket whenever it is full.
async fn flush_plain(ws: &mut WebSocket<NonBlocking>) -> Result<(), WsError> {
    loop {
        match ws.flush() {
            Err(e) if would_block(&e) => Box::pin(ws.get_ref().tcp.writable()).await?,
            r => return r,
        }
    }
}

/// What the tab that opens a session contributes to the upstream handshake.
#[derive(Debug, Clone, Default)]
pub struct DialParams {
    /// The first tab's `Cookie` header (all of it, as sent).
    pub cookie: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub origin: Option<HeaderValue>,
    /// The tab's own `X-Forwarded-For`, if any, with its peer address appended.
    pub forwarded_for: Option<HeaderValue>,
    /// `https` when the tab came over TLS, else `http`.
    pub forwarded_proto: &'static str,
    /// The tab's requested subprotocols, in its order, comma-separated.
    pub protocols: Option<HeaderValue>,
    /// The tab's raw query string, when the route forwards it.
    pub query: Option<String>,
}

/// A failed dial, and what the tab waiting on it is told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    #[error("upstream refused the handshake with HTTP {0}")]
    Refused(StatusCode),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream did not complete the handshake within dial_timeout")]
    Timeout,
    #[error("upstream handshake failed: {0}")]
    Handshake(String),
    #[error("upstream TLS handshake failed: {0}")]
    Tls(String),
}

impl DialError {
    /// The metric label for this result.
    pub fn label(&self) -> &'static str {
        match self {
            DialError::Refused(_) => "refused",
            DialError::Unreachable(_) => "unreachable",
            DialError::Timeout => "timeout",
            DialError::Handshake(_) | DialError::Tls(_) => "handshake",
        }
    }
}

/// The WebSocket settings of an upstream connection. There is one per
/// session, so its read buffer is larger than a tab's, but not much: many
/// sessions have one or two tabs, and the buffer is never given back (a
/// 16 KiB buffer was measured at 1.6 KiB per tab with ten tabs per session).
/// Larger messages take several reads. Frames may exceed the
/// route's `max_message_size` by the envelope and base64 overhead, so that an
/// oversized payload can be recognised and refused per tab instead of
/// breaking the upstream.
pub fn ws_config(route: &Route) -> WebSocketConfig {
    let limit = route
        .max_message_size
        .saturating_mul(4)
        .saturating_add(64 * 1024);
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(limit.saturating_mul(2))
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit))
}

/// Dials the route's upstream. Returns the socket and the subprotocol the
/// upstream chose, if any.
pub async fn dial(
    route: &Route,
    params: &DialParams,
) -> Result<(UpstreamSocket, Option<HeaderValue>), DialError> {
    match tokio::time::timeout(route.dial_timeout, dial_inner(route, params)).await {
        Ok(result) => result,
        Err(_) => Err(DialError::Timeout),
    }
}

async fn dial_inner(
    route: &Route,
    params: &DialParams,
) -> Result<(UpstreamSocket, Option<HeaderValue>), DialError> {
    let up = &route.upstream;
    let tcp = TcpStream::connect((up.host.as_str(), up.port))
        .await
        .map_err(|e| DialError::Unreachable(format!("{}:{}: {e}", up.host, up.port)))?;
    // Envelope frames are small and latency-sensitive.
    let _ = tcp.set_nodelay(true);
    let request = build_request(route, params)?;
    let Some(tls) = &route.upstream_tls else {
        return handshake_plain(route, request, tcp).await;
    };
    let name = ServerName::try_from(up.host.clone())
        .map_err(|e| DialError::Handshake(format!("bad TLS server name: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| DialError::Tls(e.to_string()))?;
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config(route))).await
    {
        Ok((socket, response)) => Ok((
            UpstreamSocket::Tls(Box::new(socket)),
            chosen_protocol(&response),
        )),
        Err(e) => Err(handshake_error(e)),
    }
}

/// The WebSocket handshake over plain TCP, tungstenite's own, resumed each
/// time the socket is ready the way it would have blocked. Bytes the backend
/// sent right after its answer (a greeting) stay in tungstenite's buffer.
async fn handshake_plain(
    route: &Route,
    request: Request<()>,
    tcp: TcpStream,
) -> Result<(UpstreamSocket, Option<HeaderValue>), DialError> {
    let stream = NonBlocking {
        tcp,
        blocked: Interest::WRITABLE,
        handshake: Some(Vec::new()),
        unread: Unread::unknown(),
    };
    let mut result = tokio_tungstenite::tungstenite::client::client_with_config(
        request,
        stream,
        Some(ws_config(route)),
    );
    loop {
        match result {
            Ok((mut ws, response)) => {
                let stream = ws.get_mut();
                let seen = stream.handshake.take().unwrap_or_default();
                stream.unread = after_response(&seen);
                return Ok((
                    UpstreamSocket::Plain(Box::new(ws)),
                    chosen_protocol(&response),
                ));
            }
            Err(HandshakeError::Interrupted(mid)) => {
                let stream = mid.get_ref().get_ref();
                stream
                    .tcp
                    .ready(stream.blocked)
                    .await
                    .map_err(|e| DialError::Unreachable(e.to_string()))?;
                result = mid.handshake();
            }
            Err(HandshakeError::Failure(e)) => return Err(handshake_error(e)),
        }
    }
}

/// The bytes read during the handshake that follow the 101 response, which
/// tungstenite keeps as the start of the frames: the response's end found
/// by the parser tungstenite itself uses, with its header limit.
fn after_response(seen: &[u8]) -> Unread {
    let mut headers = [httparse::EMPTY_HEADER; 124];
    match httparse::Response::new(&mut headers).parse(seen) {
        Ok(httparse::Status::Complete(len)) => Unread::new(seen.len() - len),
        _ => Unread::unknown(),
    }
}

fn chosen_protocol(response: &Response) -> Option<HeaderValue> {
    response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned()
}

fn handshake_error(e: WsError) -> DialError {
    match e {
        WsError::Http(response) => DialError::Refused(response.status()),
        WsError::Io(e) => DialError::Unreachable(e.to_string()),
        e => DialError::Handshake(e.to_string()),
    }
}

/// The upstream handshake request: the WebSocket headers tungstenite needs,
/// then the forwarded ones.
fn build_request(route: &Route, params: &DialParams) -> Result<Request<()>, DialError> {
    let base = &route.upstream.uri;
    let mut target = base
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if let Some(q) = params.query.as_deref().filter(|q| !q.is_empty()) {
        target.push(if base.query().is_some() { '&' } else { '?' });
        target.push_str(q);
    }
    let authority = base.authority().map_or("", |a| a.as_str());
    let scheme = if route.upstream.tls { "wss" } else { "ws" };
    let mut b = Request::builder()
        .uri(format!("{scheme}://{authority}{target}"))
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, generate_key())
        .header("x-tabmux-envelope", route.envelope.header_value())
        .header("x-forwarded-proto", params.forwarded_proto);
    let origin = route.upstream_origin.as_ref().or(params.origin.as_ref());
    let user_agent = route
        .upstream_user_agent
        .as_ref()
        .or(params.user_agent.as_ref());
    for (name, value) in [
        (header::COOKIE, params.cookie.as_ref()),
        (header::ORIGIN, origin),
        (header::USER_AGENT, user_agent),
        (header::SEC_WEBSOCKET_PROTOCOL, params.protocols.as_ref()),
    ] {
        if let Some(v) = value {
            b = b.header(name, v);
        }
    }
    if let Some(v) = &params.forwarded_for {
        b = b.header("x-forwarded-for", v);
    }
    b.body(())
        .map_err(|e| DialError::Handshake(format!("cannot build the request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_after_the_101_are_what_is_buffered() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let mut seen = head.to_vec();
        assert!(!after_response(&seen).maybe_buffered());
        seen.extend_from_slice(&[0x81, 2, b'h', b'i']);
        let mut unread = after_response(&seen);
        unread.took(2, false);
        assert!(!unread.maybe_buffered(), "the one frame after the 101");
        // Lines ended by a bare LF, as the parser allows.
        let mut unread = after_response(b"HTTP/1.1 101 OK\nUpgrade: websocket\n\n\x81\x02hi");
        assert!(unread.maybe_buffered());
        unread.took(2, false);
        assert!(!unread.maybe_buffered());
        // An incomplete response (which tungstenite would not have
        // accepted): nothing is known, reads are always tried.
        let mut unread = after_response(b"HTTP/1.1 101 OK\r\n");
        unread.took(1_000_000, false);
        assert!(unread.maybe_buffered());
    }
}
