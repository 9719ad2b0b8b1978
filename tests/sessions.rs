//! PROTOCOL.md: handshakes, admission, session sharing, lifetime, and the
//! `none` envelope.

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn upstream_handshake_forwards_the_first_tabs_headers() {
    let mock = Mock::behaving(Behavior {
        pick_first_protocol: true,
        ..Default::default()
    })
    .await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let tab = TabSpec::new("abc")
        .header("cookie", "theme=dark")
        .header("user-agent", "TestBrowser/1.0")
        .header("x-forwarded-for", "203.0.113.7")
        .header("sec-websocket-protocol", "chat.v2, chat.v1")
        .connect(&proxy)
        .await;
    up.connected().await;
    let h = up.headers().await;
    let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string());
    // The tab's two Cookie headers arrive as one, in order.
    assert_eq!(get("cookie").as_deref(), Some("sessionid=abc; theme=dark"));
    assert_eq!(get("user-agent").as_deref(), Some("TestBrowser/1.0"));
    assert_eq!(get("origin").as_deref(), Some("http://app.test"));
    assert_eq!(
        get("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(get("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        get("sec-websocket-protocol").as_deref(),
        Some("chat.v2, chat.v1")
    );
    assert_eq!(get("x-tabmux-envelope").as_deref(), Some("json/1"));
    // The subprotocol the upstream chose is the tab's answer.
    assert_eq!(tab.protocol.as_deref(), Some("chat.v2"));
    // A second tab of the session gets the same answer without a dial.
    let second = TabSpec::new("abc")
        .header("sec-websocket-protocol", "chat.v2, chat.v1")
        .connect(&proxy)
        .await;
    assert_eq!(second.protocol.as_deref(), Some("chat.v2"));
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test]
async fn route_overrides_origin_and_user_agent_upstream() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(
            route("/ws", &mock)
                .upstream_origin("https://backend.internal")
                .upstream_user_agent("tabmux"),
        )
        .start()
        .await;
    let _tab = TabSpec::new("s")
        .header("user-agent", "Browser")
        .connect(&proxy)
        .await;
    up.connected().await;
    let h = up.headers().await;
    assert_eq!(h["origin"], "https://backend.internal");
    assert_eq!(h["user-agent"], "tabmux");
}

#[tokio::test]
async fn envelope_none_is_announced_upstream() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).envelope("none"))
        .start()
        .await;
    let _tab = TabSpec::new("s").connect(&proxy).await;
    up.connected().await;
    assert_eq!(up.headers().await["x-tabmux-envelope"], "none");
}

