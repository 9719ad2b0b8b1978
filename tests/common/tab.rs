//! Tabs: browser WebSocket clients of the proxy, plain or TLS, driven by
//! the test ([`Tab`]) or read continuously as a browser does ([`LiveTab`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::guard;
use super::proxy::TestProxy;

/// A tab's connection to the proxy: plain or TLS.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A browser tab, as a WebSocket client.
pub struct Tab {
    pub ws: WebSocketStream<ClientIo>,
    pub protocol: Option<String>,
}

/// How a tab connects.
#[derive(Clone)]
pub struct TabSpec {
    pub path: String,
    pub cookie: Option<String>,
    pub origin: Option<String>,
    pub headers: Vec<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The loopback address the tab connects from (127.0.0.1 if None).
    pub from: Option<std::net::IpAddr>,
}

impl TabSpec {
    /// A tab on `/ws` with `sessionid=<session>` and the allowed origin.
    pub fn new(session: &str) -> TabSpec {
        TabSpec {
            path: "/ws".into(),
            cookie: Some(format!("sessionid={session}")),
            origin: Some("http://app.test".into()),
            headers: Vec::new(),
            tls: None,
            from: None,
        }
    }

    /// Connects from this (loopback) address: another client to tabmux.
    pub fn from(mut self, ip: &str) -> Self {
        self.from = Some(ip.parse().unwrap());
        self
    }

    pub fn path(mut self, p: &str) -> Self {
        self.path = p.into();
        self
    }

    pub fn cookie(mut self, c: Option<&str>) -> Self {
        self.cookie = c.map(str::to_string);
        self
    }

    pub fn origin(mut self, o: Option<&str>) -> Self {
        self.origin = o.map(str::to_string);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Connects; panics if the handshake fails.
    pub async fn connect(&self, proxy: &TestProxy) -> Tab {
        match self.try_connect(proxy).await {
            Ok(tab) => tab,
            Err(e) => panic!("tab handshake failed: {e}"),
        }
    }

    /// Connects; returns the refusal status if the proxy refuses.
    pub async fn refused(&self, proxy: &TestProxy) -> (StatusCode, String) {
        match self.try_connect(proxy).await {
            Ok(_) => panic!("expected the handshake to be refused"),
            Err(WsError::Http(r)) => {
                let body = r
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                (r.status(), body)
            }
            Err(e) => panic!("expected an HTTP refusal, got {e}"),
        }
    }

    pub async fn try_connect(&self, proxy: &TestProxy) -> Result<Tab, WsError> {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://localhost:{}{}", proxy.addr.port(), self.path);
        let mut req = url.into_client_request()?;
        let h = req.headers_mut();
        if let Some(c) = &self.cookie {
            h.insert("cookie", HeaderValue::from_str(c).unwrap());
        }
        if let Some(o) = &self.origin {
            h.insert("origin", HeaderValue::from_str(o).unwrap());
        }
        for (n, v) in &self.headers {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let tcp = match self.from {
            None => TcpStream::connect(proxy.addr).await?,
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
                socket.connect(proxy.addr).await?
            }
        };
        let io = match &self.tls {
            None => ClientIo::Plain(tcp),
            Some(config) => {
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                ClientIo::Tls(Box::new(tls))
            }
        };
        let (ws, resp) = guard("a tab handshake", tokio_tungstenite::client_async(req, io)).await?;
        let protocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        Ok(Tab { ws, protocol })
    }
}

/// A tab whose socket is read continuously by a background task, as a
/// browser does: it answers pings, and what it receives waits in a queue.
pub struct LiveTab {
    rx: mpsc::UnboundedReceiver<Message>,
    /// Messages read while waiting for pings, kept for `recv`.
    held: std::collections::VecDeque<Message>,
    tx: mpsc::UnboundedSender<Message>,
    /// Pings received so far.
    pub pings: Arc<std::sync::atomic::AtomicUsize>,
}

impl LiveTab {
    pub fn send_text(&self, s: &str) {
        let _ = self.tx.send(Message::text(s));
    }

