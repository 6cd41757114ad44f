//! Broken and malicious clients: each test checks the hostile connection's fate and
//! that a well-behaved client on the same server is still served afterwards.

mod common;

use std::time::Duration;

use async_std::net::TcpStream;
use futures::{AsyncReadExt, AsyncWriteExt};

use chat::client::Client;
use chat::protocol::{ClientFrame, Code, TEXT};
use chat::rt;
use common::*;

#[test]
fn a_frame_that_never_completes_times_out_but_idling_is_fine() {
    rt::block_on(async {
        let server = start_with(|c| c.frame_timeout = Duration::from_millis(300)).await;
        let mut idle = login(&server, 1).await;
        let mut slow = connect(&server).await;
        let frame = text(2, 0, "never finished").to_bytes();
        slow.sender.send_raw(&frame[..7]).await.unwrap();
        let detail = expect_notice(&mut slow, Code::Timeout).await;
        assert!(detail.contains("0.3"), "{detail}");
        expect_closed(&mut slow).await;
        // The idle client outlived the timeout without sending anything.
        send_confirmed(&mut idle, &text(1, 0, "still here")).await;
    });
}

#[test]
fn connections_beyond_the_limit_are_refused_busy() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_connections = 3;
            // One address may hold all three (tests/addresses.rs has that bound).
            c.max_connections_per_ip = Some(0);
        })
        .await;
        let mut held = Vec::new();
        for id in 1..=3 {
            held.push(login(&server, id).await);
        }
        let mut extra = connect(&server).await;
        let detail = expect_notice(&mut extra, Code::ServerBusy).await;
        assert_eq!(detail, "3 connections open; try again later");
        expect_closed(&mut extra).await;
        send_confirmed(&mut held[0], &text(1, 0, "the held ones still work")).await;
        // A freed place is given to the next connection.
        drop(held.pop());
        within(async {
            loop {
                let mut c = connect(&server).await;
                c.send(&text(9, 0, "in")).await.unwrap();
                match c.recv().await {
                    Ok(Some(f)) if f.notice().is_none() => break,
                    _ => continue,
                }
            }
        })
        .await;
    });
}

#[test]
fn a_receiver_that_stops_reading_is_cut_off_and_loses_nothing() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_pending_bytes = 256 * 1024;
            // One sender's 25 MiB wait for B: more than a sender's share.
            c.mailbox.per_sender = chat::store::PerSender::OFF;
        })
        .await;
        let a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        let mut bystander = login(&server, 3).await;
        let frames: Vec<ClientFrame> = (0..400u32)
            .map(|i| {
                let mut body = vec![(i % 251) as u8; 64 * 1024];
                body[..4].copy_from_slice(&i.to_be_bytes());
                data(1, 2, TEXT, &body)
            })
            .collect();
        // A sends 25 MiB, more than the kernel buffers of both sockets can hold, while B
        // reads nothing; every frame is accepted.
        let (mut a_tx, mut a_rx) = a.split();
        let to_send = frames.clone();
        let sending = rt::spawn(async move {
            for f in &to_send {
                a_tx.send(f).await.unwrap();
            }
        });
        for f in &frames {
            let echo = within(a_rx.recv()).await.unwrap().unwrap();
            assert_eq!(echo, delivered(f));
        }
        sending.await;
        send_confirmed(&mut bystander, &text(3, 0, "no stall here")).await;
        // B was cut off: it reads what reached its socket, then the end. The notice
        // comes, last, exactly when the stream was cut at a frame boundary (the server
        // does not write one into the middle of a frame: docs/PROTOCOL.md).
        let mut got = Vec::new();
        let mut notices = Vec::new();
        let at_a_boundary = loop {
            match within(b.recv()).await {
                Ok(Some(f)) => match f.notice() {
                    Some(n) => notices.push(n),
                    None if notices.is_empty() => got.push(f),
                    None => panic!("a frame after the notice {notices:?}"),
                },
                Ok(None) => break true,
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
                    break false;
                }
            }
        };
        assert!(got.len() < frames.len(), "B was never cut off");
        if at_a_boundary {
            assert_eq!(notices.len(), 1, "{notices:?}");
            assert!(notices[0].is(Code::SlowConsumer), "{notices:?}");
        } else {
            assert!(notices.is_empty(), "{notices:?}");
        }
        // The rest waits in the mailbox, in order, without gaps or repeats.
        let (_b, rest) = mailbox_of(&server.addr(), 2, frames.len() - got.len()).await;
        got.extend(rest);
        assert_eq!(got, frames.iter().map(delivered).collect::<Vec<_>>());
    });
}

