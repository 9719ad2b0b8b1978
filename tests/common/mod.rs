//! Test harness: a real proxy on 127.0.0.1:0, a mock upstream that is a real
//! WebSocket server recording what it receives, and tab clients.
//!
//! Nothing here sleeps: tests wait for conditions, each wait bounded by a
//! generous guard so a broken proxy fails the test instead of hanging it.
#![allow(dead_code)]
// tungstenite's handshake callback type returns a large error by design.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode};
use tabmux::{Config, Proxy};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// How long any single wait may take before the test is failed. Not a timing
/// assertion: a guard against hanging forever.
pub const GUARD: Duration = Duration::from_secs(20);

/// Runs `f` under the guard, failing the test with `what` if it never ends.
pub async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ------------------------------------------------------------------ proxy

/// A running proxy. Dropping it stops it.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestProxy {
    /// A proxy started elsewhere (the demo), to connect tabs to.
    pub fn at(addr: SocketAddr, admin: SocketAddr) -> TestProxy {
        TestProxy {
            addr,
            admin,
            _stop: None,
        }
    }
}

/// The `[server]` and `[admin]` tables every test uses, before its routes.
pub fn base_config(server_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// A `[[route]]` at `path` in front of `upstream`, allowing the origin
/// `http://app.test`, plus `extra` keys.
pub fn route(path: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[route]]\npath = \"{path}\"\nupstream = \"ws://{upstream}/backend\"\nallowed_origins = [\"http://app.test\"]\n{extra}\n"
    )
}

/// Starts a proxy from configuration text.
pub async fn start_proxy(toml: &str) -> TestProxy {
    start_proxy_in(toml, Path::new(".")).await
}

/// Starts a proxy whose relative paths resolve against `base`.
pub async fn start_proxy_in(toml: &str, base: &Path) -> TestProxy {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let config = Config::from_toml(toml, "test.toml", base)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"));
    let proxy = Proxy::bind(config).await.expect("bind");
    let addr = proxy.local_addr();
    let admin = proxy.admin_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    TestProxy {
        addr,
        admin,
        _stop: Some(stop),
    }
}

/// One proxy with one default route in front of `upstream`.
pub async fn proxy_for(upstream: &Mock, route_extra: &str) -> TestProxy {
    let toml = base_config("") + &route("/ws", upstream.addr, route_extra);
    start_proxy(&toml).await
}

/// The binary the child-process tests run: `TABMUX_BIN` when set (so CI can
/// soak the profile-guided build), else the one cargo built for the tests.
pub fn tabmux_bin() -> std::path::PathBuf {
    std::env::var_os("TABMUX_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tabmux").into())
}

/// Runs the real binary with this configuration (which should listen on
/// port 0); returns the child and where it listens, read from its log.
pub fn spawn_tabmux(toml: &str) -> (std::process::Child, TestProxy) {
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tabmux-child-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = std::process::Command::new(tabmux_bin())
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr_after = |line: &str, marker: &str| -> Option<SocketAddr> {
        let rest = line.split(marker).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    let (mut tabs, mut admin) = (None, None);
    while tabs.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("tabmux exited before listening")
            .unwrap();
        tabs = tabs.or_else(|| addr_after(&line, "tabs: listening on ws://"));
        admin = admin.or_else(|| addr_after(&line, "admin: listening on http://"));
    }
    // Keep draining its output so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, TestProxy::at(tabs.unwrap(), admin.unwrap()))
}

/// A plain HTTP GET to the admin listener; returns status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    raw_http(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends raw request bytes and reads the whole response; returns its status
/// and body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    guard("an HTTP response", s.read_to_end(&mut buf))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Everything after the head (a body may itself hold blank lines).
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of one metric line (exact label set) in a Prometheus scrape.
pub fn metric(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

// ------------------------------------------------------------------ tabs

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
        }
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
        let tcp = TcpStream::connect(proxy.addr).await?;
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

// ------------------------------------------------------------------ mock upstream

/// What the mock does with new connections.
#[derive(Clone, Default)]
pub struct Behavior {
    /// Refuse the handshake with this HTTP status.
    pub refuse: Option<u16>,
    /// Accept TCP but never answer the handshake.
    pub hang: bool,
    /// Frames sent to each new connection right after the handshake.
    pub greeting: Vec<Message>,
    /// Answer with the first requested subprotocol.
    pub pick_first_protocol: bool,
    /// Send every tab's `data` back to that tab, and keep no record of
    /// frames (for long runs).
    pub echo: bool,
}

/// One upstream connection the mock accepted.
pub struct Conn {
    pub path: String,
    pub headers: HeaderMap,
    pub frames: Vec<Message>,
    /// The close frame the proxy sent, once the connection ended.
    pub closed: Option<Option<CloseFrame>>,
    /// Pings the proxy sent on this connection.
    pub pings: usize,
    /// The payloads of the pongs the proxy sent (answers to the mock's pings).
    pub pongs: Vec<Vec<u8>>,
    tx: mpsc::UnboundedSender<MockCmd>,
}

