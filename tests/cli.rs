//! The binaries end to end: `chat-client` against `chat-server`, as a user runs them.

mod common;

use std::process::{Command, Stdio};

use chat::rt;
use common::*;

const CLIENT: &str = env!("CARGO_BIN_EXE_chat-client");
const SERVER: &str = env!("CARGO_BIN_EXE_chat-server");

fn client(server: &TestServer, args: &[&str], stdin: &str) -> std::process::Output {
    let addr = server.addr();
    let all: Vec<&str> = ["--server", &addr, "--timeout", "20"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    chat_client(&all, stdin)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn piped_lines_are_sent_and_echoed() {
    rt::block_on(async {
        let server = start().await;
        let out = client(&server, &["--id", "10000000"], "hello\n你好\n");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            stdout(&out),
            "[10000000] text: hello\n[10000000] text: 你好\n"
        );
    });
}

#[test]
fn one_client_sends_and_another_receives_later() {
    rt::block_on(async {
        let server = start().await;
        let sent = client(&server, &["--id", "1", "--to", "2"], "while you were out\n");
        assert!(sent.status.success(), "{sent:?}");
        let got = client(&server, &["--id", "2", "--receive", "1"], "");
        assert!(got.status.success(), "{got:?}");
        assert_eq!(stdout(&got), "[1] text: while you were out\n");
    });
}

#[test]
fn files_are_sent_as_one_frame_and_saved_by_the_receiver() {
    rt::block_on(async {
        let server = start().await;
        let dir = tempfile::tempdir().unwrap();
        let picture: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("cat.png");
        std::fs::write(&path, &picture).unwrap();
        let path = path.to_str().unwrap();
        let sent = client(
            &server,
            &[
                "--id", "1", "--to", "2", "--type", "picture", "--file", path,
            ],
            "",
        );
        assert!(sent.status.success(), "{sent:?}");
        assert_eq!(stdout(&sent), "[1] picture: 100000 bytes\n");
        let save = dir.path().join("inbox");
        std::fs::create_dir(&save).unwrap();
        let got = client(
            &server,
            &[
                "--id",
                "2",
                "--receive",
                "1",
                "--save-dir",
                save.to_str().unwrap(),
            ],
            "",
        );
        assert!(got.status.success(), "{got:?}");
        let saved = save.join("1-picture-1.bin");
        assert!(stdout(&got).contains("saved to"), "{}", stdout(&got));
        assert_eq!(std::fs::read(saved).unwrap(), picture);
    });
}

#[test]
fn probe_answers_when_the_server_is_up() {
    rt::block_on(async {
        let server = start().await;
        let out = client(&server, &["--probe"], "");
        assert!(out.status.success(), "{out:?}");
    });
}

#[test]
fn an_unreachable_server_is_one_line_and_a_failure() {
    // A port that was just free: bind, learn it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(CLIENT)
        .args(["--server", &format!("127.0.0.1:{port}"), "--id", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("chat-client: cannot connect"), "{err}");
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let out = Command::new(CLIENT)
        .args(["--id", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(CLIENT)
        .args(["--id", "1", "--type", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a data type"));
    let out = Command::new(SERVER)
        .args(["--max-frame-bytes", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// The real server on a fixed loopback port, so that a restarted one has the same address.
fn server_on(port: u16, dir: &std::path::Path) -> std::process::Child {
    Command::new(SERVER)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "warn",
        ])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("chat-server starts")
}

fn wait_until_serving(addr: &str) {
    let start = std::time::Instant::now();
    while !Command::new(CLIENT)
        .args(["--server", addr, "--probe", "--timeout", "1"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(start.elapsed() < WAIT, "server never answered at {addr}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_receiving_client_reconnects_when_its_server_dies() {
    use std::io::BufRead;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = server_on(port, dir.path());
    wait_until_serving(&addr);
    let mut receiver = Command::new(CLIENT)
        .args([
            "--server",
            &addr,
            "--id",
            "2",
            "--receive",
            "3",
            "--timeout",
            "20",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat-client runs");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let out = receiver.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let send = |body: &str| {
        let out = chat_client(&["--server", &addr, "--id", "1", "--to", "2"], body);
        assert!(out.status.success(), "{out:?}");
    };
    send("one\n");
    assert_eq!(
        lines.recv_timeout(WAIT).expect("first frame"),
        "[1] text: one"
    );
    // The server dies; another comes up on the same address and data.
    let _ = first.kill();
    let _ = first.wait();
    let mut second = server_on(port, dir.path());
    wait_until_serving(&addr);
    send("two\nthree\n");
    let status = receiver.wait().expect("chat-client exits");
    let _ = second.kill();
    let _ = second.wait();
    let mut err = String::new();
    use std::io::Read;
    let _ = receiver
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("reconnecting") && err.contains("reconnected"),
        "{err}"
    );
    // Everything it printed: the reading thread ends at its end of output.
    let rest: Vec<String> = lines.iter().collect();
    // "one" may come again if its ack was lost with the server: at least once.
    assert!(rest.iter().any(|l| l == "[1] text: two"), "{rest:?}");
}

#[test]
fn piped_mode_without_receive_does_not_reconnect() {
    // Nothing listens here: the exit code says so at once, as before.
    let out = chat_client(&["--server", "127.0.0.1:9", "--id", "1"], "hi\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
