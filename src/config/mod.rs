//! Configuration: `proxy.toml` text → spanned TOML document → validated [`Config`].
//!
//! The pipeline has three stages (the types and the entry points here, the
//! checker in `check`, the routes in `route`):
//!
//! 1. **Parse.** `toml_edit` parses the text and keeps the byte span of every
//!    key and value, so that every later problem can name its line and column.
//! 2. **Validate.** A `Checker` walks the document table by table. Unknown
//!    keys, wrong types and bad values are all collected (never only the first),
//!    each as a [`Problem`] carrying `file:line:column` and, for unknown keys,
//!    the keys allowed at that place.
//! 3. **Load.** Values that need the file system (TLS certificates and keys,
//!    extra CA roots) are loaded here too, so that `tabmux check` catches a
//!    missing key file and the proxy core only ever sees ready-to-use types:
//!    `SocketAddr`, `Duration`, byte counts, `rustls` configs.
//!
//! Operators' files rely on the key names and defaults: some are fixed (a
//! contract with the operators, marked "contract" in `proxy.toml`), and
//! every key is documented in `proxy.toml` and the README.

mod check;
mod route;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use toml_edit::Document;

use check::Checker;

/// A validated configuration. Built only by [`Config::from_toml`].
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub admin: Admin,
    pub log: Log,
    pub routes: Vec<Arc<Route>>,
}

/// `[server]`: the listener browser tabs connect to.
#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    /// Where `listen` stands in the file (a moved listener on reload is
    /// reported there); its message is empty.
    pub listen_at: Problem,
    /// Present when `tls` is set: tabs connect with `wss://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_tabs: usize,
    /// Sessions (upstream connections, lingering ones included) in the
    /// process; a tab that would open another gets 429.
    pub max_sessions: usize,
    /// Limits per client address.
    pub per_ip: PerIp,
    /// What one tab may send a second.
    pub tab_rate: TabRate,
    /// All message bytes the process may hold (tab queues, partly received
    /// messages, reconnect buffers, pending upstream writes).
    pub buffer_budget: usize,
    /// Every tab connection starts with a PROXY protocol (v1 or v2) header,
    /// whose source address is the client's.
    pub proxy_protocol: bool,
    /// Peers believed about `X-Forwarded-For`.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub shutdown_timeout: Duration,
    /// On shutdown, tab closes are spread evenly over this window (at most
    /// `shutdown_timeout`).
    pub drain_spread: Duration,
    /// How long a new connection may take to send its HTTP request headers
    /// (added key; a connection that sends nothing is dropped after this).
    pub handshake_timeout: Duration,
    /// The largest request head (request line and headers) accepted; a
    /// larger one is refused with 431 (added key).
    pub max_header_size: usize,
    /// Runtime worker threads (added key); None: one per core the process
    /// may run on. One means a single-threaded runtime.
    pub worker_threads: Option<usize>,
}

/// `server.per_ip`: what one client address may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIp {
    /// Tabs open at once.
    pub tabs: usize,
    /// Sessions opened from the address and still alive.
    pub sessions: usize,
    /// What all of the address's tabs may send a second, together.
    pub rate: TabRate,
}

/// `server.tab_rate`: what one tab may send a second. A burst of two
/// seconds of it is allowed; beyond, tabmux stops reading from the tab
/// until it is back under (TCP pushes back on it), and closes it with 1008
/// `rate limit` only if that lasts longer than the route's `idle_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TabRate {
    /// Messages a second.
    pub messages: u32,
    /// Bytes a second, as read from the socket (frame headers included).
    pub bytes: u64,
}

impl Default for TabRate {
    /// What a busy collaborative page never reaches: a thousand messages
    /// and 4 MiB a second, from one tab.
    fn default() -> Self {
        TabRate {
            messages: 1000,
            bytes: 4 << 20,
        }
    }
}

impl TabRate {
    /// `per_ip.rate`'s default: what all the tabs of one address may send
    /// together (ten busy tabs' worth of messages, eight of bytes), so that
    /// an address that keeps opening tabs, each with a fresh allowance,
    /// cannot take the proxy's time from everyone else behind it.
    pub const ADDRESS: TabRate = TabRate {
        messages: 10_000,
        bytes: 32 << 20,
    };
}

/// `[admin]`: health, readiness, metrics and status.
#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Where `listen` stands in the file; its message is empty.
    pub listen_at: Problem,
    /// Whether a non-loopback `listen` address is intended (the admin
    /// listener has no authentication).
    pub public: bool,
    /// Admin connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Host names answered besides IP addresses and `localhost`, lower
    /// case (others get 421: DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// What a route does with a tab that has no session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingCookie {
    /// Refuse the handshake with 401.
    Reject,
    /// Give the tab a session (and an upstream) of its own.
    Direct,
}

