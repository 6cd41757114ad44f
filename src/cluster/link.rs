//! The NATS link: connecting (with credentials, TLS and retries at start), the link's
//! state as the client reports it, moving to another server when JetStream stops
//! answering through this one (`watch`), and the timer of the link's thread. No
//! tokio type leaves this module: the stream actor gets plain futures from `sleep`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::ServerAddr;

use super::StartError;

/// How long a node tries to reach NATS at start before it gives up with an error.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// How often the watch asks JetStream whether it answers through the link's server.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one probe may take.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// How long JetStream may go without answering through one server before the link
/// moves to another. Longer than an election of the meta leader after a server is
/// lost (up to 7 s seen on a loaded machine), so that a NATS server's crash elsewhere
/// does not move every node.
const MOVE_AFTER: Duration = Duration::from_secs(8);
/// ... and after this many probes in a row went unanswered.
const MOVE_AFTER_PROBES: u32 = 3;
/// Probes in a row the stream did not answer well before an answer counts as its
/// return ([`Link::Recovered`]); one late answer is not an outage.
const RECOVERED_AFTER: u32 = 2;
/// After a move, the least time before the next; doubled while JetStream still does
/// not answer (when every server is cut off, moving does not help), up to
/// [`MOVE_AGAIN_MAX`].
const MOVE_AGAIN: Duration = Duration::from_secs(10);
const MOVE_AGAIN_MAX: Duration = Duration::from_secs(60);

/// The state of the connection to NATS, from the client's events and the watch.
#[derive(Debug)]
pub enum Link {
    Up,
    Down,
    /// JetStream answers through the link's server again after it had not (the
    /// server was cut off, or leaders were elected): mail sent to this node meanwhile,
    /// a core NATS message, may have been lost, as across a reconnect.
    Recovered,
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

/// Which server the link chose last and which one it is leaving: the watch decides
/// to leave, the client's reconnect callback picks the next server.
#[derive(Debug, Default)]
struct Place {
    /// The server chosen last: the one the link is on once connected.
    on: Option<ServerAddr>,
    leaving: Option<ServerAddr>,
    /// Servers tried since leaving one: after every other one, the one left may be
    /// taken again (it may be the only one that takes connections).
    tried: usize,
    /// Taking turns among equally good servers.
    turn: usize,
}

/// The link's [`Place`], shared by the watch and the client's callbacks.
#[derive(Debug, Clone)]
pub(crate) struct Servers(Arc<Mutex<Place>>);

impl Servers {
    /// Starting at a random turn, so that the nodes of a cluster spread over its
    /// servers rather than all taking the first.
    fn new() -> Servers {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Servers(Arc::new(Mutex::new(Place {
            turn: random as usize,
            ..Place::default()
        })))
    }

