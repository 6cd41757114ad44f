//! How received frames are shown: text on stdout, notices on stderr, other kinds as
//! their size (or saved to `--save-dir`); and, with acks on, the ack each one earns.

use std::path::PathBuf;

use chat::client::Acker;
use chat::protocol::{ClientFrame, ServerFrame, TEXT, type_name};

pub struct Printer {
    /// This client's id: frames from it are its echoes.
    pub id: u32,
    save_dir: Option<PathBuf>,
    saved: usize,
    /// Frames received from other ids so far.
    pub from_others: usize,
    /// Present when acks are on.
    pub acker: Option<Acker>,
}

impl Printer {
    pub fn new(id: u32, save_dir: Option<PathBuf>) -> Printer {
        Printer {
            id,
            save_dir,
            saved: 0,
            from_others: 0,
            acker: None,
        }
    }

    /// Prints (or saves) a frame; returns the ack to send once it is handled.
    pub fn show(&mut self, frame: &ServerFrame) -> Result<Option<ClientFrame>, String> {
        self.print(frame)?;
        Ok(self.acker.as_mut().and_then(|a| {
            a.handled(frame);
            a.ack()
        }))
    }

    fn print(&mut self, frame: &ServerFrame) -> Result<(), String> {
        if let Some(n) = frame.notice() {
            eprintln!("[server] {n}");
            return Ok(());
        }
        if frame.sender != self.id {
            self.from_others += 1;
        }
        let kind = type_name(frame.kind);
        if frame.kind == TEXT {
            println!(
                "[{}] {kind}: {}",
                frame.sender,
                String::from_utf8_lossy(&frame.body)
            );
            return Ok(());
        }
        let mut line = format!("[{}] {kind}: {} bytes", frame.sender, frame.body.len());
        if let (Some(dir), true) = (&self.save_dir, frame.sender != self.id) {
            self.saved += 1;
            let path = dir.join(format!("{}-{}-{}.bin", frame.sender, kind, self.saved));
            std::fs::write(&path, &frame.body)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            line += &format!(" saved to {}", path.display());
        }
        println!("{line}");
        Ok(())
    }
}
