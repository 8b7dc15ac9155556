use candle_core::{DType, Device};
use loraserve::lora::LoraRows;
use loraserve::model::kv_cache::PagedKvCache;
use loraserve::model::{synthetic, AttentionMode, Batch, LoadOptions, SeqInput};
use loraserve::quant::QuantMode;
fn main() {
    let shape = std::env::args().nth(1).unwrap_or("demo".into());
    let steps: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(2000);
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu };
    let model = synthetic::build(&shape, &opts, 7).unwrap();
    let geo = model.kv_geometry(16);
    let mut cache = PagedKvCache::new(geo, geo.blocks_for(steps + 2));
    let blocks = cache.allocator_mut().allocate(geo.blocks_for(steps + 2)).unwrap();
    let t = std::time::Instant::now();
    for s in 0..steps {
        let toks = [(s % 200) as u32 + 3];
        let seqs = [SeqInput { len: 1, past: s, blocks: &blocks }];
        let batch = Batch { tokens: &toks, seqs: &seqs, logit_rows: &[0] };
        model.forward(&batch, AttentionMode::Paged(&mut cache), &LoraRows::None).unwrap();
    }
    println!("{:.3} ms/step", t.elapsed().as_secs_f64() * 1e3 / steps as f64);
}
