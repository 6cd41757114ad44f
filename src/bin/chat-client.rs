//! `chat-client`: talk to a chat server from a terminal or a script.
//!
//! On a terminal, each line typed is sent and everything received is printed. With
//! stdin from a pipe or file, every line is sent, each one's echo is awaited, and the
//! exit code says whether all were accepted.
//!
//! On a terminal and with `--receive`, a dropped connection is opened again (with
//! backoff and jitter): the id is bound again, acks turned on again, and the frames whose
//! echoes had not come are sent again, so a frame can arrive twice (at least once).

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
    #[arg(long, env = "CHAT_ID", required_unless_present = "probe", value_parser = parse_id)]
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

    /// On a terminal and with --receive, do not reconnect when the connection drops.
    #[arg(long)]
    no_reconnect: bool,
}

/// How a session with the server ended, when it did not finish its work.
enum Ended {
    /// The connection dropped (or the server is stopping): worth reconnecting.
    Lost(String),
    /// Anything else: report it and stop.
    Fatal(String),
}

/// Reconnecting starts after this long and backs off to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// An id: any u32 but 0, which is the server's.
fn parse_id(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 is the server's id; yours is 1-4294967295".into()),
        Ok(id) => Ok(id),
        Err(e) => Err(format!("not an id: {e}")),
    }
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
    let mut printer = Printer {
        id,
        save_dir: args.save_dir.clone(),
        saved: 0,
        from_others: 0,
        acker: None,
    };
    let session = welcome(&args, client, &mut printer, limit).await?;
    let interactive = args.file.is_none() && std::io::stdin().is_terminal();
    let reconnect = !args.no_reconnect && (interactive || args.receive > 0);
    let mut link = Link {
        args: &args,
        limit,
        reconnect,
    };
    if let Some(path) = &args.file {
        let body = read_body(path)?;
        let frames = vec![ClientFrame {
            sender: id,
            receiver: args.to,
            kind: args.kind,
            body: body.into(),
        }];
        return send_and_confirm(&mut link, session, frames, &mut printer).await;
    }
    if interactive {
        eprintln!(
            "connected to {server} as {id}; type a line to send it to {}, Ctrl-D to quit",
            args.to
        );
        return interactive_session(&mut link, session, &mut printer).await;
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
    send_and_confirm(&mut link, session, frames, &mut printer).await
}

/// Binds the id on a new connection (with acks unless --no-acks) and prints what came
/// before the welcome.
async fn welcome(
    args: &Args,
    mut client: Client,
    printer: &mut Printer,
    limit: Duration,
) -> Result<(Sender, Receiver), String> {
    let id = printer.id;
    let server = &args.server;
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
    // Acks count from the welcome of each connection.
    printer.acker = acks.then(|| Acker::new(id));
    for frame in &early {
        printer.show(frame)?;
    }
    Ok(client.split())
}

/// What reconnecting needs.
struct Link<'a> {
    args: &'a Args,
    limit: Duration,
    reconnect: bool,
}

