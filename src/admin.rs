//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and the status page
//! (`/` and its data, `/status.json`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::shared::Shared;
use crate::status;

/// Serves admin requests until `stop`'s sender is dropped.
///
/// At most `admin.max_connections` connections are served at once: the
/// next is accepted once one closes (the kernel's backlog holds it
/// meanwhile, as haproxy's `maxconn` does). Each must send its request
/// head within `server.handshake_timeout`, and an idle keep-alive
/// connection is closed after the same time.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    mut stop: watch::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let timeout = shared.live().server.handshake_timeout;
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let Some((stream, _)) = crate::listener::accept(&listener, &mut stop).await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, shared.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()));
    }
    if !host_allowed(&req, &shared.live().admin.allowed_hosts) {
        return Ok(text(
            StatusCode::MISDIRECTED_REQUEST,
            "this Host is not served here (admin.allowed_hosts)\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if shared.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            shared.metrics.sample(&shared.budget);
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &shared.metrics_registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                ),
            }
        }
        "/" => typed(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status::PAGE.into(),
        ),
        "/status.json" => typed(
            StatusCode::OK,
            "application/json",
            status::status_json(&shared).to_string(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

/// Whether the request names this listener by an IP address, `localhost`
/// or a name in `allowed`, or names nothing (an HTTP/1.0 health check).
///
/// A web page on `evil.example` whose name is made to resolve to 127.0.0.1
/// (DNS rebinding) could otherwise read the admin listener from the
/// victim's browser: the browser sends `Host: evil.example`.
fn host_allowed<B>(req: &Request<B>, allowed: &[String]) -> bool {
    // An absolute-form target names the host itself, and wins over Host.
    let named = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => match req.headers().get(header::HOST) {
            None => return true,
            Some(v) => match v
                .to_str()
                .ok()
                .and_then(|v| v.parse::<http::uri::Authority>().ok())
            {
                Some(a) => a.host().to_string(),
                None => return false,
            },
        },
    };
    let host = named.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    typed(status, "text/plain; charset=utf-8", body)
}

fn typed(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::get(target);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_addresses_localhost_and_allowed_names_are_answered() {
        let allowed = vec!["tabmux-admin.internal".to_string()];
        for ok in [
            "127.0.0.1:9090",
            "10.1.2.3",
            "[::1]:9090",
            "localhost:9090",
            "LOCALHOST",
            "tabmux-admin.internal:9090",
            "TABMUX-ADMIN.internal",
        ] {
            assert!(host_allowed(&req("/metrics", Some(ok)), &allowed), "{ok}");
        }
        for no in [
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
            "a b",
        ] {
            assert!(!host_allowed(&req("/metrics", Some(no)), &allowed), "{no}");
        }
        // No Host at all: an HTTP/1.0 health check.
        assert!(host_allowed(&req("/healthz", None), &allowed));
        // An absolute-form target is the name that counts.
        let absolute = req("http://evil.example/metrics", Some("127.0.0.1"));
        assert!(!host_allowed(&absolute, &allowed));
    }
}
