//! A request's validated sampling settings ([`SamplingParams`], vLLM's `SamplingParams`): their defaults,
//! the generation_config defaults laid over them, completion i's seed for `n`, their checks (alone, against
//! `max_new_tokens`, and against the model's vocabulary and EOS tokens; each message names its field), and
//! which tokens end a request ([`SamplingParams::ends_at`]). The sampler ([`super::sampler`]) applies them.

use std::collections::HashSet;
use std::sync::Arc;

use super::request::FinishReason;
use super::structured::Guide;

/// Validated sampling settings of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k filter.
    pub top_k: u32,
    /// 1.0 = no nucleus filter; otherwise in (0, 1).
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Hugging Face's (and vLLM's, TGI's) repetition penalty, > 0; 1.0 = none. The logit of every token in
    /// the prompt or the output so far is divided by it when positive, multiplied by it otherwise.
    pub repetition_penalty: f32,
    /// In [-2, 2], 0 = none: subtracted from a token's logit once per time the output holds it (OpenAI's
    /// definition, as vLLM applies it: the output only, not the prompt).
    pub frequency_penalty: f32,
    /// In [-2, 2], 0 = none: subtracted from the logit of every token the output holds.
    pub presence_penalty: f32,
    /// In [0, 1], 0 = none: after top-p, tokens less likely than `min_p` × the most likely one are dropped
    /// (transformers' `MinPLogitsWarper`, vLLM's `min_p`). Greedy ignores it.
    pub min_p: f32,
    /// The tokens that would end the request ([`ends_at`](Self::ends_at)) cannot be picked before this many
    /// tokens are generated (vLLM's `min_tokens`, transformers' `min_new_tokens`: their logits are −∞ until
    /// then).
    pub min_tokens: u32,
    /// Generation goes on past EOS tokens, to `max_new_tokens` or a stop string (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Tokens that end generation as EOS does (vLLM's `stop_token_ids`); `ignore_eos` does not touch them.
    pub stop_token_ids: Vec<u32>,
    /// Added to these tokens' logits (OpenAI's and vLLM's `logit_bias`, each in [-100, 100]), after
    /// `allowed_token_ids` and `min_tokens`, before the penalties (vLLM's order). One entry per token.
    pub logit_bias: Vec<(u32, f32)>,
    /// When not empty, only these tokens can be picked: every other logit is −∞ (vLLM's `allowed_token_ids`).
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words`, as token sequences ([`super::bad_words::bad_words_ids`]): a sequence's last token
    /// cannot be picked where the output ends with the rest of it (after the allow list, before `min_tokens`).
    pub bad_words: Vec<Vec<u32>>,
    /// Structured output: only tokens that keep the output a prefix of a text of the guide's language can be
    /// picked, and the ending tokens where it is a whole one, a stop token also where the language takes it
    /// as text (every other logit −∞, first of all).
    pub guide: Option<Arc<Guide>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            min_p: 0.0,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logit_bias: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
            guide: None,
        }
    }
}

impl SamplingParams {
    /// The parameters of completion `index` of a request with these (OpenAI's and vLLM's `n`): the same, but
    /// seeded `seed + index` when seeded (vLLM's children); unseeded, each completion draws a fresh seed.
    pub fn for_completion(&self, index: u64) -> Self {
        SamplingParams { seed: self.seed.map(|s| s.wrapping_add(index)), ..self.clone() }
    }

    /// These parameters with `d`'s settings, where it has them, in place of theirs.
    pub fn with(self, d: crate::model::GenerationDefaults) -> Self {
        SamplingParams {
            temperature: d.temperature.unwrap_or(self.temperature),
            top_p: d.top_p.unwrap_or(self.top_p),
            top_k: d.top_k.unwrap_or(self.top_k),
            min_p: d.min_p.unwrap_or(self.min_p),
            repetition_penalty: d.repetition_penalty.unwrap_or(self.repetition_penalty),
            ..self
        }
    }

    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be a finite number ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(format!("logit_bias[{t}] must be in [-100, 100], got {b}"));
        }
        let mut biased = HashSet::new();
        if let Some((t, _)) = self.logit_bias.iter().find(|(t, _)| !biased.insert(*t)) {
            return Err(format!("logit_bias: token id {t} is given twice"));
        }
        Ok(())
    }

    /// Checks `min_tokens` against the request's `max_new_tokens` (vLLM refuses more too).
    pub fn validate_lengths(&self, max_new_tokens: usize) -> Result<(), String> {
        if self.min_tokens as usize > max_new_tokens {
            return Err(format!("min_tokens ({}) exceeds max_new_tokens ({max_new_tokens})", self.min_tokens));
        }
        Ok(())
    }

    /// Checks the token ids against the model: each inside its vocabulary of `vocab` (an id past it could never
    /// be generated), and with `min_tokens`, an allowed token that does not end the request (its `eos`).
    pub fn validate_model(&self, vocab: usize, eos: &[u32]) -> Result<(), String> {
        let outside =
            |field: String, id: u32| format!("{field}: token id {id} is outside the vocabulary of {vocab} tokens");
        if let Some((i, &id)) = self.stop_token_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(outside(format!("stop_token_ids[{i}]"), id));
        }
        if let Some(&(id, _)) = self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(outside("logit_bias".into(), id));
        }
        if let Some((i, &id)) = self.allowed_token_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(outside(format!("allowed_token_ids[{i}]"), id));
        }
        let allowed = &self.allowed_token_ids;
        // One-token bad words ban their token everywhere: an allow list of such tokens leaves nothing.
        let banned = |t: u32| self.bad_words.iter().any(|w| w[..] == [t]);
        if !allowed.is_empty() && allowed.iter().all(|&t| banned(t)) {
            return Err("bad_words: they ban every token of allowed_token_ids".into());
        }
        let usable = || allowed.iter().filter(|&&t| !banned(t));
        if self.min_tokens > 0 && !allowed.is_empty() && usable().all(|&t| self.ends_at(t, eos).is_some()) {
            return Err(format!(
                "allowed_token_ids: every allowed token ends the request, so min_tokens ({}) cannot be met",
                self.min_tokens
            ));
        }
        if let Some(g) = &self.guide {
            let field = g.constraint().field();
            if !allowed.is_empty() {
                return Err(format!("{field} cannot be combined with allowed_token_ids"));
            }
            if self.min_tokens > 0 {
                return Err(format!(
                    "{field} cannot be combined with min_tokens: where the output is a whole text of the language \
                     and nothing may follow, only an ending token can be picked"
                ));
            }
            if !eos.iter().chain(&self.stop_token_ids).any(|&t| self.ends_at(t, eos).is_some()) {
                return Err(format!(
                    "{field} needs a token that ends the output where it is whole: the model has no EOS token \
                     (or ignore_eos is set) and stop_token_ids is empty"
                ));
            }
        }
        Ok(())
    }

    /// Whether `token` ends the request, and why: one of the model's `eos` tokens (unless `ignore_eos`), else
    /// one of `stop_token_ids`.
    pub fn ends_at(&self, token: u32, eos: &[u32]) -> Option<FinishReason> {
        if !self.ignore_eos && eos.contains(&token) {
            Some(FinishReason::EosToken)
        } else if self.stop_token_ids.contains(&token) {
            Some(FinishReason::StopToken)
        } else {
            None
        }
    }

    /// Whether any penalty changes the logits.
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Seeded sampling settings (the sampler's tests use them too).
    pub(crate) fn params(t: f32, k: u32, p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature: t, top_k: k, top_p: p, seed: Some(seed), ..Default::default() }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(params(-1.0, 0, 1.0, 0).validate().unwrap_err().contains("temperature"));
        assert!(params(1.0, 0, 0.0, 0).validate().unwrap_err().contains("top_p"));
        assert!(params(1.0, 0, 1.5, 0).validate().unwrap_err().contains("top_p"));
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        for min_p in [-0.1, 1.5, f32::NAN] {
            assert!(SamplingParams { min_p, ..Default::default() }.validate().unwrap_err().contains("min_p"));
        }
        let min_tokens = SamplingParams { min_tokens: 9, ..Default::default() };
        assert!(min_tokens.validate_lengths(8).unwrap_err().contains("min_tokens"));
        assert!(min_tokens.validate_lengths(9).is_ok());
        let stops = SamplingParams { stop_token_ids: vec![3, 9], ..Default::default() };
        assert!(stops.validate_model(9, &[]).unwrap_err().starts_with("stop_token_ids[1]: token id 9"));
        assert!(stops.validate_model(10, &[]).is_ok());
        let bias = |b: f32| SamplingParams { logit_bias: vec![(2, 1.0), (7, b)], ..Default::default() };
        assert_eq!(bias(100.5).validate().unwrap_err(), "logit_bias[7] must be in [-100, 100], got 100.5");
        assert!(bias(f32::NAN).validate().is_err());
        assert!(bias(-100.0).validate().is_ok());
        let twice = SamplingParams { logit_bias: vec![(2, 1.0), (2, -1.0)], ..Default::default() };
        assert_eq!(twice.validate().unwrap_err(), "logit_bias: token id 2 is given twice");
        assert!(bias(0.0).validate_model(7, &[]).unwrap_err().starts_with("logit_bias: token id 7"));
        let allowed = SamplingParams { allowed_token_ids: vec![1, 2], min_tokens: 1, ..Default::default() };
        assert!(allowed.validate_model(2, &[]).unwrap_err().starts_with("allowed_token_ids[1]: token id 2"));
        assert!(allowed.validate_model(3, &[1, 2]).unwrap_err().contains("min_tokens (1) cannot be met"));
        assert!(allowed.validate_model(3, &[1]).is_ok());
        assert!(SamplingParams { min_tokens: 0, ..allowed }.validate_model(3, &[1, 2]).is_ok());
    }

    #[test]
    fn penalty_validation_names_the_field() {
        let repetition = |repetition_penalty| SamplingParams { repetition_penalty, ..Default::default() };
        let frequency = |frequency_penalty| SamplingParams { frequency_penalty, ..Default::default() };
        let presence = |presence_penalty| SamplingParams { presence_penalty, ..Default::default() };
        for (p, field) in [
            (repetition(0.0), "repetition_penalty"),
            (repetition(-1.0), "repetition_penalty"),
            (repetition(f32::INFINITY), "repetition_penalty"),
            (frequency(2.5), "frequency_penalty"),
            (frequency(f32::NAN), "frequency_penalty"),
            (presence(-2.01), "presence_penalty"),
        ] {
            assert!(p.validate().unwrap_err().contains(field), "{p:?}");
        }
        let edges = SamplingParams { frequency_penalty: -2.0, presence_penalty: 2.0, ..repetition(0.01) };
        assert!(edges.validate().is_ok());
    }
}
