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

/// A port that was just free: bind, learn it, release it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn an_unreachable_server_is_one_line_and_a_failure() {
    let server = format!("127.0.0.1:{}", free_port());
    let out = chat_client(&["--server", &server, "--id", "1"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("chat-client: cannot connect"), "{err}");
}

/// Each bad flag is refused by name, with exit code 2, before anything is connected
/// to: the server named is unreachable, so a flag taken for good would fail with
/// `cannot connect` and exit code 1 instead.
#[test]
fn bad_arguments_are_refused_clearly() {
    let unreachable = format!("127.0.0.1:{}", free_port());
    let refused = |program: &str, args: &[&str], says: &[&str]| {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let out = output_within(&mut cmd, b"", WAIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("cannot connect"), "{args:?}: {err}");
        for word in says {
            assert!(err.contains(word), "{args:?} should say {word:?}: {err}");
        }
    };
    let client = |extra: &[&str], says: &[&str]| {
        let mut args = vec!["--server", unreachable.as_str()];
        args.extend_from_slice(extra);
        refused(CLIENT, &args, says)
    };
    client(&["--id", "0"], &["--id", "0 is the server's id"]);
    client(&["--id", "one"], &["--id", "not an id"]);
    client(
        &["--id", "1", "--type", "0"],
        &["--type", "not a data type"],
    );
    client(&["--id", "1", "--bogus"], &["--bogus"]);
    client(&["--id", "1", "--ca", "x.pem"], &["--tls"]);
    let server = |extra: &[&str], says: &[&str]| {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        refused(SERVER, &args, says)
    };
    server(
        &["--max-frame-bytes", "lots"],
        &["--max-frame-bytes", "lots"],
    );
    server(&["--bogus"], &["--bogus"]);
}

/// One client frame, whole, as the stand-in servers below read it.
fn read_frame(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut frame = vec![0; 13];
    s.read_exact(&mut frame).expect("a header");
    let len = u32::from_be_bytes([frame[9], frame[10], frame[11], frame[12]]) as usize;
    let mut body = vec![0; len];
    s.read_exact(&mut body).expect("a body");
    frame.extend(body);
    frame
}

/// A stand-in server on the test's own socket that drops the client's connection
/// after reading a data frame without echoing it: chat-client must reconnect, bind
/// again with acks, and send exactly that frame again.
#[test]
fn a_frame_not_echoed_before_the_connection_dropped_is_sent_again() {
    use chat::protocol::{ClientFrame, Code, ServerFrame, notice};
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("address").to_string();
    let welcome = notice(Code::Welcome, "bound to id 1").to_vec();
    let hello = ClientFrame::hello_acks(1, b"").to_bytes();
    let sent = text(1, 2, "resend me").to_bytes();
    let stand_in = std::thread::spawn(move || {
        let timeout = Some(WAIT);
        let mut frames_seen = Vec::new();
        for attempt in 0..2 {
            let (mut s, _) = listener.accept().expect("a connection");
            s.set_read_timeout(timeout).expect("timeout");
            assert_eq!(
                read_frame(&mut s),
                hello,
                "connection {attempt} binds with acks"
            );
            s.write_all(&welcome).expect("welcome");
            let frame = read_frame(&mut s);
            frames_seen.push(frame.clone());
            if attempt == 0 {
                continue; // dropped without an echo
            }
            // Echo it, then one frame from 2 for --receive 1.
            let echo = ServerFrame {
                sender: 1,
                kind: chat::protocol::TEXT,
                body: b"resend me".to_vec().into(),
            };
            let back = ServerFrame {
                sender: 2,
                kind: chat::protocol::TEXT,
                body: b"got it".to_vec().into(),
            };
            s.write_all(&[echo.to_bytes(), back.to_bytes()].concat())
                .expect("answers");
            // Its ack of the frame from 2, then its close.
            assert_eq!(read_frame(&mut s), ClientFrame::ack(1, 1).to_bytes());
        }
        frames_seen
    });
    let out = chat_client(
        &[
            "--server",
            &addr,
            "--id",
            "1",
            "--to",
            "2",
            "--receive",
            "1",
            "--timeout",
            "20",
        ],
        "resend me\n",
    );
    let frames_seen = stand_in.join().expect("the stand-in server");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(frames_seen, vec![sent.clone(), sent]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reconnecting") && err.contains("reconnected"),
        "{err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[1] text: resend me\n[2] text: got it\n"
    );
}

