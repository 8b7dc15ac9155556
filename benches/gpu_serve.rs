//! The GPU end to end (feature `cuda`; run on the device by `benches/gpu/run.sh`), through the real server
//! (in process, gRPC on loopback), in two parts:
//!
//! 1. **Fixtures.** Every peer-made fixture model (tests/fixtures: llama with GQA, mistral, qwen2 with biases
//!    and tied embeddings, the bitsandbytes NF4 llama, and the llama from a bf16 copy of its checkpoint, whose
//!    embeddings and head the GPU keeps in bf16), NF4 and dense bases, with all of its PEFT adapters:
//!    every prompt × (base + each adapter) is sent at once to a CPU server and to a GPU server, and the greedy
//!    token ids must be equal (every other request also asks for logprobs: one finite value ≤ 0 per token,
//!    within 1e-3 of the CPU's; every third scores its prompt, likewise); for the llama, so are its greedy
//!    requests under the sampling penalties. The prefix cache on the device: each prompt four times over (more
//!    than one 16-token KV block) is sent twice in the same burst, so copies share blocks another row computes
//!    in the same step or computed before; they too must equal the CPU's, and the GPU must report cached
//!    prompt tokens. Structured output: eight requests confined to a regex or to any JSON object (the host
//!    masks the rows the GPU computed) must equal the CPU's too.
//!    Figures: requests compared, equal, and how many GPU outputs also equal the peer's own greedy ids from
//!    transformers (informational: the CPU tests hold that bar); prompt tokens the GPU found cached.
//! 2. **Decode.** `synthetic:llama2-7b` (random weights, NF4, f32 compute) on the GPU: 1, 8 and 32 streams, one
//!    adapter versus 32 distinct rank-16 q,k,v,o adapters, 128-token prompts and 128 new tokens: tokens/s end
//!    to end, decode tokens/s (streams / step time), step time (inter-token p50), time to first token; cold
//!    adapter load (LoadAdapter on an adapter not yet cached: disk → host → device); host-tier promotion (an
//!    adapter evicted from the device tier coming back from RAM, no disk read); base resident bytes (the
//!    model's count and the device's free-memory drop at load) and the memory floor of one decode step.
//!
//! Everything goes to stdout as tables and to `$OUT/gpu_serve.json` (`$LORASERVE_BENCH_REPORT` names another
//! file under `$OUT`: `run.sh` runs this twice, the second time under the NF4 routes its kernel timings call
//! for), with the NF4 routing table in effect. Exit status 1 when any comparison fails.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use loraserve::engine::EngineConfig;
use loraserve::lora::cache::{AdapterCache, CacheConfig};
use loraserve::lora::peft::BaseLayout;
use loraserve::lora::store::AdapterStore;
use loraserve::model::{synthetic, LoadOptions, ModelSpec};
use loraserve::quant::QuantMode;
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::structured_output::Kind;
use loraserve::server::proto::{GenerateRequest, JsonObject, LoadAdapterRequest, StructuredOutput};
use loraserve::server::{self, service::Limits, ServeConfig, ServerHandle};
use support::{pct, write_adapters, Outcome};

/// The decode shape; `LORASERVE_BENCH_SHAPE` overrides it (with `LORASERVE_BENCH_DEVICE=cpu`, a dry run of the
/// harness on a machine without a GPU: `LORASERVE_BENCH_SHAPE=demo`).
fn shape() -> String {
    std::env::var("LORASERVE_BENCH_SHAPE").unwrap_or_else(|_| "llama2-7b".into())
}
const PROMPT_TOKENS: usize = 128;
const NEW_TOKENS: u32 = 128;

