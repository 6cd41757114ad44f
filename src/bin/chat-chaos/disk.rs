//! A full disk under the one-node store: the node's data dir on a small tmpfs of its
//! own, filled up for the fault's window and freed after it.
//!
//! Mounting needs root, as the cuts do; without it the fault is left out with one line
//! (`CHAT_REQUIRE_PARTITIONS` makes that an error, as for the cuts).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tmpfs's size: room for a run's frames and history many times over, so only the
/// fault fills it.
const SIZE: &str = "size=512m,mode=1777";

/// A tmpfs mounted at the node's data dir, unmounted when dropped.
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    pub fn mount(path: &Path) -> Result<SmallDisk, String> {
        fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", SIZE, "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs for disk-full (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk {
            path: path.to_path_buf(),
        })
    }

    fn filler(&self) -> PathBuf {
        self.path.join("chaos-filler")
    }

    /// Writes a file until the file system has no room left.
    pub fn fill(&self) {
        let Ok(mut f) = fs::File::create(self.filler()) else {
            return;
        };
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        // What is left is smaller than a chunk: take it too.
        let mut byte = [0u8; 4096];
        while f.write_all(&byte).is_ok() {
            byte[0] = byte[0].wrapping_add(1);
        }
    }

    /// Gives the room back.
    pub fn free(&self) {
        let _ = fs::remove_file(self.filler());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}
