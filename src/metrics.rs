//! Prometheus metrics. Every metric name is a constant here; the registry is
//! created by the caller and passed in, never global.
//!
//! Labels carry the route path and a fixed reason word, never a cookie or any
//! per-session value: a session is too many and too private to be a label.
//! Hot-path counters are resolved once per route into [`RouteMetrics`], so a
//! message never pays for a label lookup.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub const TABS_OPEN: &str = "tabmux_tabs_open";
pub const SESSIONS_ACTIVE: &str = "tabmux_sessions_active";
pub const UPSTREAMS_OPEN: &str = "tabmux_upstream_connections_open";
pub const UPSTREAM_DIALS: &str = "tabmux_upstream_dials";
pub const UPSTREAM_REDIALS: &str = "tabmux_upstream_redials";
pub const ADMISSIONS_REFUSED: &str = "tabmux_admissions_refused";
pub const FRAMES_DROPPED: &str = "tabmux_frames_dropped";
pub const TAB_CLOSES: &str = "tabmux_tab_closes";
/// Tab requests an envelope refused at the edge, by reason.
pub const EDGE_REFUSALS: &str = "tabmux_edge_refusals";
pub const UPSTREAM_LOST: &str = "tabmux_upstream_lost";
pub const TASKS_ALIVE: &str = "tabmux_runtime_tasks_alive";
pub const BUFFER_HELD: &str = "tabmux_buffer_held_bytes";
pub const RELOADS: &str = "tabmux_config_reloads";
pub const BUFFER_BUDGET: &str = "tabmux_buffer_budget_bytes";
pub const MESSAGES: &str = "tabmux_messages";
pub const BYTES: &str = "tabmux_bytes";
pub const BROADCAST_DELIVERIES: &str = "tabmux_broadcast_deliveries";
pub const SESSION_PEAK_TABS: &str = "tabmux_session_peak_tabs";
/// Savings ledger: upstream connections avoided right now (tabs − upstreams).
pub const CONNECTIONS_AVOIDED: &str = "tabmux_upstream_connections_avoided";
/// Savings ledger: the integral of the above over time, in seconds.
pub const CONNECTION_SECONDS_AVOIDED: &str = "tabmux_upstream_connection_seconds_avoided";
/// Savings ledger: deliveries made at the edge that the backend would
/// otherwise have sent once per tab.
pub const MESSAGES_AVOIDED: &str = "tabmux_upstream_messages_avoided";
/// Savings of `pusher` routes: subscriptions tabmux answered without one
/// upstream.
pub const SUBSCRIPTIONS_AVOIDED: &str = "tabmux_upstream_subscriptions_avoided";
/// Savings of `pusher` routes: tab pings answered without one upstream.
pub const PINGS_AVOIDED: &str = "tabmux_upstream_pings_avoided";
pub const CONNECTS_AVOIDED: &str = "tabmux_upstream_connects_avoided";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub route: String,
    /// `to_upstream` (every message sent upstream: the tabs', and the frames
    /// their envelope composed) or `to_tabs` (deliveries).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub route: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideReasonLabel {
    pub route: String,
    pub reason: &'static str,
    /// `backend` or `proxy`: who ended the connection.
    pub side: &'static str,
}

/// All metric families, registered once at start.
#[derive(Clone)]
pub struct Metrics {
    tabs_open: Family<RouteLabel, Gauge>,
    sessions_active: Family<RouteLabel, Gauge>,
    upstreams_open: Family<RouteLabel, Gauge>,
    upstream_dials: Family<ReasonLabel, Counter>,
    upstream_redials: Family<ReasonLabel, Counter>,
    admissions_refused: Family<ReasonLabel, Counter>,
    frames_dropped: Family<ReasonLabel, Counter>,
    tab_closes: Family<ReasonLabel, Counter>,
    edge_refusals: Family<ReasonLabel, Counter>,
    upstream_lost: Family<SideReasonLabel, Counter>,
    tasks_alive: Gauge,
    buffer_held: Gauge,
    buffer_budget: Gauge,
    reloads: Family<ResultLabel, Counter>,
    messages: Family<DirectionLabel, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    broadcast_deliveries: Family<RouteLabel, Counter>,
    session_peak_tabs: Family<RouteLabel, Histogram, fn() -> Histogram>,
    connections_avoided: Family<RouteLabel, Gauge>,
    connection_seconds_avoided: Family<RouteLabel, Counter<f64, AtomicU64>>,
    messages_avoided: Family<RouteLabel, Counter>,
    subscriptions_avoided: Family<RouteLabel, Counter>,
    pings_avoided: Family<RouteLabel, Counter>,
    connects_avoided: Family<RouteLabel, Counter>,
    /// Every route's ledger, sampled at each scrape.
    ledgers: Arc<Mutex<Vec<Arc<Ledger>>>>,
}

