#!/usr/bin/env python3
"""Sync latency of the disk under a directory: 4 KiB write + fdatasync, 200 times.

Prints one JSON line (p50 and p99 in microseconds): the floor under every commit
the store makes, and so under an echo that has to wait for the disk.
"""
import json
import os
import sys
import tempfile
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "."
samples = []
with tempfile.NamedTemporaryFile(dir=directory) as f:
    block = os.urandom(4096)
    for _ in range(200):
        start = time.perf_counter()
        f.write(block)
        f.flush()
        os.fdatasync(f.fileno())
        samples.append((time.perf_counter() - start) * 1e6)
samples.sort()
print(json.dumps({"name": "fsync", "server": "disk", "dir": directory,
                  "p50_us": round(samples[len(samples) // 2], 1),
                  "p99_us": round(samples[int(len(samples) * 0.99)], 1)}))
