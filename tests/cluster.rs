//! Several chat-server nodes as one service over a real NATS/JetStream cluster on
//! loopback: forwarding across nodes, one shared mailbox, takeover, order while a
//! receiver moves, and the loss of a chat node or a NATS server.
//!
//! Needs `nats-server` (Debian: `apt-get install nats-server`); skipped with one line
//! when it is missing, unless CHAT_REQUIRE_NATS=1 (CI) makes that a failure. The test
//! that cuts a NATS server off needs root and iptables as well (CHAT_REQUIRE_PARTITIONS).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chat::client::Client;
use chat::protocol::{ClientFrame, Code, ServerFrame};
use common::nats::*;
use common::*;

/// At most this many clusters run at once: each is three nats-server processes and a
/// few chat nodes, on a machine that may have two cores.
const CLUSTERS_AT_ONCE: usize = 1;

struct Gate {
    used: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

static GATE: Gate = Gate {
    used: std::sync::Mutex::new(0),
    freed: std::sync::Condvar::new(),
};

/// A place among the clusters that may run; given back when dropped.
struct Slot;

fn slot() -> Slot {
    let mut used = GATE.used.lock().unwrap_or_else(|e| e.into_inner());
    while *used >= CLUSTERS_AT_ONCE {
        used = GATE.freed.wait(used).unwrap_or_else(|e| e.into_inner());
    }
    *used += 1;
    Slot
}

impl Drop for Slot {
    fn drop(&mut self) {
        *GATE.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        GATE.freed.notify_one();
    }
}

/// What a two-node test holds besides its nodes: the NATS servers, the files and the
/// slot. Its fields drop in this order, after the nodes (bound after it).
struct Cluster {
    nats: Nats,
    _dir: tempfile::TempDir,
    _slot: Slot,
}

/// Three NATS servers and two chat nodes, `a` and `b`, for a test that needs no more
/// (`None`, after one line, without nats-server).
fn two_nodes() -> Option<(Cluster, ServerProcess, ServerProcess)> {
    two_nodes_with(&[])
}

/// [`two_nodes`], each node started with `extra` flags.
fn two_nodes_with(extra: &[&str]) -> Option<(Cluster, ServerProcess, ServerProcess)> {
    if !nats_available() {
        return None;
    }
    let _slot = slot();
    let nats = Nats::start(3, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let a = node(&nats, "a", dir.path(), extra);
    let b = node(&nats, "b", dir.path(), extra);
    let cluster = Cluster {
        nats,
        _dir: dir,
        _slot,
    };
    Some((cluster, a, b))
}

/// Frames received until `n` data frames came, skipping notices.
async fn data_frames(c: &mut Client, n: usize) -> Vec<ServerFrame> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = recv(c).await;
        if f.notice().is_none() {
            got.push(f);
        }
    }
    got
}

fn numbered(sender: u32, receiver: u32, i: usize) -> ClientFrame {
    text(sender, receiver, &format!("frame {i:05}"))
}

/// Sends an end marker (frame 99,999) from `sender` to `receiver`, binds `receiver`
/// at `addr` and returns the numbers of the frames it gets before the marker.
async fn numbers_before_the_end(sender: &mut Client, from: u32, to: u32, addr: &str) -> Vec<usize> {
    send_confirmed(sender, &numbered(from, to, 99_999)).await;
    let mut receiver = login_at(addr, to).await;
    let mut got = Vec::new();
    loop {
        let n = number(&data_frames(&mut receiver, 1).await[0]);
        if n == 99_999 {
            return got;
        }
        got.push(n);
    }
}

fn number(f: &ServerFrame) -> usize {
    let body = String::from_utf8_lossy(&f.body);
    body.trim_start_matches("frame ")
        .parse()
        .unwrap_or_else(|_| panic!("not a numbered frame: {body}"))
}

#[test]
fn frames_cross_nodes_both_ways_and_are_echoed() {
    let Some((_cluster, a, b)) = two_nodes() else {
        return;
    };
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let mut two = login_at(&b.addr, 2).await;
        let there = text(1, 2, "from node a");
        send_confirmed(&mut one, &there).await;
        assert_eq!(data_frames(&mut two, 1).await, vec![delivered(&there)]);
        let back = data(2, 1, chat::protocol::PICTURE, &[0xff; 70_000]);
        send_confirmed(&mut two, &back).await;
        assert_eq!(data_frames(&mut one, 1).await, vec![delivered(&back)]);
    });
}

#[test]
fn the_mailbox_is_shared_and_delivered_once() {
    let Some((_cluster, a, b)) = two_nodes() else {
        return;
    };
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let frames: Vec<ClientFrame> = (0..20).map(|i| numbered(1, 3, i)).collect();
        for f in &frames {
            send_confirmed(&mut one, f).await;
        }
        // Id 3 was offline: it reads its mailbox on the other node.
        let (three, got) = mailbox_of(&b.addr, 3, 20).await;
        let want: Vec<ServerFrame> = frames.iter().map(delivered).collect();
        assert_eq!(got, want);
        drop(three);
        // Delivered means gone: on either node, the next thing 3 sees is new.
        for addr in [&a.addr, &b.addr] {
            let marker = text(1, 3, &format!("marker for {addr}"));
            let sent = Instant::now();
            send_confirmed(&mut one, &marker).await;
            // 3 has just left a node: a batch that reached it as it let go is still
            // answered, not left to the forward's 5 s.
            let waited = sent.elapsed();
            assert!(waited < Duration::from_secs(4), "the echo took {waited:?}");
            let (_three, got) = mailbox_of(addr, 3, 1).await;
            assert_eq!(got, vec![delivered(&marker)]);
        }
    });
}

#[test]
fn binding_on_another_node_replaces_the_connection_there() {
    let Some((_cluster, a, b)) = two_nodes() else {
        return;
    };
    chat::rt::block_on(async {
        let mut first = login_at(&a.addr, 5).await;
        // The welcome precedes the node's claim on the id; a frame from the other node
        // arriving shows the claim is done (two binds at the same instant on two nodes
        // can both win: docs/CLUSTER.md).
        let mut other = login_at(&b.addr, 7).await;
        let hello = text(7, 5, "are you on node a?");
        send_confirmed(&mut other, &hello).await;
        assert_eq!(data_frames(&mut first, 1).await, vec![delivered(&hello)]);
        let mut second = login_at(&b.addr, 5).await;
        let detail = expect_notice(&mut first, Code::Replaced).await;
        assert!(detail.contains("another node"), "{detail}");
        expect_closed(&mut first).await;
        // Frames for 5 now reach the new connection, from either node.
        for addr in [&a.addr, &b.addr] {
            let mut sender = login_at(addr, 6).await;
            let f = text(6, 5, &format!("via {addr}"));
            send_confirmed(&mut sender, &f).await;
            assert_eq!(data_frames(&mut second, 1).await, vec![delivered(&f)]);
        }
    });
}

#[test]
fn a_claim_waiting_for_a_frozen_holder_holds_up_no_other_id() {
    let Some((_cluster, a, b)) = two_nodes() else {
        return;
    };
    chat::rt::block_on(async {
        // Node a holds 5 (a frame from node b reached it), node b holds 9.
        let mut first = login_at(&a.addr, 5).await;
        let mut nine = login_at(&b.addr, 9).await;
        let mut eight = login_at(&b.addr, 8).await;
        let hello = text(8, 5, "are you on node a?");
        send_confirmed(&mut eight, &hello).await;
        assert_eq!(data_frames(&mut first, 1).await, vec![delivered(&hello)]);
        let warm = text(8, 9, "before");
        send_confirmed(&mut eight, &warm).await;
        assert_eq!(data_frames(&mut nine, 1).await, vec![delivered(&warm)]);
        // Node a freezes: node b's claim of 5 waits for it (up to 5 s).
        a.signal(libc::SIGSTOP);
        let mut second = login_at(&b.addr, 5).await;
        let started = Instant::now();
        let f = text(8, 9, "while node b claims 5");
        send_confirmed(&mut eight, &f).await;
        let echoed = started.elapsed();
        assert_eq!(data_frames(&mut nine, 1).await, vec![delivered(&f)]);
        a.signal(libc::SIGCONT);
        assert!(
            echoed < Duration::from_millis(2500),
            "an echo between two other ids on node b waited {echoed:?} for the claim"
        );
        // The claim ends, and frames for 5 reach its new connection.
        let g = text(8, 5, "to the new connection");
        send_confirmed(&mut eight, &g).await;
        assert_eq!(data_frames(&mut second, 1).await, vec![delivered(&g)]);
        drop(first);
    });
}