/// A child process killed when dropped, so a failing test leaves none behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real server on a fixed loopback port, so that a restarted one has the same address.
fn server_on(port: u16, dir: &std::path::Path) -> Killed {
    Killed(
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
            .expect("chat-server starts"),
    )
}

fn wait_until_serving(addr: &str) {
    let start = std::time::Instant::now();
    while !output_within(
        Command::new(CLIENT).args(["--server", addr, "--probe", "--timeout", "1"]),
        b"",
        WAIT,
    )
    .status
    .success()
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
    let first = server_on(port, dir.path());
    wait_until_serving(&addr);
    let mut receiver = Killed(
        Command::new(CLIENT)
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
            .expect("chat-client runs"),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let out = receiver.0.stdout.take().expect("stdout");
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
    drop(first);
    let second = server_on(port, dir.path());
    wait_until_serving(&addr);
    send("two\nthree\n");
    let status = wait_within(&mut receiver.0, WAIT);
    drop(second);
    let mut err = String::new();
    use std::io::Read;
    let _ = receiver
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("reconnecting") && err.contains("reconnected"),
        "{err}"
    );
    // Everything it printed after "one": the reading thread ends at its end of output.
    // The frames sent while it was away, in order; or, if the ack of "one" died with
    // the server (at least once), "one" again first, and then --receive 3 is reached
    // at "two".
    let rest: Vec<String> = lines.iter().collect();
    let redelivered = ["[1] text: one", "[1] text: two"];
    assert!(
        rest == ["[1] text: two", "[1] text: three"] || rest == redelivered,
        "{rest:?} {err}"
    );
}

/// Piped mode without --receive: a connection dropped before the echo is not made
/// again; the exit code says the line was not confirmed. (A stand-in server drops it.)
#[test]
fn piped_mode_without_receive_does_not_reconnect() {
    use chat::protocol::{ClientFrame, Code, notice};
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("address").to_string();
    let stand_in = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("a connection");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        assert_eq!(
            read_frame(&mut s),
            ClientFrame::hello_acks(1, b"").to_bytes()
        );
        s.write_all(&notice(Code::Welcome, "bound to id 1"))
            .expect("welcome");
        assert_eq!(read_frame(&mut s), text(1, 2, "hi").to_bytes());
        drop(s);
        listener
    });
    let out = chat_client(&["--server", &addr, "--id", "1", "--to", "2"], "hi\n");
    let listener = stand_in.join().expect("the stand-in server");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("reconnecting"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // It never came back.
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "it connected again");
}

#[test]
fn probe_fails_when_nothing_answers() {
    let server = format!("127.0.0.1:{}", free_port());
    let out = chat_client(&["--server", &server, "--probe", "--timeout", "2"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `--device`: two devices of one id each get a frame for it, the second also gets a
/// copy of what the first sent, and `history` prints the conversation oldest first.
#[test]
fn devices_get_every_frame_and_history_prints_the_conversation() {
    rt::block_on(async {
        let server = start().await;
        // Both devices exist before the frames are sent (a new device gets what
        // arrives from its first session on).
        for device in ["laptop", "phone"] {
            let made = client(&server, &["--id", "2", "--device", device], "");
            assert!(made.status.success(), "{made:?}");
        }
        let sent = client(&server, &["--id", "1", "--to", "2"], "hello two\n");
        assert!(sent.status.success(), "{sent:?}");
        let answer = client(
            &server,
            &["--id", "2", "--device", "laptop", "--to", "1"],
            "hi one\n",
        );
        assert!(answer.status.success(), "{answer:?}");
        // The phone was away: the frame for 2 and the laptop's copy wait for it.
        let phone = client(
            &server,
            &["--id", "2", "--device", "phone", "--receive", "2"],
            "",
        );
        assert!(phone.status.success(), "{phone:?}");
        assert_eq!(
            stdout(&phone),
            "[1] text: hello two\n[you -> 1] text: hi one\n"
        );
        let history = client(&server, &["--id", "2", "history", "--with", "1"], "");
        assert!(history.status.success(), "{history:?}");
        assert_eq!(
            stdout(&history),
            "[1] text: hello two\n[you] text: hi one\n"
        );
        // A bad device name is one clear line and a failure.
        let bad = client(&server, &["--id", "2", "--device", ""], "");
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("device name"),
            "{bad:?}"
        );
    });
}
