//! PROTOCOL.md, envelope `json`: one test (or more) per table row.

mod common;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn open_event_carries_tab_id_and_raw_query() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let _tab = TabSpec::new("s1")
        .path("/ws?room=5&x=%20y")
        .connect(&proxy)
        .await;
    let frames = up.json(1).await;
    assert_eq!(
        frames[0],
        json!({"tab":"t1","event":"open","query":"room=5&x=%20y"})
    );
    // forward_query (the default) passes the query to the upstream too.
    assert_eq!(up.path().await, "/backend?room=5&x=%20y");
}

#[tokio::test]
async fn open_event_query_is_empty_without_one_and_sent_when_not_forwarded() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).forward_query(false))
        .start()
        .await;
    let _a = TabSpec::new("s1").connect(&proxy).await;
    let _b = TabSpec::new("s1").path("/ws?room=9").connect(&proxy).await;
    let frames = up.json(2).await;
    assert_eq!(frames[0]["query"], "");
    // Not forwarded: the query is not part of the session key, so both tabs
    // share one upstream, but the open event still carries it.
    assert_eq!(
        frames[1],
        json!({"tab":"t2","event":"open","query":"room=9"})
    );
    assert_eq!(mock.connections(), 1);
    assert_eq!(up.path().await, "/backend");
}

#[tokio::test]
async fn open_event_includes_selected_headers() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).open_event_headers(&["accept-language", "x-absent"]))
        .start()
        .await;
    let _tab = TabSpec::new("s1")
        .header("accept-language", "fr-CH")
        .connect(&proxy)
        .await;
    let frames = up.json(1).await;
    assert_eq!(
        frames[0],
        json!({"tab":"t1","event":"open","query":"","headers":{"accept-language":"fr-CH"}})
    );
}

#[tokio::test]
async fn tab_text_is_embedded_byte_for_byte() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s1")).await;
    let payload = r#"{ "n" : 1.50, "s":"\u00e9" }"#;
    tab.send_text(payload).await;
    let frames = up.frames(2).await;
    let Message::Text(raw) = &frames[1] else {
        panic!()
    };
    assert_eq!(
        raw.as_str(),
        format!(r#"{{"tab":"{id}","data":{payload}}}"#)
    );
}

#[tokio::test]
async fn tab_binary_becomes_data_b64() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s1")).await;
    tab.send_binary(&[0, 1, 2, 250, 255]).await;
    let frames = up.json(2).await;
    assert_eq!(frames[1], json!({"tab": id, "data_b64": "AAEC+v8="}));
}

#[tokio::test]
async fn payload_text_wraps_tab_text_as_a_string_and_unwraps_replies() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).payload("text"))
        .start()
        .await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s1")).await;
    tab.send_text("not json, \"quoted\"").await;
    let frames = up.json(2).await;
    assert_eq!(
        frames[1],
        json!({"tab": id, "data": "not json, \"quoted\""})
    );
    up.send_json(json!({"tab": id, "data": "plain \"text\"\n"}));
    assert_eq!(tab.recv_text().await, "plain \"text\"\n");
    // A non-string payload is delivered as its JSON text.
    up.send_json(json!({"tab": id, "data": {"k": [1]}}));
    assert_eq!(tab.recv_text().await, r#"{"k":[1]}"#);
}

#[tokio::test]
async fn invalid_json_from_a_tab_closes_it_with_1007_and_the_session_goes_on() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let (mut bad, bad_id) = up.join(&proxy, &TabSpec::new("s1")).await;
    let (mut good, good_id) = up.join(&proxy, &TabSpec::new("s1")).await;
    bad.send_text("{not json").await;
    assert_eq!(bad.closed().await.0, 1007);
    let close = up
        .find("close event for the bad tab", |v| v["event"] == "close")
        .await;
    assert_eq!(
        close,
        json!({"tab": bad_id, "event": "close", "code": 1007})
    );
    good.send_text("[1]").await;
    up.find("the good tab's message", |v| v["data"] == json!([1]))
        .await;
    up.send_json(json!({"tab": good_id, "data": "still here"}));
    assert_eq!(good.recv_text().await, "\"still here\"");
}