#[test]
fn frames_sent_while_a_batch_waits_for_a_frozen_holder_keep_their_order() {
    // The frames wait out the forward's 5 s for the frozen holder: their echoes, not
    // `--answer-within`'s notices, are what this checks.
    let Some((_cluster, a, mut b)) = two_nodes_with(&["--answer-within", "15"]) else {
        return;
    };
    chat::rt::block_on(async {
        // 3 is held on node b; 1 sends to it from node a, and 4 (on node a too) sees
        // which of 1's frames node a has taken in.
        let mut one = login_at(&a.addr, 1).await;
        let mut four = login_at(&a.addr, 4).await;
        let mut three = login_at(&b.addr, 3).await;
        let f0 = numbered(1, 3, 0);
        send_confirmed(&mut one, &f0).await;
        assert_eq!(data_frames(&mut three, 1).await, vec![delivered(&f0)]);
        // Node b freezes: f1's batch waits for it (up to 5 s), f2 queues behind it.
        b.signal(libc::SIGSTOP);
        let (f1, f2, f3) = (numbered(1, 3, 1), numbered(1, 3, 2), numbered(1, 3, 3));
        for f in [&f1, &f2] {
            within(one.send(f)).await.expect("send");
        }
        let taken = text(1, 4, "node a has taken f1 and f2");
        within(one.send(&taken)).await.expect("send");
        assert_eq!(data_frames(&mut four, 1).await, vec![delivered(&taken)]);
        // 3 binds on node a meanwhile (its first read waits for f1's batch), and f3,
        // sent now, is for a connection of node a's own; it leaves before reading.
        let here = login_at(&a.addr, 3).await;
        within(one.send(&f3)).await.expect("send");
        let taken_too = text(1, 4, "node a has taken f3");
        within(one.send(&taken_too)).await.expect("send");
        assert_eq!(data_frames(&mut four, 1).await, vec![delivered(&taken_too)]);
        drop(here);
        // Node b is gone for good: f1's batch is stored after its wait, with f2.
        b.signal(libc::SIGKILL);
        b.wait();
        drop(three);
        // Echoes keep frame order.
        for f in [&f1, &f2, &taken, &f3, &taken_too] {
            assert_eq!(recv(&mut one).await, delivered(f));
        }
        // The mailbox holds them in the order they were sent (f3 reached the stream
        // first when it was staged apart from the frames queued before it). f0 may
        // come again first: node b delivered it just before it froze, and its copy in
        // the stream may not have been removed yet (at least once across a node's
        // death, docs/CLUSTER.md).
        let (mut three, mut got) = mailbox_of(&a.addr, 3, 3).await;
        if got.first().map(number) == Some(0) {
            got.remove(0);
            got.push(recv(&mut three).await);
        }
        let got: Vec<usize> = got.iter().map(number).collect();
        assert_eq!(got, [1, 2, 3], "the mailbox's order");
    });
}

/// Whether any client of the cluster listens on `subject`, asked through the NATS
/// server at `port`: a request with `no_responders` gets status 503 at once when
/// nobody does, before the answer to the PING behind it.
fn listened(port: u16, subject: &str) -> bool {
    use std::io::{BufRead, Write};
    let (mut writer, mut reader) = raw_nats(port);
    let mut line = String::new();
    let ask = format!(
        "CONNECT {{\"verbose\":false,\"headers\":true,\"no_responders\":true}}\r\nSUB _INBOX.who 1\r\nPUB {subject} _INBOX.who 0\r\n\r\nPING\r\n"
    );
    writer.write_all(ask.as_bytes()).expect("sent");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("an answer");
        if line.starts_with("HMSG") {
            // 503 is nobody; a holder's answer (it has headers too) is somebody.
            let mut status = String::new();
            reader.read_line(&mut status).expect("its headers");
            if status.contains("503") {
                return false;
            }
        }
        if line.starts_with("PONG") {
            return true;
        }
    }
}

/// Waits until every NATS server of `cluster` says `subject` is listened to (or
/// not), within [`WAIT`]: interest travels between servers on their own time.
fn until_listened(cluster: &Cluster, subject: &str, wanted: bool) {
    let start = Instant::now();
    for &port in &cluster.nats.ports {
        while listened(port, subject) != wanted {
            assert!(
                start.elapsed() < WAIT,
                "{subject} listened to: {} on the NATS server at {port}, wanted {wanted}",
                !wanted
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Listens to the batches nodes send to each other's batch subjects, through the NATS
/// server at `port`. Not to `chat.hold.<id>.frames`: a listener there would be a
/// responder, and a batch sent before the holder subscribed would wait for its answer
/// instead of being told that nobody holds the id.
fn spy_on_node_batches(port: u16) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::{BufRead, Write};
    let (mut writer, mut reader) = raw_nats(port);
    let subs =
        "CONNECT {\"verbose\":false,\"headers\":true}\r\nSUB chat.node.*.frames 1\r\nPING\r\n";
    writer.write_all(subs.as_bytes()).expect("sent");
    let mut line = String::new();
    while !line.starts_with("PONG") {
        line.clear();
        reader.read_line(&mut line).expect("PONG");
    }
    reader
}

/// Reads the spy's batches until they hold `frames` frames: per batch, how many frames
/// each of its sections holds.
fn node_batches_until(
    spy: &mut std::io::BufReader<std::net::TcpStream>,
    frames: usize,
) -> Vec<Vec<usize>> {
    use std::io::{BufRead, Read};
    let mut seen: Vec<Vec<usize>> = Vec::new();
    while seen.iter().flatten().sum::<usize>() < frames {
        let mut line = String::new();
        spy.read_line(&mut line).expect("a batch within the wait");
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"HMSG"), Some(total), Some(head)) = (
            words.first(),
            words.last().and_then(|n| n.parse::<usize>().ok()),
            words
                .len()
                .checked_sub(2)
                .and_then(|i| words.get(i))
                .and_then(|n| n.parse::<usize>().ok()),
        ) else {
            continue;
        };
        let mut body = vec![0; total + 2];
        spy.read_exact(&mut body).expect("the batch");
        let payload = &body[head..total];
        // Sections: receiver u32 | behind u8 | length u32 | frames (9-byte headers).
        let mut sections = Vec::new();
        let mut at = 0;
        while at + 9 <= payload.len() {
            let len = u32::from_be_bytes(payload[at + 5..at + 9].try_into().expect("4 bytes"));
            let end = at + 9 + len as usize;
            let (mut n, mut f) = (0, at + 9);
            while f + 9 <= end {
                f += 9 + u32::from_be_bytes(payload[f + 5..f + 9].try_into().expect("4")) as usize;
                n += 1;
            }
            sections.push(n);
            at = end;
        }
        seen.push(sections);
    }
    seen
}

/// Once a node has learned from their answers which node holds some receivers, their
/// frames go to that node's subject, one batch in flight per node, in sections: node a
/// forwards frames for three receivers on node b while b is frozen, and they cross in
/// two batches (the one in flight, then all the rest), not one or more per receiver.
/// Each receiver gets its frames in order, and the sender its echoes.
#[test]
fn frames_for_receivers_held_on_one_node_travel_to_it_together_in_order() {
    let Some((cluster, a, b)) = two_nodes() else {
        return;
    };
    let mut spy = spy_on_node_batches(cluster.nats.ports[0]);
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let mut two = login_at(&a.addr, 2).await;
        let mut four = login_at(&a.addr, 4).await;
        let mut receivers = Vec::new();
        for id in [11, 12, 13] {
            receivers.push((id, login_at(&b.addr, id).await));
            // b holds the id (else the first frame is stored, and b is not learnt).
            until_listened(&cluster, &format!("chat.hold.{id}.frames"), true);
        }
        // The first frame to each goes to the id's subject; b's answer names b.
        for (id, receiver) in &mut receivers {
            let f = numbered(1, *id, 0);
            send_confirmed(&mut one, &f).await;
            assert_eq!(data_frames(receiver, 1).await, vec![delivered(&f)]);
        }
        b.signal(libc::SIGSTOP);
        let mut sent = Vec::new();
        for i in 1..=3 {
            for (id, _) in &receivers {
                let f = numbered(1, *id, i);
                within(one.send(&f)).await.expect("send");
                sent.push(f);
            }
        }
        // Node a's broker has taken 1's frames in once 4 gets the frame sent after
        // them; its store has them once a frame sent after that is echoed.
        let taken = text(1, 4, "node a has taken them");
        within(one.send(&taken)).await.expect("send");
        assert_eq!(data_frames(&mut four, 1).await, vec![delivered(&taken)]);
        send_confirmed(&mut two, &text(2, 4, "and its store too")).await;
        b.signal(libc::SIGCONT);
        for (id, receiver) in &mut receivers {
            let want: Vec<ServerFrame> = (1..=3).map(|i| delivered(&numbered(1, *id, i))).collect();
            assert_eq!(
                data_frames(receiver, 3).await,
                want,
                "receiver {id}'s order"
            );
        }
        for f in sent.iter().chain([&taken]) {
            assert_eq!(recv(&mut one).await, delivered(f), "echoes in order");
        }
    });
    // The first frames went to the ids' subjects, the nine after them to b's.
    let seen = node_batches_until(&mut spy, 9);
    assert!(
        seen.len() <= 2,
        "the frames waiting for b's answer go in one batch: {seen:?}"
    );
    assert!(
        seen.iter().any(|sections| sections.len() >= 2),
        "several receivers in one batch: {seen:?}"
    );
}

