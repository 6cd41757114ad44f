//! store-bench: compares redb and fjall as a per-user message history log.
//!
//! Every invocation runs one workload in a fresh directory, prints
//! `metric value unit` lines and removes the directory.

mod engine;

use engine::{Append, CursorSet, Page, Result, Store};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: store-bench --engine redb|fjall --dir PATH \
--workload append|page|resume|prune|mixed [--group G] [--body BYTES] [--secs S] \
[--max-frames N] [--ids N] [--records N] [--reads N] [--prune-by-key] [--keep]";

const PAGE: usize = 100;
const BUILD_BATCH: usize = 10_000;
const MSG_TEXT: u8 = 1;

struct Opts {
    engine: String,
    dir: PathBuf,
    workload: String,
    group: usize,
    body: usize,
    secs: f64,
    max_frames: u64,
    ids: u32,
    records: u64,
    reads: usize,
    prune_by_key: bool,
    keep: bool,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        engine: String::new(),
        dir: PathBuf::new(),
        workload: String::new(),
        group: 32,
        body: 64,
        secs: 8.0,
        max_frames: 200_000,
        ids: 1000,
        records: 1_000_000,
        reads: 2000,
        prune_by_key: false,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut val = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--engine" => o.engine = val()?,
            "--dir" => o.dir = PathBuf::from(val()?),
            "--workload" => o.workload = val()?,
            "--group" => o.group = val()?.parse()?,
            "--body" => o.body = val()?.parse()?,
            "--secs" => o.secs = val()?.parse()?,
            "--max-frames" => o.max_frames = val()?.parse()?,
            "--ids" => o.ids = val()?.parse()?,
            "--records" => o.records = val()?.parse()?,
            "--reads" => o.reads = val()?.parse()?,
            "--prune-by-key" => o.prune_by_key = true,
            "--keep" => o.keep = true,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}").into()),
        }
    }
    if o.engine.is_empty() || o.dir.as_os_str().is_empty() || o.workload.is_empty() {
        return Err(USAGE.into());
    }
    if o.group == 0 || o.ids < 2 {
        return Err("--group must be >= 1 and --ids >= 2".into());
    }
    Ok(o)
}

fn main() -> Result<()> {
    let o = parse_args()?;
    if o.dir.exists() && std::fs::read_dir(&o.dir)?.next().is_some() {
        return Err(format!("{} exists and is not empty", o.dir.display()).into());
    }
    std::fs::create_dir_all(&o.dir)?;
    println!(
        "# engine={} workload={} group={} body={} dir={}",
        o.engine,
        o.workload,
        o.group,
        o.body,
        o.dir.display()
    );
    let result = match o.workload.as_str() {
        "append" => workload_append(&o),
        "page" => workload_page(&o),
        "resume" => workload_resume(&o),
        "prune" => workload_prune(&o),
        "mixed" => workload_mixed(&o),
        other => Err(format!("unknown workload {other:?}\n{USAGE}").into()),
    };
    if !o.keep {
        std::fs::remove_dir_all(&o.dir)?;
    }
    result
}

fn metric(name: &str, value: f64, unit: &str) {
    if value.fract() == 0.0 {
        println!("{name} {value:.0} {unit}");
    } else {
        println!("{name} {value:.1} {unit}");
    }
}

// ---------- helpers ----------

/// SplitMix64: deterministic, dependency-free randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Incompressible body bytes (fjall compresses blocks with lz4 by default).
struct Bodies {
    pool: Vec<u8>,
    len: usize,
}

impl Bodies {
    fn new(len: usize, rng: &mut Rng) -> Self {
        let pool = (0..(1 << 20) + len).map(|_| rng.next() as u8).collect();
        Self { pool, len }
    }

    fn pick(&self, rng: &mut Rng) -> &[u8] {
        let start = rng.below((self.pool.len() - self.len) as u64) as usize;
        &self.pool[start..start + self.len]
    }
}

