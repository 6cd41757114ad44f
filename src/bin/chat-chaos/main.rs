//! `chat-chaos`: a randomized fault run with a checker over the recorded history.
//!
//! Starts a cluster on loopback (nats-server instances forming a JetStream cluster and
//! chat nodes; or one chat node with its embedded store), drives a mixed workload
//! (numbered frames from resending senders to acking receivers that go offline, move
//! between nodes and take over their own connections, some frames 64 KiB), and
//! meanwhile injects faults at random from a seed it prints: `kill -9` and restart of
//! chat nodes and of NATS servers, SIGSTOP/SIGCONT pauses, network partitions (a
//! NATS server cut from the other servers, a chat node cut from NATS: `cut.rs`) and a
//! full disk under the one-node store (`disk.rs`); the last two as root, else left out
//! with one line. Then the faults stop,
//! everything is healed, the senders get their last answers, the receivers drain their
//! mailboxes, and the checker (`check.rs`) says what the history shows. The exit code
//! is 1 when a promise was broken, 2 when the run could not be set up.
//!
//! ```text
//! chat-chaos --secs 60                    # 3 NATS servers, 3 chat nodes
//! chat-chaos --nats 0 --nodes 1 --secs 30 # one node, its embedded store
//! chat-chaos --seed 42 ...                # the same faults at the same moments
//! ```

mod check;
mod cut;
mod disk;
mod procs;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use chat::rt;
use check::Event;
use procs::Cluster;
use workload::{ReceiverPlan, Rng, SenderPlan, World};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A randomized fault run against a chat cluster, with a checker"
)]
struct Args {
    /// NATS servers (0: one chat node with its embedded store).
    #[arg(long, default_value_t = 3)]
    nats: usize,
    /// Chat nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// How long faults are injected, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// The seed of every random choice (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 20)]
    pairs: u32,
    /// Frames per second per sender.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// The faults to draw from (comma-separated): kill, pause, nats-kill, nats-pause,
    /// nats-cut (a NATS server cut from the others), node-cut (a chat node cut from
    /// NATS), disk-full (one node without NATS: its data dir full). The cuts and
    /// disk-full need root; without it they are left out.
    #[arg(
        long,
        default_value = "kill,pause,nats-kill,nats-pause,nats-cut,node-cut"
    )]
    faults: String,
    /// Faults at the same time, at most.
    #[arg(long, default_value_t = 2)]
    overlap: usize,
    /// A fault lasts from 1 s to this long, in seconds (longer cuts show whether a
    /// node moves off a NATS server cut from the others: it waits 8 s).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    longest: u64,
    /// The longest an answer may take outside a fault window, in seconds.
    #[arg(long, default_value_t = 2.0)]
    bound: f64,
    /// After a fault ends, it still counts as one for this long (re-elections), in
    /// seconds.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// The chat-server binary (default: the one next to this one).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Where the processes' files and logs go (default: a new temporary directory,
    /// removed after a run that broke nothing).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Writes the history here, one event per line.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Receivers, of the first ones, that use sessions instead of a hello with acks:
    /// each has two devices, on nodes drawn at random, and each device must get every
    /// frame (needs history on, the default).
    #[arg(long, default_value_t = 0)]
    sessions: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chat-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

/// How long the senders may take for their last answers and the receivers for their
/// mailboxes, once the faults have stopped; what is not in by then is lost (or
/// unanswered) in the report.
const SETTLE_SECS: u64 = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    NatsKill,
    NatsPause,
    /// A NATS server cut from the other NATS servers; its clients still reach it.
    NatsCut,
    /// A chat node cut from every NATS server; its clients still reach it.
    NodeCut,
    /// The one node's data dir full (a tmpfs of its own, filled; `disk.rs`).
    DiskFull,
}

impl Fault {
    fn is_cut(self) -> bool {
        matches!(self, Fault::NatsCut | Fault::NodeCut)
    }

    /// Whether it strikes a chat node (else a NATS server).
    fn on_node(self) -> bool {
        matches!(
            self,
            Fault::Kill | Fault::Pause | Fault::NodeCut | Fault::DiskFull
        )
    }
}

fn parse_faults(list: &str, nats: usize) -> Result<Vec<Fault>, String> {
    let mut faults = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let fault = match word {
            "kill" => Fault::Kill,
            "pause" => Fault::Pause,
            "nats-kill" => Fault::NatsKill,
            "nats-pause" => Fault::NatsPause,
            "nats-cut" => Fault::NatsCut,
            "node-cut" => Fault::NodeCut,
            "disk-full" => Fault::DiskFull,
            other => {
                return Err(format!(
                    "--faults: `{other}` is not one of kill, pause, nats-kill, nats-pause, nats-cut, node-cut, disk-full"
                ));
            }
        };
        // Without NATS there is no NATS server to fault, nor a link to cut; a NATS
        // server alone has nobody to be cut from.
        let pointless = match fault {
            Fault::Kill | Fault::Pause => false,
            Fault::NatsCut => nats < 2,
            // The cluster's store is the stream: only the one node has a disk of its own.
            Fault::DiskFull => nats > 0,
            _ => nats == 0,
        };
        if !pointless {
            faults.push(fault);
        }
    }
    Ok(faults)
}

