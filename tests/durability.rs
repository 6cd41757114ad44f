//! What the echo promises: an accepted frame survives `kill -9` of the server.

mod common;

use chat::client::Client;
use chat::rt;
use common::*;

#[test]
fn accepted_frames_survive_sigkill_and_arrive_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<_> = (0..100)
        .map(|i| text(1, 2, &format!("durable {i}")))
        .collect();
    let mut server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        // Pipelined: all sent at once, then every echo awaited.
        for f in &frames {
            a.send(f).await.unwrap();
        }
        for f in &frames {
            assert_eq!(recv(&mut a).await, delivered(f));
        }
    });
    server.child.kill().unwrap();
    server.wait();

    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let (b, got) = mailbox_of(&server.addr, 2, frames.len()).await;
        assert_eq!(got, frames.iter().map(delivered).collect::<Vec<_>>());
        drop(b);

        // Delivered means gone: a second connection gets nothing but its own echo.
        let mut again = within(Client::connect(&server.addr)).await.unwrap();
        let early = within(again.hello(2, None)).await.unwrap();
        assert!(early.is_empty(), "{early:?}");
        send_confirmed(&mut again, &text(2, 0, "nothing before me")).await;
    });
}

/// The scenario: a receiver online but reading slowly (4 KiB receive buffer)
/// is sent 200 frames of 16 KiB; every one is echoed; the server is killed with
/// SIGKILL. What the old socket held plus what the next connection gets is all 200,
/// in order: at least once (a frame written just before the crash may come twice).
#[test]
fn frames_queued_for_a_slow_online_receiver_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let sent: Vec<_> = (0..200u32)
        .map(|i| {
            let mut body = vec![(i % 251) as u8; 16 * 1024];
            body[..4].copy_from_slice(&i.to_be_bytes());
            data(3001, 3002, 2, &body)
        })
        .collect();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let mut slow = rt::block_on(async {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let addr: std::net::SocketAddr = server.addr.parse().unwrap();
        sock.connect(&addr.into()).unwrap();
        let stream = async_std::net::TcpStream::from(std::net::TcpStream::from(sock));
        let mut slow = Client::from_stream(stream);
        within(slow.hello(3002, None)).await.unwrap();
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(3001, None)).await.unwrap();
        for f in &sent {
            a.send(f).await.unwrap();
        }
        for f in &sent {
            assert_eq!(recv(&mut a).await, delivered(f));
        }
        slow
    });
    server.child.kill().unwrap();
    server.wait();
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        // What the kernel still holds for the old socket, to its end.
        let mut old = Vec::new();
        while let Ok(Some(f)) = within(slow.recv()).await {
            if f.notice().is_none() {
                old.push(f);
            }
        }
        let want: Vec<_> = sent.iter().map(delivered).collect();
        assert_eq!(
            old[..],
            want[..old.len()],
            "the old socket's frames in order"
        );
        assert!(
            old.len() < sent.len(),
            "the test must leave frames undelivered"
        );
        // The next connection starts at or before where the old socket stopped.
        let mut again = within(Client::connect(&server.addr)).await.unwrap();
        let first = within(again.hello(3002, None)).await.unwrap();
        let mut got = first;
        while got.len() < sent.len() - old.len() {
            got.push(recv(&mut again).await);
        }
        let start = want
            .iter()
            .position(|f| *f == got[0])
            .expect("a frame that was sent");
        assert!(start <= old.len(), "frames {start}..{} lost", old.len());
        while got.len() < sent.len() - start {
            got.push(recv(&mut again).await);
        }
        assert_eq!(got[..], want[start..], "the rest, in order");
    });
}
