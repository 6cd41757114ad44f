#!/usr/bin/env bash
# Proves the container path end to end: build the image from docker/Dockerfile with
# compose, start it, talk to it from the host and from the compose network, restart it
# and find a mailbox frame still in the volume, then stop it and check it stopped
# gracefully. Without a reachable Docker engine it skips, unless CHAT_REQUIRE_DOCKER is
# set (to anything).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  if [ -n "${CHAT_REQUIRE_DOCKER+set}" ]; then
    echo "docker: no Docker engine reachable, and CHAT_REQUIRE_DOCKER is set" >&2
    exit 1
  fi
  echo "SKIP: docker: no Docker engine reachable (install Docker and start its daemon); skipping the container checks"
  exit 0
fi

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi
port=${CHAT_CI_PORT:-18888}
metrics=${CHAT_CI_METRICS_PORT:-19100}
web=${CHAT_CI_WEB_PORT:-18080}
project=chatci$$
dc() { CHAT_PORT=$port CHAT_METRICS_PORT=$metrics CHAT_WEB_PORT=$web "${compose[@]}" -p "$project" -f docker/compose.yml "$@"; }
cleanup() { dc --profile client down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Base images without a registry (see docker/local-bases.sh), and crates vendored into
# the build context so the build needs no network.
export RUST_IMAGE=${RUST_IMAGE:-chat-local/rust:1.95}
export RUNTIME_IMAGE=${RUNTIME_IMAGE:-chat-local/debian:bookworm-slim}
RUST_TAG=$RUST_IMAGE RUNTIME_TAG=$RUNTIME_IMAGE bash docker/local-bases.sh
cargo vendor --locked -q vendor >/dev/null

cargo build --release --locked -q --bin chat-client --bin chat-server
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

# The server process runs as the image's own user, not root (its uid, read from the
# host's /proc).
pid=$(docker inspect -f '{{.State.Pid}}' "$(dc ps -q server)")
uid=$(stat -c %u "/proc/$pid")
[ "$uid" != 0 ] || { echo "docker: the server runs as root" >&2; exit 1; }
echo "docker: the server runs as uid $uid, not root"

ready=$(curl -fsS "http://127.0.0.1:$metrics/readyz") || { echo "docker: /readyz failed" >&2; exit 1; }
[ "$ready" = ready ] || { echo "docker: /readyz said $ready" >&2; exit 1; }
echo "docker: /readyz on the host's loopback says ready"

out=$(printf 'hello from the host\n' | $client --server 127.0.0.1:$port --id 1)
[ "$out" = "[1] text: hello from the host" ] || { echo "docker: host echo wrong: $out" >&2; exit 1; }
echo "docker: host client got its echo"
curl -fsS "http://127.0.0.1:$metrics/metrics" | grep '^chat_frames_in_total{type="text"} [1-9]' >/dev/null \
  || { echo "docker: /metrics does not show the frame" >&2; exit 1; }
echo "docker: /metrics counted it"

curl -fsS "http://127.0.0.1:$web/" | grep '<script src="app.js"' >/dev/null \
  || { echo "docker: the web client is not served on port $web" >&2; exit 1; }
upgrade=$(curl -si --max-time 2 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
  -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
  "http://127.0.0.1:$web/ws" | head -1 || true)
echo "$upgrade" | grep -q '^HTTP/1.1 101' \
  || { echo "docker: /ws did not upgrade: $upgrade" >&2; exit 1; }
echo "docker: the web client and its WebSocket answer on the published port"

out=$(printf 'for 3, who is offline\n' | dc run --rm -T client --id 2 --to 3)
echo "$out" | grep -qx '\[2\] text: for 3, who is offline' \
  || { echo "docker: client service echo wrong: $out" >&2; exit 1; }
echo "docker: client service on the compose network got its echo"

# down removes the container (not the volume): the frame can only be in the volume.
dc down >/dev/null 2>&1
dc up -d server
wait_healthy
out=$($client --server 127.0.0.1:$port --id 3 --receive 1 </dev/null)
[ "$out" = "[2] text: for 3, who is offline" ] || { echo "docker: mailbox lost: $out" >&2; exit 1; }
echo "docker: the mailbox frame survived a new container in the volume"

id=$(dc ps -q server)
start=$(date +%s%N)
dc stop server >/dev/null
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
code=$(docker inspect -f '{{.State.ExitCode}}' "$id")
echo "docker: stopped in ${took_ms} ms with exit code $code"
[ "$code" = 0 ] || { dc logs server >&2; exit 1; }
[ "$took_ms" -lt 8000 ] || { echo "docker: stop took too long" >&2; exit 1; }
dc down -v >/dev/null 2>&1

# Auth and TLS from mounted files and env vars (docker/compose.secure.yml).
command -v openssl >/dev/null || apt-get install -y -qq openssl >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
secrets=$(mktemp -d)
chmod 755 "$secrets"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,DNS:server,IP:127.0.0.1 \
  -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
  -keyout "$secrets/key.pem" -out "$secrets/cert.pem" >/dev/null 2>&1
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secrets/auth-secret"
chmod 644 "$secrets"/*
sdc() { CHAT_SECRETS_DIR=$secrets dc -f docker/compose.secure.yml "$@"; }
sdc up -d server
wait_healthy
token=$(target/release/chat-server --auth-secret-file "$secrets/auth-secret" token --id 5)
out=$(printf 'secure hello\n' | $client --server 127.0.0.1:$port --tls --ca "$secrets/cert.pem" --tls-name localhost --id 5 --token "$token")
[ "$out" = "[5] text: secure hello" ] || { echo "docker: TLS+auth echo wrong: $out" >&2; exit 1; }
if err=$(printf 'no token\n' | $client --server 127.0.0.1:$port --tls --ca "$secrets/cert.pem" --tls-name localhost --id 6 2>&1 >/dev/null); then
  echo "docker: a client without a token was admitted" >&2; exit 1
fi
case "$err" in
  *auth-failed*) ;;
  *) echo "docker: a client without a token failed, but not with auth-failed: $err" >&2; exit 1 ;;
esac
out=$(printf 'inside, secure\n' | CHAT_TOKEN=$(target/release/chat-server --auth-secret-file "$secrets/auth-secret" token --id 7) \
  sdc run --rm -T client --id 7 --tls-name server)
echo "$out" | grep -qx '\[7\] text: inside, secure' || { echo "docker: secure client service wrong: $out" >&2; exit 1; }
echo "docker: TLS and auth from mounted files work, from the host and the compose network"
sdc down -v >/dev/null 2>&1
rm -rf "$secrets"
echo "docker: all container checks passed"
