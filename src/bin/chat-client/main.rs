//! `chat-client`: talk to a chat server from a terminal or a script.
//!
//! On a terminal, each line typed is sent and everything received is printed. With
//! stdin from a pipe or file, every line is sent, each one's echo is awaited, and the
//! exit code says whether all were accepted.
//!
//! On a terminal and with `--receive`, a dropped connection is opened again (with
//! backoff and jitter): the id is bound again, acks turned on again, and the frames whose
//! echoes had not come are sent again, so a frame can arrive twice (at least once).
//!
//! `main.rs` holds the command line and what a run does; `session.rs` the reconnecting
//! link to the server and the two ways of using it (sending a batch and confirming it,
//! or a terminal session); `printer.rs` how received frames are shown and acknowledged.

mod printer;
mod session;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;

use chat::client::Client;
use chat::protocol::session::{Before, Device, Query, Received, Record};
use chat::protocol::{ClientFrame, TEXT, parse_type, type_name};
use chat::rt;
use printer::Printer;
use session::{Link, connect, interactive_session, send_and_confirm, welcome};

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

    /// Open the connection with a PROXY protocol LOCAL header, as a load balancer's
    /// health check does: for probing a server run with --proxy-protocol.
    #[arg(long, env = "CHAT_PROXY_PROTOCOL")]
    proxy_local: bool,

    /// Do not turn acknowledged delivery on. With acks (the default) a frame leaves
    /// the server only once this client has printed or saved it and said so.
    #[arg(long)]
    no_acks: bool,

    /// On a terminal and with --receive, do not reconnect when the connection drops.
    #[arg(long)]
    no_reconnect: bool,

    /// Open a session as this device of the id (a name of your choice: laptop,
    /// phone): several devices of one id are online at once, each gets every frame,
    /// copies of what the others send, and what it missed when it comes back; on a
    /// terminal the last messages with --to are shown first. Acks are on.
    #[arg(long, env = "CHAT_DEVICE", value_parser = parse_device, conflicts_with = "no_acks")]
    device: Option<Device>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print a conversation's history, oldest first, and exit (opens a session as
    /// --device, "chat-client" if not given).
    History {
        /// The other id of the conversation.
        #[arg(long = "with", value_parser = parse_id)]
        with: u32,
        /// How many of the newest messages (the server gives at most 100 a page; more
        /// are read page by page).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

fn parse_device(s: &str) -> Result<Device, String> {
    Device::new(s).map_err(|e| e.to_string())
}

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
    if let Some(Command::History { with, limit: count }) = args.command {
        return rt::timeout(limit, history(&args, client, id, with, count))
            .await
            .ok_or_else(|| format!("{server} did not answer within {limit:?}"))?;
    }
    let mut printer = Printer::new(id, args.save_dir.clone());
    let mut session = welcome(&args, client, &mut printer, limit).await?;
    let interactive = args.file.is_none() && std::io::stdin().is_terminal();
    if interactive && printer.session && args.to != 0 {
        // The last messages with --to, shown oldest first when the page ends.
        let recent = Query::History {
            request: 1,
            conversation: args.to,
            before: Before::Newest,
            limit: 10,
        };
        session
            .0
            .send(&recent.frame(id))
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
    }
    let reconnect = !args.no_reconnect && (interactive || args.receive > 0);
    let mut link = Link::new(&args, limit, reconnect);
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

/// `chat-client history`: the newest `count` messages of `id`'s conversation with
/// `with`, printed oldest first, read page by page through a session. Frames that
/// waited for the device are left unacknowledged: its next session gets them.
async fn history(
    args: &Args,
    mut client: Client,
    id: u32,
    with: u32,
    count: u32,
) -> Result<(), String> {
    let server = &args.server;
    let device = match &args.device {
        Some(d) => d.clone(),
        None => Device::new("chat-client").map_err(|e| e.to_string())?,
    };
    client
        .session(id, &device, args.token.as_deref())
        .await
        .map_err(|e| {
            format!("{server}: {e} (history needs a server that keeps it, without --nats)")
        })?;
    let mut got: Vec<String> = Vec::new();
    let mut before = Before::Newest;
    let mut request = 0;
    while got.len() < count as usize {
        request += 1;
        let want = (count as usize - got.len()).min(100) as u16;
        let q = Query::History {
            request,
            conversation: with,
            before,
            limit: want,
        };
        client
            .send(&q.frame(id))
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let more = loop {
            let received = client
                .recv_session()
                .await
                .map_err(|e| format!("connection lost: {e}"))?
                .ok_or("server closed the connection")?;
            match received {
                Received::Message {
                    sender,
                    kind,
                    envelope,
                    payload,
                } if envelope.request == request => {
                    let who = match sender == id {
                        true => "you".to_string(),
                        false => sender.to_string(),
                    };
                    let name = type_name(kind);
                    got.push(match kind {
                        TEXT => format!("[{who}] {name}: {}", String::from_utf8_lossy(&payload)),
                        _ => format!("[{who}] {name}: {} bytes", payload.len()),
                    });
                }
                Received::Record(Record::PageEnd {
                    request: r,
                    more,
                    next,
                }) if r == request => {
                    before = Before::Offset(next);
                    break more;
                }
                Received::Record(Record::QueryFailed { why, .. }) => {
                    return Err(format!("{server} refused the query: {why}"));
                }
                _ => {}
            }
        };
        if !more {
            break;
        }
    }
    for line in got.iter().rev() {
        println!("{line}");
    }
    Ok(())
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
