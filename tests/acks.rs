//! Acknowledged delivery: with acks on, a frame stays the server's until the client's
//! running count covers it, and comes again, first and in order, on the next
//! connection if it was not acknowledged.

mod common;

use chat::client::Client;
use chat::protocol::{ClientFrame, Code, ServerFrame};
use chat::rt;
use common::*;

fn frames(from: u32, to: u32, n: usize, tag: &str) -> Vec<ClientFrame> {
    (0..n)
        .map(|i| text(from, to, &format!("{tag} {i}")))
        .collect()
}

async fn send_all(c: &mut Client, frames: &[ClientFrame]) {
    for f in frames {
        within(c.send(f)).await.unwrap();
    }
    for f in frames {
        assert_eq!(recv(c).await, delivered(f));
    }
}

async fn recv_n(c: &mut Client, n: usize) -> Vec<ServerFrame> {
    let mut got = Vec::new();
    while got.len() < n {
        got.push(recv(c).await);
    }
    got
}

/// A new acking connection for `id` gets `sent`, in order, acknowledging as it goes.
async fn receive_acking(addr: &str, id: u32, sent: &[ClientFrame]) {
    let mut next = login_acks(addr, id).await;
    let mut acker = chat::client::Acker::new(id);
    for f in sent {
        let got = recv(&mut next).await;
        assert_eq!(got, delivered(f));
        acker.handled(&got);
        if let Some(ack) = acker.ack() {
            within(next.send(&ack)).await.unwrap();
        }
    }
}

async fn ack(c: &mut Client, id: u32, h: u32) {
    within(c.send(&ClientFrame::ack(id, h))).await.unwrap();
}

/// Frames sent to an acking receiver, 3 of 5 acknowledged, then the connection ends
/// by a close, a takeover, or (below) a crash of the server: the 2 come again first,
/// in order, then newer frames; the 3 never again.
#[test]
fn unacknowledged_frames_come_again_first_and_in_order_after_close_and_takeover() {
    rt::block_on(async {
        let server = start().await;
        let addr = server.addr();
        let mut a = login(&server, 1).await;
        for ending in ["close", "takeover"] {
            let mut b = login_acks(&addr, 2).await;
            let first = frames(1, 2, 5, ending);
            send_all(&mut a, &first).await;
            let got = recv_n(&mut b, 5).await;
            assert_eq!(got, first.iter().map(delivered).collect::<Vec<_>>());
            ack(&mut b, 2, 3).await;
            // A ping after the ack proves the server took the ack first.
            within(b.send(&ClientFrame::ping())).await.unwrap();
            expect_notice(&mut b, Code::Pong).await;
            let newer = text(1, 2, &format!("{ending} newer"));
            send_confirmed(&mut a, &newer).await;
            assert_eq!(recv(&mut b).await, delivered(&newer));
            let mut next = login_acks(&addr, 2).await;
            match ending {
                "close" => drop(b),
                _ => expect_notice(&mut b, Code::Replaced).await.truncate(0),
            }
            let again = recv_n(&mut next, 3).await;
            let want: Vec<_> = first[3..].iter().chain([&newer]).map(delivered).collect();
            assert_eq!(again, want, "after {ending}");
            ack(&mut next, 2, 3).await;
            within(next.send(&ClientFrame::ping())).await.unwrap();
            expect_notice(&mut next, Code::Pong).await;
            drop(next);
        }
        // Everything was acknowledged: nothing comes again.
        let mut last = login_acks(&addr, 2).await;
        let marker = text(1, 2, "only this");
        send_confirmed(&mut a, &marker).await;
        assert_eq!(recv(&mut last).await, delivered(&marker));
    });
}

