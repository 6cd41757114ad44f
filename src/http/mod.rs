//! HTTP: metrics, health and readiness for operators; the web client and its
//! WebSocket for browsers.
//!
//! hyper 1 (HTTP/1.1 only) on async-std sockets through smol-hyper's adapter: no
//! hand-written HTTP parsing. Two listeners, both off by default, so metrics can stay
//! on a private interface while the web client faces users. Clients are bounded like
//! chat clients: a few HTTP connections at a time, headers within a time and size
//! limit, each connection within a total time.
//!
//! `--metrics-listen`:
//! - `GET /metrics`: the Prometheus (OpenMetrics) text exposition
//! - `GET /healthz`: 200 while the process serves
//! - `GET /readyz`: 200 when the store is open, 503 with a one-line reason otherwise
//!
//! `--web-listen` (HTTPS and WSS when the server has `--tls-cert`):
//! - `GET /`, `/app.js`, `/app.css`: the web client, embedded in the binary
//! - `GET /config.json`: what the client needs to know (frame limit, auth on or off)
//! - `GET /ws`: the protocol over WebSocket (`server/websocket.rs`); a WebSocket
//!   counts against `--max-connections` and lives as long as the chat connection, not
//!   under the HTTP limits above
//!
//! Anything else is a 404.
//!
//! The rooms: `ops` serves the operators' listener, `web` the web client's and its
//! WebSocket upgrade; `serve` holds what both do alike (accepting within the connection
//! limit, hyper's limits, plain-text answers).

mod admin;
mod ops;
mod serve;
mod web;

pub use admin::run_admin;
pub use ops::run;
pub use web::run_web;
