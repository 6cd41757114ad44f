//! `chat-server`: serve the chat protocol, or mint auth tokens (`chat-server token`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::channel::oneshot;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use std::sync::Arc;

use chat::auth::{Auth, Keys, Secret};
use chat::node::Server;
use chat::rt;
use chat::server::Config;
use chat::store::{History, Limits, PerSender};
use chat::tls::ServerTls;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A TCP chat server speaking the seed's binary protocol"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address to listen on.
    #[arg(long, env = "CHAT_LISTEN", default_value = "0.0.0.0:8888")]
    listen: String,

    /// Directory for the offline mailbox (created if missing).
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "./data", global = true)]
    data_dir: PathBuf,

    /// Largest frame body accepted, in bytes; larger headers close the connection.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_frame_bytes: u32,

    /// Seconds a started frame may take to arrive completely.
    #[arg(long, env = "CHAT_FRAME_TIMEOUT", default_value_t = 30.0)]
    frame_timeout: f64,

    /// Connections served at once; more are refused with `server-busy`.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,

    /// Connections one client address may hold (TCP, TLS and WebSocket together);
    /// more get `server-busy`. 0: no bound. Default: a tenth of --max-connections. The
    /// HTTP listeners let an address hold a quarter of theirs, and never more than
    /// this. IPv6 addresses count by their /64.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,

    /// Every connection to the chat and web listeners opens with a PROXY protocol
    /// header (v1 or v2, HAProxy's `send-proxy-v2`) naming the client's address, for
    /// logs and --max-connections-per-ip. Connections without one are closed: only the
    /// proxy may reach these listeners then.
    #[arg(long, env = "CHAT_PROXY_PROTOCOL")]
    proxy_protocol: bool,

    /// Frames one connection may send per second (0: no limit). Over it, the server
    /// reads that connection more slowly: nothing is refused or lost.
    #[arg(long, env = "CHAT_RATE_FRAMES", default_value_t = 0)]
    rate_frames: u32,

    /// Bytes of data frames one connection may send per second (0: no limit).
    #[arg(long, env = "CHAT_RATE_BYTES", default_value_t = 0)]
    rate_bytes: u64,

    /// Seconds' worth of --rate-frames and --rate-bytes that may come at once after a
    /// quiet spell.
    #[arg(long, env = "CHAT_RATE_BURST", default_value_t = 2.0)]
    rate_burst: f64,

    /// Seconds a drain (SIGUSR1, or the admin API) waits for clients to reconnect
    /// elsewhere before the server stops anyway.
    #[arg(long, env = "CHAT_DRAIN_TIMEOUT", default_value_t = 30.0)]
    drain_timeout: f64,

    /// With --nats: seconds a sender waits at most for a frame's outcome (it may wait
    /// on another node or on NATS); then it gets `store-failed` saying the frame may
    /// still be delivered (docs/CLUSTER.md).
    #[arg(long, env = "CHAT_ANSWER_WITHIN", default_value_t = 2.0)]
    answer_within: f64,

    /// Bytes that may wait for one receiver before it is cut off as a slow consumer.
    #[arg(long, env = "CHAT_MAX_PENDING_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_pending_bytes: usize,

    /// Frames one receiver's offline mailbox may hold.
    #[arg(long, env = "CHAT_MAILBOX_MAX_MESSAGES", default_value_t = 10_000)]
    mailbox_max_messages: u64,

    /// Bytes one receiver's offline mailbox may hold.
    #[arg(long, env = "CHAT_MAILBOX_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    mailbox_max_bytes: u64,

    /// Frames one sender may have waiting in one receiver's mailbox; more get
    /// `mailbox-full` while other senders still get through. Default: a quarter of
    /// --mailbox-max-messages. One node only: with --nats the stream bounds each
    /// receiver's mailbox as a whole.
    #[arg(long, env = "CHAT_MAILBOX_MAX_PER_SENDER")]
    mailbox_max_per_sender: Option<u64>,

    /// Bytes one sender's frames may take in one receiver's mailbox. Default: a
    /// quarter of --mailbox-max-bytes, and at least one largest frame.
    #[arg(long, env = "CHAT_MAILBOX_MAX_BYTES_PER_SENDER")]
    mailbox_max_bytes_per_sender: Option<u64>,

    /// How long conversations are kept after delivery, for sessions' history queries:
    /// 30d, 12h, 90m, 45s (or seconds); 0 turns history off (a frame is removed once
    /// every device of its receiver has it; with --nats, sessions are then refused).
    #[arg(long, env = "CHAT_HISTORY_MAX_AGE", default_value = "30d", value_parser = parse_age)]
    history_max_age: Duration,

    /// Messages one conversation's history may hold; the oldest go first. With
    /// --nats: blocks of up to 256 messages.
    #[arg(long, env = "CHAT_HISTORY_MAX_MESSAGES", default_value_t = 50_000)]
    history_max_messages: u64,

    /// Bytes one conversation's history may hold; the oldest go first. One node only
    /// (JetStream 2.9 bounds no subject's bytes).
    #[arg(long, env = "CHAT_HISTORY_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    history_max_bytes: u64,

    /// Named devices (sessions) one id may have; a new one past it replaces the one
    /// seen longest ago that is offline. Clients without a session are the id's
    /// default device, which does not count. With --nats: the devices each node saw.
    #[arg(long, env = "CHAT_MAX_DEVICES", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_devices: u16,

    /// Require hello tokens made with this secret (prefer --auth-secret-file).
    #[arg(
        long,
        env = "CHAT_AUTH_SECRET",
        hide_env_values = true,
        conflicts_with = "auth_secret_file"
    )]
    auth_secret: Option<String>,

    /// Read the auth secrets from a file, one per line: the first mints tokens, every
    /// one verifies them. SIGHUP reads it again.
    #[arg(long, env = "CHAT_AUTH_SECRET_FILE")]
    auth_secret_file: Option<PathBuf>,

    /// Refuse tokens without an expiry (those minted without --ttl).
    #[arg(long, env = "CHAT_AUTH_REQUIRE_EXPIRY")]
    auth_require_expiry: bool,

    /// Serve TLS with this PEM certificate chain (needs --tls-key). SIGHUP reads the
    /// certificate and key again.
    #[arg(long, env = "CHAT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key for --tls-cert.
    #[arg(long, env = "CHAT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Serve Prometheus metrics (/metrics), health (/healthz) and readiness (/readyz)
    /// over HTTP on this address, e.g. 127.0.0.1:9090. Off by default.
    #[arg(long, env = "CHAT_METRICS_LISTEN")]
    metrics_listen: Option<String>,

    /// Serve the admin API (docs/ADMIN.md) over HTTP on this address, e.g.
    /// 127.0.0.1:9200. Off by default; needs --admin-token-file.
    #[arg(long, env = "CHAT_ADMIN_LISTEN", requires = "admin_token_file")]
    admin_listen: Option<String>,

    /// The admin API's bearer token: the file's first line.
    #[arg(long, env = "CHAT_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,

    /// Serve the web client at / and the protocol over WebSocket at /ws on this
    /// address, e.g. 0.0.0.0:8080 (HTTPS and WSS with --tls-cert). Off by default.
    #[arg(long, env = "CHAT_WEB_LISTEN")]
    web_listen: Option<String>,

    /// A browser origin allowed to open the WebSocket, e.g. `https://chat.example.com`
    /// (repeatable; `*` allows any). Default: only pages served by this listener, so
    /// another site cannot use a visitor's browser to chat as them.
    #[arg(
        long = "web-allowed-origin",
        env = "CHAT_WEB_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    web_allowed_origins: Vec<String>,

    /// Join a cluster through these NATS servers (comma-separated `nats://` or `tls://`
    /// URLs; `user:password@` in a URL logs in). Frames are then kept in JetStream,
    /// shared by every node, instead of --data-dir.
    #[arg(long, env = "CHAT_NATS")]
    nats: Option<String>,

    /// This node's name in logs and in the cluster (default: the host name).
    #[arg(long, env = "CHAT_NODE_NAME")]
    node_name: Option<String>,

    /// Copies JetStream keeps of each frame (default: 3 on a cluster of three or more
    /// NATS servers, else 1).
    #[arg(long, env = "CHAT_NATS_REPLICAS", requires = "nats")]
    nats_replicas: Option<usize>,

    /// CA certificate (PEM) that signed the NATS servers' certificates, for tls:// URLs.
    #[arg(long, env = "CHAT_NATS_CA", requires = "nats")]
    nats_ca: Option<PathBuf>,

    /// error, warn, info, debug or trace.
    #[arg(long, env = "CHAT_LOG_LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Rewrite the store's file in --data-dir with only what it holds now, so what was
    /// deleted (an id an operator forgot, pruned history) leaves the disk too. Stop the
    /// server first; a file in use is refused.
    Vacuum,
    /// Print the token that lets a client use an id (needs the auth secret).
    Token {
        #[arg(long)]
        id: u32,
        /// Make the token stop working after this long: 30s, 15m, 12h, 90d.
        #[arg(long, value_parser = chat::auth::parse_ttl)]
        ttl: Option<Duration>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A duration as `30d`, `12h`, `90m`, `45s` or plain seconds.
fn parse_age(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30d, 12h, 90m or 45s"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    n.checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn run(args: Args) -> Result<(), String> {
    if let Some(Command::Vacuum) = args.command {
        let done = chat::store::vacuum(&args.data_dir).map_err(|e| e.to_string())?;
        println!(
            "vacuumed {}: {} bytes, {} before",
            args.data_dir.join(chat::store::FILE).display(),
            done.after,
            done.before
        );
        return Ok(());
    }
    let keys = keys(&args)?;
    if let Some(Command::Token { id, ttl }) = args.command {
        let keys = keys.ok_or("token needs --auth-secret or --auth-secret-file")?;
        println!("{}", keys.mint(id, ttl));
        return Ok(());
    }
    femme::with_level(args.log_level);
    if !(args.frame_timeout > 0.0 && args.frame_timeout.is_finite()) {
        return Err("--frame-timeout must be a positive number of seconds".into());
    }
    if !(args.drain_timeout > 0.0 && args.drain_timeout <= 86_400.0) {
        return Err("--drain-timeout must be a number of seconds above 0, at most 86400".into());
    }
    if !(args.answer_within >= 0.5 && args.answer_within <= 3_600.0) {
        return Err("--answer-within must be a number of seconds from 0.5 to 3600".into());
    }
    if !(args.rate_burst > 0.0 && args.rate_burst <= 86_400.0) {
        return Err("--rate-burst must be a number of seconds above 0, at most 86400".into());
    }
    let config = Config {
        max_frame_bytes: args.max_frame_bytes,
        frame_timeout: Duration::from_secs_f64(args.frame_timeout),
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        proxy_protocol: args.proxy_protocol,
        drain_timeout: Duration::from_secs_f64(args.drain_timeout),
        answer_within: Duration::from_secs_f64(args.answer_within),
        rate: chat::server::rate::RateLimits {
            frames: args.rate_frames,
            bytes: args.rate_bytes,
            burst: Duration::from_secs_f64(args.rate_burst),
        },
        max_pending_bytes: args.max_pending_bytes,
        mailbox: Limits {
            max_messages: args.mailbox_max_messages,
            max_bytes: args.mailbox_max_bytes,
            per_sender: {
                let largest =
                    u64::from(args.max_frame_bytes) + chat::protocol::SERVER_HEADER_LEN as u64;
                let quarter = PerSender::quarter_of(
                    args.mailbox_max_messages,
                    args.mailbox_max_bytes,
                    largest,
                );
                PerSender {
                    messages: args.mailbox_max_per_sender.unwrap_or(quarter.messages),
                    bytes: args.mailbox_max_bytes_per_sender.unwrap_or(quarter.bytes),
                }
            },
        },
        history: History {
            max_age: args.history_max_age,
            max_messages: args.history_max_messages,
            max_bytes: args.history_max_bytes,
        },
        max_devices: usize::from(args.max_devices),
        auth: keys.map(|k| Auth::new(k, args.auth_require_expiry)),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls::new(chat::tls::server_config(cert, key)?)),
            _ => None,
        },
        metrics_listen: args.metrics_listen.clone(),
        admin: admin(&args)?,
        web_listen: args.web_listen.clone(),
        web_origins: chat::server::config::Origins {
            allowed: args.web_allowed_origins.clone(),
        },
        nats: args.nats.as_ref().map(|urls| chat::cluster::Options {
            urls: urls.clone(),
            node: args.node_name.clone().unwrap_or_else(host_name),
            replicas: args.nats_replicas,
            ca: args.nats_ca.clone(),
        }),
        ..Config::new(args.listen.clone(), args.data_dir.clone())
    };
    if config.tls.is_some() {
        log::info!("serving TLS");
    }
    if config.auth.is_some() {
        log::info!("auth required: every connection must open with a hello and a token");
    }
    reload_on_sighup(&args, config.auth.clone(), config.tls.clone())?;
    let stop = stop_signal()?;
    let drain_timeout = config.drain_timeout;
    rt::block_on(async {
        let server = Server::bind(config).await.map_err(|e| e.to_string())?;
        drain_on_sigusr1(server.drain(), drain_timeout)?;
        server.run(stop).await;
        Ok(())
    })
}

