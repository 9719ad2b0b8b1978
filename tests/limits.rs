//! PROTOCOL.md, "Limits": everything a client controls is bounded, each
//! refusal names its limit and is counted by reason. One test per row of
//! issue 15's table, through the real proxy.

mod common;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn refused_count(proxy: &TestProxy, reason: &str) -> Option<f64> {
    reason_count(proxy, "tabmux_admissions_refused_total", reason).await
}

/// Each new cookie is a paid upstream: past `max_sessions` a tab that
/// would open another gets 429, tabs of live sessions still join, and a
/// lingering session still counts.
#[tokio::test]
async fn max_sessions_refuses_new_sessions_only() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("max_sessions", 2u64)
        .route(route("/ws", &mock).linger("1h"))
        .start()
        .await;
    let a = TabSpec::new("a").connect(&proxy).await;
    let _b = TabSpec::new("b").connect(&proxy).await;
    let (status, body) = TabSpec::new("c").refused(&proxy).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body.trim(), "tabmux is at its session limit (max_sessions)");
    // A tab of a session that exists joins it.
    let _a2 = TabSpec::new("a").connect(&proxy).await;
    // Session a lingers once its tabs are gone, and still counts.
    a.close(1000).await;
    drop(_a2);
    mock.upstream(0).connected().await;
    TabSpec::new("d").refused(&proxy).await;
    assert_eq!(mock.connections(), 2, "no upstream beyond the limit");
    assert_eq!(refused_count(&proxy, "max_sessions").await, Some(2.0));
}

/// One address cannot hold all the tabs: past `per_ip.tabs` its next tab
/// gets 429, and a tab from another address is served. The refusal comes
/// at accept, before the request names a route (handshakes count against
/// `per_ip.tabs`), so it is counted with an empty route label.
#[tokio::test]
async fn one_address_cannot_starve_the_others_of_tabs() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .max_tabs(10)
        .server("per_ip", Raw("{ tabs = 2, sessions = 10 }"))
        .route(route("/ws", &mock))
        .start()
        .await;
    let _t1 = TabSpec::new("s").from("127.0.0.2").connect(&proxy).await;
    let _t2 = TabSpec::new("s").from("127.0.0.2").connect(&proxy).await;
    let (status, body) = TabSpec::new("s").from("127.0.0.2").refused(&proxy).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body.trim(), "too many tabs from this address (per_ip.tabs)");
    let _other = TabSpec::new("s").from("127.0.0.3").connect(&proxy).await;
    let text = admin_get(proxy.admin, "/metrics").await.1;
    let at_accept = r#"tabmux_admissions_refused_total{route="",reason="per_ip_tabs"}"#;
    assert_eq!(metric(&text, at_accept), Some(1.0));
}

/// Fresh cookies from one address cannot open upstreams without bound.
#[tokio::test]
async fn one_address_opens_at_most_per_ip_sessions() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("per_ip", Raw("{ tabs = 100, sessions = 3 }"))
        .route(route("/ws", &mock).linger("0s"))
        .start()
        .await;
    let mut tabs = Vec::new();
    for n in 0..3 {
        let spec = TabSpec::new(&format!("random-{n}")).from("127.0.0.2");
        tabs.push(spec.connect(&proxy).await);
    }
    for n in 3..20 {
        let spec = TabSpec::new(&format!("random-{n}")).from("127.0.0.2");
        let (status, body) = spec.refused(&proxy).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            body.trim(),
            "too many sessions from this address (per_ip.sessions)"
        );
    }
    assert_eq!(mock.attempts(), 3, "17 refused cookies dialled nothing");
    // Another address opens its own; a tab of an existing session from
    // the full address still joins.
    let _other = TabSpec::new("other")
        .from("127.0.0.3")
        .connect(&proxy)
        .await;
    let _joined = TabSpec::new("random-0")
        .from("127.0.0.2")
        .connect(&proxy)
        .await;
    // Sessions that ended no longer count.
    tabs.pop().unwrap().close(1000).await;
    mock.upstream(2).closed().await;
    let spec = TabSpec::new("random-new").from("127.0.0.2");
    guard("a slot freed by an ended session", async {
        while spec.try_connect(&proxy).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused_count(&proxy, "per_ip_sessions").await.unwrap() >= 17.0);
}

/// A `direct` session can never be rejoined: it ends with its tab, however
/// long the route's `linger`.
#[tokio::test]
async fn direct_sessions_do_not_linger() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).missing_cookie("direct").linger("1h"))
        .start()
        .await;
    let tab = TabSpec::new("x").cookie(None).connect(&proxy).await;
    up.connected().await;
    tab.close(1000).await;
    let frame = up.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1000);
}

/// The admin listener: a connection that sends no request head is closed
/// after `handshake_timeout`, and no more than `max_connections` are
/// served at once (the next waits, and is served once one closes).
#[tokio::test]
async fn the_admin_listener_is_bounded() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .handshake_timeout("1s")
        .admin("max_connections", 2u64)
        .route(route("/ws", &mock))
        .start()
        .await;
    // Silent connections are closed.
    let mut silent = TcpStream::connect(proxy.admin).await.unwrap();
    let mut buf = [0u8; 64];
    let n = guard(
        "the silent admin connection to close",
        silent.read(&mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "the proxy closed it without an answer");
    // Two keep-alive connections hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let n = guard("an answer", s.read(&mut buf)).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // A third is not served while they are open (a bounded look: absence
    // cannot be waited for) ...
    let mut third = TcpStream::connect(proxy.admin).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let early =
        tokio::time::timeout(std::time::Duration::from_millis(150), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");
    // ... and is, once one closes.
    drop(held.pop());
    let n = guard("the third connection's answer", third.read(&mut buf))
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}
