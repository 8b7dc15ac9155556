//! The model's tokenizer: Hugging Face `tokenizer.json` through the `tokenizers` crate (encode with special
//! tokens, as `add_special_tokens=True` does) with what its folder says about chat ([`ChatFiles`]), and
//! [`TextStream`], an incremental detokenizer for streaming that never emits half a UTF-8 character.

use std::path::Path;

use super::chat::ChatFiles;
use super::token_bytes::TokenBytes;

/// Errors reading or using a tokenizer; they name the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file that is wrong (malformed, not UTF-8) or cannot be opened.
    #[error("{file}: {reason}")]
    Load { file: String, reason: String },
    /// A file whose read failed midway (EIO, EMFILE, a stale NFS handle): maybe passing.
    #[error("{file}: {reason}")]
    Read { file: String, reason: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Token ids and each token's byte span in the encoded text.
pub type TokenSpans = (Vec<u32>, Vec<(usize, usize)>);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// What the folder says about chat: the chat template, the named special tokens, the added tokens.
    pub chat: ChatFiles,
    /// [`Tokenizer::text_prefix`], worked out on first use.
    prefix: std::sync::OnceLock<Vec<u32>>,
    /// [`Tokenizer::token_bytes`], worked out on first use.
    bytes: std::sync::OnceLock<Result<TokenBytes, String>>,
    /// A plain token and its text, decoded before the ids of [`Tokenizer::decode_continued`]; worked out on
    /// first use.
    anchor: std::sync::OnceLock<Option<(u32, String)>>,
    /// The tokenizer without its start-of-text rules, for [`Tokenizer::encode_continued`] (`None`: it has
    /// none); made on first use.
    continuing: std::sync::OnceLock<Result<Option<tokenizers::Tokenizer>, String>>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), and `tokenizer_config.json` and the chat template files (optional,
    /// [`ChatFiles::from_dir`]) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let file = dir.join("tokenizer.json");
        let bytes = crate::input::read(&file)
            .map_err(|e| TokenizerError::Load { file: file.display().to_string(), reason: e.to_string() })?;
        let mut tok = Self::from_parts(&bytes, &file.display().to_string(), None)?;
        tok.chat = ChatFiles::from_dir(dir)?;
        Ok(tok)
    }

    /// Builds a tokenizer from `tokenizer.json` bytes and optional `tokenizer_config.json` text (and its file
    /// name, for errors).
    pub fn from_parts(json: &[u8], file: &str, config: Option<(&str, &str)>) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| TokenizerError::Load { file: file.to_string(), reason: e.to_string() })?;
        if let Some(fault) =
            serde_json::from_slice(json).ok().and_then(|v: serde_json::Value| template_fault(&v["post_processor"]))
        {
            // The `tokenizers` crate takes such a file, then panics on every encode with special tokens.
            return Err(TokenizerError::Load { file: file.to_string(), reason: format!("post_processor: {fault}") });
        }
        let chat = match config {
            Some((text, cfile)) => ChatFiles::from_config(text, cfile)?,
            None => ChatFiles::default(),
        };
        Ok(Tokenizer {
            inner,
            chat,
            prefix: Default::default(),
            bytes: Default::default(),
            anchor: Default::default(),
            continuing: Default::default(),
        })
    }

    /// The named special token `name` (`"eos_token"`, …), when tokenizer_config.json sets it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.chat.special_token(name)
    }

    /// The ids the tokenizer puts before any text with its special tokens (its BOS, or nothing): those of a
    /// probe text encoded with special tokens, before its ids encoded without. Nothing when the two do not
    /// line up that way.
    pub fn text_prefix(&self) -> &[u32] {
        self.prefix.get_or_init(|| {
            let probe = "Hello";
            let (Ok(with), Ok(plain)) = (self.encode_with(probe, true), self.encode_with(probe, false)) else {
                return Vec::new();
            };
            (0..=with.len().saturating_sub(plain.len()))
                .find(|&k| with[k..].starts_with(&plain))
                .map_or_else(Vec::new, |k| with[..k].to_vec())
        })
    }

    /// Token ids of `text` with the tokenizer's special tokens added (e.g. BOS from its post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, special tokens added or not.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Token ids of `text` as it reads after earlier text, without special tokens: the tokenizer's
    /// start-of-text rules (SentencePiece's prepended `▁`, byte-level BPE's `add_prefix_space`) do not apply,
    /// so [`Tokenizer::decode_continued`] spells `text` back. A completion after its prompt is these ids:
    /// encoded on its own, Llama 2's tokenizer puts a space before it (`" blue"` → `▁▁blue`, `"blue"` →
    /// `▁blue`).
    pub fn encode_continued(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self.continuing.get_or_init(|| without_start_rules(&self.inner)) {
            Ok(Some(continuing)) => continuing
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
            Ok(None) => self.encode_with(text, false),
            Err(e) => Err(TokenizerError::Encode(e.clone())),
        }
    }

    /// Token ids of `text` (special tokens added or not) with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<TokenSpans, TokenizerError> {
        let e = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, special tokens skipped or spelled out (`<|python_tag|>`: vLLM's `skip_special_tokens`
    /// false).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids` (special tokens skipped) as it reads after earlier text: a decoder's start-of-text rule
    /// (SentencePiece's stripped first space) does not apply. Decoded after a plain token, whose text is then
    /// cut; without one, as [`Tokenizer::decode`].
    pub fn decode_continued(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_continued_with(ids, true)
    }

    /// [`Tokenizer::decode_continued`], special tokens skipped or spelled out.
    pub fn decode_continued_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let anchor = self.anchor.get_or_init(|| {
            // A letter the tokenizer spells as one token: encoded, else looked up by the forms vocabularies
            // give it (plain, SentencePiece's `▁`, byte-level BPE's `Ġ`).
            let letters = ["a", "x", "0"];
            let encoded = letters.iter().filter_map(|&l| match self.encode_with(l, false).ok()?[..] {
                [id] => Some((id, l)),
                _ => None,
            });
            let looked_up = letters
                .iter()
                .flat_map(|&l| ["", "\u{2581}", "\u{120}"].map(|mark| (format!("{mark}{l}"), l)))
                .filter_map(|(token, l)| Some((self.token_to_id(&token)?, l)));
            encoded.chain(looked_up).find_map(|(id, letter)| {
                let text = self.decode(&[id]).ok()?;
                (text.trim_start() == letter).then_some((id, text))
            })
        });
        let Some((id, text)) = anchor else { return self.decode_with(ids, skip_special) };
        let mut with = Vec::with_capacity(ids.len() + 1);
        with.push(*id);
        with.extend_from_slice(ids);
        match self.decode_with(&with, skip_special)?.strip_prefix(text.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => self.decode_with(ids, skip_special),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Why `ids` (this tokenizer's encoding of a prompt) cannot run on a model of `vocab` tokens: the first
    /// id past it, with its token (a tokenizer may hold tokens the model has no embedding for).
    pub fn check_in_vocab(&self, ids: &[u32], vocab: usize) -> Result<(), String> {
        match ids.iter().find(|&&id| id as usize >= vocab) {
            None => Ok(()),
            Some(&id) => Err(format!(
                "encodes to token {:?} (id {id}), outside the model's vocabulary of {vocab} tokens: the tokenizer \
                 has tokens the model lacks",
                self.inner.id_to_token(id).unwrap_or_default()
            )),
        }
    }

    /// The ids at or past `vocab` the tokenizer can produce, with their tokens (a tokenizer that adds tokens
    /// the model has no embedding for), in id order.
    pub fn ids_past(&self, vocab: usize) -> Vec<(u32, String)> {
        let mut past: Vec<_> = self
            .inner
            .get_vocab(true)
            .into_iter()
            .filter(|&(_, id)| id as usize >= vocab)
            .map(|(t, id)| (id, t))
            .collect();
        past.sort();
        past
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's string for `id` (`▁Hello`, `Ġworld`, `<s>`), `None` for an id it has no token for.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes each token spells (built on first use), or why this tokenizer's decoder gives none.
    pub fn token_bytes(&self) -> Result<&TokenBytes, &str> {
        self.bytes.get_or_init(|| TokenBytes::build(&self.inner)).as_ref().map_err(|e| e.as_str())
    }
}

/// Incremental detokenizer for streaming (the prefix-offset method of TGI / `tokenizers`' `DecodeStream`,
/// with owned state so it lives in a request). A chunk is emitted only when the decoded text grows and does
/// not end in an incomplete character.
///
/// Text once emitted is never taken back. Decoding a window can rewrite its start, though: SentencePiece's
/// byte fallback turns a whole run of byte tokens into U+FFFD once a byte that cannot continue it joins (a
/// `<0x0A>` already sent as "\n", then `<0x80>`). The window then drops context tokens from its front until
/// what is left of the context decodes whole (no U+FFFD) and is again a prefix of the window's decode (at
/// worst no context: vLLM's reset of its decode stream), so the text goes on; it differs from decoding all
/// the tokens at once only where that decode shows U+FFFD. A window that no longer starts the text decodes
/// as continued text ([`Tokenizer::decode_continued`]), so its context keeps the leading space a
/// SentencePiece decoder strips at the start: a `<0x20>` sent as a space is context that decodes as one,
/// and is not sent again inside a broken run.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    /// The window: context tokens already emitted (`..prefix_index`), then tokens not yet emitted.
    ids: Vec<u32>,
    /// The decode of the context tokens.
    prefix: String,
    prefix_index: usize,
    /// Tokens were dropped from the window's front: it decodes as continued text.
    continued: bool,
    /// Special tokens are spelled out, not skipped.
    keep_special: bool,
}

impl TextStream {
    /// A stream that spells special tokens out (`<|python_tag|>`) instead of skipping them (the default).
    pub fn keeping_special_tokens() -> Self {
        TextStream { keep_special: true, ..TextStream::default() }
    }

    /// Feeds one token; returns the new text it completes, if any.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let p = self.decode(tok, &self.ids)?;
            if !p.ends_with('\u{FFFD}') {
                self.prefix = p;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = self.decode_window(tok)?;
        if text.len() > self.prefix.len() && !text.ends_with('\u{FFFD}') {
            let new = text[self.prefix.len()..].to_string();
            self.drop_front(self.prefix_index);
            self.prefix = self.decode(tok, &self.ids)?;
            self.prefix_index = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end of generation (e.g. an incomplete character, as U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let text = self.decode_window(tok)?;
        let rest = text[self.prefix.len()..].to_string();
        *self = TextStream { keep_special: self.keep_special, ..TextStream::default() };
        Ok((!rest.is_empty()).then_some(rest))
    }

    /// Text of `ids`, which start the text or continue it as the window does.
    fn decode(&self, tok: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        if self.continued {
            tok.decode_continued_with(ids, !self.keep_special)
        } else {
            tok.decode_with(ids, !self.keep_special)
        }
    }

    /// Drops the window's first `k` tokens.
    fn drop_front(&mut self, k: usize) {
        self.ids.drain(..k);
        self.continued |= k > 0;
    }

    /// The decode of the window, which starts with `prefix`: when decoding the whole window rewrote the
    /// context's text, context tokens are dropped from the front until it does not (see the type's doc).
    fn decode_window(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let text = self.decode(tok, &self.ids)?;
        if text.starts_with(&self.prefix) {
            return Ok(text);
        }
        for k in 1..=self.prefix_index {
            let prefix = tok.decode_continued_with(&self.ids[k..self.prefix_index], !self.keep_special)?;
            // Context that is itself broken (a byte run's tail) would break what follows it.
            if prefix.contains('\u{FFFD}') {
                continue;
            }
            let text = tok.decode_continued_with(&self.ids[k..], !self.keep_special)?;
            if text.starts_with(&prefix) {
                self.drop_front(k);
                self.prefix = prefix;
                self.prefix_index -= k;
                return Ok(text);
            }
        }
        // No context left decodes as nothing, so the loop ended there; should a tokenizer decode no tokens as
        // text, start over from the tokens not yet emitted.
        self.drop_front(self.prefix_index);
        self.prefix.clear();
        self.prefix_index = 0;
        self.decode(tok, &self.ids)
    }
}

/// What makes a `TemplateProcessing` post-processor (alone or in a `Sequence`) panic at every encode in the
/// `tokenizers` crate: a special token its `single` or `pair` template puts without defining it in its
/// `special_tokens`, or a `single` template that places the second sequence (`B`), which one text never has.
/// `tok` without its start-of-text rules — `Prepend` normalizers (Llama 2's `▁`), `Metaspace`'s prepend
/// scheme, `ByteLevel`'s `add_prefix_space`, also inside sequences — or `None` when it has none.
fn without_start_rules(tok: &tokenizers::Tokenizer) -> Result<Option<tokenizers::Tokenizer>, String> {
    use serde_json::Value;
    fn normalizer(n: &mut Value) -> bool {
        match n.get("type").and_then(Value::as_str) {
            Some("Prepend") => {
                *n = Value::Null;
                true
            }
            Some("Sequence") => n.get_mut("normalizers").and_then(Value::as_array_mut).is_some_and(|list| {
                let changed = list.iter_mut().fold(false, |c, n| normalizer(n) | c);
                list.retain(|n| !n.is_null());
                changed
            }),
            _ => false,
        }
    }
    /// Sets `p[key]` to `to` where it is there and differs.
    fn set(p: &mut Value, key: &str, to: Value) -> bool {
        match p.get_mut(key) {
            Some(v) if *v != to => {
                *v = to;
                true
            }
            _ => false,
        }
    }
    fn pre_tokenizer(p: &mut Value) -> bool {
        match p.get("type").and_then(Value::as_str) {
            Some("Metaspace") => set(p, "prepend_scheme", "never".into()) | set(p, "add_prefix_space", false.into()),
            Some("ByteLevel") => set(p, "add_prefix_space", false.into()),
            Some("Sequence") => p
                .get_mut("pretokenizers")
                .and_then(Value::as_array_mut)
                .is_some_and(|list| list.iter_mut().fold(false, |c, p| pre_tokenizer(p) | c)),
            _ => false,
        }
    }
    let mut json: Value =
        serde_json::from_str(&tok.to_string(false).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let changed =
        json.get_mut("normalizer").is_some_and(normalizer) | json.get_mut("pre_tokenizer").is_some_and(pre_tokenizer);
    if !changed {
        return Ok(None);
    }
    json.to_string().parse::<tokenizers::Tokenizer>().map(Some).map_err(|e| e.to_string())
}

fn template_fault(processor: &serde_json::Value) -> Option<String> {
    match processor["type"].as_str()? {
        "TemplateProcessing" => {
            let defined = processor["special_tokens"].as_object();
            let pieces = |t: &str| processor[t].as_array().into_iter().flatten();
            if let Some(id) = pieces("single")
                .chain(pieces("pair"))
                .filter_map(|piece| piece["SpecialToken"]["id"].as_str())
                .find(|id| defined.is_none_or(|d| !d.contains_key(*id)))
            {
                return Some(format!(
                    "its template names the special token `{id}`, which its special_tokens do not define"
                ));
            }
            pieces("single")
                .any(|piece| piece["Sequence"]["id"].as_str() == Some("B"))
                .then(|| "its `single` template places sequence B, which a single text does not have".to_string())
        }
        "Sequence" => processor["processors"].as_array()?.iter().find_map(template_fault),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template naming a special token it does not define, or placing sequence B in `single`, loads in
    /// `tokenizers` and panics at every encode ("no entry found for key", an index out of bounds): refused at
    /// load, naming the fault, alone or inside a `Sequence`.
    #[test]
    fn a_post_processor_that_panics_at_every_encode_is_refused() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama/model/tokenizer.json");
        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        assert!(Tokenizer::from_parts(json.to_string().as_bytes(), "tokenizer.json", None).is_ok());
        json["post_processor"]["single"][0]["SpecialToken"]["id"] = "<zz>".into();
        let template = json["post_processor"].clone();
        for processor in [template.clone(), serde_json::json!({"type": "Sequence", "processors": [template]})] {
            json["post_processor"] = processor;
            let e = Tokenizer::from_parts(json.to_string().as_bytes(), "tokenizer.json", None).err().unwrap();
            assert!(
                e.to_string().contains("names the special token `<zz>`, which its special_tokens do not define"),
                "{e}"
            );
        }
        // The second sequence in the template of one text: an index out of bounds at every encode.
        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        json["post_processor"]["single"][1]["Sequence"]["id"] = "B".into();
        let e = Tokenizer::from_parts(json.to_string().as_bytes(), "tokenizer.json", None).err().unwrap();
        assert!(e.to_string().contains("post_processor: its `single` template places sequence B"), "{e}");
    }

    /// The whole text of `ids` as a stream of one token at a time gives it (steps, then the flush).
    fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
        streamed_by(TextStream::default(), tok, ids)
    }

    fn streamed_by(mut s: TextStream, tok: &Tokenizer, ids: &[u32]) -> String {
        let mut out: String = ids.iter().filter_map(|&id| s.step(tok, id).unwrap()).collect();
        out.extend(s.flush(tok).unwrap());
        out
    }

    /// Spelled out, special tokens stream as the whole decode keeping them gives them, also at the window's
    /// front and around SentencePiece's stripped first space (Llama 2's decoder; random sequences without
    /// byte runs, whose rewrite is the test below's).
    #[test]
    fn special_tokens_kept_stream_as_the_whole_decode() {
        let tok =
            Tokenizer::from_parts(&super::super::token_bytes::sentencepiece_json(), "sp/tokenizer.json", None).unwrap();
        let pool: Vec<u32> = ["<s>", "</s>", "<unk>", "\u{2581}", "a", "\u{2581}a", "\u{2581}hello", "é", "<0x0A>"]
            .iter()
            .map(|t| tok.token_to_id(t).unwrap())
            .collect();
        let mut rng = crate::rng::Rng::new(5);
        for _ in 0..2000 {
            let n = 1 + rng.below(10) as usize;
            let ids: Vec<u32> = (0..n).map(|_| pool[rng.below(pool.len() as u64) as usize]).collect();
            let whole = tok.decode_with(&ids, false).unwrap();
            assert_eq!(streamed_by(TextStream::keeping_special_tokens(), &tok, &ids), whole, "{ids:?}");
            assert_eq!(streamed(&tok, &ids), tok.decode(&ids).unwrap(), "{ids:?}");
        }
        let (s, hello) = (tok.token_to_id("<s>").unwrap(), tok.token_to_id("\u{2581}hello").unwrap());
        assert_eq!(streamed_by(TextStream::keeping_special_tokens(), &tok, &[s, hello, s]), "<s> hello<s>");
    }

    /// With Llama 2's byte fallback, a byte that breaks a run of byte tokens rewrites the run already sent
    /// ("\n" becomes U+FFFD in the whole decode): the stream goes on from there instead of waiting forever for
    /// its prefix to come back (all text after it was lost, stop strings never seen). On random token
    /// sequences the stream is the whole decode except where that shows U+FFFD.
    #[test]
    fn a_byte_run_rewritten_by_a_later_byte_loses_no_text() {
        let tok =
            Tokenizer::from_parts(&super::super::token_bytes::sentencepiece_json(), "sp/tokenizer.json", None).unwrap();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let (nl, bad, hello) = (id("<0x0A>"), id("<0x80>"), id("\u{2581}hello"));
        assert_eq!(tok.decode(&[nl, bad]).unwrap(), "\u{FFFD}\u{FFFD}", "the decoder rewrites the sent newline");
        assert_eq!(streamed(&tok, &[nl, bad, nl, nl, hello, nl]), "\n\u{FFFD}\u{FFFD}\u{FFFD} hello\n");
        assert_eq!(streamed(&tok, &[hello, nl, bad]), "hello\n\u{FFFD}");

        let pool: Vec<u32> =
            ["<0x0A>", "<0x20>", "<0x80>", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "\u{2581}a", "a"]
                .iter()
                .chain(&["\u{2581}hello", "é", "\u{2581}"])
                .map(|t| id(t))
                .collect();
        let mut rng = crate::rng::Rng::new(3);
        let mut rewritten = 0;
        for _ in 0..3000 {
            let n = 1 + rng.below(10) as usize;
            let ids: Vec<u32> = (0..n).map(|_| pool[rng.below(pool.len() as u64) as usize]).collect();
            let (got, whole) = (streamed(&tok, &ids), tok.decode(&ids).unwrap());
            // Each run of k U+FFFD in the whole decode (k bytes) is 1 to k characters in the stream (bytes sent
            // as a character before the run broke); everything else is the same text.
            let mut pattern = String::from("(?s)^");
            for run in whole.split_inclusive(|c| c != '\u{FFFD}') {
                let bad = run.chars().filter(|&c| c == '\u{FFFD}').count();
                if bad > 0 {
                    pattern.push_str(&format!(".{{1,{bad}}}"));
                }
                pattern.push_str(&regex_syntax::escape(run.trim_start_matches('\u{FFFD}')));
            }
            pattern.push('$');
            assert!(
                regex_automata::meta::Regex::new(&pattern).unwrap().is_match(&got),
                "{ids:?}: streamed {got:?}, decoded {whole:?}"
            );
            rewritten += usize::from(got != whole);
        }
        assert!(rewritten > 50, "the sequences exercise the rewrite ({rewritten})");
    }

    /// Continued text keeps the space a SentencePiece decoder strips at the start, also where no letter
    /// encodes to one token (a normalizer prepends `▁` and the vocabulary lacks `▁a`): the anchor is then
    /// looked up by its forms.
    #[test]
    fn continued_text_keeps_its_leading_space() {
        let mut json: serde_json::Value =
            serde_json::from_slice(&super::super::token_bytes::sentencepiece_json()).unwrap();
        let plain = Tokenizer::from_parts(&serde_json::to_vec(&json).unwrap(), "sp/tokenizer.json", None).unwrap();
        json["model"]["vocab"].as_object_mut().unwrap().remove("\u{2581}a");
        json["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"});
        let split = Tokenizer::from_parts(&serde_json::to_vec(&json).unwrap(), "sp/tokenizer.json", None).unwrap();
        assert_eq!(split.encode_with("a", false).unwrap().len(), 2, "no letter is one token");
        for tok in [&plain, &split] {
            let space = tok.token_to_id("<0x20>").unwrap();
            let hello = tok.token_to_id("\u{2581}hello").unwrap();
            assert_eq!(tok.decode(&[space, hello]).unwrap(), " hello", "stripped once at the start");
            assert_eq!(tok.decode_continued(&[space, hello]).unwrap(), "  hello");
            assert_eq!(tok.decode_continued(&[hello]).unwrap(), " hello");
        }
    }

    /// Text encoded as it reads after earlier text decodes, continued, to itself: in Llama 2's form (a
    /// normalizer prepends `▁`), in the newer Metaspace form (prepend scheme `first`) and byte-level (no rule),
    /// on 500 random texts. Encoded as a text of its own, Llama 2's gains a space at the start.
    #[test]
    fn continued_text_encodes_and_decodes_to_itself() {
        let llama2: serde_json::Value =
            serde_json::from_slice(&super::super::token_bytes::llama2_tokenizer_json()).unwrap();
        let mut metaspace = llama2.clone();
        metaspace["normalizer"] = serde_json::Value::Null;
        metaspace["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
        let sp = |json: &serde_json::Value| {
            Tokenizer::from_parts(&serde_json::to_vec(json).unwrap(), "sp/tokenizer.json", None).unwrap()
        };
        let (llama2, metaspace, byte_level) = (sp(&llama2), sp(&metaspace), crate::model::demo::tokenizer().unwrap());
        let hello = llama2.token_to_id("\u{2581}hello").unwrap();
        assert_eq!(llama2.encode_with("hello", false).unwrap(), [hello], "a text's start gains `▁`");
        assert_eq!(llama2.decode_continued(&llama2.encode_with(" a", false).unwrap()).unwrap(), "  a");
        for tok in [&llama2, &metaspace] {
            assert_eq!(tok.encode_continued(" hello").unwrap(), [hello]);
            assert_eq!(tok.encode_continued("hello").unwrap(), [tok.token_to_id("hello").unwrap()]);
        }
        let pieces = [" ", "a", "b", "é", "\n", "hello", "x", "{\"", "  "];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..500 {
            let mut text = String::new();
            for _ in 0..1 + state % 7 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(pieces[(state % pieces.len() as u64) as usize]);
            }
            for tok in [&llama2, &metaspace, &byte_level] {
                let ids = tok.encode_continued(&text).unwrap();
                assert_eq!(tok.decode_continued(&ids).unwrap(), text, "{ids:?}");
            }
        }
    }

    /// The model folder's chat files are read with its tokenizer, and a written checkpoint carries them over.
    #[test]
    fn the_chat_files_are_read_and_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), super::super::demo::TOKENIZER_JSON).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "C", "eos_token": "</s>"}"#)
            .unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
        std::fs::create_dir(dir.path().join("additional_chat_templates")).unwrap();
        std::fs::write(dir.path().join("additional_chat_templates/tool_use.jinja"), "T").unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!((t.chat.template.as_deref(), t.special_token("eos_token")), (Some("from file"), Some("</s>")));
        let side = super::super::checkpoint::side_files_of_dir(dir.path()).unwrap();
        assert!(side.iter().any(|(n, b)| n == "additional_chat_templates/tool_use.jinja" && b == b"T"), "carried over");
        assert!(side.iter().any(|(n, b)| n == "chat_template.jinja" && b == b"from file"));
    }
}
