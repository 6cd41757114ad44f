//! `chat-bench`: load generator for any server speaking this protocol.
//!
//! Opens `--conns` connections; each keeps `--window` frames in flight (a frame is in
//! flight until its echo returns) with `--size`-byte bodies. In `echo` mode each
//! connection sends to itself; in `pair` mode connections 2k and 2k+1 send to each other
//! and what counts is arrival at the receiver. After `--warmup` seconds, it measures for
//! `--secs` seconds and prints messages/s, MiB/s and latency percentiles (send to echo,
//! or send to arrival). `--mode idle` only connects and holds, for memory figures.
//! `--peer-server` puts the second of each pair on another cluster node.
//!
//! `--mode history` measures history pages and a device's resume (see `history.rs`).
//!
//! `--mode nats-pair` runs the same pair workload through a nats-server (core NATS, one
//! subject per receiver, `--server` is its address), the fastest router we can compare
//! with; `--mode js-pair` runs it through JetStream (a stream on file storage, a push
//! consumer per receiver, every publish acknowledged). Same connections, body and
//! window, measured the same way (see `nats.rs`).

mod history;
mod nats;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use futures::channel::mpsc;
use hdrhistogram::Histogram;

use chat::client::Client;
use chat::protocol::{ClientFrame, TEXT};
use chat::rt;

#[derive(Parser, Debug, Clone)]
#[command(version, about = "Measure a chat server's throughput and latency")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8888")]
    server: String,
    /// In pair mode, connect the second of each pair here: another node of the same
    /// cluster, so that every frame crosses between nodes.
    #[arg(long)]
    peer_server: Option<String>,
    #[arg(long, default_value_t = 50)]
    conns: u32,
    /// Frames in flight per connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Body bytes per frame (at least 8: the send time travels in the body).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// First id used; connection i binds `base-id + i`.
    #[arg(long, default_value_t = 1_000_000)]
    base_id: u32,
    /// Bind by the first data frame instead of a hello (for servers without control
    /// frames, such as the ceiling).
    #[arg(long)]
    no_hello: bool,
    /// Spread the connections over this many loopback source addresses (127.0.0.2,
    /// 127.0.0.3, ...), for more connections than one address has ephemeral ports.
    #[arg(long, default_value_t = 0)]
    sources: u8,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Turn acknowledged delivery on: each connection acks what it receives, with its
    /// next batch of frames.
    #[arg(long, conflicts_with = "no_hello")]
    acks: bool,
    /// History mode: frames in the conversation the pages are read from.
    #[arg(long, default_value_t = 1_000_000)]
    log_frames: u64,
    /// History mode: pages read.
    #[arg(long, default_value_t = 2000)]
    reads: u32,
    /// History mode: frames a device was away for, and then the same number live.
    #[arg(long, default_value_t = 10_000)]
    resume_frames: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Echo,
    Pair,
    Idle,
    NatsPair,
    JsPair,
    History,
}

