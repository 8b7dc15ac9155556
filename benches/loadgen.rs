//! Load generator: N concurrent streaming clients over M adapters with a mix of prompt and output lengths,
//! against a running server (`--addr`) or one started in-process on loopback. Reports throughput
//! (generated tokens/s), time to first token and inter-token latency p50/p99, and errors.
//!
//! `cargo bench --bench loadgen` runs the matrix recorded in benches/NOTES.md: the demo model and a ~1B
//! NF4 shape (random weights), 1, 8 and 32 concurrent streams, one adapter versus 32 distinct adapters; then,
//! on the demo model (`LORASERVE_BENCH_PREFIX_SHAPES` names others), prompts that all start with the same
//! system prompt, served with and without the prefix cache.
//! `cargo bench --bench loadgen -- --addr http://127.0.0.1:50051 --adapters a,b,c --concurrency 16`
//! drives an external server instead.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use loraserve::engine::EngineConfig;
use loraserve::lora::cache::CacheConfig;
use loraserve::model::{LoadOptions, ModelSpec};
use loraserve::quant::QuantMode;
use loraserve::rng::Rng;
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::GenerateRequest;
use loraserve::server::{self, service::Limits, ServeConfig, ServerHandle};
use support::{pct, write_adapters, Outcome};

#[derive(Clone)]
struct Load {
    concurrency: usize,
    requests_per_client: usize,
    adapters: Vec<String>,
    /// Put before every prompt (a shared system prompt).
    prefix: String,
    prompt_words: (usize, usize),
    new_tokens: (usize, usize),
}

const WORDS: &[&str] =
    &["alpha", "beta", "serve", "adapter", "model", "token", "river", "stone", "blue", "quick", "seven", "light"];

