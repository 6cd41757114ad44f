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