fn run(args: Args) -> Result<bool, String> {
    if args.nodes == 0 || (args.nats == 0 && args.nodes != 1) {
        return Err("--nodes: one or more with NATS, exactly 1 without (--nats 0)".into());
    }
    if args.pairs == 0 || args.rate == 0 {
        return Err("--pairs and --rate must be at least 1".into());
    }
    let mut faults = parse_faults(&args.faults, args.nats)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let server = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find chat-server: {e}"))?
            .with_file_name("chat-server"),
    };
    // The processes run in the run's directory.
    let server = std::fs::canonicalize(&server)
        .map_err(|e| format!("cannot find {}: {e}", server.display()))?;
    // A run starts from nothing: frames a former run left in a directory would be
    // delivered as if sent in this one.
    let (dir, keep) = match &args.dir {
        Some(dir) => (dir.clone(), true),
        None => {
            let name = format!("chat-chaos-{seed}-{}", std::process::id());
            (std::env::temp_dir().join(name), false)
        }
    };
    let used = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
    if used {
        return Err(format!(
            "{} is not empty: a run needs a directory of its own",
            dir.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    eprintln!(
        "chat-chaos: seed {seed}; {} NATS servers, {} chat nodes, {} pairs at {}/s, faults {:?} for {} s; files in {}",
        args.nats,
        args.nodes,
        args.pairs,
        args.rate,
        faults,
        args.secs,
        dir.display()
    );
    let firewall = if faults.iter().any(|f| f.is_cut()) {
        match cut::Firewall::new() {
            Ok(firewall) => Some(firewall),
            Err(why) if std::env::var_os("CHAT_REQUIRE_PARTITIONS").is_some() => {
                return Err(format!("{why} (CHAT_REQUIRE_PARTITIONS is set)"));
            }
            Err(why) => {
                eprintln!("chat-chaos: {why}; leaving out nats-cut and node-cut");
                faults.retain(|f| !f.is_cut());
                None
            }
        }
    } else {
        None
    };
    let disk = if faults.contains(&Fault::DiskFull) {
        match disk::SmallDisk::mount(&procs::data_dir(&dir, 0)) {
            Ok(disk) => Some(disk),
            Err(why) if std::env::var_os("CHAT_REQUIRE_PARTITIONS").is_some() => {
                return Err(format!("{why} (CHAT_REQUIRE_PARTITIONS is set)"));
            }
            Err(why) => {
                eprintln!("chat-chaos: {why}; leaving out disk-full");
                faults.retain(|f| *f != Fault::DiskFull);
                None
            }
        }
    } else {
        None
    };
    let mut cluster = Cluster::start(&server, args.nats, args.nodes, &dir, firewall)?;
    cluster.disk = disk;
    let world = World::new(
        cluster.addrs(),
        Duration::from_secs(10),
        args.pairs as usize,
    );
    let cluster = Arc::new(cluster);
    let mut rng = Rng::new(seed);

    // The clients.
    let base = 1_000_000 + (seed % 1000) as u32 * 1000;
    let mut tasks = Vec::new();
    for i in 0..args.pairs {
        let (id, to) = (base + 2 * i, base + 2 * i + 1);
        let plan = SenderPlan {
            id,
            to,
            window: 1 + rng.below(16) as usize,
            pace: Duration::from_micros(1_000_000 / u64::from(args.rate)),
            large: if i % 4 == 0 { 50 } else { 0 },
        };
        tasks.push(rt::spawn(workload::sender(
            world.clone(),
            plan,
            Rng::new(rng.next()),
        )));
        let devices = match i < args.sessions {
            true => ["laptop", "phone"]
                .iter()
                .filter_map(|name| chat::protocol::session::Device::new(name).ok())
                .map(Some)
                .collect(),
            false => vec![None],
        };
        for device in devices {
            let plan = ReceiverPlan {
                id: to,
                wanders: i % 2 == 1,
                device,
            };
            tasks.push(rt::spawn(workload::receiver(
                world.clone(),
                plan,
                Rng::new(rng.next()),
            )));
        }
    }

    // The faults, on threads: starting a process blocks.
    let injector = {
        let (world, cluster) = (world.clone(), cluster.clone());
        let (secs, overlap, rng) = (args.secs, args.overlap, Rng::new(rng.next()));
        let longest = Duration::from_secs(args.longest);
        std::thread::spawn(move || inject(&world, &cluster, &faults, secs, (overlap, longest), rng))
    };
    let fault_count = injector
        .join()
        .map_err(|_| "the fault injector failed".to_string())?;

    // Settle: everything is up again; senders finish, receivers drain.
    world.stop_sending.store(true, Ordering::Relaxed);
    eprintln!(
        "chat-chaos: {fault_count} faults; settling (senders get their answers, receivers drain)"
    );
    rt::block_on(async {
        let limit = Instant::now() + Duration::from_secs(SETTLE_SECS);
        // Settled: the senders are done and every echoed frame has been delivered
        // (then one more second, for repeats on their way), or the time is up.
        loop {
            rt::sleep(Duration::from_millis(500)).await;
            let senders_done = world.senders_left.load(Ordering::Relaxed) == 0;
            if Instant::now() > limit || (senders_done && world.all_delivered()) {
                rt::sleep(Duration::from_secs(1)).await;
                break;
            }
        }
        world.stop_receiving.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = rt::timeout(Duration::from_secs(5), task).await;
        }
    });
    drop(cluster);

    let missing_on_devices = world.missing_on_devices();
    let history = std::mem::take(&mut *world.history.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(path) = &args.history {
        write_history(path, &history)?;
    }
    let report = check::check(&history, args.bound, args.grace);
    print(&report, seed, args.bound);
    let mut violations = report.violations(args.bound);
    if args.sessions > 0 {
        println!(
            "frames a session's device missed (each device gets every frame): {missing_on_devices}"
        );
        if missing_on_devices > 0 {
            violations.push(format!(
                "{missing_on_devices} echoed frames never reached one of their receiver's devices"
            ));
        }
    }
    for v in &violations {
        eprintln!("chat-chaos: VIOLATION: {v}");
    }
    if let Some(&(receiver, key)) = report.out_of_order.first() {
        eprintln!(
            "chat-chaos: the first frame out of order, {key:?} for {receiver}, and its neighbours:"
        );
        for line in check::story(&history, receiver, key) {
            eprintln!("  {line}");
        }
    }
    if !report.lost.is_empty() {
        for line in stream_resets(&dir) {
            eprintln!("chat-chaos: {line}");
        }
    }
    if violations.is_empty() && !keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("chat-chaos: logs kept in {}", dir.display());
    }
    Ok(violations.is_empty())
}

/// Injects faults for `secs` seconds, up to `overlap` at once, each lasting up to
/// `longest`; returns how many.
fn inject(
    world: &Arc<World>,
    cluster: &Arc<Cluster>,
    faults: &[Fault],
    secs: u64,
    (overlap, longest): (usize, Duration),
    mut rng: Rng,
) -> usize {
    let end = Instant::now() + Duration::from_secs(secs);
    // What is faulted now: ("chat" | "nats", index).
    let busy: Arc<Mutex<Vec<(&'static str, usize)>>> = Arc::default();
    let mut running = Vec::new();
    let mut count = 0;
    // A quiet start, so the first seconds show the calm figures.
    std::thread::sleep(Duration::from_secs(3).min(Duration::from_secs(secs)));
    while Instant::now() < end && !faults.is_empty() {
        std::thread::sleep(rng.between(Duration::from_millis(500), Duration::from_secs(3)));
        running.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
        if running.len() >= overlap {
            continue;
        }
        let fault = faults[rng.below(faults.len() as u64) as usize];
        let (group, size) = if fault.on_node() {
            ("chat", cluster.nodes.len())
        } else {
            ("nats", cluster.nats.len())
        };
        let target = rng.below(size as u64) as usize;
        {
            let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
            let faulted_in_group = b.iter().filter(|(g, _)| *g == group).count();
            // Keep a chat node up, and a NATS quorum: at most one server down.
            let cap = if group == "chat" {
                size.saturating_sub(1)
            } else {
                usize::from(size > 2)
            };
            if b.contains(&(group, target)) || faulted_in_group >= cap.max(usize::from(size == 1)) {
                continue;
            }
            b.push((group, target));
        }
        let hold = rng.between(Duration::from_secs(1), longest);
        let (world, cluster, busy) = (world.clone(), cluster.clone(), busy.clone());
        count += 1;
        running.push(std::thread::spawn(move || {
            let start = world.now();
            let name = apply(&cluster, fault, target, true);
            eprintln!("chat-chaos: {start:6.1} s {fault:?} {name} for {hold:?}");
            std::thread::sleep(hold);
            apply(&cluster, fault, target, false);
            let end = world.now();
            world.record(Event::Fault {
                what: format!("{fault:?} {name}"),
                start,
                end,
            });
            busy.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|x| *x != (group, target));
        }));
    }
    for h in running {
        let _ = h.join();
    }
    count
}

/// Starts (`on`) or ends a fault; returns the target's name.
fn apply(cluster: &Cluster, fault: Fault, target: usize, on: bool) -> String {
    let procs = if fault.on_node() {
        &cluster.nodes
    } else {
        &cluster.nats
    };
    let mut proc = procs[target].lock().unwrap_or_else(|e| e.into_inner());
    let name = proc.name.clone();
    if fault.is_cut() {
        let rules = cut_rules(cluster, fault, target, proc.uid);
        let done = match (&cluster.firewall, on) {
            (Some(firewall), true) => firewall.add(&rules),
            (Some(firewall), false) => firewall.remove(&rules),
            (None, _) => Ok(()),
        };
        if let Err(e) = done {
            eprintln!("chat-chaos: {e}");
        }
        return name;
    }
    match (fault, on) {
        (Fault::Kill | Fault::NatsKill, true) => proc.kill(),
        (Fault::Kill | Fault::NatsKill, false) => {
            if let Err(e) = proc.start(Duration::from_secs(60)) {
                eprintln!("chat-chaos: {e}");
            }
        }
        (Fault::Pause | Fault::NatsPause, true) => proc.pause(),
        (Fault::Pause | Fault::NatsPause, false) => proc.resume(),
        (Fault::DiskFull, true) => cluster.disk.iter().for_each(|d| d.fill()),
        (Fault::DiskFull, false) => cluster.disk.iter().for_each(|d| d.free()),
        (Fault::NatsCut | Fault::NodeCut, _) => {}
    }
    name
}

/// The rules of a cut of `target` (running as `uid`): a NATS server from the other
/// servers' route ports, or a chat node from every NATS server's client port.
fn cut_rules(cluster: &Cluster, fault: Fault, target: usize, uid: Option<u32>) -> Vec<cut::Rule> {
    let Some(uid) = uid else {
        return Vec::new();
    };
    match fault {
        Fault::NatsCut => {
            let others: Vec<u16> = (0..cluster.routes.len())
                .filter(|&i| i != target)
                .map(|i| cluster.routes[i])
                .collect();
            let mark = 0x4300 + target as u32;
            cut::cut(uid, &others, Some(cluster.routes[target]), mark)
        }
        _ => cut::cut(uid, &cluster.clients, None, 0x4400 + target as u32),
    }
}

/// The NATS servers' own word that they threw away a replica of the stream and
/// rebuilt it (`Resetting stream cluster state`): nats-server 2.9 does this after a
/// `last sequence mismatch` on restart (nats-io/nats-server#3644), and the stream can
/// answer nothing for minutes after. Frames lost in such a run may be the stream's.
fn stream_resets(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("nats") && name.ends_with(".log")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines().filter(|l| l.contains("Resetting stream")) {
            found.push(format!(
                "{name}: {line} (nats-server reset its copy of the stream: see docs/RELIABILITY.md)"
            ));
        }
    }
    found.sort();
    found
}

