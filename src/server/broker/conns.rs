//! The registry: every connection the broker knows, which id each is bound to, and
//! which ids are online here.
//!
//! A connection binds an id with its first frame (or hello) and keeps it. Binding an id
//! that is already online replaces the older connection. A closing connection leaves
//! the id at once (frames for it go to the mailbox from then on) but stays in the
//! registry until its writer has finished: only then may the id's next connection read
//! its mailbox, or may the id be released to another node, because the finished
//! writer's deletes must reach the store first. `returning` counts those writers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::ids::ConnId;
use crate::protocol::{Code, SERVER_ID, notice};
use crate::server::outbox::{Close, Outbox};

use super::mailbox::Mailbox;
use super::replies::Replies;

/// One connection as the broker sees it.
pub(super) struct Conn {
    pub outbox: Arc<Outbox>,
    pub id: Option<u32>,
    /// Closing: its writer is finishing; it takes nothing new.
    pub closing: bool,
    /// Replies in the order their frames arrived (see [`super::replies`]).
    pub replies: Replies,
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
    online: HashMap<u32, ConnId>,
    /// Ids whose previous connection's writer has not finished yet, with a count.
    returning: HashMap<u32, usize>,
}

impl Registry {
    /// A new connection, not bound yet; `closing` if it is to be closed at once.
    pub fn insert(&mut self, conn: ConnId, outbox: Arc<Outbox>, closing: bool) {
        let c = Conn {
            outbox,
            id: None,
            closing,
            replies: Replies::default(),
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

    /// The connection `id` is bound to here, if it is online.
    pub fn online(&self, id: u32) -> Option<ConnId> {
        self.online.get(&id).copied()
    }

    /// An earlier connection of `id` is still finishing its writes.
    pub fn is_returning(&self, id: u32) -> bool {
        self.returning.contains_key(&id)
    }

    /// Binds `conn` to `id` unless it is bound already.
    pub fn bind(&mut self, conn: ConnId, id: u32) -> Bind {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.closing) else {
            return Bind::Gone;
        };
        match c.id {
            _ if id == SERVER_ID => Bind::Reserved,
            Some(bound) if bound == id => Bind::Same,
            Some(bound) => Bind::Other { bound },
            None => {
                c.id = Some(id);
                let replaced = self.online.insert(id, conn);
                if let Some(old) = replaced {
                    let detail = format_args!("id {id} connected elsewhere");
                    let notice = Some(notice(Code::Replaced, detail));
                    let drain = false;
                    self.close(old, Close { notice, drain });
                }
                let wait = self.returning.contains_key(&id);
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
            if self.online.get(&id) == Some(&conn) {
                self.online.remove(&id);
            }
            *self.returning.entry(id).or_default() += 1;
        }
        true
    }

    /// Forgets a connection whose writer has finished (it must have been closed) and
    /// says what that means for its id.
    pub fn writer_done(&mut self, conn: ConnId) -> Finished {
        let Some(id) = self.conns.remove(&conn).and_then(|c| c.id) else {
            return Finished::Nothing;
        };
        let Some(count) = self.returning.get_mut(&id) else {
            return Finished::Nothing;
        };
        *count -= 1;
        if *count > 0 {
            return Finished::Nothing;
        }
        self.returning.remove(&id);
        match self.online.get(&id) {
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
            None => Finished::Left(id),
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
