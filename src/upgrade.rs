//! Admission: turns one HTTP request on a route path into a tab, or refuses it.
//!
//! The checks run in this order, each with a short plain-text reason:
//! 426 not a WebSocket upgrade → 400 malformed handshake → 403 Origin not
//! allowed → 401 no session cookie (unless `missing_cookie = "direct"`) →
//! 429 a tab limit (`max_tabs`, `per_ip.tabs`, `max_tabs_per_session`), or a
//! session limit for a tab that would open one (`max_sessions`,
//! `per_ip.sessions`) → the session's upstream dial
//! (401/403/404 passed through, else 502, or 504 on timeout). Only then is
//! the tab answered `101`, with the subprotocol the upstream chose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, field, info, Instrument};

use crate::cause::Refusal;
use crate::client::Client;
use crate::config::{Envelope, MissingCookie, Route};
use crate::envelope::graphql::Subprotocol;
use crate::envelope::TabId;
use crate::limits::{Handshake, TabPermit};
use crate::placement::Placement;
use crate::session::{JoinInfo, Joined, NewSession};
use crate::shared::{Live, RouteRuntime, Shared};
use crate::tab::Tab;
use crate::upstream::DialParams;

/// The HTTP response type of the tab listener.
pub type HttpResponse = Response<Full<Bytes>>;

/// Serves one request on the tab listener.
pub async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    client: Client,
    handshake: Handshake,
) -> Result<HttpResponse, Infallible> {
    let live = shared.live();
    let Some(rt) = live.route(req.uri().path()) else {
        return Ok(refuse(
            StatusCode::NOT_FOUND,
            "no WebSocket route at this path",
        ));
    };
    let client = client.behind(&live.server.trusted_proxies, req.headers());
    let span = tracing::info_span!(
        "tab",
        route = %rt.route.path,
        client = %client.ip(),
        session = field::Empty,
        tab = field::Empty
    );
    Ok(admit(req, &shared, &live, rt, client, handshake)
        .instrument(span)
        .await)
}

/// The answer to a refused handshake (its row of [`Refusal`]'s table),
/// counted and logged.
trait Answer {
    fn answer(self, rt: &RouteRuntime) -> HttpResponse;
}

impl Answer for Refusal {
    /// The answer to the tab, counted and logged.
    fn answer(self, rt: &RouteRuntime) -> HttpResponse {
        let row = self.row();
        if let Some(label) = row.label {
            rt.ctx.metrics.refused(label);
            info!(reason = %row.body, side = ?row.side, "refused");
        }
        let mut response = refuse(row.status, &row.body);
        let headers = response.headers_mut();
        match self {
            Refusal::NotWebSocket => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            Refusal::Handshake(_) => {
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            _ => {}
        }
        response
    }
}

/// The admission checks, in the order the module doc lists them.
async fn admit(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    live: &Live,
    rt: &Arc<RouteRuntime>,
    client: Client,
    handshake: Handshake,
) -> HttpResponse {
    match admit_steps(req, shared, live, rt, client, handshake).await {
        Ok(switching) => switching,
        Err(refused) => refused.answer(rt),
    }
}

async fn admit_steps(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    live: &Live,
    rt: &Arc<RouteRuntime>,
    client: Client,
    handshake: Handshake,
) -> Result<HttpResponse, Refusal> {
    let route = &rt.route;
    let key = websocket_key(&req)?;
    check_origin(req.headers(), route)?;
    let protocols = requested_protocols(req.headers());
    let query = req.uri().query().unwrap_or("").to_string();
    let cookie = session_cookie(rt, req.headers())?;
    let keyed_query = if route.forward_query {
        query.as_str()
    } else {
        ""
    };
    if matches!(route.envelope, Envelope::Graphql | Envelope::Mqtt) {
        // Placed in its session once its `connection_init` (its CONNECT)
        // has come.
        let (protocol, mqtt, offered) = if route.envelope == Envelope::Mqtt {
            let offered = mqtt_offered(&protocols)?;
            // The upstream is always offered `mqtt`.
            (None, Some(offered), "mqtt")
        } else {
            let protocol = Subprotocol::choose(&protocols);
            (
                protocol,
                None,
                protocol.map(|p| p.name()).unwrap_or_default(),
            )
        };
        let permit = shared
            .limits
            .tab_after(client.limit_key(), handshake.take())
            .map_err(Refusal::Limit)?;
        let placement = Placement {
            shared: shared.clone(),
            rt: rt.clone(),
            keyed_query: keyed_query.to_string(),
            protocol,
            mqtt,
            new: new_session(shared, live, route, &req, client, offered, &query, &cookie),
            info: join_info(route, req.headers(), query.clone()),
            cookie,
        };
        return Ok(place_later(&mut req, key, placement, permit));
    }
    let (session_key, own) = match &cookie {
        Some(value) => {
            let key = shared.hasher.shared(
                &route.path,
                value,
                protocols.as_bytes(),
                keyed_query.as_bytes(),
            );
            (key, false)
        }
        None => (shared.hasher.direct(), true),
    };
    let span = tracing::Span::current();
    span.record("session", field::display(session_key.name()));
    // The connection's handshake slot becomes the tab's.
    let permit = shared
        .limits
        .tab_after(client.limit_key(), handshake.take())
        .map_err(Refusal::Limit)?;
    let new = NewSession {
        dial: dial_params(live, route, req.headers(), client, &protocols, &query),
        linger: if own {
            std::time::Duration::ZERO
        } else {
            route.linger
        },
        limits: shared.limits.clone(),
        client: client.limit_key(),
    };
    let info = join_info(route, req.headers(), query);
    let joined = shared
        .registry
        .join(&rt.ctx, session_key, &new, info, None)
        .await?;
    span.record("tab", field::display(joined.tab));
    let response = switching_protocols(&key, &joined);
    // The session serves the tab once hyper hands its connection over.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let route = route.clone();
    tokio::spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => hand_over(upgraded, joined, &route, permit),
                // The client went away before the switch; dropping `joined`
                // reports the tab's leave (1006) and `permit` frees its slot.
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    Ok(response)
}

/// An upgrade request with a well-formed handshake: its client key.
fn websocket_key(req: &Request<Incoming>) -> Result<Vec<u8>, Refusal> {
    if !wants_websocket(req.headers()) {
        return Err(Refusal::NotWebSocket);
    }
    check_handshake(req.method(), req.version(), req.headers()).map_err(Refusal::Handshake)
}

/// A browser's `Origin` must be in the route's allow list; a request
/// without one (not a browser) is allowed.
fn check_origin(headers: &HeaderMap, route: &Route) -> Result<(), Refusal> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if origin
        .to_str()
        .is_ok_and(|o| route.allowed_origins.allows(o))
    {
        return Ok(());
    }
    info!(origin = ?origin, "origin not in allowed_origins");
    Err(Refusal::Origin)
}

