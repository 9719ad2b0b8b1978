//! The checker: walks a parsed document table by table and collects every
//! problem, each at its `file:line:column`. The `[server]`, `[admin]` and
//! `[log]` tables and the kinds of field every table uses are here; the
//! routes are in [`super::route`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use toml_edit::{Item, TableLike};

use super::*;
use crate::tls;

/// More runtime threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: u64 = 1024;

/// hyper's smallest request buffer.
const MIN_HEADER_SIZE: usize = 8 * 1024;

const TOP_KEYS: &[&str] = &["server", "admin", "log", "route"];
const SERVER_KEYS: &[&str] = &[
    "listen",
    "tls",
    "max_tabs",
    "max_sessions",
    "per_ip",
    "tab_rate",
    "buffer_budget",
    "proxy_protocol",
    "trusted_proxies",
    "shutdown_timeout",
    "drain_spread",
    "handshake_timeout",
    "max_header_size",
    "worker_threads",
];
const TLS_KEYS: &[&str] = &["cert", "key"];
const PER_IP_KEYS: &[&str] = &["tabs", "sessions", "rate"];
const TAB_RATE_KEYS: &[&str] = &["messages", "bytes"];
const ADMIN_KEYS: &[&str] = &["listen", "public", "max_connections", "allowed_hosts"];
/// The levels a log filter directive may name.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
const LOG_KEYS: &[&str] = &["format", "level"];

/// Walks a parsed document and records every problem it finds.
pub(super) struct Checker<'a> {
    pub text: &'a str,
    pub file: &'a str,
    pub base: &'a Path,
    pub problems: Vec<Problem>,
    /// The keys read so far ([`Checker::optional`], [`Checker::required`],
    /// [`Checker::ask`]): a table checked with [`Checker::known_keys`]
    /// allows exactly the keys its parser read, so a new key is one line
    /// that reads it, with no separate list of allowed keys to keep.
    pub asked: Vec<&'static str>,
}

/// Where a key or value is in the text (bytes), if known.
pub(super) type Span = Option<std::ops::Range<usize>>;

