use candle_core::{Device, Tensor, DType};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    for (k, n) in [(256usize, 768usize), (256, 256), (2048, 5632)] {
        let w = Tensor::randn(0f32, 1., (n, k), &d).unwrap();
        let x = Tensor::randn(0f32, 1., (1, k), &d).unwrap();
        let iters = if n > 1000 { 50 } else { 2000 };
        let t = Instant::now();
        for _ in 0..iters { let _ = x.matmul(&w.t().unwrap()).unwrap(); }
        let a = t.elapsed().as_secs_f64() / iters as f64 * 1e6;
        let wt = w.t().unwrap().contiguous().unwrap();
        let t = Instant::now();
        for _ in 0..iters { let _ = x.matmul(&wt).unwrap(); }
        let b = t.elapsed().as_secs_f64() / iters as f64 * 1e6;
        let t = Instant::now();
        for _ in 0..iters { let _ = (x.clone() + 1.0).unwrap(); }
        let c = t.elapsed().as_secs_f64() / iters as f64 * 1e6;
        let x16 = x.to_dtype(DType::BF16).unwrap();
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let t = Instant::now();
        for _ in 0..iters { let _ = x16.matmul(&w16.t().unwrap()).unwrap(); }
        let e = t.elapsed().as_secs_f64() / iters as f64 * 1e6;
        println!("{k}x{n}: matmul(w.t) {a:.1}us  matmul(contig wt) {b:.1}us  add {c:.1}us  bf16 {e:.1}us");
    }
}
