//! Expiring tokens, rotating secrets and reloading on SIGHUP, against the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use chat::auth::{Keys, Secret};
use chat::client::Client;
use chat::rt;
use chat::tls;
use common::*;

fn mint(secret_file: &Path, id: u32, ttl: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-server"));
    cmd.arg("--auth-secret-file").arg(secret_file);
    cmd.args(["token", "--id", &id.to_string()]);
    if let Some(ttl) = ttl {
        cmd.args(["--ttl", ttl]);
    }
    let out = output_within(&mut cmd, b"", WAIT);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The hello's answer: `Ok` with a welcome, or the refusal's text.
async fn hello(addr: &str, id: u32, token: &str) -> Result<Client, String> {
    let mut c = within(Client::connect(addr)).await.unwrap();
    match within(c.hello(id, Some(token))).await {
        Ok(_) => Ok(c),
        Err(e) => Err(e.to_string()),
    }
}

fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

async fn tls_hello(addr: &str, ca: &Path, id: u32, token: &str) -> Result<Client, String> {
    let config: Arc<_> = tls::client_config(Some(ca)).unwrap();
    let name = tls::server_name("localhost").unwrap();
    let mut c = within(Client::connect_tls(addr, name, config))
        .await
        .map_err(|e| e.to_string())?;
    within(c.hello(id, Some(token)))
        .await
        .map(|_| c)
        .map_err(|e| e.to_string())
}

/// Waits until the server has logged `needle` `n` times.
fn wait_logged(server: &ServerProcess, needle: &str, n: usize) {
    let start = std::time::Instant::now();
    while server.count_logged(needle) < n {
        assert!(start.elapsed() < WAIT, "never logged {needle:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_token_with_a_ttl_works_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let kept_token = mint(&secret, 5, Some("2s"));
    let token = mint(&secret, 9, Some("2s"));
    assert!(token.contains('.'), "an expiring token: {token}");
    let server = ServerProcess::start(
        dir.path(),
        &["--auth-secret-file", secret.to_str().unwrap()],
    );
    rt::block_on(async {
        let mut c = hello(&server.addr, 5, &kept_token)
            .await
            .expect("welcome before expiry");
        // Waiting for the expiry is the behaviour under test: poll until it is refused.
        let refusal = within(async {
            loop {
                if let Err(e) = hello(&server.addr, 9, &token).await {
                    return e;
                }
                rt::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            refusal.contains("auth-failed") && refusal.contains("expired"),
            "{refusal}"
        );
        // The connection authenticated before the expiry stays (documented).
        send_confirmed(&mut c, &text(5, 0, "still here")).await;
    });
}

#[test]
fn plain_tokens_are_refused_with_auth_require_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--auth-secret-file",
            secret.to_str().unwrap(),
            "--auth-require-expiry",
        ],
    );
    rt::block_on(async {
        let refusal = hello(&server.addr, 5, &mint(&secret, 5, None))
            .await
            .err()
            .unwrap();
        assert!(refusal.contains("has no expiry"), "{refusal}");
        hello(&server.addr, 5, &mint(&secret, 5, Some("1h")))
            .await
            .expect("welcome");
    });
}

#[test]
fn two_secrets_verify_and_the_first_mints() {
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("both");
    std::fs::write(&both, "new secret\nold secret\n").unwrap();
    let minted = mint(&both, 7, None);
    assert_eq!(minted, Secret::new("new secret").unwrap().token(7));
    let server = ServerProcess::start(dir.path(), &["--auth-secret-file", both.to_str().unwrap()]);
    rt::block_on(async {
        hello(&server.addr, 7, &minted)
            .await
            .expect("the new secret's token");
        let old = Keys::parse(b"old secret")
            .unwrap()
            .mint(7, Some(std::time::Duration::from_secs(60)));
        hello(&server.addr, 7, &old)
            .await
            .expect("the old secret's token");
        let other = Secret::new("unknown").unwrap().token(7);
        let refused = hello(&server.addr, 7, &other).await.err();
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("auth-failed: no valid token for id 7")),
            "{refused:?}"
        );
    });
}

