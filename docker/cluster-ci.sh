#!/usr/bin/env bash
# Proves the cluster in containers (docker/compose.cluster.yml) through HAProxy: two
# clients on different nodes exchange frames; the node holding a receiver is killed and
# the receiver (a reconnecting chat-client) still gets every accepted frame; a NATS
# container is killed and the service goes on; the mailbox survives `down` and `up`
# with its volumes; HAProxy takes a killed node and a frozen one (up, not serving) out
# of the rotation within measured bounds; a rolling restart (each node drained in turn)
# loses nothing and keeps every sender's wait short. Without a Docker engine it skips, unless
# CHAT_REQUIRE_DOCKER is set (to anything).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  if [ -n "${CHAT_REQUIRE_DOCKER+set}" ]; then
    echo "cluster: no Docker engine reachable, and CHAT_REQUIRE_DOCKER is set" >&2
    exit 1
  fi
  echo "SKIP: cluster: no Docker engine reachable (install Docker and start its daemon); skipping the cluster checks"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi
port=${CHAT_CI_CLUSTER_PORT:-18898}
web=${CHAT_CI_CLUSTER_WEB_PORT:-18098}
project=chatcluster$$
dc() { CHAT_PORT=$port CHAT_WEB_PORT=$web CHAT_LOG_LEVEL=debug "${compose[@]}" -p "$project" -f docker/compose.cluster.yml "$@"; }
work=$(mktemp -d)
receiver_pid=
sender_pid=
cleanup() {
  [ -n "$sender_pid" ] && kill "$sender_pid" 2>/dev/null
  [ -n "$receiver_pid" ] && kill "$receiver_pid" 2>/dev/null
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "cluster: $*" >&2
  dc ps >&2 || true
  dc logs --tail 30 >&2 || true
  exit 1
}

# Images without a registry: Debian's packages on a minimal root (docker/local-bases.sh).
export RUST_IMAGE=${RUST_IMAGE:-chat-local/rust:1.95}
export RUNTIME_IMAGE=${RUNTIME_IMAGE:-chat-local/debian:bookworm-slim}
export NATS_IMAGE=${NATS_IMAGE:-chat-local/nats:2.9}
export HAPROXY_IMAGE=${HAPROXY_IMAGE:-chat-local/haproxy:2.6}
RUST_TAG=$RUST_IMAGE RUNTIME_TAG=$RUNTIME_IMAGE NATS_TAG=$NATS_IMAGE HAPROXY_TAG=$HAPROXY_IMAGE \
  CLUSTER_BASES=1 bash docker/local-bases.sh
[ -d vendor ] || cargo vendor --locked -q vendor >/dev/null
cargo build --release --locked -q --bin chat-client
client=target/release/chat-client
addr=127.0.0.1:$port

echo "cluster: building and starting with ${compose[*]}"
dc build -q chat1
dc up -d nats1 nats2 nats3 chat1 chat2 chat3 haproxy

# Ready when HAProxy answers a ping through a node that has joined.
ready() {
  for _ in $(seq 1 120); do
    $client --server "$addr" --probe --timeout 2 2>/dev/null && return 0
    sleep 1
  done
  fail "never answered through HAProxy"
}
ready
echo "cluster: HAProxy answers through a chat node"
for _ in $(seq 1 30); do
  curl -fsS "http://127.0.0.1:$web/" 2>/dev/null | grep '<script src="app.js"' >/dev/null && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$web/" | grep '<script src="app.js"' >/dev/null \
  || fail "the web client is not served through HAProxy"
echo "cluster: the web client is served through HAProxy"