/// A node that was frozen while another bound its id (the claim waited out its 5 s and
/// bound anyway) wakes up still holding the id. A frame it takes in for its own,
/// unacknowledging connection before it lets go lands in the stream after the new
/// holder's read; the frame its sender sends next, once that one is echoed, is
/// forwarded live to the new holder. The new holder must be told to read the first
/// before it delivers the second (the chaos run found it out of order). Which of
/// f1 and the takeover node a takes in first is up to it: without the rule, this
/// failed in the runs where f1 came first (one of three here).
#[test]
fn frames_a_frozen_holder_stores_as_it_lets_go_come_before_later_ones() {
    // As above: echoes after the forward's wait, not `--answer-within`'s notices.
    let Some((_cluster, a, b)) = two_nodes_with(&["--answer-within", "15"]) else {
        return;
    };
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let mut eight = login_at(&b.addr, 8).await;
        // 3 on node a with acks on, never acknowledging: what node a pushes to it
        // stays in the stream.
        let mut old = login_acks(&a.addr, 3).await;
        let f0 = numbered(1, 3, 0);
        send_confirmed(&mut one, &f0).await;
        assert_eq!(data_frames(&mut old, 1).await, vec![delivered(&f0)]);
        a.signal(libc::SIGSTOP);
        // f1 waits in node a's socket; 3 binds on node b, whose claim waits for node a
        // and then binds anyway; 8's probe says that bind (and its first read) is done.
        let f1 = numbered(1, 3, 1);
        within(one.send(&f1)).await.expect("send");
        let mut new = login_acks(&b.addr, 3).await;
        let mut acker = chat::client::Acker::new(3);
        let probe = text(8, 3, "frame 99999");
        send_confirmed(&mut eight, &probe).await;
        let mut got = receive_acking(&mut new, &mut acker, 99_999).await;
        a.signal(libc::SIGCONT);
        // Node a takes f1 in and lets 3 go, in either order; f1's echo lets 1 send f2.
        assert_eq!(recv(&mut one).await, delivered(&f1));
        let f2 = numbered(1, 3, 2);
        send_confirmed(&mut one, &f2).await;
        got.extend(receive_acking(&mut new, &mut acker, 2).await);
        // f0 comes first (node a never saw it acknowledged), then the probe, then f1
        // before f2, each once.
        assert_eq!(got, [0, 99_999, 1, 2], "what the new connection got");
        drop(old);
    });
    // With every NATS server healthy, neither node left its server (the watch of
    // JetStream answers through it: tests/cluster.rs's cut test below), not even the
    // frozen one once it thawed.
    for node in [&a, &b] {
        assert!(
            !node.logged("moving to another"),
            "a node moved off a healthy server"
        );
    }
}

/// Receives with acks on: acknowledges each data frame as it comes, and returns the
/// numbers received until `stop` (a number) arrives or the connection ends.
async fn receive_acking(
    c: &mut Client,
    acker: &mut chat::client::Acker,
    stop: usize,
) -> Vec<usize> {
    let mut got = Vec::new();
    loop {
        let frame = match within(c.recv()).await {
            Ok(Some(f)) => f,
            _ => return got,
        };
        if !acker.handled(&frame) {
            continue;
        }
        let n = number(&frame);
        got.push(n);
        if let Some(ack) = acker.ack()
            && c.send(&ack).await.is_err()
        {
            return got;
        }
        if n == stop {
            return got;
        }
    }
}

/// What a receiver saw on each of its connections, in order: each connection sees one
/// run of consecutive numbers that may begin with frames an earlier connection saw but
/// whose acks did not take effect (redelivered first, in order), and goes on without a
/// gap; together they hold every frame. An old frame reappearing in the middle of a
/// connection, a gap or a reorder fails.
fn assert_in_order(connections: &[Vec<usize>], total: usize) {
    let mut next = 0;
    for seen in connections {
        if let Some(&first) = seen.first() {
            assert!(first <= next, "a gap before {first}: {connections:?}");
        }
        for pair in seen.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "not consecutive: {connections:?}");
        }
        if let Some(&last) = seen.last() {
            next = next.max(last + 1);
        }
    }
    assert_eq!(next, total, "not everything arrived: {connections:?}");
}

#[test]
fn the_order_check_fails_on_a_gap_a_reorder_or_a_frame_reappearing() {
    assert_in_order(&[vec![0, 1, 2], vec![1, 2, 3, 4], vec![5]], 6);
    for bad in [
        vec![vec![0, 1, 3]],
        vec![vec![0, 2, 1]],
        vec![vec![0, 1, 2, 1, 2, 3]],
        vec![vec![0, 1], vec![3]],
    ] {
        let caught = std::panic::catch_unwind(|| assert_in_order(&bad, 4));
        assert!(caught.is_err(), "{bad:?} passed");
    }
}

#[test]
fn order_holds_while_the_receiver_moves_between_nodes() {
    let Some((_cluster, a, b)) = two_nodes() else {
        return;
    };
    const TOTAL: usize = 300;
    chat::rt::block_on(async {
        let sender = login_at(&a.addr, 1).await;
        let (mut tx, mut rx) = sender.split();
        // The receiver's first bind (on the sender's node) races the stream: frames sent
        // before it are on their way to the mailbox and must still come first.
        let mut first: Option<Client> = None;
        // The sender streams all its frames while the receiver hops a, b, a, b.
        let sending = chat::rt::spawn(async move {
            for i in 0..TOTAL {
                tx.send(&numbered(1, 2, i)).await.expect("send");
            }
            tx
        });
        let mut seen = Vec::new();
        let hops = [&a.addr, &b.addr, &a.addr, &b.addr];
        let mut previous: Option<Client> = None;
        for (hop, addr) in hops.iter().enumerate() {
            // The next connection binds while the last is still open: a takeover
            // across nodes, in the middle of the stream.
            let mut c = match first.take() {
                Some(c) => c,
                None => login_acks(addr, 2).await,
            };
            drop(previous.take());
            let mut acker = chat::client::Acker::new(2);
            // Stay for a while (a number of frames), or to the end on the last hop.
            let stop = if hop + 1 == hops.len() {
                TOTAL - 1
            } else {
                (hop + 1) * TOTAL / 5
            };
            seen.push(receive_acking(&mut c, &mut acker, stop).await);
            previous = Some(c);
        }
        assert_in_order(&seen, TOTAL);
        let _tx = sending.await;
        // Every frame was echoed to the sender, in order.
        for i in 0..TOTAL {
            let f = within(rx.recv()).await.expect("read").expect("echo");
            assert_eq!(f, delivered(&numbered(1, 2, i)));
        }
    });
}

#[test]
fn a_killed_node_loses_nothing_it_echoed() {
    let Some((_cluster, mut a, b)) = two_nodes() else {
        return;
    };
    const TOTAL: usize = 200;
    chat::rt::block_on(async {
        // The receiver sits on node a with acks on and never acknowledges; one sender
        // is on the same node, one on the other.
        let mut receiver = login_acks(&a.addr, 2).await;
        let mut near = login_at(&a.addr, 1).await;
        let mut far = login_at(&b.addr, 3).await;
        let mut echoed = Vec::new();
        for i in 0..TOTAL {
            let (c, sender) = if i % 2 == 0 {
                (&mut near, 1)
            } else {
                (&mut far, 3)
            };
            let f = numbered(sender, 2, i);
            send_confirmed(c, &f).await;
            echoed.push(i);
        }
        // The receiver got them live, in the order they were echoed (each send waited
        // for its echo); kill -9 its node before it acknowledges.
        let first = data_frames(&mut receiver, TOTAL).await;
        let sent: Vec<ServerFrame> = echoed
            .iter()
            .map(|&i| delivered(&numbered(if i % 2 == 0 { 1 } else { 3 }, 2, i)))
            .collect();
        assert_eq!(first, sent);
        a.signal(libc::SIGKILL);
        a.wait();
        // It comes back through the other node and gets every echoed frame again, once
        // (none was acknowledged), in order per sender.
        let mut c = login_acks(&b.addr, 2).await;
        let got = data_frames(&mut c, TOTAL).await;
        for sender in [1, 3] {
            let from = |frames: &[ServerFrame]| {
                let mine = frames.iter().filter(|f| f.sender == sender);
                mine.cloned().collect::<Vec<_>>()
            };
            assert_eq!(from(&got), from(&sent), "from {sender}");
        }
    });
}

