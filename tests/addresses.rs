//! One client address cannot hold every place on a listener (`--max-connections-per-ip`,
//! default a tenth of `--max-connections`; an HTTP listener lets an address hold a
//! quarter of its connections). The tests use several loopback source addresses
//! (127.0.0.2, 127.0.0.3, ...), which Linux answers without any setup.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_std::net::TcpStream;
use chat::client::Client;
use chat::protocol::Code;
use chat::rt;
use futures::{AsyncReadExt, AsyncWriteExt};

use common::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A TCP connection to `addr` from the local address `from`.
fn tcp_from(addr: SocketAddr, from: IpAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .expect("binds a loopback source address");
    // A blocking connect on loopback; the runtime takes the socket over afterwards.
    socket.connect(&addr.into()).expect("connects");
    TcpStream::from(std::net::TcpStream::from(socket))
}

/// A chat client bound to `id`, connected from `from`; the first frame it gets: the
/// welcome, or the notice that refused it.
async fn hello_from(server: &TestServer, from: IpAddr, id: u32) -> (Client, Code) {
    let mut c = within(Client::connect_from(&server.addr(), from))
        .await
        .expect("connects");
    // A refused connection may be closed before the hello is read: the notice still
    // arrives, since the server writes it first.
    let _ = within(c.send(&chat::protocol::ClientFrame::hello(id, b""))).await;
    let first = recv(&mut c).await;
    let notice = first.notice().expect("a notice first");
    let code = Code::ALL
        .into_iter()
        .find(|&code| notice.is(code))
        .expect("a known code");
    (c, code)
}

/// `GET path` from `from`: the status, or `None` when the connection was closed
/// unanswered.
async fn get_from(addr: SocketAddr, from: IpAddr, path: &str) -> Option<u16> {
    let mut s = tcp_from(addr, from);
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let _ = within(s.write_all(request.as_bytes())).await;
    let answer = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `--max-connections 20` and no per-address flag: an address may hold 2. Its third
/// chat connection gets `server-busy` naming the bound; another address still gets in;
/// a WebSocket counts with the address's TCP connections; a place given back is free
/// again.
#[test]
fn an_address_holds_a_tenth_of_the_connections_by_default() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_connections = 20;
            c.web_listen = Some("127.0.0.1:0".into());
            c.metrics_listen = Some("127.0.0.1:0".into());
        })
        .await;
        let (first, code) = hello_from(&server, ip(2), 1).await;
        assert_eq!(code, Code::Welcome);
        let (_second, code) = hello_from(&server, ip(2), 2).await;
        assert_eq!(code, Code::Welcome);

        let (mut third, code) = hello_from(&server, ip(2), 3).await;
        assert_eq!(code, Code::ServerBusy, "the third from one address");
        expect_closed(&mut third).await;
        let mut third = within(Client::connect_from(&server.addr(), ip(2)))
            .await
            .expect("connects");
        let detail = expect_notice(&mut third, Code::ServerBusy).await;
        assert!(
            detail.contains("2 connections open from this address"),
            "{detail}"
        );

        let (_other, code) = hello_from(&server, ip(3), 4).await;
        assert_eq!(code, Code::Welcome, "another address gets in");

        let web = server.web.expect("web");
        let mut ws = tcp_from(web, ip(2));
        let upgrade = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        within(ws.write_all(upgrade.as_bytes()))
            .await
            .expect("writes");
        let mut head = [0u8; 12];
        within(ws.read_exact(&mut head)).await.expect("answered");
        assert_eq!(&head, b"HTTP/1.1 503", "a WebSocket counts with TCP");

        drop(first);
        // The server gives the place back once it has seen the close: try until then.
        within(async {
            loop {
                let (_c, code) = hello_from(&server, ip(2), 5).await;
                if code == Code::Welcome {
                    break;
                }
                rt::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;

        let (_, metrics) = http_get(server.metrics.expect("metrics"), "/metrics").await;
        let refused = metrics
            .lines()
            .find(|l| l.starts_with("chat_connections_refused_total{reason=\"address_busy\"}"))
            .unwrap_or_else(|| panic!("no address_busy count in\n{metrics}"));
        let n: u64 = refused
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count");
        assert!(n >= 3, "{refused}");
    });
}

/// `--max-connections-per-ip 0` turns the bound off: one address may hold every place.
#[test]
fn zero_lets_one_address_hold_every_connection() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.max_connections = 20;
            c.max_connections_per_ip = Some(0);
        })
        .await;
        let mut held = Vec::new();
        for id in 1..=20 {
            let (c, code) = hello_from(&server, ip(2), id).await;
            assert_eq!(code, Code::Welcome, "connection {id}");
            held.push(c);
        }
        let (_, code) = hello_from(&server, ip(3), 99).await;
        assert_eq!(code, Code::ServerBusy, "the server itself is full");
    });
}

/// A slowloris: one address opens 300 connections to the web listener and sends half a
/// request on each (more than the listener's 256). It holds its quarter (64); page
/// loads from other addresses keep working, and the metrics listener, with its own
/// quarter (16), too.
#[test]
fn a_slowloris_from_one_address_leaves_the_pages_to_everybody_else() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.web_listen = Some("127.0.0.1:0".into());
            c.metrics_listen = Some("127.0.0.1:0".into());
            // The half-sent requests must not time out while the test runs.
            c.web_http.header_timeout = Duration::from_secs(600);
            c.metrics_http.header_timeout = Duration::from_secs(600);
        })
        .await;
        for (addr, holds) in [
            (server.web.expect("web"), 64),
            (server.metrics.expect("metrics"), 16),
        ] {
            let mut held = Vec::new();
            for _ in 0..300 {
                let mut s = tcp_from(addr, ip(2));
                // Refused ones are closed at once, and a write to them may fail.
                let _ = within(s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")).await;
                held.push(s);
            }
            for from in 3..9 {
                assert_eq!(
                    get_from(addr, ip(from), "/healthz").await,
                    Some(200),
                    "a page load from 127.0.0.{from} beside the slowloris on {addr}"
                );
            }
            // The attacker's own next one is closed unanswered; those it holds are
            // still being served.
            assert_eq!(get_from(addr, ip(2), "/healthz").await, None);
            let mut served = 0;
            for s in held.iter_mut() {
                let _ = within(s.write_all(b"Connection: close\r\n\r\n")).await;
                // Any answer (the metrics listener has no page at `/`: 404).
                if until_closed(s).await.starts_with(b"HTTP/1.1 ") {
                    served += 1;
                }
            }
            assert_eq!(served, holds, "connections the address held on {addr}");
        }
    });
}