    fn place(&self) -> std::sync::MutexGuard<'_, Place> {
        // A panic while holding it cannot leave a `Place` half-written.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The client's choice of the next server to connect to, remembered.
    fn choose(&self, pool: &[async_nats::Server]) -> Option<ServerAddr> {
        let mut place = self.place();
        if place.leaving.is_some() {
            if place.tried >= pool.len().saturating_sub(1) {
                place.leaving = None;
            } else {
                place.tried += 1;
            }
        }
        let candidates: Vec<(&ServerAddr, usize)> =
            pool.iter().map(|s| (&s.addr, s.failed_attempts)).collect();
        let chosen = pick(&candidates, place.leaving.as_ref(), place.turn)?;
        place.turn = place.turn.wrapping_add(1);
        place.on = Some(chosen.clone());
        Some(chosen)
    }
}

/// The next server to try: one of those that failed least, other than the one being
/// left (unless it is the only one), in turn.
fn pick(
    pool: &[(&ServerAddr, usize)],
    leaving: Option<&ServerAddr>,
    turn: usize,
) -> Option<ServerAddr> {
    let others: Vec<(&ServerAddr, usize)> = pool
        .iter()
        .filter(|(addr, _)| Some(*addr) != leaving)
        .copied()
        .collect();
    let pool: &[(&ServerAddr, usize)] = if others.is_empty() { pool } else { &others };
    let least = pool.iter().map(|(_, failed)| *failed).min()?;
    let best: Vec<&ServerAddr> = pool
        .iter()
        .filter(|(_, failed)| *failed == least)
        .map(|(addr, _)| *addr)
        .collect();
    Some(best[turn % best.len()].clone())
}

pub(crate) async fn connect(
    options: &Options,
    link: futures::channel::mpsc::UnboundedSender<Link>,
) -> Result<(async_nats::Client, Servers), StartError> {
    let servers = Servers::new();
    let chooser = servers.clone();
    let arrived = servers.clone();
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("chat-server {}", options.node))
        .connection_timeout(Duration::from_secs(2))
        // Reconnect forever: a node outlives its NATS servers' restarts.
        .max_reconnects(None)
        // The node picks its servers itself, to know which one it is on and to leave
        // one that JetStream does not answer through (see [`watch`]).
        .reconnect_to_server_callback(move |pool, _info| {
            let chosen = chooser.choose(&pool);
            async move { chosen.map(|addr| async_nats::ReconnectToServer { addr, delay: None }) }
        })
        .event_callback(move |event| {
            let state = match event {
                async_nats::Event::Connected => {
                    arrived.place().leaving = None;
                    Some(Link::Up)
                }
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
                return Ok((client, servers));
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

/// The watch over the link: stops when dropped.
pub(crate) struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches that JetStream answers through the server the link is on, and moves the
/// link to another server once it has not for [`MOVE_AFTER`]. A NATS server cut off
/// from the others still takes the node's requests and answers its pings, so the
/// client never notices by itself; but the stream's leader and quorum are out of its
/// reach, and every publish and read through it fails.
///
/// Every second it asks for `stream`'s state (answered by the stream's leader) and for
/// the account's (answered by the cluster's meta leader), and counts the server as
/// cut off only when neither answers well. While the stream elects a new leader (its
/// old one died or was cut off) every server fails the first, but the servers of the
/// majority still reach the meta leader: nodes on them stay where they are, and only
/// a node on the cut-off server moves. A node cut off from every server gets no
/// answer either: the move finds no server, the link goes down, and the node says so
/// at once (`store-failed`) rather than after the client's pings time out (two
/// minutes).
///
/// Moving needs another server to go to: the URLs the node was given, and the
/// servers its first server told it of when it connected (async-nats learns of no
/// server later). A node given one URL of a cluster that had not formed yet knows no
/// other, and stays.
pub(crate) fn watch(
    client: async_nats::Client,
    stream: &str,
    servers: Servers,
    node: String,
    link: futures::channel::mpsc::UnboundedSender<Link>,
) -> Watch {
    let stream_info = format!("$JS.API.STREAM.INFO.{stream}");
    Watch(tokio::spawn(async move {
        // Since when probes fail, and how many in a row: a node frozen for a while
        // (a pause) finds one probe late when it thaws, which is not JetStream's fault.
        let mut failing_since: Option<Instant> = None;
        let mut failures = 0;
        // Probes in a row the stream did not answer well: its return after an outage
        // is worth a look at every held mailbox (see [`Link::Recovered`]).
        let mut stream_failures = 0;
        let mut quiet_until = Instant::now();
        let mut again = MOVE_AGAIN;
        loop {
            sleep(PROBE_EVERY).await;
            if client.connection_state() != async_nats::connection::State::Connected {
                // A reconnect reads every held mailbox anyway (`Link::Up`).
                (failing_since, failures, stream_failures) = (None, 0, 0);
                continue;
            }
            let asked = Instant::now();
            let ask = |subject: String| {
                let client = client.clone();
                async move {
                    within(PROBE_WAIT, client.request(subject, bytes::Bytes::new()))
                        .await
                        .and_then(Result::ok)
                        .map(|msg| msg.payload)
                }
            };
            let (stream, meta) =
                futures::join!(ask(stream_info.clone()), ask(ACCOUNT_INFO.to_string()));
            let stored = stream.is_some_and(|info| healthy(&info));
            if !stored {
                stream_failures += 1;
            } else if std::mem::take(&mut stream_failures) >= RECOVERED_AFTER {
                // Not spaced out: mail lost in the next outage would be missed.
                log::info!(
                    "node {node}: JetStream answers again; every id held here reads its mailbox"
                );
                let _ = link.unbounded_send(Link::Recovered);
            }
            if stored || meta.is_some_and(|info| answers(&info)) {
                (failing_since, failures) = (None, 0);
                again = MOVE_AGAIN;
                continue;
            }
            let since = *failing_since.get_or_insert(asked);
            failures += 1;
            let pool = within(PROBE_WAIT, client.server_pool()).await;
            let others = pool.and_then(Result::ok).map_or(0, |pool| pool.len()) > 1;
            let long_enough = since.elapsed() >= MOVE_AFTER && failures >= MOVE_AFTER_PROBES;
            if !long_enough || Instant::now() < quiet_until || !others {
                continue;
            }
            let on = {
                let mut place = servers.place();
                place.leaving = place.on.clone();
                place.tried = 0;
                place.on.clone()
            };
            log::warn!(
                "node {node}: JetStream has not answered through NATS server {} for {:.1} s; moving to another",
                on.map_or_else(|| "?".to_string(), |addr| redact(addr.as_url_str())),
                since.elapsed().as_secs_f64()
            );
            if let Some(Err(e)) = within(PROBE_WAIT, client.force_reconnect()).await {
                log::debug!("cannot reconnect to NATS: {e}");
            }
            (failing_since, failures) = (None, 0);
            quiet_until = Instant::now() + again;
            again = (again * 2).min(MOVE_AGAIN_MAX);
        }
    }))
}

/// Answered by the cluster's JetStream meta leader: a server cut off from the others
/// cannot reach it (once a leader that was cut off has stepped down).
const ACCOUNT_INFO: &str = "$JS.API.INFO";

/// Whether a JetStream API answer is one without an error.
fn answers(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(payload).is_ok_and(|v| v.get("error").is_none())
}

/// How long ago the stream's leader may have last heard from a replica for the
/// stream to count as answering: a follower is heard every second or so.
const REPLICA_SILENT: Duration = Duration::from_secs(3);

/// Whether a stream's info, as JetStream answered it, shows a stream that can store:
/// no error (such as the system being temporarily unavailable while leaders are
/// elected), and a leader that has heard from a replica lately. A leader cut off from
/// the others keeps answering as leader until it notices it lost its quorum (about
/// 10 s), while every publish through it fails.
fn healthy(payload: &[u8]) -> bool {
    let Ok(info) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return false;
    };
    if info.get("error").is_some() {
        return false;
    }
    let wanted = info
        .pointer("/config/num_replicas")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1);
    if wanted <= 1 {
        return true;
    }
    // A replicated stream without a leader may still be described (by the
    // cluster's meta leader, from what it was told): no leader, no replicas heard.
    let led = info
        .pointer("/cluster/leader")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|leader| !leader.is_empty());
    let heard = info
        .pointer("/cluster/replicas")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|replicas| {
            replicas.iter().any(|r| {
                r.get("active")
                    .and_then(serde_json::Value::as_u64)
                    .is_some_and(|ns| Duration::from_nanos(ns) < REPLICA_SILENT)
            })
        });
    led && heard
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
    use super::{answers, healthy, pick, redact};
    use async_nats::ServerAddr;

