//! What both HTTP listeners do alike: accept within their connection limit, configure
//! hyper with their limits, answer in plain text.

use std::net::SocketAddr;
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
use crate::server::proxy::{self, Proxied};

/// Accepts until `stop`, serving each connection with `serve` (given its client's
/// address) while fewer than `limits.max_connections` are being served and its address
/// holds fewer than `limits.max_per_address`; beyond either, a connection is closed at
/// once, unanswered: answering would cost what the bound is there to save. With
/// `proxy`, a connection's client is named by its PROXY protocol header, which must
/// arrive within the header timeout.
pub(super) async fn accept<F, Fut>(
    listener: TcpListener,
    limits: &HttpLimits,
    proxy: bool,
    metrics: Option<Arc<Metrics>>,
    stop: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = limits.max_connections;
    let header_timeout = limits.header_timeout;
    let open = Arc::new(AtomicUsize::new(0));
    let per_address = PerAddress::new(limits.max_per_address);
    let serve = Arc::new(serve);
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
        // Counted under its address before anything else when the address is known,
        // so that one address's refused connections never take the others' places.
        let known = match proxy {
            true => None,
            false => match per_address.take(peer.ip()) {
                Some(address) => Some((peer, address)),
                None => {
                    refused_address(peer, &per_address, metrics.as_deref());
                    continue;
                }
            },
        };
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (open, per_address) = (open.clone(), per_address.clone());
        let (metrics, serve) = (metrics.clone(), serve.clone());
        rt::spawn(async move {
            let admitted = match known {
                Some(known) => Some(known),
                None => match client_of(&stream, peer, header_timeout).await {
                    Err(e) => {
                        log::debug!("http: closing {peer}: {e}");
                        count(metrics.as_deref(), Refusal::proxy_refused);
                        None
                    }
                    Ok(client) => match per_address.take(client.ip()) {
                        Some(address) => Some((client, address)),
                        None => {
                            refused_address(client, &per_address, metrics.as_deref());
                            None
                        }
                    },
                },
            };
            if let Some((client, address)) = admitted {
                serve(stream, client).await;
                drop(address);
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn refused_address(client: SocketAddr, per_address: &PerAddress, metrics: Option<&Metrics>) {
    log::debug!(
        "http: closing {client}: its address holds {} connections",
        per_address.max()
    );
    count(metrics, Refusal::address_busy);
}

/// The client a proxied connection's header names (the proxy itself for a health check).
async fn client_of(
    stream: &TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Result<SocketAddr, String> {
    let mut read = stream;
    match rt::timeout(limit, proxy::read(&mut read)).await {
        Some(Ok(Proxied::Client(client))) => Ok(client),
        Some(Ok(Proxied::Local)) => Ok(peer),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("no PROXY protocol header in time".into()),
    }
}

fn count(metrics: Option<&Metrics>, why: Refusal) {
    if let Some(m) = metrics {
        m.refused(why);
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
