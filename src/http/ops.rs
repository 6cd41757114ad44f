//! The operators' listener (`--metrics-listen`): metrics, health and readiness.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use smol_hyper::rt::FuturesIo;

use super::serve::{accept, builder, text};
use crate::metrics::Metrics;
use crate::rt::{self, TcpListener};
use crate::server::config::HttpLimits;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves metrics, health and readiness until `stop` completes.
pub async fn run(
    listener: TcpListener,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    if let Ok(addr) = listener.local_addr() {
        log::info!("metrics, health and readiness on http://{addr}/metrics, /healthz, /readyz");
    }
    let counted = Some(metrics.clone());
    accept(listener, &limits, false, counted, stop, move |stream, _| {
        let metrics = metrics.clone();
        async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let conn = builder(&limits).serve_connection(FuturesIo::new(stream), service);
            if let Some(Err(e)) = rt::timeout(limits.connection_time, conn).await {
                log::debug!("metrics connection: {e}");
            }
        }
    })
    .await
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
