//! NF4 matmul versus dense f32 matmul on this machine: 4096×4096 and 11008×4096 weights at 1, 8 and 32
//! input rows, as GB/s of weight bytes read and as a fraction of the memory bandwidth measured in the same
//! run (a multi-threaded streaming read of a 1 GiB buffer).
//!
//! `cargo bench --bench nf4_matmul`

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};
use loraserve::cpu_linear::DenseLinear;
use loraserve::quant::{matmul, Nf4Weight};
use loraserve::rng::Rng;
use rayon::prelude::*;

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Streaming read bandwidth (GB/s) with all threads: a vectorized pass over a 1 GiB buffer (each chunk
/// dotted with itself, so the arithmetic is far below what the reads cost).
fn read_bandwidth() -> f64 {
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let secs = time(5, || {
        let s: f32 = buf.par_chunks(1 << 16).map(|c| loraserve::cpu_linear::dot(c, c)).sum();
        black_box(s);
    });
    (n * 4) as f64 / secs / 1e9
}

fn main() {
    let bw = read_bandwidth();
    let threads = rayon::current_num_threads();
    println!("NF4 vs dense f32 matmul, {threads} threads; measured read bandwidth {bw:.1} GB/s\n");
    println!("| weight | rows | dense ms | dense GB/s | dense %bw | nf4 ms | nf4 GB/s | nf4 %bw | nf4 speedup |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rng = Rng::new(1);
    for (n, k) in [(4096usize, 4096usize), (11008, 4096)] {
        let values: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32 * 0.02).collect();
        let nf4 = Nf4Weight::quantize(&values, &[n, k], true);
        let dense = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        let dense_bytes = (n * k * 4) as f64;
        let nf4_bytes = nf4.resident_bytes() as f64;
        for m in [1usize, 8, 32] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let reps = if m == 32 { 5 } else { 15 };
            let td = time(reps, || {
                black_box(xt.apply_op2_no_bwd(&dense, &DenseLinear).unwrap());
            });
            let tq = time(reps, || {
                black_box(matmul::matmul(&x, m, &nf4));
            });
            println!(
                "| {n}×{k} | {m} | {:.2} | {:.1} | {:.0}% | {:.2} | {:.1} | {:.0}% | {:.2}× |",
                td * 1e3,
                dense_bytes / td / 1e9,
                100.0 * dense_bytes / td / 1e9 / bw,
                tq * 1e3,
                nf4_bytes / tq / 1e9,
                100.0 * nf4_bytes / tq / 1e9 / bw,
                td / tq
            );
        }
    }
}