/// A takeover in the middle of a stream, acks on: the old connection acknowledged 50,
/// then read more without acknowledging and was replaced while frames were still
/// queued for it; the new one gets exactly everything after the 50, in order.
#[test]
fn takeover_with_frames_in_flight_redelivers_exactly_the_unacknowledged() {
    rt::block_on(async {
        let server = start_with(|c| c.max_pending_bytes = 64 << 20).await;
        let mut old = login_acks(&server.addr(), 2).await;
        let sender = login(&server, 1).await;
        let sent: Vec<_> = (0..600u32)
            .map(|i| {
                data(
                    1,
                    2,
                    1,
                    &[&i.to_be_bytes()[..], &[b'x'; 32 * 1024]].concat(),
                )
            })
            .collect();
        let (mut tx, mut rx) = sender.split();
        let first: Vec<_> = sent[..300].to_vec();
        let sending = rt::spawn(async move {
            for f in &first {
                tx.send(f).await.expect("send");
            }
            tx
        });
        for f in &sent[..300] {
            assert_eq!(within(rx.recv()).await.unwrap().unwrap(), delivered(f));
        }
        let read = recv_n(&mut old, 50).await;
        assert_frames(&read, &sent[..50].iter().map(delivered).collect::<Vec<_>>());
        ack(&mut old, 2, 50).await;
        within(old.send(&ClientFrame::ping())).await.unwrap();
        loop {
            match recv(&mut old).await.notice() {
                Some(n) if n.is(Code::Pong) => break,
                Some(n) => panic!("{n}"),
                None => {}
            }
        }
        let mut new = login_acks(&server.addr(), 2).await;
        expect_closed(&mut old).await;
        let mut tx = sending.await;
        for f in &sent[300..] {
            within(tx.send(f)).await.unwrap();
        }
        let again = recv_n(&mut new, 550).await;
        assert_frames(
            &again,
            &sent[50..].iter().map(delivered).collect::<Vec<_>>(),
        );
        for f in &sent[300..] {
            assert_eq!(within(rx.recv()).await.unwrap().unwrap(), delivered(f));
        }
        send_confirmed(&mut new, &text(2, 0, "nothing more")).await;
    });
}

#[test]
fn unacknowledged_frames_survive_sigkill_and_acknowledged_ones_do_not_come_again() {
    let dir = tempfile::tempdir().unwrap();
    let sent = frames(1, 2, 10, "crash");
    let mut server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let mut b = login_acks(&server.addr, 2).await;
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        send_all(&mut a, &sent).await;
        recv_n(&mut b, 10).await;
        ack(&mut b, 2, 4).await;
        within(b.send(&ClientFrame::ping())).await.unwrap();
        expect_notice(&mut b, Code::Pong).await;
        // The removal is committed with the store's next batch: a frame stored after
        // the pong is echoed only once that batch is on disk.
        send_confirmed(&mut a, &text(1, 3, "after the ack")).await;
    });
    server.child.kill().unwrap();
    server.wait();
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let mut b = login_acks(&server.addr, 2).await;
        let again = recv_n(&mut b, 6).await;
        assert_eq!(again, sent[4..].iter().map(delivered).collect::<Vec<_>>());
        ack(&mut b, 2, 6).await;
        send_confirmed(&mut b, &text(2, 0, "nothing more")).await;
    });
}

/// Acks that go backwards or past what was sent, acks without acks on and malformed
/// acks each get `bad-control`; the connection stays and counts on correctly.
#[test]
fn bad_acks_get_bad_control_and_the_connection_stays() {
    rt::block_on(async {
        let server = start().await;
        let mut plain = login(&server, 5).await;
        ack(&mut plain, 5, 0).await;
        let d = expect_notice(&mut plain, Code::BadControl).await;
        assert!(d.contains("acks are not on"), "{d}");

        let mut a = login(&server, 1).await;
        let mut b = login_acks(&server.addr(), 2).await;
        let sent = frames(1, 2, 3, "count");
        send_all(&mut a, &sent).await;
        recv_n(&mut b, 3).await;
        ack(&mut b, 2, 4).await;
        let d = expect_notice(&mut b, Code::BadControl).await;
        assert!(d.contains("past the 3 frames"), "{d}");
        ack(&mut b, 2, 2).await;
        ack(&mut b, 2, 1).await;
        let d = expect_notice(&mut b, Code::BadControl).await;
        assert!(d.contains("behind the last ack (2)"), "{d}");
        let short = ClientFrame {
            body: vec![0, 1].into(),
            ..ClientFrame::ack(2, 0)
        };
        within(b.send(&short)).await.unwrap();
        let d = expect_notice(&mut b, Code::BadControl).await;
        assert!(d.contains("4-byte"), "{d}");
        ack(&mut b, 2, 3).await;
        send_confirmed(&mut b, &text(2, 0, "still here")).await;
        // All three acknowledged: a new connection gets nothing old.
        drop(b);
        let mut again = login_acks(&server.addr(), 2).await;
        send_confirmed(&mut again, &text(2, 0, "nothing before me")).await;
    });
}

/// A bound connection turns acks on with op 3 and an empty body: `acks-on`, and only
/// frames after that notice count.
#[test]
fn acks_can_be_turned_on_after_binding() {
    rt::block_on(async {
        let server = start().await;
        let mut a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        let before = text(1, 2, "before acks");
        send_confirmed(&mut a, &before).await;
        assert_eq!(recv(&mut b).await, delivered(&before));
        within(b.send(&ClientFrame::hello_acks(2, b"")))
            .await
            .unwrap();
        expect_notice(&mut b, Code::AcksOn).await;
        let after = text(1, 2, "after acks");
        send_confirmed(&mut a, &after).await;
        assert_eq!(recv(&mut b).await, delivered(&after));
        drop(b);
        // Not acknowledged: it comes again; the frame from before acks does not.
        let (_b, got) = mailbox_of(&server.addr(), 2, 1).await;
        assert_eq!(got, vec![delivered(&after)]);
    });
}

