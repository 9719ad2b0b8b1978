//! The `graphql` envelope's rows (docs/protocol.md), as plain values: what
//! a tab or the upstream sends, and the effects the machine decides.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::envelope::{Effect, Saving};

fn t(n: u64) -> TabId {
    TabId(n)
}

fn text(v: Value) -> Message {
    Message::text(v.to_string())
}

/// Tab `n` joins, placed by its `connection_init` with `payload`.
fn join(m: &mut Graphql, n: u64, payload: Value, out: &mut Vec<Effect>) {
    m.tab_joined(t(n), out);
    let init = text(json!({"type": "connection_init", "payload": payload}));
    m.tab_init(t(n), init, out);
}

const ACK: &str = r#"{"type":"connection_ack"}"#;

/// A session of `n` tabs past the ack, on `protocol`, sharing as `share`.
fn session(protocol: Subprotocol, share: Share, n: u64) -> Graphql {
    let mut m = Graphql::new(protocol, share, Duration::from_secs(10));
    let mut out = Vec::new();
    for i in 1..=n {
        join(&mut m, i, json!({"token": "a"}), &mut out);
    }
    m.upstream_frame(Message::text(ACK), &mut out);
    m
}

fn from_tab(m: &mut Graphql, tab: u64, v: Value) -> Vec<Effect> {
    let mut out = Vec::new();
    m.tab_sent(t(tab), text(v), Instant::now, &mut out).unwrap();
    out
}

fn from_upstream(m: &mut Graphql, v: Value) -> Vec<Effect> {
    let mut out = Vec::new();
    m.upstream_frame(text(v), &mut out);
    out
}

fn subscribe(id: &str, query: &str) -> Value {
    json!({"id": id, "type": "subscribe", "payload": {"query": query}})
}

/// The frames sent upstream (forwarded or composed), as JSON.
fn upstream(out: &[Effect]) -> Vec<Value> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Forward(_, f) => Some(&f.frame),
            Effect::Upstream(m) => Some(m),
            _ => None,
        })
        .map(|m| serde_json::from_str(m.to_text().unwrap()).unwrap())
        .collect()
}

/// What each tab was given (delivered or answered), as (tab, JSON).
fn given(out: &[Effect]) -> Vec<(u64, Value)> {
    let mut all = Vec::new();
    for e in out {
        let (tabs, msg) = match e {
            Effect::Deliver {
                to: Target::Tabs { ids, .. },
                msg,
                ..
            } => (ids.clone(), msg),
            Effect::Answer { tab, msg } => (vec![*tab], msg),
            _ => continue,
        };
        for tab in tabs {
            all.push((tab.0, serde_json::from_str(msg.to_text().unwrap()).unwrap()));
        }
    }
    all.sort_by_key(|(tab, _)| *tab);
    all
}

