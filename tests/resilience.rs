//! PROTOCOL.md "Lifetime": upstream loss and redial, slow consumers,
//! keepalive, and the shutdown drain, by fault injection.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Fast redials, so outages in tests are short; attempts as given.
/// The default route, redialling fast (5-20 ms) up to `attempts` times.
fn fast_redial(mock: &Mock, attempts: u32) -> RouteConfig {
    route("/ws", mock).reconnect("5ms", "20ms", attempts)
}

fn refusing() -> Behavior {
    Behavior {
        refuse: Some(503),
        ..Default::default()
    }
}

/// The frames on `conn` that are not pings, as JSON.
async fn events(mock: &Mock, conn: usize, n: usize) -> Vec<serde_json::Value> {
    mock.upstream(conn).json(n).await
}

#[tokio::test]
async fn upstream_loss_redials_reopens_tabs_in_join_order_and_flushes_the_buffer() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let proxy = proxy().route(fast_redial(&mock, 100)).start().await;
    let (mut a, a_id) = up.join(&proxy, &TabSpec::new("s").path("/ws?room=1")).await;
    let (mut b, b_id) = up.join(&proxy, &TabSpec::new("s").path("/ws?room=1")).await;

    // Refuse redials for a while, drop the connection, and wait until the
    // proxy has noticed (it is redialling).
    mock.set_behavior(refusing());
    up.drop_conn();
    mock.wait_attempts(3).await;
    // Tabs stay connected; what they send now is held, in order.
    a.send_text(r#""a1""#).await;
    b.send_text(r#""b1""#).await;
    a.send_text(r#""a2""#).await;
    // A tab that joins during the outage is announced with the others.
    let mut c = TabSpec::new("s").path("/ws?room=1").connect(&proxy).await;

    mock.set_behavior(Behavior::default());
    second_up.connected().await;
    let frames = events(&mock, 1, 6).await;
    assert_eq!(
        frames,
        vec![
            json!({"tab": a_id, "event": "open", "query": "room=1"}),
            json!({"tab": b_id, "event": "open", "query": "room=1"}),
            json!({"tab": "t3", "event": "open", "query": "room=1"}),
            json!({"tab": a_id, "data": "a1"}),
            json!({"tab": b_id, "data": "b1"}),
            json!({"tab": a_id, "data": "a2"}),
        ]
    );
    // The new upstream carries the same forwarded handshake.
    assert_eq!(second_up.headers().await["cookie"], "sessionid=s");
    assert_eq!(second_up.path().await, "/backend?room=1");
    // Every tab is served by the new upstream.
    second_up.send_json(json!({"data": "back"}));
    for tab in [&mut a, &mut b, &mut c] {
        assert_eq!(tab.recv_text().await, "\"back\"");
    }
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    assert_eq!(
        metric(
            &scrape,
            r#"tabmux_upstream_redials_total{route="/ws",reason="ok"}"#
        ),
        Some(1.0),
        "{scrape}"
    );
    assert!(
        metric(
            &scrape,
            r#"tabmux_upstream_redials_total{route="/ws",reason="refused"}"#
        )
        .unwrap()
            >= 2.0
    );
}

#[tokio::test]
async fn a_backend_close_is_a_loss_too() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let proxy = proxy().route(fast_redial(&mock, 8)).start().await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s")).await;
    up.close();
    second_up.connected().await;
    let frames = events(&mock, 1, 1).await;
    assert_eq!(frames[0], json!({"tab": id, "event": "open", "query": ""}));
    second_up.send_json(json!({"tab": id, "data": 2}));
    assert_eq!(tab.recv_text().await, "2");
    // Counted by reason, with the side that ended it.
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    let lost = r#"tabmux_upstream_lost_total{route="/ws",reason="closed",side="backend"}"#;
    assert_eq!(metric(&scrape, lost), Some(1.0), "{scrape}");
}

#[tokio::test]
async fn a_spent_reconnect_budget_closes_every_tab_with_1011() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy().route(fast_redial(&mock, 3)).start().await;
    let (mut a, _) = up.join(&proxy, &TabSpec::new("s")).await;
    let (mut b, _) = up.join(&proxy, &TabSpec::new("s")).await;
    mock.set_behavior(refusing());
    up.drop_conn();
    assert_eq!(a.closed().await.0, 1011);
    assert_eq!(b.closed().await.0, 1011);
    // One dial, then exactly the three redials of the budget.
    assert_eq!(mock.attempts(), 4);
    // The session is gone: the next tab dials anew.
    mock.set_behavior(Behavior::default());
    let _c = TabSpec::new("s").connect(&proxy).await;
    assert_eq!(mock.attempts(), 5);
}