/// accept time (8) + author (4) + conversation (4) + type (1) + body.
fn record(author: u32, conversation: u32, body: &[u8]) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut r = Vec::with_capacity(17 + body.len());
    r.extend_from_slice(&now.to_be_bytes());
    r.extend_from_slice(&author.to_be_bytes());
    r.extend_from_slice(&conversation.to_be_bytes());
    r.push(MSG_TEXT);
    r.extend_from_slice(body);
    r
}

/// (allocated bytes, apparent bytes) of every file under `dir`.
fn disk_usage(dir: &Path) -> Result<(u64, u64)> {
    let (mut alloc, mut apparent) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (a, b) = disk_usage(&entry.path())?;
            alloc += a;
            apparent += b;
        } else {
            alloc += meta.blocks() * 512;
            apparent += meta.len();
        }
    }
    Ok((alloc, apparent))
}

fn report_disk(prefix: &str, dir: &Path) -> Result<()> {
    let (alloc, apparent) = disk_usage(dir)?;
    metric(&format!("{prefix}disk_alloc"), alloc as f64 / 1e6, "MB");
    metric(
        &format!("{prefix}disk_apparent"),
        apparent as f64 / 1e6,
        "MB",
    );
    Ok(())
}

fn report_latency(name: &str, mut nanos: Vec<u64>) {
    if nanos.is_empty() {
        return;
    }
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    metric(&format!("{name}_p50"), at(0.50).round(), "us");
    metric(&format!("{name}_p99"), at(0.99).round(), "us");
    metric(&format!("{name}_max"), at(1.0).round(), "us");
}

fn vm_hwm_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("bad VmHWM line")?
        .parse()?)
}

/// Builds `per_id` records for each id, interleaved across ids, in big
/// non-durable batches, then one durable sync. Returns records written.
fn build_logs(store: &dyn Store, ids: &[u32], per_id: u64, rng: &mut Rng) -> Result<u64> {
    let bodies = Bodies::new(64, rng);
    let mut batch = Vec::with_capacity(BUILD_BATCH);
    let start = Instant::now();
    for offset in 0..per_id {
        for &id in ids {
            let record = record(id ^ 1, id / 2, bodies.pick(rng));
            batch.push(Append { id, offset, record });
            if batch.len() == BUILD_BATCH {
                store.commit(&batch, &[], false)?;
                batch.clear();
            }
        }
    }
    store.commit(&batch, &[], false)?;
    store.sync()?;
    let total = per_id * ids.len() as u64;
    let secs = start.elapsed().as_secs_f64();
    metric("build_records", total as f64, "records");
    metric("build_time", secs, "s");
    metric("build_rate", (total as f64 / secs).round(), "records/s");
    Ok(total)
}

/// Random page reads of one kind; returns per-read latencies in ns.
fn page_reads(
    store: &dyn Store,
    ids: &[u32],
    per_id: u64,
    reverse: bool,
    n: usize,
    rng: &mut Rng,
) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(PAGE * 128);
    let mut nanos = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ids[rng.below(ids.len() as u64) as usize];
        let offset = rng.below(per_id);
        let page = if reverse {
            Page::Before(offset)
        } else {
            Page::From(offset)
        };
        out.clear();
        let t = Instant::now();
        let (count, _) = store.read_page(id, page, PAGE, &mut out)?;
        nanos.push(t.elapsed().as_nanos() as u64);
        let expected = if reverse {
            offset.min(PAGE as u64)
        } else {
            (per_id - offset).min(PAGE as u64)
        };
        if count as u64 != expected {
            return Err(format!("read {count} records, expected {expected}").into());
        }
    }
    Ok(nanos)
}

// ---------- workload 1/2: append ----------

struct AppendStats {
    frames: u64,
    secs: f64,
}

