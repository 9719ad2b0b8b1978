//! The mock backend: a real WebSocket server on 127.0.0.1:0 that records
//! every upstream connection tabmux makes and what arrives on it, and does
//! what a test tells it (send, drop, stall, close, refuse, hang). Its core
//! knows no envelope: frames are [`Message`]s; the `json` helpers
//! (`super::json`) read and write them as envelope frames.
//!
//! Connections are reached through named [`Upstream`] handles
//! (`let first = mock.upstream(0)`), which wait for the connection they
//! name whenever they need it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::guard;

/// The mock's answer to a frame from tabmux: the frame to send back, if any.
pub type Reply = Arc<dyn Fn(&Message) -> Option<Message> + Send + Sync>;

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
    /// Answer every data frame with what this returns.
    pub reply: Option<Reply>,
    /// Keep no record of frames (for long runs).
    pub forget: bool,
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
    /// Frames a test has claimed (see `Upstream::join`).
    pub claimed: usize,
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

    /// The upstream connection tabmux made `n`th (from 0), to be named by
    /// the test: `let first = mock.upstream(0);`. Nothing waits here; the
    /// handle waits for its connection whenever it needs it.
    pub fn upstream(&self, n: usize) -> Upstream {
        Upstream {
            mock: self.clone(),
            n,
        }
    }

    /// The upstream connection of the session whose tabs send the cookie
    /// `sessionid=<session>` (as `TabSpec::new(session)` does), once
    /// tabmux has made it.
    pub async fn upstream_for(&self, session: &str) -> Upstream {
        let cookie = format!("sessionid={session}");
        let n = self
            .wait(&format!("the upstream of session {session}"), |c| {
                c.iter().position(|c| {
                    c.headers
                        .get("cookie")
                        .is_some_and(|v| v.as_bytes().starts_with(cookie.as_bytes()))
                })
            })
            .await;
        self.upstream(n)
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
        let refuse = behavior.refuse;
        let pick_first = behavior.pick_first_protocol;
        let callback =
            move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                *seen2.lock().unwrap() = Some((req.uri().to_string(), req.headers().clone()));
                if let Some(status) = refuse {
                    let mut r = ErrorResponse::new(Some("refused by mock".into()));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    return Err(r);
                }
                if pick_first {
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
                claimed: 0,
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
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        let answer = behavior.reply.as_ref().and_then(|reply| reply(&m));
                        if !behavior.forget {
                            self.state.lock().unwrap().conns[index].frames.push(m);
                            self.changed.notify_waiters();
                        }
                        if let Some(answer) = answer {
                            if ws.send(answer).await.is_err() { break }
                        }
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

    /// Runs `f` on the connections as they are now (no waiting).
    pub fn now<T>(&self, f: impl FnOnce(&mut [Conn]) -> T) -> T {
        f(&mut self.state.lock().unwrap().conns)
    }

    /// Number of upstream connections established so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().conns.len()
    }

    /// Number of TCP connections accepted (including refused handshakes).
    pub fn attempts(&self) -> usize {
        self.state.lock().unwrap().attempts
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
}

/// One upstream connection of a [`Mock`], named by the test.
#[derive(Clone)]
pub struct Upstream {
    pub mock: Mock,
    /// Its place in the order tabmux connected (from 0).
    pub n: usize,
}

impl Upstream {
    /// Waits until `check` on this connection returns Some.
    pub async fn wait<T>(&self, what: &str, mut check: impl FnMut(&Conn) -> Option<T>) -> T {
        let n = self.n;
        self.mock
            .wait(&format!("{what} (upstream #{n})"), |c| check(c.get(n)?))
            .await
    }

    /// Runs `f` on this connection as it is now, if it exists (no waiting).
    pub fn now<T>(&self, f: impl FnOnce(&mut Conn) -> T) -> Option<T> {
        self.mock.now(|c| c.get_mut(self.n).map(f))
    }

    /// Waits until tabmux has made this connection.
    pub async fn connected(&self) {
        self.wait("the connection", |_| Some(())).await
    }

    /// The request headers of its handshake (waits for the connection).
    pub async fn headers(&self) -> HeaderMap {
        self.wait("the connection", |c| Some(c.headers.clone()))
            .await
    }

    /// The request path (and query) of its handshake.
    pub async fn path(&self) -> String {
        self.wait("the connection", |c| Some(c.path.clone())).await
    }

    /// Waits for `n` frames; returns them all.
    pub async fn frames(&self, n: usize) -> Vec<Message> {
        self.wait(&format!("{n} frames"), |c| {
            (c.frames.len() >= n).then(|| c.frames.clone())
        })
        .await
    }

    /// Waits until the connection has ended; returns tabmux's close frame.
    pub async fn closed(&self) -> Option<CloseFrame> {
        self.wait("the connection to close", |c| c.closed.clone())
            .await
    }

    fn command(&self, cmd: MockCmd) {
        let sent = self.now(|c| c.tx.send(cmd).is_ok());
        assert_eq!(sent, Some(true), "upstream #{} is gone", self.n);
    }

    /// Sends a frame to tabmux.
    pub fn send(&self, msg: Message) {
        self.command(MockCmd::Send(msg));
    }

    /// Closes the connection from the backend's side.
    pub fn close(&self) {
        self.send(Message::Close(None));
    }

    /// Drops the TCP connection, with no close frame.
    pub fn drop_conn(&self) {
        self.command(MockCmd::Drop);
    }

    /// Like `drop_conn`, for a connection that may have ended already;
    /// returns whether it was still there.
    pub fn try_drop_conn(&self) -> bool {
        self.now(|c| c.tx.send(MockCmd::Drop).is_ok())
            .unwrap_or(false)
    }

    /// Stops reading (and writing), keeping the connection open.
    pub fn stall(&self) {
        self.command(MockCmd::Stall);
    }
}
