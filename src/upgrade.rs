//! Admission: turns one HTTP request on a route path into a tab, or refuses it.
//!
//! The checks run in this order, each with a short plain-text reason:
//! 426 not a WebSocket upgrade → 400 malformed handshake → 403 Origin not
//! allowed → 401 no session cookie (unless `missing_cookie = "direct"`) →
//! 429 proxy or session at its tab limit → the session's upstream dial
//! (401/403/404 passed through, else 502, or 504 on timeout). Only then is
//! the tab answered `101`, with the subprotocol the upstream chose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, field, info, Instrument};

use crate::config::MissingCookie;
use crate::server::{RouteRuntime, Shared};
use crate::session::{self, JoinInfo, Refusal};
use crate::tab;
use crate::upstream::DialParams;

/// The HTTP response type of the tab listener.
pub type HttpResponse = Response<Full<Bytes>>;

/// Counts tabs in the whole process against `server.max_tabs`.
pub struct TabLimiter {
    open: AtomicUsize,
    max: usize,
    /// Notified each time a slot is given back (the shutdown drain waits on it).
    pub released: Notify,
}

impl TabLimiter {
    pub fn new(max: usize) -> Arc<TabLimiter> {
        Arc::new(TabLimiter {
            open: AtomicUsize::new(0),
            max,
            released: Notify::new(),
        })
    }

    /// Tabs open (or being admitted) right now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a slot, or returns None when the proxy is full.
    fn try_acquire(self: &Arc<Self>) -> Option<TabPermit> {
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(TabPermit(self.clone())),
                Err(now) => n = now,
            }
        }
    }
}

/// One slot of [`TabLimiter`], given back when dropped (however the tab ends).
pub struct TabPermit(Arc<TabLimiter>);

impl Drop for TabPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_waiters();
    }
}

/// Serves one request on the tab listener.
pub async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    peer: SocketAddr,
) -> Result<HttpResponse, Infallible> {
    let Some(rt) = shared.route(req.uri().path()) else {
        return Ok(refuse(
            StatusCode::NOT_FOUND,
            "no WebSocket route at this path",
        ));
    };
    let span = tracing::info_span!(
        "tab",
        route = %rt.route.path,
        %peer,
        session = field::Empty,
        tab = field::Empty
    );
    Ok(admit(req, &shared, rt, peer).instrument(span).await)
}

async fn admit(
    mut req: Request<Incoming>,
    shared: &Shared,
    rt: &RouteRuntime,
    peer: SocketAddr,
) -> HttpResponse {
    let route = &rt.route;
    let metrics = &rt.ctx.metrics;
    let headers = req.headers();
    if !wants_websocket(headers) {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this path serves WebSocket connections only",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    let key = match check_handshake(req.method(), req.version(), headers) {
        Ok(key) => key,
        Err(why) => {
            metrics.refused("handshake");
            info!(reason = why, "refused: malformed handshake");
            let mut r = refuse(StatusCode::BAD_REQUEST, why);
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return r;
        }
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| route.allowed_origins.allows(o));
        if !allowed {
            metrics.refused("origin");
            info!(origin = ?origin, "refused: origin not in allowed_origins");
            return refuse(StatusCode::FORBIDDEN, "origin not allowed");
        }
    }
    let protocols = requested_protocols(headers);
    let query = req.uri().query().unwrap_or("").to_string();
    let session_key = match find_cookie(headers, &route.session_cookie) {
        Some(value) => {
            let keyed_query = if route.forward_query {
                query.as_str()
            } else {
                ""
            };
            shared.hasher.shared(
                rt.index,
                value.as_bytes(),
                protocols.as_bytes(),
                keyed_query.as_bytes(),
            )
        }
        None if route.missing_cookie == MissingCookie::Direct => shared.hasher.direct(),
        None => {
            metrics.refused("cookie");
            info!("refused: no session cookie");
            return refuse(
                StatusCode::UNAUTHORIZED,
                &format!("missing session cookie `{}`", route.session_cookie),
            );
        }
    };
    let span = tracing::Span::current();
    span.record("session", field::display(session_key.name()));
    let Some(permit) = shared.tabs.try_acquire() else {
        metrics.refused("limit");
        info!("refused: proxy at max_tabs");
        return refuse(StatusCode::TOO_MANY_REQUESTS, "tabmux is at its tab limit");
    };

    let dial = DialParams {
        cookie: joined_header(headers, header::COOKIE, "; "),
        user_agent: headers.get(header::USER_AGENT).and_then(copied),
        origin: headers.get(header::ORIGIN).and_then(copied),
        forwarded_for: forwarded_for(headers, peer),
        forwarded_proto: if shared.server.tls.is_some() {
            "https"
        } else {
            "http"
        },
        protocols: (!protocols.is_empty())
            .then(|| HeaderValue::from_str(&protocols).ok())
            .flatten(),
        query: route.forward_query.then(|| query.clone()),
    };
    let info = JoinInfo {
        query,
        headers: route
            .open_event_headers
            .iter()
            .filter_map(|name| {
                let v = joined_header(headers, name.clone(), ", ")?;
                Some((
                    name.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                ))
            })
            .collect(),
    };
    let joined = match session::join(&rt.ctx, session_key, dial, info).await {
        Ok(joined) => joined,
        Err(refusal) => {
            let reason = match refusal {
                Refusal::SessionFull => "limit",
                Refusal::Dial(_) | Refusal::Gone => "upstream",
            };
            metrics.refused(reason);
            info!(error = %refusal, "refused");
            return refuse(refusal.status(), &refusal.to_string());
        }
    };
    span.record("tab", field::display(joined.tab));

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
        .body(Full::default())
        .unwrap_or_default();
    if let Some(p) = &joined.protocol {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let route = route.clone();
    tokio::spawn(
        async move {
            match on_upgrade.await {
                // The session serves the tab from now on.
                Ok(upgraded) => tab::attach(upgraded, joined, &route, permit),
                // The client went away before the switch; dropping `joined`
                // reports the tab's leave (1006) and `permit` frees its slot.
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    response
}

/// A refusal with a short plain-text body saying why. The connection is
/// closed after it: a refused client has no use for it, and an idle one
/// would hold a slot until the header timeout.
pub fn refuse(status: StatusCode, why: &str) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONNECTION, "close")
        .body(Full::new(Bytes::from(format!("{why}\n"))))
        .unwrap_or_default()
}

/// Whether a header holds `token` in its comma-separated list (any case).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn wants_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
}

