//! Property: for any interleaving of tabs joining and leaving several
//! sessions, backend broadcasts and unicasts, and tabs sending, every tab
//! receives exactly what a simple model says it should, so never a frame of
//! another session, and every upstream sees only its own session's tabs.

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    /// Leave the nth live tab (modulo how many there are).
    Leave(u8),
    Broadcast(u8),
    /// Unicast to the nth live tab.
    Unicast(u8),
    /// The nth live tab sends a message.
    TabSends(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3).prop_map(Op::Join),
        1 => any::<u8>().prop_map(Op::Leave),
        2 => (0u8..3).prop_map(Op::Broadcast),
        2 => any::<u8>().prop_map(Op::Unicast),
        2 => any::<u8>().prop_map(Op::TabSends),
    ]
}

/// One tab of the model.
struct ModelTab {
    session: u8,
    id: String,
    tab: LiveTab,
    /// What the backend sent that this tab must receive, in order.
    expected: Vec<String>,
    /// What it received.
    got: Vec<String>,
}

impl ModelTab {
    /// Reads until `token` arrives, recording everything received.
    async fn until(&mut self, token: &str) {
        loop {
            let text = self.tab.recv_text().await;
            let v: String = serde_json::from_str(&text).unwrap();
            let done = v == token;
            self.got.push(v);
            if done {
                return;
            }
        }
    }
}

async fn run(ops: Vec<Op>) {
    let mock = Mock::start().await;
    let proxy = proxy()
        .route(route("/ws", &mock).linger("1h"))
        .start()
        .await;
    let mut upstream_of: HashMap<u8, Upstream> = HashMap::new();
    let mut opens: HashMap<u8, usize> = HashMap::new();
    let mut live: Vec<ModelTab> = Vec::new();
    let mut sent_by_tabs: Vec<(u8, String, String)> = Vec::new();
    let mut n = 0;
    for op in ops {
        n += 1;
        match op {
            Op::Join(s) => {
                let spec = TabSpec::new(&format!("s{s}"));
                let tab = spec.connect(&proxy).await;
                let cookie = format!("sessionid=s{s}");
                let conn = mock
                    .wait("the session's upstream", |c| {
                        c.iter()
                            .position(|c| c.headers["cookie"] == cookie.as_str())
                    })
                    .await;
                let up = upstream_of.entry(s).or_insert(mock.upstream(conn));
                let nth = *opens.entry(s).and_modify(|k| *k += 1).or_insert(0);
                let open = up.nth_open(nth).await;
                live.push(ModelTab {
                    session: s,
                    id: open["tab"].as_str().unwrap().to_string(),
                    tab: tab.live(),
                    expected: Vec::new(),
                    got: Vec::new(),
                });
            }
            Op::Leave(i) if !live.is_empty() => {
                let t = live.remove(i as usize % live.len());
                let up = &upstream_of[&t.session];
                drop(t.tab);
                let id = t.id.clone();
                up.find("the close event", |v| {
                    v["event"] == "close" && v["tab"] == id.as_str()
                })
                .await;
            }
            Op::Broadcast(s) => {
                let Some(up) = upstream_of.get(&s) else {
                    continue;
                };
                // With no member to wait for, the broadcast would still be in
                // flight when the next tab joins, and could reach it: a
                // broadcast goes to the members as tabmux reads it.
                if !live.iter().any(|t| t.session == s) {
                    continue;
                }
                let token = format!("S{s}-{n}");
                up.send_json(json!({"data": token}));
                // A barrier: the broadcast reaches its tabs before the next
                // step, so the model knows exactly who was a member.
                for t in live.iter_mut().filter(|t| t.session == s) {
                    t.expected.push(token.clone());
                    t.until(&token).await;
                }
            }
            Op::Unicast(i) if !live.is_empty() => {
                let k = i as usize % live.len();
                let t = &mut live[k];
                let token = format!("S{}-{n}-to-{}", t.session, t.id);
                upstream_of[&t.session].send_json(json!({"tab": t.id, "data": token}));
                t.expected.push(token.clone());
                t.until(&token).await;
            }
            Op::TabSends(i) if !live.is_empty() => {
                let k = i as usize % live.len();
                let t = &live[k];
                let token = format!("from-S{}-{}-{n}", t.session, t.id);
                t.tab.send_text(&json!(token).to_string());
                sent_by_tabs.push((t.session, t.id.clone(), token));
            }
            _ => {}
        }
    }
    // A final marker per session closes each tab's expected stream.
    for (&s, up) in &upstream_of {
        up.send_json(json!({"data": format!("END-{s}")}));
    }
    for t in &mut live {
        let end = format!("END-{}", t.session);
        t.until(&end).await;
        t.got.pop();
        assert_eq!(t.got, t.expected, "tab {} of session s{}", t.id, t.session);
    }
    // Every tab message reached its own session's upstream, attributed to
    // the tab that sent it.
    for (s, id, token) in sent_by_tabs {
        let frame = upstream_of[&s]
            .find("a tab's message upstream", |v| v["data"] == token.as_str())
            .await;
        assert_eq!(frame["tab"], id.as_str());
        for (&other, up) in &upstream_of {
            if other != s {
                assert!(up.try_find(|v| v["data"] == token.as_str()).is_none());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_frame_crosses_sessions(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops));
    }
}
