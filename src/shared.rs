//! The state every connection task shares: the configuration's routes with
//! their sessions' context, the session registry, the process-wide limits,
//! metrics and the status page's history. Built once by [`crate::server`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::{Admin, Route, Server};
use crate::history::History;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::session::{Registry, SessionContext, SessionHasher};

/// One route with the runtime state its sessions share.
pub struct RouteRuntime {
    /// Position in the config; part of every session key of this route.
    pub index: usize,
    pub route: Arc<Route>,
    pub ctx: SessionContext,
}

/// State shared by every connection task. Nothing in it is locked across an
/// `.await`: the session registry is a sharded map whose entries are only
/// touched to insert, look up or remove a handle.
pub struct Shared {
    pub server: Server,
    pub admin: Admin,
    pub routes: Vec<RouteRuntime>,
    pub hasher: SessionHasher,
    /// Tabs and sessions, in the process and per client address.
    pub limits: Arc<Limits>,
    /// Every message byte held, against `server.buffer_budget`.
    pub budget: Arc<crate::budget::Budget>,
    pub registry: Arc<Registry>,
    /// True once every listener accepts connections (`/readyz`).
    pub ready: AtomicBool,
    pub metrics_registry: prometheus_client::registry::Registry,
    pub metrics: Metrics,
    /// The status page's chart data.
    pub history: History,
    pub started: std::time::Instant,
}

impl Shared {
    /// The route serving an exact request path.
    pub fn route(&self, path: &str) -> Option<&RouteRuntime> {
        self.routes.iter().find(|r| r.route.path == path)
    }
}