impl Link<'_> {
    /// After `ended`, a new bound connection, or why there is none.
    async fn again(
        &mut self,
        ended: Ended,
        printer: &mut Printer,
    ) -> Result<(Sender, Receiver), String> {
        let why = match ended {
            Ended::Lost(why) if self.reconnect => why,
            Ended::Lost(why) | Ended::Fatal(why) => return Err(why),
        };
        eprintln!("chat-client: {why}; reconnecting");
        let server = &self.args.server;
        let started = std::time::Instant::now();
        let mut wait = RETRY_MIN;
        loop {
            rt::sleep(jitter(wait)).await;
            let attempt = rt::timeout(self.limit, connect(self.args)).await;
            if let Some(Ok(client)) = attempt {
                match welcome(self.args, client, printer, self.limit).await {
                    Ok(session) => {
                        eprintln!("chat-client: reconnected to {server}");
                        return Ok(session);
                    }
                    Err(e) => eprintln!("chat-client: {e}"),
                }
            }
            if started.elapsed() > self.limit.max(RETRY_MAX * 6) {
                return Err(format!("cannot reconnect to {server}: gave up"));
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}

/// `wait`, plus or minus up to half of it, so that clients dropped together do not
/// all come back at the same instant.
fn jitter(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = wait.as_millis() as u64;
    let offset = u64::from(nanos) % (spread + 1);
    Duration::from_millis(spread / 2 + offset)
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

/// Sends `frames` while reading replies, until each has its echo and `--receive`
/// frames from others have arrived; after a reconnect, sends again those whose echoes
/// had not come. Any refusal makes the whole run fail.
async fn send_and_confirm(
    link: &mut Link<'_>,
    mut session: (Sender, Receiver),
    frames: Vec<ClientFrame>,
    printer: &mut Printer,
) -> Result<(), String> {
    let mut answered = 0;
    let mut refusals = 0;
    loop {
        let (sender, receiver) = session;
        let ended = confirm(
            link,
            sender,
            receiver,
            &frames,
            printer,
            &mut answered,
            &mut refusals,
        )
        .await;
        match ended {
            None => break,
            Some(ended) => session = link.again(ended, printer).await?,
        }
    }
    if refusals > 0 {
        return Err(format!(
            "{refusals} of {} frames were refused",
            frames.len()
        ));
    }
    Ok(())
}

/// One connection's part of [`send_and_confirm`]: `None` once everything is done.
async fn confirm(
    link: &Link<'_>,
    mut sender: Sender,
    mut receiver: Receiver,
    frames: &[ClientFrame],
    printer: &mut Printer,
    answered: &mut usize,
    refusals: &mut usize,
) -> Option<Ended> {
    let (expected, receive, limit) = (frames.len(), link.args.receive, link.limit);
    let unanswered = frames[*answered..].to_vec();
    // Acks go out through the sending task, after the frames, the latest one only.
    let (acks, mut acks_rx) = mpsc::unbounded::<ClientFrame>();
    let sending = rt::spawn(async move {
        for frame in &unanswered {
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
    while *answered < expected || printer.from_others < receive {
        let frame = match rt::timeout(limit, receiver.recv()).await {
            None => {
                return Some(Ended::Fatal(format!(
                    "timed out after {limit:?}: {answered} of {expected} echoes, {} of {receive} frames received",
                    printer.from_others
                )));
            }
            Some(Ok(Some(frame))) => frame,
            Some(Ok(None)) => return Some(Ended::Lost("server closed the connection".into())),
            Some(Err(e)) => return Some(Ended::Lost(format!("connection lost: {e}"))),
        };
        match printer.show(&frame) {
            Ok(Some(ack)) => {
                let _ = acks.unbounded_send(ack);
            }
            Ok(None) => {}
            Err(e) => return Some(Ended::Fatal(e)),
        }
        if frame.sender == printer.id {
            *answered += 1;
        } else if let Some(n) = frame.notice() {
            if n.is(Code::ShuttingDown) || n.is(Code::SlowConsumer) {
                // The connection ends next; what was not echoed is sent again.
                continue;
            }
            *answered += 1;
            *refusals += 1;
            if !n.is(Code::MailboxFull) && !n.is(Code::StoreFailed) && !n.is(Code::BadSender) {
                return Some(Ended::Fatal(format!("server said {n}")));
            }
        }
    }
    drop(acks);
    if let Ok(mut sender) = sending.await {
        let _ = sender.close().await;
    }
    None
}

async fn interactive_session(
    link: &mut Link<'_>,
    session: (Sender, Receiver),
    printer: &mut Printer,
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
    let (id, to) = (printer.id, link.args.to);
    // Frames sent whose echoes have not come: sent again after a reconnect.
    let mut unechoed: std::collections::VecDeque<ClientFrame> = Default::default();
    let (mut sender, mut receiver) = session;
    loop {
        let ended = match select(lines.next(), std::pin::pin!(receiver.recv())).await {
            Either::Left((Some(line), _)) => {
                let frame = ClientFrame {
                    sender: id,
                    receiver: to,
                    kind: TEXT,
                    body: line.into_bytes().into(),
                };
                let sent = sender.send(&frame).await;
                unechoed.push_back(frame);
                match sent {
                    Ok(()) => continue,
                    Err(e) => Ended::Lost(format!("cannot send: {e}")),
                }
            }
            Either::Left((None, _)) => return Ok(()),
            Either::Right((Ok(Some(frame)), _)) => {
                let is_refusal = frame.notice().is_some_and(|n| {
                    n.is(Code::MailboxFull) || n.is(Code::StoreFailed) || n.is(Code::BadSender)
                });
                if frame.sender == id || is_refusal {
                    unechoed.pop_front();
                }
                if frame.notice().is_some_and(|n| n.is(Code::Replaced)) {
                    printer.show(&frame)?;
                    return Err("this id connected elsewhere".into());
                }
                match printer.show(&frame)? {
                    Some(ack) => match sender.send(&ack).await {
                        Ok(()) => continue,
                        Err(e) => Ended::Lost(format!("cannot send: {e}")),
                    },
                    None => continue,
                }
            }
            Either::Right((Ok(None), _)) => Ended::Lost("server closed the connection".into()),
            Either::Right((Err(e), _)) => Ended::Lost(format!("connection lost: {e}")),
        };
        (sender, receiver) = link.again(ended, printer).await?;
        for frame in &unechoed {
            if let Err(e) = sender.send(frame).await {
                eprintln!("chat-client: cannot send: {e}");
                break;
            }
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
