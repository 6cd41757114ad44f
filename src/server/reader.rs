//! One reader task per connection: bytes in, [`Request`]s out to the broker.
//!
//! The reader owns everything that needs no shared state: framing, the size limit, the
//! frame timeout, and checking auth tokens (CPU work that would otherwise queue up in
//! the broker). Every frame decoded from one read goes to the broker as one event.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use futures::channel::mpsc::Sender;
use futures::{AsyncRead, AsyncReadExt, SinkExt};

use byteorder::{BigEndian, ByteOrder};

use crate::metrics::Refusal;
use crate::protocol::session::{
    OP_CONVERSATIONS, OP_HISTORY, OP_READ, OP_SESSION, Query, SessionHello,
};
use crate::protocol::{
    CONTROL, Code, FrameBuf, Inbound, OP_ACK, OP_HELLO, OP_HELLO_ACKS, OP_PING, SERVER_HEADER_LEN,
    notice,
};
use crate::rt;
use crate::server::Shared;
use crate::server::budget::Budget;
use crate::server::event::{ConnId, Event, Request};
use crate::server::outbox::{Close, Outbox};
use crate::server::rate::{Bucket, RateLimits};

/// Bytes an idle connection reads at once while it holds no buffer of its own.
const IDLE_READ: usize = 128;

