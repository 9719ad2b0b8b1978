//! The `pusher` route against a real Pusher-protocol server, sockudo,
//! started by each test: what a Pusher user's client would notice, and
//! what the server (which bills by connection and message) sees.
//!
//! Ignored by a plain `cargo test` (they need the sockudo binary); `.ci/run`
//! installs sockudo and runs them: `cargo test --test sockudo -- --ignored`.

mod common;

use common::pusher::*;
use common::sockudo::*;
use common::*;
use serde_json::{json, Value};

async fn tabmux_in_front(sockudo: &Sockudo) -> TestProxy {
    let path = format!("/app/{APP_KEY}");
    let upstream = route_to(&path, sockudo.addr)
        .upstream(&sockudo.url())
        .envelope("pusher");
    proxy().route(upstream).start().await
}

/// A tab of browser `session`, past its greeting; with its socket id.
async fn connected(proxy: &TestProxy, session: &str) -> (Tab, String) {
    let mut tab = pusher_tab(session).connect(proxy).await;
    let hello = tab.recv_event().await;
    assert_eq!(hello["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    (tab, data["socket_id"].as_str().unwrap().to_string())
}

async fn subscribed(tab: &mut Tab, subscribe: Value) {
    let channel = subscribe["data"]["channel"].clone();
    tab.send_text(&subscribe.to_string()).await;
    let ok = tab
        .recv_until("pusher_internal:subscription_succeeded")
        .await;
    assert_eq!(ok["channel"], channel);
}

fn public(channel: &str) -> Value {
    json!({"event": "pusher:subscribe", "data": {"channel": channel}})
}

fn private(channel: &str, socket_id: &str) -> Value {
    let auth = channel_auth(socket_id, channel, None);
    json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})
}

/// Waits until tabmux has handled what `tab` sent before.
async fn barrier(tab: &mut Tab) {
    tab.send_text(r#"{"event":"pusher:ping","data":{}}"#).await;
    tab.recv_until("pusher:pong").await;
}

#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn three_tabs_of_a_browser_are_one_connection_with_one_socket_id() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (_a, a_id) = connected(&proxy, "browser").await;
    let (_b, b_id) = connected(&proxy, "browser").await;
    let (_c, c_id) = connected(&proxy, "browser").await;
    assert_eq!(
        (a_id.as_str(), b_id.as_str()),
        (c_id.as_str(), c_id.as_str())
    );
    sockudo.wait_connections(1.0).await;
    let (_d, d_id) = connected(&proxy, "another browser").await;
    assert_ne!(d_id, a_id);
    sockudo.wait_connections(2.0).await;
}

#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn a_tab_that_unsubscribes_does_not_silence_its_siblings() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut a, _) = connected(&proxy, "b").await;
    let (mut b, _) = connected(&proxy, "b").await;
    subscribed(&mut a, public("news")).await;
    subscribed(&mut a, public("other")).await;
    subscribed(&mut b, public("news")).await;
    a.send_text(&unsubscribe("news")).await;
    barrier(&mut a).await;

    assert_eq!(sockudo.trigger("news", "update", "{\"n\":1}").await, 200);
    assert_eq!(sockudo.trigger("other", "marker", "{}").await, 200);
    let got = b.recv_until("update").await;
    assert_eq!(got["channel"], "news");
    // a's next event is the marker: nothing from the channel it left.
    assert_eq!(a.recv_event().await["event"], "marker");
    assert!(sockudo.occupied("news").await, "b keeps it subscribed");

    b.send_text(&unsubscribe("news")).await;
    barrier(&mut b).await;
    guard("the channel to be unsubscribed upstream", async {
        while sockudo.occupied("news").await {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn a_client_event_reaches_the_sibling_tab_exactly_once() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut a, socket_id) = connected(&proxy, "b").await;
    let (mut b, _) = connected(&proxy, "b").await;
    // Both tabs share the socket id the channel authorization is signed for.
    subscribed(&mut a, private("private-chat", &socket_id)).await;
    subscribed(&mut b, private("private-chat", &socket_id)).await;
    let typing = json!({"event": "client-typing", "channel": "private-chat", "data": {"on": true}});
    a.send_text(&typing.to_string()).await;
    let got = b.recv_until("client-typing").await;
    assert_eq!(got["data"], json!({"on": true}));
    // Nothing more: the server did not echo it back through tabmux.
    assert_eq!(sockudo.trigger("private-chat", "marker", "{}").await, 200);
    assert_eq!(b.recv_event().await["event"], "marker");
    assert_eq!(a.recv_event().await["event"], "marker");
}

#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn events_reach_each_subscribed_tab_once_and_sockudo_sends_them_once() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let mut tabs = Vec::new();
    for _ in 0..4 {
        let (mut tab, _) = connected(&proxy, "b").await;
        subscribed(&mut tab, public("prices")).await;
        tabs.push(tab);
    }
    sockudo.wait_connections(1.0).await;
    for n in 0..3 {
        assert_eq!(sockudo.trigger("prices", "tick", &n.to_string()).await, 200);
    }
    for tab in &mut tabs {
        for n in 0..3 {
            let got = tab.recv_until("tick").await;
            assert_eq!(got["data"], n.to_string());
        }
    }
}

