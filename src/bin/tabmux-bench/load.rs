//! The load client: tabs as WebSocket clients, and one function per
//! scenario. Each returns raw observations; main.rs turns them into figures.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use futures_util::SinkExt;
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A tab's socket: TCP, or TLS over TCP when the proxy serves `wss://`.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Where tabs connect, and whether over TLS.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    tls: Option<TlsConnector>,
}

impl Target {
    pub fn plain(addr: SocketAddr) -> Target {
        Target { addr, tls: None }
    }

    /// `wss://` to `addr`, with a connector from [`tls_connector`].
    pub fn tls(addr: SocketAddr, connector: &TlsConnector) -> Target {
        Target {
            addr,
            tls: Some(connector.clone()),
        }
    }
}

/// A TLS connector that trusts the certificate in `ca` (besides the
/// system's roots, as tabmux's own upstream client does).
pub fn tls_connector(ca: &Path) -> anyhow::Result<TlsConnector> {
    let config = tabmux::tls::client_config(Some(ca)).map_err(anyhow::Error::msg)?;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Connections opened at once while connecting many tabs.
const CONCURRENCY: usize = 256;
/// A 32-byte JSON message (with its sequence number in place of the zeros).
fn message(n: u64) -> String {
    format!("{{\"n\":{n:>10},\"pad\":\"0123456\"}}")
}

/// Opens one tab of `session` (cookie `sid` and query `session`).
pub async fn connect(target: &Target, session: usize) -> anyhow::Result<Ws> {
    let addr = target.addr;
    let scheme = if target.tls.is_some() { "wss" } else { "ws" };
    let mut req = format!("{scheme}://{addr}/ws?session={session}").into_client_request()?;
    req.headers_mut()
        .insert("cookie", HeaderValue::from_str(&format!("sid=s{session}"))?);
    req.headers_mut()
        .insert("origin", HeaderValue::from_static("http://bench.local"));
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match &target.tls {
        Some(tls) => {
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            Box::new(tls.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(config)).await?;
    Ok(ws)
}

/// Opens `tabs` tabs, `per_session` to a session, `CONCURRENCY` at a time.
pub async fn connect_many(
    target: &Target,
    tabs: usize,
    per_session: usize,
) -> anyhow::Result<Vec<Ws>> {
    let results: Vec<anyhow::Result<Ws>> = stream::iter(0..tabs)
        .map(|i| connect(target, i / per_session))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// `sessions` browsers of `per_session` tabs against a real server, each
/// tab opened (and subscribed) by `open(browser, n)`, `n` counting every
/// tab; 64 at a time (a real server's handshakes are slower than the
/// benchmark backend's).
pub async fn browsers<F, Fut>(
    sessions: usize,
    per_session: usize,
    open: F,
) -> anyhow::Result<Vec<Ws>>
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Ws>>,
{
    let results: Vec<anyhow::Result<Ws>> = stream::iter(0..sessions * per_session)
        .map(|i| open(i / per_session, i))
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The next data message, ignoring control frames.
async fn next_data(ws: &mut Ws) -> anyhow::Result<Message> {
    loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("connection closed"),
        }
    }
}

/// Scenario 1: `tabs` idle tabs, each having sent and received one message
/// (so every buffer is live). Returns the open sockets, to be measured.
pub async fn idle_tabs(
    target: &Target,
    tabs: usize,
    per_session: usize,
) -> anyhow::Result<Vec<Ws>> {
    let mut all = connect_many(target, tabs, per_session).await?;
    let echoed: Vec<anyhow::Result<()>> = stream::iter(all.iter_mut().enumerate())
        .map(|(i, ws)| async move {
            ws.send(Message::text(message(i as u64))).await?;
            next_data(ws).await?;
            Ok(())
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    echoed.into_iter().collect::<anyhow::Result<()>>()?;
    Ok(all)
}

/// Scenario 2: one tab, closed loop; round-trip times in nanoseconds.
pub async fn latency(target: &Target, warmup: usize, samples: usize) -> anyhow::Result<Vec<u64>> {
    latency_paced(target, warmup, samples, Duration::ZERO).await
}

/// Like [`latency`], a message at most every `every` (a tab within the
/// default `tab_rate`, as a page is: 2 ms is 500 messages a second).
pub async fn latency_paced(
    target: &Target,
    warmup: usize,
    samples: usize,
    every: Duration,
) -> anyhow::Result<Vec<u64>> {
    let mut ws = connect(target, 0).await?;
    let mut rtts = Vec::with_capacity(samples);
    let mut next = tokio::time::Instant::now();
    for i in 0..(warmup + samples) {
        if !every.is_zero() {
            next += every;
            tokio::time::sleep_until(next).await;
        }
        let start = Instant::now();
        ws.send(Message::text(message(i as u64))).await?;
        next_data(&mut ws).await?;
        if i >= warmup {
            rtts.push(start.elapsed().as_nanos() as u64);
        }
    }
    Ok(rtts)
}

/// Scenario 3: `tabs` tabs of one session send `rate` messages/s in total
/// for `duration`, each echoed. Returns the echoes received.
pub async fn offered_rate(
    target: &Target,
    tabs: usize,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<u64> {
    let sockets = connect_many(target, tabs, tabs).await?;
    let received = Arc::new(AtomicU64::new(0));
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    for ws in sockets {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Text(_)) {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Send in 1 ms ticks, spread over the tabs.
    let per_tick = (rate / 1000).max(1);
    let ticks = duration.as_millis() as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut n = 0u64;
    for _ in 0..ticks {
        tick.tick().await;
        for _ in 0..per_tick {
            let sink = &mut sinks[(n as usize) % tabs];
            sink.feed(Message::text(message(n))).await?;
            n += 1;
        }
        for sink in &mut sinks {
            sink.flush().await?;
        }
    }
    // Wait (bounded) for the echoes still in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for r in readers {
        r.abort();
    }
    Ok(received.load(Ordering::Relaxed))
}

/// Tabs that record the latency of every stamped message they receive
/// (scenario 4's broadcasts, the `pusher` scenario's events).
pub struct FanOut {
    pub deliveries: Arc<AtomicU64>,
    latencies: Vec<tokio::task::JoinHandle<Vec<u32>>>,
    /// Dropped to make every tab task stop and hand back its latencies.
    stop: tokio::sync::watch::Sender<()>,
}

impl FanOut {
    pub async fn connect(
        target: &Target,
        sessions: usize,
        per_session: usize,
    ) -> anyhow::Result<FanOut> {
        let sockets = connect_many(target, sessions * per_session, per_session).await?;
        Ok(FanOut::timing(sockets, stamp))
    }

    /// Reads every socket until `finish`, timing each message whose send
    /// time `stamp` finds (Unix nanoseconds).
    pub fn timing(sockets: Vec<Ws>, stamp: fn(&str) -> Option<u64>) -> FanOut {
        let deliveries = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(());
        let latencies = sockets
            .into_iter()
            .map(|mut ws| {
                let deliveries = deliveries.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    loop {
                        let m = tokio::select! {
                            m = next_data(&mut ws) => m,
                            _ = stopped.changed() => break,
                        };
                        let Ok(m) = m else { break };
                        let now = crate::unix_ns();
                        if let Some(t) = stamp(m.to_text().unwrap_or("")) {
                            lat.push((now.saturating_sub(t) / 1000) as u32);
                            deliveries.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat
                })
            })
            .collect();
        FanOut {
            deliveries,
            latencies,
            stop,
        }
    }

    /// Closes every tab; returns all delivery latencies, in microseconds.
    pub async fn finish(self) -> Vec<u32> {
        drop(self.stop);
        let mut all = Vec::new();
        for task in self.latencies {
            if let Ok(lat) = task.await {
                all.extend(lat);
            }
        }
        all
    }
}

/// Waits (bounded) until deliveries in flight have landed: the count has
/// stopped moving.
pub async fn settle(deliveries: &AtomicU64) {
    let mut last = u64::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = deliveries.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
}

/// The `t` of `{"t":123}`.
fn stamp(text: &str) -> Option<u64> {
    let start = text.find("\"t\":")? + 4;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Scenario 5: `tabs` tabs of `sessions` sessions connect as fast as they
/// can. Returns the time it took and the open sockets.
pub async fn join_storm(
    target: &Target,
    tabs: usize,
    sessions: usize,
) -> anyhow::Result<(Duration, Vec<Ws>)> {
    let start = Instant::now();
    // Interleave sessions, as tabs of many users arrive mixed together.
    let results: Vec<anyhow::Result<Ws>> = stream::iter(0..tabs)
        .map(|i| connect(target, i % sessions))
        .buffer_unordered(2 * CONCURRENCY)
        .collect()
        .await;
    let elapsed = start.elapsed();
    let sockets: anyhow::Result<Vec<Ws>> = results.into_iter().collect();
    Ok((elapsed, sockets?))
}

/// One HTTP/1 request to `addr` (the connection closed after it): the
/// answer's status and body.
pub async fn http(addr: SocketAddr, request: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The Unix-nanosecond stamp right after `key` in a message's text.
pub fn stamp_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Calls `send` at `rate` a second for `secs`; how many times.
pub async fn at_rate<F, Fut>(rate: u32, secs: u64, mut send: F) -> anyhow::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut every = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let total = u64::from(rate) * secs;
    for _ in 0..total {
        every.tick().await;
        send().await?;
    }
    Ok(total)
}
