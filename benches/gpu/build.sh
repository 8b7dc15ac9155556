#!/usr/bin/env bash
# Builds the CUDA binaries for the device call on this GPU-less machine and puts them, stripped, in .gpu/
# (ignored by git; carry it: the device tool's `carry: [".gpu"]`). Needs ../shared/tools/cuda-build-env.sh's
# toolchain (CUDA 13.0 from PyPI wheels). Then, on the GPU machine: `bash benches/gpu/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source "${CUDA_BUILD_PREFIX:-$HOME/.cache/loraserve-cuda}/cuda-env.sh"
mkdir -p .gpu
exe=$(cargo bench --features cuda --bench gpu_kernels --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_kernels" and m.get("executable"):
        print(m["executable"])')
[ -n "$exe" ] || { echo "build.sh: the gpu_kernels bench did not build" >&2; exit 1; }
cargo build --release --features cuda --bin server
# Compressed: the device call carries 64 MiB in all, working tree included.
strip -o .gpu/gpu_kernels "$exe" && gzip -9f .gpu/gpu_kernels
strip -o .gpu/server target/release/server && gzip -9f .gpu/server
ls -la .gpu