#[tokio::test]
async fn upstream_refusals_pass_through_or_become_502() {
    for (upstream_status, tab_status) in
        [(401, 401), (403, 403), (404, 404), (500, 502), (400, 502)]
    {
        let mock = Mock::behaving(Behavior {
            refuse: Some(upstream_status),
            ..Default::default()
        })
        .await;
        let proxy = proxy_for(&mock).await;
        let (status, _) = TabSpec::new("s").refused(&proxy).await;
        assert_eq!(
            status.as_u16(),
            tab_status,
            "upstream answered {upstream_status}"
        );
        // No session remains: the next tab dials again (and, now allowed, joins).
        mock.set_behavior(Behavior::default());
        let _tab = TabSpec::new("s").connect(&proxy).await;
        assert_eq!(mock.attempts(), 2);
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_dial_timeout_is_504() {
    // Nothing listens on a port we just bound and released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = proxy().route(route_to("/ws", port)).start().await;
    let (status, body) = TabSpec::new("s").refused(&proxy).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body.trim(), "upstream unreachable");
    // Neither the backend's address nor the operating system's error.
    assert!(!body.contains("127.0.0.1") && !body.contains(&port.port().to_string()));
    assert!(!body.to_lowercase().contains("refused"), "{body}");

    let hang = Mock::behaving(Behavior {
        hang: true,
        ..Default::default()
    })
    .await;
    let proxy = common::proxy()
        .route(route("/ws", &hang).dial_timeout("200ms"))
        .start()
        .await;
    let (status, _) = TabSpec::new("s").refused(&proxy).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn fifty_tabs_of_one_session_at_once_make_one_upstream() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).max_tabs_per_session(64))
        .start()
        .await;
    let spec = TabSpec::new("race");
    let tabs = futures_util::future::join_all((0..50).map(|_| spec.connect(&proxy))).await;
    assert_eq!(tabs.len(), 50);
    let frames = up.json(50).await;
    let mut ids: Vec<&str> = frames.iter().map(|v| v["tab"].as_str().unwrap()).collect();
    assert!(frames.iter().all(|v| v["event"] == "open"));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "tab ids must be unique");
    assert_eq!(mock.attempts(), 1, "exactly one upstream dial");
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn sessions_are_isolated() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let mut alice = TabSpec::new("alice").connect(&proxy).await;
    let alice_up = mock.upstream_for("alice").await;
    alice_up.json(1).await;
    let mut bob = TabSpec::new("bob").connect(&proxy).await;
    let bob_up = mock.upstream_for("bob").await;
    bob_up.json(1).await;
    assert_eq!(mock.connections(), 2);
    assert_ne!(alice_up.n, bob_up.n);
    // Both sessions have a tab "t1": ids are per session.
    alice_up.send_json(json!({"data": "for alice"}));
    alice_up.send_json(json!({"tab": "t1", "data": "alice t1"}));
    bob_up.send_json(json!({"data": "for bob"}));
    assert_eq!(alice.recv_text().await, "\"for alice\"");
    assert_eq!(alice.recv_text().await, "\"alice t1\"");
    assert_eq!(bob.recv_text().await, "\"for bob\"");
    bob.send_text("1").await;
    bob_up.json(2).await;
    // Alice's upstream saw only Alice's open event.
    assert_eq!(alice_up.json(1).await.len(), 1);
}

#[tokio::test]
async fn session_key_includes_subprotocols_and_forwarded_query() {
    let mock = Mock::behaving(Behavior {
        pick_first_protocol: true,
        ..Default::default()
    })
    .await;
    let third_up = mock.upstream(2);
    let proxy = proxy_for(&mock).await;
    let _a = TabSpec::new("same").connect(&proxy).await;
    let _b = TabSpec::new("same")
        .path("/ws?room=2")
        .connect(&proxy)
        .await;
    let _c = TabSpec::new("same")
        .header("sec-websocket-protocol", "p1")
        .connect(&proxy)
        .await;
    third_up.connected().await;
    assert_eq!(mock.connections(), 3);
}

#[tokio::test]
async fn origin_allow_list() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let (status, body) = TabSpec::new("s")
        .origin(Some("https://evil.example"))
        .refused(&proxy)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "origin not allowed\n");
    // No Origin header: not a browser, allowed.
    let _tab = TabSpec::new("s").origin(None).connect(&proxy).await;
    // The refused tab never reached the backend.
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test]
async fn any_origin_when_configured() {
    let mock = Mock::start().await;
    let any = route("/ws", &mock)
        .upstream(&format!("ws://{}/", mock.addr))
        .allowed_origins(&["*"]);
    let proxy = proxy().route(any).start().await;
    let _tab = TabSpec::new("s")
        .origin(Some("https://anywhere.example"))
        .connect(&proxy)
        .await;
}

#[tokio::test]
async fn missing_or_empty_cookie_is_401() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let (status, body) = TabSpec::new("s").cookie(None).refused(&proxy).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("sessionid"), "{body}");
    let (status, _) = TabSpec::new("s")
        .cookie(Some("sessionid=; other=1"))
        .refused(&proxy)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(mock.attempts(), 0);
}

#[tokio::test]
async fn missing_cookie_direct_gives_each_tab_its_own_upstream() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let proxy = proxy()
        .route(route("/ws", &mock).missing_cookie("direct"))
        .start()
        .await;
    let mut a = TabSpec::new("x").cookie(None).connect(&proxy).await;
    let mut b = TabSpec::new("x").cookie(None).connect(&proxy).await;
    second_up.connected().await;
    assert_eq!(mock.connections(), 2);
    // Same envelope, same events, on each upstream.
    assert_eq!(up.json(1).await[0]["event"], "open");
    assert_eq!(second_up.json(1).await[0]["event"], "open");
    up.send_json(json!({"data": "zero"}));
    second_up.send_json(json!({"data": "one"}));
    let mut got = vec![a.recv_text().await, b.recv_text().await];
    got.sort();
    assert_eq!(got, vec!["\"one\"", "\"zero\""]);
}

