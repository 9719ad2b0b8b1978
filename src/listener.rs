//! The tab listener: accept TCP, terminate TLS when configured, and let hyper
//! serve HTTP/1.1 until a request is upgraded to a WebSocket.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cause::Refusal;
use crate::client::Client;
use crate::config::Server;
use crate::limits::{Handshake, Limit};
use crate::proxy_protocol;
use crate::shared::Shared;
use crate::upgrade;

/// Accepts connections until `stop`'s sender is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    while let Some((stream, peer)) = accept(&listener, &mut stop).await {
        let shared = shared.clone();
        tokio::spawn(connection(stream, peer, shared));
    }
}

/// One connection, from accept to the request that becomes a tab.
async fn connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    // The configuration in force when the connection came (its
    // certificate, its timeouts).
    let live = shared.live();
    // One deadline for the PROXY header, TLS and the request head, so that
    // a client cannot stretch the handshake by sending each part late.
    let deadline = Instant::now() + live.server.handshake_timeout;
    let client = if live.server.proxy_protocol {
        let header = proxy_protocol::read_header(&mut stream);
        match tokio::time::timeout_at(deadline, header).await {
            Ok(Ok(source)) => Client::direct(source.unwrap_or(peer)),
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "connection closed: PROXY protocol header");
                return;
            }
            Err(_) => {
                debug!(%peer, "connection closed: no PROXY protocol header in time");
                return;
            }
        }
    } else {
        Client::direct(peer)
    };
    // The handshake counts against its address's tabs. A trusted proxy's
    // client is known only from the request (X-Forwarded-For); its tab is
    // counted then.
    let permit = if client.peer_is_trusted(&live.server.trusted_proxies) {
        None
    } else {
        match shared.limits.handshake(client.limit_key()) {
            Ok(permit) => Some(permit),
            Err(limit) => {
                refuse_at_accept(stream, limit, live.server.tls.is_some(), &shared);
                return;
            }
        }
    };
    let handshake = Handshake::new(permit);
    let http = Http {
        shared: shared.clone(),
        client,
        handshake,
        deadline,
    };
    match live.server.tls.clone().map(tokio_rustls::TlsAcceptor::from) {
        None => serve_http(stream, http, &live.server).await,
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => serve_http(tls, http, &live.server).await,
            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => debug!(%peer, "TLS handshake timed out"),
        },
    }
}

/// A connection refused before its request is read, because its address
/// holds its share of `per_ip.tabs` already: a plain-text 429 naming the
/// limit if it fits the socket at once (nothing is waited for), and the
/// connection closed. Over TLS it is closed without an answer: a TLS
/// handshake is the work a flood wants tabmux to do.
fn refuse_at_accept(stream: TcpStream, limit: Limit, tls: bool, shared: &Shared) {
    let row = Refusal::Limit(limit).row();
    let label = row.label.unwrap_or("");
    shared.metrics.refused_before_route(label);
    debug!(peer = ?stream.peer_addr().ok(), reason = label, "connection refused at accept");
    if !tls {
        let body = row.body;
        let answer = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}\n",
            row.status.as_u16(),
            row.status.canonical_reason().unwrap_or(""),
            body.len() + 1
        );
        let _ = stream.try_write(answer.as_bytes());
    }
}

/// The next connection, or None once `stop`'s sender is dropped.
///
/// A failed accept (EMFILE or ENFILE at the open-file limit, ENOBUFS) is
/// retried after a pause that doubles while accepts keep failing, from
/// 10 ms to 200 ms: the pending connection stays in the kernel's backlog,
/// so an immediate retry would fail again and spin a core that the tabs
/// already connected need. Logged at warn at most once every 10 s, with
/// the number of failures since (a process at its limit fails often).
pub async fn accept(
    listener: &TcpListener,
    stop: &mut watch::Receiver<()>,
) -> Option<(TcpStream, SocketAddr)> {
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    ACCEPT_FAILURES.note(&e);
                    pause = (pause * 2).clamp(Duration::from_millis(10), Duration::from_millis(200));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => return None,
                    }
                }
            },
            _ = stop.changed() => return None,
        }
    }
}

/// Failed accepts, logged at most once every [`AcceptFailures::EVERY`].
static ACCEPT_FAILURES: AcceptFailures = AcceptFailures {
    since: std::sync::atomic::AtomicU64::new(0),
    last_ms: std::sync::atomic::AtomicU64::new(0),
};

struct AcceptFailures {
    /// Failures since the last warn line.
    since: std::sync::atomic::AtomicU64,
    /// When the last warn line was written (ms since the Unix epoch).
    last_ms: std::sync::atomic::AtomicU64,
}

impl AcceptFailures {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&self, e: &std::io::Error) {
        use std::sync::atomic::Ordering::Relaxed;
        let failed = self.since.fetch_add(1, Relaxed) + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Relaxed);
        let due = now.saturating_sub(last) >= Self::EVERY.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.since.store(0, Relaxed);
            warn!(error = %e, failed, "accept failed (at the open-file limit?); retrying with backoff");
        } else {
            debug!(error = %e, "accept failed");
        }
    }
}

/// What serving one connection's requests needs.
struct Http {
    shared: Arc<Shared>,
    client: Client,
    /// Its slot among its address's tabs, until a request becomes its tab.
    handshake: Handshake,
    /// When its request head must have arrived.
    deadline: Instant,
}

/// Serves HTTP/1.1 on one connection, under `server`'s timeouts (the
/// configuration in force when it came); upgraded requests become tabs.
async fn serve_http<I>(io: I, http: Http, server: &Server)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // What is left of the connection's handshake time.
    let timeout = http.deadline.saturating_duration_since(Instant::now());
    let max_header_size = server.max_header_size;
    let Http {
        shared,
        client,
        handshake,
        ..
    } = http;
    let peer = client.peer;
    let service =
        service_fn(move |req| upgrade::handle(req, shared.clone(), client, handshake.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // A connection that never sends its request is dropped.
        .header_read_timeout(timeout)
        // An oversized request head (a huge Cookie, hundreds of headers) is
        // refused with 431 before it is buffered.
        .max_buf_size(max_header_size)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}