/// Reads frames until the peer leaves or breaks the protocol, then tells the broker.
///
/// A plain `fn` returning an `async move` block rather than an `async fn`: an async
/// fn moves each argument into a local of its own, so its task would hold every
/// argument twice for the connection's life (rust-lang/rust#62958).
// An `async fn` would hold its arguments twice (see the doc above).
#[allow(clippy::manual_async_fn)]
pub fn run<R: AsyncRead + Unpin>(
    mut source: R,
    conn: ConnId,
    outbox: &Outbox,
    shared: &Shared,
) -> impl Future<Output = ()> {
    async move {
        // This reader's sender to the broker, made when it has something to send and
        // dropped while it waits for the client: each clone of a bounded sender is an
        // allocation, which an idle connection should not hold. A sender the full
        // channel parked is kept (a new clone would not be parked, and could send
        // once more past the bound); the inbound budget bounds the bytes either way.
        let mut events: Option<Sender<Event>> = None;
        let config = &shared.config;
        let mut buf = FrameBuf::new();
        let mut auth = if config.auth.is_none() {
            Auth::Open
        } else {
            Auth::Pending
        };
        // When the frame now pending began to arrive.
        let mut started = Instant::now();
        // Boxed, and only when limits are set: most servers run without them.
        let mut throttle = (!config.rate.is_off()).then(|| Box::new(Throttle::new(config.rate)));
        // Frames left in `buf` undecoded because the rate limit was reached.
        let mut held = false;
        let notice = 'conn: loop {
            if let Some(t) = throttle.as_deref_mut() {
                // Boxed: inline, the wait's timer would make every reader's task larger.
                let before = Instant::now();
                Box::pin(t.wait(conn, outbox, shared, &mut events)).await;
                started += before.elapsed();
            }
            // Replies this client has not read count against it: wait for room, but not
            // for ever, and not on the clock of a frame in progress.
            if outbox.queued_bytes() > config.max_pending_bytes {
                let blocked = Instant::now();
                let room = poll_fn(|cx| outbox.poll_room(cx, config.max_pending_bytes));
                if Box::pin(rt::timeout(config.frame_timeout, room))
                    .await
                    .is_none()
                {
                    let secs = config.frame_timeout.as_secs_f64();
                    let detail = format_args!("replies not read for {secs} s");
                    if let Some(m) = &shared.metrics {
                        m.slow_consumers.inc();
                    }
                    break Some(notice(Code::SlowConsumer, detail));
                }
                started += blocked.elapsed();
            }
            if held {
                // Decode what is already here before reading more.
                held = false;
            } else if buf.is_empty() {
                // Between frames a client may idle as long as it likes.
                buf.release();
                // Dropped only when it could send at once: a parked sender (the channel
                // was full) is kept, since a new clone would not be parked.
                if events.as_mut().is_some_and(could_send) {
                    events = None;
                }
                match poll_fn(|cx| read_idle(&mut source, &mut buf, cx)).await {
                    Ok(0) => break None,
                    Err(e) => break refusal(e),
                    Ok(_) => {}
                }
                started = Instant::now();
            } else {
                let left = config.frame_timeout.saturating_sub(started.elapsed());
                // Boxed, like every wait with a timer: inline, the timer would make the
                // task of every idle connection that much larger.
                match Box::pin(rt::timeout(left, source.read(buf.space()))).await {
                    None => {
                        let secs = config.frame_timeout.as_secs_f64();
                        break Some(notice(
                            Code::Timeout,
                            format_args!("frame not completed within {secs} s"),
                        ));
                    }
                    Some(Ok(0)) => break None,
                    Some(Err(e)) => break refusal(e),
                    Some(Ok(n)) => buf.filled(n),
                }
            }
            let mut requests = Vec::new();
            let mut fatal = None;
            loop {
                match buf.decode_client(config.max_frame_bytes) {
                    Ok(Some(frame)) => {
                        if let Some(m) = &shared.metrics {
                            m.frame_in(frame.kind(), frame.wire.len());
                        }
                        match classify(frame, &mut auth, shared) {
                            Ok(request) => {
                                if let Some(t) = throttle.as_deref_mut() {
                                    t.bucket.charge(1, request.bytes(), Instant::now());
                                    held = t.bucket.wait(Instant::now()).is_some();
                                }
                                requests.push(request);
                                if held {
                                    break;
                                }
                            }
                            Err(refusal) => {
                                fatal = Some(refusal);
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(too_large) => {
                        fatal = Some(notice(Code::FrameTooLarge, too_large));
                        break;
                    }
                }
            }
            if !requests.is_empty() {
                started = Instant::now();
                let bytes = requests.iter().map(Request::bytes).sum();
                let batch = Event::Requests {
                    conn,
                    requests,
                    bytes,
                };
                let events = events.get_or_insert_with(|| shared.events.clone());
                let blocked = match hand_over_now(events, &shared.inbound, batch, bytes) {
                    Ok(true) => None,
                    Ok(false) => break 'conn None,
                    Err(blocked) => Some(blocked),
                };
                if let Some(blocked) = blocked {
                    // Boxed, with the notice that may follow the batch: inline, the
                    // wait and what it keeps would make every reader's task larger.
                    let wait = Box::pin(async move {
                        let sent = hand_over(events, &shared.inbound, blocked, bytes).await;
                        (sent, fatal)
                    });
                    let (sent, after) = wait.await;
                    if !sent {
                        break 'conn None;
                    }
                    fatal = after;
                }
            }
            if fatal.is_some() {
                break fatal;
            }
        };
        match &notice {
            Some(n) => log::info!(conn; "{}", String::from_utf8_lossy(&n[SERVER_HEADER_LEN..])),
            // The peer is gone: stop writing to it now rather than when the broker gets
            // to the event, so frames routed meanwhile go back to the mailbox instead of
            // into a socket nobody reads.
            None => outbox.close(Close {
                notice: None,
                drain: false,
            }),
        }
        let mut events = events.unwrap_or_else(|| shared.events.clone());
        let _ = Box::pin(events.send(Event::Closed { conn, notice })).await;
    }
}

/// Whether `events` could send now: not parked by a full channel (or closed).
fn could_send(events: &mut Sender<Event>) -> bool {
    let mut noop = Context::from_waker(futures::task::noop_waker_ref());
    events.poll_ready(&mut noop).is_ready()
}

/// A batch that could not go to the broker at once, and whether its bytes are
/// already taken from the inbound budget.
struct Blocked {
    batch: Event,
    taken: bool,
}

/// Takes `bytes` of the inbound budget and sends `batch` to the broker, if both have
/// room now, as they nearly always do: `Ok(false)` when the broker is gone.
fn hand_over_now(
    events: &mut Sender<Event>,
    inbound: &Budget,
    batch: Event,
    bytes: usize,
) -> Result<bool, Blocked> {
    if !inbound.try_acquire(bytes) {
        return Err(Blocked {
            batch,
            taken: false,
        });
    }
    match events.try_send(batch) {
        Ok(()) => Ok(true),
        Err(full) if full.is_full() => Err(Blocked {
            batch: full.into_inner(),
            taken: true,
        }),
        Err(_) => {
            inbound.release(bytes);
            Ok(false)
        }
    }
}

/// [`hand_over_now`] for a batch that must wait for room: false when the broker is
/// gone.
async fn hand_over(
    events: &mut Sender<Event>,
    inbound: &Budget,
    blocked: Blocked,
    bytes: usize,
) -> bool {
    if !blocked.taken {
        inbound.acquire(bytes).await;
    }
    if events.send(blocked.batch).await.is_err() {
        inbound.release(bytes);
        return false;
    }
    true
}

/// A connection's rate limit as the reader keeps it: the buckets, and since when the
/// client has been over its rate without a break.
struct Throttle {
    bucket: Bucket,
    limits: RateLimits,
    over_since: Option<Instant>,
    /// When the last wait ended.
    last_wait: Option<Instant>,
    told: bool,
}

/// The longest a rate-limited reader sleeps before it looks whether its connection is
/// closing.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(250);

/// A client that has not had to wait for this long has kept to its rate.
const KEPT_TO_RATE: std::time::Duration = std::time::Duration::from_secs(1);

impl Throttle {
    fn new(limits: RateLimits) -> Throttle {
        Throttle {
            bucket: Bucket::new(limits, Instant::now()),
            limits,
            over_since: None,
            last_wait: None,
            told: false,
        }
    }

    /// Waits until the buckets allow reading more, or the connection is closing. A
    /// client over its rate for `--frame-timeout` without a break of a second is told
    /// so once (`rate-limited`); it is told again only after it has kept to its rate
    /// for a second.
    async fn wait(
        &mut self,
        conn: ConnId,
        outbox: &Outbox,
        shared: &Shared,
        events: &mut Option<Sender<Event>>,
    ) {
        let now = Instant::now();
        let Some(wait) = self.bucket.wait(now) else {
            // Kept to its rate for a while (not just between two reads): no longer over.
            if self.last_wait.is_some_and(|at| now - at >= KEPT_TO_RATE) {
                self.over_since = None;
                self.told = false;
            }
            return;
        };
        self.last_wait = Some(now + wait);
        if let Some(m) = &shared.metrics {
            m.rate_limited.inc();
        }
        let since = *self.over_since.get_or_insert(now);
        if !self.told && since.elapsed() >= shared.config.frame_timeout {
            self.told = true;
            let RateLimits { frames, bytes, .. } = self.limits;
            let secs = shared.config.frame_timeout.as_secs_f64();
            let detail = format!(
                "over this connection's rate ({frames} frames/s, {bytes} bytes/s; 0: no limit) for {secs} s: reading is slowed to it, nothing is lost"
            );
            log::info!(conn; "{detail}");
            let told = Event::Requests {
                conn,
                requests: vec![Request::RateLimited { detail }],
                bytes: 0,
            };
            let events = events.get_or_insert_with(|| shared.events.clone());
            let _ = events.send(told).await;
        }
        // In slices, so that a connection closed meanwhile (kicked, blocked, stopping)
        // is let go at once rather than after a debt that may last minutes.
        let until = now + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || outbox.is_closing() {
                return;
            }
            rt::sleep(left.min(WAIT_SLICE)).await;
        }
    }
}

/// Reads what has arrived into `buf` through a buffer on the stack, so that a
/// connection waiting for its next frame holds no read buffer, neither on the heap nor
/// in its task.
fn read_idle<R: AsyncRead + Unpin>(
    source: &mut R,
    buf: &mut FrameBuf,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    let mut chunk = [0u8; IDLE_READ];
    let n = ready!(Pin::new(source).poll_read(cx, &mut chunk))?;
    buf.extend(&chunk[..n]);
    Poll::Ready(Ok(n))
}

/// A transport's refusal of what it read (a WebSocket message that is not one frame),
/// carried inside the `io::Error` of a read: the reader sends it as the connection's
/// last notice, as it does its own refusals.
#[derive(Debug)]
pub struct Refused(pub Bytes);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0[SERVER_HEADER_LEN..]))
    }
}

