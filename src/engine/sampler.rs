//! Token sampling: the allowed tokens (vLLM's `allowed_token_ids`), the `bad_words` ([`super::bad_words`]),
//! the tokens that would end the request held back until `min_tokens` (vLLM's `min_tokens`, transformers'
//! `min_new_tokens`), the logit bias (OpenAI's `logit_bias`), the penalties (`penalties.rs`: repetition
//! as Hugging Face applies it, then frequency and presence as OpenAI defines them, in vLLM's order), then
//! greedy (temperature 0) or temperature → top-k →
//! top-p → min-p (the order Hugging Face applies them in), with structured output ([`super::structured`])
//! allowing only the tokens that keep the output in its language, drawn from the project's PRNG so a seed
//! gives the same tokens on every machine and version; and the greedy pick ([`argmax`]). The settings are
//! [`SamplingParams`] ([`super::sampling_params`]); rows arrive as [`RowLogits`] ([`super::logits`]).

use std::collections::HashMap;

use super::logits::RowLogits;
use super::penalties::{penalize, History};
use super::request::FinishReason;
use super::sampling_params::SamplingParams;
use super::structured::Cursor;
use crate::rng::Rng;

/// A request's sampler: its parameters, its own random stream, and what the penalties and `min_tokens` look
/// at.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    /// What `rng` was seeded with: the request's seed, or the one drawn for it.
    seed: u64,
    rng: Rng,
    /// Kept only when a penalty is set.
    history: Option<History>,
    /// The tokens `min_tokens` holds back: those that would end the request (empty when it is 0).
    held: Vec<u32>,
    /// Tokens picked so far.
    generated: usize,
    /// With `bad_words`: the last output tokens they look at.
    recent: Vec<u32>,
    /// With structured output: where the output is in the guide's automaton, the tokens that end the
    /// request (allowed where the output is whole), and those of them that are stop tokens (allowed where the
    /// language takes them as text, too).
    guided: Option<(Cursor, Vec<u32>, Vec<u32>)>,
}

/// A seed for a request that gave none: different in every call and every process (std's per-process random
/// hash keys), so unseeded sampling varies run to run as in TGI and transformers; a given seed reproduces.
pub fn unseeded() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5EED);
    h.finish()
}

impl Sampler {
    /// `fallback_seed` seeds requests that gave none (callers pass [`unseeded`]); `prompt_ids` is the
    /// request's prompt, which the repetition penalty counts as seen; `eos` the model's EOS tokens, which
    /// `min_tokens` holds back (unless `ignore_eos`) with the stop tokens.
    pub fn new(params: SamplingParams, fallback_seed: u64, prompt_ids: &[u32], eos: &[u32]) -> Self {
        // A drawn seed is reported (`seed`): below 2^53, JSON readers that hold numbers as doubles read it exactly.
        let seed = params.seed.unwrap_or(fallback_seed & ((1 << 53) - 1));
        let history =
            params.penalizes().then(|| History { seen: prompt_ids.iter().copied().collect(), output: HashMap::new() });
        let ending = |p: &SamplingParams| -> Vec<u32> {
            eos.iter().chain(&p.stop_token_ids).copied().filter(|&t| p.ends_at(t, eos).is_some()).collect()
        };
        let held = match params.min_tokens {
            0 => Vec::new(),
            _ => ending(&params),
        };
        let guided = params.guide.as_ref().map(|g| {
            let ending = ending(&params);
            let stops =
                ending.iter().copied().filter(|&t| params.ends_at(t, eos) == Some(FinishReason::StopToken)).collect();
            (g.start(), ending, stops)
        });
        let recent = Vec::with_capacity(super::bad_words::context_len(&params.bad_words));
        Sampler { params, seed, rng: Rng::new(seed), history, held, generated: 0, recent, guided }
    }