/// Checks the rest of an RFC 6455 opening handshake; returns the client key.
pub fn check_handshake(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<Vec<u8>, &'static str> {
    if method != Method::GET {
        return Err("a WebSocket handshake must use GET");
    }
    if version < Version::HTTP_11 {
        return Err("a WebSocket handshake needs HTTP/1.1");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the Connection header must include Upgrade");
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err("exactly one Sec-WebSocket-Key is required");
    };
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
    if !decoded.is_ok_and(|k| k.len() == 16) {
        return Err("Sec-WebSocket-Key must be 16 bytes in base64");
    }
    Ok(key.as_bytes().to_vec())
}

/// The value of the session cookie, if the request has a non-empty one
/// (the first, when several Cookie headers or pairs carry it).
pub fn find_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name && !c.value_trimmed().is_empty())
        .map(|c| c.value_trimmed().to_string())
}

/// The requested subprotocols, in the tab's order, as one `a, b` list.
pub fn requested_protocols(headers: &HeaderMap) -> String {
    let mut out = String::new();
    for v in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(s) = v.to_str() else { continue };
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(p);
        }
    }
    out
}

/// All values of a header joined with `sep`, or None if absent.
fn joined_header(headers: &HeaderMap, name: header::HeaderName, sep: &str) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(sep.as_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&out).ok()
}

/// A header value in an allocation of its own. A value hyper parsed is a
/// slice of the connection's whole read buffer (8 KiB or more): a session
/// that kept one for its redials would keep that buffer alive.
fn copied(v: &HeaderValue) -> Option<HeaderValue> {
    HeaderValue::from_bytes(v.as_bytes()).ok()
}

/// The tab's own `X-Forwarded-For`, if any, with its peer address appended.
fn forwarded_for(headers: &HeaderMap, peer: SocketAddr) -> Option<HeaderValue> {
    let ip = peer.ip().to_string();
    let value = match joined_header(
        headers,
        header::HeaderName::from_static("x-forwarded-for"),
        ", ",
    ) {
        Some(prior) => format!("{}, {ip}", String::from_utf8_lossy(prior.as_bytes())),
        None => ip,
    };
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn kept_header_values_do_not_share_the_request_buffer() {
        // hyper's parsed values are slices of its read buffer.
        let buffer = Bytes::from_static(b"Mozilla/5.0 and the rest of the request");
        let parsed = HeaderValue::from_maybe_shared(buffer.slice(0..11)).unwrap();
        let kept = copied(&parsed).unwrap();
        assert_eq!(kept, parsed);
        assert_ne!(kept.as_bytes().as_ptr(), parsed.as_bytes().as_ptr());
    }

    #[test]
    fn cookie_is_found_among_others_and_must_be_non_empty() {
        let h = headers(&[("cookie", "a=1; sessionid=abc; b=2")]);
        assert_eq!(find_cookie(&h, "sessionid").as_deref(), Some("abc"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "sessionid=\"q\"")]);
        assert_eq!(find_cookie(&h, "sessionid").as_deref(), Some("q"));
        let h = headers(&[("cookie", "sessionid=; other=x")]);
        assert_eq!(find_cookie(&h, "sessionid"), None);
        let h = headers(&[("cookie", "xsessionid=1")]);
        assert_eq!(find_cookie(&h, "sessionid"), None);
    }

    #[test]
    fn subprotocols_keep_their_order() {
        let h = headers(&[
            ("sec-websocket-protocol", "b, a"),
            ("sec-websocket-protocol", "c"),
        ]);
        assert_eq!(requested_protocols(&h), "b, a, c");
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let peer: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(forwarded_for(&h, peer).unwrap(), "1.2.3.4, 10.0.0.9");
        assert_eq!(forwarded_for(&HeaderMap::new(), peer).unwrap(), "10.0.0.9");
    }

    #[test]
    fn handshake_checks() {
        let good = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(check_handshake(&Method::GET, Version::HTTP_11, &good).is_ok());
        assert!(check_handshake(&Method::POST, Version::HTTP_11, &good).is_err());
        assert!(check_handshake(&Method::GET, Version::HTTP_10, &good).is_err());
        let mut bad = good.clone();
        bad.insert("sec-websocket-key", HeaderValue::from_static("short"));
        assert!(check_handshake(&Method::GET, Version::HTTP_11, &bad).is_err());
        let mut bad = good.clone();
        bad.insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert!(check_handshake(&Method::GET, Version::HTTP_11, &bad).is_err());
    }
}
