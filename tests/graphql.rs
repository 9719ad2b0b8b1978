//! The `graphql` route against a real GraphQL over WebSocket server
//! (tests/graphql/server.mjs: graphql-ws and subscriptions-transport-ws on
//! Node.js), started by each test: what a GraphQL client would notice, and
//! what the server (which bills by connection, subscription and message)
//! sees.
//!
//! Ignored by a plain `cargo test` (they need Node.js and `npm ci` in
//! tests/graphql); `.ci/run` installs them and runs
//! `cargo test --test graphql -- --ignored`.

mod common;

use common::graphql::*;
use common::*;
use serde_json::json;

async fn tabmux_in_front(server: &GraphqlServer, path: &str, share: &str) -> TestProxy {
    let route = route_to(path, server.addr)
        .upstream(&server.url(path))
        .envelope("graphql")
        .set("share_subscriptions", share)
        .linger("0s");
    proxy().route(route).start().await
}

const TOKEN: fn() -> serde_json::Value = || json!({"token": "a"});

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn four_tabs_share_one_connection_and_one_subscription() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/graphql", "events").await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut tabs = Vec::new();
    for n in 0..4 {
        let mut tab = acked(&spec, &proxy, TOKEN()).await;
        // Each tab picks its own id, as graphql-ws does (some collide).
        let id = if n < 2 {
            "1".to_string()
        } else {
            format!("tab{n}")
        };
        tab.send_json(subscribe(&id, "subscription { ticks }"))
            .await;
        tabs.push((tab, id));
    }
    let stats = server
        .wait("the subscription at the server", |s| {
            s["subscriptionsStarted"] == 1
        })
        .await;
    assert_eq!(stats["connectionsTotal"], 1, "{stats}");
    assert_eq!(
        stats["inits"],
        json!([{"token": "a"}]),
        "one connection_init upstream"
    );
    server.publish("hello").await;
    for (tab, id) in tabs.iter_mut() {
        let next = tab.recv_json().await;
        assert_eq!(
            next,
            json!({"id": id, "type": "next", "payload": {"data": {"ticks": "hello"}}})
        );
    }
    // One tab completes: it hears nothing more; the others go on.
    let (mut quitter, quit_id) = tabs.remove(0);
    quitter
        .send_json(json!({"id": quit_id, "type": "complete"}))
        .await;
    quitter.send_json(json!({"type": "ping"})).await;
    assert_eq!(quitter.recv_json().await, json!({"type": "pong"}));
    server.publish("again").await;
    for (tab, _) in tabs.iter_mut() {
        assert_eq!(tab.recv_json().await["payload"]["data"]["ticks"], "again");
    }
    quitter.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        quitter.recv_json().await,
        json!({"type": "pong"}),
        "no tick before it"
    );
    let stats = server.stats().await;
    assert_eq!(stats["subscriptions"], 1);
    // The server sent the ack and two ticks once: not once per tab.
    assert_eq!(stats["messagesSent"], 3, "{stats}");
}

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn queries_and_mutations_are_never_shared_and_ids_are_the_tabs_own() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/graphql", "events").await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut a = acked(&spec, &proxy, TOKEN()).await;
    let mut b = acked(&spec, &proxy, TOKEN()).await;
    // Both tabs send the same mutation under the same id: it runs twice.
    for tab in [&mut a, &mut b] {
        tab.send_json(subscribe("1", "mutation { bump }")).await;
    }
    let mut results = Vec::new();
    for tab in [&mut a, &mut b] {
        let next = tab.recv_json().await;
        assert_eq!(next["id"], "1");
        results.push(next["payload"]["data"]["bump"].as_i64().unwrap());
        assert_eq!(
            tab.recv_json().await,
            json!({"id": "1", "type": "complete"})
        );
    }
    results.sort_unstable();
    assert_eq!(results, [1, 2], "the side effect happened twice");
    // A query, once each.
    a.send_json(subscribe("q", "{ count }")).await;
    assert_eq!(a.recv_json().await["payload"]["data"]["count"], 2);
}

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn a_later_tab_of_a_live_query_gets_the_current_result_first() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/graphql", "live").await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut a = acked(&spec, &proxy, TOKEN()).await;
    a.send_json(subscribe("a", "subscription { count }")).await;
    assert_eq!(a.recv_json().await["payload"]["data"]["count"], 0);
    a.send_json(subscribe("m", "mutation { bump }")).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(a.recv_json().await);
    }
    assert!(seen
        .iter()
        .any(|v| v["id"] == "a" && v["payload"]["data"]["count"] == 1));
    let mut b = acked(&spec, &proxy, TOKEN()).await;
    b.send_json(subscribe("b", "subscription { count }")).await;
    assert_eq!(
        b.recv_json().await,
        json!({"id": "b", "type": "next", "payload": {"data": {"count": 1}}})
    );
    assert_eq!(server.stats().await["subscriptionsStarted"], 1);
}

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn two_tokens_or_two_browsers_never_share_a_connection() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/graphql", "events").await;
    let spec = gql_tab("b", "/graphql", MODERN);
    // Key order and spacing do not split a session.
    let mut a = spec.connect(&proxy).await;
    a.send_text(r#"{"type":"connection_init","payload":{"token":"a","v":1}}"#)
        .await;
    assert_eq!(a.recv_json().await["type"], "connection_ack");
    let mut same = spec.connect(&proxy).await;
    same.send_text(r#"{"payload":{ "v": 1, "token": "a" },"type":"connection_init"}"#)
        .await;
    assert_eq!(same.recv_json().await["type"], "connection_ack");
    assert_eq!(server.stats().await["connectionsTotal"], 1);
    // Another token, same browser: its own connection.
    let _other = acked(&spec, &proxy, json!({"token": "b"})).await;
    // Another browser, same token: its own connection.
    let _elsewhere = acked(
        &gql_tab("c", "/graphql", MODERN),
        &proxy,
        json!({"token": "a", "v": 1}),
    )
    .await;
    let stats = server
        .wait("three connections", |s| s["connectionsTotal"] == 3)
        .await;
    assert_eq!(stats["inits"].as_array().unwrap().len(), 3);
    // A refused token: the server closes 4403, and so is the tab.
    let mut bad = spec.connect(&proxy).await;
    bad.send_json(json!({"type": "connection_init", "payload": {"token": "bad"}}))
        .await;
    assert_eq!(bad.closed().await, (4403, "Forbidden".to_string()));
    // The others go on.
    a.send_json(json!({"type": "ping"})).await;
    assert_eq!(a.recv_json().await["type"], "pong");
}

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn a_protocol_error_closes_only_the_tab_that_made_it() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/graphql", "events").await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut a = acked(&spec, &proxy, TOKEN()).await;
    let mut b = acked(&spec, &proxy, TOKEN()).await;
    // A sibling that stays.
    let mut keeper = acked(&spec, &proxy, TOKEN()).await;
    a.send_json(subscribe("1", "subscription { ticks }")).await;
    b.send_json(subscribe("1", "subscription { ticks }")).await;
    server
        .wait("the subscription", |s| s["subscriptions"] == 1)
        .await;
    a.send_json(subscribe("1", "subscription { ticks }")).await;
    assert_eq!(
        a.closed().await,
        (4409, "Subscriber for 1 already exists".to_string())
    );
    b.send_text("{not json").await;
    let (code, _) = b.closed().await;
    assert_eq!(code, 4400);
    // Their operation is completed upstream (linger 0s); the session goes
    // on for a new tab, on the same connection.
    server
        .wait("the subscription completed", |s| s["subscriptions"] == 0)
        .await;
    let mut c = acked(&spec, &proxy, TOKEN()).await;
    c.send_json(subscribe("x", "subscription { ticks }")).await;
    server
        .wait("the new subscription", |s| s["subscriptions"] == 1)
        .await;
    server.publish("on").await;
    assert_eq!(c.recv_json().await["payload"]["data"]["ticks"], "on");
    assert_eq!(server.stats().await["connectionsTotal"], 1);
    keeper.send_json(json!({"type": "ping"})).await;
    assert_eq!(keeper.recv_json().await["type"], "pong");
}

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn the_legacy_subprotocol_is_shared_the_same_way() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/legacy", "events").await;
    let spec = gql_tab("b", "/legacy", LEGACY);
    let mut tabs = Vec::new();
    for n in 0..2 {
        let mut tab = spec.connect(&proxy).await;
        assert_eq!(tab.protocol.as_deref(), Some(LEGACY));
        tab.send_json(json!({"type": "connection_init", "payload": {"token": "a"}}))
            .await;
        assert_eq!(
            tab.recv_type("connection_ack").await["type"],
            "connection_ack"
        );
        tab.send_json(start(&format!("{}", n + 1), "subscription { ticks }"))
            .await;
        tabs.push(tab);
    }
    server
        .wait("the subscription", |s| s["subscriptionsStarted"] == 1)
        .await;
    server.publish("legacy").await;
    for (n, tab) in tabs.iter_mut().enumerate() {
        let data = tab.recv_op().await;
        assert_eq!(data["type"], "data");
        assert_eq!(data["id"], format!("{}", n + 1));
        assert_eq!(data["payload"]["data"]["ticks"], "legacy");
    }
    // Keep-alives reach the tabs (their clients time out without them).
    tabs[0].recv_type("ka").await;
    let mut last = tabs.pop().unwrap();
    last.send_json(json!({"type": "connection_terminate"}))
        .await;
    assert_eq!(last.closed().await.0, 1000);
    assert_eq!(server.stats().await["connectionsTotal"], 1);
}

#[tokio::test]
#[ignore = "needs Node.js and `npm ci` in tests/graphql (.ci/run does it)"]
async fn a_lost_server_closes_every_tab_with_1012() {
    let server = GraphqlServer::start().await;
    let proxy = tabmux_in_front(&server, "/graphql", "events").await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut a = acked(&spec, &proxy, TOKEN()).await;
    let mut b = acked(&spec, &proxy, TOKEN()).await;
    drop(server);
    assert_eq!(a.closed().await, (1012, "upstream lost".to_string()));
    assert_eq!(b.closed().await.0, 1012);
}
