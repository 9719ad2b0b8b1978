//! Hostile clients: raw frames and handshakes that break the rules. Each
//! gets a clear refusal or close code, and none affects another session.

mod common;

use std::net::SocketAddr;

use common::raw::*;
use common::*;
use http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A tab's ping is answered at once, though nothing else moves (tungstenite
/// queues the pong; tabmux has it sent).
#[tokio::test]
async fn a_tabs_ping_is_answered_at_once() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let mut s = raw_tab(proxy.addr, "s").await;
    s.write_all(&frame(true, 0x9, b"hello?", true))
        .await
        .unwrap();
    assert_eq!(read_until(&mut s, 0xA, "a pong").await, b"hello?");
}

/// A tab of another session that must keep working throughout.
async fn bystander(proxy: &TestProxy, mock: &Mock) -> (Tab, Upstream) {
    let tab = TabSpec::new("bystander").connect(proxy).await;
    (tab, mock.upstream_for("bystander").await)
}

async fn still_works(tab: &mut Tab, up: &Upstream) {
    up.send_json(json!({"data": "unaffected"}));
    assert_eq!(tab.recv_text().await, "\"unaffected\"");
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_is_1007() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let (mut other, other_up) = bystander(&proxy, &mock).await;
    let mut s = raw_tab(proxy.addr, "evil").await;
    s.write_all(&frame(true, 0x1, &[b'"', 0xff, 0xfe, b'"'], true))
        .await
        .unwrap();
    assert_eq!(read_close(&mut s).await, 1007);
    let evil = mock
        .wait("the attacker's session", |c| {
            c.iter()
                .position(|c| c.headers["cookie"] == "sessionid=evil")
        })
        .await;
    let close = mock
        .upstream(evil)
        .find("close event", |v| v["event"] == "close")
        .await;
    assert_eq!(close["code"], 1007);
    still_works(&mut other, &other_up).await;
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let mut s = raw_tab(proxy.addr, "s").await;
    let mut bytes = frame(false, 0x1, b"{\"parts\":", true);
    bytes.extend(frame(false, 0x0, b"[1,2,", true));
    // A ping may arrive between fragments.
    bytes.extend(frame(true, 0x9, b"", true));
    bytes.extend(frame(true, 0x0, b"3]}", true));
    s.write_all(&bytes).await.unwrap();
    let frames = up.json(2).await;
    assert_eq!(
        frames[1],
        json!({"tab": "t1", "data": {"parts": [1, 2, 3]}})
    );
}

/// Messages that reach tabmux in one TCP segment all come out, whatever
/// their sizes and framing: tabmux skips reads it can prove would find
/// nothing, and must never take a buffered message for nothing.
#[tokio::test]
async fn messages_packed_into_one_write_all_arrive() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let mut s = raw_tab(proxy.addr, "s").await;
    let medium = format!("\"{}\"", "m".repeat(198));
    let mut bytes = frame(true, 0x1, b"{\"n\":1}", true);
    bytes.extend(frame(true, 0x1, medium.as_bytes(), true));
    bytes.extend(frame(true, 0x1, b"{\"n\":3}", true));
    bytes.extend(frame(false, 0x1, b"{\"n\":", true));
    bytes.extend(frame(true, 0x0, b"4}", true));
    bytes.extend(frame(true, 0x1, b"{\"n\":5}", true));
    s.write_all(&bytes).await.unwrap();
    let frames = up.json(6).await;
    let data: Vec<_> = frames[1..].iter().map(|f| f["data"].clone()).collect();
    assert_eq!(
        data,
        vec![
            json!({"n": 1}),
            json!("m".repeat(198)),
            json!({"n": 3}),
            json!({"n": 4}),
            json!({"n": 5})
        ]
    );
    // And the tab still reads what comes later.
    s.write_all(&frame(true, 0x1, b"{\"n\":6}", true))
        .await
        .unwrap();
    assert_eq!(up.json(7).await[6]["data"], json!({"n": 6}));
}

#[tokio::test]
async fn protocol_violations_are_1002() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let (mut other, other_up) = bystander(&proxy, &mock).await;
    // A control frame over 125 bytes.
    let mut s = raw_tab(proxy.addr, "a").await;
    s.write_all(&frame(true, 0x9, &[0u8; 126], true))
        .await
        .unwrap();
    assert_eq!(read_close(&mut s).await, 1002);
    // An unmasked client frame.
    let mut s = raw_tab(proxy.addr, "b").await;
    s.write_all(&frame(true, 0x1, b"1", false)).await.unwrap();
    assert_eq!(read_close(&mut s).await, 1002);
    // A continuation with nothing to continue.
    let mut s = raw_tab(proxy.addr, "c").await;
    s.write_all(&frame(true, 0x0, b"1", true)).await.unwrap();
    assert_eq!(read_close(&mut s).await, 1002);
    still_works(&mut other, &other_up).await;
}