    /// The seed its draws come from, when it samples (temperature > 0; TGI's `details.seed`): sent back as the
    /// request's `seed`, it gives the same draws.
    pub fn seed(&self) -> Option<u64> {
        (self.params.temperature > 0.0).then_some(self.seed)
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token is the argmax of the logits as the model gave them (temperature 0, no processing
    /// of the logits), so that it can be picked where the logits are.
    pub fn picks_argmax(&self) -> bool {
        self.params.temperature == 0.0 && !self.processes()
    }

    /// Whether the next pick sees other logits than the model's: an allow list, structured output, bad words,
    /// ending tokens held back, a bias or a penalty.
    fn processes(&self) -> bool {
        let p = &self.params;
        self.history.is_some()
            || self.holds_back()
            || !p.logit_bias.is_empty()
            || !p.allowed_token_ids.is_empty()
            || !p.bad_words.is_empty()
            || self.guided.is_some()
    }

    /// Whether `min_tokens` still holds the ending tokens back.
    fn holds_back(&self) -> bool {
        !self.held.is_empty() && self.generated < self.params.min_tokens as usize
    }

    /// The next token from a row as [`fetch_rows`](super::logits::fetch_rows) brought it (an argmax row comes
    /// from a sampler that [`picks_argmax`](Self::picks_argmax)).
    pub fn pick(&mut self, row: &RowLogits) -> Result<u32, NoToken> {
        match row {
            RowLogits::Full(logits) => self.sample(logits),
            RowLogits::Argmax(id) => {
                debug_assert!(self.picks_argmax(), "an argmax row for a sampler that does not pick the argmax");
                let id = id.ok_or(NoToken::Broken)?;
                self.generated += 1;
                Ok(id)
            }
        }
    }

    /// Picks the next token from one row of logits, and counts it as output for the penalties and
    /// `min_tokens`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, NoToken> {
        let token = if self.processes() {
            // vLLM's order: the structured output's tokens or the allowed ones, the bad words, `min_tokens`, the
            // logit bias, then the penalties.
            let mut processed = match self.params.allowed_token_ids.as_slice() {
                [] if self.guided.is_some() => self.guided_only(logits),
                [] => logits.to_vec(),
                allowed => {
                    let mut only = vec![f32::NEG_INFINITY; logits.len()];
                    for &t in allowed {
                        if let Some(&l) = logits.get(t as usize) {
                            only[t as usize] = l;
                        }
                    }
                    only
                }
            };
            let banned = super::bad_words::ban(&self.params.bad_words, &self.recent, &mut processed);
            if self.holds_back() {
                for &t in &self.held {
                    if let Some(l) = processed.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            for &(t, bias) in &self.params.logit_bias {
                if let Some(l) = processed.get_mut(t as usize) {
                    *l += bias;
                }
            }
            if let Some(h) = &self.history {
                penalize(&self.params, h, &mut processed);
            }
            // Nothing to pick where the words banned a pickable token: the request's own doing.
            self.draw(&processed).ok_or(if banned { NoToken::BadWords } else { NoToken::Broken })?
        } else {
            self.draw(logits).ok_or(NoToken::Broken)?
        };
        self.generated += 1;
        let keep = super::bad_words::context_len(&self.params.bad_words);
        if keep > 0 {
            if self.recent.len() == keep {
                self.recent.remove(0);
            }
            self.recent.push(token);
        }
        if let Some(h) = &mut self.history {
            h.seen.insert(token);
            *h.output.entry(token).or_default() += 1;
        }
        if let (Some((state, ending, _)), Some(g)) = (&mut self.guided, &self.params.guide) {
            if !ending.contains(&token) {
                *state = g.advance(*state, token);
                g.prefetch(*state);
            }
        }
        Ok(token)
    }

    /// The logits of the tokens the structured output allows now; −∞ for the others.
    fn guided_only(&self, logits: &[f32]) -> Vec<f32> {
        let (Some((state, ending, stops)), Some(g)) = (&self.guided, &self.params.guide) else {
            return logits.to_vec();
        };
        g.mask(*state).apply(logits, ending, stops)
    }

    /// Greedy or sampled, from logits the penalties have already changed; `None` when every logit is NaN or
    /// −∞.
    fn draw(&mut self, logits: &[f32]) -> Option<u32> {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        // In f64: logits over a temperature as small as f32 allows (1e-45) stay finite.
        let t = self.params.temperature as f64;
        // NaN and −∞ logits (tokens not allowed, or held back) are never drawn, not even by rounding.
        let mut cand: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, l as f64 / t))
            .collect();
        if cand.is_empty() {
            return None;
        }
        // Highest first; ties (-0.0 and +0.0 included, as in `argmax`) keep the lower token id first (stable
        // sort). NaN was filtered out above.
        cand.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("no NaN"));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k as usize);
        }
        let max = cand[0].1;
        if max == f64::INFINITY {
            return Some(cand[0].0); // an infinite logit takes all the mass
        }
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        if self.params.min_p > 0.0 {
            // Keep the tokens at least min_p times as likely as the first (the most likely; always kept).
            let floor = self.params.min_p as f64 * probs[0];
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            probs.truncate(keep);
            cand.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let u = self.rng.uniform();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return Some(cand[i].0);
            }
        }
        // `u` fell in the rounding gap below 1: the last token that has any mass.
        let last = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
        Some(cand[last].0)
    }
}

