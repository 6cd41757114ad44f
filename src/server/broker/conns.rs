//! The registry: every connection the broker knows, which id each is bound to, and
//! which ids are online here.
//!
//! A connection binds an id with its first frame (or hello) and keeps it: as the id's
//! default device, or, with a session, as one of its named devices. Each device of an
//! id is online at most once: binding a device that is already online replaces the
//! older connection, and only that one (a phone's session does not sign out the
//! laptop's). A closing connection leaves its device at once (frames for it go to the
//! store from then on) but stays in the registry until its writer has finished: only
//! then may the device's next connection read what waits for it, or may the id be
//! released to another node, because the finished writer's deletes must reach the
//! store first. `returning` counts those writers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::ids::{ConnId, Endpoint};
use crate::protocol::session::Device;
use crate::protocol::{Code, SERVER_ID, notice};
use crate::server::outbox::{Close, Outbox};

use super::mailbox::Mailbox;

/// Queries one connection may have unanswered at once: each answer can hold a page of
/// up to 1 MiB and a frame, so this bounds what one client makes the server hold.
pub(super) const MAX_QUERIES: u8 = 4;

/// One connection as the broker sees it.
pub(super) struct Conn {
    pub outbox: Arc<Outbox>,
    pub id: Option<u32>,
    /// Its device of the id: 0, the default device, unless it opened a session.
    pub device: u16,
    /// The device's name, when the connection opened a session (boxed: most
    /// connections have none, and it then costs a pointer's room).
    pub session: Option<Box<Device>>,
    /// A session whose first read is still to be asked for: `Some(new)`, where `new`
    /// says the server did not know the device (its `sync` record says so).
    pub start: Option<bool>,
    /// Its queries the store has not answered yet (at most [`MAX_QUERIES`]).
    pub queries: u8,
    /// A session has had its `synced` record (it goes once, after the first backlog).
    pub synced: bool,
    /// Closing: its writer is finishing; it takes nothing new.
    pub closing: bool,
    /// Where it is in reading its stored frames (see [`super::mailbox`]).
    pub mailbox: Mailbox,
}

/// What binding a connection to an id came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bind {
    /// Already bound to this id.
    Same,
    /// Bound to another id, which it keeps.
    Other { bound: u32 },
    /// The id is the server's own ([`SERVER_ID`]): nobody binds it.
    Reserved,
    /// Newly bound. `replaced` was the id's connection until now, and is closing with
    /// a `replaced` notice; `wait` says an earlier connection's writer (that one's, or
    /// another's) is still finishing, so the new one must not read the mailbox yet.
    New {
        replaced: Option<ConnId>,
        wait: bool,
    },
    /// The connection is unknown or closing.
    Gone,
}

/// What a finished writer leaves for its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Finished {
    /// Nothing to do: other writers of the id are still finishing, the connection had
    /// no id, or the id is bound here again and has read its mailbox.
    Nothing,
    /// The id's new connection was waiting for this writer: it may read its mailbox.
    Resume(ConnId),
    /// No connection here delivers to the id any more: release it.
    Left(u32),
}

#[derive(Default)]
pub(super) struct Registry {
    /// Boxed: the map keeps spare room for growth, and a spare place costs the size of
    /// a value; a pointer there instead of a whole `Conn` saves each idle connection
    /// about 90 bytes.
    conns: HashMap<ConnId, Box<Conn>>,
    online: HashMap<Endpoint, ConnId>,
    /// The named devices online of each id that has any.
    sessions: HashMap<u32, Vec<u16>>,
    /// Ids that got their first session here (true) or lost their last (false), in
    /// order, since the broker last took them: a cluster's node hears of their logs
    /// only while it has sessions of them.
    hearing: Vec<(u32, bool)>,
    /// Devices whose previous connection's writer has not finished yet, with a count.
    returning: HashMap<Endpoint, usize>,
}

