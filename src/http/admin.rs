//! The admin API (`--admin-listen`, docs/ADMIN.md): what an operator can see and do
//! while the server runs: list connections, disconnect one or all of an id's, block and
//! unblock ids, see and delete what is stored for an id, and read the server's
//! version, uptime and settings.
//!
//! Every request needs `Authorization: Bearer <token>` (`--admin-token-file`),
//! compared in constant time; without it, 401 and nothing happens. Answers are JSON,
//! errors too (`{"error": "..."}` with a 4xx), and a request body, where one is taken,
//! is at most 4 KiB of JSON with no unknown fields. The listener is bounded like the
//! others (16 connections, 4 per address, headers in 5 s). In a cluster a node answers
//! for itself only, and every answer names the node.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::channel::oneshot;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use smol_hyper::rt::FuturesIo;

use super::serve::{accept, builder};
use crate::rt::{self, TcpListener};
use crate::server::config::{Admin, Shared};
use crate::server::directory::ConnInfo;
use crate::server::event::{Event, Who};
use crate::store::Stored;

/// Largest request body taken.
const MAX_BODY: usize = 4096;
/// Connections listed per page when the request does not say, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// How long a call waits for the store (a cluster's waits up to 5 s for JetStream).
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin API until `stop` completes.
pub async fn run_admin(
    listener: TcpListener,
    admin: Admin,
    shared: Arc<Shared>,
    stop: impl Future<Output = ()>,
) {
    let started = Instant::now();
    let limits = admin.limits;
    let metrics = shared.metrics.clone();
    let admin = Arc::new(admin);
    accept(listener, &limits, false, metrics, stop, move |stream, _| {
        let (shared, admin) = (shared.clone(), admin.clone());
        async move {
            let service = service_fn(move |req| {
                let (shared, admin) = (shared.clone(), admin.clone());
                async move {
                    let answer = respond(req, &admin, &shared, started).await;
                    Ok::<_, Infallible>(answer.into_response())
                }
            });
            let conn = builder(&limits).serve_connection(FuturesIo::new(stream), service);
            if let Some(Err(e)) = rt::timeout(limits.connection_time, conn).await {
                log::debug!("admin connection: {e}");
            }
        }
    })
    .await
}

/// An answer: a status and a JSON body.
struct Answer {
    status: StatusCode,
    body: serde_json::Value,
}

