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
use loraserve::server::proto::{GenerateRequest, GenerateResponse};
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
                repetition_penalty: case.repetition_penalty,
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
                let want = r.logprobs.expect("the fixture has logprobs");
                for (got, want) in m.logprobs.iter().zip(&want) {
                    assert!((got - want).abs() <= 1e-4, "{what}: logprob {got} vs {want}");
                }
                assert_eq!(m.logprobs.len(), want.len(), "{what}");
                if top == 0 {
                    assert!(m.top_logprobs.is_empty(), "{what}: not asked for");
                    return;
                }
                let (want_ids, want_lps) = (r.top_ids.unwrap(), r.top_logprobs.unwrap());
                assert_eq!(m.top_logprobs.len(), want_ids.len(), "{what}");
                for (step, got) in m.top_logprobs.iter().enumerate() {
                    assert_eq!(got.token_ids, want_ids[step], "{what}: step {step}");
                    assert_eq!(got.logprobs.len(), got.token_ids.len(), "{what}: step {step}");
                    for (g, w) in got.logprobs.iter().zip(&want_lps[step]) {
                        assert!((g - w).abs() <= 1e-4, "{what}: step {step}: top logprob {g} vs {w}");
                    }
                }
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
            temperature,
            top_k,
            top_p,
            seed: Some(3),
            repetition_penalty: 1.2,
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
            sampled_off_argmax += usize::from(loraserve::engine::sampler::argmax(row) != token);
        }
    }
    assert!(sampled_off_argmax > 0, "every token was the argmax: nothing was sampled");
    h.shutdown();
    h.wait().await.unwrap();
}
