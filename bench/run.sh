#!/usr/bin/env bash
# Runs chat-server and two ceilings with identical chat-bench settings, one after the
# other in one run, and prints ratios: examples/ceiling.rs (same protocol, no broker, on
# async-std like chat-server) and examples/ceiling_tokio.rs (the fastest echo we could
# write here: tokio multi-thread, 64 KiB buffers, no shared code). With nats-server
# installed it also runs the pair workload through core NATS (chat-bench --mode
# nats-pair), the fastest router to compare forwarding with.
#   bash bench/run.sh            # about 4 minutes
#   SECS=2 bash bench/run.sh     # shorter
#   BEFORE=/path/to/old/chat-server bash bench/run.sh   # also an older build, same run,
#                                                        # in ROUNDS (3) alternating rounds
# Results: bench/results/latest.jsonl, chart: bench/chart.svg (bench/chart.py).
set -euo pipefail
# Every load generator here connects from one address: no bound per address.
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
SECS=${SECS:-4}
WARMUP=${WARMUP:-1}
mkdir -p bench/results
out=bench/results/latest.jsonl
: >"$out"

cargo build --release -q --bins --example ceiling --example ceiling_tokio
# The data dir is on the disk under the repository, not a tmpfs: commits really sync.
data=$(mktemp -d -p "$PWD/bench/results")
python3 bench/fsync.py "$data" | tee -a "$out" >&2
store_log=$data.log
CHAT=127.0.0.1:17001
CEIL=127.0.0.1:17002
# Debug logs carry the store's per-second figures (commits, frames per commit).
target/release/chat-server --listen $CHAT --data-dir "$data" --log-level debug >"$store_log" &
chat_pid=$!
target/release/examples/ceiling $CEIL >/dev/null &
ceil_pid=$!
TOKIO=127.0.0.1:17004
target/release/examples/ceiling_tokio $TOKIO >/dev/null &
tokio_pid=$!
NATS=127.0.0.1:17005
nats_pid=
if command -v nats-server >/dev/null; then
  nats-server -a 127.0.0.1 -p ${NATS#*:} >/dev/null 2>&1 &
  nats_pid=$!
else
  echo "nats-server not installed: no NATS comparison (apt-get install nats-server)" >&2
fi
BEFORE_ADDR=127.0.0.1:17003
# For the alternating rounds, this build is started afresh beside the old one, so the
# two compared have both run nothing else.
AFTER_ADDR=127.0.0.1:17006
before_pid=
after_pid=
if [ -n "${BEFORE:-}" ]; then
  mkdir -p "$data/before" "$data/after"
  "$BEFORE" --listen $BEFORE_ADDR --data-dir "$data/before" --log-level warn >/dev/null &
  before_pid=$!
  target/release/chat-server --listen $AFTER_ADDR --data-dir "$data/after" --log-level warn >/dev/null &
  after_pid=$!
fi
trap 'kill $chat_pid $ceil_pid $tokio_pid $nats_pid $before_pid $after_pid 2>/dev/null; rm -rf "$data" "$store_log"' EXIT
for addr in $CHAT $CEIL $TOKIO ${nats_pid:+$NATS}; do
  for _ in $(seq 1 50); do
    target/release/chat-client --server $addr --probe --timeout 1 2>/dev/null && break
    # the ceiling does not answer pings; a TCP connect is enough there
    (exec 3<>/dev/tcp/${addr%:*}/${addr#*:}) 2>/dev/null && break
    sleep 0.1
  done
done

# bench NAME SERVER ARGS... -> appends a JSON line tagged with name and server
bench() {
  local name=$1 server=$2; shift 2
  local addr=$CHAT extra=()
  [ "$server" = ceiling ] && { addr=$CEIL; extra=(--no-hello); }
  [ "$server" = ceiling-tokio ] && { addr=$TOKIO; extra=(--no-hello); }
  [ "$server" = nats ] && { addr=$NATS; extra=(--mode nats-pair); }
  [ "$server" = before ] && addr=$BEFORE_ADDR
  [ "$server" = after ] && addr=$AFTER_ADDR
  local line
  line=$(target/release/chat-bench --server $addr --secs "$SECS" --warmup "$WARMUP" --json "${extra[@]}" "$@")
  echo "{\"name\":\"$name\",\"server\":\"$server\",${line#\{}" | tee -a "$out" >&2
}

both() { bench "$1" chat-server "${@:2}"; bench "$1" ceiling "${@:2}"; bench "$1" ceiling-tokio "${@:2}"; }
# The pair workload through chat-server and through nats-server.
pairs() {
  bench "$1" chat-server "${@:2}" --mode pair
  [ -z "$nats_pid" ] || bench "$1" nats "${@:2}"
}

both pipelined --conns 50 --window 32 --size 64
both reqresp --conns 50 --window 1 --size 64
pairs pair --conns 50 --window 32 --size 64
pairs pair-w1 --conns 50 --window 1 --size 64
bench pair-acks chat-server --conns 50 --window 32 --size 64 --mode pair --acks
# What one commit carries while pairs forward with acks (store lines logged each second).
grep -a '"store: ' "$store_log" | tail -3 | sed 's/.*"msg":"store: /store under pair+acks: /; s/"}$//' >&2
if [ -n "$before_pid" ]; then
  for addr in $BEFORE_ADDR $AFTER_ADDR; do
    for _ in $(seq 1 50); do
      target/release/chat-client --server $addr --probe --timeout 1 --no-acks 2>/dev/null && break
      sleep 0.1
    done
  done
  bench pipelined before --conns 50 --window 32 --size 64
  bench pair before --conns 50 --window 32 --size 64 --mode pair
  # And this build once more, right after, so the two are side by side in time.
  bench pipelined-again chat-server --conns 50 --window 32 --size 64
  bench pair-again chat-server --conns 50 --window 32 --size 64 --mode pair
  # Alternating rounds, workload by workload, this build and the older one, ROUNDS
  # times, so a drift in the machine's speed falls on both alike. The spread of one
  # build's rounds is the noise a difference between the two must pass.
  for round in $(seq 1 "${ROUNDS:-3}"); do
    for spec in "pipelined --window 32 --size 64" "reqresp --window 1 --size 64" \
      "pair --window 32 --size 64 --mode pair" "pair-w1 --window 1 --size 64 --mode pair" \
      "pair-acks --window 32 --size 64 --mode pair --acks" "large --window 8 --size 4096"; do
      set -- $spec
      name=$1
      shift
      # Odd rounds this build first, even rounds the old one: neither always goes first.
      if [ $((round % 2)) = 1 ]; then
        bench "ab-$name-$round" after --conns 50 "$@"
        bench "ab-$name-$round" before --conns 50 "$@"
      else
        bench "ab-$name-$round" before --conns 50 "$@"
        bench "ab-$name-$round" after --conns 50 "$@"
      fi
    done
  done
fi
both large --conns 50 --window 8 --size 4096
for w in 1 4 16 64; do both "window-$w" --conns 50 --window $w --size 64; done
for c in 1 10 50 200; do both "conns-$c" --conns $c --window 32 --size 64; done

# Idle connections: server RSS per connection with 10,000 bound, idle clients.
rss() { awk '/VmRSS/ {print $2}' /proc/$chat_pid/status; }
before=$(rss)
idle_log=$(mktemp)
target/release/chat-bench --server $CHAT --mode idle --conns 10000 --secs 5 --base-id 5000000 >"$idle_log" &
idle_pid=$!
# chat-bench prints its line once every connection is open and welcomed.
until grep -q "open and idle" "$idle_log"; do sleep 0.1; done
during=$(rss)
wait $idle_pid
rm -f "$idle_log"
per=$(( (during - before) * 1024 / 10000 ))
echo "{\"name\":\"idle\",\"server\":\"chat-server\",\"conns\":10000,\"rss_before_kib\":$before,\"rss_kib\":$during,\"bytes_per_conn\":$per}" | tee -a "$out" >&2

python3 bench/report.py "$out"
