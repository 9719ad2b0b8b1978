//! PROTOCOL.md, "Envelope `pusher`", through the real proxy in front of a
//! mock server that speaks Pusher (exact frames and faults): one Pusher
//! connection per browser, to each tab a connection of its own.

mod common;

use common::pusher::*;
use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn pusher_proxy(mock: &Mock) -> TestProxy {
    let path = format!("/app/{APP_KEY}");
    proxy()
        .route(route(&path, mock).envelope("pusher"))
        .start()
        .await
}

/// A tab of browser `session`, past its `connection_established`.
async fn connected(proxy: &TestProxy, session: &str) -> Tab {
    let mut tab = pusher_tab(session).connect(proxy).await;
    assert_eq!(tab.recv_text().await, established());
    tab
}

/// A Pusher route in front of the mock server, and two tabs of one
/// browser past their greeting (the mock, the proxy, the browser's
/// upstream connection, the tabs).
async fn two_tabs() -> (Mock, TestProxy, Upstream, Tab, Tab) {
    let mock = Mock::behaving(pusher_server()).await;
    let proxy = pusher_proxy(&mock).await;
    let up = mock.upstream(0);
    let a = connected(&proxy, "b").await;
    let b = connected(&proxy, "b").await;
    (mock, proxy, up, a, b)
}

/// Subscribes `tab` to `channel` and waits for the answer.
async fn subscribed(tab: &mut Tab, channel: &str) -> Value {
    tab.send_text(&subscribe(channel)).await;
    let ok = tab
        .recv_until("pusher_internal:subscription_succeeded")
        .await;
    assert_eq!(ok["channel"], channel);
    ok
}

