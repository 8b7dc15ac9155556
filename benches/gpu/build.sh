#!/usr/bin/env bash
# Builds the CUDA binaries for the device call on this GPU-less machine and puts them, stripped, in .gpu/
# (ignored by git; carry it: the device tool's `carry: [".gpu"]`). Needs ../shared/tools/cuda-build-env.sh's
# toolchain (CUDA 13.0 from PyPI wheels). Then, on the GPU machine: `bash benches/gpu/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source "${CUDA_BUILD_PREFIX:-$HOME/.cache/loraserve-cuda}/cuda-env.sh"
mkdir -p .gpu
# The bench executables' paths, from cargo's build messages.
exes=$(cargo bench --features cuda --bench gpu_kernels --bench gpu_serve --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in ("gpu_kernels", "gpu_serve") and m.get("executable"):
        print(m["target"]["name"], m["executable"])')
for b in gpu_kernels gpu_serve; do
  exe=$(echo "$exes" | awk -v b="$b" '$1 == b { print $2 }')
  [ -n "$exe" ] || { echo "build.sh: the $b bench did not build" >&2; exit 1; }
  # Compressed: the device call carries 64 MiB in all, working tree included.
  strip -o ".gpu/$b" "$exe" && gzip -9f ".gpu/$b"
done
cargo build --release --features cuda --bin server
strip -o .gpu/server target/release/server && gzip -9f .gpu/server
bash benches/gpu/sources.sh > .gpu/sources.sha256
ls -la .gpu
