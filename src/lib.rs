//! tabmux: one upstream WebSocket per browser session, shared by its tabs.
//!
//! Every browser tab that opens a WebSocket normally opens its own connection
//! to the backend, and realtime platforms bill per connection. tabmux accepts
//! every tab's WebSocket, keys tabs by their session cookie, keeps one
//! upstream WebSocket per session, wraps what tabs send in a tab-id envelope,
//! and routes what the backend sends back to one, some or all of the tabs.
//!
//! # The data path, file by file
//!
//! ```text
//!  browser tab ──► listener ──► upgrade ──► session ◄──► upstream ──► backend
//!  (a socket the    accept,      admission,  one task per    dial, handshake
//!   session serves: TLS, HTTP    101 answer  session: owns   headers, wss
//!   `tab`)                                   the upstream, its
//!                                            tab table and sockets;
//!                                            its `envelope` decides
//! ```
//!
//! - [`config`]: `proxy.toml` → validated types (file → parsed → validated).
//! - [`listener`]: accept loop, TLS termination, hyper HTTP/1.1.
//! - [`upgrade`]: admission, step by step, and the 101 answer; hands the
//!   upgraded connection to its session.
//! - [`session`]: the session key, the registry and join path, and the
//!   per-session task, which serves its upstream and its tabs' sockets.
//! - [`envelope`]: one sans-IO state machine per envelope (`json`, `none`,
//!   `pusher`):
//!   events in, effects out; and the `json/1` codec, pure functions over
//!   bytes.
//! - [`tab`]: a tab's connection, read and written by its session's task: a
//!   hand-written reader and writer over tungstenite.
//! - [`upstream`]: dialling the backend, and the upstream socket.
//! - [`wsio`]: tungstenite over non-blocking sockets, shared by tabs and
//!   the upstream.
//! - [`cause`]: why a tab ended (code, reason, metric label, side), in one
//!   table; why an upstream was lost.
//! - [`queue`]: a tab's outbox, what waits while its socket is full.
//! - [`reconnect`]: the redial backoff (full jitter) and reconnect buffer.
//! - [`limits`]: tabs and sessions, per process and per client address,
//!   counted with RAII permits; [`rate`]: what one tab may send a second;
//!   [`client`]: who a connection is from (the
//!   TCP peer, a PROXY header's source, or a trusted proxy's
//!   `X-Forwarded-For`); [`proxy_protocol`]: the PROXY v1/v2 header.
//! - [`budget`]: the one account of message bytes held (`buffer_budget`);
//!   [`memory`]: freed memory given back to the system.
//! - [`shared`]: the state every connection task shares, with the
//!   configuration in force (replaced whole on SIGHUP).
//! - [`logging`]: the log, its reloadable level, and the lines kept out of
//!   it (a cookie never reaches it).
//! - [`metrics`], [`admin`], [`status`], [`history`]: Prometheus metrics,
//!   the admin endpoints, the live status page and its chart's history.
//! - [`server`]: binds the listeners and runs them until shutdown.
//! - [`tls`]: rustls configs (ring provider) and dev certificates.
//! - [`demo`]: `tabmux demo`, a backend, the proxy and a page in one process.

pub mod admin;
pub mod budget;
pub mod cause;
pub mod client;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod history;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod placement;
pub mod proxy_protocol;
pub mod queue;
pub mod rate;
pub mod reconnect;
pub mod server;
pub mod session;
pub mod shared;
pub mod status;
pub mod tab;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod wsio;

pub use config::Config;
pub use server::Proxy;
