//! History and devices in a cluster: each id's log in the JetStream stream
//! `CHAT_HISTORY`, and each named device's place in it in the key-value bucket
//! `CHAT_DEVICES`. Part of the cluster's actor ([`super::stream`]), on the NATS link's
//! thread.
//!
//! Why the stream numbers the log, not a node: a session's device may be on any node,
//! and so may the other devices of its id and its peers. If one node numbered an id's
//! log (its holder, as for the default device's mailbox), every frame for the id and
//! from it would first travel to that node, and a device elsewhere would depend on it.
//! Here every node appends to the log what its own connections send, and JetStream
//! orders the appends: an offset is the stream sequence of the block a frame is in,
//! times 256, plus its place in the block ([`wire::offset`]). Offsets grow along each
//! id's log, with gaps (other ids' blocks), and are the same for every device.
//!
//! - **Appending.** A frame from A to B goes into their conversation,
//!   `chat.log.<lower>.<higher>`, which is in both their logs (so A's other devices get
//!   their copy, with the offset B's devices see). The frames of one conversation
//!   within [`LOG_WAIT`] go in one block, one publish (JetStream's rate is per message:
//!   a block of 40 frames costs what one costs). Once a block is stored,
//!   `chat.note.<id>` tells the nodes with sessions of either id to read on: a node
//!   listens to the notes of the ids it has sessions of, and no others.
//! - **Reading.** A session reads its id's log after its cursor (`STREAM.MSG.GET`,
//!   `next_by_subj` with `chat.log.<id>.*`, which the stream's leader answers: it
//!   sees every acknowledged block; and `chat.log.*.<id>`, merged in stream order),
//!   leaving out what its own device sent (it had the
//!   echo). Live frames come the same way, after a note: one path, one order.
//! - **Cursors.** Acknowledged offsets are written to `CHAT_DEVICES` at the end of the
//!   actor's turn (`<id>.d<name in hex>`), with the id's newest (`<id>.top`), where a
//!   new device starts; both move forward only (compare and set), since a device
//!   that moved to another node may have moved its cursor there first. The bucket
//!   keeps an entry for `--history-max-age` after its last write: a device unused that
//!   long is forgotten (its next session is new). Nodes watch only `<id>.named`
//!   (written when a named device binds) and `<id>.default`, from their last values,
//!   not the cursors: each session's acks stay between its node and the bucket.
//! - **Pages back in time.** `STREAM.MSG.GET` finds the first message at or after a
//!   sequence, not the one before: a page before an offset reads forward through
//!   windows that grow four times each round, until it has enough.
//! - **The default device.** Connections without a session keep today's path (the
//!   holder, the mailbox stream). Once an id has a named device, frames wait in its
//!   mailbox only if its default device has been used since (`<id>.default`): an id
//!   used only from sessions would otherwise fill a mailbox nobody reads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{AbortHandle, BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};

use crate::cluster::link::sleep;
use crate::cluster::wire::{self, Block, DeviceKey, Entry};
use crate::ids::{Endpoint, Ticket};
use crate::protocol::session::{Before, Envelope, MAX_PAGE, Query, Record, What};
use crate::store::{History, author_of};

/// The stream of every id's log.
pub const STREAM: &str = "CHAT_HISTORY";
/// The bucket of every named device's cursor.
pub const BUCKET: &str = "CHAT_DEVICES";
/// Blocks one read of a session's log looks at, at most.
const READ_BLOCKS: usize = 256;
/// Frames in one page of a session's log, at most.
const READ_FRAMES: usize = 256;
/// The most bytes of frames one query's answer holds (at least one frame), as on one
/// node.
const ANSWER_BYTES: usize = 1024 * 1024;
/// Frames one move of a mailbox into a log takes, at most (a mailbox holds at most
/// `--mailbox-max-messages`; a later mail moves the rest).
const IMPORT_FRAMES: usize = 100_000;
/// Blocks one query reads, at most, before it answers with what it found (and `more`).
const SCAN_BLOCKS: usize = 4096;
/// How long a block waits for company (10 ms; bench/cluster.sh, pairs on one node of a
/// cluster, one run each: 5 ms 165-188k msg/s, 20 ms 181-253k, history off 422-472k):
/// JetStream's cost is per message, and a pair
/// of ids exchanging frames fills a block only if its frames can gather (in a turn of
/// the actor there are one or two per conversation). The echo of a session's frame
/// and the live delivery to sessions wait as long; a plain sender's echo does not.
const LOG_WAIT: Duration = Duration::from_millis(10);
/// Past this many bytes filled, the blocks go without waiting.
const LOG_BYTES: usize = 1024 * 1024;
/// How far acceptance times of different nodes may disagree with the log's order.
const CLOCK_SLACK_MS: u64 = 1000;
/// Room left in a NATS message beside a block (its headers).
const BLOCK_ROOM: usize = 1024;
/// What a block adds to a frame at most: its version byte, and the entry's time and
/// device name (at most 64 bytes, and its length).
pub(crate) const BLOCK_OVERHEAD: usize = 1 + 8 + 1 + 64 + BLOCK_ROOM;
/// A read that failed is tried again after this long, this many times.
const RETRY_AFTER: Duration = Duration::from_millis(250);
const RETRIES: usize = 20;

/// What the log asks of the actor's reply: an offset for an echo, or the outcome of a
/// frame whose receiver keeps no mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The frame's offset in its author's log, for the echo of a session's frame.
    Offset { seq: u64 },
    /// Storing the frame in its receiver's log is all there is to it.
    Outcome { seq: u64 },
}

/// What a node knows of how an id with named devices is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdUse {
    /// Its named devices are known, whether its default device is in use not yet:
    /// its frames keep their mailbox copies meanwhile.
    Checking,
    /// Only from sessions: its frames skip the mailbox.
    SessionsOnly,
    /// Its default device is in use too: its frames also wait in its mailbox.
    Default,
}

/// A block being filled this turn.
struct Filling {
    /// The conversation's ids, lower first.
    ids: (u32, u32),
    block: Block,
    /// Its encoding's size so far.
    bytes: usize,
    /// Which entries someone waits for.
    waits: Vec<(usize, Wait)>,
}

/// What the log's work came to.
pub(crate) enum Logged {
    /// A block was stored at `seq` (or not: why), with what waited for its entries.
    Stored {
        /// The conversation's ids: both their logs grew.
        ids: (u32, u32),
        waits: Vec<(usize, Wait)>,
        result: Result<u64, String>,
    },
    /// A page of a session's log.
    Page {
        ticket: Ticket,
        endpoint: Endpoint,
        /// Where the session reads from after this page, frames left out included.
        through: u64,
        frames: Vec<(u64, Bytes)>,
        sync: Option<Bytes>,
    },
    /// A query's answer.
    Answer { ticket: Ticket, frames: Vec<Bytes> },
    /// A note that `id`'s log grew, heard from any node.
    Grew { id: u32 },
    /// A read marker of `id` moved (heard from any node, this one too): its record.
    Read { id: u32, record: Bytes },
    /// Frames were stored in `id`'s mailbox (a node's mail to its holder, if any).
    Mail { id: u32 },
    /// What waited in `id`'s mailbox was moved into its log.
    Imported { id: u32 },
    /// What the devices bucket says (or said, at start).
    Key(DeviceKey),
    /// Whether `id`'s default device is in use, asked of the bucket when the id was
    /// first heard of with named devices.
    Default { id: u32, in_use: bool },
    /// Background work finished.
    Done,
}

