//! Auth mode: every connection must open with a hello carrying HMAC-SHA256(secret, id).

mod common;

use std::process::Command;

use async_std::net::TcpStream;
use futures::{AsyncReadExt, AsyncWriteExt};

use chat::auth::{Auth, Keys, Secret};
use chat::client::Client;
use chat::protocol::{ClientFrame, Code};
use chat::rt;
use common::*;

fn secret() -> Secret {
    Secret::new("correct horse battery staple").unwrap()
}

async fn auth_server() -> TestServer {
    start_with(|c| c.auth = Some(Auth::new(Keys::from(secret()), false))).await
}

async fn login_with_token(server: &TestServer, id: u32) -> Client {
    let mut c = connect(server).await;
    let token = secret().token(id);
    within(c.hello(id, Some(&token))).await.expect("welcome");
    c
}

/// Sends `frames` in one write and expects an `auth-failed` notice and the close.
async fn refused(server: &TestServer, frames: &[ClientFrame]) {
    let mut c = connect(server).await;
    let bytes: Vec<u8> = frames.iter().flat_map(|f| f.to_bytes()).collect();
    c.sender.send_raw(&bytes).await.unwrap();
    expect_notice(&mut c, Code::AuthFailed).await;
    expect_closed(&mut c).await;
}

/// Proves nothing reached `id`: the first frame it gets is one sent now.
async fn nothing_reached(server: &TestServer, id: u32) {
    let mut receiver = connect(server).await;
    let early = within(receiver.hello(id, Some(&secret().token(id))))
        .await
        .unwrap();
    assert!(early.is_empty(), "{early:?}");
    let mut other = login_with_token(server, 77).await;
    let marker = text(77, id, "marker");
    send_confirmed(&mut other, &marker).await;
    assert_eq!(recv(&mut receiver).await, delivered(&marker));
}

#[test]
fn a_correct_token_is_admitted_and_delivered_to() {
    rt::block_on(async {
        let server = auth_server().await;
        let mut a = login_with_token(&server, 1).await;
        let mut b = login_with_token(&server, 2).await;
        let m = text(1, 2, "authenticated");
        send_confirmed(&mut a, &m).await;
        assert_eq!(recv(&mut b).await, delivered(&m));
    });
}

#[test]
fn a_wrong_token_is_refused_and_nothing_is_routed() {
    rt::block_on(async {
        let server = auth_server().await;
        let bad = ClientFrame::hello(
            1,
            b"0000000000000000000000000000000000000000000000000000000000000000",
        );
        refused(&server, &[bad, text(1, 2, "should not arrive")]).await;
        nothing_reached(&server, 2).await;
    });
}

#[test]
fn a_missing_hello_is_refused_and_nothing_is_routed() {
    rt::block_on(async {
        let server = auth_server().await;
        refused(&server, &[text(1, 2, "no hello")]).await;
        refused(
            &server,
            &[ClientFrame::hello(1, b""), text(1, 2, "empty token")],
        )
        .await;
        nothing_reached(&server, 2).await;
    });
}

#[test]
fn a_token_minted_for_another_id_is_refused() {
    rt::block_on(async {
        let server = auth_server().await;
        let stolen = secret().token(6);
        refused(
            &server,
            &[ClientFrame::hello(5, stolen.as_bytes()), text(5, 2, "as 5")],
        )
        .await;
        nothing_reached(&server, 2).await;
    });
}

#[test]
fn the_seed_client_is_refused_in_auth_mode() {
    rt::block_on(async {
        let server = auth_server().await;
        let mut s = within(TcpStream::connect(server.addr)).await.unwrap();
        s.write_all(b"\x00\x98\x96\x80\x00\x98\x96\x81\x01\x00\x00\x00\x05hello")
            .await
            .unwrap();
        let mut reply = Vec::new();
        within(s.read_to_end(&mut reply)).await.unwrap();
        assert_eq!(&reply[..5], &[0, 0, 0, 0, 0], "a notice, not an echo");
        assert!(String::from_utf8_lossy(&reply[9..]).starts_with("auth-failed: "));
    });
}

#[test]
fn the_binaries_mint_and_present_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "from a file\n").unwrap();
    let token = output_within(
        Command::new(env!("CARGO_BIN_EXE_chat-server")).args([
            "--auth-secret-file",
            secret_file.to_str().unwrap(),
            "token",
            "--id",
            "12",
        ]),
        b"",
        WAIT,
    );
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    assert_eq!(token, Secret::new("from a file").unwrap().token(12));

    let data = dir.path().join("data");
    let server = ServerProcess::start(
        &data,
        &["--auth-secret-file", secret_file.to_str().unwrap()],
    );
    let run = |token: &str| {
        chat_client(
            &["--server", &server.addr, "--id", "12", "--token", token],
            "signed in\n",
        )
    };
    let ok = run(&token);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "[12] text: signed in\n"
    );
    let bad = run(&"0".repeat(64));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("auth-failed"),
        "{bad:?}"
    );
    // The secret never reaches the logs.
    assert!(!server.logged("from a file"));
}

/// Started without auth on an address other than loopback, the server says once, at
/// start, that anyone who can reach it can claim any id, and names the flag that fixes
/// it; on loopback, or with auth, it says nothing of the kind. (The open server listens
/// on every interface for the moment it takes to start; nothing connects to it.)
#[test]
fn without_auth_on_a_public_address_the_server_warns_once_naming_the_flag() {
    let warning = "no auth: anyone who can reach";
    let dir = tempfile::tempdir().expect("temp dir");
    let open = ServerProcess::start_on(dir.path(), "0.0.0.0:0", &[]);
    assert_eq!(open.count_logged(warning), 1, "{:?}", open.logs);
    assert!(open.logged("--auth-secret-file"));
    drop(open);

    let dir = tempfile::tempdir().expect("temp dir");
    let loopback = ServerProcess::start(dir.path(), &[]);
    assert!(!loopback.logged(warning));
    drop(loopback);

    let dir = tempfile::tempdir().expect("temp dir");
    let with_auth = ServerProcess::start_on(
        dir.path(),
        "0.0.0.0:0",
        &["--auth-secret", "correct horse battery staple"],
    );
    assert!(!with_auth.logged(warning));
}