fn presence(channel: &str, socket_id: &str, user: &str) -> Value {
    let channel_data = json!({"user_id": user}).to_string();
    let auth = channel_auth(socket_id, channel, Some(&channel_data));
    json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}})
}

#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn a_reload_inside_linger_does_not_flicker_presence_for_the_other_members() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    // Bob, in another browser, watches the room.
    let (mut bob, bob_id) = connected(&proxy, "bob").await;
    subscribed(&mut bob, presence("presence-room", &bob_id, "bob")).await;
    // Ann's one tab joins the room: Bob sees her arrive.
    let (mut ann, ann_id) = connected(&proxy, "ann").await;
    subscribed(&mut ann, presence("presence-room", &ann_id, "ann")).await;
    let added = bob.recv_until("pusher_internal:member_added").await;
    assert!(added["data"].as_str().unwrap().contains("ann"));

    // Ann reloads: the tab closes, the page connects again within linger,
    // with the same socket id, and subscribes again.
    drop(ann);
    let (mut ann, again) = connected(&proxy, "ann").await;
    assert_eq!(again, ann_id, "the lingering connection, not a new one");
    subscribed(&mut ann, presence("presence-room", &again, "ann")).await;
    // Bob saw nothing of it: his next event is the marker.
    assert_eq!(sockudo.trigger("presence-room", "marker", "{}").await, 200);
    assert_eq!(bob.recv_event().await["event"], "marker");
    assert_eq!(ann.recv_until("marker").await["channel"], "presence-room");
}

#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn browsers_are_isolated_sessions() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut ann, ann_id) = connected(&proxy, "ann").await;
    let (mut bob, bob_id) = connected(&proxy, "bob").await;
    assert_ne!(ann_id, bob_id);
    subscribed(&mut ann, public("ann-only")).await;
    subscribed(&mut bob, public("both")).await;
    subscribed(&mut ann, public("both")).await;
    assert_eq!(sockudo.trigger("ann-only", "secret", "{}").await, 200);
    assert_eq!(sockudo.trigger("both", "marker", "{}").await, 200);
    assert_eq!(ann.recv_event().await["event"], "secret");
    assert_eq!(ann.recv_event().await["event"], "marker");
    assert_eq!(
        bob.recv_event().await["event"],
        "marker",
        "nothing of ann's channel"
    );
    sockudo.wait_connections(2.0).await;
}

