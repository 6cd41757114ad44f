//! An async client for the chat protocol, used by `chat-client`, `chat-bench` and the
//! tests.

use std::io;
use std::sync::Arc;

use futures_rustls::rustls::ClientConfig;
use futures_rustls::rustls::pki_types::ServerName;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::session::{Device, Received, Record, What};
use crate::protocol::{ClientFrame, Code, FrameBuf, Notice, ServerFrame};
use crate::rt::TcpStream;
use crate::tls::TlsConnector;

/// The largest body a client accepts from a server, so a broken or hostile server
/// cannot make it allocate without bound.
pub const MAX_INCOMING: u32 = 64 * 1024 * 1024;

type Source = Box<dyn AsyncRead + Send + Unpin>;
type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// The receiving half of a connection.
pub struct Receiver {
    source: Source,
    buf: FrameBuf,
}

/// The sending half of a connection.
pub struct Sender {
    sink: Sink,
    buf: Vec<u8>,
}

/// A connection to a chat server.
pub struct Client {
    pub receiver: Receiver,
    pub sender: Sender,
}

impl Client {
    /// Connects over plain TCP.
    pub async fn connect(addr: &str) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client::from_halves(stream.clone(), stream))
    }

    /// Connects from a given local address (a load generator spreading connections over
    /// 127.0.0.2, 127.0.0.3, ... to get past one address's ephemeral ports).
    pub async fn connect_from(addr: &str, local: std::net::IpAddr) -> io::Result<Client> {
        use std::net::ToSocketAddrs;
        let remote = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(remote),
            socket2::Type::STREAM,
            None,
        )?;
        socket.bind(&std::net::SocketAddr::new(local, 0).into())?;
        // A blocking connect on loopback; the runtime takes the socket over afterwards.
        socket.connect(&remote.into())?;
        let stream = TcpStream::from(std::net::TcpStream::from(socket));
        stream.set_nodelay(true)?;
        Ok(Client::from_halves(stream.clone(), stream))
    }

    /// Connects over TLS, verifying the server's certificate against `name`.
    pub async fn connect_tls(
        addr: &str,
        name: ServerName<'static>,
        config: Arc<ClientConfig>,
    ) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Client::tls_over(stream, name, config).await
    }

    /// Opens TLS over a connected socket (one that has already sent a PROXY header).
    pub async fn tls_over(
        stream: TcpStream,
        name: ServerName<'static>,
        config: Arc<ClientConfig>,
    ) -> io::Result<Client> {
        let session = TlsConnector::from(config).connect(name, stream).await?;
        Ok(Client::from_stream(session))
    }

    /// Wraps any byte stream, such as a TLS session.
    pub fn from_stream<S>(stream: S) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = stream.split();
        Client::from_halves(read, write)
    }

    fn from_halves(
        read: impl AsyncRead + Send + Unpin + 'static,
        write: impl AsyncWrite + Send + Unpin + 'static,
    ) -> Client {
        Client {
            receiver: Receiver {
                source: Box::new(read),
                buf: FrameBuf::new(),
            },
            sender: Sender {
                sink: Box::new(write),
                buf: Vec::new(),
            },
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> io::Result<()> {
        self.sender.send(frame).await
    }

    pub async fn recv(&mut self) -> io::Result<Option<ServerFrame>> {
        self.receiver.recv().await
    }

    /// Binds the connection to `id` (with a token when the server requires one) and
    /// waits for the `welcome` notice. Frames that arrive first, such as stored ones,
    /// are returned for the caller to handle.
    pub async fn hello(&mut self, id: u32, token: Option<&str>) -> io::Result<Vec<ServerFrame>> {
        let token = token.unwrap_or_default().as_bytes();
        self.send(&ClientFrame::hello(id, token)).await?;
        let mut early = Vec::new();
        loop {
            let frame = self.recv().await?.ok_or_else(closed)?;
            match frame.notice() {
                Some(n) if n.is(Code::Welcome) => return Ok(early),
                Some(n) => return Err(refused(&n)),
                None => early.push(frame),
            }
        }
    }

    /// Binds the connection to `id` with acks on (control operation 3) and waits for
    /// the `welcome` notice. Returns `false` if the server does not support acks (it
    /// answered `bad-control`); the connection is then bound with a plain hello.
    pub async fn hello_acks(&mut self, id: u32, token: Option<&str>) -> io::Result<bool> {
        let bytes = token.unwrap_or_default().as_bytes();
        self.send(&ClientFrame::hello_acks(id, bytes)).await?;
        let frame = self.recv().await?.ok_or_else(closed)?;
        match frame.notice() {
            Some(n) if n.is(Code::Welcome) => Ok(true),
            Some(n) if n.is(Code::BadControl) => {
                let early = self.hello(id, token).await?;
                if early.is_empty() {
                    Ok(false)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "frames arrived before the welcome",
                    ))
                }
            }
            Some(n) => Err(refused(&n)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a data frame arrived before the welcome",
            )),
        }
    }

    /// Opens a session as `device` of `id` (control operation 4; acks, carbons and
    /// envelopes on) and waits for its `welcome` and `sync` record, which it returns.
    /// What the device missed follows, then the `synced` record, then live frames:
    /// read them with [`Client::recv_session`].
    pub async fn session(
        &mut self,
        id: u32,
        device: &Device,
        token: Option<&str>,
    ) -> io::Result<Record> {
        let token = token.unwrap_or_default().as_bytes();
        self.send(&ClientFrame::session(id, device, token)).await?;
        match self.recv_session().await?.ok_or_else(closed)? {
            Received::Notice(n) if n.is(Code::Welcome) => {}
            Received::Notice(n) => return Err(refused(&n)),
            other => return Err(unexpected("the welcome", &other)),
        }
        loop {
            match self.recv_session().await?.ok_or_else(closed)? {
                Received::Record(sync @ Record::Sync { .. }) => return Ok(sync),
                // A read marker another device moved meanwhile: nothing to keep.
                Received::Record(_) => {}
                other => return Err(unexpected("the sync record", &other)),
            }
        }
    }

    /// Reads the next frame of a session: a message with its envelope, a notice or a
    /// record.
    pub async fn recv_session(&mut self) -> io::Result<Option<Received>> {
        let Some(frame) = self.recv().await? else {
            return Ok(None);
        };
        Received::read(frame)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Sends a ping and waits for the `pong` notice.
    pub async fn ping(&mut self) -> io::Result<()> {
        self.send(&ClientFrame::ping()).await?;
        let frame = self.recv().await?.ok_or_else(closed)?;
        match frame.notice() {
            Some(n) if n.is(Code::Pong) => Ok(()),
            Some(n) => Err(refused(&n)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected a pong notice",
            )),
        }
    }

    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }
}

