//! Prometheus metrics. Every metric name is a constant here; the registry is
//! created by the caller and passed in, never global.
//!
//! Labels carry the route path and a fixed reason word, never a cookie or any
//! per-session value: a session is too many and too private to be a label.
//! Hot-path counters are resolved once per route into [`RouteMetrics`], so a
//! message never pays for a label lookup.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub const TABS_OPEN: &str = "tabmux_tabs_open";
pub const SESSIONS_ACTIVE: &str = "tabmux_sessions_active";
pub const UPSTREAMS_OPEN: &str = "tabmux_upstream_connections_open";
pub const UPSTREAM_DIALS: &str = "tabmux_upstream_dials";
pub const UPSTREAM_REDIALS: &str = "tabmux_upstream_redials";
pub const ADMISSIONS_REFUSED: &str = "tabmux_admissions_refused";
pub const FRAMES_DROPPED: &str = "tabmux_frames_dropped";
pub const TAB_CLOSES: &str = "tabmux_tab_closes";
pub const TASKS_ALIVE: &str = "tabmux_runtime_tasks_alive";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub route: String,
    pub reason: &'static str,
}

/// All metric families, registered once at start.
#[derive(Clone, Default)]
pub struct Metrics {
    tabs_open: Family<RouteLabel, Gauge>,
    sessions_active: Family<RouteLabel, Gauge>,
    upstreams_open: Family<RouteLabel, Gauge>,
    upstream_dials: Family<ReasonLabel, Counter>,
    upstream_redials: Family<ReasonLabel, Counter>,
    admissions_refused: Family<ReasonLabel, Counter>,
    frames_dropped: Family<ReasonLabel, Counter>,
    tab_closes: Family<ReasonLabel, Counter>,
    tasks_alive: Gauge,
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
            "Tab handshakes refused by reason (origin, cookie, limit, handshake, upstream)",
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
            TAB_CLOSES,
            "Tabs closed by tabmux, by reason (invalid_json, too_big, slow_consumer, backend, upstream_lost)",
            m.tab_closes.clone(),
        );
        m
    }

    /// Samples process-wide values that are read, not counted: call before
    /// encoding a scrape.
    pub fn sample(&self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let n = rt.metrics().num_alive_tasks();
            self.tasks_alive.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The handles one route uses, resolved once.
    pub fn route(&self, path: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: path.to_string(),
        };
        RouteMetrics {
            route: path.to_string(),
            tabs_open: self.tabs_open.get_or_create_owned(&label),
            sessions_active: self.sessions_active.get_or_create_owned(&label),
            upstreams_open: self.upstreams_open.get_or_create_owned(&label),
            families: self.clone(),
        }
    }
}

/// One route's metric handles. Cloning is cheap (reference counts).
#[derive(Clone)]
pub struct RouteMetrics {
    route: String,
    pub tabs_open: Gauge,
    pub sessions_active: Gauge,
    pub upstreams_open: Gauge,
    families: Metrics,
}

impl RouteMetrics {
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

    /// Counts a tab closed by tabmux, by reason.
    pub fn tab_closed(&self, reason: &'static str) {
        self.families
            .tab_closes
            .get_or_create(&self.reason(reason))
            .inc();
    }
}