/// The mailbox stream, for moving into an id's log what waits for it there.
#[derive(Clone)]
pub(crate) struct Mailbox {
    pub reads: stream::Stream<()>,
    pub stream: stream::Stream,
}

pub(crate) struct Log {
    js: jetstream::Context,
    mailbox: Mailbox,
    /// Ids whose mailboxes are being moved into their logs, and whether to go again
    /// when that is done (more was stored meanwhile).
    importing: HashMap<u32, bool>,
    client: async_nats::Client,
    /// The history stream, for reads that wait `READ_WAIT` at most.
    reads: stream::Stream<()>,
    stream: stream::Stream,
    kv: kv::Store,
    /// The names of named devices, by the broker's numbers.
    names: HashMap<Endpoint, String>,
    /// Where each session's next read starts (after this offset), when its last read
    /// left out frames its broker never sees (its own).
    starts: HashMap<Endpoint, u64>,
    /// When each device's current session bound (ms since the epoch, from its first
    /// read's request): a new device starts with what was accepted since, less the
    /// clocks' slack, in every read until its cursor is written.
    bound: HashMap<Endpoint, u64>,
    /// The connection each device's reads are for now: a page read for an earlier one
    /// moves nothing.
    current: HashMap<Endpoint, Ticket>,
    /// Cursors acknowledged and not yet written.
    acked: HashMap<Endpoint, u64>,
    /// The newest cursor written for each id.
    tops: HashMap<u32, u64>,
    /// Ids with named devices, and whether their default device is used too.
    ids: HashMap<u32, IdUse>,
    filling: Vec<Filling>,
    index: HashMap<(u32, u32), usize>,
    /// When the oldest entry being filled came, and the bytes filled.
    filling_since: Option<Instant>,
    filled: usize,
    /// The most bytes one block holds: the NATS servers' `max_payload`, less room for
    /// the message's headers. A frame larger alone is a block of its own.
    max_block: usize,
    /// Ids whose logs grew since notes were last sent.
    grew: HashSet<u32>,
    /// The ids with sessions here, whose notes this node listens to: ending one's
    /// stream of notes drops its subscription. `None`: the subscription failed; the
    /// next [`Log::listen`] tries again (the sessions read on each sweep meanwhile).
    hearing: HashMap<u32, Option<AbortHandle>>,
    work: FuturesUnordered<BoxFuture<'static, Logged>>,
    /// Notes from every node and the bucket's keys.
    heard: futures::stream::SelectAll<BoxStream<'static, Logged>>,
}

/// Sets up the history stream and the devices bucket with `replicas`.
pub(crate) async fn ensure(
    js: &jetstream::Context,
    history: &History,
    replicas: usize,
    max_frame: usize,
) -> Result<(stream::Stream, kv::Store), String> {
    let config = stream::Config {
        name: STREAM.into(),
        subjects: vec![wire::LOG_SUBJECTS.into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: history.max_age,
        // Blocks per conversation; the oldest goes first.
        max_messages_per_subject: i64::try_from(history.max_messages).unwrap_or(i64::MAX),
        discard: stream::DiscardPolicy::Old,
        max_message_size: i32::try_from(max_frame * wire::BLOCK_ENTRIES + 64 * 1024)
            .unwrap_or(i32::MAX),
        ..Default::default()
    };
    let stream = match js.get_stream(STREAM).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| e.to_string())?;
            let mut wanted = config.clone();
            wanted.num_replicas = info.config.num_replicas;
            if info.config != wanted {
                js.update_stream(&wanted).await.map_err(|e| e.to_string())?;
            }
            existing
        }
        Err(_) => js.create_stream(config).await.map_err(|e| e.to_string())?,
    };
    // The bucket's stream as async-nats would make it; made here because its
    // `create_key_value` first asks for the account's details in a form nats-server
    // 2.9 does not answer in.
    let bucket = stream::Config {
        name: format!("KV_{BUCKET}"),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: history.max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    if js.get_stream(&bucket.name).await.is_err() {
        js.create_stream(bucket).await.map_err(|e| e.to_string())?;
    }
    let kv = js.get_key_value(BUCKET).await.map_err(|e| e.to_string())?;
    Ok((stream, kv))
}

impl Log {
    pub async fn new(
        js: jetstream::Context,
        mailbox: Mailbox,
        client: async_nats::Client,
        reads: stream::Stream<()>,
        stream: stream::Stream,
        kv: kv::Store,
    ) -> Result<Log, String> {
        let max_block = client.server_info().max_payload.saturating_sub(BLOCK_ROOM);
        let mut log = Log {
            js,
            mailbox,
            importing: HashMap::new(),
            client,
            reads,
            stream,
            kv,
            names: HashMap::new(),
            starts: HashMap::new(),
            bound: HashMap::new(),
            current: HashMap::new(),
            acked: HashMap::new(),
            tops: HashMap::new(),
            ids: HashMap::new(),
            filling: Vec::new(),
            index: HashMap::new(),
            filling_since: None,
            filled: 0,
            max_block,
            grew: HashSet::new(),
            hearing: HashMap::new(),
            work: FuturesUnordered::new(),
            heard: futures::stream::SelectAll::new(),
        };
        log.listen().await?;
        Ok(log)
    }

    /// Listens for read markers, mail, the bucket's keys and the notes of the ids
    /// with sessions here (again, after the link was lost).
    pub async fn listen(&mut self) -> Result<(), String> {
        let reads = self
            .client
            .subscribe(wire::READ_SUBJECTS)
            .await
            .map_err(|e| e.to_string())?;
        let reads = reads.filter_map(|msg| async move {
            let id = wire::read_by(&msg.subject)?;
            Some(Logged::Read {
                id,
                record: msg.payload,
            })
        });
        let mail = self
            .client
            .subscribe(wire::all_mail())
            .await
            .map_err(|e| e.to_string())?;
        let mail = mail.filter_map(|msg| async move {
            wire::mailed(&msg.subject).map(|id| Logged::Mail { id })
        });
        // Only the keys that say which ids have named devices and which use their
        // default device (every node watching every cursor's write would carry each
        // session's acks to every node), from each key's last value: a node that starts
        // learns what the bucket knows, not only what is written after.
        let mut keys = Vec::new();
        for pattern in ["*.named", "*.default"] {
            let watch = self.kv.watch_with_history(pattern).await;
            let watch = watch.map_err(|e| e.to_string())?;
            keys.push(watch.filter_map(|entry| async move {
                let entry = entry.ok()?;
                if entry.operation != kv::Operation::Put {
                    return None;
                }
                DeviceKey::parse(&entry.key).map(Logged::Key)
            }));
        }
        // Replaced only once everything above is there: a failure leaves the old
        // streams, and the notes' subscriptions, as they were.
        self.heard = futures::stream::SelectAll::new();
        self.heard.push(reads.boxed());
        self.heard.push(mail.boxed());
        for keys in keys {
            self.heard.push(keys.boxed());
        }
        // The old subscriptions went with the old streams.
        let ids: Vec<u32> = self.hearing.keys().copied().collect();
        for id in ids {
            self.subscribe_notes(id).await;
        }
        Ok(())
    }