#[tokio::test]
async fn session_tab_limit_is_429() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).max_tabs_per_session(2))
        .start()
        .await;
    let _a = TabSpec::new("s").connect(&proxy).await;
    let b = TabSpec::new("s").connect(&proxy).await;
    let (status, body) = TabSpec::new("s").refused(&proxy).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("max_tabs_per_session"), "{body}");
    // Another session is not affected.
    let _other = TabSpec::new("t").connect(&proxy).await;
    // A slot frees when a tab leaves.
    b.close(1000).await;
    up.find("close event", |v| v["event"] == "close").await;
    let _c = TabSpec::new("s").connect(&proxy).await;
}

#[tokio::test]
async fn proxy_tab_limit_is_429() {
    let mock = Mock::start().await;
    let proxy = proxy().max_tabs(2).route(route("/ws", &mock)).start().await;
    let _a = TabSpec::new("s1").connect(&proxy).await;
    let b = TabSpec::new("s2").connect(&proxy).await;
    let (status, _) = TabSpec::new("s3").refused(&proxy).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    b.close(1000).await;
    // The permit is released when the tab's task ends; wait for that.
    guard("a free slot", async {
        loop {
            match TabSpec::new("s3").try_connect(&proxy).await {
                Ok(_) => break,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn malformed_handshakes_are_400_plain_gets_426_unknown_paths_404() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let req = |extra: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}Cookie: sessionid=s\r\n\r\n"
        )
    };
    let (status, body) = raw_http(proxy.addr, &req("Sec-WebSocket-Version: 13\r\n")).await;
    assert_eq!(status, 400);
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    let (status, _) = raw_http(
        proxy.addr,
        &req("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = raw_http(
        proxy.addr,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426);
    assert!(body.contains("WebSocket"), "{body}");
    let (status, _) = raw_http(
        proxy.addr,
        "GET /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(mock.attempts(), 0);
}

#[tokio::test]
async fn a_tab_joining_within_linger_reuses_the_upstream() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).linger("1h"))
        .start()
        .await;
    let first = TabSpec::new("s").connect(&proxy).await;
    first.close(1001).await;
    up.find("close event", |v| v["event"] == "close").await;
    // Reload: a new tab of the same session arrives after the last left.
    let _again = TabSpec::new("s").connect(&proxy).await;
    let open = up
        .find("second open", |v| v["event"] == "open" && v["tab"] == "t2")
        .await;
    assert_eq!(open["query"], "");
    assert_eq!(mock.attempts(), 1, "no new dial within linger");
}

#[tokio::test]
async fn upstream_closes_with_1000_when_linger_ends() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let proxy = proxy()
        .route(route("/ws", &mock).linger("0s"))
        .start()
        .await;
    let tab = TabSpec::new("s").connect(&proxy).await;
    tab.close(1000).await;
    let frame = up.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1000);
    // The session is gone: the next tab dials anew.
    let _tab = TabSpec::new("s").connect(&proxy).await;
    second_up.connected().await;
    assert_eq!(mock.attempts(), 2);
}

#[tokio::test]
async fn several_routes_are_separate() {
    let a = Mock::start().await;
    let b = Mock::start().await;
    let proxy = proxy()
        .route(route("/a", &a))
        .route(route("/b", &b).envelope("none"))
        .start()
        .await;
    let _ta = TabSpec::new("s").path("/a").connect(&proxy).await;
    let _tb = TabSpec::new("s").path("/b").connect(&proxy).await;
    a.upstream(0).connected().await;
    b.upstream(0).connected().await;
    assert_eq!(a.upstream(0).headers().await["x-tabmux-envelope"], "json/1");
    assert_eq!(b.upstream(0).headers().await["x-tabmux-envelope"], "none");
}

