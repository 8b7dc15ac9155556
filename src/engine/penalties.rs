//! The penalties' state and arithmetic: the tokens a request's repetition, frequency and presence penalties
//! look at ([`History`], kept token by token) and their application to a row of logits ([`penalize`]), for
//! the sampler ([`super::sampler`]).

use std::collections::{HashMap, HashSet};

use super::sampling_params::SamplingParams;

/// The tokens the penalties look at, kept up to date token by token (not recounted every step).
#[derive(Clone, Debug, Default)]
pub(super) struct History {
    /// Every token of the prompt and of the output so far (the repetition penalty's set).
    pub(super) seen: HashSet<u32>,
    /// How many times each token occurs in the output (frequency and presence).
    pub(super) output: HashMap<u32, u32>,
}

/// Applies the penalties to `logits` in place, in vLLM's order: repetition (prompt and output tokens, as
/// Hugging Face's `RepetitionPenaltyLogitsProcessor`), then frequency, then presence (output tokens). A
/// finite logit stays finite: a penalty as large (or small) as f32 allows saturates it at f32's range rather
/// than overflow to ±∞, which would leave a request whose every allowed token was seen nothing to pick
/// (Hugging Face's f32 overflows; the request is valid). −∞ (a token not allowed) stays −∞.
pub(super) fn penalize(p: &SamplingParams, h: &History, logits: &mut [f32]) {
    if p.repetition_penalty != 1.0 {
        for &t in &h.seen {
            if let Some(l) = logits.get_mut(t as usize).filter(|l| l.is_finite()) {
                let penalized = if *l < 0.0 { *l * p.repetition_penalty } else { *l / p.repetition_penalty };
                *l = penalized.clamp(f32::MIN, f32::MAX);
            }
        }
    }
    for (&t, &n) in &h.output {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= p.frequency_penalty * n as f32;
            *l -= p.presence_penalty;
        }
    }
}
