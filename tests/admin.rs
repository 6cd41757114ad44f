//! The admin API (`--admin-listen`, docs/ADMIN.md), over real HTTP against the real
//! server: every call with and without the token, bad input answered with a clear 4xx
//! and nothing changed, listing and paging connections, disconnecting, blocking.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use async_std::net::TcpStream;
use chat::client::Client;
use chat::protocol::Code;
use chat::protocol::session::Device;
use chat::rt;
use chat::server::config::{Admin, AdminToken, HttpLimits};
use futures::AsyncWriteExt;
use serde_json::Value;

use common::*;

const TOKEN: &str = "let-me-in-7f3a";

fn admin_config(c: &mut chat::server::Config) {
    c.admin = Some(Admin {
        listen: "127.0.0.1:0".into(),
        token: Arc::new(AdminToken::new(TOKEN).expect("a token")),
        limits: HttpLimits::ADMIN,
    });
}

async fn admin_server() -> TestServer {
    start_with(admin_config).await
}

/// One request: the status and the JSON answer.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let (status, head, body) = http_call(addr, method, path, &headers, body).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, json)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    call(addr, "GET", path, Some(TOKEN), "").await
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().expect("an error message")
}

/// Every path refuses a request without the token, or with a wrong one, with 401 and
/// a JSON error, and does nothing: a block asked for without the token blocks nobody.
#[test]
fn every_call_needs_the_token() {
    rt::block_on(async {
        let server = admin_server().await;
        let admin = server.admin.expect("admin");
        let calls = [
            ("GET", "/v1/info"),
            ("GET", "/v1/connections"),
            ("DELETE", "/v1/connections/1"),
            ("DELETE", "/v1/ids/5/connections"),
            ("GET", "/v1/ids/5/stored"),
            ("DELETE", "/v1/ids/5"),
            ("GET", "/v1/blocked"),
            ("PUT", "/v1/blocked/5"),
            ("DELETE", "/v1/blocked/5"),
            ("GET", "/nothing/here"),
        ];
        for (method, path) in calls {
            for token in [None, Some("wrong"), Some("let-me-in-7f3")] {
                let (status, body) = call(admin, method, path, token, "").await;
                assert_eq!(status, 401, "{method} {path} with {token:?}");
                assert!(error_of(&body).contains("Bearer"), "{body}");
            }
        }
        let (status, blocked) = get(admin, "/v1/blocked").await;
        assert_eq!(status, 200);
        assert_eq!(blocked["blocked"], serde_json::json!([]));
        let _c = login(&server, 5).await;
    });
}

/// `GET /v1/info`: version, uptime, connections and settings, and no secret.
#[test]
fn info_names_the_version_and_settings_without_secrets() {
    rt::block_on(async {
        let secret = "correct horse battery staple";
        let server = start_with(|c| {
            admin_config(c);
            c.auth = Some(chat::auth::Auth::new(
                chat::auth::Keys::from(chat::auth::Secret::new(secret).expect("secret")),
                false,
            ));
        })
        .await;
        let (status, info) = get(server.admin.expect("admin"), "/v1/info").await;
        assert_eq!(status, 200);
        assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(info["scope"], "this node");
        assert_eq!(info["config"]["auth"], true);
        assert_eq!(info["config"]["max_connections"], 10_000);
        assert_eq!(info["connections"], 0);
        let text = info.to_string();
        assert!(!text.contains("horse") && !text.contains(TOKEN), "{text}");
    });
}

