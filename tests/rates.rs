//! Per-connection rate limits (`--rate-frames`, `--rate-bytes`, `--rate-burst`): a
//! client over its rate is read more slowly, never refused, and loses nothing; one that
//! stays over it for `--frame-timeout` is told so with `rate-limited`, once.
//!
//! The durations asserted are lower bounds, which a slow machine cannot break: the
//! limit is what makes the run last at least that long.

mod common;

use std::time::{Duration, Instant};

use chat::client::Client;
use chat::protocol::{Code, ServerFrame};
use chat::rt;
use chat::server::rate::RateLimits;
use futures::channel::oneshot;

use common::*;

/// Sends `frames` from `a` (id 1) to id 2 as fast as the socket takes them, while
/// reading `a`'s side: returns the frames `a` received (echoes and notices) once every
/// echo is in, and how long that took.
async fn flood(
    a: Client,
    frames: Vec<chat::protocol::ClientFrame>,
) -> (Vec<ServerFrame>, Duration) {
    let n = frames.len();
    let start = Instant::now();
    let (mut tx, mut rx) = a.split();
    let (done, finished) = oneshot::channel();
    let sender = rt::spawn(async move {
        for f in &frames {
            tx.send(f).await.expect("send");
        }
        // Keep the sending half open until the reader has every echo.
        let _ = finished.await;
    });
    let mut got = Vec::new();
    let mut echoes = 0;
    while echoes < n {
        let f = within(rx.recv()).await.expect("read").expect("a frame");
        if f.notice().is_none() {
            echoes += 1;
        }
        got.push(f);
    }
    let took = start.elapsed();
    let _ = done.send(());
    sender.await;
    (got, took)
}

/// 150 frames at 50 a second with a one-second burst: the first 50 pass at once, the
/// other 100 take nearly 2 s (the last one is read once the one before is paid for). Every frame is echoed and delivered, in order; the
/// client is told once that it is over its rate (after `--frame-timeout`, 1 s here);
/// the pauses are counted.
#[test]
fn a_flooding_client_is_held_to_its_frame_rate_and_loses_nothing() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.rate = RateLimits {
                frames: 50,
                bytes: 0,
                burst: Duration::from_secs(1),
            };
            c.frame_timeout = Duration::from_secs(1);
            c.metrics_listen = Some("127.0.0.1:0".into());
        })
        .await;
        let a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        let frames: Vec<_> = (0..150).map(|i| text(1, 2, &format!("m{i}"))).collect();
        let want: Vec<_> = frames.iter().map(delivered).collect();
        let (got, took) = flood(a, frames).await;
        assert!(
            took >= Duration::from_millis(1900),
            "150 frames in {took:?}"
        );
        let echoes: Vec<_> = got
            .iter()
            .filter(|f| f.notice().is_none())
            .cloned()
            .collect();
        assert_frames(&echoes, &want);
        let told: Vec<_> = got
            .iter()
            .filter_map(|f| f.notice())
            .filter(|n| n.is(Code::RateLimited))
            .collect();
        assert_eq!(told.len(), 1, "told once: {got:?}");
        assert!(told[0].detail.contains("50 frames/s"), "{}", told[0].detail);
        let mut delivered_to_b = Vec::new();
        while delivered_to_b.len() < want.len() {
            delivered_to_b.push(recv(&mut b).await);
        }
        assert_frames(&delivered_to_b, &want);

        let (_, metrics) = http_get(server.metrics.expect("metrics"), "/metrics").await;
        let paused: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("chat_rate_limited_total "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no chat_rate_limited_total in\n{metrics}"));
        assert!(paused >= 1.0, "{paused}");
    });
}

/// 10 frames of 30 KB at 100 KB a second with a one-second burst: the first three pass at once, the rest take 1.7 s at least, every
/// frame echoed. Another connection, under its own rate, is not slowed by it.
#[test]
fn a_client_is_held_to_its_byte_rate_and_others_are_not() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.rate = RateLimits {
                frames: 0,
                bytes: 100_000,
                burst: Duration::from_secs(1),
            };
        })
        .await;
        let a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        let mut c = login(&server, 3).await;
        let body = vec![7u8; 30_000];
        let frames: Vec<_> = (0..10).map(|_| data(1, 2, 2, &body)).collect();
        let want: Vec<_> = frames.iter().map(delivered).collect();
        let flooding = rt::spawn(flood(a, frames));
        // Once the flood has begun (its first frame reached 2), a frame from another
        // connection is echoed without waiting for it: each connection has its own
        // buckets.
        assert_eq!(recv(&mut b).await, want[0]);
        let sent = Instant::now();
        send_confirmed(&mut c, &text(3, 3, "not held up")).await;
        let other = sent.elapsed();
        let (got, took) = flooding.await;
        assert!(took >= Duration::from_millis(1650), "300 KB in {took:?}");
        assert!(other < took, "the other connection waited {other:?}");
        assert_frames(&got, &want);
    });
}

/// A connection disconnected by an operator while it waits off a long debt (60 frames
/// at 1 a second) is let go at once: it leaves the list of connections, and its place,
/// within the test's wait rather than the minute its debt would take.
#[test]
fn a_throttled_connection_that_is_closed_is_let_go_at_once() {
    rt::block_on(async {
        let token = "rate-token";
        let server = start_with(|c| {
            c.rate = RateLimits {
                frames: 1,
                bytes: 0,
                burst: Duration::from_secs(1),
            };
            c.admin = Some(chat::server::config::Admin {
                listen: "127.0.0.1:0".into(),
                token: std::sync::Arc::new(
                    chat::server::config::AdminToken::new(token).expect("a token"),
                ),
                limits: chat::server::config::HttpLimits::ADMIN,
            });
        })
        .await;
        let admin = server.admin.expect("admin");
        let mut a = login(&server, 1).await;
        for i in 0..60 {
            within(a.send(&text(1, 1, &format!("m{i}"))))
                .await
                .expect("send");
        }
        // The first two are read (one at once, one after a second's wait) and echoed.
        recv(&mut a).await;
        let bearer = format!("Bearer {token}");
        let headers = [("Authorization", bearer.as_str())];
        let (status, _, body) =
            http_call(admin, "DELETE", "/v1/ids/1/connections", &headers, "").await;
        assert_eq!(status, 200, "{body}");
        within(async {
            loop {
                let (_, _, listed) = http_call(admin, "GET", "/v1/connections", &headers, "").await;
                if listed.contains("\"connections\": []") {
                    return;
                }
                rt::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    });
}
