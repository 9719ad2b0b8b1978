//! PROTOCOL.md, "Envelope `graphql`", through the real proxy in front of a
//! mock server (exact frames and faults): the handshake answered at once,
//! the `connection_init` deadline, what happens before it, refused and
//! lost upstreams, and session limits after the handshake. The real server
//! is in tests/graphql.rs.

mod common;

use common::graphql::*;
use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A server that acks every `connection_init` and picks the tab's
/// subprotocol.
fn acking() -> Behavior {
    Behavior {
        pick_first_protocol: true,
        reply: Some(std::sync::Arc::new(|m: &Message| {
            let v: Value = serde_json::from_str(m.to_text().ok()?).ok()?;
            (v["type"] == "connection_init").then(|| {
                Message::text(json!({"type": "connection_ack", "payload": {"v": 1}}).to_string())
            })
        })),
        ..Default::default()
    }
}

fn graphql_route(mock: &Mock) -> RouteConfig {
    route("/graphql", mock).envelope("graphql")
}

#[tokio::test]
async fn the_handshake_is_answered_at_once_and_the_upstream_offered_the_tab_s_subprotocol() {
    let mock = Mock::behaving(acking()).await;
    let proxy = proxy().route(graphql_route(&mock)).start().await;
    // It offers both: graphql-transport-ws is chosen.
    let spec = gql_tab("b", "/graphql", "graphql-ws, graphql-transport-ws");
    let mut tab = spec.connect(&proxy).await;
    assert_eq!(tab.protocol.as_deref(), Some(MODERN));
    assert_eq!(mock.attempts(), 0, "nothing dialled before connection_init");
    let init = r#"{"type": "connection_init", "payload": {"token": "a"}}"#;
    tab.send_text(init).await;
    let ack = tab.recv_json().await;
    assert_eq!(ack, json!({"type": "connection_ack", "payload": {"v": 1}}));
    let up = mock.upstream(0);
    let headers = up.headers().await;
    assert_eq!(headers["sec-websocket-protocol"], MODERN);
    assert_eq!(headers["x-tabmux-envelope"], "graphql");
    assert_eq!(
        up.frames(1).await[0].to_text().unwrap(),
        init,
        "the first tab's connection_init, unchanged"
    );
}

#[tokio::test]
async fn a_tab_that_offers_no_graphql_subprotocol_is_closed_with_4406() {
    let mock = Mock::behaving(acking()).await;
    let proxy = proxy().route(graphql_route(&mock)).start().await;
    let mut tab = TabSpec::new("b").path("/graphql").connect(&proxy).await;
    assert_eq!(tab.protocol, None);
    assert_eq!(
        tab.closed().await,
        (4406, "Subprotocol not acceptable".to_string())
    );
}

#[tokio::test]
async fn without_connection_init_in_time_a_tab_is_closed_with_4408_and_pings_are_answered_meanwhile(
) {
    let mock = Mock::behaving(acking()).await;
    let route = graphql_route(&mock).set("init_timeout", "300ms");
    let proxy = proxy().route(route).start().await;
    let mut tab = gql_tab("b", "/graphql", MODERN).connect(&proxy).await;
    tab.send_json(json!({"type": "ping", "payload": {"n": 1}}))
        .await;
    assert_eq!(
        tab.recv_json().await,
        json!({"type": "pong", "payload": {"n": 1}})
    );
    assert_eq!(
        tab.closed().await,
        (4408, "Connection initialisation timeout".to_string())
    );
    assert_eq!(mock.attempts(), 0);
    // A subscribe before connection_init: 4401.
    let mut early = gql_tab("b", "/graphql", MODERN).connect(&proxy).await;
    early.send_json(subscribe("1", "{ a }")).await;
    assert_eq!(early.closed().await, (4401, "Unauthorized".to_string()));
}

#[tokio::test]
async fn a_refused_or_unreachable_upstream_closes_the_waiting_tab_as_graphql_ws_would() {
    for (status, code, reason) in [
        (401, 4401, "Unauthorized"),
        (403, 4403, "Forbidden"),
        (500, 4403, "Forbidden"),
    ] {
        let mock = Mock::behaving(Behavior {
            refuse: Some(status),
            ..Default::default()
        })
        .await;
        let proxy = proxy().route(graphql_route(&mock)).start().await;
        let mut tab = gql_tab("b", "/graphql", MODERN).connect(&proxy).await;
        tab.send_json(json!({"type": "connection_init"})).await;
        assert_eq!(
            tab.closed().await,
            (code, reason.to_string()),
            "HTTP {status}"
        );
    }
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = nobody.local_addr().unwrap();
    drop(nobody);
    let proxy = proxy()
        .route(route_to("/graphql", addr).envelope("graphql"))
        .start()
        .await;
    let mut tab = gql_tab("b", "/graphql", MODERN).connect(&proxy).await;
    tab.send_json(json!({"type": "connection_init"})).await;
    assert_eq!(tab.closed().await.0, 1012);
}

