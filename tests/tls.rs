//! TLS: echo and forwarding over rustls with a certificate made at test time.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use async_std::net::TcpStream;
use futures::{AsyncReadExt, AsyncWriteExt};

use chat::client::Client;
use chat::rt;
use chat::tls;
use common::*;

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM files.
fn certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names).expect("certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

async fn tls_server(cert: &std::path::Path, key: &std::path::Path) -> TestServer {
    let config = tls::server_config(cert, key).expect("server config");
    start_with(|c| c.tls = Some(tls::ServerTls::new(config))).await
}

async fn tls_login(server: &TestServer, ca: &std::path::Path, id: u32) -> Client {
    let config: Arc<_> = tls::client_config(Some(ca)).unwrap();
    let name = tls::server_name("localhost").unwrap();
    let mut c = within(Client::connect_tls(&server.addr(), name, config))
        .await
        .expect("TLS connect");
    within(c.hello(id, None)).await.expect("welcome");
    c
}

#[test]
fn echo_and_forwarding_over_tls() {
    rt::block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let server = tls_server(&cert, &key).await;
        let mut a = tls_login(&server, &cert, 1).await;
        let mut b = tls_login(&server, &cert, 2).await;
        send_confirmed(&mut a, &text(1, 0, "encrypted echo")).await;
        let m = data(1, 2, 2, &vec![9u8; 200_000]);
        send_confirmed(&mut a, &m).await;
        assert_eq!(recv(&mut b).await, delivered(&m));
    });
}

#[test]
fn a_plain_client_against_the_tls_port_fails_cleanly() {
    rt::block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let server = tls_server(&cert, &key).await;
        let mut plain = within(TcpStream::connect(server.addr)).await.unwrap();
        plain
            .write_all(b"\x00\x98\x96\x80\x00\x98\x96\x81\x01\x00\x00\x00\x05hello")
            .await
            .unwrap();
        let mut reply = Vec::new();
        let _ = within(plain.read_to_end(&mut reply)).await;
        assert!(
            !reply.windows(5).any(|w| w == b"hello"),
            "plain text echoed"
        );
        // The server is still up for TLS clients.
        let mut c = tls_login(&server, &cert, 3).await;
        send_confirmed(&mut c, &text(3, 0, "still serving")).await;
    });
}

#[test]
fn a_certificate_not_trusted_is_refused_by_the_client() {
    rt::block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let server = tls_server(&cert, &key).await;
        let other = tempfile::tempdir().unwrap();
        let (untrusted, _) = certificate(other.path());
        let config = tls::client_config(Some(&untrusted)).unwrap();
        let name = tls::server_name("localhost").unwrap();
        let refused = within(Client::connect_tls(&server.addr(), name, config))
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("invalid peer certificate")),
            "{refused:?}"
        );
    });
}

#[test]
fn chat_client_speaks_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start(
        &data,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let ca = cert.to_str().unwrap();
    let out = chat_client(
        &["--server", &server.addr, "--id", "4", "--tls", "--ca", ca],
        "over tls\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[4] text: over tls\n");
}

/// A TLS client that reads nothing, with 19 MB queued for it: a graceful stop flushes
/// for at most 2 s and then cuts it, even where the last bytes wait in the TLS layer's
/// buffer rather than in a write (before, the flush waited for the client for ever and
/// the stop for its 4 s limit). The client has acks on: everything comes again, in
/// order, from its mailbox. (With acks off, a TLS stream cut in the middle of a record
/// can cost the client what its TLS layer had not yet handed over: docs/PROTOCOL.md.)
#[test]
fn a_tls_client_that_reads_nothing_does_not_hold_up_a_graceful_stop() {
    rt::block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let config = tls::server_config(&cert, &key).expect("server config");
        let server = start_with(|c| {
            c.tls = Some(tls::ServerTls::new(config));
            c.max_pending_bytes = 64 << 20;
        })
        .await;
        let ca: Arc<_> = tls::client_config(Some(&cert)).unwrap();
        let name = tls::server_name("localhost").unwrap();
        let mut silent = within(Client::connect_tls(&server.addr(), name, ca))
            .await
            .expect("TLS connect");
        assert!(within(silent.hello_acks(2, None)).await.expect("welcome"));
        let mut sender = tls_login(&server, &cert, 1).await;
        let sent: Vec<_> = (0..600u32)
            .map(|i| data(1, 2, 2, &[&i.to_be_bytes()[..], &[3u8; 32 * 1024]].concat()))
            .collect();
        for f in &sent {
            within(sender.send(f)).await.unwrap();
        }
        for f in &sent {
            assert_eq!(recv(&mut sender).await, delivered(f));
        }
        let started = std::time::Instant::now();
        let data = server.stop_keeping_data().await;
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_millis(3500),
            "stop took {took:?}"
        );
        // Its connection was cut, not left open.
        while let Ok(Some(_)) = within(silent.recv()).await {}
        let server = start_in(data, |_| {}).await;
        let (_c, got) = mailbox_of(&server.addr(), 2, sent.len()).await;
        assert_frames(&got, &sent.iter().map(delivered).collect::<Vec<_>>());
    });
}
