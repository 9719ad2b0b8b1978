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
//!  (one task per    accept,      admission,  one task per    dial, handshake
//!   tab: `tab`)     TLS, HTTP    101 answer  session: owns   headers, wss
//!                                            the upstream and
//!                                            its tab table
//! ```
//!
//! - [`config`]: `proxy.toml` → validated types (file → parsed → validated).
//! - [`listener`]: accept loop, TLS termination, hyper HTTP/1.1.
//! - [`upgrade`]: admission checks and the 101 answer; hands the upgraded
//!   connection to [`tab`].
//! - [`tab`]: one task per tab socket, browser ⇄ session: a hand-written
//!   poll loop, since every open tab costs one and every delivery wakes one.
//! - [`session`]: the registry of sessions and the per-session actor.
//! - [`upstream`]: dialling the backend.
//! - [`queue`]: the bounded, idle-cheap queue from a session to a tab.
//! - [`reconnect`]: the redial backoff (full jitter) and reconnect buffer.
//! - [`envelope`]: the `json/1` envelope codec, pure functions over bytes.
//! - [`metrics`], [`admin`], [`status`]: Prometheus metrics, the admin
//!   endpoints and the live status page.
//! - [`server`]: binds the listeners and runs them until shutdown.
//! - [`tls`]: rustls configs (ring provider) and dev certificates.
//! - [`demo`]: `tabmux demo`, a backend, the proxy and a page in one process.

pub mod admin;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod listener;
pub mod metrics;
pub mod queue;
pub mod reconnect;
pub mod server;
pub mod session;
pub mod status;
pub mod tab;
pub mod tls;
pub mod upgrade;
pub mod upstream;

pub use config::Config;
pub use server::Proxy;