#[tokio::test]
async fn a_full_reconnect_buffer_closes_every_tab_with_1013() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(fast_redial(&mock, 1000).reconnect_buffer(16))
        .start()
        .await;
    let (mut a, _) = up.join(&proxy, &TabSpec::new("s")).await;
    let (mut b, _) = up.join(&proxy, &TabSpec::new("s")).await;
    mock.set_behavior(refusing());
    up.drop_conn();
    mock.wait_attempts(2).await;
    a.send_text(r#""0123456789""#).await; // 12 bytes: held
    b.send_text(r#""0123456789""#).await; // 24 in all: over the limit
    assert_eq!(a.closed().await.0, 1013);
    assert_eq!(b.closed().await.0, 1013);
}

#[tokio::test]
async fn a_stalled_upstream_is_caught_by_idle_timeout_and_redialled() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let stalls = fast_redial(&mock, 100)
        .ping_interval("50ms")
        .idle_timeout("200ms");
    let proxy = proxy().route(stalls).start().await;
    let tab = TabSpec::new("s").connect(&proxy).await;
    let mut tab = tab.live();
    up.json(1).await;
    // The upstream is pinged while it answers.
    mock.wait("two pings upstream", |c| (c[0].pings >= 2).then_some(()))
        .await;
    up.stall();
    second_up.connected().await;
    let frames = events(&mock, 1, 1).await;
    assert_eq!(frames[0]["event"], "open");
    second_up.send_json(json!({"data": "after the stall"}));
    assert_eq!(tab.recv_text().await, "\"after the stall\"");
}

