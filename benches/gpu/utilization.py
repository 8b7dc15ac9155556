#!/usr/bin/env python3
"""The GPU's utilization during each decode cell of benches/gpu_serve.rs: the nvidia-smi samples run.sh took
($OUT/util.csv: timestamp, utilization.gpu %) between the cell's wall-clock bounds ($OUT/gpu_serve.json),
the first 0.2 s left out. A cell far below 100 % spent its step waiting for the host to launch work. Prints
a table; informational (exit 0 unless the inputs are missing)."""

import json
import os
import sys
import time

out = os.environ.get("OUT", ".")
try:
    cells = json.load(open(os.path.join(out, "gpu_serve.json")))["decode"]["cells"]
    lines = open(os.path.join(out, "util.csv")).read().splitlines()
except (OSError, KeyError, ValueError) as e:
    sys.exit(f"utilization: {e}")

samples = []
for line in lines:
    try:
        stamp, pct = (f.strip() for f in line.split(","))
        whole, _, frac = stamp.partition(".")
        t = time.mktime(time.strptime(whole, "%Y/%m/%d %H:%M:%S")) + float("0." + (frac or "0"))
        samples.append((t, float(pct)))
    except ValueError:
        continue  # a line that is not a sample (an error message, a cut-off last line)

print("| streams | adapters | step ms | GPU utilization % (mean of samples) | samples |")
print("|---|---|---|---|---|")
for c in cells:
    inside = [p for t, p in samples if c["started_unix"] + 0.2 <= t <= c["ended_unix"]]
    mean = sum(inside) / len(inside) if inside else float("nan")
    print(f"| {c['streams']} | {c['adapters']} | {c['step_ms_p50']:.2f} | {mean:.0f} | {len(inside)} |")