/// A server's close in 4000-4199 reaches every tab of the session with the
/// server's code and its own reason, as it would reach each of them on a
/// connection of its own: sockudo terminating a signed-in user's
/// connections (its HTTP API) closes them with 4009 and its words.
#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn the_server_s_close_code_and_reason_reach_every_tab() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut a, socket_id) = connected(&proxy, "browser").await;
    let (mut b, _) = connected(&proxy, "browser").await;
    let user_data = json!({"id": "user-9"}).to_string();
    let auth = user_auth(&socket_id, &user_data);
    let signin = json!({"event": "pusher:signin", "data": {"user_data": user_data, "auth": auth}});
    a.send_text(&signin.to_string()).await;
    a.recv_until("pusher:signin_success").await;
    assert_eq!(sockudo.terminate_user("user-9").await, 200);
    for tab in [&mut a, &mut b] {
        let (code, reason) = tab.closed().await;
        assert_eq!(
            (code, reason.as_str()),
            (4009, "You got disconnected by the app.")
        );
    }
}

/// A presence subscribe without `channel_data` (which made sockudo's
/// handler fail, closing every tab of the session with 4200) is refused to
/// that tab alone, before the server sees it; its sibling stays up, and so
/// does the session's one connection.
#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn a_subscribe_the_server_could_fail_on_is_refused_to_that_tab_alone() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut a, socket_id) = connected(&proxy, "b").await;
    let (mut b, _) = connected(&proxy, "b").await;
    let auth = channel_auth(&socket_id, "presence-room", None);
    let bad =
        json!({"event": "pusher:subscribe", "data": {"channel": "presence-room", "auth": auth}});
    a.send_text(&bad.to_string()).await;
    let error = a.recv_until("pusher:error").await;
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("channel_data"),
        "{error}"
    );
    // Both tabs go on, on the same connection.
    subscribed(&mut a, public("after")).await;
    subscribed(&mut b, private("private-after", &socket_id)).await;
    assert_eq!(sockudo.connections().await, 1.0);
}

/// A `user_id` a tab puts in its client event never reaches a sibling: on
/// a presence channel the sibling sees the session's member there, as the
/// server would set it.
#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn a_tab_cannot_choose_whom_its_siblings_see_as_a_client_event_s_sender() {
    let sockudo = Sockudo::start().await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut a, socket_id) = connected(&proxy, "b").await;
    let (mut b, _) = connected(&proxy, "b").await;
    subscribed(&mut a, presence("presence-room", &socket_id, "alice")).await;
    subscribed(&mut b, presence("presence-room", &socket_id, "alice")).await;
    let forged =
        json!({"event": "client-hi", "channel": "presence-room", "data": {}, "user_id": "ceo"});
    a.send_text(&forged.to_string()).await;
    let got = b.recv_until("client-hi").await;
    assert_eq!(got["user_id"], "alice", "{got}");
}

/// One tab floods client events while its sibling subscribes to 30
/// channels, against a server that allows 10 client events a second per
/// connection: every subscribe succeeds, the sibling receives no error (a
/// refusal of the flood is never taken for a subscribe's answer), and the
/// session's connection stays up.
#[tokio::test]
#[ignore = "needs sockudo (.ci/run installs it)"]
async fn a_client_event_flood_does_not_answer_a_sibling_s_subscribes() {
    let sockudo =
        Sockudo::start_with(&[("SOCKUDO_DEFAULT_APP_MAX_CLIENT_EVENTS_PER_SECOND", "10")]).await;
    let proxy = tabmux_in_front(&sockudo).await;
    let (mut a, socket_id) = connected(&proxy, "b").await;
    let (mut b, _) = connected(&proxy, "b").await;
    subscribed(&mut a, private("private-chat", &socket_id)).await;
    let event = json!({"event": "client-flood", "channel": "private-chat", "data": {}}).to_string();
    for n in 0..300 {
        a.send_text(&event).await;
        if n % 10 == 0 {
            b.send_text(&public(&format!("room-{}", n / 10)).to_string())
                .await;
        }
    }
    let mut ok = 0;
    while ok < 30 {
        let v = b.recv_event().await;
        assert_ne!(
            v["event"], "pusher:error",
            "the sibling got the flood's refusal: {v}"
        );
        if v["event"] == "pusher_internal:subscription_succeeded" {
            ok += 1;
        }
    }
    // The flooder was told (by tabmux, or by the server through tabmux).
    a.recv_until("pusher:error").await;
    barrier(&mut a).await;
    assert_eq!(sockudo.connections().await, 1.0);
}
