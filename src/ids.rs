//! Identifiers that several rooms share: the broker, its connection tasks and the
//! stores all name connections and the owners of store answers, so these types live
//! here rather than in any one of them.

/// Identifies one accepted connection for its whole life.
pub type ConnId = u64;

/// Whom a store's answer (an append's outcome, a page) goes back to. The stores only
/// carry it and hand it back; the broker decides what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ticket {
    /// A connection of this node: its echoes and mailbox pages.
    Conn(ConnId),
    /// A batch of frames another node forwarded here, by the token the cluster link gave it:
    /// the outcomes go back to that node.
    Remote(u64),
}

/// One place an id receives frames: the id and one of its devices. Device 0 is the
/// default device, every connection's that opened no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub id: u32,
    pub device: u16,
}

impl Endpoint {
    /// The default device of `id`.
    pub fn default_of(id: u32) -> Endpoint {
        Endpoint { id, device: 0 }
    }
}

/// A device number no device has: marks a stored frame whose sender had no session.
pub const NO_DEVICE: u16 = u16::MAX;
