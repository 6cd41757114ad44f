//! The protocol over WebSocket (`--web-listen`, path `/ws`): one binary message per
//! frame each way, the same broker as TCP, the same refusals for bad input, and the
//! Origin check against cross-site WebSocket hijacking.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use async_std::net::TcpStream;
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};

use chat::protocol::{ClientFrame, Code, FrameBuf, PICTURE, ServerFrame};
use chat::rt;
use chat::server::Config;
use chat::tls;
use common::*;

/// A WebSocket client of the chat protocol.
struct Ws<S> {
    ws: WebSocketStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    async fn send(&mut self, frame: &ClientFrame) {
        self.send_message(Message::Binary(frame.to_bytes().into()))
            .await;
    }

    async fn send_message(&mut self, message: Message) {
        within(self.ws.send(message)).await.expect("send");
    }

    /// The next frame; every binary message must be exactly one frame.
    async fn recv(&mut self) -> Option<ServerFrame> {
        match within(self.ws.next()).await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => None,
            Some(Ok(Message::Binary(bytes))) => {
                let mut buf = FrameBuf::new();
                buf.extend(&bytes);
                let frame = buf.decode_server(u32::MAX).expect("a frame");
                assert!(buf.is_empty(), "a message held more than one frame");
                Some(frame.expect("a message held part of a frame"))
            }
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
        }
    }

    async fn expect(&mut self) -> ServerFrame {
        self.recv()
            .await
            .expect("a frame, not the end of the connection")
    }

    async fn expect_notice(&mut self, code: Code) -> String {
        let f = self.expect().await;
        let n = f
            .notice()
            .unwrap_or_else(|| panic!("expected {code} notice, got {f:?}"));
        assert!(n.is(code), "expected {code} notice, got {n}");
        n.detail
    }

    async fn expect_closed(&mut self) {
        while let Some(f) = self.recv().await {
            assert!(f.notice().is_some(), "data after the final notice: {f:?}");
        }
    }

    async fn send_confirmed(&mut self, frame: &ClientFrame) {
        self.send(frame).await;
        assert_eq!(self.expect().await, delivered(frame));
    }
}

fn web(server: &TestServer) -> SocketAddr {
    server.web.expect("the server serves the web listener")
}

async fn web_server(configure: impl FnOnce(&mut Config)) -> TestServer {
    start_with(|c| {
        c.web_listen = Some("127.0.0.1:0".into());
        configure(c);
    })
    .await
}

async fn ws_connect(server: &TestServer) -> Ws<TcpStream> {
    ws_connect_with(server, None)
        .await
        .expect("the upgrade is accepted")
}

/// Opens `/ws`, sending `origin` as a browser would.
async fn ws_connect_with(
    server: &TestServer,
    origin: Option<&str>,
) -> Result<Ws<TcpStream>, WsError> {
    let addr = web(server);
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    if let Some(origin) = origin {
        let value = HeaderValue::from_str(origin).expect("origin header");
        request.headers_mut().insert("Origin", value);
    }
    let tcp = within(TcpStream::connect(addr)).await.expect("connects");
    let (ws, _) = within(async_tungstenite::client_async(request, tcp)).await?;
    Ok(Ws { ws })
}

async fn ws_login(server: &TestServer, id: u32) -> Ws<TcpStream> {
    let mut ws = ws_connect(server).await;
    ws.send(&ClientFrame::hello(id, b"")).await;
    ws.expect_notice(Code::Welcome).await;
    ws
}

/// One HTTP/1.1 request on its own connection: the status line and the whole response.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = within(TcpStream::connect(addr)).await.expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    within(tcp.write_all(request.as_bytes())).await.unwrap();
    let mut response = Vec::new();
    within(tcp.read_to_end(&mut response)).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn welcome_and_echo_come_as_one_message_each() {
    rt::block_on(async {
        let server = web_server(|_| {}).await;
        let mut ws = ws_login(&server, 1).await;
        ws.send_confirmed(&text(1, 0, "echo over WebSocket, 你好"))
            .await;
        ws.send(&ClientFrame::ping()).await;
        ws.expect_notice(Code::Pong).await;
    });
}

#[test]
fn websocket_and_tcp_clients_talk_both_ways() {
    rt::block_on(async {
        let server = web_server(|_| {}).await;
        let mut browser = ws_login(&server, 1).await;
        let mut terminal = login(&server, 2).await;
        let hi = text(1, 2, "from the browser");
        browser.send_confirmed(&hi).await;
        assert_eq!(recv(&mut terminal).await, delivered(&hi));
        let picture = data(2, 1, PICTURE, &vec![7u8; 70_000]);
        send_confirmed(&mut terminal, &picture).await;
        assert_eq!(browser.expect().await, delivered(&picture));
        // Two WebSockets, too.
        let mut other = ws_login(&server, 3).await;
        let m = text(3, 1, "tab to tab");
        other.send_confirmed(&m).await;
        assert_eq!(browser.expect().await, delivered(&m));
    });
}

