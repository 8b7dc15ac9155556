//! The bytes each token spells: what decoding puts into the text for it, before text is made of the bytes.
//! Structured output walks these bytes through its automaton. Derived from the tokenizer's decoder, as
//! `tokenizers` decodes:
//! - byte-level BPE (GPT-2, Llama 3, Qwen2): each character of the token stands for one byte;
//! - SentencePiece with byte fallback (Llama 2, Mistral): `<0xHH>` is the byte HH, and `▁` is a space.
//!
//! Special tokens spell nothing (decoding skips them). A tokenizer with another decoder is refused by name,
//! since guessing its bytes would let a constraint pass text it does not allow.

use std::collections::HashMap;

/// Each token's bytes, and the tokens in byte order (so that tokens sharing a prefix are neighbours).
#[derive(Debug)]
pub struct TokenBytes {
    /// By token id: `None` for a special token or an id the tokenizer has no token for.
    bytes: Vec<Option<Box<[u8]>>>,
    /// Where a token spells other bytes as the first of a text (SentencePiece's decoders drop the first
    /// token's leading space): by token id, what decoding it alone gives; `None` when no token differs.
    first: Option<Vec<Option<Box<[u8]>>>>,
    /// The ids with non-empty bytes, ordered by their bytes.
    sorted: Vec<u32>,
}

/// How a decoder turns a token into bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    ByteLevel,
    /// `▁` is a space; with `byte_fallback`, `<0xHH>` is the byte HH.
    SentencePiece {
        byte_fallback: bool,
    },
}

impl TokenBytes {
    /// The table of `tok`, or why its decoder has none.
    pub(super) fn build(tok: &tokenizers::Tokenizer) -> Result<Self, String> {
        let decoder = serde_json::to_value(tok.get_decoder()).map_err(|e| e.to_string())?;
        let scheme = scheme(&decoder)?;
        let specials: std::collections::HashSet<u32> =
            tok.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        let byte_of: HashMap<char, u8> = byte_level_chars().into_iter().map(|(b, c)| (c, b)).collect();
        let n = tok.get_vocab_size(true);
        let bytes: Vec<Option<Box<[u8]>>> = (0..n as u32)
            .map(|id| {
                if specials.contains(&id) {
                    return None;
                }
                let token = tok.id_to_token(id)?;
                Some(match scheme {
                    Scheme::ByteLevel => token
                        .chars()
                        .map(|c| byte_of.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .unwrap_or_else(|| token.as_bytes().to_vec())
                        .into_boxed_slice(),
                    Scheme::SentencePiece { byte_fallback } => match fallback_byte(&token).filter(|_| byte_fallback) {
                        Some(b) => Box::new([b]),
                        None => token.replace('\u{2581}', " ").into_bytes().into_boxed_slice(),
                    },
                })
            })
            .collect();
        let mut sorted: Vec<u32> =
            (0..n as u32).filter(|&id| bytes[id as usize].as_ref().is_some_and(|b| !b.is_empty())).collect();
        sorted.sort_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]));
        // As the first token of a text: what decoding it alone gives (a streamed output's first token is
        // decoded alone), where that is whole characters; a byte of a character spells itself.
        let first = match scheme {
            Scheme::ByteLevel => None,
            Scheme::SentencePiece { .. } => {
                let first: Vec<Option<Box<[u8]>>> = (0..n as u32)
                    .map(|id| {
                        let b = bytes[id as usize].as_ref()?;
                        match std::str::from_utf8(b) {
                            Ok(_) => tok.decode(&[id], true).ok().map(|t| t.into_bytes().into_boxed_slice()),
                            Err(_) => Some(b.clone()),
                        }
                    })
                    .collect();
                (first != bytes).then_some(first)
            }
        };
        Ok(TokenBytes { bytes, sorted, first })
    }

    /// The bytes of token `id` (`None`: special, or not a token).
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    /// The bytes of token `id` as the first of a text.
    pub fn get_first(&self, id: u32) -> Option<&[u8]> {
        match &self.first {
            Some(first) => first.get(id as usize)?.as_deref(),
            None => self.get(id),
        }
    }

    /// Whether some token spells other bytes as the first of a text.
    pub fn first_differs(&self) -> bool {
        self.first.is_some()
    }

    /// How many ids the table covers (the tokenizer's vocabulary, added tokens included).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The ids that spell something, ordered by their bytes.
    pub fn sorted(&self) -> &[u32] {
        &self.sorted
    }

    /// Whether every byte is a token of its own, so that any text can be spelled.
    pub fn spells_every_byte(&self) -> bool {
        let mut seen = [false; 256];
        for b in self.bytes.iter().flatten() {
            if let [b] = **b {
                seen[b as usize] = true;
            }
        }
        seen.iter().all(|&s| s)
    }
}