#[tokio::test]
async fn close_event_codes_follow_how_the_tab_left() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let spec = TabSpec::new("s1");
    let (a, a_id) = up.join(&proxy, &spec).await;
    let (b, b_id) = up.join(&proxy, &spec).await;
    let (mut c, c_id) = up.join(&proxy, &spec).await;
    let (d, d_id) = up.join(&proxy, &spec).await;

    a.close(4100).await;
    // A close frame with no code is reported as 1005.
    {
        let mut b = b;
        let _ = futures_util::SinkExt::send(&mut b.ws, Message::Close(None)).await;
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut b.ws).await {}
    }
    // Vanishing without a close frame is 1006.
    drop(d);
    let closes = mock
        .wait("three close events", |c| {
            let v: Vec<_> = c[0]
                .frames
                .iter()
                .map(to_json)
                .filter(|v| v["event"] == "close")
                .collect();
            (v.len() == 3).then_some(v)
        })
        .await;
    let code_of = |id: &str| {
        closes
            .iter()
            .find(|v| v["tab"] == id)
            .map(|v| v["code"].as_u64().unwrap())
    };
    assert_eq!(code_of(&a_id), Some(4100));
    assert_eq!(code_of(&b_id), Some(1005));
    assert_eq!(code_of(&d_id), Some(1006));
    // The backend asks for a close: the tab sees the backend's code and
    // reason, and the close event carries that code.
    up.send_json(json!({"tab": c_id, "event": "close", "code": 4001, "reason": "kicked"}));
    assert_eq!(c.closed().await, (4001, "kicked".to_string()));
    let close = up
        .find("close event for c", |v| {
            v["event"] == "close" && v["tab"] == c_id.as_str()
        })
        .await;
    assert_eq!(close["code"], 4001);
}

#[tokio::test]
async fn unicast_multicast_and_broadcast() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let spec = TabSpec::new("s1");
    let (mut a, a_id) = up.join(&proxy, &spec).await;
    let (mut b, b_id) = up.join(&proxy, &spec).await;
    let (mut c, _c_id) = up.join(&proxy, &spec).await;

    up.send_json(json!({"tab": a_id, "data": {"to": "a"}}));
    up.send_json(json!({"tab": [a_id, b_id], "data": {"to": "ab"}}));
    up.send_json(json!({"data": {"to": "all"}}));
    // Raw JSON text of P, byte for byte as the backend wrote it.
    up.send(Message::text(format!(
        r#"{{"tab":"{b_id}","data": [1, 2 ,3]}}"#
    )));

    assert_eq!(a.recv_text().await, r#"{"to":"a"}"#);
    assert_eq!(a.recv_text().await, r#"{"to":"ab"}"#);
    assert_eq!(a.recv_text().await, r#"{"to":"all"}"#);
    assert_eq!(b.recv_text().await, r#"{"to":"ab"}"#);
    assert_eq!(b.recv_text().await, r#"{"to":"all"}"#);
    assert_eq!(b.recv_text().await, "[1, 2 ,3]");
    // c got only the broadcast: the next thing it sees after it is a marker.
    assert_eq!(c.recv_text().await, r#"{"to":"all"}"#);
    up.send_json(json!({"data": "marker"}));
    assert_eq!(c.recv_text().await, "\"marker\"");
}

#[tokio::test]
async fn binary_delivery_from_data_b64() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let spec = TabSpec::new("s1");
    let (mut a, a_id) = up.join(&proxy, &spec).await;
    let (mut b, _) = up.join(&proxy, &spec).await;
    up.send_json(json!({"tab": a_id, "data_b64": "AAEC+v8="}));
    up.send_json(json!({"data_b64": "aGk="}));
    assert_eq!(a.recv().await, Message::binary(vec![0, 1, 2, 250, 255]));
    assert_eq!(a.recv().await, Message::binary(b"hi".to_vec()));
    assert_eq!(b.recv().await, Message::binary(b"hi".to_vec()));
}

#[tokio::test]
async fn malformed_backend_frames_are_dropped_counted_and_the_session_goes_on() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s1")).await;
    for bad in [
        "not json",
        "[1,2]",
        r#"{"tab":"t1"}"#,
        r#"{"tab":"bad id!","data":1}"#,
        r#"{"tab":"t1","event":"explode"}"#,
    ] {
        up.send(Message::text(bad));
    }
    up.send(Message::binary(b"binary is not the envelope".to_vec()));
    up.send_json(json!({"tab": id, "data": "after", "extra_field": 1}));
    // Nothing malformed reached the tab; the good frame did.
    assert_eq!(tab.recv_text().await, "\"after\"");
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    let dropped: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("tabmux_frames_dropped_total{") && !l.contains("unroutable"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(dropped, 6.0, "{scrape}");
    assert_eq!(
        metric(
            &scrape,
            r#"tabmux_frames_dropped_total{route="/ws",reason="not_json"}"#
        ),
        Some(1.0)
    );
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn frames_for_tabs_that_left_are_dropped_and_counted() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let spec = TabSpec::new("s1");
    let (gone, gone_id) = up.join(&proxy, &spec).await;
    let (mut stays, stays_id) = up.join(&proxy, &spec).await;
    gone.close(1000).await;
    up.find("close event", |v| v["event"] == "close").await;
    up.send_json(json!({"tab": [gone_id, stays_id, "t999", "other-id"], "data": 1}));
    assert_eq!(stays.recv_text().await, "1");
    let (_, scrape) = admin_get(proxy.admin, "/metrics").await;
    assert_eq!(
        metric(
            &scrape,
            r#"tabmux_frames_dropped_total{route="/ws",reason="unroutable"}"#
        ),
        Some(3.0),
        "{scrape}"
    );
}

#[tokio::test]
async fn oversized_upstream_payload_closes_its_tabs_with_1009_and_upstream_stays() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).max_message_size(100))
        .start()
        .await;
    let spec = TabSpec::new("s1");
    let (mut big, big_id) = up.join(&proxy, &spec).await;
    let (mut other, other_id) = up.join(&proxy, &spec).await;
    up.send_json(json!({"tab": big_id, "data": "x".repeat(200)}));
    assert_eq!(big.closed().await.0, 1009);
    let close = up.find("close event", |v| v["event"] == "close").await;
    assert_eq!(
        close,
        json!({"tab": big_id, "event": "close", "code": 1009})
    );
    // The upstream is still up and serving the other tab.
    up.send_json(json!({"tab": other_id, "data": "ok"}));
    assert_eq!(other.recv_text().await, "\"ok\"");
    // A broadcast that is too big closes every tab.
    up.send_json(json!({"data_b64": base64_of(&[7u8; 150])}));
    assert_eq!(other.closed().await.0, 1009);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn oversized_tab_message_closes_that_tab_with_1009() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).max_message_size(100))
        .start()
        .await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s1")).await;
    tab.send_text(&format!("\"{}\"", "y".repeat(200))).await;
    assert_eq!(tab.closed().await.0, 1009);
    let close = up.find("close event", |v| v["event"] == "close").await;
    assert_eq!(close, json!({"tab": id, "event": "close", "code": 1009}));
}

