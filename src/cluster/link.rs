//! The NATS link: connecting (with credentials, TLS and retries at start), the link's
//! state as the client reports it, and the timer of the link's thread. No tokio type
//! leaves this module: the stream actor gets plain futures from `sleep`.

use std::path::PathBuf;
use std::time::Duration;

use super::StartError;

/// How long a node tries to reach NATS at start before it gives up with an error.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// The state of the connection to NATS, from the client's events.
#[derive(Debug)]
pub enum Link {
    Up,
    Down,
}

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

pub(crate) async fn connect(
    options: &Options,
    link: futures::channel::mpsc::UnboundedSender<Link>,
) -> Result<async_nats::Client, StartError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("chat-server {}", options.node))
        .connection_timeout(Duration::from_secs(2))
        // Reconnect forever: a node outlives its NATS servers' restarts.
        .max_reconnects(None)
        .event_callback(move |event| {
            let state = match event {
                async_nats::Event::Connected => Some(Link::Up),
                async_nats::Event::Disconnected => Some(Link::Down),
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
            u.parse().map_err(|e: std::io::Error| StartError::BadUrl {
                url: redact(u),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err(StartError::NoUrl);
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
                return Err(StartError::Unreachable {
                    urls: shown.join(","),
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(StartError::TimedOut {
                    urls: shown.join(","),
                    limit: CONNECT_LIMIT,
                });
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

/// `future`'s output, unless it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> Option<T> {
    let future = std::pin::pin!(future);
    match futures::future::select(future, std::pin::pin!(sleep(limit))).await {
        futures::future::Either::Left((out, _)) => Some(out),
        futures::future::Either::Right(_) => None,
    }
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
