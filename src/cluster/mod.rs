//! A cluster: several nodes as one service through NATS. Everything only a cluster
//! needs lives here, below the server and beside the embedded store:
//!
//! - [`link`]: the connection to NATS (credentials, TLS, retries at start, up/down);
//! - `stream`: the cluster's actor and the store it keeps, a replicated JetStream
//!   stream every node shares; beside it, its two parts for the node-to-node traffic:
//!   `holds` (the ids this node holds, claiming them and letting them go) and
//!   `forward` (frames to the node that holds their receiver, and batches from others);
//!   and `log`, history and named devices (each id's log in a second stream, each
//!   device's cursor in a key-value bucket), with `echoes`, the replies that wait on it;
//! - [`wire`]: what nodes say to each other, as typed values with one encoding each;
//! - [`msg`]: what the broker and the cluster's actor say to each other.
//!
//! async-nats runs on tokio; the server runs on async-std. The link therefore lives on
//! a thread of its own with a single-threaded tokio runtime inside, the way the
//! embedded store lives on its own thread, and the broker reaches it only through its
//! two channels ([`msg`]). [`start`] builds that thread.

mod echoes;
mod forward;
mod holds;
pub mod link;
pub(crate) mod log;
pub mod msg;
pub(crate) mod stream;
pub mod wire;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::store::{History, Limits, Store};
pub use link::Options;
use link::connect;
use msg::{FromCluster, ToCluster};

/// Connects to NATS and starts the JetStream store on the link's thread. Fails with a
/// one-line reason when no server answers within 10 s or the cluster cannot
/// hold what this node needs.
pub fn start(
    options: Options,
    limits: Limits,
    history: History,
    max_frame_bytes: u32,
    metrics: Option<Arc<Metrics>>,
) -> Result<Store<ToCluster, FromCluster>, StartError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nats".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(StartError::Runtime(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let (link_tx, link_rx) = futures::channel::mpsc::unbounded();
                let watch_tx = link_tx.clone();
                let (client, servers) = match connect(&options, link_tx).await {
                    Ok(connected) => connected,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // With history, a frame also travels in a block of its log.
                let block = match history.on() {
                    true => log::BLOCK_OVERHEAD,
                    false => 0,
                };
                let needed = max_frame_bytes as usize + crate::protocol::SERVER_HEADER_LEN + block;
                let max_payload = client.server_info().max_payload;
                if max_payload < needed {
                    let _ = ready_tx.send(Err(StartError::PayloadTooSmall {
                        max_payload,
                        max_frame_bytes,
                    }));
                    return;
                }
                let given = options
                    .urls
                    .split(',')
                    .filter(|u| !u.trim().is_empty())
                    .count();
                let setup = stream::Setup {
                    given_servers: given,
                    client,
                    servers,
                    node: options.node.clone(),
                    replicas: options.replicas,
                    limits,
                    history,
                    max_frame_bytes,
                    metrics,
                    link: link_rx,
                    watch_link: watch_tx,
                };
                stream::run(setup, ready_tx).await;
            });
        })
        .map_err(StartError::Thread)?;
    ready_rx.recv().map_err(|_| StartError::Stopped)?
}

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--nats needs at least one URL")]
    NoUrl,
    #[error("bad NATS URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach NATS at {urls}: {reason}")]
    Unreachable { urls: String, reason: String },
    #[error("cannot reach NATS at {urls} within {limit:?}")]
    TimedOut {
        urls: String,
        limit: std::time::Duration,
    },
    #[error(
        "NATS max_payload is {max_payload} bytes, less than a frame of --max-frame-bytes {max_frame_bytes} (and, with history, 1,098 bytes of its history block); raise max_payload in nats-server.conf or lower --max-frame-bytes"
    )]
    PayloadTooSmall {
        max_payload: usize,
        max_frame_bytes: u32,
    },
    #[error("cannot start the NATS runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the NATS thread: {0}")]
    Thread(std::io::Error),
    #[error("the NATS thread stopped during start")]
    Stopped,
    #[error("cannot subscribe to NATS: {0}")]
    Subscribe(String),
    #[error("cannot set up JetStream stream {stream}: {reason}")]
    Stream {
        stream: &'static str,
        reason: String,
    },
}
