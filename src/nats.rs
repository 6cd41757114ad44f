//! The NATS link: the one place a node talks to the rest of its cluster.
//!
//! async-nats runs on tokio; the server runs on async-std. The link therefore lives on
//! a thread of its own with a single-threaded tokio runtime inside, the way the
//! embedded store lives on its own thread, and the broker reaches it only through the
//! store's channels ([`crate::store::jetstream`] runs on this thread). No tokio type
//! leaves this module: the store gets plain futures from [`sleep`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::store::{Limits, Store, jetstream};

/// How long a node tries to reach NATS at start before it gives up with an error.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// `nats://`, `tls://` URLs, comma-separated; `user:password@` in a URL logs in.
    pub urls: String,
    /// This node's name in logs and in what it tells other nodes.
    pub node: String,
    /// Copies of each stored frame; by default 3 when the cluster has three or more
    /// servers, else 1.
    pub replicas: Option<usize>,
    /// CA certificate that signed the NATS servers' certificates (`tls://` URLs).
    pub ca: Option<PathBuf>,
}

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
                let setup = jetstream::Setup {
                    given_servers: given,
                    client,
                    node: options.node.clone(),
                    replicas: options.replicas,
                    limits,
                    max_frame_bytes,
                    metrics,
                    link: link_rx,
                };
                jetstream::run(setup, ready_tx).await;
            });
        })
        .map_err(|e| format!("cannot start the NATS thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "the NATS thread stopped during start".to_string())?
}

async fn connect(
    options: &Options,
    link: futures::channel::mpsc::UnboundedSender<jetstream::Link>,
) -> Result<async_nats::Client, String> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("chat-server {}", options.node))
        .connection_timeout(Duration::from_secs(2))
        // Reconnect forever: a node outlives its NATS servers' restarts.
        .max_reconnects(None)
        .event_callback(move |event| {
            let state = match event {
                async_nats::Event::Connected => Some(jetstream::Link::Up),
                async_nats::Event::Disconnected => Some(jetstream::Link::Down),
                _ => None,
            };
            if let Some(state) = state {
                let _ = link.unbounded_send(state);
            }
            async {}
        });
    if let Some(ca) = &options.ca {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = options
        .urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse()
                .map_err(|e| format!("bad NATS URL {}: {e}", redact(u)))
        })
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err("--nats needs at least one URL".into());
    }
    // async-nats parses `user:password@` but logs in with the options' credentials.
    let login = urls
        .iter()
        .find_map(|u| Some((u.username()?.to_string(), u.password()?.to_string())));
    if let Some((user, password)) = login {
        connect = connect.user_and_password(user, password);
    }
    let shown: Vec<String> = options.urls.split(',').map(redact).collect();
    // NATS may be starting at the same time as this node (a compose file, a boot
    // script): try again until CONNECT_LIMIT before giving up.
    let started = std::time::Instant::now();
    loop {
        match tokio::time::timeout(CONNECT_LIMIT, connect.clone().connect(urls.clone())).await {
            Ok(Ok(client)) => {
                log::info!("node {}: connected to NATS", options.node);
                return Ok(client);
            }
            Ok(Err(e))
                if started.elapsed() < CONNECT_LIMIT
                    && e.kind() != async_nats::ConnectErrorKind::AuthorizationViolation =>
            {
                log::debug!("NATS not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(Err(e)) => {
                return Err(format!("cannot reach NATS at {}: {e}", shown.join(",")));
            }
            Err(_) => {
                return Err(format!(
                    "cannot reach NATS at {} within {CONNECT_LIMIT:?}",
                    shown.join(",")
                ));
            }
        }
    }
}

/// A URL with its password hidden, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.trim().to_string(),
    }
}

/// A timer for the link's thread.
pub(crate) fn sleep(duration: Duration) -> impl Future<Output = ()> {
    tokio::time::sleep(duration)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("nats://chat:s3cret@host:4222"),
            "nats://chat:***@host:4222"
        );
        assert_eq!(redact("nats://host:4222"), "nats://host:4222");
    }
}
