//! The pair workload through nats-server: `--mode nats-pair` (core NATS) and
//! `--mode js-pair` (JetStream), for the comparisons in BENCHMARKS.md.
//!
//! It speaks NATS's text protocol itself, on the same runtime and with the same
//! batching as the chat-server workload: one TCP connection per client, every frame
//! in the window written in one `write`, a reader that parses `MSG`/`HMSG` in place.
//! The official client (async-nats on tokio), which this mode used before, was the
//! limit: it drove core nats-server to about a third of what the server forwards, so
//! every ratio against NATS measured the generator, not the server.
//!
//! - **nats-pair**: connection `i` subscribes to its own subject and publishes to its
//!   peer's (`i ^ 1`); a place in the sender's window comes back when the peer receives.
//!   NATS has no echo, so this window is stricter than chat-server's (freed by the echo).
//! - **js-pair**: the same through JetStream, as a chat server built on it would do:
//!   one stream on file storage (`CHAT_BENCH`, recreated at start), one push consumer
//!   per receiver (new messages only, no acks to the consumer, the cheapest delivery
//!   JetStream has), and each publish asks for JetStream's ack (a reply subject), so
//!   every frame is stored before it is delivered. A place in the window comes back on
//!   arrival, as above; the acks are counted and a refused one fails the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::channel::mpsc;
use futures::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use futures::lock::Mutex;
use hdrhistogram::Histogram;

use chat::rt::{self, TcpStream};

use super::{Args, Mode, Totals, check, finish, measure, tokens};

/// The stream js-pair publishes to.
const STREAM: &str = "CHAT_BENCH";
/// Subscription ids: the frames a client receives, and JetStream's answers to it.
const FRAMES_SID: u32 = 1;
const ANSWERS_SID: u32 = 2;
/// How long a setup request (stream, consumer) may take.
const SETUP_WAIT: Duration = Duration::from_secs(10);

pub fn run(args: Args) -> Result<(), String> {
    check(&args)?;
    rt::block_on(pairs(args))
}

/// One NATS client connection: its reader, and its writer shared by the sending task
/// and the reader (which answers the server's `PING`s).
struct Conn {
    reader: BufReader<TcpStream>,
    writer: Arc<Mutex<TcpStream>>,
}

/// What the reader saw.
enum Incoming {
    /// A message on subscription `sid`; its payload is in the caller's buffer.
    Msg { sid: u32 },
    /// The server's PING, answered already.
    Ping,
    /// `+OK`, `PONG`, `INFO`: nothing to do.
    Other,
}

impl Conn {
    async fn connect(addr: &str) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to nats-server at {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            reader: BufReader::with_capacity(64 * 1024, stream.clone()),
            writer: Arc::new(Mutex::new(stream)),
        };
        conn.send(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"echo\":false,\"protocol\":1}\r\nPING\r\n",
        )
        .await?;
        // INFO first, then the PONG that says CONNECT was taken (or an -ERR).
        loop {
            let mut line = Vec::new();
            conn.line(&mut line).await?;
            if line.starts_with(b"PONG") {
                return Ok(conn);
            }
        }
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), String> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await.map_err(|e| format!("write: {e}"))
    }

    async fn subscribe(&self, subject: &str, sid: u32) -> Result<(), String> {
        self.send(format!("SUB {subject} {sid}\r\n").as_bytes())
            .await
    }

    /// One protocol line without its CRLF; an `-ERR` is an error.
    async fn line(&mut self, line: &mut Vec<u8>) -> Result<(), String> {
        line.clear();
        let n = self
            .reader
            .read_until(b'\n', line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("nats-server closed the connection".into());
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.starts_with(b"-ERR") {
            return Err(format!(
                "nats-server: {}",
                String::from_utf8_lossy(line).trim()
            ));
        }
        Ok(())
    }

    /// The next thing the server sent; `line` and `payload` are reused buffers.
    async fn next(
        &mut self,
        line: &mut Vec<u8>,
        payload: &mut Vec<u8>,
    ) -> Result<Incoming, String> {
        self.line(line).await?;
        let text = std::str::from_utf8(line).map_err(|_| "a line that is not UTF-8")?;
        let mut words = text.split_ascii_whitespace();
        let op = words.next().unwrap_or("");
        let (headers, total) = match op {
            "MSG" | "HMSG" => {
                // MSG subject sid [reply] len | HMSG subject sid [reply] hlen len
                let rest: Vec<&str> = words.collect();
                let bad = || format!("a malformed {op} line: {text}");
                let sid: u32 = rest.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
                let total: usize = rest.last().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
                let headers: usize = if op == "HMSG" {
                    let h = rest.len().checked_sub(2).and_then(|i| rest.get(i));
                    h.and_then(|s| s.parse().ok()).ok_or_else(bad)?
                } else {
                    0
                };
                if headers > total {
                    return Err(bad());
                }
                ((sid, headers), total)
            }
            "PING" => {
                self.send(b"PONG\r\n").await?;
                return Ok(Incoming::Ping);
            }
            _ => return Ok(Incoming::Other),
        };
        payload.resize(total + 2, 0);
        self.reader
            .read_exact(payload)
            .await
            .map_err(|e| format!("read: {e}"))?;
        payload.truncate(total);
        payload.drain(..headers.1);
        Ok(Incoming::Msg { sid: headers.0 })
    }

    /// A JetStream API request on this (not yet running) connection: its answer,
    /// or the error it names.
    async fn request(&mut self, subject: &str, body: &str, inbox: &str) -> Result<String, String> {
        self.send(format!("PUB {subject} {inbox} {}\r\n{body}\r\n", body.len()).as_bytes())
            .await?;
        let (mut line, mut payload) = (Vec::new(), Vec::new());
        let wait = async {
            loop {
                match self.next(&mut line, &mut payload).await? {
                    Incoming::Msg { sid: ANSWERS_SID } => {
                        return Ok::<_, String>(String::from_utf8_lossy(&payload).into_owned());
                    }
                    _ => continue,
                }
            }
        };
        let answer = rt::timeout(SETUP_WAIT, wait)
            .await
            .ok_or_else(|| format!("{subject}: no answer within {SETUP_WAIT:?}"))??;
        if answer.contains("\"error\"") {
            return Err(format!("{subject}: {answer}"));
        }
        Ok(answer)
    }
}

