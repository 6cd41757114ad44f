//! The open-files limit: the server raises its soft limit to the hard one, and when
//! even that cannot hold `--max-connections`, it serves fewer and tells the surplus
//! `server-busy` instead of leaving it hanging.

mod common;

use chat::client::Client;
use chat::protocol::Code;
use chat::rt;
use common::*;

/// Connects `n` clients, each with a hello, and counts welcomes and refusals. Every
/// connection must get one of the two answers.
async fn connect_many(addr: &str, n: u32, base: u32) -> (Vec<Client>, usize) {
    let mut welcomed = Vec::new();
    let mut busy = 0;
    for i in 0..n {
        let mut c = within(Client::connect(addr)).await.expect("connects");
        match within(c.hello(base + i, None)).await {
            Ok(_) => welcomed.push(c),
            Err(e) => {
                assert!(
                    e.to_string().contains(Code::ServerBusy.as_str()),
                    "connection {i}: expected welcome or server-busy, got {e}"
                );
                busy += 1;
            }
        }
    }
    (welcomed, busy)
}

/// Every connection here comes from 127.0.0.1: no bound per address.
const PER_IP_OFF: [&str; 2] = ["--max-connections-per-ip", "0"];

/// Soft 1024, hard well above: the server raises its own soft limit and serves 3,000.
#[test]
fn a_low_soft_limit_is_raised_to_the_hard_limit() {
    // 65536 where this process may raise its hard limit, else its own hard limit.
    let hard = raise_own_files_limit();
    if hard < 4000 {
        skipping(
            "CHAT_REQUIRE_FILES",
            &format!(
                "the hard open-files limit {hard} cannot hold 3,000 connections (raise it: ulimit -Hn 4096 as root)"
            ),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_limited(dir.path(), &PER_IP_OFF, 1024, hard);
    rt::block_on(async {
        let (mut clients, busy) = connect_many(&server.addr, 3000, 10_000).await;
        assert_eq!(busy, 0, "all 3,000 must be served");
        assert_eq!(clients.len(), 3000);
        // The last one connected is really served.
        let last = clients.last_mut().unwrap();
        send_confirmed(last, &text(12_999, 0, "served")).await;
    });
    assert!(!server.logged("too low for --max-connections"));
}

/// Hard limit 1024 with the default `--max-connections 10000`: one warning naming both
/// numbers, `server-busy` for the surplus, and the server keeps serving.
#[test]
fn a_hard_limit_below_max_connections_answers_the_surplus_with_server_busy() {
    raise_own_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_limited(dir.path(), &PER_IP_OFF, 1024, 1024);
    rt::block_on(async {
        let (mut clients, busy) = connect_many(&server.addr, 1100, 20_000).await;
        assert!(busy > 0, "the surplus must be refused");
        assert!(
            clients.len() > 900,
            "only {} of 1,100 served under a limit of 1024",
            clients.len()
        );
        send_confirmed(&mut clients[0], &text(20_000, 0, "still served")).await;
        // Room again once some leave.
        clients.truncate(clients.len() - 10);
        within(async {
            loop {
                if let Ok(mut c) = Client::connect(&server.addr).await
                    && c.hello(30_000, None).await.is_ok()
                {
                    break;
                }
                rt::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    });
    assert!(server.logged("the open-files limit is 1024, too low for --max-connections 10000"));
    let warnings = server.count_logged("too low for --max-connections");
    assert_eq!(warnings, 1, "one warning, not one per connection");
}
