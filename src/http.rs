//! HTTP: metrics, health and readiness for operators and orchestrators.
//!
//! hyper 1 (HTTP/1.1 only) on async-std sockets through smol-hyper's adapter: no
//! hand-written HTTP parsing. Its own listener, off by default (`--metrics-listen`), so
//! it can stay on a private interface. Clients are bounded like chat clients: a few
//! at a time, headers within a time and size limit, each connection within a total
//! time.
//!
//! - `GET /metrics`: the Prometheus (OpenMetrics) text exposition
//! - `GET /healthz`: 200 while the process serves
//! - `GET /readyz`: 200 when the store is open, 503 with a one-line reason otherwise
//! - anything else: 404

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{Either, select};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use smol_hyper::rt::{FuturesIo, SmolTimer};

use crate::metrics::Metrics;
use crate::rt::{self, TcpListener};

/// HTTP connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time for a request's headers to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one connection may stay, keep-alive included.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);
/// Largest request head buffered.
const MAX_HEAD: usize = 16 * 1024;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves until `stop` completes.
pub async fn run(listener: TcpListener, metrics: Arc<Metrics>, stop: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        log::info!("metrics, health and readiness on http://{addr}/metrics, /healthz, /readyz");
    }
    let open = Arc::new(AtomicUsize::new(0));
    let mut stop = std::pin::pin!(stop);
    loop {
        let accept = std::pin::pin!(listener.accept());
        let stream = match select(accept, stop.as_mut()).await {
            Either::Left((Ok((stream, _)), _)) => stream,
            Either::Left((Err(e), _)) => {
                log::debug!("metrics accept: {e}");
                rt::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Either::Right(_) => break,
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let metrics = metrics.clone();
        let open = open.clone();
        rt::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(SmolTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD);
            let conn = builder.serve_connection(FuturesIo::new(stream), service);
            if let Some(Err(e)) = rt::timeout(CONNECTION_LIMIT, conn).await {
                log::debug!("metrics connection: {e}");
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match metrics.not_ready() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