#[test]
fn losing_one_nats_server_loses_nothing() {
    let Some((mut cluster, a, b)) = two_nodes() else {
        return;
    };
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let mut accepted = Vec::new();
        for i in 0..50 {
            let f = numbered(1, 4, i);
            send_confirmed(&mut one, &f).await;
            accepted.push(delivered(&f));
        }
        // One of the three goes (the one node a is on, or a stream replica).
        cluster.nats.kill(0);
        // The service goes on: frames are accepted again once the link has moved to
        // another server (until then they may be refused with store-failed).
        let start = Instant::now();
        let mut i = 50;
        while accepted.len() < 100 {
            assert!(
                start.elapsed() < WAIT,
                "no frame accepted after the server loss"
            );
            let f = numbered(1, 4, i);
            within(one.send(&f)).await.expect("send");
            let reply = recv(&mut one).await;
            if reply == delivered(&f) {
                accepted.push(reply);
                i += 1;
            } else {
                let n = reply.notice().expect("an echo or a notice");
                assert!(n.is(Code::StoreFailed), "unexpected {n}");
            }
        }
        // Every accepted frame is in the mailbox, read on the other node, in order. A
        // frame refused because its publish timed out may have been stored all the
        // same, and was then sent again: at least once, so repeats are allowed.
        let mut got_numbers = numbers_before_the_end(&mut one, 1, 4, &b.addr).await;
        got_numbers.dedup();
        let want_numbers: Vec<usize> = accepted.iter().map(number).collect();
        assert_eq!(got_numbers, want_numbers);
    });
}

#[test]
fn nats_lost_mid_run_gets_store_failed_then_recovers() {
    if !nats_available() {
        return;
    }
    let _slot = slot();
    let mut nats = Nats::start(1, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let a = node(&nats, "a", dir.path(), &[]);
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let mut two = login_at(&a.addr, 2).await;
        // 2 is bound and caught up once a frame has reached it.
        let first = text(1, 2, "before NATS goes");
        send_confirmed(&mut one, &first).await;
        assert_eq!(data_frames(&mut two, 1).await, vec![delivered(&first)]);
        nats.kill(0);
        // Wait until the node knows: a frame for an offline id is refused, not lost.
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "never refused while NATS was down");
            let f = text(1, 9, "while NATS is down");
            within(one.send(&f)).await.expect("send");
            let reply = recv(&mut one).await;
            if reply.notice().is_some_and(|n| n.is(Code::StoreFailed)) {
                break;
            }
        }
        // Its own online clients are still served.
        let live = text(1, 2, "delivered on this node");
        send_confirmed(&mut one, &live).await;
        assert_eq!(data_frames(&mut two, 1).await, vec![delivered(&live)]);
        // NATS comes back; the node reconnects by itself and stores again.
        nats.restart(0);
        let start = Instant::now();
        let kept = loop {
            assert!(start.elapsed() < WAIT, "never recovered");
            let f = text(1, 9, "after NATS is back");
            within(one.send(&f)).await.expect("send");
            if recv(&mut one).await == delivered(&f) {
                break f;
            }
        };
        // The accepted frame is in 9's mailbox. Before it there may be frames that
        // were refused with store-failed because their publish was not confirmed in
        // time, yet reached JetStream when the link came back (at least once:
        // docs/CLUSTER.md); nothing else.
        let mut nine = login_at(&a.addr, 9).await;
        loop {
            let f = data_frames(&mut nine, 1).await.remove(0);
            if f == delivered(&kept) {
                break;
            }
            assert_eq!(f, delivered(&text(1, 9, "while NATS is down")));
        }
    });
    assert_eq!(a.count_logged("store-failed until NATS is back"), 1);
    assert!(a.logged("NATS is back"));
}

/// Runs a node with `args` that must refuse to start: exit code 1 and one line on
/// stderr, which is returned.
fn refused_at_start(args: &[&str]) -> String {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_chat-server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args),
        b"",
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn unreachable_nats_at_start_is_a_clear_error() {
    let port = free_port();
    // The node gives up after 10 s (measured here); the test waits a little longer.
    let started = Instant::now();
    let err = refused_at_start(&["--nats", &format!("nats://127.0.0.1:{port}")]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "gave up after {took:?}"
    );
    assert!(err.contains("cannot reach NATS"), "{err}");
}

#[test]
fn the_link_to_nats_logs_in_with_a_password() {
    if !nats_available() {
        return;
    }
    let _slot = slot();
    let nats = Nats::start(1, "authorization { user: chat, password: s3cret }");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("nats://chat:s3cret@127.0.0.1:{}", nats.ports[0]);
    let a = ServerProcess::start_within(dir.path(), &["--nats", &url, "--node-name", "a"], JOIN);
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let f = text(1, 2, "stored with a password");
        send_confirmed(&mut one, &f).await;
        let (_two, got) = mailbox_of(&a.addr, 2, 1).await;
        assert_eq!(got, vec![delivered(&f)]);
    });
    // A wrong password is refused, and the password is not printed.
    let bad = format!("nats://chat:wrong@127.0.0.1:{}", nats.ports[0]);
    let err = refused_at_start(&["--nats", &bad]);
    assert!(
        err.contains("cannot reach NATS") && !err.contains("wrong"),
        "{err}"
    );
}

#[test]
fn a_node_refuses_to_start_when_a_frame_does_not_fit_nats_max_payload() {
    if !nats_available() {
        return;
    }
    let _slot = slot();
    // The test's NATS allows 10 MB; a 16 MiB frame limit does not fit.
    let nats = Nats::start(1, "");
    let err = refused_at_start(&["--max-frame-bytes", "16777216", "--nats", &nats.urls()]);
    assert!(
        err.contains(
            "NATS max_payload is 10485760 bytes, less than a frame of --max-frame-bytes 16777216"
        ),
        "{err}"
    );
}

/// `--mailbox-max-messages` holds per receiver in the stream: one frame more gets
/// `mailbox-full` and is not stored; other receivers are not affected; reading the
/// mailbox makes room again.
#[test]
fn the_mailbox_limit_holds_in_a_cluster() {
    if !nats_available() {
        return;
    }
    let _slot = slot();
    let nats = Nats::start(3, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let limit = ["--mailbox-max-messages", "3"];
    let a = node(&nats, "a", dir.path(), &limit);
    let b = node(&nats, "b", dir.path(), &limit);
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let kept: Vec<ClientFrame> = (0..3).map(|i| numbered(1, 2, i)).collect();
        for f in &kept {
            send_confirmed(&mut one, f).await;
        }
        within(one.send(&numbered(1, 2, 3))).await.expect("send");
        expect_notice(&mut one, Code::MailboxFull).await;
        // From the other node too: the limit is the stream's, not a node's.
        let mut three = login_at(&b.addr, 3).await;
        within(three.send(&numbered(3, 2, 4))).await.expect("send");
        expect_notice(&mut three, Code::MailboxFull).await;
        send_confirmed(&mut one, &numbered(1, 4, 5)).await;
        // Exactly the three kept, in order, then room again.
        let (two, got) = mailbox_of(&b.addr, 2, 3).await;
        assert_eq!(got, kept.iter().map(delivered).collect::<Vec<_>>());
        drop(two);
        let after = numbered(1, 2, 6);
        send_confirmed(&mut one, &after).await;
        let (_two, got) = mailbox_of(&a.addr, 2, 1).await;
        assert_eq!(got, vec![delivered(&after)]);
    });
}

