//! The accept loop and the life of one connection.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::{Either, select};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, SinkExt};

use crate::metrics::Refusal;
use crate::protocol::{Code, SERVER_HEADER_LEN, notice};
use crate::rt::{self, TcpListener, TcpStream};
use crate::server::addresses::AddressSlot;
use crate::server::card::{Arrival, Transport};
use crate::server::directory::Registered;
use crate::server::event::Event;
use crate::server::files::Spare;
use crate::server::proxy::{self, Proxied};
use crate::server::writer;
use crate::server::{Shared, reader};
use crate::tls::TlsAcceptor;

/// How long an accept loop waits when the process is out of file descriptors.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long written data may stay unacknowledged before the kernel drops the connection.
const USER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a refused connection may take to receive its `server-busy` notice.
const REFUSAL_LIMIT: Duration = Duration::from_secs(1);

/// Accepts connections until `stop` completes, and returns what it completed with.
pub async fn run<T>(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: impl std::future::Future<Output = T>,
) -> T {
    let mut stop = std::pin::pin!(stop);
    let mut backoff = BACKOFF_MIN;
    let mut spare = Spare::new();
    loop {
        let accept = std::pin::pin!(listener.accept());
        let (stream, peer) = match select(accept, stop.as_mut()).await {
            Either::Right((ended, _)) => return ended,
            Either::Left((Ok(accepted), _)) => {
                backoff = BACKOFF_MIN;
                accepted
            }
            Either::Left((Err(e), _)) => {
                if is_out_of_files(&e) && spare.release() {
                    // Out of descriptors: use the spare to tell one waiting client.
                    let accepted = listener.accept().await;
                    if let Ok((stream, peer)) = accepted {
                        log::warn!("refusing {peer}: out of file descriptors");
                        refuse(stream, Busy::Server, &shared).await;
                    }
                    spare.restore();
                    rt::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                } else if is_resource_exhaustion(&e) {
                    // EMFILE and friends: the pending connection stays in the backlog;
                    // retrying at once would spin. Wait for connections to close.
                    log::warn!("accept: {e}; retrying in {backoff:?}");
                    rt::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                } else {
                    log::debug!("accept: {e}");
                }
                continue;
            }
        };
        // Counted under its address first when the address is known, so that one
        // address's refused connections never take the others' places.
        let proxied = shared.config.proxy_protocol;
        let taken = match proxied {
            true => Slot::take(&shared),
            false => Slot::take_at(&shared, peer.ip()),
        };
        let mut slot = match taken {
            Ok(slot) => slot,
            Err(busy) => {
                log::warn!("refusing {peer}: {}", busy.reason(&shared));
                let shared = shared.clone();
                rt::spawn(async move { refuse(stream, busy, &shared).await });
                continue;
            }
        };
        configure(&stream);
        let conn = next_conn(&shared);
        let shared = shared.clone();
        rt::spawn_conn(async move {
            let Some(client) = client_address(&stream, peer, conn, &shared).await else {
                return;
            };
            if proxied && let Err(busy) = slot.count_under(client.ip()) {
                log::warn!(conn; "refusing {client}: {}", busy.reason(&shared));
                return refuse(stream, busy, &shared).await;
            }
            if client == peer {
                log::debug!(conn; "accepted from {peer}");
            } else {
                log::debug!(conn; "accepted from {client} through {peer}");
            }
            let transport = match shared.config.tls {
                Some(_) => Transport::Tls,
                None => Transport::Tcp,
            };
            let arrival = Arrival {
                conn,
                client,
                transport,
            };
            let registered = shared.directory.register(arrival);
            serve(stream, registered, &shared).await;
            drop(slot);
        });
    }
}

/// The client's address: the socket's peer, or with `--proxy-protocol` what the
/// proxy's header says. `None` when the header is missing, bad or late: the connection
/// is then closed.
async fn client_address(
    stream: &TcpStream,
    peer: SocketAddr,
    conn: u64,
    shared: &Shared,
) -> Option<SocketAddr> {
    if !shared.config.proxy_protocol {
        return Some(peer);
    }
    let mut read = stream;
    // Boxed: only proxied connections carry the header's reading in their task.
    let header = Box::pin(proxy::read(&mut read));
    let refused = match rt::timeout(shared.config.frame_timeout, header).await {
        Some(Ok(Proxied::Client(client))) => return Some(client),
        Some(Ok(Proxied::Local)) => return Some(peer),
        Some(Err(e)) => e.to_string(),
        None => "no PROXY protocol header in time".to_string(),
    };
    log::info!(conn; "closing {peer}: {refused}");
    if let Some(m) = &shared.metrics {
        m.refused(Refusal::proxy_refused);
    }
    None
}

