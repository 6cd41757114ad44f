//! A TCP chat server that speaks the seed's binary protocol (a Tornado echo server),
//! with forwarding, a durable offline mailbox, and bounds on everything a peer controls.
//!
//! The design is the actor-style broker of async-std's a-chat tutorial, with every queue
//! bounded: a reader task per connection decodes frames and sends them to one broker
//! task; the broker owns the map of connected clients and pushes each outbound frame to
//! the receiving connection's writer task; frames for offline receivers go to a store
//! thread that group-commits them to an embedded database. See [`server`] for the
//! diagram, [`protocol`] for the wire format, and docs/PROTOCOL.md for the guarantees.

pub mod auth;
pub mod client;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod rt;
pub mod server;
pub mod store;
pub mod tls;
