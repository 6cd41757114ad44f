//! Shared test helpers: an in-process server on an ephemeral port, clients, and waits
//! that are bounded by a timeout instead of sleeps.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures::channel::oneshot;

use chat::client::Client;
use chat::node::Server;
use chat::protocol::{ClientFrame, Code, ServerFrame, TEXT};
use chat::rt;
use chat::server::Config;

pub mod nats;
pub mod sessions;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub addr: SocketAddr,
    /// Where metrics are served, when the config asked for them.
    pub metrics: Option<SocketAddr>,
    /// Where the web client and WebSocket are served, when the config asked for them.
    pub web: Option<SocketAddr>,
    /// Where the admin API is served, when the config asked for it.
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<rt::JoinHandle<()>>,
}

impl TestServer {
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Waits for the server to stop by itself (a drain), without asking it to, and
    /// gives back its data dir; fails the test after [`WAIT`].
    pub async fn stopped_by_itself(mut self) -> tempfile::TempDir {
        if let Some(done) = self.done.take() {
            within(done).await;
        }
        let empty = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, empty)
    }

    /// Stops the server gracefully, waits for it, and gives back its data dir for a
    /// server started after it ([`start_in`]).
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            within(done).await;
        }
        let empty = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, empty)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a server with default limits on 127.0.0.1:0 and a fresh data dir.
pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().expect("temp dir");
    start_in(dir, configure).await
}

pub async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::new("127.0.0.1:0", dir.path());
    configure(&mut config);
    let server = Server::bind(config).await.expect("server binds");
    let addr = server.local_addr();
    let metrics = server.metrics_addr();
    let web = server.web_addr();
    let admin = server.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = rt::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        metrics,
        web,
        admin,
        dir,
        stop: Some(stop),
        done: Some(done),
    }
}

/// Fails the test if `f` takes longer than [`WAIT`].
pub async fn within<F: Future>(f: F) -> F::Output {
    rt::timeout(WAIT, f).await.expect("timed out waiting")
}

pub async fn connect(server: &TestServer) -> Client {
    within(Client::connect(&server.addr()))
        .await
        .expect("connects")
}

/// A client bound to `id` with a hello.
pub async fn login(server: &TestServer, id: u32) -> Client {
    let mut c = connect(server).await;
    let early = within(c.hello(id, None)).await.expect("welcome");
    assert!(
        early.is_empty(),
        "unexpected frames before welcome: {early:?}"
    );
    c
}

pub async fn recv(c: &mut Client) -> ServerFrame {
    within(c.recv())
        .await
        .expect("read ok")
        .expect("a frame, not end of stream")
}

/// Waits for the next frame and checks it is a notice with `code`.
pub async fn expect_notice(c: &mut Client, code: Code) -> String {
    let f = recv(c).await;
    let n = f
        .notice()
        .unwrap_or_else(|| panic!("expected {code} notice, got {f:?}"));
    assert!(n.is(code), "expected {code} notice, got {n}");
    n.detail
}