/// What every connection adds to while measuring.
struct Totals {
    recording: AtomicBool,
    stop: AtomicBool,
    messages: AtomicU64,
    bytes: AtomicU64,
    epoch: Instant,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if matches!(args.mode, Mode::NatsPair | Mode::JsPair) {
        nats::run(args)
    } else if args.mode == Mode::History {
        rt::block_on(history::run(args))
    } else {
        rt::block_on(run(args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Settings every mode needs to make sense.
fn check(args: &Args) -> Result<(), String> {
    if args.size < 8 {
        return Err("--size must be at least 8".into());
    }
    if matches!(args.mode, Mode::Pair | Mode::NatsPair | Mode::JsPair)
        && !args.conns.is_multiple_of(2)
    {
        return Err("pair modes need an even --conns".into());
    }
    if !(args.secs > 0.0 && args.warmup >= 0.0) {
        return Err("--secs must be positive and --warmup not negative".into());
    }
    if args.sources > 250 {
        return Err("--sources goes up to 250 (127.0.0.2 to 127.0.0.251)".into());
    }
    Ok(())
}

impl Totals {
    fn new() -> Arc<Totals> {
        Arc::new(Totals {
            recording: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Counts one arrival (while measuring) with the send time in its first 8 bytes.
    fn arrived(&self, body: &[u8], latency: &mut Histogram<u64>) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let Some(sent) = body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            return;
        };
        let now = self.epoch.elapsed().as_nanos() as u64;
        let _ = latency.record(now.saturating_sub(u64::from_be_bytes(sent)).max(1));
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    }

    /// A body of `len` bytes that starts with the send time.
    fn body(&self, len: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(len);
        self.put_body(&mut body, len);
        body
    }

    /// Appends a body of `len` bytes (at least 8) that starts with the send time.
    fn put_body(&self, out: &mut Vec<u8>, len: usize) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        out.extend_from_slice(&now.to_be_bytes());
        out.resize(out.len() + len.saturating_sub(8), 0);
    }
}

/// Lets the load run for the warmup, then measures for `--secs`, then tells every
/// connection to stop. Returns the seconds measured.
async fn measure(args: &Args, totals: &Totals) -> f64 {
    rt::sleep(Duration::from_secs_f64(args.warmup)).await;
    totals.recording.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let measure = Duration::from_secs_f64(args.secs);
    let tty = std::io::stderr().is_terminal() && !args.json;
    while started.elapsed() < measure {
        let step = Duration::from_secs(1).min(measure.saturating_sub(started.elapsed()));
        rt::sleep(step).await;
        if tty {
            let rate =
                totals.messages.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
            eprint!(
                "\r{:>12.0} msg/s  {:>5.1} s",
                rate,
                started.elapsed().as_secs_f64()
            );
        }
    }
    totals.recording.store(false, Ordering::SeqCst);
    let elapsed = started.elapsed().as_secs_f64();
    totals.stop.store(true, Ordering::SeqCst);
    if tty {
        eprintln!();
    }
    elapsed
}

/// Prints the result of a measured run from the connections' latency histograms.
fn finish(
    args: &Args,
    totals: &Totals,
    elapsed: f64,
    histograms: impl IntoIterator<Item = Histogram<u64>>,
) -> Result<(), String> {
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    for h in histograms {
        latency.add(&h).map_err(|e| e.to_string())?;
    }
    let messages = totals.messages.load(Ordering::Relaxed);
    let bytes = totals.bytes.load(Ordering::Relaxed);
    report(
        args,
        messages as f64 / elapsed,
        bytes as f64 / elapsed / 1048576.0,
        &latency,
    );
    if messages == 0 {
        return Err("no frames completed while measuring".into());
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    if args.peer_server.is_some() && args.mode != Mode::Pair {
        return Err("--peer-server needs --mode pair".into());
    }
    check(&args)?;
    let totals = Totals::new();
    let mut clients = Vec::with_capacity(args.conns as usize);
    for i in 0..args.conns {
        let id = args.base_id + i;
        let server = match &args.peer_server {
            Some(peer) if i % 2 == 1 => peer,
            _ => &args.server,
        };
        let connected = match args.sources {
            0 => Client::connect(server).await,
            n => {
                let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % u32::from(n)) as u8);
                Client::connect_from(server, source.into()).await
            }
        };
        let mut c = connected.map_err(|e| format!("connection {i} to {server}: {e}"))?;
        if args.acks {
            let on = c
                .hello_acks(id, None)
                .await
                .map_err(|e| format!("hello for {id}: {e}"))?;
            if !on {
                return Err(format!("{} does not support acks", args.server));
            }
        } else if !args.no_hello {
            c.hello(id, None)
                .await
                .map_err(|e| format!("hello for {id}: {e}"))?;
        }
        clients.push((id, c));
    }
    if args.mode == Mode::Idle {
        println!(
            "{} connections open and idle; holding for {} s",
            args.conns, args.secs
        );
        rt::sleep(Duration::from_secs_f64(args.secs)).await;
        return Ok(());
    }
    let mut tasks = Vec::new();
    for (i, (id, client)) in clients.into_iter().enumerate() {
        // Pairs: connection 0 with 1, 2 with 3, ...
        let to = match args.mode {
            Mode::Pair => args.base_id + (i as u32 ^ 1),
            _ => id,
        };
        tasks.push(rt::spawn(connection(
            client,
            id,
            to,
            args.clone(),
            totals.clone(),
        )));
    }
    let elapsed = measure(&args, &totals).await;
    let mut histograms = Vec::new();
    for task in tasks {
        histograms.push(task.await);
    }
    finish(&args, &totals, elapsed, histograms)
}

fn report(args: &Args, rate: f64, mib: f64, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p99, p999, max) = (us(0.5), us(0.99), us(0.999), h.max() as f64 / 1000.0);
    let mut mode = args
        .mode
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string());
    if args.peer_server.is_some() {
        mode += "-across-nodes";
    }
    if args.acks {
        mode += "+acks";
    }
    let Args {
        conns,
        window,
        size,
        secs,
        ..
    } = args;
    if args.json {
        println!(
            "{{\"mode\":\"{mode}\",\"conns\":{conns},\"window\":{window},\"size\":{size},\"secs\":{secs},\"msgs_per_sec\":{rate:.0},\"mib_per_sec\":{mib:.2},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"p999_us\":{p999:.1},\"max_us\":{max:.1}}}"
        );
    } else {
        println!(
            "{mode}: {conns} conns, window {window}, {size} B: {rate:.0} msg/s, {mib:.2} MiB/s, latency p50 {p50:.0} us, p99 {p99:.0} us, p99.9 {p999:.0} us, max {max:.0} us"
        );
    }
}

/// Waits for a place in the window, then takes every other free one: how many frames
/// the next batch may send. `None` once the window is closed.
async fn tokens(take: &mut mpsc::Receiver<()>) -> Option<usize> {
    take.next().await?;
    let mut n = 1;
    while let Ok(()) = take.try_recv() {
        n += 1;
    }
    Some(n)
}

/// Drives one connection: sends while the window has room, counts what arrives.
async fn connection(
    client: Client,
    id: u32,
    to: u32,
    args: Args,
    totals: Arc<Totals>,
) -> Histogram<u64> {
    let (mut tx, mut rx) = client.split();
    // One token per frame allowed in flight; an echo returns its token.
    let (mut give, mut take) = mpsc::channel::<()>(args.window);
    for _ in 0..args.window {
        let _ = give.try_send(());
    }
    let body_len = args.size;
    let sender_totals = totals.clone();
    // Data frames received, for acks; the sending task acks them with its next batch.
    let handled = Arc::new(AtomicU32::new(0));
    let acked = handled.clone();
    let acks = args.acks;
    let sending = rt::spawn(async move {
        let mut batch = Vec::new();
        let mut last_ack = 0;
        while !sender_totals.stop.load(Ordering::Relaxed) {
            let Some(n) = tokens(&mut take).await else {
                break;
            };
            batch.clear();
            let h = acked.load(Ordering::Relaxed);
            if acks && h != last_ack {
                ClientFrame::ack(id, h).encode(&mut batch);
                last_ack = h;
            }
            for _ in 0..n {
                ClientFrame {
                    sender: id,
                    receiver: to,
                    kind: TEXT,
                    body: sender_totals.body(body_len).into(),
                }
                .encode(&mut batch);
            }
            if tx.send_raw(&batch).await.is_err() {
                break;
            }
        }
    });
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let pair = to != id;
    loop {
        let frame = match rt::timeout(Duration::from_secs(2), rx.recv()).await {
            Some(Ok(Some(f))) => f,
            _ => break,
        };
        if frame.notice().is_some() {
            continue;
        }
        let arrival = frame.sender != id;
        if arrival {
            handled.fetch_add(1, Ordering::Relaxed);
        }
        if frame.sender == id {
            // An echo frees a place in the window.
            let _ = give.try_send(());
        }
        if arrival != pair {
            continue;
        }
        totals.arrived(&frame.body, &mut h);
        if totals.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    drop(give);
    sending.await;
    h
}