impl std::error::Error for Refused {}

/// The notice a failed read ends the connection with: a transport's refusal, or none
/// when the peer is simply gone.
fn refusal(e: std::io::Error) -> Option<Bytes> {
    e.into_inner()
        .and_then(|e| e.downcast::<Refused>().ok())
        .map(|refused| refused.0)
}

/// What this connection has proven, when auth is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No auth configured.
    Open,
    /// Nothing proven yet: only pings and a hello with a token get through.
    Pending,
    /// A token for this id was presented.
    As(u32),
}

/// Turns a frame into a request; refuses the connection if auth requires it.
fn classify(frame: Inbound, auth: &mut Auth, shared: &Shared) -> Result<Request, Bytes> {
    if frame.kind() != CONTROL {
        if *auth == Auth::Pending {
            if let Some(m) = &shared.metrics {
                m.refused(Refusal::auth_failed);
            }
            return Err(notice(
                Code::AuthFailed,
                "the first frame must be a hello with a token",
            ));
        }
        return Ok(Request::Data(frame));
    }
    let id = frame.sender();
    match frame.receiver {
        OP_PING => Ok(Request::Ping),
        OP_HELLO | OP_HELLO_ACKS => {
            let acks = frame.receiver == OP_HELLO_ACKS;
            // Turning acks on for the id already proven needs no token again.
            let proven = acks && frame.body().is_empty() && *auth == Auth::As(id);
            if let (Some(keys), false) = (&shared.config.auth, proven) {
                if let Err(why) = keys.check(id, frame.body()) {
                    let detail = why.detail(id);
                    log::warn!("refused a hello: {detail}");
                    if let Some(m) = &shared.metrics {
                        m.refused(Refusal::auth_failed);
                    }
                    return Err(notice(Code::AuthFailed, detail));
                }
                *auth = Auth::As(id);
            }
            Ok(Request::Hello { id, acks })
        }
        OP_SESSION => {
            let hello = match SessionHello::parse(&frame.wire.slice(SERVER_HEADER_LEN..)) {
                Ok(hello) => hello,
                Err(why) => {
                    return Ok(Request::BadControl {
                        detail: why.to_string(),
                    });
                }
            };
            if let Some(keys) = &shared.config.auth {
                if let Err(why) = keys.check(id, &hello.token) {
                    let detail = why.detail(id);
                    log::warn!("refused a session: {detail}");
                    if let Some(m) = &shared.metrics {
                        m.refused(Refusal::auth_failed);
                    }
                    return Err(notice(Code::AuthFailed, detail));
                }
                *auth = Auth::As(id);
            }
            Ok(Request::Session {
                id,
                device: hello.device,
            })
        }
        op @ (OP_HISTORY | OP_CONVERSATIONS | OP_READ) => match Query::parse(op, frame.body()) {
            Some(Ok(query)) => Ok(Request::Query(query)),
            Some(Err(why)) => Ok(Request::BadQuery {
                request: Query::request_of(frame.body()),
                why: why.to_string(),
            }),
            None => Ok(Request::BadControl {
                detail: format!("unknown control operation {op}"),
            }),
        },
        OP_ACK => match <[u8; 4]>::try_from(frame.body()) {
            Ok(h) => Ok(Request::Ack {
                h: BigEndian::read_u32(&h),
            }),
            Err(_) => Ok(Request::BadControl {
                detail: format!(
                    "an ack's body is a 4-byte count, not {} bytes",
                    frame.body().len()
                ),
            }),
        },
        op => Ok(Request::BadControl {
            detail: format!("unknown control operation {op}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;

    /// Why a reader keeps a parked sender: a new clone is never parked, so it could
    /// send past the channel's bound once for every read.
    #[test]
    fn a_sender_the_full_channel_parked_cannot_send_and_a_new_clone_could() {
        let (events, _broker) = mpsc::channel::<Event>(0);
        let mut reader = events.clone();
        assert!(could_send(&mut reader));
        let closed = || Event::Closed {
            conn: 1,
            notice: None,
        };
        assert!(reader.try_send(closed()).is_ok());
        assert!(!could_send(&mut reader), "parked: the channel is full");
        assert!(could_send(&mut events.clone()), "a new clone is not parked");
    }
}
