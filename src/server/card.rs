//! Who a connection is, as an operator sees it: its client's address, its transport,
//! since when, and, once it says hello, the id (and device) it is bound to.
//!
//! The facts are written once, when the connection arrives; the binding when the
//! broker binds it. The card rides on the connection's
//! [`Outbox`](crate::server::outbox::Outbox), the one allocation that every part of a
//! connection already shares, rather than in an entry of its own in the
//! [`Directory`](crate::server::directory::Directory): there it cost each idle
//! connection about 190 bytes, because the directory's B-tree leaves fill only half
//! (connections arrive in order); a pointer there costs about 35.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::ids::ConnId;

/// How a connection reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WebSocket,
    SecureWebSocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::WebSocket => "ws",
            Transport::SecureWebSocket => "wss",
        }
    }
}

/// Who a new connection is: its number, its client's address, its transport.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub conn: ConnId,
    pub client: SocketAddr,
    pub transport: Transport,
}

/// A connection's card.
#[derive(Debug)]
pub struct Card {
    pub client: SocketAddr,
    pub transport: Transport,
    pub since: SystemTime,
    bound: Mutex<Option<Binding>>,
}

/// The id a connection is bound to, and its device's name when it opened a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub id: u32,
    pub device: Option<Box<str>>,
}

impl Card {
    /// The card of a connection arriving now.
    pub fn arriving(arrival: &Arrival) -> Card {
        Card {
            client: arrival.client,
            transport: arrival.transport,
            since: SystemTime::now(),
            bound: Mutex::new(None),
        }
    }

    /// Notes that the connection is bound to `id` (as the named `device`).
    pub fn bind(&self, id: u32, device: Option<&str>) {
        *self.lock() = Some(Binding {
            id,
            device: device.map(Box::from),
        });
    }

    pub fn binding(&self) -> Option<Binding> {
        self.lock().clone()
    }

    /// The id it is bound to, if any.
    pub fn id(&self) -> Option<u32> {
        self.lock().as_ref().map(|b| b.id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Binding>> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The card of an outbox no directory lists (tests, and tools that drive a broker
/// directly): an unspecified address over TCP, since the epoch.
impl Default for Card {
    fn default() -> Card {
        Card {
            client: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            transport: Transport::Tcp,
            since: SystemTime::UNIX_EPOCH,
            bound: Mutex::new(None),
        }
    }
}
