//! Prefill and decode tokens/s of the demo model and a ~1B-parameter Llama shape (TinyLlama geometry,
//! random weights), dense f32 / bf16 and NF4, on this machine. Prints one table.
//!
//! `cargo bench --bench model_throughput` (set `LORASERVE_BENCH_SHAPES=demo` for a quick run).

use std::time::Instant;

use candle_core::{DType, Device};
use loraserve::lora::LoraRows;
use loraserve::model::kv_cache::PagedKvCache;
use loraserve::model::{synthetic, AttentionMode, Batch, LoadOptions, Model, SeqInput};
use loraserve::quant::QuantMode;

const PROMPT: usize = 128;

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// (prefill tok/s, decode tok/s) for one sequence.
fn measure(model: &Model, decode_steps: usize) -> (f64, f64) {
    let geo = model.kv_geometry(16);
    let total = PROMPT + decode_steps + 1;
    let mut cache = PagedKvCache::new(geo, geo.blocks_for(total));
    let blocks = cache.allocator_mut().allocate(geo.blocks_for(total)).unwrap();
    let prompt = tokens(PROMPT, model.config().vocab_size);
    let run = |cache: &mut PagedKvCache, toks: &[u32], past: usize| {
        let seqs = [SeqInput { len: toks.len(), past, blocks: &blocks }];
        let batch = Batch { tokens: toks, seqs: &seqs, logit_rows: &[toks.len() - 1] };
        model.forward(&batch, AttentionMode::Paged(cache), &LoraRows::None).unwrap()
    };
    // Warm-up (page in weights, spin up threads), then the timed prefill.
    run(&mut cache, &prompt[..8], 0);
    let t = Instant::now();
    run(&mut cache, &prompt, 0);
    let prefill = PROMPT as f64 / t.elapsed().as_secs_f64();
    run(&mut cache, &[5], PROMPT);
    let t = Instant::now();
    for s in 0..decode_steps {
        run(&mut cache, &[(s % 100) as u32 + 3], PROMPT + 1 + s);
    }
    let decode = decode_steps as f64 / t.elapsed().as_secs_f64();
    (prefill, decode)
}

/// Resident size of a 7B-shape NF4 base (built directly in NF4; no forward).
fn resident_7b() {
    let opts = LoadOptions { dtype: DType::BF16, quant: QuantMode::Nf4, device: Device::Cpu };
    let t = Instant::now();
    let model = synthetic::build("llama2-7b", &opts, 7).unwrap();
    let (params, bytes) = model.nf4_footprint();
    println!(
        "\nllama2-7b NF4 base (bf16 embeddings/head): {:.2} GiB resident in all; decoder linears {:.2}B params in {:.3} GiB = {:.4} bits/param (4 + 0.125 absmax codes + 0.002 nested scales = 4.127); built in {:.1}s",
        model.resident_bytes() as f64 / (1u64 << 30) as f64,
        params as f64 / 1e9,
        bytes as f64 / (1u64 << 30) as f64,
        bytes as f64 * 8.0 / params as f64,
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    let shapes = std::env::var("LORASERVE_BENCH_SHAPES").unwrap_or_else(|_| "demo,llama-1b".into());
    let threads = rayon::current_num_threads();
    println!("model throughput, batch 1, prompt {PROMPT} tokens, {threads} threads\n");
    println!("| model | base | dtype | params | resident MB | prefill tok/s | decode tok/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for shape in shapes.split(',') {
        let steps = if shape == "demo" { 64 } else { 8 };
        let mut f32_decode = 0.0;
        for (quant, dtype) in
            [(QuantMode::None, DType::F32), (QuantMode::None, DType::BF16), (QuantMode::Nf4, DType::F32)]
        {
            let opts = LoadOptions { dtype, quant, device: Device::Cpu };
            let model = synthetic::build(shape, &opts, 7).unwrap();
            let (prefill, decode) = measure(&model, steps);
            match (quant, dtype) {
                (QuantMode::None, DType::F32) => f32_decode = decode,
                (QuantMode::Nf4, _) => {
                    ratios.push(format!("{shape}: NF4 decode / dense f32 decode = {:.2}×", decode / f32_decode))
                }
                _ => {}
            }
            println!(
                "| {shape} | {} | {:?} | {:.2}M | {:.1} | {prefill:.1} | {decode:.2} |",
                match quant {
                    QuantMode::None => "dense",
                    QuantMode::Nf4 => "nf4",
                },
                dtype,
                model.num_parameters() as f64 / 1e6,
                model.resident_bytes() as f64 / 1e6,
            );
        }
    }
    println!();
    for r in ratios {
        println!("{r}");
    }
    if std::env::var("LORASERVE_BENCH_SHAPES").is_err() {
        resident_7b();
    }
}
