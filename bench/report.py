#!/usr/bin/env python3
"""Prints the ratio table for bench/run.sh's results and draws bench/chart.svg."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["name"], r["server"]): r for r in rows}


def rate(name, server="chat-server"):
    return by[(name, server)]["msgs_per_sec"]


# (label, scenario, baseline server or chat-server scenario, target)
targets = [
    ("pipelined echo (50 conns, window 32, 64 B)", "pipelined", "ceiling", 0.6),
    ("pipelined echo (50 conns, window 32, 64 B)", "pipelined", "ceiling-tokio", 0.8),
    ("request/response (50 conns, window 1, 64 B)", "reqresp", "ceiling", 0.85),
    ("request/response (50 conns, window 1, 64 B)", "reqresp", "ceiling-tokio", 0.85),
    ("4 KiB bodies (50 conns, window 8)", "large", "ceiling", 0.6),
    ("4 KiB bodies (50 conns, window 8)", "large", "ceiling-tokio", 0.8),
    ("forwarding in pairs, every frame stored (50 conns, window 32, 64 B)", "pair", "nats", 1.0),
    ("forwarding in pairs, every frame stored (50 conns, window 1, 64 B)", "pair-w1", "nats", 1.0),
    ("forwarding in pairs, every frame stored (50 conns, window 32, 64 B)", "pair", "pipelined", 0.5),
    ("forwarding in pairs with acks (50 conns, window 32, 64 B)", "pair-acks", "pipelined", 0.4),
]
labels = {"ceiling": "async-std ceiling", "ceiling-tokio": "tokio ceiling", "nats": "nats-server pair"}
print("| scenario | chat-server msg/s | baseline msg/s | ratio | target | p99 (chat-server) |")
print("|---|---:|---:|---:|---:|---:|")
for label, name, base, target in targets:
    ours = rate(name)
    if base in labels:
        if (name, base) not in by:
            continue
        baseline, base_label = rate(name, base), labels[base]
    else:
        baseline, base_label = rate(base), "chat-server echo"
    ratio = ours / baseline
    p99 = by[(name, "chat-server")]["p99_us"]
    ok = "met" if ratio >= target else "MISSED"
    print(f"| {label} | {ours:,.0f} | {baseline:,.0f} ({base_label}) | {ratio:.2f} | ≥ {target} {ok} | {p99:,.0f} µs |")
disk = by.get(("fsync", "disk"))
if disk:
    print(f"\nDisk under the data dir: 4 KiB write + fdatasync p50 {disk['p50_us']:,.0f} µs, p99 {disk['p99_us']:,.0f} µs.")
if ("pair", "before") in by:
    print("\nBefore and after (BEFORE=...), each build's pair throughput over its own echo, "
          "this build measured both before and after the old one:")
    print("| build | pipelined echo msg/s | pair msg/s | pair / echo | pair p99 |")
    print("|---|---:|---:|---:|---:|")
    for label, echo, pair, server in (("before", "pipelined", "pair", "before"),
                                      ("this build", "pipelined", "pair", "chat-server"),
                                      ("this build, again", "pipelined-again", "pair-again", "chat-server")):
        e, p = rate(echo, server), rate(pair, server)
        print(f"| {label} | {e:,.0f} | {p:,.0f} | {p / e:.2f} | {by[(pair, server)]['p99_us']:,.0f} µs |")
ab = sorted({r["name"].rsplit("-", 1)[0][3:] for r in rows if r["name"].startswith("ab-")},
            key=lambda n: [r["name"] for r in rows].index(f"ab-{n}-1"))
if ab:
    print("\nAlternating rounds (this build and the old one, both started afresh for them, in turn first): medians over the rounds, "
          "with the lowest and highest round; 'noise' is this build's own spread, (max - min) / median.")
    print("| workload | this build msg/s | before msg/s | this / before | noise (this build) |")
    print("|---|---:|---:|---:|---:|")
    for name in ab:
        runs = [r for r in rows if r["name"].rsplit("-", 1)[0] == f"ab-{name}"]
        mine = sorted(r["msgs_per_sec"] for r in runs if r["server"] == "after")
        old = sorted(r["msgs_per_sec"] for r in runs if r["server"] == "before")
        med = lambda v: v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
        m, o = med(mine), med(old)
        print(f"| {name} | {m:,.0f} ({mine[0]:,.0f}-{mine[-1]:,.0f}) | {o:,.0f} ({old[0]:,.0f}-{old[-1]:,.0f}) "
              f"| {m / o:.2f} | {(mine[-1] - mine[0]) / m:.0%} |")
idle = by.get(("idle", "chat-server"))
if idle:
    print(f"\nIdle: {idle['conns']} bound idle connections add {idle['bytes_per_conn'] / 1024:.2f} KiB of server RSS each "
          f"({idle['rss_before_kib'] / 1024:.1f} MiB -> {idle['rss_kib'] / 1024:.1f} MiB).")


def series(prefix, xs, server):
    return [rate(f"{prefix}-{x}", server) for x in xs]


def frame(x0, w, h, pad, title, xlabel, top, tick):
    """A panel's opening: title, axes, x label and five y ticks labelled by `tick`."""
    out = [f'<g transform="translate({x0},0)">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="30" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle" font-size="12">{xlabel}</text>']
    for i in range(5):
        y = h - pad - (h - pad - 30) * i / 4
        out.append(f'<text x="{pad - 5}" y="{y + 4}" text-anchor="end" font-size="10">{tick(top * i / 4)}</text>')
    return out