/// What a test can make a mock connection do.
enum MockCmd {
    Send(Message),
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Stop reading and writing, keeping the connection open.
    Stall,
}

#[derive(Default)]
struct MockState {
    conns: Vec<Conn>,
    attempts: usize,
    behavior: Behavior,
}

/// A mock backend: a real WebSocket server on 127.0.0.1:0.
#[derive(Clone)]
pub struct Mock {
    pub addr: SocketAddr,
    state: Arc<Mutex<MockState>>,
    changed: Arc<Notify>,
}

impl Mock {
    pub async fn start() -> Mock {
        Mock::start_with(Behavior::default(), None).await
    }

    /// A plain (no TLS) mock with this behaviour.
    pub async fn behaving(behavior: Behavior) -> Mock {
        Mock::start_with(behavior, None).await
    }

    pub async fn start_with(behavior: Behavior, tls: Option<Arc<rustls::ServerConfig>>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock = Mock {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(MockState {
                behavior,
                ..Default::default()
            })),
            changed: Arc::new(Notify::new()),
        };
        let m = mock.clone();
        tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            while let Ok((tcp, _)) = listener.accept().await {
                let m = m.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => m.serve(tcp).await,
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                m.serve(tls).await
                            }
                        }
                    }
                });
            }
        });
        mock
    }

    pub fn set_behavior(&self, b: Behavior) {
        self.state.lock().unwrap().behavior = b;
    }

    async fn serve<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let behavior = {
            let mut st = self.state.lock().unwrap();
            st.attempts += 1;
            st.behavior.clone()
        };
        self.changed.notify_waiters();
        if behavior.hang {
            let _keep = stream;
            std::future::pending::<()>().await;
            return;
        }
        let seen = Arc::new(Mutex::new(None));
        let seen2 = seen.clone();
        let callback =
            move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                *seen2.lock().unwrap() = Some((req.uri().to_string(), req.headers().clone()));
                if let Some(status) = behavior.refuse {
                    let mut r = ErrorResponse::new(Some("refused by mock".into()));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    return Err(r);
                }
                if behavior.pick_first_protocol {
                    if let Some(p) = req.headers().get("sec-websocket-protocol") {
                        let first = p
                            .to_str()
                            .unwrap()
                            .split(',')
                            .next()
                            .unwrap()
                            .trim()
                            .to_string();
                        resp.headers_mut().insert(
                            "sec-websocket-protocol",
                            HeaderValue::from_str(&first).unwrap(),
                        );
                    }
                }
                Ok(resp)
            };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        let (path, headers) = seen.lock().unwrap().take().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let index = {
            let mut st = self.state.lock().unwrap();
            st.conns.push(Conn {
                path,
                headers,
                frames: Vec::new(),
                closed: None,
                pings: 0,
                pongs: Vec::new(),
                tx,
            });
            st.conns.len() - 1
        };
        self.changed.notify_waiters();
        for g in behavior.greeting {
            let _ = ws.send(g).await;
        }
        loop {
            tokio::select! {
                out = rx.recv() => match out {
                    Some(MockCmd::Send(Message::Close(f))) => { let _ = ws.close(f).await; }
                    Some(MockCmd::Send(m)) => { if ws.send(m).await.is_err() { break } }
                    Some(MockCmd::Drop) | None => break,
                    Some(MockCmd::Stall) => {
                        let _keep = ws;
                        std::future::pending::<()>().await;
                        return;
                    }
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(f))) => {
                        self.state.lock().unwrap().conns[index].closed = Some(f);
                        let _ = ws.flush().await;
                        break;
                    }
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) if behavior.echo => {
                        if let Some(reply) = echo_reply(&m) {
                            if ws.send(reply).await.is_err() { break }
                        }
                    }
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        self.state.lock().unwrap().conns[index].frames.push(m);
                        self.changed.notify_waiters();
                    }
                    Some(Ok(Message::Ping(_))) => {
                        self.state.lock().unwrap().conns[index].pings += 1;
                        self.changed.notify_waiters();
                    }
                    Some(Ok(Message::Pong(p))) => {
                        self.state.lock().unwrap().conns[index].pongs.push(p.to_vec());
                        self.changed.notify_waiters();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        self.state.lock().unwrap().conns[index].closed.get_or_insert(None);
                        break;
                    }
                },
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits until `check` returns Some, re-checking on every mock event.
    pub async fn wait<T>(&self, what: &str, mut check: impl FnMut(&[Conn]) -> Option<T>) -> T {
        guard(what, async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(v) = check(&self.state.lock().unwrap().conns) {
                    return v;
                }
                notified.await;
            }
        })
        .await
    }

    /// Number of upstream connections established so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().conns.len()
    }

    /// Number of TCP connections accepted (including refused handshakes).
    pub fn attempts(&self) -> usize {
        self.state.lock().unwrap().attempts
    }

    pub fn headers(&self, conn: usize) -> HeaderMap {
        self.state.lock().unwrap().conns[conn].headers.clone()
    }

    pub fn path(&self, conn: usize) -> String {
        self.state.lock().unwrap().conns[conn].path.clone()
    }

    /// Waits for the `n`th connection, counting from 0.
    pub async fn conn(&self, n: usize) {
        self.wait(&format!("upstream connection #{n}"), |c| {
            (c.len() > n).then_some(())
        })
        .await
    }

    /// Waits until connection `conn` has received `n` frames; returns them
    /// as JSON values (text frames) .
    pub async fn json(&self, conn: usize, n: usize) -> Vec<serde_json::Value> {
        self.wait(&format!("{n} frames on upstream #{conn}"), |c| {
            let frames = &c.get(conn)?.frames;
            (frames.len() >= n).then(|| frames.iter().map(to_json).collect())
        })
        .await
    }

    /// Waits for `n` frames on `conn`; returns them raw.
    pub async fn frames(&self, conn: usize, n: usize) -> Vec<Message> {
        self.wait(&format!("{n} frames on upstream #{conn}"), |c| {
            let frames = &c.get(conn)?.frames;
            (frames.len() >= n).then(|| frames.clone())
        })
        .await
    }

    /// Waits for a frame on `conn` matching `pred`; returns it.
    pub async fn find(
        &self,
        conn: usize,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait(what, |c| {
            c.get(conn)?.frames.iter().map(to_json).find(|v| pred(v))
        })
        .await
    }

    /// Waits for the `nth` open event (from 0) on connection `conn`.
    pub async fn nth_open(&self, conn: usize, nth: usize) -> serde_json::Value {
        self.wait(&format!("open event #{nth} on upstream #{conn}"), |c| {
            c.get(conn)?
                .frames
                .iter()
                .map(to_json)
                .filter(|v| v["event"] == "open")
                .nth(nth)
        })
        .await
    }

    /// A frame on `conn` matching `pred`, if one has arrived (no waiting).
    pub fn try_find(
        &self,
        conn: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let st = self.state.lock().unwrap();
        st.conns
            .get(conn)?
            .frames
            .iter()
            .map(to_json)
            .find(|v| pred(v))
    }

    /// Waits until connection `conn` has ended; returns the close frame.
    pub async fn closed(&self, conn: usize) -> Option<CloseFrame> {
        self.wait(&format!("upstream #{conn} to close"), |c| {
            c.get(conn)?.closed.clone()
        })
        .await
    }

    fn command(&self, conn: usize, cmd: MockCmd) {
        self.state.lock().unwrap().conns[conn]
            .tx
            .send(cmd)
            .unwrap_or_else(|_| panic!("upstream connection #{conn} is gone"));
    }

    /// Sends a frame to the proxy on connection `conn`.
    pub fn send(&self, conn: usize, msg: Message) {
        self.command(conn, MockCmd::Send(msg));
    }

    /// Drops connection `conn`'s TCP connection, with no close frame.
    pub fn drop_conn(&self, conn: usize) {
        self.command(conn, MockCmd::Drop);
    }

    /// Like `drop_conn`, for a connection that may have ended already;
    /// returns whether it was still there.
    pub fn try_drop_conn(&self, conn: usize) -> bool {
        let st = self.state.lock().unwrap();
        st.conns
            .get(conn)
            .is_some_and(|c| c.tx.send(MockCmd::Drop).is_ok())
    }

    /// Makes connection `conn` stop reading (and writing), keeping it open.
    pub fn stall(&self, conn: usize) {
        self.command(conn, MockCmd::Stall);
    }

    /// Waits until `n` TCP connections (dials) have been made.
    pub async fn wait_attempts(&self, n: usize) {
        let state = self.state.clone();
        guard(&format!("{n} dials"), async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if state.lock().unwrap().attempts >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
    }

    /// Sends a JSON text frame on connection `conn`.
    pub fn send_json(&self, conn: usize, v: serde_json::Value) {
        self.send(conn, Message::text(v.to_string()));
    }

    /// Closes connection `conn` from the backend's side.
    pub fn close(&self, conn: usize) {
        self.send(conn, Message::Close(None));
    }
}

/// The echo of a tab's data frame: the same data, back to that tab.
fn echo_reply(m: &Message) -> Option<Message> {
    let v: serde_json::Value = serde_json::from_str(m.to_text().ok()?).ok()?;
    let data = v.get("data")?;
    let reply = serde_json::json!({"tab": v.get("tab")?, "data": data});
    Some(Message::text(reply.to_string()))
}

pub fn to_json(m: &Message) -> serde_json::Value {
    match m {
        Message::Text(t) => serde_json::from_str(t.as_str())
            .unwrap_or_else(|e| panic!("upstream frame is not JSON ({e}): {t}")),
        other => panic!("expected a text frame upstream, got {other:?}"),
    }
}

/// Opens a tab and waits for its `open` event upstream; returns the tab and
/// its id.
pub async fn join(
    proxy: &TestProxy,
    mock: &Mock,
    conn: usize,
    spec: &TabSpec,
    nth_open: usize,
) -> (Tab, String) {
    let tab = spec.connect(proxy).await;
    let open = mock.nth_open(conn, nth_open).await;
    (tab, open["tab"].as_str().unwrap().to_string())
}
