//! The link to the server: a bound connection, opened again when it drops (with
//! backoff and jitter), and the two ways a run uses it.

use std::io::BufRead;
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::{Either, select};
use futures::{SinkExt, StreamExt};

use chat::client::{Acker, Client, Receiver, Sender};
use chat::protocol::{ClientFrame, Code, TEXT};
use chat::rt;

use crate::Args;
use crate::printer::Printer;

/// How a session with the server ended, when it did not finish its work.
enum Ended {
    /// The connection dropped (or the server is stopping): worth reconnecting.
    Lost(String),
    /// The server asked to reconnect (`reconnect`: it is draining): at once.
    Asked(String),
    /// Anything else: report it and stop.
    Fatal(String),
}

/// Reconnecting starts after this long and backs off to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Binds the id on a new connection (with acks unless --no-acks) and prints what came
/// before the welcome.
pub async fn welcome(
    args: &Args,
    mut client: Client,
    printer: &mut Printer,
    limit: Duration,
) -> Result<(Sender, Receiver), String> {
    let id = printer.id;
    let server = &args.server;
    let token = args.token.as_deref();
    if let Some(device) = &args.device {
        let sync = rt::timeout(limit, client.session(id, device, token))
            .await
            .ok_or_else(|| format!("{server} did not welcome id {id} within {limit:?}"))?
            .map_err(|e| {
                format!("{e} (a session needs a server that keeps history, without --nats)")
            })?;
        // A session has acks on; they count from its welcome.
        printer.acker = Some(Acker::new(id));
        printer.session = true;
        crate::printer::describe(&sync);
        return Ok(client.split());
    }
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
pub struct Link<'a> {
    args: &'a Args,
    limit: Duration,
    reconnect: bool,
}

impl<'a> Link<'a> {
    /// `reconnect`: open the connection again when it drops.
    pub fn new(args: &'a Args, limit: Duration, reconnect: bool) -> Link<'a> {
        Link {
            args,
            limit,
            reconnect,
        }
    }

    /// After `ended`, a new bound connection, or why there is none.
    async fn again(
        &mut self,
        ended: Ended,
        printer: &mut Printer,
    ) -> Result<(Sender, Receiver), String> {
        let (why, mut wait) = match ended {
            Ended::Asked(why) if self.reconnect => (why, Duration::ZERO),
            Ended::Lost(why) if self.reconnect => (why, RETRY_MIN),
            Ended::Lost(why) | Ended::Asked(why) | Ended::Fatal(why) => return Err(why),
        };
        eprintln!("chat-client: {why}; reconnecting");
        let server = &self.args.server;
        let started = std::time::Instant::now();
        loop {
            if !wait.is_zero() {
                rt::sleep(jitter(wait)).await;
            }
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
            wait = (wait * 2).clamp(RETRY_MIN, RETRY_MAX);
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

pub async fn connect(args: &Args) -> std::io::Result<Client> {
    if args.proxy_local {
        return connect_as_proxy(args).await;
    }
    if !args.tls {
        return Client::connect(&args.server).await;
    }
    let (name, config) = tls_target(args)?;
    Client::connect_tls(&args.server, name, config).await
}

/// The name to verify the server's certificate as, and the roots to verify it with.
fn tls_target(
    args: &Args,
) -> std::io::Result<(
    chat::tls::TlsName<'static>,
    std::sync::Arc<chat::tls::ClientTlsConfig>,
)> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let host = args
        .server
        .rsplit_once(':')
        .map_or(args.server.as_str(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = chat::tls::server_name(args.tls_name.as_deref().unwrap_or(host)).map_err(invalid)?;
    let config = chat::tls::client_config(args.ca.as_deref()).map_err(invalid)?;
    Ok((name, config))
}

/// Connects as a proxy's health check does: a PROXY protocol `LOCAL` header first.
async fn connect_as_proxy(args: &Args) -> std::io::Result<Client> {
    use futures::AsyncWriteExt;
    let stream = chat::rt::TcpStream::connect(&args.server).await?;
    stream.set_nodelay(true)?;
    (&stream).write_all(&chat::server::proxy::LOCAL_V2).await?;
    if !args.tls {
        return Ok(Client::from_stream(stream));
    }
    let (name, config) = tls_target(args)?;
    Client::tls_over(stream, name, config).await
}

/// Sends `frames` while reading replies, until each has its echo and `--receive`
/// frames from others have arrived; after a reconnect, sends again those whose echoes
/// had not come. Any refusal makes the whole run fail.
pub async fn send_and_confirm(
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
        let frame = match printer.take(frame) {
            Ok((frame, ack)) => {
                if let Some(ack) = ack {
                    let _ = acks.unbounded_send(ack);
                }
                match frame {
                    Some(frame) => frame,
                    // A copy from another device, a record: shown, nothing to count.
                    None => continue,
                }
            }
            Err(e) => return Some(Ended::Fatal(e)),
        };
        if frame.sender == printer.id {
            *answered += 1;
        } else if let Some(n) = frame.notice() {
            if n.is(Code::Reconnect) {
                // The node is draining: a new connection reaches another one. Without
                // reconnecting, this one is still served until the node stops.
                if link.reconnect {
                    return Some(Ended::Asked(format!("server said {n}")));
                }
                continue;
            }
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

pub async fn interactive_session(
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
        let mut asked = false;
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
                let (frame, ack) = printer.take(frame)?;
                if let Some(frame) = frame {
                    let is_refusal = frame.notice().is_some_and(|n| {
                        n.is(Code::MailboxFull) || n.is(Code::StoreFailed) || n.is(Code::BadSender)
                    });
                    if frame.sender == id || is_refusal {
                        unechoed.pop_front();
                    }
                    if frame.notice().is_some_and(|n| n.is(Code::Replaced)) {
                        return Err("this id (or this device) connected elsewhere".into());
                    }
                    // An operator's doing: coming straight back would undo it.
                    if let Some(n) = frame.notice().filter(|n| n.is(Code::Disconnected)) {
                        return Err(format!("server said {n}"));
                    }
                    // The node is draining: a new connection reaches another one
                    // (without reconnecting, this one is served until the node stops).
                    asked |=
                        link.reconnect && frame.notice().is_some_and(|n| n.is(Code::Reconnect));
                }
                let asked_to = || Ended::Asked("the server asked to reconnect".into());
                match ack {
                    Some(ack) => match sender.send(&ack).await {
                        Ok(()) if !asked => continue,
                        Ok(()) => asked_to(),
                        Err(e) => Ended::Lost(format!("cannot send: {e}")),
                    },
                    None if !asked => continue,
                    None => asked_to(),
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