/// Waits until tabmux has handled everything `tab` sent before (a tab's
/// frames are handled in order; the pong is answered by tabmux).
async fn barrier(tab: &mut Tab) {
    tab.send_text(r#"{"event":"pusher:ping","data":{}}"#).await;
    tab.recv_until("pusher:pong").await;
}

/// A frame every tab receives (no channel), sent after what a test
/// checks was not delivered: a tab's next event must be this marker.
fn marker(n: u32) -> Message {
    Message::text(json!({"event": "marker", "data": n.to_string()}).to_string())
}

#[tokio::test]
async fn the_tabs_of_one_browser_share_one_pusher_connection_and_its_socket_id() {
    let mock = Mock::behaving(pusher_server()).await;
    let proxy = pusher_proxy(&mock).await;
    let up = mock.upstream(0);
    let _tabs = [
        connected(&proxy, "browser").await,
        connected(&proxy, "browser").await,
        connected(&proxy, "browser").await,
    ];
    assert_eq!(mock.connections(), 1);
    let headers = up.headers().await;
    assert_eq!(headers["x-tabmux-envelope"], "pusher/7");
    assert!(up
        .path()
        .await
        .ends_with("?protocol=7&client=js&version=8.4.0&flash=false"));
    // Another browser is another connection.
    let _other = connected(&proxy, "another").await;
    assert_eq!(mock.connections(), 2);
}

#[tokio::test]
async fn a_tab_that_unsubscribes_does_not_silence_its_siblings() {
    let (_mock, _proxy, up, mut a, mut b) = two_tabs().await;
    subscribed(&mut a, "news").await;
    subscribed(&mut b, "news").await;
    assert_eq!(
        up.events_named("pusher:subscribe").len(),
        1,
        "one subscribe upstream"
    );

    up.send(event("news", "update", json!({"n": 1})));
    assert_eq!(a.recv_event().await["event"], "update");
    assert_eq!(b.recv_event().await["event"], "update");

    a.send_text(&unsubscribe("news")).await;
    barrier(&mut a).await;
    assert!(
        up.events_named("pusher:unsubscribe").is_empty(),
        "b is still on it"
    );
    up.send(event("news", "update", json!({"n": 2})));
    up.send(marker(1));
    let got = b.recv_event().await;
    assert_eq!(
        got["data"],
        json!({"n": 2}).to_string(),
        "b still gets the channel"
    );
    assert_eq!(
        a.recv_event().await["event"],
        "marker",
        "a gets nothing from it"
    );

    b.send_text(&unsubscribe("news")).await;
    up.find("the unsubscribe upstream", |v| {
        v["event"] == "pusher:unsubscribe" && v["data"]["channel"] == "news"
    })
    .await;
}

#[tokio::test]
async fn events_reach_only_the_tabs_subscribed_to_their_channel() {
    let (_mock, _proxy, up, mut a, mut b) = two_tabs().await;
    subscribed(&mut a, "prices").await;
    up.send(event("prices", "tick", json!({"p": 3})));
    up.send(marker(1));
    assert_eq!(a.recv_event().await["event"], "tick");
    assert_eq!(
        b.recv_event().await["event"],
        "marker",
        "b never subscribed"
    );
}

#[tokio::test]
async fn a_client_event_reaches_the_sibling_tabs_and_goes_upstream_once() {
    let (_mock, proxy, up, mut a, mut b) = two_tabs().await;
    subscribed(&mut a, "private-chat").await;
    subscribed(&mut b, "private-chat").await;
    let typing = json!({"event": "client-typing", "channel": "private-chat", "data": {"on": true}});
    a.send_text(&typing.to_string()).await;
    assert_eq!(b.recv_event().await, typing);
    up.find("the client event upstream", |v| {
        v["event"] == "client-typing"
    })
    .await;
    up.send(marker(1));
    assert_eq!(
        a.recv_event().await["event"],
        "marker",
        "not echoed to its sender"
    );
    assert_eq!(up.events_named("client-typing").len(), 1);
    // The server would have sent the event to b: one message saved (and
    // the marker, delivered to two tabs, one more).
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    let saved = format!("tabmux_upstream_messages_avoided_total{{route=\"/app/{APP_KEY}\"}}");
    assert_eq!(metric(&scrape, &saved), Some(2.0));
}

#[tokio::test]
async fn a_later_tab_gets_the_presence_members_as_they_stand() {
    let mock = Mock::behaving(pusher_server()).await;
    let proxy = pusher_proxy(&mock).await;
    let up = mock.upstream(0);
    let mut a = connected(&proxy, "b").await;
    let sub = json!({"event": "pusher:subscribe", "data": {"channel": "presence-room", "auth": "", "channel_data": "{\"user_id\":\"ann\"}"}});
    a.send_text(&sub.to_string()).await;
    a.recv_until("pusher_internal:subscription_succeeded").await;
    let eve = json!({"user_id": "eve", "user_info": {"name": "Eve"}});
    up.send(event("presence-room", "pusher_internal:member_added", eve));
    a.recv_until("pusher_internal:member_added").await;

    let mut b = connected(&proxy, "b").await;
    b.send_text(&sub.to_string()).await;
    let ok = b.recv_until("pusher_internal:subscription_succeeded").await;
    let data: Value = serde_json::from_str(ok["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["presence"]["count"], 2);
    assert_eq!(data["presence"]["ids"], json!(["ann", "eve"]));
    assert_eq!(up.events_named("pusher:subscribe").len(), 1);
}

#[tokio::test]
async fn pings_are_answered_by_tabmux_and_bad_input_only_troubles_its_tab() {
    let (_mock, _proxy, up, mut a, mut b) = two_tabs().await;
    barrier(&mut a).await;
    a.send_text("not json").await;
    let error = a.recv_event().await;
    assert_eq!(error["event"], "pusher:error");
    a.send_text(&json!({"event": "pusher:subscribe", "data": {}}).to_string())
        .await;
    assert_eq!(a.recv_event().await["event"], "pusher:error");
    up.send(marker(1));
    assert_eq!(
        b.recv_event().await["event"],
        "marker",
        "the sibling heard nothing"
    );
    assert_eq!(a.recv_event().await["event"], "marker");
    up.connected().await;
    assert!(
        up.events_named("pusher:ping").is_empty(),
        "tabs' pings stay in tabmux"
    );
    assert_eq!(
        up.now(|c| c.frames.len()),
        Some(0),
        "nothing reached the server"
    );
}

#[tokio::test]
async fn a_server_close_code_reaches_every_tab_and_a_lost_connection_is_4200() {
    let (mock, proxy, up, mut a, mut b) = two_tabs().await;
    up.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4004),
        reason: "Over connection quota".into(),
    })));
    // With the server's own words: the client's close event shows them.
    for tab in [&mut a, &mut b] {
        let (code, reason) = tab.closed().await;
        assert_eq!((code, reason.as_str()), (4004, "Over connection quota"));
    }

    // The clients reconnect: their new session dials once; a lost
    // connection then closes them with 4200, "reconnect at once".
    let second = mock.upstream(1);
    let mut a = connected(&proxy, "b").await;
    let mut b = connected(&proxy, "b").await;
    assert_eq!(mock.connections(), 2);
    second.drop_conn();
    assert_eq!(a.closed().await.0, 4200);
    assert_eq!(b.closed().await.0, 4200);
    assert_eq!(mock.connections(), 2, "no redial without tabs");
}

