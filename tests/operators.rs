//! What operators see: `/metrics`, `/status.json`, logs. Exact values after
//! scripted scenarios, and the session cookie nowhere.

mod common;

use common::*;
use serde_json::json;

async fn scrape(proxy: &TestProxy) -> String {
    admin_get(proxy.admin, "/metrics").await.1
}

async fn status(proxy: &TestProxy) -> serde_json::Value {
    let (code, body) = admin_get(proxy.admin, "/status.json").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

fn m(scrape: &str, name: &str) -> f64 {
    metric(scrape, &format!("{name}{{route=\"/ws\"}}"))
        .unwrap_or_else(|| panic!("no {name} in:\n{scrape}"))
}

#[tokio::test]
async fn three_sessions_of_four_tabs_and_a_broadcast() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy_for(&mock).await;
    let mut tabs = Vec::new();
    for s in 0..3 {
        for _ in 0..4 {
            tabs.push(TabSpec::new(&format!("user{s}")).connect(&proxy).await);
        }
    }
    for conn in 0..3 {
        mock.upstream(conn).json(4).await;
    }
    let text = scrape(&proxy).await;
    assert_eq!(m(&text, "tabmux_tabs_open"), 12.0);
    assert_eq!(m(&text, "tabmux_sessions_active"), 3.0);
    assert_eq!(m(&text, "tabmux_upstream_connections_open"), 3.0);
    assert_eq!(m(&text, "tabmux_upstream_connections_avoided"), 9.0);
    assert_eq!(
        metric(
            &text,
            r#"tabmux_upstream_dials_total{route="/ws",reason="ok"}"#
        ),
        Some(3.0)
    );

    // One broadcast to the four tabs of the first session.
    up.send_json(json!({"data": "hello"}));
    let cookie = up.headers().await["cookie"].clone();
    let session0: Vec<usize> = (0..12)
        .filter(|&i| cookie == format!("sessionid=user{}", i / 4).as_str())
        .collect();
    for i in session0 {
        assert_eq!(tabs[i].recv_text().await, "\"hello\"");
    }
    // A tab message upstream.
    tabs[0].send_text("[1,2]").await;
    up.find("the tab message", |v| v["data"] == json!([1, 2]))
        .await;

    let text = scrape(&proxy).await;
    assert_eq!(m(&text, "tabmux_upstream_messages_avoided_total"), 3.0);
    assert_eq!(m(&text, "tabmux_broadcast_deliveries_total"), 4.0);
    let dir = |d: &str, name: &str| {
        metric(&text, &format!("{name}{{route=\"/ws\",direction=\"{d}\"}}")).unwrap()
    };
    assert_eq!(dir("to_tabs", "tabmux_messages_total"), 4.0);
    assert_eq!(
        dir("to_tabs", "tabmux_bytes_total"),
        4.0 * "\"hello\"".len() as f64
    );
    // Every message sent upstream: the tab's (its 5 bytes of payload), and
    // the twelve `open` events the envelope composed (their whole frames).
    let (sent, opens) = mock.now(|conns| {
        let frames: Vec<_> = conns.iter().flat_map(|c| c.frames.iter()).collect();
        let opens = frames
            .iter()
            .filter(|f| f.to_text().unwrap().contains("\"open\""));
        (frames.len(), opens.map(|f| f.len()).sum::<usize>())
    });
    assert_eq!(sent, 13);
    assert_eq!(dir("to_upstream", "tabmux_messages_total"), 13.0);
    assert_eq!(dir("to_upstream", "tabmux_bytes_total"), (opens + 5) as f64);

    // The status page says the same, and names sessions by hash.
    let s = status(&proxy).await;
    assert_eq!(s["total"]["tabs"], 12);
    assert_eq!(s["total"]["sessions"], 3);
    assert_eq!(s["total"]["upstreams"], 3);
    assert_eq!(s["total"]["connections_avoided"], 9);
    assert_eq!(s["total"]["messages_avoided"], 3);
    // The limits, as the process counts them (one client address, 127.0.0.1).
    assert_eq!(s["limits"]["tabs"], 12);
    assert_eq!(s["limits"]["sessions"], 3);
    assert_eq!(s["limits"]["client_addresses"], 1);
    assert_eq!(s["limits"]["buffer_budget_bytes"], 512 << 20);
    let route = &s["routes"][0];
    assert_eq!(route["path"], "/ws");
    let top = route["top_sessions"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    for t in top {
        assert_eq!(t["tabs"], 4);
        assert_eq!(t["upstream"], "up");
        let name = t["session"].as_str().unwrap();
        assert!(
            name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
    }

    // Connection-seconds avoided accrue while 9 connections are avoided.
    guard("connection-seconds to accrue", async {
        loop {
            let secs = status(&proxy).await["total"]["connection_seconds_avoided"]
                .as_f64()
                .unwrap();
            if secs > 0.0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_tabs_per_session_histogram_counts_ended_sessions_at_their_peak() {
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let proxy = proxy()
        .route(route("/ws", &mock).linger("0s"))
        .start()
        .await;
    let a = TabSpec::new("h").connect(&proxy).await;
    let b = TabSpec::new("h").connect(&proxy).await;
    let c = TabSpec::new("h").connect(&proxy).await;
    up.json(3).await;
    for t in [a, b, c] {
        t.close(1000).await;
    }
    up.closed().await;
    let text = guard("the session to end", async {
        loop {
            let text = scrape(&proxy).await;
            if metric(&text, r#"tabmux_session_peak_tabs_count{route="/ws"}"#) == Some(1.0) {
                break text;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        metric(&text, r#"tabmux_session_peak_tabs_sum{route="/ws"}"#),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"tabmux_session_peak_tabs_bucket{le="2.0",route="/ws"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"tabmux_session_peak_tabs_bucket{le="3.0",route="/ws"}"#
        ),
        Some(1.0)
    );
    assert_eq!(m(&text, "tabmux_upstream_connections_avoided"), 0.0);
}

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let mock = Mock::start().await;
    let proxy = proxy()
        .route(route("/ws", &mock).max_tabs_per_session(1))
        .start()
        .await;
    let _a = TabSpec::new("r").connect(&proxy).await;
    TabSpec::new("r").refused(&proxy).await;
    TabSpec::new("x")
        .origin(Some("https://evil.example"))
        .refused(&proxy)
        .await;
    TabSpec::new("x").cookie(None).refused(&proxy).await;
    let text = scrape(&proxy).await;
    for reason in ["max_tabs_per_session", "origin", "cookie"] {
        assert_eq!(
            metric(
                &text,
                &format!("tabmux_admissions_refused_total{{route=\"/ws\",reason=\"{reason}\"}}")
            ),
            Some(1.0),
            "{reason}"
        );
    }
}

/// The cookie value must not appear in logs (even at debug, even in JSON),
/// metrics, or the status page.
#[tokio::test]
async fn the_session_cookie_and_upstream_query_values_appear_nowhere() {
    const SECRET: &str = "S3CR3T-COOKIE-VALUE-7f3a";
    const API_KEY: &str = "AP1-K3Y-VALUE-91c2";
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let dir = std::env::temp_dir().join(format!("tabmux-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("log.jsonl");
    let upstream = format!("ws://{}/backend?api_key={API_KEY}&v=2", mock.addr);
    let toml = proxy()
        .log("json", "trace")
        .route(route("/ws", &mock).upstream(&upstream))
        .toml();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &toml).unwrap();
    // `check` prints the routes, and quotes a bad upstream URL.
    let check = |path: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tabmux"))
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let checked = check(&path);
    assert!(checked.contains("?api_key=…&v=…"), "{checked}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, toml.replace("ws://", "http://")).unwrap();
    let refused = check(&bad);
    assert!(refused.contains("use ws://"), "{refused}");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tabmux"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(log)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The log is JSON: wait for the listener lines to learn the ports.
    let (tabs_addr, admin_addr) = guard("the listener lines", async {
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let find = |marker: &str| {
                text.lines().find_map(|l| {
                    let rest = l.split(marker).nth(1)?;
                    rest.split([' ', '"'])
                        .next()?
                        .parse::<std::net::SocketAddr>()
                        .ok()
                })
            };
            if let (Some(t), Some(a)) = (
                find("tabs: listening on ws://"),
                find("admin: listening on http://"),
            ) {
                break (t, a);
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let proxy = TestProxy::at(tabs_addr, admin_addr);
    let spec = TabSpec::new(SECRET);
    let (mut tab, _) = up.join(&proxy, &spec).await;
    tab.send_text("{not json").await; // a close with 1007, logged
    tab.closed().await;
    let (mut tab2, _) = up.join(&proxy, &spec).await;
    up.send(tokio_tungstenite::tungstenite::Message::text("garbage")); // logged at warn
    up.send_json(json!({"data": "ok"}));
    assert_eq!(tab2.recv_text().await, "\"ok\"");
    spec.clone()
        .origin(Some("https://evil.example"))
        .refused(&proxy)
        .await;
    assert_eq!(
        up.path().await,
        format!("/backend?api_key={API_KEY}&v=2"),
        "the backend gets the key"
    );
    let metrics = scrape(&proxy).await;
    let status = admin_get(proxy.admin, "/status.json").await.1;
    assert!(status.contains("?api_key=…&v=…"), "{status}");
    let page = admin_get(proxy.admin, "/").await.1;
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("malformed frame"),
        "the warn line is logged:\n{logs}"
    );
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(
        logs.contains("\"session\":\""),
        "lines carry the session hash"
    );
    let texts = [
        ("logs", &logs),
        ("metrics", &metrics),
        ("status", &status),
        ("page", &page),
        ("check", &checked),
        ("check's refusal", &refused),
    ];
    for (what, text) in texts {
        for secret in [SECRET, API_KEY] {
            assert!(
                !text.contains(secret),
                "{secret} leaked into the {what}: {}",
                text.lines()
                    .filter(|l| l.contains(secret))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn the_status_page_is_served() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    let (code, body) = admin_get(proxy.admin, "/").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("status.json") && body.contains("<svg"),
        "{body}"
    );
    assert!(body.contains("configuration loaded"), "when it was loaded");
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external resources"
    );
    let s = status(&proxy).await;
    assert!(s["history"].as_array().unwrap().len() <= 120);
}

/// The help text of the tab-closes metric names every reason tabmux closes
/// a tab with (the cause table's labels), not just some.
#[tokio::test]
async fn the_tab_closes_help_lists_every_reason() {
    let mock = Mock::start().await;
    let proxy = proxy_for(&mock).await;
    // A family shows in the scrape once it has a series: close one tab.
    let mut tab = TabSpec::new("s").connect(&proxy).await;
    tab.send_text("{not json").await;
    assert_eq!(tab.closed().await.0, 1007);
    let (status, scrape) = admin_get(proxy.admin, "/metrics").await;
    assert_eq!(status, 200);
    let help = scrape
        .lines()
        .find(|l| l.starts_with("# HELP tabmux_tab_closes "))
        .unwrap_or_else(|| panic!("no help line in:\n{scrape}"));
    for reason in tabmux::cause::Cause::PROXY_LABELS {
        assert!(help.contains(reason), "{reason} missing from: {help}");
    }
}