/// The admin API on a node: what waits in the stream for an id is counted (its bytes
/// are not known there), and forgetting the id purges its subject for every node.
#[test]
fn an_operator_sees_and_forgets_an_id_s_mailbox_in_the_stream() {
    if !nats_available() {
        return;
    }
    let _slot = slot();
    let nats = Nats::start(3, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "cluster-admin\n").expect("writes");
    let token = token.to_str().expect("a path");
    let admin = ["--admin-listen", "127.0.0.1:0", "--admin-token-file", token];
    let a = node(&nats, "a", dir.path(), &admin);
    let b = node(&nats, "b", dir.path(), &[]);
    let addr = a.admin_addr();
    chat::rt::block_on(async {
        let auth = [("Authorization", "Bearer cluster-admin")];
        let ask = |method: &'static str, path: String| async move {
            let (status, _, body) = http_call(addr, method, &path, &auth, "").await;
            let json: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            (status, json)
        };
        let mut three = login_at(&b.addr, 3).await;
        for i in 0..4 {
            send_confirmed(&mut three, &numbered(3, 1, i)).await;
        }
        send_confirmed(&mut three, &numbered(3, 2, 9)).await;
        // Node b writes the frames to their conversation's log within 10 ms of their
        // echoes, and node a counts what is stored: wait until a page read on b holds
        // all four, so that the count below is final.
        let (mut poll, _) = common::sessions::open_at(&b.addr, 3, "poll").await;
        common::sessions::backlog(&mut poll).await;
        let start = Instant::now();
        while sessions::page(&mut poll, 3, 1, 10).await.0.len() < 4 {
            assert!(
                start.elapsed() < WAIT,
                "the frames to 1 never reached its log"
            );
            chat::rt::sleep(Duration::from_millis(20)).await;
        }
        drop(poll);
        let (status, body) = ask("GET", "/v1/ids/1/stored".into()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["stored"]["mailbox"]["messages"], 4, "{body}");
        assert_eq!(body["stored"]["mailbox"]["bytes"], serde_json::Value::Null);
        assert_eq!(body["node"], "a");
        // History (on by default) has the conversation with 3: in blocks, counted as
        // such.
        let blocks = body["stored"]["history"]["messages"].as_u64().unwrap_or(0);
        assert!((1..=4).contains(&blocks), "{body}");
        let (status, body) = ask("DELETE", "/v1/ids/1".into()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deleted"]["mailbox"]["messages"], 4, "{body}");
        assert_eq!(body["deleted"]["history"]["messages"], blocks, "{body}");
        let (_, body) = ask("GET", "/v1/ids/1/stored".into()).await;
        assert_eq!(body["stored"]["mailbox"]["messages"], 0, "{body}");
        assert_eq!(body["stored"]["history"]["messages"], 0, "{body}");
        // 3's side of that conversation went with it: a session of 3 pages nothing.
        let (mut desk, _) = common::sessions::open_at(&b.addr, 3, "desk").await;
        common::sessions::backlog(&mut desk).await;
        let (got, more) = sessions::page(&mut desk, 3, 1, 10).await;
        assert_eq!((got.len(), more), (0, false), "{got:?}");
        drop(desk);
        // Nothing of it reaches 1 on either node; 2's frame is still 2's.
        let after = numbered(3, 1, 5);
        send_confirmed(&mut three, &after).await;
        let (_one, got) = mailbox_of(&a.addr, 1, 1).await;
        assert_eq!(got, vec![delivered(&after)]);
        let (_two, got) = mailbox_of(&a.addr, 2, 1).await;
        assert_eq!(got, vec![delivered(&numbered(3, 2, 9))]);
    });
    drop((a, b, nats));
}

/// A sender whose frame waits on a frozen node is answered within `--answer-within`
/// (2 s here, looked at every 250 ms) with `store-failed` saying the frame may still be
/// delivered, rather than waiting out the forward's 5 s and the publish after it; once
/// the node thaws, the frame does reach its receiver.
#[test]
fn a_sender_waiting_on_a_frozen_node_hears_within_the_bound() {
    if !nats_available() {
        return;
    }
    let _slot = slot();
    let nats = Nats::start(3, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let bound = ["--answer-within", "2"];
    let a = node(&nats, "a", dir.path(), &bound);
    let b = node(&nats, "b", dir.path(), &bound);
    chat::rt::block_on(async {
        let mut two = login_at(&a.addr, 2).await;
        let mut one = login_at(&b.addr, 1).await;
        let warm = text(1, 2, "before");
        send_confirmed(&mut one, &warm).await;
        assert_eq!(data_frames(&mut two, 1).await, vec![delivered(&warm)]);
        a.signal(libc::SIGSTOP);
        let started = Instant::now();
        let late = text(1, 2, "while node a is frozen");
        within(one.send(&late)).await.expect("send");
        let answer = chat::rt::timeout(Duration::from_secs(4), one.recv()).await;
        let waited = started.elapsed();
        a.signal(libc::SIGCONT);
        let answer = answer
            .unwrap_or_else(|| panic!("no answer within 4 s"))
            .expect("reads")
            .expect("a frame");
        let n = answer.notice().expect("a notice, not the echo");
        assert!(n.is(Code::StoreFailed), "{n}");
        assert!(n.detail.contains("may still be delivered"), "{n}");
        assert!(
            waited >= Duration::from_secs(2),
            "answered early: {waited:?}"
        );
        // Once node a thaws, the frame arrives (perhaps twice: see docs/CLUSTER.md).
        assert_eq!(data_frames(&mut two, 1).await, vec![delivered(&late)]);
    });
    drop((a, b, nats));
}

/// The user the NATS server a test cuts off runs as (a bare uid, no account needed).
const CUT_USER: u32 = 61_950;

/// Whether this test may cut processes off with iptables (root, iptables installed);
/// says why not in one line.
fn partitions_possible() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let iptables = root
        && Command::new("iptables")
            .args(["-S", "OUTPUT"])
            .output()
            .is_ok_and(|out| out.status.success());
    if !iptables {
        skipping(
            "CHAT_REQUIRE_PARTITIONS",
            "cutting a NATS server off needs root and iptables",
        );
    }
    iptables
}

/// A chain of iptables rules of this test's own, hooked into OUTPUT (every loopback
/// packet passes it); removed when dropped.
struct Firewall {
    chain: String,
}

fn iptables(args: &[&str]) {
    let out = Command::new("iptables")
        .args(args)
        .output()
        .expect("iptables runs");
    assert!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Firewall {
    /// Cuts NATS server `i` (running as [`CUT_USER`]) off from the other servers,
    /// both ways, while its clients still reach it: its connections to their route
    /// ports are marked and dropped, and so is everything to or from its own.
    fn cut_routes_of(nats: &Nats, i: usize) -> Firewall {
        Firewall::remove_leftovers();
        let chain = format!("CHATTEST{}", std::process::id());
        iptables(&["-N", &chain]);
        let firewall = Firewall { chain };
        iptables(&["-I", "OUTPUT", "-j", &firewall.chain]);
        let others: Vec<String> = (0..nats.routes.len())
            .filter(|&j| j != i)
            .map(|j| nats.routes[j].to_string())
            .collect();
        let own = nats.routes[i].to_string();
        let uid = CUT_USER.to_string();
        let others = others.join(",");
        // A mark of this process's own: a test in another process may cut at the same
        // time, and its rules must not hold this one's connections.
        let mark = format!("{:#x}/0xffffffff", 0x4000_0000 | std::process::id());
        let lo = ["-o", "lo", "-d", "127.0.0.1"];
        let rules: [Vec<&str>; 4] = [
            [
                &lo[..],
                &["-p", "tcp", "-m", "owner", "--uid-owner", &uid],
                &["-m", "multiport", "--dports", &others],
                &["-j", "CONNMARK", "--set-xmark", &mark],
            ]
            .concat(),
            ["-m", "connmark", "--mark", &mark, "-j", "DROP"].to_vec(),
            [&lo[..], &["-p", "tcp", "--dport", &own, "-j", "DROP"]].concat(),
            [&lo[..], &["-p", "tcp", "--sport", &own, "-j", "DROP"]].concat(),
        ];
        for rule in rules {
            let mut args = vec!["-A", firewall.chain.as_str()];
            args.extend(rule);
            iptables(&args);
        }
        firewall
    }
}

impl Firewall {
    /// Removes the chains of test processes that are gone (killed before they could).
    fn remove_leftovers() {
        let Ok(out) = Command::new("iptables").arg("-S").output() else {
            return;
        };
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in listed.lines() {
            let Some(pid) = line.strip_prefix("-N CHATTEST") else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                // Dropping it removes it.
                drop(Firewall {
                    chain: format!("CHATTEST{pid}"),
                });
            }
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        for args in [
            ["-D", "OUTPUT", "-j", self.chain.as_str()],
            ["-F", self.chain.as_str(), "", ""],
            ["-X", self.chain.as_str(), "", ""],
        ] {
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            let _ = Command::new("iptables").args(&args).output();
        }
    }
}

#[test]
fn a_node_on_a_nats_server_cut_off_from_the_others_moves_to_another() {
    if !nats_available() || !partitions_possible() {
        return;
    }
    let _slot = slot();
    let nats = Nats::start_as(&[Some(CUT_USER), None, None], "");
    let dir = tempfile::tempdir().expect("temp dir");
    // The node is given server 0 only, so it starts there; it learns the others
    // from it (as a client of any NATS cluster does), once they are routed.
    until_routed(nats.ports[0]);
    let url = format!("nats://127.0.0.1:{}", nats.ports[0]);
    let a = ServerProcess::start_within(
        &dir.path().join("a"),
        &["--nats", &url, "--node-name", "a", "--nats-replicas", "3"],
        JOIN,
    );
    chat::rt::block_on(async {
        let mut one = login_at(&a.addr, 1).await;
        let mut accepted = Vec::new();
        let first = numbered(1, 9, 0);
        send_confirmed(&mut one, &first).await;
        accepted.push(delivered(&first));
        let cut = Firewall::cut_routes_of(&nats, 0);
        // Through server 0 JetStream cannot reach its quorum: frames for the offline
        // id 9 are refused (store-failed) until the node has moved to another server,
        // then stored again, while the cut lasts.
        let start = Instant::now();
        let mut refused = 0;
        let mut stored_again = false;
        let mut i = 1;
        while !stored_again {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "after 60 s with server 0 cut off, {}",
                if refused == 0 {
                    "no frame refused"
                } else {
                    "still no frame stored"
                }
            );
            let f = numbered(1, 9, i);
            i += 1;
            within(one.send(&f)).await.expect("send");
            let reply = recv(&mut one).await;
            if reply == delivered(&f) {
                accepted.push(reply);
                stored_again = refused > 0;
            } else {
                let n = reply.notice().expect("an echo or a notice");
                assert!(n.is(Code::StoreFailed), "unexpected {n}");
                refused += 1;
            }
        }
        // Every frame stored, in order, read through the server the node moved to; a
        // refused one may have been stored too (at least once, docs/CLUSTER.md).
        let mut got = numbers_before_the_end(&mut one, 1, 9, &a.addr).await;
        let want: Vec<usize> = accepted.iter().map(number).collect();
        got.retain(|n| want.contains(n));
        got.dedup();
        assert_eq!(got, want);
        drop(cut);
    });
    assert!(
        a.logged("moving to another"),
        "the node never said it left server 0"
    );
}

