#!/usr/bin/env bash
# The server's processor time per message: the pair workload (50 connections, 64 B,
# window W, default 1) for 4 s against a fresh server, its user + system time read
# from /proc before and after. On a shared, noisy machine this moves less than the
# rate itself. With BEFORE=, an older build too, in ROUNDS (5) alternating rounds.
#   bash bench/cpu.sh
#   BEFORE=/path/to/old/chat-server W=32 bash bench/cpu.sh
set -euo pipefail
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
cargo build --release -q --bins
W=${W:-1}
ROUNDS=${ROUNDS:-5}
mkdir -p bench/results
tick=$(getconf CLK_TCK)
one() {
  local name=$1 bin=$2 port=$3 d pid t0 t1 out rate
  d=$(mktemp -d -p "$PWD/bench/results")
  "$bin" --listen 127.0.0.1:$port --data-dir "$d" --log-level warn &
  pid=$!
  for _ in $(seq 1 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    sleep 0.1
  done
  t0=$(awk '{print $14 + $15}' /proc/$pid/stat)
  out=$(target/release/chat-bench --server 127.0.0.1:$port --conns 50 --window "$W" --size 64 \
    --mode pair --secs 4 --warmup 0 --json)
  t1=$(awk '{print $14 + $15}' /proc/$pid/stat)
  kill $pid
  wait $pid 2>/dev/null || true
  rm -rf "$d"
  rate=$(echo "$out" | sed 's/.*"msgs_per_sec":\([0-9]*\).*/\1/')
  awk -v n="$name" -v r="$round" -v rate="$rate" -v t=$((t1 - t0)) -v hz="$tick" -v w="$W" 'BEGIN {
    printf "round %s, %s, window %s: %d msg/s, %.1f us of server processor time per message\n", r, n, w, rate, t * 1e6 / hz / (rate * 4) }'
}
for round in $(seq 1 "$ROUNDS"); do
  if [ -n "${BEFORE:-}" ] && [ $((round % 2)) -eq 1 ]; then one before "$BEFORE" 17222; fi
  one this target/release/chat-server 17221
  if [ -n "${BEFORE:-}" ] && [ $((round % 2)) -eq 0 ]; then one before "$BEFORE" 17222; fi
done
