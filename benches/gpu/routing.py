#!/usr/bin/env python3
"""The NF4 routes the device bench's timings call for ($OUT/gpu_kernels.json, or the file named as the first
argument): for each measured row count up to 32, every route `src/gpu/launch.rs` can express (the GEMV, or
16/32-row tensor-core tiles with K split until the launch has at least B blocks, as `splits_for` does) is
costed on the linears of one Llama-2-7B layer (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096; down:
4096 x 11008; double-quantized), from the measured time of the launch it picks on each shape, against what
main's launcher picked (the rows not marked as candidates). Prints, per row count, main's time, the cheapest
route with the launch it takes on each shape, and the time a 32-layer step would save; informational (exit 0
unless the input is unreadable). A route whose launch was not measured on some shape is left out."""

import json
import os
import sys

SPLITS = [1, 2, 4, 8]
MMA_BN, MMA_BK = 32, 128
LAYER = [((4096, 4096), 4), ((11008, 4096), 2), ((4096, 11008), 1)]
BLOCKS = [0, 132, 264, 528, 1056, 2112]

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "gpu_kernels.json")
try:
    rows = json.load(open(path))["nf4_matmul"] or []
except (OSError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"routing: {path}: {e}")

# (m, n, k) -> {launch: µs}, launch = ("gemv", 1) or (bm, splits); main's pick per (m, n, k) apart.
# Double-quantized shapes whose checks passed.
times, picks = {}, {}
for r in rows:
    try:
        if not r.get("double_quant") or not r.get("ok") or r["m"] > 32:
            continue
        kernel, key, us = r["kernel"], (r["m"], r["n"], r["k"]), float(r["us_per_call"])
    except (KeyError, TypeError, ValueError, AttributeError):
        continue  # a row this script does not understand
    if kernel.startswith("nf4_gemv"):
        launch = ("gemv", 1)
    elif kernel.startswith("nf4_matmul_mma"):
        launch = (int(kernel.removeprefix("nf4_matmul_mma")), int(r.get("splits", 1)))
    else:
        continue
    times.setdefault(key, {})[launch] = us
    if not r.get("candidate"):
        picks[key] = us


def splits_for(tiles, steps, blocks):
    allowed = [s for s in SPLITS if s <= steps]
    return next((s for s in allowed if tiles * s >= blocks), max(allowed, default=1))


def launches(m, route):
    """The launch the route takes on each of the layer's shapes."""
    out = []
    for (n, k), _ in LAYER:
        if route[0] == "gemv":
            out.append(("gemv", 1))
        else:
            bm, blocks = route
            tiles = -(-n // MMA_BN) * -(-m // bm)
            out.append((bm, splits_for(tiles, -(-k // MMA_BK), blocks)))
    return out


def layer_us(m, route):
    """The route's time on one layer's linears at m rows, or None if a launch it takes was not measured."""
    total = 0.0
    for ((n, k), count), launch in zip(LAYER, launches(m, route)):
        t = times.get((m, n, k), {}).get(launch)
        if t is None:
            return None
        total += count * t
    return total


def main_us(m):
    total = 0.0
    for (n, k), count in LAYER:
        if (m, n, k) not in picks:
            return None
        total += count * picks[(m, n, k)]
    return total


def name(m, route):
    if route[0] == "gemv":
        return "GEMV"
    ks = ", ".join(f"K/{s}" if s > 1 else "K whole" for _, s in launches(m, route))
    return f"{route[0]}-row tiles ({ks}" + (f"; ≥ {route[1]} blocks)" if route[1] else ")")


routes = [("gemv", 0)] + [(bm, b) for bm in (16, 32) for b in BLOCKS]
print("| rows | main's pick, µs a layer | cheapest route (split on q/k/v/o, gate/up, down) | µs a layer | saved a 32-layer step, ms |")
print("|---|---|---|---|---|")
for m in sorted({m for (m, _, _) in times}):
    costed = [(layer_us(m, r), r) for r in routes]
    costed = [(t, r) for t, r in costed if t is not None]
    if not costed:
        continue
    best_t, best = min(costed, key=lambda c: c[0])
    main_t = main_us(m)
    shown = f"{main_t:.1f}" if main_t is not None else "not measured"
    saved = f"{32 * (main_t - best_t) / 1e3:.2f}" if main_t is not None else "-"
    print(f"| {m} | {shown} | {name(m, best)} | {best_t:.1f} | {saved} |")
