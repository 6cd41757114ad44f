//! `chat-client`: talk to a chat server from a terminal or a script.
//!
//! On a terminal, each line typed is sent and everything received is printed. With
//! stdin from a pipe or file, every line is sent, each one's echo is awaited, and the
//! exit code says whether all were accepted.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::channel::mpsc;
use futures::future::{Either, select};
use futures::{SinkExt, StreamExt};

use chat::client::{Acker, Client, Receiver, Sender};
use chat::protocol::{ClientFrame, Code, ServerFrame, TEXT, parse_type, type_name};
use chat::rt;

#[derive(Parser, Debug)]
#[command(version, about = "Send and receive chat frames")]
struct Args {
    /// Server address.
    #[arg(long, env = "CHAT_SERVER", default_value = "127.0.0.1:8888")]
    server: String,

    /// Your id (any number but 0).
    #[arg(long, env = "CHAT_ID", required_unless_present = "probe")]
    id: Option<u32>,

    /// Who to send to; 0 (the default) only echoes.
    #[arg(long, default_value_t = 0)]
    to: u32,

    /// Type of what --file sends: text, picture, voice, video or a number 1-255.
    #[arg(long = "type", default_value = "text", value_parser = parse_kind)]
    kind: u8,

    /// Send this file's bytes as one frame instead of reading stdin.
    #[arg(long)]
    file: Option<PathBuf>,

    /// Write the bodies of non-text frames received into this directory.
    #[arg(long)]
    save_dir: Option<PathBuf>,

    /// After sending, wait for this many frames from other clients, then exit.
    #[arg(long, default_value_t = 0)]
    receive: usize,

    /// Seconds to wait for a connection, an echo, or frames asked for with --receive.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,

    /// Token for servers that require auth.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Connect with TLS.
    #[arg(long, env = "CHAT_TLS")]
    tls: bool,

    /// Trust the certificates in this PEM file (for example a self-signed server's)
    /// instead of the public web roots.
    #[arg(long, env = "CHAT_CA", requires = "tls")]
    ca: Option<PathBuf>,

    /// Name to verify the server's certificate against (default: the host of --server).
    #[arg(long, requires = "tls")]
    tls_name: Option<String>,

    /// Only check that the server answers (exit 0) or not (exit 1).
    #[arg(long)]
    probe: bool,

    /// Do not turn acknowledged delivery on. With acks (the default) a frame leaves
    /// the server only once this client has printed or saved it and said so.
    #[arg(long)]
    no_acks: bool,
}

fn parse_kind(s: &str) -> Result<u8, String> {
    match parse_type(s) {
        Some(0) | None => Err(format!(
            "`{s}` is not a data type (text, picture, voice, video, 1-255)"
        )),
        Some(k) => Ok(k),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match rt::block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return Err("--timeout must be a positive number of seconds".into());
    }
    let limit = Duration::from_secs_f64(args.timeout);
    let server = &args.server;
    let mut client = rt::timeout(limit, connect(&args))
        .await
        .ok_or_else(|| format!("no answer from {server} within {limit:?}"))?
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    if args.probe {
        return rt::timeout(limit, client.ping())
            .await
            .ok_or_else(|| format!("{server} did not answer a ping within {limit:?}"))?
            .map_err(|e| format!("{server}: {e}"));
    }
    let id = args
        .id
        .filter(|&id| id != 0)
        .ok_or("--id must be a number from 1 to 4294967295")?;
    let token = args.token.as_deref();
    let welcome = async {
        if args.no_acks {
            return client.hello(id, token).await.map(|early| (early, false));
        }
        client
            .hello_acks(id, token)
            .await
            .map(|on| (Vec::new(), on))
    };
    let (early, acks) = rt::timeout(limit, welcome)
        .await
        .ok_or_else(|| format!("{server} did not welcome id {id} within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    let mut printer = Printer {
        id,
        save_dir: args.save_dir.clone(),
        saved: 0,
        from_others: 0,
        acker: acks.then(|| Acker::new(id)),
    };
    for frame in &early {
        printer.show(frame)?;
    }
    let (sender, receiver) = client.split();
    if let Some(path) = &args.file {
        let body = read_body(path)?;
        let frames = vec![ClientFrame {
            sender: id,
            receiver: args.to,
            kind: args.kind,
            body: body.into(),
        }];
        return send_and_confirm(sender, receiver, frames, &mut printer, args.receive, limit).await;
    }
    if std::io::stdin().is_terminal() {
        eprintln!(
            "connected to {server} as {id}; type a line to send it to {}, Ctrl-D to quit",
            args.to
        );
        return interactive(sender, receiver, &mut printer, id, args.to).await;
    }
    let mut frames = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("cannot read stdin: {e}"))?;
        let body = Bytes::from(line.into_bytes());
        frames.push(ClientFrame {
            sender: id,
            receiver: args.to,
            kind: TEXT,
            body,
        });
    }
    send_and_confirm(sender, receiver, frames, &mut printer, args.receive, limit).await
}