/// One request to NATS at `port` in its text protocol, for what a test asks JetStream
/// directly; the reply's payload.
fn nats_request(port: u16, subject: &str, payload: &str) -> String {
    request_bytes(port, subject, None, payload.as_bytes())
}

/// A raw connection to the NATS server at `port`, its `INFO` line read: a handle to
/// write to and a buffered one to read lines from.
fn raw_nats(port: u16) -> (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) {
    use std::io::BufRead;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("NATS reachable");
    stream.set_read_timeout(Some(WAIT)).expect("a timeout");
    let writer = stream.try_clone().expect("a second handle");
    let mut reader = std::io::BufReader::new(stream);
    let mut info = String::new();
    reader.read_line(&mut info).expect("INFO");
    (writer, reader)
}

/// Asks `subject` through the NATS server at `port`, with `headers` (a NATS/1.0
/// header block) if given, and returns the answer.
fn request_bytes(port: u16, subject: &str, headers: Option<&str>, payload: &[u8]) -> String {
    use std::io::{BufRead, Read, Write};
    let (mut writer, mut reader) = raw_nats(port);
    let mut line = String::new();
    let head = match headers {
        None => format!(
            "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.pub 1\r\nPUB {subject} _INBOX.pub {}\r\n",
            payload.len()
        ),
        Some(h) => format!(
            "CONNECT {{\"verbose\":false,\"headers\":true}}\r\nSUB _INBOX.pub 1\r\nHPUB {subject} _INBOX.pub {} {}\r\n{h}",
            h.len(),
            h.len() + payload.len()
        ),
    };
    writer.write_all(head.as_bytes()).expect("sent");
    writer.write_all(payload).expect("sent");
    writer.write_all(b"\r\n").expect("sent");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("a reply");
        if line.starts_with("PING") {
            writer.write_all(b"PONG\r\n").expect("pong");
        } else if let Some(header) = line
            .strip_prefix("MSG ")
            .or_else(|| line.strip_prefix("HMSG "))
        {
            let len: usize = header
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .expect("a length");
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).expect("the payload");
            body.truncate(len);
            return String::from_utf8_lossy(&body).into_owned();
        }
    }
}

/// Waits until the NATS server at `port` tells its clients of other servers: a node
/// given only that server's URL learns the others when it connects, and only then
/// (async-nats takes no later news).
fn until_routed(port: u16) {
    use std::io::{BufRead, BufReader};
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < WAIT,
            "NATS at {port} never told of another server"
        );
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("NATS reachable");
        stream.set_read_timeout(Some(WAIT)).expect("a timeout");
        let mut info = String::new();
        BufReader::new(stream).read_line(&mut info).expect("INFO");
        let json: serde_json::Value =
            serde_json::from_str(info.trim_start_matches("INFO ").trim()).expect("INFO's JSON");
        let urls = json["connect_urls"].as_array().map_or(0, Vec::len);
        if urls >= 2 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The NATS server that leads `stream`, asked through the server at `port`.
fn stream_leader(port: u16) -> Option<String> {
    let info = nats_request(port, "$JS.API.STREAM.INFO.CHAT_MAILBOX", "");
    let info: serde_json::Value = serde_json::from_str(&info).ok()?;
    info.pointer("/cluster/leader")?
        .as_str()
        .map(str::to_string)
}

#[test]
fn a_frame_stored_while_its_holder_s_server_was_cut_off_is_delivered_after_the_cut() {
    if !nats_available() || !partitions_possible() {
        return;
    }
    let _slot = slot();
    let nats = Nats::start_as(&[Some(CUT_USER), None, None], "");
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "cut-admin\n").expect("writes");
    let token = token.to_str().expect("a path");
    // a holds the receiver through server 0, which is then cut off; b stores through
    // server 1.
    until_routed(nats.ports[0]);
    let on = |i: usize| format!("nats://127.0.0.1:{}", nats.ports[i]);
    let (url0, url1) = (on(0), on(1));
    let a = ServerProcess::start_within(
        &dir.path().join("a"),
        &["--nats", &url0, "--node-name", "a", "--nats-replicas", "3"],
        JOIN,
    );
    let b = ServerProcess::start_within(
        &dir.path().join("b"),
        &[
            "--nats",
            &url1,
            "--node-name",
            "b",
            "--nats-replicas",
            "3",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            token,
        ],
        JOIN,
    );
    // The stream must be able to store while server 0 is cut off: its leader elsewhere.
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "the stream's leader never left n0");
        match stream_leader(nats.ports[1]).as_deref() {
            Some("n0") => {
                let stepdown = "$JS.API.STREAM.LEADER.STEPDOWN.CHAT_MAILBOX";
                nats_request(nats.ports[1], stepdown, "");
            }
            Some(_) => break,
            None => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let admin = b.admin_addr();
    chat::rt::block_on(async {
        let mut nine = login_at(&a.addr, 9).await;
        let mut one = login_at(&b.addr, 1).await;
        let before = text(1, 9, "before the cut");
        send_confirmed(&mut one, &before).await;
        assert_eq!(data_frames(&mut nine, 1).await, vec![delivered(&before)]);
        let cut = Firewall::cut_routes_of(&nats, 0);
        // b cannot reach a: its forward goes unanswered, and after the forward's wait
        // b stores the frame in the stream and mails a, which the cut loses. The
        // sender hears first (an echo or store-failed: it may still be delivered).
        let during = text(1, 9, "during the cut");
        within(one.send(&during)).await.expect("send");
        let reply = recv(&mut one).await;
        assert!(
            reply == delivered(&during) || reply.notice().is_some_and(|n| n.is(Code::StoreFailed)),
            "unexpected {reply:?}"
        );
        let auth = [("Authorization", "Bearer cut-admin")];
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "the frame never reached the stream");
            let (_, _, body) = http_call(admin, "GET", "/v1/ids/9/stored", &auth, "").await;
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            if json["stored"]["mailbox"]["messages"] == 1 {
                break;
            }
            chat::rt::sleep(Duration::from_millis(100)).await;
        }
        // The cut heals, usually before a would move off server 0 (8 s). The mail b
        // sent may still come (dropped packets are sent again once the cut heals),
        // or be lost; either way a reads: on the mail, or when JetStream answers
        // through its server again (or after a move, on the reconnect).
        drop(cut);
        assert_eq!(data_frames(&mut nine, 1).await, vec![delivered(&during)]);
    });
}

// Sessions in a cluster: devices of one id on different nodes, history in the stream.

mod sessions {
    use super::common::sessions::*;
    use super::*;
    use chat::protocol::session::{Before, Query, Received, Record, What};

    /// The payloads of a history page of `id`'s conversation with `with`, newest
    /// first, and whether it says there is more.
    pub async fn page(c: &mut Client, id: u32, with: u32, limit: u16) -> (Vec<String>, bool) {
        let q = Query::History {
            request: 9,
            conversation: with,
            before: Before::Newest,
            limit,
        };
        within(c.send(&q.frame(id))).await.expect("send");
        let mut got = Vec::new();
        loop {
            match next(c).await {
                Received::Record(Record::PageEnd { request, more, .. }) => {
                    assert_eq!(request, 9);
                    return (got, more);
                }
                Received::Message {
                    envelope, payload, ..
                } => {
                    assert_eq!((envelope.what, envelope.request), (What::Page, 9));
                    assert_eq!(envelope.conversation, with);
                    got.push(String::from_utf8_lossy(&payload).into_owned());
                }
                other => panic!("expected a page, got {other:?}"),
            }
        }
    }