fn peak_tabs_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 16.0, 32.0, 64.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            tabs_open: Family::default(),
            sessions_active: Family::default(),
            upstreams_open: Family::default(),
            upstream_dials: Family::default(),
            upstream_redials: Family::default(),
            admissions_refused: Family::default(),
            frames_dropped: Family::default(),
            tab_closes: Family::default(),
            edge_refusals: Family::default(),
            upstream_lost: Family::default(),
            tasks_alive: Gauge::default(),
            buffer_held: Gauge::default(),
            buffer_budget: Gauge::default(),
            reloads: Family::default(),
            messages: Family::default(),
            bytes: Family::default(),
            broadcast_deliveries: Family::default(),
            session_peak_tabs: Family::new_with_constructor(peak_tabs_histogram),
            connections_avoided: Family::default(),
            connection_seconds_avoided: Family::default(),
            messages_avoided: Family::default(),
            subscriptions_avoided: Family::default(),
            pings_avoided: Family::default(),
            connects_avoided: Family::default(),
            ledgers: Arc::default(),
        }
    }
}

impl Metrics {
    /// Creates the families and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(TABS_OPEN, "Tabs connected", m.tabs_open.clone());
        registry.register(
            SESSIONS_ACTIVE,
            "Sessions alive (an upstream, or dialling one)",
            m.sessions_active.clone(),
        );
        registry.register(
            UPSTREAMS_OPEN,
            "Upstream WebSocket connections open",
            m.upstreams_open.clone(),
        );
        registry.register(
            UPSTREAM_DIALS,
            "Upstream dials by result (ok, refused, unreachable, timeout, handshake)",
            m.upstream_dials.clone(),
        );
        registry.register(
            UPSTREAM_REDIALS,
            "Upstream redials after a loss, by result (ok, refused, unreachable, timeout, handshake)",
            m.upstream_redials.clone(),
        );
        registry.register(
            ADMISSIONS_REFUSED,
            "Tab handshakes refused by reason (origin, cookie, handshake, upstream, max_tabs, per_ip_tabs, max_tabs_per_session, max_sessions, per_ip_sessions)",
            m.admissions_refused.clone(),
        );
        registry.register(
            FRAMES_DROPPED,
            "Upstream frames (or deliveries) dropped, by reason",
            m.frames_dropped.clone(),
        );
        registry.register(
            TASKS_ALIVE,
            "Tasks alive in the async runtime (sampled at each scrape)",
            m.tasks_alive.clone(),
        );
        registry.register(
            RELOADS,
            "Configuration reloads on SIGHUP, by result (ok, error: the running configuration stayed)",
            m.reloads.clone(),
        );
        registry.register(
            BUFFER_HELD,
            "Message bytes held for clients (tab queues, partly received messages, reconnect buffers, unwritten upstream messages), against server.buffer_budget",
            m.buffer_held.clone(),
        );
        registry.register(
            BUFFER_BUDGET,
            "server.buffer_budget: past it, the biggest holder is closed (1013 memory budget)",
            m.buffer_budget.clone(),
        );
        registry.register(
            MESSAGES,
            "Messages passed on, by direction (to_upstream: sent upstream, tabs' messages and the frames their envelope composed; to_tabs: deliveries)",
            m.messages.clone(),
        );
        registry.register(
            BYTES,
            "Payload bytes passed on, by direction",
            m.bytes.clone(),
        );
        registry.register(
            BROADCAST_DELIVERIES,
            "Deliveries of backend broadcasts (one per tab reached)",
            m.broadcast_deliveries.clone(),
        );
        registry.register(
            SESSION_PEAK_TABS,
            "Tabs per session: each session's largest tab count, observed when it ends",
            m.session_peak_tabs.clone(),
        );
        registry.register(
            CONNECTIONS_AVOIDED,
            "Savings: upstream connections avoided right now (tabs minus upstream connections)",
            m.connections_avoided.clone(),
        );
        registry.register(
            CONNECTION_SECONDS_AVOIDED,
            "Savings: upstream connection-seconds avoided (the integral of connections avoided)",
            m.connection_seconds_avoided.clone(),
        );
        registry.register(
            MESSAGES_AVOIDED,
            "Savings: upstream messages avoided (each upstream frame delivered to n tabs saves n - 1)",
            m.messages_avoided.clone(),
        );
        registry.register(
            SUBSCRIPTIONS_AVOIDED,
            "Savings (pusher, graphql and mqtt routes): tab subscriptions answered by tabmux, with no subscribe upstream",
            m.subscriptions_avoided.clone(),
        );
        registry.register(
            PINGS_AVOIDED,
            "Savings (pusher, graphql and mqtt routes): tab pings answered by tabmux, with no ping upstream",
            m.pings_avoided.clone(),
        );
        registry.register(
            CONNECTS_AVOIDED,
            "Savings (mqtt routes): later tabs' CONNECTs answered by tabmux, with no connection upstream",
            m.connects_avoided.clone(),
        );
        registry.register(
            TAB_CLOSES,
            format!(
                "Tabs closed by tabmux, by reason ({})",
                crate::cause::Cause::PROXY_LABELS.join(", ")
            ),
            m.tab_closes.clone(),
        );
        registry.register(
            EDGE_REFUSALS,
            format!(
                "Tab requests refused at the edge, before the server saw them, by reason ({})",
                crate::envelope::Refused::ALL.map(|r| r.label()).join(", ")
            ),
            m.edge_refusals.clone(),
        );
        registry.register(
            UPSTREAM_LOST,
            format!(
                "Upstream connections lost, by reason ({}) and side (backend: it closed or failed; proxy: tabmux gave up on it)",
                crate::cause::Lost::LABELS.join(", ")
            ),
            m.upstream_lost.clone(),
        );
        m
    }

    /// Samples process-wide values that are read, not counted: call before
    /// encoding a scrape.
    /// Counts a configuration reload by result.
    pub fn reloaded(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn sample(&self, budget: &crate::budget::Budget) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.buffer_held.set(gauge(budget.held()));
        self.buffer_budget.set(gauge(budget.limit()));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let n = rt.metrics().num_alive_tasks();
            self.tasks_alive.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let ledgers = self.ledgers.lock().map(|l| l.clone()).unwrap_or_default();
        for ledger in ledgers {
            ledger.sample();
        }
    }

    /// Counts a connection refused before its request named a route (at
    /// accept: `per_ip_tabs` for an address whose handshakes fill its
    /// share); its `route` label is empty.
    pub fn refused_before_route(&self, reason: &'static str) {
        self.admissions_refused
            .get_or_create(&ReasonLabel {
                route: String::new(),
                reason,
            })
            .inc();
    }

    /// The handles one route uses, resolved once.
    pub fn route(&self, path: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: path.to_string(),
        };
        let direction = |direction| DirectionLabel {
            route: path.to_string(),
            direction,
        };
        let ledger = Arc::new(Ledger {
            state: Mutex::new(LedgerState {
                since: Instant::now(),
                tabs: 0,
                upstreams: 0,
            }),
            avoided_now: self.connections_avoided.get_or_create_owned(&label),
            seconds: self.connection_seconds_avoided.get_or_create_owned(&label),
        });
        if let Ok(mut all) = self.ledgers.lock() {
            all.push(ledger.clone());
        }
        RouteMetrics {
            route: path.to_string(),
            tabs_open: self.tabs_open.get_or_create_owned(&label),
            sessions_active: self.sessions_active.get_or_create_owned(&label),
            upstreams_open: self.upstreams_open.get_or_create_owned(&label),
            messages_up: self.messages.get_or_create_owned(&direction("to_upstream")),
            bytes_up: self.bytes.get_or_create_owned(&direction("to_upstream")),
            messages_down: self.messages.get_or_create_owned(&direction("to_tabs")),
            bytes_down: self.bytes.get_or_create_owned(&direction("to_tabs")),
            broadcast_deliveries: self.broadcast_deliveries.get_or_create_owned(&label),
            messages_avoided: self.messages_avoided.get_or_create_owned(&label),
            subscriptions_avoided: self.subscriptions_avoided.get_or_create_owned(&label),
            pings_avoided: self.pings_avoided.get_or_create_owned(&label),
            connects_avoided: self.connects_avoided.get_or_create_owned(&label),
            session_peak_tabs: self.session_peak_tabs.get_or_create_owned(&label),
            ledger,
            families: self.clone(),
        }
    }
}

