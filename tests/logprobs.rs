//! `logprobs` through the server: each generated token's log-probability under the model's own distribution
//! (raw logits), against transformers for greedy requests (`llama-logprobs/`) and against a teacher-forced
//! forward for sampled ones.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use common::serve::{config, req, start};
use loraserve::lora::LoraRows;
use loraserve::model::{self, AttentionMode, Batch, LoadOptions, ModelSpec, SeqInput};
use loraserve::quant::QuantMode;
use loraserve::server::proto::{GenerateRequest, GenerateResponse, TopLogprobs};
use tokio_stream::StreamExt;

/// `logprobs`: each token's log-probability under the model (raw logits, before the repetition penalty) equals
/// transformers' (`llama-logprobs/make.py`) within 1e-4, unary and streaming, all requests in one batch; so do
/// the 4 most likely tokens and theirs (`top_logprobs`, every other request); a request that does not ask
/// gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logprobs_match_transformers() {
    let cases = common::penalty_cases("llama-logprobs");
    let (h, client) = start(config(fixture("llama/adapters"))).await;
    let mut tasks = vec![];
    for (name, case) in cases {
        for (i, r) in case.results.into_iter().enumerate() {
            let mut c = client.clone();
            // Unary and streaming, each with and without the top 4: i = 0, 1, 2, 3 covers all four.
            let top = if i / 2 % 2 == 0 { 4 } else { 0 };
            let request = GenerateRequest {
                repetition_penalty: Some(case.repetition_penalty),
                logprobs: true,
                top_logprobs: top,
                ..req(case.adapter.as_deref().unwrap_or(""), &r.prompt, r.new_ids.len() as u32)
            };
            let what = format!("{name} {:?}", r.prompt);
            tasks.push(tokio::spawn(async move {
                let m = if i % 2 == 0 {
                    c.generate(request).await.unwrap().into_inner()
                } else {
                    let mut s = c.generate_stream(request).await.unwrap().into_inner();
                    let mut all = GenerateResponse::default();
                    while let Some(m) = s.next().await {
                        let m = m.unwrap();
                        assert_eq!(m.token_ids.len(), m.logprobs.len(), "{what}: one per token in each message");
                        assert_eq!(m.top_logprobs.len(), m.token_ids.len() * usize::from(top > 0), "{what}");
                        all.token_ids.extend(m.token_ids);
                        all.logprobs.extend(m.logprobs);
                        all.top_logprobs.extend(m.top_logprobs);
                    }
                    all
                };
                assert_eq!(m.token_ids, r.new_ids, "{what}");
                let want_top = (top > 0).then(|| (r.top_ids.unwrap(), r.top_logprobs.unwrap()));
                let want = r.logprobs.expect("the fixture has logprobs");
                assert_reference(&format!("{what}: step"), (&m.logprobs, &m.top_logprobs), &want, want_top);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = client.clone();
    assert!(c.generate(req("", "alpha", 3)).await.unwrap().into_inner().logprobs.is_empty(), "not asked for");
    h.shutdown();
    h.wait().await.unwrap();
}

/// `prompt_logprobs`: each prompt token's log-probability given those before it, and the 2 most likely tokens
/// at its position, equal transformers' (`llama-logprobs/make.py`: one forward over the prompt, the adapter
/// applied, the repetition penalty not) within 1e-4, unary and streaming (in the first message, with the
/// first tokens). The prompts are computed in chunks of at most 5 tokens, in a KV cache of 14 blocks that
/// the requests outgrow together, so sequences are preempted and recomputed, some mid-prompt; the tokens
/// generated still match.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompt_logprobs_match_transformers_across_chunks_and_preemptions() {
    let cases = common::penalty_cases("llama-logprobs");
    let mut cfg = config(fixture("llama/adapters"));
    cfg.engine.max_batch_tokens = 5;
    // 1152 bytes a token (3 layers · 3 kv heads · 16 dims · k and v · 4 bytes): 56 tokens, 14 blocks of 4.
    cfg.engine.kv_cache_bytes = 64 << 10;
    let (h, client) = start(cfg).await;
    let mut tasks = vec![];
    for (name, case) in cases {
        for (i, r) in case.results.into_iter().enumerate() {
            let mut c = client.clone();
            // Unary and streaming, each with and without the top 2: i = 0, 1, 2, 3 covers all four.
            let top = if i / 2 % 2 == 0 { 2 } else { 0 };
            let request = GenerateRequest {
                repetition_penalty: Some(case.repetition_penalty),
                prompt_logprobs: Some(top),
                // The first prompt's unary request asks for the generated tokens' logprobs too.
                logprobs: i == 0,
                ..req(case.adapter.as_deref().unwrap_or(""), &r.prompt, r.new_ids.len() as u32)
            };
            let what = format!("{name} {:?}", r.prompt);
            tasks.push(tokio::spawn(async move {
                let m = if i % 2 == 0 {
                    c.generate(request).await.unwrap().into_inner()
                } else {
                    let mut s = c.generate_stream(request).await.unwrap().into_inner();
                    let mut all = s.next().await.unwrap().unwrap();
                    assert!(!all.token_ids.is_empty(), "{what}: the prompt comes with the first tokens");
                    while let Some(m) = s.next().await {
                        let m = m.unwrap();
                        assert!(m.prompt_token_ids.is_empty() && m.prompt_logprobs.is_empty(), "{what}: once");
                        all.token_ids.extend(m.token_ids);
                    }
                    all
                };
                assert_eq!(m.token_ids, r.new_ids, "{what}");
                let want = r.logprobs.expect("the fixture has logprobs");
                if i == 0 {
                    assert_reference(&format!("{what}: step"), (&m.logprobs, &[]), &want, None);
                } else {
                    assert!(m.logprobs.is_empty(), "{what}: logprobs not asked for");
                }
                assert_eq!(m.prompt_token_ids, r.input_ids, "{what}");
                let want = r.prompt_logprobs.expect("the fixture has prompt logprobs");
                assert_eq!(want.len(), r.input_ids.len() - 1, "{what}: one per token after the first");
                let want_top = (top > 0).then(|| (r.prompt_top_ids.unwrap(), r.prompt_top_logprobs.unwrap()));
                let got = (&m.prompt_logprobs[..], &m.prompt_top_logprobs[..]);
                assert_reference(&format!("{what}: prompt position"), got, &want, want_top);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let preemptions = h.engine().unwrap().stats().preemptions.load(std::sync::atomic::Ordering::Relaxed);
    assert!(preemptions > 0, "nothing was preempted: the test no longer covers recomputed prompts");
    let mut c = client.clone();
    let plain = c.generate(req("", "alpha beta", 3)).await.unwrap().into_inner();
    assert!(plain.prompt_token_ids.is_empty() && plain.prompt_logprobs.is_empty(), "not asked for");
    h.shutdown();
    h.wait().await.unwrap();
}

/// The fixture llama with a tokenizer that adds no BOS and strips spaces: a one-token prompt has no prompt
/// logprobs (its only token has no context) and still generates, with logprobs; a prompt that encodes to no
/// tokens is INVALID_ARGUMENT naming `prompt`, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_prompts_have_no_prompt_logprobs_and_empty_encodings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture("llama/model"), tmp.path());
    let path = tmp.path().join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    t["post_processor"] = serde_json::Value::Null;
    t["normalizer"] = serde_json::json!({"type": "Strip", "strip_left": true, "strip_right": true});
    std::fs::write(&path, t.to_string()).unwrap();
    let mut cfg = config(fixture("llama/adapters"));
    cfg.model = ModelSpec::Dir(tmp.path().to_path_buf());
    let (h, mut c) = start(cfg).await;
    let one = GenerateRequest { prompt_logprobs: Some(2), logprobs: true, ..req("qv-r4", "a", 4) };
    let m = c.generate(one).await.unwrap().into_inner();
    assert_eq!(m.prompt_token_ids.len(), 1, "{m:?}");
    assert!(m.prompt_logprobs.is_empty() && m.prompt_top_logprobs.is_empty(), "{m:?}");
    assert_eq!((m.token_ids.len(), m.logprobs.len()), (4, 4), "{m:?}");
    let empty = GenerateRequest { prompt_logprobs: Some(0), ..req("", "   ", 4) };
    let status = c.generate(empty).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "prompt: encodes to no tokens");
    assert_eq!(c.generate(req("", "a b", 2)).await.unwrap().into_inner().token_ids.len(), 2, "still serving");
    h.shutdown();
    h.wait().await.unwrap();
}

/// The reference's most likely tokens at each entry, and their log-probabilities.
type TopReference = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// Logprobs `got` (each entry's own, and the most likely tokens at it) against the reference's: as many, each
/// within 1e-4; the most likely tokens' ids exactly, theirs within 1e-4, or none when `want_top` is `None`.
/// `at` names an entry in messages ("… step" + its index).
fn assert_reference(at: &str, got: (&[f32], &[TopLogprobs]), want: &[f32], want_top: Option<TopReference>) {
    let (logprobs, top) = got;
    assert_eq!(logprobs.len(), want.len(), "{at}s");
    for (i, (g, w)) in logprobs.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4, "{at} {i}: logprob {g} vs {w}");
    }
    let Some((want_ids, want_lps)) = want_top else {
        assert!(top.is_empty(), "{at}s: no top logprobs asked for");
        return;
    };
    assert_eq!(top.len(), want_ids.len(), "{at}s");
    for (i, got) in top.iter().enumerate() {
        assert_eq!(got.token_ids, want_ids[i], "{at} {i}");
        assert_eq!(got.logprobs.len(), got.token_ids.len(), "{at} {i}");
        for (g, w) in got.logprobs.iter().zip(&want_lps[i]) {
            assert!((g - w).abs() <= 1e-4, "{at} {i}: top logprob {g} vs {w}");
        }
    }
}

/// With temperature, top-k, top-p and a penalty the logprobs are still the model's own: the log-softmax of the
/// raw logits a teacher-forced dense forward over the sampled sequence gives (not of the distribution drawn
/// from, which differs by far more than the tolerance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampled_tokens_get_the_models_own_logprobs() {
    let (h, mut client) = start(config(fixture("llama/adapters"))).await;
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu };
    let m = model::load(&ModelSpec::Dir(fixture("llama/model")), &opts).unwrap();
    let prompt = "red cat blue dog one two";
    let prompt_ids = m.tokenizer.encode(prompt).unwrap();
    let mut sampled_off_argmax = 0;
    for (temperature, top_k, top_p) in [(0.7, 5, 1.0), (0.7, 0, 0.5), (1.3, 0, 1.0)] {
        let request = GenerateRequest {
            temperature: Some(temperature),
            top_k: Some(top_k),
            top_p: Some(top_p),
            seed: Some(3),
            repetition_penalty: Some(1.2),
            logprobs: true,
            top_logprobs: 3,
            ..req("", prompt, 12)
        };
        let out = client.generate(request).await.unwrap().into_inner();
        assert_eq!(out.logprobs.len(), out.token_ids.len());
        // Logits at positions n-1 .. n+k-2 predict the k generated tokens.
        let (n, k) = (prompt_ids.len(), out.token_ids.len());
        let seq: Vec<u32> = prompt_ids.iter().chain(&out.token_ids).copied().collect();
        let tokens = &seq[..n + k - 1];
        let rows: Vec<usize> = (n - 1..n + k - 1).collect();
        let seqs = [SeqInput { len: tokens.len(), past: 0, blocks: &[] }];
        let batch = Batch { tokens, seqs: &seqs, logit_rows: &rows };
        let dense = AttentionMode::Dense { differentiable: false };
        let logits = m.model.forward(&batch, dense, &LoraRows::None).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out.top_logprobs.len(), out.token_ids.len());
        for (((row, &token), &got), top) in logits.iter().zip(&out.token_ids).zip(&out.logprobs).zip(&out.top_logprobs)
        {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let want = row[token as usize] as f64 - log_z;
            assert!((got as f64 - want).abs() <= 1e-4, "T {temperature}: logprob {got} vs {want}");
            // The top 3 of the raw row, not of the distribution drawn from.
            let mut by_logit: Vec<u32> = (0..row.len() as u32).collect();
            by_logit.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            // The reference's 3rd and 4th must be told apart by more than the tolerance.
            let (third, fourth) = (row[by_logit[2] as usize], row[by_logit[3] as usize]);
            assert!(third - fourth > 1e-3, "T {temperature}: a near-tie at ranks 3 and 4 ({third}, {fourth})");
            assert_eq!(top.token_ids, by_logit[..3], "T {temperature}");
            assert_eq!(top.logprobs.len(), 3, "T {temperature}");
            for (&t, &lp) in top.token_ids.iter().zip(&top.logprobs) {
                assert!((lp as f64 - (row[t as usize] as f64 - log_z)).abs() <= 1e-4, "T {temperature}: top {t}");
            }
            sampled_off_argmax += usize::from(loraserve::engine::sampler::argmax(row) != Some(token));
        }
    }
    assert!(sampled_off_argmax > 0, "every token was the argmax: nothing was sampled");
    h.shutdown();
    h.wait().await.unwrap();
}
