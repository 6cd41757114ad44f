//! Identity, forwarding, takeover and the offline mailbox.

mod common;

use chat::protocol::{ClientFrame, Code, PICTURE, TEXT};
use chat::rt;
use common::*;

#[test]
fn online_clients_talk_both_ways_with_text_and_binary() {
    rt::block_on(async {
        let server = start().await;
        let mut a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        let hi = text(1, 2, "hi B, 你好");
        send_confirmed(&mut a, &hi).await;
        assert_eq!(recv(&mut b).await, delivered(&hi));
        let pic = data(2, 1, PICTURE, &[0, 255, 1, 254, 0]);
        send_confirmed(&mut b, &pic).await;
        assert_eq!(recv(&mut a).await, delivered(&pic));
    });
}

#[test]
fn the_first_data_frame_binds_like_the_seed_client() {
    rt::block_on(async {
        let server = start().await;
        let mut seed = connect(&server).await;
        send_confirmed(&mut seed, &text(10_000_000, 0, "bind me")).await;
        let mut other = login(&server, 10_000_001).await;
        let m = text(10_000_001, 10_000_000, "reached you");
        send_confirmed(&mut other, &m).await;
        assert_eq!(recv(&mut seed).await, delivered(&m));
    });
}

#[test]
fn a_spoofed_sender_is_refused_and_not_delivered() {
    rt::block_on(async {
        let server = start().await;
        let mut a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        a.send(&text(3, 2, "pretending to be 3")).await.unwrap();
        let detail = expect_notice(&mut a, Code::BadSender).await;
        assert_eq!(detail, "sender 3 is not this connection's id 1");
        // B's next frame is the genuine one, not the spoof.
        let genuine = text(1, 2, "really from 1");
        send_confirmed(&mut a, &genuine).await;
        assert_eq!(recv(&mut b).await, delivered(&genuine));
    });
}

#[test]
fn sender_zero_is_refused() {
    rt::block_on(async {
        let server = start().await;
        let mut c = connect(&server).await;
        c.send(&text(0, 5, "from the server?")).await.unwrap();
        expect_notice(&mut c, Code::BadSender).await;
        c.send(&ClientFrame::hello(0, b"")).await.unwrap();
        expect_notice(&mut c, Code::BadSender).await;
        // Still usable with a real id, and the refused frames went nowhere.
        let mut five = login(&server, 5).await;
        send_confirmed(&mut c, &text(6, 0, "now bound")).await;
        send_confirmed(&mut five, &text(5, 0, "nothing arrived before this")).await;
    });
}

#[test]
fn takeover_moves_delivery_and_loses_nothing() {
    rt::block_on(async {
        let server = start().await;
        let mut old = login(&server, 7).await;
        let mut sender = login(&server, 8).await;
        let first = text(8, 7, "to the old connection");
        send_confirmed(&mut sender, &first).await;
        assert_eq!(recv(&mut old).await, delivered(&first));
        let mut new = login(&server, 7).await;
        expect_notice(&mut old, Code::Replaced).await;
        expect_closed(&mut old).await;
        let second = text(8, 7, "to the new connection");
        send_confirmed(&mut sender, &second).await;
        assert_eq!(recv(&mut new).await, delivered(&second));
    });
}

