//! A cluster: several nodes as one service through NATS. Everything only a cluster
//! needs lives here, below the server and beside the embedded store:
//!
//! - [`link`]: the connection to NATS (credentials, TLS, retries at start, up/down);
//! - `stream`: the store a cluster uses, a replicated JetStream stream every node
//!   shares, and the node-to-node traffic (holding ids, takeover, forwarded frames).
//!
//! async-nats runs on tokio; the server runs on async-std. The link therefore lives on
//! a thread of its own with a single-threaded tokio runtime inside, the way the
//! embedded store lives on its own thread, and the broker reaches it only through the
//! store's channels. [`start`] builds that thread.

pub mod link;
pub(crate) mod stream;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::store::{Limits, Store};
pub use link::Options;
use link::connect;

/// Connects to NATS and starts the JetStream store on the link's thread. Fails with a
/// one-line reason when no server answers within [`CONNECT_LIMIT`] or the cluster cannot
/// hold what this node needs.
pub fn start(
    options: Options,
    limits: Limits,
    max_frame_bytes: u32,
    metrics: Option<Arc<Metrics>>,
) -> Result<Store, String> {
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
                    let _ = ready_tx.send(Err(format!("cannot start the NATS runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let (link_tx, link_rx) = futures::channel::mpsc::unbounded();
                let client = match connect(&options, link_tx).await {
                    Ok(client) => client,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let needed = max_frame_bytes as usize + crate::protocol::SERVER_HEADER_LEN;
                let max_payload = client.server_info().max_payload;
                if max_payload < needed {
                    let _ = ready_tx.send(Err(format!(
                        "NATS max_payload is {max_payload} bytes, less than a frame of --max-frame-bytes {max_frame_bytes}; raise max_payload in nats-server.conf or lower --max-frame-bytes"
                    )));
                    return;
                }
                let given = options.urls.split(',').filter(|u| !u.trim().is_empty()).count();
                let setup = stream::Setup {
                    given_servers: given,
                    client,
                    node: options.node.clone(),
                    replicas: options.replicas,
                    limits,
                    max_frame_bytes,
                    metrics,
                    link: link_rx,
                };
                stream::run(setup, ready_tx).await;
            });
        })
        .map_err(|e| format!("cannot start the NATS thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "the NATS thread stopped during start".to_string())?
}
