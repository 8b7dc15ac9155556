//! `bad_words` (vLLM's): words the output never spells in the tokens they are encoded as. Each word becomes
//! token sequences as vLLM encodes it ([`bad_words_ids`]: the word alone, and after a space where that gives
//! the same number of tokens, a word of its own); before each pick, a sequence's last token is banned where
//! the output ends with the rest of it, a one-token sequence everywhere ([`ban`]).

use crate::model::Tokenizer;

/// The most `bad_words` a request may give, and the longest one in bytes.
pub const MAX_BAD_WORDS: usize = 64;
pub const MAX_BAD_WORD_BYTES: usize = 256;

/// The token sequences of `words`, as vLLM's `SamplingParams.update_from_tokenizer` makes them: each word with
/// its leading whitespace stripped, encoded without special tokens, and encoded again after a space, kept
/// when that starts with another token and has as many tokens (the word's form inside a text). An error
/// names the first word (`bad_words[i]`) that is empty, too long, or encodes to no tokens.
pub fn bad_words_ids(tok: &Tokenizer, words: &[String]) -> Result<Vec<Vec<u32>>, String> {
    if words.len() > MAX_BAD_WORDS {
        return Err(format!("bad_words: at most {MAX_BAD_WORDS} words, got {}", words.len()));
    }
    let mut out: Vec<Vec<u32>> = Vec::with_capacity(words.len() * 2);
    for (i, word) in words.iter().enumerate() {
        let bare = word.trim_start();
        if word.len() > MAX_BAD_WORD_BYTES {
            return Err(format!("bad_words[{i}]: at most {MAX_BAD_WORD_BYTES} bytes, got {}", word.len()));
        }
        if bare.is_empty() {
            return Err(format!("bad_words[{i}]: empty or only whitespace"));
        }
        let encode = |text: &str| tok.encode_with(text, false).map_err(|e| format!("bad_words[{i}]: {e}"));
        let alone = encode(bare)?;
        if alone.is_empty() {
            return Err(format!("bad_words[{i}]: encodes to no tokens"));
        }
        let spaced = encode(&format!(" {bare}"))?;
        let spaced_differs = spaced.first() != alone.first() && spaced.len() == alone.len();
        out.push(alone);
        if spaced_differs {
            out.push(spaced);
        }
    }
    Ok(out)
}

/// Sets to −∞ the logit of every token that would complete one of `bad` after `output` (the tokens generated
/// so far): a one-token sequence's token always, a longer one's last token where `output` ends with the
/// rest. vLLM looks at the output only, not the prompt. Whether it banned a token that could have been
/// picked (a logit above −∞): if nothing can be picked then, the words are to blame.
pub fn ban(bad: &[Vec<u32>], output: &[u32], logits: &mut [f32]) -> bool {
    let mut pickable = false;
    for seq in bad {
        let Some((&last, rest)) = seq.split_last() else { continue };
        if output.ends_with(rest) {
            if let Some(l) = logits.get_mut(last as usize) {
                pickable |= *l > f32::NEG_INFINITY;
                *l = f32::NEG_INFINITY;
            }
        }
    }
    pickable
}

/// The most output tokens [`ban`] looks at: the longest sequence's length less one.
pub fn context_len(bad: &[Vec<u32>]) -> usize {
    bad.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo;

    /// A one-token word is banned everywhere; a longer one only where the output ends with all of it but its
    /// last token.
    #[test]
    fn a_sequences_last_token_is_banned_after_the_rest() {
        let bad = vec![vec![5], vec![7, 8, 9]];
        let banned = |output: &[u32]| {
            let mut logits = vec![0.0f32; 10];
            ban(&bad, output, &mut logits);
            (0..10u32).filter(|&t| logits[t as usize] == f32::NEG_INFINITY).collect::<Vec<_>>()
        };
        assert_eq!(banned(&[]), [5]);
        assert_eq!(banned(&[7]), [5]);
        assert_eq!(banned(&[1, 7, 8]), [5, 9]);
        assert_eq!(banned(&[7, 8, 1]), [5]);
        assert_eq!(context_len(&bad), 2);
    }

    /// Through a sampler: a banned token is never picked (a +100 bias does not bring it back), a longer word's
    /// last token only right after the rest of it, and greedy picks never take the argmax shortcut.
    #[test]
    fn a_sampler_never_picks_a_banned_token() {
        use crate::engine::{Sampler, SamplingParams};
        let params =
            SamplingParams { bad_words: vec![vec![3], vec![1, 2]], logit_bias: vec![(3, 100.0)], ..Default::default() };
        let mut s = Sampler::new(params, 0, &[], &[]);
        assert!(!s.picks_argmax());
        assert_eq!(s.sample(&[0.0, 5.0, 4.0, 9.0]), Ok(1), "3 is banned whatever its bias");
        assert_eq!(s.sample(&[0.0, 1.0, 8.0, 9.0]), Ok(1), "after 1, 2 is banned");
        assert_eq!(s.sample(&[2.0, 0.0, 8.0, 9.0]), Ok(0), "after 1, 2 is banned");
        assert_eq!(s.sample(&[2.0, 0.0, 8.0, 9.0]), Ok(2), "after 0, 2 is free");
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 9.0]), Ok(2));
        let mut s = Sampler::new(SamplingParams { bad_words: vec![vec![3]], ..Default::default() }, 0, &[], &[]);
        let only_banned = [f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0];
        assert_eq!(s.sample(&only_banned), Err(crate::engine::sampler::NoToken::BadWords));
        let broken = [f32::NAN; 4];
        assert_eq!(s.sample(&broken), Err(crate::engine::sampler::NoToken::Broken), "not the words' doing");
    }

    /// The demo's byte-level tokens: a word and its form after a space differ in length (the space is a token
    /// of its own), so only the word alone is kept; leading whitespace is stripped; bad words are named.
    #[test]
    fn words_encode_as_vllm_encodes_them() {
        let tok = demo::tokenizer().unwrap();
        let ids = |w: &str| tok.encode_with(w, false).unwrap();
        assert_eq!(bad_words_ids(&tok, &["MOON".into(), "  ab".into()]).unwrap(), [ids("MOON"), ids("ab")]);
        let blank = bad_words_ids(&tok, &["a".into(), " ".into()]).unwrap_err();
        assert_eq!(blank, "bad_words[1]: empty or only whitespace");
        let long = bad_words_ids(&tok, &["a".repeat(257)]).unwrap_err();
        assert_eq!(long, "bad_words[0]: at most 256 bytes, got 257");
        let many = vec!["a".to_string(); MAX_BAD_WORDS + 1];
        assert_eq!(bad_words_ids(&tok, &many).unwrap_err(), "bad_words: at most 64 words, got 65");
    }

    /// With a byte-level BPE vocabulary (the fixture llama's, as Llama 3's), a word inside a text is another
    /// token sequence of the same length (`Ġthe`): both forms are banned; where the spaced form is longer
    /// (`hello`: the space a token of its own), only the word alone.
    #[test]
    fn a_words_spaced_form_is_banned_too() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama/model/tokenizer.json");
        let tok = Tokenizer::from_parts(&std::fs::read(path).unwrap(), path, None).unwrap();
        assert_eq!(bad_words_ids(&tok, &["the".into()]).unwrap(), [vec![86, 74, 71], vec![261, 74, 71]]);
        assert_eq!(bad_words_ids(&tok, &["hello".into()]).unwrap(), [vec![74, 71, 78, 284]]);
    }
}