/// Three connections (two of id 1, one a session as "phone") are listed in the order
/// they came, with id, device, transport, the client's own address and port; pages of
/// two follow `next`; bad parameters get 400.
#[test]
fn connections_are_listed_and_paged() {
    rt::block_on(async {
        let server = admin_server().await;
        let admin = server.admin.expect("admin");
        let a = login(&server, 1).await;
        let mut phone = within(Client::connect(&server.addr()))
            .await
            .expect("connects");
        let device = Device::new("phone").expect("a name");
        within(phone.session(2, &device, None))
            .await
            .expect("a session");
        let c = login(&server, 3).await;
        let (status, first) = get(admin, "/v1/connections?limit=2").await;
        assert_eq!(status, 200, "{first}");
        let listed = first["connections"].as_array().expect("a list");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0]["id"], 1);
        assert_eq!(listed[0]["transport"], "tcp");
        assert_eq!(listed[0]["device"], Value::Null);
        assert_eq!(listed[1]["id"], 2);
        assert_eq!(listed[1]["device"], "phone");
        let address = listed[0]["address"].as_str().expect("an address");
        assert!(address.starts_with("127.0.0.1:"), "{address}");
        assert!(listed[0]["connected_unix"].as_u64().expect("a time") > 1_700_000_000);
        let next = first["next"].as_u64().expect("more follow");
        let (_, second) = get(admin, &format!("/v1/connections?limit=2&after={next}")).await;
        let rest = second["connections"].as_array().expect("a list");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0]["id"], 3);
        assert_eq!(second["next"], Value::Null);
        for bad in ["limit=0", "limit=1001", "limit=x", "after=-1", "colour=red"] {
            let (status, body) = get(admin, &format!("/v1/connections?{bad}")).await;
            assert_eq!(status, 400, "{bad}: {body}");
        }
        drop((a, c));
    });
}