/// A takeover in the middle of a stream, acks off: what the old connection read and
/// what the new one reads are together every frame exactly once, in order (frames
/// queued for the old connection and not written go to the new one, first).
#[test]
fn takeover_with_frames_in_flight_loses_nothing_and_keeps_order() {
    rt::block_on(async {
        // Room for everything queued: this is about takeover, not slow consumers.
        let server = start_with(|c| c.max_pending_bytes = 64 << 20).await;
        let mut old = login(&server, 7).await;
        let sender = login(&server, 8).await;
        let frames: Vec<_> = (0..600u32)
            .map(|i| {
                data(
                    8,
                    7,
                    TEXT,
                    &[&i.to_be_bytes()[..], &[b'x'; 32 * 1024]].concat(),
                )
            })
            .collect();
        let (mut tx, mut rx) = sender.split();
        let first: Vec<_> = frames[..300].to_vec();
        let sending = rt::spawn(async move {
            for f in &first {
                tx.send(f).await.expect("send");
            }
            tx
        });
        // 9.6 MB for the old connection, which reads nothing yet: more than its
        // socket holds, so some are queued in the server when the new one binds.
        for f in &frames[..300] {
            assert_eq!(within(rx.recv()).await.unwrap().unwrap(), delivered(f));
        }
        let mut on_old = Vec::new();
        let mut new = login(&server, 7).await;
        loop {
            match within(old.recv()).await {
                Ok(Some(f)) if f.notice().is_some_and(|n| n.is(Code::Replaced)) => {}
                Ok(Some(f)) => {
                    assert!(f.notice().is_none(), "{f:?}");
                    on_old.push(f);
                }
                Ok(None) => break,
                // Replaced in the middle of a write: the partial frame was not
                // delivered and comes to the new connection.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("{e}"),
            }
        }
        let mut tx = sending.await;
        for f in &frames[300..] {
            within(tx.send(f)).await.expect("send");
        }
        let mut on_new = Vec::new();
        while on_old.len() + on_new.len() < frames.len() {
            on_new.push(recv(&mut new).await);
        }
        eprintln!(
            "{} on the old connection, {} on the new",
            on_old.len(),
            on_new.len()
        );
        assert!(on_old.len() < 300, "nothing was in flight at the takeover");
        on_old.extend(on_new);
        assert_frames(&on_old, &frames.iter().map(delivered).collect::<Vec<_>>());
        for f in &frames[300..] {
            assert_eq!(within(rx.recv()).await.unwrap().unwrap(), delivered(f));
        }
        // Nothing more for 7.
        send_confirmed(&mut new, &text(7, 0, "the end")).await;
    });
}

#[test]
fn frames_for_an_offline_receiver_wait_in_the_mailbox() {
    rt::block_on(async {
        let server = start().await;
        let mut a = login(&server, 1).await;
        let stored: Vec<_> = (0..5)
            .map(|i| text(1, 2, &format!("offline {i}")))
            .collect();
        for f in &stored {
            send_confirmed(&mut a, f).await;
        }
        let (b, got) = mailbox_of(&server.addr(), 2, stored.len()).await;
        assert_eq!(got, stored.iter().map(delivered).collect::<Vec<_>>());
        drop(b);
        // Delivered frames are gone from the mailbox.
        let mut again = login(&server, 2).await;
        let live = text(1, 2, "live");
        send_confirmed(&mut a, &live).await;
        assert_eq!(recv(&mut again).await, delivered(&live));
    });
}

#[test]
fn mailbox_frames_arrive_before_newer_live_ones() {
    rt::block_on(async {
        let server = start().await;
        let mut a = login(&server, 1).await;
        let stored: Vec<_> = (0..200)
            .map(|i| text(1, 2, &format!("stored {i}")))
            .collect();
        for f in &stored {
            send_confirmed(&mut a, f).await;
        }
        // B connects and, without waiting, A keeps sending.
        let mut b = connect(&server).await;
        b.send(&ClientFrame::hello(2, b"")).await.unwrap();
        let live: Vec<_> = (0..50).map(|i| text(1, 2, &format!("live {i}"))).collect();
        for f in &live {
            send_confirmed(&mut a, f).await;
        }
        let mut got = Vec::new();
        while got.len() < stored.len() + live.len() {
            let f = recv(&mut b).await;
            if f.notice().is_none() {
                got.push(f);
            }
        }
        let want: Vec<_> = stored.iter().chain(&live).map(delivered).collect();
        assert_eq!(got, want);
    });
}

#[test]
fn a_full_mailbox_refuses_with_a_notice() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.mailbox.max_messages = 3;
            c.mailbox.max_bytes = 1 << 20;
        })
        .await;
        let mut a = login(&server, 1).await;
        for i in 0..3 {
            send_confirmed(&mut a, &text(1, 2, &format!("fits {i}"))).await;
        }
        a.send(&text(1, 2, "one too many")).await.unwrap();
        expect_notice(&mut a, Code::MailboxFull).await;
        // Other receivers have their own limits.
        send_confirmed(&mut a, &text(1, 3, "another mailbox")).await;
        // Byte limit too.
        let server = start_with(|c| c.mailbox.max_bytes = 100).await;
        let mut a = login(&server, 1).await;
        a.send(&data(1, 2, TEXT, &[b'x'; 200])).await.unwrap();
        expect_notice(&mut a, Code::MailboxFull).await;
        // What was refused was not stored.
        let mut b = login(&server, 2).await;
        send_confirmed(&mut b, &text(2, 0, "nothing came before this")).await;
    });
}

