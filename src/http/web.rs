//! The web client's listener (`--web-listen`): the page's assets, what the page needs
//! to know, and the upgrade of `/ws` to the chat protocol over WebSocket, with the
//! Origin check that keeps other sites' pages from opening it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{AsyncRead, AsyncWrite};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONNECTION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, HeaderMap, HeaderValue,
    ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
    X_CONTENT_TYPE_OPTIONS,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use smol_hyper::rt::FuturesIo;

use super::serve::{accept, builder, text};
use crate::metrics::Refusal;
use crate::rt::{self, TcpListener, TcpStream};
use crate::server::config::{HttpLimits, Origins, Shared};
use crate::server::websocket;
use crate::tls::TlsAcceptor;

/// The web client: plain HTML, CSS and JavaScript, no build step.
const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");
/// Scripts, styles and sockets from this origin only; pictures and media also from the
/// blob: URLs the client makes of received frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' blob:; media-src 'self' blob:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Serves the web client and the WebSocket until `stop` completes.
pub async fn run_web(
    listener: TcpListener,
    limits: HttpLimits,
    shared: Arc<Shared>,
    origins: Origins,
    stop: impl Future<Output = ()>,
) {
    let origins = Arc::new(origins);
    let metrics = shared.metrics.clone();
    let proxy = shared.config.proxy_protocol;
    accept(
        listener,
        &limits,
        proxy,
        metrics,
        stop,
        move |stream, client| {
            let shared = shared.clone();
            let origins = origins.clone();
            async move {
                crate::server::configure_socket(&stream);
                let peer = Peer {
                    socket: stream,
                    client,
                };
                let Some(tls) = &shared.config.tls else {
                    let io = peer.socket.clone();
                    return web_connection(io, peer, &limits, shared, origins).await;
                };
                let handshake =
                    Box::pin(TlsAcceptor::from(tls.current()).accept(peer.socket.clone()));
                match rt::timeout(limits.header_timeout, handshake).await {
                    Some(Ok(session)) => {
                        web_connection(session, peer, &limits, shared, origins).await
                    }
                    Some(Err(e)) => {
                        log::debug!("web: TLS handshake failed: {e}");
                        if let Some(m) = &shared.metrics {
                            m.refused(Refusal::tls_failed);
                        }
                    }
                    None => log::debug!("web: TLS handshake timed out"),
                }
            }
        },
    )
    .await
}

/// Whether `origins` let this upgrade through. Browsers always send Origin on a WebSocket upgrade; other clients (chat
/// libraries, tests) need not, and are not what cross-site hijacking abuses.
fn allowed(origins: &Origins, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if origins.allowed.is_empty() {
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        return host.is_some() && origin_host == host;
    }
    origins
        .allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

/// An HTTP connection's TCP socket and the address it counts as.
#[derive(Clone)]
struct Peer {
    socket: TcpStream,
    client: SocketAddr,
}

/// One HTTP connection of the web listener (`io` plain or TLS over `peer`'s socket). An
/// upgraded WebSocket leaves it and runs on a task of its own.
async fn web_connection<S>(
    io: S,
    peer: Peer,
    limits: &HttpLimits,
    shared: Arc<Shared>,
    origins: Arc<Origins>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let response = web_respond::<S>(req, &shared, &origins, &peer);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = builder(limits)
        .serve_connection(FuturesIo::new(io), service)
        .with_upgrades();
    if let Some(Err(e)) = rt::timeout(limits.connection_time, conn).await {
        log::debug!("web connection: {e}");
    }
}

fn web_respond<S>(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    origins: &Origins,
    peer: &Peer,
) -> Response<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if req.uri().path() == "/ws" {
        return upgrade::<S>(req, shared, origins, peer);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/" | "/index.html" => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/app.css" => asset(APP_CSS, "text/css; charset=utf-8"),
        "/config.json" => {
            let config = &shared.config;
            let body = format!(
                "{{\"maxFrameBytes\":{},\"auth\":{}}}\n",
                config.max_frame_bytes,
                config.auth.is_some()
            );
            let mut response = asset_response(Bytes::from(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Answers a WebSocket upgrade, and once hyper hands the connection over, serves the
/// protocol on it.
fn upgrade<S>(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    origins: &Origins,
    peer: &Peer,
) -> Response<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && header_has(headers, &UPGRADE, "websocket")
        && header_has(headers, &CONNECTION, "upgrade");
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return text(
            StatusCode::BAD_REQUEST,
            "this is the chat protocol over WebSocket: send a WebSocket upgrade\n".into(),
        );
    };
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket version 13 only\n".into(),
        );
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    if !allowed(origins, headers) {
        if let Some(m) = &shared.metrics {
            m.refused(Refusal::origin_refused);
        }
        let origin = headers
            .get(ORIGIN)
            .map(|o| String::from_utf8_lossy(o.as_bytes()));
        log::warn!(
            "refused a WebSocket from origin {} (see --web-allowed-origin)",
            origin.unwrap_or_default()
        );
        return text(
            StatusCode::FORBIDDEN,
            "this origin may not open the chat WebSocket\n".into(),
        );
    }
    if shared.drain.is_draining() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining: connect again and you will reach another\n".into(),
        );
    }
    let slot = match websocket::admit(shared, peer.client.ip()) {
        Ok(slot) => slot,
        Err(busy) => {
            let reason = busy.reason(shared);
            log::warn!("refusing a WebSocket from {}: {reason}", peer.client);
            if let Some(m) = &shared.metrics {
                m.refused(busy.refusal());
            }
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("server-busy: {reason}; try again later\n"),
            );
        }
    };
    let accept = websocket::accept_key(key.as_bytes());
    let upgraded = hyper::upgrade::on(&mut req);
    let (shared, socket, client) = (shared.clone(), peer.socket.clone(), peer.client);
    rt::spawn_conn(async move {
        let parts = match upgraded.await.map(|u| u.downcast::<FuturesIo<S>>()) {
            Ok(Ok(parts)) => parts,
            Ok(Err(_)) => return log::error!("web: an upgraded connection of an unknown type"),
            Err(e) => return log::debug!("web: upgrade failed: {e}"),
        };
        let io = parts.io.into_inner();
        websocket::serve(io, parts.read_buf.to_vec(), socket, client, slot, shared).await;
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// True when a comma-separated header lists `token` (case-insensitive).
fn header_has(headers: &HeaderMap, name: &hyper::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = asset_response(Bytes::from_static(body.as_bytes()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    response
}

fn asset_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    // The assets change with the binary; a reload after an upgrade gets the new ones.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
