//! The checker: what the recorded history says about the server's promises.
//!
//! Every frame is named by its sender and its number (senders number their frames 0,
//! 1, 2, ...; each sender writes to one receiver). The history holds every send (a
//! resend after a reconnect is a second send of the same frame), every answer the
//! sender got (its echo, or a refusal notice, by code), every delivery (with the
//! receiving connection), and the fault windows. The promises checked:
//!
//! - every echoed frame is delivered to its receiver, at least once (lost otherwise);
//! - nothing is delivered that was not sent (phantom);
//! - per (sender, receiver) and per receiving connection, echoed frames first seen on
//!   that connection come in increasing order; what comes again (a frame seen before,
//!   or a resent one) is a repeat, which at-least-once allows, not a reorder. A frame
//!   refused with `store-failed` may still have been stored (docs/CLUSTER.md): it is
//!   counted when it arrives anyway, and has no place in the order;
//! - every frame sent got an answer in the end (unanswered otherwise);
//! - outside the fault windows (plus a grace time after each, for re-elections), no
//!   answer took longer than the bound.
//!
//! It also measures what docs/CLUSTER.md allows without calling it a violation: an id
//! bound on two nodes at once (two binds at the same instant can both win), seen as a
//! connection that still gets frames after a newer connection of the same id, on
//! another node, got its first. Such frames are delivered, not lost (the checks above
//! cover them); the count says how often a receiver's frames were split that way.

use std::collections::{HashMap, HashSet};

/// A sender and the number it gave a frame.
pub type Key = (u32, u64);

/// What a sender heard for a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Echo,
    /// A refusal notice's code (`mailbox-full`, `store-failed`).
    Refused(String),
}

#[derive(Debug, Clone)]
pub enum Event {
    /// `sender` wrote frame `n` (for `receiver`) at `at` seconds.
    Sent {
        sender: u32,
        receiver: u32,
        n: u64,
        /// The sender's connection.
        conn: u64,
        at: f64,
    },
    Answered {
        sender: u32,
        n: u64,
        answer: Answer,
        at: f64,
    },
    /// `receiver` got frame `n` of `sender` on its connection `conn`.
    Delivered {
        receiver: u32,
        sender: u32,
        n: u64,
        conn: u64,
        at: f64,
    },
    /// Client `id` opened connection `conn` to chat node `node` (its index), as one of
    /// its session's devices when `device` is given.
    Connected {
        id: u32,
        conn: u64,
        node: usize,
        device: Option<String>,
        at: f64,
    },
    /// A client waited `waited` seconds with frames unanswered and nothing heard, and
    /// gave the connection up.
    Silence {
        waited: f64,
    },
    Fault {
        what: String,
        start: f64,
        end: f64,
    },
}

/// What the history shows.
#[derive(Debug, Default)]
pub struct Report {
    pub sent: usize,
    pub resent: usize,
    pub echoed: usize,
    pub refused: HashMap<String, usize>,
    pub unanswered: usize,
    pub delivered: usize,
    pub repeats: usize,
    /// Frames refused (`store-failed`) that arrived anyway.
    pub refused_delivered: usize,
    pub lost: Vec<Key>,
    pub phantoms: Vec<Key>,
    pub out_of_order: Vec<(u32, Key)>,
    pub silences: usize,
    /// The longest a client waited, unanswered, before it gave a connection up.
    pub longest_silence: f64,
    pub faults: usize,
    /// Faults by kind (the first word of each).
    pub fault_kinds: HashMap<String, usize>,
    /// When the last delivery came, in seconds from the start.
    pub last_delivery: f64,
    /// The slowest answer outside the fault windows, and when it was sent.
    pub slowest_calm: f64,
    pub slowest_calm_at: f64,
    /// The slowest answer of all.
    pub slowest: f64,
    /// Answers outside the fault windows slower than the bound.
    pub slow_calm: usize,
    /// The slowest answer to a sender whose own chat node was not faulted meanwhile,
    /// by the kind of each fault around it: what a fault elsewhere costs the clients of
    /// a healthy node.
    pub slowest_elsewhere: HashMap<String, f64>,
    /// The slowest answer to a sender whose own node was killed or frozen meanwhile.
    pub slowest_own: f64,
    /// Pairs of connections of one id, on two nodes, where the older still got frames
    /// after the newer got its first: the id was bound on both at once.
    pub double_binds: usize,
    /// Frames the older connection of such a pair got after the newer's first.
    pub split_deliveries: usize,
}

