//! Bounded load test on loopback: 2,000 requests from 32 clients over 200 adapters through a device cache
//! with room for 20, with random cancellations. No unintended error, memory stable, and the server's
//! metrics agree with what the clients counted. (Its own test binary: the metrics recorder is
//! process-wide, so no other test may add to the counts.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use common::fixture;
use loraserve::engine::EngineConfig;
use loraserve::lora::cache::CacheConfig;
use loraserve::lora::peft::{write_dir, AdapterMeta};
use loraserve::lora::synthetic::random_adapter;
use loraserve::lora::ModuleKind;
use loraserve::model::{LoadOptions, ModelSpec};
use loraserve::quant::QuantMode;
use loraserve::rng::Rng;
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::GenerateRequest;
use loraserve::server::{self, service::Limits, ServeConfig};
use tokio_stream::StreamExt;

const CLIENTS: usize = 32;
/// 63 per client: 2,016 in all.
const PER_CLIENT: usize = 63;
const ADAPTERS: usize = 200;
const QUEUE: &str = "loraserve_queue_requests";

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    let body = common::metrics_text(addr).await;
    body.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    cancelled: AtomicUsize,
    tokens: AtomicUsize,
    errors: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_requests_two_hundred_adapters_twenty_slots() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = loraserve::model::read_config(&fixture("llama/model")).unwrap().lora_layout();
    let meta = AdapterMeta {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        lora_dropout: 0.0,
        base_model_name_or_path: "tiny-llama".into(),
        dtype: DType::F32,
    };
    let mut one = 0;
    for i in 0..ADAPTERS {
        let w = random_adapter(&layout, 4, &[ModuleKind::QProj, ModuleKind::VProj], i as u64, &Device::Cpu).unwrap();
        one = w.bytes();
        write_dir(&tmp.path().join(format!("tenant{}/a{i}", i % 7)), &w, &meta).unwrap();
    }
    let cfg = ServeConfig {
        model: ModelSpec::Dir(fixture("llama/model")),
        load: LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu },
        chat_template: None,
        generation_config: true,
        adapters: tmp.path().to_path_buf(),
        cache: CacheConfig { device_bytes: 20 * one, host_bytes: 40 * one, default_wait: Duration::from_secs(60) },
        engine: EngineConfig {
            max_batch_rows: 32,
            max_batch_tokens: 256,
            block_size: 8,
            kv_cache_bytes: 16 << 20,
            queue_capacity: 4096,
            prefix_caching: true,
        },
        limits: Limits::default(),
        preload: vec![],
        api_keys: None,
        tls: None,
        max_request_bytes: 1 << 20,
        drain_timeout: Duration::from_secs(10),
        template_worker: Some(env!("CARGO_BIN_EXE_server").into()),
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = server::start(cfg, grpc, metrics).await.unwrap();
    assert!(h.ready().await);
    let addr = format!("http://{}", h.grpc_addr);

    let run = |per_client: usize, counts: Arc<Counts>| {
        let addr = addr.clone();
        async move {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|c| {
                    let (addr, counts) = (addr.clone(), counts.clone());
                    tokio::spawn(async move {
                        let mut client = LoraServeClient::connect(addr).await.unwrap();
                        let mut rng = Rng::new(c as u64 + 77);
                        for _ in 0..per_client {
                            let i = rng.below(ADAPTERS as u64 + 20) as usize;
                            let adapter = if i < ADAPTERS { format!("tenant{}/a{i}", i % 7) } else { String::new() };
                            let req = GenerateRequest {
                                adapter_id: adapter,
                                prompt: "alpha beta gamma".into(),
                                max_new_tokens: 1 + rng.below(16) as u32,
                                ..Default::default()
                            };
                            let cancel = rng.below(10) == 0;
                            if rng.below(2) == 0 {
                                let mut r = tonic::Request::new(req);
                                if cancel {
                                    // A client that gives up almost at once.
                                    r.set_timeout(Duration::from_millis(1));
                                }
                                match client.generate(r).await {
                                    Ok(resp) => {
                                        counts.ok.fetch_add(1, Ordering::Relaxed);
                                        counts.tokens.fetch_add(resp.into_inner().token_ids.len(), Ordering::Relaxed);
                                    }
                                    Err(s)
                                        if cancel
                                            && matches!(
                                                s.code(),
                                                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                                            ) =>
                                    {
                                        counts.cancelled.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(s) => {
                                        eprintln!("unexpected: {s}");
                                        counts.errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            } else {
                                let mut s = match client.generate_stream(req).await {
                                    Ok(s) => s.into_inner(),
                                    Err(e) => {
                                        eprintln!("unexpected: {e}");
                                        counts.errors.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    }
                                };
                                let mut tokens = 0;
                                let mut finished = false;
                                while let Some(m) = s.next().await {
                                    match m {
                                        Ok(m) => {
                                            tokens += m.token_ids.len();
                                            finished |= m.finish_reason != 0;
                                            if cancel {
                                                break; // drop the stream mid-generation
                                            }
                                        }
                                        Err(e) => {
                                            eprintln!("unexpected: {e}");
                                            counts.errors.fetch_add(1, Ordering::Relaxed);
                                            break;
                                        }
                                    }
                                }
                                if finished {
                                    counts.ok.fetch_add(1, Ordering::Relaxed);
                                    counts.tokens.fetch_add(tokens, Ordering::Relaxed);
                                } else if cancel {
                                    counts.cancelled.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };

    // Warm up (allocator, caches), then measure.
    run(4, Arc::new(Counts::default())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ok_series = [
        "loraserve_requests_total{rpc=\"Generate\",code=\"OK\"}",
        "loraserve_requests_total{rpc=\"GenerateStream\",code=\"OK\"}",
    ];
    let all_series = ["loraserve_requests_total{rpc=\"Generate\"", "loraserve_requests_total{rpc=\"GenerateStream\""];
    let ok_before = metric(h.metrics_addr, ok_series[0]).await + metric(h.metrics_addr, ok_series[1]).await;
    let all_before = metric(h.metrics_addr, all_series[0]).await + metric(h.metrics_addr, all_series[1]).await;
    let tokens_before = metric(h.metrics_addr, "loraserve_generated_tokens_total").await;
    let rss_before = rss_bytes();
    let started = std::time::Instant::now();
    let counts = Arc::new(Counts::default());
    run(PER_CLIENT, counts.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    // Let cancelled requests be reaped, then read the server's side. A handler whose client gave up while it
    // waited for its adapter holds no lease but is still in the queue gauge until the server drops it.
    let cache = h.cache().unwrap();
    let engine = h.engine().unwrap();
    for _ in 0..200 {
        let s = engine.stats();
        if cache.leases() == 0
            && s.running.load(Ordering::Relaxed) + s.pending.load(Ordering::Relaxed) == 0
            && metric(h.metrics_addr, QUEUE).await == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_after = rss_bytes();
    let ok_after = metric(h.metrics_addr, ok_series[0]).await + metric(h.metrics_addr, ok_series[1]).await;
    let all_after = metric(h.metrics_addr, all_series[0]).await + metric(h.metrics_addr, all_series[1]).await;
    let tokens_after = metric(h.metrics_addr, "loraserve_generated_tokens_total").await;
    let evictions = metric(h.metrics_addr, "loraserve_adapter_cache_evictions_total{tier=\"device\"}").await;
    let (ok, cancelled, errors) = (
        counts.ok.load(Ordering::Relaxed),
        counts.cancelled.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "load: {} requests in {seconds:.1}s ({ok} ok, {cancelled} cancelled, {errors} errors), {} tokens received, {evictions} device evictions, RSS {:.1} MB → {:.1} MB",
        ok + cancelled + errors,
        counts.tokens.load(Ordering::Relaxed),
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6
    );
    assert_eq!(errors, 0, "no unintended errors");
    assert_eq!(ok + cancelled, PER_CLIENT * CLIENTS);
    assert!(cancelled > 0, "some requests were cancelled");
    // The server counts each request it saw once; a request cancelled by its client may have finished on
    // the server first (counted OK there) or never reached it (a 1 ms client timeout).
    let server_all = (all_after - all_before) as usize;
    assert!(
        server_all <= PER_CLIENT * CLIENTS && server_all >= PER_CLIENT * CLIENTS - cancelled,
        "server counted {server_all} requests"
    );
    let server_ok = (ok_after - ok_before) as usize;
    assert!(
        server_ok >= ok && server_ok <= ok + cancelled,
        "server OK {server_ok}, clients: {ok} OK + {cancelled} cancelled"
    );
    assert!(
        (tokens_after - tokens_before) as usize >= counts.tokens.load(Ordering::Relaxed),
        "server generated at least what clients received"
    );
    assert!(evictions > 0.0, "200 adapters through 20 slots evicted");
    assert_eq!(cache.leases(), 0, "every lease returned");
    assert_eq!(engine.stats().kv_blocks_used.load(Ordering::Relaxed), 0, "every KV block returned");
    assert!(cache.device_bytes() <= 20 * one);
    assert!(rss_after < rss_before + (64 << 20), "memory stable: RSS {rss_before} → {rss_after}");
    // The queue gauge moves by deltas (engine queue, waits for an adapter): after 2,000 requests, cancelled
    // ones among them at every stage, it is back to 0.
    assert_eq!(metric(h.metrics_addr, QUEUE).await, 0.0, "queue gauge back to 0 when nothing waits");

    // A request waiting for room in the device tier is queued: pin all 20 slots, ask for a 21st adapter.
    let mut pins = Vec::new();
    for i in 0..20 {
        pins.push(cache.acquire(&format!("tenant{}/a{i}", i % 7), None).await.unwrap());
    }
    let mut client = LoraServeClient::connect(addr.clone()).await.unwrap();
    let waiting = tokio::spawn(async move {
        let req = GenerateRequest {
            adapter_id: "tenant6/a20".into(),
            prompt: "alpha".into(),
            max_new_tokens: 2,
            ..Default::default()
        };
        client.generate(req).await
    });
    let since = std::time::Instant::now();
    while metric(h.metrics_addr, QUEUE).await != 1.0 {
        assert!(!waiting.is_finished(), "the 21st adapter found room: {:?}", waiting.await);
        assert!(since.elapsed() < Duration::from_secs(30), "a request waiting for its adapter is not queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(pins);
    assert_eq!(waiting.await.unwrap().expect("runs once room is free").into_inner().token_ids.len(), 2);
    assert_eq!(metric(h.metrics_addr, QUEUE).await, 0.0);
    h.shutdown();
    h.wait().await.unwrap();
}
