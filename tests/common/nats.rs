//! NATS servers for the tests that need a cluster (`tests/cluster.rs`, and the browser
//! test against two nodes): nats-server processes on loopback with JetStream, their
//! ports, and chat nodes joined to them. A test that uses them first asks
//! [`nats_available`], which says in one line that it skips without nats-server (and
//! fails under `CHAT_REQUIRE_NATS`).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ServerProcess, WAIT, skipping, try_output_within};

/// NATS servers on loopback, clustered when there are several, with JetStream.
pub struct Nats {
    pub servers: Vec<Option<Child>>,
    pub configs: Vec<std::path::PathBuf>,
    /// Each server's cluster (route) port.
    pub routes: Vec<u16>,
    /// The user each server runs as, where it is not this test's own.
    pub users: Vec<Option<u32>>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// A port for a NATS server. Not from `bind(0)`: that and every outgoing connection
/// take their ports from Linux's ephemeral range (32768-60999), so a port found free
/// there could be taken before the server bound it, or while it was down for a restart
/// (the server then never listened, and the test failed after its wait). These come
/// from below that range (20000-25999; chat-chaos takes 26000-31999), handed out in
/// turn under a lock file that the test processes of one user share (nextest runs each
/// test in a process of its own), and checked free.
pub fn free_port() -> u16 {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    const FIRST: u16 = 20_000;
    const LAST: u16 = 25_999;
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    let path = std::env::temp_dir().join(format!("chat-test-nats-ports-{uid}"));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("the port file");
    // SAFETY: flock(2) on a descriptor this function owns; released when it closes.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "cannot lock {}", path.display());
    let mut text = String::new();
    file.read_to_string(&mut text).expect("read the port file");
    let mut next = text.trim().parse().unwrap_or(FIRST).clamp(FIRST, LAST);
    let mut port = None;
    for _ in FIRST..=LAST {
        let p = next;
        next = if next >= LAST { FIRST } else { next + 1 };
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            port = Some(p);
            break;
        }
    }
    file.set_len(0).expect("write the port file");
    file.rewind().expect("write the port file");
    write!(file, "{next}").expect("write the port file");
    port.unwrap_or_else(|| panic!("no free port in {FIRST}-{LAST}"))
}

pub fn nats_available() -> bool {
    let found = try_output_within(Command::new("nats-server").arg("--version"), b"", WAIT)
        .is_ok_and(|out| out.status.success());
    if !found {
        skipping(
            "CHAT_REQUIRE_NATS",
            "nats-server is not installed (apt-get install nats-server)",
        );
    }
    found
}

impl Nats {
    /// Starts `n` servers; `extra` is added to each one's configuration.
    pub fn start(n: usize, extra: &str) -> Nats {
        Nats::start_as(&vec![None; n], extra)
    }

    /// [`Nats::start`], server `i` running as user `users[i]` where it is given (root
    /// only), so that a firewall rule can tell its packets apart.
    pub fn start_as(users: &[Option<u32>], extra: &str) -> Nats {
        let n = users.len();
        let dir = tempfile::tempdir().expect("temp dir");
        if users.iter().any(Option::is_some) {
            // Its configuration and store must be in reach of the other users.
            let open = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(dir.path(), open).expect("open the temp dir");
        }
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_list: Vec<String> = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut configs = Vec::new();
        for i in 0..n {
            let store = dir.path().join(format!("js{i}"));
            if let Some(uid) = users[i] {
                std::fs::create_dir(&store).expect("a store dir");
                std::os::unix::fs::chown(&store, Some(uid), Some(uid)).expect("chown");
            }
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: chat, listen: 127.0.0.1:{}, routes: [{}] }}",
                    routes[i],
                    route_list.join(", ")
                )
            } else {
                String::new()
            };
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nmax_payload: 10MB\njetstream {{ store_dir: \"{}\", max_mem: 64MB, max_file: 1GB }}\n{cluster}\n{extra}\n",
                ports[i],
                store.display()
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, conf).expect("write config");
            configs.push(path);
        }
        let mut nats = Nats {
            servers: Vec::new(),
            configs,
            users: users.to_vec(),
            ports,
            routes,
            _dir: dir,
        };
        for i in 0..n {
            let child = nats.spawn(i);
            nats.servers.push(Some(child));
        }
        nats
    }

    pub fn spawn(&self, i: usize) -> Child {
        let mut command = Command::new("nats-server");
        if let Some(uid) = self.users[i] {
            command.uid(uid).gid(uid);
        }
        // Its log, to say why if it never listens.
        let log = self.configs[i].with_extension("log");
        let file = std::fs::File::create(&log).expect("nats-server's log");
        let child = command
            .arg("-c")
            .arg(&self.configs[i])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("nats-server starts");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.ports[i])).is_err() {
            if start.elapsed() > WAIT {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = said.lines().rev().take(10).collect();
                panic!(
                    "nats-server n{i} never listened on {}; its log ends:\n{}",
                    self.ports[i],
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Every server's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let child = self.spawn(i);
        self.servers[i] = Some(child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// How long a chat node may take to join a cluster that is still forming.
pub const JOIN: Duration = Duration::from_secs(90);

/// A chat node joined to `nats`.
pub fn node(nats: &Nats, name: &str, dir: &Path, extra: &[&str]) -> ServerProcess {
    let urls = nats.urls();
    let mut args = vec!["--nats", &urls, "--node-name", name];
    args.extend_from_slice(extra);
    ServerProcess::start_within(&dir.join(name), &args, JOIN)
}