    /// Listens to the notes of `id` (`on`: it has sessions here now), or stops.
    pub async fn hear(&mut self, id: u32, on: bool) {
        if !on {
            if let Some(Some(handle)) = self.hearing.remove(&id) {
                handle.abort();
            }
            return;
        }
        if !matches!(self.hearing.get(&id), Some(Some(_))) {
            self.subscribe_notes(id).await;
        }
    }

    async fn subscribe_notes(&mut self, id: u32) {
        let handle = match self.client.subscribe(wire::note(id)).await {
            Ok(notes) => {
                let notes = notes.map(move |_| Logged::Grew { id });
                let (notes, handle) = futures::stream::abortable(notes);
                self.heard.push(notes.boxed());
                Some(handle)
            }
            Err(e) => {
                log::warn!("id {id}: notes that its log grew not heard: {e}");
                None
            }
        };
        self.hearing.insert(id, handle);
    }

    /// The next piece of finished work or news.
    pub async fn next(&mut self) -> Logged {
        loop {
            futures::select_biased! {
                done = self.work.select_next_some() => return done,
                heard = self.heard.select_next_some() => return heard,
                complete => futures::future::pending::<()>().await,
            }
        }
    }

    /// Whether frames for `id` should skip its mailbox: it has named devices and its
    /// default device has not been used since.
    pub fn sessions_only(&self, id: u32) -> bool {
        self.ids.get(&id) == Some(&IdUse::SessionsOnly)
    }

    /// What the bucket says.
    pub fn key(&mut self, key: DeviceKey) {
        match key {
            DeviceKey::Named { id, .. } | DeviceKey::HasNamed { id } => {
                if self.ids.contains_key(&id) {
                    return;
                }
                // The two watches deliver what the bucket holds each in its own time:
                // `<id>.default` is asked for, and until it is known the id's frames
                // keep their mailbox copies.
                self.ids.insert(id, IdUse::Checking);
                let kv = self.kv.clone();
                let default = DeviceKey::Default { id }.key();
                self.work.push(
                    async move {
                        let in_use = match kv.get(default).await {
                            Ok(value) => value.is_some(),
                            Err(e) => {
                                log::warn!(
                                    "id {id}: whether its default device is in use is unknown: {e}"
                                );
                                true
                            }
                        };
                        Logged::Default { id, in_use }
                    }
                    .boxed(),
                );
            }
            DeviceKey::Default { id } => {
                self.ids.insert(id, IdUse::Default);
            }
            DeviceKey::Top { .. } | DeviceKey::Read { .. } => {}
        }
    }

    /// The bucket answered whether `id`'s default device is in use.
    pub fn default_known(&mut self, id: u32, in_use: bool) {
        if let Some(state) = self.ids.get_mut(&id)
            && *state == IdUse::Checking
        {
            *state = if in_use {
                IdUse::Default
            } else {
                IdUse::SessionsOnly
            };
        }
    }

    /// Frames were stored in `id`'s mailbox: if the id is used only from sessions,
    /// they go into its log (a node of the previous release stored them, or this
    /// release did before it learnt the id has named devices).
    pub fn mail(&mut self, id: u32) {
        if self.sessions_only(id) {
            self.import(id);
        }
    }

    fn import(&mut self, id: u32) {
        if let Some(again) = self.importing.get_mut(&id) {
            *again = true;
            return;
        }
        self.importing.insert(id, false);
        let (js, mailbox, client) = (self.js.clone(), self.mailbox.clone(), self.client.clone());
        let kv = self.kv.clone();
        self.work.push(
            async move {
                match import(&js, &mailbox, &kv, id).await {
                    Ok((0, _)) => {}
                    Ok((n, _)) => {
                        log::info!("id {id}: {n} frames moved from its mailbox into its history");
                        if let Err(e) = client.publish(wire::note(id), Bytes::new()).await {
                            log::debug!("note for id {id} not sent: {e}");
                        }
                    }
                    Err(e) => {
                        log::warn!("id {id}: its mailbox was not moved into its history: {e}")
                    }
                }
                Logged::Imported { id }
            }
            .boxed(),
        );
    }

    /// An import is done; another goes if more was stored meanwhile.
    pub fn imported(&mut self, id: u32) {
        if self.importing.remove(&id) == Some(true) {
            self.import(id);
        }
    }

    /// A device of `e.id` was seen: a named one's name is remembered; the default
    /// device is written down (each time it binds: the bucket forgets what is not
    /// written for `--history-max-age`), so that frames for it wait in its mailbox
    /// once its id also has named devices.
    ///
    /// A named one also writes `<id>.named` (each time it binds, for the same
    /// reason), which tells the other nodes that the id has named devices.
    pub fn seen(&mut self, e: Endpoint, name: &str) {
        let key = if e.device != 0 {
            // This node learns it from the bucket too, as the others do.
            self.names.insert(e, name.to_string());
            DeviceKey::HasNamed { id: e.id }
        } else {
            self.ids.insert(e.id, IdUse::Default);
            DeviceKey::Default { id: e.id }
        };
        let kv = self.kv.clone();
        self.work.push(
            async move {
                // Tried again: a node that misses `<id>.default` takes the id for one
                // used only from sessions, and keeps nothing in its mailbox for it.
                let mut tries = 0;
                while let Err(err) = kv.put(key.key(), Bytes::from_static(b"1")).await {
                    if tries == RETRIES {
                        log::error!("id {}: the key {} was not written: {err}", e.id, key.key());
                        break;
                    }
                    tries += 1;
                    log::warn!(
                        "id {}: the key {} was not written, trying again: {err}",
                        e.id,
                        key.key()
                    );
                    sleep(RETRY_AFTER).await;
                }
                Logged::Done
            }
            .boxed(),
        );
    }

    /// A named device is forgotten: its cursor goes.
    pub fn forget(&mut self, e: Endpoint) {
        let Some(name) = self.names.remove(&e) else {
            return;
        };
        self.starts.remove(&e);
        self.bound.remove(&e);
        self.acked.remove(&e);
        let key = DeviceKey::Named { id: e.id, name }.key();
        let kv = self.kv.clone();
        self.work.push(
            async move {
                if let Err(e) = kv.purge(key).await {
                    log::warn!("a forgotten device's cursor was not removed: {e}");
                }
                Logged::Done
            }
            .boxed(),
        );
    }

