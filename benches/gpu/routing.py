#!/usr/bin/env python3
"""The NF4 routes the device bench's timings call for ($OUT/gpu_kernels.json, or the file named as the first
argument): for each measured row count up to 32, every route `src/gpu/launch.rs` can express (the GEMV, or
16/32-row tensor-core tiles with K split until the launch has at least B blocks, as `splits_for` does) is
costed on the linears of one Llama-2-7B layer (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096; down:
4096 x 11008; double-quantized), from the measured time of the launch it picks on each shape, against what
main's launcher picked (the rows not marked as candidates). Prints, per row count, main's time, the cheapest
route with the launch it takes on each shape, and the time a 32-layer step would save; informational (exit 0
unless the input is unreadable). A route whose launch was not measured on some shape is left out.

The cheapest routes make a routing table in `src/gpu/routes.rs`'s text form (each measured row count its
cheapest route, every row count not measured main's route; where several splits cost the same on the layer's
shapes, the fewest blocks): when it differs from main's table, it is written to
$OUT/nf4_routes.txt, and `run.sh` runs the end-to-end benchmark a second time with it as LORASERVE_NF4_ROUTES."""

import json
import os
import sys

SPLITS = [1, 2, 4, 8]
MMA_BN, MMA_BK = 32, 128
LAYER = [((4096, 4096), 4), ((11008, 4096), 2), ((4096, 11008), 1)]
GEMV_MAX_ROWS = 8  # routes.rs: the largest GEMV kernel's rows (earlier runs timed GEMV row groups past it)

out_dir = os.environ.get("OUT", ".")
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(out_dir, "gpu_kernels.json")
try:
    report = json.load(open(path))
    rows = report["nf4_matmul"] or []
    if not isinstance(rows, list):
        raise ValueError("nf4_matmul is not a list")
except (OSError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"routing: {path}: {e}")
# The table the launcher's picks followed (routes.rs's text form), e.g. "8:gemv,16:mma16,*:mma32".
main_table = report.get("nf4_routes") or "8:gemv,16:mma16,*:mma32"

# (m, n, k) -> {launch: µs}, launch = ("gemv", 1) or (bm, splits); main's pick per (m, n, k) apart.
# Double-quantized shapes whose checks passed.
times, picks = {}, {}
for r in rows:
    try:
        key = (r["m"], r["n"], r["k"])
        if not all(type(x) is int and x > 0 for x in key):
            continue
        if not r.get("double_quant") or not r.get("ok") or r["m"] > 32:
            continue
        kernel, us = r["kernel"], float(r["us_per_call"])
        if not us > 0:  # NaN, or no time at all
            continue
        if kernel.startswith("nf4_gemv"):
            launch = ("gemv", 1)
        elif kernel.startswith("nf4_matmul_mma"):
            launch = (int(kernel.removeprefix("nf4_matmul_mma")), int(r.get("splits", 1)))
        else:
            continue
    except (KeyError, TypeError, ValueError, AttributeError):
        continue  # a row this script does not understand
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


def routes_for(m):
    """Every route with a distinct launch on some shape of the layer at m rows: the GEMV (up to its rows), and
    per tile height the block counts at which some shape's split changes (its tiles times a split), and 0."""
    out = [("gemv", 0)] if m <= GEMV_MAX_ROWS else []
    for bm in (16, 32):
        thresholds = {-(-n // MMA_BN) * -(-m // bm) * s for (n, _), _ in LAYER for s in SPLITS}
        out += [(bm, b) for b in sorted({0} | thresholds)]
    return out


print("| rows | main's pick, µs a layer | cheapest route (split on q/k/v/o, gate/up, down) | µs a layer | saved a 32-layer step, ms |")
print("|---|---|---|---|---|")
cheapest = []  # (rows, route) for each measured row count
for m in sorted({m for (m, _, _) in times}):
    costed = [(layer_us(m, r), r) for r in routes_for(m)]
    costed = [(t, r) for t, r in costed if t is not None]
    if not costed:
        continue
    best_t, best = min(costed, key=lambda c: c[0])
    cheapest.append((m, best))
    main_t = main_us(m)
    shown = f"{main_t:.1f}" if main_t is not None else "not measured"
    saved = f"{32 * (main_t - best_t) / 1e3:.2f}" if main_t is not None else "-"
    print(f"| {m} | {shown} | {name(m, best)} | {best_t:.1f} | {saved} |")


def text(route):
    """A route in routes.rs's text form."""
    if route[0] == "gemv":
        return "gemv"
    return f"mma{route[0]}" + (f"/{route[1]}" if route[1] else "")


def table(entries):
    """Entries (bound, route text) as a table, an entry dropped where the next one has the same route."""
    kept = [(b, r) for i, (b, r) in enumerate(entries) if i + 1 == len(entries) or entries[i + 1][1] != r]
    return ",".join(f"{b}:{r}" for b, r in kept)


def parse(table_text):
    """routes.rs's text form as [(bound, route text)], bound None for "*"."""
    out = []
    for e in table_text.split(","):
        b, r = (x.strip() for x in e.split(":", 1))
        out.append((None if b == "*" else int(b), r))
    return out


def route_of(entries, m):
    return next(r for b, r in entries if b is None or m <= b)


try:
    main_entries = parse(main_table)
    if main_entries[-1][0] is not None:
        raise ValueError("its last bound is not *")
except (AttributeError, TypeError, ValueError) as e:
    sys.exit(f"routing: main's table {main_table!r} in {path}: {e}")
# Row by row up to the largest measured count: its cheapest route where measured, main's elsewhere (row counts
# between two measured ones were not timed); past it, main's entries as they are.
best = {m: text(r) for m, r in cheapest}
top = max(best, default=0)
entries = [(str(m), best.get(m) or route_of(main_entries, m)) for m in range(1, top + 1)]
entries += [("*" if b is None else str(b), r) for b, r in main_entries if b is None or b > top]
tuned = table(entries)
main_entries = [(str(m), route_of(main_entries, m)) for m in range(1, top + 1)] + [
    ("*" if b is None else str(b), r) for b, r in main_entries if b is None or b > top]
print()
if tuned == table(main_entries):
    print(f"The cheapest routes make main's own table: {main_table}")
else:
    print(f"The cheapest routes make the table {tuned} (main's: {main_table});")
    print("the end-to-end benchmark runs again under it (LORASERVE_NF4_ROUTES), after the rest.")
    tmp = os.path.join(out_dir, "nf4_routes.txt.tmp")
    with open(tmp, "w") as f:
        f.write(tuned + "\n")
    os.replace(tmp, os.path.join(out_dir, "nf4_routes.txt"))
