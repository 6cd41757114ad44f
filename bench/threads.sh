#!/usr/bin/env bash
# Where the server's threads spend the processor at window 1: the store thread's and the
# runtime threads' CPU (hundredths of a core) and the store thread's wake-ups per second,
# read from /proc over 2 s in the middle of a 4 s pair run (50 connections, 64 B).
# BEFORE= runs an older build too, alternating, ROUNDS (3) times. Linux only.
#   bash bench/threads.sh
#   BEFORE=/path/to/old/chat-server bash bench/threads.sh
set -euo pipefail
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
cargo build --release -q --bins
ROUNDS=${ROUNDS:-3}
mkdir -p bench/results
one() {
  local label=$1 bin=$2 d pid out
  d=$(mktemp -d -p "$PWD/bench/results")
  out=$(mktemp)
  "$bin" --listen 127.0.0.1:17311 --data-dir "$d" --log-level warn &
  pid=$!
  for _ in $(seq 1 50); do
    target/release/chat-client --server 127.0.0.1:17311 --probe --timeout 1 2>/dev/null && break
    sleep 0.1
  done
  target/release/chat-bench --server 127.0.0.1:17311 --conns 50 --window 1 --size 64 \
    --mode pair --secs 4 --warmup 0 --json >"$out" &
  local bench=$!
  snap() {
    for t in /proc/$pid/task/*; do
      c=$(cat "$t/comm")
      case $c in store | async-std/runti) ;; *) continue ;; esac
      echo "$c $(awk '{print $14+$15}' "$t/stat") $(awk '/^voluntary/ {print $2}' "$t/status")"
    done
  }
  sleep 1.5
  local s1 s2
  s1=$(snap)
  sleep 2
  s2=$(snap)
  wait $bench
  paste -d' ' <(echo "$s1") <(echo "$s2") | awk -v l="$label" -v m="$(sed 's/.*"msgs_per_sec":\([0-9]*\).*/\1/' "$out")" '
    { t[$1] += ($5 - $2) / 2; v[$1] += ($6 - $3) / 2 }
    END { printf "%s: store %d/100 core, %d wakes/s; runtime threads %d/100 core; %d msg/s\n", l, t["store"], v["store"], t["async-std/runti"], m }'
  kill $pid
  wait $pid 2>/dev/null || true
  rm -rf "$d" "$out"
}
for r in $(seq 1 "$ROUNDS"); do
  [ -n "${BEFORE:-}" ] && one "round $r, before" "$BEFORE"
  one "round $r, this" target/release/chat-server
done
