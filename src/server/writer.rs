//! One writer task per connection, fed through that connection's [`Outbox`].
//!
//! The broker pushes frames into the outbox without ever waiting: the outbox is
//! bounded in bytes (`--max-pending-bytes`) and the broker checks the bound before it
//! pushes, disconnecting a receiver that falls that far behind. The writer copies
//! whatever is queued into one buffer and writes it with one call, so a busy connection
//! costs one syscall per batch rather than per frame.
//!
//! A frame leaves the outbox only once it has been written to the socket. When the
//! connection ends, whatever is still queued goes back to the broker, which stores
//! forwarded frames in the receiver's mailbox: nothing accepted is lost to a dropped
//! connection.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{Either, select};
use futures::{AsyncWrite, AsyncWriteExt, SinkExt};

use crate::rt;
use crate::server::Shared;
use crate::server::broker::{ConnId, Event};
use crate::store::Command;

/// Frames up to this size are copied into the batch buffer; larger ones are written
/// straight from their own allocation.
const COALESCE_MAX_FRAME: usize = 64 * 1024;
/// A batch stops growing at this size.
const BATCH_BYTES: usize = 256 * 1024;
/// How long a closing connection may take to write what it still has queued.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long a final notice may take when the queue is abandoned.
const NOTICE_LIMIT: Duration = Duration::from_millis(500);

/// Where a queued frame came from, which decides what happens to it if it is never
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An echo or a notice: meaningful only on this connection.
    Reply,
    /// A frame forwarded live: goes to the mailbox if never written.
    Live { seq: u64 },
    /// A frame read from the mailbox: deleted from it once written. `last` marks the end
    /// of a page, after which the broker loads the next one.
    Mailbox { receiver: u32, seq: u64, last: bool },
}

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub wire: Bytes,
    pub origin: Origin,
}

/// How a connection is to be closed.
#[derive(Debug, Clone)]
pub struct Close {
    /// Written last, if the stream is at a frame boundary.
    pub notice: Option<Bytes>,
    /// Write what is queued first (within [`DRAIN_LIMIT`]), or abandon it at once.
    pub drain: bool,
}