impl Report {
    /// The violations, one line each; empty when every promise held.
    pub fn violations(&self, bound: f64) -> Vec<String> {
        let mut v = Vec::new();
        if !self.lost.is_empty() {
            v.push(format!(
                "{} echoed frames never delivered, first {:?}",
                self.lost.len(),
                &self.lost[..self.lost.len().min(5)]
            ));
        }
        if !self.phantoms.is_empty() {
            v.push(format!(
                "{} frames delivered that were never sent, first {:?}",
                self.phantoms.len(),
                &self.phantoms[..self.phantoms.len().min(5)]
            ));
        }
        if !self.out_of_order.is_empty() {
            v.push(format!(
                "{} frames out of order, first (receiver, (sender, n)) {:?}",
                self.out_of_order.len(),
                &self.out_of_order[..self.out_of_order.len().min(5)]
            ));
        }
        if self.unanswered > 0 {
            v.push(format!("{} frames sent never answered", self.unanswered));
        }
        if self.slow_calm > 0 {
            v.push(format!(
                "{} answers outside fault windows took longer than {bound} s (slowest {:.2} s, sent at {:.1} s)",
                self.slow_calm, self.slowest_calm, self.slowest_calm_at
            ));
        }
        v
    }
}

/// Checks `events`. `bound`: the longest an answer may take outside a fault window;
/// `grace`: how long after a fault ends it still counts as one.
pub fn check(events: &[Event], bound: f64, grace: f64) -> Report {
    let mut r = Report::default();
    let mut windows = Vec::new();
    // Per frame: its receiver, when it was last (re)sent and not yet answered, and
    // whether it was echoed.
    let mut receiver_of: HashMap<Key, u32> = HashMap::new();
    let mut sends: HashMap<Key, usize> = HashMap::new();
    let mut waiting: HashMap<Key, (f64, u64)> = HashMap::new();
    let mut nodes: HashMap<u64, usize> = HashMap::new();
    let mut echoed: HashSet<Key> = HashSet::new();
    let mut answered: HashSet<Key> = HashSet::new();
    let mut waits: Vec<(f64, f64, u64)> = Vec::new();
    for e in events {
        match e {
            Event::Sent {
                sender,
                receiver,
                n,
                at,
                conn,
            } => {
                let key = (*sender, *n);
                receiver_of.insert(key, *receiver);
                *sends.entry(key).or_default() += 1;
                waiting.entry(key).or_insert((*at, *conn));
            }
            Event::Answered {
                sender,
                n,
                answer,
                at,
            } => {
                let key = (*sender, *n);
                if let Some((sent, conn)) = waiting.remove(&key) {
                    waits.push((sent, at - sent, conn));
                }
                answered.insert(key);
                match answer {
                    Answer::Echo => {
                        echoed.insert(key);
                    }
                    Answer::Refused(code) => *r.refused.entry(code.clone()).or_default() += 1,
                }
            }
            Event::Fault { what, start, end } => {
                r.faults += 1;
                let mut words = what.split(' ');
                let kind = words.next().unwrap_or_default().to_string();
                let target = words.next().unwrap_or_default().to_string();
                *r.fault_kinds.entry(kind.clone()).or_default() += 1;
                windows.push((*start, *end + grace, kind, target));
            }
            Event::Silence { waited, .. } => {
                r.silences += 1;
                r.longest_silence = r.longest_silence.max(*waited);
            }
            Event::Connected { conn, node, .. } => {
                nodes.insert(*conn, *node);
            }
            Event::Delivered { .. } => {}
        }
    }
    r.sent = sends.len();
    r.resent = sends.values().map(|n| n - 1).sum();
    r.echoed = echoed.len();
    r.unanswered = sends.keys().filter(|k| !answered.contains(k)).count();
    for (sent, took, conn) in waits {
        r.slowest = r.slowest.max(took);
        let end = sent + took;
        let around: Vec<_> = windows
            .iter()
            .filter(|(a, b, ..)| sent < *b && end > *a)
            .collect();
        let own = nodes.get(&conn).map(|n| format!("chat{n}"));
        if around.iter().any(|w| Some(&w.3) == own.as_ref()) {
            r.slowest_own = r.slowest_own.max(took);
        } else {
            for (.., kind, _) in &around {
                let slowest = r.slowest_elsewhere.entry(kind.clone()).or_default();
                *slowest = slowest.max(took);
            }
        }
        let calm = around.is_empty();
        if calm {
            if took > r.slowest_calm {
                r.slowest_calm = took;
                r.slowest_calm_at = sent;
            }
            if took > bound {
                r.slow_calm += 1;
            }
        }
    }
    // Deliveries: per receiver connection and sender, the highest new number so far.
    let mut seen: HashSet<Key> = HashSet::new();
    let mut high: HashMap<(u64, u32), u64> = HashMap::new();
    for e in events {
        let Event::Delivered {
            receiver,
            sender,
            n,
            conn,
            at,
        } = e
        else {
            continue;
        };
        r.last_delivery = r.last_delivery.max(*at);
        let key = (*sender, *n);
        if receiver_of.get(&key) != Some(receiver) {
            r.phantoms.push(key);
            continue;
        }
        r.delivered += 1;
        if !seen.insert(key) {
            r.repeats += 1;
            continue;
        }
        if !echoed.contains(&key) {
            if answered.contains(&key) {
                r.refused_delivered += 1;
            }
            continue;
        }
        let top = high.entry((*conn, *sender)).or_insert(*n);
        if *n < *top {
            r.out_of_order.push((*receiver, key));
        }
        *top = (*top).max(*n);
    }
    r.delivered -= r.repeats;
    (r.double_binds, r.split_deliveries) = double_binds(events);
    let mut lost: Vec<Key> = echoed
        .iter()
        .filter(|k| !seen.contains(k))
        .copied()
        .collect();
    lost.sort_unstable();
    r.lost = lost;
    r
}

