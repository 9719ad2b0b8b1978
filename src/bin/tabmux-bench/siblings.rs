//! The `hostile` scenario's `pusher-siblings` case (issue 22): one tab of a
//! browser floods client events beside its calm sibling tabs, on tabmux's
//! `pusher` route in front of sockudo allowing 10 client events a second
//! per connection (its setting for an app that limits them).
//!
//! The browser has a flooding tab (subscribed to a private channel, 200
//! client events a second), three tabs subscribed to the channel events
//! are triggered on (20 a second for 3 s, each timed on arrival), and one
//! tab that subscribes to 30 new channels at once meanwhile (as pusher-js
//! does when it connects). Run once without the flooder and once with it.
//! Reported, for each: the subscribing sibling's success rate and the
//! errors it heard, the timing siblings' share of the events they should
//! have had and their delivery p99, and the messages the server received
//! from the session (the flood's that reached it, with the flood).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::load::{self, Target, Ws};
use crate::procs;
use crate::pusher::{self, Sockudo};
use crate::report::percentile;
use crate::Figures;

/// Timing siblings, channels the subscribing sibling asks for, the
/// flooder's pace, the trigger rate and how long it lasts.
const TIMING_TABS: usize = 3;
const SUBSCRIBES: usize = 30;
const FLOOD_EVERY: Duration = Duration::from_millis(5);
const RATE: u32 = 20;
const SECS: u64 = 3;

pub async fn run(exe: &Path, f: &mut Figures) -> anyhow::Result<()> {
    if !pusher::available() {
        return Ok(());
    }
    let sockudo = Sockudo::start_with(
        0,
        &[
            ("SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES", "true"),
            ("SOCKUDO_DEFAULT_APP_MAX_CLIENT_EVENTS_PER_SECOND", "10"),
        ],
    )?;
    let server = sockudo.running.addr;
    let route = format!(
        "[[route]]\npath = \"{}\"\nupstream = \"ws://{server}{}\"\nsession_cookie = \"sid\"\n\
         allowed_origins = [\"http://bench.local\"]\nenvelope = \"pusher\"\n",
        pusher::path(),
        pusher::path()
    );
    let proxy = procs::start_tabmux_route(1, exe, &route, None)?;
    let target = Target::plain(proxy.addr);
    for (case, flood, session) in [("quiet", false, 9000), ("flood", true, 9001)] {
        let timing = pusher::tabs_of(&target, session, TIMING_TABS).await?;
        let (mut subscriber, _) = pusher::greeted(&target, session).await?;
        let flooder = if flood {
            Some(Flooder::start(&target, session).await?)
        } else {
            None
        };
        let sent0 = sockudo.metric("sockudo_ws_messages_received_total").await?;
        let (events, ok) = tokio::join!(
            pusher::trigger_for(&sockudo, RATE, SECS),
            subscribe_many(&mut subscriber, case)
        );
        let (events, (ok, errors)) = (events?, ok?);
        let refused = flooder.map(Flooder::stop).unwrap_or(0);
        load::settle(&timing.deliveries).await;
        let received = sockudo.metric("sockudo_ws_messages_received_total").await? - sent0;
        let mut lat = timing.finish().await;
        lat.sort_unstable();
        let expected = (events as usize * TIMING_TABS) as f64;
        f.insert(
            format!("siblings_subscribed_pct_{case}"),
            100.0 * ok as f64 / SUBSCRIBES as f64,
        );
        f.insert(
            format!("siblings_delivered_pct_{case}"),
            100.0 * lat.len() as f64 / expected,
        );
        f.insert(
            format!("siblings_p99_ms_{case}"),
            percentile(&lat, 0.99) as f64 / 1000.0,
        );
        f.insert(format!("siblings_errors_heard_{case}"), errors as f64);
        f.insert(format!("siblings_server_received_{case}"), received);
        if flood {
            f.insert("siblings_flood_refused".into(), refused as f64);
        }
        drop(subscriber);
    }
    Ok(())
}

/// Subscribes to `SUBSCRIBES` new channels, one every 100 ms (through
/// the whole run), reading all the while; how many succeeded, and how many
/// errors the tab heard. After the last, read until every one succeeded,
/// for at most 2 s.
async fn subscribe_many(ws: &mut Ws, case: &str) -> anyhow::Result<(usize, usize)> {
    let channels: Vec<String> = (0..SUBSCRIBES)
        .map(|n| format!("calm-{case}-{n}"))
        .collect();
    let mut heard = Heard::default();
    for channel in &channels {
        let subscribe =
            serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
        ws.send(Message::text(subscribe.to_string())).await?;
        heard.read_for(ws, Duration::from_millis(100)).await;
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while heard.ok.len() < SUBSCRIBES && tokio::time::Instant::now() < until {
        heard.read_for(ws, Duration::from_millis(100)).await;
    }
    Ok((heard.ok.len(), heard.errors))
}

/// What the subscribing sibling heard: the channels it was told it is
/// subscribed to, and errors.
#[derive(Default)]
struct Heard {
    ok: std::collections::HashSet<String>,
    errors: usize,
}

impl Heard {
    /// Reads for `window`.
    async fn read_for(&mut self, ws: &mut Ws, window: Duration) {
        use futures_util::StreamExt;
        let until = tokio::time::Instant::now() + window;
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
            let Ok(t) = m.to_text() else { continue };
            let v: serde_json::Value = serde_json::from_str(t).unwrap_or_default();
            match v["event"].as_str() {
                Some("pusher_internal:subscription_succeeded") => {
                    if let Some(c) = v["channel"].as_str() {
                        self.ok.insert(c.to_string());
                    }
                }
                Some("pusher:error" | "pusher:subscription_error") => self.errors += 1,
                _ => {}
            }
        }
    }
}

/// The flooding tab: subscribed to a private channel, sending client events
/// every `FLOOD_EVERY`, and counting the 4301 refusals it hears.
struct Flooder {
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Flooder {
    async fn start(target: &Target, session: usize) -> anyhow::Result<Flooder> {
        use futures_util::StreamExt;
        const CHANNEL: &str = "private-flood";
        let (mut ws, socket_id) = pusher::greeted(target, session).await?;
        let auth = pusher::private_auth(&socket_id, CHANNEL);
        let subscribe = serde_json::json!({"event": "pusher:subscribe",
            "data": {"channel": CHANNEL, "auth": auth}});
        ws.send(Message::text(subscribe.to_string())).await?;
        pusher::until(&mut ws, "pusher_internal:subscription_succeeded").await?;
        let refused = Arc::new(AtomicU64::new(0));
        let counted = refused.clone();
        let task = tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let reading = async {
                while let Some(Ok(m)) = rx.next().await {
                    if m.to_text().is_ok_and(|t| t.contains("4301")) {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            let flooding = async {
                let mut every = tokio::time::interval(FLOOD_EVERY);
                loop {
                    every.tick().await;
                    let ev = serde_json::json!({"event": "client-typing", "channel": CHANNEL,
                        "data": {"typing": true}});
                    if tx.send(Message::text(ev.to_string())).await.is_err() {
                        break;
                    }
                }
            };
            tokio::join!(reading, flooding);
        });
        Ok(Flooder { refused, task })
    }

    /// Stops flooding; the refusals it heard.
    fn stop(self) -> u64 {
        self.task.abort();
        self.refused.load(Ordering::Relaxed)
    }
}