#[test]
fn a_websocket_gets_its_mailbox_and_acks_it() {
    rt::block_on(async {
        let server = web_server(|_| {}).await;
        let mut a = login(&server, 1).await;
        let first = text(1, 7, "while you were away");
        let second = data(1, 7, PICTURE, &[1, 2, 3]);
        send_confirmed(&mut a, &first).await;
        send_confirmed(&mut a, &second).await;

        let mut ws = ws_connect(&server).await;
        ws.send(&ClientFrame::hello_acks(7, b"")).await;
        ws.expect_notice(Code::Welcome).await;
        assert_eq!(ws.expect().await, delivered(&first));
        assert_eq!(ws.expect().await, delivered(&second));
        // Only the first is acknowledged: the second comes again on the next connection.
        ws.send(&ClientFrame::ack(7, 1)).await;
        ws.send(&ClientFrame::ping()).await;
        ws.expect_notice(Code::Pong).await;
        drop(ws);

        let mut again = ws_connect(&server).await;
        again.send(&ClientFrame::hello_acks(7, b"")).await;
        again.expect_notice(Code::Welcome).await;
        assert_eq!(again.expect().await, delivered(&second));
    });
}

#[test]
fn tokens_are_required_over_websocket_too() {
    rt::block_on(async {
        let secret = || chat::auth::Secret::new("correct horse battery staple").unwrap();
        let keys = chat::auth::Keys::from(secret());
        let server = web_server(|c| c.auth = Some(chat::auth::Auth::new(keys, false))).await;
        let config = http_get(web(&server), "/config.json").await;
        assert!(config.contains("\"auth\":true"), "{config}");

        let mut anonymous = ws_connect(&server).await;
        anonymous.send(&text(4, 0, "no hello")).await;
        anonymous.expect_notice(Code::AuthFailed).await;
        anonymous.expect_closed().await;

        let mut wrong = ws_connect(&server).await;
        wrong
            .send(&ClientFrame::hello_acks(4, secret().token(5).as_bytes()))
            .await;
        wrong.expect_notice(Code::AuthFailed).await;
        wrong.expect_closed().await;

        let mut ws = ws_connect(&server).await;
        ws.send(&ClientFrame::hello_acks(4, secret().token(4).as_bytes()))
            .await;
        ws.expect_notice(Code::Welcome).await;
        ws.send_confirmed(&text(4, 0, "signed in")).await;
    });
}

#[test]
fn takeover_works_across_transports() {
    rt::block_on(async {
        let server = web_server(|_| {}).await;
        let mut tcp = login(&server, 5).await;
        let mut ws = ws_login(&server, 5).await;
        expect_notice(&mut tcp, Code::Replaced).await;
        expect_closed(&mut tcp).await;

        let mut tcp_again = login(&server, 5).await;
        ws.expect_notice(Code::Replaced).await;
        ws.expect_closed().await;
        send_confirmed(&mut tcp_again, &text(5, 0, "mine again")).await;
    });
}

/// Each malformed message gets the notice that says why, then the connection closes;
/// the server goes on serving others.
#[test]
fn bad_messages_get_a_notice_then_a_close() {
    rt::block_on(async {
        let server = web_server(|c| c.max_frame_bytes = 1024).await;
        let hello = ClientFrame::hello(9, b"").to_bytes();
        let mut two = hello.clone();
        two.extend_from_slice(&ClientFrame::ping().to_bytes());
        let mut over = text(9, 0, "").to_bytes();
        over[9..13].copy_from_slice(&5000u32.to_be_bytes());
        let huge = data(9, 0, PICTURE, &vec![0u8; 4096]).to_bytes();
        let cases: Vec<(&str, Message, Code, &str)> = vec![
            (
                "text",
                Message::Text("hello".into()),
                Code::BadMessage,
                "frames travel in binary WebSocket messages, not text",
            ),
            (
                "half a header",
                Message::Binary(hello[..5].to_vec().into()),
                Code::BadMessage,
                "this one has 5 bytes, less than a 13-byte header",
            ),
            (
                "half a frame",
                Message::Binary(text(9, 0, "abc").to_bytes()[..14].to_vec().into()),
                Code::BadMessage,
                "this one has 14 bytes, part of one (its header announces 16)",
            ),
            (
                "two frames",
                Message::Binary(two.into()),
                Code::BadMessage,
                "this one has 26 bytes, more than one (its header announces 13)",
            ),
            (
                "a header over --max-frame-bytes",
                Message::Binary(over.into()),
                Code::FrameTooLarge,
                "frame body of 5000 bytes exceeds the limit of 1024 bytes",
            ),
            (
                "a message over the WebSocket limit",
                Message::Binary(huge.into()),
                Code::FrameTooLarge,
                "a WebSocket message of 4109 bytes is over the limit of 1037",
            ),
        ];
        for (what, message, code, why) in cases {
            let mut ws = ws_connect(&server).await;
            ws.send_message(message).await;
            let detail = ws.expect_notice(code).await;
            assert!(detail.contains(why), "{what}: {detail}");
            ws.expect_closed().await;
        }
        let mut fine = ws_login(&server, 9).await;
        fine.send_confirmed(&text(9, 0, "still serving")).await;
    });
}