/// The scheme of a decoder (its `tokenizer.json` form), or why it has none.
fn scheme(decoder: &serde_json::Value) -> Result<Scheme, String> {
    let kind = |d: &serde_json::Value| d.get("type").and_then(|t| t.as_str()).unwrap_or("").to_string();
    match kind(decoder).as_str() {
        "ByteLevel" => Ok(Scheme::ByteLevel),
        "Metaspace" => Ok(Scheme::SentencePiece { byte_fallback: false }),
        "Sequence" => {
            let parts = decoder.get("decoders").and_then(|d| d.as_array()).cloned().unwrap_or_default();
            let kinds: Vec<String> = parts.iter().map(kind).collect();
            if kinds.iter().any(|k| k == "ByteLevel") && kinds.iter().all(|k| k == "ByteLevel") {
                return Ok(Scheme::ByteLevel);
            }
            // SentencePiece's: `▁` to a space (Replace or Metaspace), byte fallback, fuse, strip the first
            // space. A Replace of anything else, or a Strip of more, would change bytes this table does not
            // know of.
            let spaces = parts.iter().all(|d| match kind(d).as_str() {
                "Replace" => {
                    d.pointer("/pattern/String").and_then(|p| p.as_str()) == Some("\u{2581}")
                        && d.get("content").and_then(|c| c.as_str()) == Some(" ")
                }
                // Only after Fuse does it strip the text's first space, not every token's.
                "Strip" => {
                    d.get("content").and_then(|c| c.as_str()) == Some(" ")
                        && d.get("start").and_then(|n| n.as_u64()).is_some_and(|n| n <= 1)
                        && d.get("stop").and_then(|n| n.as_u64()) == Some(0)
                        && matches!(
                            (kinds.iter().position(|k| k == "Fuse"), kinds.iter().position(|k| k == "Strip")),
                            (Some(f), Some(t)) if f < t
                        )
                }
                "Metaspace" | "ByteFallback" | "Fuse" => true,
                _ => false,
            });
            if spaces && kinds.iter().any(|k| k == "Replace" || k == "Metaspace") {
                Ok(Scheme::SentencePiece { byte_fallback: kinds.iter().any(|k| k == "ByteFallback") })
            } else {
                Err(format!(
                    "its decoder (a Sequence of {}) is neither byte-level nor SentencePiece's",
                    kinds.join(", ")
                ))
            }
        }
        "" => Err("it has no decoder".into()),
        other => Err(format!("its decoder ({other}) is neither byte-level nor SentencePiece's")),
    }
}

/// `<0xHH>` → HH.
fn fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// GPT-2's byte-level alphabet: each byte and the character that stands for it (printable Latin-1 bytes for
/// themselves, the others for U+0100 onwards, in byte order).
pub fn byte_level_chars() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b, b as char)
            } else {
                next += 1;
                (b, char::from_u32(next - 1).expect("below U+0200"))
            }
        })
        .collect()
}

/// A `tokenizer.json` with Llama 2's decoder (a SentencePiece vocabulary with byte fallback: `<unk>`, `<s>`,
/// `</s>`, the 256 bytes, a few pieces), for tests.
#[cfg(test)]
pub(crate) fn sentencepiece_json() -> Vec<u8> {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u8 {
        vocab.insert(format!("<0x{b:02X}>"), (vocab.len()).into());
    }
    for t in ["\u{2581}", "a", "\u{2581}a", "b", "\u{2581}hello", "é", "{\"", "\u{2581}\u{2581}"] {
        vocab.insert(t.to_string(), (vocab.len()).into());
    }
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    serde_json::to_vec(&json).unwrap()
}