/// The session cookie's values, which key the tab's session (with its
/// subprotocols and, when forwarded, its query); None for a session of its
/// own (`missing_cookie = "direct"`).
fn session_cookie(rt: &RouteRuntime, headers: &HeaderMap) -> Result<Option<Vec<u8>>, Refusal> {
    let route = &rt.route;
    match find_cookie(headers, &route.session_cookie) {
        Some(value) => Ok(Some(value)),
        None if route.missing_cookie == MissingCookie::Direct => Ok(None),
        None => Err(Refusal::Cookie(route.session_cookie.clone())),
    }
}

/// What a tab placed later brings in case it opens its session: the
/// upstream is offered exactly the subprotocol the tab was answered with.
#[allow(clippy::too_many_arguments)]
fn new_session(
    shared: &Shared,
    live: &Live,
    route: &Route,
    req: &Request<Incoming>,
    client: Client,
    protocol: &str,
    query: &str,
    cookie: &Option<Vec<u8>>,
) -> NewSession {
    NewSession {
        dial: dial_params(live, route, req.headers(), client, protocol, query),
        linger: if cookie.is_some() {
            route.linger
        } else {
            std::time::Duration::ZERO
        },
        limits: shared.limits.clone(),
        client: client.limit_key(),
    }
}

/// Answers the tab's handshake at once (with the subprotocol it was
/// chosen), and places it in its session once its first frame has come
/// (`crate::placement`).
fn place_later(
    req: &mut Request<Incoming>,
    key: Vec<u8>,
    placement: Placement,
    permit: TabPermit,
) -> HttpResponse {
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
        .body(Full::default())
        .unwrap_or_default();
    let answered = match placement.mqtt {
        Some(offered) => offered.then_some("mqtt"),
        None => placement.protocol.map(|p| p.name()),
    };
    if let Some(p) = answered {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    let on_upgrade = hyper::upgrade::on(req);
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let route = placement.rt.route.clone();
                    let tab = Tab::from_upgraded(upgraded, TabId(0), &route, permit);
                    crate::placement::place(tab, placement).await;
                }
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    response
}

/// An `mqtt` tab's subprotocols: whether it offered `mqtt` (then it is
/// answered with it), or none at all (answered with none, as mosquitto
/// answers); only others is a refusal (400).
fn mqtt_offered(protocols: &str) -> Result<bool, Refusal> {
    if protocols.is_empty() {
        return Ok(false);
    }
    if protocols.split(',').any(|p| p.trim() == "mqtt") {
        return Ok(true);
    }
    Err(Refusal::Handshake(
        "the mqtt route speaks the subprotocol `mqtt` only",
    ))
}

/// What the tab contributes to the upstream handshake, if it opens the
/// session.
fn dial_params(
    live: &Live,
    route: &Route,
    headers: &HeaderMap,
    client: Client,
    protocols: &str,
    query: &str,
) -> DialParams {
    DialParams {
        cookie: forwarded_cookie(headers),
        user_agent: headers.get(header::USER_AGENT).and_then(copied),
        origin: headers.get(header::ORIGIN).and_then(copied),
        forwarded_for: forwarded_for(headers, client.peer),
        forwarded_proto: if live.server.tls.is_some() {
            "https"
        } else {
            "http"
        },
        protocols: (!protocols.is_empty())
            .then(|| HeaderValue::from_str(protocols).ok())
            .flatten(),
        query: route.forward_query.then(|| query.to_string()),
    }
}