/// SIGHUP picks up a changed secret file and a new certificate; a connection made
/// before keeps working; a broken file on a later reload keeps the old settings.
#[test]
fn sighup_reloads_secrets_and_certificate_and_keeps_connections() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "first\n").unwrap();
    let (cert1, key1) = certificate(dir.path(), "one");
    let (cert2, key2) = certificate(dir.path(), "two");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--auth-secret-file",
            secret.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let first = Secret::new("first").unwrap().token(3);
    rt::block_on(async {
        let mut kept = tls_hello(&server.addr, &cert1, 3, &first)
            .await
            .expect("before reload");

        // Rotate: the new secret only, and the second certificate.
        std::fs::write(&secret, "second\n").unwrap();
        std::fs::copy(&cert2, &cert).unwrap();
        std::fs::copy(&key2, &key).unwrap();
        server.signal(libc::SIGHUP);
        wait_logged(
            &server,
            "SIGHUP: reloaded 1 auth secrets and the TLS certificate",
            1,
        );

        tls_hello(
            &server.addr,
            &cert2,
            4,
            &Secret::new("second").unwrap().token(4),
        )
        .await
        .expect("new certificate and secret");
        let old_cert = tls_hello(
            &server.addr,
            &cert1,
            4,
            &Secret::new("second").unwrap().token(4),
        )
        .await;
        assert!(
            old_cert
                .as_ref()
                .is_err_and(|e| e.contains("invalid peer certificate")),
            "the old certificate is no longer served: {:?}",
            old_cert.map(|_| ())
        );
        let old_secret = tls_hello(
            &server.addr,
            &cert2,
            5,
            &Secret::new("first").unwrap().token(5),
        )
        .await;
        assert!(old_secret.is_err_and(|e| e.contains("auth-failed")));
        send_confirmed(&mut kept, &text(3, 0, "kept across the reload")).await;

        // A broken reload keeps what works.
        std::fs::write(&secret, "\n").unwrap();
        std::fs::write(&cert, "not a certificate").unwrap();
        server.signal(libc::SIGHUP);
        wait_logged(&server, "SIGHUP: nothing reloaded", 1);
        assert!(server.logged("keeping the old auth secrets"));
        assert!(server.logged("keeping the old TLS certificate"));
        tls_hello(
            &server.addr,
            &cert2,
            6,
            &Secret::new("second").unwrap().token(6),
        )
        .await
        .expect("old settings kept");
        send_confirmed(&mut kept, &text(3, 0, "and after the failed one")).await;

        // Another broken reload: the secret file gone, a key that is not the
        // certificate's. Nothing changes either.
        std::fs::remove_file(&secret).unwrap();
        std::fs::copy(&cert2, &cert).unwrap();
        std::fs::copy(&key1, &key).unwrap();
        server.signal(libc::SIGHUP);
        wait_logged(&server, "SIGHUP: nothing reloaded", 2);
        assert_eq!(server.count_logged("keeping the old auth secrets"), 2);
        assert_eq!(server.count_logged("keeping the old TLS certificate"), 2);
        tls_hello(
            &server.addr,
            &cert2,
            7,
            &Secret::new("second").unwrap().token(7),
        )
        .await
        .expect("old settings kept");
    });
}

/// Rotation as the README tells it: the new secret on line 1 above the old one and a
/// SIGHUP; new tokens come from the new secret and old ones still work; then the old
/// line removed and another SIGHUP, and old tokens stop working.
#[test]
fn rotating_the_secret_as_the_readme_says_logs_nobody_out() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "old secret\n").unwrap();
    let old = mint(&secret, 8, None);
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &["--auth-secret-file", secret.to_str().unwrap()],
    );
    rt::block_on(async {
        let mut before = hello(&server.addr, 8, &old).await.expect("old token");
        std::fs::write(&secret, "new secret\nold secret\n").unwrap();
        server.signal(libc::SIGHUP);
        wait_logged(&server, "SIGHUP: reloaded 2 auth secrets", 1);
        let new = mint(&secret, 8, None);
        assert_eq!(new, Secret::new("new secret").unwrap().token(8));
        hello(&server.addr, 8, &new).await.expect("new token");
        hello(&server.addr, 8, &old)
            .await
            .expect("old token still accepted");
        // A connection from before the rotation was never touched... until replaced
        // by the binds above.
        expect_notice(&mut before, chat::protocol::Code::Replaced).await;

        std::fs::write(&secret, "new secret\n").unwrap();
        server.signal(libc::SIGHUP);
        wait_logged(&server, "SIGHUP: reloaded 1 auth secrets", 1);
        let refused = hello(&server.addr, 8, &old).await.err();
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("auth-failed: no valid token for id 8")),
            "{refused:?}"
        );
        hello(&server.addr, 8, &new).await.expect("new token");
    });
}
