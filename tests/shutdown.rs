//! SIGTERM (what `docker stop` sends) stops the server gracefully.

mod common;

use std::time::{Duration, Instant};

use chat::client::Client;
use chat::protocol::Code;
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
