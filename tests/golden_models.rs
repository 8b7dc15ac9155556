//! Golden tests against the peer-made fixtures (transformers 5.17, f32): for every model and prompt the
//! prompt token ids are equal, the last-position logits are within 1e-4 relative L2, and 12 greedy tokens
//! (no EOS stop, as the reference argmax loop) are equal — through the paged serving path and through the
//! dense full-recompute path. With the sampling penalties, greedy tokens equal transformers' (repetition)
//! and vLLM's definition (frequency, presence) on the llama, alone and with a PEFT adapter.

mod common;

use candle_core::{DType, Device};
use common::{expected, fixture, rel_l2, run_case};
use loraserve::lora::LoraRows;
use loraserve::model::{self, AttentionMode, Batch, LoadOptions, ModelSpec, SeqInput};
use loraserve::quant::QuantMode;

const LOGIT_TOL: f64 = 1e-4;

fn dense_opts() -> LoadOptions {
    LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu }
}

fn check_model(dir: &str) {
    let exp = expected(dir);
    let loaded = model::load(&ModelSpec::Dir(fixture(dir).join("model")), &dense_opts()).unwrap();
    let base = &exp.results["base"];
    assert_eq!(base.len(), exp.prompts.len());
    for case in base {
        let (ids, out) = run_case(&loaded, case, None, dir);
        let err = rel_l2(&out.prompt_logits, &case.last_logits);
        assert!(err <= LOGIT_TOL, "{dir} {:?}: paged logits rel err {err:e}", case.prompt);
        assert_eq!(out.token_ids, case.greedy_new_ids, "{dir} {:?}: greedy tokens", case.prompt);
        assert_eq!(Some(loaded.tokenizer.decode(&out.token_ids).unwrap()), case.greedy_text);

        // Dense path: full recompute over the prompt.
        let seqs = [SeqInput { len: ids.len(), past: 0, blocks: &[] }];
        let batch = Batch { tokens: &ids, seqs: &seqs, logit_rows: &[ids.len() - 1] };
        let logits = loaded
            .model
            .forward(&batch, AttentionMode::Dense { differentiable: false }, &LoraRows::None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let err = rel_l2(&logits, &case.last_logits);
        assert!(err <= LOGIT_TOL, "{dir} {:?}: dense logits rel err {err:e}", case.prompt);
    }
}

#[test]
fn llama_matches_transformers() {
    check_model("llama");
}

#[test]
fn llama_sharded_matches_transformers() {
    check_model("llama-sharded");
}

#[test]
fn mistral_matches_transformers() {
    check_model("mistral");
}

#[test]
fn qwen2_matches_transformers() {
    check_model("qwen2");
}

/// Several prompts of different lengths in ONE paged forward give each prompt's own logits.
#[test]
fn batched_prefill_equals_single() {
    let exp = expected("llama");
    let loaded = model::load(&ModelSpec::Dir(fixture("llama/model")), &dense_opts()).unwrap();
    let m = &loaded.model;
    let cases = &exp.results["base"];
    let geo = m.kv_geometry(4);
    let mut cache = model::kv_cache::PagedKvCache::new(geo, 64);
    let mut tables = Vec::new();
    let mut tokens = Vec::new();
    let mut rows = Vec::new();
    for c in cases {
        tables.push(cache.allocator_mut().allocate(geo.blocks_for(c.input_ids.len())).unwrap());
        tokens.extend_from_slice(&c.input_ids);
        rows.push(tokens.len() - 1);
    }
    let seqs: Vec<SeqInput> =
        cases.iter().zip(&tables).map(|(c, t)| SeqInput { len: c.input_ids.len(), past: 0, blocks: t }).collect();
    let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &rows };
    let logits = m.forward(&batch, AttentionMode::Paged(&mut cache), &LoraRows::None).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let row = logits.get(i).unwrap().to_vec1::<f32>().unwrap();
        let err = rel_l2(&row, &c.last_logits);
        assert!(err <= LOGIT_TOL, "{:?}: {err:e}", c.prompt);
    }
}

/// Greedy decoding under the penalties (`llama-penalties/make.py`) gives the reference's tokens, and every
/// case changes some prompt's tokens (so a penalty left out cannot pass).
#[test]
fn sampling_penalties_match_the_reference() {
    use loraserve::engine::{generate, GenerateJob, SamplingParams};
    use loraserve::lora::peft;
    let loaded = model::load(&ModelSpec::Dir(fixture("llama/model")), &dense_opts()).unwrap();
    let plain = &expected("llama").results;
    for (name, case) in common::penalty_cases("llama-penalties") {
        let adapter = case.adapter.as_ref().map(|a| {
            let dir = fixture("llama/adapters").join(a);
            peft::load_dir(&dir, &loaded.model.lora_layout(), &Device::Cpu).unwrap()
        });
        let sampling = SamplingParams {
            repetition_penalty: case.repetition_penalty,
            frequency_penalty: case.frequency_penalty,
            presence_penalty: case.presence_penalty,
            ..Default::default()
        };
        let mut changed = false;
        for r in &case.results {
            let ids = loaded.tokenizer.encode(&r.prompt).unwrap();
            assert_eq!(ids, r.input_ids, "{name} {:?}", r.prompt);
            let job = GenerateJob {
                prompt_ids: &ids,
                max_new_tokens: r.new_ids.len(),
                sampling: sampling.clone(),
                stop_at_eos: false,
                adapter: adapter.as_ref().map(|a| &a.weights),
            };
            let out = generate(&loaded.model, &job).unwrap();
            assert_eq!(out.token_ids, r.new_ids, "{name} {:?}", r.prompt);
            let greedy = &plain[case.adapter.as_deref().unwrap_or("base")];
            changed |= greedy.iter().find(|c| c.prompt == r.prompt).unwrap().greedy_new_ids != r.new_ids;
        }
        assert!(changed, "{name}: the penalties change no prompt's tokens");
    }
}