    /// The cursor the devices bucket holds for `id`'s device `name`, asked through
    /// the NATS server at `port`.
    pub fn cursor_in_bucket(port: u16, id: u32, name: &str) -> Option<u64> {
        offset_in_bucket(port, &device_key(id, name))
    }

    /// The bucket's key for `id`'s device `name`.
    fn device_key(id: u32, name: &str) -> String {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{id}.d{hex}")
    }

    /// The offset the devices bucket holds under `key`.
    fn offset_in_bucket(port: u16, key: &str) -> Option<u64> {
        let ask = format!(r#"{{"last_by_subj":"$KV.CHAT_DEVICES.{key}"}}"#);
        let answer = nats_request(port, "$JS.API.STREAM.MSG.GET.KV_CHAT_DEVICES", &ask);
        let json: serde_json::Value = serde_json::from_str(&answer).ok()?;
        let data = json.pointer("/message/data")?.as_str()?;
        let bytes = base64_decode(data)?;
        String::from_utf8(bytes).ok()?.parse().ok()
    }

    fn base64_decode(s: &str) -> Option<Vec<u8>> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|&c| c != b'=') {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Some(out)
    }

    /// A node listens to the notes of an id's log only while it has sessions of it:
    /// none before, from the first session (a plain connection of the id is not one),
    /// none once the last has gone. Every note went to every node before.
    #[test]
    fn a_node_hears_an_id_s_notes_only_while_it_has_sessions_of_it() {
        let Some((cluster, a, b)) = two_nodes() else {
            return;
        };
        chat::rt::block_on(async {
            let note = "chat.note.71";
            let mut plain = login_at(&b.addr, 71).await;
            until_listened(&cluster, note, false);
            for addr in [&b.addr, &a.addr] {
                let (session, _) = open_at(addr, 71, "phone").await;
                until_listened(&cluster, note, true);
                drop(session);
                until_listened(&cluster, note, false);
            }
            assert!(
                !listened(cluster.nats.ports[0], "chat.note.72"),
                "another id"
            );
            // The plain connection still works.
            send_confirmed(&mut plain, &text(71, 71, "still here")).await;
        });
    }

