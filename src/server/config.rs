//! What the server is told (flags and env vars become a [`Config`]) and what its
//! connection tasks share ([`Shared`]): the low floor that the listener, readers,
//! writers and the HTTP listeners all stand on, below the assembly in [`crate::node`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use futures::channel::mpsc;

use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::server::addresses::{self, PerAddress};
use crate::server::backend::Backend;
use crate::server::blocklist::Blocklist;
use crate::server::budget::Budget;
use crate::server::directory::Directory;
use crate::server::drain::Drain;
use crate::server::event::Event;
use crate::server::rate::RateLimits;
use crate::store::{self, History, Limits};
use crate::tls::ServerTls;

/// Everything the server can be told; the binary fills it from flags and env vars.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub max_frame_bytes: u32,
    pub frame_timeout: Duration,
    pub max_connections: usize,
    /// `--max-connections-per-ip`: connections one address may hold on the chat
    /// listener (TCP, TLS and WebSocket together); 0: no bound. `None`: a tenth of
    /// `max_connections`. HTTP listeners allow an address a quarter of their own
    /// connections, and never more than this.
    pub max_connections_per_ip: Option<usize>,
    /// `--proxy-protocol`: every connection to the chat and web listeners opens with a
    /// PROXY protocol header (v1 or v2) naming the client's address.
    pub proxy_protocol: bool,
    /// `--rate-frames`, `--rate-bytes`, `--rate-burst`: what one connection may send.
    pub rate: RateLimits,
    /// `--drain-timeout`: how long a drain waits for clients to leave.
    pub drain_timeout: Duration,
    /// `--answer-within`: in a cluster, how long a sender waits for a frame's outcome
    /// before it is told `store-failed` instead.
    pub answer_within: Duration,
    pub max_pending_bytes: usize,
    pub mailbox: Limits,
    /// How long and how much of each id's conversation is kept after delivery.
    pub history: History,
    /// `--max-devices`: named devices per id (sessions), the default device apart.
    pub max_devices: usize,
    /// Tokens required (and the keys that check them), when set.
    pub auth: Option<Arc<Auth>>,
    /// Serve TLS instead of plain TCP.
    pub tls: Option<Arc<ServerTls>>,
    /// Serve metrics, health and readiness over HTTP here (and keep the metrics).
    pub metrics_listen: Option<String>,
    /// Serve the web client and the protocol over WebSocket here.
    pub web_listen: Option<String>,
    /// Browser origins allowed to open the WebSocket (see [`Origins`]).
    pub web_origins: Origins,
    /// What the metrics listener allows (no flag: fixed, tests shorten the times).
    pub metrics_http: HttpLimits,
    /// The admin API (`--admin-listen`, `--admin-token-file`), when asked for.
    pub admin: Option<Admin>,
    /// What the web listener allows (no flag: fixed, tests shorten the times).
    pub web_http: HttpLimits,
    /// Faults to inject into the store's file (tests only; no flag sets it).
    pub store_faults: Option<Arc<store::Faults>>,
    /// Join a cluster: frames go to JetStream instead of `data_dir`.
    pub nats: Option<crate::cluster::Options>,
}

impl Config {
    /// The defaults, listening on `listen` and storing under `data_dir`.
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: listen.into(),
            data_dir: data_dir.into(),
            max_frame_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES,
            frame_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_ip: None,
            proxy_protocol: false,
            rate: RateLimits::OFF,
            drain_timeout: Duration::from_secs(30),
            answer_within: Duration::from_secs(2),
            max_pending_bytes: 8 * 1024 * 1024,
            mailbox: Limits {
                max_messages: 10_000,
                max_bytes: 64 * 1024 * 1024,
                per_sender: store::PerSender::quarter_of(
                    10_000,
                    64 * 1024 * 1024,
                    8 * 1024 * 1024 + crate::protocol::SERVER_HEADER_LEN as u64,
                ),
            },
            history: History::default(),
            max_devices: 8,
            auth: None,
            tls: None,
            metrics_listen: None,
            web_listen: None,
            web_origins: Default::default(),
            metrics_http: HttpLimits::METRICS,
            admin: None,
            web_http: HttpLimits::WEB,
            store_faults: None,
            nats: None,
        }
    }
}

