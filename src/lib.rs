//! A TCP chat server that speaks the seed's binary protocol (a Tornado echo server),
//! with forwarding, a durable offline mailbox, and bounds on everything a peer controls.
//!
//! The design is the actor-style broker of async-std's a-chat tutorial, with every queue
//! bounded: a reader task per connection decodes frames and sends them to one broker
//! task; the broker owns the map of connected clients and pushes each outbound frame to
//! the receiving connection's writer task; every frame for another id also goes to a
//! store thread that group-commits it to an embedded database before its echo, keeps
//! it for each device of its receiver that has not received it yet (acknowledged, for
//! clients that turn acks on), and keeps every conversation as history for sessions
//! (several devices of one id at once, docs/PROTOCOL.md "Sessions"). See
//! [`node`] for how the server is assembled, [`server`] for the diagram, [`protocol`]
//! for the wire format, [`store`] for durability, [`cluster`] for several nodes through
//! NATS, [`http`] and [`metrics`] for what operators see, and docs/PROTOCOL.md for the
//! guarantees.
//!
//! Data flows one way: transport -> reader -> broker -> writer, with the store (or the
//! cluster's actor) beside the broker, reached through [`server::backend`]. The broker
//! is built from owned parts (the registry of connections, each connection's mailbox
//! paging, its ordered replies, forwarded batches, the store's queue), each in its own
//! file under `server/broker/` with its own tests. No module imports the one that
//! assembles it; types that several share live in [`ids`], [`server::config`] and
//! [`cluster::msg`].

pub mod auth;
pub mod client;
pub mod cluster;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod rt;
pub mod server;
pub mod store;
pub mod tls;