/// Integrates "tabs minus upstream connections" over time, exactly: the
/// running total is brought up to date at every change and every scrape.
/// Its lock is held for a few arithmetic operations, never across an await.
pub struct Ledger {
    state: Mutex<LedgerState>,
    avoided_now: Gauge,
    seconds: Counter<f64, AtomicU64>,
}

struct LedgerState {
    since: Instant,
    tabs: i64,
    upstreams: i64,
}

impl Ledger {
    fn change(&self, tabs: i64, upstreams: i64) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        self.accrue(&mut st);
        st.tabs += tabs;
        st.upstreams += upstreams;
        self.avoided_now.set((st.tabs - st.upstreams).max(0));
    }

    fn sample(&self) {
        if let Ok(mut st) = self.state.lock() {
            self.accrue(&mut st);
        }
    }

    fn accrue(&self, st: &mut LedgerState) {
        let now = Instant::now();
        let avoided = (st.tabs - st.upstreams).max(0) as f64;
        self.seconds
            .inc_by(avoided * now.duration_since(st.since).as_secs_f64());
        st.since = now;
    }

    /// Connections avoided right now.
    pub fn avoided_now(&self) -> i64 {
        self.avoided_now.get()
    }

    /// Connection-seconds avoided so far.
    pub fn seconds(&self) -> f64 {
        self.sample();
        self.seconds.get()
    }
}