/// The close a tab was given, as (tab, code, reason).
fn closes(out: &[Effect]) -> Vec<(u64, u16, String)> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Close {
                to: Target::Tabs { ids, .. },
                cause,
            } => Some((ids[0].0, cause.code(), cause.row().reason.to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_first_init_goes_upstream_and_the_ack_answers_every_tab() {
    let mut m = Graphql::new(Subprotocol::TransportWs, Share::Off, Duration::ZERO);
    let mut out = Vec::new();
    join(&mut m, 1, json!({"token": "a"}), &mut out);
    join(&mut m, 2, json!({"token": "a"}), &mut out);
    assert_eq!(
        upstream(&out),
        [json!({"type": "connection_init", "payload": {"token": "a"}})],
        "one connection_init upstream, the first tab's"
    );
    let out = from_upstream(
        &mut m,
        json!({"type": "connection_ack", "payload": {"v": 1}}),
    );
    let ack = json!({"type": "connection_ack", "payload": {"v": 1}});
    assert_eq!(given(&out), [(1, ack.clone()), (2, ack.clone())]);
    // A later tab is given the ack as it came; nothing goes upstream.
    let mut out = Vec::new();
    join(&mut m, 3, json!({"token": "a"}), &mut out);
    assert_eq!(given(&out), [(3, ack)]);
    assert!(upstream(&out).is_empty());
}

#[test]
fn operations_get_tabmux_ids_upstream_and_results_the_tab_s_own() {
    let mut m = session(Subprotocol::TransportWs, Share::Off, 2);
    // Both tabs use the id "1": upstream they are two operations.
    let a = from_tab(&mut m, 1, subscribe("1", "query { a }"));
    let b = from_tab(&mut m, 2, subscribe("1", "query { a }"));
    let (ua, ub) = (upstream(&a), upstream(&b));
    assert_eq!(ua[0]["payload"], json!({"query": "query { a }"}));
    assert_ne!(ua[0]["id"], ub[0]["id"], "upstream ids are unique");
    let id_b = ub[0]["id"].as_str().unwrap().to_string();
    let out = from_upstream(
        &mut m,
        json!({"id": id_b, "type": "next", "payload": {"data": {"a": 2}}}),
    );
    assert_eq!(
        given(&out),
        [(
            2,
            json!({"id": "1", "type": "next", "payload": {"data": {"a": 2}}})
        )],
        "to that tab alone, with its own id"
    );
    let out = from_upstream(&mut m, json!({"id": id_b, "type": "complete"}));
    assert_eq!(given(&out), [(2, json!({"id": "1", "type": "complete"}))]);
    // Tab 2 may use the id again; the upstream gets a new one.
    let again = upstream(&from_tab(&mut m, 2, subscribe("1", "query { a }")));
    assert_ne!(
        again[0]["id"],
        json!(id_b),
        "never reused on the connection"
    );
}

#[test]
fn a_shared_subscription_goes_upstream_once_and_reaches_every_tab() {
    let mut m = session(Subprotocol::TransportWs, Share::Events, 3);
    let query = "subscription { ticks }";
    let first = upstream(&from_tab(&mut m, 1, subscribe("a", query)));
    // The same subscription, with its fields in another order and spacing.
    let same =
        json!({"type": "subscribe", "payload": {"variables": null, "query": query}, "id": "b"});
    let out = from_tab(&mut m, 2, same);
    assert!(upstream(&out).is_empty(), "{out:?}");
    assert!(out.contains(&Effect::Avoided(Saving::Subscription)));
    // A mutation is never shared; a subscription with other variables is
    // another operation.
    let mutation = "mutation { bump }";
    assert_eq!(
        upstream(&from_tab(&mut m, 3, subscribe("m", mutation))).len(),
        1
    );
    assert_eq!(
        upstream(&from_tab(&mut m, 2, subscribe("m", mutation))).len(),
        1
    );
    let other =
        json!({"id": "v", "type": "subscribe", "payload": {"query": query, "variables": {"x": 1}}});
    assert_eq!(upstream(&from_tab(&mut m, 3, other)).len(), 1);
    // One `next` reaches both tabs, each with its own id.
    let id = first[0]["id"].as_str().unwrap();
    let out = from_upstream(
        &mut m,
        json!({"id": id, "type": "next", "payload": {"data": 1}}),
    );
    assert_eq!(
        given(&out),
        [
            (
                1,
                json!({"id": "a", "type": "next", "payload": {"data": 1}})
            ),
            (
                2,
                json!({"id": "b", "type": "next", "payload": {"data": 1}})
            ),
        ]
    );
    assert!(out.contains(&Effect::Avoided(Saving::Deliveries(1))));
    // Tab 1 completes: nothing upstream while tab 2 is attached.
    let out = from_tab(&mut m, 1, json!({"id": "a", "type": "complete"}));
    assert!(upstream(&out).is_empty());
    let out = from_tab(&mut m, 2, json!({"id": "b", "type": "complete"}));
    assert_eq!(upstream(&out), [json!({"id": id, "type": "complete"})]);
}

#[test]
fn live_gives_a_later_tab_the_last_result_first() {
    let mut m = session(Subprotocol::TransportWs, Share::Live, 2);
    let query = "subscription { count }";
    let up = upstream(&from_tab(&mut m, 1, subscribe("a", query)));
    let id = up[0]["id"].as_str().unwrap();
    from_upstream(
        &mut m,
        json!({"id": id, "type": "next", "payload": {"data": 7}}),
    );
    let out = from_tab(&mut m, 2, subscribe("b", query));
    assert_eq!(
        given(&out),
        [(
            2,
            json!({"id": "b", "type": "next", "payload": {"data": 7}})
        )]
    );
    // With `events`, a later tab gets only what comes after.
    let mut m = session(Subprotocol::TransportWs, Share::Events, 2);
    let up = upstream(&from_tab(&mut m, 1, subscribe("a", query)));
    let id = up[0]["id"].as_str().unwrap();
    from_upstream(
        &mut m,
        json!({"id": id, "type": "next", "payload": {"data": 7}}),
    );
    assert!(given(&from_tab(&mut m, 2, subscribe("b", query))).is_empty());
}

#[test]
fn an_operation_whose_tabs_left_lingers_and_a_reloaded_tab_reattaches() {
    let mut m = session(Subprotocol::TransportWs, Share::Events, 1);
    let query = "subscription { ticks }";
    let up = upstream(&from_tab(&mut m, 1, subscribe("a", query)));
    let id = up[0]["id"].as_str().unwrap().to_string();
    let left = Instant::now();
    m.tab_left(t(1), 1001, left, &mut Vec::new());
    assert_eq!(m.next_deadline(), Some(left + Duration::from_secs(10)));
    // The reloaded page (a new tab) subscribes again: it reattaches.
    join(&mut m, 2, json!({"token": "a"}), &mut Vec::new());
    let out = from_tab(&mut m, 2, subscribe("x", query));
    assert!(upstream(&out).is_empty(), "{out:?}");
    // Left again, and the linger passes: completed upstream.
    m.tab_left(t(2), 1001, left, &mut Vec::new());
    let mut out = Vec::new();
    m.on_timeout(left + Duration::from_secs(9), &mut out);
    assert!(out.is_empty(), "not before its linger");
    m.on_timeout(left + Duration::from_secs(10), &mut out);
    assert_eq!(upstream(&out), [json!({"id": id, "type": "complete"})]);
    assert_eq!(m.next_deadline(), None);
}

#[test]
fn pings_are_answered_here_and_upstream_pings_never_reach_a_tab() {
    let mut m = session(Subprotocol::TransportWs, Share::Off, 1);
    let out = from_tab(&mut m, 1, json!({"type": "ping", "payload": {"n": 1}}));
    assert_eq!(
        given(&out),
        [(1, json!({"type": "pong", "payload": {"n": 1}}))]
    );
    assert!(out.contains(&Effect::Avoided(Saving::Ping)));
    assert!(upstream(&out).is_empty());
    let out = from_upstream(&mut m, json!({"type": "ping"}));
    assert_eq!(upstream(&out), [json!({"type": "pong"})]);
    assert!(given(&out).is_empty());
    assert!(from_tab(&mut m, 1, json!({"type": "pong"})).is_empty());
}

#[test]
fn protocol_errors_close_only_the_tab_that_made_them() {
    let mut m = session(Subprotocol::TransportWs, Share::Off, 2);
    from_tab(&mut m, 1, subscribe("1", "subscription { a }"));
    let cases = [
        (subscribe("1", "subscription { a }"), 4409, "Subscriber for 1 already exists"),
        (json!({"type": "connection_init"}), 4429, "Too many initialisation requests"),
        (json!({"type": "bogus"}), 4400, "Invalid message 'type' property \"bogus\""),
        (json!({"id": 5, "type": "subscribe", "payload": {"query": "{a}"}}), 4400, "\"subscribe\" message expects the 'id' property to be a string"),
        (json!({"id": "", "type": "subscribe", "payload": {"query": "{a}"}}), 4400, "\"subscribe\" message requires a non-empty 'id' property"),
        (json!({"id": "2", "type": "subscribe", "payload": {"query": 1}}), 4400, "\"subscribe\" message payload expects the 'query' property to be a string"),
        (json!({"id": "2", "type": "subscribe", "payload": {"query": "{a}", "variables": 3}}), 4400, "\"subscribe\" message payload expects the 'variables' property to be an object or nullish or missing"),
    ];
    for (frame, code, reason) in cases {
        let out = from_tab(&mut m, 1, frame.clone());
        assert_eq!(closes(&out), [(1, code, reason.to_string())], "{frame}");
        assert!(upstream(&out).is_empty());
    }
    let mut out = Vec::new();
    m.tab_sent(t(1), Message::text("not json"), Instant::now, &mut out)
        .unwrap();
    assert_eq!(closes(&out)[0].1, 4400);
    // Before its ack, a tab's subscribe is 4401.
    let mut m = Graphql::new(Subprotocol::TransportWs, Share::Off, Duration::ZERO);
    join(&mut m, 1, json!(null), &mut Vec::new());
    let out = from_tab(&mut m, 1, subscribe("1", "{ a }"));
    assert_eq!(closes(&out), [(1, 4401, "Unauthorized".to_string())]);
}

#[test]
fn the_legacy_subprotocol_answers_errors_and_terminate_closes_the_tab() {
    let mut m = session(Subprotocol::Legacy, Share::Events, 2);
    // `start`/`data`/`stop`, shared as on the other subprotocol.
    let start =
        |id: &str| json!({"id": id, "type": "start", "payload": {"query": "subscription { t }"}});
    let up = upstream(&from_tab(&mut m, 1, start("1")));
    assert_eq!(up[0]["type"], "start");
    assert!(upstream(&from_tab(&mut m, 2, start("7"))).is_empty());
    let id = up[0]["id"].as_str().unwrap();
    let out = from_upstream(
        &mut m,
        json!({"id": id, "type": "data", "payload": {"data": 1}}),
    );
    assert_eq!(
        given(&out),
        [
            (
                1,
                json!({"id": "1", "type": "data", "payload": {"data": 1}})
            ),
            (
                2,
                json!({"id": "7", "type": "data", "payload": {"data": 1}})
            ),
        ]
    );
    // `ka` reaches every tab.
    let out = from_upstream(&mut m, json!({"type": "ka"}));
    assert!(matches!(
        &out[..],
        [Effect::Deliver {
            to: Target::All,
            ..
        }]
    ));
    // A frame it refuses: an `error` for the operation, no close.
    let out = from_tab(&mut m, 1, json!({"id": "9", "type": "bogus"}));
    assert!(closes(&out).is_empty());
    assert_eq!(given(&out)[0].1["type"], "error");
    assert_eq!(given(&out)[0].1["id"], "9");
    // `stop` from both: `stop` upstream once.
    assert!(upstream(&from_tab(&mut m, 1, json!({"id": "1", "type": "stop"}))).is_empty());
    let out = from_tab(&mut m, 2, json!({"id": "7", "type": "stop"}));
    assert_eq!(upstream(&out), [json!({"id": id, "type": "stop"})]);
    let out = from_tab(&mut m, 1, json!({"type": "connection_terminate"}));
    assert_eq!(closes(&out)[0].1, 1000);
}

#[test]
fn an_error_or_complete_from_the_upstream_ends_the_operation_for_every_tab() {
    let mut m = session(Subprotocol::TransportWs, Share::Events, 2);
    let query = "subscription { ticks }";
    let up = upstream(&from_tab(&mut m, 1, subscribe("a", query)));
    from_tab(&mut m, 2, subscribe("b", query));
    let id = up[0]["id"].as_str().unwrap();
    let out = from_upstream(
        &mut m,
        json!({"id": id, "type": "error", "payload": [{"message": "no"}]}),
    );
    assert_eq!(given(&out).len(), 2);
    // A later identical subscription starts a new one.
    let again = upstream(&from_tab(&mut m, 1, subscribe("c", query)));
    assert_eq!(again.len(), 1);
    assert_ne!(again[0]["id"], json!(id));
    // Tab 2's id "b" is free again (no 4409).
    assert!(closes(&from_tab(&mut m, 2, subscribe("b", "query { x }"))).is_empty());
}

#[test]
fn a_tab_s_and_a_session_s_operations_are_limited() {
    let mut m = session(Subprotocol::TransportWs, Share::Off, 1);
    for n in 0..MAX_TAB_OPERATIONS {
        let out = from_tab(&mut m, 1, subscribe(&n.to_string(), "subscription { a }"));
        assert!(closes(&out).is_empty());
    }
    let out = from_tab(&mut m, 1, subscribe("x", "subscription { a }"));
    assert_eq!(closes(&out)[0].1, 4400);
    assert!(closes(&out)[0].2.contains("256"), "{out:?}");
    let mut m = session(Subprotocol::TransportWs, Share::Off, 5);
    for n in 0..MAX_OPERATIONS {
        let tab = 1 + (n / MAX_TAB_OPERATIONS) as u64;
        from_tab(&mut m, tab, subscribe(&n.to_string(), "subscription { a }"));
    }
    let out = from_tab(&mut m, 5, subscribe("x", "subscription { a }"));
    assert!(closes(&out)[0].2.contains("1024"), "{out:?}");
}

#[test]
fn the_upstream_s_loss_closes_every_tab_with_1012_or_its_code_from_4000() {
    use crate::cause::Closing;
    let m = session(Subprotocol::TransportWs, Share::Off, 1);
    assert_eq!(m.upstream_lost(&Lost::Silent).code(), 1012);
    assert_eq!(
        m.upstream_lost(&Lost::Closed(Some(Closing::code(1011))))
            .code(),
        1012
    );
    let forbidden = Closing {
        code: 4403,
        reason: "Forbidden".into(),
    };
    let cause = m.upstream_lost(&Lost::Closed(Some(forbidden)));
    assert_eq!((cause.code(), cause.row().reason), (4403, "Forbidden"));
}

#[test]
fn what_the_session_keeps_is_counted_and_given_back() {
    let mut m = session(Subprotocol::TransportWs, Share::Live, 1);
    let before = m.held();
    let query = "subscription { count }";
    let up = upstream(&from_tab(&mut m, 1, subscribe("a", query)));
    let id = up[0]["id"].as_str().unwrap();
    let big = "x".repeat(10_000);
    from_upstream(
        &mut m,
        json!({"id": id, "type": "next", "payload": {"data": big}}),
    );
    assert!(m.held() >= before + 10_000, "{before} → {}", m.held());
    from_tab(&mut m, 1, json!({"id": "a", "type": "complete"}));
    assert_eq!(m.held(), before);
}

#[test]
fn a_subscription_is_told_from_a_query_by_parsing_it() {
    let mut m = session(Subprotocol::TransportWs, Share::Events, 2);
    // A query whose text mentions "subscription" is not one: not shared.
    let q = "query Q { search(text: \"subscription\") }";
    assert_eq!(upstream(&from_tab(&mut m, 1, subscribe("1", q))).len(), 1);
    assert_eq!(upstream(&from_tab(&mut m, 2, subscribe("1", q))).len(), 1);
    // The operation picked by name.
    let doc = "query A { a } subscription B { b }";
    let named = |id: &str| json!({"id": id, "type": "subscribe", "payload": {"query": doc, "operationName": "B"}});
    assert_eq!(upstream(&from_tab(&mut m, 1, named("2"))).len(), 1);
    assert!(upstream(&from_tab(&mut m, 2, named("2"))).is_empty());
}

#[test]
fn a_legacy_server_that_refuses_the_init_closes_the_waiting_tabs_with_its_code() {
    use crate::cause::Closing;
    let mut m = Graphql::new(Subprotocol::Legacy, Share::Off, Duration::ZERO);
    join(&mut m, 1, json!({"token": "bad"}), &mut Vec::new());
    let out = from_upstream(
        &mut m,
        json!({"type": "connection_error", "payload": {"message": "Forbidden"}}),
    );
    assert_eq!(given(&out)[0].1["type"], "connection_error");
    let closing = Closing {
        code: 1011,
        reason: String::new(),
    };
    assert_eq!(m.upstream_lost(&Lost::Closed(Some(closing))).code(), 1011);
}

#[test]
fn a_close_reason_that_quotes_the_tab_fits_a_close_frame() {
    let mut m = session(Subprotocol::TransportWs, Share::Off, 1);
    let long = "é".repeat(200);
    from_tab(&mut m, 1, subscribe(&long, "subscription { a }"));
    let out = from_tab(&mut m, 1, subscribe(&long, "subscription { a }"));
    let (_, code, reason) = &closes(&out)[0];
    assert_eq!(*code, 4409);
    assert!(
        reason.len() <= 123 && reason.starts_with("Subscriber for é"),
        "{reason}"
    );
}
