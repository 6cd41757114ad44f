# The seed's own Tornado client (tests/seed/seed_client.py, its code unchanged) against
# the real chat-server binary.
set -euo pipefail
python3 -c 'import tornado' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check 'tornado>=6,<7'
cargo build --locked -q --bin chat-server
data=$(mktemp -d)
target/debug/chat-server --listen 127.0.0.1:17401 --data-dir "$data" --log-level warn >/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/17401) 2>/dev/null && break
  sleep 0.1
done
python3 tests/seed/seed_client.py 127.0.0.1:17401