    #[test]
    fn devices_of_one_id_on_two_nodes_each_get_every_frame_and_a_third_node_pages_history() {
        let Some((cluster, a, b)) = two_nodes() else {
            return;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let c = node(&cluster.nats, "c", dir.path(), &[]);
        chat::rt::block_on(async {
            let (mut laptop, sync) = open_at(&a.addr, 5, "laptop").await;
            assert!(
                matches!(
                    sync,
                    Record::Sync {
                        new: true,
                        missed: 0,
                        ..
                    }
                ),
                "{sync:?}"
            );
            assert!(backlog(&mut laptop).await.is_empty());
            let (mut phone, _) = open_at(&b.addr, 5, "phone").await;
            assert!(backlog(&mut phone).await.is_empty());
            let mut seven = login_at(&c.addr, 7).await;
            // 7 also has a session, on node a.
            let (mut desk, _) = open_at(&a.addr, 7, "desk").await;
            assert!(backlog(&mut desk).await.is_empty());

            // 7 -> 5 from node c reaches both devices, on a and b, with one offset.
            let hi = text(7, 5, "hi five");
            send_confirmed(&mut seven, &hi).await;
            let (a_from, x, a_body) = message(&mut laptop).await;
            let (b_from, y, b_body) = message(&mut phone).await;
            assert_eq!((a_from, b_from), (7, 7));
            assert_eq!((x.what, y.what), (What::Delivery, What::Delivery));
            assert_eq!((x.conversation, y.conversation), (7, 7));
            assert_eq!(x.offset, y.offset);
            assert!(x.offset > 0 && x.time > 1_700_000_000_000);
            assert_eq!(
                (&a_body[..], &b_body[..]),
                (&b"hi five"[..], &b"hi five"[..])
            );

            // The laptop answers: its echo with the offset, the phone's copy with the
            // same, and 7's plain frame with today's bytes.
            let echo = say(&mut laptop, 5, 7, "hello seven").await;
            assert!(echo.offset > x.offset, "{echo:?} after {x:?}");
            assert_eq!(echo.conversation, 7);
            let (from, copy, body) = message(&mut phone).await;
            assert_eq!((from, copy.what), (5, What::Carbon));
            assert_eq!((copy.offset, copy.conversation), (echo.offset, 7));
            assert_eq!(&body[..], b"hello seven");
            assert_eq!(
                recv(&mut seven).await,
                delivered(&text(5, 7, "hello seven"))
            );
            // 7's session: its plain connection's frame as a copy, then 5's answer, each
            // with the offset 5's devices saw: one message, one offset in both logs.
            let (_, mine, _) = message(&mut desk).await;
            assert_eq!((mine.what, mine.offset), (What::Carbon, x.offset));
            let (_, theirs, _) = message(&mut desk).await;
            assert_eq!((theirs.what, theirs.offset), (What::Delivery, echo.offset));

            // The phone's session did not sign the laptop out.
            within(laptop.ping())
                .await
                .expect("the laptop is still connected");

            // A third device, on the third node, pages the conversation back.
            let (mut tablet, _) = open_at(&c.addr, 5, "tablet").await;
            backlog(&mut tablet).await;
            let (got, more) = page(&mut tablet, 5, 7, 10).await;
            assert_eq!(got, ["hello seven", "hi five"]);
            assert!(!more);
            let (got, more) = page(&mut tablet, 5, 7, 1).await;
            assert_eq!((got, more), (vec!["hello seven".to_string()], true));
        });
    }

    #[test]
    fn a_device_resumes_after_its_cursor_when_its_node_is_killed() {
        let Some((cluster, mut a, b)) = two_nodes() else {
            return;
        };
        let port = cluster.nats.ports[0];
        chat::rt::block_on(async {
            let (mut laptop, _) = open_at(&a.addr, 5, "laptop").await;
            assert!(backlog(&mut laptop).await.is_empty());
            let mut seven = login_at(&b.addr, 7).await;
            let mut last = 0;
            for i in 0..3 {
                send_confirmed(&mut seven, &text(7, 5, &format!("live {i}"))).await;
                let (_, e, body) = message(&mut laptop).await;
                assert_eq!(&body[..], format!("live {i}").as_bytes());
                last = e.offset;
            }
            // Acknowledge the first two; once the bucket has that cursor, kill -9.
            within(laptop.send(&ClientFrame::ack(5, 2)))
                .await
                .expect("ack");
            let start = Instant::now();
            let acked = loop {
                match cursor_in_bucket(port, 5, "laptop") {
                    Some(c) if c > 0 && c < last => break c,
                    _ if start.elapsed() > WAIT => panic!("the cursor was never stored"),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            a.signal(libc::SIGKILL);
            a.wait();
            drop(laptop);
            for i in 0..2 {
                send_confirmed(&mut seven, &text(7, 5, &format!("away {i}"))).await;
            }
            let (mut laptop, sync) = open_at(&b.addr, 5, "laptop").await;
            assert!(
                matches!(
                    sync,
                    Record::Sync {
                        new: false,
                        missed: 0,
                        ..
                    }
                ),
                "{sync:?}"
            );
            let got = backlog(&mut laptop).await;
            let bodies: Vec<_> = got
                .iter()
                .map(|(_, _, b)| String::from_utf8_lossy(b).into_owned())
                .collect();
            assert_eq!(bodies, ["live 2", "away 0", "away 1"]);
            let offsets: Vec<u64> = got.iter().map(|(_, e, _)| e.offset).collect();
            assert!(offsets[0] > acked, "{offsets:?} after {acked}");
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
            // And live again.
            send_confirmed(&mut seven, &text(7, 5, "back")).await;
            assert_eq!(&message(&mut laptop).await.2[..], b"back");
        });
    }

    #[test]
    fn a_device_s_cursor_only_moves_forward_and_no_node_watches_the_cursors() {
        let Some((cluster, a, b)) = two_nodes() else {
            return;
        };
        let port = cluster.nats.ports[0];
        let until_in_bucket = |key: &str, want: u64| {
            let start = Instant::now();
            while offset_in_bucket(port, key) != Some(want) {
                assert!(start.elapsed() < WAIT, "{key} never held {want}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        chat::rt::block_on(async {
            let (mut laptop, _) = open_at(&a.addr, 5, "laptop").await;
            assert!(backlog(&mut laptop).await.is_empty());
            let mut seven = login_at(&b.addr, 7).await;
            let mut offsets = Vec::new();
            for i in 0..3 {
                send_confirmed(&mut seven, &text(7, 5, &format!("live {i}"))).await;
                offsets.push(message(&mut laptop).await.1.offset);
            }
            within(laptop.send(&ClientFrame::ack(5, 1)))
                .await
                .expect("ack");
            until_in_bucket(&device_key(5, "laptop"), offsets[0]);
            // Meanwhile the device went on on another node, which moved its cursor on.
            let ahead = offsets[2] + 1000;
            let subject = format!("$KV.CHAT_DEVICES.{}", device_key(5, "laptop"));
            let stored = publish_bytes(port, &subject, ahead.to_string().as_bytes());
            assert!(stored.contains("\"seq\""), "{stored}");
            // Node a's later write must not take it back. It writes the id's newest
            // cursor right after the device's: once that is there, so is the write.
            within(laptop.send(&ClientFrame::ack(5, 3)))
                .await
                .expect("ack");
            until_in_bucket("5.top", offsets[2]);
            assert_eq!(cursor_in_bucket(port, 5, "laptop"), Some(ahead));
            // And no node watches the cursors: a session's acks are not carried to
            // every node.
            let list = nats_request(port, "$JS.API.CONSUMER.LIST.KV_CHAT_DEVICES", "{}");
            let json: serde_json::Value = serde_json::from_str(&list).expect("consumer list");
            let filters: Vec<String> = json["consumers"]
                .as_array()
                .expect("consumers")
                .iter()
                .map(|c| {
                    c["config"]["filter_subject"]
                        .as_str()
                        .unwrap_or(">")
                        .to_string()
                })
                .collect();
            assert!(
                filters.len() >= 4,
                "two nodes, two watches each: {filters:?}"
            );
            let cursor = format!("$KV.CHAT_DEVICES.{}", device_key(5, "laptop"));
            for filter in &filters {
                assert!(!subject_matches(filter, &cursor), "{filter} takes cursors");
                assert!(
                    !subject_matches(filter, "$KV.CHAT_DEVICES.5.top"),
                    "{filter}"
                );
            }
        });
    }

    /// NATS subject matching: `*` is one token, `>` the rest.
    fn subject_matches(filter: &str, subject: &str) -> bool {
        let mut s = subject.split('.');
        for f in filter.split('.') {
            match (f, s.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (f, Some(t)) if f == t => {}
                _ => return false,
            }
        }
        s.next().is_none()
    }

    /// The rows of `id`'s conversation list, as (peer, unread, read), most recent first.
    async fn conversation_list(c: &mut Client, id: u32) -> Vec<(u32, u32, u64)> {
        let q = Query::Conversations {
            request: 3,
            before: Before::Newest,
            limit: 10,
        };
        within(c.send(&q.frame(id))).await.expect("send");
        let mut rows = Vec::new();
        loop {
            match next(c).await {
                Received::Record(Record::Conversation {
                    request,
                    peer,
                    unread,
                    read,
                    ..
                }) => {
                    assert_eq!(request, 3);
                    rows.push((peer, unread, read));
                }
                Received::Record(Record::PageEnd {
                    request: 3, more, ..
                }) => {
                    assert!(!more);
                    return rows;
                }
                other => panic!("expected the list, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_conversation_list_and_read_markers_agree_on_devices_on_two_nodes() {
        let Some((_cluster, a, b)) = two_nodes() else {
            return;
        };
        chat::rt::block_on(async {
            let (mut laptop, _) = open_at(&a.addr, 5, "laptop").await;
            backlog(&mut laptop).await;
            let (mut phone, _) = open_at(&b.addr, 5, "phone").await;
            backlog(&mut phone).await;
            let mut seven = login_at(&a.addr, 7).await;
            let mut nine = login_at(&b.addr, 9).await;
            let mut from_seven = Vec::new();
            for i in 0..3 {
                send_confirmed(&mut seven, &text(7, 5, &format!("seven {i}"))).await;
                from_seven.push(message(&mut laptop).await.1.offset);
                message(&mut phone).await;
            }
            for i in 0..2 {
                send_confirmed(&mut nine, &text(9, 5, &format!("nine {i}"))).await;
                message(&mut laptop).await;
                message(&mut phone).await;
            }
            assert_eq!(
                conversation_list(&mut laptop, 5).await,
                [(9, 2, 0), (7, 3, 0)]
            );

            // The laptop reads 7's first two: both devices hear the marker move.
            let read = Query::Read {
                request: 4,
                conversation: 7,
                upto: from_seven[1],
            };
            within(laptop.send(&read.frame(5))).await.expect("send");
            let moved = Record::Read {
                conversation: 7,
                upto: from_seven[1],
                unread: 1,
            };
            for device in [&mut laptop, &mut phone] {
                match next(device).await {
                    Received::Record(r) => assert_eq!(r, moved),
                    other => panic!("expected the read record, got {other:?}"),
                }
            }
            assert_eq!(
                conversation_list(&mut phone, 5).await,
                [(9, 2, 0), (7, 1, from_seven[1])]
            );
            // A marker never goes back.
            let back = Query::Read {
                request: 5,
                conversation: 7,
                upto: from_seven[0],
            };
            within(phone.send(&back.frame(5))).await.expect("send");
            for device in [&mut laptop, &mut phone] {
                match next(device).await {
                    Received::Record(r) => assert_eq!(r, moved),
                    other => panic!("expected the read record, got {other:?}"),
                }
            }
        });
    }

    /// Publishes `payload` to `subject` through the NATS server at `port` and returns
    /// JetStream's answer.
    fn publish_bytes(port: u16, subject: &str, payload: &[u8]) -> String {
        request_bytes(port, subject, None, payload)
    }

    #[test]
    fn a_batch_a_node_of_the_previous_release_forwards_reaches_the_receiver_s_sessions() {
        let Some((cluster, a, b)) = two_nodes() else {
            return;
        };
        chat::rt::block_on(async {
            // 5's default device on node a (which holds the id), a session on b.
            let mut plain = login_at(&a.addr, 5).await;
            let (mut web, _) = open_at(&b.addr, 5, "web").await;
            backlog(&mut web).await;
            // A node of the previous release forwards a batch to a: no Chat-Logged.
            let frame = delivered(&text(7, 5, "from an old node"));
            let mut bytes = Vec::new();
            frame.encode(&mut bytes);
            let headers = "NATS/1.0\r\nChat-Node: old\r\n\r\n";
            let port = cluster.nats.ports[0];
            let answer = request_bytes(port, "chat.hold.5.frames", Some(headers), &bytes);
            assert!(answer.contains("stored"), "{answer}");
            assert_eq!(recv(&mut plain).await, frame);
            // a wrote it to 5's log, as the old node did not: the session gets it.
            let (from, e, body) = message(&mut web).await;
            assert_eq!(
                (from, e.what, &body[..]),
                (7, What::Delivery, &b"from an old node"[..])
            );
        });
    }

    #[test]
    fn frames_waiting_in_the_mailbox_stream_reach_the_id_s_first_session_in_order() {
        let Some((cluster, a, b)) = two_nodes() else {
            return;
        };
        chat::rt::block_on(async {
            // 5 has never connected: frames wait in its subject of the mailbox stream.
            // First one as the previous release stored it (the frame alone, in its
            // server -> client encoding, no headers)...
            let old = delivered(&text(7, 5, "stored by the previous release"));
            let mut bytes = Vec::new();
            old.encode(&mut bytes);
            let ack = publish_bytes(cluster.nats.ports[0], "chat.mb.5", &bytes);
            assert!(ack.contains("\"seq\""), "{ack}");
            // ...then as this one does.
            let mut seven = login_at(&a.addr, 7).await;
            for i in 0..3 {
                send_confirmed(&mut seven, &text(7, 5, &format!("waiting {i}"))).await;
            }
            let (mut web, sync) = open_at(&b.addr, 5, "web").await;
            assert!(matches!(sync, Record::Sync { new: true, .. }), "{sync:?}");
            let got = backlog(&mut web).await;
            let seen: Vec<_> = got
                .iter()
                .map(|(from, e, b)| (*from, e.what, String::from_utf8_lossy(b).into_owned()))
                .collect();
            // Each once; this release's in the order they were sent. The previous
            // release's frame is appended to the log as it moves, before or after
            // theirs (their blocks wait up to 10 ms for company).
            let new: Vec<_> = seen
                .iter()
                .filter(|s| s.2.starts_with("waiting"))
                .cloned()
                .collect();
            let want: Vec<_> = (0..3)
                .map(|i| (7, What::Delivery, format!("waiting {i}")))
                .collect();
            assert_eq!(new, want, "{seen:?}");
            let old: Vec<_> = seen.iter().filter(|s| s.2.contains("previous")).collect();
            assert_eq!(old.len(), 1, "{seen:?}");
            assert_eq!(seen.len(), 4, "{seen:?}");
            // They moved: a plain connection of 5 finds nothing waiting.
            let mut plain = login_at(&a.addr, 5).await;
            within(plain.ping())
                .await
                .expect("a pong, and no frame before it");
            // And the moved frames are history.
            let (got, more) = page(&mut web, 5, 7, 10).await;
            assert_eq!((got.len(), more), (4, false), "each once: {got:?}");
        });
    }
}
