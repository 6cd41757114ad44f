#!/usr/bin/env bash
# Many idle connections on one fresh server: server RSS per connection once every client
# is welcomed, then the pair workload among 1,000 more connections while they stay.
#   bash bench/idle.sh                # 10,000 idle connections, 1 source address
#   bash bench/idle.sh 100000 8       # the issue's 100k run, over 127.0.0.2..127.0.0.9
# One address has about 28,000 ephemeral ports: use a source per 25,000 connections.
# Server and load generator each need CONNS + 1,100 open files; the script raises the
# soft limit to the hard one and says so when even that is too low.
set -euo pipefail
# Every load generator here connects from one address: no bound per address.
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
CONNS=${1:-10000}
SOURCES=${2:-0}
PAIRS=${PAIRS:-1000}
need=$((CONNS + PAIRS + 100))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  echo "idle: $CONNS connections need $need open files; this machine allows $(ulimit -Hn) (the hard limit; raising it needs CAP_SYS_RESOURCE)" >&2
  exit 1
fi
cargo build --release -q --bins
mkdir -p bench/results
data=$(mktemp -d -p "$PWD/bench/results")
addr=127.0.0.1:17901
${SERVER:-target/release/chat-server} --listen $addr --data-dir "$data" --max-connections $need \
  --log-level warn >/dev/null &
pid=$!
idle_log=$(mktemp)
trap 'kill $pid ${idle_pid:-} 2>/dev/null; rm -rf "$data" "$idle_log"' EXIT
until target/release/chat-client --server $addr --probe --timeout 1 2>/dev/null; do sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }
before=$(rss)
start=$(date +%s.%N)
target/release/chat-bench --server $addr --mode idle --conns "$CONNS" --sources "$SOURCES" \
  --secs 36000 --base-id 5000000 >"$idle_log" 2>&1 &
idle_pid=$!
# chat-bench prints its line once every connection is open and welcomed.
until grep -q "open and idle" "$idle_log"; do
  kill -0 $idle_pid 2>/dev/null || { cat "$idle_log" >&2; exit 1; }
  sleep 0.1
done
welcomed=$(python3 -c "import time; print(round(time.time() - $start, 1))")
during=$(rss)
echo "idle: $CONNS connections welcomed in ${welcomed} s; server RSS ${before} KiB -> ${during} KiB, $(( (during - before) * 1024 / CONNS )) bytes per connection"
for window in 1 32; do
  target/release/chat-bench --server $addr --mode pair --conns "$PAIRS" --window $window \
    --size 64 --secs 3 --warmup 1 --base-id 9000000
done
kill -0 $idle_pid 2>/dev/null || { echo "idle: the idle clients did not stay connected" >&2; exit 1; }
echo "idle: all $CONNS idle connections stayed open; server RSS now $(rss) KiB"