#[test]
fn a_sender_that_never_reads_its_echoes_stops_being_read_then_is_cut_off() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_pending_bytes = 64 * 1024;
            c.frame_timeout = Duration::from_millis(500);
        })
        .await;
        let mut good = login(&server, 1).await;
        let mut deaf = within(TcpStream::connect(server.addr)).await.unwrap();
        let sent = data(2, 0, TEXT, &[1; 4096]);
        let frame = sent.to_bytes();
        let writer = deaf.clone();
        // Writes until the server stops reading (the write then blocks) and closes (the
        // write then fails); returns how many frames went out whole.
        let flood = rt::spawn(async move {
            let mut writer = writer;
            for written in 0..100_000u64 {
                if writer.write_all(&frame).await.is_err() {
                    return written;
                }
            }
            100_000
        });
        send_confirmed(&mut good, &text(1, 0, "unaffected")).await;
        // The server closes the deaf client: its writes fail long before the 410 MB.
        let written = within(flood).await;
        assert!(written < 100_000, "the server read all {written} frames");
        // Reading now finds echoes of its own frames, then at most the slow-consumer
        // notice, then the end (a reset, when the server closed with input unread).
        let mut rest = Vec::new();
        let _ = within(deaf.read_to_end(&mut rest)).await;
        let (frames, partial) = server_frames(&rest);
        let echoes = frames
            .iter()
            .take_while(|f| **f == delivered(&sent))
            .count();
        assert!(
            echoes as u64 <= written,
            "{echoes} echoes of {written} frames"
        );
        // The notice only where the cut left the stream at a frame boundary.
        match &frames[echoes..] {
            [] => {}
            [last] => {
                assert!(
                    last.notice().is_some_and(|n| n.is(Code::SlowConsumer)),
                    "{last:?}"
                );
                assert_eq!(partial, 0, "bytes after the notice");
            }
            more => panic!("after {echoes} echoes: {more:?}"),
        }
        eprintln!(
            "{written} frames of {} bytes written before the cut, {echoes} echoes read",
            sent.to_bytes().len()
        );
        send_confirmed(&mut good, &text(1, 0, "still unaffected")).await;
    });
}

/// A small deterministic generator, so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The whole server frames in `bytes`, and how many bytes of an unfinished one follow.
fn server_frames(bytes: &[u8]) -> (Vec<chat::protocol::ServerFrame>, usize) {
    let mut buf = chat::protocol::FrameBuf::new();
    buf.extend(bytes);
    let mut frames = Vec::new();
    while let Some(f) = buf.decode_server(u32::MAX).expect("a server frame") {
        frames.push(f);
    }
    (frames, buf.len())
}

