//! `--mode history`: what history costs a reader. Fills one conversation with
//! `--log-frames` frames (its receiver online as a plain client, so they are delivered
//! live and kept as history), then measures, through sessions of the receiver:
//! - pages: `--reads` history queries of 100 entries, each before a random offset of
//!   the log, one at a time: latency percentiles;
//! - resume: a device that was away while `--resume-frames` frames came, from its
//!   session to its `synced` record, against the same number of frames reaching an
//!   online device live (from the first send to the last arrival): frames per second.

use std::time::Instant;

use hdrhistogram::Histogram;

use chat::client::{Acker, Client};
use chat::protocol::session::{Before, Device, Query, Received, Record, What};
use chat::protocol::{ClientFrame, TEXT};

use crate::Args;

const WINDOW: usize = 256;

pub async fn run(args: Args) -> Result<(), String> {
    let (a, b) = (args.base_id, args.base_id + 1);
    let device = |name: &str| Device::new(name).map_err(|e| e.to_string());
    let connect = || async {
        Client::connect(&args.server)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.server))
    };
    let mut sender = connect().await?;
    sender.hello(a, None).await.map_err(|e| e.to_string())?;
    let mut plain = connect().await?;
    plain.hello(b, None).await.map_err(|e| e.to_string())?;
    // The devices that will be away and online later exist from the start.
    for name in ["bench-away", "bench-live"] {
        let mut c = connect().await?;
        c.session(b, &device(name)?, None)
            .await
            .map_err(|e| e.to_string())?;
    }
    let started = Instant::now();
    let reader = chat::rt::spawn(drain(plain, args.log_frames));
    send(&mut sender, a, b, args.log_frames, args.size).await?;
    reader.await?;
    let fill = started.elapsed().as_secs_f64();
    eprintln!(
        "history: {} frames in one conversation in {fill:.1} s ({:.0}/s)",
        args.log_frames,
        args.log_frames as f64 / fill
    );

    // Pages before random offsets.
    let mut s = connect().await?;
    let sync = s
        .session(b, &device("bench-pages")?, None)
        .await
        .map_err(|e| e.to_string())?;
    let Record::Sync { head, oldest, .. } = sync else {
        return Err(format!("expected a sync record, got {sync:?}"));
    };
    let mut latency = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut entries = 0u64;
    for request in 1..=args.reads {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let before = oldest + 1 + seed % head.saturating_sub(oldest).max(1);
        let q = Query::History {
            request,
            conversation: a,
            before: Before::Offset(before),
            limit: 100,
        };
        let asked = Instant::now();
        s.send(&q.frame(b)).await.map_err(|e| e.to_string())?;
        loop {
            match s.recv_session().await.map_err(|e| e.to_string())? {
                Some(Received::Message { envelope, .. }) if envelope.what == What::Page => {
                    entries += 1
                }
                Some(Received::Record(Record::PageEnd { request: r, .. })) if r == request => break,
                Some(_) => {}
                None => return Err("server closed the connection".into()),
            }
        }
        let _ = latency.record(asked.elapsed().as_micros() as u64);
    }
    let us = |q: f64| latency.value_at_quantile(q);
    println!(
        "history pages: {} reads of 100 from a log of {}: p50 {} us, p99 {} us, max {} us ({} entries read)",
        args.reads,
        args.log_frames,
        us(0.5),
        us(0.99),
        latency.max(),
        entries
    );

    // Resume against live.
    let n = args.resume_frames;
    let mut plain = connect().await?;
    plain.hello(b, None).await.map_err(|e| e.to_string())?;
    let reader = chat::rt::spawn(drain(plain, n));
    send(&mut sender, a, b, n, args.size).await?;
    reader.await?;
    let mut away = connect().await?;
    let resumed = Instant::now();
    away.session(b, &device("bench-away")?, None)
        .await
        .map_err(|e| e.to_string())?;
    let got = until_synced(&mut away, b).await?;
    let resume = got as f64 / resumed.elapsed().as_secs_f64();
    let mut live = connect().await?;
    live.session(b, &device("bench-live")?, None)
        .await
        .map_err(|e| e.to_string())?;
    // The backlog of the resume run waits for this device too: take it first.
    until_synced(&mut live, b).await?;
    let started = Instant::now();
    let (tx, rx) = futures::channel::oneshot::channel();
    let receiving = chat::rt::spawn(async move {
        let got = receive(&mut live, b, n).await;
        let _ = tx.send(Instant::now());
        got
    });
    send(&mut sender, a, b, n, args.size).await?;
    receiving.await?;
    let done = rx
        .await
        .map_err(|_| "the live receiver stopped".to_string())?;
    let live_rate = n as f64 / done.duration_since(started).as_secs_f64();
    println!(
        "resume: {got} frames in {:.0} frames/s; the same number live: {live_rate:.0} frames/s; resume / live {:.2}",
        resume,
        resume / live_rate
    );
    Ok(())
}

/// Sends `n` frames from `a` to `b`, `WINDOW` in flight, and waits for every echo.
async fn send(c: &mut Client, a: u32, b: u32, n: u64, size: usize) -> Result<(), String> {
    let frame = ClientFrame {
        sender: a,
        receiver: b,
        kind: TEXT,
        body: vec![b'x'; size].into(),
    };
    let (mut sent, mut echoed) = (0u64, 0u64);
    while echoed < n {
        while sent < n && sent - echoed < WINDOW as u64 {
            c.send(&frame).await.map_err(|e| e.to_string())?;
            sent += 1;
        }
        match c.recv().await.map_err(|e| e.to_string())? {
            Some(f) if f.sender == a => echoed += 1,
            Some(f) => {
                return Err(format!("expected an echo, got {:?}", f.notice()));
            }
            None => return Err("server closed the connection".into()),
        }
    }
    Ok(())
}

/// Reads `n` frames on a plain connection.
async fn drain(mut c: Client, n: u64) -> Result<(), String> {
    for _ in 0..n {
        c.recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("server closed the connection")?;
    }
    Ok(())
}

/// Reads a session's backlog, acking as it goes, until `synced`: how many it got.
async fn until_synced(c: &mut Client, id: u32) -> Result<u64, String> {
    read_acking(c, id, None).await
}

/// Reads `n` live messages on a session, acking as it goes.
async fn receive(c: &mut Client, id: u32, n: u64) -> Result<(), String> {
    read_acking(c, id, Some(n)).await.map(|_| ())
}

/// Reads messages on a session, acking every 256, until `n` of them (or, without `n`,
/// until the `synced` record): how many it read.
async fn read_acking(c: &mut Client, id: u32, n: Option<u64>) -> Result<u64, String> {
    let mut acker = Acker::new(id);
    let mut got = 0;
    loop {
        if n.is_some_and(|n| got >= n) {
            return Ok(got);
        }
        match c.recv_session().await.map_err(|e| e.to_string())? {
            Some(Received::Message { envelope, .. }) => {
                got += 1;
                acker.handled_what(envelope.what);
                if got % 256 == 0
                    && let Some(ack) = acker.ack()
                {
                    c.send(&ack).await.map_err(|e| e.to_string())?;
                }
            }
            Some(Received::Record(Record::Synced { .. })) if n.is_none() => {
                if let Some(ack) = acker.ack() {
                    c.send(&ack).await.map_err(|e| e.to_string())?;
                }
                return Ok(got);
            }
            Some(_) => {}
            None => return Err("server closed the connection".into()),
        }
    }
}