async fn connect(args: &Args) -> std::io::Result<Client> {
    if !args.tls {
        return Client::connect(&args.server).await;
    }
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let host = args
        .server
        .rsplit_once(':')
        .map_or(args.server.as_str(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = chat::tls::server_name(args.tls_name.as_deref().unwrap_or(host)).map_err(invalid)?;
    let config = chat::tls::client_config(args.ca.as_deref()).map_err(invalid)?;
    Client::connect_tls(&args.server, name, config).await
}

/// A file's bytes, if they fit in one frame (the length field is 32 bits).
fn read_body(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let size = std::fs::metadata(path).map_err(cannot)?.len();
    if size > u64::from(u32::MAX) {
        return Err(format!(
            "{} is {size} bytes; one frame holds at most {} bytes",
            path.display(),
            u32::MAX
        ));
    }
    std::fs::read(path).map_err(cannot)
}

/// Sends `frames` while reading replies, until each has its echo and `receive` frames
/// from others have arrived. Any refusal makes the whole run fail.
async fn send_and_confirm(
    mut sender: Sender,
    mut receiver: Receiver,
    frames: Vec<ClientFrame>,
    printer: &mut Printer,
    receive: usize,
    limit: Duration,
) -> Result<(), String> {
    let expected = frames.len();
    // Acks go out through the sending task, after the frames, the latest one only.
    let (acks, mut acks_rx) = mpsc::unbounded::<ClientFrame>();
    let sending = rt::spawn(async move {
        for frame in &frames {
            sender.send(frame).await?;
        }
        while let Some(mut ack) = acks_rx.next().await {
            while let Ok(newer) = acks_rx.try_recv() {
                ack = newer;
            }
            sender.send(&ack).await?;
        }
        Ok::<_, std::io::Error>(sender)
    });
    let mut replies = 0;
    let mut refusals = 0;
    while replies < expected || printer.from_others < receive {
        let frame = match rt::timeout(limit, receiver.recv()).await {
            None => {
                return Err(format!(
                    "timed out after {limit:?}: {replies} of {expected} echoes, {} of {receive} frames received",
                    printer.from_others
                ));
            }
            Some(Ok(Some(frame))) => frame,
            Some(Ok(None)) => return Err("server closed the connection".into()),
            Some(Err(e)) => return Err(format!("connection lost: {e}")),
        };
        if let Some(ack) = printer.show(&frame)? {
            let _ = acks.unbounded_send(ack);
        }
        if frame.sender == printer.id {
            replies += 1;
        } else if let Some(n) = frame.notice() {
            replies += 1;
            refusals += 1;
            if !n.is(Code::MailboxFull) && !n.is(Code::StoreFailed) && !n.is(Code::BadSender) {
                return Err(format!("server said {n}"));
            }
        }
    }
    drop(acks);
    let mut sender = sending.await.map_err(|e| format!("cannot send: {e}"))?;
    let _ = sender.close().await;
    if refusals > 0 {
        return Err(format!("{refusals} of {expected} frames were refused"));
    }
    Ok(())
}

async fn interactive(
    mut sender: Sender,
    mut receiver: Receiver,
    printer: &mut Printer,
    id: u32,
    to: u32,
) -> Result<(), String> {
    // Reading a terminal blocks, so a plain thread does it.
    let (mut lines_tx, mut lines) = mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if futures::executor::block_on(lines_tx.send(line)).is_err() {
                break;
            }
        }
    });
    loop {
        match select(lines.next(), std::pin::pin!(receiver.recv())).await {
            Either::Left((Some(line), _)) => {
                let frame = ClientFrame {
                    sender: id,
                    receiver: to,
                    kind: TEXT,
                    body: line.into_bytes().into(),
                };
                sender
                    .send(&frame)
                    .await
                    .map_err(|e| format!("cannot send: {e}"))?;
            }
            Either::Left((None, _)) => return Ok(()),
            Either::Right((Ok(Some(frame)), _)) => {
                if let Some(ack) = printer.show(&frame)? {
                    sender
                        .send(&ack)
                        .await
                        .map_err(|e| format!("cannot send: {e}"))?;
                }
            }
            Either::Right((Ok(None), _)) => return Err("server closed the connection".into()),
            Either::Right((Err(e), _)) => return Err(format!("connection lost: {e}")),
        }
    }
}

struct Printer {
    id: u32,
    save_dir: Option<PathBuf>,
    saved: usize,
    from_others: usize,
    /// Present when acks are on.
    acker: Option<Acker>,
}

impl Printer {
    /// Prints (or saves) a frame; returns the ack to send once it is handled.
    fn show(&mut self, frame: &ServerFrame) -> Result<Option<ClientFrame>, String> {
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
