#!/usr/bin/env bash
# Re-creates the example adapters from the data in adapters/data/ (each takes 1-2 minutes on two cores).
# The base is the built-in demo model, NF4-quantized (QLoRA); these are the exact commands that made them.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=${SERVER:-target/release/server}
common=(--model demo --rank 16 --alpha 32 --target-modules all-linear --dropout 0 --lr 3e-3 --lr-scheduler cosine --batch-size 16 --grad-accum 1 --seed 42)
rm -rf adapters/upper adapters/reverse adapters/persona
"$SERVER" train "${common[@]}" --data adapters/data/upper.jsonl   --max-steps 300 --output adapters/upper   --log-file /tmp/upper.log.jsonl
"$SERVER" train "${common[@]}" --data adapters/data/reverse.jsonl --max-steps 300 --output adapters/reverse --log-file /tmp/reverse.log.jsonl
"$SERVER" train "${common[@]}" --data adapters/data/persona.jsonl --max-steps 60  --output adapters/persona --log-file /tmp/persona.log.jsonl