/// The admin API's settings, when --admin-listen asks for it.
fn admin(args: &Args) -> Result<Option<chat::server::config::Admin>, String> {
    let (Some(listen), Some(path)) = (&args.admin_listen, &args.admin_token_file) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = chat::server::config::AdminToken::new(&text).ok_or_else(|| {
        format!(
            "{}: the first line must hold the admin token, and it is empty",
            path.display()
        )
    })?;
    Ok(Some(chat::server::config::Admin {
        listen: listen.clone(),
        token: Arc::new(token),
        limits: chat::server::config::HttpLimits::ADMIN,
    }))
}

/// The machine's host name, the default node name.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "chat".to_string(),
    }
}

fn keys(args: &Args) -> Result<Option<Keys>, String> {
    if let Some(s) = &args.auth_secret {
        return Secret::new(s.as_bytes())
            .map(|s| Some(Keys::from(s)))
            .map_err(|e| e.to_string());
    }
    let Some(path) = &args.auth_secret_file else {
        return Ok(None);
    };
    read_keys(path).map(Some)
}

fn read_keys(path: &std::path::Path) -> Result<Keys, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Keys::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// On SIGHUP, reads the auth secret file and the TLS certificate and key again and
/// swaps them in; connections stay. A reload that fails keeps the old settings.
fn reload_on_sighup(
    args: &Args,
    auth: Option<Arc<Auth>>,
    tls: Option<Arc<ServerTls>>,
) -> Result<(), String> {
    let mut signals = Signals::new([SIGHUP]).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    let secret_file = args.auth_secret_file.clone().filter(|_| auth.is_some());
    let cert = args.tls_cert.clone().zip(args.tls_key.clone());
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let mut done = Vec::new();
            if let (Some(auth), Some(path)) = (&auth, &secret_file) {
                match read_keys(path) {
                    Ok(keys) => done.push(format!("{} auth secrets", auth.replace(keys))),
                    Err(e) => log::warn!("reload: keeping the old auth secrets: {e}"),
                }
            }
            if let (Some(tls), Some((cert, key))) = (&tls, &cert) {
                match chat::tls::server_config(cert, key) {
                    Ok(config) => {
                        tls.replace(config);
                        done.push("the TLS certificate".to_string());
                    }
                    Err(e) => log::warn!("reload: keeping the old TLS certificate: {e}"),
                }
            }
            if done.is_empty() {
                log::info!("SIGHUP: nothing reloaded");
            } else {
                log::info!("SIGHUP: reloaded {}", done.join(" and "));
            }
        }
    });
    Ok(())
}

/// On SIGUSR1, drains the server: it stops accepting, asks its clients to reconnect
/// elsewhere, and stops once they have gone or `deadline` has passed.
fn drain_on_sigusr1(
    drain: Arc<chat::server::drain::Drain>,
    deadline: Duration,
) -> Result<(), String> {
    let mut signals = Signals::new([SIGUSR1]).map_err(|e| format!("cannot handle SIGUSR1: {e}"))?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if drain.start(deadline) {
                log::info!("SIGUSR1: draining within {deadline:?}");
            } else {
                log::info!("SIGUSR1: already draining or stopping");
            }
        }
    });
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for signal in signals.forever() {
            match tx.take() {
                Some(tx) => {
                    log::info!("signal {signal}: shutting down");
                    let _ = tx.send(());
                }
                None => std::process::exit(130),
            }
        }
    });
    Ok(async {
        let _ = rx.await;
    })
}