fn serve_config(
    model: ModelSpec,
    quant: QuantMode,
    device: Device,
    adapters: &Path,
    preload: Vec<String>,
    kv_cache_bytes: usize,
) -> ServeConfig {
    ServeConfig {
        model,
        load: LoadOptions { dtype: DType::F32, quant, device },
        chat_template: None,
        generation_config: true,
        adapters: adapters.to_path_buf(),
        cache: CacheConfig { device_bytes: 4 << 30, host_bytes: 8 << 30, default_wait: Duration::from_secs(60) },
        engine: EngineConfig {
            max_batch_rows: 32,
            max_batch_tokens: 4096,
            block_size: 16,
            kv_cache_bytes,
            queue_capacity: 1024,
            prefix_caching: true,
        },
        limits: Limits::default(),
        preload,
        api_keys: None,
        tls: None,
        max_request_bytes: 1 << 20,
        drain_timeout: Duration::from_secs(5),
        // No conversations: the device machine carries this bench alone.
        template_worker: None,
    }
}

async fn start(cfg: ServeConfig) -> anyhow::Result<ServerHandle> {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let h = server::start(cfg, grpc, metrics).await?;
    anyhow::ensure!(h.ready().await, "the server did not become ready");
    Ok(h)
}

async fn stop(h: ServerHandle) -> anyhow::Result<()> {
    h.shutdown();
    h.wait().await?;
    Ok(())
}

/// One request's outcome: its token ids, logprobs, prompt logprobs and cached prompt tokens, or the status it
/// failed with.
type Generated = Result<(Vec<u32>, Vec<f32>, Vec<f32>, u32), String>;

async fn greedy_all(addr: String, requests: &[GenerateRequest]) -> anyhow::Result<Vec<Generated>> {
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|req| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut client = LoraServeClient::connect(addr).await.map_err(|e| e.to_string())?;
                let r = client.generate(req).await.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
                let r = r.into_inner();
                Ok((r.token_ids, r.logprobs, r.prompt_logprobs, r.cached_prompt_tokens))
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await?);
    }
    Ok(out)
}

/// The fixtures: under the working directory (run.sh runs from the checkout's root, wherever the device
/// machine puts it), else where this binary was built.
fn fixtures_root() -> PathBuf {
    let here = PathBuf::from("tests/fixtures");
    if here.join("llama").is_dir() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }
}

/// One fixture's greedy requests, and the peer's ids for each.
type FixtureRequests = (Vec<GenerateRequest>, Vec<Vec<u32>>);

/// Every prompt × (base + each adapter) of `dir/expected.json`, every other one asking for logprobs and every
/// third for prompt logprobs; for the llama also the greedy requests under the sampling penalties (`llama-penalties/`). Rows with logprobs or
/// penalties come to the host whole while the other greedy rows of the same batches are picked on the GPU.
fn fixture_requests(dir: &Path) -> anyhow::Result<FixtureRequests> {
    let path = dir.join("expected.json");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let results = expected["results"].as_object().ok_or_else(|| anyhow::anyhow!("{}: no results", path.display()))?;
    let (mut requests, mut peer) = (vec![], vec![]);
    let request = |adapter: &str, p: &serde_json::Value, ids: &[u32]| GenerateRequest {
        adapter_id: adapter.to_string(),
        prompt: p["prompt"].as_str().unwrap_or_default().to_string(),
        max_new_tokens: ids.len() as u32,
        ..Default::default()
    };
    for (key, prompts) in results {
        let adapter = if key == "base" { "" } else { key.as_str() };
        for p in prompts.as_array().into_iter().flatten() {
            let ids: Vec<u32> = serde_json::from_value(p["greedy_new_ids"].clone())?;
            // Every other one asks for logprobs: its rows come to the host whole, the others' as the argmax.
            requests.push(GenerateRequest {
                logprobs: requests.len() % 2 == 1,
                prompt_logprobs: (requests.len() % 3 == 2).then_some(0),
                ..request(adapter, p, &ids)
            });
            peer.push(ids);
        }
    }
    let penalties = dir.with_file_name(format!("{}-penalties", dir.file_name().unwrap_or_default().to_string_lossy()));
    if penalties.is_dir() {
        let path = penalties.join("expected.json");
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let cases = expected["cases"].as_object().ok_or_else(|| anyhow::anyhow!("{}: no cases", path.display()))?;
        anyhow::ensure!(!cases.is_empty(), "{}: no cases", path.display());
        for (name, case) in cases {
            let adapter = case["adapter"].as_str().unwrap_or_default();
            let penalty = |k: &str| {
                let v = case[k].as_f64().ok_or_else(|| anyhow::anyhow!("{}: case {name}: no {k}", path.display()));
                v.map(|v| v as f32)
            };
            for p in case["results"].as_array().into_iter().flatten() {
                let ids: Vec<u32> = serde_json::from_value(p["new_ids"].clone())?;
                requests.push(GenerateRequest {
                    repetition_penalty: Some(penalty("repetition_penalty")?),
                    frequency_penalty: penalty("frequency_penalty")?,
                    presence_penalty: penalty("presence_penalty")?,
                    ..request(adapter, p, &ids)
                });
                peer.push(ids);
            }
        }
    }
    Ok((requests, peer))
}