/// A PROXY protocol v2 header for a TCP client at `client` (IPv4), or a `LOCAL` one
/// (a health check) without it.
fn proxy_v2(client: Option<SocketAddr>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match client {
        Some(SocketAddr::V4(a)) => {
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&a.ip().octets());
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&a.port().to_be_bytes());
            h.extend_from_slice(&8888u16.to_be_bytes());
        }
        _ => h.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    h
}

/// A chat client through a "proxy" that says the connection is from `header`'s client.
async fn hello_proxied(server: &TestServer, header: &[u8], id: u32) -> (Client, Option<Code>) {
    let mut tcp = within(TcpStream::connect(server.addr))
        .await
        .expect("connects");
    within(tcp.write_all(header))
        .await
        .expect("writes the header");
    let mut c = Client::from_stream(tcp);
    let _ = within(c.send(&chat::protocol::ClientFrame::hello(id, b""))).await;
    let code = match within(c.recv()).await {
        Ok(Some(f)) => {
            let notice = f.notice().expect("a notice first");
            Code::ALL.into_iter().find(|&code| notice.is(code))
        }
        _ => None,
    };
    (c, code)
}

/// `--proxy-protocol`: each client counts as the address its header names (v2 and v1),
/// not as the proxy's; the proxy's own health check (`LOCAL`) is served; a connection
/// without a header is closed unanswered and counted; the web listener reads the header
/// too.
#[test]
fn behind_a_proxy_each_client_counts_as_the_address_its_header_names() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.proxy_protocol = true;
            c.max_connections_per_ip = Some(1);
            c.web_listen = Some("127.0.0.1:0".into());
            c.metrics_listen = Some("127.0.0.1:0".into());
        })
        .await;
        let a: SocketAddr = "192.0.2.1:40001".parse().expect("addr");
        let b: SocketAddr = "192.0.2.2:40002".parse().expect("addr");
        let (_a, code) = hello_proxied(&server, &proxy_v2(Some(a)), 1).await;
        assert_eq!(code, Some(Code::Welcome));
        let (_again, code) = hello_proxied(&server, &proxy_v2(Some(a)), 2).await;
        assert_eq!(code, Some(Code::ServerBusy), "192.0.2.1 holds its one");
        let (_b, code) = hello_proxied(&server, &proxy_v2(Some(b)), 3).await;
        assert_eq!(code, Some(Code::Welcome), "192.0.2.2 is another client");
        let v1 = b"PROXY TCP4 192.0.2.3 127.0.0.1 40003 8888\r\n";
        let (mut c, code) = hello_proxied(&server, v1, 4).await;
        assert_eq!(code, Some(Code::Welcome), "version 1");
        send_confirmed(&mut c, &text(4, 4, "through the proxy")).await;

        // The proxy's health check: a ping after a LOCAL header is answered.
        let (mut check, code) = hello_proxied(&server, &proxy_v2(None), 5).await;
        assert_eq!(code, Some(Code::Welcome), "LOCAL counts as the proxy");
        within(check.ping()).await.expect("pong");

        // The container's health check: chat-client --probe --proxy-local (once the
        // check above has gone: it holds 127.0.0.1's one place).
        drop(check);
        let addr = server.addr();
        let probe = within(async {
            loop {
                let probe = chat_client(&["--server", &addr, "--probe", "--proxy-local"], "");
                if probe.status.success() {
                    return probe;
                }
                rt::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(probe.status.success(), "{probe:?}");
        let bare = chat_client(&["--server", &addr, "--probe", "--timeout", "2"], "");
        assert!(!bare.status.success(), "a probe without the header fails");

        // No header: the seed's client straight at the port is closed unanswered.
        let mut direct = within(TcpStream::connect(server.addr))
            .await
            .expect("connects");
        let seed_frame = [0, 0, 0, 6, 0, 0, 0, 6, 1, 0, 0, 0, 2, b'h', b'i'];
        within(direct.write_all(&seed_frame)).await.expect("writes");
        assert!(
            until_closed(&mut direct).await.is_empty(),
            "closed unanswered"
        );

        let web = server.web.expect("web");
        let mut page = within(TcpStream::connect(web)).await.expect("connects");
        let mut request = proxy_v2(Some(a));
        request.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        within(page.write_all(&request)).await.expect("writes");
        assert!(until_closed(&mut page).await.starts_with(b"HTTP/1.1 200"));
        let mut bare = within(TcpStream::connect(web)).await.expect("connects");
        within(bare.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"))
            .await
            .expect("writes");
        assert!(
            until_closed(&mut bare).await.is_empty(),
            "no header, no page"
        );

        let (_, metrics) = http_get(server.metrics.expect("metrics"), "/metrics").await;
        assert!(
            metrics.contains("chat_connections_refused_total{reason=\"proxy_refused\"} 3"),
            "{metrics}"
        );
    });
}
