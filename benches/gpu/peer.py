#!/usr/bin/env python3
"""The naive peer of issue 8's decode benchmark: Hugging Face transformers + PEFT, bf16, on the same GPU,
with the same shape (synthetic:llama2-7b's config, random weights), the same adapter mix (32 rank-16
q,k,v,o LoRA adapters) and the same load as benches/gpu_serve.rs: 1, 8 and 32 streams, one adapter versus
32 distinct adapters, 128-token prompts, 128 new tokens, greedy.

The streams of one cell are one `generate` call (a static batch, what a PEFT user would write); mixed
adapters go through PEFT's `adapter_names=` (per-adapter sub-batches inside every LoRA layer). Time to first
token is a `max_new_tokens=1` call on the same batch; step time is the rest over the remaining tokens, and
decode tokens/s is streams / step time (end-to-end tokens/s counts the prefill too).

Prints a table and writes $OUT/peer.json. `PEER_SHAPE=tiny` runs a small model (e.g. on a CPU, to check the
script itself)."""

import json
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT_TOKENS = 128
NEW_TOKENS = 128
SHAPES = {
    # src/model/synthetic.rs, "llama2-7b".
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    ),
    "tiny": dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    ),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main():
    shape = os.environ.get("PEER_SHAPE", "llama2-7b")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in bf16, on the device
    with dev:
        base = LlamaForCausalLM(config)
    torch.set_default_dtype(default)
    base.eval()
    sync(dev)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random A and B: nonzero deltas, as trained adapters have
    )
    names = [f"a{i:02d}" for i in range(32)]
    model = get_peft_model(base, lora, adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, lora)
    model.eval()
    sync(dev)
    build_s = time.perf_counter() - t0
    print(f"peer: transformers + peft, {shape}, {dtype}, {dev}; base {base_bytes / 2**30:.2f} GiB; "
          f"built in {build_s:.1f} s; torch {torch.__version__}", flush=True)

    gen = torch.Generator(device="cpu").manual_seed(1)

    def batch(streams):
        ids = torch.randint(3, config.vocab_size, (streams, PROMPT_TOKENS), generator=gen).to(dev)
        return ids, torch.ones_like(ids)

    def generate(ids, mask, adapters, new_tokens):
        sync(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, adapter_names=adapters, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            )
        sync(dev)
        return time.perf_counter() - t, out.shape[1] - ids.shape[1]

    ids, mask = batch(2)
    generate(ids, mask, names[:2], 4)  # warm-up

    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)

    def save(cells):  # after every cell: a run cut short by its timeout keeps what it measured
        with open(os.path.join(out, "peer.json"), "w") as f:
            json.dump(dict(shape=shape, dtype=str(dtype), device=str(dev), base_bytes=base_bytes,
                           build_seconds=build_s, torch=torch.__version__, cells=cells), f, indent=1)

    print("\n| streams | adapters | tokens/s | step ms | TTFT ms |", flush=True)
    print("|---|---|---|---|---|")
    cells = []
    for streams in (32, 8, 1):  # the cells the bars use first
        for distinct in (1, 32):
            adapters = [names[i % distinct] for i in range(streams)]
            ids, mask = batch(streams)
            ttft, _ = generate(ids, mask, adapters, 1)
            total, new = generate(ids, mask, adapters, NEW_TOKENS)
            tokens = streams * new
            step_ms = (total - ttft) / max(new - 1, 1) * 1e3
            tps = tokens / total
            used = len(set(adapters))
            print(f"| {streams} | {used} | {tps:.1f} | {step_ms:.2f} | {ttft * 1e3:.0f} |", flush=True)
            cells.append(dict(streams=streams, mix="one" if distinct == 1 else "mixed", adapters=used,
                              tokens=tokens, seconds=total, tokens_per_s=tps,
                              decode_tokens_per_s=streams * 1e3 / step_ms, step_ms=step_ms, ttft_ms=ttft * 1e3))
            save(cells)


if __name__ == "__main__":
    main()
