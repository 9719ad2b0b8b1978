//! The live status page: `GET /` (a self-contained HTML page, no CDN, no build
//! step) polls `GET /status.json` once a second.
//!
//! The JSON holds the totals, the savings ledger, per-route figures with the
//! sessions that have the most tabs (named by their keyed hash, never by
//! cookie), and a history of tabs and upstream connections, sampled
//! every five seconds over the last ten minutes ([`crate::history`]).

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::history::unix_ms;
use crate::shared::Shared;

/// Sessions listed per route.
const TOP_SESSIONS: usize = 10;

/// Tabs and upstream connections open, over all routes.
pub fn totals(shared: &Shared) -> (i64, i64) {
    shared.live().routes.iter().fold((0, 0), |(t, u), r| {
        let m = &r.ctx.metrics;
        (t + m.tabs_open.get(), u + m.upstreams_open.get())
    })
}

/// The document `/status.json` serves.
pub fn status_json(shared: &Shared) -> Value {
    let mut by_route: HashMap<std::sync::Arc<str>, Vec<_>> = HashMap::new();
    for s in shared.registry.snapshot() {
        by_route.entry(s.route.clone()).or_default().push(s);
    }
    let live = shared.live();
    let mut total = json!({
        "tabs": 0, "sessions": 0, "upstreams": 0,
        "connections_avoided": 0, "connection_seconds_avoided": 0.0, "messages_avoided": 0,
    });
    let mut routes = Vec::new();
    for rt in &live.routes {
        let m = &rt.ctx.metrics;
        let mut sessions = by_route.remove(rt.route.path.as_str()).unwrap_or_default();
        sessions.sort_by(|a, b| b.tabs.cmp(&a.tabs).then(a.name.cmp(&b.name)));
        let top: Vec<Value> = sessions
            .iter()
            .take(TOP_SESSIONS)
            .map(|s| {
                json!({
                    "session": s.name,
                    "tabs": s.tabs,
                    "upstream": if s.connected { "up" } else { "connecting" },
                    "age_s": s.age.as_secs(),
                })
            })
            .collect();
        let route = json!({
            "path": rt.route.path,
            "upstream": rt.route.upstream.to_string(),
            "envelope": rt.route.envelope.header_value(),
            "tabs": m.tabs_open.get(),
            "sessions": m.sessions_active.get(),
            "upstreams": m.upstreams_open.get(),
            "connections_avoided": m.ledger.avoided_now(),
            "connection_seconds_avoided": round2(m.ledger.seconds()),
            "messages_avoided": m.messages_avoided.get(),
            "top_sessions": top,
        });
        let mut route = route;
        use crate::config::Envelope;
        if matches!(
            rt.route.envelope,
            Envelope::Pusher | Envelope::Graphql | Envelope::Mqtt
        ) {
            route["subscriptions_avoided"] = json!(m.subscriptions_avoided.get());
            route["pings_avoided"] = json!(m.pings_avoided.get());
        }
        if rt.route.envelope == Envelope::Mqtt {
            route["connects_avoided"] = json!(m.connects_avoided.get());
        }
        for key in [
            "tabs",
            "sessions",
            "upstreams",
            "connections_avoided",
            "messages_avoided",
        ] {
            let sum = total[key].as_i64().unwrap_or(0) + route[key].as_i64().unwrap_or(0);
            total[key] = json!(sum);
        }
        let secs = total["connection_seconds_avoided"].as_f64().unwrap_or(0.0)
            + route["connection_seconds_avoided"].as_f64().unwrap_or(0.0);
        total["connection_seconds_avoided"] = json!(round2(secs));
        routes.push(route);
    }
    let history: Vec<Value> = shared
        .history
        .points()
        .iter()
        .map(|p| json!({"t": p.unix_ms, "tabs": p.tabs, "upstreams": p.upstreams}))
        .collect();
    json!({
        "now": unix_ms(),
        "uptime_s": shared.started.elapsed().as_secs(),
        "total": total,
        "config_loaded": live.loaded_ms,
        "limits": {
            "tabs": shared.limits.tabs_open(),
            "max_tabs": live.server.max_tabs,
            "sessions": shared.limits.sessions_alive(),
            "max_sessions": live.server.max_sessions,
            "client_addresses": shared.limits.addresses(),
            "buffer_held_bytes": shared.budget.held(),
            "buffer_budget_bytes": shared.budget.limit(),
        },
        "routes": routes,
        "history": history,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The status page.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tabmux status</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:64rem;padding:0 1rem;color:#1d1d1f}
 h1{font-size:1.4rem;margin:0 0 .2rem} .sub{color:#666;margin-bottom:1rem}
 .cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(9.5rem,1fr));gap:.7rem;margin:1rem 0}
 .card{border:1px solid #ddd;border-radius:.5rem;padding:.6rem .8rem}
 .card .v{font-size:1.7rem;font-weight:700} .card .k{color:#666;font-size:.8rem}
 .save{background:#f2fbf4;border-color:#b7e4c2}
 table{border-collapse:collapse;width:100%;margin:.4rem 0 1.4rem} th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eee}
 th{font-size:.8rem;color:#555} td.n{text-align:right;font-variant-numeric:tabular-nums}
 code{font-size:.9em} svg{width:100%;height:180px;border:1px solid #eee;border-radius:.5rem}
 .legend span{display:inline-block;margin-right:1rem} .sw{display:inline-block;width:.8rem;height:.8rem;border-radius:.2rem;vertical-align:middle;margin-right:.3rem}
</style></head><body>
<h1>tabmux</h1><div class="sub">one upstream WebSocket per browser session &middot; <span id="up">…</span></div>
<div class="cards">
 <div class="card"><div class="k">tabs open</div><div class="v" id="tabs">…</div></div>
 <div class="card"><div class="k">sessions</div><div class="v" id="sessions">…</div></div>
 <div class="card"><div class="k">upstream connections</div><div class="v" id="upstreams">…</div></div>
 <div class="card save"><div class="k">connections avoided now</div><div class="v" id="avoided">…</div></div>
 <div class="card save"><div class="k">connection-hours avoided</div><div class="v" id="hours">…</div></div>
 <div class="card save"><div class="k">upstream messages avoided</div><div class="v" id="msgs">…</div></div>
</div>
<div class="legend"><span><i class="sw" style="background:#3b6fd8"></i>tabs</span><span><i class="sw" style="background:#e0772e"></i>upstream connections</span></div>
<svg id="chart" viewBox="0 0 600 180" preserveAspectRatio="none"></svg>
<div id="routes"></div>
<script>
const $ = (id) => document.getElementById(id);
const fmt = (n) => Number(n).toLocaleString('en-US');
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
let live = [];
function chart(points) {
  const svg = $('chart'), W = 600, H = 180, pad = 8;
  if (points.length < 2) { svg.innerHTML = ''; return; }
  const t0 = points[0].t, t1 = points[points.length - 1].t || t0 + 1;
  const max = Math.max(1, ...points.map((p) => Math.max(p.tabs, p.upstreams)));
  const line = (key, color) => '<polyline fill="none" stroke="' + color + '" stroke-width="2" points="' +
    points.map((p) => ((p.t - t0) / Math.max(1, t1 - t0) * (W - 2 * pad) + pad).toFixed(1) + ',' +
      (H - pad - p[key] / max * (H - 2 * pad)).toFixed(1)).join(' ') + '"/>';
  svg.innerHTML = line('tabs', '#3b6fd8') + line('upstreams', '#e0772e') +
    '<text x="' + (W - pad) + '" y="14" text-anchor="end" font-size="11" fill="#888">' + fmt(max) + '</text>';
}
async function poll() {
  try {
    const s = await (await fetch('status.json', {cache: 'no-store'})).json();
    const t = s.total;
    $('tabs').textContent = fmt(t.tabs); $('sessions').textContent = fmt(t.sessions);
    $('upstreams').textContent = fmt(t.upstreams); $('avoided').textContent = fmt(t.connections_avoided);
    $('hours').textContent = (t.connection_seconds_avoided / 3600).toFixed(2);
    $('msgs').textContent = fmt(t.messages_avoided);
    $('up').textContent = 'up ' + s.uptime_s + ' s, configuration loaded '
      + new Date(s.config_loaded).toLocaleString();
    live.push({t: s.now, tabs: t.tabs, upstreams: t.upstreams});
    live = live.filter((p) => p.t > s.now - 600000);
    const hist = s.history.filter((p) => p.t < (live[0] ? live[0].t : s.now));
    chart(hist.concat(live));
    $('routes').innerHTML = s.routes.map((r) =>
      '<h2 style="font-size:1.05rem">route <code>' + esc(r.path) + '</code> &rarr; <code>' + esc(r.upstream) + '</code></h2>' +
      '<table><tr><th>tabs</th><th>sessions</th><th>upstreams</th><th>avoided now</th><th>connection-s avoided</th><th>messages avoided</th></tr>' +
      '<tr><td class="n">' + fmt(r.tabs) + '</td><td class="n">' + fmt(r.sessions) + '</td><td class="n">' + fmt(r.upstreams) +
      '</td><td class="n">' + fmt(r.connections_avoided) + '</td><td class="n">' + fmt(r.connection_seconds_avoided) +
      '</td><td class="n">' + fmt(r.messages_avoided) + '</td></tr></table>' +
      (r.subscriptions_avoided === undefined ? '' :
        '<table><tr><th>subscriptions avoided</th><th>pings avoided</th>' +
        (r.connects_avoided === undefined ? '' : '<th>CONNECTs avoided</th>') + '</tr><tr><td class="n">' +
        fmt(r.subscriptions_avoided) + '</td><td class="n">' + fmt(r.pings_avoided) + '</td>' +
        (r.connects_avoided === undefined ? '' : '<td class="n">' + fmt(r.connects_avoided) + '</td>') + '</tr></table>') +
      '<table class="top"><tr><th>session (keyed hash)</th><th>tabs</th><th>upstream</th><th>age</th></tr>' +
      (r.top_sessions.length ? r.top_sessions.map((x) => '<tr><td><code>' + esc(x.session) + '</code></td><td class="n">' +
        x.tabs + '</td><td>' + x.upstream + '</td><td class="n">' + x.age_s + ' s</td></tr>').join('')
        : '<tr><td colspan="4" style="color:#888">no session</td></tr>') + '</table>').join('');
  } catch (e) { $('up').textContent = 'unreachable: ' + e; }
}
poll(); setInterval(poll, 1000);
</script></body></html>
"##;
