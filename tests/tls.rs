//! TLS: tabs over wss:// with a generated certificate, and a wss:// upstream
//! verified against a route's `ca`.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;

/// A generated certificate written to a fresh directory.
fn dev_cert() -> (tempdir::Dir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempdir::Dir::new("tls");
    let (cert, key) = tabmux::tls::write_dev_cert(dir.path()).unwrap();
    (dir, cert, key)
}

/// A client config that trusts exactly `cert`.
fn trusting(cert: &std::path::Path) -> Arc<rustls::ClientConfig> {
    Arc::new(tabmux::tls::client_config(Some(cert)).unwrap())
}

/// A proxy serving wss:// with a generated certificate in front of a mock,
/// and a tab spec that trusts that certificate. The directory holds the
/// certificate for as long as it is kept.
async fn wss_proxy() -> (tempdir::Dir, Mock, TestProxy, TabSpec) {
    let (dir, cert, _key) = dev_cert();
    let mock = Mock::start().await;
    // Relative paths resolve against the config file's directory.
    let proxy = proxy()
        .tls("dev.crt", "dev.key")
        .route(route("/ws", &mock))
        .start_in(dir.path())
        .await;
    let spec = TabSpec::new("s").tls(trusting(&cert));
    (dir, mock, proxy, spec)
}

#[tokio::test]
async fn tabs_connect_over_wss_with_a_generated_certificate() {
    let (_dir, mock, proxy, spec) = wss_proxy().await;
    let up = mock.upstream(0);
    let mut tab = spec.connect(&proxy).await;
    let frames = up.json(1).await;
    assert_eq!(frames[0]["event"], "open");
    assert_eq!(up.headers().await["x-forwarded-proto"], "https");
    up.send_json(json!({"data": "over tls"}));
    assert_eq!(tab.recv_text().await, "\"over tls\"");
    // A client that does not trust the certificate cannot connect.
    let other = dev_cert();
    assert!(TabSpec::new("s")
        .tls(trusting(&other.1))
        .try_connect(&proxy)
        .await
        .is_err());
}

/// Over TLS, rustls may hold decrypted frames that the socket no longer
/// shows as readable. Each tab sends its burst in one write (one TLS record)
/// of frames of exactly 512 bytes, the size of a tab's read buffer, so that
/// every read of the proxy ends on a frame boundary with the rest of the
/// record still inside rustls: all of it must arrive, in order. Then a burst
/// the other way, to both tabs of the session.
#[tokio::test]
async fn tls_tabs_send_and_receive_bursts_in_order() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    const BURST: usize = 10;
    let (_dir, mock, proxy, spec) = wss_proxy().await;
    let up = mock.upstream(0);
    let mut a = spec.connect(&proxy).await;
    let mut b = spec.connect(&proxy).await;
    // 504 bytes of payload: with the 2-byte header, the 2-byte length and
    // the 4-byte mask, a 512-byte frame.
    let text = |key: &str, n: usize| {
        let head = format!("{{\"{key}\":{n},\"pad\":\"");
        format!("{head}{}\"}}", "x".repeat(504 - head.len() - 2))
    };
    assert_eq!(text("a", 0).len(), 504);
    for (tab, key) in [(&mut a, "a"), (&mut b, "b")] {
        for n in 0..BURST {
            tab.ws.feed(Message::text(text(key, n))).await.unwrap();
        }
        tab.ws.flush().await.unwrap();
    }
    // Two open events, then each tab's messages in the order it sent them.
    let frames = up.json(2 + 2 * BURST).await;
    for (tab, key) in [("t1", "a"), ("t2", "b")] {
        let sent: Vec<u64> = frames
            .iter()
            .filter(|f| f["tab"] == tab && f.get("data").is_some())
            .map(|f| f["data"][key].as_u64().unwrap())
            .collect();
        assert_eq!(sent, (0..BURST as u64).collect::<Vec<_>>(), "{tab}");
    }
    for n in 0..BURST {
        up.send_json(json!({"data": n}));
    }
    for tab in [&mut a, &mut b] {
        for n in 0..BURST {
            assert_eq!(tab.recv_text().await, n.to_string());
        }
    }
}

#[tokio::test]
async fn wss_upstream_is_verified_against_the_route_ca() {
    let (dir, cert, key) = dev_cert();
    let server = Arc::new(tabmux::tls::server_config(&cert, &key).unwrap());
    let mock = Mock::start_with(Behavior::default(), Some(server)).await;
    let up = mock.upstream(0);
    let wss = format!("wss://localhost:{}/backend", mock.addr.port());
    let proxy = proxy()
        .route(
            route("/ws", &mock)
                .upstream(&wss)
                .ca(&cert.display().to_string()),
        )
        .start_in(dir.path())
        .await;
    let mut tab = TabSpec::new("s").connect(&proxy).await;
    up.json(1).await;
    up.send_json(json!({"data": 1}));
    assert_eq!(tab.recv_text().await, "1");

    // Without the CA, the upstream's certificate is refused: 502.
    let proxy = common::proxy()
        .route(route("/ws", &mock).upstream(&wss))
        .start()
        .await;
    let (status, body) = TabSpec::new("s").refused(&proxy).await;
    assert_eq!(status.as_u16(), 502);
    assert!(body.contains("TLS"), "{body}");
}

/// A tiny self-removing temporary directory.
mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("tabmux-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
