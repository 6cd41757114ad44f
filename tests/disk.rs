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
            Err(e) => skipping("CHAT_REQUIRE_MOUNT", &format!("cannot run mount: {e}")),
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
                Some(n) if n.is(Code::StoreFailed) => failed += 1,
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

        // Every echoed frame is delivered, in order.
        let (_c, got) = mailbox_of(&server.addr, 3, stored.len()).await;
        assert_eq!(got, stored.iter().map(delivered).collect::<Vec<_>>());
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
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(why), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// An fsync that fails (EIO, injected through redb's storage backend): the frame gets
/// `store-failed`, not an echo; pings and live traffic go on; once syncs work again the
/// store reopens by itself, and every frame that was echoed is delivered.
#[test]
fn a_failed_fsync_gets_store_failed_and_the_store_recovers() {
    use std::sync::atomic::Ordering;
    let faults = std::sync::Arc::new(chat::store::Faults::default());
    let injected = faults.clone();
    rt::block_on(async {
        let server = start_with(|c| {
            c.store_faults = Some(injected);
            c.metrics_listen = Some("127.0.0.1:0".into());
        })
        .await;
        let metrics = server.metrics.unwrap();
        let mut a = login(&server, 1).await;
        let mut live = login(&server, 2).await;
        let first = text(1, 3, "before the fault");
        send_confirmed(&mut a, &first).await;

        faults.fail_sync.store(true, Ordering::Relaxed);
        let lost = text(1, 3, "during the fault");
        within(a.send(&lost)).await.unwrap();
        let n = answer(&mut a)
            .await
            .notice()
            .expect("a notice, not an echo");
        assert!(n.is(Code::StoreFailed), "{n}");
        assert!(n.detail.contains("Input/output error"), "{n}");
        within(a.send(&ClientFrame::ping())).await.unwrap();
        assert!(answer(&mut a).await.notice().unwrap().is(Code::Pong));
        let hi = text(1, 2, "live during the fault");
        within(a.send(&hi)).await.unwrap();
        assert_eq!(answer(&mut a).await, delivered(&hi));
        assert_eq!(recv(&mut live).await, delivered(&hi));
        assert_eq!(http_get(metrics, "/readyz").await.0, 503);

        faults.fail_sync.store(false, Ordering::Relaxed);
        let after = text(1, 3, "after the fault");
        send_until_stored(&mut a, &after).await;
        assert_eq!(http_get(metrics, "/readyz").await.0, 200);
        // Every echoed frame, in order. The frame refused at fsync may come too: its
        // bytes reached the file and the reopened database may find its commit whole
        // (at least once, as docs/PROTOCOL.md says for a failed fsync).
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
