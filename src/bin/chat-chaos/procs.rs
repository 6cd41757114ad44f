//! The processes under test: nats-server instances forming a JetStream cluster, and
//! chat nodes, on loopback ports of the run's own, in a directory of the run's own.
//! Each can be killed (`kill -9`) and started again, or paused (SIGSTOP) and resumed;
//! with partitions on, each runs as a user of its own (see [`crate::cut`]).

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A port nobody listens on now, below Linux's ephemeral range (32768-60999). A port
/// from `bind(0)` comes from that range, where every outgoing connection takes its
/// own: one could take it while its process was down for a restart, which then could
/// not listen again. 26000-31999 (tests/cluster.rs takes 20000-25999); runs started at
/// once start at different places (by process id).
fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 26_000;
    const SPAN: u32 = 6_000;
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + i) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port in 26000-31999",
    ))
}

/// Waits until `port` on loopback takes connections.
fn wait_for_port(port: u16, limit: Duration) -> bool {
    let started = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while started.elapsed() < limit {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// One process: how to start it, and the running child.
pub struct Proc {
    pub name: String,
    pub port: u16,
    /// The uid it runs as (partitions on), so firewall rules can tell its packets.
    pub uid: Option<u32>,
    command: Vec<String>,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl Proc {
    fn new(name: String, port: u16, uid: Option<u32>, command: Vec<String>, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        Proc {
            name,
            port,
            uid,
            command,
            dir: dir.to_path_buf(),
            log,
            child: None,
            paused: false,
        }
    }

    /// Starts it and waits up to `limit` for its port.
    pub fn start(&mut self, limit: Duration) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let (program, args) = self
            .command
            .split_first()
            .ok_or_else(|| format!("{}: no command", self.name))?;
        let mut command = Command::new(program);
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        let child = command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        self.child = Some(child);
        self.paused = false;
        if wait_for_port(self.port, limit) {
            Ok(())
        } else {
            Err(format!(
                "{} did not listen on {} within {limit:?} (see {})",
                self.name,
                self.port,
                self.log.display()
            ))
        }
    }

    /// `kill -9`, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child
            && let Ok(pid) = i32::try_from(child.id())
        {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// SIGSTOP: the process stays, its sockets accept, nothing answers.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.paused = false;
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.paused {
            self.resume();
        }
        self.kill();
    }
}

/// Everything a run starts. Each process has a lock of its own: restarting one (which
/// may take seconds) holds up no fault on another.
pub struct Cluster {
    pub nats: Vec<Mutex<Proc>>,
    pub nodes: Vec<Mutex<Proc>>,
    /// The NATS servers' client ports and route (cluster) ports, by server.
    pub clients: Vec<u16>,
    pub routes: Vec<u16>,
    /// The run's firewall chain, when partitions are on.
    pub firewall: Option<crate::cut::Firewall>,
    /// The one node's own small disk, when `disk-full` is on.
    pub disk: Option<crate::disk::SmallDisk>,
}

/// Where node `i` keeps its data without NATS.
pub fn data_dir(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("data{i}"))
}

/// The uids processes run as with partitions on: NATS servers from the first, chat
/// nodes from the second (bare numbers; no account is needed).
const NATS_UIDS: u32 = 61_000;
const NODE_UIDS: u32 = 61_100;

impl Cluster {
    /// `nats` servers (0: one chat node with its embedded store) and `nodes` chat
    /// nodes, everything under `dir`; with `firewall`, each process as a user of its
    /// own, for partitions.
    pub fn start(
        server: &Path,
        nats: usize,
        nodes: usize,
        dir: &Path,
        firewall: Option<crate::cut::Firewall>,
    ) -> Result<Cluster, String> {
        let own_users = firewall.is_some();
        if own_users {
            // Every process's user writes its files here.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // Run as users of their own, the nodes may not reach a binary under a private
        // directory (a clone in `mktemp -d`, mode 0700): they run a copy in `dir`.
        let copied;
        let server = if own_users {
            use std::os::unix::fs::PermissionsExt;
            copied = dir.join("chat-server");
            fs::copy(server, &copied)
                .and_then(|_| fs::set_permissions(&copied, fs::Permissions::from_mode(0o755)))
                .map_err(|e| {
                    format!(
                        "cannot copy {} into the run's directory: {e}",
                        server.display()
                    )
                })?;
            copied.as_path()
        } else {
            server
        };
        let uid = |base: u32, i: usize| own_users.then(|| base + i as u32);
        let mut nats_procs = Vec::new();
        let mut node_procs = Vec::new();
        let port = |what: &str| free_port().map_err(|e| format!("no port for {what}: {e}"));
        let mut clients = Vec::new();
        let mut routes = Vec::new();
        for _ in 0..nats {
            clients.push(port("NATS")?);
            routes.push(port("NATS routes")?);
        }
        let route_list: Vec<String> = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        for i in 0..nats {
            let store = dir.join(format!("js{i}"));
            let cluster = if nats > 1 {
                format!(
                    "cluster {{ name: chaos, listen: 127.0.0.1:{}, routes: [{}] }}",
                    routes[i],
                    route_list.join(", ")
                )
            } else {
                String::new()
            };
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nmax_payload: 10MB\njetstream {{ store_dir: \"{}\", max_mem: 64MB, max_file: 2GB }}\n{cluster}\n",
                clients[i],
                store.display()
            );
            let path = dir.join(format!("nats{i}.conf"));
            fs::write(&path, conf).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            let command = vec![
                "nats-server".to_string(),
                "-c".to_string(),
                path.display().to_string(),
            ];
            nats_procs.push(Proc::new(
                format!("nats{i}"),
                clients[i],
                uid(NATS_UIDS, i),
                command,
                dir,
            ));
        }
        for p in &mut nats_procs {
            p.start(Duration::from_secs(10))?;
        }
        let urls: Vec<String> = clients
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        for i in 0..nodes {
            let listen = port("a chat node")?;
            let mut command = vec![
                server.display().to_string(),
                "--listen".to_string(),
                format!("127.0.0.1:{listen}"),
                "--log-level".to_string(),
                "info".to_string(),
            ];
            if nats > 0 {
                command.extend([
                    "--nats".to_string(),
                    urls.join(","),
                    "--node-name".to_string(),
                    format!("chat{i}"),
                ]);
            } else {
                command.extend([
                    "--data-dir".to_string(),
                    data_dir(dir, i).display().to_string(),
                ]);
            }
            node_procs.push(Proc::new(
                format!("chat{i}"),
                listen,
                uid(NODE_UIDS, i),
                command,
                dir,
            ));
        }
        for p in &mut node_procs {
            // A new cluster elects its leaders first; a node waits for its stream.
            p.start(Duration::from_secs(60))?;
        }
        let locked = |v: Vec<Proc>| v.into_iter().map(Mutex::new).collect();
        Ok(Cluster {
            nats: locked(nats_procs),
            nodes: locked(node_procs),
            clients,
            routes,
            firewall,
            disk: None,
        })
    }

    /// The chat nodes' addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).addr())
            .collect()
    }
}
