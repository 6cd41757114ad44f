//! How received frames are shown: text on stdout, notices on stderr, other kinds as
//! their size (or saved to `--save-dir`); and, with acks on, the ack each one earns.
//! On a session (`--device`), what the envelope says too: a copy of what another
//! device of the id sent shows as `[you -> 7]`.

use std::path::PathBuf;

use chat::client::Acker;
use chat::protocol::session::{Received, Record, What};
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
    /// The connection is a session: frames carry envelopes.
    pub session: bool,
    /// A history page as it arrives, newest first: shown oldest first at its end.
    page: Vec<ServerFrame>,
}

impl Printer {
    pub fn new(id: u32, save_dir: Option<PathBuf>) -> Printer {
        Printer {
            id,
            save_dir,
            saved: 0,
            from_others: 0,
            acker: None,
            session: false,
            page: Vec::new(),
        }
    }

    /// Takes a received frame: on a session, reads its envelope, shows a copy from
    /// another device or a record here, and hands the rest on as the seed's frames
    /// (an echo, a frame from another id, a notice); without a session, hands it on as
    /// it is. Returns the frame for the caller, if any, and the ack to send.
    pub fn take(
        &mut self,
        frame: ServerFrame,
    ) -> Result<(Option<ServerFrame>, Option<ClientFrame>), String> {
        if !self.session {
            let ack = self.show(&frame)?;
            return Ok((Some(frame), ack));
        }
        let received = Received::read(frame.clone()).map_err(|e| e.to_string())?;
        let (plain, what) = match received {
            Received::Message {
                sender,
                kind,
                envelope,
                payload,
            } => {
                let plain = ServerFrame {
                    sender,
                    kind,
                    body: payload,
                };
                match envelope.what {
                    What::Carbon => {
                        // From another client (this id's other device): --receive counts it.
                        self.from_others += 1;
                        self.print_as(&plain, &format!("you -> {}", envelope.conversation))?;
                        (None, What::Carbon)
                    }
                    What::Page => {
                        self.page.push(plain);
                        (None, What::Page)
                    }
                    what => {
                        self.print(&plain)?;
                        (Some(plain), what)
                    }
                }
            }
            Received::Notice(_) => {
                self.print(&frame)?;
                (Some(frame), What::Echo)
            }
            Received::Record(record) => {
                if let Record::PageEnd { .. } = record {
                    for frame in std::mem::take(&mut self.page).iter().rev() {
                        let who = match frame.sender == self.id {
                            true => "you".to_string(),
                            false => frame.sender.to_string(),
                        };
                        self.print_as(frame, &who)?;
                    }
                }
                describe(&record);
                (None, What::Echo)
            }
        };
        let ack = self.acker.as_mut().and_then(|a| {
            a.handled_what(what);
            a.ack()
        });
        Ok((plain, ack))
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
        self.print_as(frame, &frame.sender.to_string())
    }

    /// Prints a data frame under `who`.
    fn print_as(&mut self, frame: &ServerFrame, who: &str) -> Result<(), String> {
        let kind = type_name(frame.kind);
        if frame.kind == TEXT {
            println!("[{who}] {kind}: {}", String::from_utf8_lossy(&frame.body));
            return Ok(());
        }
        let mut line = format!("[{who}] {kind}: {} bytes", frame.body.len());
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

/// Says on stderr what a record tells a person: what waited for this device, and what
/// it missed.
pub fn describe(record: &Record) {
    match record {
        Record::Sync {
            new,
            backlog,
            missed,
            ..
        } => {
            if *new {
                eprintln!("[server] a new device for this id: it gets what arrives from now on");
            }
            if *backlog > 0 {
                eprintln!("[server] {backlog} frames waited for this device");
            }
            if *missed > 0 {
                eprintln!(
                    "[server] {missed} frames for this device were dropped before it got them"
                );
            }
        }
        Record::QueryFailed { why, .. } => eprintln!("[server] query-failed: {why}"),
        Record::Read {
            conversation,
            unread,
            ..
        } => eprintln!("[server] read up to here with {conversation}; {unread} unread"),
        _ => {}
    }
}