impl Answer {
    fn ok(body: impl Serialize) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
        }
    }

    fn error(status: StatusCode, why: impl std::fmt::Display) -> Answer {
        Answer {
            status,
            body: serde_json::json!({ "error": why.to_string() }),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut body = serde_json::to_vec_pretty(&self.body).unwrap_or_default();
        body.push(b'\n');
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

async fn respond(
    req: Request<Incoming>,
    admin: &Admin,
    shared: &Shared,
    started: Instant,
) -> Answer {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if !presented.is_some_and(|t| admin.token.matches(t)) {
        if let Some(m) = &shared.metrics {
            m.admin_refused.inc();
        }
        return Answer::error(
            StatusCode::UNAUTHORIZED,
            "this needs Authorization: Bearer <the token in --admin-token-file>",
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let answer = match (&method, parts.as_slice()) {
        (&Method::GET, ["v1", "info"]) => info(shared, started),
        (&Method::GET, ["v1", "connections"]) => connections(shared, &query),
        (&Method::DELETE, ["v1", "connections", conn]) => match conn.parse() {
            Ok(conn) if shared.directory.has(conn) => {
                disconnect(shared, Who::Conn(conn), "by an operator", 1).await
            }
            Ok(conn) => Answer::error(StatusCode::NOT_FOUND, format!("no connection {conn}")),
            Err(_) => bad_number("a connection", conn),
        },
        (&Method::DELETE, ["v1", "ids", id, "connections"]) => match parse_id(id) {
            Ok(id) => {
                let n = shared.directory.of(id).len();
                if n == 0 {
                    Answer::error(StatusCode::NOT_FOUND, format!("id {id} is not connected"))
                } else {
                    disconnect(shared, Who::Id(id), "by an operator", n).await
                }
            }
            Err(answer) => answer,
        },
        (&Method::GET, ["v1", "ids", id, "stored"]) => match parse_id(id) {
            Ok(id) => stored(shared, id).await,
            Err(answer) => answer,
        },
        (&Method::DELETE, ["v1", "ids", id]) => match parse_id(id) {
            Ok(id) => forget(shared, id).await,
            Err(answer) => answer,
        },
        (&Method::GET, ["v1", "blocked"]) => Answer::ok(Blocked {
            blocked: shared.blocklist.list(),
        }),
        (&Method::PUT, ["v1", "blocked", id]) => match parse_id(id) {
            Ok(id) => match body::<BlockRequest>(req).await {
                Ok(request) => block(shared, id, request).await,
                Err(answer) => answer,
            },
            Err(answer) => answer,
        },
        (&Method::DELETE, ["v1", "blocked", id]) => match parse_id(id) {
            Ok(id) => match set_blocked(shared, id, false).await {
                Ok(changed) => {
                    log::info!("admin: id {id} unblocked");
                    Answer::ok(
                        serde_json::json!({ "id": id, "blocked": false, "changed": changed }),
                    )
                }
                Err(e) => Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e),
            },
            Err(answer) => answer,
        },
        (&Method::POST, ["v1", "drain"]) => match body::<DrainRequest>(req).await {
            Ok(request) => drain(shared, request),
            Err(answer) => answer,
        },
        (_, ["v1", "info" | "connections" | "blocked" | "drain"])
        | (_, ["v1", "connections" | "blocked", _])
        | (_, ["v1", "ids", _])
        | (_, ["v1", "ids", _, "connections" | "stored"]) => Answer::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => Answer::error(
            StatusCode::NOT_FOUND,
            format!("no such path: {path} (docs/ADMIN.md lists them)"),
        ),
    };
    if answer.status.is_success() && method != Method::GET {
        log::info!("admin: {method} {path}");
    }
    answer
}

fn bad_number(what: &str, text: &str) -> Answer {
    Answer::error(
        StatusCode::BAD_REQUEST,
        format!("{what} is a number, not {text:?}"),
    )
}

fn parse_id(text: &str) -> Result<u32, Answer> {
    match text.parse::<u32>() {
        Ok(0) => Err(Answer::error(
            StatusCode::BAD_REQUEST,
            "id 0 is the server's own",
        )),
        Ok(id) => Ok(id),
        Err(_) => Err(bad_number("an id", text)),
    }
}

/// A JSON body of at most [`MAX_BODY`] bytes; an empty one is `T`'s default.
async fn body<T: for<'de> Deserialize<'de> + Default>(req: Request<Incoming>) -> Result<T, Answer> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a request body is at most {MAX_BODY} bytes"),
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| Answer::error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))
}

#[derive(Serialize)]
struct Info<'a> {
    version: &'static str,
    node: Option<&'a str>,
    /// What this node's answers cover.
    scope: &'static str,
    draining: bool,
    uptime_secs: u64,
    connections: usize,
    config: Settings<'a>,
}

/// The settings, without secrets (whether auth is on, not its keys).
#[derive(Serialize)]
struct Settings<'a> {
    listen: &'a str,
    web_listen: Option<&'a str>,
    metrics_listen: Option<&'a str>,
    cluster: bool,
    auth: bool,
    tls: bool,
    proxy_protocol: bool,
    max_connections: usize,
    max_connections_per_ip: Option<usize>,
    max_frame_bytes: u32,
    frame_timeout_secs: f64,
    max_pending_bytes: usize,
    mailbox_max_messages: u64,
    mailbox_max_bytes: u64,
    mailbox_max_per_sender: u64,
    mailbox_max_bytes_per_sender: u64,
    history_max_age_secs: u64,
    history_max_messages: u64,
    history_max_bytes: u64,
    max_devices: usize,
    rate_frames: u32,
    rate_bytes: u64,
    rate_burst_secs: f64,
}

