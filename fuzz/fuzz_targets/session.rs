//! Any bytes as a session's bodies, both ways: a session hello and a query as the
//! server reads them, a frame as a session's client reads it. Each must be refused or
//! read, never panic; what reads must encode back to what parses the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

use chat::protocol::ServerFrame;
use chat::protocol::session::{Query, Received, SessionHello};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(rest);
    if let Ok(hello) = SessionHello::parse(&body) {
        assert_eq!(hello.encode(), rest);
    }
    let op = 5 + u32::from(pick % 3);
    if let Some(Ok(query)) = Query::parse(op, rest) {
        let again = query.frame(1);
        assert_eq!(Query::parse(again.receiver, &again.body), Some(Ok(query)));
    }
    let frame = ServerFrame {
        sender: u32::from(pick & 1),
        kind: pick >> 7,
        body,
    };
    let _ = Received::read(frame);
});
