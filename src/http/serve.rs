//! What both HTTP listeners do alike: accept within their connection limit, configure
//! hyper with their limits, answer in plain text.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{Either, select};
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Response, StatusCode};
use smol_hyper::rt::SmolTimer;

use crate::metrics::{Metrics, Refusal};
use crate::rt::{self, TcpListener, TcpStream};
use crate::server::addresses::PerAddress;
use crate::server::config::HttpLimits;

/// Accepts until `stop`, serving each connection with `serve` (given its peer's
/// address) while fewer than `limits.max_connections` are being served and its address
/// holds fewer than `limits.max_per_address`; beyond either, a connection is closed at
/// once, unanswered: answering would cost what the bound is there to save.
pub(super) async fn accept<F, Fut>(
    listener: TcpListener,
    limits: &HttpLimits,
    metrics: Option<&Metrics>,
    stop: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream, IpAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = limits.max_connections;
    let open = Arc::new(AtomicUsize::new(0));
    let per_address = PerAddress::new(limits.max_per_address);
    let mut stop = std::pin::pin!(stop);
    loop {
        let accept = std::pin::pin!(listener.accept());
        let (stream, peer) = match select(accept, stop.as_mut()).await {
            Either::Left((Ok(accepted), _)) => accepted,
            Either::Left((Err(e), _)) => {
                log::debug!("http accept: {e}");
                rt::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Either::Right(_) => break,
        };
        let Some(address) = per_address.take(peer.ip()) else {
            log::debug!(
                "http: closing {peer}: its address holds {} connections",
                per_address.max()
            );
            if let Some(m) = metrics {
                m.refused(Refusal::address_busy);
            }
            continue;
        };
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let served = serve(stream, peer.ip());
        let open = open.clone();
        rt::spawn(async move {
            served.await;
            drop(address);
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

pub(super) fn builder(limits: &HttpLimits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(SmolTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head);
    builder
}

pub(super) fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
