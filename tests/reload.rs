//! PROTOCOL.md, "Lifetime": on SIGHUP tabmux re-reads its configuration
//! file. Routes, limits, origins, TLS certificates and the log level apply
//! to what arrives from then on; connected tabs and their sessions stay; a
//! file with problems changes nothing and each problem is logged at its
//! `file:line:column`. Through the real binary and a real signal.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use http::StatusCode;

fn hangup(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn reloads(proxy: &TestProxy, result: &str) -> f64 {
    let text = admin_get(proxy.admin, "/metrics").await.1;
    metric(
        &text,
        &format!("tabmux_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Sends SIGHUP and waits until the reload with `result` is counted.
async fn reload(child: &std::process::Child, proxy: &TestProxy, result: &str) {
    let before = reloads(proxy, result).await;
    hangup(child);
    guard("the reload", async {
        while reloads(proxy, result).await <= before {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

async fn loaded_at(proxy: &TestProxy) -> u64 {
    let body = admin_get(proxy.admin, "/status.json").await.1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["config_loaded"].as_u64().unwrap()
}

fn stop(child: Spawned) {
    // Killed and waited for on drop.
    drop(child);
}

#[tokio::test]
async fn sighup_applies_new_origins_and_limits_and_keeps_what_is_connected() {
    let mock = Mock::behaving(echo()).await;
    let before = proxy()
        .server("per_ip", Raw("{ tabs = 2, sessions = 10 }"))
        .route(route("/ws", &mock));
    let (child, proxy, path) = before.spawn_file();
    let mut kept = TabSpec::new("kept").connect(&proxy).await;
    kept.send_text("1").await;
    assert_eq!(kept.recv_text().await, "1");
    let newcomer = TabSpec::new("new").origin(Some("https://new.test"));
    assert_eq!(newcomer.refused(&proxy).await.0, StatusCode::FORBIDDEN);
    let _second = TabSpec::new("kept").connect(&proxy).await;
    let (status, body) = TabSpec::new("third").refused(&proxy).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let first_load = loaded_at(&proxy).await;

    let after = common::proxy()
        .server("per_ip", Raw("{ tabs = 3, sessions = 10 }"))
        .route(route("/ws", &mock).allowed_origins(&["http://app.test", "https://new.test"]));
    std::fs::write(&path, after.toml()).unwrap();
    reload(&child, &proxy, "ok").await;

    // The new origin is admitted, under the new per-address limit.
    let _third = newcomer.connect(&proxy).await;
    // The tab from before still round-trips through its session.
    kept.send_text("2").await;
    assert_eq!(kept.recv_text().await, "2");
    assert_eq!(mock.connections(), 2, "no session redialled");
    assert!(loaded_at(&proxy).await >= first_load);
    stop(child);
}

#[tokio::test]
async fn a_file_with_problems_changes_nothing_and_is_logged_with_its_place() {
    let mock = Mock::behaving(echo()).await;
    let config = proxy().route(route("/ws", &mock));
    let (child, proxy, path) = config.spawn_file();
    let mut kept = TabSpec::new("kept").connect(&proxy).await;

    std::fs::write(
        &path,
        config.toml().replace("[admin]", "[admin]\ncolour = 1"),
    )
    .unwrap();
    reload(&child, &proxy, "error").await;
    // A listener cannot move on reload: a problem too.
    let moved = config.toml().replacen("127.0.0.1:0", "127.0.0.1:1", 1);
    std::fs::write(&path, moved).unwrap();
    reload(&child, &proxy, "error").await;
    assert_eq!(reloads(&proxy, "ok").await, 0.0);

    // Everything goes on as before.
    kept.send_text("3").await;
    assert_eq!(kept.recv_text().await, "3");
    let _other = TabSpec::new("other").connect(&proxy).await;
    let log_path = path.with_file_name("log.txt");
    let name = path.display().to_string();
    guard("the problems in the log", async {
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let unknown = log.contains(&format!("{name}:")) && log.contains("unknown key `colour`");
            // At the `listen` key: line 2, column 10 of the file.
            let moved = format!("{name}:2:10: server.listen cannot change on reload");
            if unknown && log.contains(&moved) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    stop(child);
}

fn trusting(cert: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(tabmux::tls::client_config(Some(cert)).unwrap())
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections() {
    let dir = std::env::temp_dir().join(format!("tabmux-rotate-{}", std::process::id()));
    let (old_cert, old_key) = tabmux::tls::write_dev_cert(&dir.join("old")).unwrap();
    let (new_cert, new_key) = tabmux::tls::write_dev_cert(&dir.join("new")).unwrap();
    let live_cert = dir.join("live.crt");
    let live_key = dir.join("live.key");
    std::fs::copy(&old_cert, &live_cert).unwrap();
    std::fs::copy(&old_key, &live_key).unwrap();
    let mock = Mock::behaving(echo()).await;
    let config = proxy()
        .tls(
            &live_cert.display().to_string(),
            &live_key.display().to_string(),
        )
        .route(route("/ws", &mock));
    let (child, proxy, _path) = config.spawn_file();
    let mut old_tab = TabSpec::new("s")
        .tls(trusting(&old_cert))
        .connect(&proxy)
        .await;
    assert!(TabSpec::new("s")
        .tls(trusting(&new_cert))
        .try_connect(&proxy)
        .await
        .is_err());

    std::fs::copy(&new_cert, &live_cert).unwrap();
    std::fs::copy(&new_key, &live_key).unwrap();
    reload(&child, &proxy, "ok").await;

    let _new_tab = TabSpec::new("s")
        .tls(trusting(&new_cert))
        .connect(&proxy)
        .await;
    assert!(TabSpec::new("t")
        .tls(trusting(&old_cert))
        .try_connect(&proxy)
        .await
        .is_err());
    // The tab on the old certificate stays, and round-trips.
    old_tab.send_text("4").await;
    assert_eq!(old_tab.recv_text().await, "4");
    stop(child);
    std::fs::remove_dir_all(&dir).ok();
}