impl Registry {
    /// Every connection, for a pass over all of them.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Conn> {
        self.conns.values_mut().map(|c| &mut **c)
    }

    /// A new connection, not bound yet; `closing` if it is to be closed at once.
    pub fn insert(&mut self, conn: ConnId, outbox: Arc<Outbox>, closing: bool) {
        let c = Conn {
            outbox,
            id: None,
            device: 0,
            session: None,
            start: None,
            queries: 0,
            synced: false,
            closing,
            mailbox: Mailbox::default(),
        };
        self.conns.insert(conn, Box::new(c));
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Every connection, closing or not.
    pub fn all(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    /// A connection, closing or not.
    pub fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(&conn).map(|c| &**c)
    }

    /// A connection, closing or not.
    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn).map(|c| &mut **c)
    }

    /// A connection that is not closing.
    pub fn live(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.get_mut(conn).filter(|c| !c.closing)
    }

    /// The connection of `id`'s default device, if it is online here.
    pub fn online(&self, id: u32) -> Option<ConnId> {
        self.online.get(&Endpoint::default_of(id)).copied()
    }

    /// The connection of a device, if it is online here.
    pub fn online_at(&self, e: Endpoint) -> Option<ConnId> {
        self.online.get(&e).copied()
    }

    /// The named devices of `id` that are online, with their connections.
    pub fn sessions_of(&self, id: u32) -> Vec<(u16, ConnId)> {
        let Some(devices) = self.sessions.get(&id) else {
            return Vec::new();
        };
        devices
            .iter()
            .filter_map(|&d| Some((d, self.online_at(Endpoint { id, device: d })?)))
            .collect()
    }

    /// Ids whose first session came or whose last went since this was last asked, in
    /// order (see `hearing`).
    pub fn take_hearing(&mut self) -> Vec<(u32, bool)> {
        std::mem::take(&mut self.hearing)
    }

    /// Whether `id` has a named device online here.
    pub fn has_sessions(&self, id: u32) -> bool {
        // Checked for every frame's sender and receiver: no hashing while no session
        // is open at all.
        !self.sessions.is_empty() && self.sessions.contains_key(&id)
    }

    /// An earlier connection of `id`'s default device is still finishing its writes.
    pub fn is_returning(&self, id: u32) -> bool {
        self.returning.contains_key(&Endpoint::default_of(id))
    }

    /// Binds `conn` to `id`'s default device unless it is bound already (then says
    /// whether `id` is the one it has, whatever its device).
    pub fn bind(&mut self, conn: ConnId, id: u32) -> Bind {
        self.bind_at(conn, Endpoint::default_of(id), None)
    }

    /// Binds `conn` to one of `e.id`'s devices, a named one with `session`, unless it
    /// is bound already. Only a connection of the same device is replaced.
    pub fn bind_at(&mut self, conn: ConnId, e: Endpoint, session: Option<Device>) -> Bind {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.closing) else {
            return Bind::Gone;
        };
        let id = e.id;
        match c.id {
            _ if id == SERVER_ID => Bind::Reserved,
            Some(bound) if bound == id => Bind::Same,
            Some(bound) => Bind::Other { bound },
            None => {
                c.id = Some(id);
                c.device = e.device;
                let detail = match &session {
                    Some(name) => format!("device {name} of id {id} connected elsewhere"),
                    None => format!("id {id} connected elsewhere"),
                };
                c.session = session.map(Box::new);
                let replaced = self.online.insert(e, conn);
                if e.device != 0 {
                    let online = self.sessions.entry(id).or_insert_with(|| {
                        self.hearing.push((id, true));
                        Vec::new()
                    });
                    if !online.contains(&e.device) {
                        online.push(e.device);
                    }
                }
                if let Some(old) = replaced {
                    let notice = Some(notice(Code::Replaced, detail));
                    let drain = false;
                    self.close(old, Close { notice, drain });
                }
                let wait = self.returning.contains_key(&e);
                if wait && let Some(c) = self.conns.get_mut(&conn) {
                    c.mailbox.wait();
                }
                Bind::New { replaced, wait }
            }
        }
    }

    /// Starts closing `conn` and takes it offline; false if it was closing already (the
    /// close is still passed on, so a later notice or a stricter drain applies).
    pub fn close(&mut self, conn: ConnId, close: Close) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.outbox.close(close);
        if c.closing {
            return false;
        }
        c.closing = true;
        if let Some(id) = c.id {
            let e = Endpoint {
                id,
                device: c.device,
            };
            if self.online.get(&e) == Some(&conn) {
                self.online.remove(&e);
                if let Some(online) = self.sessions.get_mut(&id) {
                    online.retain(|&d| d != e.device);
                    if online.is_empty() {
                        self.sessions.remove(&id);
                        self.hearing.push((id, false));
                    }
                }
            }
            *self.returning.entry(e).or_default() += 1;
        }
        true
    }

    /// Forgets a connection whose writer has finished (it must have been closed) and
    /// says what that means for its id.
    pub fn writer_done(&mut self, conn: ConnId) -> Finished {
        let Some(e) = self.conns.remove(&conn).and_then(|c| {
            Some(Endpoint {
                id: c.id?,
                device: c.device,
            })
        }) else {
            return Finished::Nothing;
        };
        let Some(count) = self.returning.get_mut(&e) else {
            return Finished::Nothing;
        };
        *count -= 1;
        if *count > 0 {
            return Finished::Nothing;
        }
        self.returning.remove(&e);
        match self.online.get(&e) {
            Some(&next)
                if self
                    .conns
                    .get(&next)
                    .is_some_and(|c| c.mailbox.is_waiting()) =>
            {
                Finished::Resume(next)
            }
            // Bound again here and not waiting: it has already read its mailbox.
            Some(_) => Finished::Nothing,
            // Only a cluster holds ids, and only for their default devices.
            None if e.device == 0 => Finished::Left(e.id),
            None => Finished::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(conns: &[ConnId]) -> Registry {
        let mut r = Registry::default();
        for &conn in conns {
            r.insert(conn, Arc::new(Outbox::default()), false);
        }
        r
    }

    fn quiet() -> Close {
        Close {
            notice: None,
            drain: false,
        }
    }

    #[test]
    fn a_connection_binds_once_and_keeps_its_id() {
        let mut r = registry(&[1]);
        let first = Bind::New {
            replaced: None,
            wait: false,
        };
        assert_eq!(r.bind(1, 7), first);
        assert_eq!(r.online(7), Some(1));
        assert_eq!(r.bind(1, 7), Bind::Same);
        assert_eq!(r.bind(1, 8), Bind::Other { bound: 7 });
        assert_eq!(r.bind(1, SERVER_ID), Bind::Reserved);
        assert_eq!(r.online(8), None, "a refused id is not bound");
        assert_eq!(r.bind(2, 7), Bind::Gone, "unknown connection");
        assert_eq!(r.bind(2, SERVER_ID), Bind::Gone, "unknown first");
        let mut fresh = registry(&[3]);
        assert_eq!(fresh.bind(3, SERVER_ID), Bind::Reserved);
        assert_eq!(
            fresh.online(SERVER_ID),
            None,
            "the reserved id is not bound"
        );
    }

    #[test]
    fn a_second_connection_replaces_the_first_and_waits_for_its_writer() {
        let mut r = registry(&[1, 2]);
        r.bind(1, 7);
        let second = r.bind(2, 7);
        assert_eq!(
            second,
            Bind::New {
                replaced: Some(1),
                wait: true
            },
            "the old one's writer must finish first"
        );
        assert_eq!(
            r.online(7),
            Some(2),
            "closing the old one keeps the new one online"
        );
        assert!(r.is_returning(7));
        assert!(r.live(1).is_none(), "the old one is closing");
        let told = r.get_mut(1).and_then(|c| c.outbox.close_requested());
        let told = told.and_then(|c| c.notice).expect("a notice");
        assert!(
            told.ends_with(b"replaced: id 7 connected elsewhere"),
            "{told:?}"
        );
        assert_eq!(
            r.bind(1, 7),
            Bind::Gone,
            "a closing connection binds nothing"
        );
        assert_eq!(r.writer_done(1), Finished::Resume(2));
    }

    #[test]
    fn the_next_connection_waits_until_every_earlier_writer_is_done() {
        let mut r = registry(&[1, 2, 3]);
        r.bind(1, 7);
        r.close(1, quiet());
        r.bind(2, 7);
        r.close(2, quiet());
        assert!(!r.close(2, quiet()), "closed once");
        assert_eq!(
            r.bind(3, 7),
            Bind::New {
                replaced: None,
                wait: true
            }
        );
        assert!(r.get_mut(3).is_some_and(|c| c.mailbox.is_waiting()));
        assert_eq!(
            r.writer_done(1),
            Finished::Nothing,
            "writer 2 still finishing"
        );
        assert_eq!(r.writer_done(2), Finished::Resume(3));
        assert!(!r.is_returning(7));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_last_writer_of_an_id_that_is_not_back_releases_it() {
        let mut r = registry(&[1, 2]);
        r.bind(1, 7);
        r.close(1, quiet());
        assert_eq!(r.online(7), None);
        assert_eq!(r.writer_done(1), Finished::Left(7));
        assert!(r.is_empty() || r.len() == 1);
        // Bound again before the old writer finished, and not waiting (it read its
        // mailbox already): nothing to do.
        r.bind(2, 8);
        r.insert(3, Arc::new(Outbox::default()), false);
        r.close(2, quiet());
        r.bind(3, 8);
        if let Some(c) = r.get_mut(3) {
            c.mailbox = Mailbox::default();
        }
        assert_eq!(r.writer_done(2), Finished::Nothing);
        // A connection that never bound leaves nothing.
        r.insert(4, Arc::new(Outbox::default()), false);
        r.close(4, quiet());
        assert_eq!(r.writer_done(4), Finished::Nothing);
        assert_eq!(r.writer_done(4), Finished::Nothing, "gone already");
    }

    #[test]
    fn devices_of_one_id_are_online_together_and_replace_only_themselves() {
        let mut r = registry(&[1, 2, 3, 4]);
        let laptop = Endpoint { id: 7, device: 1 };
        let phone = Endpoint { id: 7, device: 2 };
        let name = |n: &str| Some(Device::new(n).expect("a name"));
        let new = Bind::New {
            replaced: None,
            wait: false,
        };
        assert_eq!(r.bind(1, 7), new, "the default device");
        assert!(
            r.take_hearing().is_empty(),
            "a plain connection is no session"
        );
        assert_eq!(r.bind_at(2, laptop, name("laptop")), new);
        assert_eq!(r.take_hearing(), [(7, true)], "the first session");
        assert_eq!(r.bind_at(3, phone, name("phone")), new);
        assert_eq!(r.online(7), Some(1));
        assert_eq!(r.sessions_of(7), vec![(1, 2), (2, 3)]);
        assert_eq!(r.bind(2, 7), Bind::Same, "a session's frames carry its id");
        // The laptop again: only the old laptop is replaced.
        assert_eq!(
            r.bind_at(4, laptop, name("laptop")),
            Bind::New {
                replaced: Some(2),
                wait: true
            }
        );
        let told = r.get_mut(2).and_then(|c| c.outbox.close_requested());
        let told = told.and_then(|c| c.notice).expect("a notice");
        assert!(
            told.ends_with(b"replaced: device laptop of id 7 connected elsewhere"),
            "{told:?}"
        );
        assert!(r.live(1).is_some() && r.live(3).is_some());
        assert_eq!(r.sessions_of(7), vec![(1, 4), (2, 3)]);
        assert_eq!(r.writer_done(2), Finished::Resume(4));
        r.close(3, quiet());
        assert_eq!(r.sessions_of(7), vec![(1, 4)]);
        assert_eq!(
            r.writer_done(3),
            Finished::Nothing,
            "a session releases nothing"
        );
        assert!(r.take_hearing().is_empty(), "sessions of 7 are still here");
        r.close(4, quiet());
        assert!(!r.has_sessions(7));
        assert_eq!(r.take_hearing(), [(7, false)], "the last session went");
    }

    #[test]
    fn a_close_reaches_the_outbox_even_when_closing_already() {
        let mut r = registry(&[1]);
        r.bind(1, 7);
        assert!(r.close(1, quiet()));
        let notice = Some(bytes::Bytes::from_static(b"bye"));
        let drain = true;
        assert!(!r.close(1, Close { notice, drain }));
        let asked = r.get_mut(1).and_then(|c| c.outbox.close_requested());
        assert!(asked.is_some());
        assert!(r.live(1).is_none());
        assert_eq!(r.all(), vec![1]);
    }
}