/// One sender's flood takes only its share of a receiver's mailbox (by default a
/// quarter of `--mailbox-max-messages`; `--mailbox-max-bytes-per-sender` for bytes):
/// beyond it that sender gets `mailbox-full` naming the per-sender limit, while the
/// receiver's other contacts still get through; the receiver gets every accepted
/// frame, in order, and the sender has room again once they are delivered.
#[test]
fn one_sender_s_flood_leaves_room_for_the_receiver_s_other_contacts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = [
        "--mailbox-max-messages",
        "8",
        "--mailbox-max-bytes-per-sender",
        "1000",
    ];
    let server = ServerProcess::start(dir.path(), &args);
    let kept = rt::block_on(async {
        let mut flood = login_at(&server.addr, 1).await;
        let kept: Vec<ClientFrame> = (0..2).map(|i| text(1, 2, &format!("flood {i}"))).collect();
        for f in &kept {
            send_confirmed(&mut flood, f).await;
        }
        within(flood.send(&text(1, 2, "one too many")))
            .await
            .expect("send");
        let detail = expect_notice(&mut flood, Code::MailboxFull).await;
        assert!(
            detail.contains("from 1") && detail.contains("one sender"),
            "{detail}"
        );
        // A friend gets through; its bytes are its own: 600 fit in its 1000, 600 more
        // do not, a short one does.
        let mut friend = login_at(&server.addr, 3).await;
        let big = data(3, 2, TEXT, &[b'x'; 600]);
        send_confirmed(&mut friend, &big).await;
        within(friend.send(&big)).await.expect("send");
        let detail = expect_notice(&mut friend, Code::MailboxFull).await;
        assert!(detail.contains("bytes from 3"), "{detail}");
        let through = text(3, 2, "a friend gets through");
        send_confirmed(&mut friend, &through).await;
        kept.into_iter().chain([big, through]).collect::<Vec<_>>()
    });
    // Killed and started again, the server counts each sender's share from the file.
    drop(server);
    let server = ServerProcess::start(dir.path(), &args);
    rt::block_on(async {
        let mut flood = login_at(&server.addr, 1).await;
        within(flood.send(&text(1, 2, "still too many")))
            .await
            .expect("send");
        expect_notice(&mut flood, Code::MailboxFull).await;
        let (two, got) = mailbox_of(&server.addr, 2, 4).await;
        let want: Vec<_> = kept.iter().map(delivered).collect();
        assert_eq!(got, want);
        drop(two);
        // Delivered, its frames leave 1's share once the store has the deliveries,
        // which a frame sent at once can overtake (it then finds the share full).
        let again = text(1, 2, "room again");
        let start = std::time::Instant::now();
        loop {
            within(flood.send(&again)).await.expect("send");
            let reply = recv(&mut flood).await;
            if reply == delivered(&again) {
                break;
            }
            let n = reply.notice().expect("an echo or a notice");
            assert!(n.is(Code::MailboxFull), "unexpected {n}");
            assert!(start.elapsed() < WAIT, "1's share never had room again");
            rt::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn a_dropped_receivers_queue_goes_back_to_its_mailbox() {
    rt::block_on(async {
        let server = start().await;
        let mut a = login(&server, 1).await;
        let b = login(&server, 2).await;
        drop(b);
        // Whether each frame meets B's closing connection or the mailbox, none is lost.
        let frames: Vec<_> = (0..100).map(|i| text(1, 2, &format!("m{i}"))).collect();
        for f in &frames {
            send_confirmed(&mut a, f).await;
        }
        let (_b, got) = mailbox_of(&server.addr(), 2, frames.len()).await;
        assert_eq!(got, frames.iter().map(delivered).collect::<Vec<_>>());
    });
}