fn info(shared: &Shared, started: Instant) -> Answer {
    let c = &shared.config;
    Answer::ok(Info {
        version: env!("CARGO_PKG_VERSION"),
        node: c.nats.as_ref().map(|n| n.node.as_str()),
        scope: "this node",
        draining: shared.drain.is_draining(),
        uptime_secs: started.elapsed().as_secs(),
        connections: shared.directory.len(),
        config: Settings {
            listen: &c.listen,
            web_listen: c.web_listen.as_deref(),
            metrics_listen: c.metrics_listen.as_deref(),
            cluster: c.nats.is_some(),
            auth: c.auth.is_some(),
            tls: c.tls.is_some(),
            proxy_protocol: c.proxy_protocol,
            max_connections: c.max_connections,
            max_connections_per_ip: c.max_connections_per_ip,
            max_frame_bytes: c.max_frame_bytes,
            frame_timeout_secs: c.frame_timeout.as_secs_f64(),
            max_pending_bytes: c.max_pending_bytes,
            mailbox_max_messages: c.mailbox.max_messages,
            mailbox_max_bytes: c.mailbox.max_bytes,
            mailbox_max_per_sender: c.mailbox.per_sender.messages,
            mailbox_max_bytes_per_sender: c.mailbox.per_sender.bytes,
            history_max_age_secs: c.history.max_age.as_secs(),
            history_max_messages: c.history.max_messages,
            history_max_bytes: c.history.max_bytes,
            max_devices: c.max_devices,
            rate_frames: c.rate.frames,
            rate_bytes: c.rate.bytes,
            rate_burst_secs: c.rate.burst.as_secs_f64(),
        },
    })
}

#[derive(Serialize)]
struct Connection {
    conn: u64,
    id: Option<u32>,
    device: Option<String>,
    transport: &'static str,
    address: String,
    connected_unix: u64,
    queued_bytes: usize,
    unacked_bytes: usize,
}

impl From<ConnInfo> for Connection {
    fn from(c: ConnInfo) -> Connection {
        Connection {
            conn: c.conn,
            id: c.id,
            device: c.device,
            transport: c.transport.as_str(),
            address: c.client.to_string(),
            connected_unix: c
                .since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            queued_bytes: c.queued_bytes,
            unacked_bytes: c.unacked_bytes,
        }
    }
}

#[derive(Serialize)]
struct Connections<'a> {
    node: Option<&'a str>,
    connections: Vec<Connection>,
    /// `after` for the next page, when there is one.
    next: Option<u64>,
}

fn connections(shared: &Shared, query: &str) -> Answer {
    let mut after = 0;
    let mut limit = PAGE;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "after" => match value.parse() {
                Ok(n) => after = n,
                Err(_) => return bad_number("after", value),
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => {
                    return Answer::error(
                        StatusCode::BAD_REQUEST,
                        format!("limit is a number from 1 to {MAX_PAGE}, not {value:?}"),
                    );
                }
            },
            other => {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?} (after, limit)"),
                );
            }
        }
    }
    let (page, more) = shared.directory.page(after, limit);
    let next = more.then(|| page.last().map_or(after, |c| c.conn));
    Answer::ok(Connections {
        node: shared.config.nats.as_ref().map(|n| n.node.as_str()),
        connections: page.into_iter().map(Connection::from).collect(),
        next,
    })
}

/// Tells the broker to disconnect `who` (`n` connections, as the directory counted).
async fn disconnect(shared: &Shared, who: Who, why: &str, n: usize) -> Answer {
    let event = Event::Disconnect {
        who,
        why: why.to_string(),
    };
    if futures::SinkExt::send(&mut shared.events.clone(), event)
        .await
        .is_err()
    {
        return Answer::error(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
    }
    Answer::ok(serde_json::json!({ "disconnected": n }))
}

/// What is stored for an id, as the admin API says it.
#[derive(Serialize)]
struct StoredSize {
    mailbox: Size,
    history: Size,
    conversations: u64,
    devices: u64,
}

#[derive(Serialize)]
struct Size {
    messages: u64,
    /// Null where the store cannot tell (a cluster's stream).
    bytes: Option<u64>,
}

impl From<Stored> for StoredSize {
    fn from(s: Stored) -> StoredSize {
        StoredSize {
            mailbox: Size {
                messages: s.mailbox_messages,
                bytes: s.mailbox_bytes,
            },
            history: Size {
                messages: s.history_messages,
                bytes: Some(s.history_bytes),
            },
            conversations: s.conversations,
            devices: s.devices,
        }
    }
}

/// Sends the broker `event` and waits for the store's answer.
async fn ask_store(
    shared: &Shared,
    event: Event,
    answer: oneshot::Receiver<Stored>,
) -> Result<Stored, Answer> {
    let asked = async {
        let mut events = shared.events.clone();
        futures::SinkExt::send(&mut events, event).await.ok()?;
        answer.await.ok()
    };
    match rt::timeout(STORE_WAIT, asked).await {
        Some(Some(stored)) => Ok(stored),
        _ => Err(Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no answer from the store within {} s (it may be down, NATS slow, or the server stopping: see /readyz and the log); try again",
                STORE_WAIT.as_secs()
            ),
        )),
    }
}

