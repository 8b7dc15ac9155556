//! One prompt, start to finish, on the calling thread: prefill, then decode token by token through the
//! paged KV cache. This is `server generate` and the golden tests; the server's engine runs the same
//! model calls for many requests at once.

use candle_core::Result;

use super::request::FinishReason;
use super::sampler::Sampler;
use super::sampling_params::SamplingParams;
use crate::lora::{LoraRows, LoraSegment, LoraWeights};
use crate::model::kv_cache::PagedKvCache;
use crate::model::{AttentionMode, Batch, Model, SeqInput};

/// KV block size of single-request generation.
const BLOCK_SIZE: usize = 16;

/// A single generation job.
pub struct GenerateJob<'a> {
    pub prompt_ids: &'a [u32],
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the model's EOS ids and the stop tokens (the golden tests' reference loop does not).
    pub stop_at_eos: bool,
    pub adapter: Option<&'a LoraWeights>,
}

pub struct Generated {
    pub token_ids: Vec<u32>,
    /// Logits of the last prompt position (f32, vocab-sized).
    pub prompt_logits: Vec<f32>,
    pub finish: FinishReason,
    /// The seed it sampled with, when it sampled ([`super::sampler::Sampler::seed`]).
    pub seed: Option<u64>,
}

/// Runs `job` to completion.
pub fn generate(model: &Model, job: &GenerateJob) -> Result<Generated> {
    let n = job.prompt_ids.len();
    if n == 0 {
        candle_core::bail!("empty prompt")
    }
    let geo = model.kv_geometry(BLOCK_SIZE);
    let total = n + job.max_new_tokens;
    let blocks_needed = geo.blocks_for(total).max(1);
    // Sized for the whole request up front: past the machine's memory, its allocation would abort.
    let bytes = blocks_needed as u128 * geo.block_bytes() as u128;
    if let Some(memory) = crate::model::kv_cache::host_memory_bytes().filter(|_| model.device().is_cpu()) {
        if bytes > memory as u128 {
            candle_core::bail!(
                "{n} prompt tokens + max_new_tokens {} need a KV cache of {bytes} bytes, more than this machine's memory ({memory} bytes)",
                job.max_new_tokens
            )
        }
    }
    let mut cache = PagedKvCache::on_device(geo, blocks_needed, model.device())?;
    let blocks = cache.allocator_mut().allocate(blocks_needed).expect("fresh cache");
    let eos = &model.config().eos_token_ids;
    let mut sampler = Sampler::new(job.sampling.clone(), super::sampler::unseeded(), job.prompt_ids, eos);

    let step = |tokens: &[u32], past: usize, cache: &mut PagedKvCache| -> Result<Vec<f32>> {
        let seqs = [SeqInput { len: tokens.len(), past, blocks: &blocks }];
        let segs;
        let lora = match job.adapter {
            Some(a) => {
                segs = [LoraSegment::new(0..tokens.len(), a)];
                LoraRows::Segments(&segs)
            }
            None => LoraRows::None,
        };
        let batch = Batch { tokens, seqs: &seqs, logit_rows: &[tokens.len() - 1] };
        model.forward(&batch, AttentionMode::Paged(cache), &lora)?.flatten_all()?.to_vec1::<f32>()
    };

    let prompt_logits = step(job.prompt_ids, 0, &mut cache)?;
    let mut logits = prompt_logits.clone();
    let mut out = Vec::with_capacity(job.max_new_tokens);
    let mut finish = FinishReason::Length;
    while out.len() < job.max_new_tokens {
        let next = sampler
            .sample(&logits)
            .map_err(|e| candle_core::Error::msg(format!("output token {}: {e}", out.len() + 1)))?;
        out.push(next);
        if let Some(end) = job.sampling.ends_at(next, eos).filter(|_| job.stop_at_eos) {
            finish = end;
            break;
        }
        if out.len() == job.max_new_tokens {
            break;
        }
        logits = step(&[next], n + out.len() - 1, &mut cache)?;
    }
    Ok(Generated { token_ids: out, prompt_logits, finish, seed: sampler.seed() })
}
