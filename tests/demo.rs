//! `tabmux demo`: several tabs of one browser, one backend connection.

mod common;

use std::sync::atomic::Ordering;

use common::*;

fn any() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn demo_tabs_share_one_backend_connection() {
    let demo = tabmux::demo::start(any(), any(), any()).await.unwrap();
    // The page hands out the session cookie.
    let (status, body) = raw_http(
        demo.page,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("new WebSocket"), "{body}");

    let proxy = TestProxy::at(demo.proxy, demo.admin);
    let origin = format!("http://{}", demo.page);
    let spec = TabSpec::new("x")
        .cookie(Some("tabmux_demo=browser-1"))
        .origin(Some(&origin));
    let mut tabs = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut tab = spec.connect(&proxy).await;
        let welcome: serde_json::Value = serde_json::from_str(&tab.recv_text().await).unwrap();
        assert_eq!(welcome["type"], "welcome");
        ids.push(welcome["you"].as_str().unwrap().to_string());
        tabs.push(tab);
    }
    assert_eq!(ids, ["t1", "t2", "t3"]);
    // The last tab sees the count reach three tabs on one upstream.
    let count: serde_json::Value = serde_json::from_str(&tabs[2].recv_text().await).unwrap();
    assert_eq!(count["type"], "count");
    assert_eq!(count["tabs"], 3);
    assert_eq!(count["upstreams"], 1);
    assert_eq!(demo.backend_connections.load(Ordering::SeqCst), 1);

    // A ping is answered to the asking tab only; a "say" goes to every tab.
    tabs[1].send_text(r#"{"type":"ping"}"#).await;
    tabs[1].send_text(r#"{"type":"say","text":"hi"}"#).await;
    for (i, tab) in tabs.iter_mut().enumerate() {
        let mut seen = Vec::new();
        loop {
            let m: serde_json::Value = serde_json::from_str(&tab.recv_text().await).unwrap();
            if m["type"] == "said" {
                assert_eq!(
                    m,
                    serde_json::json!({"type": "said", "from": "t2", "text": "hi"})
                );
                break;
            }
            seen.push(m["type"].as_str().unwrap().to_string());
        }
        let pongs = seen.iter().filter(|t| *t == "pong").count();
        assert_eq!(pongs, usize::from(i == 1), "tab {i} saw {seen:?}");
    }
}
