# One-second smoke of chat-bench against a real chat-server: it must work and report
# non-zero throughput (chat-bench exits non-zero otherwise). No timing is asserted.
set -euo pipefail
cargo build --locked -q --bins
data=$(mktemp -d)
target/debug/chat-server --listen 127.0.0.1:17501 --data-dir "$data" --log-level warn >/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  target/debug/chat-client --server 127.0.0.1:17501 --probe --timeout 1 2>/dev/null && break
  sleep 0.1
done
target/debug/chat-bench --server 127.0.0.1:17501 --conns 4 --window 8 --secs 1 --warmup 0.2
target/debug/chat-bench --server 127.0.0.1:17501 --conns 4 --window 8 --secs 1 --warmup 0.2 --mode pair --json
# The NATS comparisons' loads (core NATS and JetStream pairs); nats-server is
# installed by .ci/run.
nats-server -js -sd "$data/js" -a 127.0.0.1 -p 17502 >/dev/null 2>&1 &
nats=$!
trap 'kill $pid $nats 2>/dev/null; wait $pid $nats 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/17502) 2>/dev/null && break
  sleep 0.1
done
target/debug/chat-bench --server 127.0.0.1:17502 --conns 4 --window 8 --secs 1 --warmup 0.2 --mode nats-pair
target/debug/chat-bench --server 127.0.0.1:17502 --conns 4 --window 8 --secs 1 --warmup 0.2 --mode js-pair
