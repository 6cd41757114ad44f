//! SIGTERM (what `docker stop` sends) stops the server gracefully.

mod common;

use std::time::{Duration, Instant};

use chat::client::Client;
use chat::protocol::{ClientFrame, Code};
use chat::rt;
use common::*;

#[test]
fn sigterm_with_clients_connected_exits_zero_promptly_and_keeps_the_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let mut clients = Vec::new();
        for id in 1..=20 {
            let mut c = within(Client::connect(&server.addr)).await.unwrap();
            within(c.hello(id, None)).await.unwrap();
            clients.push(c);
        }
        send_confirmed(&mut clients[0], &text(1, 99, "for later")).await;
        let started = Instant::now();
        server.signal(libc::SIGTERM);
        let status = server.wait();
        let took = started.elapsed();
        assert_eq!(status.code(), Some(0), "{status:?}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        for c in &mut clients {
            expect_notice(c, Code::ShuttingDown).await;
            expect_closed(c).await;
        }
    });
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let (_c, got) = mailbox_of(&server.addr, 99, 1).await;
        assert_eq!(got, vec![delivered(&text(1, 99, "for later"))]);
    });
}

/// Frames queued in the server for a connected client that had not read them when
/// SIGTERM came are written to it before the close (6.4 MB: more than its socket
/// holds), and, being delivered, are not in the mailbox after the restart.
/// Id 2 connects and reads nothing; id 1 sends it `sent`, each accepted (echoed).
/// Returns 2's connection, whose socket and server-side queue hold the frames.
async fn queued_for_a_silent_receiver(addr: &str, sent: &[ClientFrame]) -> Client {
    let mut receiver = within(Client::connect(addr)).await.unwrap();
    within(receiver.hello(2, None)).await.unwrap();
    let mut sender = within(Client::connect(addr)).await.unwrap();
    within(sender.hello(1, None)).await.unwrap();
    for f in sent {
        within(sender.send(f)).await.unwrap();
    }
    for f in sent {
        assert_eq!(recv(&mut sender).await, delivered(f));
    }
    receiver
}

#[test]
fn sigterm_flushes_what_is_queued_for_connected_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let sent: Vec<_> = (0..200u32)
        .map(|i| data(1, 2, 2, &[&i.to_be_bytes()[..], &[7u8; 32 * 1024]].concat()))
        .collect();
    rt::block_on(async {
        let mut receiver = queued_for_a_silent_receiver(&server.addr, &sent).await;
        let reading = rt::spawn(async move {
            let mut got = Vec::new();
            while let Ok(Some(f)) = within(receiver.recv()).await {
                got.push(f);
            }
            got
        });
        server.signal(libc::SIGTERM);
        let status = server.wait();
        assert_eq!(status.code(), Some(0), "{status:?}");
        let got = reading.await;
        let (last, frames) = got.split_last().expect("frames and a notice");
        assert!(
            last.notice().is_some_and(|n| n.is(Code::ShuttingDown)),
            "{last:?}"
        );
        assert_frames(frames, &sent.iter().map(delivered).collect::<Vec<_>>());
    });
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        // A marker sent now is the first thing 2 gets: nothing delivered came back.
        let mut one = within(Client::connect(&server.addr)).await.unwrap();
        within(one.hello(1, None)).await.unwrap();
        let marker = text(1, 2, "marker");
        send_confirmed(&mut one, &marker).await;
        let (_c, got) = mailbox_of(&server.addr, 2, 1).await;
        assert_eq!(got, vec![delivered(&marker)]);
    });
}

/// SIGTERM while a client reads nothing and 19 MB wait for it (more than its socket
/// holds): the server flushes for at most 2 s, hands the rest to the mailbox and exits
/// 0 well before its 4 s shutdown limit; what the client later reads from its socket and
/// what its next connection gets are together every frame once, in order.
#[test]
fn sigterm_with_a_client_that_reads_nothing_stops_within_the_drain_limit() {
    let dir = tempfile::tempdir().unwrap();
    let big = (64 << 20).to_string();
    let mut server = ServerProcess::start(dir.path(), &["--max-pending-bytes", &big]);
    let sent: Vec<_> = (0..600u32)
        .map(|i| data(1, 2, 2, &[&i.to_be_bytes()[..], &[5u8; 32 * 1024]].concat()))
        .collect();
    let mut receiver = rt::block_on(queued_for_a_silent_receiver(&server.addr, &sent));
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took < Duration::from_millis(3500), "took {took:?}");
    assert!(server.logged("stopped cleanly"), "writers were still busy");
    drop(server);
    let got = rt::block_on(async {
        let mut got = Vec::new();
        while let Ok(Some(f)) = within(receiver.recv()).await {
            if f.notice().is_none() {
                got.push(f);
            }
        }
        got
    });
    assert!(
        got.len() < sent.len(),
        "everything was written: nothing to hand over"
    );
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let (_c, rest) = mailbox_of(&server.addr, 2, sent.len() - got.len()).await;
        let all: Vec<_> = got.into_iter().chain(rest).collect();
        assert_frames(&all, &sent.iter().map(delivered).collect::<Vec<_>>());
    });
}
