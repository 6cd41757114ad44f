#!/usr/bin/env bash
# Where chat-server's time goes under pair forwarding: perf samples (with call graphs)
# of the server while chat-bench drives it, then the top symbols by self time.
#   bash bench/profile.sh                 # pair, 50 conns, window 32, 64 B
#   MODE=echo WINDOW=1 bash bench/profile.sh
# Needs perf (Debian: linux-perf). Writes bench/results/perf.data; a flame graph from it:
#   perf script -i bench/results/perf.data | inferno-collapse-perf | inferno-flamegraph > pair.svg
set -euo pipefail
# Every load generator here connects from one address: no bound per address.
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
MODE=${MODE:-pair}
WINDOW=${WINDOW:-32}
command -v perf >/dev/null || { echo "profile: needs perf (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release -q --bins
mkdir -p bench/results
data=$(mktemp -d -p "$PWD/bench/results")
addr=127.0.0.1:17801
target/release/chat-server --listen $addr --data-dir "$data" --log-level warn >/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
until target/release/chat-client --server $addr --probe --timeout 1 2>/dev/null; do sleep 0.1; done
target/release/chat-bench --server $addr --mode "$MODE" --conns 50 --window "$WINDOW" --size 64 \
  --secs 8 --warmup 1 &
bench=$!
sleep 2
perf record -q -F 999 -g --call-graph dwarf,16384 -p $pid -o bench/results/perf.data -- sleep 4
wait $bench
perf report -i bench/results/perf.data --no-children --sort symbol -g none --stdio 2>/dev/null \
  | grep '%' | head -30
