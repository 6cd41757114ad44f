//! One writer task per connection, fed through that connection's [`Outbox`].
//!
//! The broker pushes frames into the outbox without ever waiting: the outbox is
//! bounded in bytes (`--max-pending-bytes`) and the broker checks the bound before it
//! pushes, disconnecting a receiver that falls that far behind. The writer copies
//! whatever is queued into one buffer and writes it with one call, so a busy connection
//! costs one syscall per batch rather than per frame.
//!
//! A frame leaves the outbox only once it has been written to the socket; the writer
//! then tells the store to remove what that delivered. When the connection ends,
//! whatever is still queued is simply not removed: every frame from another id is in
//! the store until delivered, so the id's next connection gets it from there.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::{Either, select};
use futures::{AsyncWrite, AsyncWriteExt, FutureExt};

use crate::metrics::{Metrics, Out};
use crate::protocol::{CONTROL, SERVER_HEADER_LEN};
use crate::rt;
use crate::server::Shared;
use crate::server::backend::send_soon;
use crate::server::event::{ConnId, Event};
use crate::server::outbox::{Closing, EchoTo, Origin, Outbox, Outgoing, Written};
use crate::store::{Command, Outcome};

/// How long a closing connection may take to write what it still has queued.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long a final notice may take when the queue is abandoned.
const NOTICE_LIMIT: Duration = Duration::from_millis(500);

/// Why a batch was not fully written.
#[derive(Debug)]
enum Stopped {
    /// The socket failed: nothing more can be written, not even a notice.
    Io,
    /// The broker abandoned the queue, or a closing drain ran out of time.
    Cut,
}

/// The raw socket under a writer's stream, for what the stream cannot tell.
pub trait Socket {
    /// The peer has gone: see [`rt::peer_closed`].
    fn peer_closed(&self) -> bool;
    /// Closes both directions, which ends the connection's reader too.
    fn shutdown(&self);
}

