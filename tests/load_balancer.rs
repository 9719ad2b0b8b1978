//! PROTOCOL.md, "Behind a load balancer": the client's address from a
//! PROXY protocol header (v1 or v2) or from a trusted proxy's
//! `X-Forwarded-For`, for per-address limits and for the `X-Forwarded-For`
//! sent upstream.

mod common;

use common::raw::opening;
use common::*;
use tokio::net::TcpStream;

/// A PROXY v2 header for a TCP-over-IPv4 connection from `source`.
fn v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// A tab's handshake with `prefix` in front and `headers` added; the
/// answer's status line ("" when closed without one), and the socket.
async fn tab(
    proxy: &TestProxy,
    prefix: &[u8],
    session: &str,
    headers: &str,
) -> (String, TcpStream) {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let head = opening(&mut s, prefix, session, headers).await;
    let status = head.lines().next().unwrap_or("").to_string();
    (status, s)
}

async fn forwarded_for(mock: &Mock, session: &str) -> String {
    let up = mock.upstream_for(session).await;
    let headers = up.headers().await;
    headers["x-forwarded-for"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn a_proxy_v1_header_names_the_client() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("proxy_protocol", true)
        .route(route("/ws", &mock))
        .start()
        .await;
    let header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n";
    let (status, _s) = tab(&proxy, header, "v1", "X-Forwarded-For: 192.0.2.50\r\n").await;
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
    // The tab's own value, with the PROXY header's source appended.
    assert_eq!(forwarded_for(&mock, "v1").await, "192.0.2.50, 203.0.113.7");
}

#[tokio::test]
async fn a_proxy_v2_header_names_the_client_for_per_address_limits() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("proxy_protocol", true)
        .server("per_ip", Raw("{ tabs = 1, sessions = 10 }"))
        .route(route("/ws", &mock))
        .start()
        .await;
    let (status, _a) = tab(&proxy, &v2([198, 51, 100, 9], 5555), "v2", "").await;
    assert!(status.contains(" 101 "), "{status}");
    assert_eq!(forwarded_for(&mock, "v2").await, "198.51.100.9");
    // The same client through the same load balancer: its one tab is taken.
    let (status, _) = tab(&proxy, &v2([198, 51, 100, 9], 5556), "v2", "").await;
    assert!(status.contains(" 429 "), "{status}");
    // Another client through it is served.
    let (status, _b) = tab(&proxy, &v2([198, 51, 100, 10], 5557), "v2", "").await;
    assert!(status.contains(" 101 "), "{status}");
    // A health check (LOCAL) is the load balancer itself.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let (status, _c) = tab(&proxy, &local, "check", "").await;
    assert!(status.contains(" 101 "), "{status}");
}

#[tokio::test]
async fn without_a_valid_header_the_connection_is_closed_unanswered() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("proxy_protocol", true)
        .route(route("/ws", &mock))
        .start()
        .await;
    let (status, _) = tab(&proxy, b"", "none", "").await;
    assert_eq!(status, "", "no answer without a header");
    let (status, _) = tab(&proxy, b"PROXY TCP4 nonsense\r\n", "bad", "").await;
    assert_eq!(status, "");
    assert_eq!(mock.attempts(), 0);
    // The admin listener never expects one.
    assert_eq!(admin_get(proxy.admin, "/healthz").await.0, 200);
}

#[tokio::test]
async fn a_trusted_proxy_is_believed_about_the_client() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("trusted_proxies", &["127.0.0.0/8", "10.0.0.0/8"][..])
        .server("per_ip", Raw("{ tabs = 1, sessions = 10 }"))
        .route(route("/ws", &mock))
        .start()
        .await;
    let xff = "X-Forwarded-For: 192.0.2.1, 10.1.1.1\r\n";
    let (status, _a) = tab(&proxy, b"", "t", xff).await;
    assert!(status.contains(" 101 "), "{status}");
    // Upstream: the tab's value with the peer appended, as always.
    assert_eq!(
        forwarded_for(&mock, "t").await,
        "192.0.2.1, 10.1.1.1, 127.0.0.1"
    );
    // 192.0.2.1 holds its one tab; 192.0.2.2 is another client.
    let (status, _) = tab(&proxy, b"", "t", "X-Forwarded-For: 192.0.2.1\r\n").await;
    assert!(status.contains(" 429 "), "{status}");
    let (status, _b) = tab(&proxy, b"", "t", "X-Forwarded-For: 192.0.2.2\r\n").await;
    assert!(status.contains(" 101 "), "{status}");
}

#[tokio::test]
async fn an_untrusted_peer_is_not_believed() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("per_ip", Raw("{ tabs = 1, sessions = 10 }"))
        .route(route("/ws", &mock))
        .start()
        .await;
    let (status, _a) = tab(&proxy, b"", "u", "X-Forwarded-For: 192.0.2.1\r\n").await;
    assert!(status.contains(" 101 "), "{status}");
    // A forged header does not make another client.
    let (status, _) = tab(&proxy, b"", "u", "X-Forwarded-For: 192.0.2.2\r\n").await;
    assert!(status.contains(" 429 "), "{status}");
}
