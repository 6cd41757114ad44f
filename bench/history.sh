#!/usr/bin/env bash
# What keeping history costs: the pair workload (50 connections, 64 B) against this
# build with history on (the default) and off (--history-max-age 0), and, with BEFORE=,
# an older build, in ROUNDS (3) alternating rounds, all three servers started afresh.
#   bash bench/history.sh                      # window 32
#   W=1 bash bench/history.sh                  # window 1
#   BEFORE=/path/to/old/chat-server bash bench/history.sh
# Prints one line per run; compare within a round (the machine is shared and noisy).
set -euo pipefail
# Every load generator here connects from one address: no bound per address.
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
cargo build --release -q --bins
W=${W:-32}
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}
# On the disk under the repository, not a tmpfs: commits really sync.
mkdir -p bench/results
d=$(mktemp -d -p "$PWD/bench/results")
mkdir -p "$d/before" "$d/off" "$d/on"
pids=()
servers=(off on)
target/release/chat-server --listen 127.0.0.1:17202 --data-dir "$d/off" --history-max-age 0 --log-level warn &
pids+=($!)
target/release/chat-server --listen 127.0.0.1:17203 --data-dir "$d/on" --log-level warn &
pids+=($!)
if [ -n "${BEFORE:-}" ]; then
  "$BEFORE" --listen 127.0.0.1:17201 --data-dir "$d/before" --log-level warn &
  pids+=($!)
  servers=(before off on)
fi
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$d"' EXIT
for port in 17202 17203 ${BEFORE:+17201}; do
  for _ in $(seq 1 50); do
    target/release/chat-client --server 127.0.0.1:$port --probe --timeout 1 2>/dev/null && break
    sleep 0.1
  done
done
for round in $(seq 1 "$ROUNDS"); do
  for s in "${servers[@]}"; do
    case $s in before) port=17201 ;; off) port=17202 ;; on) port=17203 ;; esac
    printf "round %s, %s, window %s: " "$round" "$s" "$W"
    target/release/chat-bench --server 127.0.0.1:$port --conns 50 --window "$W" --size 64 \
      --mode pair --secs "$SECS" --warmup 1 2>&1 | tail -1 | sed 's/.*64 B: //'
  done
done
du -sh "$d/on" | sed 's/\t.*//; s/^/history on, data dir after the runs: /'