impl Socket for rt::TcpStream {
    fn peer_closed(&self) -> bool {
        rt::peer_closed(self)
    }
    fn shutdown(&self) {
        let _ = rt::TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl Socket for rt::Conn {
    fn peer_closed(&self) -> bool {
        rt::Conn::peer_closed(self)
    }
    fn shutdown(&self) {
        let _ = rt::Conn::shutdown(self, std::net::Shutdown::Both);
    }
}

/// Writes the outbox to `sink` until the connection closes, then hands the frames it
/// could not write back to the broker.
///
/// A plain `fn` returning an `async move` block, like the reader's, so that its task
/// holds each argument once (rust-lang/rust#62958).
// An `async fn` would hold its arguments twice (see the doc above).
#[allow(clippy::manual_async_fn)]
pub fn run<W, S>(
    mut sink: W,
    socket: S,
    conn: ConnId,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
) -> impl Future<Output = ()>
where
    W: AsyncWrite + Unpin,
    S: Socket,
{
    async move {
        let mut batch = Vec::new();
        let mut deadline = None;
        let mut at_boundary = true;
        let close = loop {
            batch.clear();
            if let Some(close) = poll_fn(|cx| outbox.poll_work(cx, &mut batch)).await {
                break Some(close);
            }
            let must_arrive = batch
                .iter()
                .any(|o| matches!(o.origin, Origin::Data { .. }));
            if must_arrive && socket.peer_closed() {
                break None;
            }
            if deadline.is_none() && outbox.is_closing() {
                deadline = Some(Instant::now() + DRAIN_LIMIT);
            }
            let (written, stopped) = write_batch(&mut sink, &batch, &outbox, &mut deadline).await;
            if let Some(m) = &shared.metrics {
                count_written(m, &batch[..written.whole]);
            }
            let done = outbox.written(written.whole);
            report_written(done, conn, &shared).await;
            match stopped {
                None => {}
                Some(Stopped::Io) => break None,
                Some(Stopped::Cut) => {
                    at_boundary = written.at_boundary;
                    break outbox.close_requested();
                }
            }
        };
        if let Some(notice) = close.and_then(|c| c.notice).filter(|_| at_boundary) {
            let sent = Box::pin(rt::timeout(NOTICE_LIMIT, async {
                sink.write_all(&notice).await?;
                sink.flush().await
            }))
            .await;
            if let (Some(m), Some(Ok(()))) = (&shared.metrics, sent) {
                count_written(m, &[Outgoing::reply(notice)]);
            }
        }
        let _ = Box::pin(rt::timeout(NOTICE_LIMIT, sink.close())).await;
        socket.shutdown();
        let undelivered = outbox.take_all();
        let done = Event::WriterDone { conn, undelivered };
        if let Some(wait) = send_soon(&shared.events, done) {
            wait.await;
        }
    }
}

/// Writes a batch as one buffer, stopping early if the outbox is abandoned or the
/// drain deadline passes; a close asked for during the write sets that deadline.
/// Returns how many frames were written whole, and why it stopped early, if it did.
/// The buffer lives only for the batch, so an idle connection holds no write buffer.
async fn write_batch<W: AsyncWrite + Unpin>(
    sink: &mut W,
    batch: &[Outgoing],
    outbox: &Outbox,
    deadline: &mut Option<Instant>,
) -> (Progress, Option<Stopped>) {
    let joined;
    let bytes: &[u8] = if let [one] = batch {
        &one.wire
    } else {
        joined = concat(batch);
        &joined
    };
    let mut pos = 0;
    let mut stopped = None;
    while pos < bytes.len() {
        match step(sink, Io::Write(&bytes[pos..]), outbox, deadline).await {
            Some(Ok(n)) if n > 0 => pos += n,
            Some(_) => {
                stopped = Some(Stopped::Io);
                break;
            }
            None => {
                stopped = Some(Stopped::Cut);
                break;
            }
        }
    }
    if stopped.is_none() {
        // TLS and WebSocket sinks buffer: the bytes are the client's only once
        // flushed, and a client that reads nothing can block the flush too. Until then
        // none of the batch counts as written (it may come again: at least once).
        let flushed = step(sink, Io::Flush, outbox, deadline).await;
        let stopped = match flushed {
            Some(Ok(_)) => None,
            Some(Err(_)) => Some(Stopped::Io),
            None => Some(Stopped::Cut),
        };
        if stopped.is_some() {
            let written = Progress {
                whole: 0,
                at_boundary: false,
            };
            return (written, stopped);
        }
    }
    let (mut whole, mut end) = (0, 0);
    for item in batch {
        if end + item.wire.len() > pos {
            break;
        }
        end += item.wire.len();
        whole += 1;
    }
    (
        Progress {
            whole,
            at_boundary: end == pos,
        },
        stopped,
    )
}

/// One step of writing.
#[derive(Clone, Copy)]
enum Io<'a> {
    Write(&'a [u8]),
    Flush,
}

/// Does `io` on `sink`, at once if it can (most writes and flushes can); one that must
/// wait is raced against the close by [`unless_cut`], boxed, so that every writer task
/// stays small and the common case allocates nothing.
async fn step<W: AsyncWrite + Unpin>(
    sink: &mut W,
    io: Io<'_>,
    outbox: &Outbox,
    deadline: &mut Option<Instant>,
) -> Option<std::io::Result<usize>> {
    let now = match io {
        Io::Write(bytes) => sink.write(bytes).now_or_never(),
        Io::Flush => sink.flush().now_or_never().map(|done| done.map(|()| 0)),
    };
    match now {
        Some(done) => Some(done),
        None => Box::pin(unless_cut(sink, io, outbox, deadline)).await,
    }
}

/// Does `io` on `sink` unless the outbox is abandoned or the drain deadline passes
/// first (`None`). A close asked for meanwhile starts that deadline (`deadline`), and
/// the step goes on against it: a step that is still pending has taken nothing, so it
/// is simply made again.
async fn unless_cut<W: AsyncWrite + Unpin>(
    sink: &mut W,
    io: Io<'_>,
    outbox: &Outbox,
    deadline: &mut Option<Instant>,
) -> Option<std::io::Result<usize>> {
    loop {
        let step = pin!(async {
            match io {
                Io::Write(bytes) => sink.write(bytes).await,
                Io::Flush => sink.flush().await.map(|()| 0),
            }
        });
        let draining = deadline.is_some();
        let closing = pin!(poll_fn(|cx| outbox.poll_closing(cx, draining)));
        // The timer is boxed, and only made when closing: inline, it would make every
        // writer task that much larger.
        let mut timer =
            deadline.map(|d| Box::pin(rt::sleep(d.saturating_duration_since(Instant::now()))));
        let expired = pin!(poll_fn(|cx| match timer.as_mut() {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }));
        match select(step, select(closing, expired)).await {
            Either::Left((done, _)) => return Some(done),
            Either::Right((Either::Left((Closing::Drain, _)), _)) => {
                *deadline = Some(Instant::now() + DRAIN_LIMIT);
            }
            Either::Right(_) => return None,
        }
    }
}

fn concat(batch: &[Outgoing]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(batch.iter().map(|o| o.wire.len()).sum());
    for item in batch {
        buf.extend_from_slice(&item.wire);
    }
    buf
}

/// How much of a batch reached the socket.
struct Progress {
    whole: usize,
    /// The stream ends exactly after a frame, so a notice can still follow.
    at_boundary: bool,
}

/// Counts written frames by kind, and the delivery time of live ones.
fn count_written(m: &Metrics, done: &[Outgoing]) {
    let (mut echo, mut forward, mut mailbox, mut notices, mut bytes) = (0, 0, 0, 0, 0);
    let now = Instant::now();
    for item in done {
        bytes += item.wire.len() as u64;
        match item.origin {
            Origin::Reply | Origin::AcksOn => {
                // A notice is a frame from sender 0 with type 0.
                if item.wire.starts_with(&[0, 0, 0, 0, CONTROL]) {
                    notices += 1;
                    m.notice(&item.wire[SERVER_HEADER_LEN..]);
                } else {
                    echo += 1;
                }
            }
            Origin::Data {
                arrived: Some(at), ..
            } => {
                forward += 1;
                m.delivery_seconds
                    .observe(now.saturating_duration_since(at).as_secs_f64());
            }
            Origin::Data { arrived: None, .. } => mailbox += 1,
        }
    }
    m.frames_out(Out::echo, echo);
    m.frames_out(Out::forward, forward);
    m.frames_out(Out::mailbox, mailbox);
    m.frames_out(Out::notice, notices);
    m.bytes_out.inc_by(bytes);
}

/// Tells the store what was delivered and the broker what it waits for.
async fn report_written(done: Written, conn: ConnId, shared: &Shared) {
    if let Some(receiver) = done.receiver.filter(|_| !done.delete.is_empty()) {
        let delete = Command::Delete {
            receiver: receiver.id,
            device: receiver.device,
            seqs: done.delete,
        };
        if let Some(wait) = shared.store.delivered(delete) {
            wait.await;
        }
    }
    // An echo that waited for this write is settled here, in its sender's outbox;
    // only a forwarded batch's goes through the broker.
    // Each sender's writer is woken once, for everything this write settled for it.
    let mut remote = Vec::new();
    let mut settled: Vec<Arc<Outbox>> = Vec::new();
    for (to, seq) in done.delivered {
        match to {
            EchoTo::Conn(outbox) => {
                if outbox.settle(seq, Outcome::Stored)
                    && !settled.iter().any(|o| Arc::ptr_eq(o, &outbox))
                {
                    settled.push(outbox);
                }
            }
            EchoTo::Remote(ticket) => remote.push((ticket, seq)),
        }
    }
    for outbox in settled {
        outbox.wake();
    }
    if done.page_end || !remote.is_empty() {
        let written = Event::Written {
            conn,
            page_end: done.page_end,
            delivered: remote,
        };
        if let Some(wait) = send_soon(&shared.events, written) {
            wait.await;
        }
    }
}
