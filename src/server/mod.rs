//! The chat server: listener -> readers -> broker -> writers.
//!
//! ```text
//!                 +--------+   Event    +--------+  Outbox   +--------+
//!  socket ------> | reader | ---------> | broker | --------> | writer | ------> socket
//!  (one each)     +--------+  (bounded) +--------+ (bytes-   +--------+  (one each)
//!                                          |  ^     bounded)
//!                                  Command |  | Reply
//!                                          v  |   (through the backend)
//!                                +-----------------------+
//!                                | store, or the cluster |  (own thread)
//!                                +-----------------------+
//! ```
//!
//! Each module holds one of these: `listener` accepts and enforces the connection
//! limit, `reader` decodes, [`broker`] routes, [`writer`] writes, [`backend`] is the
//! way into storage, and [`crate::store`] (or [`crate::cluster`]) keeps the mailbox.
//! Sockets reach the reader and writer as byte streams: TCP, TLS, or a WebSocket
//! through the adapters in `websocket` (upgraded by [`crate::http`]), so every
//! transport shares the same code past the socket. What they all share is in
//! [`config`]; [`crate::node`] assembles the whole server.

pub(crate) mod addresses;
pub mod backend;
pub mod blocklist;
pub mod broker;
pub(crate) mod budget;
pub mod card;
pub mod config;
pub mod directory;
pub mod drain;
pub mod event;
pub(crate) mod files;
pub(crate) mod listener;
pub mod outbox;
pub mod proxy;
pub mod rate;
mod reader;
pub(crate) mod websocket;
pub mod writer;

pub use config::{Config, Shared};
pub(crate) use listener::configure as configure_socket;
