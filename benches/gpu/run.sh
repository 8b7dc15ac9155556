#!/usr/bin/env bash
# The one device call (issue 8): run from the repository root on the GPU machine, with the binaries that
# benches/gpu/build.sh put in .gpu/. Prints every table and writes the figures as JSON under $OUT.
#   1+2. every CUDA kernel against its CPU reference on fresh random inputs (NaN-poisoned outputs), then
#        timed: GB/s and TFLOP/s against the copy bandwidth measured in the same run (.gpu/gpu_kernels);
#        the NF4 routes those timings call for (benches/gpu/routing.py).
#   3.   end to end through the in-process server (.gpu/gpu_serve): the fixture models' greedy outputs on the
#        GPU against the CPU, then the 7B-shape decode benchmark (1/8/32 streams × 1 vs 32 adapters).
#   4.   the peer, transformers + peft in bf16, same shape, adapters and load (benches/gpu/peer.py).
#   5.   the two side by side, and issue 8's bars (benches/gpu/compare.py → $OUT/summary.json).
#   6.   the server binary: `server generate --device cuda` on the demo model.
#   7.   when the kernel timings call for other NF4 routes than main's (routing.py wrote $OUT/nf4_routes.txt),
#        step 3 again under them (LORASERVE_NF4_ROUTES; $OUT/gpu_serve_routed.json), fixtures included, and
#        its figures against the peer's (summary_routed.json): the routes measured end to end in the same call,
#        informational (main's own table sets the exit status). Run only while the call has time left.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/loraserve-gpu}
mkdir -p "$OUT"
# A reused $OUT must not feed this run another run's figures (above all step 7 another run's routes).
rm -f "$OUT"/{gpu_kernels,gpu_serve,gpu_serve_routed,peer,summary,summary_routed}.json "$OUT"/nf4_routes.txt \
  "$OUT"/{gpu.csv,util.csv,server.txt}
# Everything printed also goes to $OUT/run.log: the device call returns only the output's last 12,000 characters.
exec > >(tee "$OUT/run.log") 2>&1
tee_pid=$!

# CUDA 13 user-space libraries (cudart, cublas, curand, nvrtc): the toolkit's, or PyTorch's wheels'.
libs=
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
wheel=$(python3 -c 'import nvidia.cu13 as m; print(list(m.__path__)[0] + "/lib")' 2>/dev/null || true)
[ -n "$wheel" ] && [ -d "$wheel" ] && libs="${libs:+$libs:}$wheel"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Binaries built from other sources than this checkout would check and time something else: refuse them.
built=$(cat .gpu/sources.sha256 2>/dev/null || echo none)
here=$(bash benches/gpu/sources.sh)
if [ "$built" != "$here" ]; then
  echo "run.sh: .gpu/ was built from other sources ($built) than this checkout's ($here): run benches/gpu/build.sh again"
  exec >&- 2>&-
  wait "$tee_pid"
  exit 2
fi

bin=$(mktemp -d)
for b in gpu_kernels gpu_serve server; do gunzip -c ".gpu/$b.gz" > "$bin/$b" && chmod +x "$bin/$b"; done

status=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.csv"
echo
echo "== 1+2. kernels against their CPU references, and their speed"
# Limits (s): kernels 100 (run 2: 21, before every split-K candidate was timed), routing 10, end to end 140
# (run 2: 81), utilization 20, peer 260 (run 2: 224), compare 20, server 30: 580 in all; step 7 gets what is left.
OUT="$OUT" timeout 100 "$bin/gpu_kernels" || status=1
echo
echo "NF4 routes by rows, costed on one Llama-2-7B layer from the timings above (benches/gpu/routing.py):"
OUT="$OUT" timeout 10 python3 benches/gpu/routing.py || true
echo
echo "(${SECONDS} s since the start)"
echo "== 3. end to end: fixtures GPU = CPU, then the decode benchmark"
# The GPU's utilization (the share of each ~1/6 s in which a kernel ran) through the whole step, so each
# decode cell can be read as bound by the GPU or by the host launching its work.
nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/util.csv" 2>&1 &
util_pid=$!
OUT="$OUT" LORASERVE_LOG=warn timeout 140 "$bin/gpu_serve" || status=1
kill "$util_pid" 2>/dev/null
OUT="$OUT" timeout 20 python3 benches/gpu/utilization.py || true
echo
echo "(${SECONDS} s since the start)"
echo "== 4. the peer: transformers + peft"
OUT="$OUT" PYTHONUNBUFFERED=1 timeout 260 python3 benches/gpu/peer.py || status=1
echo
echo "(${SECONDS} s since the start)"
echo "== 5. side by side"
OUT="$OUT" timeout 20 python3 benches/gpu/compare.py || status=1
echo
echo "(${SECONDS} s since the start)"
echo "== 6. the server binary on the device"
timeout 30 "$bin/server" generate --model demo --device cuda --prompt hello --max-new-tokens 4 2>&1 | tail -3 | tee "$OUT/server.txt"
echo
echo "(${SECONDS} s since the start)"
# The device call's limit is 600 s: the second end-to-end run gets what is left of 560 s (its comparison
# and exit up to 25 s more), if that is at least 60 s.
left=$((560 - SECONDS))
if [ ! -s "$OUT/nf4_routes.txt" ]; then
  echo "== 7. no second end-to-end run: the kernel timings call for main's own NF4 routes (or routing.py found none)"
elif [ "$left" -lt 60 ]; then
  echo "== 7. skipped: under 60 s left for a second end-to-end run"
else
  routes=$(head -n1 "$OUT/nf4_routes.txt")
  echo "== 7. end to end again under the NF4 routes the kernel timings call for: $routes"
  limit=$((left < 140 ? left : 140))
  OUT="$OUT" LORASERVE_NF4_ROUTES="$routes" LORASERVE_BENCH_REPORT=gpu_serve_routed.json LORASERVE_LOG=warn \
    timeout -k 5 "$limit" "$bin/gpu_serve" || echo "(the run under the routes failed or was cut short: informational)"
  OUT="$OUT" SERVE_JSON=gpu_serve_routed.json SUMMARY_JSON=summary_routed.json timeout 10 python3 benches/gpu/compare.py || true
fi
echo "(${SECONDS} s in all)"
exec >&- 2>&-
wait "$tee_pid"
exit $status