#[tokio::test]
async fn a_frame_claiming_a_huge_length_is_1009_without_waiting_for_it() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let mut s = raw_tab(proxy.addr, "s").await;
    // Header only: 1 TiB of payload announced, none sent.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&header).await.unwrap();
    assert_eq!(read_close(&mut s).await, 1009);
}

#[tokio::test]
async fn absurd_handshakes_are_refused_with_431() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let huge_cookie = format!("sessionid=s; big={}", "c".repeat(64 * 1024));
    let (status, _) = raw_http(
        proxy.addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nCookie: {huge_cookie}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 431);
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, _) = raw_http(
        proxy.addr,
        &format!("GET /ws HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
    )
    .await;
    assert_eq!(status, 431);
    assert_eq!(mock.attempts(), 0);
}

#[tokio::test]
async fn a_connection_that_never_speaks_is_dropped_after_handshake_timeout() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .handshake_timeout("100ms")
        .route(route("/ws", &mock))
        .start()
        .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    // The proxy closes the connection (hyper may first answer 408).
    guard(
        "the proxy to drop the silent connection",
        s.read_to_end(&mut buf),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn thousands_of_tabs_under_one_cookie_meet_the_session_limit() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let (mut other, other_up) = bystander(&proxy, &mock).await;
    let spec = TabSpec::new("flood");
    let mut admitted = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let attempts =
            futures_util::future::join_all((0..100).map(|_| spec.try_connect(&proxy))).await;
        for a in attempts {
            match a {
                Ok(tab) => admitted.push(tab),
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
                    refused += 1;
                }
                Err(e) => panic!("unexpected failure: {e}"),
            }
        }
    }
    // The default max_tabs_per_session.
    assert_eq!(admitted.len(), 32);
    assert_eq!(refused, 2000 - 32);
    // One upstream for the flood, one for the bystander.
    assert_eq!(mock.attempts(), 2);
    still_works(&mut other, &other_up).await;
}

/// A backend that sends without pause must not starve its session's tabs:
/// a tab's message still reaches it while it floods. The session reads its
/// upstream before its tabs in each turn, and serves the tabs that are
/// waiting in that same turn. (tokio's task budget also makes the session
/// yield now and then; this test passed with either one alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_flooding_its_session_does_not_starve_the_tabs() {
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    /// The most bytes the backend sends before the test gives up.
    const LIMIT: u64 = 4 << 30;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heard = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (h, n, got) = (heard.clone(), sent.clone(), heard.clone());
    let listener = listener.into_std().unwrap();
    // The backend runs on a thread of its own and writes ready-made frames,
    // so that it sends faster than the proxy can read.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                tcp.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .or_else(|| {
                    head.lines()
                        .find_map(|l| l.strip_prefix("sec-websocket-key: "))
                })
                .unwrap();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.trim().as_bytes())
            );
            tcp.write_all(answer.as_bytes()).await.unwrap();
            let (read, mut write) = tcp.into_split();
            let flood = tokio::spawn(async move {
                // Addressed to a tab that does not exist: dropped by tabmux,
                // after it has read and decoded each one.
                let payload = br#"{"tab":"t99","data":{"n":1}}"#;
                let mut frames = Vec::new();
                while frames.len() < 64 * 1024 {
                    frames.extend_from_slice(&[0x81, payload.len() as u8]);
                    frames.extend_from_slice(payload);
                }
                while !h.load(Ordering::Relaxed) && n.load(Ordering::Relaxed) < LIMIT {
                    if write.write_all(&frames).await.is_err() {
                        break;
                    }
                    n.fetch_add(frames.len() as u64, Ordering::Relaxed);
                }
            });
            let io = tokio::io::join(read, tokio::io::sink());
            let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.to_text().unwrap_or("").contains("\"data\":\"hello\"") {
                    got.store(true, Ordering::Relaxed);
                    break;
                }
            }
            let _ = flood.await;
        });
    });
    let proxy = proxy()
        .route(route_to("/ws", addr).payload("text"))
        .start()
        .await;
    let mut tab = TabSpec::new("s1").connect(&proxy).await;
    // Let the flood start before the tab speaks.
    while sent.load(Ordering::Relaxed) < 1 << 20 {
        tokio::task::yield_now().await;
    }
    tab.send_text("hello").await;
    while !heard.load(Ordering::Relaxed) {
        assert!(
            sent.load(Ordering::Relaxed) < LIMIT,
            "the tab's message did not reach the backend within {LIMIT} flooded bytes"
        );
        tokio::task::yield_now().await;
    }
}

