//! The HTTP listeners (metrics and web) bound what a client that connects and dawdles
//! can hold: connections at once (64 and 256), time for the headers (5 s), the size of
//! a request head (16 KiB), and the time of one connection (30 s; shortened here).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_std::net::TcpStream;
use chat::rt;
use chat::server::config::HttpLimits;
use futures::AsyncWriteExt;

use common::*;

/// Both HTTP listeners, with `limits` applied to each.
async fn http_server(limits: impl Fn(&mut HttpLimits)) -> TestServer {
    start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".into());
        c.web_listen = Some("127.0.0.1:0".into());
        limits(&mut c.metrics_http);
        limits(&mut c.web_http);
    })
    .await
}

/// Each listener with the number of connections the README promises it serves at once.
fn listeners(server: &TestServer) -> [(SocketAddr, usize); 2] {
    [
        (server.metrics.expect("metrics"), 64),
        (server.web.expect("web"), 256),
    ]
}

fn status(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

async fn get_healthz(addr: SocketAddr) -> Vec<u8> {
    let mut s = within(TcpStream::connect(addr)).await.expect("connects");
    let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    // A refused connection may be closed before the request is written.
    let _ = within(s.write_all(request)).await;
    until_closed(&mut s).await
}

/// 64 (metrics) and 256 (web) connections held with half-sent requests: the next one
/// is closed unanswered; once one of them goes, a new one is served again, and each
/// held one is still served when it finishes its request.
#[test]
fn each_listener_serves_at_most_its_connections_at_a_time() {
    rt::block_on(async {
        // The held requests must not time out while the test runs; all come from one
        // address, which may hold them all here (tests/addresses.rs has its bound).
        let server = http_server(|l| {
            l.header_timeout = Duration::from_secs(600);
            l.max_per_address = 0;
        })
        .await;
        for (addr, max) in listeners(&server) {
            let mut held = Vec::new();
            for _ in 0..max {
                let mut s = within(TcpStream::connect(addr)).await.expect("connects");
                within(s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n"))
                    .await
                    .expect("writes");
                held.push(s);
            }
            // Accepted after the held ones (one listen queue, in order): refused.
            let refused = get_healthz(addr).await;
            assert!(refused.is_empty(), "connection {} was answered", max + 1);
            // One held connection goes: another is served (once its task has ended).
            drop(held.pop());
            within(async {
                while status(&get_healthz(addr).await) != Some(200) {
                    rt::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            // The held ones were being served all along.
            for s in held.iter_mut().take(3) {
                within(s.write_all(b"Connection: close\r\n\r\n"))
                    .await
                    .expect("writes");
                assert_eq!(status(&until_closed(s).await), Some(200));
            }
        }
    });
}

/// A request whose headers have not all arrived 5 s after the connection opened is
/// closed (measured: between 5 s and 7 s), on both listeners at once.
#[test]
fn headers_must_arrive_within_5_seconds() {
    rt::block_on(async {
        let server = http_server(|_| {}).await;
        let mut waits = Vec::new();
        for (addr, _) in listeners(&server) {
            waits.push(rt::spawn(async move {
                let opened = Instant::now();
                let mut s = within(TcpStream::connect(addr)).await.expect("connects");
                within(s.write_all(b"GET /healthz HTTP/1.1\r\nHost:"))
                    .await
                    .expect("writes");
                let answer = until_closed(&mut s).await;
                (opened.elapsed(), answer)
            }));
        }
        for wait in waits {
            let (took, answer) = wait.await;
            assert!(
                took >= Duration::from_secs(5) && took < Duration::from_secs(7),
                "closed after {took:?}"
            );
            assert!(
                answer.is_empty() || status(&answer) == Some(408),
                "{}",
                String::from_utf8_lossy(&answer)
            );
        }
    });
}

/// A request head larger than 16 KiB gets 431 on both listeners; one just under it is
/// served.
#[test]
fn a_request_head_over_16_kib_is_refused() {
    rt::block_on(async {
        let server = http_server(|_| {}).await;
        for (addr, _) in listeners(&server) {
            let head = |filler: usize| {
                format!(
                    "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
                    "x".repeat(filler)
                )
            };
            for (filler, want) in [(15 * 1024, 200), (17 * 1024, 431)] {
                let mut s = within(TcpStream::connect(addr)).await.expect("connects");
                let _ = within(s.write_all(head(filler).as_bytes())).await;
                let answer = until_closed(&mut s).await;
                assert_eq!(
                    status(&answer),
                    Some(want),
                    "a {filler}-byte header: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
        }
    });
}

/// A connection is closed when its time is up, however it is used (the binary's 30 s
/// shortened to 2 s here; the header timeout set longer so that it is not the cause).
#[test]
fn a_connection_is_closed_when_its_time_is_up() {
    rt::block_on(async {
        let server = http_server(|l| {
            l.connection_time = Duration::from_secs(2);
            l.header_timeout = Duration::from_secs(600);
        })
        .await;
        assert_eq!(HttpLimits::METRICS.connection_time, Duration::from_secs(30));
        assert_eq!(HttpLimits::WEB.connection_time, Duration::from_secs(30));
        for (addr, _) in listeners(&server) {
            // Before the connect: the server's clock starts at its accept, which may
            // come before this task runs again.
            let opened = Instant::now();
            let mut s = within(TcpStream::connect(addr)).await.expect("connects");
            // One request served on a kept-alive connection, then silence.
            within(s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"))
                .await
                .expect("writes");
            let answer = until_closed(&mut s).await;
            let took = opened.elapsed();
            assert_eq!(status(&answer), Some(200));
            assert!(
                took >= Duration::from_secs(2) && took < Duration::from_secs(4),
                "closed after {took:?}"
            );
        }
    });
}
