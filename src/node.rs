//! The server's assembly: open the store, start the broker, the chat listener and the
//! HTTP listeners, and shut them down in order. Everything it starts lives in its own
//! room ([`crate::server`], [`crate::http`], [`crate::store`], [`crate::cluster`]); this
//! file only wires them together, so nothing below it imports it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use futures::SinkExt;
use futures::channel::{mpsc, oneshot};
use futures::future::{Either, select};

use crate::metrics::Metrics;
use crate::rt::{self, TcpListener};
use crate::server::addresses::{self, PerAddress};
use crate::server::backend::Opened;
use crate::server::blocklist::Blocklist;
use crate::server::broker::Broker;
use crate::server::budget::Budget;
use crate::server::drain::Drain;
use crate::server::event::Event;
use crate::server::{Config, Shared, files, listener};
use crate::store;

/// Events waiting for the broker beyond this make readers wait (TCP backpressure).
const EVENT_QUEUE: usize = 1024;
/// Bytes of frames read and not yet routed by the broker: beyond this, readers wait.
const INBOUND_BUDGET: usize = 8 * 1024 * 1024;
/// How long shutdown may take before the server stops waiting for writers.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(4);

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    config: Config,
    store: Opened,
    /// The HTTP listener for metrics, health and readiness, when asked for.
    http: Option<TcpListener>,
    /// The web client's listener, when asked for.
    web: Option<TcpListener>,
    metrics: Option<Arc<Metrics>>,
    blocklist: Arc<Blocklist>,
    /// The admin API's listener, when asked for.
    admin: Option<TcpListener>,
    /// The switch that drains this server, and what [`Server::run`] waits on.
    drain: Arc<Drain>,
    drained: oneshot::Receiver<Duration>,
}

