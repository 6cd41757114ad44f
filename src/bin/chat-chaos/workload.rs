//! The clients: senders that number their frames and send again what had no answer
//! when their connection dropped (as `chat-client` does), and receivers that
//! acknowledge what they get, go offline for a while now and then (their mailbox
//! fills), come back on another node, and sometimes connect a second time while the
//! first connection is still open (a takeover). Everything they see is recorded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{Either, select};

use chat::client::{Acker, Client, Receiver, Sender};
use chat::protocol::session::{Device, Received};
use chat::protocol::{ClientFrame, Code, ServerFrame, TEXT};
use chat::rt;

use crate::check::{Answer, Event};

/// A small, seeded generator (splitmix64): a run is described by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration between `lo` and `hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }

    /// True with probability `p` (0 to 1).
    pub fn chance(&mut self, p: f64) -> bool {
        (self.below(1_000_000) as f64) < p * 1_000_000.0
    }
}

/// What every client shares: the history, the clock, the nodes, and the phase.
pub struct World {
    pub started: Instant,
    pub history: Mutex<Vec<Event>>,
    pub addrs: Vec<String>,
    /// Senders send nothing new once set (what is unanswered still goes).
    pub stop_sending: AtomicBool,
    /// Receivers stop once set.
    pub stop_receiving: AtomicBool,
    next_conn: AtomicU64,
    /// Senders still sending, or waiting for answers.
    pub senders_left: AtomicUsize,
    /// A client that has frames unanswered and hears nothing for this long gives the
    /// connection up (and it is recorded as a silence).
    pub silence: Duration,
}

impl World {
    pub fn new(addrs: Vec<String>, silence: Duration, senders: usize) -> Arc<World> {
        Arc::new(World {
            started: Instant::now(),
            history: Mutex::new(Vec::new()),
            addrs,
            stop_sending: AtomicBool::new(false),
            stop_receiving: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            senders_left: AtomicUsize::new(senders),
            silence,
        })
    }

    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Every frame echoed so far has been delivered at least once, to each device of
    /// its receiver that uses a session.
    pub fn all_delivered(&self) -> bool {
        self.missing_on_devices() == 0
    }

    /// Frames echoed so far and not delivered to a place they are for: their receiver
    /// (any connection without a session), and each device of it with a session that
    /// was connected before the echo (a new device starts after what its id's other
    /// devices have: docs/PROTOCOL.md).
    pub fn missing_on_devices(&self) -> usize {
        use std::collections::{HashMap, HashSet};
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        // Each connection's device ("" without a session), from its `Connected`, which
        // comes before its deliveries.
        let mut place: HashMap<u64, String> = HashMap::new();
        let mut to: HashMap<u32, u32> = HashMap::new();
        let mut echoed = Vec::new();
        let mut places: HashMap<u32, HashMap<String, f64>> = HashMap::new();
        let mut delivered = HashSet::new();
        for e in history.iter() {
            match e {
                Event::Sent {
                    sender, receiver, ..
                } => {
                    to.insert(*sender, *receiver);
                }
                Event::Answered {
                    sender,
                    n,
                    answer: Answer::Echo,
                    at,
                } => echoed.push((*sender, *n, *at)),
                Event::Connected {
                    id,
                    conn,
                    device,
                    at,
                    ..
                } => {
                    let device = device.clone().unwrap_or_default();
                    place.insert(*conn, device.clone());
                    places.entry(*id).or_default().entry(device).or_insert(*at);
                }
                Event::Delivered {
                    receiver,
                    sender,
                    n,
                    conn,
                    ..
                } => {
                    let device = place.get(conn).cloned().unwrap_or_default();
                    delivered.insert((*receiver, device, *sender, *n));
                }
                _ => {}
            }
        }
        let mut missing = 0;
        for (sender, n, at) in echoed {
            let Some(&receiver) = to.get(&sender) else {
                continue;
            };
            let Some(all) = places.get(&receiver) else {
                missing += 1;
                continue;
            };
            let mut got = false;
            let mut owed = 0;
            for (p, &since) in all {
                let here = delivered.contains(&(receiver, p.clone(), sender, n));
                got |= here;
                if !here && (p.is_empty() || since <= at) {
                    owed += 1;
                }
            }
            // Nowhere at all: owed to every place.
            missing += if got { owed } else { owed.max(1) };
        }
        missing
    }

