//! What crosses into the engine and what comes back: a validated request ([`ValidRequest`]: token ids,
//! limits, sampling, stop strings, whether to report logprobs, adapter lease, deadline, the channel its
//! events go to) and the [`Event`]s of its life. Proto types never get here: the server validates at the
//! edge.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::sampling_params::SamplingParams;
use crate::lora::cache::AdapterLease;

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` generated.
    Length,
    /// An end-of-sequence token was generated (included in the tokens).
    EosToken,
    /// A stop string appeared in the text (the text ends before it).
    StopSequence,
    /// One of the request's stop token ids was generated (included in the tokens).
    StopToken,
}

/// What stopped a request that a stop string or a stop token ended (vLLM's `stop_reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The stop string found in the text.
    String(String),
    /// The stop token id generated.
    Token(u32),
}

/// Why the engine gave up on a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("request needs {needed} KV-cache blocks (prompt + max_new_tokens) but the whole cache has {capacity} (--kv-cache-bytes)")]
    TooLong { needed: usize, capacity: usize },
    #[error("internal error: {0}")]
    Internal(String),
    /// The request's own settings leave no token to pick (its `bad_words` ban every token it allows there).
    #[error("{0}")]
    Unsatisfiable(String),
}

/// Something that happened to a request, in order: `Started` when it first runs (none for a request that
/// ends before), with [`ValidRequest::prompt_logprobs`] its `Prompt` right before its first tokens, tokens as
/// they are produced, then exactly one `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// It joined the running batch for the first time, after waiting this long since its submission to the
    /// engine (in the queue).
    Started {
        queue_time: Duration,
    },
    /// The prompt scored (asked for by [`ValidRequest::prompt_logprobs`]).
    Prompt(PromptLogprobs),
    /// New tokens and the text they complete (possibly empty while a character or a possible stop string
    /// is held back).
    Tokens {
        ids: Vec<u32>,
        text: String,
        /// With [`ValidRequest::logprobs`], one per id: its log-probability under the model; else empty.
        logprobs: Vec<f32>,
        /// With [`ValidRequest::top_logprobs`], one per id: the most likely tokens at its step, most likely
        /// first, with their log-probabilities; else empty.
        top_logprobs: Vec<Vec<(u32, f32)>>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Leading prompt tokens whose keys and values came from the prefix cache when the request first ran.
        cached_tokens: usize,
        generated_tokens: usize,
        /// With [`FinishReason::StopSequence`] or [`FinishReason::StopToken`]: which.
        stop_reason: Option<StopReason>,
        /// When it sampled (temperature > 0): the seed it sampled with ([`super::sampler::Sampler::seed`]).
        seed: Option<u64>,
    },
    Failed(EngineError),
}

/// A prompt's token ids and, for every one after the first, its log-probability given those before it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptLogprobs {
    pub ids: Vec<u32>,
    /// `logprobs[i]` is that of `ids[i + 1]`.
    pub logprobs: Vec<f32>,
    /// With [`ValidRequest::prompt_logprobs`] > 0, one per entry of `logprobs`: the most likely tokens at its
    /// position, most likely first, with their log-probabilities; else empty.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// `truncate_prompt_tokens`, as vLLM truncates: `keep` ids at most, a raw prompt keeping the ids its tokenizer
/// puts before the text (`prefix`, its BOS) and its text's last ones; a conversation's ids (`prefix` empty) are
/// cut as they are. An error when `keep` leaves no room for any of the text.
pub fn truncate_prompt(ids: &mut Vec<u32>, keep: u32, prefix: &[u32]) -> Result<(), String> {
    let keep = keep as usize;
    if ids.len() <= keep {
        return Ok(());
    }
    let p = if ids.starts_with(prefix) { prefix.len() } else { 0 };
    if keep <= p {
        return Err(format!(
            "{keep} leaves no room for the prompt's text after the {p} token(s) the tokenizer puts before it; at least {}",
            p + 1
        ));
    }
    ids.drain(p..ids.len() - (keep - p));
    Ok(())
}

/// A request the server has validated: everything the engine needs, nothing it must re-check.
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep what ended the text at its end: the stop string found (else the text ends before it), or the stop
    /// token's text (else left out); vLLM's `include_stop_str_in_output`.
    pub include_stop_str_in_output: bool,
    /// Leave special tokens out of the text (vLLM's `skip_special_tokens`, its default); false spells them
    /// out. The token that ends the request stays out either way, unless `include_stop_str_in_output`.
    pub skip_special_tokens: bool,
    /// Report each token's log-probability under the model's own distribution (the log-softmax of its
    /// logits, before the allow list, `min_tokens`, the bias, penalties, temperature, top-k, top-p and min-p:
    /// vLLM's default `raw_logprobs`).
    pub logprobs: bool,
    /// With `logprobs`: also report this many of the most likely tokens at each step (0 = none).
    pub top_logprobs: usize,
    /// Score the prompt too: each prompt token's log-probability under the same distribution, and this many
    /// of the most likely tokens at each prompt position (vLLM's `prompt_logprobs`); `None` = not asked.
    pub prompt_logprobs: Option<usize>,
    /// The adapter version this request runs with, held until it ends (`None` = base model).
    pub adapter: Option<AdapterLease>,
    /// Only requests with the same salt share cached prompt blocks: the request's `cache_salt` (vLLM's), and
    /// the API key it came with, so that no tenant learns from how fast an answer comes, or from its
    /// `cached_prompt_tokens`, what another asked.
    pub cache_salt: String,
    pub deadline: Option<Instant>,
    pub arrival: Instant,
    /// Where events go; when the receiver is dropped (client gone) the engine stops the request.
    pub events: mpsc::UnboundedSender<Event>,
}

impl ValidRequest {
    /// Completion `index` of the same request (OpenAI's and vLLM's `n`), its events going to `events`: every
    /// setting the same and its own lease on the adapter version, but sampled with `seed + index` when the
    /// request is seeded (vLLM's children; unseeded, the engine draws each a fresh seed), and without scoring
    /// the prompt again (completion 0 does).
    pub fn sibling(&self, index: u64, events: mpsc::UnboundedSender<Event>) -> ValidRequest {
        ValidRequest {
            prompt_ids: self.prompt_ids.clone(),
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling.for_completion(index),
            stop: self.stop.clone(),
            include_stop_str_in_output: self.include_stop_str_in_output,
            skip_special_tokens: self.skip_special_tokens,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            prompt_logprobs: None,
            adapter: self.adapter.clone(),
            cache_salt: self.cache_salt.clone(),
            deadline: self.deadline,
            arrival: self.arrival,
            events,
        }
    }
}

impl std::fmt::Debug for ValidRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidRequest")
            .field("prompt_tokens", &self.prompt_ids.len())
            .field("max_new_tokens", &self.max_new_tokens)
            .field("adapter", &self.adapter)
            .finish()
    }
}