/// What connection tasks share.
pub struct Shared {
    pub config: Config,
    pub events: mpsc::Sender<Event>,
    /// The store, or a cluster's actor: writers send it what they delivered.
    pub store: Backend,
    /// Bytes of decoded frames on their way to the broker.
    pub inbound: Arc<Budget>,
    /// Chat connections per client address.
    pub(crate) per_address: Arc<PerAddress>,
    /// Every open connection, for the admin listener.
    pub directory: Arc<Directory>,
    /// Ids an operator has blocked.
    pub blocklist: Arc<Blocklist>,
    /// Starts a drain (SIGUSR1, the admin listener).
    pub drain: Arc<Drain>,
    /// Kept only when they are served (`--metrics-listen`).
    pub metrics: Option<Arc<Metrics>>,
    pub(crate) active: AtomicUsize,
    pub(crate) next_conn: AtomicU64,
}

/// The admin API's listener and the token its callers must present.
#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: String,
    pub token: Arc<AdminToken>,
    pub limits: HttpLimits,
}

/// The admin API's bearer token, kept as its SHA-256 so that comparing a presented
/// token in constant time also hides its length.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// The token in `text` (its first line, trimmed); `None` when that is empty.
    pub fn new(text: &str) -> Option<AdminToken> {
        let token = text.lines().next().unwrap_or_default().trim();
        (!token.is_empty()).then(|| AdminToken(Self::digest(token.as_bytes())))
    }

    fn digest(token: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token).into()
    }

    /// Whether `presented` is the token, in time that does not depend on where they
    /// differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        Self::digest(presented).ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Who may open the WebSocket from a browser.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// Exact origins (`https://chat.example.com`), or `*` for any. Empty: the page's
    /// own origin only (the Origin's host equals the request's Host).
    pub allowed: Vec<String>,
}

/// What one HTTP listener allows, so that clients that connect and dawdle cannot hold
/// it: the binary uses [`HttpLimits::METRICS`] and [`HttpLimits::WEB`]; tests shorten
/// the times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; more are closed at once, unanswered.
    pub max_connections: usize,
    /// Time for a request's headers to arrive (also bounds a TLS handshake).
    pub header_timeout: Duration,
    /// Time one connection may stay, keep-alive included.
    pub connection_time: Duration,
    /// Largest request head buffered; a larger one gets 431.
    pub max_head: usize,
    /// Connections one address may hold (0: no bound); more are closed at once.
    pub max_per_address: usize,
}

impl HttpLimits {
    /// The metrics, health and readiness listener.
    pub const METRICS: HttpLimits = HttpLimits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        connection_time: Duration::from_secs(30),
        max_head: 16 * 1024,
        max_per_address: 64 / addresses::HTTP_SHARE,
    };
    /// The admin listener: a few operators' tools at a time.
    pub const ADMIN: HttpLimits = HttpLimits {
        max_connections: 16,
        max_per_address: 16 / addresses::HTTP_SHARE,
        ..HttpLimits::METRICS
    };
    /// The web listener: page loads and WebSocket upgrades in progress (an upgraded
    /// WebSocket counts under `--max-connections` instead).
    pub const WEB: HttpLimits = HttpLimits {
        max_connections: 256,
        max_per_address: 256 / addresses::HTTP_SHARE,
        ..HttpLimits::METRICS
    };

    /// These limits under `--max-connections-per-ip` (`per_ip`, when given).
    pub fn within(self, per_ip: Option<usize>) -> HttpLimits {
        let max_per_address = match per_ip {
            None => self.max_per_address,
            Some(0) => 0,
            Some(n) if self.max_per_address == 0 => n,
            Some(n) => n.min(self.max_per_address),
        };
        HttpLimits {
            max_per_address,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_listeners_keep_their_quarter_under_the_per_ip_flag() {
        assert_eq!(HttpLimits::WEB.max_per_address, 64);
        assert_eq!(HttpLimits::METRICS.max_per_address, 16);
        assert_eq!(HttpLimits::ADMIN.max_connections, 16);
        assert_eq!(HttpLimits::ADMIN.max_per_address, 4);
        assert_eq!(HttpLimits::WEB.within(None).max_per_address, 64);
        assert_eq!(HttpLimits::WEB.within(Some(10)).max_per_address, 10);
        assert_eq!(HttpLimits::WEB.within(Some(1000)).max_per_address, 64);
        assert_eq!(HttpLimits::WEB.within(Some(0)).max_per_address, 0);
        assert_eq!(addresses::chat_bound(10_000, None), 1_000);
        assert_eq!(addresses::chat_bound(5, None), 1);
        assert_eq!(addresses::chat_bound(10_000, Some(3)), 3);
    }
}