fn is_out_of_files(e: &io::Error) -> bool {
    // EMFILE, ENFILE
    matches!(e.raw_os_error(), Some(24 | 23))
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// A new connection's number, for logs and the broker.
pub(crate) fn next_conn(shared: &Shared) -> u64 {
    shared.next_conn.fetch_add(1, Ordering::Relaxed)
}

/// Keepalive finds peers that vanished without a FIN; the user timeout bounds how long
/// unacknowledged data may sit in a dead peer's direction.
pub(crate) fn configure(stream: &TcpStream) {
    rt::with_socket(stream, |sock| {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        let _ = sock.set_tcp_keepalive(&keepalive);
        let _ = sock.set_nodelay(true);
        #[cfg(target_os = "linux")]
        let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
    });
}

pub(crate) async fn refuse(mut stream: TcpStream, busy: Busy, shared: &Shared) {
    let notice = notice(
        Code::ServerBusy,
        format_args!("{}; try again later", busy.reason(shared)),
    );
    if let Some(m) = &shared.metrics {
        m.refused(busy.refusal());
        m.notice(&notice[SERVER_HEADER_LEN..]);
    }
    let _ = rt::timeout(REFUSAL_LIMIT, stream.write_all(&notice)).await;
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A place under `--max-connections` and `--max-connections-per-ip`, given back when
/// dropped.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    /// Its place in its address's count, once the address is known.
    address: Option<AddressSlot>,
}

/// Why a connection found no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// `--max-connections` are open.
    Server,
    /// Its address holds `--max-connections-per-ip`.
    Address,
}

impl Busy {
    /// What the refused client (and the log) is told.
    pub(crate) fn reason(self, shared: &Shared) -> String {
        match self {
            Busy::Server => format!("{} connections open", shared.config.max_connections),
            Busy::Address => match shared.per_address.max() {
                1 => "a connection open from this address already".to_string(),
                n => format!("{n} connections open from this address"),
            },
        }
    }

    pub(crate) fn refusal(self) -> Refusal {
        match self {
            Busy::Server => Refusal::server_busy,
            Busy::Address => Refusal::address_busy,
        }
    }
}

impl Slot {
    /// A place under `--max-connections`; [`Slot::count_under`] then counts it under
    /// its client's address (which a proxied connection only knows after its header).
    pub(crate) fn take(shared: &Arc<Shared>) -> Result<Slot, Busy> {
        let max = shared.config.max_connections;
        shared
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Busy::Server)?;
        if let Some(m) = &shared.metrics {
            m.accepted.inc();
            m.connections.inc();
        }
        Ok(Slot {
            shared: shared.clone(),
            address: None,
        })
    }

    /// A place for a connection from `ip`: its address's first, then the server's.
    pub(crate) fn take_at(shared: &Arc<Shared>, ip: IpAddr) -> Result<Slot, Busy> {
        let address = shared.per_address.take(ip).ok_or(Busy::Address)?;
        let mut slot = Slot::take(shared)?;
        slot.address = Some(address);
        Ok(slot)
    }

    /// Counts this connection under `ip`, unless that address holds its share.
    pub(crate) fn count_under(&mut self, ip: IpAddr) -> Result<(), Busy> {
        self.address = Some(self.shared.per_address.take(ip).ok_or(Busy::Address)?);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = &self.shared.metrics {
            m.connections.dec();
        }
    }
}

/// One connection: TLS handshake if configured, then [`connection`].
// An `async fn` would hold its arguments twice (see `connection`).
#[allow(clippy::manual_async_fn)]
fn serve(
    stream: TcpStream,
    registered: Box<Registered>,
    shared: &Arc<Shared>,
) -> impl Future<Output = ()> {
    async move {
        match &shared.config.tls {
            None => {
                let conn = match rt::Conn::adopt(stream) {
                    Ok(conn) => conn,
                    Err(e) => {
                        let conn = registered.conn;
                        return log::info!(conn; "connection not taken over: {e}");
                    }
                };
                connection(conn.reader(), conn.clone(), conn, registered, shared).await
            }
            // Boxed: a TLS session's state is kilobytes, and inline it would make every
            // plain connection's task that large too (it did: 3 KiB of each idle plain
            // connection's 4 KiB).
            Some(tls) => Box::pin(serve_tls(stream, tls.current(), registered, shared)).await,
        }
    }
}