    fn addr(port: u16) -> ServerAddr {
        format!("nats://127.0.0.1:{port}").parse().expect("a URL")
    }

    #[test]
    fn a_move_leaves_the_server_and_prefers_those_that_failed_least() {
        let (a, b, c) = (addr(1), addr(2), addr(3));
        let pool = [(&a, 0), (&b, 0), (&c, 0)];
        let chosen: Vec<ServerAddr> = (0..4).filter_map(|t| pick(&pool, Some(&a), t)).collect();
        assert_eq!(chosen, [b.clone(), c.clone(), b.clone(), c.clone()]);
        let pool = [(&a, 0), (&b, 2), (&c, 1)];
        assert_eq!(pick(&pool, Some(&a), 0), Some(c.clone()));
        assert_eq!(pick(&pool, None, 7), Some(a.clone()));
        // The only server is taken again rather than none.
        assert_eq!(pick(&[(&a, 3)], Some(&a), 0), Some(a.clone()));
        assert_eq!(pick(&[], None, 0), None);
    }

    #[test]
    fn a_stream_is_healthy_when_its_leader_hears_a_replica() {
        let info = |replicas: &str| {
            format!(
                r#"{{"type":"io.nats.jetstream.api.v1.stream_info_response","config":{{"num_replicas":3}},"cluster":{{"name":"c","leader":"n0"{replicas}}}}}"#
            )
        };
        let heard = r#","replicas":[{"name":"n1","current":true,"active":412000000,"lag":0},{"name":"n2","current":false,"active":9100000000}]"#;
        assert!(healthy(info(heard).as_bytes()));
        let silent = r#","replicas":[{"name":"n1","current":false,"active":4000000000},{"name":"n2","current":false,"active":9100000000}]"#;
        assert!(!healthy(info(silent).as_bytes()), "a leader cut off");
        assert!(!healthy(info("").as_bytes()), "no replica heard");
        let leaderless = br#"{"config":{"num_replicas":3},"cluster":{"name":"c"}}"#;
        assert!(!healthy(leaderless), "described without a leader");
        assert!(
            healthy(br#"{"config":{"num_replicas":1},"cluster":{"name":"c","leader":"n0"}}"#),
            "one replica"
        );
        assert!(!healthy(
            br#"{"type":"x","error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#
        ));
        assert!(!healthy(b"not json"));
    }

    #[test]
    fn the_meta_leader_answers_without_an_error() {
        assert!(answers(
            br#"{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0,"storage":412,"streams":1}"#
        ));
        assert!(!answers(
            br#"{"type":"x","error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#
        ));
        assert!(!answers(b""));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("nats://chat:s3cret@host:4222"),
            "nats://chat:***@host:4222"
        );
        assert_eq!(redact("nats://host:4222"), "nats://host:4222");
    }
}