/// Pairs (2k -> 2k+1) exchange frames; each frame is appended to both logs in
/// the same transaction, with a cursor update every 10th frame. Commits are
/// durable. Stops after `secs`, `max_frames`, or when `stop` is set.
fn run_appends(store: &dyn Store, o: &Opts, rng: &mut Rng) -> Result<AppendStats> {
    let bodies = Bodies::new(o.body, rng);
    let mut next = vec![0u64; o.ids as usize];
    let pairs = u64::from(o.ids / 2);
    let mut frames = 0u64;
    let deadline = Duration::from_secs_f64(o.secs);
    let start = Instant::now();
    while frames < o.max_frames && start.elapsed() < deadline {
        let mut appends = Vec::with_capacity(2 * o.group);
        let mut cursors = Vec::new();
        for _ in 0..o.group {
            let pair = rng.below(pairs) as u32;
            let (from, to) = (2 * pair, 2 * pair + 1);
            let rec = record(from, pair, bodies.pick(rng));
            for id in [to, from] {
                let offset = next[id as usize];
                next[id as usize] += 1;
                appends.push(Append {
                    id,
                    offset,
                    record: rec.clone(),
                });
            }
            frames += 1;
            if frames.is_multiple_of(10) {
                cursors.push(CursorSet {
                    id: to,
                    device: "phone",
                    offset: next[to as usize],
                });
            }
        }
        store.commit(&appends, &cursors, true)?;
    }
    Ok(AppendStats {
        frames,
        secs: start.elapsed().as_secs_f64(),
    })
}

fn workload_append(o: &Opts) -> Result<()> {
    let store = engine::open(&o.engine, &o.dir)?;
    let mut rng = Rng(1);
    let s = run_appends(store.as_ref(), o, &mut rng)?;
    metric("append_frames", s.frames as f64, "frames");
    metric("append_time", s.secs, "s");
    metric(
        "append_rate",
        (s.frames as f64 / s.secs).round(),
        "frames/s",
    );
    report_disk("append_end_", &o.dir)?;
    drop(store);
    report_disk("append_closed_", &o.dir)?;
    Ok(())
}

// ---------- workload 3: page reads ----------

fn workload_page(o: &Opts) -> Result<()> {
    let mut rng = Rng(3);
    let ids = [7u32];
    let mut store = engine::open(&o.engine, &o.dir)?;
    build_logs(store.as_ref(), &ids, o.records, &mut rng)?;
    report_disk("page_", &o.dir)?;
    for phase in ["warm", "reopen"] {
        if phase == "reopen" {
            drop(store);
            let t = Instant::now();
            store = engine::open(&o.engine, &o.dir)?;
            metric("reopen_time", t.elapsed().as_secs_f64() * 1e3, "ms");
        }
        let rev = page_reads(store.as_ref(), &ids, o.records, true, o.reads, &mut rng)?;
        let fwd = page_reads(store.as_ref(), &ids, o.records, false, o.reads, &mut rng)?;
        report_latency(&format!("page_{phase}_rev"), rev);
        report_latency(&format!("page_{phase}_fwd"), fwd);
    }
    metric("vm_hwm", vm_hwm_kib()? as f64 / 1024.0, "MiB");
    Ok(())
}

// ---------- workload 4: resume ----------

