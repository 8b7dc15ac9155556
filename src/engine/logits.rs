//! Logits on their way from the forward to the sampler and the response: [`fetch_rows`] brings a step's rows
//! to the host (only the argmax of rows that pick it when the logits are on a GPU) as [`RowLogits`], and
//! [`LogSoftmax`] normalises a row for the logprobs a request reports.

use candle_core::Tensor;

use super::sampler::argmax;

/// One sampling row's logits as the host sees them.
#[derive(Clone, Debug, PartialEq)]
pub enum RowLogits {
    /// The whole vocabulary.
    Full(Vec<f32>),
    /// The token of a row whose sampler picks the argmax, picked where the logits are ([`argmax`]: `None`
    /// when every logit is NaN or −∞).
    Argmax(Option<u32>),
}

impl RowLogits {
    /// The row's log-softmax; `None` for a row that crossed as its argmax only.
    pub fn log_softmax(&self) -> Option<LogSoftmax<'_>> {
        match self {
            RowLogits::Full(logits) => Some(LogSoftmax::new(logits)),
            RowLogits::Argmax(_) => None,
        }
    }

    /// `token`'s log-probability under the row's logits ([`logprob`]); `None` for a row that crossed as its
    /// argmax only.
    pub fn logprob(&self, token: u32) -> Option<f32> {
        self.log_softmax().map(|l| l.of(token))
    }
}

/// The log-softmax of one row of logits, normalised once and read token by token: in f64, NaN logits left
/// out as sampling leaves them out. Infinite logits share all the mass; a token past the row, or a row of
/// only −∞, gets −∞.
pub struct LogSoftmax<'a> {
    logits: &'a [f32],
    norm: Norm,
}

enum Norm {
    /// `log Σ exp(l)` over the finite row.
    Finite(f64),
    /// How many logits are +∞.
    Infinite(usize),
    /// Every logit is −∞ or NaN.
    Empty,
}

impl<'a> LogSoftmax<'a> {
    pub fn new(logits: &'a [f32]) -> Self {
        let max = logits.iter().filter(|x| !x.is_nan()).fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let norm = if max == f64::INFINITY {
            Norm::Infinite(logits.iter().filter(|&&x| x == f32::INFINITY).count())
        } else if max == f64::NEG_INFINITY {
            Norm::Empty
        } else {
            let sum: f64 = logits.iter().filter(|x| !x.is_nan()).map(|&x| (x as f64 - max).exp()).sum();
            Norm::Finite(max + sum.ln())
        };
        LogSoftmax { logits, norm }
    }

    /// `log_softmax(logits)[token]`.
    pub fn of(&self, token: u32) -> f32 {
        let Some(&l) = self.logits.get(token as usize) else { return f32::NEG_INFINITY };
        match self.norm {
            _ if l.is_nan() => f32::NEG_INFINITY,
            Norm::Finite(log_z) => (l as f64 - log_z) as f32,
            Norm::Infinite(n) if l == f32::INFINITY => -(n as f32).ln(),
            Norm::Infinite(_) | Norm::Empty => f32::NEG_INFINITY,
        }
    }

    /// The `n` most likely tokens with their log-probabilities, most likely first, the lower id first
    /// among equals: fewer than `n` only when the row has fewer tokens that are not NaN (NaN logits never
    /// appear; −∞ ones can, with a log-probability of −∞).
    pub fn top(&self, n: usize) -> Vec<(u32, f32)> {
        let mut ids: Vec<u32> = (0..self.logits.len() as u32).filter(|&t| !self.logits[t as usize].is_nan()).collect();
        let order = |a: &u32, b: &u32| {
            let (la, lb) = (self.logits[*a as usize], self.logits[*b as usize]);
            lb.partial_cmp(&la).expect("no NaN").then(a.cmp(b))
        };
        if n < ids.len() {
            if n == 0 {
                return Vec::new();
            }
            ids.select_nth_unstable_by(n - 1, order);
            ids.truncate(n);
        }
        ids.sort_unstable_by(order);
        ids.into_iter().map(|t| (t, self.of(t))).collect()
    }
}

/// `log_softmax(logits)[token]` ([`LogSoftmax`]).
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    LogSoftmax::new(logits).of(token)
}