def panel(x0, title, xlabel, xs, prefix):
    w, h, pad = 420, 300, 50
    ys = {s: series(prefix, xs, s) for s in ("chat-server", "ceiling", "ceiling-tokio")}
    top = max(max(v) for v in ys.values()) * 1.1
    out = frame(x0, w, h, pad, title, xlabel, top, lambda v: f"{v / 1000:.0f}k")
    step = (w - pad - 30) / (len(xs) - 1)
    for i, x in enumerate(xs):
        out.append(f'<text x="{pad + 10 + i * step}" y="{h - pad + 15}" text-anchor="middle" font-size="10">{x}</text>')
    for s, colour in (("chat-server", "#1f77b4"), ("ceiling", "#ff7f0e"), ("ceiling-tokio", "#2ca02c")):
        pts = " ".join(f"{pad + 10 + i * step},{h - pad - (h - pad - 30) * v / top}" for i, v in enumerate(ys[s]))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
    out.append("</g>")
    return "\n".join(out)


def pairs_panel(x0):
    """Pair forwarding through chat-server over the same through nats-server, by window."""
    w, h, pad = 300, 300, 50
    got = lambda name, server: by.get((name, server), {}).get("msgs_per_sec")
    bars = [(label, got(name, "chat-server"), got(name, "nats"))
            for label, name in (("window 1", "pair-w1"), ("window 32", "pair"))]
    ratios = [(label, chat / nats if chat and nats else None) for label, chat, nats in bars]
    top = max([1.2] + [r * 1.1 for _, r in ratios if r])
    y = lambda v: h - pad - (h - pad - 30) * v / top
    out = frame(x0, w, h, pad, "pairs: chat-server / nats-server", "64 B, 50 conns, every frame stored",
                top, lambda v: f"{v:.1f}")
    out += [f'<line x1="{pad}" y1="{y(1.0)}" x2="{w - 10}" y2="{y(1.0)}" stroke="#888" stroke-dasharray="4"/>',
            f'<text x="{w - 12}" y="{y(1.0) - 4}" text-anchor="end" font-size="10">target 1.0</text>']
    for i, (label, r) in enumerate(ratios):
        x = pad + 30 + i * 110
        out.append(f'<text x="{x + 30}" y="{h - pad + 15}" text-anchor="middle" font-size="10">{label}</text>')
        if r is None:
            out.append(f'<text x="{x + 30}" y="{h - pad - 10}" text-anchor="middle" font-size="10">no nats-server</text>')
            continue
        out.append(f'<rect x="{x}" y="{y(r)}" width="60" height="{h - pad - y(r)}" fill="#1f77b4"/>')
        out.append(f'<text x="{x + 30}" y="{y(r) - 4}" text-anchor="middle" font-size="11">{r:.2f}</text>')
    out.append("</g>")
    return "\n".join(out)


svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="1170" height="330" font-family="sans-serif">',
       '<rect width="100%" height="100%" fill="white"/>',
       panel(0, "messages/s against window (50 conns, 64 B)", "frames in flight per connection", [1, 4, 16, 64], "window"),
       panel(430, "messages/s against connections (window 32, 64 B)", "connections", [1, 10, 50, 200], "conns"),
       '<rect x="700" y="40" width="12" height="12" fill="#1f77b4"/><text x="716" y="50" font-size="11">chat-server</text>',
       '<rect x="700" y="58" width="12" height="12" fill="#ff7f0e"/><text x="716" y="68" font-size="11">async-std ceiling</text>',
       '<rect x="700" y="76" width="12" height="12" fill="#2ca02c"/><text x="716" y="86" font-size="11">tokio ceiling</text>',
       pairs_panel(860),
       "</svg>"]
open("bench/chart.svg", "w").write("\n".join(svg) + "\n")
print("\nchart: bench/chart.svg")