/// Waits until the status page lists a session that is still dialling.
async fn a_session_is_waiting_to_dial(proxy: &TestProxy) {
    guard("a session waiting to dial", async {
        loop {
            let (_, body) = admin_get(proxy.admin, "/status.json").await;
            if body.contains(r#""upstream":"connecting""#) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

#[tokio::test]
async fn after_a_loss_the_browsers_new_session_waits_out_the_backoff_before_dialling() {
    let mock = Mock::behaving(pusher_server()).await;
    let path = format!("/app/{APP_KEY}");
    // A backoff far longer than the test: the redial must not happen in it.
    let slow = route(&path, &mock)
        .envelope("pusher")
        .reconnect("1h", "1h", 8);
    let proxy = proxy().route(slow).start().await;
    let up = mock.upstream(0);
    let mut a = connected(&proxy, "b").await;
    up.drop_conn();
    assert_eq!(a.closed().await.0, 4200);

    // pusher-js reconnects at once: its handshake waits for the dial.
    let (spec, at) = (pusher_tab("b"), TestProxy::at(proxy.addr, proxy.admin));
    let reconnecting = tokio::spawn(async move { spec.try_connect(&at).await.is_ok() });
    a_session_is_waiting_to_dial(&proxy).await;
    // Another browser is served meanwhile, and dials at once.
    let _c = connected(&proxy, "c").await;
    assert_eq!(mock.connections(), 2, "the lost browser has not redialled");
    assert!(
        !reconnecting.is_finished(),
        "its handshake is still waiting"
    );
    reconnecting.abort();
}

#[tokio::test]
async fn the_savings_are_counted_and_shown_for_the_route() {
    let (_mock, proxy, up, mut a, mut b) = two_tabs().await;
    subscribed(&mut a, "news").await;
    subscribed(&mut b, "news").await;
    barrier(&mut a).await;
    barrier(&mut b).await;
    up.send(event("news", "update", json!({})));
    a.recv_event().await;
    b.recv_event().await;

    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    let route = format!("{{route=\"/app/{APP_KEY}\"}}");
    let value = |name: &str| metric(&scrape, &format!("{name}{route}"));
    assert_eq!(
        value("tabmux_upstream_subscriptions_avoided_total"),
        Some(1.0)
    );
    assert_eq!(value("tabmux_upstream_pings_avoided_total"), Some(2.0));
    // One event delivered to two tabs: one delivery avoided.
    assert_eq!(value("tabmux_upstream_messages_avoided_total"), Some(1.0));
    // The subscribe tabmux sent for both tabs is a message upstream, as
    // every frame the envelope composes is.
    let up_msgs =
        format!("tabmux_messages_total{{route=\"/app/{APP_KEY}\",direction=\"to_upstream\"}}");
    assert_eq!(metric(&scrape, &up_msgs), Some(1.0));

    // A refusal at the edge is counted by its reason.
    let no_auth = json!({"event": "pusher:subscribe", "data": {"channel": "private-x"}});
    a.send_text(&no_auth.to_string()).await;
    a.recv_until("pusher:error").await;
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    let refusals =
        format!("tabmux_edge_refusals_total{{route=\"/app/{APP_KEY}\",reason=\"auth\"}}");
    assert_eq!(metric(&scrape, &refusals), Some(1.0));

    let (_, status) = admin_get(proxy.admin, "/status.json").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    let shown = &status["routes"][0];
    assert_eq!(shown["envelope"], "pusher/7");
    assert_eq!(shown["subscriptions_avoided"], 1);
    assert_eq!(shown["pings_avoided"], 2);
}

#[tokio::test]
async fn a_refused_subscription_reaches_the_waiting_tabs_and_a_later_one_tries_again() {
    let mock = Mock::start().await;
    mock.set_behavior(Behavior {
        greeting: vec![Message::text(established())],
        ..Default::default()
    });
    let proxy = pusher_proxy(&mock).await;
    let up = mock.upstream(0);
    let mut a = connected(&proxy, "b").await;
    let mut b = connected(&proxy, "b").await;
    a.send_text(&subscribe("private-x")).await;
    b.send_text(&subscribe("private-x")).await;
    up.find("the subscribe", |v| v["event"] == "pusher:subscribe")
        .await;
    barrier(&mut b).await;
    // Pusher answers a bad signature with a pusher:error naming no channel.
    let refusal =
        json!({"event": "pusher:error", "data": {"code": null, "message": "Invalid signature"}});
    up.send(Message::text(refusal.to_string()));
    assert_eq!(a.recv_event().await, refusal);
    assert_eq!(b.recv_event().await, refusal);
    // Not left pending: the next subscribe goes upstream again.
    a.send_text(&subscribe("private-x")).await;
    up.wait("a second subscribe", |c| {
        (c.frames
            .iter()
            .filter(|m| m.to_text().unwrap_or("").contains("pusher:subscribe"))
            .count()
            == 2)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_cache_channel_gives_a_later_tab_its_last_event() {
    let (_mock, proxy, up, mut a, _b) = two_tabs().await;
    subscribed(&mut a, "cache-prices").await;
    up.send(event("cache-prices", "price", json!({"p": 7})));
    assert_eq!(a.recv_event().await["event"], "price");
    let mut c = connected(&proxy, "b").await;
    subscribed(&mut c, "cache-prices").await;
    let cached = c.recv_event().await;
    assert_eq!(cached["event"], "price");
    assert_eq!(cached["data"], json!({"p": 7}).to_string());
}

#[tokio::test]
async fn the_first_sign_in_goes_upstream_and_a_later_tab_gets_its_answer() {
    let (_mock, proxy, up, mut a, mut b) = two_tabs().await;
    let signin =
        json!({"event": "pusher:signin", "data": {"auth": "k:s", "user_data": "{\"id\":\"u1\"}"}});
    a.send_text(&signin.to_string()).await;
    up.find("the sign-in", |v| v["event"] == "pusher:signin")
        .await;
    let success = json!({"event": "pusher:signin_success", "data": "{\"user_data\":\"{\\\"id\\\":\\\"u1\\\"}\"}"});
    up.send(Message::text(success.to_string()));
    assert_eq!(a.recv_event().await, success);
    b.send_text(&signin.to_string()).await;
    assert_eq!(b.recv_event().await, success);
    assert_eq!(up.events_named("pusher:signin").len(), 1);
    // The user's channel reaches the tabs that signed in, not a third tab.
    let mut c = connected(&proxy, "b").await;
    up.send(event("#server-to-user-u1", "note", json!({})));
    up.send(marker(1));
    assert_eq!(a.recv_event().await["event"], "note");
    assert_eq!(c.recv_event().await["event"], "marker");
}

#[tokio::test]
async fn a_silent_upstream_is_pinged_within_its_activity_timeout() {
    let mock = Mock::behaving(quiet_server(1)).await;
    let path = format!("/app/{APP_KEY}");
    let fast = route(&path, &mock)
        .envelope("pusher")
        .ping_interval("50ms")
        .idle_timeout("5s");
    let proxy = proxy().route(fast).start().await;
    let up = mock.upstream(0);
    let mut a = pusher_tab("b").connect(&proxy).await;
    assert_eq!(
        a.recv_event().await["event"],
        "pusher:connection_established"
    );
    up.find("tabmux's pusher:ping", |v| v["event"] == "pusher:ping")
        .await;
}

/// What a Pusher session keeps stays within the buffer budget, and is given
/// back to the system when the session ends: four browsers of 1,024
/// channels (four tabs of 256 each, a tab's most) with 60 KB subscribe
/// frames (240 MiB of them; before, each was kept) peak within the budget
/// (64 MiB) plus 32 MiB over idle, and once their tabs are gone RSS returns
/// to within 64 MiB of idle (the heap is trimmed when the allocator's bytes
/// in use fall, not only the buffer budget's account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_state_is_returned_when_the_sessions_end() {
    const CHANNELS: usize = 1024;
    let mock = Mock::behaving(pusher_server()).await;
    let path = format!("/app/{APP_KEY}");
    let (mut child, proxy) = proxy()
        .route(route(&path, &mock).envelope("pusher").linger("0s"))
        .spawn();
    let pid = child.id();
    let idle = rss_mib(pid);
    let auth = "a".repeat(60_000);
    let mut tabs = Vec::new();
    const PER_TAB: usize = CHANNELS / 4;
    for browser in 0..4 {
        for part in 0..4 {
            let mut tab = connected(&proxy, &format!("state-{browser}")).await;
            for n in part * PER_TAB..(part + 1) * PER_TAB {
                let frame = json!({"event": "pusher:subscribe",
                    "data": {"auth": auth, "channel": format!("private-{n}")}});
                tab.send_text(&frame.to_string()).await;
            }
            // Every subscribe answered: the session holds them all.
            let mut ok = 0;
            while ok < PER_TAB {
                if tab.recv_event().await["event"] == "pusher_internal:subscription_succeeded" {
                    ok += 1;
                }
            }
            tabs.push(tab);
        }
    }
    let peak = peak_rss_mib(pid);
    assert!(
        peak <= idle + 64.0 + 32.0,
        "peak {peak:.0} MiB over an idle {idle:.0}"
    );
    drop(tabs);
    mock.wait("every session to end", |c| {
        (c.len() == 4 && c.iter().all(|c| c.closed.is_some())).then_some(())
    })
    .await;
    memory_returned(pid, idle + 64.0).await;
    let _ = child.kill();
    let _ = child.wait();
}

/// The route's deadlines fire on their own, whatever `ping_interval` is
/// (600 s here): a channel left without unsubscribing is unsubscribed
/// upstream once its `linger` has passed, not at the next keepalive tick
/// (which would come long after the wait's guard). When exactly is the
/// machine's tests' (`src/envelope/pusher/tests.rs`, in paused time).
/// Through the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_unsubscribed_linger_after_its_last_tab_left() {
    let mock = Mock::behaving(pusher_server()).await;
    let path = format!("/app/{APP_KEY}");
    let slow_ticks = route(&path, &mock)
        .envelope("pusher")
        .linger("1s")
        .ping_interval("600s")
        .idle_timeout("1200s");
    let (mut child, proxy) = proxy().route(slow_ticks).spawn();
    let up = mock.upstream(0);
    let mut tab = connected(&proxy, "b").await;
    subscribed(&mut tab, "private-a").await;
    tab.close(1000).await;
    up.wait_event("pusher:unsubscribe").await;
    let _ = child.kill();
    let _ = child.wait();
}

/// A server that announces a 2 s activity timeout and then says nothing is
/// pinged by a deadline of the session's own, not at the next keepalive
/// tick (600 s here, long after the wait's guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_pinged_within_its_short_activity_timeout() {
    let mock = Mock::behaving(quiet_server(2)).await;
    let path = format!("/app/{APP_KEY}");
    let slow_ticks = route(&path, &mock)
        .envelope("pusher")
        .ping_interval("600s")
        .idle_timeout("1200s");
    let (mut child, proxy) = proxy().route(slow_ticks).spawn();
    let up = mock.upstream(0);
    let mut tab = pusher_tab("b").connect(&proxy).await;
    tab.recv_text().await;
    up.wait_event("pusher:ping").await;
    let _ = child.kill();
    let _ = child.wait();
}

/// Subscribes waiting their turn (one request in flight, and this server
/// answers none) keep their frames, and those count against the buffer
/// budget: past it, the session that holds them is closed with 1013
/// "memory budget", and another session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_waiting_their_turn_count_against_the_buffer_budget() {
    let mock = Mock::behaving(quiet_server(120)).await;
    let path = format!("/app/{APP_KEY}");
    let proxy = proxy()
        .server("buffer_budget", "4MiB")
        .route(route(&path, &mock).envelope("pusher"))
        .start()
        .await;
    let mut calm = connected(&proxy, "calm").await;
    let mut filler = connected(&proxy, "filler").await;
    let auth = "a".repeat(60_000);
    // 100 of 60 KB: 6 MB waiting, past a 4 MiB budget.
    for n in 0..100 {
        let frame = json!({"event": "pusher:subscribe",
            "data": {"auth": auth, "channel": format!("private-{n}")}});
        let sent = futures_util::SinkExt::send(&mut filler.ws, Message::text(frame.to_string()));
        if sent.await.is_err() {
            break;
        }
    }
    assert_eq!(filler.closed().await.0, 1013);
    // The calm session is unharmed.
    barrier(&mut calm).await;
}

/// A server that closes its connection above 10 client events a second
/// (as a Pusher app may) never sees more from one session: a tab's flood
/// is refused at the edge, to that tab alone, and the session stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_event_flood_never_closes_the_session() {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let window = Arc::new(Mutex::new((Instant::now(), 0u32)));
    let mut strict = pusher_server();
    strict.reply = Some(Arc::new(move |m: &Message| {
        let client = m
            .to_text()
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .is_some_and(|v| {
                v["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("client-"))
            });
        if client {
            let mut w = window.lock().unwrap();
            if w.0.elapsed() >= Duration::from_secs(1) {
                *w = (Instant::now(), 0);
            }
            w.1 += 1;
            if w.1 > 10 {
                return Some(Message::Close(Some(CloseFrame {
                    code: CloseCode::Library(4301),
                    reason: "Client event rate limit exceeded".into(),
                })));
            }
            return None;
        }
        pusher_reply(m)
    }));
    let mock = Mock::behaving(strict).await;
    let proxy = pusher_proxy(&mock).await;
    let up = mock.upstream(0);
    let mut a = connected(&proxy, "b").await;
    let mut b = connected(&proxy, "b").await;
    subscribed(&mut a, "private-chat").await;
    subscribed(&mut b, "private-chat").await;
    for n in 0..60 {
        let ev = json!({"event": "client-typing", "channel": "private-chat", "data": {"n": n}});
        a.send_text(&ev.to_string()).await;
    }
    // Every event is answered or went upstream: the flooder heard of the
    // refusals (4301, the server's words), and its sibling subscribes on.
    barrier(&mut a).await;
    subscribed(&mut b, "private-more").await;
    let sent = up.events_named("client-typing").len();
    assert!(sent < 60, "{sent} of 60 went upstream");
    assert!(
        mock.now(|c| c.iter().all(|c| c.closed.is_none())),
        "the server never closed the session's connection"
    );
    assert_eq!(mock.connections(), 1);
}
