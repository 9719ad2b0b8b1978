//! Test harness, by role: the proxy under test and its configuration built
//! in code ([`proxy`]), tabs ([`tab`]), the mock backend ([`mock`], which
//! knows no envelope) and the `json` envelope on top of it ([`json`]).
//!
//! Nothing here sleeps: tests wait for conditions, each wait bounded by a
//! generous guard so a broken proxy fails the test instead of hanging it.
#![allow(dead_code, unused_imports)]
// tungstenite's handshake callback type returns a large error by design.
#![allow(clippy::result_large_err)]

pub mod graphql;
pub mod json;
pub mod mock;
pub mod mqtt;
pub mod proxy;
pub mod pusher;
pub mod raw;
pub mod sockudo;
pub mod tab;

use std::time::Duration;

pub use json::{echo, to_json};
pub use mock::{Behavior, Conn, Mock, Upstream};
pub use proxy::{
    admin_get, memory_returned, metric, peak_rss_mib, proxy, proxy_for, raw_http, reason_count,
    route, route_to, rss_mib, start_proxy, tabmux_bin, ProxyConfig, Raw, RouteConfig, Spawned,
    TestProxy,
};
pub use tab::{ClientIo, LiveTab, Tab, TabSpec};

/// How long any single wait may take before the test is failed. Not a timing
/// assertion: a guard against hanging forever.
pub const GUARD: Duration = Duration::from_secs(20);

/// Runs `f` under the guard, failing the test with `what` if it never ends.
pub async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