/// Like [`raw_tab`], with a small receive buffer: what the proxy sends it
/// piles up in the proxy, not in this socket.
async fn raw_tab_small_buffer(addr: SocketAddr, session: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let s = socket.connect(addr).await.unwrap();
    handshake(s, session).await
}

/// The buffer budget's account, as `/metrics` shows it.
async fn held_bytes(proxy: &TestProxy) -> f64 {
    let text = admin_get(proxy.admin, "/metrics").await.1;
    metric(&text, "tabmux_buffer_held_bytes").expect("the held-bytes gauge")
}

async fn closes(proxy: &TestProxy, reason: &str) -> Option<f64> {
    reason_count(proxy, "tabmux_tab_closes_total", reason).await
}

/// A tab that sends to an echo backend and never reads is closed once
/// `tab_queue_bytes` wait for it, long before `tab_queue` messages do.
#[tokio::test]
async fn a_tab_that_never_reads_is_a_slow_consumer_by_bytes() {
    let mock = Mock::behaving(echo()).await;
    let proxy = proxy()
        .route(
            route("/ws", &mock)
                .tab_queue(100_000)
                .set("tab_queue_bytes", "1MiB")
                .max_message_size("256KiB"),
        )
        .start()
        .await;
    let (mut other, other_up) = bystander(&proxy, &mock).await;
    let mut s = raw_tab_small_buffer(proxy.addr, "hog").await;
    let msg = format!("\"{}\"", "x".repeat(200_000));
    let frame = frame(true, 0x1, msg.as_bytes(), true);
    // At most 200 messages (40 MB): the kernel's buffers take some, the
    // proxy's queue 1 MiB; a write fails once the proxy has closed.
    for _ in 0..200 {
        if s.write_all(&frame).await.is_err() {
            break;
        }
        if closes(&proxy, "slow_consumer").await == Some(1.0) {
            break;
        }
    }
    guard("the slow-consumer close", async {
        while closes(&proxy, "slow_consumer").await != Some(1.0) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The close frame comes behind megabytes the tab never read; a tab
    // that reads them too slowly may see the connection reset instead.
    let code = close_or_reset(&mut s).await;
    assert!(matches!(code, None | Some(1008)), "{code:?}");
    still_works(&mut other, &other_up).await;
    // Nothing is left held for it.
    guard("the account to empty", async {
        while held_bytes(&proxy).await != 0.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Past `buffer_budget`, the tab that holds the most (here the larger of
/// two half-sent messages) is closed with 1013 "memory budget", and the
/// other tab goes on: its message, once complete, reaches the backend.
#[tokio::test]
async fn past_the_budget_the_biggest_holder_is_closed_and_the_rest_go_on() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .server("buffer_budget", "3MiB")
        .route(route("/ws", &mock).max_message_size("4MiB"))
        .start()
        .await;
    let payload = |n: usize| format!("\"{}\"", "y".repeat(n - 2));
    let big = payload(3 << 20);
    let big_frame = frame(true, 0x1, big.as_bytes(), true);
    let mut a = raw_tab(proxy.addr, "big").await;
    a.write_all(&big_frame[..2 << 20]).await.unwrap();
    guard("2 MiB held for tab a", async {
        while held_bytes(&proxy).await < (2 << 20) as f64 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let small = payload(1_600_000);
    let small_frame = frame(true, 0x1, small.as_bytes(), true);
    let half = small_frame.len() / 2 + 400_000;
    let mut b = raw_tab(proxy.addr, "small").await;
    b.write_all(&small_frame[..half]).await.unwrap();
    // a, the biggest, is closed; its bytes are given back.
    assert_eq!(read_close(&mut a).await, 1013);
    assert_eq!(closes(&proxy, "memory_budget").await, Some(1.0));
    // b completes its message, and the backend gets it.
    b.write_all(&small_frame[half..]).await.unwrap();
    let up = mock.upstream_for("small").await;
    let got = up.find("b's message", |v| v.get("data").is_some()).await;
    assert_eq!(got["data"].as_str().map(str::len), Some(1_600_000 - 2));
}

/// A message sent in fragments counts while it arrives, and no longer once
/// its last fragment is in (the backend then gets it whole).
#[tokio::test]
async fn a_fragmented_message_counts_while_it_arrives() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .route(route("/ws", &mock).max_message_size("2MiB"))
        .start()
        .await;
    let mut s = raw_tab(proxy.addr, "frag").await;
    let body = format!("\"{}\"", "z".repeat(1_000_000));
    let (first, rest) = body.as_bytes().split_at(600_000);
    s.write_all(&frame(false, 0x1, first, true)).await.unwrap();
    guard("the first fragment held", async {
        while held_bytes(&proxy).await < 600_000.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    s.write_all(&frame(true, 0x9, b"ping", true)).await.unwrap();
    s.write_all(&frame(true, 0x0, rest, true)).await.unwrap();
    let up = mock.upstream_for("frag").await;
    let got = up
        .find("the whole message", |v| v.get("data").is_some())
        .await;
    assert_eq!(got["data"].as_str().map(str::len), Some(1_000_000));
    guard("the account to empty", async {
        while held_bytes(&proxy).await != 0.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// The real binary under a memory attack: tabs holding half-sent messages
/// and tabs that never read what an echo backend floods them with. Its
/// resident memory stays within `buffer_budget` + 32 MiB of its idle
/// baseline, a well-behaved session keeps working, and once the attackers
/// are gone the memory is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_the_budget_and_is_returned() {
    let mock = Mock::behaving(echo()).await;
    let (mut child, proxy) = proxy()
        .server("buffer_budget", "64MiB")
        .server("per_ip", Raw("{ tabs = 1000, sessions = 1000 }"))
        .route(route("/ws", &mock).max_message_size("2MiB"))
        .spawn();
    let pid = child.id();
    let mut calm = TabSpec::new("calm").connect(&proxy).await;
    // Large messages come and go first (glibc then serves them from its
    // heap rather than mapping each: the case where memory stayed).
    let large = format!("\"{}\"", "c".repeat(1 << 20));
    for _ in 0..8 {
        calm.send_text(&large).await;
        assert_eq!(calm.recv_text().await.len(), large.len());
    }
    let idle = rss_mib(pid);
    let mut peak = idle;
    // 40 tabs, each 1.5 MiB into a 2 MiB message ...
    let half = {
        let body = format!("\"{}\"", "h".repeat((2 << 20) - 2));
        frame(true, 0x1, body.as_bytes(), true)[..3 << 19].to_vec()
    };
    let mut holders = Vec::new();
    for n in 0..40 {
        let mut s = raw_tab(proxy.addr, &format!("holder-{}", n % 8)).await;
        // A write to a tab already closed for the budget may fail.
        let _ = s.write_all(&half).await;
        holders.push(s);
        peak = peak.max(rss_mib(pid));
    }
    // ... and 4 that never read, flooded through the echo backend.
    let flood = frame(
        true,
        0x1,
        format!("\"{}\"", "f".repeat(200_000)).as_bytes(),
        true,
    );
    let mut floods = Vec::new();
    for n in 0..4 {
        let mut s = raw_tab_small_buffer(proxy.addr, &format!("flood-{n}")).await;
        for _ in 0..60 {
            if s.write_all(&flood).await.is_err() {
                break;
            }
            peak = peak.max(rss_mib(pid));
        }
        floods.push(s);
    }
    peak = peak.max(rss_mib(pid));
    calm.send_text("2").await;
    assert_eq!(calm.recv_text().await, "2", "the calm session goes on");
    assert!(
        peak <= idle + 64.0 + 32.0,
        "peak {peak:.1} MiB over an idle {idle:.1} MiB"
    );
    assert!(
        closes(&proxy, "memory_budget").await.unwrap_or(0.0) >= 1.0,
        "the budget was spent, so some holder was closed"
    );
    drop(holders);
    drop(floods);
    memory_returned(pid, idle + 16.0).await;
    calm.send_text("3").await;
    assert_eq!(calm.recv_text().await, "3");
    let _ = child.kill();
    let _ = child.wait();
}

/// The shape that once kept memory: five tabs that never read, each sent
/// 640 messages of 64 KiB by the backend (200 MiB held, under a budget and
/// queue bound that allow it), then gone. Once the account is empty the
/// process gives the memory back: RSS returns to within 64 MiB of idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_held_for_non_readers_is_returned_after_they_go() {
    let mock = Mock::start().await;
    let (mut child, proxy) = proxy()
        .server("buffer_budget", "1GiB")
        .route(
            route("/ws", &mock)
                .tab_queue(100_000)
                .set("tab_queue_bytes", "256MiB"),
        )
        .spawn();
    let pid = child.id();
    let idle = rss_mib(pid);
    let body = json!("m".repeat(64 * 1024 - 2));
    let mut tabs = Vec::new();
    for n in 0..5 {
        let session = format!("hold-{n}");
        let s = raw_tab_small_buffer(proxy.addr, &session).await;
        let up = mock.upstream_for(&session).await;
        let open = up.nth_open(0).await;
        for _ in 0..640 {
            up.send_json(json!({"tab": open["tab"], "data": body}));
        }
        tabs.push(s);
    }
    guard("150 MiB held for the non-readers", async {
        while held_bytes(&proxy).await < (150u64 << 20) as f64 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    assert!(rss_mib(pid) > idle + 150.0, "the bytes are resident");
    drop(tabs);
    guard("the account to empty", async {
        while held_bytes(&proxy).await != 0.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    memory_returned(pid, idle + 64.0).await;
    let _ = child.kill();
    let _ = child.wait();
}