/// Waits until the server closes the connection, skipping frames before that.
pub async fn expect_closed(c: &mut Client) {
    within(async {
        loop {
            match c.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await
}

pub fn text(sender: u32, receiver: u32, body: &str) -> ClientFrame {
    data(sender, receiver, TEXT, body.as_bytes())
}

pub fn data(sender: u32, receiver: u32, kind: u8, body: &[u8]) -> ClientFrame {
    ClientFrame {
        sender,
        receiver,
        kind,
        body: body.to_vec().into(),
    }
}

/// The frame the server sends for `f`: its echo, and its forward.
pub fn delivered(f: &ClientFrame) -> ServerFrame {
    ServerFrame {
        sender: f.sender,
        kind: f.kind,
        body: f.body.clone(),
    }
}

/// Sends and waits for the echo, which must be exactly the frame sent.
pub async fn send_confirmed(c: &mut Client, f: &ClientFrame) {
    within(c.send(f)).await.expect("send");
    assert_eq!(recv(c).await, delivered(f));
}

/// The real `chat-server` binary, on an ephemeral port.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: String,
    /// Every line the server has logged so far.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts the binary and waits until it logs the address it listens on.
    pub fn start(data_dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
        Self::spawn(Self::command(data_dir, extra), WAIT)
    }

    /// Like `start`, for servers that may take longer than [`WAIT`] to listen (a node
    /// joining a NATS cluster that is still electing its leaders).
    pub fn start_within(
        data_dir: &std::path::Path,
        extra: &[&str],
        wait: Duration,
    ) -> ServerProcess {
        Self::spawn(Self::command(data_dir, extra), wait)
    }

    /// Like `start`, with the open-files limit set to `soft` and `hard`.
    pub fn start_limited(
        data_dir: &std::path::Path,
        extra: &[&str],
        soft: u64,
        hard: u64,
    ) -> ServerProcess {
        use std::os::unix::process::CommandExt;
        let mut cmd = Self::command(data_dir, extra);
        // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::spawn(cmd, WAIT)
    }

    /// Like `start`, listening on `listen` instead of 127.0.0.1:0.
    pub fn start_on(data_dir: &std::path::Path, listen: &str, extra: &[&str]) -> ServerProcess {
        let mut cmd = Self::command_on(data_dir, listen);
        cmd.args(extra);
        Self::spawn(cmd, WAIT)
    }

    fn command(data_dir: &std::path::Path, extra: &[&str]) -> std::process::Command {
        let mut cmd = Self::command_on(data_dir, "127.0.0.1:0");
        cmd.args(extra);
        cmd
    }

    fn command_on(data_dir: &std::path::Path, listen: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"));
        cmd.args(["--listen", listen, "--log-level", "info", "--data-dir"])
            .arg(data_dir)
            .stdout(std::process::Stdio::piped());
        cmd
    }

    fn spawn(mut cmd: std::process::Command, wait: Duration) -> ServerProcess {
        use std::io::BufRead;
        let mut child = cmd.spawn().expect("chat-server starts");
        // femme logs to stdout.
        let logs = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = kept.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(logs).lines() {
                let Ok(line) = line else { break };
                keep.lock().unwrap().push(line.clone());
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let mut server = ServerProcess {
            child,
            addr: String::new(),
            logs: kept,
        };
        server.addr = rx.recv_timeout(wait).expect("server logged its address");
        server
    }

    /// The admin listener's address, as the server logged it at start.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter()
            .find(|l| l.contains("admin API on http://"))
            .and_then(|line| line.split("http://").nth(1))
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("the admin address is logged before the chat one")
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.count_logged(needle) > 0
    }

    /// How many lines logged so far contain `needle`.
    pub fn count_logged(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit, failing the test after [`WAIT`].
    pub fn wait(&mut self) -> std::process::ExitStatus {
        wait_within(&mut self.child, WAIT)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's open-files limit, the hard one to 65536 where it may (root
/// with CAP_SYS_RESOURCE), then the soft one to the hard one; returns the limit.
pub fn raise_own_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let wider = libc::rlimit {
            rlim_cur: limit.rlim_max.max(65536),
            rlim_max: limit.rlim_max.max(65536),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wider) == 0 {
            return wider.rlim_cur;
        }
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// A client bound to `id` at `addr` by a hello (no frames may be waiting for it).
pub async fn login_at(addr: &str, id: u32) -> Client {
    let mut c = within(Client::connect(addr)).await.expect("connects");
    let early = within(c.hello(id, None)).await.expect("welcome");
    assert!(early.is_empty(), "unexpected frames: {early:?}");
    c
}

/// A client bound to `id` with acks on (control operation 3).
pub async fn login_acks(addr: &str, id: u32) -> Client {
    let mut c = within(Client::connect(addr)).await.expect("connects");
    let on = within(c.hello_acks(id, None)).await.expect("welcome");
    assert!(on, "server refused acks");
    c
}

/// A plain HTTP/1.1 GET (the test's own client): the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_call(addr, "GET", path, &[], "").await;
    (status, body)
}

/// One HTTP/1.1 request with `headers` and `body` (the test's own client): the status
/// code, the head and the body of the answer.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let mut s = within(async_std::net::TcpStream::connect(addr))
        .await
        .expect("connects");
    let headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    within(s.write_all(request.as_bytes()))
        .await
        .expect("writes");
    let mut response = Vec::new();
    within(s.read_to_end(&mut response)).await.expect("reads");
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head.to_string(), body.to_string())
}

/// Everything the server sends on `s` until it closes (a reset counts as a close).
pub async fn until_closed(s: &mut async_std::net::TcpStream) -> Vec<u8> {
    use futures::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within(s.read(&mut buf)).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Runs the real `chat-client` with `args`, feeding it `stdin`; fails the test if it
/// has not exited within [`WAIT`].
pub fn chat_client(args: &[&str], stdin: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chat-client"));
    cmd.args(args);
    output_within(&mut cmd, stdin.as_bytes(), WAIT)
}

/// Starts the real `chat-client` receiving `n` frames for `id` (reconnecting, within
/// 20 s), with its stdout and stderr as given.
pub fn receiving_client(
    addr: &str,
    id: u32,
    n: usize,
    stdout: std::process::Stdio,
    stderr: std::process::Stdio,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_chat-client"))
        .args(["--server", addr, "--id", &id.to_string()])
        .args(["--receive", &n.to_string(), "--timeout", "20"])
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("chat-client starts")
}

/// Runs `cmd` to its end with `stdin` fed to it and its stdout and stderr captured,
/// like `Command::output`, but with a wall-clock limit: a child still running after
/// `limit` is killed and the test fails, saying what it printed so far.
pub fn output_within(
    cmd: &mut std::process::Command,
    stdin: &[u8],
    limit: Duration,
) -> std::process::Output {
    try_output_within(cmd, stdin, limit).unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"))
}

/// [`output_within`] for a program that may not be installed: `Err` if it cannot start.
pub fn try_output_within(
    cmd: &mut std::process::Command,
    stdin: &[u8],
    limit: Duration,
) -> std::io::Result<std::process::Output> {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = from.read_to_end(&mut all);
            all
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    // A child that exits without reading its input must not block the test.
    std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = stdout.join().unwrap_or_default();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "{cmd:?} still ran after {limit:?}; killed. stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Whether a test that needs an outside program must run: `CHAT_REQUIRE_<what>` set
/// (to anything) makes a missing program a failure. Otherwise prints why it skips.
/// Returns when the test should skip.
pub fn skipping(variable: &str, why: &str) {
    assert!(
        std::env::var_os(variable).is_none(),
        "{why}, and {variable} is set"
    );
    println!("SKIP: {why} (set {variable} to make this a failure)");
}

/// Binds `id` with a hello and returns the first `n` frames the connection receives,
/// counting stored frames that arrive before the welcome.
pub async fn mailbox_of(addr: &str, id: u32, n: usize) -> (Client, Vec<ServerFrame>) {
    let mut c = within(Client::connect(addr)).await.expect("connects");
    let mut got = within(c.hello(id, None)).await.expect("welcome");
    while got.len() < n {
        got.push(recv(&mut c).await);
    }
    (c, got)
}

/// Waits for `child` to exit, killing it and failing the test after `limit`.
pub fn wait_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pid {} still ran after {limit:?}; killed", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `got == want`, or a failure that says where they part (not every body in full).
#[track_caller]
pub fn assert_frames(got: &[ServerFrame], want: &[ServerFrame]) {
    if got == want {
        return;
    }
    let at = got.iter().zip(want).position(|(g, w)| g != w);
    let short = |f: Option<&ServerFrame>| {
        f.map(|f| {
            let head = &f.body[..f.body.len().min(16)];
            format!(
                "from {} type {} {} bytes {head:?}..",
                f.sender,
                f.kind,
                f.body.len()
            )
        })
    };
    let at = at.unwrap_or(got.len().min(want.len()));
    panic!(
        "{} frames where {} were expected; first difference at {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        short(got.get(at)),
        short(want.get(at))
    );
}
