#!/usr/bin/env bash
# Builds the two base images the Dockerfile needs, without a registry:
#   chat-local/debian:bookworm-slim  a minimal Debian root made with debootstrap
#   chat-local/rust:1.95             the same root plus gcc and this machine's Rust toolchain
# Pass them as build args: RUNTIME_IMAGE=chat-local/debian:bookworm-slim
# RUST_IMAGE=chat-local/rust:1.95. Where a registry is reachable, the Dockerfile's
# defaults (official rust and debian images) are used instead and this is not needed.
set -euo pipefail

RUNTIME_TAG=${RUNTIME_TAG:-chat-local/debian:bookworm-slim}
RUST_TAG=${RUST_TAG:-chat-local/rust:1.95}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
work=${BASES_WORKDIR:-/var/tmp/chat-bases}

have() { docker image inspect "$1" >/dev/null 2>&1; }

need_root_tools() {
  if ! command -v debootstrap >/dev/null; then
    echo "installing debootstrap"
    apt-get install -y -qq debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  fi
}

if ! have "$RUNTIME_TAG"; then
  need_root_tools
  rm -rf "$work/runtime"; mkdir -p "$work/runtime"
  echo "debootstrap $SUITE (minbase) for $RUNTIME_TAG"
  debootstrap --variant=minbase "$SUITE" "$work/runtime" "$MIRROR" >"$work/runtime.log" 2>&1 \
    || { tail -20 "$work/runtime.log"; exit 1; }
  chroot "$work/runtime" apt-get clean
  rm -rf "$work/runtime"/var/lib/apt/lists/* "$work/runtime"/usr/share/doc/* "$work/runtime"/usr/share/man/*
  tar -C "$work/runtime" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$RUNTIME_TAG" >/dev/null
  echo "built $RUNTIME_TAG"
fi

if ! have "$RUST_TAG"; then
  need_root_tools
  rm -rf "$work/rust"; mkdir -p "$work/rust"
  echo "debootstrap $SUITE with gcc for $RUST_TAG"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates "$SUITE" "$work/rust" "$MIRROR" \
    >"$work/rust.log" 2>&1 || { tail -20 "$work/rust.log"; exit 1; }
  chroot "$work/rust" apt-get clean
  rm -rf "$work/rust"/var/lib/apt/lists/* "$work/rust"/usr/share/doc/* "$work/rust"/usr/share/man/*
  # The machine's toolchain, laid out like the official image's (CARGO_HOME=/usr/local/cargo).
  toolchain=$(rustc --print sysroot)
  mkdir -p "$work/rust/usr/local/cargo/bin" "$work/rust/usr/local/rust"
  cp -a "$toolchain/bin" "$toolchain/lib" "$work/rust/usr/local/rust/"
  rm -rf "$work/rust/usr/local/rust/lib/rustlib/src"
  for tool in cargo rustc rustdoc; do
    ln -sf "/usr/local/rust/bin/$tool" "$work/rust/usr/local/cargo/bin/$tool"
  done
  tar -C "$work/rust" -c . | docker import \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$RUST_TAG" >/dev/null
  echo "built $RUST_TAG"
fi

# The cluster's other two images (docker/compose.cluster.yml), from Debian's packages on
# the same minimal root, laid out like the official images: the NATS server and HAProxy.
NATS_TAG=${NATS_TAG:-chat-local/nats:2.9}
HAPROXY_TAG=${HAPROXY_TAG:-chat-local/haproxy:2.6}
package_image() { # tag package entrypoint...
  local tag=$1 package=$2
  shift 2
  have "$tag" && return 0
  need_root_tools
  rm -rf "$work/$package"; mkdir -p "$work/$package"
  echo "debootstrap $SUITE with $package for $tag"
  debootstrap --variant=minbase --include="$package" "$SUITE" "$work/$package" "$MIRROR" \
    >"$work/$package.log" 2>&1 || { tail -20 "$work/$package.log"; exit 1; }
  chroot "$work/$package" apt-get clean
  rm -rf "$work/$package"/var/lib/apt/lists/* "$work/$package"/usr/share/doc/* "$work/$package"/usr/share/man/*
  local entry
  entry=$(printf '"%s",' "$@")
  tar -C "$work/$package" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENTRYPOINT [${entry%,}]" - "$tag" >/dev/null
  echo "built $tag"
}
if [ "${CLUSTER_BASES:-0}" = 1 ]; then
  package_image "$NATS_TAG" nats-server nats-server
  package_image "$HAPROXY_TAG" haproxy haproxy -W -db -f /usr/local/etc/haproxy/haproxy.cfg
fi