impl Checker<'_> {
    pub(super) fn into_error(self) -> ConfigError {
        ConfigError {
            problems: self.problems,
        }
    }

    /// Records a problem at a byte span (line and column count from 1).
    pub(super) fn at(&mut self, span: Span, message: String) {
        let problem = self.problem(span, message);
        self.problems.push(problem);
    }

    /// A problem at `span` (its file, line and column), not yet reported.
    pub(super) fn problem(&self, span: Span, message: String) -> Problem {
        let offset = span.map(|s| s.start).unwrap_or(0).min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Problem {
            file: self.file.to_string(),
            line,
            column,
            message,
        }
    }

    /// Where `key` of `t` stands, for a problem found after parsing (a
    /// listener moved on reload).
    fn place_of(&self, t: &dyn TableLike, key: &str) -> Problem {
        let span = t.get(key).and_then(Item::span);
        self.problem(span, String::new())
    }

    /// Checks that `item` is a table, reports its unknown keys, and returns it.
    pub(super) fn table<'d>(
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

    /// A key read directly (`t.get`): known, as one read through
    /// [`Checker::optional`] is.
    pub(super) fn ask<'t>(&mut self, t: &'t dyn TableLike, key: &'static str) -> Option<&'t Item> {
        self.asked.push(key);
        t.get(key)
    }

    /// Reports every key of `t` that its parser did not read since `from`
    /// (a mark of [`Checker::asked`]), with its place and the keys allowed
    /// there; forgets those read.
    pub(super) fn known_keys(&mut self, t: &dyn TableLike, place: &str, from: usize) {
        let known: Vec<&str> = self.asked.drain(from..).collect();
        self.unknown_keys(t, place, &known);
    }

    /// Reports every key of `t` that is not in `allowed`, with its place
    /// and the keys allowed there. `place` reads "in [server]" and the like.
    pub(super) fn unknown_keys(&mut self, t: &dyn TableLike, place: &str, allowed: &[&str]) {
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

    pub(super) fn config(&mut self, root: &dyn TableLike) -> Option<Config> {
        self.unknown_keys(root, "at the top level", TOP_KEYS);
        let server = self.server(root.get("server"));
        let admin = self.admin(root.get("admin"));
        let log = self.log(root.get("log"));
        let routes = self.routes(root.get("route"));
        self.listeners(root);
        Some(Config {
            server: server?,
            admin: admin?,
            log: log?,
            routes: routes?,
        })
    }

    /// What only fails at run time: the two listeners on one address (the
    /// second bind fails, or one steals the other's connections), and an
    /// unauthenticated admin listener reachable from other machines.
    /// Checked from the addresses alone, so that it is reported whatever
    /// else is wrong in their tables.
    fn listeners(&mut self, root: &dyn TableLike) {
        let public = root
            .get("admin")
            .and_then(|a| a.as_table_like()?.get("public")?.as_bool())
            .unwrap_or(false);
        let listen = |table: &str| {
            let item = root.get(table)?.as_table_like()?.get("listen")?;
            let addr = item.as_str()?.parse::<SocketAddr>().ok()?;
            Some((addr, item.span()))
        };
        let (Some((a, _)), Some((b, span))) = (listen("server"), listen("admin")) else {
            return;
        };
        let overlap = a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified());
        if overlap {
            self.at(
                span.clone(),
                format!("admin.listen {b} overlaps server.listen {a}: they need different ports"),
            );
        }
        if !b.ip().is_loopback() && !public {
            self.at(
                span,
                format!("admin.listen {b} is not a loopback address: the admin listener has no authentication, so set `public = true` in [admin] if it must be reachable from other machines"),
            );
        }
    }

    pub(super) fn server(&mut self, item: Option<&Item>) -> Option<Server> {
        let Some(item) = item else {
            self.at(
                None,
                "missing table [server] (it needs at least `listen`)".into(),
            );
            return None;
        };
        let t = self.table(item, "[server]", SERVER_KEYS)?;
        let listen = self.required(t, "listen", "[server]", Self::addr);
        let listen_at = self.place_of(t, "listen");
        let tls = match t.get("tls") {
            None => Some(None),
            Some(item) => self.server_tls(item).map(Some),
        };
        let max_tabs = self.optional(t, "max_tabs", 100_000, Self::positive);
        let max_sessions = self.optional(t, "max_sessions", 50_000, Self::positive);
        let per_ip = self.optional(
            t,
            "per_ip",
            PerIp {
                tabs: 1000,
                sessions: 100,
                rate: TabRate::ADDRESS,
            },
            Self::per_ip,
        );
        let tab_rate = self.optional(t, "tab_rate", TabRate::default(), Self::tab_rate);
        let buffer_budget = self.optional(t, "buffer_budget", 512 << 20, Self::size);
        let proxy_protocol = self.optional(t, "proxy_protocol", false, Self::boolean);
        let trusted_proxies = self.optional(t, "trusted_proxies", Vec::new(), Self::networks);
        let shutdown_timeout = self.optional(
            t,
            "shutdown_timeout",
            Duration::from_secs(10),
            Self::duration,
        );
        let drain_spread = self.optional(t, "drain_spread", Duration::ZERO, Self::duration_or_zero);
        if let (Some(spread), Some(budget)) = (drain_spread, shutdown_timeout) {
            if spread > budget {
                let span = t.get("drain_spread").and_then(Item::span);
                self.at(
                    span,
                    format!(
                        "drain_spread ({spread:?}) must be at most shutdown_timeout ({budget:?})"
                    ),
                );
            }
        }
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
            listen_at,
            tls: tls?,
            max_tabs: max_tabs? as usize,
            max_sessions: max_sessions? as usize,
            per_ip: per_ip?,
            tab_rate: tab_rate?,
            buffer_budget: buffer_budget?,
            proxy_protocol: proxy_protocol?,
            trusted_proxies: trusted_proxies?,
            shutdown_timeout: shutdown_timeout?,
            drain_spread: drain_spread?,
            handshake_timeout: handshake_timeout?,
            max_header_size: max_header_size?,
            worker_threads: worker_threads?,
        })
    }

    pub(super) fn server_tls(&mut self, item: &Item) -> Option<Arc<rustls::ServerConfig>> {
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

    pub(super) fn admin(&mut self, item: Option<&Item>) -> Option<Admin> {
        let Some(item) = item else {
            self.at(None, "missing table [admin] (it needs `listen`)".into());
            return None;
        };
        let t = self.table(item, "[admin]", ADMIN_KEYS)?;
        let listen = self.required(t, "listen", "[admin]", Self::addr);
        let listen_at = self.place_of(t, "listen");
        let public = self.optional(t, "public", false, Self::boolean);
        let max_connections = self.optional(t, "max_connections", 64, Self::positive);
        let allowed_hosts = self.optional(t, "allowed_hosts", Vec::new(), Self::host_names);
        Some(Admin {
            listen: listen?,
            listen_at,
            public: public?,
            max_connections: max_connections? as usize,
            allowed_hosts: allowed_hosts?,
        })
    }

    fn per_ip(&mut self, item: &Item) -> Option<PerIp> {
        let t = self.table(item, "[server] per_ip", PER_IP_KEYS)?;
        let tabs = self.optional(t, "tabs", 1000, Self::positive);
        let sessions = self.optional(t, "sessions", 100, Self::positive);
        let rate = self.optional(t, "rate", TabRate::ADDRESS, |c, item| {
            c.rate(item, "[server] per_ip.rate", TabRate::ADDRESS)
        });
        Some(PerIp {
            tabs: tabs? as usize,
            sessions: sessions? as usize,
            rate: rate?,
        })
    }

    fn tab_rate(&mut self, item: &Item) -> Option<TabRate> {
        self.rate(item, "[server] tab_rate", TabRate::default())
    }

    /// A rate's table (`tab_rate`, `per_ip.rate`): messages and bytes a
    /// second, each defaulting to `default`'s.
    fn rate(&mut self, item: &Item, name: &str, default: TabRate) -> Option<TabRate> {
        let t = self.table(item, name, TAB_RATE_KEYS)?;
        let messages = self.optional(t, "messages", default.messages.into(), Self::positive);
        let bytes = self.optional(t, "bytes", default.bytes as usize, Self::size);
        let (messages, bytes) = (messages?, bytes?);
        Some(TabRate {
            messages: u32::try_from(messages).unwrap_or(u32::MAX),
            bytes: u64::try_from(bytes).unwrap_or(u64::MAX),
        })
    }

    pub(super) fn log(&mut self, item: Option<&Item>) -> Option<Log> {
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
            match check_log_filter(&s) {
                Ok(()) => Some(s),
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

    // ---- field helpers: each reports its own problem and returns None ----

    pub(super) fn required<T>(
        &mut self,
        t: &dyn TableLike,
        key: &'static str,
        what: &str,
        parse: impl FnOnce(&mut Self, &Item) -> Option<T>,
    ) -> Option<T> {
        self.asked.push(key);
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

    pub(super) fn optional<T>(
        &mut self,
        t: &dyn TableLike,
        key: &'static str,
        default: T,
        parse: impl FnOnce(&mut Self, &Item) -> Option<T>,
    ) -> Option<T> {
        self.asked.push(key);
        match t.get(key) {
            Some(item) => parse(self, item),
            None => Some(default),
        }
    }

    pub(super) fn optional_header(
        &mut self,
        t: &dyn TableLike,
        key: &'static str,
    ) -> Option<Option<HeaderValue>> {
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

    pub(super) fn string(&mut self, item: &Item) -> Option<String> {
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

    /// DNS names (`admin.allowed_hosts`), lower-cased; no port, no
    /// wildcard: each is answered exactly.
    fn host_names(&mut self, item: &Item) -> Option<Vec<String>> {
        let mut names = Vec::new();
        for s in self.string_list(item)? {
            let valid = !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                self.at(
                    item.span(),
                    format!("`{s}` is not a host name (letters, digits, `-` and `.`; no port)"),
                );
                return None;
            }
            names.push(s.to_ascii_lowercase());
        }
        Some(names)
    }

    pub(super) fn string_list(&mut self, item: &Item) -> Option<Vec<String>> {
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

    pub(super) fn choice<T: Copy>(&mut self, item: &Item, choices: &[(&str, T)]) -> Option<T> {
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

    /// A list of networks (`"10.0.0.0/8"`, `"2001:db8::/32"`) or single
    /// addresses (`"192.0.2.7"`).
    pub(super) fn networks(&mut self, item: &Item) -> Option<Vec<ipnet::IpNet>> {
        let mut out = Vec::new();
        for s in self.string_list(item)? {
            let net = s
                .parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from));
            match net {
                Some(net) => out.push(net.trunc()),
                None => {
                    self.at(
                        item.span(),
                        format!("`{s}` is not a network like \"10.0.0.0/8\" or an address"),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    pub(super) fn boolean(&mut self, item: &Item) -> Option<bool> {
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

    pub(super) fn non_negative(&mut self, item: &Item) -> Option<u64> {
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

    pub(super) fn positive(&mut self, item: &Item) -> Option<u64> {
        let n = self.non_negative(item)?;
        if n == 0 {
            self.at(item.span(), "a limit of 0 is not allowed".into());
            return None;
        }
        Some(n)
    }

    pub(super) fn addr(&mut self, item: &Item) -> Option<SocketAddr> {
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

    pub(super) fn path(&mut self, item: &Item) -> Option<PathBuf> {
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

    pub(super) fn duration(&mut self, item: &Item) -> Option<Duration> {
        let d = self.duration_or_zero(item)?;
        if d.is_zero() {
            self.at(item.span(), "a duration of 0 is not allowed here".into());
            return None;
        }
        Some(d)
    }

    pub(super) fn duration_or_zero(&mut self, item: &Item) -> Option<Duration> {
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

    pub(super) fn size(&mut self, item: &Item) -> Option<usize> {
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
}

/// A log filter is a level, or a comma-separated list of directives that
/// each end in a level (`info`, `tabmux=debug,hyper=warn`). A bare word
/// that is not a level would parse as a target with no level and leave the
/// log silent, so it is refused.
pub(super) fn check_log_filter(s: &str) -> Result<(), String> {
    let is_level = |l: &str| LOG_LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    for directive in s.split(',') {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !is_level(level) {
            return Err(format!(
                "`{}` does not end in a level ({})",
                directive.trim(),
                LOG_LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
