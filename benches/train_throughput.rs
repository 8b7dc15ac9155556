//! QLoRA training throughput and peak memory on a ~1B Llama shape (TinyLlama geometry, random weights):
//! NF4 base versus dense f32 base, each with and without activation checkpointing (`--gradient-checkpointing`),
//! rank-16 q,k,v,o adapter, sequences of 256 tokens, batch 2, on this machine. Each configuration runs in its
//! own process so its peak RSS (VmHWM) is its own.
//!
//! `cargo bench --bench train_throughput` (`LORASERVE_BENCH_SHAPE=demo` for a quick run).

use std::time::Instant;

use candle_core::{DType, Device};
use loraserve::lora::trainable::{LoraSpec, TrainableLora};
use loraserve::lora::ModuleKind;
use loraserve::model::{synthetic, LoadOptions};
use loraserve::quant::QuantMode;
use loraserve::train::data::Example;
use loraserve::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use loraserve::train::trainer::micro_batch_grads;

const SEQ: usize = 256;
const BATCH: usize = 2;

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// One configuration, in this process: prints `tokens_per_s peak_mb`.
fn child(shape: &str, quant: QuantMode, checkpointing: bool, steps: usize) {
    let model = synthetic::build(shape, &LoadOptions { dtype: DType::F32, quant, device: Device::Cpu }, 7).unwrap();
    let spec = LoraSpec {
        rank: 16,
        alpha: 32.0,
        use_rslora: false,
        dropout: 0.05,
        targets: vec![ModuleKind::QProj, ModuleKind::KProj, ModuleKind::VProj, ModuleKind::OProj],
    };
    let lora = TrainableLora::init(&model.lora_layout(), spec, 1, &Device::Cpu).unwrap();
    let vars = lora.vars();
    let mut opt = AdamW::new(AdamWConfig::default(), &vars).unwrap();
    let vocab = model.config().vocab_size;
    let examples: Vec<Example> = (0..BATCH)
        .map(|b| Example {
            ids: (0..SEQ).map(|i| ((i * 31 + b * 7) % vocab) as u32).collect(),
            targets: vec![true; SEQ],
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let targets = examples.iter().map(|e| e.loss_tokens()).sum();
    let mut step = || {
        let (_, grads) = micro_batch_grads(&model, &lora, &refs, targets, checkpointing).unwrap();
        let mut grads: Vec<_> = grads.into_iter().map(Option::unwrap).collect();
        clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.update(&vars, &grads, 2e-4).unwrap();
    };
    step(); // warm-up
    let t = Instant::now();
    for _ in 0..steps {
        step();
    }
    let tps = (steps * BATCH * SEQ) as f64 / t.elapsed().as_secs_f64();
    println!("{tps} {}", peak_rss_mb());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let quant = if args[i + 2] == "nf4" { QuantMode::Nf4 } else { QuantMode::None };
        child(&args[i + 1], quant, args[i + 3] == "checkpointed", args[i + 4].parse().unwrap());
        return;
    }
    let shape = std::env::var("LORASERVE_BENCH_SHAPE").unwrap_or_else(|_| "llama-1b".into());
    let steps = if shape == "demo" { 5 } else { 2 };
    println!(
        "QLoRA training, {shape}, rank-16 q,k,v,o, batch {BATCH} × {SEQ} tokens, f32 compute, {} threads\n",
        rayon::current_num_threads()
    );
    println!("| base | activations | tokens/s | peak RSS MB |\n|---|---|---|---|");
    let mut results = Vec::new();
    for base in ["nf4", "dense"] {
        for (activations, mode) in [("all kept", "plain"), ("checkpointed", "checkpointed")] {
            let out = std::process::Command::new(&args[0])
                .args(["--child", &shape, base, mode, &steps.to_string()])
                .output()
                .expect("child run");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().last().unwrap_or_default();
            let mut it = line.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
            let (tps, mb) = (it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN));
            println!("| {base} | {activations} | {tps:.1} | {mb:.0} |");
            results.push((tps, mb));
        }
    }
    let ratio = |a: (f64, f64), b: (f64, f64)| format!("{:.2}× tokens/s, {:.2}× peak memory", a.0 / b.0, a.1 / b.1);
    println!("\nNF4 / dense, all kept: {}", ratio(results[0], results[2]));
    println!("checkpointed / all kept: NF4 {}; dense {}", ratio(results[1], results[0]), ratio(results[3], results[2]));
}
