//! When the disk fills or fails: prompt answers, live traffic and pings go on, and the
//! store recovers by itself once there is room again.
//!
//! The full-disk test mounts a small tmpfs, which needs root; elsewhere it says so and
//! skips, and CI (CHAT_REQUIRE_MOUNT=1) makes a skip a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chat::client::Client;
use chat::protocol::{ClientFrame, Code};
use chat::rt;
use common::*;

/// How long a frame may wait for its answer while the store fails.
const PROMPT: Duration = Duration::from_secs(1);

/// A tmpfs of `size` mounted at a fresh directory, unmounted when dropped.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(options: &str) -> Option<Mount> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mount = try_output_within(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "tmpfs"])
                .arg(dir.path()),
            b"",
            WAIT,
        );
        match mount {
            Ok(out) if out.status.success() => return Some(Mount { dir }),
            Ok(out) => skipping(
                "CHAT_REQUIRE_MOUNT",
                &format!(
                    "cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ),
            Err(e) => skipping(
                "CHAT_REQUIRE_MOUNT",
                &format!("cannot run mount (apt-get install mount; run as root): {e}"),
            ),
        }
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = try_output_within(
            Command::new("umount").arg("-l").arg(self.dir.path()),
            b"",
            WAIT,
        );
    }
}

/// The metrics address the real binary logged.
fn metrics_addr(server: &ServerProcess) -> std::net::SocketAddr {
    let start = std::time::Instant::now();
    loop {
        let found = server.logs.lock().unwrap().iter().find_map(|l| {
            let rest = l.split("readiness on http://").nth(1)?;
            rest.split('/').next()?.parse().ok()
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            start.elapsed() < WAIT,
            "the server never logged its metrics address"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `f` until it is echoed rather than refused with `store-failed` (the store
/// recovers by itself, with backoff).
async fn send_until_stored(c: &mut Client, f: &ClientFrame) {
    within(async {
        loop {
            c.send(f).await.unwrap();
            let got = answer(c).await;
            if got == delivered(f) {
                return;
            }
            assert!(got.notice().is_some_and(|n| n.is(Code::StoreFailed)));
            rt::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// With the store down: `refused` (for an offline receiver) gets `store-failed` saying
/// `why`, promptly; pings and live traffic from `a` to `live` (id 2) go on; the node is
/// not ready.
async fn served_while_the_store_is_down(
    a: &mut Client,
    live: &mut Client,
    refused: &ClientFrame,
    why: &str,
    metrics: std::net::SocketAddr,
) {
    within(a.send(refused)).await.unwrap();
    let n = answer(a).await.notice().expect("a notice, not an echo");
    assert!(n.is(Code::StoreFailed), "{n}");
    assert!(n.detail.contains(why), "{n}");
    within(a.send(&ClientFrame::ping())).await.unwrap();
    assert!(answer(a).await.notice().unwrap().is(Code::Pong));
    let hi = text(refused.sender, 2, "live while the store is down");
    within(a.send(&hi)).await.unwrap();
    assert_eq!(answer(a).await, delivered(&hi));
    assert_eq!(recv(live).await, delivered(&hi));
    assert_eq!(http_get(metrics, "/readyz").await.0, 503);
}

/// The answer to a frame, which must come within [`PROMPT`].
async fn answer(c: &mut Client) -> chat::protocol::ServerFrame {
    rt::timeout(PROMPT, c.recv())
        .await
        .expect("an answer within a second")
        .expect("read")
        .expect("a frame")
}

#[test]
fn a_full_disk_gets_prompt_store_failed_and_recovers_without_a_restart() {
    let Some(mount) = Mount::new("size=4m") else {
        return;
    };
    // Room to free later.
    let filler: PathBuf = mount.path().join("filler");
    std::fs::write(&filler, vec![0u8; 1024 * 1024]).unwrap();
    let data_dir = mount.path().join("data");
    let server = ServerProcess::start(&data_dir, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    rt::block_on(async {
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        let mut live = within(Client::connect(&server.addr)).await.unwrap();
        within(live.hello(2, None)).await.unwrap();

        // Fill the disk with frames for offline id 3: each gets an echo or store-failed.
        let mut stored = Vec::new();
        let mut failed = 0;
        let mut refused = Vec::new();
        for i in 0..400u32 {
            let mut body = vec![1u8; 32 * 1024];
            body[..4].copy_from_slice(&i.to_be_bytes());
            let f = data(1, 3, 2, &body);
            within(a.send(&f)).await.unwrap();
            let got = answer(&mut a).await;
            match got.notice() {
                None => {
                    assert_eq!(got, delivered(&f));
                    stored.push(f);
                }
                Some(n) if n.is(Code::StoreFailed) => {
                    failed += 1;
                    refused.push(f);
                }
                Some(n) => panic!("unexpected {n}"),
            }
            if failed >= 5 {
                break;
            }
        }
        assert_eq!(failed, 5, "the 4 MiB disk never filled");
        assert!(!stored.is_empty());
        let (status, why) = http_get(metrics, "/readyz").await;
        assert_eq!(status, 503, "not ready while the store is down: {why}");
        assert!(why.starts_with("store unavailable"), "{why}");
        assert_eq!(http_get(metrics, "/healthz").await.0, 200, "yet alive");

        // Pings and live traffic go on while the store is down.
        within(a.send(&ClientFrame::ping())).await.unwrap();
        assert!(answer(&mut a).await.notice().unwrap().is(Code::Pong));
        let hi = text(1, 2, "live while the disk is full");
        within(a.send(&hi)).await.unwrap();
        assert_eq!(answer(&mut a).await, delivered(&hi));
        assert_eq!(recv(&mut live).await, delivered(&hi));

        // Room again: the store reopens by itself and frames are stored again.
        std::fs::remove_file(&filler).unwrap();
        let after = text(1, 3, "after recovery");
        send_until_stored(&mut a, &after).await;
        stored.push(after);
        assert_eq!(http_get(metrics, "/readyz").await.0, 200, "ready again");
        let (_, exposition) = http_get(metrics, "/metrics").await;
        assert!(
            exposition
                .lines()
                .any(|l| l.starts_with("chat_store_failures_total ") && !l.ends_with(" 0")),
            "the failure is counted"
        );

        // Every echoed frame is delivered, in order. The batch whose commit failed may
        // be there too (ENOSPC at the commit's sync: docs/PROTOCOL.md, "When the disk
        // fails"): its refused frame then comes in its place, at least once.
        let last = delivered(stored.last().expect("stored"));
        let (mut c, mut got) = mailbox_of(&server.addr, 3, 1).await;
        while got.last() != Some(&last) {
            assert!(got.len() <= stored.len() + refused.len(), "{got:?}");
            got.push(recv(&mut c).await);
        }
        let echoed: Vec<_> = got
            .iter()
            .filter(|f| stored.iter().any(|s| delivered(s) == **f))
            .cloned()
            .collect();
        assert_eq!(echoed, stored.iter().map(delivered).collect::<Vec<_>>());
        let extra: Vec<_> = got.iter().filter(|f| !echoed.contains(f)).collect();
        assert!(
            extra.len() <= 1
                && extra
                    .iter()
                    .all(|f| refused.iter().any(|r| delivered(r) == **f)),
            "only the failed commit's frame may come besides: {extra:?}"
        );
    });
    // One line when the store goes bad and one when it is back, not one per frame.
    let (bad, back) = (
        server.count_logged("store failed"),
        server.count_logged("store recovered"),
    );
    assert!(
        bad >= 1 && back >= 1,
        "{bad} failures, {back} recoveries logged"
    );
    assert!(bad <= back + 1, "{bad} failure lines for {back} recoveries");
}

/// Startup on a read-only data dir: one line on stderr, a non-zero exit, no panic.
#[test]
fn a_read_only_data_dir_at_start_is_a_one_line_error() {
    let Some(mount) = Mount::new("size=1m,ro") else {
        return;
    };
    refused_at_start(mount.path(), "Read-only file system");
}

/// Startup on a file that is not a database: one line on stderr, a non-zero exit.
#[test]
fn a_corrupt_store_at_start_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mailbox.redb"), vec![0x5a; 64 * 1024]).unwrap();
    refused_at_start(dir.path(), "cannot open");
}

/// The real binary on `data_dir` exits non-zero with one stderr line containing `why`.
fn refused_at_start(data_dir: &Path, why: &str) {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_chat-server"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir),
        b"",
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(why), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A server whose store's file takes `faults`, with metrics (for readiness).
async fn faulty_server(faults: &std::sync::Arc<chat::store::Faults>) -> TestServer {
    let injected = faults.clone();
    start_with(|c| {
        c.store_faults = Some(injected);
        c.metrics_listen = Some("127.0.0.1:0".into());
        // One sender fills a mailbox past a sender's share here.
        c.mailbox.per_sender = chat::store::PerSender::OFF;
    })
    .await
}

/// An I/O error injected through redb's storage backend while `fault` is set: the
/// frame gets `store-failed`, not an echo; pings and live traffic go on; once the
/// fault is gone the store reopens by itself, and every frame that was echoed is
/// delivered (the refused one too, if its commit reached the file whole: at least once,
/// as docs/PROTOCOL.md says).
fn an_injected_error_gets_store_failed_and_the_store_recovers(
    fault: fn(&chat::store::Faults) -> &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let faults = std::sync::Arc::new(chat::store::Faults::default());
    rt::block_on(async {
        let server = faulty_server(&faults).await;
        let metrics = server.metrics.unwrap();
        let mut a = login(&server, 1).await;
        let mut live = login(&server, 2).await;
        let first = text(1, 3, "before the fault");
        send_confirmed(&mut a, &first).await;

        fault(&faults).store(true, Ordering::Relaxed);
        let lost = text(1, 3, "during the fault");
        served_while_the_store_is_down(&mut a, &mut live, &lost, "Input/output error", metrics)
            .await;

        fault(&faults).store(false, Ordering::Relaxed);
        let after = text(1, 3, "after the fault");
        send_until_stored(&mut a, &after).await;
        assert_eq!(http_get(metrics, "/readyz").await.0, 200);
        let mut c = within(chat::client::Client::connect(&server.addr()))
            .await
            .unwrap();
        let mut got = within(c.hello(3, None)).await.unwrap();
        while got.last() != Some(&delivered(&after)) {
            got.push(recv(&mut c).await);
        }
        let with = vec![delivered(&first), delivered(&lost), delivered(&after)];
        let without = vec![delivered(&first), delivered(&after)];
        assert!(got == with || got == without, "{got:?}");
    });
}

#[test]
fn a_failed_fsync_gets_store_failed_and_the_store_recovers() {
    an_injected_error_gets_store_failed_and_the_store_recovers(|f| &f.fail_sync);
}

#[test]
fn a_failed_write_gets_store_failed_and_the_store_recovers() {
    an_injected_error_gets_store_failed_and_the_store_recovers(|f| &f.fail_write);
}

/// Reads that fail (EIO) while a mailbox larger than the store's page cache is read:
/// the store goes down, frames for offline receivers get `store-failed` promptly, the
/// reader's mailbox waits, and once reads work again it arrives whole, in order.
#[test]
fn a_failed_read_holds_the_mailbox_until_the_store_recovers() {
    use std::sync::atomic::Ordering;
    let faults = std::sync::Arc::new(chat::store::Faults::default());
    rt::block_on(async {
        let server = faulty_server(&faults).await;
        let metrics = server.metrics.unwrap();
        let mut a = login(&server, 1).await;
        // 16 MiB for offline 3: twice the store's page cache, so reading it back
        // needs the disk.
        let stored: Vec<_> = (0..16u32)
            .map(|i| data(1, 3, 2, &[&i.to_be_bytes()[..], &[9u8; 1 << 20]].concat()))
            .collect();
        for f in &stored {
            send_confirmed(&mut a, f).await;
        }
        faults.fail_read.store(true, Ordering::Relaxed);
        let mut three = within(chat::client::Client::connect(&server.addr()))
            .await
            .unwrap();
        let mut got = within(three.hello(3, None)).await.unwrap();
        within(async {
            while http_get(metrics, "/readyz").await.0 != 503 {
                rt::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let refused = text(1, 4, "while reads fail");
        within(a.send(&refused)).await.unwrap();
        let n = answer(&mut a).await.notice().expect("a notice");
        assert!(n.is(Code::StoreFailed), "{n}");

        faults.fail_read.store(false, Ordering::Relaxed);
        let after = text(1, 4, "after the fault");
        send_until_stored(&mut a, &after).await;
        while got.len() < stored.len() {
            got.push(recv(&mut three).await);
        }
        assert_frames(&got, &stored.iter().map(delivered).collect::<Vec<_>>());
        let (_four, got) = mailbox_of(&server.addr(), 4, 1).await;
        assert_eq!(got, vec![delivered(&after)]);
    });
}

/// An ext4 file system in a loop-mounted image with `errors=remount-ro`, so that an
/// error makes the kernel remount it read-only under the server, as a failing disk
/// does; unmounted when dropped.
struct Ext4 {
    image: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl Ext4 {
    fn new() -> Option<Ext4> {
        let image = tempfile::tempdir().expect("temp dir");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = image.path().join("fs.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(32 << 20))
            .expect("an image file");
        let fs = Ext4 { image, dir };
        let made = try_output_within(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file),
            b"",
            WAIT,
        );
        if !made.as_ref().is_ok_and(|o| o.status.success()) {
            skipping(
                "CHAT_REQUIRE_MOUNT",
                &format!("cannot make an ext4 image (apt-get install e2fsprogs): {made:?}"),
            );
            return None;
        }
        if let Err(why) = fs.mount() {
            skipping(
                "CHAT_REQUIRE_MOUNT",
                &format!("cannot loop-mount an ext4 image (needs root): {why}"),
            );
            return None;
        }
        Some(fs)
    }

    fn image(&self) -> PathBuf {
        self.image.path().join("fs.img")
    }

    fn mount(&self) -> Result<(), String> {
        let out = try_output_within(
            Command::new("mount")
                .args(["-o", "loop,errors=remount-ro"])
                .arg(self.image())
                .arg(self.dir.path()),
            b"",
            WAIT,
        )
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes ext4 take an error now: with errors=remount-ro it turns read-only.
    fn fail(&self) {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
        let here = self.dir.path().to_str().expect("a UTF-8 path");
        let device = mounts
            .lines()
            .find_map(|l| {
                let mut fields = l.split_whitespace();
                let device = fields.next()?;
                (fields.next()? == here).then(|| device.to_string())
            })
            .expect("the mount's device");
        let name = device.rsplit('/').next().expect("a device name");
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1")
            .expect("ext4's trigger_fs_error");
    }

    /// Unmounts, repairs and mounts again, as an operator does after such an error.
    fn repair(&self) {
        let out = output_within(Command::new("umount").arg(self.dir.path()), b"", WAIT);
        assert!(out.status.success(), "{out:?}");
        // e2fsck exits 1 when it fixed something.
        let out = output_within(
            Command::new("e2fsck").arg("-fy").arg(self.image()),
            b"",
            WAIT,
        );
        assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
        self.mount().expect("mounts again");
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = try_output_within(
            Command::new("umount").arg("-l").arg(self.dir.path()),
            b"",
            WAIT,
        );
    }
}

/// The file system turns read-only under the server (ext4 after an error, errors=
/// remount-ro): frames for offline receivers get `store-failed` promptly, pings and
/// live traffic go on; such a file system stays read-only until it is unmounted and
/// repaired, and then a restarted server delivers every frame committed before.
#[test]
fn a_file_system_gone_read_only_gets_store_failed_and_keeps_what_was_committed() {
    let Some(fs) = Ext4::new() else {
        return;
    };
    let data_dir = fs.path().join("data");
    let mut server = ServerProcess::start(&data_dir, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let stored: Vec<_> = (0..20).map(|i| text(1, 3, &format!("kept {i}"))).collect();
    rt::block_on(async {
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        let mut live = within(Client::connect(&server.addr)).await.unwrap();
        within(live.hello(2, None)).await.unwrap();
        for f in &stored {
            send_confirmed(&mut a, f).await;
        }
        fs.fail();
        let refused = text(1, 3, "on a read-only file system");
        let why = "Read-only file system";
        served_while_the_store_is_down(&mut a, &mut live, &refused, why, metrics).await;
    });
    server.signal(libc::SIGTERM);
    server.wait();
    drop(server);
    fs.repair();
    let server = ServerProcess::start(&data_dir, &[]);
    rt::block_on(async {
        // Every committed frame, then a marker sent now: the refused frame was not
        // stored.
        let mut one = within(Client::connect(&server.addr)).await.unwrap();
        within(one.hello(1, None)).await.unwrap();
        let marker = text(1, 3, "marker");
        send_confirmed(&mut one, &marker).await;
        let (_c, got) = mailbox_of(&server.addr, 3, stored.len() + 1).await;
        let want: Vec<_> = stored.iter().chain([&marker]).map(delivered).collect();
        assert_eq!(got, want);
    });
}

/// A server started on a full disk with an existing database starts (degraded), answers
/// every frame promptly, and once there is room stores again and delivers everything
/// committed before and since.
#[test]
fn a_full_disk_at_start_starts_degraded_and_recovers() {
    let Some(mount) = Mount::new("size=4m") else {
        return;
    };
    let data_dir = mount.path().join("data");
    let before: Vec<_> = (0..5).map(|i| text(1, 3, &format!("before {i}"))).collect();
    let mut server = ServerProcess::start(&data_dir, &[]);
    rt::block_on(async {
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        for f in &before {
            send_confirmed(&mut a, f).await;
        }
    });
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait().code(), Some(0));
    drop(server);
    // Fill the file system to the last byte.
    let filler = mount.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write(&chunk).is_ok_and(|n| n > 0) {}
        let mut byte = [0u8; 1];
        while f.write(&byte).is_ok_and(|n| n > 0) {
            byte[0] = 1;
        }
    }
    let server = ServerProcess::start(&data_dir, &[]);
    rt::block_on(async {
        let mut a = within(Client::connect(&server.addr)).await.unwrap();
        within(a.hello(1, None)).await.unwrap();
        // Frames for offline 4 until one is refused: each answered promptly.
        let mut accepted = Vec::new();
        let refused = loop {
            assert!(
                accepted.len() < 100,
                "100 frames of 32 KiB stored on a full disk"
            );
            let f = data(1, 4, 2, &[accepted.len() as u8; 32 * 1024]);
            within(a.send(&f)).await.unwrap();
            let got = answer(&mut a).await;
            match got.notice() {
                None => {
                    assert_eq!(got, delivered(&f));
                    accepted.push(f);
                }
                Some(n) if n.is(Code::StoreFailed) => break n,
                Some(n) => panic!("unexpected {n}"),
            }
        };
        assert!(refused.detail.contains("No space left"), "{refused}");
        std::fs::remove_file(&filler).unwrap();
        let after = text(1, 4, "after there is room");
        send_until_stored(&mut a, &after).await;
        accepted.push(after);
        let (_c, got) = mailbox_of(&server.addr, 3, before.len()).await;
        assert_eq!(got, before.iter().map(delivered).collect::<Vec<_>>());
        let (_c, got) = mailbox_of(&server.addr, 4, accepted.len()).await;
        assert_frames(&got, &accepted.iter().map(delivered).collect::<Vec<_>>());
    });
    assert!(server.logged("store recovered"));
}
