//! The proxy as a whole: bind every listener, then serve until told to stop.
//!
//! [`Proxy::bind`] binds the tab listener and the admin listener (so an
//! address in use is an error before anything is served), and
//! [`Proxy::run`] serves both until its `shutdown` future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, Origins};
use crate::history::SAMPLE_EVERY;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::{admin, listener, memory, status};

/// A bound, not yet serving, proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    tabs: TcpListener,
    admin: TcpListener,
    /// Dropped to shut down: every accept loop and session holds a receiver.
    stop: watch::Sender<()>,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what} {addr}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

impl Proxy {
    /// Binds the tab and admin listeners of a validated configuration.
    pub async fn bind(config: Config) -> Result<Proxy, BindError> {
        let tabs = listen("server.listen", config.server.listen)?;
        let admin = listen("admin.listen", config.admin.listen)?;
        let mut metrics_registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut metrics_registry);
        let (stop, stopped) = watch::channel(());
        let shared = Arc::new(Shared::new(config, metrics_registry, metrics, stopped));
        Ok(Proxy {
            shared,
            tabs,
            admin,
            stop,
        })
    }

    /// Where tabs connect (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.tabs.local_addr().unwrap_or(self.shared.server.listen)
    }

    /// Where the admin endpoints are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The state shared with connection tasks (for tests and the demo).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` completes, then drains: stops accepting,
    /// closes every tab with 1001 and every upstream with 1000, and returns
    /// once all are closed or `shutdown_timeout` has passed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Proxy {
            shared,
            tabs,
            admin,
            stop,
        } = self;
        let stopped = stop.subscribe();
        let scheme = if shared.server.tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        let tab_addr = tabs.local_addr().ok();
        let live = shared.live();
        for rt in &live.routes {
            if rt.route.allowed_origins == Origins::Any {
                warn!(route = %rt.route.path, "allowed_origins = [\"*\"]: any web site may open tabs on this route");
            }
        }
        let admin_addr = admin.local_addr().ok();
        let tab_task = tokio::spawn(listener::serve(tabs, shared.clone(), stopped.clone()));
        // The admin listener serves through the drain (`/readyz` answers
        // 503 then), and stops once it is over.
        let (admin_stop, admin_stopped) = watch::channel(());
        let admin_task = tokio::spawn(admin::serve(
            admin,
            shared.clone(),
            shared.admin.max_connections,
            admin_stopped,
        ));
        tokio::spawn(memory::trim_after_bursts(
            shared.budget.clone(),
            stopped.clone(),
        ));
        tokio::spawn(sample_history(shared.clone(), stopped));
        shared.ready.store(true, Ordering::Release);
        if let Some(addr) = tab_addr {
            let routes: Vec<String> = live
                .routes
                .iter()
                .map(|r| format!("{} -> {}", r.route.path, r.route.upstream))
                .collect();
            info!(
                "tabs: listening on {scheme}://{addr} ({})",
                routes.join(", ")
            );
        }
        if let Some(addr) = admin_addr {
            info!("admin: listening on http://{addr} (/healthz, /readyz, /metrics, /)");
        }
        shutdown.await;
        let budget = shared.live().server.shutdown_timeout;
        info!(
            tabs = shared.limits.tabs_open(),
            sessions = shared.registry.len(),
            drain_spread = ?shared.live().server.drain_spread,
            "shutting down: closing tabs (1001) and upstreams (1000) within {budget:?}"
        );
        shared.ready.store(false, Ordering::Release);
        // Ranked: the sessions that have tabs (a lingering one ends at once).
        shared.drain_order.begin(shared.registry.with_tabs());
        // The signal: accept loops stop, sessions close their tabs and upstream.
        drop(stop);
        let drained = tokio::time::timeout(budget, drained(&shared)).await;
        if drained.is_err() {
            warn!(
                tabs = shared.limits.tabs_open(),
                sessions = shared.registry.len(),
                "shutdown_timeout passed with connections still open; exiting anyway"
            );
        }
        drop(admin_stop);
        let _ = tokio::join!(tab_task, admin_task);
    }
}

/// Samples the status page's history until shutdown.
async fn sample_history(shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {
                let (tabs, upstreams) = status::totals(&shared);
                shared.history.sample(tabs, upstreams);
                shared.limits.forget_idle();
            }
            _ = stop.changed() => return,
        }
    }
}

/// Completes once no session and no tab is left.
async fn drained(shared: &Shared) {
    loop {
        let session_ended = shared.registry.ended.notified();
        let tab_released = shared.limits.released.notified();
        tokio::pin!(session_ended, tab_released);
        // Register interest before checking, so no wake-up is missed.
        session_ended.as_mut().enable();
        tab_released.as_mut().enable();
        if shared.registry.is_empty() && shared.limits.tabs_open() == 0 {
            return;
        }
        tokio::select! {
            () = session_ended => {}
            () = tab_released => {}
        }
    }
}

/// Binds with a deep accept backlog: a page reload across many tabs, or a
/// reconnect storm, arrives all at once.
fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    let err = |source| BindError { what, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}
