#!/usr/bin/env bash
# chat-server with history on against the same pair workload through NATS: JetStream
# (`chat-bench --mode js-pair`: a stream on file storage, a push consumer per receiver,
# every publish acknowledged) and core NATS (`--mode nats-pair`), the ceiling that
# shows whether the generator is the limit (it must drive core NATS faster than
# either). 50 connections, 64 B; window 32 and window 1; ROUNDS (3) rounds, the three
# in turn (a different one first each round). Needs nats-server on the PATH.
#   bash bench/js.sh
# Prints one line per run, then each round's ratios chat/js and nats/chat.
set -euo pipefail
# Every load generator here connects from one address: no bound per address.
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
command -v nats-server >/dev/null || { echo "bench/js.sh needs nats-server (apt-get install nats-server)" >&2; exit 1; }
cargo build --release -q --bins
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}
# On the disk under the repository, not a tmpfs: both stores really write.
mkdir -p bench/results
d=$(mktemp -d -p "$PWD/bench/results")
mkdir -p "$d/chat" "$d/js"
target/release/chat-server --listen 127.0.0.1:17211 --data-dir "$d/chat" --log-level warn &
chat_pid=$!
nats-server -js -sd "$d/js" -a 127.0.0.1 -p 17212 >"$d/nats.log" 2>&1 &
nats_pid=$!
trap 'kill $chat_pid $nats_pid 2>/dev/null; wait $chat_pid $nats_pid 2>/dev/null || true; rm -rf "$d"' EXIT
for _ in $(seq 1 50); do
  target/release/chat-client --server 127.0.0.1:17211 --probe --timeout 1 2>/dev/null && break
  sleep 0.1
done
for _ in $(seq 1 50); do
  (exec 3<>/dev/tcp/127.0.0.1/17212) 2>/dev/null && break
  sleep 0.1
done
rate() {
  local port=$1 mode=$2 w=$3
  target/release/chat-bench --server 127.0.0.1:$port --conns 50 --window "$w" --size 64 \
    --mode "$mode" --secs "$SECS" --warmup 1 --json | sed 's/.*"msgs_per_sec":\([0-9]*\).*/\1/'
}
for w in ${WINDOWS:-32 1}; do
  for round in $(seq 1 "$ROUNDS"); do
    order=(chat js nats)
    case $((round % 3)) in 2) order=(js nats chat) ;; 0) order=(nats chat js) ;; esac
    declare -A got=()
    for s in "${order[@]}"; do
      case $s in
        chat) got[$s]=$(rate 17211 pair "$w") ;;
        js) got[$s]=$(rate 17212 js-pair "$w") ;;
        nats) got[$s]=$(rate 17212 nats-pair "$w") ;;
      esac
    done
    awk -v w="$w" -v r="$round" -v c="${got[chat]}" -v j="${got[js]}" -v n="${got[nats]}" 'BEGIN {
      printf "window %s, round %s: chat (history on) %d, jetstream %d, core nats %d msg/s; chat/js %.2f, nats/chat %.2f\n", w, r, c, j, n, c / j, n / c }'
  done
done
