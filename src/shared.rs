//! The state every connection task shares: the configuration in force (its
//! routes with their sessions' context, the server's settings, the TLS
//! acceptor), the session registry, the process-wide limits, metrics and
//! the status page's history. Built by [`crate::server`]; the
//! configuration in force is replaced whole on SIGHUP ([`Shared::reload`]).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::budget::Budget;
use crate::config::{Admin, Config, Route, Server};
use crate::history::History;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::session::{DrainOrder, Registry, SessionContext, SessionHasher};

/// One route with the runtime state its sessions share.
pub struct RouteRuntime {
    pub route: Arc<Route>,
    pub ctx: SessionContext,
}

/// The configuration in force: what every tab and session that arrives
/// from now on is admitted and served under.
pub struct Live {
    pub server: Server,
    /// `[admin]` as reloaded (its `listen` cannot change: [`Shared::admin`]).
    pub admin: Admin,
    pub routes: Vec<Arc<RouteRuntime>>,
    /// When this configuration was loaded (Unix milliseconds).
    pub loaded_ms: u64,
}

impl Live {
    /// The route serving an exact request path.
    pub fn route(&self, path: &str) -> Option<&Arc<RouteRuntime>> {
        self.routes.iter().find(|r| r.route.path == path)
    }
}

/// State shared by every connection task. Nothing in it is locked across an
/// `.await`: the session registry is a sharded map whose entries are only
/// touched to insert, look up or remove a handle, and the configuration in
/// force is an `Arc` read under a lock held for a clone.
pub struct Shared {
    /// The server's settings as first loaded: the listener addresses and
    /// the runtime, which a reload cannot change.
    pub server: Server,
    pub admin: Admin,
    live: RwLock<Arc<Live>>,
    pub hasher: SessionHasher,
    /// Tabs and sessions, in the process and per client address.
    pub limits: Arc<Limits>,
    /// Every message byte held, against `server.buffer_budget`.
    pub budget: Arc<Budget>,
    /// The order of the shutdown drain, shared by every session.
    pub drain_order: Arc<DrainOrder>,
    pub registry: Arc<Registry>,
    /// True once every listener accepts connections, until the drain
    /// starts (`/readyz`).
    pub ready: AtomicBool,
    pub metrics_registry: prometheus_client::registry::Registry,
    pub metrics: Metrics,
    /// The status page's chart data.
    pub history: History,
    pub started: std::time::Instant,
    /// Completes when the proxy shuts down (every session holds a clone).
    pub shutdown: watch::Receiver<()>,
}

impl Shared {
    /// Everything a configuration gives the process, first loaded.
    pub fn new(
        config: Config,
        metrics_registry: prometheus_client::registry::Registry,
        metrics: Metrics,
        shutdown: watch::Receiver<()>,
    ) -> Shared {
        let budget = Budget::new(config.server.buffer_budget);
        let limits = Limits::new(&config.server);
        let drain_order = Arc::new(DrainOrder::default());
        let live = Live {
            routes: route_runtimes(&config, &metrics, None, &shutdown, &budget, &drain_order),
            server: config.server.clone(),
            admin: config.admin.clone(),
            loaded_ms: unix_ms(),
        };
        Shared {
            server: config.server,
            admin: config.admin,
            live: RwLock::new(Arc::new(live)),
            hasher: SessionHasher::new(),
            limits,
            budget,
            drain_order,
            registry: Arc::new(Registry::default()),
            ready: AtomicBool::new(false),
            metrics_registry,
            metrics,
            history: History::default(),
            started: std::time::Instant::now(),
            shutdown,
        }
    }

    /// The configuration in force.
    pub fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The route serving an exact request path, as configured now.
    pub fn route(&self, path: &str) -> Option<Arc<RouteRuntime>> {
        self.live().route(path).cloned()
    }

    /// Puts a validated configuration in force for what arrives from now
    /// on; tabs and sessions stay as they are. Refused (nothing changes)
    /// if it moves a listener, which only a restart can do.
    /// Problems are `file:line:column: message`, at the `listen` key.
    pub fn reload(&self, config: Config) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let moved = |what: &str, at: &crate::config::Problem, old, new| {
            let mut p = at.clone();
            p.message = format!(
                "{what} cannot change on reload ({old} is in use; {new} asked): restart to move it"
            );
            p.to_string()
        };
        if config.server.listen != self.server.listen {
            problems.push(moved(
                "server.listen",
                &config.server.listen_at,
                self.server.listen,
                config.server.listen,
            ));
        }
        if config.admin.listen != self.admin.listen {
            problems.push(moved(
                "admin.listen",
                &config.admin.listen_at,
                self.admin.listen,
                config.admin.listen,
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let old = self.live();
        let live = Live {
            routes: route_runtimes(
                &config,
                &self.metrics,
                Some(&old),
                &self.shutdown,
                &self.budget,
                &self.drain_order,
            ),
            server: config.server,
            admin: config.admin,
            loaded_ms: unix_ms(),
        };
        self.limits.configure(&live.server);
        self.budget.set_limit(live.server.buffer_budget);
        *self
            .live
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(live);
        Ok(())
    }
}

/// The routes of `config`, each with its sessions' context. A route whose
/// path was already served keeps its metric handles (its counters and
/// savings ledger go on).
fn route_runtimes(
    config: &Config,
    metrics: &Metrics,
    old: Option<&Live>,
    shutdown: &watch::Receiver<()>,
    budget: &Arc<Budget>,
    drain_order: &Arc<DrainOrder>,
) -> Vec<Arc<RouteRuntime>> {
    config
        .routes
        .iter()
        .map(|route| {
            let route_metrics = old
                .and_then(|o| o.route(&route.path))
                .map(|rt| rt.ctx.metrics.clone())
                .unwrap_or_else(|| Arc::new(metrics.route(&route.path)));
            Arc::new(RouteRuntime {
                route: route.clone(),
                ctx: SessionContext {
                    route: route.clone(),
                    metrics: route_metrics,
                    shutdown: shutdown.clone(),
                    budget: budget.clone(),
                    drain_spread: config.server.drain_spread,
                    drain_order: drain_order.clone(),
                    tab_rate: config.server.tab_rate,
                },
            })
        })
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
