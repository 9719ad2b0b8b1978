//! Configuration: `proxy.toml` text → spanned TOML document → validated [`Config`].
//!
//! The pipeline has three stages, each in this file:
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
//! The key names and defaults are the contract in `shared/CONFIG.md`; the keys
//! this project adds are documented in `proxy.toml` and the README.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use toml_edit::{Document, Item, TableLike};

use crate::tls;

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
    /// Present when `tls` is set: tabs connect with `wss://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_tabs: usize,
    pub shutdown_timeout: Duration,
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

/// `[admin]`: health, readiness, metrics and status.
#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
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

/// Whether the upstream speaks the tab-id envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    Json,
    None,
}

impl Envelope {
    /// The value of the `X-Tabmux-Envelope` header sent upstream.
    pub fn header_value(self) -> &'static str {
        match self {
            Envelope::Json => "json/1",
            Envelope::None => "none",
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
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    /// The full URL as written (used as the request target).
    pub uri: Uri,
    pub tls: bool,
    pub host: String,
    pub port: u16,
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
    pub max_tabs_per_session: usize,
    pub max_message_size: usize,
    pub tab_queue: usize,
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

/// More runtime threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: u64 = 1024;

/// hyper's smallest request buffer.
const MIN_HEADER_SIZE: usize = 8 * 1024;

const TOP_KEYS: &[&str] = &["server", "admin", "log", "route"];
const SERVER_KEYS: &[&str] = &[
    "listen",
    "tls",
    "max_tabs",
    "shutdown_timeout",
    "handshake_timeout",
    "max_header_size",
    "worker_threads",
];
const TLS_KEYS: &[&str] = &["cert", "key"];
const ADMIN_KEYS: &[&str] = &["listen"];
const LOG_KEYS: &[&str] = &["format", "level"];
const ROUTE_KEYS: &[&str] = &[
    "path",
    "upstream",
    "session_cookie",
    "missing_cookie",
    "allowed_origins",
    "envelope",
    "payload",
    "forward_query",
    "replay_first",
    "linger",
    "max_tabs_per_session",
    "max_message_size",
    "tab_queue",
    "reconnect_buffer",
    "reconnect",
    "dial_timeout",
    "ping_interval",
    "idle_timeout",
    "ca",
    "open_event_headers",
    "upstream_origin",
    "upstream_user_agent",
];
const RECONNECT_KEYS: &[&str] = &["initial", "max", "attempts"];

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![Problem {
                file: name.clone(),
                line: 0,
                column: 0,
                message: format!("cannot read the configuration file: {e}"),
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

/// Walks a parsed document and records every problem it finds.
struct Checker<'a> {
    text: &'a str,
    file: &'a str,
    base: &'a Path,
    problems: Vec<Problem>,
}

type Span = Option<std::ops::Range<usize>>;

impl Checker<'_> {
    fn into_error(self) -> ConfigError {
        ConfigError {
            problems: self.problems,
        }
    }

    /// Records a problem at a byte span (line and column count from 1).
    fn at(&mut self, span: Span, message: String) {
        let offset = span.map(|s| s.start).unwrap_or(0).min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.problems.push(Problem {
            file: self.file.to_string(),
            line,
            column,
            message,
        });
    }

    /// Checks that `item` is a table, reports its unknown keys, and returns it.
    fn table<'d>(
        &mut self,
        item: &'d Item,
        what: &str,
        allowed: &[&str],
    ) -> Option<&'d dyn TableLike> {
        let Some(table) = item.as_table_like() else {
            self.at(
                item.span(),
                format!("{what} must be a table, not {}", item.type_name()),
            );
            return None;
        };
        self.unknown_keys(table, &format!("in {what}"), allowed);
        Some(table)
    }