#[tokio::test]
async fn a_tab_cannot_pose_as_another_tab() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let spec = TabSpec::new("s1");
    let (mut attacker, attacker_id) = up.join(&proxy, &spec).await;
    let (_victim, victim_id) = up.join(&proxy, &spec).await;
    let spoof = format!(r#"{{"tab":"{victim_id}","data":"forged","event":"close"}}"#);
    attacker.send_text(&spoof).await;
    let frames = up.json(3).await;
    // The whole spoof is payload, attributed to the attacker.
    assert_eq!(frames[2]["tab"], attacker_id.as_str());
    assert_eq!(
        frames[2]["data"],
        serde_json::from_str::<serde_json::Value>(&spoof).unwrap()
    );
    assert_eq!(frames[2].as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn per_tab_order_is_kept_both_ways() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let (mut tab, id) = up.join(&proxy, &TabSpec::new("s1")).await;
    for i in 0..200 {
        tab.send_text(&i.to_string()).await;
    }
    let frames = up.json(201).await;
    let got: Vec<u64> = frames[1..]
        .iter()
        .map(|v| v["data"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
    for i in 0..200 {
        up.send_json(json!({"tab": id, "data": i}));
    }
    for i in 0..200 {
        assert_eq!(tab.recv_text().await, i.to_string());
    }
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A backend that answers every `open` event at once with a `close` for
/// that tab (say, an authorisation check). The close can reach tabmux
/// before the tab's connection has been handed to its session, after the
/// 101; the tab must still get the backend's code, and the backend one
/// `close` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_closed_by_the_backend_on_its_open_event_gets_the_code() {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(Message::Text(t))) = ws.next().await {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["event"] == "open" {
                let close =
                    json!({"tab": v["tab"], "event": "close", "code": 4003, "reason": "no"});
                ws.send(Message::text(close.to_string())).await.unwrap();
            }
            let _ = events_tx.send(v);
        }
    });
    let proxy = proxy().route(route_to("/ws", addr)).start().await;
    // On two threads the close overtakes the hand-over now and then
    // (a few times in 50 tabs, measured).
    const TABS: usize = 50;
    for n in 1..=TABS {
        let mut tab = TabSpec::new("s1").connect(&proxy).await;
        assert_eq!(tab.closed().await, (4003, "no".to_string()), "tab {n}");
    }
    // Each tab: its open event, then exactly one close event with the code.
    for n in 1..=TABS {
        let id = format!("t{n}");
        let open = guard("open event", events.recv()).await.unwrap();
        assert_eq!(open, json!({"tab": id, "event": "open", "query": ""}));
        let close = guard("close event", events.recv()).await.unwrap();
        assert_eq!(close, json!({"tab": id, "event": "close", "code": 4003}));
    }
}
