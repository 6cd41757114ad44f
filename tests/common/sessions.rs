//! Sessions (docs/PROTOCOL.md, "Sessions"): opening one, and reading what it gets.

use bytes::Bytes;
use chat::client::Client;
use chat::protocol::session::{Device, Envelope, Received, Record, What};

use super::{text, within};

pub fn device(name: &str) -> Device {
    Device::new(name).expect("a device name")
}

/// A session of `id` as `name` on the server at `addr`: the connection and its `sync`.
pub async fn open_at(addr: &str, id: u32, name: &str) -> (Client, Record) {
    let mut c = within(Client::connect(addr)).await.expect("connects");
    let sync = within(c.session(id, &device(name), None))
        .await
        .expect("a session");
    (c, sync)
}

/// The next frame of a session.
pub async fn next(c: &mut Client) -> Received {
    within(c.recv_session())
        .await
        .expect("read ok")
        .expect("a frame, not end of stream")
}

/// The next frame, which must be a message: its author, envelope and payload.
pub async fn message(c: &mut Client) -> (u32, Envelope, Bytes) {
    match next(c).await {
        Received::Message {
            sender,
            envelope,
            payload,
            ..
        } => (sender, envelope, payload),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Sends `body` to `to` and returns the envelope of its echo.
pub async fn say(c: &mut Client, from: u32, to: u32, body: &str) -> Envelope {
    within(c.send(&text(from, to, body))).await.expect("send");
    let (sender, envelope, payload) = message(c).await;
    assert_eq!(
        (sender, envelope.what, &payload[..]),
        (from, What::Echo, body.as_bytes())
    );
    envelope
}

/// Waits for the `synced` record that ends a session's backlog, returning what came
/// before it.
pub async fn backlog(c: &mut Client) -> Vec<(u32, Envelope, Bytes)> {
    let mut got = Vec::new();
    loop {
        match next(c).await {
            Received::Record(Record::Synced { .. }) => return got,
            Received::Message {
                sender,
                envelope,
                payload,
                ..
            } => got.push((sender, envelope, payload)),
            other => panic!("expected the backlog, got {other:?}"),
        }
    }
}
