//! WebSocket as one more transport into the same reader and writer.
//!
//! A browser cannot open a TCP socket, so `--web-listen` also accepts the protocol over
//! WebSocket at `/ws` (the HTTP upgrade is done in [`crate::http`]). The mapping is
//! strict: one binary message carries exactly one client→server frame, and every
//! server→client frame goes out as one binary message. Two adapters turn a WebSocket
//! into the byte streams [`reader`](super::reader) and [`writer`](super::writer)
//! already speak, so framing, limits, auth, acks, the mailbox and takeover are the
//! very same code as over TCP.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use async_tungstenite::tungstenite::protocol::{Message, Role, WebSocketConfig};
use bytes::Bytes;
use futures::{AsyncRead, AsyncWrite, Sink, Stream};

use crate::protocol::{CLIENT_HEADER_LEN, Code, SERVER_HEADER_LEN, notice};
use crate::rt::TcpStream;
use crate::server::Shared;
use crate::server::card::{Arrival, Transport};
use crate::server::listener::{self, Busy, Slot};
use crate::server::reader::Refused;

/// What tungstenite reads into per call: small, since most chat messages are.
const READ_CHUNK: usize = 8 * 1024;
/// Outgoing messages are buffered up to this before tungstenite writes on its own;
/// the writer flushes after every batch anyway.
const WRITE_CHUNK: usize = 64 * 1024;

/// The WebSocket settings for a server whose frames may carry `max_frame_bytes`: a
/// message may hold one whole frame and no more, so a larger one is refused by its
/// header, before its payload is read.
pub fn config(max_frame_bytes: u32) -> WebSocketConfig {
    let max = CLIENT_HEADER_LEN + max_frame_bytes as usize;
    WebSocketConfig::default()
        .read_buffer_size(READ_CHUNK)
        .write_buffer_size(WRITE_CHUNK)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// A place for one more chat connection from `ip`, if `--max-connections` and
/// `--max-connections-per-ip` allow: taken before the upgrade is answered, so a full
/// server refuses with an HTTP status.
pub(crate) fn admit(shared: &Arc<Shared>, ip: IpAddr) -> Result<Slot, Busy> {
    Slot::take_at(shared, ip)
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    async_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

/// Serves one upgraded connection: `io` is the HTTP connection after its `101`
/// (`already_read`: bytes the HTTP server had read past the request), `socket` the TCP
/// socket under it.
pub async fn serve<S>(
    io: S,
    already_read: Vec<u8>,
    socket: TcpStream,
    client: SocketAddr,
    slot: Slot,
    shared: Arc<Shared>,
) where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
{
    let config = config(shared.config.max_frame_bytes);
    let ws =
        WebSocketStream::from_partially_read(io, already_read, Role::Server, Some(config)).await;
    let (sink, stream) = ws.split();
    let conn = listener::next_conn(&shared);
    log::debug!(conn; "WebSocket");
    let source = MessageReader {
        stream,
        current: Bytes::new(),
        max_frame_bytes: shared.config.max_frame_bytes,
    };
    let sink = MessageWriter {
        sink,
        partial: Vec::new(),
    };
    let transport = match shared.config.tls {
        Some(_) => Transport::SecureWebSocket,
        None => Transport::WebSocket,
    };
    let arrival = Arrival {
        conn,
        client,
        transport,
    };
    let registered = shared.directory.register(arrival);
    listener::connection(source, sink, socket, registered, &shared).await;
    drop(slot);
}

fn violation(code: Code, detail: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Refused(notice(code, detail)))
}

/// The client's messages as a byte stream, each checked to hold exactly one frame.
struct MessageReader<St> {
    stream: St,
    /// The part of the current message not yet read.
    current: Bytes,
    max_frame_bytes: u32,
}

impl<St> MessageReader<St> {
    /// The bytes of a message if it is exactly one frame (or a frame whose header
    /// alone is already over the limit, which the reader refuses as over TCP).
    fn check(&self, message: Bytes) -> io::Result<Bytes> {
        let Some(header) = message.get(..CLIENT_HEADER_LEN) else {
            return Err(violation(
                Code::BadMessage,
                format_args!(
                    "a WebSocket message must hold one whole frame; this one has {} bytes, less than a {CLIENT_HEADER_LEN}-byte header",
                    message.len()
                ),
            ));
        };
        let length = u32::from_be_bytes([header[9], header[10], header[11], header[12]]);
        if length > self.max_frame_bytes {
            return Ok(message.slice(..CLIENT_HEADER_LEN));
        }
        let whole = CLIENT_HEADER_LEN + length as usize;
        if whole != message.len() {
            let what = if whole > message.len() {
                "part of one"
            } else {
                "more than one"
            };
            return Err(violation(
                Code::BadMessage,
                format_args!(
                    "a WebSocket message must hold exactly one frame; this one has {} bytes, {what} (its header announces {whole})",
                    message.len()
                ),
            ));
        }
        Ok(message)
    }
}

impl<St> AsyncRead for MessageReader<St>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        while self.current.is_empty() {
            let message = match ready!(Pin::new(&mut self.stream).poll_next(cx)) {
                None => return Poll::Ready(Ok(0)),
                Some(Ok(message)) => message,
                Some(Err(e)) => return Poll::Ready(read_error(e)),
            };
            match message {
                Message::Binary(bytes) => self.current = self.check(bytes)?,
                Message::Text(_) => {
                    return Poll::Ready(Err(violation(
                        Code::BadMessage,
                        "frames travel in binary WebSocket messages, not text",
                    )));
                }
                Message::Close(_) => return Poll::Ready(Ok(0)),
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Poll::Ready(Ok(n))
    }
}

fn read_error(e: WsError) -> io::Result<usize> {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Ok(0),
        WsError::Io(e) => Err(e),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Err(violation(
            Code::FrameTooLarge,
            format_args!(
                "a WebSocket message of {size} bytes is over the limit of {max_size} (one frame at --max-frame-bytes)"
            ),
        )),
        e => Err(violation(
            Code::BadMessage,
            format_args!("not a valid WebSocket stream: {e}"),
        )),
    }
}