/// Disconnecting one connection, then every connection of an id: each is told
/// `disconnected` and closed; the others stay; unknown ones are 404, bad ones 400.
#[test]
fn operators_disconnect_a_connection_or_an_id() {
    rt::block_on(async {
        let server = admin_server().await;
        let admin = server.admin.expect("admin");
        let mut one = login(&server, 1).await;
        let mut keep = login(&server, 2).await;
        let (_, listed) = get(admin, "/v1/connections").await;
        let conn = listed["connections"][0]["conn"].as_u64().expect("a number");
        let (status, body) = call(
            admin,
            "DELETE",
            &format!("/v1/connections/{conn}"),
            Some(TOKEN),
            "",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["disconnected"], 1);
        let detail = expect_notice(&mut one, Code::Disconnected).await;
        assert!(detail.contains("operator"), "{detail}");
        expect_closed(&mut one).await;
        send_confirmed(&mut keep, &text(2, 2, "still here")).await;

        let (status, _) = call(admin, "DELETE", "/v1/connections/999999", Some(TOKEN), "").await;
        assert_eq!(status, 404);
        let (status, _) = call(admin, "DELETE", "/v1/connections/abc", Some(TOKEN), "").await;
        assert_eq!(status, 400);

        let mut again = login(&server, 2).await;
        let _ = expect_notice(&mut keep, Code::Replaced).await;
        let mut phone = within(Client::connect(&server.addr()))
            .await
            .expect("connects");
        within(phone.session(2, &Device::new("phone").expect("name"), None))
            .await
            .expect("a session");
        let (status, body) = call(admin, "DELETE", "/v1/ids/2/connections", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["disconnected"], 2);
        expect_notice(&mut again, Code::Disconnected).await;
        expect_closed(&mut again).await;
        let mut told = false;
        while let Ok(Some(f)) = within(phone.recv()).await {
            told |= f.notice().is_some_and(|n| n.is(Code::Disconnected));
        }
        assert!(told, "the session was told too");
        // A connection leaves the list once its tasks have ended, just after its
        // client sees the close.
        within(async {
            loop {
                let (_, listed) = get(admin, "/v1/connections").await;
                let ids: Vec<_> = listed["connections"]
                    .as_array()
                    .expect("a list")
                    .iter()
                    .map(|c| c["id"].clone())
                    .collect();
                if !ids.contains(&serde_json::json!(2)) {
                    return;
                }
                rt::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        let (status, _) = call(admin, "DELETE", "/v1/ids/2/connections", Some(TOKEN), "").await;
        assert_eq!(status, 404, "nothing left to disconnect");
        let (status, _) = call(admin, "DELETE", "/v1/ids/0/connections", Some(TOKEN), "").await;
        assert_eq!(status, 400);
    });
}

/// Blocking an id disconnects it with the reason, refuses its hellos and its first
/// frames (`auth-failed: id 7 is blocked`), survives a restart, and unblocking lets it
/// in again. Bad bodies get 400 and block nobody.
#[test]
fn a_blocked_id_is_refused_until_unblocked_even_across_a_restart() {
    rt::block_on(async {
        let server = start_with(|c| {
            admin_config(c);
            c.metrics_listen = Some("127.0.0.1:0".into());
        })
        .await;
        let admin = server.admin.expect("admin");
        for bad in ["{", "[1]", "{\"reason\": 5}", "{\"colour\": \"red\"}"] {
            let (status, body) = call(admin, "PUT", "/v1/blocked/7", Some(TOKEN), bad).await;
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(error_of(&body).starts_with("bad JSON"), "{body}");
        }
        let huge = format!("{{\"reason\": \"{}\"}}", "x".repeat(5000));
        let (status, _) = call(admin, "PUT", "/v1/blocked/7", Some(TOKEN), &huge).await;
        assert_eq!(status, 413);
        let (_, blocked) = get(admin, "/v1/blocked").await;
        assert_eq!(blocked["blocked"], serde_json::json!([]), "nothing changed");
        let (status, _) = call(admin, "PUT", "/v1/blocked/seven", Some(TOKEN), "").await;
        assert_eq!(status, 400);
        let (status, _) = call(admin, "POST", "/v1/blocked/7", Some(TOKEN), "").await;
        assert_eq!(status, 405);

        let mut seven = login(&server, 7).await;
        let (status, body) = call(
            admin,
            "PUT",
            "/v1/blocked/7",
            Some(TOKEN),
            "{\"reason\": \"spam\"}",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["disconnected"], 1);
        let detail = expect_notice(&mut seven, Code::Disconnected).await;
        assert_eq!(detail, "id 7 is blocked: spam");
        expect_closed(&mut seven).await;

        let refused = within(connect(&server).await.hello(7, None)).await;
        let refused = refused.expect_err("refused");
        assert!(refused.to_string().contains("id 7 is blocked"), "{refused}");
        // The seed's client binds with its first frame: refused too, nothing routed.
        let mut listener = login(&server, 8).await;
        let mut seed = connect(&server).await;
        within(seed.send(&text(7, 8, "let me in")))
            .await
            .expect("send");
        let detail = expect_notice(&mut seed, Code::AuthFailed).await;
        assert!(detail.contains("blocked"), "{detail}");
        send_confirmed(&mut listener, &text(8, 8, "nothing came before this")).await;
        let (_, metrics) = http_get(server.metrics.expect("metrics"), "/metrics").await;
        assert!(
            metrics.contains("chat_connections_refused_total{reason=\"blocked\"} 2\n"),
            "the hello and the seed's frame counted as blocked:\n{metrics}"
        );

        let dir = server.stop_keeping_data().await;
        let server = start_in(dir, admin_config).await;
        let admin = server.admin.expect("admin");
        let (_, blocked) = get(admin, "/v1/blocked").await;
        assert_eq!(
            blocked["blocked"],
            serde_json::json!([7]),
            "kept across a restart"
        );
        assert!(within(connect(&server).await.hello(7, None)).await.is_err());
        let (status, body) = call(admin, "DELETE", "/v1/blocked/7", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["changed"], true);
        let _seven = login(&server, 7).await;
    });
}

/// Unknown paths are 404 and wrong methods 405, each with a JSON error.
#[test]
fn bad_paths_and_methods_get_clear_errors() {
    rt::block_on(async {
        let server = admin_server().await;
        let admin = server.admin.expect("admin");
        for path in ["/", "/v1", "/v2/info", "/v1/ids", "/v1/connections/1/2"] {
            let (status, body) = get(admin, path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert!(error_of(&body).contains("no such path"), "{body}");
        }
        for (method, path) in [
            ("POST", "/v1/info"),
            ("PUT", "/v1/connections"),
            ("GET", "/v1/ids/5/connections"),
            ("GET", "/v1/ids/5"),
            ("DELETE", "/v1/ids/5/stored"),
        ] {
            let (status, _) = call(admin, method, path, Some(TOKEN), "").await;
            assert_eq!(status, 405, "{method} {path}");
        }
    });
}

/// The binary's flags: `--admin-listen` needs `--admin-token-file`, an empty token file
/// is a one-line error, and with both the API answers with the file's token.
#[test]
fn the_binary_takes_the_token_from_its_file_and_refuses_to_start_without_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"));
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(extra);
        output_within(&mut cmd, b"", WAIT)
    };
    let missing = server(&["--admin-listen", "127.0.0.1:0"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("--admin-token-file"),
        "{missing:?}"
    );
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("writes");
    let empty = empty.to_str().expect("a path");
    let refused = server(&["--admin-listen", "127.0.0.1:0", "--admin-token-file", empty]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");

    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("writes");
    let file = file.to_str().expect("a path");
    let running = ServerProcess::start(
        dir.path(),
        &["--admin-listen", "127.0.0.1:0", "--admin-token-file", file],
    );
    let addr = running.admin_addr();
    rt::block_on(async {
        let (status, info) = get(addr, "/v1/info").await;
        assert_eq!(status, 200, "{info}");
        let (status, _) = call(addr, "GET", "/v1/info", Some("nope"), "").await;
        assert_eq!(status, 401);
    });
}

/// Behind a proxy (`--proxy-protocol`), the list shows each client's own address, the
/// one its PROXY header names, not the proxy's.
#[test]
fn the_list_shows_the_address_a_proxy_header_names() {
    rt::block_on(async {
        let server = start_with(|c| {
            admin_config(c);
            c.proxy_protocol = true;
        })
        .await;
        let mut tcp = within(TcpStream::connect(server.addr))
            .await
            .expect("connects");
        let header = b"PROXY TCP4 198.51.100.7 127.0.0.1 40404 8888\r\n";
        within(tcp.write_all(header)).await.expect("writes");
        let mut c = Client::from_stream(tcp);
        within(c.hello(4, None)).await.expect("welcome");
        let (_, listed) = get(server.admin.expect("admin"), "/v1/connections").await;
        assert_eq!(listed["connections"][0]["address"], "198.51.100.7:40404");
        assert_eq!(listed["connections"][0]["id"], 4);
    });
}

/// What `GET /v1/ids/{id}/stored` says, as (mailbox, history, conversations, devices).
async fn stored(admin: SocketAddr, id: u32) -> (u64, u64, u64, u64) {
    let (status, body) = get(admin, &format!("/v1/ids/{id}/stored")).await;
    assert_eq!(status, 200, "{body}");
    let s = &body["stored"];
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("a number: {body}"));
    (
        n(&s["mailbox"]["messages"]),
        n(&s["history"]["messages"]),
        n(&s["conversations"]),
        n(&s["devices"]),
    )
}

/// Whether any file under `dir` holds `needle`.
fn any_file_holds(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).expect("a data dir").any(|entry| {
        let path = entry.expect("an entry").path();
        let bytes = std::fs::read(&path).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

/// `GET /v1/ids/{id}/stored` counts what is kept for an id; `DELETE /v1/ids/{id}`
/// disconnects every device of it and deletes its mailbox, devices, conversations and
/// their history (its peers' rows for them too), for good: the counts stay zero across
/// a restart and the data dir's files no longer hold its frames' bytes. A frame it
/// sent that waits for another id stays that id's mail.
#[test]
fn forgetting_an_id_deletes_everything_stored_for_it() {
    rt::block_on(async {
        let server = admin_server().await;
        let admin = server.admin.expect("admin");
        assert_eq!(stored(admin, 1).await, (0, 0, 0, 0));
        let mut two = login(&server, 2).await;
        let mut one = login(&server, 1).await;
        send_confirmed(&mut one, &text(1, 2, "secret-one-to-two")).await;
        assert_eq!(
            recv(&mut two).await,
            delivered(&text(1, 2, "secret-one-to-two"))
        );
        send_confirmed(&mut one, &text(1, 3, "kept-for-three")).await;
        drop(one);
        // While 1 is away (its connection may take a moment to end), 2's frame waits.
        let mut phone = connect(&server).await;
        within(phone.session(1, &Device::new("phone").expect("a name"), None))
            .await
            .expect("a session");
        send_confirmed(&mut two, &text(2, 1, "secret-two-to-one")).await;
        let (mailbox, history, conversations, devices) = stored(admin, 1).await;
        assert!(mailbox >= 1, "2's frame waits for 1's default device");
        assert!(history >= 3, "three frames in 1's conversations: {history}");
        assert_eq!(conversations, 2, "with 2 and with 3");
        assert_eq!(devices, 2, "the default device and the phone");

        let (status, body) = call(admin, "DELETE", "/v1/ids/1", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deleted"]["conversations"], 2);
        assert_eq!(body["deleted"]["devices"], 2);
        let mut told = false;
        while let Ok(Some(f)) = within(phone.recv()).await {
            told |= f
                .notice()
                .is_some_and(|n| n.is(Code::Disconnected) && n.detail.contains("deleted"));
        }
        assert!(told, "the phone was told why it was disconnected");
        assert_eq!(stored(admin, 1).await, (0, 0, 0, 0));
        // 2's side of the conversation went too; what 1 sent to 3 stays 3's.
        assert_eq!(stored(admin, 2).await.2, 0, "2 has no conversation left");
        let (_, three_mail) = mailbox_of(&server.addr(), 3, 1).await;
        assert_eq!(three_mail, [delivered(&text(1, 3, "kept-for-three"))]);
        let (status, _) = call(admin, "DELETE", "/v1/ids/0", Some(TOKEN), "").await;
        assert_eq!(status, 400);
        let (status, _) = call(admin, "DELETE", "/v1/ids/x", Some(TOKEN), "").await;
        assert_eq!(status, 400);
        send_confirmed(&mut two, &text(2, 4, "kept-for-four")).await;
        drop(two);

        // The rows are gone; their bytes may stay in the file's free pages until a
        // vacuum rewrites it with what it holds.
        let dir = server.stop_keeping_data().await;
        let done = chat::store::vacuum(dir.path()).expect("vacuums");
        assert!(done.after > 0, "{done:?}");
        for secret in ["secret-one-to-two", "secret-two-to-one"] {
            assert!(
                !any_file_holds(dir.path(), secret.as_bytes()),
                "{secret} is still in the data dir"
            );
        }
        let server = start_in(dir, admin_config).await;
        let admin = server.admin.expect("admin");
        assert_eq!(stored(admin, 1).await, (0, 0, 0, 0), "across a restart");
        let (_, four_mail) = mailbox_of(&server.addr(), 4, 1).await;
        assert_eq!(
            four_mail,
            [delivered(&text(2, 4, "kept-for-four"))],
            "the vacuum kept what was stored"
        );
        let (status, body) = call(admin, "DELETE", "/v1/ids/1", Some(TOKEN), "").await;
        assert_eq!(status, 200, "forgetting again is no error: {body}");
        assert_eq!(body["deleted"]["history"]["messages"], 0);
    });
}

/// `chat-server vacuum` rewrites a stopped node's file (one line on stdout), and
/// refuses, in one line and with exit 1, a file a running server holds or a data dir
/// without one.
#[test]
fn the_vacuum_command_refuses_a_file_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let vacuum = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"));
        cmd.args(["vacuum", "--data-dir"]).arg(dir.path());
        output_within(&mut cmd, b"", WAIT)
    };
    let none = vacuum();
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    let mut running = ServerProcess::start(dir.path(), &[]);
    let busy = vacuum();
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("stop the server first"), "{stderr}");
    running.signal(libc::SIGTERM);
    assert!(running.wait().success());

    let done = vacuum();
    assert!(done.status.success(), "{done:?}");
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(stdout.starts_with("vacuumed "), "{stdout}");
}

/// A receiving `chat-client` that an operator disconnects stops, saying why, rather
/// than connecting straight back.
#[test]
fn chat_client_stops_when_an_operator_disconnects_it() {
    use std::io::Read;
    rt::block_on(async {
        let server = admin_server().await;
        let admin = server.admin.expect("admin");
        let addr = server.addr();
        let mut receiver = receiving_client(
            &addr,
            9,
            5,
            std::process::Stdio::null(),
            std::process::Stdio::piped(),
        );
        within(async {
            loop {
                let (_, listed) = get(admin, "/v1/connections").await;
                if listed.to_string().contains("\"id\":9") {
                    return;
                }
                rt::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        let (status, body) = call(admin, "DELETE", "/v1/ids/9/connections", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{body}");
        let exit = wait_within(&mut receiver, WAIT);
        let mut stderr = String::new();
        let _ = receiver
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr);
        assert!(!exit.success(), "{stderr}");
        assert!(stderr.contains("disconnected"), "{stderr}");
        assert!(!stderr.contains("reconnected"), "{stderr}");
    });
}