/// One route's metric handles. Cloning is cheap (reference counts).
#[derive(Clone)]
pub struct RouteMetrics {
    route: String,
    pub tabs_open: Gauge,
    pub sessions_active: Gauge,
    pub upstreams_open: Gauge,
    messages_up: Counter,
    bytes_up: Counter,
    messages_down: Counter,
    bytes_down: Counter,
    broadcast_deliveries: Counter,
    pub messages_avoided: Counter,
    pub subscriptions_avoided: Counter,
    pub pings_avoided: Counter,
    pub connects_avoided: Counter,
    session_peak_tabs: Histogram,
    pub ledger: Arc<Ledger>,
    families: Metrics,
}

impl RouteMetrics {
    /// A tab became a member of a session.
    pub fn tab_joined(&self) {
        self.tabs_open.inc();
        self.ledger.change(1, 0);
    }

    /// A tab stopped being a member.
    pub fn tab_left(&self) {
        self.tabs_open.dec();
        self.ledger.change(-1, 0);
    }

    /// An upstream connection was established.
    pub fn upstream_up(&self) {
        self.upstreams_open.inc();
        self.ledger.change(0, 1);
    }

    /// An upstream connection ended.
    pub fn upstream_down(&self) {
        self.upstreams_open.dec();
        self.ledger.change(0, -1);
    }

    /// A message of `bytes` payload bytes was sent upstream: a tab's, or
    /// one its envelope composed (a `json` open event, a Pusher subscribe).
    pub fn to_upstream(&self, bytes: usize) {
        self.messages_up.inc();
        self.bytes_up.inc_by(bytes as u64);
    }

    /// One upstream frame of `bytes` was delivered to `tabs` tabs; a
    /// broadcast when `broadcast`.
    pub fn delivered(&self, tabs: usize, bytes: usize, broadcast: bool) {
        let n = tabs as u64;
        self.messages_down.inc_by(n);
        self.bytes_down.inc_by(n * bytes as u64);
        if broadcast {
            self.broadcast_deliveries.inc_by(n);
        }
        self.messages_avoided.inc_by(n.saturating_sub(1));
    }

    /// A session ended; it had at most `peak` tabs at once.
    pub fn session_ended(&self, peak: usize) {
        self.session_peak_tabs.observe(peak as f64);
    }

    fn reason(&self, reason: &'static str) -> ReasonLabel {
        ReasonLabel {
            route: self.route.clone(),
            reason,
        }
    }

    /// Counts an upstream dial by its result word.
    pub fn dial(&self, result: &'static str) {
        self.families
            .upstream_dials
            .get_or_create(&self.reason(result))
            .inc();
    }

    /// Counts an upstream redial by its result word.
    pub fn redial(&self, result: &'static str) {
        self.families
            .upstream_redials
            .get_or_create(&self.reason(result))
            .inc();
    }

    /// Counts a refused tab handshake by reason.
    pub fn refused(&self, reason: &'static str) {
        self.families
            .admissions_refused
            .get_or_create(&self.reason(reason))
            .inc();
    }

    /// Counts `n` dropped frames or deliveries by reason.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.families
            .frames_dropped
            .get_or_create(&self.reason(reason))
            .inc_by(n);
    }

    /// Counts an upstream connection lost, by its row of the table.
    pub fn upstream_lost(&self, lost: &crate::cause::Lost) {
        let (reason, side) = lost.row();
        let side = match side {
            crate::cause::Side::Backend => "backend",
            crate::cause::Side::Proxy => "proxy",
            crate::cause::Side::Tab => "tab",
        };
        let label = SideReasonLabel {
            route: self.route.clone(),
            reason,
            side,
        };
        self.families.upstream_lost.get_or_create(&label).inc();
    }

    /// Counts a tab's request refused at the edge, by reason.
    pub fn edge_refused(&self, reason: crate::envelope::Refused) {
        self.families
            .edge_refusals
            .get_or_create(&self.reason(reason.label()))
            .inc();
    }

    /// Counts a tab closed by tabmux, by reason.
    pub fn tab_closed(&self, reason: &'static str) {
        self.families
            .tab_closes
            .get_or_create(&self.reason(reason))
            .inc();
    }
}
