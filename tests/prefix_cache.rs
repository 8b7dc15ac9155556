//! The prefix cache through the server: a repeated prompt starts from its cached KV blocks and answers as
//! transformers does (the fixture goldens) and as it did computed whole; blocks are shared only under the same
//! adapter version and the same `cache_salt`, never by a request that scores its prompt; the metrics count
//! what was looked up and found; `--no-prefix-caching` computes every prompt.
//!
//! The Prometheus recorder is the process's: the counters' deltas are exact because the other test here runs
//! without the prefix cache, which counts nothing.

mod common;

use std::path::Path;

use common::serve::{config, req, start};
use common::{copy_dir, expected, fixture};
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::{GenerateRequest, GenerateResponse};
use loraserve::telemetry as t;
use tonic::transport::Channel;

/// The fixture config's KV block size.
const BLOCK: usize = 4;

async fn call(c: &mut LoraServeClient<Channel>, r: &GenerateRequest) -> GenerateResponse {
    c.generate(r.clone()).await.unwrap().into_inner()
}

/// A counter's value in the exposition (0 when absent).
async fn counter(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = common::metrics_text(addr).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_prompts_start_from_their_cached_blocks_only_where_they_may() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    for name in ["qv-r4", "qkvo-r8", "all-r16-rslora", "patterns"] {
        copy_dir(&fixture("llama/adapters").join(name), &adapters.join(name));
    }
    let (h, mut c) = start(config(adapters.clone())).await;
    let queries0 = counter(h.metrics_addr, t::PREFIX_CACHE_QUERIES_TOTAL).await;
    let hits0 = counter(h.metrics_addr, t::PREFIX_CACHE_HITS_TOTAL).await;
    let mut queried = 0usize;
    let mut hit = 0usize;

    // Every golden twice: the first computes its prompt (no other prompt, and no other adapter's, starts with
    // its first block), the second finds the full blocks of all its tokens but the last.
    for (name, cases) in &expected("llama").results {
        let adapter = if name == "base" { "" } else { name };
        for case in cases {
            let r = GenerateRequest { logprobs: true, ..req(adapter, &case.prompt, case.greedy_new_ids.len() as u32) };
            let first = call(&mut c, &r).await;
            let second = call(&mut c, &r).await;
            let what = format!("{name} {:?}", case.prompt);
            let n = case.input_ids.len();
            assert_eq!(first.cached_prompt_tokens, 0, "{what}");
            assert_eq!(second.cached_prompt_tokens as usize, (n - 1) / BLOCK * BLOCK, "{what}");
            assert_eq!(first.token_ids, case.greedy_new_ids, "{what} computed whole");
            assert_eq!(second.token_ids, case.greedy_new_ids, "{what} from the cache");
            let d = max_abs_diff(&first.logprobs, &second.logprobs);
            assert!(d < 1e-4, "{what}: logprobs differ by {d}");
            queried += 2 * n;
            hit += second.cached_prompt_tokens as usize;
        }
    }

    // The same prompt under another salt computes again; then that salt has its own blocks.
    let base = req("", "red cat blue dog one two", 4);
    let salted = GenerateRequest { cache_salt: "tenant-a".into(), ..base.clone() };
    assert_eq!(call(&mut c, &salted).await.cached_prompt_tokens, 0);
    let again = call(&mut c, &salted).await;
    assert_eq!(again.cached_prompt_tokens, 12);
    assert_eq!(again.token_ids, call(&mut c, &base).await.token_ids);
    queried += 3 * 14;
    hit += 24;

    // A request that scores its prompt computes every position (and is not counted as a lookup).
    let scored = GenerateRequest { prompt_logprobs: Some(0), ..base.clone() };
    let s = call(&mut c, &scored).await;
    assert_eq!((s.cached_prompt_tokens, s.prompt_logprobs.len()), (0, 13));

    // A prompt that shares its first blocks with a cached one, then goes elsewhere: the shared blocks only.
    let longer = req("", "red cat blue dog one two three four five", 4);
    let l = call(&mut c, &longer).await;
    assert!(l.prompt_tokens > 14);
    assert_eq!(l.cached_prompt_tokens, 12, "the blocks of the common head");
    queried += l.prompt_tokens as usize;
    hit += 12;

    // A new version of an adapter computes its prompts again.
    let r = req("qv-r4", "red cat blue dog one two", 4);
    let before = call(&mut c, &r).await;
    assert_eq!(before.cached_prompt_tokens, 12);
    rewrite(&adapters.join("qv-r4/adapter_config.json"));
    let after = call(&mut c, &r).await;
    assert_ne!(after.adapter_version, before.adapter_version, "the new version is served");
    assert_eq!((after.cached_prompt_tokens, after.token_ids.clone()), (0, before.token_ids));
    queried += 2 * 14;
    hit += 12;

    let queries = counter(h.metrics_addr, t::PREFIX_CACHE_QUERIES_TOTAL).await - queries0;
    let hits = counter(h.metrics_addr, t::PREFIX_CACHE_HITS_TOTAL).await - hits0;
    assert_eq!((queries, hits), (queried as f64, hit as f64));
    h.shutdown();
    h.wait().await.unwrap();
}

/// Writes `path` again with the same contents: a new modification time, so a new version.
fn rewrite(path: &Path) {
    let text = std::fs::read(path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, [text.as_slice(), b"\n"].concat()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_prefix_cache_every_prompt_is_computed() {
    let mut cfg = config(fixture("llama/adapters"));
    cfg.engine.prefix_caching = false;
    let (h, mut c) = start(cfg).await;
    let r = req("qkvo-r8", "serve the adapter", 6);
    for _ in 0..3 {
        assert_eq!(call(&mut c, &r).await.cached_prompt_tokens, 0);
    }
    h.shutdown();
    h.wait().await.unwrap();
}
