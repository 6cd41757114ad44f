#!/usr/bin/env bash
# Proves the container path end to end: build the image from docker/Dockerfile with
# compose, start it, talk to it from the host and from the compose network, restart it
# and find a mailbox frame still in the volume, then stop it and check it stopped
# gracefully. Without a reachable Docker engine it skips, unless CHAT_REQUIRE_DOCKER=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  if [ "${CHAT_REQUIRE_DOCKER:-0}" = 1 ]; then
    echo "docker: no Docker engine reachable, and CHAT_REQUIRE_DOCKER=1" >&2
    exit 1
  fi
  echo "docker: no Docker engine reachable; skipping the container checks"
  exit 0
fi

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi
port=${CHAT_CI_PORT:-18888}
project=chatci$$
dc() { CHAT_PORT=$port "${compose[@]}" -p "$project" -f docker/compose.yml "$@"; }
cleanup() { dc --profile client down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Base images without a registry (see docker/local-bases.sh), and crates vendored into
# the build context so the build needs no network.
export RUST_IMAGE=${RUST_IMAGE:-chat-local/rust:1.95}
export RUNTIME_IMAGE=${RUNTIME_IMAGE:-chat-local/debian:bookworm-slim}
RUST_TAG=$RUST_IMAGE RUNTIME_TAG=$RUNTIME_IMAGE bash docker/local-bases.sh
[ -d vendor ] || cargo vendor --locked -q vendor >/dev/null

cargo build --release --locked -q --bin chat-client
client=target/release/chat-client

echo "docker: building and starting with ${compose[*]}"
dc build -q server
dc up -d server

wait_healthy() {
  local id status
  id=$(dc ps -q server)
  for _ in $(seq 1 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
    [ "$status" = healthy ] && return 0
    sleep 1
  done
  echo "docker: server never became healthy (last: $status)" >&2
  dc logs server >&2
  return 1
}
wait_healthy
echo "docker: healthy"

out=$(printf 'hello from the host\n' | $client --server 127.0.0.1:$port --id 1)
[ "$out" = "[1] text: hello from the host" ] || { echo "docker: host echo wrong: $out" >&2; exit 1; }
echo "docker: host client got its echo"

out=$(printf 'for 3, who is offline\n' | dc run --rm -T client --id 2 --to 3)
echo "$out" | grep -qx '\[2\] text: for 3, who is offline' \
  || { echo "docker: client service echo wrong: $out" >&2; exit 1; }
echo "docker: client service on the compose network got its echo"

dc restart server >/dev/null
wait_healthy
out=$($client --server 127.0.0.1:$port --id 3 --receive 1 </dev/null)
[ "$out" = "[2] text: for 3, who is offline" ] || { echo "docker: mailbox lost: $out" >&2; exit 1; }
echo "docker: the mailbox frame survived a restart in the volume"

id=$(dc ps -q server)
start=$(date +%s%N)
dc stop server >/dev/null
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
code=$(docker inspect -f '{{.State.ExitCode}}' "$id")
echo "docker: stopped in ${took_ms} ms with exit code $code"
[ "$code" = 0 ] || { dc logs server >&2; exit 1; }
[ "$took_ms" -lt 8000 ] || { echo "docker: stop took too long" >&2; exit 1; }
echo "docker: all container checks passed"