async fn stored(shared: &Shared, id: u32) -> Answer {
    let (tx, rx) = oneshot::channel();
    let event = Event::Measure { id, answer: tx };
    match ask_store(shared, event, rx).await {
        Ok(stored) => Answer::ok(serde_json::json!({
            "id": id,
            "node": shared.config.nats.as_ref().map(|n| n.node.as_str()),
            "stored": StoredSize::from(stored),
        })),
        Err(answer) => answer,
    }
}

async fn forget(shared: &Shared, id: u32) -> Answer {
    let disconnected = shared.directory.of(id).len();
    let (tx, rx) = oneshot::channel();
    let why = format!("everything stored for id {id} was deleted by an operator");
    let event = Event::Forget {
        id,
        why,
        answer: tx,
    };
    match ask_store(shared, event, rx).await {
        Ok(stored) => {
            log::info!("admin: everything stored for id {id} deleted");
            if let Some(m) = &shared.metrics {
                m.forgotten.inc();
            }
            Answer::ok(serde_json::json!({
                "id": id,
                "deleted": StoredSize::from(stored),
                "disconnected": disconnected,
            }))
        }
        Err(answer) => answer,
    }
}

/// `POST /v1/drain`'s body, optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    /// How long to wait for clients to leave (default `--drain-timeout`).
    deadline_secs: Option<u64>,
}

fn drain(shared: &Shared, request: DrainRequest) -> Answer {
    let deadline = match request.deadline_secs {
        None => shared.config.drain_timeout,
        Some(secs @ 1..=86_400) => std::time::Duration::from_secs(secs),
        Some(other) => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                format!("deadline_secs is from 1 to 86400, not {other}"),
            );
        }
    };
    if !shared.drain.start(deadline) {
        return Answer::error(
            StatusCode::CONFLICT,
            "this node is already draining or stopping",
        );
    }
    log::info!("admin: drain asked for, within {deadline:?}");
    Answer {
        status: StatusCode::ACCEPTED,
        body: serde_json::json!({
            "draining": true,
            "deadline_secs": deadline.as_secs(),
            "connections": shared.directory.len(),
        }),
    }
}

#[derive(Serialize)]
struct Blocked {
    blocked: Vec<u32>,
}

/// `PUT /v1/blocked/{id}`'s body, optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BlockRequest {
    /// Said to the id's connections as they are disconnected.
    reason: Option<String>,
}

/// Changes the block list off the executor: the change writes and syncs a file.
async fn set_blocked(
    shared: &Shared,
    id: u32,
    on: bool,
) -> Result<bool, crate::server::blocklist::Error> {
    let blocklist = shared.blocklist.clone();
    rt::spawn_blocking(move || blocklist.set(id, on)).await
}

async fn block(shared: &Shared, id: u32, request: BlockRequest) -> Answer {
    let changed = match set_blocked(shared, id, true).await {
        Ok(changed) => changed,
        Err(e) => return Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    log::info!("admin: id {id} blocked");
    let n = shared.directory.of(id).len();
    let why = match request.reason {
        Some(reason) => format!("id {id} is blocked: {reason}"),
        None => format!("id {id} is blocked"),
    };
    // Always, even when none is listed: one binding as the block took effect is
    // disconnected too (the broker handles this after that bind).
    disconnect(shared, Who::Id(id), &why, n).await;
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Answer::ok(serde_json::json!({
        "id": id, "blocked": true, "changed": changed, "disconnected": n, "at_unix": at
    }))
}
