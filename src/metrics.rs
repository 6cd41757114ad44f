//! What an operator can see: counters, gauges and histograms in Prometheus form, and
//! the readiness the HTTP server reports.
//!
//! Built with prometheus-client (the official Rust client). Every label value comes
//! from a fixed set (frame types, notice codes, refusal reasons), never from a client
//! id, address or free text, so the number of series is bounded. Labelled counters are
//! looked up once, at start, and kept as plain handles: counting on the hot path is one
//! atomic add.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::protocol::{CONTROL, Code, PICTURE, TEXT, VIDEO, VOICE};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum FrameType {
    text,
    picture,
    voice,
    video,
    control,
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: FrameType,
}

/// What kind of frame the server wrote.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Out {
    echo,
    forward,
    mailbox,
    notice,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Out,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    server_busy,
    auth_failed,
    tls_failed,
    /// A browser's WebSocket from an Origin not allowed (`--web-allowed-origin`).
    origin_refused,
    /// The client's address holds `--max-connections-per-ip` (on any listener).
    address_busy,
    /// `--proxy-protocol` is on and the connection's header was missing or bad.
    proxy_refused,
    /// The id is blocked by an operator (the admin API).
    blocked,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Refusal,
}

/// Every metric the server keeps, and its readiness.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub accepted: Counter,
    refused: [Counter; 7],
    frames_in: [Counter; 6],
    pub bytes_in: Counter,
    frames_out: [Counter; 4],
    pub bytes_out: Counter,
    notices: Vec<(Code, Counter)>,
    pub mailbox_frames: Gauge,
    pub mailbox_bytes: Gauge,
    pub history_frames: Gauge,
    pub history_bytes: Gauge,
    pub history_pruned: Counter,
    pub commit_seconds: Histogram,
    pub frames_per_commit: Histogram,
    pub delivery_seconds: Histogram,
    pub slow_consumers: Counter,
    /// Times a connection's reading was paused by `--rate-frames` or `--rate-bytes`.
    pub rate_limited: Counter,
    /// Connections an operator disconnected.
    pub kicked: Counter,
    /// Ids whose stored data an operator deleted.
    pub forgotten: Counter,
    /// Admin API requests without the right token.
    pub admin_refused: Counter,
    pub store_failures: Counter,
    /// Why the store is down, while it is: `/readyz` says not ready.
    store_down: Mutex<Option<String>>,
    /// A drain has begun: `/readyz` says not ready, for good.
    draining: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("chat");
        let connections = Gauge::default();
        registry.register("connections", "Connections open", connections.clone());
        let accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Connections accepted",
            accepted.clone(),
        );
        let refused_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused, by reason",
            refused_family.clone(),
        );
        let refused = [
            Refusal::server_busy,
            Refusal::auth_failed,
            Refusal::tls_failed,
            Refusal::origin_refused,
            Refusal::address_busy,
            Refusal::proxy_refused,
            Refusal::blocked,
        ]
        .map(|reason| {
            refused_family
                .get_or_create(&ReasonLabel { reason })
                .clone()
        });
        let frames_in_family = Family::<TypeLabel, Counter>::default();
        registry.register(
            "frames_in",
            "Frames received from clients, by type",
            frames_in_family.clone(),
        );
        let frames_in = [
            FrameType::text,
            FrameType::picture,
            FrameType::voice,
            FrameType::video,
            FrameType::control,
            FrameType::other,
        ]
        .map(|r#type| {
            frames_in_family
                .get_or_create(&TypeLabel { r#type })
                .clone()
        });
        let bytes_in = Counter::default();
        registry.register(
            "bytes_in",
            "Frame bytes received from clients (server encoding)",
            bytes_in.clone(),
        );
        let frames_out_family = Family::<KindLabel, Counter>::default();
        registry.register(
            "frames_out",
            "Frames written to clients, by kind",
            frames_out_family.clone(),
        );
        let frames_out = [Out::echo, Out::forward, Out::mailbox, Out::notice]
            .map(|kind| frames_out_family.get_or_create(&KindLabel { kind }).clone());
        let bytes_out = Counter::default();
        registry.register("bytes_out", "Bytes written to clients", bytes_out.clone());
        let notices_family = Family::<CodeLabel, Counter>::default();
        registry.register(
            "notices",
            "Notices written to clients, by code",
            notices_family.clone(),
        );
        let notices = Code::ALL
            .iter()
            .map(|&code| {
                let label = CodeLabel {
                    code: code.as_str().to_string(),
                };
                (code, notices_family.get_or_create(&label).clone())
            })
            .collect();
        let mailbox_frames = Gauge::default();
        registry.register(
            "mailbox_frames",
            "Frames in the store (mailboxes and frames on their way)",
            mailbox_frames.clone(),
        );
        let mailbox_bytes = Gauge::default();
        registry.register(
            "mailbox_bytes",
            "Bytes of frames in the store",
            mailbox_bytes.clone(),
        );
        let history_frames = Gauge::default();
        registry.register(
            "history_frames",
            "Entries in the ids' logs (history and frames still to deliver)",
            history_frames.clone(),
        );
        let history_bytes = Gauge::default();
        registry.register(
            "history_bytes",
            "Bytes of the entries in the ids' logs",
            history_bytes.clone(),
        );
        let history_pruned = Counter::default();
        registry.register(
            "history_missed",
            "Frames a device never got: dropped from its inbox at its limit while another device took them",
            history_pruned.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "store_commit_seconds",
            "Time one store commit took, fsync included",
            commit_seconds.clone(),
        );
        let frames_per_commit = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "store_frames_per_commit",
            "Frames written by one store commit",
            frames_per_commit.clone(),
        );
        let delivery_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        registry.register(
            "delivery_seconds",
            "From a frame's arrival to its write to the receiver's socket (live frames)",
            delivery_seconds.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "slow_consumers",
            "Clients cut off as slow consumers",
            slow_consumers.clone(),
        );
        let admin_refused = Counter::default();
        registry.register(
            "admin_refused",
            "Admin API requests refused for a missing or wrong token",
            admin_refused.clone(),
        );
        let kicked = Counter::default();
        registry.register(
            "disconnected_by_operator",
            "Connections an operator disconnected (the admin listener)",
            kicked.clone(),
        );
        let forgotten = Counter::default();
        registry.register(
            "ids_forgotten",
            "Ids whose stored data an operator deleted (the admin listener)",
            forgotten.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Times a connection's reading was paused by its rate limit",
            rate_limited.clone(),
        );
        let store_failures = Counter::default();
        registry.register(
            "store_failures",
            "Times the store went down (a failed commit)",
            store_failures.clone(),
        );
        Arc::new(Metrics {
            registry,
            connections,
            accepted,
            refused,
            frames_in,
            bytes_in,
            frames_out,
            bytes_out,
            notices,
            mailbox_frames,
            mailbox_bytes,
            history_frames,
            history_bytes,
            history_pruned,
            commit_seconds,
            frames_per_commit,
            delivery_seconds,
            slow_consumers,
            rate_limited,
            kicked,
            forgotten,
            admin_refused,
            store_failures,
            store_down: Mutex::new(None),
            draining: Default::default(),
        })
    }

    pub fn refused(&self, why: Refusal) {
        let i = match why {
            Refusal::server_busy => 0,
            Refusal::auth_failed => 1,
            Refusal::tls_failed => 2,
            Refusal::origin_refused => 3,
            Refusal::address_busy => 4,
            Refusal::proxy_refused => 5,
            Refusal::blocked => 6,
        };
        self.refused[i].inc();
    }

    /// A frame received, by its type byte; `len` is its size in the server encoding.
    pub fn frame_in(&self, kind: u8, len: usize) {
        let i = match kind {
            TEXT => 0,
            PICTURE => 1,
            VOICE => 2,
            VIDEO => 3,
            CONTROL => 4,
            _ => 5,
        };
        self.frames_in[i].inc();
        self.bytes_in.inc_by(len as u64);
    }

    pub fn frames_out(&self, kind: Out, n: u64) {
        if n > 0 {
            self.frames_out[kind as usize].inc_by(n);
        }
    }

    /// A notice written: its code is the start of its body.
    pub fn notice(&self, body: &[u8]) {
        if let Some((_, counter)) = self.notices.iter().find(|(code, _)| {
            let c = code.as_str().as_bytes();
            body.starts_with(c) && body.get(c.len()) == Some(&b':')
        }) {
            counter.inc();
        }
    }

    pub fn set_store_down(&self, reason: Option<String>) {
        *self.store_down.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// `None` when ready, or why not.
    pub fn not_ready(&self) -> Option<String> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Some("draining: this node takes no new clients".into());
        }
        self.store_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| format!("store unavailable: {r}"))
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
