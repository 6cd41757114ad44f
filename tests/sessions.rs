//! Sessions: several devices of one id online at once, carbons, envelopes, resuming
//! after a disconnect, history queries, the conversation list and read markers, over
//! real TCP against the real server (docs/PROTOCOL.md, "Sessions").

mod common;

use std::time::Duration;

use bytes::Bytes;
use chat::client::{Acker, Client};
use chat::protocol::session::{Before, Query, Received, Record, What};
use chat::protocol::{ClientFrame, Code, ServerFrame};
use chat::rt;
use common::sessions::*;
use common::*;

/// A session of `id` as `name`: the connection and its `sync` record.
async fn open(server: &TestServer, id: u32, name: &str) -> (Client, Record) {
    let mut c = connect(server).await;
    let sync = within(c.session(id, &device(name), None))
        .await
        .expect("a session");
    (c, sync)
}

/// A `sync` record of a device the server did not know: nothing waits for it.
fn assert_new(sync: &Record) {
    assert!(
        matches!(
            sync,
            Record::Sync {
                new: true,
                backlog: 0,
                ..
            }
        ),
        "{sync:?}"
    );
}

/// A session of `id` as `name`, tried again until the id has room for it.
async fn open_when_room(server: &TestServer, id: u32, name: &str) -> (Client, Record) {
    rt::timeout(WAIT, async {
        loop {
            let mut c = connect(server).await;
            match c.session(id, &device(name), None).await {
                Ok(sync) => return (c, sync),
                Err(_) => rt::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|| panic!("{name} never got in"))
}

async fn record(c: &mut Client) -> Record {
    match next(c).await {
        Received::Record(r) => r,
        other => panic!("expected a record, got {other:?}"),
    }
}

/// Reads a whole query answer: its entries (or rows) and its `page-end`.
async fn answer(c: &mut Client) -> (Vec<Received>, Record) {
    let mut items = Vec::new();
    loop {
        match next(c).await {
            Received::Record(end @ Record::PageEnd { .. }) => return (items, end),
            other => items.push(other),
        }
    }
}

fn payloads(items: &[Received]) -> Vec<String> {
    items
        .iter()
        .map(|r| match r {
            Received::Message { payload, .. } => String::from_utf8_lossy(payload).into_owned(),
            other => panic!("expected a message, got {other:?}"),
        })
        .collect()
}

#[test]
fn two_devices_of_one_id_are_online_together_and_see_the_whole_conversation() {
    rt::block_on(async {
        let server = start().await;
        let (mut laptop, sync) = open(&server, 5, "laptop").await;
        assert!(
            matches!(
                sync,
                Record::Sync {
                    new: true,
                    backlog: 0,
                    missed: 0,
                    ..
                }
            ),
            "{sync:?}"
        );
        assert!(backlog(&mut laptop).await.is_empty());
        let (mut phone, _) = open(&server, 5, "phone").await;
        assert!(backlog(&mut phone).await.is_empty());
        let mut seven = login(&server, 7).await;

        // 7 -> 5 reaches both devices, with one offset and 7 as the conversation.
        let hi = text(7, 5, "hi five");
        send_confirmed(&mut seven, &hi).await;
        let (a_from, a, a_body) = message(&mut laptop).await;
        let (b_from, b, b_body) = message(&mut phone).await;
        assert_eq!((a_from, b_from), (7, 7));
        assert_eq!((a.what, b.what), (What::Delivery, What::Delivery));
        assert_eq!((a.conversation, b.conversation), (7, 7));
        assert_eq!(a.offset, b.offset);
        assert!(a.offset > 0 && a.time > 1_700_000_000_000);
        assert_eq!(
            (&a_body[..], &b_body[..]),
            (&b"hi five"[..], &b"hi five"[..])
        );

        // The laptop answers: its echo, the phone's copy, and 7's plain frame.
        let echo = say(&mut laptop, 5, 7, "hello seven").await;
        assert!(echo.offset > a.offset);
        assert_eq!(echo.conversation, 7);
        let (from, copy, body) = message(&mut phone).await;
        assert_eq!((from, copy.what), (5, What::Carbon));
        assert_eq!((copy.offset, copy.conversation), (echo.offset, 7));
        assert_eq!(&body[..], b"hello seven");
        // A client without a session sees exactly today's bytes.
        assert_eq!(
            recv(&mut seven).await,
            delivered(&text(5, 7, "hello seven"))
        );

        // The phone's session did not sign the laptop out.
        within(laptop.ping())
            .await
            .expect("the laptop is still connected");
    });
}

#[test]
fn a_plain_client_and_a_session_of_one_id_share_its_frames() {
    rt::block_on(async {
        let server = start().await;
        let mut plain = login(&server, 5).await;
        let (mut laptop, _) = open(&server, 5, "laptop").await;
        assert!(backlog(&mut laptop).await.is_empty());
        let mut seven = login(&server, 7).await;
        let hi = text(7, 5, "to both");
        send_confirmed(&mut seven, &hi).await;
        assert_eq!(recv(&mut plain).await, delivered(&hi));
        assert_eq!(message(&mut laptop).await.1.what, What::Delivery);
        // The plain client's own frame: the session gets a copy; the plain client
        // only its echo, as today.
        send_confirmed(&mut plain, &text(5, 7, "from the terminal")).await;
        let (from, copy, _) = message(&mut laptop).await;
        assert_eq!((from, copy.what, copy.conversation), (5, What::Carbon, 7));
        // The session's frame: no copy for the plain client (it would take it for
        // an echo); the next thing it sees is 7's next frame.
        say(&mut laptop, 5, 7, "from the laptop").await;
        assert_eq!(
            recv(&mut seven).await,
            delivered(&text(5, 7, "from the terminal"))
        );
        assert_eq!(
            recv(&mut seven).await,
            delivered(&text(5, 7, "from the laptop"))
        );
        let again = text(7, 5, "second");
        send_confirmed(&mut seven, &again).await;
        assert_eq!(recv(&mut plain).await, delivered(&again));
    });
}

#[test]
fn a_device_that_was_away_resumes_after_what_it_acknowledged() {
    rt::block_on(async {
        let server = start().await;
        let (mut laptop, _) = open(&server, 5, "laptop").await;
        assert!(backlog(&mut laptop).await.is_empty());
        let mut seven = login(&server, 7).await;
        let mut acker = Acker::new(5);
        for i in 0..3 {
            send_confirmed(&mut seven, &text(7, 5, &format!("live {i}"))).await;
            let (_, e, _) = message(&mut laptop).await;
            acker.handled_what(e.what);
        }
        // Acknowledge the first two only, then leave.
        within(laptop.send(&ClientFrame::ack(5, 2)))
            .await
            .expect("ack");
        within(laptop.ping()).await.expect("pong");
        drop(laptop);
        for i in 0..4 {
            send_confirmed(&mut seven, &text(7, 5, &format!("away {i}"))).await;
        }
        let (mut laptop, sync) = open(&server, 5, "laptop").await;
        match sync {
            Record::Sync {
                new,
                backlog: waiting,
                missed,
                ..
            } => assert_eq!((new, waiting, missed), (false, 5, 0)),
            other => panic!("{other:?}"),
        }
        let got = backlog(&mut laptop).await;
        let bodies: Vec<_> = got
            .iter()
            .map(|(_, _, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(bodies, ["live 2", "away 0", "away 1", "away 2", "away 3"]);
        let offsets: Vec<u64> = got.iter().map(|(_, e, _)| e.offset).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    });
}

#[test]
fn history_pages_go_back_newest_first_and_say_when_there_is_more() {
    rt::block_on(async {
        let server = start().await;
        let mut five = login(&server, 5).await;
        let mut seven = login(&server, 7).await;
        let mut nine = login(&server, 9).await;
        for i in 0..25 {
            send_confirmed(&mut seven, &text(7, 5, &format!("m{i}"))).await;
            recv(&mut five).await;
            if i % 5 == 0 {
                // Another conversation in between: pages leave it out.
                send_confirmed(&mut nine, &text(9, 5, "other")).await;
                recv(&mut five).await;
            }
        }
        // Delivered, and still there for a new device.
        let (mut phone, sync) = open(&server, 5, "phone").await;
        assert_new(&sync);
        assert!(backlog(&mut phone).await.is_empty());
        let mut before = Before::Newest;
        let mut seen = Vec::new();
        for page in 0.. {
            let q = Query::History {
                request: 40 + page,
                conversation: 7,
                before,
                limit: 10,
            };
            within(phone.send(&q.frame(5))).await.expect("send");
            let (items, end) = answer(&mut phone).await;
            for item in &items {
                let Received::Message {
                    sender, envelope, ..
                } = item
                else {
                    panic!("{item:?}");
                };
                assert_eq!((*sender, envelope.what), (7, What::Page));
                assert_eq!((envelope.conversation, envelope.request), (7, 40 + page));
            }
            seen.extend(payloads(&items));
            let Record::PageEnd {
                request,
                more,
                next,
            } = end
            else {
                unreachable!()
            };
            assert_eq!(request, 40 + page);
            if !more {
                break;
            }
            assert_eq!(items.len(), 10);
            before = Before::Offset(next);
        }
        let want: Vec<String> = (0..25).rev().map(|i| format!("m{i}")).collect();
        assert_eq!(seen, want);
    });
}

#[test]
fn the_conversation_list_and_read_markers_agree_on_every_device() {
    rt::block_on(async {
        let server = start().await;
        let (mut laptop, _) = open(&server, 5, "laptop").await;
        assert!(backlog(&mut laptop).await.is_empty());
        let (mut phone, _) = open(&server, 5, "phone").await;
        assert!(backlog(&mut phone).await.is_empty());
        let mut seven = login(&server, 7).await;
        let mut nine = login(&server, 9).await;
        for i in 0..3 {
            send_confirmed(&mut seven, &text(7, 5, &format!("seven {i}"))).await;
        }
        send_confirmed(&mut nine, &text(9, 5, "nine")).await;
        let mut last_from_seven = 0;
        for _ in 0..4 {
            let (from, e, _) = message(&mut laptop).await;
            message(&mut phone).await;
            if from == 7 {
                last_from_seven = e.offset;
            }
        }
        let list = |request| Query::Conversations {
            request,
            before: Before::Newest,
            limit: 10,
        };
        within(phone.send(&list(1).frame(5))).await.expect("send");
        let (rows, end) = answer(&mut phone).await;
        let rows: Vec<(u32, u32)> = rows
            .iter()
            .map(|r| match r {
                Received::Record(Record::Conversation { peer, unread, .. }) => (*peer, *unread),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            rows,
            [(9, 1), (7, 3)],
            "most recent first, with unread counts"
        );
        assert!(matches!(
            end,
            Record::PageEnd {
                request: 1,
                more: false,
                ..
            }
        ));

        // The laptop reads 7's conversation; the phone hears it.
        let read = Query::Read {
            request: 2,
            conversation: 7,
            upto: last_from_seven,
        };
        within(laptop.send(&read.frame(5))).await.expect("send");
        let want = Record::Read {
            conversation: 7,
            upto: last_from_seven,
            unread: 0,
        };
        assert_eq!(record(&mut laptop).await, want);
        assert_eq!(record(&mut phone).await, want);
        within(phone.send(&list(3).frame(5))).await.expect("send");
        let (rows, _) = answer(&mut phone).await;
        assert!(rows.iter().any(|r| matches!(
            r,
            Received::Record(Record::Conversation { peer: 7, unread: 0, read, .. }) if *read == last_from_seven
        )));
    });
}

#[test]
fn bad_queries_are_answered_and_the_connection_stays() {
    rt::block_on(async {
        let server = start().await;
        // Without a session: bad-control.
        let mut plain = login(&server, 5).await;
        let q = Query::History {
            request: 1,
            conversation: 7,
            before: Before::Newest,
            limit: 5,
        };
        within(plain.send(&q.frame(5))).await.expect("send");
        let detail = expect_notice(&mut plain, Code::BadControl).await;
        assert!(detail.contains("session"), "{detail}");
        within(plain.ping()).await.expect("still connected");

        let (mut s, _) = open(&server, 6, "pc").await;
        assert!(backlog(&mut s).await.is_empty());
        let bad = |receiver, body: &[u8]| ClientFrame {
            sender: 6,
            receiver,
            kind: 0,
            body: Bytes::copy_from_slice(body),
        };
        // Too short, a limit of 0, request 0, conversation 0.
        let mut zero_limit = q.frame(6).body.to_vec();
        zero_limit[0..4].copy_from_slice(&9u32.to_be_bytes());
        zero_limit[16..18].copy_from_slice(&0u16.to_be_bytes());
        for (frame, request, words) in [
            (bad(5, &[0, 0, 0, 3, 1]), 3, "bytes"),
            (bad(5, &zero_limit), 9, "limit"),
            (bad(7, &[0; 16]), 0, "request 0"),
        ] {
            within(s.send(&frame)).await.expect("send");
            match record(&mut s).await {
                Record::QueryFailed { request: r, why } => {
                    assert_eq!(r, request);
                    assert!(why.contains(words), "{why}");
                }
                other => panic!("{other:?}"),
            }
        }
        // Reading a conversation the id never had.
        let read = Query::Read {
            request: 4,
            conversation: 99,
            upto: 5,
        };
        within(s.send(&read.frame(6))).await.expect("send");
        assert!(matches!(
            record(&mut s).await,
            Record::QueryFailed { request: 4, .. }
        ));
        within(s.ping()).await.expect("still connected");
    });
}

#[test]
fn past_max_devices_the_oldest_offline_device_makes_room_and_online_ones_are_kept() {
    rt::block_on(async {
        let server = start_with(|c| c.max_devices = 2).await;
        let (mut a, _) = open(&server, 5, "a").await;
        assert!(backlog(&mut a).await.is_empty());
        let (mut b, _) = open(&server, 5, "b").await;
        assert!(backlog(&mut b).await.is_empty());
        // Both online: a third is refused, and closed.
        let mut c = connect(&server).await;
        within(c.send(&ClientFrame::session(5, &device("c"), b"")))
            .await
            .expect("send");
        let detail = expect_notice(&mut c, Code::TooManyDevices).await;
        assert!(detail.contains("2 devices"), "{detail}");
        expect_closed(&mut c).await;
        // "a" leaves: "c" takes its place, and "a" is a new device when it returns.
        drop(a);
        let mut seven = login(&server, 7).await;
        // "a" may not be gone yet: "c" gets in once it is.
        let (c, sync) = open_when_room(&server, 5, "c").await;
        assert!(matches!(sync, Record::Sync { new: true, .. }));
        drop(c);
        send_confirmed(&mut seven, &text(7, 5, "for b and c")).await;
        assert_eq!(message(&mut b).await.1.what, What::Delivery);
        let (_, sync) = open_when_room(&server, 5, "a").await;
        assert_new(&sync);
    });
}

#[test]
fn history_older_than_its_age_is_pruned_and_without_history_queries_are_refused() {
    rt::block_on(async {
        let server = start_with(|c| c.history.max_age = Duration::from_secs(1)).await;
        let mut five = login(&server, 5).await;
        let mut seven = login(&server, 7).await;
        send_confirmed(&mut seven, &text(7, 5, "soon gone")).await;
        recv(&mut five).await;
        let (mut s, _) = open(&server, 5, "pc").await;
        assert!(backlog(&mut s).await.is_empty());
        let mut request = 0;
        let mut counts = Vec::new();
        within(async {
            loop {
                request += 1;
                let q = Query::History {
                    request,
                    conversation: 7,
                    before: Before::Newest,
                    limit: 10,
                };
                s.send(&q.frame(5)).await.expect("send");
                let (items, _) = answer(&mut s).await;
                counts.push(items.len());
                if items.is_empty() {
                    return;
                }
                rt::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(
            counts.first(),
            Some(&1),
            "kept after delivery at first: {counts:?}"
        );
        // The conversation's row goes as well (its newest message is past the age).
        within(async {
            loop {
                request += 1;
                let q = Query::Conversations {
                    request,
                    before: Before::Newest,
                    limit: 10,
                };
                s.send(&q.frame(5)).await.expect("send");
                let (rows, _) = answer(&mut s).await;
                if rows.is_empty() {
                    return;
                }
                rt::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;

        let off = start_with(|c| c.history = chat::store::History::off()).await;
        let (mut s, _) = open(&off, 5, "pc").await;
        assert!(backlog(&mut s).await.is_empty());
        let q = Query::History {
            request: 8,
            conversation: 7,
            before: Before::Newest,
            limit: 10,
        };
        within(s.send(&q.frame(5))).await.expect("send");
        match record(&mut s).await {
            Record::QueryFailed { request: 8, why } => assert!(why.contains("off"), "{why}"),
            other => panic!("{other:?}"),
        }
    });
}

/// What the previous release stored (its one table, `mailbox`: (receiver, seq) ->
/// frame) is delivered by this one, in order, once, and the move says so once.
#[test]
fn a_data_dir_of_the_previous_release_is_taken_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let frames: Vec<ServerFrame> = (0..50u32)
        .map(|i| ServerFrame {
            sender: 7 + i % 2,
            kind: 1,
            body: format!("old {i}").into_bytes().into(),
        })
        .collect();
    {
        let db = redb::Database::create(dir.path().join("mailbox.redb")).expect("db");
        let old: redb::TableDefinition<(u32, u64), &[u8]> = redb::TableDefinition::new("mailbox");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(old).expect("table");
            for (i, f) in frames.iter().enumerate() {
                t.insert((5u32, 100 + i as u64), &f.to_bytes()[..])
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let mut server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let (_c, got) = mailbox_of(&server.addr, 5, frames.len()).await;
        assert_frames(&got, &frames);
    });
    assert_eq!(server.count_logged("moved 50 stored frames"), 1);
    server.signal(libc::SIGTERM);
    server.wait();
    // Started again: nothing left to move, nothing delivered twice.
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let mut c = within(Client::connect(&server.addr))
            .await
            .expect("connects");
        let early = within(c.hello(5, None)).await.expect("welcome");
        assert!(early.is_empty(), "{early:?}");
        within(c.ping()).await.expect("pong");
    });
    assert_eq!(server.count_logged("moved"), 0);
}

#[test]
fn a_session_needs_a_valid_token_when_auth_is_on_and_a_well_formed_body() {
    use chat::auth::{Auth, Keys, Secret};
    rt::block_on(async {
        let keys = Keys::from(Secret::new("session secret").expect("a secret"));
        let token = keys.mint(5, None);
        let server = start_with(|c| c.auth = Some(Auth::new(keys, false))).await;
        let mut ok = connect(&server).await;
        let sync = within(ok.session(5, &device("laptop"), Some(&token))).await;
        assert!(matches!(sync, Ok(Record::Sync { .. })), "{sync:?}");
        // A token for another id: refused, and closed.
        let mut wrong = connect(&server).await;
        within(wrong.send(&ClientFrame::session(
            6,
            &device("laptop"),
            token.as_bytes(),
        )))
        .await
        .expect("send");
        expect_notice(&mut wrong, Code::AuthFailed).await;
        expect_closed(&mut wrong).await;

        // Bodies that are not a session: bad-control, and the connection stays unbound.
        let open = start().await;
        let mut c = connect(&open).await;
        for (body, words) in [
            (&[2u8, 1, b'a'][..], "version 2"),
            (&[1, 0][..], "device name"),
            (&[1, 9, b'a'][..], "device length"),
        ] {
            let frame = ClientFrame {
                sender: 5,
                receiver: 4,
                kind: 0,
                body: Bytes::copy_from_slice(body),
            };
            within(c.send(&frame)).await.expect("send");
            let detail = expect_notice(&mut c, Code::BadControl).await;
            assert!(detail.contains(words), "{detail}");
        }
        let sync = within(c.session(5, &device("pc"), None)).await;
        assert!(
            matches!(sync, Ok(Record::Sync { .. })),
            "still unbound: {sync:?}"
        );
    });
}

/// A device whose inbox is at the mailbox limit while another device of the id takes
/// the frames misses them, and its next `sync` says how many.
#[test]
fn a_device_past_the_mailbox_limit_is_told_how_much_it_missed() {
    rt::block_on(async {
        let server = start_with(|c| c.mailbox.max_messages = 2).await;
        let (mut laptop, _) = open(&server, 5, "laptop").await;
        assert!(backlog(&mut laptop).await.is_empty());
        let (mut phone, _) = open(&server, 5, "phone").await;
        assert!(backlog(&mut phone).await.is_empty());
        let mut seven = login(&server, 7).await;
        // The server closes the laptop (a header past the frame limit); once the
        // laptop sees the end of its stream, the server has taken it offline.
        let mut oversized = text(5, 7, "").to_bytes();
        oversized[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        within(laptop.sender.send_raw(&oversized))
            .await
            .expect("send");
        expect_closed(&mut laptop).await;
        for i in 0..4 {
            send_confirmed(&mut seven, &text(7, 5, &format!("f{i}"))).await;
            message(&mut phone).await;
        }
        let (mut laptop, sync) = open(&server, 5, "laptop").await;
        match sync {
            Record::Sync {
                backlog: waiting,
                missed,
                new,
                ..
            } => assert_eq!((new, waiting, missed), (false, 2, 2)),
            other => panic!("{other:?}"),
        }
        let got = backlog(&mut laptop).await;
        let bodies: Vec<_> = got.iter().map(|(_, _, b)| b.clone()).collect();
        assert_eq!(bodies, [Bytes::from("f0"), Bytes::from("f1")]);
    });
}

/// Past `--history-max-messages` (and a 64th) a conversation loses its oldest blocks of
/// 256 and keeps the newest; another conversation keeps everything.
#[test]
fn a_conversation_past_its_bound_loses_its_oldest_blocks() {
    rt::block_on(async {
        let server = start_with(|c| c.history.max_messages = 300).await;
        let mut five = login(&server, 5).await;
        let mut seven = login(&server, 7).await;
        let mut nine = login(&server, 9).await;
        // 600 frames from 7 in pipelined batches, then 3 from 9.
        for batch in 0..6 {
            let frames: Vec<_> = (0..100)
                .map(|i| text(7, 5, &format!("m{}", batch * 100 + i)))
                .collect();
            for f in &frames {
                within(seven.send(f)).await.expect("send");
            }
            for f in &frames {
                assert_eq!(recv(&mut seven).await, delivered(f));
                assert_eq!(recv(&mut five).await, delivered(f));
            }
        }
        for i in 0..3 {
            send_confirmed(&mut nine, &text(9, 5, &format!("n{i}"))).await;
            recv(&mut five).await;
        }
        let (mut s, _) = open(&server, 5, "pc").await;
        assert!(backlog(&mut s).await.is_empty());
        let sevens = whole(&mut s, 5, 7).await;
        // Within the bound and a block of it, and the newest always there.
        assert!(
            (300 - 256..=300 + 300 / 64 + 1).contains(&sevens.len()),
            "{} kept",
            sevens.len()
        );
        assert_eq!(sevens.first().map(String::as_str), Some("m599"));
        let newest_first: Vec<String> = (600 - sevens.len()..600)
            .rev()
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(sevens, newest_first, "the oldest went, in order");
        assert_eq!(whole(&mut s, 5, 9).await, ["n2", "n1", "n0"]);
    });
}

/// Every message of `id`'s conversation with `conversation` that history keeps, newest
/// first, page by page.
async fn whole(s: &mut Client, id: u32, conversation: u32) -> Vec<String> {
    let mut seen = Vec::new();
    let mut before = Before::Newest;
    for request in 1.. {
        let q = Query::History {
            request,
            conversation,
            before,
            limit: 100,
        };
        within(s.send(&q.frame(id))).await.expect("send");
        let (items, end) = answer(s).await;
        seen.extend(payloads(&items));
        match end {
            Record::PageEnd {
                more: true, next, ..
            } => before = Before::Offset(next),
            _ => break,
        }
    }
    seen
}

/// A file this release wrote, which the previous release then ran on again (its
/// `mailbox` table beside this release's tables, numbered from 1 again): the old rows
/// come after what already waited, in order, once, without duplicating history.
#[test]
fn a_previous_release_running_again_on_this_release_s_file_is_taken_over_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    // This release first: two frames wait for 5.
    {
        let mut server = ServerProcess::start(dir.path(), &[]);
        let sent = chat_client(
            &["--server", &server.addr, "--id", "7", "--to", "5"],
            "new 0\nnew 1\n",
        );
        assert!(sent.status.success(), "{sent:?}");
        server.signal(libc::SIGTERM);
        server.wait();
    }
    // Then the previous release, which numbers from 1 in its own table.
    {
        let db = redb::Database::create(dir.path().join("mailbox.redb")).expect("db");
        let old: redb::TableDefinition<(u32, u64), &[u8]> = redb::TableDefinition::new("mailbox");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(old).expect("table");
            for i in 0..3u64 {
                let f = ServerFrame {
                    sender: 7,
                    kind: 1,
                    body: format!("old {i}").into_bytes().into(),
                };
                t.insert((5u32, 1 + i), &f.to_bytes()[..]).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let (mut c, got) = mailbox_of(&server.addr, 5, 5).await;
        let bodies: Vec<String> = got
            .iter()
            .map(|f| String::from_utf8_lossy(&f.body).into_owned())
            .collect();
        assert_eq!(bodies, ["new 0", "new 1", "old 0", "old 1", "old 2"]);
        drop(c.ping().await);
        let (mut s, _) = {
            let mut s = within(Client::connect(&server.addr))
                .await
                .expect("connects");
            let sync = within(s.session(5, &device("pc"), None))
                .await
                .expect("session");
            (s, sync)
        };
        assert!(backlog(&mut s).await.is_empty());
        assert_eq!(
            whole(&mut s, 5, 7).await,
            ["old 2", "old 1", "old 0", "new 1", "new 0"],
            "history once each, in the order the frames were numbered"
        );
    });
}

/// Frames delivered live are written to history in groups, a few milliseconds after
/// their delivery (docs/PROTOCOL.md, "History"): a graceful stop right after them
/// writes the group that waited, and the conversation is whole after the restart.
#[test]
fn frames_delivered_just_before_a_graceful_stop_are_in_history_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let mut five = login_at(&server.addr, 5).await;
        let mut seven = login_at(&server.addr, 7).await;
        for i in 0..20 {
            let f = text(7, 5, &format!("m{i}"));
            within(seven.send(&f)).await.expect("send");
        }
        for i in 0..20 {
            assert_eq!(
                recv(&mut five).await,
                delivered(&text(7, 5, &format!("m{i}")))
            );
        }
        server.signal(libc::SIGTERM);
    });
    assert_eq!(server.wait().code(), Some(0));
    let server = ServerProcess::start(dir.path(), &[]);
    rt::block_on(async {
        let (mut phone, _) = open_at(&server.addr, 5, "phone").await;
        assert!(backlog(&mut phone).await.is_empty());
        let want: Vec<String> = (0..20).rev().map(|i| format!("m{i}")).collect();
        assert_eq!(whole(&mut phone, 5, 7).await, want);
    });
}

/// A named device unused for history's retention is forgotten: what waited for it
/// goes, and it comes back as a new device; a device online all that time is kept. A
/// default device's row goes too once nothing waits for it (else one row per id that
/// ever connected would stay forever); one with a frame waiting stays.
#[test]
fn devices_unused_for_the_retention_are_forgotten() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = ServerProcess::start(dir.path(), &["--history-max-age", "1s"]);
    rt::block_on(async {
        // 8 binds plainly and leaves with nothing waiting, 9 with a frame waiting.
        let mut seven = login_at(&server.addr, 7).await;
        for id in [8, 9] {
            let mut c = login_at(&server.addr, id).await;
            within(c.ping()).await.expect("pong");
        }
        send_confirmed(&mut seven, &text(7, 9, "for nine, later")).await;
        // The phone stays online throughout; the laptop leaves, and a frame waits for it.
        let (mut phone, _) = open_at(&server.addr, 5, "phone").await;
        assert!(backlog(&mut phone).await.is_empty());
        let (mut laptop, _) = open_at(&server.addr, 5, "laptop").await;
        assert!(backlog(&mut laptop).await.is_empty());
        drop(laptop);
        send_confirmed(&mut seven, &text(7, 5, "while the laptop is away")).await;
        let (_, _, body) = message(&mut phone).await;
        assert_eq!(&body[..], b"while the laptop is away");
        within(async {
            while !server.logged("forgetting device laptop") {
                rt::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(!server.logged("forgetting device phone"));
        let (_laptop, sync) = open_at(&server.addr, 5, "laptop").await;
        match sync {
            Record::Sync { new, backlog, .. } => assert_eq!((new, backlog), (true, 0)),
            other => panic!("{other:?}"),
        }
        // The phone, online all along, still gets what comes.
        send_confirmed(&mut seven, &text(7, 5, "still here?")).await;
        let (_, _, body) = message(&mut phone).await;
        assert_eq!(&body[..], b"still here?");
    });
    server.signal(libc::SIGTERM);
    server.wait();
    let db = redb::Database::open(dir.path().join("mailbox.redb")).expect("db");
    let devices: redb::TableDefinition<(u32, u16), &[u8]> = redb::TableDefinition::new("devices");
    let txn = db.begin_read().expect("txn");
    let t = txn.open_table(devices).expect("devices");
    assert!(t.get((8, 0)).expect("get").is_none(), "8's row went");
    assert!(
        t.get((9, 0)).expect("get").is_some(),
        "9's row stays: a frame waits"
    );
    assert!(t.get((5, 1)).expect("get").is_some(), "the phone stays");
}