/// `--max-pending-bytes` counts unacknowledged bytes: a client that never acks is cut
/// off as a slow consumer (at once when live frames overflow it, after `--frame-timeout`
/// when its mailbox waits for acks), and everything comes again, in order, on its next
/// connection.
#[test]
fn a_client_that_never_acks_is_cut_off_and_loses_nothing() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_pending_bytes = 64 * 1024;
            c.frame_timeout = std::time::Duration::from_secs(1);
        })
        .await;
        let mut a = login(&server, 1).await;
        let mut b = login_acks(&server.addr(), 2).await;
        let body = vec![7u8; 4096];
        let sent: Vec<_> = (0..40u8)
            .map(|i| {
                let mut body = body.clone();
                body[0] = i;
                data(1, 2, 3, &body)
            })
            .collect();
        // b reads everything but never acks; past 64 KiB it is cut off.
        let reading = rt::spawn(async move {
            let mut n = 0;
            loop {
                match b.recv().await {
                    Ok(Some(f)) if f.notice().is_some_and(|n| n.is(Code::SlowConsumer)) => {
                        return n;
                    }
                    Ok(Some(_)) => n += 1,
                    _ => panic!("closed without slow-consumer after {n} frames"),
                }
            }
        });
        send_all(&mut a, &sent).await;
        let read = within(reading).await;
        assert!(
            read < sent.len(),
            "cut off before all {} arrived",
            sent.len()
        );
        receive_acking(&server.addr(), 2, &sent).await;
    });
}

/// The mailbox case of the rule above: a stored mailbox larger than
/// `--max-pending-bytes`, read by a client that never acks, stops at a page; after
/// `--frame-timeout` without an ack the client is cut off as a slow consumer, and its
/// next connection gets the whole mailbox again, in order.
#[test]
fn a_client_that_never_acks_its_mailbox_is_cut_off_after_the_frame_timeout() {
    rt::block_on(async {
        let timeout = std::time::Duration::from_secs(1);
        let server = start_with(|c| {
            c.max_pending_bytes = 64 * 1024;
            c.frame_timeout = timeout;
        })
        .await;
        let mut a = login(&server, 1).await;
        let sent: Vec<_> = (0..40u8).map(|i| data(1, 2, 3, &[i; 4096])).collect();
        send_all(&mut a, &sent).await;
        // Timed from before the connect: the server's wait can begin as soon as it
        // has sent the first page, before this side has read the welcome.
        let bound = std::time::Instant::now();
        let mut b = login_acks(&server.addr(), 2).await;
        let mut read = 0;
        let detail = loop {
            let f = recv(&mut b).await;
            match f.notice() {
                Some(n) if n.is(Code::SlowConsumer) => break n.detail,
                Some(n) => panic!("{n}"),
                None => {
                    assert_eq!(f, delivered(&sent[read]));
                    read += 1;
                }
            }
        };
        let waited = bound.elapsed();
        expect_closed(&mut b).await;
        assert!(read < sent.len(), "all {read} arrived: no page stopped");
        assert!(waited >= timeout, "cut off after {waited:?}: {detail}");
        receive_acking(&server.addr(), 2, &sent).await;
    });
}

/// A mailbox larger than `--max-pending-bytes` reaches an acking client page by page
/// as it acknowledges, without it being cut off.
#[test]
fn a_large_mailbox_flows_as_fast_as_the_client_acks() {
    rt::block_on(async {
        let server = start_with(|c| c.max_pending_bytes = 64 * 1024).await;
        let mut a = login(&server, 1).await;
        let sent: Vec<_> = (0..100u32)
            .map(|i| {
                data(
                    1,
                    2,
                    3,
                    &[i.to_be_bytes().as_slice(), &[0u8; 2048]].concat(),
                )
            })
            .collect();
        send_all(&mut a, &sent).await;
        let mut b = login_acks(&server.addr(), 2).await;
        let mut acker = chat::client::Acker::new(2);
        for f in &sent {
            let got = recv(&mut b).await;
            assert_eq!(got, delivered(f));
            acker.handled(&got);
            if let Some(ack) = acker.ack() {
                within(b.send(&ack)).await.unwrap();
            }
        }
        send_confirmed(&mut b, &text(2, 0, "all read")).await;
    });
}
