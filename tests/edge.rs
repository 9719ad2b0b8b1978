//! The edge against a hostile client, through the real binary: a cookie
//! given twice, the admin listener asked for by another name, secrets in
//! upstream URLs, handshakes that hold descriptors, and a tab that sends
//! more than its share.

mod common;

use common::*;
use serde_json::json;

/// The upstream connection whose handshake carried exactly this Cookie.
async fn upstream_with_cookie(mock: &Mock, cookie: &str) -> Upstream {
    let n = mock
        .wait(&format!("an upstream with Cookie: {cookie}"), |c| {
            c.iter()
                .position(|c| c.headers.get("cookie").is_some_and(|v| v == cookie))
        })
        .await;
    mock.upstream(n)
}

/// `Cookie: sessionid=ATT; sessionid=VIC` (a sibling subdomain planted the
/// second) opens a session of its own, and the upstream is sent both
/// values; a tab with only `sessionid=ATT` gets another upstream, and no
/// frame of one session reaches the other.
#[tokio::test]
async fn a_cookie_given_twice_never_joins_the_session_of_one_of_its_values() {
    let mock = Mock::start().await;
    let (mut child, proxy) = proxy().route(route("/ws", &mock)).spawn();
    let pair = "sessionid=ATT; sessionid=VIC";
    let mut both = TabSpec::new("x").cookie(Some(pair)).connect(&proxy).await;
    let up_both = upstream_with_cookie(&mock, pair).await;
    let mut att = TabSpec::new("ATT").connect(&proxy).await;
    let up_att = upstream_with_cookie(&mock, "sessionid=ATT").await;
    assert_ne!(up_both.n, up_att.n, "two sessions, two upstreams");
    up_both.send_json(json!({"data": "for the pair"}));
    assert_eq!(both.recv_text().await, "\"for the pair\"");
    up_att.send_json(json!({"data": "for ATT"}));
    assert_eq!(
        att.recv_text().await,
        "\"for ATT\"",
        "nothing of the pair's"
    );
    up_att.send_json(json!({"data": "ATT again"}));
    up_both.send_json(json!({"data": "pair again"}));
    assert_eq!(both.recv_text().await, "\"pair again\"", "nothing of ATT's");
    assert_eq!(att.recv_text().await, "\"ATT again\"");
    let _ = child.kill();
    let _ = child.wait();
}

/// DNS rebinding: a page on `evil.example`, its name pointed at the admin
/// listener's address, makes the browser send `Host: evil.example`. Only
/// addresses, `localhost`, the names in `admin.allowed_hosts` and requests
/// without Host (HTTP/1.0 health checks) are answered; the rest get 421.
#[tokio::test]
async fn the_admin_listener_answers_only_its_own_names() {
    let mock = Mock::start().await;
    let (mut child, proxy) = proxy()
        .admin("allowed_hosts", Raw(r#"["tabmux-admin.internal"]"#))
        .route(route("/ws", &mock))
        .spawn();
    let admin = proxy.admin;
    let get = |host: &str| {
        let head = if host.is_empty() {
            "GET /status.json HTTP/1.0\r\n\r\n".to_string()
        } else {
            format!("GET /status.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
        };
        async move { raw_http(admin, &head).await }
    };
    let (code, body) = get("evil.example").await;
    assert_eq!(code, 421, "{body}");
    assert!(
        body.contains("allowed_hosts"),
        "the refusal names the key: {body}"
    );
    assert_eq!(
        get(&format!("evil.example:{}", proxy.admin.port())).await.0,
        421
    );
    for ok in [
        proxy.admin.to_string(),
        "localhost".to_string(),
        "tabmux-admin.internal".to_string(),
        String::new(),
    ] {
        let (code, body) = get(&ok).await;
        assert_eq!(code, 200, "Host {ok:?}: {body}");
        assert!(body.contains("\"routes\""), "{body}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
