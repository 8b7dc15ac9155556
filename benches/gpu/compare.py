#!/usr/bin/env python3
"""Reads what one device call wrote under $OUT (gpu_kernels.json, gpu_serve.json, peer.json) and prints issue
8's figures side by side: loraserve against the transformers+peft peer per cell, and each "Done when" bar and
long-term aim with the measured value. Writes $OUT/summary.json. Exit status 1 when a "Done when" bar fails
or a file is missing. SERVE_JSON and SUMMARY_JSON name other files under $OUT for the end-to-end figures and
the summary (run.sh's second end-to-end run, under the NF4 routes its kernel timings call for)."""

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


def num(d, key):
    """d[key] as a float; NaN when missing or null (a cell whose requests all failed has no step times)."""
    v = (d or {}).get(key)
    return float("nan") if v is None else float(v)


def fmt(x, spec):
    return "–" if x != x else format(x, spec)


def ratio(a, b):
    return a / b if b and b == b else float("nan")


def main():
    out = os.environ.get("OUT", ".")
    serve_json = os.environ.get("SERVE_JSON", "gpu_serve.json")
    kernels, serve, peer = (load(out, n) for n in ("gpu_kernels.json", serve_json, "peer.json"))
    if not serve:
        return 1
    print(f"{serve_json}: NF4 routes {serve.get('nf4_routes', '(not recorded)')}\n")
    decode = serve.get("decode") or {}
    # Cells by (streams, "one" adapter for all streams or "mixed": stream i on adapter i % 32).
    ours = {(c["streams"], c["mix"]): c for c in decode.get("cells") or []}
    theirs = {(c["streams"], c["mix"]): c for c in (peer or {}).get("cells") or []}

    print("| streams | adapters (distinct) | decode tok/s: loraserve | peer | × peer | end-to-end tok/s: loraserve |"
          " peer | × peer | step ms: loraserve | peer | TTFT ms: loraserve | peer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(ours, key=lambda k: (k[0], k[1] != "one")):
        o, p = ours[key], theirs.get(key)
        dec, e2e = num(o, "decode_tokens_per_s"), num(o, "tokens_per_s")
        pdec, pe2e = num(p, "decode_tokens_per_s"), num(p, "tokens_per_s")
        print(f"| {key[0]} | {key[1]} ({o['adapters']}) | {fmt(dec, '.0f')} | {fmt(pdec, '.1f')} | "
              f"{fmt(ratio(dec, pdec), '.1f')}× | {fmt(e2e, '.0f')} | {fmt(pe2e, '.1f')} | "
              f"{fmt(ratio(e2e, pe2e), '.1f')}× | {fmt(num(o, 'step_ms_p50'), '.2f')} | {fmt(num(p, 'step_ms'), '.2f')} | "
              f"{fmt(num(o, 'ttft_ms_p50'), '.0f')} | {fmt(num(p, 'ttft_ms'), '.0f')} |")

    checks = []

    def check(name, value, bar, ok, done_when=True):
        checks.append(dict(name=name, value=value, bar=bar, ok=bool(ok), done_when=done_when))

    if "error" in decode:
        check("decode benchmark ran to the end", decode["error"], "no error", False)
    if not peer:
        check("peer ran", "peer.json missing", "present", False)
    top, top_one, peer_top = ours.get((32, "mixed")), ours.get((32, "one")), theirs.get((32, "mixed"))
    r = ratio(num(top, "decode_tokens_per_s"), num(peer_top, "decode_tokens_per_s"))
    check("decode tok/s, 32 streams × 32 adapters, × peer", f"{fmt(r, '.1f')}×", "≥ 20×", r >= 20)
    r = ratio(num(top, "tokens_per_s"), num(peer_top, "tokens_per_s"))
    check("end-to-end tok/s (prefill included), same cell, × peer", f"{fmt(r, '.1f')}×", "(reported)", True,
          done_when=False)
    overhead = 1 - ratio(num(top, "decode_tokens_per_s"), num(top_one, "decode_tokens_per_s"))
    check("mixed-adapter decode overhead at 32 streams", f"{fmt(100 * overhead, '.1f')}%", "≤ 15%", overhead <= 0.15)
    errors = sum(len(c["errors"]) for c in ours.values())
    check("decode cells run, errors", f"{len(ours)}/6 cells, {errors} errors", "6/6, 0", errors == 0 and len(ours) == 6)
    resident = max(num(decode, "resident_bytes"), num(decode, "device_free_drop_bytes"))
    check("base resident (max of model count, device free-memory drop)", f"{fmt(resident / GIB, '.2f')} GiB",
          "≤ 4.2 GiB", resident <= 4.2 * GIB)
    fixtures = serve.get("fixtures") or []
    bad = [f"{f['fixture']}/{f['quant']}" for f in fixtures if not f["ok"]]
    check("fixtures: GPU greedy = CPU greedy", f"{len(fixtures) - len(bad)}/{len(fixtures)} configs"
          + (f" (failed: {', '.join(bad)})" if bad else ""), "all", fixtures and not bad)
    if not kernels:
        check("kernel checks", "gpu_kernels.json missing", "0 failed", False)
    else:
        # A report saved part way (the kernels step cut short) says "complete": false.
        whole = kernels.get("complete", True)
        check("kernel checks", f"{kernels.get('failed', '?')} failed" + ("" if whole else ", cut short"), "0, all run",
              kernels.get("failed") == 0 and whole)
        if "launch_floor_us" in kernels:
            host = " / ".join(fmt(num(kernels, k), ".1f") for k in ("launch_floor_us", "candle_op_us", "alloc_us"))
            check("host µs per call: launch floor / candle op / device allocation", host, "(reported)", True,
                  done_when=False)
        bw = kernels.get("copy_gb_per_s")
        one = ours.get((1, "one"))
        if bw and one:
            floor_ms = num(decode, "step_floor_bytes") / (bw * 1e9) * 1e3
            step = num(one, "step_ms_p50")
            r = ratio(step, floor_ms)
            check("step time / memory floor (1 stream)", f"{fmt(step, '.2f')} / {fmt(floor_ms, '.2f')} ms = "
                  f"{fmt(r, '.2f')}×", "≤ 1.5× (aim)", r <= 1.5, done_when=False)
    dec = num(top, "decode_tokens_per_s")
    check("decode tok/s at 32 streams × 32 adapters", fmt(dec, ".0f"), "≥ 10,000 (aim)", dec >= 10_000,
          done_when=False)
    for key, name in (("cold_load_ms", "cold adapter load (median)"),
                      ("promote_ms", "host-tier promotion (median)")):
        times = sorted(decode.get(key) or [])
        if times:
            med = times[len(times) // 2]
            check(name, f"{med:.1f} ms", "≤ 15 ms (aim)" if key == "cold_load_ms" else "(reported)",
                  med <= 15 or key == "promote_ms", done_when=False)

    print("\n| check | measured | bar | |")
    print("|---|---|---|---|")
    for c in checks:
        status = "ok" if c["ok"] else ("FAIL" if c["done_when"] else "not yet")
        print(f"| {c['name']} | {c['value']} | {c['bar']} | {status} |")
    with open(os.path.join(out, os.environ.get("SUMMARY_JSON", "summary.json")), "w") as f:
        json.dump(dict(serve=serve_json, nf4_routes=serve.get("nf4_routes"), checks=checks), f, indent=1)
    return 0 if all(c["ok"] for c in checks if c["done_when"]) else 1


if __name__ == "__main__":
    sys.exit(main())