#[tokio::test]
async fn upstream_lost_while_lingering_ends_the_session() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let second_up = mock.upstream(1);
    let proxy = proxy()
        .route(fast_redial(&mock, 8).linger("1h"))
        .start()
        .await;
    let tab = TabSpec::new("s").connect(&proxy).await;
    tab.close(1000).await;
    up.find("close event", |v| v["event"] == "close").await;
    up.drop_conn();
    // No tab needs it: no redial. A new tab makes a new session.
    let _tab = guard("a new session", async {
        loop {
            if let Ok(t) = TabSpec::new("s").try_connect(&proxy).await {
                break t;
            }
        }
    })
    .await;
    second_up.connected().await;
    assert_eq!(second_up.json(1).await[0]["tab"], "t1");
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1008_and_delays_no_one() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).tab_queue(8).max_message_size("128KiB"))
        .start()
        .await;
    let (slow, slow_id) = up.join(&proxy, &TabSpec::new("s")).await;
    let (fast, _) = up.join(&proxy, &TabSpec::new("s")).await;
    let mut fast = fast.live();
    // Broadcast at the pace of the tab that reads: it is never more than one
    // message behind, while the tab that does not read falls further behind
    // until its socket buffers and its queue are full.
    let big = "x".repeat(100 * 1024);
    let mut sent = 0;
    let close = loop {
        assert!(sent < 2000, "the tab that does not read was never closed");
        up.send_json(json!({"data": {"i": sent, "pad": big}}));
        let v: serde_json::Value = serde_json::from_str(&fast.recv_text().await).unwrap();
        assert_eq!(
            v["i"], sent,
            "the reading tab got every broadcast, in order"
        );
        sent += 1;
        if let Some(close) = up.try_find(|v| v["event"] == "close") {
            break close;
        }
    };
    assert_eq!(
        close,
        json!({"tab": slow_id, "event": "close", "code": 1008})
    );
    // The reading tab goes on being served.
    up.send_json(json!({"data": "after"}));
    assert_eq!(fast.recv_text().await, "\"after\"");
    // The slow tab, reading at last, finds its connection ended (with a
    // 1008 close frame if it arrived within the close grace period).
    let mut slow = slow.live();
    let code = slow.closed().await;
    assert!(code == 1008 || code == 1006, "slow tab closed with {code}");
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    assert_eq!(
        metric(
            &scrape,
            r#"tabmux_tab_closes_total{route="/ws",reason="slow_consumer"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_silent_tab_is_closed_by_idle_timeout_and_a_live_one_is_not() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(
            route("/ws", &mock)
                .ping_interval("30ms")
                .idle_timeout("120ms"),
        )
        .start()
        .await;
    // This tab never reads, so it never answers a ping.
    let (_silent, silent_id) = up.join(&proxy, &TabSpec::new("s")).await;
    let (live, live_id) = up.join(&proxy, &TabSpec::new("s")).await;
    let mut live = live.live();
    let close = up
        .find("the silent tab's close event", |v| v["event"] == "close")
        .await;
    assert_eq!(
        close,
        json!({"tab": silent_id, "event": "close", "code": 1001})
    );
    // The live tab has answered pings well past the idle timeout.
    live.wait_pings(10).await;
    live.send_text("\"still here\"");
    up.find("the live tab's message", |v| {
        v["tab"] == live_id.as_str() && v["data"] == "still here"
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_tabs_with_1001_and_upstreams_with_1000_then_exits_0() {
    sigterm_drain(proxy().shutdown_timeout("10s")).await;
}

/// `worker_threads = 1` runs tabmux on a single-threaded runtime: the same
/// tabs, events and drain.
#[tokio::test]
async fn the_single_threaded_runtime_serves_and_drains_the_same() {
    sigterm_drain(proxy().shutdown_timeout("10s").worker_threads(1)).await;
}

async fn sigterm_drain(server: ProxyConfig) {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let (child, proxy) = server.route(route("/ws", &mock)).spawn();
    let (a, a_id) = up.join(&proxy, &TabSpec::new("s")).await;
    let (b, b_id) = up.join(&proxy, &TabSpec::new("s")).await;
    let (mut a, mut b) = (a.live(), b.live());
    sigterm(&child);
    assert_eq!(a.closed().await, 1001);
    assert_eq!(b.closed().await, 1001);
    let frame = up.closed().await.expect("a close frame upstream");
    assert_eq!(u16::from(frame.code), 1000);
    // Both tabs' close events reached the backend before the upstream closed.
    let closes: Vec<_> = up
        .json(4)
        .await
        .into_iter()
        .filter(|v| v["event"] == "close")
        .collect();
    let mut closed: Vec<&str> = closes.iter().map(|v| v["tab"].as_str().unwrap()).collect();
    closed.sort_unstable();
    assert_eq!(closed, vec![a_id.as_str(), b_id.as_str()]);
    assert!(closes.iter().all(|v| v["code"] == 1001), "{closes:?}");
    exits_0(child).await;
}

/// With `drain_spread`, SIGTERM turns `/readyz` to 503 at once, while the
/// tabs are still open, and their closes (1001) come spread over the
/// window, session by session: when the first tab is closed, most of the
/// others are not yet. Every upstream closes (1000) and the process exits 0.
#[tokio::test]
async fn sigterm_spreads_tab_closes_over_drain_spread() {
    const SESSIONS: usize = 12;
    let mock = Mock::start().await;
    let (child, proxy) = proxy()
        .shutdown_timeout("10s")
        .server("drain_spread", "3s")
        .route(route("/ws", &mock))
        .spawn();
    let mut tabs = Vec::new();
    for i in 0..SESSIONS {
        tabs.push(
            TabSpec::new(&format!("drain-{i}"))
                .connect(&proxy)
                .await
                .live(),
        );
    }
    mock.wait("every upstream", |c| (c.len() == SESSIONS).then_some(()))
        .await;
    sigterm(&child);
    guard("/readyz to answer 503", async {
        while admin_get(proxy.admin, "/readyz").await.0 != 503 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let open = tabs.iter_mut().map(|t| t.is_open()).filter(|&o| o).count();
    assert!(
        open >= SESSIONS / 2,
        "{open} of {SESSIONS} tabs open when /readyz said 503"
    );
    // The first close, then the others still open.
    guard("a first close", async {
        while tabs.iter_mut().all(|t| t.is_open()) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let open = tabs.iter_mut().map(|t| t.is_open()).filter(|&o| o).count();
    assert!(
        open >= SESSIONS / 2,
        "{open} of {SESSIONS} still open at the first close"
    );
    for tab in &mut tabs {
        assert_eq!(tab.closed().await, 1001);
    }
    for i in 0..SESSIONS {
        let frame = mock
            .upstream(i)
            .closed()
            .await
            .expect("a close frame upstream");
        assert_eq!(u16::from(frame.code), 1000);
    }
    exits_0(child).await;
}

/// `drain_spread` spaces sessions by rank: five sessions over 2 s close
/// their tabs 0.4 s apart (at 1/5, 2/5, ... of the window), each at least
/// 0.3 s after the one before. (A hash of the session key used to pick the
/// moments: five sessions then closed within 0.46 s of each other.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_spread_spaces_even_a_few_sessions_evenly() {
    const SESSIONS: usize = 5;
    let mock = Mock::start().await;
    let (child, proxy) = proxy()
        .shutdown_timeout("10s")
        .server("drain_spread", "2s")
        .route(route("/ws", &mock))
        .spawn();
    let mut closes = Vec::new();
    for i in 0..SESSIONS {
        let mut tab = TabSpec::new(&format!("rank-{i}"))
            .connect(&proxy)
            .await
            .live();
        closes.push(tokio::spawn(async move {
            let code = tab.closed().await;
            (code, std::time::Instant::now())
        }));
    }
    mock.wait("every upstream", |c| (c.len() == SESSIONS).then_some(()))
        .await;
    sigterm(&child);
    let mut at = Vec::new();
    for close in closes {
        let (code, when) = guard("a tab's close", close).await.unwrap();
        assert_eq!(code, 1001);
        at.push(when);
    }
    at.sort();
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= std::time::Duration::from_millis(300),
            "closes {gap:?} apart: {at:?}"
        );
    }
    exits_0(child).await;
}

/// A session forwarding a stream of tab messages when the shutdown comes
/// drains like an idle one. (The session also checks for the shutdown at
/// the top of every turn, for a stream that never pauses; a test cannot
/// make one that reliably, so this covers the drain, not the starvation.)
#[tokio::test]
async fn sigterm_drains_a_session_that_is_busy_forwarding() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let (child, proxy) = proxy()
        .shutdown_timeout("10s")
        .worker_threads(1)
        .route(route("/ws", &mock))
        .spawn();
    let (a, _) = up.join(&proxy, &TabSpec::new("s")).await;
    let mut a = a.live();
    for i in 0..20_000 {
        a.send_text(&format!("{{\"n\":{i}}}"));
    }
    // The stream is flowing: the open event, then data.
    up.json(50).await;
    sigterm(&child);
    assert_eq!(a.closed().await, 1001);
    let frame = up.closed().await.expect("a close frame upstream");
    assert_eq!(u16::from(frame.code), 1000);
    exits_0(child).await;
}

/// A backend's ping is answered at once, even when nothing else moves on
/// the connection (tungstenite queues the pong; tabmux has it sent).
#[tokio::test]
async fn a_backend_ping_is_answered_at_once() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let (_tab, _) = up.join(&proxy, &TabSpec::new("s")).await;
    up.send(Message::Ping(b"are you there".to_vec().into()));
    let pongs = mock
        .wait("a pong", |c| {
            let pongs = &c.first()?.pongs;
            (!pongs.is_empty()).then(|| pongs.clone())
        })
        .await;
    assert_eq!(pongs, vec![b"are you there".to_vec()]);
}

/// Sends the proxy process SIGTERM.
fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the proxy process to end; it must exit with status 0.
async fn exits_0(child: Spawned) {
    let mut child = child.into_inner();
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap().code())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}