fn workload_resume(o: &Opts) -> Result<()> {
    const IDS: u32 = 50;
    const PER_ID: u64 = 20_000;
    const CURSOR_AT: u64 = 10_000;
    let mut rng = Rng(4);
    let ids: Vec<u32> = (0..IDS).collect();
    let target = 17;
    let mut store = engine::open(&o.engine, &o.dir)?;
    build_logs(store.as_ref(), &ids, PER_ID, &mut rng)?;
    let cursor = CursorSet {
        id: target,
        device: "phone",
        offset: CURSOR_AT,
    };
    store.commit(&[], &[cursor], true)?;
    drop(store);
    store = engine::open(&o.engine, &o.dir)?;
    for phase in ["reopen", "warm"] {
        let mut out = Vec::with_capacity(PAGE * 128);
        let t = Instant::now();
        let mut from = store
            .cursor(target, "phone")?
            .ok_or("cursor missing after reopen")?;
        let mut total = 0u64;
        loop {
            out.clear();
            let (count, last) = store.read_page(target, Page::From(from), PAGE, &mut out)?;
            total += count as u64;
            match last {
                Some(last) if count == PAGE => from = last + 1,
                _ => break,
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if total != PER_ID - CURSOR_AT {
            return Err(format!("resume read {total} records").into());
        }
        metric(&format!("resume_{phase}_time"), secs * 1e3, "ms");
        metric(
            &format!("resume_{phase}_rate"),
            (total as f64 / secs).round(),
            "records/s",
        );
    }
    Ok(())
}

// ---------- workload 5: prune ----------

fn workload_prune(o: &Opts) -> Result<()> {
    let mut rng = Rng(5);
    let id = 7u32;
    let cut = o.records / 10;
    let mut store = engine::open(&o.engine, &o.dir)?;
    build_logs(store.as_ref(), &[id], o.records, &mut rng)?;
    store.settle()?;
    report_disk("prune_before_", &o.dir)?;

    let first_page = |store: &dyn Store, label: &str| -> Result<()> {
        let mut out = Vec::new();
        let t = Instant::now();
        let (count, last) = store.read_page(id, Page::From(0), PAGE, &mut out)?;
        metric(
            &format!("prune_first_page_{label}"),
            t.elapsed().as_micros() as f64,
            "us",
        );
        if count != PAGE || last != Some(cut + PAGE as u64 - 1) {
            return Err(format!("after prune: {count} records, last {last:?}").into());
        }
        Ok(())
    };

    let t = Instant::now();
    store.delete_range(id, 0, cut, o.prune_by_key)?;
    println!("# prune by key: {}", o.prune_by_key);
    metric("prune_records", cut as f64, "records");
    metric("prune_time", t.elapsed().as_secs_f64() * 1e3, "ms");
    report_disk("prune_after_", &o.dir)?;
    first_page(store.as_ref(), "after")?;

    store.settle()?;
    report_disk("prune_settled_", &o.dir)?;
    first_page(store.as_ref(), "settled")?;

    let t = Instant::now();
    let what = store.compact()?;
    println!("# compact call: {what}");
    metric("prune_compact_time", t.elapsed().as_secs_f64() * 1e3, "ms");
    report_disk("prune_compacted_", &o.dir)?;
    first_page(store.as_ref(), "compacted")?;
    drop(store);
    report_disk("prune_closed_", &o.dir)?;
    Ok(())
}

// ---------- workload 6: mixed ----------

fn workload_mixed(o: &Opts) -> Result<()> {
    const READ_IDS: u32 = 10;
    let per_id = o.records / u64::from(READ_IDS);
    let mut rng = Rng(6);
    // Reader ids sit above the writer's 0..ids range.
    let read_ids: Vec<u32> = (0..READ_IDS).map(|i| 1_000_000 + i).collect();
    let store = engine::open(&o.engine, &o.dir)?;
    build_logs(store.as_ref(), &read_ids, per_id, &mut rng)?;

    let stop = AtomicBool::new(false);
    let store = store.as_ref();
    let (append, reads) = std::thread::scope(|s| {
        let reader = s.spawn(|| -> Result<Vec<u64>> {
            let mut rng = Rng(66);
            let mut nanos = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                nanos.extend(page_reads(store, &read_ids, per_id, true, 10, &mut rng)?);
            }
            Ok(nanos)
        });
        let append = run_appends(store, o, &mut rng);
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().expect("reader thread panicked");
        (append, reads)
    });
    let (append, reads) = (append?, reads?);
    metric("mixed_append_frames", append.frames as f64, "frames");
    metric(
        "mixed_append_rate",
        (append.frames as f64 / append.secs).round(),
        "frames/s",
    );
    metric("mixed_reads", reads.len() as f64, "reads");
    metric(
        "mixed_read_rate",
        (reads.len() as f64 / append.secs).round(),
        "reads/s",
    );
    report_latency("mixed_read", reads);
    Ok(())
}
