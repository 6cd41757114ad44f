//! `chat-server`: serve the chat protocol, or mint auth tokens (`chat-server token`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::channel::oneshot;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use chat::auth::Secret;
use chat::rt;
use chat::server::{Config, Server};
use chat::store::Limits;

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
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "./data")]
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

    /// Bytes that may wait for one receiver before it is cut off as a slow consumer.
    #[arg(long, env = "CHAT_MAX_PENDING_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_pending_bytes: usize,

    /// Frames one receiver's offline mailbox may hold.
    #[arg(long, env = "CHAT_MAILBOX_MAX_MESSAGES", default_value_t = 10_000)]
    mailbox_max_messages: u64,

    /// Bytes one receiver's offline mailbox may hold.
    #[arg(long, env = "CHAT_MAILBOX_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    mailbox_max_bytes: u64,

    /// Require hello tokens made with this secret (prefer --auth-secret-file).
    #[arg(
        long,
        env = "CHAT_AUTH_SECRET",
        hide_env_values = true,
        conflicts_with = "auth_secret_file"
    )]
    auth_secret: Option<String>,

    /// Read the auth secret from a file.
    #[arg(long, env = "CHAT_AUTH_SECRET_FILE")]
    auth_secret_file: Option<PathBuf>,

    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CHAT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key for --tls-cert.
    #[arg(long, env = "CHAT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// error, warn, info, debug or trace.
    #[arg(long, env = "CHAT_LOG_LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the token that lets a client use an id (needs the auth secret).
    Token {
        #[arg(long)]
        id: u32,
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

fn run(args: Args) -> Result<(), String> {
    let secret = secret(&args)?;
    if let Some(Command::Token { id }) = args.command {
        let secret = secret.ok_or("token needs --auth-secret or --auth-secret-file")?;
        println!("{}", secret.token(id));
        return Ok(());
    }
    femme::with_level(args.log_level);
    if !(args.frame_timeout > 0.0 && args.frame_timeout.is_finite()) {
        return Err("--frame-timeout must be a positive number of seconds".into());
    }
    let config = Config {
        max_frame_bytes: args.max_frame_bytes,
        frame_timeout: Duration::from_secs_f64(args.frame_timeout),
        max_connections: args.max_connections,
        max_pending_bytes: args.max_pending_bytes,
        mailbox: Limits {
            max_messages: args.mailbox_max_messages,
            max_bytes: args.mailbox_max_bytes,
        },
        auth: secret,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(chat::tls::server_config(cert, key)?),
            _ => None,
        },
        ..Config::new(args.listen, args.data_dir)
    };
    if config.tls.is_some() {
        log::info!("serving TLS");
    }
    if config.auth.is_some() {
        log::info!("auth required: every connection must open with a hello and a token");
    }
    let stop = stop_signal()?;
    rt::block_on(async {
        let server = Server::bind(config).await?;
        server.run(stop).await;
        Ok(())
    })
}

fn secret(args: &Args) -> Result<Option<Secret>, String> {
    if let Some(s) = &args.auth_secret {
        return Secret::new(s.as_bytes()).map(Some);
    }
    let Some(path) = &args.auth_secret_file else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Secret::new(bytes).map(Some)
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