    /// Adds a frame from `sender` to `receiver` to their conversation, which is in
    /// both their logs; `origin` is the sender's named device that sent it. `offset`:
    /// the echo waits for the frame's offset; `outcome`: its outcome is the log's.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        sender: u32,
        receiver: u32,
        origin: Option<u16>,
        wire: &Bytes,
        time: u64,
        seq: u64,
        offset: bool,
        outcome: bool,
    ) {
        let device = origin
            .and_then(|device| self.names.get(&Endpoint { id: sender, device }))
            .cloned()
            .unwrap_or_default();
        let entry = Entry {
            time,
            device,
            wire: wire.clone(),
        };
        let waits = [
            offset.then_some(Wait::Offset { seq }),
            outcome.then_some(Wait::Outcome { seq }),
        ];
        let ids = (sender.min(receiver), sender.max(receiver));
        self.fill(ids, entry, waits.into_iter().flatten());
    }

    fn fill(&mut self, ids: (u32, u32), entry: Entry, waits: impl Iterator<Item = Wait>) {
        let size = 9 + entry.device.len() + entry.wire.len();
        let room = |f: &Filling| {
            f.block.entries.len() < wire::BLOCK_ENTRIES && f.bytes + size <= self.max_block
        };
        let i = match self.index.get(&ids) {
            Some(&i) if room(&self.filling[i]) => i,
            _ => {
                self.filling.push(Filling {
                    ids,
                    block: Block::default(),
                    bytes: 1,
                    waits: Vec::new(),
                });
                let i = self.filling.len() - 1;
                self.index.insert(ids, i);
                i
            }
        };
        let filling = &mut self.filling[i];
        for wait in waits {
            filling.waits.push((filling.block.entries.len(), wait));
        }
        filling.bytes += size;
        filling.block.entries.push(entry);
        self.filled += size;
        self.filling_since.get_or_insert_with(Instant::now);
    }

    /// Finishes the work in flight (the node is stopping): what it came to.
    pub async fn settle(&mut self) -> Vec<Logged> {
        let mut done = Vec::new();
        while let Some(d) = self.work.next().await {
            done.push(d);
        }
        done
    }

    /// How long until the blocks being filled are due; `None` when there are none.
    pub fn next_due(&self) -> Option<Duration> {
        self.filling_since
            .map(|since| LOG_WAIT.saturating_sub(since.elapsed()))
    }

    /// Publishes every block being filled and waits until JetStream has each (an
    /// operator's count or purge of an id sees them): what came of them.
    pub async fn store_now(&mut self) -> Vec<Logged> {
        self.index.clear();
        self.filling_since = None;
        self.filled = 0;
        let mut done = Vec::new();
        for filling in std::mem::take(&mut self.filling) {
            let subject = wire::conversation(filling.ids.0, filling.ids.1);
            let result = match self.js.publish(subject, filling.block.encode()).await {
                Ok(ack) => ack.await.map(|a| a.sequence).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            done.push(Logged::Stored {
                ids: filling.ids,
                waits: filling.waits,
                result,
            });
        }
        done
    }

    /// Publishes the blocks filled, in order, once they are due (or `all`, or enough
    /// to go at once); writes acknowledged cursors; sends the notes for logs that
    /// grew. Returns the waits of blocks that could not be sent.
    pub async fn flush(&mut self, all: bool) -> Vec<(Vec<(usize, Wait)>, String)> {
        let mut failed = Vec::new();
        let due = all || self.filled >= LOG_BYTES || self.next_due() == Some(Duration::ZERO);
        let blocks = match due {
            true => {
                self.index.clear();
                self.filling_since = None;
                self.filled = 0;
                std::mem::take(&mut self.filling)
            }
            false => Vec::new(),
        };
        for filling in blocks {
            let subject = wire::conversation(filling.ids.0, filling.ids.1);
            let ids = filling.ids;
            let waits = filling.waits;
            match self.js.publish(subject, filling.block.encode()).await {
                Ok(ack) => self.work.push(
                    async move {
                        let result = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                        Logged::Stored { ids, waits, result }
                    }
                    .boxed(),
                ),
                Err(e) => failed.push((waits, e.to_string())),
            }
        }
        for (e, cursor) in std::mem::take(&mut self.acked) {
            let Some(name) = self.names.get(&e).cloned() else {
                continue;
            };
            let top = self.tops.get(&e.id).is_none_or(|&t| t < cursor);
            if top {
                self.tops.insert(e.id, cursor);
            }
            let kv = self.kv.clone();
            self.work.push(
                async move {
                    // Forward only: a device that moved to another node may have
                    // moved its cursor there before this write lands.
                    let key = DeviceKey::Named { id: e.id, name }.key();
                    if let Err(err) = raise(&kv, &key, cursor).await {
                        log::warn!("id {}: a device's cursor was not written: {err}", e.id);
                    }
                    // Another node may move it at once: forward only.
                    if top
                        && let Err(err) =
                            raise(&kv, &DeviceKey::Top { id: e.id }.key(), cursor).await
                    {
                        log::debug!("id {}: the newest cursor was not written: {err}", e.id);
                    }
                    Logged::Done
                }
                .boxed(),
            );
        }
        for id in std::mem::take(&mut self.grew) {
            if let Err(e) = self.client.publish(wire::note(id), Bytes::new()).await {
                log::debug!("note for id {id} not sent: {e}");
            }
        }
        failed
    }

    /// A block of the conversation between `ids` was stored: the nodes hear that
    /// both their logs grew once this turn ends.
    pub fn stored(&mut self, ids: (u32, u32)) {
        self.grew.insert(ids.0);
        self.grew.insert(ids.1);
    }

    /// A session acknowledged frames up to `offset`.
    pub fn ack(&mut self, e: Endpoint, offset: u64) {
        let cursor = self.acked.entry(e).or_default();
        *cursor = (*cursor).max(offset);
    }

    /// Reads a page of `e`'s log after `after` (`None`: from its cursor). A session's
    /// first read (`bound`: when the session bound) begins with its `sync` record.
    pub fn load(
        &mut self,
        ticket: Ticket,
        e: Endpoint,
        after: Option<u64>,
        max_bytes: usize,
        bound: Option<u64>,
    ) {
        let first = bound.is_some();
        let Some(name) = self.names.get(&e).cloned() else {
            // Forgotten meanwhile (an operator): nothing to read.
            log::warn!("id {}: a session read for a device with no name", e.id);
            let empty = Logged::Page {
                ticket,
                endpoint: e,
                through: 0,
                frames: Vec::new(),
                sync: None,
            };
            self.work.push(async move { empty }.boxed());
            return;
        };
        if let Some(bound) = bound {
            // A new connection of the device: it starts after its cursor, whatever an
            // earlier one here read.
            self.starts.remove(&e);
            self.current.insert(e, ticket);
            self.bound.insert(e, bound);
        }
        let start = self.starts.get(&e).copied().unwrap_or(0);
        // A new device starts with what was accepted since it bound, less the clocks'
        // slack: a frame accepted after the bind but stored before a read looks at the
        // log is the device's, wherever it was sent from, however long the read waited
        // (NATS down, a read failed and tried again, a later read asked before the
        // cursor was written).
        let bound = self
            .bound
            .get(&e)
            .copied()
            .unwrap_or_else(crate::store::now_ms);
        let bound = bound.saturating_sub(CLOCK_SLACK_MS);
        let reads = self.reads.clone();
        let kv = self.kv.clone();
        let moving = first.then(|| (self.js.clone(), self.mailbox.clone()));
        let client = self.client.clone();
        self.work.push(
            async move {
                let mut tries = 0;
                loop {
                    // Where a new device starts if the id has no cursor: after the
                    // newest frame accepted before this time.
                    let mut live_since = bound;
                    let mut to_move = false;
                    if let Some((_, mailbox)) = &moving {
                        // A first read: what waits in the id's mailbox for no default
                        // device is what no device has had: a new device starts before
                        // it. Nothing leaves the mailbox before the device's cursor is
                        // written (the read below): a read that fails and is tried again
                        // must find the same.
                        let default = DeviceKey::Default { id: e.id }.key();
                        match kv.get(default).await {
                            Ok(None) => {
                                to_move = true;
                                match oldest_logged(mailbox, e.id).await {
                                    // Nodes' clocks and blocks' waits differ: start a
                                    // second early (what comes twice is at least once).
                                    Ok(Some(oldest)) => {
                                        let oldest = oldest.saturating_sub(CLOCK_SLACK_MS);
                                        live_since = live_since.min(oldest);
                                    }
                                    Ok(None) => {}
                                    Err(err) => {
                                        log::warn!("id {}: its mailbox was not read: {err}", e.id)
                                    }
                                }
                            }
                            Ok(Some(_)) => {}
                            Err(err) => log::warn!("id {}: bucket unreadable: {err}", e.id),
                        }
                    }
                    let read = read_session(
                        &reads, &kv, e, &name, after, start, max_bytes, live_since, first,
                    );
                    match read.await {
                        Ok((through, frames, sync)) => {
                            if let (true, Some((js, mailbox))) = (to_move, &moving) {
                                // Its cursor is written: what waited moves (the previous
                                // release's frames are appended, read on the next note).
                                match import(js, mailbox, &kv, e.id).await {
                                    Ok((0, _)) => {}
                                    Ok(_) => {
                                        let note = client.publish(wire::note(e.id), Bytes::new());
                                        if let Err(err) = note.await {
                                            log::debug!("note for id {} not sent: {err}", e.id);
                                        }
                                    }
                                    Err(err) => {
                                        log::warn!("id {}: its mailbox was not moved: {err}", e.id)
                                    }
                                }
                            }
                            return Logged::Page {
                                ticket,
                                endpoint: e,
                                through,
                                frames,
                                sync,
                            };
                        }
                        Err(err) if tries < RETRIES => {
                            tries += 1;
                            log::warn!("id {}: history read failed, trying again: {err}", e.id);
                            sleep(RETRY_AFTER).await;
                        }
                        Err(err) => {
                            log::error!("id {}: history read failed: {err}", e.id);
                            return Logged::Page {
                                ticket,
                                endpoint: e,
                                through: 0,
                                frames: Vec::new(),
                                sync: None,
                            };
                        }
                    }
                }
            }
            .boxed(),
        );
    }

    /// A page was read for `e`: its next read starts after `through` at least.
    pub fn read_through(&mut self, e: Endpoint, ticket: Ticket, through: u64) {
        if through > 0 && self.current.get(&e) == Some(&ticket) {
            let start = self.starts.entry(e).or_default();
            *start = (*start).max(through);
        }
    }

    /// Answers a session's query about `id`'s history.
    pub fn query(&mut self, ticket: Ticket, id: u32, query: Query) {
        let reads = self.reads.clone();
        let kv = self.kv.clone();
        let client = self.client.clone();
        self.work.push(
            async move {
                let request = query.request();
                let frames = match query {
                    Query::History {
                        request,
                        conversation,
                        before,
                        limit,
                    } => {
                        let page = history_page(&reads, id, conversation, before, limit, request);
                        match page.await {
                            Ok(frames) => frames,
                            Err(why) => failed(request, format!("history unavailable: {why}")),
                        }
                    }
                    Query::Conversations { before, limit, .. } => {
                        match conversations(&reads, &kv, id, before, limit, request).await {
                            Ok(frames) => frames,
                            Err(why) => failed(request, format!("history unavailable: {why}")),
                        }
                    }
                    Query::Read {
                        conversation, upto, ..
                    } => match mark_read(&reads, &kv, id, conversation, upto).await {
                        // Every session of the id hears it through the note, this one too.
                        Ok(Some(record)) => match client.publish(wire::read(id), record).await {
                            Ok(()) => Vec::new(),
                            Err(e) => failed(request, format!("not sent to the devices: {e}")),
                        },
                        Ok(None) => failed(
                            request,
                            format!("id {id} has no conversation with {conversation}"),
                        ),
                        Err(why) => failed(request, format!("history unavailable: {why}")),
                    },
                };
                Logged::Answer { ticket, frames }
            }
            .boxed(),
        );
    }

    /// How many blocks `id`'s conversations hold (each up to 256 messages).
    pub async fn blocks(&self, id: u32) -> Result<u64, String> {
        let mut blocks = 0;
        for subjects in wire::logs_of(id) {
            let mut info = self
                .reads
                .info_with_subjects(subjects)
                .await
                .map_err(|e| e.to_string())?;
            while let Some((_, n)) = info.next().await.transpose().map_err(|e| e.to_string())? {
                blocks += n as u64;
            }
        }
        Ok(blocks)
    }

    /// Purges `id`'s conversations, and its devices: how many blocks went.
    pub async fn purge(&mut self, id: u32) -> Result<u64, String> {
        let mut purged = 0;
        for subject in wire::logs_of(id) {
            let done = self.stream.purge().filter(subject).await;
            purged += done.map_err(|e| e.to_string())?.purged;
        }
        self.names.retain(|e, _| e.id != id);
        self.starts.retain(|e, _| e.id != id);
        self.tops.remove(&id);
        self.ids.remove(&id);
        let mut keys = self.kv.keys().await.map_err(|e| e.to_string())?;
        let prefix = format!("{id}.");
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if key.starts_with(&prefix) {
                self.kv.purge(&key).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(purged)
    }
}

/// Moves what waits in `id`'s mailbox into its log, unless its default device is in use
/// (its mailbox is its own then), oldest first: how many frames
/// were appended, and the acceptance time of the oldest frame that was in the log
/// already.
///
/// This release writes every frame to the log as it accepts it, and marks its copy in
/// the mailbox with [`wire::TIME_HEADER`]: such a copy only leaves the mailbox. A frame
/// without the mark (stored by a node of the previous release) is appended, with a
/// message id of its place in the mailbox, so that two nodes moving it at once, or a
/// move repeated after a crash between its append and its delete, store it once
/// (within JetStream's duplicate window, two minutes).
async fn import(
    js: &jetstream::Context,
    mailbox: &Mailbox,
    kv: &kv::Store,
    id: u32,
) -> Result<(usize, Option<u64>), String> {
    // Asked here, not of what this node has heard: the bucket may know more.
    let default = kv.get(DeviceKey::Default { id }.key()).await;
    if default.map_err(|e| e.to_string())?.is_some() {
        return Ok((0, None));
    }
    let subject = wire::mailbox(id);
    let mut moved = 0;
    let mut oldest_logged: Option<u64> = None;
    let mut seq = 1;
    for _ in 0..IMPORT_FRAMES {
        let Some(msg) = first_message(&mailbox.reads, &subject, seq).await? else {
            break;
        };
        let at = msg.sequence;
        seq = at + 1;
        match logged_time(&msg) {
            Some(time) => {
                oldest_logged = Some(oldest_logged.map_or(time, |t| t.min(time)));
            }
            None => {
                let time = (msg.time.unix_timestamp_nanos() / 1_000_000) as u64;
                let peer = author_of(&msg.payload);
                let block = Block {
                    entries: vec![Entry {
                        time,
                        device: String::new(),
                        wire: msg.payload,
                    }],
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("chat-moved-{at}").as_str());
                let ack = js
                    .publish_with_headers(wire::conversation(id, peer), headers, block.encode())
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())?;
                moved += 1;
            }
        }
        if let Err(e) = mailbox.stream.delete_message(at).await {
            log::debug!("mailbox sequence {at} not removed after its move: {e}");
        }
    }
    Ok((moved, oldest_logged))
}