    pub fn record(&self, event: Event) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// Connects to a random node and binds `id` (with acks when asked, as a session's
    /// `device` when given), trying nodes until one welcomes it; the connection's
    /// number is recorded with its node.
    async fn connect(
        &self,
        id: u32,
        acks: bool,
        device: Option<&Device>,
        rng: &mut Rng,
    ) -> Option<(Client, u64)> {
        loop {
            if self.stop_receiving.load(Ordering::Relaxed) {
                return None;
            }
            let node = rng.below(self.addrs.len() as u64) as usize;
            let addr = &self.addrs[node];
            let attempt = rt::timeout(Duration::from_secs(3), async {
                let mut c = Client::connect(addr).await?;
                if let Some(device) = device {
                    c.session(id, device, None).await?;
                } else if acks {
                    c.hello_acks(id, None).await?;
                } else {
                    c.hello(id, None).await?;
                }
                Ok::<_, std::io::Error>(c)
            })
            .await;
            match attempt {
                Some(Ok(c)) => {
                    let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                    self.record(Event::Connected {
                        id,
                        conn,
                        node,
                        device: device.map(|d| d.to_string()),
                        at: self.now(),
                    });
                    return Some((c, conn));
                }
                _ => rt::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// How a sender behaves.
#[derive(Debug, Clone, Copy)]
pub struct SenderPlan {
    pub id: u32,
    pub to: u32,
    /// Frames in flight at most.
    pub window: usize,
    /// Time between frames.
    pub pace: Duration,
    /// Every `large`-th frame is 64 KiB (0: none).
    pub large: u64,
}

fn frame(plan: &SenderPlan, n: u64) -> ClientFrame {
    let mut body = format!("{n:020}").into_bytes();
    if plan.large > 0 && n % plan.large == plan.large - 1 {
        body.resize(64 * 1024, b'.');
    }
    ClientFrame {
        sender: plan.id,
        receiver: plan.to,
        kind: TEXT,
        body: body.into(),
    }
}

/// The number a frame's body starts with.
pub fn number(f: &ServerFrame) -> Option<u64> {
    number_in(&f.body)
}

/// The number a payload carries.
fn number_in(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(..20)?).ok()?.parse().ok()
}

/// Sends numbered frames until told to stop, then until every one has its answer.
pub async fn sender(world: Arc<World>, plan: SenderPlan, rng: Rng) {
    send_all(&world, plan, rng).await;
    world.senders_left.fetch_sub(1, Ordering::Relaxed);
}

async fn send_all(world: &Arc<World>, plan: SenderPlan, mut rng: Rng) {
    let mut next = 0u64;
    let mut unanswered: VecDeque<u64> = VecDeque::new();
    loop {
        if world.stop_sending.load(Ordering::Relaxed) && unanswered.is_empty() {
            return;
        }
        let Some((client, conn)) = world.connect(plan.id, false, None, &mut rng).await else {
            return;
        };
        let (mut tx, mut rx) = client.split();
        if !resend(world, &plan, conn, &mut tx, &unanswered).await {
            continue;
        }
        let link = Link {
            conn,
            tx: &mut tx,
            rx: &mut rx,
        };
        let ended = converse(world, &plan, link, &mut next, &mut unanswered).await;
        if ended {
            return;
        }
    }
}

async fn resend(
    world: &World,
    plan: &SenderPlan,
    conn: u64,
    tx: &mut Sender,
    frames: &VecDeque<u64>,
) -> bool {
    for &n in frames {
        if tx.send(&frame(plan, n)).await.is_err() {
            return false;
        }
        world.record(Event::Sent {
            sender: plan.id,
            receiver: plan.to,
            n,
            conn,
            at: world.now(),
        });
    }
    true
}

/// A sender's connection: its number and its halves.
struct Link<'a> {
    conn: u64,
    tx: &'a mut Sender,
    rx: &'a mut Receiver,
}

/// One connection's part: true when the sender is done.
async fn converse(
    world: &World,
    plan: &SenderPlan,
    link: Link<'_>,
    next: &mut u64,
    unanswered: &mut VecDeque<u64>,
) -> bool {
    let Link { conn, tx, rx } = link;
    let mut heard = Instant::now();
    let mut due = Instant::now();
    loop {
        let stopping = world.stop_sending.load(Ordering::Relaxed);
        if stopping && unanswered.is_empty() {
            return true;
        }
        let room = !stopping && unanswered.len() < plan.window;
        if room && Instant::now() >= due {
            let n = *next;
            if tx.send(&frame(plan, n)).await.is_err() {
                return false;
            }
            *next += 1;
            unanswered.push_back(n);
            world.record(Event::Sent {
                sender: plan.id,
                receiver: plan.to,
                n,
                conn,
                at: world.now(),
            });
            // Behind by more than a second (a long wait): no burst to catch up.
            due = (due + plan.pace).max(Instant::now() - Duration::from_secs(1));
            continue;
        }
        let wait = if room {
            due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(200)
        };
        let recv = std::pin::pin!(rx.recv());
        let nap = std::pin::pin!(rt::sleep(wait));
        let got = match select(recv, nap).await {
            Either::Left((got, _)) => Some(got),
            Either::Right(_) => None,
        };
        let frame = match got {
            Some(Ok(Some(f))) => f,
            Some(_) => return false,
            None => {
                if !unanswered.is_empty() && heard.elapsed() > world.silence {
                    world.record(Event::Silence {
                        waited: heard.elapsed().as_secs_f64(),
                    });
                    return false;
                }
                if unanswered.is_empty() {
                    heard = Instant::now();
                }
                continue;
            }
        };
        heard = Instant::now();
        let answer = match frame.notice() {
            None if frame.sender == plan.id => Answer::Echo,
            None => continue,
            Some(n) if n.is(Code::MailboxFull) => Answer::Refused("mailbox-full".into()),
            Some(n) if n.is(Code::StoreFailed) => Answer::Refused("store-failed".into()),
            // replaced, slow-consumer, shutting-down: the connection ends.
            Some(_) => return false,
        };
        let Some(n) = unanswered.pop_front() else {
            continue;
        };
        if answer == Answer::Echo && number(&frame) != Some(n) {
            eprintln!(
                "chat-chaos: id {}: echo of {:?} where {n} was due",
                plan.id,
                number(&frame)
            );
        }
        world.record(Event::Answered {
            sender: plan.id,
            n,
            answer,
            at: world.now(),
        });
    }
}

/// How a receiver behaves.
#[derive(Debug, Clone)]
pub struct ReceiverPlan {
    pub id: u32,
    /// Goes offline now and then (its mailbox fills meanwhile).
    pub wanders: bool,
    /// A session's device rather than a hello with acks: one of the id's devices,
    /// which each get every frame (its deliveries are the id's, per connection).
    pub device: Option<Device>,
}

/// Receives and acknowledges until told to stop.
pub async fn receiver(world: Arc<World>, plan: ReceiverPlan, mut rng: Rng) {
    let mut client = None;
    loop {
        if world.stop_receiving.load(Ordering::Relaxed) {
            return;
        }
        let (c, conn) = match client.take() {
            Some(c) => c,
            None => match world
                .connect(plan.id, true, plan.device.as_ref(), &mut rng)
                .await
            {
                Some(c) => c,
                None => return,
            },
        };
        let online = if plan.wanders && !world.stop_sending.load(Ordering::Relaxed) {
            Some(rng.between(Duration::from_secs(2), Duration::from_secs(8)))
        } else {
            None
        };
        let (mut tx, mut rx) = c.split();
        let session = plan.device.is_some();
        receive(&world, plan.id, conn, &mut tx, &mut rx, online, session).await;
        if world.stop_receiving.load(Ordering::Relaxed) {
            return;
        }
        if online.is_some() {
            if rng.chance(0.3) {
                // A takeover: the next connection binds while this one is open.
                client = world
                    .connect(plan.id, true, plan.device.as_ref(), &mut rng)
                    .await;
                drop((tx, rx));
                continue;
            }
            drop((tx, rx));
            rt::sleep(rng.between(Duration::from_millis(500), Duration::from_secs(4))).await;
        }
    }
}

/// One connection's part: until it ends, `online` passes, or the run stops.
async fn receive(
    world: &World,
    id: u32,
    conn: u64,
    tx: &mut Sender,
    rx: &mut Receiver,
    online: Option<Duration>,
    session: bool,
) {
    let started = Instant::now();
    let mut acker = Acker::new(id);
    loop {
        if world.stop_receiving.load(Ordering::Relaxed) {
            return;
        }
        if online.is_some_and(|d| started.elapsed() > d) {
            return;
        }
        let got = rt::timeout(Duration::from_millis(200), rx.recv()).await;
        let frame = match got {
            Some(Ok(Some(f))) => f,
            Some(_) => return,
            None => continue,
        };
        if session {
            let (sender, n, what) = match Received::read(frame) {
                Ok(Received::Message {
                    sender,
                    envelope,
                    payload,
                    ..
                }) => (sender, number_in(&payload), envelope.what),
                Ok(Received::Notice(n)) => {
                    if n.is(Code::Replaced) || n.is(Code::SlowConsumer) || n.is(Code::ShuttingDown)
                    {
                        return;
                    }
                    continue;
                }
                Ok(Received::Record(_)) => continue,
                Err(e) => {
                    eprintln!("chat-chaos: id {id}: a malformed session frame: {e}");
                    return;
                }
            };
            let Some(n) = n else {
                eprintln!("chat-chaos: id {id}: a message without a number from {sender}");
                continue;
            };
            world.record(Event::Delivered {
                receiver: id,
                sender,
                n,
                conn,
                at: world.now(),
            });
            acker.handled_what(what);
            if let Some(ack) = acker.ack()
                && tx.send(&ack).await.is_err()
            {
                return;
            }
            continue;
        }
        if let Some(n) = frame.notice() {
            if n.is(Code::Replaced) || n.is(Code::SlowConsumer) || n.is(Code::ShuttingDown) {
                return;
            }
            continue;
        }
        let Some(n) = number(&frame) else {
            eprintln!(
                "chat-chaos: id {id}: a frame without a number from {}",
                frame.sender
            );
            continue;
        };
        world.record(Event::Delivered {
            receiver: id,
            sender: frame.sender,
            n,
            conn,
            at: world.now(),
        });
        acker.handled(&frame);
        if let Some(ack) = acker.ack()
            && tx.send(&ack).await.is_err()
        {
            return;
        }
    }
}
