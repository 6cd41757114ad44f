//! What both HTTP listeners do alike: accept within their connection limit, configure
//! hyper with their limits, answer in plain text.

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

use crate::rt::{self, TcpListener, TcpStream};
use crate::server::config::HttpLimits;

/// Accepts until `stop`, serving each connection with `serve` while fewer than `max`
/// are being served; beyond that, a connection is closed at once.
pub(super) async fn accept<F, Fut>(
    listener: TcpListener,
    max: usize,
    stop: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(AtomicUsize::new(0));
    let mut stop = std::pin::pin!(stop);
    loop {
        let accept = std::pin::pin!(listener.accept());
        let stream = match select(accept, stop.as_mut()).await {
            Either::Left((Ok((stream, _)), _)) => stream,
            Either::Left((Err(e), _)) => {
                log::debug!("http accept: {e}");
                rt::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Either::Right(_) => break,
        };
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let served = serve(stream);
        let open = open.clone();
        rt::spawn(async move {
            served.await;
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