/// The acceptance time of the oldest frame in `id`'s mailbox that is in its log too
/// (marked with [`wire::TIME_HEADER`]); nothing is moved.
async fn oldest_logged(mailbox: &Mailbox, id: u32) -> Result<Option<u64>, String> {
    let subject = wire::mailbox(id);
    let mut oldest: Option<u64> = None;
    let mut seq = 1;
    for _ in 0..IMPORT_FRAMES {
        let Some(msg) = first_message(&mailbox.reads, &subject, seq).await? else {
            break;
        };
        seq = msg.sequence + 1;
        if let Some(time) = logged_time(&msg) {
            oldest = Some(oldest.map_or(time, |t| t.min(time)));
        }
    }
    Ok(oldest)
}

/// Where a device that is to have every frame of `id`'s log accepted at or after
/// `time` (ms since the epoch) starts reading: just before the oldest such frame up to
/// offset `upto`, or at `upto` when there is none.
async fn start_since(
    reads: &stream::Stream<()>,
    id: u32,
    upto: u64,
    time: u64,
) -> Result<u64, String> {
    let mut start = upto;
    for subject in wire::logs_of(id) {
        start = start.min(start_since_in(reads, &subject, upto, time).await?);
    }
    Ok(start)
}

/// [`start_since`] in one of an id's two subjects. Acceptance times follow the log's
/// order only roughly (nodes' clocks differ; frames moved from a mailbox keep their
/// times), so it reads back through windows that grow four times each round until a
/// window begins with a frame accepted before `time`, and starts before the oldest
/// frame at or after it in what it read. Past [`SCAN_BLOCKS`] blocks it starts at the
/// beginning: more than was asked for, never less.
async fn start_since_in(
    reads: &stream::Stream<()>,
    subject: &str,
    upto: u64,
    time: u64,
) -> Result<u64, String> {
    let mut hi = wire::place(upto).0;
    let mut window = 64u64;
    let mut scanned = 0;
    let mut oldest = None;
    while hi > 0 {
        if scanned >= SCAN_BLOCKS {
            log::warn!(
                "{subject}: where a new device starts was not found within {SCAN_BLOCKS} blocks: from the beginning"
            );
            return Ok(0);
        }
        let lo = hi.saturating_sub(window).max(1);
        let mut seq = lo;
        // The time of the window's oldest frame, and its oldest frame at or after `time`.
        let mut begins = None;
        let mut since = None;
        while seq <= hi {
            let Some((at, _, payload)) = first_at(reads, subject, seq).await? else {
                break;
            };
            if at > hi {
                break;
            }
            seq = at + 1;
            scanned += 1;
            for (i, entry) in Block::decode(&payload)
                .unwrap_or_default()
                .entries
                .iter()
                .enumerate()
            {
                let offset = wire::offset(at, i);
                if offset > upto {
                    break;
                }
                begins.get_or_insert(entry.time);
                if entry.time >= time && since.is_none() {
                    since = Some(offset);
                }
            }
        }
        if since.is_some() {
            oldest = since;
        }
        if begins.is_some_and(|t| t < time) {
            break;
        }
        hi = lo - 1;
        window = window.saturating_mul(4);
    }
    Ok(oldest.map_or(upto, |o: u64| o.saturating_sub(1)))
}

