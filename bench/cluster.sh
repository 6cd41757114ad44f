#!/usr/bin/env bash
# Pair forwarding within one cluster node against pairs split across two nodes, in one
# run: three nats-server (JetStream, 3 replicas) and two chat nodes on loopback.
#   bash bench/cluster.sh                # about 1 minute; needs nats-server
#   ROUNDS=3 SECS=5 bash bench/cluster.sh
# Prints one line per measurement and the ratio cross-node / same-node per round.
set -euo pipefail
# Every load generator here connects from one address: no bound per address.
export CHAT_MAX_CONNECTIONS_PER_IP=0
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-2}
# Flags for both chat nodes, e.g. EXTRA="--history-max-age 0" (history off).
EXTRA=${EXTRA:-}
command -v nats-server >/dev/null || { echo "bench/cluster.sh: needs nats-server (apt-get install nats-server)" >&2; exit 1; }
cargo build --release -q --bins
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
for i in 1 2 3; do
  cat >"$dir/n$i.conf" <<END
server_name: n$i
listen: 127.0.0.1:1832$i
max_payload: 10MB
jetstream { store_dir: "$dir/js$i" }
cluster { name: bench, listen: 127.0.0.1:1842$i,
          routes: [nats://127.0.0.1:18421, nats://127.0.0.1:18422, nats://127.0.0.1:18423] }
END
  nats-server -c "$dir/n$i.conf" >"$dir/n$i.log" 2>&1 &
  pids+=($!)
done
NATS=nats://127.0.0.1:18321,nats://127.0.0.1:18322,nats://127.0.0.1:18323
A=127.0.0.1:18001
B=127.0.0.1:18002
target/release/chat-server --listen $A --nats $NATS --node-name a --log-level warn $EXTRA >"$dir/a.log" 2>&1 &
pids+=($!)
target/release/chat-server --listen $B --nats $NATS --node-name b --log-level warn $EXTRA >"$dir/b.log" 2>&1 &
pids+=($!)
for addr in $A $B; do
  for _ in $(seq 1 60); do
    target/release/chat-client --server $addr --probe --timeout 1 2>/dev/null && break
    sleep 0.5
  done
done
bench() { target/release/chat-bench --secs "$SECS" --json "$@"; }
rate() { sed 's/.*"msgs_per_sec":\([0-9]*\).*/\1/'; }
base=1000000
for round in $(seq 1 "$ROUNDS"); do
  base=$((base + 1000))
  same=$(bench --server $A --mode pair --base-id $base)
  echo "$same"
  base=$((base + 1000))
  across=$(bench --server $A --peer-server $B --mode pair --base-id $base)
  echo "$across"
  echo "round $round: across nodes / same node = $(python3 -c "print(round($(echo "$across" | rate) / $(echo "$same" | rate), 2))")"
done