/// The writer's byte stream as messages: it cuts the stream at frame boundaries and
/// sends each server→client frame as one binary message.
struct MessageWriter<Si> {
    sink: Si,
    /// The start of a frame whose end has not been written yet.
    partial: Vec<u8>,
}

/// The length of the server frame at the start of `bytes`, once its header is there.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..SERVER_HEADER_LEN)?;
    let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    Some(SERVER_HEADER_LEN + length as usize)
}

impl<Si> MessageWriter<Si>
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    fn send(&mut self, frame: Bytes) -> io::Result<()> {
        Pin::new(&mut self.sink)
            .start_send(Message::Binary(frame))
            .map_err(write_error)
    }
}

impl<Si> AsyncWrite for MessageWriter<Si>
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.sink).poll_ready(cx)).map_err(write_error)?;
        // Common case: a whole frame at the start of the buffer goes out without a copy
        // into `partial`.
        if self.partial.is_empty()
            && let Some(len) = frame_len(buf).filter(|&len| len <= buf.len())
        {
            self.send(Bytes::copy_from_slice(&buf[..len]))?;
            return Poll::Ready(Ok(len));
        }
        // Otherwise take what completes the header, then what completes the frame.
        let want = match frame_len(&self.partial) {
            Some(len) => len - self.partial.len(),
            None => SERVER_HEADER_LEN - self.partial.len(),
        };
        let take = want.min(buf.len());
        self.partial.extend_from_slice(&buf[..take]);
        if frame_len(&self.partial) == Some(self.partial.len()) {
            let frame = std::mem::take(&mut self.partial);
            self.send(Bytes::from(frame))?;
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink).poll_flush(cx).map_err(write_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink).poll_close(cx).map_err(write_error)
    }
}

fn write_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_len_needs_a_whole_header() {
        assert_eq!(frame_len(&[0, 0, 0, 1, 1, 0, 0]), None);
        assert_eq!(frame_len(&[0, 0, 0, 1, 1, 0, 0, 0, 5]), Some(14));
    }
}