/// What the upstream speaks: the tab-id envelope, nothing tabmux reads,
/// or the Pusher Channels protocol (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    Json,
    None,
    Pusher,
    Graphql,
    Mqtt,
}

impl Envelope {
    /// The value of the `X-Tabmux-Envelope` header sent upstream.
    pub fn header_value(self) -> &'static str {
        match self {
            Envelope::Json => "json/1",
            Envelope::None => "none",
            Envelope::Pusher => "pusher/7",
            Envelope::Graphql => "graphql",
            Envelope::Mqtt => "mqtt",
        }
    }
}

/// How a tab's text messages are embedded in the `json` envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Tab text must be JSON and is embedded as is.
    Json,
    /// Tab text is embedded as a JSON string.
    Text,
}

/// The Origin allow list of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// `["*"]`: every origin is allowed (logged as a warning at start).
    Any,
    /// Exact, case-sensitive matches of the `Origin` header.
    List(Vec<String>),
}

impl Origins {
    /// Whether a request with this `Origin` header value may open a tab.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(list) => list.iter().any(|o| o == origin),
        }
    }
}

/// Redial policy after an upstream loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    pub initial: Duration,
    pub max: Duration,
    pub attempts: u32,
}

/// A validated `ws://` or `wss://` upstream address.
///
/// Displayed (and debug-printed) with its query values hidden, since API
/// keys travel there: logs, `check`, the status page and `/status.json`
/// show `?api_key=…`. Only the dial uses [`UpstreamUrl::uri`] itself.
#[derive(Clone)]
pub struct UpstreamUrl {
    /// The full URL as written (used as the request target).
    pub uri: Uri,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redacted(&self.uri.to_string()))
    }
}

impl std::fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamUrl({self})")
    }
}

/// `url` with the value of every query parameter (and any fragment)
/// replaced by `…`: `wss://h/p?api_key=…&v=…`. Works on any string, a URL
/// that does not parse included, so an error message can quote it.
pub fn redacted(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let query = query.split('#').next().unwrap_or("");
    let mut out = String::with_capacity(url.len());
    out.push_str(base);
    out.push('?');
    for (i, param) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match param.split_once('=') {
            Some((name, _)) => {
                out.push_str(name);
                out.push_str("=…");
            }
            None if param.is_empty() => {}
            None => out.push('…'),
        }
    }
    out
}

/// One `[[route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub upstream: UpstreamUrl,
    pub session_cookie: String,
    pub missing_cookie: MissingCookie,
    pub allowed_origins: Origins,
    pub envelope: Envelope,
    pub payload: Payload,
    pub forward_query: bool,
    pub replay_first: usize,
    pub linger: Duration,
    /// `envelope = "pusher"`: whether tabs may send client events (false
    /// refuses them at the edge).
    pub client_events: bool,
    /// `envelope = "pusher"`: client events a second for a whole session
    /// (the server counts them per connection, and a session is one).
    pub client_event_rate: u32,
    /// `envelope = "graphql"`: whether tabs share subscriptions.
    pub share_subscriptions: crate::envelope::graphql::Share,
    /// `envelope = "graphql"` or `"mqtt"`: how long a tab has to send its
    /// `connection_init` (its CONNECT) once its handshake is answered.
    pub init_timeout: Duration,
    /// `envelope = "mqtt"`: the highest QoS the server accepts from a
    /// client.
    pub max_qos: u8,
    pub max_tabs_per_session: usize,
    pub max_message_size: usize,
    pub tab_queue: usize,
    /// The same bound as `tab_queue`, in payload bytes.
    pub tab_queue_bytes: usize,
    pub reconnect_buffer: usize,
    pub reconnect: Reconnect,
    pub dial_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// TLS client config for a `wss://` upstream (system roots plus `ca`).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// Added key `open_event_headers`: request headers copied into the
    /// `open` event's `headers` object.
    pub open_event_headers: Vec<HeaderName>,
    /// Added key `upstream_origin`: replaces the tab's `Origin` upstream.
    pub upstream_origin: Option<HeaderValue>,
    /// Added key `upstream_user_agent`: replaces the tab's `User-Agent` upstream.
    pub upstream_user_agent: Option<HeaderValue>,
}