    /// The next text, binary or close message (pings are counted, not
    /// returned). None once the connection has ended.
    pub async fn recv(&mut self) -> Option<Message> {
        if let Some(m) = self.held.pop_front() {
            return Some(m);
        }
        loop {
            match guard("a message to the live tab", self.rx.recv()).await {
                Some(Message::Ping(_)) => continue,
                other => return other,
            }
        }
    }

    /// Whether the tab has not been closed yet, from what it has received
    /// so far (no waiting).
    pub fn is_open(&mut self) -> bool {
        if self.held.iter().any(|m| matches!(m, Message::Close(_))) {
            return false;
        }
        loop {
            match self.rx.try_recv() {
                // Kept for `closed`.
                Ok(m @ Message::Close(_)) => {
                    self.held.push_back(m);
                    return false;
                }
                Ok(Message::Ping(_)) => {}
                Ok(m) => self.held.push_back(m),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Waits until the tab has received `n` pings (and answered them).
    pub async fn wait_pings(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            match guard("pings to the live tab", self.rx.recv()).await {
                Some(Message::Ping(_)) => seen += 1,
                Some(m) => self.held.push_back(m),
                None => panic!("the live tab ended while waiting for pings"),
            }
        }
    }

    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Some(Message::Text(t)) => t.as_str().to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// Waits for the close frame; returns its code (1006 if the connection
    /// ended without one).
    pub async fn closed(&mut self) -> u16 {
        loop {
            match self.recv().await {
                Some(Message::Close(Some(f))) => return u16::from(f.code),
                Some(Message::Close(None)) => return 1005,
                Some(_) => continue,
                None => return 1006,
            }
        }
    }
}

impl Tab {
    /// Hands the socket to a background reader.
    pub fn live(self) -> LiveTab {
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let pings = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = pings.clone();
        let mut ws = self.ws;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Ping(_))) => {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let _ = in_tx.send(Message::Ping(Default::default()));
                        }
                        Some(Ok(m @ Message::Close(_))) => {
                            let _ = in_tx.send(m);
                            while let Some(Ok(_)) = ws.next().await {}
                            break;
                        }
                        Some(Ok(m)) => { let _ = in_tx.send(m); }
                        _ => break,
                    },
                    out = out_rx.recv() => match out {
                        Some(m) => { if ws.send(m).await.is_err() { break } }
                        None => { let _ = ws.close(None).await; break }
                    },
                }
            }
        });
        LiveTab {
            rx: in_rx,
            held: Default::default(),
            tx: out_tx,
            pings,
        }
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).await.expect("tab send");
    }

    pub async fn send_binary(&mut self, b: &[u8]) {
        self.ws
            .send(Message::binary(b.to_vec()))
            .await
            .expect("tab send");
    }

    /// The next data message (text or binary) the tab receives.
    pub async fn recv(&mut self) -> Message {
        loop {
            let msg = guard("a message to the tab", self.ws.next())
                .await
                .expect("tab stream ended")
                .expect("tab read failed");
            match msg {
                Message::Text(_) | Message::Binary(_) | Message::Close(_) => return msg,
                _ => continue,
            }
        }
    }

    /// The next text message; panics on anything else.
    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Message::Text(t) => t.as_str().to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// The next text message, as JSON.
    pub async fn recv_json(&mut self) -> serde_json::Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Waits for the proxy to close the tab; returns code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match guard("the tab to be closed", self.ws.next()).await {
                Some(Ok(Message::Close(Some(f)))) => {
                    // Complete the close handshake.
                    while let Some(Ok(_)) = guard("close handshake", self.ws.next()).await {}
                    return (u16::from(f.code), f.reason.as_str().to_string());
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("tab read failed before a close frame: {e}"),
                None => panic!("tab stream ended without a close frame"),
            }
        }
    }

    /// Closes the tab from the browser's side with `code`.
    pub async fn close(mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
        while let Some(Ok(_)) = guard("close handshake", self.ws.next()).await {}
    }
}