#[test]
fn only_allowed_origins_may_open_the_websocket() {
    rt::block_on(async {
        let server = web_server(|c| c.metrics_listen = Some("127.0.0.1:0".into())).await;
        let own = format!("http://{}", web(&server));
        // By default: the page's own origin, and clients that send no Origin.
        ws_connect_with(&server, Some(&own))
            .await
            .expect("own origin");
        ws_connect_with(&server, None).await.expect("no origin");
        match ws_connect_with(&server, Some("https://evil.example")).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
            Err(e) => panic!("expected 403, got {e}"),
            Ok(_) => panic!("a foreign origin was let in"),
        }
        let metrics = http_get(server.metrics.expect("metrics"), "/metrics").await;
        assert!(
            metrics.contains("chat_connections_refused_total{reason=\"origin_refused\"} 1\n"),
            "{metrics}"
        );

        let listed = web_server(|c| {
            c.web_origins.allowed = vec!["https://chat.example.com".into()];
        })
        .await;
        ws_connect_with(&listed, Some("https://chat.example.com"))
            .await
            .expect("listed origin");
        let own = format!("http://{}", web(&listed));
        match ws_connect_with(&listed, Some(&own)).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
            other => panic!("expected 403, got {:?}", other.err()),
        }
    });
}

#[test]
fn the_web_listener_serves_the_client_and_refuses_the_rest() {
    rt::block_on(async {
        let server = web_server(|_| {}).await;
        let addr = web(&server);
        let page = http_get(addr, "/").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("content-security-policy:"), "{page}");
        assert!(page.contains("<script src=\"app.js\""), "{page}");
        for (path, needle) in [
            ("/app.js", "text/javascript"),
            ("/app.css", "text/css"),
            ("/config.json", "{\"maxFrameBytes\":8388608,\"auth\":false}"),
        ] {
            let response = http_get(addr, path).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
            assert!(response.contains(needle), "{path}: {response}");
        }
        assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let plain = http_get(addr, "/ws").await;
        assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    });
}

#[test]
fn a_full_server_refuses_the_upgrade() {
    rt::block_on(async {
        let server = web_server(|c| {
            c.max_connections = 1;
            c.max_connections_per_ip = Some(0);
        })
        .await;
        let _only = login(&server, 1).await;
        match ws_connect_with(&server, None).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 503),
            other => panic!("expected 503, got {:?}", other.err()),
        }
    });
}

#[test]
fn wss_when_the_server_has_a_certificate() {
    rt::block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let made = rcgen::generate_simple_self_signed(names).expect("certificate");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let config = tls::server_config(&cert, &key).expect("server config");
        let server = web_server(|c| c.tls = Some(tls::ServerTls::new(config))).await;

        let client: Arc<_> = tls::client_config(Some(&cert)).unwrap();
        let tcp = within(TcpStream::connect(web(&server))).await.unwrap();
        let name = tls::server_name("localhost").unwrap();
        // Boxed: a TLS session and a WebSocket handshake in debug builds are more than a
        // test thread's stack holds.
        let session = within(Box::pin(tls::TlsConnector::from(client).connect(name, tcp)))
            .await
            .expect("TLS handshake");
        let url = format!("wss://localhost:{}/ws", web(&server).port());
        let (ws, _) = within(Box::pin(async_tungstenite::client_async(url, session)))
            .await
            .expect("upgrade over TLS");
        let mut ws = Ws { ws };
        ws.send(&ClientFrame::hello(1, b"")).await;
        ws.expect_notice(Code::Welcome).await;
        ws.send_confirmed(&text(1, 0, "encrypted")).await;
    });
}
