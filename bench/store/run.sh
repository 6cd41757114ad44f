#!/usr/bin/env bash
# Runs every workload RUNS times, alternating engines (redb, fjall, redb, fjall).
# Usage: bench/store/run.sh [DATA_PARENT]   (default /tmp; must be a real disk, not tmpfs)
set -euo pipefail
cd "$(dirname "$0")"
parent=${1:-/tmp}
runs=${RUNS:-2}
first=${FIRST:-1}
bin=target/release/store-bench
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
df -T "$parent" | tail -1 | awk '{ if ($2 == "tmpfs") { print "refusing: " $7 " is tmpfs (fsync is free)"; exit 1 } }'
mkdir -p results
for run in $(seq "$first" $((first + runs - 1))); do
  for engine in redb fjall; do
    out=results/run$run-$engine.txt
    : > "$out"
    echo "== run $run $engine -> $out"
    bench() { "$bin" --engine "$engine" --dir "$parent/storebench-$engine-$$" "$@" | tee -a "$out"; }
    for g in 1 32 256; do bench --workload append --group "$g" --body 64; done
    bench --workload append --group 256 --body 4096
    bench --workload page
    bench --workload resume
    [ "$engine" = redb ] && bench --workload prune          # redb Table::retain_in
    bench --workload prune --prune-by-key
    bench --workload mixed --group 32
  done
done