impl Server {
    /// Opens the mailbox and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let metrics = config.metrics_listen.as_ref().map(|_| Metrics::new());
        let store: Opened = match &config.nats {
            Some(nats) => crate::cluster::start(
                nats.clone(),
                config.mailbox,
                config.history,
                config.max_frame_bytes,
                metrics.clone(),
            )?
            .into(),
            None => store::embedded::open(
                &config.data_dir,
                config.mailbox,
                config.history,
                metrics.clone(),
                config.store_faults.clone(),
            )?
            .into(),
        };
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| StartError::ListenChat {
                    addr: config.listen.clone(),
                    source,
                })?;
        let blocklist = Arc::new(Blocklist::open(&config.data_dir)?);
        let (drain, drained) = Drain::new();
        let http = bind_if(config.metrics_listen.as_deref(), "metrics").await?;
        let web = bind_if(config.web_listen.as_deref(), "the web client").await?;
        let admin_addr = config.admin.as_ref().map(|a| a.listen.as_str());
        let admin = bind_if(admin_addr, "the admin API").await?;
        Ok(Server {
            listener,
            config,
            store,
            http,
            web,
            metrics,
            blocklist,
            admin,
            drain: Arc::new(drain),
            drained,
        })
    }

    /// The switch that drains this server once it runs (SIGUSR1 in the binary).
    pub fn drain(&self) -> Arc<Drain> {
        self.drain.clone()
    }

    /// Where the admin API is served, if it is.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where metrics, health and readiness are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the web client and its WebSocket are served, if they are.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `stop` completes, then shuts down gracefully: stops accepting,
    /// flushes every writer, hands what could not be written to the mailbox, and waits
    /// for the store to commit. A drain ([`Server::drain`]) first stops accepting and
    /// asks every client to reconnect, and shuts down once they have gone, by its
    /// deadline, or at `stop`, whichever comes first.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let Server {
            listener,
            config,
            store,
            http,
            web,
            metrics,
            blocklist,
            admin,
            drain,
            drained,
        } = self;
        if let Some(addr) = admin.as_ref().and_then(|l| l.local_addr().ok()) {
            log::info!("admin API on http://{addr}/v1/ (docs/ADMIN.md)");
        }
        if let Some(addr) = web.as_ref().and_then(|l| l.local_addr().ok()) {
            let (http, ws) = match config.tls {
                Some(_) => ("https", "wss"),
                None => ("http", "ws"),
            };
            log::info!(
                "web client on {http}://{addr}/, the protocol over WebSocket at {ws}://{addr}/ws"
            );
        }
        if config.auth.is_none() {
            let open = [Some(&listener), web.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|l| l.local_addr().ok())
                .filter(|a| !a.ip().is_loopback())
                .map(|a| a.to_string())
                .collect::<Vec<_>>();
            if !open.is_empty() {
                log::warn!(
                    "no auth: anyone who can reach {} can claim any id; require tokens with --auth-secret-file",
                    open.join(" or ")
                );
            }
        }
        log::info!(
            "listening on {}",
            listener
                .local_addr()
                .map_or(config.listen.clone(), |a| a.to_string())
        );
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let mut config = config;
        config.max_connections = files::fit_connections(config.max_connections);
        let per_ip = config.max_connections_per_ip;
        config.metrics_http = config.metrics_http.within(per_ip);
        config.web_http = config.web_http.within(per_ip);
        if let Some(admin) = &mut config.admin {
            admin.limits = admin.limits.within(per_ip);
        }
        let per_address = PerAddress::new(addresses::chat_bound(config.max_connections, per_ip));
        let shared = Arc::new(Shared {
            config,
            events,
            store: store.backend,
            inbound: Arc::new(Budget::new(INBOUND_BUDGET)),
            per_address,
            drain,
            directory: Default::default(),
            blocklist,
            metrics: metrics.clone(),
            active: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
        });
        let broker = Broker::new(&shared, store.next_seq, store.devices);
        let broker = rt::spawn(broker.run(events_rx, store.replies));
        let (http_stop, http_stopped) = futures::channel::oneshot::channel::<()>();
        let http_stopped = futures::FutureExt::shared(http_stopped);
        if let (Some(http), Some(metrics)) = (http, metrics) {
            let stopped = http_stopped.clone();
            let limits = shared.config.metrics_http;
            rt::spawn(crate::http::run(http, limits, metrics, async {
                let _ = stopped.await;
            }));
        }
        if let (Some(listener), Some(settings)) = (admin, shared.config.admin.clone()) {
            let stopped = http_stopped.clone();
            rt::spawn(crate::http::run_admin(
                listener,
                settings,
                shared.clone(),
                async {
                    let _ = stopped.await;
                },
            ));
        }
        // The web listener stops when the node stops accepting (a drain, too); the
        // operators' listeners only when it stops.
        let (web_stop, web_stopped) = futures::channel::oneshot::channel::<()>();
        if let Some(web) = web {
            let origins = shared.config.web_origins.clone();
            let limits = shared.config.web_http;
            rt::spawn(crate::http::run_web(
                web,
                limits,
                shared.clone(),
                origins,
                async {
                    let _ = web_stopped.await;
                },
            ));
        }
        let mut stop = std::pin::pin!(stop);
        let ending = async {
            match select(stop.as_mut(), drained).await {
                Either::Right((Ok(deadline), _)) => Some(deadline),
                _ => None,
            }
        };
        let drain = listener::run(listener, shared.clone(), ending).await;
        drop(web_stop);
        log::info!("stopping: no longer accepting connections");
        if let Some(deadline) = drain {
            drain_until(&shared, deadline, stop).await;
        }
        drop(http_stop);
        let mut events = shared.events.clone();
        drop(shared);
        let finished = rt::timeout(SHUTDOWN_LIMIT, async {
            let _ = events.send(Event::Shutdown).await;
            drop(events);
            broker.await;
            let _ = store.closed.await;
        })
        .await;
        match finished {
            Some(()) => log::info!("stopped cleanly"),
            None => log::warn!("stopped with writers still busy after {SHUTDOWN_LIMIT:?}"),
        }
    }
}

/// Asks every client to reconnect, and waits until they have gone, `deadline` has
/// passed, or `stop` completes.
async fn drain_until(shared: &Shared, deadline: Duration, stop: impl Future<Output = ()>) {
    if let Some(m) = &shared.metrics {
        m.set_draining();
    }
    let open = shared.directory.len();
    log::info!(
        "draining: {open} connections asked to reconnect; stopping once they have gone, in {deadline:?} at most"
    );
    let _ = shared.events.clone().send(Event::Drain).await;
    let gone = async {
        // The directory says when the last connection has ended; a tenth of a second
        // is soon enough to notice.
        while !shared.directory.is_empty() {
            rt::sleep(Duration::from_millis(100)).await;
        }
    };
    let gone = std::pin::pin!(rt::timeout(deadline, gone));
    match select(gone, std::pin::pin!(stop)).await {
        Either::Left((Some(()), _)) => log::info!("drained: every connection has gone"),
        Either::Left((None, _)) => log::info!(
            "drain deadline passed with {} connections open",
            shared.directory.len()
        ),
        Either::Right(_) => log::info!("drain cut short by a signal to stop"),
    }
}

/// Binds `addr` for `what`, when there is an address.
async fn bind_if(
    addr: Option<&str>,
    what: &'static str,
) -> Result<Option<TcpListener>, StartError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            what,
            addr: addr.to_string(),
            source,
        })?;
    Ok(Some(listener))
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::embedded::OpenError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::StartError),
    #[error(transparent)]
    Blocklist(#[from] crate::server::blocklist::Error),
    #[error("cannot listen on {addr}: {source}")]
    ListenChat {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}
