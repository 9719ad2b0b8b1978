//! A fleet: real haproxy, with the shipped `deploy/haproxy.cfg`, in front of
//! three tabmux processes and one mock backend (PROTOCOL.md, "Behind a load
//! balancer"). Ignored by default: it needs haproxy (Debian's package),
//! which `.ci/run` installs and then runs it with `--ignored`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::*;

const SESSIONS: usize = 30;
const TABS_PER_SESSION: usize = 2;

/// haproxy in the foreground, with the shipped configuration.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn haproxy(bind: SocketAddr, fleet: &[&TestProxy]) -> Haproxy {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f", config])
        .env("TABMUX_LB_BIND", bind.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (i, p) in fleet.iter().enumerate() {
        cmd.env(format!("TABMUX_{}", i + 1), p.addr.to_string());
        cmd.env(
            format!("TABMUX_{}_ADMIN_PORT", i + 1),
            p.admin.port().to_string(),
        );
    }
    Haproxy(cmd.spawn().expect("haproxy (apt-get install haproxy)"))
}

/// A tab of browser `s` through haproxy, tried until it is answered (a
/// process just started or just gone is not yet known to haproxy).
async fn through(front: &TestProxy, s: usize) -> Tab {
    let spec = TabSpec::new(&format!("browser-{s}")).from("127.0.0.2");
    guard("a tab through haproxy", async {
        loop {
            if let Ok(tab) = spec.try_connect(front).await {
                break tab;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Sessions each process holds, from its status page.
async fn sessions_of(p: &TestProxy) -> u64 {
    let body = admin_get(p.admin, "/status.json").await.1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["total"]["sessions"].as_u64().unwrap()
}

/// Upstream connections the backend saw, by session cookie.
fn dials(mock: &Mock) -> HashMap<String, usize> {
    mock.now(|conns| {
        let mut by = HashMap::new();
        for c in conns.iter() {
            let cookie = c.headers["cookie"].to_str().unwrap().to_string();
            *by.entry(cookie).or_insert(0) += 1;
        }
        by
    })
}

#[tokio::test]
#[ignore = "needs haproxy; .ci/run installs it and runs this with --ignored"]
async fn haproxy_keeps_one_upstream_per_session_across_the_fleet() {
    let mock = Mock::start().await;
    let config = proxy()
        .server("proxy_protocol", true)
        .route(route("/ws", &mock).linger("0s"));
    let mut fleet: Vec<(Spawned, TestProxy)> = (0..3).map(|_| config.spawn()).collect();
    let lb = free_addr();
    let _haproxy = haproxy(lb, &fleet.iter().map(|(_, p)| p).collect::<Vec<_>>());
    let front = TestProxy::at(lb, fleet[0].1.admin);
    // haproxy marks a server up after one good check: `through` waits
    // until it answers.
    let mut tabs: Vec<(usize, LiveTab)> = Vec::new();
    for s in 0..SESSIONS {
        for _ in 0..TABS_PER_SESSION {
            tabs.push((s, through(&front, s).await.live()));
        }
    }
    // Exactly one upstream per session, fleet-wide.
    mock.wait("an upstream per session", |c| {
        (c.len() >= SESSIONS).then_some(())
    })
    .await;
    let before = dials(&mock);
    assert_eq!(before.len(), SESSIONS);
    assert!(before.values().all(|&n| n == 1), "{before:?}");
    // The client's own address reached the backend, not haproxy's.
    mock.now(|conns| {
        for c in conns.iter() {
            assert_eq!(c.headers["x-forwarded-for"], "127.0.0.2");
        }
    });
    // Sessions are spread over the three processes.
    let mut held = Vec::new();
    for (_, p) in &fleet {
        held.push(sessions_of(p).await);
    }
    assert_eq!(held.iter().sum::<u64>(), SESSIONS as u64, "{held:?}");
    assert!(
        held.iter().all(|&n| n > 0),
        "all on some processes: {held:?}"
    );

    // One process goes away; its tabs reconnect through haproxy at once.
    let victim = held.iter().position(|&n| n > 0).unwrap();
    let (mut child, _) = fleet.remove(victim);
    let _ = child.kill();
    let _ = child.wait();
    let lost = held[victim] as usize * TABS_PER_SESSION;
    guard("the victim's tabs to be cut", async {
        while tabs
            .iter_mut()
            .map(|(_, t)| !t.is_open())
            .filter(|&c| c)
            .count()
            < lost
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut affected: Vec<usize> = tabs
        .iter_mut()
        .filter_map(|(s, t)| (!t.is_open()).then_some(*s))
        .collect();
    assert_eq!(affected.len(), lost, "only the victim's tabs were cut");
    affected.sort_unstable();
    affected.dedup();
    assert_eq!(affected.len() as u64, held[victim], "the victim's sessions");
    let mut back = Vec::new();
    for &s in &affected {
        for _ in 0..TABS_PER_SESSION {
            back.push(through(&front, s).await);
        }
    }
    // Each affected session dialled exactly once more, on a survivor; the
    // others did not dial again.
    let after = dials(&mock);
    for s in 0..SESSIONS {
        let cookie = format!("sessionid=browser-{s}");
        let want = if affected.contains(&s) { 2 } else { 1 };
        assert_eq!(after[&cookie], want, "{cookie}");
    }
    let mut held = 0;
    for (_, p) in &fleet {
        held += sessions_of(p).await;
    }
    assert_eq!(held, SESSIONS as u64, "every session lives on a survivor");
    for (mut child, _) in fleet {
        let _ = child.kill();
        let _ = child.wait();
    }
}
