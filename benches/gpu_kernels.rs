//! Device checks and timings of loraserve's own CUDA kernels against their CPU references (feature `cuda`;
//! run on the GPU machine by `benches/gpu/run.sh`). For every shape: fresh random inputs, the output buffer
//! filled with NaN before the kernel runs, relative L2 error against the CPU path (a NaN or Inf anywhere
//! fails), then the time per call, reported as GB/s of bytes moved and TFLOP/s against the device-to-device
//! copy bandwidth measured in the same run. Prints a table; with `OUT` set, writes `$OUT/gpu_kernels.json`.
//! Exit status 1 when any check fails.
//!
//! NF4 matmul: the 7B/8B linears (4096², 11008×4096, 4096×11008, 14336×4096) at 1–8 rows (decode, the GEMV
//! kernels) and 13–512 rows (decode batches and prefill, the tensor-core kernels' 16- and 32-row tiles);
//! at the decode batches of 13–32 rows also every other tile height and split of K the shape allows
//! (`launch::nf4_candidates`), checked and timed the same way, then a table of the fastest per shape and rows
//! against the launcher's pick: what the routing should be.
//! Batched LoRA (shrink + expand) on 4096→4096 and 4096→1024: 32 decode rows over 32 distinct rank-16
//! adapters, 32 rows of one adapter, and a 512-row prefill mix of ranks 8/16/64/128 with base-model rows between the segments
//! (checked through `apply_into`, timed with its tables uploaded once, as a forward's step plan launches them). Paged attention (the cache
//! write, then attention, RoPE applied inside both) on Llama-3-8B heads (32 query / 8 kv, head_dim 128, blocks
//! of 16), the fixture models', and Llama 2's: decode rows at several context lengths plus a 20-token prefill,
//! with and without a sliding window, and Llama 2's 32-stream decode step; output compared with the CPU's
//! RoPE then attention, the cache (rotated keys) bit for bit.
//! Greedy picks (argmax by row) over Llama 2's and Llama 3's vocabularies at 1 and 32 rows, with exact ties
//! and NaN planted: the indices must equal `engine::sampler::argmax`'s. The fused residual add + RMS norm and
//! SiLU·mul at decode and prefill rows of the 7B/8B widths, against the CPU ops they replace, through both
//! the raw launch and the tensor op the model calls.
//! One adapter's host → device transfer three ways (a copy per tensor, packed and copied once from pageable
//! and from page-locked memory), each copy read back.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::WrapErr;
use candle_core::{Device, Tensor};
use loraserve::gpu::attention::{paged_attention_into, LayerKvCuda, StepTables};
use loraserve::gpu::fused::{add_rms_norm_into, silu_mul_into};
use loraserve::gpu::launch::Launch;
use loraserve::gpu::lora::{apply_into, Prepared};
use loraserve::gpu::nf4::{launch_into, matmul_into, Nf4CudaLinear, Nf4CudaWeight};
use loraserve::gpu::sample::argmax_into;
use loraserve::lora::batched::{apply_reference, LoraSegment};
use loraserve::lora::synthetic::{random_adapter, ATTENTION};
use loraserve::lora::{LinearId, LoraModule, LoraWeights, ModuleKind};
use loraserve::model::attention::{paged_attention, rope_in_place, rope_tables, AttnShape, PagedSeq};
use loraserve::model::kv_cache::LayerKv;
use loraserve::model::synthetic::shape_config;
use loraserve::quant::matmul;
use loraserve::quant::nf4::Nf4Weight;
use loraserve::rng::Rng;

