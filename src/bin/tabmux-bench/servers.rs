//! The scenarios against real servers: `pusher` (sockudo), `graphql`
//! (graphql-ws on Node.js) and `mqtt` (mosquitto). Browsers of 10 tabs on one channel or event
//! stream, updates at a fixed rate; tabs reach the server directly, through
//! nginx, or through tabmux; the figures are what the server holds and
//! sends, the deliveries and their latency, and the proxy's CPU per
//! delivery.

use std::time::Duration;

use anyhow::Context as _;

use crate::load::{self, FanOut, Target};
use crate::procs::{self, Contender, Running};
use crate::report::{percentile, slope};
use crate::{graphql, mqtt, pusher, Figures, Plan};

/// The `pusher` scenario (see pusher.rs): browsers of 10 tabs on one
/// channel of a real Pusher server, events triggered at a fixed rate. Tabs
/// reach the server directly, through nginx, or through tabmux's `pusher`
/// route (always over `ws://`).
pub async fn pusher_once(plan: &Plan, c: Contender, f: &mut Figures) -> anyhow::Result<()> {
    const TABS_PER_BROWSER: usize = 10;
    let sizes = plan.sizes;
    anyhow::ensure!(
        pusher::available(),
        "the pusher scenario needs sockudo: cargo install sockudo --version 5.2.0 --locked \
         --no-default-features --features local"
    );
    let sockudo = pusher::Sockudo::start(0)?;
    let server = sockudo.running.addr;
    let route = format!(
        "[[route]]\npath = \"{}\"\nupstream = \"ws://{server}{}\"\nsession_cookie = \"sid\"\n\
         allowed_origins = [\"http://bench.local\"]\nenvelope = \"pusher\"\n",
        pusher::path(),
        pusher::path()
    );
    let proxy = start_proxy(plan, c, server, &route)?;
    let target = Target::plain(proxy.as_ref().map_or(server, |p| p.addr));
    let pids = proxy.as_ref().map(Running::pids).unwrap_or_default();
    let tabs = pusher::tabs(&target, sizes.pusher_sessions, TABS_PER_BROWSER).await?;
    f.insert(
        "server_connections".into(),
        sockudo.metric("sockudo_connected").await?,
    );
    let sent0 = sockudo.metric("sockudo_ws_messages_sent_total").await?;
    let cpu0 = procs::cpu_us(&pids);
    let events = pusher::trigger_for(&sockudo, sizes.pusher_rate, sizes.pusher_secs).await?;
    load::settle(&tabs.deliveries).await;
    let cpu = procs::cpu_us(&pids) - cpu0;
    let sent = sockudo.metric("sockudo_ws_messages_sent_total").await? - sent0;
    f.insert("events".into(), events as f64);
    let lat = tabs.finish().await;
    delivery_figures(f, sent, lat, proxy.is_some().then_some(cpu));
    Ok(())
}

/// The tabmux binary a contender runs (None: direct, or nginx).
fn tabmux_exe(plan: &Plan, c: Contender) -> anyhow::Result<Option<std::path::PathBuf>> {
    Ok(match c {
        Contender::Tabmux => Some(plan.tabmux.clone()),
        Contender::Other => Some(plan.other.clone().context("no --other binary")?),
        Contender::Direct | Contender::Nginx => None,
    })
}

/// What a contender puts in front of the server at `server`: tabmux with
/// `route` (a `[[route]]` table), nginx, or nothing (direct).
fn start_proxy(
    plan: &Plan,
    c: Contender,
    server: std::net::SocketAddr,
    route: &str,
) -> anyhow::Result<Option<Running>> {
    Ok(match (tabmux_exe(plan, c)?, c) {
        (Some(exe), _) => Some(procs::start_tabmux_route(1, &exe, route, None)?),
        (None, Contender::Nginx) => Some(procs::start_nginx(1, server, 1, None)?),
        (None, _) => None,
    })
}

/// The figures of a real server's updates reaching the tabs: what the
/// server sent, the deliveries and their latency, and the proxy's CPU per
/// delivery (when there is a proxy).
fn delivery_figures(f: &mut Figures, sent: f64, mut lat: Vec<u32>, cpu: Option<procs::Cpu>) {
    lat.sort_unstable();
    let deliveries = lat.len() as f64;
    f.insert("deliveries".into(), deliveries);
    f.insert("server_messages_sent".into(), sent);
    f.insert("p50_ms".into(), percentile(&lat, 0.5) as f64 / 1000.0);
    f.insert("p99_ms".into(), percentile(&lat, 0.99) as f64 / 1000.0);
    if let Some(cpu) = cpu {
        let per = |us: u64| us as f64 / deliveries.max(1.0);
        f.insert("cpu_us_per_delivery".into(), per(cpu.total()));
        f.insert("cpu_us_per_delivery_system".into(), per(cpu.system));
    }
}