/// Part 1: CPU and GPU servers agree on every fixture request. A configuration that errors is a failed row;
/// the others still run.
async fn fixtures(cuda: &Device) -> (Vec<serde_json::Value>, usize) {
    let root = fixtures_root();
    println!("| fixture | base | requests | GPU = CPU | GPU = transformers | logprobs, prompt logprobs: max GPU − CPU | GPU cached prompt tokens | check |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = vec![];
    // The llama again from a bf16 copy of its checkpoint: the GPU then keeps the embeddings and the head in
    // bf16 (`Model::assemble`), the CPU widens them at load; both compute in f32 from the same values.
    let bf16 = bf16_copy(&root.join("llama/model"));
    for name in ["llama", "mistral", "qwen2", "llama-bnb-nf4", "llama (bf16 checkpoint)"] {
        let quants: &[QuantMode] =
            if name == "llama-bnb-nf4" { &[QuantMode::Nf4] } else { &[QuantMode::Nf4, QuantMode::None] };
        for &quant in quants {
            let model = match (name, &bf16) {
                ("llama (bf16 checkpoint)", Ok(dir)) => Ok(dir.path().to_path_buf()),
                ("llama (bf16 checkpoint)", Err(e)) => Err(anyhow::anyhow!("making the bf16 copy: {e:#}")),
                _ => Ok(root.join(name).join("model")),
            };
            let row = match async { fixture(cuda, &root, name, &model?, quant).await }.await {
                Ok(row) => row,
                Err(e) => {
                    println!("| {name} | {quant:?} | | | | | | FAIL ({e:#}) |");
                    serde_json::json!({ "fixture": name, "quant": format!("{quant:?}"), "ok": false, "error": format!("{e:#}") })
                }
            };
            rows.push(row);
        }
    }
    let failed = rows.iter().filter(|r| r["ok"] != true).count();
    (rows, failed)
}

/// A copy of the checkpoint in `model` with every f32 tensor rounded to bf16 (the other files as they are).
fn bf16_copy(model: &Path) -> anyhow::Result<tempfile::TempDir> {
    let out = tempfile::tempdir()?;
    for entry in std::fs::read_dir(model)? {
        let path = entry?.path();
        let dest = out.path().join(path.file_name().expect("a file"));
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path)?;
            let st = safetensors::SafeTensors::deserialize(&bytes)?;
            let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .map(|(name, t)| match t.dtype() {
                    safetensors::Dtype::F32 => {
                        let data = t.data().chunks_exact(4).flat_map(|c| {
                            half::bf16::from_f32(f32::from_le_bytes(c.try_into().expect("4 bytes"))).to_le_bytes()
                        });
                        (name, safetensors::Dtype::BF16, t.shape().to_vec(), data.collect())
                    }
                    dtype => (name, dtype, t.shape().to_vec(), t.data().to_vec()),
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
                .iter()
                .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
                .collect::<anyhow::Result<_>>()?;
            safetensors::serialize_to_file(views, None, &dest)?;
        } else {
            std::fs::copy(&path, &dest)?;
        }
    }
    Ok(out)
}

async fn fixture(
    cuda: &Device,
    root: &Path,
    name: &str,
    model: &Path,
    quant: QuantMode,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join(name.split(' ').next().expect("a name"));
    let (mut requests, peer) = fixture_requests(&dir)?;
    // The prefix cache: long prompts (more than one full block), each twice in the burst. No peer ids for
    // these (`peer` pairs with the first requests only): GPU = CPU is the bar.
    let long: Vec<GenerateRequest> = requests
        .iter()
        .filter(|r| r.prompt_logprobs.is_none())
        .map(|r| GenerateRequest { prompt: [r.prompt.as_str(); 4].join(" "), ..r.clone() })
        .collect();
    requests.extend(long.clone());
    requests.extend(long);
    // Structured output: the host masks rows the GPU computed; the picks must equal the CPU's.
    let structured: Vec<GenerateRequest> = requests
        .iter()
        .filter(|r| r.prompt_logprobs.is_none())
        .take(8)
        .enumerate()
        .map(|(i, r)| {
            let kind = match i % 2 {
                0 => Kind::Regex("[a-z]+( [a-z]+)*[.!?]".into()),
                _ => Kind::JsonObject(JsonObject {}),
            };
            GenerateRequest { structured_output: Some(StructuredOutput { kind: Some(kind) }), ..r.clone() }
        })
        .collect();
    requests.extend(structured);
    let adapters = if dir.join("adapters").is_dir() { dir.join("adapters") } else { root.join("llama/adapters") };
    let mut outs = vec![];
    for device in [Device::Cpu, cuda.clone()] {
        let spec = ModelSpec::Dir(model.to_path_buf());
        let h = start(serve_config(spec, quant, device, &adapters, vec![], 256 << 20)).await?;
        outs.push(greedy_all(format!("http://{}", h.grpc_addr), &requests).await?);
        stop(h).await?;
    }
    let (cpu, gpu) = (&outs[0], &outs[1]);
    let errors: Vec<&String> = cpu.iter().chain(gpu).filter_map(|r| r.as_ref().err()).collect();
    fn ids(r: &Generated) -> Option<&Vec<u32>> {
        r.as_ref().ok().map(|(ids, _, _, _)| ids)
    }
    let equal = cpu.iter().zip(gpu).filter(|(c, g)| c.is_ok() && ids(c) == ids(g)).count();
    // The peer generated without stopping at EOS; the server stops there: compare the common prefix.
    let peer_equal =
        gpu.iter().zip(&peer).filter(|(g, want)| ids(g).is_some_and(|g| !g.is_empty() && want.starts_with(g))).count();
    // Logprobs: one finite value ≤ 0 per token where asked (none elsewhere), close to the CPU's; prompt
    // logprobs likewise, as many as the CPU's (one per prompt token after the first).
    let (mut logprob_diff, mut logprobs_ok) = (0f32, true);
    for ((r, c), g) in requests.iter().zip(cpu).zip(gpu) {
        if let (Ok((c_ids, c_lp, c_prompt, _)), Ok((g_ids, g_lp, g_prompt, _))) = (c, g) {
            let want = if r.logprobs { g_ids.len() } else { 0 };
            logprobs_ok &= g_lp.len() == want && g_lp.iter().all(|p| p.is_finite() && *p <= 1e-6);
            let asked = r.prompt_logprobs.is_some();
            logprobs_ok &= g_prompt.len() == c_prompt.len() && (asked || c_prompt.is_empty());
            logprobs_ok &= g_prompt.iter().all(|p| p.is_finite() && *p <= 1e-6);
            if c_prompt.len() == g_prompt.len() {
                logprob_diff = c_prompt.iter().zip(g_prompt).fold(logprob_diff, |m, (a, b)| m.max((a - b).abs()));
            }
            if c_ids == g_ids && c_lp.len() == g_lp.len() {
                logprob_diff = c_lp.iter().zip(g_lp).fold(logprob_diff, |m, (a, b)| m.max((a - b).abs()));
            }
        }
    }
    logprobs_ok &= logprob_diff <= 1e-3;
    let cached: u32 = gpu.iter().filter_map(|r| r.as_ref().ok().map(|(_, _, _, c)| c)).sum();
    let ok = errors.is_empty() && equal == requests.len() && logprobs_ok && cached > 0;
    println!(
        "| {name} | {quant:?} | {} | {equal} | {peer_equal} | {logprob_diff:.1e}{} | {cached}{} | {}{} |",
        requests.len(),
        if logprobs_ok { "" } else { " FAIL" },
        if cached > 0 { "" } else { " FAIL" },
        if ok { "ok" } else { "FAIL" },
        errors.first().map(|e| format!(" ({} errors, first: {e})", errors.len())).unwrap_or_default()
    );
    Ok(serde_json::json!({
        "fixture": name, "quant": format!("{quant:?}"), "requests": requests.len(), "gpu_equals_cpu": equal,
        "gpu_equals_transformers": peer_equal, "logprobs_max_abs_diff": logprob_diff, "logprobs_ok": logprobs_ok,
        "gpu_cached_prompt_tokens": cached, "errors": errors.len(), "ok": ok,
    }))
}

/// `$OUT/gpu_serve.json` (or `$OUT/$LORASERVE_BENCH_REPORT`), written again as each figure arrives: a run cut
/// short keeps what it measured.
struct Report {
    path: PathBuf,
    json: serde_json::Value,
}

impl Report {
    fn new() -> anyhow::Result<Self> {
        let out = PathBuf::from(std::env::var("OUT").unwrap_or_else(|_| "target".into()));
        std::fs::create_dir_all(&out)?;
        let name = std::env::var("LORASERVE_BENCH_REPORT").unwrap_or_else(|_| "gpu_serve.json".into());
        let routes = loraserve::gpu::routes::in_effect().map_err(anyhow::Error::msg)?.to_string();
        println!("NF4 routes: {routes}");
        let json = serde_json::json!({ "nf4_routes": routes, "fixtures": [], "decode": {} });
        Ok(Report { path: out.join(name), json })
    }

    /// Sets `decode.<key>` and saves.
    fn decode(&mut self, key: &str, value: serde_json::Value) -> anyhow::Result<()> {
        self.json["decode"][key] = value;
        self.save()
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::write(&self.path, serde_json::to_string_pretty(&self.json)?)?;
        Ok(())
    }
}

/// Prompt `stream` of round `round`: `PROMPT_TOKENS` tokens with the demo's byte-level tokenizer (BOS and
/// one token a byte), distinct from its first block on, so no stream reuses the KV blocks of another stream
/// or an earlier round through the prefix cache (the peer has none: every stream computes its own prompt).
fn prompt(round: usize, stream: usize) -> String {
    // Round and stream first: every prompt of the run differs within its first 16-token block.
    let head = format!("r{round} s{stream:02}: ");
    head.chars().chain("serve adapters fast ".chars().cycle()).take(PROMPT_TOKENS - 1).collect()
}

/// `streams` concurrent streaming requests, stream `i` on `adapters[i % len]` with prompt `(round, i)`.
async fn decode_round(addr: &str, round: usize, streams: usize, adapters: &[String]) -> Outcome {
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let (addr, adapter_id, prompt) = (addr.to_string(), adapters[i % adapters.len()].clone(), prompt(round, i));
            tokio::spawn(async move {
                let mut o = Outcome::default();
                match LoraServeClient::connect(addr).await {
                    Ok(mut client) => {
                        let req =
                            GenerateRequest { adapter_id, prompt, max_new_tokens: NEW_TOKENS, ..Default::default() };
                        support::stream(&mut client, req, &mut o).await;
                    }
                    Err(e) => o.errors.push(e.to_string()),
                }
                o
            })
        })
        .collect();
    let mut total = Outcome::default();
    for t in tasks {
        total.merge(t.await.unwrap_or_else(|e| Outcome { errors: vec![e.to_string()], ..Default::default() }));
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn free_bytes(device: &Device) -> anyhow::Result<usize> {
    Ok(match device {
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info()?.0,
        _ => 0,
    })
}

/// Part 2: the 7B decode benchmark.
async fn decode(cuda: &Device, report: &mut Report) -> anyhow::Result<()> {
    let shape = shape();
    let shape = shape.as_str();
    // Base resident: the model's own count and the device's free-memory drop while it is loaded.
    let free0 = free_bytes(cuda)?;
    let t = Instant::now();
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: cuda.clone() };
    let m = synthetic::build(shape, &opts, 7)?;
    cuda.synchronize()?;
    let build_s = t.elapsed().as_secs_f64();
    let free1 = free_bytes(cuda)?;
    let (resident, nf4) = (m.resident_bytes(), m.nf4_footprint().1);
    let c = m.config().clone();
    drop(m);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!(
        "\n{shape} NF4 base on the GPU: {:.2} GiB resident by the model's count ({:.2} GiB NF4 linears), {:.2} GiB \
         by the device's free memory; built in {build_s:.1} s",
        gib(resident),
        gib(nf4),
        gib(free0.saturating_sub(free1))
    );

    // The floor of one decode step: every NF4 linear and the f32 LM head read once.
    let floor_bytes = nf4 + c.vocab_size * c.hidden_size * 4;
    for (key, value) in [
        ("shape", serde_json::json!(shape)),
        ("resident_bytes", resident.into()),
        ("nf4_linear_bytes", nf4.into()),
        ("device_free_drop_bytes", free0.saturating_sub(free1).into()),
        ("build_seconds", build_s.into()),
        ("step_floor_bytes", floor_bytes.into()),
    ] {
        report.decode(key, value)?;
    }

    let tmp = tempfile::tempdir()?;
    let ids = write_adapters(tmp.path(), shape, 36)?;
    let (hot, cold) = ids.split_at(32);
    let h = start(serve_config(
        ModelSpec::Synthetic(shape.into()),
        QuantMode::Nf4,
        cuda.clone(),
        tmp.path(),
        hot.to_vec(),
        12 << 30,
    ))
    .await?;
    let addr = format!("http://{}", h.grpc_addr);

    // Cold loads: adapters never requested before, through LoadAdapter.
    let mut client = LoraServeClient::connect(addr.clone()).await?;
    let mut cold_ms = vec![];
    for id in cold {
        let t = Instant::now();
        client.load_adapter(LoadAdapterRequest { adapter_id: id.clone() }).await?;
        cold_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("cold adapter load (rank 16, q,k,v,o, disk → device), ms: {cold_ms:.1?}");
    report.decode("cold_load_ms", serde_json::json!(cold_ms))?;
    let promote_ms = promotions(cuda, tmp.path(), c.lora_layout(), cold).await?;
    println!("host-tier promotion (the same adapters, RAM → device), ms: {promote_ms:.1?}");
    report.decode("promote_ms", serde_json::json!(promote_ms))?;

    decode_round(&addr, 0, 2, &hot[..1]).await; // warm-up: kernels compiled, pools filled
    println!(
        "\n| streams | adapters | tokens | tokens/s | step ms (ITL p50 / p99) | TTFT p50 / p99 ms | prompt tokens | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut cells = vec![];
    let mut ratio = BTreeMap::new();
    for streams in [1usize, 8, 32] {
        let mut tps = [0f64; 2];
        for (i, adapters) in [&hot[..1], hot].into_iter().enumerate() {
            // Wall-clock bounds, for run.sh to read the GPU's utilization over the cell (nvidia-smi's samples).
            let started_unix = unix_seconds();
            let mut o = decode_round(&addr, cells.len() + 1, streams, adapters).await;
            let ended_unix = unix_seconds();
            tps[i] = o.tokens as f64 / o.seconds;
            let (itl50, itl99) = (pct(&mut o.itl, 0.5) * 1e3, pct(&mut o.itl, 0.99) * 1e3);
            let (ttft50, ttft99) = (pct(&mut o.ttft, 0.5) * 1e3, pct(&mut o.ttft, 0.99) * 1e3);
            let distinct = adapters.len().min(streams);
            println!(
                "| {streams} | {distinct} | {} | {:.0} | {itl50:.2} / {itl99:.2} | {ttft50:.0} / {ttft99:.0} | {} | {} |",
                o.tokens,
                tps[i],
                o.prompt_tokens,
                o.errors.len()
            );
            cells.push(serde_json::json!({
                "streams": streams, "mix": if i == 0 { "one" } else { "mixed" }, "adapters": distinct,
                "tokens": o.tokens, "seconds": o.seconds,
                "tokens_per_s": tps[i], "decode_tokens_per_s": streams as f64 * 1e3 / itl50, "step_ms_p50": itl50, "step_ms_p99": itl99, "ttft_ms_p50": ttft50,
                "ttft_ms_p99": ttft99, "prompt_tokens": o.prompt_tokens, "errors": o.errors,
                "started_unix": started_unix, "ended_unix": ended_unix,
            }));
            report.decode("cells", serde_json::json!(cells))?;
        }
        println!("| {streams} | mixed / one | | {:.3}× | | | | |", tps[1] / tps[0]);
        ratio.insert(streams, tps[1] / tps[0]);
        report.decode("mixed_over_single", serde_json::json!(ratio))?;
    }
    stop(h).await
}

/// Host-tier promotions, timed through an adapter cache whose device tier holds one adapter: acquiring two
/// adapters in turn brings each back from RAM every time.
async fn promotions(device: &Device, root: &Path, layout: BaseLayout, ids: &[String]) -> anyhow::Result<Vec<f64>> {
    let config =
        |device_bytes| CacheConfig { device_bytes, host_bytes: 8 << 30, default_wait: Duration::from_secs(60) };
    let probe = AdapterCache::new(AdapterStore::open(root)?, layout.clone(), Device::Cpu, config(usize::MAX));
    let bytes = probe.acquire(&ids[0], None).await?.weights().bytes();
    let cache = AdapterCache::new(AdapterStore::open(root)?, layout, device.clone(), config(bytes));
    for id in &ids[..2] {
        drop(cache.acquire(id, None).await?);
    }
    let mut ms = vec![];
    for i in 0..8 {
        let t = Instant::now();
        drop(cache.acquire(&ids[i % 2], None).await?);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    anyhow::ensure!(
        (cache.disk_loads(), cache.promotions()) == (2, 8),
        "expected 2 disk loads and 8 promotions, got {} and {}",
        cache.disk_loads(),
        cache.promotions()
    );
    Ok(ms)
}

fn main() -> anyhow::Result<()> {
    let cuda = match std::env::var("LORASERVE_BENCH_DEVICE").as_deref() {
        Ok("cpu") => Device::Cpu,
        _ => loraserve::gpu::open(0)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut report = Report::new()?;
    let mut failed = 0;
    if std::env::var_os("LORASERVE_GPU_SKIP_FIXTURES").is_none() {
        let (rows, fixtures_failed) = rt.block_on(fixtures(&cuda));
        report.json["fixtures"] = rows.into();
        report.save()?;
        failed += fixtures_failed;
    }
    if let Err(e) = rt.block_on(decode(&cuda, &mut report)) {
        eprintln!("the decode benchmark stopped: {e:#}");
        report.decode("error", format!("{e:#}").into())?;
        failed += 1;
    }
    if failed > 0 {
        eprintln!("{failed} checks FAILED");
        std::process::exit(1);
    }
    Ok(())
}