/// The queue between the broker and one writer task.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    close: Option<Close>,
    /// The writer, waiting for frames or for an abandoning close.
    waker: Option<Waker>,
    /// The reader, waiting for room (see [`Outbox::poll_room`]).
    room_waker: Option<Waker>,
    /// The writer has taken what was left and stopped: nothing more may be queued.
    finished: bool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the queue half-updated: every critical section
        // is a few field assignments, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame and wakes the writer. Once the writer has finished (its
    /// connection is gone, though the broker may not have heard yet) the frame is
    /// given back, so the caller can store it instead of losing it.
    pub fn push(&self, item: Outgoing) -> Result<(), Outgoing> {
        let mut s = self.lock();
        if s.finished {
            return Err(item);
        }
        s.bytes += item.wire.len();
        s.queue.push_back(item);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Queues an echo or a notice; if the connection is gone, so is the need for it.
    pub fn push_reply(&self, wire: Bytes) {
        let _ = self.push(Outgoing {
            wire,
            origin: Origin::Reply,
        });
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Asks the writer to finish. An abandoning close overrides a draining one.
    pub fn close(&self, close: Close) {
        let mut s = self.lock();
        match &s.close {
            Some(c) if !c.drain || close.drain => return,
            _ => s.close = Some(close),
        }
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        if let Some(w) = s.room_waker.take() {
            w.wake();
        }
    }

    /// Ready while at most `limit` bytes wait, or once the connection is closing. The
    /// connection's reader waits here before reading more, so a client that does not
    /// read its own echoes stops being read instead of making them pile up.
    pub fn poll_room(&self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        let mut s = self.lock();
        if s.bytes <= limit || s.close.is_some() {
            return Poll::Ready(());
        }
        s.room_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_work(&self, cx: &mut Context<'_>, batch: &mut Vec<Outgoing>) -> Poll<Option<Close>> {
        let mut s = self.lock();
        let abandon = s.close.as_ref().is_some_and(|c| !c.drain);
        if abandon || (s.queue.is_empty() && s.close.is_some()) {
            return Poll::Ready(s.close.clone());
        }
        if s.queue.is_empty() {
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut bytes = 0;
        for item in &s.queue {
            let len = item.wire.len();
            if !batch.is_empty() && (len > COALESCE_MAX_FRAME || bytes + len > BATCH_BYTES) {
                break;
            }
            bytes += len;
            batch.push(item.clone());
            if len > COALESCE_MAX_FRAME {
                break;
            }
        }
        Poll::Ready(None)
    }

    /// Ready once the outbox is told to abandon its queue.
    fn poll_abandon(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.close.as_ref().is_some_and(|c| !c.drain) {
            return Poll::Ready(());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Removes the first `n` frames, which have been written.
    fn written(&self, n: usize) -> Vec<Outgoing> {
        let mut s = self.lock();
        let done: Vec<Outgoing> = s.queue.drain(..n).collect();
        s.bytes -= done.iter().map(|o| o.wire.len()).sum::<usize>();

        if let Some(w) = s.room_waker.take() {
            w.wake();
        }
        done
    }

    fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    fn take_all(&self) -> Vec<Outgoing> {
        let mut s = self.lock();
        s.finished = true;
        s.bytes = 0;
        s.queue.drain(..).collect()
    }
}

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

/// Writes the outbox to `sink` until the connection closes, then hands the frames it
/// could not write back to the broker.
pub async fn run<W, S>(
    mut sink: W,
    socket: S,
    conn: ConnId,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
) where
    W: AsyncWrite + Unpin,
    S: Socket,
{
    let mut batch = Vec::new();
    let mut deadline = None;
    let mut at_boundary = true;
    let close = loop {
        batch.clear();
        if let Some(close) = poll_fn(|cx| outbox.poll_work(cx, &mut batch)).await {
            break Some(close);
        }
        let must_arrive = batch.iter().any(|o| o.origin != Origin::Reply);
        if must_arrive && socket.peer_closed() {
            break None;
        }
        if deadline.is_none() && outbox.is_closing() {
            deadline = Some(Instant::now() + DRAIN_LIMIT);
        }
        let (written, stopped) = write_batch(&mut sink, &batch, &outbox, deadline).await;
        let done = outbox.written(written.whole);
        report_written(&done, conn, &shared).await;
        match stopped {
            None => {}
            Some(Stopped::Io) => break None,
            Some(Stopped::Cut) => {
                at_boundary = written.at_boundary;
                break outbox.lock().close.clone();
            }
        }
    };
    if let Some(notice) = close.and_then(|c| c.notice).filter(|_| at_boundary) {
        let _ = rt::timeout(NOTICE_LIMIT, async {
            sink.write_all(&notice).await?;
            sink.flush().await
        })
        .await;
    }
    let _ = rt::timeout(NOTICE_LIMIT, sink.close()).await;
    socket.shutdown();
    let undelivered = outbox.take_all();
    let done = Event::WriterDone { conn, undelivered };
    let _ = shared.events.clone().send(done).await;
}

/// Writes a batch as one buffer, stopping early if the outbox is abandoned or the
/// deadline passes. Returns how many frames were written whole, and why it stopped
/// early, if it did. The buffer lives only for the batch, so an idle connection holds
/// no write buffer.
async fn write_batch<W: AsyncWrite + Unpin>(
    sink: &mut W,
    batch: &[Outgoing],
    outbox: &Outbox,
    deadline: Option<Instant>,
) -> (Written, Option<Stopped>) {
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
        let write = pin!(sink.write(&bytes[pos..]));
        let abandon = pin!(poll_fn(|cx| outbox.poll_abandon(cx)));
        let timer = pin!(async {
            match deadline {
                Some(d) => rt::sleep(d.saturating_duration_since(Instant::now())).await,
                None => futures::future::pending().await,
            }
        });
        match select(write, select(abandon, timer)).await {
            Either::Left((Ok(n), _)) if n > 0 => pos += n,
            Either::Left(_) => {
                stopped = Some(Stopped::Io);
                break;
            }
            Either::Right(_) => {
                stopped = Some(Stopped::Cut);
                break;
            }
        }
    }
    if stopped.is_none() && sink.flush().await.is_err() {
        let written = Written {
            whole: 0,
            at_boundary: false,
        };
        return (written, Some(Stopped::Io));
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
        Written {
            whole,
            at_boundary: end == pos,
        },
        stopped,
    )
}

fn concat(batch: &[Outgoing]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(batch.iter().map(|o| o.wire.len()).sum());
    for item in batch {
        buf.extend_from_slice(&item.wire);
    }
    buf
}

/// How much of a batch reached the socket.
struct Written {
    whole: usize,
    /// The stream ends exactly after a frame, so a notice can still follow.
    at_boundary: bool,
}

/// Deletes written mailbox frames and asks for the next page after the last of one.
///
/// The channel senders are cloned here, when needed, rather than held: each clone of a
/// bounded sender is an allocation, and an idle connection should hold none.
async fn report_written(done: &[Outgoing], conn: ConnId, shared: &Shared) {
    let mut receiver = None;
    let mut seqs = Vec::new();
    let mut page_done = false;
    for item in done {
        if let Origin::Mailbox {
            receiver: r,
            seq,
            last,
        } = item.origin
        {
            receiver = Some(r);
            seqs.push(seq);
            page_done |= last;
        }
    }
    if let Some(receiver) = receiver {
        let delete = Command::Delete { receiver, seqs };
        let _ = shared.store.clone().send(delete).await;
    }
    if page_done {
        let _ = shared
            .events
            .clone()
            .send(Event::PageWritten { conn })
            .await;
    }
}