fn failed(request: u32, why: String) -> Vec<Bytes> {
    vec![Record::QueryFailed { request, why }.encode()]
}

/// The first message of `subject` at or after stream sequence `from`; `None` when
/// there is none.
async fn first_at(
    reads: &stream::Stream<()>,
    subject: &str,
    from: u64,
) -> Result<Option<(u64, String, Bytes)>, String> {
    let msg = first_message(reads, subject, from).await?;
    Ok(msg.map(|m| (m.sequence, m.subject.to_string(), m.payload)))
}

/// [`first_at`], the whole message (with its headers and time).
async fn first_message(
    reads: &stream::Stream<()>,
    subject: &str,
    from: u64,
) -> Result<Option<jetstream::message::StreamMessage>, String> {
    use jetstream::stream::RawMessageErrorKind;
    match reads.get_first_raw_message_by_subject(subject, from).await {
        Ok(msg) => Ok(Some(msg)),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The acceptance time a frame in the mailbox carries when it is in its log too.
fn logged_time(msg: &jetstream::message::StreamMessage) -> Option<u64> {
    let time = msg.headers.get(wire::TIME_HEADER)?;
    time.as_str().parse().ok()
}

/// The offset of the newest frame in `id`'s log (0: none).
async fn head(reads: &stream::Stream<()>, id: u32) -> Result<u64, String> {
    use jetstream::stream::LastRawMessageErrorKind;
    let mut head = 0;
    for subject in wire::logs_of(id) {
        match reads.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) => {
                let n = Block::decode(&msg.payload).map_or(1, |b| b.entries.len());
                head = head.max(wire::offset(msg.sequence, n.saturating_sub(1)));
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(head)
}

/// The cursor of a device from the bucket; `None` for a device it does not know.
async fn cursor(kv: &kv::Store, key: DeviceKey) -> Result<Option<u64>, String> {
    let value = kv.get(key.key()).await.map_err(|e| e.to_string())?;
    Ok(value.and_then(|v| std::str::from_utf8(v.as_ref()).ok()?.parse().ok()))
}

/// Reads a page of session `e`'s log: where its next read starts, the frames with
/// their envelopes, and on its first read the `sync` record. A new device starts
/// after the id's newest cursor, or else after the newest frame accepted before
/// `live_since` (ms since the epoch).
#[allow(clippy::too_many_arguments)]
async fn read_session(
    reads: &stream::Stream<()>,
    kv: &kv::Store,
    e: Endpoint,
    name: &str,
    after: Option<u64>,
    start: u64,
    max_bytes: usize,
    live_since: u64,
    first: bool,
) -> Result<(u64, Vec<(u64, Bytes)>, Option<Bytes>), String> {
    let (after, sync) = match after {
        Some(after) => (after.max(start), None),
        None => {
            let named = DeviceKey::Named {
                id: e.id,
                name: name.to_string(),
            };
            let head = head(reads, e.id).await?;
            let oldest = match Both::new(reads, e.id, 1).next().await? {
                Some((seq, ..)) => wire::offset(seq, 0),
                None => 0,
            };
            let (new, resume) = match cursor(kv, named.clone()).await? {
                Some(cursor) => (false, cursor),
                None => {
                    // New: after the newest cursor of the id's devices, or live.
                    let resume = match cursor(kv, DeviceKey::Top { id: e.id }).await? {
                        Some(top) => top,
                        None => start_since(reads, e.id, head, live_since).await?,
                    };
                    let value = Bytes::from(resume.to_string());
                    kv.put(named.key(), value)
                        .await
                        .map_err(|e| e.to_string())?;
                    (true, resume)
                }
            };
            let sync = Record::Sync {
                new,
                head,
                oldest,
                backlog: 0,
                missed: 0,
            };
            (resume.max(start), first.then(|| sync.encode()))
        }
    };
    let (seq, skip) = match after {
        0 => (1, None),
        a => {
            let (seq, index) = wire::place(a);
            (seq, Some((seq, index)))
        }
    };
    let mut log = Both::new(reads, e.id, seq);
    let mut frames = Vec::new();
    let mut bytes = 0;
    let mut through = after;
    // Past READ_BLOCKS only while nothing was found: a device's own frames, left out,
    // must not end its reading early.
    let mut looked = 0;
    'blocks: while looked < READ_BLOCKS || (frames.is_empty() && looked < SCAN_BLOCKS) {
        looked += 1;
        let Some((at, subject_read, payload)) = log.next().await? else {
            break;
        };
        let Some(peer) = wire::peer_in(&subject_read, e.id) else {
            continue;
        };
        let Some(block) = Block::decode(&payload) else {
            log::warn!("id {}: a history block it cannot read, left out", e.id);
            continue;
        };
        for (i, entry) in block.entries.into_iter().enumerate() {
            if skip.is_some_and(|(s, index)| s == at && i <= index) {
                continue;
            }
            if frames.len() >= READ_FRAMES || (bytes >= max_bytes && !frames.is_empty()) {
                break 'blocks;
            }
            let offset = wire::offset(at, i);
            through = offset;
            let author = author_of(&entry.wire);
            let what = if author != e.id {
                What::Delivery
            } else if entry.device == name {
                // Its own frame: it had the echo.
                continue;
            } else {
                What::Carbon
            };
            let envelope = Envelope {
                what,
                offset,
                time: entry.time,
                conversation: peer,
                request: 0,
            };
            let wrapped = envelope.wrap(&entry.wire);
            bytes += wrapped.len();
            frames.push((offset, wrapped));
        }
    }
    Ok((through, frames, sync))
}

/// An id's log: its two subjects ([`wire::logs_of`]) read as one, in stream order.
struct Both<'a> {
    reads: &'a stream::Stream<()>,
    subjects: [String; 2],
    /// Where each subject is read from next, and what was read there and not taken.
    from: [u64; 2],
    ahead: [Option<Option<(u64, String, Bytes)>>; 2],
}

impl<'a> Both<'a> {
    fn new(reads: &'a stream::Stream<()>, id: u32, from: u64) -> Both<'a> {
        Both {
            reads,
            subjects: wire::logs_of(id),
            from: [from; 2],
            ahead: [None, None],
        }
    }

    /// The next block of the log: its sequence, subject and payload. A subject that
    /// had nothing is asked again each time: a block stored there meanwhile may come
    /// before what the other subject has.
    async fn next(&mut self) -> Result<Option<(u64, String, Bytes)>, String> {
        for k in 0..2 {
            if !matches!(self.ahead[k], Some(Some(_))) {
                let read = first_at(self.reads, &self.subjects[k], self.from[k]).await?;
                self.ahead[k] = Some(read);
            }
        }
        let seq = |k: usize| match &self.ahead[k] {
            Some(Some((seq, ..))) => Some(*seq),
            _ => None,
        };
        let k = match (seq(0), seq(1)) {
            (Some(a), Some(b)) if b < a => 1,
            (Some(_), _) => 0,
            (None, Some(_)) => 1,
            (None, None) => return Ok(None),
        };
        let taken = self.ahead[k].take().flatten();
        if let Some((seq, ..)) = &taken {
            self.from[k] = seq + 1;
        }
        Ok(taken)
    }
}

/// The newest offset of `id`'s conversation with `peer` and when it was accepted;
/// `None` when there is none.
async fn last_of(
    reads: &stream::Stream<()>,
    id: u32,
    peer: u32,
) -> Result<Option<(u64, u64)>, String> {
    use jetstream::stream::LastRawMessageErrorKind;
    match reads
        .get_last_raw_message_by_subject(&wire::conversation(id, peer))
        .await
    {
        Ok(msg) => {
            let block = Block::decode(&msg.payload).unwrap_or_default();
            let n = block.entries.len();
            let time = block.entries.last().map_or(0, |e| e.time);
            Ok(Some((
                wire::offset(msg.sequence, n.saturating_sub(1)),
                time,
            )))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// `id`'s read marker in its conversation with `peer` (0: none), and its revision.
async fn marker(kv: &kv::Store, id: u32, peer: u32) -> Result<(u64, Option<u64>), String> {
    offset_at(kv, &DeviceKey::Read { id, peer }.key()).await
}

/// The offset under `key` (0: none), and its revision.
async fn offset_at(kv: &kv::Store, key: &str) -> Result<(u64, Option<u64>), String> {
    let entry = kv.entry(key).await.map_err(|e| e.to_string())?;
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
        return Ok((0, None));
    };
    let offset = std::str::from_utf8(&entry.value)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((offset, Some(entry.revision)))
}

/// Moves the offset under `key` forward to `to`, never back: compare and set, since
/// several nodes may move it at once. Returns the offset it holds now; an error if it
/// stayed busy for [`RETRIES`] tries.
async fn raise(kv: &kv::Store, key: &str, to: u64) -> Result<u64, String> {
    for attempt in 0..RETRIES {
        if attempt > 0 {
            // Another writer won, or the entry read was a replica's, behind: give
            // either a moment, a different one for each of two racing writers.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let jitter = u64::from(nanos % 5);
            sleep(Duration::from_millis(2 + jitter + 2 * attempt as u64)).await;
        }
        let (current, revision) = offset_at(kv, key).await?;
        if current >= to {
            return Ok(current);
        }
        let value = Bytes::from(to.to_string());
        let set = match revision {
            Some(revision) => kv.update(key, value, revision).await.is_ok(),
            None => kv.create(key, value).await.is_ok(),
        };
        if set {
            return Ok(to);
        }
    }
    Err("busy; ask again".into())
}

/// Messages from `peer` in `id`'s conversation with it after offset `read`, counted
/// over [`SCAN_BLOCKS`] blocks at most.
async fn unread(reads: &stream::Stream<()>, id: u32, peer: u32, read: u64) -> Result<u32, String> {
    let subject = wire::conversation(id, peer);
    let (mut seq, _) = wire::place(read);
    seq = seq.max(1);
    let mut unread = 0u32;
    for _ in 0..SCAN_BLOCKS {
        let Some((at, _, payload)) = first_at(reads, &subject, seq).await? else {
            break;
        };
        seq = at + 1;
        let Some(block) = Block::decode(&payload) else {
            continue;
        };
        for (i, entry) in block.entries.iter().enumerate() {
            if wire::offset(at, i) > read && author_of(&entry.wire) != id {
                unread = unread.saturating_add(1);
            }
        }
    }
    Ok(unread)
}

/// The conversation list of `id`: the most recently active first, those whose last
/// message is before `before`, then its `page-end`.
async fn conversations(
    reads: &stream::Stream<()>,
    kv: &kv::Store,
    id: u32,
    before: Before,
    limit: u16,
    request: u32,
) -> Result<Vec<Bytes>, String> {
    let end = match before {
        Before::Newest => u64::MAX,
        Before::Offset(o) => o,
    };
    let limit = usize::from(limit.min(MAX_PAGE));
    let mut peers = Vec::new();
    for subjects in wire::logs_of(id) {
        let mut info = reads
            .info_with_subjects(subjects)
            .await
            .map_err(|e| e.to_string())?;
        while let Some((subject, _)) = info.next().await.transpose().map_err(|e| e.to_string())? {
            if let Some(peer) = wire::peer_in(&subject, id) {
                peers.push(peer);
            }
            if peers.len() >= SCAN_BLOCKS {
                break;
            }
        }
    }
    let mut rows = Vec::new();
    for peer in peers {
        if let Some((last, time)) = last_of(reads, id, peer).await?
            && last < end
        {
            rows.push((peer, last, time));
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map_or(0, |r| r.1)
    } else {
        0
    };
    let mut frames = Vec::new();
    for (peer, last, time) in rows {
        let (read, _) = marker(kv, id, peer).await?;
        let unread = unread(reads, id, peer, read).await?;
        frames.push(
            Record::Conversation {
                request,
                peer,
                last,
                time,
                unread,
                read,
            }
            .encode(),
        );
    }
    frames.push(
        Record::PageEnd {
            request,
            more,
            next,
        }
        .encode(),
    );
    Ok(frames)
}

/// Moves `id`'s read marker in its conversation with `peer` forward to `upto` (at
/// most its last message; a marker never goes back): its `read` record, or `None`
/// when there is no such conversation.
async fn mark_read(
    reads: &stream::Stream<()>,
    kv: &kv::Store,
    id: u32,
    peer: u32,
    upto: u64,
) -> Result<Option<Bytes>, String> {
    let Some((last, _)) = last_of(reads, id, peer).await? else {
        return Ok(None);
    };
    let upto = upto.min(last);
    // Two devices reading at once both move it forward only.
    let read = raise(kv, &DeviceKey::Read { id, peer }.key(), upto)
        .await
        .map_err(|e| format!("the read marker: {e}"))?;
    let unread = unread(reads, id, peer, read).await?;
    Ok(Some(
        Record::Read {
            conversation: peer,
            upto: read,
            unread,
        }
        .encode(),
    ))
}

/// A page of `id`'s conversation with `conversation` before `before`, newest first,
/// then its `page-end`.
async fn history_page(
    reads: &stream::Stream<()>,
    id: u32,
    conversation: u32,
    before: Before,
    limit: u16,
    request: u32,
) -> Result<Vec<Bytes>, String> {
    use jetstream::stream::LastRawMessageErrorKind;
    let limit = usize::from(limit.min(MAX_PAGE));
    let end = match before {
        Before::Newest => u64::MAX,
        Before::Offset(o) => o,
    };
    let subject = wire::conversation(id, conversation);
    let last = match reads.get_last_raw_message_by_subject(&subject).await {
        Ok(msg) => msg.sequence,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
        Err(e) => return Err(e.to_string()),
    };
    // The newest entries before `end`, oldest first, at most `limit + 1`.
    let mut found: VecDeque<(u64, Entry)> = VecDeque::new();
    let mut hi = last.min(wire::place(end).0);
    let mut window = 64u64;
    let mut scanned = 0;
    while hi > 0 && found.len() <= limit && scanned < SCAN_BLOCKS {
        let lo = hi.saturating_sub(window).max(1);
        // Only the newest `limit + 1` of a window can be needed.
        let room = limit + 1 - found.len().min(limit + 1);
        let mut older: VecDeque<(u64, Entry)> = VecDeque::new();
        let mut seq = lo;
        while seq <= hi {
            let Some((at, _, payload)) = first_at(reads, &subject, seq).await? else {
                break;
            };
            if at > hi {
                break;
            }
            seq = at + 1;
            scanned += 1;
            let Some(block) = Block::decode(&payload) else {
                continue;
            };
            for (i, entry) in block.entries.into_iter().enumerate() {
                let offset = wire::offset(at, i);
                if offset < end {
                    older.push_back((offset, entry));
                    if older.len() > room {
                        older.pop_front();
                    }
                }
            }
        }
        for item in older.into_iter().rev() {
            found.push_front(item);
        }
        hi = lo - 1;
        window = window.saturating_mul(4);
    }
    let more = found.len() > limit || (hi > 0 && scanned >= SCAN_BLOCKS);
    let mut frames = Vec::new();
    let mut bytes = 0;
    let mut next = 0;
    let mut cut = false;
    for (offset, entry) in found.iter().rev().take(limit) {
        if bytes >= ANSWER_BYTES && !frames.is_empty() {
            cut = true;
            break;
        }
        let envelope = Envelope {
            what: What::Page,
            offset: *offset,
            time: entry.time,
            conversation,
            request,
        };
        let wrapped = envelope.wrap(&entry.wire);
        bytes += wrapped.len();
        frames.push(wrapped);
        next = *offset;
    }
    let more = more || cut;
    let next = if more { next } else { 0 };
    frames.push(
        Record::PageEnd {
            request,
            more,
            next,
        }
        .encode(),
    );
    Ok(frames)
}