/// Random bytes from an unbound connection: every answer is a whole server frame (an
/// echo of what parsed as a frame of the sender's, or a notice with a documented code,
/// the last one closing), and the server ends every such connection, by a closing
/// notice or by the frame timeout; a client that plays by the rules is served
/// throughout.
#[test]
fn garbage_gets_well_formed_answers_and_a_close() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_frame_bytes = 4096;
            c.frame_timeout = Duration::from_millis(200);
        })
        .await;
        let mut good = login(&server, 1).await;
        for seed in 0..50u64 {
            let mut s = within(TcpStream::connect(server.addr)).await.unwrap();
            let bytes = noise(seed, 64 + (seed as usize * 97) % 8000);
            // The server may close before taking everything; that is its right.
            let _ = s.write_all(&bytes).await;
            let mut sink = Vec::new();
            // Reading to the end must finish: the stream ends mid-frame, so at the
            // latest the frame timeout closes it.
            let ended = within(s.read_to_end(&mut sink)).await;
            let (answers, partial) = server_frames(&sink);
            if ended.is_ok() {
                assert_eq!(partial, 0, "seed {seed}: a close in the middle of a frame");
            }
            let closing = [Code::FrameTooLarge, Code::Timeout];
            for (i, f) in answers.iter().enumerate() {
                let Some(n) = f.notice() else { continue };
                let code = Code::ALL.iter().find(|c| n.is(**c));
                let code = code.unwrap_or_else(|| panic!("seed {seed}: unknown notice {n}"));
                if closing.contains(code) {
                    assert_eq!(i + 1, answers.len(), "seed {seed}: answers after {n}");
                }
            }
            let last = answers.last().and_then(|f| f.notice());
            assert!(
                ended.is_err()
                    || last
                        .as_ref()
                        .is_some_and(|n| closing.iter().any(|c| n.is(*c))),
                "seed {seed}: closed without a closing notice: {last:?}"
            );
        }
        // Absurd lengths: u32::MAX announced, then silence.
        let mut huge = connect(&server).await;
        let mut header = ClientFrame::hello(5, b"").to_bytes()[..9].to_vec();
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.sender.send_raw(&header).await.unwrap();
        expect_notice(&mut huge, Code::FrameTooLarge).await;
        send_confirmed(&mut good, &text(1, 0, "served throughout")).await;
    });
}

#[test]
fn unknown_control_operations_get_a_notice_and_the_connection_stays() {
    rt::block_on(async {
        let server = start().await;
        let mut c = login(&server, 1).await;
        c.send(&ClientFrame {
            sender: 1,
            receiver: 77,
            kind: 0,
            body: Default::default(),
        })
        .await
        .unwrap();
        expect_notice(&mut c, Code::BadControl).await;
        send_confirmed(&mut c, &text(1, 0, "fine")).await;
    });
}

/// 600 MiB aimed at a client that never reads: the server grows by less than its
/// pending and mailbox limits plus a small constant.
#[test]
fn memory_stays_bounded_when_a_receiver_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let pending = 4 << 20;
    let mailbox = 32 << 20;
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--max-pending-bytes",
            &pending.to_string(),
            "--mailbox-max-bytes",
            &mailbox.to_string(),
        ],
    );
    rt::block_on(async {
        let mut sink = within(Client::connect(&server.addr)).await.unwrap();
        within(sink.hello(2, None)).await.unwrap();
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        let before = rss(server.child.id());
        let frame = data(1, 2, TEXT, &vec![0x5a; 256 * 1024]);
        let count = 600 * 4;
        let (mut tx, mut rx) = a.split();
        let sending = rt::spawn(async move {
            for _ in 0..count {
                tx.send(&frame).await.unwrap();
            }
        });
        let (mut echoes, mut full) = (0, 0);
        for _ in 0..count {
            let f = within(rx.recv()).await.unwrap().unwrap();
            match f.notice() {
                Some(n) if n.is(Code::MailboxFull) => full += 1,
                Some(n) => panic!("unexpected notice {n}"),
                None => echoes += 1,
            }
        }
        sending.await;
        let grown = rss(server.child.id()).saturating_sub(before);
        let bound = pending + mailbox + (32 << 20);
        eprintln!(
            "600 MiB sent: {echoes} accepted, {full} refused; server grew {} KiB",
            grown >> 10
        );
        assert!(full > 0 && echoes > 0, "{echoes} echoes, {full} refusals");
        assert!(
            grown < bound,
            "grew {} MiB, bound {} MiB",
            grown >> 20,
            bound >> 20
        );
        drop(sink);
        let mut good = within(Client::connect(&server.addr)).await.unwrap();
        send_confirmed(&mut good, &text(3, 0, "served after the flood")).await;
    });
}

fn rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}
