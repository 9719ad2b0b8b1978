//! The edge against a hostile client, through the real binary: a cookie
//! given twice, the admin listener asked for by another name, secrets in
//! upstream URLs, handshakes that hold descriptors, and a tab that sends
//! more than its share.

mod common;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// The log the spawned binary wrote (beside its configuration file).
fn child_log(config: &std::path::Path) -> String {
    std::fs::read_to_string(config.with_file_name("log.txt")).unwrap_or_default()
}

/// Opens `n` connections from `from`, each sending half a request head
/// and nothing more; returns them (held open).
async fn half_sent_heads(addr: std::net::SocketAddr, from: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::new(from.parse().unwrap(), 0))
            .unwrap();
        let Ok(mut s) = socket.connect(addr).await else {
            continue;
        };
        let _ = s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await;
        held.push(s);
    }
    held
}

/// 1,100 half-sent request heads from one address, at an open-file limit
/// of 1,024: handshakes count against `per_ip.tabs` (1,000), so the rest
/// are refused at accept with a 429 naming the limit, the process keeps
/// descriptors to spare, and a real tab from another address is admitted
/// while the 1,100 are still held. The open-file limit is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_from_one_address_cannot_take_the_descriptors() {
    let mock = Mock::behaving(echo()).await;
    let (mut child, proxy, config) = proxy()
        .open_files(1024)
        .handshake_timeout("60s")
        .route(route("/ws", &mock))
        .spawn_file();
    let mut held = half_sent_heads(proxy.addr, "127.0.0.1", 1100).await;
    guard("the connections past per_ip.tabs to be refused", async {
        loop {
            let text = admin_get(proxy.admin, "/metrics").await.1;
            let refused = metric(
                &text,
                r#"tabmux_admissions_refused_total{route="",reason="per_ip_tabs"}"#,
            );
            if refused >= Some(100.0) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    // One of the refused ones got the answer that names the limit.
    let mut answers = 0;
    for s in held.iter_mut().rev().take(50) {
        let mut buf = vec![0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(1), s.read(&mut buf)).await
        {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if n > 0 {
                assert!(text.starts_with("HTTP/1.1 429"), "{text}");
                assert!(text.contains("per_ip.tabs"), "{text}");
                answers += 1;
            }
        }
    }
    assert!(answers > 0, "a refused connection was told why");
    let mut tab = TabSpec::new("real").from("127.0.0.2").connect(&proxy).await;
    tab.send_text("\"still served\"").await;
    assert_eq!(tab.recv_text().await, "\"still served\"");
    let log = child_log(&config);
    assert!(
        log.contains("open-file limit: 1024 found, 1024 set"),
        "the limits are logged: {log}"
    );
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

/// A process out of descriptors (a flood from many addresses, at a small
/// open-file limit) keeps serving the tabs it has; once the flood is gone
/// it accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_connected_tabs_go_on() {
    let mock = Mock::behaving(echo()).await;
    let (mut child, proxy, config) = proxy()
        .open_files(64)
        .handshake_timeout("60s")
        .route(route("/ws", &mock))
        .spawn_file();
    let mut tab = TabSpec::new("before").connect(&proxy).await;
    let mut flood = Vec::new();
    for n in 2..6 {
        flood.extend(half_sent_heads(proxy.addr, &format!("127.0.0.{n}"), 40).await);
    }
    // Accepts fail (EMFILE) once the descriptors are gone.
    guard("accepts to fail at the open-file limit", async {
        while !child_log(&config).contains("accept failed") {
            tokio::task::yield_now().await;
        }
    })
    .await;
    for n in 0..5 {
        let text = format!("\"{n}\"");
        tab.send_text(&text).await;
        assert_eq!(tab.recv_text().await, text, "the connected tab goes on");
    }
    drop(flood);
    // The proxy frees the flood's descriptors as it reads their ends; until
    // then a new tab may be accepted while its upstream dial still finds no
    // descriptor (502). Once they are free, tabs are served again.
    let spec = TabSpec::new("after");
    let mut after = guard("a tab to be served once the flood is gone", async {
        loop {
            match spec.try_connect(&proxy).await {
                Ok(tab) => break tab,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    after.send_text("\"back\"").await;
    assert_eq!(after.recv_text().await, "\"back\"");
    let _ = child.kill();
    let _ = child.wait();
}

/// One deadline covers the PROXY header and the request head: a header
/// sent late and a head dribbled a byte at a time do not get a timeout
/// each. In paused time: closed 2 s after the connection, not 2 s after
/// the PROXY header.
#[tokio::test(start_paused = true)]
async fn one_deadline_covers_the_proxy_header_and_the_request_head() {
    use std::time::Duration;
    let mock = Mock::start().await;
    let proxy = proxy()
        .handshake_timeout("2s")
        .server("proxy_protocol", true)
        .route(route("/ws", &mock))
        .start()
        .await;
    let start = tokio::time::Instant::now();
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = s.into_split();
    let closed = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = read.read_to_end(&mut buf).await;
        tokio::time::Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(1800)).await; // paused clock: no real wait
    write
        .write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\n")
        .await
        .unwrap();
    let head = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    for byte in head {
        if closed.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // paused clock
        let _ = write.write_all(&[*byte]).await;
    }
    let closed_at = closed.await.unwrap();
    let took = closed_at - start;
    assert!(
        took <= Duration::from_millis(2100),
        "closed {took:?} after connecting, under a 2 s handshake_timeout"
    );
}

/// `server.tab_rate`: a tab that floods its session is not read past its
/// rate (TCP pushes back on it, so the backend gets far less than it
/// wrote), its sibling tab of the same session is served meanwhile, and it
/// is closed with 1008 `rate limit` once the excess has lasted longer
/// than `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_past_its_rate_is_held_back_then_closed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mock = Mock::start().await;
    let up = mock.upstream(0);
    let (mut child, proxy) = proxy()
        .server("tab_rate", Raw(r#"{ messages = 20, bytes = "1MiB" }"#))
        .route(
            route("/ws", &mock)
                .ping_interval("500ms")
                .idle_timeout("1s"),
        )
        .spawn();
    let (mut calm, calm_id) = up.join(&proxy, &TabSpec::new("shared")).await;
    let mut flood = common::raw::raw_tab(proxy.addr, "shared").await;
    let flood_id = up.nth_open(1).await["tab"].as_str().unwrap().to_string();
    let written = Arc::new(AtomicUsize::new(0));
    let count = written.clone();
    let frame = common::raw::frame(true, 0x1, b"{\"flood\":1}", true);
    let flood_socket = &mut flood;
    let writer = async move {
        // Until the proxy closes it: its socket fills once it is not read.
        while flood_socket.write_all(&frame).await.is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    };
    let checks = async {
        // The sibling is served while the flood goes on.
        guard("the flood to fill the socket", async {
            while written.load(Ordering::Relaxed) < 500 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        up.send_json(json!({"tab": calm_id, "data": "still here"}));
        assert_eq!(calm.recv_text().await, "\"still here\"");
        calm.send_text("\"calm\"").await;
        up.find("the calm tab's message", |v| v["data"] == "calm")
            .await;
        guard("the rate-limit close", async {
            while reason_count(&proxy, "tabmux_tab_closes_total", "rate_limit").await != Some(1.0) {
                tokio::task::yield_now().await;
            }
        })
        .await;
    };
    tokio::select! {
        () = writer => {
            // The connection ended: the checks must still hold.
        }
        () = checks => {}
    }
    guard("the rate-limit close", async {
        while reason_count(&proxy, "tabmux_tab_closes_total", "rate_limit").await != Some(1.0) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let got = up.now(|c| {
        c.frames
            .iter()
            .map(to_json)
            .filter(|v| v["tab"] == flood_id.as_str() && v.get("data").is_some())
            .count()
    });
    let sent = written.load(Ordering::Relaxed);
    let got = got.unwrap_or(0);
    assert!(
        got * 4 < sent,
        "the backend got {got} of the {sent} messages written: the rest waited in the socket"
    );
    // Its close event says why.
    let close = up
        .find("the flooder's close event", |v| {
            v["tab"] == flood_id.as_str() && v["event"] == "close"
        })
        .await;
    assert_eq!(close["code"], 1008);
    let code = common::raw::close_or_reset(&mut flood).await;
    assert!(matches!(code, None | Some(1008)), "{code:?}");
    calm.send_text("\"after\"").await;
    up.find("the calm tab after", |v| v["data"] == "after")
        .await;
    let _ = child.kill();
    let _ = child.wait();
}

/// `server.per_ip.rate`: the tabs of one client address share one
/// allowance, whatever their sessions, so opening more tabs buys no more;
/// a tab from another address is not held back by theirs; and what the
/// address's tabs sent beyond it is read later, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_s_tabs_share_one_rate_and_other_addresses_are_not_held() {
    let mock = Mock::start().await;
    let (mut child, proxy) = proxy()
        .server(
            "per_ip",
            Raw(r#"{ tabs = 100, sessions = 100, rate = { messages = 20, bytes = "1MiB" } }"#),
        )
        .route(route("/ws", &mock))
        .spawn();
    // Two sessions from 127.0.0.2 (two session tasks), one from 127.0.0.1.
    let (mut a, _) = mock
        .upstream(0)
        .join(&proxy, &TabSpec::new("att-a").from("127.0.0.2"))
        .await;
    let (mut b, _) = mock
        .upstream(1)
        .join(&proxy, &TabSpec::new("att-b").from("127.0.0.2"))
        .await;
    let calm_up = mock.upstream(2);
    let (mut calm, _) = calm_up.join(&proxy, &TabSpec::new("calm")).await;
    let data = |up: &Upstream| up.now(|c| data_frames(c)).unwrap_or(0);
    let start = std::time::Instant::now();
    for i in 0..30 {
        a.send_text(&format!("{i}")).await;
        b.send_text(&format!("{i}")).await;
    }
    for i in 0..30 {
        calm.send_text(&format!("{i}")).await;
    }
    calm_up
        .wait("the calm tab's 30 messages", |c| {
            (data_frames(c) == 30).then_some(())
        })
        .await;
    // By then the address has had its burst (2 s of 20 a second) and what
    // came back since: not the 60 its two tabs sent.
    let elapsed = start.elapsed().as_secs_f64();
    let got = data(&mock.upstream(0)) + data(&mock.upstream(1));
    // (A message is read while anything is left, so each of the two tabs
    // may take one past the allowance.)
    let allowed = 40.0 + 20.0 * elapsed + 2.0;
    assert!(
        (got as f64) <= allowed,
        "{got} of the address's messages read in {elapsed:.2} s: at most {allowed:.0} allowed"
    );
    // The rest is read as the allowance comes back: nothing is lost, and
    // neither tab is closed for it.
    for n in [0, 1] {
        mock.upstream(n)
            .wait("all 30 of the held tab's messages", |c| {
                (data_frames(c) == 30).then_some(())
            })
            .await;
    }
    let closed = |up: &Upstream| {
        up.now(|c| c.frames.iter().map(to_json).any(|v| v["event"] == "close"))
            .unwrap_or(false)
    };
    assert!(!closed(&mock.upstream(0)) && !closed(&mock.upstream(1)));
    let _ = child.kill();
    let _ = child.wait();
}

/// The `data` frames an upstream connection got.
fn data_frames(c: &Conn) -> usize {
    c.frames
        .iter()
        .map(to_json)
        .filter(|v| v.get("data").is_some())
        .count()
}