async fn run(addr: &str, load: &Load) -> Outcome {
    let started = Instant::now();
    let tasks: Vec<_> = (0..load.concurrency)
        .map(|c| {
            let (addr, load) = (addr.to_string(), load.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut client = LoraServeClient::connect(addr).await.expect("connect");
                let mut rng = Rng::new(c as u64);
                for r in 0..load.requests_per_client {
                    let words = load.prompt_words.0
                        + rng.below((load.prompt_words.1 - load.prompt_words.0 + 1) as u64) as usize;
                    let prompt: Vec<&str> = (0..words).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect();
                    let n = load.new_tokens.0 + rng.below((load.new_tokens.1 - load.new_tokens.0 + 1) as u64) as usize;
                    let adapter = if load.adapters.is_empty() {
                        String::new()
                    } else {
                        load.adapters[(c + r * load.concurrency) % load.adapters.len()].clone()
                    };
                    let req = GenerateRequest {
                        adapter_id: adapter,
                        prompt: format!("{}{}", load.prefix, prompt.join(" ")),
                        max_new_tokens: n as u32,
                        ..Default::default()
                    };
                    support::stream(&mut client, req, &mut out).await;
                }
                out
            })
        })
        .collect();
    let mut total = Outcome::default();
    for t in tasks {
        total.merge(t.await.expect("client task"));
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

fn row(label: &str, o: &mut Outcome) -> f64 {
    let tps = o.tokens as f64 / o.seconds;
    println!(
        "| {label} | {} | {} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {} |",
        o.requests,
        o.tokens,
        tps,
        pct(&mut o.ttft, 0.5) * 1e3,
        pct(&mut o.ttft, 0.99) * 1e3,
        pct(&mut o.itl, 0.5) * 1e3,
        pct(&mut o.itl, 0.99) * 1e3,
        o.errors.len()
    );
    tps
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let header = "| scenario | requests | tokens | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |\n|---|---|---|---|---|---|---|";
    if let Some(addr) = arg("--addr") {
        let adapters: Vec<String> = arg("--adapters")
            .map(|a| a.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        let concurrency: usize = arg("--concurrency").and_then(|c| c.parse().ok()).unwrap_or(8);
        let load = Load {
            concurrency,
            requests_per_client: arg("--requests").and_then(|c| c.parse().ok()).unwrap_or(4),
            adapters,
            prefix: String::new(),
            prompt_words: (4, 24),
            new_tokens: (8, 32),
        };
        println!("{header}");
        let mut o = rt.block_on(run(&addr, &load));
        row(&format!("{concurrency} streams"), &mut o);
        return;
    }
    let shapes = std::env::var("LORASERVE_BENCH_SHAPES").unwrap_or_else(|_| "demo,llama-1b".into());
    for shape in shapes.split(',') {
        let tmp = tempfile::tempdir().unwrap();
        let ids = write_adapters(tmp.path(), shape, 32).unwrap();
        let h = serve(&rt, shape, tmp.path(), &ids, true);
        let (tokens, per_client) = if shape == "demo" { ((16, 48), 8) } else { ((16, 16), 2) };
        let addr = format!("http://{}", h.grpc_addr);
        println!(
            "\n{shape} (NF4 base, f32 compute), {} threads, output {}..{} tokens, prompts 4..24 words",
            rayon::current_num_threads(),
            tokens.0,
            tokens.1
        );
        println!("{header}");
        for concurrency in [1usize, 8, 32] {
            let mut tps = [0f64; 2];
            for (i, adapters) in [vec![ids[0].clone()], ids.clone()].into_iter().enumerate() {
                let load = Load {
                    concurrency,
                    requests_per_client: per_client,
                    adapters,
                    prefix: String::new(),
                    prompt_words: (4, 24),
                    new_tokens: tokens,
                };
                let mut o = rt.block_on(run(&addr, &load));
                let label = format!("{concurrency} streams, {}", if i == 0 { "1 adapter" } else { "32 adapters" });
                tps[i] = row(&label, &mut o);
            }
            println!("| {concurrency} streams: 32 adapters / 1 adapter | | | {:.2}× | | | |", tps[1] / tps[0]);
        }
        let prefix_shapes = std::env::var("LORASERVE_BENCH_PREFIX_SHAPES").unwrap_or_else(|_| "demo".into());
        if prefix_shapes.split(',').any(|s| s == shape) {
            shared_prefix(&rt, shape, tmp.path(), &ids, h, tokens, per_client, header);
        } else {
            h.shutdown();
            rt.block_on(h.wait()).unwrap();
        }
    }
}

/// An in-process server of `shape` over the adapters in `dir`, preloaded.
fn serve(rt: &tokio::runtime::Runtime, shape: &str, dir: &Path, ids: &[String], prefix_caching: bool) -> ServerHandle {
    let cfg = ServeConfig {
        model: if shape == "demo" { ModelSpec::Demo } else { ModelSpec::Synthetic(shape.into()) },
        load: LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu },
        chat_template: None,
        generation_config: true,
        adapters: dir.to_path_buf(),
        cache: CacheConfig { device_bytes: 4 << 30, host_bytes: 4 << 30, default_wait: Duration::from_secs(30) },
        engine: EngineConfig {
            max_batch_rows: 32,
            max_batch_tokens: 512,
            block_size: 16,
            kv_cache_bytes: 2 << 30,
            queue_capacity: 1024,
            prefix_caching,
        },
        limits: Limits::default(),
        preload: ids.to_vec(),
        api_keys: None,
        tls: None,
        max_request_bytes: 1 << 20,
        drain_timeout: Duration::from_secs(5),
        template_worker: Some(env!("CARGO_BIN_EXE_server").into()),
    };
    rt.block_on(async {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = server::start(cfg, grpc, metrics).await.unwrap();
        assert!(h.ready().await);
        h
    })
}

/// 8 streams on one adapter whose prompts all start with the same 341-byte system prompt: served by `cached`
/// (prefix cache on), then by a server of the same shape without it.
#[allow(clippy::too_many_arguments)]
fn shared_prefix(
    rt: &tokio::runtime::Runtime,
    shape: &str,
    dir: &Path,
    ids: &[String],
    cached: ServerHandle,
    new_tokens: (usize, usize),
    per_client: usize,
    header: &str,
) {
    let system = "You are a careful assistant for a river survey team. Answer in short plain sentences, name the \
                  stone or light reading you rely on, say seven words at most about anything you are unsure of, \
                  and never invent a token of data. Quick answers beat long ones; blue text marks a model's own \
                  guess, alpha text a measured value. The question follows.\n";
    let load = Load {
        concurrency: 8,
        requests_per_client: per_client,
        adapters: vec![ids[0].clone()],
        prefix: system.into(),
        prompt_words: (4, 24),
        new_tokens,
    };
    println!("\n{shape}: 8 streams, 1 adapter, every prompt after the same {}-byte system prompt", system.len());
    println!("{header}");
    let mut tps = [0f64; 2];
    let mut ttft = [0f64; 2];
    for (i, h) in [Some(cached), None].into_iter().enumerate() {
        let h = h.unwrap_or_else(|| serve(rt, shape, dir, ids, false));
        let mut o = rt.block_on(run(&format!("http://{}", h.grpc_addr), &load));
        tps[i] = row(if i == 0 { "prefix cache on" } else { "prefix cache off" }, &mut o);
        ttft[i] = pct(&mut o.ttft, 0.5);
        h.shutdown();
        rt.block_on(h.wait()).unwrap();
    }
    println!("| on / off | | | {:.2}× | TTFT p50 {:.2}× | | |", tps[0] / tps[1], ttft[0] / ttft[1]);
}
