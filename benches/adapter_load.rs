//! Cold adapter load: a rank-16 q,k,v,o adapter for a 7B-shape base (33.6 MB in bf16), from the page cache to
//! ready in the device tier, p50 / p99 over 50 loads; and the decode-step stall those loads cause to running
//! requests (a ~1B NF4 model decoding a batch of 4 on the same cores, with and without loads in flight).
//!
//! `cargo bench --bench adapter_load`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use loraserve::lora::cache::{AdapterCache, CacheConfig};
use loraserve::lora::peft::{self, write_dir, AdapterMeta, BaseLayout};
use loraserve::lora::store::AdapterStore;
use loraserve::lora::synthetic::{random_adapter, ATTENTION};
use loraserve::lora::LoraRows;
use loraserve::model::kv_cache::PagedKvCache;
use loraserve::model::{synthetic, AttentionMode, Batch, LoadOptions, Model, SeqInput};
use loraserve::quant::QuantMode;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Decode-step times (ms) of a batch of 4 while `busy` work runs beside it.
fn step_times(model: &Model, steps: usize) -> Vec<f64> {
    let geo = model.kv_geometry(16);
    let mut cache = PagedKvCache::new(geo, 4 * geo.blocks_for(steps + 2));
    let tables: Vec<Vec<u32>> =
        (0..4).map(|_| cache.allocator_mut().allocate(geo.blocks_for(steps + 2)).unwrap()).collect();
    (0..steps)
        .map(|s| {
            let tokens = [1u32, 2, 3, 4];
            let seqs: Vec<SeqInput> = tables.iter().map(|t| SeqInput { len: 1, past: s, blocks: t }).collect();
            let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &[0, 1, 2, 3] };
            let t = Instant::now();
            model.forward(&batch, AttentionMode::Paged(&mut cache), &LoraRows::None).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let config = synthetic::shape_config("llama2-7b").unwrap();
    // The layout of a 7B base, without building the base itself.
    let layout = BaseLayout {
        layers: config.num_hidden_layers,
        dims: [(4096, 4096), (4096, 4096), (4096, 4096), (4096, 4096), (4096, 11008), (4096, 11008), (11008, 4096)],
    };
    let weights = random_adapter(&layout, 16, &ATTENTION, 5, &Device::Cpu).unwrap();
    let meta = AdapterMeta {
        r: 16,
        lora_alpha: 32.0,
        use_rslora: false,
        lora_dropout: 0.0,
        base_model_name_or_path: "llama2-7b".into(),
        dtype: DType::BF16,
    };
    write_dir(&root.join("a7b"), &weights, &meta).unwrap();
    let file_mb = std::fs::metadata(root.join("a7b/adapter_model.safetensors")).unwrap().len() as f64 / 1e6;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = AdapterStore::open(root).unwrap();
    let cache = AdapterCache::new(
        store,
        layout.clone(),
        Device::Cpu,
        CacheConfig { device_bytes: 1 << 30, host_bytes: 0, default_wait: Duration::from_secs(10) },
    );
    let mut loads = Vec::new();
    for _ in 0..51 {
        rt.block_on(cache.unload("a7b")).unwrap();
        let t = Instant::now();
        rt.block_on(cache.acquire("a7b", None)).unwrap();
        loads.push(t.elapsed().as_secs_f64() * 1e3);
    }
    loads.remove(0); // the first read also warms the page cache
    let (p50, p99) = (percentile(&mut loads.clone(), 0.5), percentile(&mut loads, 0.99));
    println!("cold adapter load (page cache → device tier), rank-16 q,k,v,o for a 7B base, {file_mb:.1} MB bf16 on disk, {} threads", rayon::current_num_threads());
    println!("| loads | p50 ms | p99 ms |\n|---|---|---|\n| 50 | {p50:.1} | {p99:.1} |\n");

    // The file's conversion alone, one core (a CPU server's cache) against all cores (a GPU server's cache).
    let dir = root.join("a7b");
    let ms = |load: fn(&std::path::Path, &BaseLayout, &Device) -> Result<_, _>| {
        let mut v: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                let a: loraserve::lora::peft::LoadedAdapter = load(&dir, &layout, &Device::Cpu).unwrap();
                drop(a);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        percentile(&mut v, 0.5)
    };
    let (one, all) = (ms(peft::load_dir), ms(peft::load_dir_parallel));
    println!(
        "peft::load_dir, p50 of 20: one core {one:.1} ms, all {} cores {all:.1} ms ({:.2}×)\n",
        rayon::current_num_threads(),
        one / all
    );

    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu };
    let model = synthetic::build("llama-1b", &opts, 7).unwrap();
    step_times(&model, 3);
    let mut quiet = step_times(&model, 20);
    let busy = Arc::new(AtomicBool::new(true));
    let loader = {
        let (busy, cache) = (busy.clone(), cache.clone());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while busy.load(Ordering::Relaxed) {
                handle.block_on(cache.unload("a7b")).unwrap();
                handle.block_on(cache.acquire("a7b", None)).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut loaded = step_times(&model, 20);
    busy.store(false, Ordering::Relaxed);
    let n_loads = loader.join().unwrap();
    println!("decode-step stall: llama-1b NF4, batch 4, 20 steps each, {n_loads} adapter loads running back to back beside the second run");
    println!("| run | p50 step ms | p99 step ms |\n|---|---|---|");
    println!("| no loads | {:.1} | {:.1} |", percentile(&mut quiet.clone(), 0.5), percentile(&mut quiet, 0.99));
    println!(
        "| loads in flight | {:.1} | {:.1} |",
        percentile(&mut loaded.clone(), 0.5),
        percentile(&mut loaded, 0.99)
    );
}
