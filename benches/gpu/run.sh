#!/usr/bin/env bash
# The one device call (issue 8): run from the repository root on the GPU machine, with the binaries that
# benches/gpu/build.sh put in .gpu/. Prints every table and writes the figures as JSON under $OUT.
#   1+2. every CUDA kernel against its CPU reference on fresh random inputs (NaN-poisoned outputs), then
#        timed: GB/s and TFLOP/s against the copy bandwidth measured in the same run (.gpu/gpu_kernels).
#   3.   the server binary on the device: `--device cuda` must load or fail with its one-line reason.
# Not yet in the script (the model forward still has CPU-only ops; see benches/NOTES.md, GPU section):
# the end-to-end 7B decode benchmark and the transformers+peft peer.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/loraserve-gpu}
mkdir -p "$OUT"

# CUDA 13 user-space libraries (cudart, cublas, curand, nvrtc): the toolkit's, or PyTorch's wheels'.
libs=
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
wheel=$(python3 -c 'import nvidia.cu13 as m; print(list(m.__path__)[0] + "/lib")' 2>/dev/null || true)
[ -n "$wheel" ] && [ -d "$wheel" ] && libs="${libs:+$libs:}$wheel"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

bin=$(mktemp -d)
for b in gpu_kernels server; do gunzip -c ".gpu/$b.gz" > "$bin/$b" && chmod +x "$bin/$b"; done

status=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.csv"
echo
echo "== 1+2. kernels against their CPU references, and their speed"
OUT="$OUT" "$bin/gpu_kernels" || status=1
echo
echo "== 3. the server on the device"
timeout 120 "$bin/server" generate --model demo --device cuda --prompt hello --max-new-tokens 4 2>&1 | tail -3 | tee "$OUT/server.txt"
exit $status