/// What the tab tells its session's envelope: its query, and the request
/// headers the route copies into the `open` event.
fn join_info(route: &Route, headers: &HeaderMap, query: String) -> JoinInfo {
    JoinInfo {
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
    }
}

/// The `101` answer, with the subprotocol the upstream chose.
fn switching_protocols(key: &[u8], joined: &Joined) -> HttpResponse {
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key))
        .body(Full::default())
        .unwrap_or_default();
    if let Some(p) = &joined.protocol {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    response
}

/// Hands the connection hyper upgraded to the tab's session, which serves
/// it from now on.
fn hand_over(upgraded: hyper::upgrade::Upgraded, joined: Joined, route: &Route, permit: TabPermit) {
    let Joined { tab, link, .. } = joined;
    link.attach(Box::new(Tab::from_upgraded(upgraded, tab, route, permit)));
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

/// The session cookie's identity: every value the request gives it, in
/// order, length-prefixed, or None when it has no non-empty value.
///
/// A request may carry the cookie more than once (`sessionid=ATT;
/// sessionid=VIC`: a sibling subdomain can plant the second). Backends
/// differ in which one they read, and the upstream is sent the whole
/// header, so the session is keyed by all of them: a tab that sends only
/// one of the values never joins the session the pair opened.
pub fn find_cookie(headers: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    let mut identity = Vec::new();
    let mut any = false;
    for (_, c) in cookie_pairs(headers).filter(|(_, c)| c.name() == name) {
        let value = c.value_trimmed();
        any |= !value.is_empty();
        identity.extend_from_slice(&(value.len() as u32).to_be_bytes());
        identity.extend_from_slice(value.as_bytes());
    }
    any.then_some(identity)
}

/// The request's cookie pairs that parse, each with its text as sent.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, cookie::Cookie<'_>)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter_map(|pair| Some((pair, cookie::Cookie::parse(pair).ok()?)))
}

/// The `Cookie` header for the upstream: the pairs that [`find_cookie`]
/// reads, as the tab sent them, and nothing it could not read (a header
/// that is not UTF-8, a pair without `=`), so the backend sees exactly the
/// session cookie values the session was keyed by.
fn forwarded_cookie(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut out = String::new();
    for (pair, _) in cookie_pairs(headers) {
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(pair);
    }
    (!out.is_empty()).then(|| HeaderValue::from_str(&out).ok())?
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
        let one = |v: &str| {
            let mut out = (v.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(v.as_bytes());
            out
        };
        let h = headers(&[("cookie", "a=1; sessionid=abc; b=2")]);
        assert_eq!(find_cookie(&h, "sessionid"), Some(one("abc")));
        let h = headers(&[("cookie", "a=1"), ("cookie", "sessionid=\"q\"")]);
        assert_eq!(find_cookie(&h, "sessionid"), Some(one("q")));
        let h = headers(&[("cookie", "sessionid=; other=x")]);
        assert_eq!(find_cookie(&h, "sessionid"), None);
        let h = headers(&[("cookie", "xsessionid=1")]);
        assert_eq!(find_cookie(&h, "sessionid"), None);
    }

    #[test]
    fn the_upstream_gets_the_cookie_pairs_the_key_was_made_of() {
        let mut h = headers(&[("cookie", "a=1;sessionid=ATT ; sessionid; b=\"2\"")]);
        h.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"sessionid=\xffVIC").unwrap(),
        );
        let sent = forwarded_cookie(&h).unwrap();
        assert_eq!(sent, "a=1; sessionid=ATT; b=\"2\"");
        assert_eq!(forwarded_cookie(&headers(&[("cookie", "junk")])), None);
    }

    #[test]
    fn a_cookie_given_twice_is_keyed_by_all_its_values_in_order() {
        let id = |c: &str| find_cookie(&headers(&[("cookie", c)]), "sessionid");
        let pair = id("sessionid=ATT; sessionid=VIC");
        assert!(pair.is_some());
        assert_ne!(pair, id("sessionid=ATT"));
        assert_ne!(pair, id("sessionid=VIC"));
        assert_ne!(pair, id("sessionid=VIC; sessionid=ATT"));
        // Not a concatenation: "AT" + "TVIC" is another identity.
        assert_ne!(pair, id("sessionid=AT; sessionid=TVIC"));
        // An empty value counts where it stands.
        assert_ne!(id("sessionid=; sessionid=VIC"), id("sessionid=VIC"));
        // Over two headers, as over two pairs of one.
        let two = find_cookie(
            &headers(&[("cookie", "sessionid=ATT"), ("cookie", "sessionid=VIC")]),
            "sessionid",
        );
        assert_eq!(two, pair);
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