/// Index of the largest logit, the first one on ties (as `torch.argmax`). NaN and −∞ logits are passed over,
/// as sampling passes over them (`torch.argmax` would pick a NaN); `None` when every one is NaN or −∞: nothing
/// can be picked.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        match best {
            _ if l.is_nan() || l == f32::NEG_INFINITY => {}
            Some((_, b)) if l <= b => {}
            _ => best = Some((i, l)),
        }
    }
    best.map(|(i, _)| i as u32)
}

/// A step that leaves nothing to pick; the request fails rather than answer a token it does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoToken {
    /// Every token the request allows has a NaN or −∞ logit: the model's numbers broke down (an adapter whose
    /// scale overflows f32, say).
    #[error("no token can be picked: the logit of every token the request allows is NaN or −∞")]
    Broken,
    /// The request's `bad_words` ban every token it allows here (its allow list, its structured output's
    /// tokens, what `min_tokens` leaves): its own settings conflict.
    #[error("bad_words: they ban every token the request allows here")]
    BadWords,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling_params::tests::params;

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::default(), 0, &[], &[]);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn unseeded_requests_get_distinct_seeds() {
        let seeds: std::collections::HashSet<u64> = (0..100).map(|_| unseeded()).collect();
        assert_eq!(seeds.len(), 100);
    }

    #[test]
    fn argmax_passes_over_nan_and_minus_infinity_wherever_they_are() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        assert_eq!(argmax(&[nan, 1.0, 2.0]), Some(2));
        assert_eq!(argmax(&[1.0, nan, 0.5]), Some(0));
        assert_eq!(argmax(&[-inf, -3.0, nan]), Some(1));
        assert_eq!(argmax(&[nan, -inf, inf, inf]), Some(2));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0), "equal values: the first");
        assert_eq!(argmax(&[nan, nan]), None);
        assert_eq!(argmax(&[-inf, -inf]), None);
        assert_eq!(argmax(&[nan, -inf]), None);
        assert_eq!(argmax(&[]), None);
    }

    /// A row whose logits leave nothing the request allows (the forward overflowed to NaN) fails the pick,
    /// greedy or sampled, allow-listed or not, whole or picked on the device; it never answers a token.
    #[test]
    fn nothing_to_pick_is_an_error_not_a_token() {
        let nan = f32::NAN;
        let all_nan = [nan; 6];
        let allowed = |t: f32| SamplingParams { temperature: t, allowed_token_ids: vec![4, 5], ..Default::default() };
        for t in [0.0, 0.7] {
            let plain = SamplingParams { temperature: t, ..Default::default() };
            assert_eq!(Sampler::new(plain, 1, &[], &[]).sample(&all_nan), Err(NoToken::Broken), "temperature {t}");
            // Only the allowed tokens' logits broke: the others cannot stand in for them.
            let broken_allowed = [0.5, 2.0, 1.0, 0.0, nan, nan];
            assert_eq!(Sampler::new(allowed(t), 1, &[], &[]).sample(&broken_allowed), Err(NoToken::Broken));
            assert_eq!(Sampler::new(allowed(t), 1, &[], &[]).sample(&[0.5, 2.0, 1.0, 0.0, nan, 3.0]), Ok(5));
        }
        let mut s = Sampler::new(SamplingParams::default(), 1, &[], &[]);
        assert_eq!(s.pick(&RowLogits::Argmax(None)), Err(NoToken::Broken));
        assert_eq!(s.pick(&RowLogits::Full(all_nan.to_vec())), Err(NoToken::Broken));
        assert!(NoToken::Broken.to_string().contains("NaN or −∞"));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        let mut a = Sampler::new(params(1.0, 1, 1.0, 3), 0, &[], &[]);
        let mut b = Sampler::new(params(5.0, 0, 1e-6, 3), 0, &[], &[]);
        for _ in 0..50 {
            assert_eq!(a.sample(&logits).unwrap(), 1);
            assert_eq!(b.sample(&logits).unwrap(), 1);
        }
    }

    #[test]
    fn seeded_sampling_repeats_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed), 0, &[], &[]);
            (0..4000).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        let a = draw(9);
        assert_eq!(a, draw(9));
        assert_ne!(a, draw(10));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert!(!a.contains(&2));
    }

    #[test]
    fn the_smallest_temperatures_pick_the_most_likely_token() {
        // 10 / 1e-40 overflows f32: the scaled logits must not become infinities (NaN probabilities).
        let logits = [0.5f32, 10.0, 9.99, -3.0];
        for t in [1e-45f32, 1e-40, 1e-38, 1e-6] {
            let mut s = Sampler::new(params(t, 0, 1.0, 5), 0, &[], &[]);
            assert!((0..20).all(|_| s.sample(&logits).unwrap() == 1), "temperature {t}");
        }
        let mut s = Sampler::new(params(1.0, 0, 1.0, 5), 0, &[], &[]);
        assert_eq!(s.sample(&[1.0, f32::INFINITY, 2.0]).unwrap(), 1);
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // probs ≈ [0.6, 0.3, 0.1]: top_p 0.8 keeps the first two only.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(params(1.0, 0, 0.8, 1), 0, &[], &[]);
        assert!((0..2000).all(|_| s.sample(&logits).unwrap() != 2));
    }

    #[test]
    fn min_p_drops_tokens_less_likely_than_its_share_of_the_top_one() {
        // probs ≈ [0.5, 0.3, 0.2]: min_p 0.5 keeps tokens with p ≥ 0.25, so never token 2; 0.61 keeps 0 only.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let with = |min_p| SamplingParams { min_p, ..params(1.0, 0, 1.0, 4) };
        let mut s = Sampler::new(with(0.5), 0, &[], &[]);
        let draws: Vec<u32> = (0..3000).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(!draws.contains(&2) && draws.contains(&1));
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.375).abs() < 0.03, "renormalised over the two kept: {ones}");
        let mut s = Sampler::new(with(0.61), 0, &[], &[]);
        assert!((0..500).all(|_| s.sample(&logits).unwrap() == 0));
        // 0 is off: every token is drawn.
        let mut s = Sampler::new(with(0.0), 0, &[], &[]);
        assert!((0..3000).any(|_| s.sample(&logits).unwrap() == 2));
        // Greedy ignores it; it does not stop the device argmax.
        assert!(Sampler::new(SamplingParams { min_p: 0.9, ..Default::default() }, 0, &[], &[]).picks_argmax());
    }

    /// The allow list, then the bias, then the penalties (vLLM's order); neither lets the device pick the raw
    /// argmax.
    #[test]
    fn allowed_tokens_and_logit_bias_shape_the_pick() {
        let logits = [1.0f32, 5.0, 3.0, 2.0];
        let allowed = SamplingParams { allowed_token_ids: vec![0, 3], ..Default::default() };
        let mut s = Sampler::new(allowed.clone(), 0, &[], &[]);
        assert!(!s.picks_argmax());
        assert_eq!(s.sample(&logits).unwrap(), 3);
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(1), ..allowed }, 0, &[], &[]);
        assert!((0..200).all(|_| [0, 3].contains(&s.sample(&logits).unwrap())));
        let bias = SamplingParams { logit_bias: vec![(1, -4.0), (3, 2.5)], ..Default::default() };
        let mut s = Sampler::new(bias.clone(), 0, &[], &[]);
        assert!(!s.picks_argmax());
        assert_eq!(s.sample(&logits).unwrap(), 3, "1, 1, 3, 4.5");
        // Biased first, then penalized: (2 + 2.5) / 2 = 2.25 loses to 3 (penalized first, 1 + 2.5 would win).
        let penalized = SamplingParams { repetition_penalty: 2.0, ..bias };
        assert_eq!(Sampler::new(penalized, 0, &[3], &[]).sample(&logits).unwrap(), 2);
        // An allowed EOS (1) is still held back by min_tokens, greedy or sampled; -100 all but bans a token
        // when sampling too.
        let eos_allowed = SamplingParams { allowed_token_ids: vec![1, 3], min_tokens: 2, ..Default::default() };
        let mut s = Sampler::new(eos_allowed.clone(), 0, &[], &[1]);
        assert_eq!([s.sample(&logits).unwrap(), s.sample(&logits).unwrap(), s.sample(&logits).unwrap()], [3, 3, 1]);
        let sampled = SamplingParams { temperature: 50.0, seed: Some(2), min_tokens: 400, ..eos_allowed };
        let mut s = Sampler::new(sampled, 0, &[], &[1]);
        assert!((0..400).all(|_| s.sample(&logits).unwrap() == 3));
        let far =
            SamplingParams { temperature: 1.0, seed: Some(3), logit_bias: vec![(1, -100.0)], ..Default::default() };
        let mut s = Sampler::new(far, 0, &[], &[]);
        assert!((0..200).all(|_| s.sample(&[0.0, 0.0]).unwrap() == 0));
    }

    #[test]
    fn min_tokens_holds_eos_back_until_enough_tokens() {
        let eos = [2u32, 3];
        let p = |min_tokens| SamplingParams { min_tokens, ..Default::default() };
        // EOS (2) is the argmax; the next best (3) is EOS too, so 0 comes until min_tokens.
        let logits = [1.0f32, 0.5, 3.0, 2.0];
        let mut s = Sampler::new(p(3), 0, &[], &eos);
        let picked: Vec<u32> = (0..5).map(|_| s.sample(&logits).unwrap()).collect();
        assert_eq!(picked, [0, 0, 0, 2, 2]);
        // The device argmax only once EOS may come; a sampled row holds EOS back too.
        let mut s = Sampler::new(p(1), 0, &[], &eos);
        assert!(!s.picks_argmax());
        assert_eq!(s.sample(&logits).unwrap(), 0);
        assert!(s.picks_argmax());
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(1), ..p(50) }, 0, &[], &eos);
        assert!((0..50).all(|_| !eos.contains(&s.sample(&logits).unwrap())));
        // Without EOS tokens, or at 0, nothing is held back.
        assert!(Sampler::new(p(3), 0, &[], &[]).picks_argmax());
        assert_eq!(Sampler::new(p(0), 0, &[], &eos).sample(&logits).unwrap(), 2);
        // An argmax row counts as a generated token.
        let mut s = Sampler::new(p(1), 0, &[], &eos);
        s.sample(&logits).unwrap();
        assert_eq!(s.pick(&RowLogits::Argmax(Some(2))).unwrap(), 2);
    }

    #[test]
    fn eos_and_stop_tokens_end_requests_and_min_tokens_holds_back_those_that_would() {
        let eos = [2u32];
        let p = |ignore_eos, min_tokens| SamplingParams {
            ignore_eos,
            min_tokens,
            stop_token_ids: vec![3, 2],
            ..Default::default()
        };
        assert_eq!(p(false, 0).ends_at(2, &eos), Some(FinishReason::EosToken), "EOS first when both");
        assert_eq!(p(false, 0).ends_at(3, &eos), Some(FinishReason::StopToken));
        assert_eq!(p(false, 0).ends_at(0, &eos), None);
        assert_eq!(p(true, 0).ends_at(2, &eos), Some(FinishReason::StopToken), "a stop token still ends");
        assert_eq!(SamplingParams { ignore_eos: true, ..Default::default() }.ends_at(2, &eos), None);
        // min_tokens holds back EOS and the stop tokens; under ignore_eos an EOS that is no stop token may come.
        let logits = [0.0f32, 1.0, 3.0, 2.0];
        let mut s = Sampler::new(p(false, 1), 0, &[], &eos);
        assert_eq!(s.sample(&logits).unwrap(), 1);
        let ignoring =
            SamplingParams { ignore_eos: true, min_tokens: 1, stop_token_ids: vec![3], ..Default::default() };
        assert_eq!(Sampler::new(ignoring, 0, &[], &eos).sample(&logits).unwrap(), 2);
    }

    fn penalized(repetition: f32, frequency: f32, presence: f32) -> SamplingParams {
        SamplingParams {
            repetition_penalty: repetition,
            frequency_penalty: frequency,
            presence_penalty: presence,
            ..Default::default()
        }
    }

    /// Greedy picks from the same logits every step, so only the penalties move them.
    fn picks(params: SamplingParams, prompt: &[u32], logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params, 0, prompt, &[]);
        (0..n).map(|_| s.sample(logits).unwrap()).collect()
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
        // Token 0 is in the prompt: 3 / 2 = 1.5 < 2, so 1 wins; then 1 is seen too: 1.5 > 1.
        assert_eq!(picks(penalized(2.0, 0.0, 0.0), &[0], &[3.0, 2.0, -1.0], 3), [1, 0, 0]);
        // Negative logits grow more negative: -1 · 2 = -2 < -1.5.
        assert_eq!(picks(penalized(2.0, 0.0, 0.0), &[0], &[-1.0, -1.5], 1), [1]);
        // Below 1 it favours repeats; tokens past the logits (a prompt id beyond the vocabulary) are skipped.
        assert_eq!(picks(penalized(0.5, 0.0, 0.0), &[1, 99], &[3.0, 2.0], 2), [1, 1]);
        assert_eq!(picks(SamplingParams::default(), &[0], &[3.0, 2.0, -1.0], 2), [0, 0]);
    }

    /// A penalty at the edge of f32 saturates seen tokens' logits instead of turning them into ±∞: a request
    /// whose every allowed token is in its prompt still gets one (it failed INTERNAL, "no token can be
    /// picked"), and tokens it does not allow stay out.
    #[test]
    fn an_extreme_repetition_penalty_leaves_a_token_to_pick() {
        // −2 · 3.4e38 and −3 · 3.4e38 are past f32.
        let logits = [-2.0, -3.0, 3.0];
        for (t, penalty) in [(0.0, 3.4e38), (1.0, 3.4e38), (0.0, 1e-38), (1.0, 1e-38)] {
            let params =
                SamplingParams { temperature: t, allowed_token_ids: vec![0, 1], ..penalized(penalty, 0.0, 0.0) };
            for seed in 0..20 {
                let mut s = Sampler::new(params.clone(), seed, &[0, 1, 2], &[]);
                let token = s.sample(&logits).unwrap_or_else(|e| panic!("penalty {penalty}, temperature {t}: {e}"));
                assert!(token < 2, "penalty {penalty}: token {token} is not allowed");
            }
        }
    }

    #[test]
    fn frequency_penalty_counts_output_occurrences_and_presence_penalty_does_not() {
        let logits = [1.0, 0.9, 0.0];
        // The prompt's token 0 is not penalized; each output of it costs 0.2.
        assert_eq!(picks(penalized(1.0, 0.2, 0.0), &[0], &logits, 4), [0, 1, 0, 1]);
        // Presence costs 0.5 once, however often the token occurs.
        assert_eq!(picks(penalized(1.0, 0.0, 0.5), &[0], &logits, 4), [0, 1, 0, 0]);
        // A negative penalty rewards repeats.
        assert_eq!(picks(penalized(1.0, -0.2, 0.0), &[], &[0.9, 1.0], 3), [1, 1, 1]);
    }

    #[test]
    fn the_repetition_penalty_comes_before_frequency_and_presence() {
        // After one 0: 3 / 2 − 1 = 0.5 < 0.8 picks 1 (frequency first would give (3 − 1) / 2 = 1 > 0.8).
        assert_eq!(picks(penalized(2.0, 1.0, 0.0), &[], &[3.0, 0.8], 2), [0, 1]);
        assert_eq!(picks(penalized(2.0, 0.0, 1.0), &[], &[3.0, 0.8], 2), [0, 1]);
    }

    #[test]
    fn only_unpenalized_greedy_samplers_pick_the_argmax_on_the_device() {
        assert!(Sampler::new(SamplingParams::default(), 0, &[1], &[]).picks_argmax());
        assert!(!Sampler::new(params(0.5, 0, 1.0, 0), 0, &[], &[]).picks_argmax());
        for p in [penalized(1.1, 0.0, 0.0), penalized(1.0, 0.1, 0.0), penalized(1.0, 0.0, -0.1)] {
            assert!(!Sampler::new(p, 0, &[], &[]).picks_argmax());
        }
    }
}