/// The `graphql` scenario (see graphql.rs): browsers of 10 tabs on one
/// event stream of a real graphql-ws server, updates published at a fixed
/// rate (the `pusher` scenario's browsers and rate, so that the two
/// compare). Tabs reach the server directly, through nginx, or through
/// tabmux's `graphql` route sharing subscriptions; then, for tabmux, the
/// memory of an idle GraphQL tab at the `memory` scenario's sizes.
pub async fn graphql_once(plan: &Plan, c: Contender, f: &mut Figures) -> anyhow::Result<()> {
    const TABS_PER_BROWSER: usize = 10;
    let sizes = plan.sizes;
    anyhow::ensure!(
        graphql::available(),
        "the graphql scenario needs Node.js and `npm ci` in tests/graphql"
    );
    let exe = tabmux_exe(plan, c)?;
    let server = graphql::Server::start(0)?;
    let addr = server.running.addr;
    let proxy = start_proxy(plan, c, addr, &graphql::route(addr))?;
    let target = Target::plain(proxy.as_ref().map_or(addr, |p| p.addr));
    let pids = proxy.as_ref().map(Running::pids).unwrap_or_default();
    let browsers = sizes.pusher_sessions;
    let tabs = graphql::tabs(&target, browsers, TABS_PER_BROWSER).await?;
    let tabs = FanOut::timing(tabs, graphql::stamp);
    let subscriptions = if exe.is_some() {
        browsers
    } else {
        browsers * TABS_PER_BROWSER
    };
    server.wait_subscriptions(subscriptions).await?;
    f.insert(
        "server_connections".into(),
        server.stat("connections").await?,
    );
    f.insert(
        "server_subscriptions".into(),
        server.stat("subscriptions").await?,
    );
    let sent0 = server.stat("messagesSent").await?;
    let cpu0 = procs::cpu_us(&pids);
    let updates = graphql::publish_for(&server, sizes.pusher_rate, sizes.pusher_secs).await?;
    load::settle(&tabs.deliveries).await;
    let cpu = procs::cpu_us(&pids) - cpu0;
    let sent = server.stat("messagesSent").await? - sent0;
    f.insert("updates".into(), updates as f64);
    let lat = tabs.finish().await;
    delivery_figures(f, sent, lat, proxy.is_some().then_some(cpu));
    drop((proxy, server));
    // An idle GraphQL tab's memory in tabmux (connected, acknowledged,
    // subscribed), as the `memory` scenario measures a json tab's: each
    // size on fresh processes, then the slope through them.
    let Some(exe) = exe else { return Ok(()) };
    let mut points = Vec::new();
    for &n in sizes.memory {
        let server = graphql::Server::start(0)?;
        let proxy = procs::start_tabmux_route(1, &exe, &graphql::route(server.running.addr), None)?;
        let pids = proxy.pids();
        let before = procs::rss_kib(&pids);
        let idle = graphql::tabs(
            &Target::plain(proxy.addr),
            n / TABS_PER_BROWSER,
            TABS_PER_BROWSER,
        )
        .await?;
        server.wait_subscriptions(n / TABS_PER_BROWSER).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let grown = procs::rss_kib(&pids) as f64 - before as f64;
        f.insert(format!("proxy_kib_per_tab@{n}"), grown / n as f64);
        points.push((n as f64, grown));
        drop(idle);
    }
    f.insert("proxy_kib_per_tab_slope".into(), slope(&points));
    Ok(())
}

/// The `mqtt` scenario (see mqtt.rs): browsers of 10 tabs subscribed to one
/// topic on mosquitto, messages published from a TCP client at a fixed rate
/// (the `pusher` scenario's browsers and rate). Tabs reach the broker's
/// websockets listener directly, through nginx, or through tabmux's `mqtt`
/// route.
pub async fn mqtt_once(plan: &Plan, c: Contender, f: &mut Figures) -> anyhow::Result<()> {
    const TABS_PER_BROWSER: usize = 10;
    let sizes = plan.sizes;
    anyhow::ensure!(
        mqtt::available(),
        "the mqtt scenario needs Debian's mosquitto (apt-get install mosquitto)"
    );
    let broker = mqtt::Broker::start(0)?;
    let addr = broker.running.addr;
    let proxy = start_proxy(plan, c, addr, &mqtt::route(addr))?;
    let shared = matches!(c, Contender::Tabmux | Contender::Other);
    let target = Target::plain(proxy.as_ref().map_or(addr, |p| p.addr));
    let pids = proxy.as_ref().map(Running::pids).unwrap_or_default();
    let browsers = sizes.pusher_sessions;
    let tabs = mqtt::tabs(&target, browsers, TABS_PER_BROWSER).await?;
    let tabs = FanOut::timing(tabs, mqtt::stamp);
    let clients = if shared {
        browsers
    } else {
        browsers * TABS_PER_BROWSER
    };
    f.insert(
        "server_connections".into(),
        broker.wait_clients(clients).await?,
    );
    let sent0 = broker.stat("publish/messages/sent").await?;
    let cpu0 = procs::cpu_us(&pids);
    let messages = mqtt::publish_for(&broker, sizes.pusher_rate, sizes.pusher_secs).await?;
    load::settle(&tabs.deliveries).await;
    let cpu = procs::cpu_us(&pids) - cpu0;
    // (The broker's count includes the few `$SYS` messages its stats
    // reads receive.)
    let sent = broker.stat("publish/messages/sent").await? - sent0;
    f.insert("messages".into(), messages as f64);
    let lat = tabs.finish().await;
    delivery_figures(f, sent, lat, proxy.is_some().then_some(cpu));
    drop((proxy, broker));
    // An idle MQTT tab's memory in tabmux (connected, subscribed), as the
    // `memory` scenario measures a json tab's: each size on fresh
    // processes, then the slope through them.
    let Some(exe) = tabmux_exe(plan, c)? else {
        return Ok(());
    };
    let mut points = Vec::new();
    for &n in sizes.memory {
        let broker = mqtt::Broker::start(0)?;
        let proxy = procs::start_tabmux_route(1, &exe, &mqtt::route(broker.running.addr), None)?;
        let pids = proxy.pids();
        let before = procs::rss_kib(&pids);
        let idle = mqtt::tabs(
            &Target::plain(proxy.addr),
            n / TABS_PER_BROWSER,
            TABS_PER_BROWSER,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let grown = procs::rss_kib(&pids) as f64 - before as f64;
        f.insert(format!("proxy_kib_per_tab@{n}"), grown / n as f64);
        points.push((n as f64, grown));
        drop(idle);
    }
    f.insert("proxy_kib_per_tab_slope".into(), slope(&points));
    Ok(())
}