/// Counts ids bound on two nodes at once, and the frames split between the two
/// connections (see the module's doc). A session's devices are apart: two devices of
/// one id on two nodes is what sessions are for; one device on two nodes counts.
fn double_binds(events: &[Event]) -> (usize, usize) {
    let mut node_of: HashMap<u64, usize> = HashMap::new();
    let mut device_of: HashMap<u64, Option<String>> = HashMap::new();
    // Per receiving connection: its id and the times of its deliveries, in order.
    let mut got: HashMap<u64, (u32, Vec<f64>)> = HashMap::new();
    for e in events {
        match e {
            Event::Connected {
                conn, node, device, ..
            } => {
                node_of.insert(*conn, *node);
                device_of.insert(*conn, device.clone());
            }
            Event::Delivered {
                receiver, conn, at, ..
            } => got
                .entry(*conn)
                .or_insert((*receiver, Vec::new()))
                .1
                .push(*at),
            _ => {}
        }
    }
    // Per id and device: its receiving connections and their deliveries' times.
    type Place = (u32, Option<String>);
    let mut by_id: HashMap<Place, Vec<(u64, &Vec<f64>)>> = HashMap::new();
    for (conn, (id, times)) in &got {
        let device = device_of.get(conn).cloned().flatten();
        by_id.entry((*id, device)).or_default().push((*conn, times));
    }
    let (mut pairs, mut split) = (0, 0);
    for conns in by_id.values_mut() {
        // Connections are numbered in the order they opened.
        conns.sort_unstable_by_key(|(conn, _)| *conn);
        for (i, (old, old_times)) in conns.iter().enumerate() {
            // Each of the older connection's frames counts once, after the first
            // delivery to any newer connection on another node.
            let mut earliest: Option<f64> = None;
            for (new, new_times) in &conns[i + 1..] {
                let (Some(&first), Some(a), Some(b)) =
                    (new_times.first(), node_of.get(old), node_of.get(new))
                else {
                    continue;
                };
                if a != b && old_times.iter().any(|t| *t > first) {
                    pairs += 1;
                    earliest = Some(earliest.map_or(first, |e: f64| e.min(first)));
                }
            }
            if let Some(first) = earliest {
                split += old_times.iter().filter(|t| **t > first).count();
            }
        }
    }
    (pairs, split)
}