#[tokio::test]
async fn envelope_none_passes_frames_through_and_replays_the_greeting() {
    let mock = Mock::behaving(Behavior {
        greeting: vec![
            Message::text("hello-1"),
            Message::binary(b"hello-2".to_vec()),
        ],
        ..Default::default()
    })
    .await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).envelope("none").replay_first(2))
        .start()
        .await;
    let mut first = TabSpec::new("s").connect(&proxy).await;
    assert_eq!(first.recv().await, Message::text("hello-1"));
    assert_eq!(first.recv().await, Message::binary(b"hello-2".to_vec()));
    // Tab frames go upstream unchanged, text and binary.
    first.send_text("not even json").await;
    first.send_binary(&[9, 9]).await;
    let frames = up.frames(2).await;
    assert_eq!(
        frames,
        vec![Message::text("not even json"), Message::binary(vec![9, 9])]
    );
    up.send(Message::text("live-1"));
    assert_eq!(first.recv().await, Message::text("live-1"));
    // A later tab gets the greeting replayed first, then live frames only.
    let mut later = TabSpec::new("s").connect(&proxy).await;
    assert_eq!(later.recv().await, Message::text("hello-1"));
    assert_eq!(later.recv().await, Message::binary(b"hello-2".to_vec()));
    up.send(Message::text("live-2"));
    assert_eq!(later.recv().await, Message::text("live-2"));
    assert_eq!(first.recv().await, Message::text("live-2"));
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn admin_health_and_readiness() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    assert_eq!(admin_get(proxy.admin, "/healthz").await.0, 200);
    // Ready is set once the listeners run; wait for it rather than assume.
    guard("readiness", async {
        while admin_get(proxy.admin, "/readyz").await.0 != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (status, scrape) = admin_get(proxy.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(scrape.contains("tabmux_tabs_open"), "{scrape}");
    assert_eq!(admin_get(proxy.admin, "/nope").await.0, 404);
}

#[tokio::test]
async fn a_forwarded_query_is_appended_to_the_upstreams_own_with_an_ampersand() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let with_query = route("/ws", &mock).upstream(&format!("ws://{}/backend?key=abc", mock.addr));
    let proxy = proxy().route(with_query).start().await;
    let _tab = TabSpec::new("s").path("/ws?room=5").connect(&proxy).await;
    up.connected().await;
    assert_eq!(up.path().await, "/backend?key=abc&room=5");
    // Without a tab query, the upstream's own stays as it is.
    let _other = TabSpec::new("t").connect(&proxy).await;
    second_up.connected().await;
    let paths = [up.path().await, second_up.path().await];
    assert!(paths.contains(&"/backend?key=abc".to_string()), "{paths:?}");
}

/// A backend whose greeting arrives in the same write as its `101` answer:
/// the bytes after the handshake must reach the session, not be lost with
/// the handshake's buffer, nor left in it (tabmux counts them to know when
/// a read could find nothing).
#[tokio::test]
async fn a_greeting_in_the_same_packet_as_the_101_is_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Sec-WebSocket-Key: ")
                    .or(l.strip_prefix("sec-websocket-key: "))
            })
            .expect("a Sec-WebSocket-Key header")
            .trim()
            .to_string();
        let greeting = b"hello";
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        // Two unmasked text frames, in the same write.
        out.extend_from_slice(&[0x81, greeting.len() as u8]);
        out.extend_from_slice(greeting);
        out.extend_from_slice(&[0x81, 5]);
        out.extend_from_slice(b"world");
        s.write_all(&out).await.unwrap();
        // Hold the connection open until the test is done.
        let mut rest = [0u8; 1024];
        while let Ok(n) = s.read(&mut rest).await {
            if n == 0 {
                break;
            }
        }
    });
    let proxy = proxy()
        .route(route_to("/ws", addr).envelope("none").replay_first(1))
        .start()
        .await;
    let mut first = TabSpec::new("s").connect(&proxy).await;
    assert_eq!(first.recv().await, Message::text("hello"));
    assert_eq!(first.recv().await, Message::text("world"));
    // And it is the greeting later tabs are given.
    let mut later = TabSpec::new("s").connect(&proxy).await;
    assert_eq!(later.recv().await, Message::text("hello"));
    drop((first, later, proxy));
    backend.abort();
}
