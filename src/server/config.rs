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
use crate::server::backend::Backend;
use crate::server::budget::Budget;
use crate::server::event::Event;
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
            max_pending_bytes: 8 * 1024 * 1024,
            mailbox: Limits {
                max_messages: 10_000,
                max_bytes: 64 * 1024 * 1024,
            },
            history: History::default(),
            max_devices: 8,
            auth: None,
            tls: None,
            metrics_listen: None,
            web_listen: None,
            web_origins: Default::default(),
            metrics_http: HttpLimits::METRICS,
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
    /// Kept only when they are served (`--metrics-listen`).
    pub metrics: Option<Arc<Metrics>>,
    pub(crate) active: AtomicUsize,
    pub(crate) next_conn: AtomicU64,
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
}

impl HttpLimits {
    /// The metrics, health and readiness listener.
    pub const METRICS: HttpLimits = HttpLimits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        connection_time: Duration::from_secs(30),
        max_head: 16 * 1024,
    };
    /// The web listener: page loads and WebSocket upgrades in progress (an upgraded
    /// WebSocket counts under `--max-connections` instead).
    pub const WEB: HttpLimits = HttpLimits {
        max_connections: 256,
        ..HttpLimits::METRICS
    };
}
