//! Soak: tabs join and leave at random, send and receive, while upstream
//! connections drop at random. Bounded in time (SOAK_SECS, default 120) and
//! size, so it is `#[ignore]`d in the ordinary run; `.ci/run` runs it in
//! release mode:
//!
//! ```sh
//! SOAK_SECS=120 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! The proxy runs as a child process so its own memory can be read. The
//! run is split into rounds; after each, every tab is closed and the proxy
//! must return to zero tabs, sessions and upstreams, and to its starting
//! number of tasks. Its RSS at those quiet points must stay flat: the last
//! within `RSS_MARGIN` of the one after the first round (the first round
//! grows the allocator's pools and buffers once).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const SESSIONS: u64 = 20;
const MAX_TABS: usize = 150;
const ROUNDS: u32 = 4;
/// Allowed RSS growth between the first and the last quiet point.
const RSS_MARGIN_KIB: u64 = 8 * 1024;

/// A tiny deterministic generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn scrape(proxy: &TestProxy, name: &str) -> f64 {
    let (_, text) = admin_get(proxy.admin, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until the proxy holds no tab, session or upstream.
async fn quiet(proxy: &TestProxy) {
    guard("the proxy to go quiet", async {
        loop {
            let tabs = scrape(proxy, "tabmux_tabs_open").await;
            let sessions = scrape(proxy, "tabmux_sessions_active").await;
            let upstreams = scrape(proxy, "tabmux_upstream_connections_open").await;
            if tabs == 0.0 && sessions == 0.0 && upstreams == 0.0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a long run: .ci/run runs it in release mode"]
async fn churn_leaves_no_tab_session_task_or_memory_behind() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let mock = Mock::behaving(echo()).await;
    let (mut child, proxy) = proxy()
        .route(
            route("/ws", &mock)
                .linger("100ms")
                .reconnect("10ms", "200ms", 20),
        )
        .spawn();
    let pid = child.id();
    quiet(&proxy).await;
    let tasks_at_start = scrape(&proxy, "tabmux_runtime_tasks_alive").await;

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let round = Duration::from_secs(secs) / ROUNDS;
    let mut quiet_rss = Vec::new();
    let (mut joined, mut echoed, mut drops) = (0u64, 0u64, 0u64);
    for r in 0..ROUNDS {
        let end = Instant::now() + round;
        let mut tabs: Vec<LiveTab> = Vec::new();
        while Instant::now() < end {
            match rng.below(10) {
                // Join a random session.
                0..=3 if tabs.len() < MAX_TABS => {
                    let s = rng.below(SESSIONS);
                    if let Ok(tab) = TabSpec::new(&format!("soak{s}")).try_connect(&proxy).await {
                        tabs.push(tab.live());
                        joined += 1;
                    }
                }
                // Leave.
                4 | 5 if !tabs.is_empty() => {
                    let i = rng.below(tabs.len() as u64) as usize;
                    drop(tabs.swap_remove(i));
                }
                // Send, and take the echo if it comes (the upstream may be
                // redialling, or the tab closed with the session).
                6..=8 if !tabs.is_empty() => {
                    let i = rng.below(tabs.len() as u64) as usize;
                    let n = rng.next();
                    tabs[i].send_text(&json!({"n": n}).to_string());
                    if let Ok(Some(tokio_tungstenite::tungstenite::Message::Text(_))) =
                        tokio::time::timeout(Duration::from_secs(2), tabs[i].recv()).await
                    {
                        echoed += 1;
                    }
                }
                // Drop a random upstream connection.
                9 if mock.connections() > 0 => {
                    let c = rng.below(mock.connections() as u64) as usize;
                    // It may have ended already; only a live one counts.
                    if mock.upstream(c).try_drop_conn() {
                        drops += 1;
                    }
                }
                _ => tokio::task::yield_now().await,
            }
        }
        drop(tabs);
        quiet(&proxy).await;
        // Tasks: the listeners' own, and nothing left over from the round.
        let tasks = scrape(&proxy, "tabmux_runtime_tasks_alive").await;
        assert!(
            tasks <= tasks_at_start,
            "round {r}: {tasks} tasks alive, {tasks_at_start} at start"
        );
        let rss = rss_kib(pid);
        println!("round {r}: quiet, {tasks} tasks, RSS {rss} KiB");
        quiet_rss.push(rss);
    }
    println!("joined {joined} tabs, {echoed} echoes, {drops} upstream drops");
    assert!(joined > 100 && echoed > 100, "the soak did too little work");
    let (first, last) = (quiet_rss[0], *quiet_rss.last().unwrap());
    assert!(
        last <= first + RSS_MARGIN_KIB,
        "RSS grew from {first} KiB to {last} KiB at quiet points: {quiet_rss:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
