//! Mixed-adapter decode on a ~1B Llama shape (TinyLlama geometry, random weights, NF4 base): 16 requests over
//! 16 distinct rank-16 q,k,v,o adapters decoded as ONE batch versus one request at a time, and the mixed
//! batch versus the same batch with no adapters, next to the floor the bytes predict
//! (adapter bytes read per step / base bytes read per step).
//!
//! `cargo bench --bench lora_batch` (`LORASERVE_BENCH_SHAPE=demo` for a quick run).

use std::time::Instant;

use candle_core::{DType, Device};
use loraserve::lora::synthetic::{random_adapter, ATTENTION};
use loraserve::lora::{LoraRows, LoraSegment, LoraWeights};
use loraserve::model::kv_cache::PagedKvCache;
use loraserve::model::{synthetic, AttentionMode, BaseWeight, Batch, LoadOptions, Model, SeqInput};
use loraserve::quant::QuantMode;

const REQUESTS: usize = 16;
const PROMPT: usize = 32;

/// Decodes `steps` tokens for `rows` sequences (each already prefilled) in one batch per step; returns seconds.
fn decode(model: &Model, adapters: &[Option<&LoraWeights>], steps: usize) -> f64 {
    let n = adapters.len();
    let geo = model.kv_geometry(16);
    let mut cache = PagedKvCache::new(geo, n * geo.blocks_for(PROMPT + steps + 1));
    let tables: Vec<Vec<u32>> =
        (0..n).map(|_| cache.allocator_mut().allocate(geo.blocks_for(PROMPT + steps + 1)).unwrap()).collect();
    let vocab = model.config().vocab_size;
    // Prefill every sequence (not timed).
    for (i, t) in tables.iter().enumerate() {
        let prompt: Vec<u32> = (0..PROMPT).map(|j| ((i * 31 + j * 7) % vocab) as u32).collect();
        let seqs = [SeqInput { len: PROMPT, past: 0, blocks: t }];
        let segs: Vec<LoraSegment> = adapters[i].map(|a| LoraSegment::new(0..PROMPT, a)).into_iter().collect();
        let batch = Batch { tokens: &prompt, seqs: &seqs, logit_rows: &[PROMPT - 1] };
        model.forward(&batch, AttentionMode::Paged(&mut cache), &LoraRows::Segments(&segs)).unwrap();
    }
    let t = Instant::now();
    for s in 0..steps {
        let tokens: Vec<u32> = (0..n).map(|i| ((i + s * 13) % vocab) as u32).collect();
        let seqs: Vec<SeqInput> = tables.iter().map(|t| SeqInput { len: 1, past: PROMPT + s, blocks: t }).collect();
        let segs: Vec<LoraSegment> =
            adapters.iter().enumerate().filter_map(|(i, a)| a.map(|a| LoraSegment::new(i..i + 1, a))).collect();
        let rows: Vec<usize> = (0..n).collect();
        let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &rows };
        model.forward(&batch, AttentionMode::Paged(&mut cache), &LoraRows::Segments(&segs)).unwrap();
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let shape = std::env::var("LORASERVE_BENCH_SHAPE").unwrap_or_else(|_| "llama-1b".into());
    let steps = if shape == "demo" { 32 } else { 4 };
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu };
    let model = synthetic::build(&shape, &opts, 7).unwrap();
    let layout = model.lora_layout();
    let adapters: Vec<LoraWeights> =
        (0..REQUESTS).map(|i| random_adapter(&layout, 16, &ATTENTION, 100 + i as u64, &Device::Cpu).unwrap()).collect();
    let adapter_bytes: usize = adapters.iter().map(|a| a.bytes()).sum();
    // Bytes of the base read per decode step: every decoder linear (NF4) plus the LM head.
    let head_bytes = model.config().vocab_size * model.config().hidden_size * 4;
    let base_bytes: usize = model.linears().map(|l| l.base.resident_bytes()).sum::<usize>() + head_bytes;
    assert!(model.linears().all(|l| matches!(l.base, BaseWeight::Nf4(_))));

    let mixed: Vec<Option<&LoraWeights>> = adapters.iter().map(Some).collect();
    let none: Vec<Option<&LoraWeights>> = vec![None; REQUESTS];
    decode(&model, &mixed[..2], 1); // warm-up
    let t_mixed = decode(&model, &mixed, steps);
    let t_none = decode(&model, &none, steps);
    let mut t_alone = 0.0;
    for a in &mixed {
        t_alone += decode(&model, std::slice::from_ref(a), steps);
    }
    let tok = (REQUESTS * steps) as f64;
    let floor = adapter_bytes as f64 / base_bytes as f64;
    let overhead = t_mixed / t_none - 1.0;
    println!("mixed-adapter decode: {shape}, NF4 base, {REQUESTS} requests × {REQUESTS} distinct rank-16 q,k,v,o adapters, {steps} steps, {} threads\n", rayon::current_num_threads());
    println!("| run | tokens/s | step ms |");
    println!("|---|---|---|");
    println!(
        "| one batch of {REQUESTS}, mixed adapters | {:.2} | {:.1} |",
        tok / t_mixed,
        t_mixed / steps as f64 * 1e3
    );
    println!("| one batch of {REQUESTS}, no adapters | {:.2} | {:.1} |", tok / t_none, t_none / steps as f64 * 1e3);
    println!(
        "| one request at a time (with its adapter) | {:.2} | {:.1} per token |",
        tok / t_alone,
        t_alone / tok * 1e3
    );
    println!();
    println!("batched / one-at-a-time: {:.2}× (goal ≥ 3×)", t_alone / t_mixed);
    println!(
        "mixed-adapter overhead vs no adapters: {:.1}%; byte floor: {:.1} MB adapters / {:.1} MB base per step = {:.1}%; overhead / floor = {:.2} (goal ≤ 1.5)",
        overhead * 100.0,
        adapter_bytes as f64 / 1e6,
        base_bytes as f64 / 1e6,
        floor * 100.0,
        overhead / floor
    );
}