/// [`sentencepiece_json`] in Llama 2's form: its normalizer prepends `▁` and turns spaces into `▁`, and merges
/// spell `hello` and `▁hello` as one token each. For tests.
#[cfg(test)]
pub(crate) fn llama2_tokenizer_json() -> Vec<u8> {
    let mut json: serde_json::Value = serde_json::from_slice(&sentencepiece_json()).unwrap();
    json["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u{2581}"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
    let model = &mut json["model"];
    let mut merges = Vec::new();
    // `▁hello`'s merges first: they win over `hello`'s inside it.
    for word in ["\u{2581}hello", "hello"] {
        let chars: Vec<char> = word.chars().collect();
        for end in 1..=chars.len() {
            for piece in [chars[..end].iter().collect(), chars[end - 1].to_string()] {
                let n = model["vocab"].as_object().unwrap().len();
                model["vocab"].as_object_mut().unwrap().entry(piece).or_insert(n.into());
            }
            if end > 1 {
                merges.push(format!("{} {}", chars[..end - 1].iter().collect::<String>(), chars[end - 1]));
            }
        }
    }
    model["merges"] = merges.into();
    serde_json::to_vec(&json).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token's bytes, as text, are what the tokenizer decodes it to, after a token that keeps
    /// SentencePiece's first space from being stripped.
    fn check_against_decode(json: &[u8]) -> TokenBytes {
        let tok = tokenizers::Tokenizer::from_bytes(json).unwrap();
        let table = TokenBytes::build(&tok).unwrap();
        let lead = tok.token_to_id("a").or_else(|| tok.token_to_id("\u{2581}a")).expect("a token for `a`");
        let lead_text = tok.decode(&[lead], true).unwrap();
        let mut checked = 0;
        for id in 0..table.len() as u32 {
            let Some(bytes) = table.get(id) else {
                assert!(tok.decode(&[id], true).unwrap().is_empty(), "token {id} is special");
                continue;
            };
            if let Ok(text) = std::str::from_utf8(bytes) {
                let decoded = tok.decode(&[lead, id], true).unwrap();
                assert_eq!(decoded.strip_prefix(&lead_text), Some(text), "token {id}");
                checked += 1;
            }
        }
        assert!(checked >= 128, "{checked} tokens checked");
        table
    }

    #[test]
    fn byte_level_tokens_spell_what_they_decode_to() {
        let table = check_against_decode(crate::model::demo::TOKENIZER_JSON.as_bytes());
        assert!(table.spells_every_byte());
        for f in ["llama", "qwen2", "mistral"] {
            let path = format!("{}/tests/fixtures/{f}/model/tokenizer.json", env!("CARGO_MANIFEST_DIR"));
            let t = check_against_decode(&std::fs::read(path).unwrap());
            assert!(t.spells_every_byte(), "{f}");
            let sorted: Vec<&[u8]> = t.sorted().iter().map(|&id| t.get(id).unwrap()).collect();
            assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "{f}: in byte order");
        }
    }

    /// Llama 2's decoder (a SentencePiece vocabulary with byte fallback), on a small vocabulary.
    #[test]
    fn sentencepiece_tokens_spell_what_they_decode_to() {
        let bytes = sentencepiece_json();
        let tok = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
        let table = TokenBytes::build(&tok).unwrap();
        assert!(table.spells_every_byte());
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(table.get(id("\u{2581}hello")), Some(&b" hello"[..]));
        assert_eq!(table.get(id("<0x7B>")), Some(&b"{"[..]));
        assert_eq!(table.get(id("<0xC3>")), Some(&[0xC3][..]), "half a character is one byte");
        assert_eq!(table.get(id("</s>")), None);
        // Decoding agrees for every token that is whole text (the table above has fewer than 200 of those).
        let lead = id("a");
        for id in 3..table.len() as u32 {
            if let Ok(text) = std::str::from_utf8(table.get(id).unwrap()) {
                assert_eq!(tok.decode(&[lead, id], true).unwrap(), format!("a{text}"), "token {id}");
            }
        }
    }

    #[test]
    fn other_decoders_are_refused_by_name() {
        let wp = serde_json::json!({"type": "WordPiece", "prefix": "##", "cleanup": true});
        assert!(scheme(&wp).unwrap_err().contains("WordPiece"));
        let odd = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "_"}, "content": " "}, {"type": "ByteFallback"}]});
        assert!(scheme(&odd).unwrap_err().contains("Replace, ByteFallback"));
        let strip2 = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "Strip", "content": " ", "start": 2, "stop": 0}]});
        assert!(scheme(&strip2).is_err(), "a Strip of two spaces");
        let plain = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}, {"type": "Fuse"}]});
        assert_eq!(scheme(&plain).unwrap(), Scheme::SentencePiece { byte_fallback: false });
        assert!(scheme(&serde_json::Value::Null).unwrap_err().contains("no decoder"));
    }
}