fn inbox(id: u32) -> String {
    format!("_INBOX.chat-bench.{id}")
}

/// Where frames for `id` are published, and (js-pair) where its consumer delivers them.
fn subjects(mode: Mode, id: u32) -> (String, String) {
    match mode {
        Mode::JsPair => (
            format!("chat-bench.js.{id}"),
            format!("chat-bench.deliver.{id}"),
        ),
        _ => (format!("chat-bench.{id}"), format!("chat-bench.{id}")),
    }
}

async fn pairs(args: Args) -> Result<(), String> {
    let js = args.mode == Mode::JsPair;
    let mut conns = Vec::new();
    for i in 0..args.conns {
        let id = args.base_id + i;
        let mut conn = Conn::connect(&args.server).await?;
        conn.subscribe(&format!("{}.*", inbox(id)), ANSWERS_SID)
            .await?;
        let (_, deliver) = subjects(args.mode, id);
        conn.subscribe(&deliver, FRAMES_SID).await?;
        if js {
            if i == 0 {
                let reply = format!("{}.setup", inbox(id));
                // A stream left by an earlier run would hold its frames: start empty.
                let _ = conn
                    .request(&format!("$JS.API.STREAM.DELETE.{STREAM}"), "", &reply)
                    .await;
                let config = format!(
                    "{{\"name\":\"{STREAM}\",\"subjects\":[\"chat-bench.js.*\"],\"storage\":\"file\",\"retention\":\"limits\",\"num_replicas\":1}}"
                );
                conn.request(&format!("$JS.API.STREAM.CREATE.{STREAM}"), &config, &reply)
                    .await?;
            }
            let (publish, deliver) = subjects(args.mode, id);
            let consumer = format!(
                "{{\"stream_name\":\"{STREAM}\",\"config\":{{\"deliver_subject\":\"{deliver}\",\"filter_subject\":\"{publish}\",\"deliver_policy\":\"new\",\"ack_policy\":\"none\"}}}}"
            );
            let reply = format!("{}.setup", inbox(id));
            conn.request(
                &format!("$JS.API.CONSUMER.CREATE.{STREAM}"),
                &consumer,
                &reply,
            )
            .await?;
        }
        // Everything above is in place before any frame flies.
        conn.send(b"PING\r\n").await?;
        let (mut line, mut payload) = (Vec::new(), Vec::new());
        loop {
            let incoming = conn.next(&mut line, &mut payload).await?;
            if matches!(incoming, Incoming::Other) && line.starts_with(b"PONG") {
                break;
            }
        }
        conns.push(conn);
    }
    let totals = Totals::new();
    let refused = Arc::new(AtomicU64::new(0));
    // One token per frame in flight, per sender; the peer's reader returns it.
    let (gives, takes): (Vec<_>, Vec<_>) = (0..args.conns)
        .map(|_| {
            let (mut give, take) = mpsc::channel::<()>(args.window);
            for _ in 0..args.window {
                let _ = give.try_send(());
            }
            (give, take)
        })
        .unzip();
    let mut readers = Vec::new();
    for (i, (mut conn, mut take)) in conns.into_iter().zip(takes).enumerate() {
        let id = args.base_id + i as u32;
        let (to, _) = subjects(args.mode, args.base_id + (i as u32 ^ 1));
        // JetStream acks each publish on the sender's inbox.
        let head = match js {
            true => format!("PUB {to} {}.a {}\r\n", inbox(id), args.size),
            false => format!("PUB {to} {}\r\n", args.size),
        };
        let writer = conn.writer.clone();
        let sender_totals = totals.clone();
        let size = args.size;
        rt::spawn(async move {
            let mut batch = Vec::new();
            while !sender_totals.stop.load(Ordering::Relaxed) {
                let Some(n) = tokens(&mut take).await else {
                    break;
                };
                batch.clear();
                for _ in 0..n {
                    batch.extend_from_slice(head.as_bytes());
                    sender_totals.put_body(&mut batch, size);
                    batch.extend_from_slice(b"\r\n");
                }
                if writer.lock().await.write_all(&batch).await.is_err() {
                    break;
                }
            }
        });
        let mut give_back = gives[i ^ 1].clone();
        let totals = totals.clone();
        let refused = refused.clone();
        readers.push(rt::spawn(async move {
            let mut h =
                Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
            let (mut line, mut payload) = (Vec::new(), Vec::new());
            let wait = Duration::from_secs(2);
            while let Some(Ok(incoming)) =
                rt::timeout(wait, conn.next(&mut line, &mut payload)).await
            {
                match incoming {
                    Incoming::Msg { sid: FRAMES_SID } => {
                        let _ = give_back.try_send(());
                        totals.arrived(&payload, &mut h);
                        if totals.stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    Incoming::Msg { .. } if payload.windows(7).any(|w| w == b"\"error\"") => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            h
        }));
    }
    drop(gives);
    let elapsed = measure(&args, &totals).await;
    let mut histograms = Vec::new();
    for r in readers {
        histograms.push(r.await);
    }
    let refused = refused.load(Ordering::Relaxed);
    if refused > 0 {
        return Err(format!("JetStream refused {refused} publishes"));
    }
    finish(&args, &totals, elapsed, histograms)
}