async fn serve_tls(
    stream: TcpStream,
    config: Arc<futures_rustls::rustls::ServerConfig>,
    registered: Box<Registered>,
    shared: &Arc<Shared>,
) {
    let conn = registered.conn;
    let handshake = TlsAcceptor::from(config).accept(stream.clone());
    match rt::timeout(shared.config.frame_timeout, handshake).await {
        Some(Ok(session)) => {
            let (read, write) = session.split();
            connection(read, write, stream, registered, shared).await
        }
        Some(Err(e)) => {
            log::info!(conn; "TLS handshake failed: {e}");
            if let Some(m) = &shared.metrics {
                m.refused(Refusal::tls_failed);
            }
        }
        None => log::info!(conn; "TLS handshake timed out"),
    }
}

/// Registers with the broker, writes on a task of its own, reads here. Every transport
/// (TCP, TLS, WebSocket) ends here as a byte stream each way.
///
/// Like every function a connection's task awaits for its whole life, a plain `fn`
/// returning an `async move` block: an `async fn` would hold each argument twice
/// (rust-lang/rust#62958).
// An `async fn` would hold its arguments twice (see the doc above).
#[allow(clippy::manual_async_fn)]
pub(crate) fn connection<R, W, S>(
    read: R,
    write: W,
    socket: S,
    registered: Box<Registered>,
    shared: &Arc<Shared>,
) -> impl Future<Output = ()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    S: writer::Socket + Send + 'static,
{
    async move {
        let conn = registered.conn;
        let connected = Event::Connected {
            conn,
            outbox: registered.outbox.clone(),
        };
        if shared.events.clone().send(connected).await.is_err() {
            return;
        }
        let writer = rt::spawn_conn(writer::run(
            write,
            socket,
            conn,
            registered.outbox.clone(),
            shared.clone(),
        ));
        reader::run(read, conn, &registered.outbox, shared).await;
        writer.await;
        drop(registered);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    use futures::channel::mpsc;

    use super::*;
    use crate::server::{Config, budget::Budget};

    /// What an idle connection costs is mostly its two tasks: every wait that holds a
    /// timer or an item to send is boxed so that these stay small. The bound is what
    /// keeps an idle connection near 2 KiB of server memory (BENCHMARKS.md).
    #[test]
    fn an_idle_connection_s_tasks_stay_small() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let stream = TcpStream::from(accepted);
        let (events, _events) = mpsc::channel(1);
        let (store, _store) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            config: Config::new("127.0.0.1:0", "unused"),
            events,
            store: crate::server::backend::Backend::one(store),
            inbound: Arc::new(Budget::new(1)),
            per_address: crate::server::addresses::PerAddress::new(0),
            directory: Default::default(),
            blocklist: Arc::new(crate::server::blocklist::Blocklist::in_memory()),
            drain: Arc::new(crate::server::drain::Drain::new().0),
            metrics: None,
            active: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
        });
        // A writer as a plain connection's: on the adopted socket.
        let _other = std::net::TcpStream::connect(addr).expect("connect");
        let (other, _) = listener.accept().expect("accept");
        let plain = rt::Conn::adopt(TcpStream::from(other)).expect("adopt");
        let writer = writer::run(
            plain.clone(),
            plain,
            1,
            Arc::new(crate::server::outbox::Outbox::default()),
            shared.clone(),
        );
        let arrival = Arrival {
            conn: 1,
            client: addr,
            transport: Transport::Tcp,
        };
        let registered = shared.directory.register(arrival);
        let task = async move { serve(stream, registered, &shared).await };
        let (task, writer) = (size_of_val(&task), size_of_val(&writer));
        let outbox = size_of::<crate::server::outbox::Outbox>();
        eprintln!("connection task {task} B, writer task {writer} B, outbox {outbox} B");
        assert!(task + writer <= 800, "{task} + {writer} bytes");
        // The outbox also carries the connection's card for the directory, and the
        // replies that wait behind an echo (moved from the broker's table of
        // connections, which is that much smaller); what only some connections need
        // (acks, a close) is boxed.
        assert!(outbox <= 240, "outbox {outbox} bytes");
    }
}
