//! The seed's behaviour: every data frame comes back to its sender, byte for byte.

mod common;

use async_std::net::TcpStream;
use futures::{AsyncReadExt, AsyncWriteExt};

use chat::protocol::{ClientFrame, Code, FrameBuf, PICTURE, TEXT, VIDEO, VOICE};
use chat::rt;
use common::*;

#[test]
fn text_echo_including_multibyte_utf8() {
    rt::block_on(async {
        let server = start().await;
        let mut c = connect(&server).await;
        for body in ["hello", "你好", "emoji 🦀 and ünïcödé", ""] {
            send_confirmed(&mut c, &text(10_000_000, 0, body)).await;
        }
    });
}

#[test]
fn all_types_and_sizes_round_trip() {
    rt::block_on(async {
        let server = start().await;
        let mut c = connect(&server).await;
        for kind in [TEXT, PICTURE, VOICE, VIDEO, 200] {
            for size in [0, 1, 64 * 1024, 1024 * 1024] {
                let body: Vec<u8> = (0..size).map(|i| (i * 7 + kind as usize) as u8).collect();
                send_confirmed(&mut c, &data(42, 0, kind, &body)).await;
            }
        }
    });
}

/// The seed's client packs `struct.pack("!IIBI5s", 10000000, 10000001, 1, 5, b"hello")`
/// and unpacks the reply with `!I`, `!B`, `!I` and `!5s`; here are those exact bytes.
#[test]
fn seed_client_bytes_get_the_seed_reply() {
    rt::block_on(async {
        let server = start().await;
        let mut s = within(TcpStream::connect(server.addr)).await.unwrap();
        let request = b"\x00\x98\x96\x80\x00\x98\x96\x81\x01\x00\x00\x00\x05hello";
        s.write_all(request).await.unwrap();
        let mut reply = [0u8; 14];
        within(s.read_exact(&mut reply)).await.unwrap();
        assert_eq!(&reply, b"\x00\x98\x96\x80\x01\x00\x00\x00\x05hello");
    });
}

#[test]
fn a_frame_written_one_byte_at_a_time() {
    rt::block_on(async {
        let server = start().await;
        let mut c = connect(&server).await;
        let frame = text(7, 0, "slowly, byte by byte: 慢慢来");
        for byte in frame.to_bytes() {
            c.sender.send_raw(&[byte]).await.unwrap();
        }
        assert_eq!(recv(&mut c).await, delivered(&frame));
    });
}

#[test]
fn a_thousand_pipelined_frames_return_complete_and_in_order() {
    rt::block_on(async {
        let server = start().await;
        let mut c = connect(&server).await;
        let frames: Vec<ClientFrame> = (0..1000)
            .map(|i| text(9, 0, &format!("message {i}")))
            .collect();
        let burst: Vec<u8> = frames.iter().flat_map(|f| f.to_bytes()).collect();
        c.sender.send_raw(&burst).await.unwrap();
        for f in &frames {
            assert_eq!(recv(&mut c).await, delivered(f));
        }
    });
}

#[test]
fn two_hundred_concurrent_clients_each_get_only_their_own_echoes() {
    rt::block_on(async {
        let server = start().await;
        let addr = server.addr();
        let tasks: Vec<_> = (1..=200u32)
            .map(|id| {
                let addr = addr.clone();
                rt::spawn(async move {
                    let mut c = within(chat::client::Client::connect(&addr)).await.unwrap();
                    for i in 0..20 {
                        send_confirmed(&mut c, &text(id, 0, &format!("{id}:{i}"))).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
}

#[test]
fn clients_closing_mid_header_and_mid_body_leave_others_served() {
    rt::block_on(async {
        let server = start().await;
        let mut good = connect(&server).await;
        send_confirmed(&mut good, &text(1, 0, "before")).await;
        let whole = text(2, 0, "a body that will be cut short").to_bytes();
        for cut in [5, 20] {
            let mut s = within(TcpStream::connect(server.addr)).await.unwrap();
            s.write_all(&whole[..cut]).await.unwrap();
            drop(s);
        }
        send_confirmed(&mut good, &text(1, 0, "after")).await;
    });
}

#[test]
fn a_client_gone_mid_frame_is_taken_offline() {
    rt::block_on(async {
        let server = start().await;
        let mut gone = login(&server, 2).await;
        let cut = text(2, 0, "never completed").to_bytes();
        gone.sender.send_raw(&cut[..cut.len() - 3]).await.unwrap();
        drop(gone);
        // Frames for 2 now wait in its mailbox instead of going to the dead socket.
        let mut a = login(&server, 1).await;
        let m = text(1, 2, "kept for later");
        send_confirmed(&mut a, &m).await;
        let (_again, got) = mailbox_of(&server.addr(), 2, 1).await;
        assert_eq!(got, vec![delivered(&m)]);
    });
}

#[test]
fn an_oversized_header_gets_a_notice_and_the_close() {
    rt::block_on(async {
        let server = start_with(|c| c.max_frame_bytes = 1024).await;
        let mut c = connect(&server).await;
        let mut header = vec![0, 0, 0, 1, 0, 0, 0, 0, TEXT];
        header.extend_from_slice(&(1025u32).to_be_bytes());
        c.sender.send_raw(&header).await.unwrap();
        let detail = expect_notice(&mut c, Code::FrameTooLarge).await;
        assert!(detail.contains("1025"), "{detail}");
        expect_closed(&mut c).await;
        // The limit itself is allowed.
        let mut other = connect(&server).await;
        send_confirmed(&mut other, &data(3, 0, PICTURE, &[7; 1024])).await;
    });
}

#[test]
fn notices_decode_with_the_client_codec() {
    let wire = chat::protocol::notice(Code::Welcome, "bound to id 5");
    let mut buf = FrameBuf::new();
    buf.extend(&wire);
    let frame = buf.decode_server(1024).unwrap().unwrap();
    assert_eq!((frame.sender, frame.kind), (0, 0));
    assert_eq!(&frame.body[..], b"welcome: bound to id 5");
}