fn write_history(path: &std::path::Path, history: &[Event]) -> Result<(), String> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for e in history {
        writeln!(out, "{e:?}").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    out.flush().map_err(|e| format!("{}: {e}", path.display()))
}

fn print(r: &check::Report, seed: u64, bound: f64) {
    let refused: Vec<String> = r.refused.iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!("seed {seed}");
    println!(
        "faults {} {:?}; sent {} (resent {}); echoed {}; refused {}; unanswered {}",
        r.faults,
        r.fault_kinds,
        r.sent,
        r.resent,
        r.echoed,
        if refused.is_empty() {
            "0".to_string()
        } else {
            refused.join(", ")
        },
        r.unanswered
    );
    println!(
        "delivered {} (repeats {}, refused but delivered {}); lost {}; phantom {}; out of order {}",
        r.delivered,
        r.repeats,
        r.refused_delivered,
        r.lost.len(),
        r.phantoms.len(),
        r.out_of_order.len()
    );
    println!(
        "slowest answer {:.2} s; outside fault windows {:.2} s ({} over {bound} s); silences {} (longest {:.1} s); last delivery at {:.1} s",
        r.slowest, r.slowest_calm, r.slow_calm, r.silences, r.longest_silence, r.last_delivery
    );
    let mut elsewhere: Vec<String> = r
        .slowest_elsewhere
        .iter()
        .map(|(kind, s)| format!("{kind} {s:.2} s"))
        .collect();
    elsewhere.sort();
    println!(
        "slowest answer on a node not faulted itself, by the faults around it: {}; on a node killed or frozen meanwhile: {:.2} s",
        if elsewhere.is_empty() {
            "none".to_string()
        } else {
            elsewhere.join(", ")
        },
        r.slowest_own
    );
    println!(
        "ids bound on two nodes at once: {} pairs of connections, {} frames delivered to the older after the newer's first",
        r.double_binds, r.split_deliveries
    );
}