    /// Reports every key of `t` that is not in `allowed`, with its place
    /// and the keys allowed there. `place` reads "in [server]" and the like.
    fn unknown_keys(&mut self, t: &dyn TableLike, place: &str, allowed: &[&str]) {
        for (key, _) in t.iter() {
            if !allowed.contains(&key) {
                let span = t.key(key).and_then(|k| k.span());
                self.at(
                    span,
                    format!(
                        "unknown key `{key}` {place}; allowed keys: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn config(&mut self, root: &dyn TableLike) -> Option<Config> {
        self.unknown_keys(root, "at the top level", TOP_KEYS);
        let server = self.server(root.get("server"));
        let admin = self.admin(root.get("admin"));
        let log = self.log(root.get("log"));
        let routes = self.routes(root.get("route"));
        Some(Config {
            server: server?,
            admin: admin?,
            log: log?,
            routes: routes?,
        })
    }

    fn server(&mut self, item: Option<&Item>) -> Option<Server> {
        let Some(item) = item else {
            self.at(
                None,
                "missing table [server] (it needs at least `listen`)".into(),
            );
            return None;
        };
        let t = self.table(item, "[server]", SERVER_KEYS)?;
        let listen = self.required(t, "listen", "[server]", Self::addr);
        let tls = match t.get("tls") {
            None => Some(None),
            Some(item) => self.server_tls(item).map(Some),
        };
        let max_tabs = self.optional(t, "max_tabs", 100_000, Self::positive);
        let shutdown_timeout = self.optional(
            t,
            "shutdown_timeout",
            Duration::from_secs(10),
            Self::duration,
        );
        let handshake_timeout = self.optional(
            t,
            "handshake_timeout",
            Duration::from_secs(10),
            Self::duration,
        );
        let max_header_size = self.optional(t, "max_header_size", 32 * 1024, |c, item| {
            let n = c.size(item)?;
            if n < MIN_HEADER_SIZE {
                c.at(
                    item.span(),
                    format!("max_header_size must be at least {MIN_HEADER_SIZE} bytes (8KiB)"),
                );
                return None;
            }
            Some(n)
        });
        let worker_threads = self.optional(t, "worker_threads", None, |c, item| {
            let n = c.positive(item)?;
            if n > MAX_WORKER_THREADS {
                c.at(
                    item.span(),
                    format!("worker_threads must be at most {MAX_WORKER_THREADS}"),
                );
                return None;
            }
            Some(Some(n as usize))
        });
        Some(Server {
            listen: listen?,
            tls: tls?,
            max_tabs: max_tabs? as usize,
            shutdown_timeout: shutdown_timeout?,
            handshake_timeout: handshake_timeout?,
            max_header_size: max_header_size?,
            worker_threads: worker_threads?,
        })
    }

    fn server_tls(&mut self, item: &Item) -> Option<Arc<rustls::ServerConfig>> {
        let t = self.table(item, "[server] tls", TLS_KEYS)?;
        let cert = self.required(t, "cert", "[server] tls", Self::path);
        let key = self.required(t, "key", "[server] tls", Self::path);
        let (cert, key) = (cert?, key?);
        match tls::server_config(&cert, &key) {
            Ok(config) => Some(Arc::new(config)),
            Err(e) => {
                self.at(item.span(), format!("[server] tls: {e}"));
                None
            }
        }
    }

    fn admin(&mut self, item: Option<&Item>) -> Option<Admin> {
        let Some(item) = item else {
            self.at(None, "missing table [admin] (it needs `listen`)".into());
            return None;
        };
        let t = self.table(item, "[admin]", ADMIN_KEYS)?;
        let listen = self.required(t, "listen", "[admin]", Self::addr)?;
        Some(Admin { listen })
    }

    fn log(&mut self, item: Option<&Item>) -> Option<Log> {
        let default = Log {
            format: LogFormat::Pretty,
            level: "info".into(),
        };
        let Some(item) = item else {
            return Some(default);
        };
        let t = self.table(item, "[log]", LOG_KEYS)?;
        let format = self.optional(t, "format", LogFormat::Pretty, |c, item| {
            c.choice(
                item,
                &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
            )
        });
        let level = self.optional(t, "level", "info".to_string(), |c, item| {
            let s = c.string(item)?;
            match tracing_subscriber::EnvFilter::try_new(&s) {
                Ok(_) => Some(s),
                Err(e) => {
                    c.at(item.span(), format!("invalid log level `{s}`: {e}"));
                    None
                }
            }
        });
        Some(Log {
            format: format?,
            level: level?,
        })
    }

    fn routes(&mut self, item: Option<&Item>) -> Option<Vec<Arc<Route>>> {
        let Some(item) = item else {
            self.at(
                None,
                "no [[route]] is configured; at least one is required".into(),
            );
            return None;
        };
        let Some(array) = item.as_array_of_tables() else {
            self.at(
                item.span(),
                "`route` must be an array of tables, written [[route]]".into(),
            );
            return None;
        };
        let mut routes = Vec::new();
        let mut paths = HashSet::new();
        let mut ok = true;
        for (i, table) in array.iter().enumerate() {
            let what = format!("[[route]] #{}", i + 1);
            match self.route(table, &what) {
                Some(route) => {
                    if !paths.insert(route.path.clone()) {
                        let span = table.get("path").and_then(Item::span);
                        self.at(
                            span,
                            format!("{what}: path `{}` is used by an earlier route", route.path),
                        );
                        ok = false;
                    }
                    routes.push(Arc::new(route));
                }
                None => ok = false,
            }
        }
        if array.is_empty() {
            self.at(item.span(), "at least one [[route]] is required".into());
            ok = false;
        }
        ok.then_some(routes)
    }

    fn route(&mut self, table: &toml_edit::Table, what: &str) -> Option<Route> {
        let t: &dyn TableLike = table;
        self.unknown_keys(t, &format!("in {what}"), ROUTE_KEYS);
        let path = self.required(t, "path", what, |c, item| {
            let s = c.string(item)?;
            if !s.starts_with('/') || s.contains(['?', '#', ' ']) {
                c.at(
                    item.span(),
                    format!("path `{s}` must start with `/` and hold no `?`, `#` or space"),
                );
                return None;
            }
            Some(s)
        });
        let upstream = self.required(t, "upstream", what, Self::upstream_url);
        let session_cookie = self.optional(t, "session_cookie", "sessionid".into(), |c, item| {
            let s = c.string(item)?;
            let valid = !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            if !valid {
                c.at(item.span(), format!("`{s}` is not a valid cookie name"));
                return None;
            }
            Some(s)
        });
        let missing_cookie = self.optional(t, "missing_cookie", MissingCookie::Reject, |c, i| {
            c.choice(
                i,
                &[
                    ("reject", MissingCookie::Reject),
                    ("direct", MissingCookie::Direct),
                ],
            )
        });
        let allowed_origins = self.required(t, "allowed_origins", what, Self::origins);
        let envelope = self.optional(t, "envelope", Envelope::Json, |c, i| {
            c.choice(i, &[("json", Envelope::Json), ("none", Envelope::None)])
        });
        let payload = self.optional(t, "payload", Payload::Json, |c, i| {
            c.choice(i, &[("json", Payload::Json), ("text", Payload::Text)])
        });
        let forward_query = self.optional(t, "forward_query", true, Self::boolean);
        let replay_first = self.optional(t, "replay_first", 0, Self::non_negative);
        let linger = self.optional(t, "linger", Duration::from_secs(10), Self::duration_or_zero);
        let max_tabs_per_session = self.optional(t, "max_tabs_per_session", 32, Self::positive);
        let max_message_size = self.optional(t, "max_message_size", 1 << 20, Self::size);
        let tab_queue = self.optional(t, "tab_queue", 256, Self::positive);
        let reconnect_buffer = self.optional(t, "reconnect_buffer", 1 << 20, Self::size);
        let reconnect = self.optional(
            t,
            "reconnect",
            Reconnect {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
                attempts: 8,
            },
            Self::reconnect,
        );
        let dial_timeout = self.optional(t, "dial_timeout", Duration::from_secs(5), Self::duration);
        let ping_interval =
            self.optional(t, "ping_interval", Duration::from_secs(30), Self::duration);
        let idle_timeout =
            self.optional(t, "idle_timeout", Duration::from_secs(90), Self::duration);
        let ca = match t.get("ca") {
            None => Some(None),
            Some(item) => self.path(item).map(|p| Some((p, item.span()))),
        };
        let open_event_headers = self.optional(t, "open_event_headers", Vec::new(), |c, item| {
            let mut names = Vec::new();
            for s in c.string_list(item)? {
                match HeaderName::from_bytes(s.as_bytes()) {
                    Ok(name) => names.push(name),
                    Err(_) => {
                        c.at(item.span(), format!("`{s}` is not a valid header name"));
                        return None;
                    }
                }
            }
            Some(names)
        });
        let upstream_origin = self.optional_header(t, "upstream_origin");
        let upstream_user_agent = self.optional_header(t, "upstream_user_agent");

        // Cross-field rules, checked once the fields themselves are valid.
        let (envelope, upstream) = (envelope?, upstream?);
        if envelope == Envelope::None {
            if let Some(item) = t.get("payload") {
                self.at(
                    item.span(),
                    format!("{what}: `payload` applies to envelope = \"json\" only"),
                );
            }
        } else if replay_first.is_some_and(|n| n > 0) {
            let span = t.get("replay_first").and_then(Item::span);
            self.at(
                span,
                format!("{what}: `replay_first` applies to envelope = \"none\" only"),
            );
        }
        if let Some(Some((_, span))) = &ca {
            if !upstream.tls {
                self.at(
                    span.clone(),
                    format!("{what}: `ca` is set but the upstream is ws://, not wss://"),
                );
            }
        }
        if let (Some(ping), Some(idle)) = (ping_interval, idle_timeout) {
            if idle <= ping {
                let span = t
                    .get("idle_timeout")
                    .or(t.get("ping_interval"))
                    .and_then(Item::span);
                self.at(
                    span,
                    format!("{what}: idle_timeout ({idle:?}) must be longer than ping_interval ({ping:?}), or healthy peers are closed before they are pinged"),
                );
            }
        }
        if let (Some(r), Some(span)) = (&reconnect, t.get("reconnect").and_then(Item::span)) {
            if r.initial > r.max {
                self.at(
                    Some(span),
                    format!("{what}: reconnect.initial is larger than reconnect.max"),
                );
            }
        }
        let upstream_tls = if upstream.tls {
            let ca_path = ca.clone().flatten().map(|(p, _)| p);
            match tls::client_config(ca_path.as_deref()) {
                Ok(config) => Some(Arc::new(config)),
                Err(e) => {
                    let span = ca.clone().flatten().and_then(|(_, s)| s);
                    self.at(span, format!("{what}: {e}"));
                    None
                }
            }
        } else {
            None
        };

        Some(Route {
            path: path?,
            upstream,
            session_cookie: session_cookie?,
            missing_cookie: missing_cookie?,
            allowed_origins: allowed_origins?,
            envelope,
            payload: payload?,
            forward_query: forward_query?,
            replay_first: replay_first? as usize,
            linger: linger?,
            max_tabs_per_session: max_tabs_per_session? as usize,
            max_message_size: max_message_size?,
            tab_queue: tab_queue? as usize,
            reconnect_buffer: reconnect_buffer?,
            reconnect: reconnect?,
            dial_timeout: dial_timeout?,
            ping_interval: ping_interval?,
            idle_timeout: idle_timeout?,
            upstream_tls,
            open_event_headers: open_event_headers?,
            upstream_origin: upstream_origin?,
            upstream_user_agent: upstream_user_agent?,
        })
    }

    // ---- field helpers: each reports its own problem and returns None ----

    fn required<T>(
        &mut self,
        t: &dyn TableLike,
        key: &str,
        what: &str,
        parse: impl FnOnce(&mut Self, &Item) -> Option<T>,
    ) -> Option<T> {
        match t.get(key) {
            Some(item) => parse(self, item),
            None => {
                // Point at the table's first key, the nearest place we have.
                let span = t.iter().next().and_then(|(k, _)| t.key(k)?.span());
                self.at(span, format!("{what}: missing required key `{key}`"));
                None
            }
        }
    }

    fn optional<T>(
        &mut self,
        t: &dyn TableLike,
        key: &str,
        default: T,
        parse: impl FnOnce(&mut Self, &Item) -> Option<T>,
    ) -> Option<T> {
        match t.get(key) {
            Some(item) => parse(self, item),
            None => Some(default),
        }
    }

    fn optional_header(&mut self, t: &dyn TableLike, key: &str) -> Option<Option<HeaderValue>> {
        self.optional(t, key, None, |c, item| {
            let s = c.string(item)?;
            match HeaderValue::from_str(&s) {
                Ok(v) => Some(Some(v)),
                Err(_) => {
                    c.at(item.span(), format!("`{key}` is not a valid header value"));
                    None
                }
            }
        })
    }

    fn string(&mut self, item: &Item) -> Option<String> {
        match item.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.at(
                    item.span(),
                    format!("expected a string, found {}", item.type_name()),
                );
                None
            }
        }
    }

    fn string_list(&mut self, item: &Item) -> Option<Vec<String>> {
        let Some(array) = item.as_array() else {
            self.at(
                item.span(),
                format!("expected an array of strings, found {}", item.type_name()),
            );
            return None;
        };
        let mut out = Vec::new();
        for v in array.iter() {
            match v.as_str() {
                Some(s) => out.push(s.to_string()),
                None => {
                    self.at(
                        v.span(),
                        format!("expected a string, found {}", v.type_name()),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn choice<T: Copy>(&mut self, item: &Item, choices: &[(&str, T)]) -> Option<T> {
        let s = self.string(item)?;
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<_> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.at(
                    item.span(),
                    format!("`{s}` is not one of {}", names.join(", ")),
                );
                None
            }
        }
    }

    fn boolean(&mut self, item: &Item) -> Option<bool> {
        match item.as_bool() {
            Some(b) => Some(b),
            None => {
                self.at(
                    item.span(),
                    format!("expected true or false, found {}", item.type_name()),
                );
                None
            }
        }
    }

    fn non_negative(&mut self, item: &Item) -> Option<u64> {
        match item.as_integer() {
            Some(n) if n >= 0 => Some(n as u64),
            Some(n) => {
                self.at(item.span(), format!("{n} is negative"));
                None
            }
            None => {
                self.at(
                    item.span(),
                    format!("expected an integer, found {}", item.type_name()),
                );
                None
            }
        }
    }

    fn positive(&mut self, item: &Item) -> Option<u64> {
        let n = self.non_negative(item)?;
        if n == 0 {
            self.at(item.span(), "a limit of 0 is not allowed".into());
            return None;
        }
        Some(n)
    }

    fn addr(&mut self, item: &Item) -> Option<SocketAddr> {
        let s = self.string(item)?;
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(
                    item.span(),
                    format!("`{s}` is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\""),
                );
                None
            }
        }
    }

    fn path(&mut self, item: &Item) -> Option<PathBuf> {
        let s = self.string(item)?;
        if s.is_empty() {
            self.at(item.span(), "an empty path is not allowed".into());
            return None;
        }
        let p = PathBuf::from(&s);
        if p.is_absolute() {
            return Some(p);
        }
        let beside = self.base.join(&p);
        if beside.exists() || !p.exists() {
            Some(beside)
        } else {
            Some(p)
        }
    }

    fn duration(&mut self, item: &Item) -> Option<Duration> {
        let d = self.duration_or_zero(item)?;
        if d.is_zero() {
            self.at(item.span(), "a duration of 0 is not allowed here".into());
            return None;
        }
        Some(d)
    }

    fn duration_or_zero(&mut self, item: &Item) -> Option<Duration> {
        let s = self.string(item)?;
        match parse_duration(&s) {
            Some(d) => Some(d),
            None => {
                self.at(
                    item.span(),
                    format!("`{s}` is not a duration like \"250ms\", \"10s\", \"5m\" or \"1h\""),
                );
                None
            }
        }
    }

    fn size(&mut self, item: &Item) -> Option<usize> {
        let n = if let Some(n) = item.as_integer() {
            u64::try_from(n).ok()
        } else if let Some(s) = item.as_str() {
            parse_size(s)
        } else {
            None
        };
        match n {
            Some(0) => {
                self.at(item.span(), "a size of 0 is not allowed".into());
                None
            }
            Some(n) => Some(n as usize),
            None => {
                self.at(
                    item.span(),
                    "expected a size like \"64KiB\", \"1MiB\" or a number of bytes".into(),
                );
                None
            }
        }
    }

    fn upstream_url(&mut self, item: &Item) -> Option<UpstreamUrl> {
        let s = self.string(item)?;
        let bad = |c: &mut Self, why: &str| {
            c.at(item.span(), format!("upstream `{s}`: {why}"));
            None
        };
        let Ok(uri) = s.parse::<Uri>() else {
            return bad(self, "not a valid URL");
        };
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            Some("http" | "https") => return bad(self, "use ws:// or wss://, not http(s)://"),
            _ => return bad(self, "must start with ws:// or wss://"),
        };
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return bad(self, "has no host");
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Some(UpstreamUrl {
            uri,
            tls,
            host,
            port,
        })
    }

    fn origins(&mut self, item: &Item) -> Option<Origins> {
        let list = self.string_list(item)?;
        if list.is_empty() {
            self.at(
                item.span(),
                "allowed_origins is empty: list the sites allowed to connect, or [\"*\"] for any"
                    .into(),
            );
            return None;
        }
        if list.iter().any(|o| o == "*") {
            if list.len() > 1 {
                self.at(
                    item.span(),
                    "\"*\" allows every origin; it cannot be combined with others".into(),
                );
                return None;
            }
            return Some(Origins::Any);
        }
        for o in &list {
            // Browsers send scheme://host[:port], never a path or trailing slash;
            // an entry with one would silently never match.
            let ok = o.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
            }) || o == "null";
            if !ok {
                self.at(
                    item.span(),
                    format!("origin `{o}` is not of the form scheme://host[:port] (no path, no trailing slash)"),
                );
                return None;
            }
        }
        Some(Origins::List(list))
    }