/// One thing wrong with a configuration file, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = read_config(path).map_err(|message| ConfigError {
            problems: vec![Problem {
                file: name.clone(),
                line: 0,
                column: 0,
                message,
            }],
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(&text, &name, &base)
    }

    /// Validates configuration text. `file` names it in problems; relative
    /// paths inside it (certificates, CA files) are looked up first in `base`
    /// (the file's directory), then in the working directory.
    pub fn from_toml(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut c = Checker {
            text,
            file,
            base,
            problems: Vec::new(),
            asked: Vec::new(),
        };
        let doc = match Document::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                c.at(e.span(), format!("invalid TOML: {}", e.message().trim()));
                return Err(c.into_error());
            }
        };
        let config = c.config(doc.as_table());
        match config {
            Some(config) if c.problems.is_empty() => Ok(config),
            _ => Err(c.into_error()),
        }
    }
}

impl Config {
    /// A short summary of the effective configuration, for `tabmux check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let s = &self.server;
        let mut out = String::new();
        let scheme = if s.tls.is_some() { "wss" } else { "ws" };
        let _ = writeln!(
            out,
            "tabs on {scheme}://{}, admin on http://{}; max_tabs {}, shutdown_timeout {:?}",
            s.listen, self.admin.listen, s.max_tabs, s.shutdown_timeout
        );
        let _ = writeln!(
            out,
            "max_sessions {}, per address {} tabs and {} sessions, buffer_budget {} B",
            s.max_sessions, s.per_ip.tabs, s.per_ip.sessions, s.buffer_budget
        );
        let _ = writeln!(
            out,
            "per tab at most {} messages and {} B a second, per address {} and {} B (burst: 2 s of it)",
            s.tab_rate.messages, s.tab_rate.bytes, s.per_ip.rate.messages, s.per_ip.rate.bytes
        );
        if s.proxy_protocol || !s.trusted_proxies.is_empty() {
            let nets: Vec<String> = s.trusted_proxies.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(
                out,
                "behind a load balancer: PROXY protocol {}, trusted proxies [{}]",
                if s.proxy_protocol { "required" } else { "off" },
                nets.join(", ")
            );
        }
        for r in &self.routes {
            let origins = match &r.allowed_origins {
                Origins::Any => "any origin (*)".to_string(),
                Origins::List(l) => l.join(", "),
            };
            let _ = writeln!(out, "route {} -> {}", r.path, r.upstream);
            let _ = writeln!(
                out,
                "  envelope {}{}, cookie `{}` (missing: {}), origins: {origins}",
                r.envelope.header_value(),
                match r.envelope {
                    Envelope::Json => format!(" payload {:?}", r.payload).to_lowercase(),
                    Envelope::None => format!(", replay_first {}", r.replay_first),
                    Envelope::Pusher => format!(
                        ", client_events {} ({}/s)",
                        r.client_events, r.client_event_rate
                    ),
                    Envelope::Graphql => format!(
                        ", share_subscriptions {:?}, init_timeout {:?}",
                        r.share_subscriptions, r.init_timeout
                    )
                    .to_lowercase(),
                    Envelope::Mqtt =>
                        format!(", max_qos {}, init_timeout {:?}", r.max_qos, r.init_timeout),
                },
                r.session_cookie,
                match r.missing_cookie {
                    MissingCookie::Reject => "401",
                    MissingCookie::Direct => "direct",
                },
            );
            let _ = writeln!(
                out,
                "  limits: {} tabs/session, {} B/message, tab_queue {} ({} B), reconnect_buffer {} B; linger {:?}",
                r.max_tabs_per_session, r.max_message_size, r.tab_queue, r.tab_queue_bytes, r.reconnect_buffer, r.linger
            );
            let _ = writeln!(
                out,
                "  redial {:?}..{:?} x{}, dial_timeout {:?}, ping {:?}, idle {:?}",
                r.reconnect.initial,
                r.reconnect.max,
                r.reconnect.attempts,
                r.dial_timeout,
                r.ping_interval,
                r.idle_timeout
            );
        }
        out
    }
}

/// The largest configuration file read.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// A configuration file's text: a regular file of at most 1 MiB, never read
/// past that (`--config /dev/zero` is refused, not read forever).
fn read_config(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read the configuration file: {e}"))?;
    if !meta.is_file() {
        return Err("the configuration file is not a regular file".into());
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_FILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read the configuration file: {e}"))?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err("the configuration file is larger than 1 MiB".into());
    }
    Ok(text)
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"` (a whole number and a unit).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Parses `"64KiB"`, `"1MiB"`, `"1GiB"`, `"512B"` or `"512"` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests;
