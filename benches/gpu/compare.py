#!/usr/bin/env python3
"""Reads what one device call wrote under $OUT (gpu_kernels.json, gpu_serve.json, peer.json) and prints issue
8's figures side by side: loraserve against the transformers+peft peer per cell, and each "Done when" bar and
long-term aim with the measured value. Writes $OUT/summary.json. Exit status 1 when a "Done when" bar fails
or a file is missing."""

import json
import os
import sys

GIB = 2**30


def load(out, name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"compare: {path}: {e}")
        return None


def main():
    out = os.environ.get("OUT", ".")
    kernels, serve, peer = (load(out, n) for n in ("gpu_kernels.json", "gpu_serve.json", "peer.json"))
    if not (serve and peer):
        return 1
    decode = serve["decode"]
    # Cells by (streams, "one" adapter for all streams or "mixed": stream i on adapter i % 32).
    ours = {(c["streams"], c["mix"]): c for c in decode["cells"]}
    theirs = {(c["streams"], c["mix"]): c for c in peer["cells"]}

    print("| streams | adapters (distinct) | decode tok/s: loraserve | peer | × peer | end-to-end tok/s: loraserve |"
          " peer | × peer | step ms: loraserve | peer | TTFT ms: loraserve | peer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(ours, key=lambda k: (k[0], k[1] != "one")):
        o, p = ours[key], theirs.get(key)
        label = f"{key[1]} ({o['adapters']})"
        if p is None:
            print(f"| {key[0]} | {label} | {o['decode_tokens_per_s']:.0f} | – | – | {o['tokens_per_s']:.0f} | – | – | "
                  f"{o['step_ms_p50']:.2f} | – | {o['ttft_ms_p50']:.0f} | – |")
            continue
        print(f"| {key[0]} | {label} | {o['decode_tokens_per_s']:.0f} | {p['decode_tokens_per_s']:.1f} | "
              f"{o['decode_tokens_per_s'] / p['decode_tokens_per_s']:.1f}× | {o['tokens_per_s']:.0f} | "
              f"{p['tokens_per_s']:.1f} | {o['tokens_per_s'] / p['tokens_per_s']:.1f}× | {o['step_ms_p50']:.2f} | "
              f"{p['step_ms']:.2f} | {o['ttft_ms_p50']:.0f} | {p['ttft_ms']:.0f} |")

    checks = []

    def check(name, value, bar, ok, done_when=True):
        checks.append(dict(name=name, value=value, bar=bar, ok=ok, done_when=done_when))

    top, top_one = ours.get((32, "mixed")), ours.get((32, "one"))
    peer_top = theirs.get((32, "mixed"))
    if top and peer_top:
        r = top["decode_tokens_per_s"] / peer_top["decode_tokens_per_s"]
        check("decode tok/s, 32 streams × 32 adapters, × peer", f"{r:.1f}×", "≥ 20×", r >= 20)
        r = top["tokens_per_s"] / peer_top["tokens_per_s"]
        check("end-to-end tok/s (prefill included), same cell, × peer", f"{r:.1f}×", "(reported)", True,
              done_when=False)
    if top and top_one:
        overhead = 1 - top["decode_tokens_per_s"] / top_one["decode_tokens_per_s"]
        check("mixed-adapter decode overhead at 32 streams", f"{100 * overhead:.1f}%", "≤ 15%", overhead <= 0.15)
    errors = sum(len(c["errors"]) for c in decode["cells"])
    check("decode errors", errors, "0", errors == 0)
    resident = max(decode["resident_bytes"], decode["device_free_drop_bytes"])
    check("base resident (max of model count, device free-memory drop)", f"{resident / GIB:.2f} GiB", "≤ 4.2 GiB",
          resident <= 4.2 * GIB)
    fixtures = serve["fixtures"]
    bad = [f"{f['fixture']}/{f['quant']}" for f in fixtures if not f["ok"]]
    check("fixtures: GPU greedy = CPU greedy", f"{len(fixtures) - len(bad)}/{len(fixtures)} configs",
          "all", bool(fixtures) and not bad)
    if not kernels:
        check("kernel checks", "gpu_kernels.json missing", "0 failed", False)
    else:
        check("kernel checks", f"{kernels.get('failed', '?')} failed", "0", kernels.get("failed") == 0)
        bw = kernels.get("copy_gb_per_s")
        one = ours.get((1, "one"))
        if bw and one:
            floor_ms = decode["step_floor_bytes"] / (bw * 1e9) * 1e3
            ratio = one["step_ms_p50"] / floor_ms
            check("step time / memory floor (1 stream)", f"{one['step_ms_p50']:.2f} / {floor_ms:.2f} ms = {ratio:.2f}×",
                  "≤ 1.5× (aim)", ratio <= 1.5, done_when=False)
    if top:
        check("decode tok/s at 32 streams × 32 adapters", f"{top['decode_tokens_per_s']:.0f}", "≥ 10,000 (aim)",
              top["decode_tokens_per_s"] >= 10_000, done_when=False)
    cold = decode.get("cold_load_ms") or []
    if cold:
        med = sorted(cold)[len(cold) // 2]
        check("cold adapter load (median)", f"{med:.1f} ms", "≤ 15 ms (aim)", med <= 15, done_when=False)

    print("\n| check | measured | bar | |")
    print("|---|---|---|---|")
    for c in checks:
        status = "ok" if c["ok"] else ("FAIL" if c["done_when"] else "not yet")
        print(f"| {c['name']} | {c['value']} | {c['bar']} | {status} |")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(dict(checks=checks), f, indent=1)
    return 0 if all(c["ok"] for c in checks if c["done_when"]) else 1


if __name__ == "__main__":
    sys.exit(main())