    fn reconnect(&mut self, item: &Item) -> Option<Reconnect> {
        let t = self.table(item, "reconnect", RECONNECT_KEYS)?;
        let initial = self.optional(t, "initial", Duration::from_millis(100), Self::duration);
        let max = self.optional(t, "max", Duration::from_secs(5), Self::duration);
        let attempts = self.optional(t, "attempts", 8, Self::non_negative);
        let attempts = attempts?;
        let Ok(attempts) = u32::try_from(attempts) else {
            self.at(item.span(), "reconnect.attempts is too large".into());
            return None;
        };
        Some(Reconnect {
            initial: initial?,
            max: max?,
            attempts,
        })
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
        for r in &self.routes {
            let origins = match &r.allowed_origins {
                Origins::Any => "any origin (*)".to_string(),
                Origins::List(l) => l.join(", "),
            };
            let _ = writeln!(out, "route {} -> {}", r.path, r.upstream.uri);
            let _ = writeln!(
                out,
                "  envelope {}{}, cookie `{}` (missing: {}), origins: {origins}",
                r.envelope.header_value(),
                if r.envelope == Envelope::Json {
                    format!(" payload {:?}", r.payload).to_lowercase()
                } else {
                    format!(", replay_first {}", r.replay_first)
                },
                r.session_cookie,
                match r.missing_cookie {
                    MissingCookie::Reject => "401",
                    MissingCookie::Direct => "direct",
                },
            );
            let _ = writeln!(
                out,
                "  limits: {} tabs/session, {} B/message, tab_queue {}, reconnect_buffer {} B; linger {:?}",
                r.max_tabs_per_session, r.max_message_size, r.tab_queue, r.reconnect_buffer, r.linger
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
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:9001/ws"
allowed_origins = ["http://localhost:8080"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "proxy.toml", Path::new("."))
    }

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.max_tabs, 100_000);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(10));
        let r = &c.routes[0];
        assert_eq!(r.session_cookie, "sessionid");
        assert_eq!(r.missing_cookie, MissingCookie::Reject);
        assert_eq!(r.envelope, Envelope::Json);
        assert_eq!(r.payload, Payload::Json);
        assert!(r.forward_query);
        assert_eq!(r.linger, Duration::from_secs(10));
        assert_eq!(r.max_tabs_per_session, 32);
        assert_eq!(r.max_message_size, 1 << 20);
        assert_eq!(r.tab_queue, 256);
        assert_eq!(r.reconnect_buffer, 1 << 20);
        assert_eq!(
            r.reconnect,
            Reconnect {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
                attempts: 8
            }
        );
        assert_eq!(r.dial_timeout, Duration::from_secs(5));
        assert_eq!(r.ping_interval, Duration::from_secs(30));
        assert_eq!(r.idle_timeout, Duration::from_secs(90));
        assert_eq!(r.upstream.port, 9001);
        assert!(!r.upstream.tls);
        assert_eq!(c.log.format, LogFormat::Pretty);
    }

    #[test]
    fn unknown_key_names_key_place_and_allowed_keys() {
        let text = MINIMAL.replace("path = \"/ws\"", "path = \"/ws\"\nlingr = \"5s\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        let p = &err.problems[0];
        assert_eq!((p.line, p.column), (8, 1));
        assert!(p.message.contains("`lingr`"), "{p}");
        assert!(p.message.contains("allowed keys: path, upstream"), "{p}");
        assert!(p.to_string().starts_with("proxy.toml:8:1: "), "{p}");
    }

    #[test]
    fn every_problem_is_reported_in_one_run() {
        let text = r#"
[server]
listen = "nowhere"
max_tabs = 0
[admin]
listen = "127.0.0.1:9090"
extra = 1
[[route]]
path = "/ws"
upstream = "http://127.0.0.1:9001/ws"
allowed_origins = ["http://localhost:8080"]
linger = "soon"
max_message_size = "1 lightyear"
"#;
        let err = parse(text).unwrap_err();
        let lines: Vec<usize> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![3, 4, 7, 10, 12, 13], "{err}");
        assert!(err.to_string().contains("use ws:// or wss://"));
    }

    #[test]
    fn required_keys_are_required() {
        let err = parse("[server]\n[admin]\nlisten = \"127.0.0.1:1\"\n[[route]]\npath = \"/x\"\n")
            .unwrap_err();
        let all = err.to_string();
        assert!(all.contains("missing required key `listen`"), "{all}");
        assert!(all.contains("missing required key `upstream`"), "{all}");
        assert!(
            all.contains("missing required key `allowed_origins`"),
            "{all}"
        );
    }

    #[test]
    fn duplicate_paths_and_cross_field_rules() {
        let text = format!(
            "{MINIMAL}\n[[route]]\npath = \"/ws\"\nupstream = \"ws://h/\"\nallowed_origins = [\"*\"]\nreplay_first = 2\n"
        );
        let all = parse(&text).unwrap_err().to_string();
        assert!(all.contains("used by an earlier route"), "{all}");
        assert!(
            all.contains("replay_first` applies to envelope = \"none\" only"),
            "{all}"
        );
    }

    #[test]
    fn idle_timeout_must_outlast_the_ping_interval() {
        let text = format!("{MINIMAL}ping_interval = \"30s\"\nidle_timeout = \"30s\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("idle_timeout (30s) must be longer than ping_interval"),
            "{err}"
        );
    }

    #[test]
    fn worker_threads_is_optional_and_bounded() {
        assert_eq!(parse(MINIMAL).unwrap().server.worker_threads, None);
        let with = |n: &str| MINIMAL.replace("[admin]", &format!("worker_threads = {n}\n[admin]"));
        assert_eq!(parse(&with("1")).unwrap().server.worker_threads, Some(1));
        for bad in ["0", "5000", "\"two\""] {
            let err = parse(&with(bad)).unwrap_err().to_string();
            assert!(err.contains("proxy.toml:4:"), "{bad}: {err}");
        }
    }

    #[test]
    fn origins_must_be_exact_origins() {
        let text = MINIMAL.replace("http://localhost:8080\"]", "http://localhost:8080/\"]");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("no trailing slash"));
        let any = MINIMAL.replace("[\"http://localhost:8080\"]", "[\"*\"]");
        assert_eq!(parse(&any).unwrap().routes[0].allowed_origins, Origins::Any);
        let empty = MINIMAL.replace("[\"http://localhost:8080\"]", "[]");
        assert!(parse(&empty).is_err());
    }

    #[test]
    fn syntax_errors_have_a_place() {
        let err = parse("[server\nlisten = 1").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].line, 1);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("99999999999999999999s"), None);
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1MB"), None);
        assert_eq!(parse_size("99999999999GiB"), None);
    }
}