/// The rows of `logits [rows, vocab]` on the host: a row with `by_argmax[i]` as its argmax computed on the
/// logits' device (4 bytes cross instead of the vocabulary; the same pick as [`argmax`], ties included), the
/// others in full.
pub fn fetch_rows(logits: &Tensor, by_argmax: &[bool]) -> candle_core::Result<Vec<RowLogits>> {
    let (rows, _) = logits.dims2()?;
    if by_argmax.len() != rows {
        candle_core::bail!("{} argmax flags for {rows} logit rows", by_argmax.len())
    }
    let ids: Vec<Option<u32>> = if by_argmax.iter().any(|&g| g) { argmax_rows(logits)? } else { vec![] };
    let full_rows: Vec<u32> = (0..rows as u32).filter(|&r| !by_argmax[r as usize]).collect();
    let mut full = if full_rows.is_empty() {
        Vec::new()
    } else {
        let idx = Tensor::new(full_rows.as_slice(), logits.device())?;
        logits.index_select(&idx, 0)?.to_vec2::<f32>()?
    }
    .into_iter();
    Ok(by_argmax
        .iter()
        .enumerate()
        .map(|(r, &g)| if g { RowLogits::Argmax(ids[r]) } else { RowLogits::Full(full.next().expect("one per row")) })
        .collect())
}

/// The argmax of every row of `logits [rows, vocab]`: on a GPU by `gpu::sample`'s kernel, which picks as
/// [`argmax`] does.
fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Option<u32>>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return crate::gpu::sample::argmax_rows(logits);
    }
    Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?.iter().map(|row| argmax(row)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Sampler, SamplingParams};

    #[test]
    fn fetched_rows_argmax_greedy_rows_and_keep_the_rest() {
        let dev = candle_core::Device::Cpu;
        let v = vec![0.1f32, 3.0, -1.0, 7.0, 2.0, 0.5, -4.0, 9.0, 9.5];
        let t = Tensor::from_vec(v.clone(), (3, 3), &dev).unwrap();
        let got = fetch_rows(&t, &[true, false, true]).unwrap();
        assert_eq!(
            got,
            vec![RowLogits::Argmax(Some(1)), RowLogits::Full(v[3..6].to_vec()), RowLogits::Argmax(Some(2))]
        );
        let all = fetch_rows(&t, &[false; 3]).unwrap();
        assert_eq!(all[2], RowLogits::Full(v[6..].to_vec()));
        assert!(fetch_rows(&t, &[true]).is_err());
        let mut s = Sampler::new(SamplingParams::default(), 0, &[], &[]);
        assert_eq!(s.pick(&got[0]).unwrap(), 1);
        assert_eq!(s.pick(&got[1]).unwrap(), 0);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_logits() {
        let logits = [1.0f32, 2.0, 3.0, f32::NAN];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        for t in 0..3u32 {
            let want = ((t + 1) as f64 - z.ln()) as f32;
            assert!((logprob(&logits, t) - want).abs() < 1e-6, "{t}");
        }
        // Large logits do not overflow; probabilities sum to one.
        let big = [1000.0f32, 999.0, -1000.0];
        let total: f64 = (0..3).map(|t| (logprob(&big, t) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6 && logprob(&big, 0) < 0.0);
        assert_eq!(logprob(&[f32::INFINITY, 1.0, f32::INFINITY], 2), -(2f32.ln()));
        assert_eq!(logprob(&[f32::INFINITY, 1.0], 1), f32::NEG_INFINITY);
        assert_eq!(logprob(&logits, 3), f32::NEG_INFINITY, "a NaN logit");
        assert_eq!(logprob(&logits, 9), f32::NEG_INFINITY, "past the row");
        assert_eq!(logprob(&[f32::NEG_INFINITY; 2], 0), f32::NEG_INFINITY);
        assert_eq!(RowLogits::Argmax(Some(1)).logprob(1), None);
        assert_eq!(RowLogits::Full(logits.to_vec()).logprob(2), Some(logprob(&logits, 2)));
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_first_lower_ids_on_ties() {
        let logits = [1.0f32, 3.0, f32::NAN, 3.0, -2.0, 0.5];
        let l = LogSoftmax::new(&logits);
        let top = l.top(3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 0]);
        for (t, lp) in &top {
            assert_eq!(*lp, logprob(&logits, *t));
        }
        assert_eq!(l.top(0), vec![]);
        assert_eq!(l.top(99).len(), 5, "NaN never listed");
        assert_eq!(l.top(99).last().unwrap().0, 4);
        let total: f64 = l.top(99).iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(RowLogits::Argmax(Some(1)).log_softmax().map(|l| l.top(1)), None);
    }
}