/// Counts the data frames a client has handled since it turned acks on, and makes
/// the acks that tell the server (control operation 2, XEP-0198's running count `h`).
#[derive(Debug, Clone)]
pub struct Acker {
    id: u32,
    handled: u32,
    acked: u32,
}

impl Acker {
    /// For a connection bound to `id`, from the moment acks went on.
    pub fn new(id: u32) -> Acker {
        Acker {
            id,
            handled: 0,
            acked: 0,
        }
    }

    /// Counts `frame` as handled if it is a data frame from another id (echoes of the
    /// client's own frames and notices do not count). Returns whether it counted.
    pub fn handled(&mut self, frame: &ServerFrame) -> bool {
        let counts = frame.sender != self.id && frame.notice().is_none();
        if counts {
            self.handled = self.handled.wrapping_add(1);
        }
        counts
    }

    /// Counts a session's message if acks count it (deliveries and copies from the
    /// id's other devices; not echoes nor pages). Returns whether it counted.
    pub fn handled_what(&mut self, what: What) -> bool {
        let counts = what.counted();
        if counts {
            self.handled = self.handled.wrapping_add(1);
        }
        counts
    }

    /// The ack for everything handled so far, unless it was already sent.
    pub fn ack(&mut self) -> Option<ClientFrame> {
        if self.handled == self.acked {
            return None;
        }
        self.acked = self.handled;
        Some(ClientFrame::ack(self.id, self.handled))
    }
}

fn unexpected(wanted: &str, got: &Received) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("expected {wanted}, got {got:?}"),
    )
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection")
}

/// The error for a notice that refuses what the client asked for.
pub fn refused(notice: &Notice) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("server said {notice}"),
    )
}

impl Sender {
    pub async fn send(&mut self, frame: &ClientFrame) -> io::Result<()> {
        self.buf.clear();
        frame.encode(&mut self.buf);
        self.sink.write_all(&self.buf).await?;
        self.sink.flush().await
    }

    /// Sends bytes as they are: pre-encoded frames, or deliberately broken ones.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.write_all(bytes).await?;
        self.sink.flush().await
    }

    pub async fn close(&mut self) -> io::Result<()> {
        self.sink.close().await
    }
}

impl Receiver {
    /// The next frame, or `None` when the server closed the connection between frames.
    pub async fn recv(&mut self) -> io::Result<Option<ServerFrame>> {
        loop {
            match self.buf.decode_server(MAX_INCOMING) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let n = self.source.read(self.buf.space()).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-frame",
                ));
            }
            self.buf.filled(n);
        }
    }
}