#[tokio::test]
async fn a_session_limit_closes_the_tab_with_1013_naming_it() {
    let mock = Mock::behaving(acking()).await;
    let route = graphql_route(&mock).max_tabs_per_session(1);
    let proxy = proxy().route(route).start().await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let _first = acked(&spec, &proxy, json!({"token": "a"})).await;
    let mut second = spec.connect(&proxy).await;
    second
        .send_json(json!({"type": "connection_init", "payload": {"token": "a"}}))
        .await;
    let (code, reason) = second.closed().await;
    assert_eq!(code, 1013);
    assert!(reason.contains("max_tabs_per_session"), "{reason}");
    // Another token is another session: not limited by this one.
    let _other = acked(&spec, &proxy, json!({"token": "b"})).await;
}

#[tokio::test]
async fn the_server_s_code_from_4000_passes_and_a_lower_one_is_1012() {
    let mock = Mock::behaving(acking()).await;
    let proxy = proxy().route(graphql_route(&mock)).start().await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut a = acked(&spec, &proxy, json!({"token": "a"})).await;
    let mut b = acked(&spec, &proxy, json!({"token": "a"})).await;
    mock.upstream(0).send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4500),
        reason: "bye".into(),
    })));
    assert_eq!(a.closed().await, (4500, "bye".to_string()));
    assert_eq!(b.closed().await, (4500, "bye".to_string()));
    let mut c = acked(&spec, &proxy, json!({"token": "c"})).await;
    mock.upstream(1).send(Message::Close(Some(CloseFrame {
        code: CloseCode::Error,
        reason: "oops".into(),
    })));
    assert_eq!(c.closed().await, (1012, "upstream lost".to_string()));
}

#[tokio::test]
async fn ids_of_two_tabs_collide_and_each_gets_its_own_results() {
    let mock = Mock::behaving(acking()).await;
    let proxy = proxy()
        .route(graphql_route(&mock).set("share_subscriptions", "events"))
        .start()
        .await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut a = acked(&spec, &proxy, json!(null)).await;
    let mut b = acked(&spec, &proxy, json!(null)).await;
    a.send_json(subscribe("1", "query { a }")).await;
    b.send_json(subscribe("1", "query { b }")).await;
    let up = mock.upstream(0);
    let frames = up.frames(3).await;
    let ids: Vec<String> = frames[1..]
        .iter()
        .map(|f| {
            let v: Value = serde_json::from_str(f.to_text().unwrap()).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
    // Answered in the other order: each tab gets its own, under "1".
    let query_of = |n: usize| {
        let v: Value = serde_json::from_str(frames[n + 1].to_text().unwrap()).unwrap();
        v["payload"]["query"].as_str().unwrap().to_string()
    };
    for n in [1, 0] {
        let next = json!({"id": ids[n], "type": "next", "payload": {"data": query_of(n)}});
        up.send(Message::text(next.to_string()));
    }
    assert_eq!(
        b.recv_json().await,
        json!({"id": "1", "type": "next", "payload": {"data": "query { b }"}})
    );
    assert_eq!(
        a.recv_json().await,
        json!({"id": "1", "type": "next", "payload": {"data": "query { a }"}})
    );
}

#[tokio::test]
async fn the_server_s_ping_is_answered_by_tabmux_and_no_tab_sees_it() {
    let mock = Mock::behaving(acking()).await;
    let proxy = proxy().route(graphql_route(&mock)).start().await;
    let spec = gql_tab("b", "/graphql", MODERN);
    let mut tab = acked(&spec, &proxy, json!(null)).await;
    let up = mock.upstream(0);
    up.send(Message::text(r#"{"type":"ping","payload":{"at":1}}"#));
    up.find("tabmux's pong", |v| {
        v["type"] == "pong" && v["payload"]["at"] == 1
    })
    .await;
    // The tab's next frame is its own pong, not the server's ping.
    tab.send_json(json!({"type": "ping"})).await;
    assert_eq!(tab.recv_json().await, json!({"type": "pong"}));
    // A second connection_init from a tab: 4429, for that tab alone.
    tab.send_json(json!({"type": "connection_init"})).await;
    assert_eq!(
        tab.closed().await,
        (4429, "Too many initialisation requests".to_string())
    );
}
