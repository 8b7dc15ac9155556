#!/usr/bin/env bash
# Prints one hash of everything the device binaries are built from (the crate's sources, benches, proto,
# manifest and lock file; not the scripts in benches/gpu/, not notes). build.sh stores it in .gpu/; run.sh
# refuses binaries built from other sources than the checkout it runs in.
set -euo pipefail
cd "$(dirname "$0")/../.."
find Cargo.toml Cargo.lock build.rs proto src benches -type f ! -name '*.md' ! -path 'benches/gpu/*' \
  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