/// Relative L2 error allowed against the CPU path (f32, different summation order).
const TOLERANCE: f64 = 1e-5;

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Seconds per call of `f`, after warm-up, over at least 50 ms.
fn time(device: &candle_core::CudaDevice, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    let stream = device.cuda_stream();
    for _ in 0..3 {
        f()?;
    }
    stream.synchronize().w()?;
    let (mut iters, start) = (0u32, Instant::now());
    while iters < 10 || start.elapsed().as_secs_f64() < 0.05 {
        f()?;
        iters += 1;
        if iters % 10 == 0 {
            stream.synchronize().w()?;
        }
    }
    stream.synchronize().w()?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> anyhow::Result<()> {
    let device = loraserve::gpu::open(0)?;
    let cuda = device.as_cuda_device()?.clone();
    // The launcher's picks below follow the table in effect (the compiled one unless LORASERVE_NF4_ROUTES).
    let routes = loraserve::gpu::routes::in_effect().map_err(anyhow::Error::msg)?;
    println!("NF4 routes: {routes}");
    let stream = cuda.cuda_stream();

    // The ceiling: device-to-device copy of 1 GiB (read + write counted).
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let copy_s = time(&cuda, || stream.memcpy_dtod(&src, &mut dst).w())?;
    let copy_gbs = 2.0 * bytes as f64 / copy_s / 1e9;
    drop((src, dst));
    println!("device-to-device copy: {copy_gbs:.0} GB/s (read + write)");
    // The launch floor: calls timed back to back cannot go faster than the host issues them, so a kernel
    // whose µs/call is near this one is measured at the host's launch rate, not its own speed.
    let one = stream.alloc_zeros::<f32>(1)?;
    let mut one_out = stream.alloc_zeros::<f32>(1)?;
    let floor_s = time(&cuda, || silu_mul_into(&cuda, &one.slice(..), &one.slice(..), 1, &mut one_out.slice_mut(..)))?;
    drop((one, one_out));
    println!("launch floor (silu_mul over 1 element, back to back): {:.1} µs/call", floor_s * 1e6);
    // What each op of a forward costs the host beyond its launch: candle's own op on one element (its
    // output allocated and freed each call, as in a forward), and a device allocation and free alone. With
    // the launch floor and a step's op count they tell a host-bound step (CUDA graphs, fused launches) from
    // one bound by its kernels.
    let t = Tensor::zeros(1, candle_core::DType::F32, &device)?;
    let op_s = time(&cuda, || (&t + &t).map(drop))?;
    // SAFETY: the buffer is never read; it is freed at once.
    let alloc_s = time(&cuda, || unsafe { stream.alloc::<f32>(1) }.w().map(drop))?;
    drop(t);
    println!("a candle op (1-element add, output allocated): {:.1} µs/call", op_s * 1e6);
    println!("a device allocation and its free (1 float): {:.1} µs/call\n", alloc_s * 1e6);
    println!("| kernel | m × n × k | rel L2 vs CPU | µs/call | GB/s | % of copy | TFLOP/s | check |");
    println!("|---|---|---|---|---|---|---|---|");

    let mut rows = vec![];
    let mut failed = 0;
    // Saved after each NF4 shape and each later part: a run cut short (its time limit, an error) keeps what
    // it measured, and routing.py needs only the NF4 rows.
    let mut report = serde_json::json!({
        "copy_gb_per_s": copy_gbs, "launch_floor_us": floor_s * 1e6, "candle_op_us": op_s * 1e6,
        "alloc_us": alloc_s * 1e6, "tolerance": TOLERANCE, "nf4_routes": routes.to_string(), "nf4_matmul": [],
        "failed": failed, "complete": false,
    });
    // (shape, the launcher's kernel, its time, (the fastest candidate's time, which)) per decode batch.
    let mut routing: Vec<(String, String, f64, (f64, String))> = vec![];
    // (n, k, double-quantized absmax): the model shapes, plus both absmax forms and a small shape whose
    // columns end mid-tile and mid-warp-group.
    let shapes = [
        (4096usize, 4096usize, true),
        (4096, 4096, false),
        (11008, 4096, true),
        (4096, 11008, true),
        (14336, 4096, true),
        (4100, 320, false),
        // Widths that are not whole NF4 blocks per row (the fixture models'): the generic kernel.
        (97, 96, true),
        (64, 160, false),
    ];
    for (si, &(n, k, dq)) in shapes.iter().enumerate() {
        let w = Nf4Weight::quantize(&normal(n * k, 1000 + si as u64), &[n, k], dq);
        let dw = Arc::new(Nf4CudaWeight::upload(&w, &cuda)?);
        // Checkpoints of a GPU-resident model read the weight back: it must come back bit for bit.
        if dw.download()? != w {
            println!("| download {n} × {k} | | weight read back differs | | | | | FAIL |");
            failed += 1;
        }
        // Every GEMV width (1..8 rows, partly filled ones too) and both tensor-core kernels (decode batches of 9..32
        // rows, prefill) with partial row tiles.
        for (mi, &m) in [1usize, 2, 3, 8, 13, 16, 24, 32, 33, 100, 128, 512].iter().enumerate() {
            let x = normal(m * k, 2000 + 10 * si as u64 + mi as u64);
            let want = matmul::matmul(&x, m, &w);
            let dx = stream.clone_htod(&x)?;
            let mut dy = stream.clone_htod(&vec![f32::NAN; m * n])?;
            matmul_into(&dw, &dx.slice(..), m, &mut dy)?;
            let got = stream.clone_dtoh(&dy)?;
            let err = rel_l2(&got, &want);
            // The op path (what the model calls) must give the same numbers.
            let xt = Tensor::from_vec(x.clone(), (m, k), &device)?;
            let op = xt.apply_op1(Nf4CudaLinear(dw.clone()))?.flatten_all()?.to_vec1::<f32>()?;
            let op_err = rel_l2(&op, &want);
            let s = time(&cuda, || matmul_into(&dw, &dx.slice(..), m, &mut dy))?;
            // Checked again after the timed repeats: a launch that leaves state behind (split-K's tile counters)
            // would go wrong on a later call, not the first.
            let err = err.max(rel_l2(&stream.clone_dtoh(&dy)?, &want));
            let moved = dw.resident_bytes() + 4 * (m * k + m * n);
            let pick = loraserve::gpu::launch::nf4_matmul(m, n, k).map_err(anyhow::Error::msg)?;
            let row = Nf4Row { shape: (m, n, k, dq), moved, copy_gbs };
            let (ok, json) = row.report(&pick, false, err, Some(op_err), s);
            failed += usize::from(!ok);
            rows.push(json);
            // Decode batches: every other tile height and split of K (split-K puts several blocks on each SM
            // when the output makes only ~128 tiles), checked and timed; the fastest decides the routing.
            if m <= 32 {
                let t_pick = s;
                let pick = describe(&pick);
                let mut best = if ok { (s, pick.clone()) } else { (f64::INFINITY, "-".to_string()) };
                for l in loraserve::gpu::launch::nf4_candidates(m, n, k).into_iter().skip(1) {
                    // Not yet run on a device (split-K): an error is a failed row, not the end of the report.
                    let check = || -> anyhow::Result<(f64, f64)> {
                        let mut dy = stream.clone_htod(&vec![f32::NAN; m * n])?;
                        launch_into(&dw, &dx.slice(..), m, &mut dy, l)?;
                        let err = rel_l2(&stream.clone_dtoh(&dy)?, &want);
                        let s = time(&cuda, || launch_into(&dw, &dx.slice(..), m, &mut dy, l))?;
                        Ok((err.max(rel_l2(&stream.clone_dtoh(&dy)?, &want)), s))
                    };
                    let (err, s) = match check() {
                        Ok(v) => v,
                        Err(e) => {
                            println!("| {} (candidate) | {m} × {n} × {k} | | | | | | FAIL ({e:#}) |", describe(&l));
                            failed += 1;
                            continue;
                        }
                    };
                    let (ok, json) = row.report(&l, true, err, None, s);
                    failed += usize::from(!ok);
                    rows.push(json);
                    if ok && s < best.0 {
                        best = (s, describe(&l));
                    }
                }
                routing.push((format!("{m} × {n} × {k}{}", if dq { "" } else { " (f32 absmax)" }), pick, t_pick, best));
            }
        }
        save(&mut report, "nf4_matmul", rows.clone().into(), failed)?;
    }
    println!("\n| NF4 routing: m × n × k | launcher's pick | µs | fastest candidate | µs | pick ÷ fastest |");
    println!("|---|---|---|---|---|---|");
    for (shape, pick, t_pick, (t_best, best)) in &routing {
        println!("| {shape} | {pick} | {:.1} | {best} | {:.1} | {:.2} |", t_pick * 1e6, t_best * 1e6, t_pick / t_best);
    }
    println!();
    let lora_rows = lora_checks(&device, copy_gbs, &mut failed)?;
    save(&mut report, "batched_lora", lora_rows.into(), failed)?;
    let attention_rows = attention_checks(&device, copy_gbs, &mut failed)?;
    save(&mut report, "paged_attention", attention_rows.into(), failed)?;
    let argmax_rows = argmax_checks(&device, copy_gbs, &mut failed)?;
    save(&mut report, "argmax", argmax_rows.into(), failed)?;
    let fused_rows = fused_checks(&device, copy_gbs, &mut failed)?;
    save(&mut report, "fused", fused_rows.into(), failed)?;
    // New here, not yet run on a device: an error is a failed row, not the end of the report.
    let transfer_rows = match transfer_checks(&device, &mut failed) {
        Ok(rows) => rows,
        Err(e) => {
            println!("| adapter transfer | | | | FAIL ({e:#}) |");
            failed += 1;
            vec![]
        }
    };
    save(&mut report, "adapter_transfer", transfer_rows.into(), failed)?;
    save(&mut report, "complete", true.into(), failed)?;
    if failed > 0 {
        eprintln!("{failed} kernel check(s) failed");
        std::process::exit(1);
    }
    println!("\nall kernel checks passed");
    Ok(())
}

/// Sets `report[key]` and the failure count, and writes the report to `$OUT/gpu_kernels.json` (through a
/// temporary file and a rename: a run killed mid-write leaves the previous save whole).
fn save(report: &mut serde_json::Value, key: &str, value: serde_json::Value, failed: usize) -> anyhow::Result<()> {
    report[key] = value;
    report["failed"] = failed.into();
    if let Ok(out) = std::env::var("OUT") {
        let tmp = format!("{out}/gpu_kernels.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(report)?)?;
        std::fs::rename(&tmp, format!("{out}/gpu_kernels.json"))?;
    }
    Ok(())
}

/// One NF4 shape's table rows: the launcher's pick and the candidates, each checked and timed.
struct Nf4Row {
    /// m, n, k, double-quantized absmax.
    shape: (usize, usize, usize, bool),
    /// Bytes a call moves (weight, x, y).
    moved: usize,
    copy_gbs: f64,
}

impl Nf4Row {
    /// Prints launch `l`'s row (checked to `err`, the op path to `op_err` for the pick; `s` seconds a call) and
    /// returns whether it passed, with its JSON.
    fn report(&self, l: &Launch, candidate: bool, err: f64, op_err: Option<f64>, s: f64) -> (bool, serde_json::Value) {
        let (m, n, k, dq) = self.shape;
        let ok = err <= TOLERANCE && op_err.is_none_or(|e| e <= TOLERANCE);
        let gbs = self.moved as f64 / s / 1e9;
        let tflops = 2.0 * (m * n * k) as f64 / s / 1e12;
        println!(
            "| {}{} | {m} × {n} × {k}{} | {err:.2e}{} | {:.1} | {gbs:.0} | {:.0}% | {tflops:.2} | {} |",
            describe(l),
            if candidate { " (candidate)" } else { "" },
            if dq { "" } else { " (f32 absmax)" },
            op_err.map_or(String::new(), |e| format!(" (op {e:.2e})")),
            s * 1e6,
            100.0 * gbs / self.copy_gbs,
            if ok { "ok" } else { "FAIL" }
        );
        let json = serde_json::json!({
            "kernel": l.kernel, "candidate": candidate, "grid": [l.grid.0, l.grid.1, l.grid.2], "splits": l.grid.2,
            "m": m, "n": n, "k": k, "double_quant": dq, "rel_l2": err, "op_rel_l2": op_err, "ok": ok,
            "us_per_call": s * 1e6, "gb_per_s": gbs, "tflop_per_s": tflops,
        });
        (ok, json)
    }
}

/// A tensor-core launch in words: kernel, row tiles, split of K (`nf4_matmul_mma16 ×2 rows, K/4`).
fn describe(l: &Launch) -> String {
    let mut d = l.kernel.to_string();
    if l.grid.1 > 1 {
        d += &format!(" ×{} rows", l.grid.1);
    }
    if l.grid.2 > 1 {
        d += &format!(", K/{}", l.grid.2);
    }
    d
}

/// (label, rows, segments as (rows, rank)).
type Mix = (&'static str, usize, Vec<(Range<usize>, usize)>);

/// Batched LoRA against `lora::batched::apply_reference` (candle ops on the CPU).
fn lora_checks(device: &Device, copy_gbs: f64, failed: &mut usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let cuda = device.as_cuda_device()?.clone();
    let stream = cuda.cuda_stream();
    println!(
        "\n| batched LoRA | rows | in → out | segments (rank) | rel L2 vs CPU | µs/call | GB/s | % of copy | check |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let id = LinearId::new(0, ModuleKind::QProj);
    let mixes: [Mix; 3] = [
        ("32 adapters", 32, (0..32).map(|i| (i..i + 1, 16)).collect()),
        ("1 adapter", 32, vec![(0..32, 16)]),
        ("prefill mix", 512, vec![(0..100, 8), (100..228, 16), (260..400, 64), (400..500, 128)]),
    ];
    let mut out = vec![];
    for (si, &(in_f, out_f)) in [(4096usize, 4096usize), (4096, 1024)].iter().enumerate() {
        for (mi, (label, rows, segs)) in mixes.iter().enumerate() {
            let seed = 5000 + 100 * si as u64 + 10 * mi as u64;
            let adapters: Vec<LoraWeights> = segs
                .iter()
                .enumerate()
                .map(|(j, &(_, rank))| {
                    let mut w = LoraWeights::new(1);
                    let a = Tensor::from_vec(normal(rank * in_f, seed + j as u64), (rank, in_f), &Device::Cpu)?;
                    let b_t =
                        Tensor::from_vec(normal(rank * out_f, seed + 50 + j as u64), (rank, out_f), &Device::Cpu)?;
                    w.insert(id, LoraModule { a: (a * 0.01)?, b_t: (b_t * 0.01)?, scale: 2.0 });
                    Ok(w)
                })
                .collect::<candle_core::Result<_>>()?;
            let x = normal(rows * in_f, seed + 1);
            let y0 = normal(rows * out_f, seed + 2);
            let xt = Tensor::from_vec(x.clone(), (*rows, in_f), &Device::Cpu)?;
            let yt = Tensor::from_vec(y0.clone(), (*rows, out_f), &Device::Cpu)?;
            let cpu_segs: Vec<LoraSegment> =
                segs.iter().zip(&adapters).map(|((r, _), w)| LoraSegment::new(r.clone(), w)).collect();
            let want = apply_reference(&yt, &xt, id, &cpu_segs)?.flatten_all()?.to_vec1::<f32>()?;

            // Device copies the way the adapter cache's device tier makes them.
            let on_device: Vec<LoraWeights> =
                adapters.iter().map(|w| w.to_device(device)).collect::<candle_core::Result<_>>()?;
            let modules: Vec<&LoraModule> = on_device.iter().map(|w| w.module(id).expect("inserted")).collect();
            let dev_segs: Vec<(Range<usize>, &LoraModule)> =
                segs.iter().zip(&modules).map(|((r, _), m)| (r.clone(), *m)).collect();
            let dx = stream.clone_htod(&x)?;
            let mut dy = stream.clone_htod(&y0)?;
            apply_into(&cuda, &dx.slice(..), &mut dy, *rows, &dev_segs)?;
            let got = stream.clone_dtoh(&dy)?;
            // The deltas, not y0 + delta: a small delta on a large y would hide its errors.
            let delta = |v: &[f32]| -> Vec<f32> { v.iter().zip(&y0).map(|(a, b)| a - b).collect() };
            let err = rel_l2(&delta(&got), &delta(&want));
            // Base-model rows must come back bit for bit.
            let covered: Vec<bool> = (0..*rows).map(|r| segs.iter().any(|(s, _)| s.contains(&r))).collect();
            let base_untouched = (0..*rows)
                .filter(|&r| !covered[r])
                .all(|r| got[r * out_f..(r + 1) * out_f] == y0[r * out_f..(r + 1) * out_f]);
            let ok = err <= TOLERANCE && base_untouched;
            *failed += usize::from(!ok);
            // Timed with the tables uploaded once, as a forward launches the kernels (one upload a step).
            let prepared = Prepared::new(&cuda, *rows, &dev_segs)?.expect("segments");
            let s = time(&cuda, || prepared.apply(&dx.slice(..), &mut dy))?;
            let moved = modules.iter().map(|m| m.bytes()).sum::<usize>() + 4 * rows * (in_f + 2 * out_f);
            let gbs = moved as f64 / s / 1e9;
            let ranks: Vec<String> = segs.iter().map(|(r, k)| format!("{}×r{k}", r.len())).collect();
            let ranks = if ranks.len() > 4 { format!("{} × r16", ranks.len()) } else { ranks.join(", ") };
            println!(
                "| {label} | {rows} | {in_f} → {out_f} | {ranks} | {err:.2e}{} | {:.1} | {gbs:.0} | {:.0}% | {} |",
                if base_untouched { "" } else { " (base rows changed!)" },
                s * 1e6,
                100.0 * gbs / copy_gbs,
                if ok { "ok" } else { "FAIL" }
            );
            out.push(serde_json::json!({
                "mix": label, "rows": rows, "in": in_f, "out": out_f, "rel_l2": err, "base_rows_untouched": base_untouched,
                "ok": ok, "us_per_call": s * 1e6, "gb_per_s": gbs,
            }));
        }
    }
    Ok(out)
}

/// Paged attention against `model::attention::paged_attention` (the CPU path the model runs).
fn attention_checks(device: &Device, copy_gbs: f64, failed: &mut usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let cuda = device.as_cuda_device()?.clone();
    let stream = cuda.cuda_stream();
    println!(
        "\n| paged attention | rows | contexts | window | rel L2 out / cache | µs/call | GB/s | % of copy | check |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut out = vec![];
    // Llama-3-8B's heads, then the fixture models' (head_dim 16), a head_dim that is not a multiple of 32, and
    // Llama 2 7B's (no GQA), the end-to-end benchmark's model, also at its 32-stream decode step.
    for (heads, kv_heads, hd) in [(32usize, 8usize, 128usize), (6, 3, 16), (8, 8, 80), (32, 32, 128)] {
        let bs = 16usize;
        let width = kv_heads * hd;
        // (past, len) per sequence: decode rows at several context lengths, then a prefill; for Llama 2, 32
        // decode rows at the contexts of the benchmark's decode (a 128-token prompt, up to 128 new tokens).
        let mut cases: Vec<(&str, Vec<(usize, usize)>)> = vec![
            ("decode ×4", vec![(0, 1), (37, 1), (500, 1), (1000, 1)]),
            ("decode ×3 + prefill 20", vec![(100, 1), (255, 1), (700, 1), (0, 20)]),
        ];
        if kv_heads == 32 {
            cases.push(("decode ×32", (0..32).map(|i| (128 + 4 * i, 1)).collect()));
        }
        for (ci, (label, shape_of)) in cases.iter().enumerate() {
            let num_blocks = shape_of.iter().map(|&(p, l)| (p + l).div_ceil(bs)).sum::<usize>().max(160);
            for window in [None, Some(64usize)] {
                let seed = 9000 + 10 * ci as u64 + window.map_or(0, |_| 1);
                let mut order: Vec<u32> = (0..num_blocks as u32).collect();
                Rng::new(seed).shuffle(&mut order);
                let mut next = 0;
                let tables: Vec<Vec<u32>> = shape_of
                    .iter()
                    .map(|&(past, len)| {
                        let n = (past + len).div_ceil(bs);
                        next += n;
                        order[next - n..next].to_vec()
                    })
                    .collect();
                let mut row = 0;
                let seqs: Vec<PagedSeq> = shape_of
                    .iter()
                    .zip(&tables)
                    .map(|(&(past, len), blocks)| {
                        let s = PagedSeq { row, len, past, blocks };
                        row += len;
                        s
                    })
                    .collect();
                let rows = row;
                let shape = AttnShape { heads, kv_heads, head_dim: hd, window };
                let (q, k, v) = (
                    normal(rows * heads * hd, seed + 1),
                    normal(rows * width, seed + 2),
                    normal(rows * width, seed + 3),
                );
                let (k0, v0) = (normal(num_blocks * bs * width, seed + 4), normal(num_blocks * bs * width, seed + 5));
                // RoPE on the CPU first (the kernels apply it as they write keys and read queries).
                let positions: Vec<usize> = shape_of.iter().flat_map(|&(past, len)| past..past + len).collect();
                let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
                let (cos, sin) = rope_tables(&positions, &inv_freq);
                let (mut q_rot, mut k_rot) = (q.clone(), k.clone());
                rope_in_place(&mut q_rot, heads, hd, &cos, &sin);
                rope_in_place(&mut k_rot, kv_heads, hd, &cos, &sin);
                let mut cpu_cache = LayerKv { block_size: bs, k: k0.clone(), v: v0.clone() };
                let want = paged_attention(&q_rot, &k_rot, &v, &seqs, &mut cpu_cache, &shape);

                let mut cache = LayerKvCuda { block_size: bs, k: stream.clone_htod(&k0)?, v: stream.clone_htod(&v0)? };
                let (dq, dk, dv) = (stream.clone_htod(&q)?, stream.clone_htod(&k)?, stream.clone_htod(&v)?);
                let mut dout = stream.clone_htod(&vec![f32::NAN; rows * heads * hd])?;
                // Uploaded once per step, as the forward does (the timing is the kernels').
                let step = StepTables::upload(&cuda, &seqs, bs, (&cos, &sin, hd / 2))?;
                let attend = |cache: &mut LayerKvCuda, dout: &mut CudaSlice<f32>| {
                    paged_attention_into(&cuda, &dq.slice(..), &dk.slice(..), &dv.slice(..), &step, cache, &shape, dout)
                };
                attend(&mut cache, &mut dout)?;
                let got = stream.clone_dtoh(&dout)?;
                let err = rel_l2(&got, &want);
                let cache_err = rel_l2(&stream.clone_dtoh(&cache.k)?, &cpu_cache.k)
                    .max(rel_l2(&stream.clone_dtoh(&cache.v)?, &cpu_cache.v));
                let ok = err <= TOLERANCE && cache_err == 0.0;
                *failed += usize::from(!ok);
                let s = time(&cuda, || attend(&mut cache, &mut dout))?;
                // Bytes: every visible key and value once per kv head, plus q and out.
                let keys: usize = shape_of
                    .iter()
                    .flat_map(|&(past, len)| (past..past + len).map(move |p| window.map_or(p + 1, |w| (p + 1).min(w))))
                    .sum();
                let moved = 4 * (2 * keys * width + 2 * rows * heads * hd);
                let gbs = moved as f64 / s / 1e9;
                let contexts: Vec<String> = shape_of.iter().map(|&(p, l)| format!("{}", p + l)).collect();
                let kernel = loraserve::gpu::launch::paged_attention(rows, heads, kv_heads, hd, window)
                    .map_err(anyhow::Error::msg)?
                    .1
                    .kernel;
                let contexts = if contexts.len() > 8 {
                    format!("{} … {}", contexts[0], contexts[contexts.len() - 1])
                } else {
                    contexts.join(", ")
                };
                println!(
                "| {label}, {heads}/{kv_heads} heads × {hd} ({kernel}) | {rows} | {contexts} | {} | {err:.2e} / {cache_err:.1e} | {:.1} | {gbs:.0} | {:.0}% | {} |",
                window.map_or("-".to_string(), |w| w.to_string()),
                s * 1e6,
                100.0 * gbs / copy_gbs,
                if ok { "ok" } else { "FAIL" }
            );
                out.push(serde_json::json!({
                    "case": label, "kernel": kernel, "heads": heads, "kv_heads": kv_heads, "head_dim": hd, "rows": rows, "window": window,
                    "rel_l2": err, "cache_rel_l2": cache_err, "ok": ok, "us_per_call": s * 1e6, "gb_per_s": gbs,
                }));
            }
        }
    }
    Ok(out)
}

/// Greedy picks against `engine::sampler::argmax`: every index equal. Rows are random, some with the maximum
/// tied at a high index in an early thread and a low one in a later thread, or with NaN around it.
fn argmax_checks(device: &Device, copy_gbs: f64, failed: &mut usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let cuda = device.as_cuda_device()?.clone();
    let stream = cuda.cuda_stream();
    println!("\n| argmax | rows × vocab | indices equal | µs/call | GB/s | % of copy | check |");
    println!("|---|---|---|---|---|---|---|");
    let mut out = vec![];
    for vocab in [32000usize, 128256] {
        for rows in [1usize, 32] {
            let mut logits = normal(rows * vocab, 12_000 + (vocab + rows) as u64);
            for (r, row) in logits.chunks_mut(vocab).enumerate() {
                match r % 4 {
                    1 => [256 * (r + 1), r].iter().for_each(|&i| row[i] = 100.0),
                    2 => [r, r + 1, vocab - 1].iter().for_each(|&i| row[i] = f32::NAN),
                    _ => {}
                }
            }
            let want: Vec<Option<u32>> = logits.chunks(vocab).map(loraserve::engine::sampler::argmax).collect();
            let dl = stream.clone_htod(&logits)?;
            let mut dout = stream.clone_htod(&vec![u32::MAX - 1; rows])?;
            argmax_into(&cuda, &dl.slice(..), rows, vocab, &mut dout)?;
            let got: Vec<Option<u32>> =
                stream.clone_dtoh(&dout)?.into_iter().map(loraserve::gpu::launch::argmax_pick).collect();
            // The tensor path (what the engine calls) must pick the same.
            let t = Tensor::from_vec(logits, (rows, vocab), device)?;
            let op = loraserve::gpu::sample::argmax_rows(&t)?;
            let equal = got.iter().zip(&want).filter(|(g, w)| g == w).count();
            let ok = got == want && op == want;
            *failed += usize::from(!ok);
            let s = time(&cuda, || argmax_into(&cuda, &dl.slice(..), rows, vocab, &mut dout))?;
            let gbs = (4 * rows * (vocab + 1)) as f64 / s / 1e9;
            println!(
                "| argmax_rows | {rows} × {vocab} | {equal}/{rows}{} | {:.1} | {gbs:.0} | {:.0}% | {} |",
                if op == want { "" } else { " (tensor path differs)" },
                s * 1e6,
                100.0 * gbs / copy_gbs,
                if ok { "ok" } else { "FAIL" }
            );
            out.push(serde_json::json!({
                "rows": rows, "vocab": vocab, "equal": equal, "tensor_path_equal": op == want, "ok": ok,
                "us_per_call": s * 1e6, "gb_per_s": gbs,
            }));
        }
    }
    Ok(out)
}

/// The fused element-wise kernels against the CPU ops they replace: `x + d` (bit for bit) then
/// `candle_nn::ops::rms_norm`, and `silu(g) · u`; the raw launch and the tensor op the model calls.
fn fused_checks(device: &Device, copy_gbs: f64, failed: &mut usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let cuda = device.as_cuda_device()?.clone();
    let stream = cuda.cuda_stream();
    let cpu = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu);
    println!("\n| fused | rows × width | rel L2 vs CPU (op) | µs/call | GB/s | % of copy | check |");
    println!("|---|---|---|---|---|---|---|");
    let mut out = vec![];
    let eps = 1e-5f32;
    for (rows, hidden) in [(1usize, 4096usize), (32, 4096), (512, 4096), (32, 5120)] {
        let n = rows * hidden;
        let seed = 13_000 + n as u64;
        let x: Vec<f32> = normal(n, seed).iter().map(|v| 3.0 * v).collect();
        let (d, w) = (normal(n, seed + 1), normal(hidden, seed + 2));
        let sum = (cpu(&x, &[rows, hidden])? + cpu(&d, &[rows, hidden])?)?;
        let want_h = candle_nn::ops::rms_norm(&sum, &cpu(&w, &[hidden])?, eps)?.flatten_all()?.to_vec1::<f32>()?;
        let want_x = sum.flatten_all()?.to_vec1::<f32>()?;
        let (dx, dd, dw) = (stream.clone_htod(&x)?, stream.clone_htod(&d)?, stream.clone_htod(&w)?);
        let mut dout = stream.clone_htod(&vec![f32::NAN; 2 * n])?;
        {
            let (mut xo, mut h) = dout.split_at_mut(n);
            add_rms_norm_into(
                &cuda,
                &dx.slice(..),
                &dd.slice(..),
                &dw.slice(..),
                (rows, hidden),
                eps,
                &mut xo,
                &mut h,
            )?;
        }
        let got = stream.clone_dtoh(&dout)?;
        let same_x = got[..n].iter().zip(&want_x).all(|(a, b)| a.to_bits() == b.to_bits());
        let err = rel_l2(&got[n..], &want_h);
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, device);
        let (ox, oh) = loraserve::gpu::fused::add_rms_norm(
            &t(&x, &[rows, hidden])?,
            &t(&d, &[rows, hidden])?,
            &t(&w, &[hidden])?,
            eps,
        )?;
        let op_x = ox.flatten_all()?.to_vec1::<f32>()?;
        let op_err = rel_l2(&oh.flatten_all()?.to_vec1::<f32>()?, &want_h);
        let ok = same_x && op_x == want_x && err <= TOLERANCE && op_err <= TOLERANCE;
        *failed += usize::from(!ok);
        let s = time(&cuda, || {
            let (mut xo, mut h) = dout.split_at_mut(n);
            add_rms_norm_into(&cuda, &dx.slice(..), &dd.slice(..), &dw.slice(..), (rows, hidden), eps, &mut xo, &mut h)
        })?;
        let gbs = (4 * (4 * n + hidden)) as f64 / s / 1e9;
        println!(
            "| add_rms_norm | {rows} × {hidden} | {err:.2e} ({op_err:.2e}){} | {:.1} | {gbs:.0} | {:.0}% | {} |",
            if same_x && op_x == want_x { "" } else { ", x + d differs" },
            s * 1e6,
            100.0 * gbs / copy_gbs,
            if ok { "ok" } else { "FAIL" }
        );
        out.push(serde_json::json!({
            "kernel": "add_rms_norm", "rows": rows, "width": hidden, "rel_l2": err, "op_rel_l2": op_err,
            "sum_exact": same_x && op_x == want_x, "ok": ok, "us_per_call": s * 1e6, "gb_per_s": gbs,
        }));
    }
    for (rows, width) in [(1usize, 11008usize), (32, 11008), (32, 14336), (512, 14336)] {
        let n = rows * width;
        let seed = 14_000 + n as u64;
        let g: Vec<f32> = normal(n, seed).iter().map(|v| 4.0 * v).collect();
        let u = normal(n, seed + 1);
        let want = (candle_nn::ops::silu(&cpu(&g, &[n])?)? * cpu(&u, &[n])?)?.to_vec1::<f32>()?;
        let (dg, du) = (stream.clone_htod(&g)?, stream.clone_htod(&u)?);
        let mut dout = stream.clone_htod(&vec![f32::NAN; n])?;
        silu_mul_into(&cuda, &dg.slice(..), &du.slice(..), n, &mut dout.slice_mut(..))?;
        let err = rel_l2(&stream.clone_dtoh(&dout)?, &want);
        let op = loraserve::gpu::fused::silu_mul(
            &Tensor::from_slice(&g, (rows, width), device)?,
            &Tensor::from_slice(&u, (rows, width), device)?,
        )?;
        let op_err = rel_l2(&op.flatten_all()?.to_vec1::<f32>()?, &want);
        let ok = err <= TOLERANCE && op_err <= TOLERANCE;
        *failed += usize::from(!ok);
        let s = time(&cuda, || silu_mul_into(&cuda, &dg.slice(..), &du.slice(..), n, &mut dout.slice_mut(..)))?;
        let gbs = (12 * n) as f64 / s / 1e9;
        println!(
            "| silu_mul | {rows} × {width} | {err:.2e} ({op_err:.2e}) | {:.1} | {gbs:.0} | {:.0}% | {} |",
            s * 1e6,
            100.0 * gbs / copy_gbs,
            if ok { "ok" } else { "FAIL" }
        );
        out.push(serde_json::json!({
            "kernel": "silu_mul", "rows": rows, "width": width, "rel_l2": err, "op_rel_l2": op_err, "ok": ok,
            "us_per_call": s * 1e6, "gb_per_s": gbs,
        }));
    }
    Ok(out)
}

/// The median milliseconds of 5 calls of `f` (each synchronized), after one warm-up, and the last result.
fn median_ms<T>(device: &Device, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    f()?;
    let mut ms = vec![];
    let mut last = None;
    for _ in 0..5 {
        let t = Instant::now();
        let out = f()?;
        device.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some(out);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[2], last.expect("5 calls")))
}

/// Whether two adapters hold the same values (any devices).
fn same_adapter(a: &LoraWeights, b: &LoraWeights) -> anyhow::Result<bool> {
    let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    for ((ia, ma), (ib, mb)) in a.targets().zip(b.targets()) {
        if ia != ib || ma.scale != mb.scale || values(&ma.a)? != values(&mb.a)? || values(&ma.b_t)? != values(&mb.b_t)?
        {
            return Ok(false);
        }
    }
    Ok(a.targets().count() == b.targets().count())
}

/// One adapter's host → device transfer, as the adapter cache could make it: `synthetic:llama2-7b`'s layout,
/// rank 16 on q,k,v,o (67 MB of f32). (1) A copy per tensor from pageable memory (`LoraWeights::to_device`,
/// what a promotion does today); (2) packed (`lora::packed`) into one pageable buffer, one copy; (3) packed
/// into page-locked memory, one copy, with its allocation and the packing timed apart (a host tier in pinned
/// memory pays them once per disk load, or never with a pool). Every copy is read back and compared.
fn transfer_checks(device: &Device, failed: &mut usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let cuda = device.as_cuda_device()?;
    let layout = shape_config("llama2-7b").expect("a known shape").lora_layout();
    let w = random_adapter(&layout, 16, &ATTENTION, 5, &Device::Cpu)?;
    let packed = w.packed_layout()?;
    let bytes = w.bytes();
    println!(
        "\n| adapter transfer, {:.0} MB in {} tensors | ms (median of 5) | GB/s | read back equal | check |",
        bytes as f64 / 1e6,
        2 * w.targets().count()
    );
    println!("|---|---|---|---|---|");
    let mut rows = vec![];
    let mut row = |what: &str, ms: f64, equal: Option<bool>| {
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        let ok = equal != Some(false);
        *failed += usize::from(!ok);
        let shown = equal.map_or("", |e| if e { "yes" } else { "NO" });
        println!("| {what} | {ms:.2} | {gbs:.1} | {shown} | {} |", if ok { "ok" } else { "FAIL" });
        rows.push(serde_json::json!({ "what": what, "ms": ms, "gb_per_s": gbs, "equal": equal, "ok": ok }));
    };

    let (ms, copy) = median_ms(device, || Ok(w.to_device(device)?))?;
    row("a copy per tensor, pageable (the cache today)", ms, Some(same_adapter(&w, &copy)?));
    drop(copy);

    let mut host = vec![0f32; packed.len];
    let (ms, ()) = median_ms(device, || Ok(w.pack_into(&packed, &mut host)?))?;
    row("packing into pageable memory", ms, None);
    let (ms, copy) =
        median_ms(device, || Ok(LoraWeights::from_packed(&Tensor::from_slice(&host, packed.len, device)?, &packed)?))?;
    row("packed, pageable: one copy", ms, Some(same_adapter(&w, &copy)?));
    drop((copy, host));

    let context = cuda.cuda_stream().context().clone();
    // SAFETY: the buffer is written whole by pack_into (padding included) before anything reads it.
    let (ms, mut pinned) = median_ms(device, || Ok(unsafe { context.alloc_pinned::<f32>(packed.len) }.w()?))?;
    row("allocating page-locked memory", ms, None);
    let (ms, ()) = median_ms(device, || Ok(w.pack_into(&packed, pinned.as_mut_slice().w()?)?))?;
    row("packing into page-locked memory", ms, None);
    let (ms, copy) = median_ms(device, || {
        Ok(LoraWeights::from_packed(&Tensor::from_slice(pinned.as_slice().w()?, packed.len, device)?, &packed)?)
    })?;
    row("packed, page-locked: one copy", ms, Some(same_adapter(&w, &copy)?));
    drop(copy);
    let _ = context.bind_to_thread();
    drop(pinned);
    Ok(rows)
}
