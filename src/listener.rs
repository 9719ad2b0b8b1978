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
use tracing::{debug, warn};

use crate::client::Client;
use crate::config::Server;
use crate::proxy_protocol;
use crate::shared::Shared;
use crate::upgrade;

/// Accepts connections until `stop`'s sender is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    while let Some((mut stream, peer)) = accept(&listener, &mut stop).await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            // The configuration in force when the connection came (its
            // certificate, its timeouts).
            let live = shared.live();
            let acceptor = live.server.tls.clone().map(tokio_rustls::TlsAcceptor::from);
            let timeout = live.server.handshake_timeout;
            // The handshake timeout covers the PROXY header and TLS, each.
            let client = if live.server.proxy_protocol {
                let header = proxy_protocol::read_header(&mut stream);
                match tokio::time::timeout(timeout, header).await {
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
            match acceptor {
                None => serve_http(stream, shared, client, &live.server).await,
                Some(acceptor) => {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_http(tls, shared, client, &live.server).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// The next connection, or None once `stop`'s sender is dropped. A failed
/// accept (typically EMFILE at the open-file limit) is logged and retried
/// after a short pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    stop: &mut watch::Receiver<()>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return None,
        }
    }
}

/// Serves HTTP/1.1 on one connection, under `server`'s timeouts (the
/// configuration in force when it came); upgraded requests become tabs.
async fn serve_http<I>(io: I, shared: Arc<Shared>, client: Client, server: &Server)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = server.handshake_timeout;
    let max_header_size = server.max_header_size;
    let peer = client.peer;
    let service = service_fn(move |req| upgrade::handle(req, shared.clone(), client));
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