# The node (chat1..3) where an id was last bound, from the nodes' debug logs.
node_of() {
  local id=$1 node best="" latest=0 t
  for node in chat1 chat2 chat3; do
    t=$(dc logs --no-color "$node" 2>/dev/null | grep "id $id bound to" | tail -1 \
      | sed -n 's/.*"time":\([0-9]*\).*/\1/p')
    if [ -n "$t" ] && [ "$t" -gt "$latest" ]; then best=$node; latest=$t; fi
  done
  [ -n "$best" ] && echo "$best"
}
# Milliseconds from `since` (date +%s%N) until HAProxy logs that it took `node` out of
# the chat backend for the `n`th time; fails after `limit` seconds.
marked_down() {
  local node=$1 n=$2 since=$3 limit=$4
  while [ "$(dc logs --no-color haproxy 2>/dev/null | grep -c "Server nodes/$node is DOWN")" -lt "$n" ]; do
    [ $(( ($(date +%s%N) - since) / 1000000000 )) -lt "$limit" ] \
      || fail "HAProxy did not take $node out within $limit s"
    sleep 0.1
  done
  echo $(( ($(date +%s%N) - since) / 1000000 ))
}
# Sends one line from `from` to `to` through HAProxy until it is echoed (a frame sent
# while a node or a NATS server is being replaced may be refused or cut off).
send() {
  local from=$1 to=$2 line=$3
  for _ in $(seq 1 30); do
    out=$(printf '%s\n' "$line" | $client --server "$addr" --id "$from" --to "$to" --timeout 5 2>/dev/null) \
      && [ "$out" = "[$from] text: $line" ] && return 0
    sleep 1
  done
  fail "'$line' from $from to $to was never accepted"
}
# Waits until the receiver's output holds `line`.
received() {
  for _ in $(seq 1 60); do
    grep -qxF "$1" "$work/receiver.out" && return 0
    sleep 1
  done
  fail "the receiver never got '$1' (it got: $(tr '\n' '|' <"$work/receiver.out"))"
}

# The receiver: a reconnecting chat-client through HAProxy, for the whole check.
$client --server "$addr" --id 201 --receive 1000 --timeout 120 </dev/null \
  >"$work/receiver.out" 2>"$work/receiver.err" &
receiver_pid=$!
for _ in $(seq 1 30); do node_of 201 >/dev/null && break; sleep 1; done
holder=$(node_of 201) || fail "the receiver never bound"
# A sender on another node: new ids until HAProxy puts one elsewhere.
sender=
for id in $(seq 301 310); do
  send "$id" 201 "hello from $id"
  if on=$(node_of "$id") && [ "$on" != "$holder" ]; then sender=$id; break; fi
done
[ -n "$sender" ] || fail "HAProxy never put a sender on another node than $holder"
received "[$sender] text: hello from $sender"
echo "cluster: $sender on $(node_of "$sender") reached 201 on $holder"

killed_at=$(date +%s%N)
docker kill "$(dc ps -q "$holder")" >/dev/null
took=$(marked_down "$holder" 1 "$killed_at" 8)
echo "cluster: HAProxy took the killed $holder out after $took ms"
for i in 1 2 3; do send "$sender" 201 "after $holder died $i"; done
for i in 1 2 3; do received "[$sender] text: after $holder died $i"; done
grep -q reconnected "$work/receiver.err" || fail "the receiver did not reconnect"
echo "cluster: $holder killed; the receiver reconnected to $(node_of 201 || echo '?') and got every accepted frame"
dc start "$holder" >/dev/null

docker kill "$(dc ps -q nats1)" >/dev/null
send "$sender" 201 "after nats1 died"
received "[$sender] text: after nats1 died"
echo "cluster: nats1 killed; frames are still accepted and delivered"
dc start nats1 >/dev/null

# A node that is up but not serving (its processes frozen: the port still accepts,
# nothing answers the health check's ping) leaves the rotation too, and clients are
# served by the others.
frozen=chat1
[ "$frozen" != "$holder" ] || frozen=chat2
downs=$(dc logs --no-color haproxy 2>/dev/null | grep -c "Server nodes/$frozen is DOWN" || true)
paused_at=$(date +%s%N)
docker pause "$(dc ps -q "$frozen")" >/dev/null
took=$(marked_down "$frozen" $((downs + 1)) "$paused_at" 15)
echo "cluster: HAProxy took the frozen $frozen out after $took ms"
for i in 1 2 3 4 5 6; do
  out=$(printf 'while %s is frozen\n' "$frozen" | $client --server "$addr" --id $((500 + i)) --timeout 5) \
    || fail "a client was not served while $frozen was frozen"
done
echo "cluster: six new clients served by the other nodes while $frozen is frozen"
docker unpause "$(dc ps -q "$frozen")" >/dev/null

kill "$receiver_pid" 2>/dev/null || true
receiver_pid=

# A rolling restart: each node in turn is restarted (`restart`: its stop signal is
# SIGUSR1, so it drains; then it starts again and HAProxy takes it back), while one
# client after another sends numbered lines through HAProxy to a reconnecting receiver.
# Every line accepted reaches the receiver, in order, and no line waits long.
$client --server "$addr" --id 601 --receive 100000 --timeout 300 </dev/null \
  >"$work/roll.out" 2>"$work/roll.err" &