/// The story of a frame out of order: the connections (and their nodes) that sent and
/// received its neighbours, with the times, one line each.
pub fn story(events: &[Event], receiver: u32, key: Key) -> Vec<String> {
    let (sender, n) = key;
    let near = |m: u64| m + 10 >= n && m <= n + 10;
    let mut nodes: HashMap<u64, usize> = HashMap::new();
    let mut lines: Vec<(f64, String)> = Vec::new();
    for e in events {
        if let Event::Connected { conn, node, .. } = e {
            nodes.insert(*conn, *node);
        }
    }
    let node = |conn: &u64| {
        nodes
            .get(conn)
            .map_or("?".to_string(), |n| format!("chat{n}"))
    };
    for e in events {
        match e {
            Event::Sent {
                sender: s,
                n: m,
                conn,
                at,
                ..
            } if *s == sender && near(*m) => {
                lines.push((
                    *at,
                    format!("{at:8.3} s  sent {m} on conn {conn} ({})", node(conn)),
                ));
            }
            Event::Answered {
                sender: s,
                n: m,
                answer,
                at,
            } if *s == sender && near(*m) => {
                lines.push((*at, format!("{at:8.3} s  answered {m}: {answer:?}")));
            }
            Event::Delivered {
                receiver: r,
                sender: s,
                n: m,
                conn,
                at,
            } if *r == receiver && *s == sender && near(*m) => {
                lines.push((
                    *at,
                    format!("{at:8.3} s  delivered {m} on conn {conn} ({})", node(conn)),
                ));
            }
            Event::Connected {
                id, conn, node, at, ..
            } if *id == sender || *id == receiver => {
                lines.push((
                    *at,
                    format!("{at:8.3} s  id {id} opened conn {conn} on chat{node}"),
                ));
            }
            Event::Fault { what, start, end } => {
                lines.push((
                    *start,
                    format!("{start:8.3} s  fault {what} until {end:.3} s"),
                ));
            }
            _ => {}
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    lines.into_iter().map(|(_, line)| line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sender: u32, n: u64, at: f64) -> Event {
        Event::Sent {
            sender,
            receiver: sender + 1,
            n,
            conn: 1,
            at,
        }
    }

    fn echo(sender: u32, n: u64, at: f64) -> Event {
        Event::Answered {
            sender,
            n,
            answer: Answer::Echo,
            at,
        }
    }

    fn got(sender: u32, n: u64, conn: u64) -> Event {
        Event::Delivered {
            receiver: sender + 1,
            sender,
            n,
            conn,
            at: 0.0,
        }
    }

    #[test]
    fn an_id_getting_frames_on_two_nodes_at_once_is_counted() {
        let connected = |conn, node| Event::Connected {
            id: 2,
            conn,
            node,
            device: None,
            at: 0.0,
        };
        let got_at = |n, conn, at| Event::Delivered {
            receiver: 2,
            sender: 1,
            n,
            conn,
            at,
        };
        // Connection 5 (node 0) still gets frames after connection 6 (node 1) got its
        // first; connection 7 (node 1) gets its first after 5's last: no overlap.
        let h = vec![
            connected(5, 0),
            connected(6, 1),
            got_at(0, 5, 1.0),
            got_at(1, 6, 2.0),
            got_at(2, 5, 3.0),
            got_at(3, 5, 4.0),
            connected(7, 1),
            got_at(4, 7, 5.0),
        ];
        assert_eq!(double_binds(&h), (1, 2));
        // On one node the registry replaces: no double bind, whatever the times.
        let one_node = vec![
            connected(5, 0),
            connected(6, 0),
            got_at(1, 6, 2.0),
            got_at(2, 5, 3.0),
        ];
        assert_eq!(double_binds(&one_node), (0, 0));
    }

    #[test]
    fn a_clean_history_passes() {
        let h = vec![
            sent(1, 0, 0.0),
            sent(1, 1, 0.0),
            echo(1, 0, 0.1),
            echo(1, 1, 0.2),
            got(1, 0, 7),
            got(1, 1, 7),
        ];
        let r = check(&h, 2.0, 1.0);
        assert!(r.violations(2.0).is_empty(), "{:?}", r.violations(2.0));
        assert_eq!((r.sent, r.echoed, r.delivered, r.repeats), (2, 2, 2, 0));
    }

    #[test]
    fn a_lost_frame_a_phantom_and_a_reorder_are_caught() {
        let h = vec![
            sent(1, 0, 0.0),
            sent(1, 1, 0.0),
            sent(1, 2, 0.0),
            echo(1, 0, 0.1),
            echo(1, 1, 0.1),
            echo(1, 2, 0.1),
            got(1, 1, 7),
            got(1, 0, 7),
            got(1, 9, 7),
        ];
        let r = check(&h, 2.0, 1.0);
        assert_eq!(r.lost, vec![(1, 2)]);
        assert_eq!(r.phantoms, vec![(1, 9)]);
        assert_eq!(r.out_of_order, vec![(2, (1, 0))]);
        assert_eq!(r.violations(2.0).len(), 3);
    }

    #[test]
    fn repeats_are_allowed_and_a_new_connection_may_start_over() {
        let h = vec![
            sent(1, 0, 0.0),
            sent(1, 1, 0.0),
            sent(1, 1, 0.5),
            echo(1, 0, 0.1),
            echo(1, 1, 0.6),
            got(1, 0, 7),
            got(1, 1, 7),
            got(1, 1, 7),
            got(1, 0, 8),
            got(1, 1, 8),
        ];
        let r = check(&h, 2.0, 1.0);
        assert!(r.violations(2.0).is_empty(), "{:?}", r.violations(2.0));
        assert_eq!((r.resent, r.repeats, r.delivered), (1, 3, 2));
    }

    #[test]
    fn a_refused_frame_that_arrives_anyway_has_no_place_in_the_order() {
        let h = vec![
            sent(1, 0, 0.0),
            sent(1, 1, 0.0),
            sent(1, 2, 0.0),
            Event::Answered {
                sender: 1,
                n: 0,
                answer: Answer::Refused("store-failed".into()),
                at: 5.0,
            },
            echo(1, 1, 5.1),
            echo(1, 2, 5.2),
            got(1, 1, 7),
            got(1, 2, 7),
            got(1, 0, 7),
        ];
        let r = check(&h, 10.0, 1.0);
        assert!(r.violations(10.0).is_empty(), "{:?}", r.violations(10.0));
        assert_eq!(r.refused_delivered, 1);
        // An echoed one out of place still is a reorder.
        let h = vec![
            sent(1, 0, 0.0),
            sent(1, 1, 0.0),
            echo(1, 0, 0.1),
            echo(1, 1, 0.2),
            got(1, 1, 7),
            got(1, 0, 7),
        ];
        assert_eq!(check(&h, 2.0, 1.0).out_of_order, vec![(2, (1, 0))]);
    }

    #[test]
    fn slow_answers_count_only_outside_fault_windows() {
        let h = vec![
            sent(1, 0, 0.0),
            echo(1, 0, 3.0),
            sent(1, 1, 10.0),
            echo(1, 1, 14.0),
            Event::Fault {
                what: "kill".into(),
                start: 11.0,
                end: 12.0,
            },
            sent(1, 2, 20.0),
            Event::Answered {
                sender: 1,
                n: 2,
                answer: Answer::Refused("store-failed".into()),
                at: 20.5,
            },
            sent(1, 3, 30.0),
            got(1, 0, 7),
            got(1, 1, 7),
        ];
        let r = check(&h, 2.0, 1.0);
        assert_eq!(r.slow_calm, 1, "the first, 3 s with no fault");
        assert_eq!(r.slowest_calm, 3.0);
        assert_eq!(r.slowest, 4.0);
        assert_eq!(r.refused.get("store-failed"), Some(&1));
        assert_eq!(r.unanswered, 1);
        assert!(r.lost.is_empty(), "a refused frame need not arrive");
        assert_eq!(r.violations(2.0).len(), 2);
    }

    #[test]
    fn a_slow_answer_is_put_on_the_faults_around_it_unless_its_own_node_was_faulted() {
        let on = |conn: u64, node: usize| Event::Connected {
            id: 1,
            conn,
            node,
            device: None,
            at: 0.0,
        };
        let fault = |what: &str, start: f64, end: f64| Event::Fault {
            what: what.into(),
            start,
            end,
        };
        let sent_on = |n: u64, conn: u64, at: f64| Event::Sent {
            sender: 1,
            receiver: 2,
            n,
            conn,
            at,
        };
        let h = vec![
            on(1, 0),
            on(2, 1),
            fault("Pause chat1", 10.0, 13.0),
            fault("NatsKill nats0", 20.0, 21.0),
            // On chat0 while chat1 is frozen: the pause's cost to others.
            sent_on(0, 1, 10.5),
            echo(1, 0, 15.5),
            // On chat1 itself: its own.
            sent_on(1, 2, 11.0),
            echo(1, 1, 20.0),
            sent_on(2, 1, 20.0),
            echo(1, 2, 21.5),
        ];
        let r = check(&h, 2.0, 0.0);
        assert_eq!(r.slowest_elsewhere.get("Pause"), Some(&5.0));
        assert_eq!(
            r.slowest_elsewhere.get("NatsKill"),
            Some(&1.5),
            "not the 9 s on the frozen node, whose window also overlaps"
        );
        assert_eq!(r.slowest_own, 9.0);
    }
}
