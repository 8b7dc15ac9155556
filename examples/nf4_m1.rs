use loraserve::quant::{matmul, Nf4Weight};
use loraserve::rng::Rng;
fn main() {
    let (n, k) = (4096usize, 4096usize);
    let m: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1);
    let mut rng = Rng::new(1);
    let values: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32 * 0.02).collect();
    let w = Nf4Weight::quantize(&values, &[n, k], true);
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let t = std::time::Instant::now();
    let iters = 200;
    for _ in 0..iters { std::hint::black_box(matmul::matmul(&x, m, &w)); }
    println!("{:.3} ms", t.elapsed().as_secs_f64() * 1e3 / iters as f64);
}
