//! The `[[route]]` tables: each route's keys, the rules between them, and
//! the upstream's TLS client.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Uri};
use toml_edit::{Item, TableLike};

use super::check::{Checker, Span};
use super::{Envelope, MissingCookie, Origins, Payload, Reconnect, Route, UpstreamUrl};
use crate::envelope::graphql::Share;
use crate::tls;

/// The largest `max_message_size`: every byte of a message is held, and a
/// tab's partial-message count ([`crate::wsio::Partial`]) is 32 bits.
const MAX_MESSAGE_SIZE: usize = 1 << 30;
const RECONNECT_KEYS: &[&str] = &["initial", "max", "attempts"];

/// The `reconnect` default: 100 ms doubling up to 5 s, 8 attempts.
const DEFAULT_RECONNECT: Reconnect = Reconnect {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
    attempts: 8,
};

/// What [`Checker::route_rules`] compares: the keys that constrain each
/// other, each None when it was itself invalid.
struct RouteRules<'a> {
    envelope: Envelope,
    upstream: &'a UpstreamUrl,
    replay_first: Option<u64>,
    ca_span: Option<Span>,
    ping_interval: Option<Duration>,
    idle_timeout: Option<Duration>,
    reconnect: Option<&'a Reconnect>,
}

impl Checker<'_> {
    pub(super) fn routes(&mut self, item: Option<&Item>) -> Option<Vec<Arc<Route>>> {
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

    /// One `[[route]]` table, in four steps: its keys, each on its own
    /// (every problem is reported, not just the first); the rules between
    /// keys, once those keys are valid; the upstream's TLS client; the
    /// validated [`Route`].
    fn route(&mut self, table: &toml_edit::Table, what: &str) -> Option<Route> {
        let t: &dyn TableLike = table;
        // The keys allowed are the keys read below.
        let keys_from = self.asked.len();
        // Where tabs connect, where the session's upstream is, who shares it.
        let path = self.required(t, "path", what, Self::route_path);
        let upstream = self.required(t, "upstream", what, Self::upstream_url);
        let session_cookie =
            self.optional(t, "session_cookie", "sessionid".into(), Self::cookie_name);
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
        let forward_query = self.optional(t, "forward_query", true, Self::boolean);
        // What the envelope makes of frames.
        let envelope = self.optional(t, "envelope", Envelope::Json, |c, i| {
            c.choice(
                i,
                &[
                    ("json", Envelope::Json),
                    ("none", Envelope::None),
                    ("pusher", Envelope::Pusher),
                    ("graphql", Envelope::Graphql),
                    ("mqtt", Envelope::Mqtt),
                ],
            )
        });
        let payload = self.optional(t, "payload", Payload::Json, |c, i| {
            c.choice(i, &[("json", Payload::Json), ("text", Payload::Text)])
        });
        let replay_first = self.optional(t, "replay_first", 0, Self::non_negative);
        let open_event_headers =
            self.optional(t, "open_event_headers", Vec::new(), Self::header_names);
        let upstream_origin = self.optional_header(t, "upstream_origin");
        let upstream_user_agent = self.optional_header(t, "upstream_user_agent");
        // Limits and timers.
        let linger = self.optional(t, "linger", Duration::from_secs(10), Self::duration_or_zero);
        let client_events = self.optional(t, "client_events", true, Self::boolean);
        let client_event_rate = self.optional(t, "client_event_rate", 10, Self::positive);
        let share_subscriptions = self.optional(t, "share_subscriptions", Share::Off, |c, i| {
            c.choice(
                i,
                &[
                    ("off", Share::Off),
                    ("events", Share::Events),
                    ("live", Share::Live),
                ],
            )
        });
        let init_timeout = self.optional(t, "init_timeout", Duration::from_secs(3), Self::duration);
        let max_qos = self.optional(t, "max_qos", 2, |c, item| {
            let n = c.non_negative(item)?;
            if n > 2 {
                c.at(item.span(), "max_qos must be 0, 1 or 2".into());
                return None;
            }
            Some(n as u8)
        });
        let max_tabs_per_session = self.optional(t, "max_tabs_per_session", 32, Self::positive);
        let max_message_size = self.optional(t, "max_message_size", 1 << 20, |c, item| {
            let n = c.size(item)?;
            if n > MAX_MESSAGE_SIZE {
                c.at(item.span(), "max_message_size must be at most 1GiB".into());
                return None;
            }
            Some(n)
        });
        let tab_queue = self.optional(t, "tab_queue", 256, Self::positive);
        let tab_queue_bytes = self.optional(t, "tab_queue_bytes", 4 << 20, Self::size);
        let reconnect_buffer = self.optional(t, "reconnect_buffer", 1 << 20, Self::size);
        let reconnect = self.optional(t, "reconnect", DEFAULT_RECONNECT, Self::reconnect);
        let dial_timeout = self.optional(t, "dial_timeout", Duration::from_secs(5), Self::duration);
        let ping_interval =
            self.optional(t, "ping_interval", Duration::from_secs(30), Self::duration);
        let idle_timeout =
            self.optional(t, "idle_timeout", Duration::from_secs(90), Self::duration);
        let ca = match self.ask(t, "ca") {
            None => Some(None),
            Some(item) => self.path(item).map(|p| Some((p, item.span()))),
        };

        self.known_keys(t, &format!("in {what}"), keys_from);
        let (envelope, upstream) = (envelope?, upstream?);
        // An invalid `ca` has reported itself; the rules still run.
        let ca = ca.flatten();
        self.route_rules(
            t,
            what,
            RouteRules {
                envelope,
                upstream: &upstream,
                replay_first,
                ca_span: ca.as_ref().map(|(_, span)| span.clone()),
                ping_interval,
                idle_timeout,
                reconnect: reconnect.as_ref(),
            },
        );
        let upstream_tls = self.upstream_tls(what, &upstream, ca);

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
            client_events: client_events?,
            client_event_rate: u32::try_from(client_event_rate?).unwrap_or(u32::MAX),
            share_subscriptions: share_subscriptions?,
            init_timeout: init_timeout?,
            max_qos: max_qos?,
            max_tabs_per_session: max_tabs_per_session? as usize,
            max_message_size: max_message_size?,
            tab_queue: tab_queue? as usize,
            tab_queue_bytes: tab_queue_bytes?,
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

    /// The rules between a route's keys, checked once the keys themselves
    /// are valid (a key that failed has reported its own problem).
    fn route_rules(&mut self, t: &dyn TableLike, what: &str, r: RouteRules<'_>) {
        if r.envelope != Envelope::Json {
            if let Some(item) = t.get("payload") {
                self.at(
                    item.span(),
                    format!("{what}: `payload` applies to envelope = \"json\" only"),
                );
            }
        }
        let only = [
            (
                "share_subscriptions",
                &[Envelope::Graphql][..],
                "\"graphql\"",
            ),
            (
                "init_timeout",
                &[Envelope::Graphql, Envelope::Mqtt][..],
                "\"graphql\" or \"mqtt\"",
            ),
            ("max_qos", &[Envelope::Mqtt][..], "\"mqtt\""),
        ];
        for (key, envelopes, names) in only {
            if envelopes.contains(&r.envelope) {
                continue;
            }
            if let Some(item) = t.get(key) {
                self.at(
                    item.span(),
                    format!("{what}: `{key}` applies to envelope = {names} only"),
                );
            }
        }
        if r.envelope != Envelope::None && r.replay_first.is_some_and(|n| n > 0) {
            let span = t.get("replay_first").and_then(Item::span);
            self.at(
                span,
                format!("{what}: `replay_first` applies to envelope = \"none\" only"),
            );
        }
        if let Some(span) = r.ca_span {
            if !r.upstream.tls {
                self.at(
                    span,
                    format!("{what}: `ca` is set but the upstream is ws://, not wss://"),
                );
            }
        }
        if let (Some(ping), Some(idle)) = (r.ping_interval, r.idle_timeout) {
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
        if let (Some(r), Some(span)) = (r.reconnect, t.get("reconnect").and_then(Item::span)) {
            if r.initial > r.max {
                self.at(
                    Some(span),
                    format!("{what}: reconnect.initial is larger than reconnect.max"),
                );
            }
        }
    }

    /// The TLS client for a `wss://` upstream (the system's roots, plus the
    /// route's `ca`); None for `ws://`, or when it cannot be built (a
    /// problem then says why).
    fn upstream_tls(
        &mut self,
        what: &str,
        upstream: &UpstreamUrl,
        ca: Option<(PathBuf, Span)>,
    ) -> Option<Arc<rustls::ClientConfig>> {
        if !upstream.tls {
            return None;
        }
        let (ca_path, span) = match ca {
            Some((path, span)) => (Some(path), span),
            None => (None, None),
        };
        match tls::client_config(ca_path.as_deref()) {
            Ok(config) => Some(Arc::new(config)),
            Err(e) => {
                self.at(span, format!("{what}: {e}"));
                None
            }
        }
    }

    // ---- the route's own field kinds

    fn route_path(&mut self, item: &Item) -> Option<String> {
        let s = self.string(item)?;
        if !s.starts_with('/') || s.contains(['?', '#', ' ']) {
            self.at(
                item.span(),
                format!("path `{s}` must start with `/` and hold no `?`, `#` or space"),
            );
            return None;
        }
        // A request path arrives as visible ASCII (browsers percent-encode
        // the rest): any other path could never match.
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            self.at(
                item.span(),
                format!("path {s:?} holds a character no request path can: write it percent-encoded, as browsers send it (`/w%C5%9B` for `/wś`)"),
            );
            return None;
        }
        Some(s)
    }

    fn cookie_name(&mut self, item: &Item) -> Option<String> {
        let s = self.string(item)?;
        let valid = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !valid {
            self.at(item.span(), format!("`{s}` is not a valid cookie name"));
            return None;
        }
        Some(s)
    }

    fn header_names(&mut self, item: &Item) -> Option<Vec<HeaderName>> {
        let mut names = Vec::new();
        for s in self.string_list(item)? {
            match HeaderName::from_bytes(s.as_bytes()) {
                Ok(name) => names.push(name),
                Err(_) => {
                    self.at(item.span(), format!("`{s}` is not a valid header name"));
                    return None;
                }
            }
        }
        Some(names)
    }

    fn upstream_url(&mut self, item: &Item) -> Option<UpstreamUrl> {
        let s = self.string(item)?;
        let bad = |c: &mut Self, why: &str| {
            let shown = super::redacted(&s);
            c.at(item.span(), format!("upstream `{shown}`: {why}"));
            None
        };
        let Ok(uri) = s.parse::<Uri>() else {
            return bad(self, "not a valid URL");
        };
        let authority = uri.authority().map_or("", |a| a.as_str());
        if authority.contains('@') {
            // Not echoed: the message would show the password.
            self.at(
                item.span(),
                "the upstream URL holds credentials (user:password@): they would be sent as the Host header and shown in logs; pass them to the backend another way".into(),
            );
            return None;
        }
        // `http` drops a port that does not fit 16 bits, which would then
        // silently become 80 or 443.
        let after_host = &authority[authority.rfind(']').map_or(0, |i| i + 1)..];
        if let Some((_, port)) = after_host.rsplit_once(':') {
            if !port.is_empty() && !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return bad(self, "its port is out of range (1 to 65535)");
            }
        }
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