receiver_pid=$!
for _ in $(seq 1 30); do node_of 601 >/dev/null && break; sleep 1; done
node_of 601 >/dev/null || fail "the rolling restart's receiver never bound"
: >"$work/roll.sent"
(
  i=0
  while [ ! -e "$work/roll.stop" ]; do
    i=$((i + 1))
    started=$(date +%s%N)
    for _ in $(seq 1 50); do
      out=$(printf 'roll %s\n' "$i" | $client --server "$addr" --id 602 --to 601 --timeout 5 2>/dev/null) \
        && [ "$out" = "[602] text: roll $i" ] && break
      out=
      sleep 0.1
    done
    [ -n "$out" ] || { echo "never accepted: roll $i" >>"$work/roll.sent"; exit 1; }
    echo "$i $(( ($(date +%s%N) - started) / 1000000 ))" >>"$work/roll.sent"
  done
) &
sender_pid=$!
# How often `node` logged `what`; HAProxy's last word on `node` (UP, DOWN or nothing).
logged() { dc logs --no-color "$1" 2>/dev/null | grep -c "$2" || true; }
state() {
  dc logs --no-color haproxy 2>/dev/null | grep -o "Server nodes/$1 is [A-Z]*" | tail -1 \
    | sed 's/.* is //'
}
for node in chat1 chat2 chat3; do
  drains=$(logged "$node" "drained: every connection has gone")
  starts=$(logged "$node" "listening on 0.0.0.0:8888")
  restarted_at=$(date +%s%N)
  dc restart -t 30 "$node" >/dev/null 2>&1 || fail "restart of $node failed"
  took=$(( ($(date +%s%N) - restarted_at) / 1000000 ))
  [ "$(logged "$node" "drained: every connection has gone")" -gt "$drains" ] \
    || fail "$node did not drain before it stopped"
  for _ in $(seq 1 60); do [ "$(logged "$node" "listening on 0.0.0.0:8888")" -gt "$starts" ] && break; sleep 1; done
  [ "$(logged "$node" "listening on 0.0.0.0:8888")" -gt "$starts" ] || fail "$node never listened again"
  # A drain this short may end before HAProxy's checks notice (two failures, 2 s and
  # 0.5 s apart): once the checks begun before the restart have had their say, the
  # node must be in the rotation, marked UP again if it had been marked DOWN.
  sleep 3
  for _ in $(seq 1 60); do [ "$(state "$node")" != DOWN ] && break; sleep 1; done
  [ "$(state "$node")" != DOWN ] || fail "HAProxy never took $node back"
  echo "cluster: $node drained and restarted in $took ms; HAProxy has it (last state: $(state "$node"))"
done
touch "$work/roll.stop"
wait "$sender_pid" || fail "a line was never accepted during the rolling restart: $(tail -1 "$work/roll.sent")"
sender_pid=
sent=$(wc -l <"$work/roll.sent")
[ "$sent" -ge 10 ] || fail "only $sent lines were sent during the rolling restart"
slowest=$(sort -n -k2 "$work/roll.sent" | tail -1 | cut -d' ' -f2)
for _ in $(seq 1 30); do
  [ "$(grep -c '^\[602\] text: roll ' "$work/roll.out")" -ge "$sent" ] && break
  sleep 1
done
# First arrivals in order 1..sent (a repeat after a move is allowed, a gap is not).
grep '^\[602\] text: roll ' "$work/roll.out" | sed 's/.*roll //' | awk -v n="$sent" '
  !seen[$1]++ { if ($1 != ++want) { print "got " $1 " where " want " was due"; bad = 1; exit 1 } }
  END { if (!bad && want != n) { print "got " want " of " n; exit 1 } }' >"$work/roll.check" \
  || fail "the rolling restart lost or reordered lines: $(cat "$work/roll.check")"
grep -q reconnected "$work/roll.err" || fail "the receiver was never moved by the rolling restart"
[ "$slowest" -lt 5000 ] || fail "a line waited $slowest ms during the rolling restart"
echo "cluster: rolling restart of three nodes: $sent lines, every one delivered in order; slowest send $slowest ms"
kill "$receiver_pid" 2>/dev/null || true
receiver_pid=

send "$sender" 401 "for 401, offline"
dc down >/dev/null 2>&1
dc up -d nats1 nats2 nats3 chat1 chat2 chat3 haproxy >/dev/null 2>&1
ready
out=$($client --server "$addr" --id 401 --receive 1 --timeout 30 </dev/null) || fail "no mailbox after down/up"
[ "$out" = "[$sender] text: for 401, offline" ] || fail "mailbox after down/up: $out"
echo "cluster: the mailbox survived down and up in the NATS volumes"
echo "cluster: all checks passed"
