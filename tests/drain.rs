//! Draining a node (SIGUSR1, `POST /v1/drain`): it stops accepting, `/readyz` turns 503,
//! every client is asked to `reconnect` while it is still served, and the node stops
//! once they have gone (or at the deadline), losing nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_std::net::TcpStream;
use chat::protocol::Code;
use chat::rt;
use chat::server::config::{Admin, AdminToken, HttpLimits};

use common::*;

const TOKEN: &str = "drain-token";

fn drainable(c: &mut chat::server::Config) {
    c.admin = Some(Admin {
        listen: "127.0.0.1:0".into(),
        token: Arc::new(AdminToken::new(TOKEN).expect("a token")),
        limits: HttpLimits::ADMIN,
    });
    c.metrics_listen = Some("127.0.0.1:0".into());
    c.web_listen = Some("127.0.0.1:0".into());
}

/// `POST /v1/drain` with `body`: the status and the answer's text.
async fn post_drain(server: &TestServer, body: &str) -> (u16, String) {
    let addr = server.admin.expect("admin");
    let bearer = format!("Bearer {TOKEN}");
    let headers = [("Authorization", bearer.as_str())];
    let (status, _, answer) = http_call(addr, "POST", "/v1/drain", &headers, body).await;
    (status, answer)
}

/// A drain with a long deadline: both clients are asked to reconnect and are still
/// served meanwhile (a frame for an offline id is echoed, so stored); no new client
/// gets in, over TCP or the web listener; `/readyz` says `draining`; a second drain is
/// 409. Once both have left, the node stops by itself, long before the deadline, and
/// the stored frame is there after a restart.
#[test]
fn a_drained_node_stops_once_its_clients_have_gone_and_loses_nothing() {
    rt::block_on(async {
        let server = start_with(drainable).await;
        let mut a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        let (status, answer) = post_drain(&server, "{\"deadline_secs\": 600}").await;
        assert_eq!(status, 202, "{answer}");
        assert!(answer.contains("\"connections\": 2"), "{answer}");
        let detail = expect_notice(&mut a, Code::Reconnect).await;
        assert!(detail.contains("draining"), "{detail}");
        expect_notice(&mut b, Code::Reconnect).await;

        send_confirmed(&mut a, &text(1, 3, "kept for 3")).await;
        let (status, body) = http_get(server.metrics.expect("metrics"), "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("draining"), "{body}");
        let (status, _) = post_drain(&server, "").await;
        assert_eq!(status, 409, "one drain at a time");
        // The listeners are closed: new clients go elsewhere.
        within(async {
            while TcpStream::connect(server.addr).await.is_ok()
                || TcpStream::connect(server.web.expect("web")).await.is_ok()
            {
                rt::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;

        drop((a, b));
        let dir = server.stopped_by_itself().await;
        let server = start_in(dir, |_| {}).await;
        let mut c = login_at(&server.addr(), 3).await;
        assert_eq!(recv(&mut c).await, delivered(&text(1, 3, "kept for 3")));
    });
}

/// A client that ignores `reconnect` keeps being served until the deadline (1 s here),
/// then gets `shutting-down` and the close, as on SIGTERM, and the node stops. Bad
/// bodies are 400 and start nothing.
#[test]
fn a_client_that_stays_is_closed_at_the_deadline() {
    rt::block_on(async {
        let server = start_with(drainable).await;
        let mut stays = login(&server, 1).await;
        for bad in ["{\"deadline_secs\": 0}", "{\"deadline\": 5}", "nonsense"] {
            let (status, answer) = post_drain(&server, bad).await;
            assert_eq!(status, 400, "{bad}: {answer}");
        }
        send_confirmed(&mut stays, &text(1, 1, "not draining yet")).await;
        let (status, _) = post_drain(&server, "{\"deadline_secs\": 1}").await;
        assert_eq!(status, 202);
        expect_notice(&mut stays, Code::Reconnect).await;
        send_confirmed(&mut stays, &text(1, 1, "still served")).await;
        expect_notice(&mut stays, Code::ShuttingDown).await;
        expect_closed(&mut stays).await;
        server.stopped_by_itself().await;
    });
}

/// The binary: SIGUSR1 drains it. chat-client, waiting for frames, reconnects at once
/// when asked, so the node (with a 60 s deadline) exits 0 within seconds; a node
/// started on the same address and data takes the client back, and the frame sent
/// there reaches it.
#[test]
fn sigusr1_drains_the_binary_and_chat_client_moves_at_once() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = ServerProcess::start(dir.path(), &["--drain-timeout", "60"]);
    let addr = first.addr.clone();
    let mut client = receiving_client(
        &addr,
        9,
        2,
        std::process::Stdio::piped(),
        std::process::Stdio::null(),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = client.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let printed = |want: &str| loop {
        let line = lines
            .recv_timeout(WAIT)
            .expect("chat-client printed a frame");
        if line.contains(want) {
            break;
        }
    };
    rt::block_on(async {
        let mut sender = login_at(&addr, 5).await;
        send_confirmed(&mut sender, &text(5, 9, "before the move")).await;
    });
    // Delivered live: the client is bound to this node.
    printed("before the move");
    first.signal(libc::SIGUSR1);
    let status = first.wait();
    assert!(status.success(), "{status}");
    assert!(
        first.logged("drained: every connection has gone"),
        "{:?}",
        first.logs
    );

    let second = ServerProcess::start_on(dir.path(), &addr, &[]);
    rt::block_on(async {
        let mut sender = login_at(&second.addr, 5).await;
        send_confirmed(&mut sender, &text(5, 9, "after the move")).await;
    });
    printed("after the move");
    let status = wait_within(&mut client, WAIT);
    assert!(status.success(), "{status}");
}
