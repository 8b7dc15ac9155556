//! The model's tokenizer: Hugging Face `tokenizer.json` through the `tokenizers` crate (encode with special
//! tokens, as `add_special_tokens=True` does), `tokenizer_config.json`'s chat template, and [`TextStream`],
//! an incremental detokenizer for streaming that never emits half a UTF-8 character.

use std::path::Path;

/// Errors reading or using a tokenizer; they name the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: {reason}")]
    Load { file: String, reason: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Token ids and each token's byte span in the encoded text.
pub type TokenSpans = (Vec<u32>, Vec<(usize, usize)>);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Jinja chat template from `tokenizer_config.json`, when the model has one.
    pub chat_template: Option<String>,
    /// The names of the chat templates `tokenizer_config.json` lists when none is named "default": then
    /// `chat_template` is `None`, and conversations are refused (server and train), as transformers refuses
    /// to pick one.
    pub chat_template_names: Vec<String>,
    /// The named special tokens `tokenizer_config.json` sets (`("bos_token", "<s>")`, …, a model's own
    /// `image_token`s and `extra_special_tokens` too), which chat templates see as variables.
    pub special_tokens: Vec<(String, String)>,
    /// [`Tokenizer::text_prefix`], worked out on first use.
    prefix: std::sync::OnceLock<Vec<u32>>,
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`.
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` and `chat_template.jinja` (optional) from a
    /// model folder. transformers 5 saves the chat template in `chat_template.jinja`, which wins over a
    /// `chat_template` in `tokenizer_config.json` (as `AutoTokenizer` loads them).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let file = dir.join("tokenizer.json");
        let bytes = std::fs::read(&file)
            .map_err(|e| TokenizerError::Load { file: file.display().to_string(), reason: e.to_string() })?;
        let config_file = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&config_file) {
            Ok(text) => Some((text, config_file.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(TokenizerError::Load { file: config_file.display().to_string(), reason: e.to_string() })
            }
        };
        let mut tok = Self::from_parts(
            &bytes,
            &file.display().to_string(),
            config.as_ref().map(|(t, f)| (t.as_str(), f.as_str())),
        )?;
        // Template files win over `tokenizer_config.json`'s `chat_template` whole, as transformers 5 loads them:
        // `chat_template.jinja` is "default", `additional_chat_templates/<name>.jinja` add names (a "default"
        // there replaces it). With a "default", that is the chat template; without one, only names.
        let mut files: std::collections::BTreeMap<String, String> = Default::default();
        let read = |file: &Path| match std::fs::read_to_string(file) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TokenizerError::Load { file: file.display().to_string(), reason: e.to_string() }),
        };
        if let Some(template) = read(&dir.join("chat_template.jinja"))? {
            files.insert("default".into(), template);
        }
        let extra = dir.join("additional_chat_templates");
        if extra.is_dir() {
            let entries = std::fs::read_dir(&extra)
                .map_err(|e| TokenizerError::Load { file: extra.display().to_string(), reason: e.to_string() })?;
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().and_then(|n| n.strip_suffix(".jinja")).map(str::to_string)
                else {
                    continue;
                };
                if let Some(template) = read(&entry.path())? {
                    files.insert(name, template);
                }
            }
        }
        if !files.is_empty() {
            tok.use_named_templates(files);
        }
        Ok(tok)
    }

    /// Named templates, as transformers resolves them: the last one named "default" is the chat template;
    /// without one there is none, and the names are kept for the refusal.
    fn use_named_templates(&mut self, named: impl IntoIterator<Item = (String, String)>) {
        let (mut default, mut names) = (None, Vec::new());
        for (name, template) in named {
            if name == "default" {
                default = Some(template);
            } else {
                names.push(name);
            }
        }
        self.chat_template_names = if default.is_some() { Vec::new() } else { names };
        self.chat_template = default;
    }

    /// Builds a tokenizer from `tokenizer.json` bytes and optional `tokenizer_config.json` text.
    pub fn from_parts(json: &[u8], file: &str, config: Option<(&str, &str)>) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| TokenizerError::Load { file: file.to_string(), reason: e.to_string() })?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            chat_template_names: Vec::new(),
            special_tokens: Vec::new(),
            prefix: Default::default(),
        };
        if let Some((text, cfile)) = config {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| TokenizerError::Load { file: cfile.to_string(), reason: format!("invalid JSON: {e}") })?;
            let bad = |reason: String| TokenizerError::Load { file: cfile.to_string(), reason };
            match v.get("chat_template") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => tok.chat_template = Some(s.clone()),
                // Named templates: the one named "default" is the chat template.
                Some(serde_json::Value::Array(list)) => {
                    let mut named = Vec::new();
                    for t in list {
                        let field = |k: &str| t.get(k).and_then(|x| x.as_str());
                        let (Some(name), Some(template)) = (field("name"), field("template")) else {
                            return Err(bad(format!(
                                "`chat_template`: expected entries {{\"name\", \"template\"}}, got {t}"
                            )));
                        };
                        named.push((name.to_string(), template.to_string()));
                    }
                    tok.use_named_templates(named);
                }
                Some(other) => {
                    return Err(bad(format!(
                        "`chat_template`: expected a string or a list of named templates, got {other}"
                    )))
                }
            }
            let token_str = |key: &str| match v.get(key) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            };
            // As transformers 5 names them: the standard seven, then a model's own `*_token` strings and
            // `extra_special_tokens` given as a map of names (a list names none).
            let mut special: Vec<(String, String)> =
                SPECIAL_TOKENS.iter().filter_map(|&k| token_str(k).map(|t| (k.to_string(), t))).collect();
            if let Some(o) = v.as_object() {
                for (k, t) in o {
                    if k.ends_with("_token") && !SPECIAL_TOKENS.contains(&k.as_str()) {
                        if let Some(t) = t.as_str() {
                            special.push((k.clone(), t.to_string()));
                        }
                    }
                }
            }
            if let Some(extra) = v.get("extra_special_tokens").and_then(|e| e.as_object()) {
                for (k, t) in extra {
                    let t = t.as_str().or_else(|| t.get("content").and_then(|c| c.as_str()));
                    if let Some(t) = t {
                        special.retain(|(name, _)| name != k);
                        special.push((k.clone(), t.to_string()));
                    }
                }
            }
            tok.special_tokens = special;
        }
        Ok(tok)
    }

    /// The named special token `name` (`"eos_token"`, …), when tokenizer_config.json sets it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(k, _)| k == name).map(|(_, t)| t.as_str())
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

    /// Token ids of `text` (special tokens added or not) with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<TokenSpans, TokenizerError> {
        let e = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Incremental detokenizer for streaming (the prefix-offset method of TGI / `tokenizers`' `DecodeStream`,
/// with owned state so it lives in a request). A chunk is emitted only when the decoded text grows and does
/// not end in an incomplete character.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl TextStream {
    /// Feeds one token; returns the new text it completes, if any.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let p = tok.decode(&self.ids)?;
            if !p.ends_with('\u{FFFD}') {
                self.prefix = p;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.len() > self.prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&self.prefix) {
            let new = text[self.prefix.len()..].to_string();
            self.ids.drain(..self.prefix_index);
            self.prefix = tok.decode(&self.ids)?;
            self.prefix_index = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end of generation (e.g. an incomplete character, as U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let text = tok.decode(&self.ids)?;
        let rest = text.strip_prefix(self.prefix.as_str()).unwrap_or("").to_string();
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok((!rest.is_empty()).then_some(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5 saves the chat template as `chat_template.jinja`: it is read, and wins over the
    /// `tokenizer_config.json` key; a written checkpoint carries it over.
    #[test]
    fn the_chat_template_file_is_read_and_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), super::super::demo::TOKENIZER_JSON).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "from config"}"#).unwrap();
        assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().chat_template.as_deref(), Some("from config"));
        std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
        assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().chat_template.as_deref(), Some("from file"));
        // transformers 5's named templates, none the default: named for the error.
        let named = tempfile::tempdir().unwrap();
        std::fs::write(named.path().join("tokenizer.json"), super::super::demo::TOKENIZER_JSON).unwrap();
        std::fs::create_dir(named.path().join("additional_chat_templates")).unwrap();
        std::fs::write(named.path().join("additional_chat_templates/tool_use.jinja"), "T").unwrap();
        std::fs::write(named.path().join("tokenizer_config.json"), r#"{"chat_template": "from config"}"#).unwrap();
        let t = Tokenizer::from_dir(named.path()).unwrap();
        assert_eq!((t.chat_template, t.chat_template_names), (None, vec!["tool_use".to_string()]));
        std::fs::write(named.path().join("chat_template.jinja"), "from file").unwrap();
        assert_eq!(Tokenizer::from_dir(named.path()).unwrap().chat_template.as_deref(), Some("from file"));
        std::fs::write(named.path().join("additional_chat_templates/default.jinja"), "D").unwrap();
        assert_eq!(Tokenizer::from_dir(named.path()).unwrap().chat_template.as_deref(), Some("D"));
        let side = super::super::checkpoint::side_files_of_dir(named.path()).unwrap();
        assert!(side.iter().any(|(n, b)| n == "additional_chat_templates/tool_use.jinja" && b == b"T"), "carried over");
        let side = super::super::checkpoint::side_files_of_dir(dir.path()).unwrap();
        assert!(side.iter().any(|(n, b)| n == "chat_template.jinja" && b == b"from file"));
    }

    /// The special tokens chat templates see: the standard ones (a string or an AddedToken's content), a
    /// model's own `*_token` strings, and `extra_special_tokens` given as a map.
    #[test]
    fn special_tokens_as_transformers_names_them() {
        let json = super::super::demo::TOKENIZER_JSON.as_bytes();
        let config = r#"{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
            "image_token": "<img>", "add_bos_token": true, "pad_token": null,
            "extra_special_tokens": {"audio_token": "<au>", "image_token": "<image>"}}"#;
        let t = Tokenizer::from_parts(json, "tokenizer.json", Some((config, "tc.json"))).unwrap();
        let names: Vec<(&str, &str)> = t.special_tokens.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            names,
            [("bos_token", "<s>"), ("eos_token", "</s>"), ("audio_token", "<au>"), ("image_token", "<image>")]
        );
        assert_eq!(t.special_token("eos_token"), Some("</s>"));
    }

    /// A list of named templates: the one named "default" is the chat template; without one, none is (and
    /// the names are kept for the error); malformed forms are refused naming the key.
    #[test]
    fn named_chat_templates() {
        let json = super::super::demo::TOKENIZER_JSON.as_bytes();
        let load = |config: &str| Tokenizer::from_parts(json, "tokenizer.json", Some((config, "tc.json")));
        let t =
            load(r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#)
                .unwrap();
        assert_eq!((t.chat_template.as_deref(), t.chat_template_names.len()), (Some("D"), 0));
        let t = load(r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]}"#)
            .unwrap();
        assert_eq!((t.chat_template, t.chat_template_names), (None, vec!["tool_use".to_string(), "rag".to_string()]));
        for bad in [r#"{"chat_template": 5}"#, r#"{"chat_template": [{"name": "default"}]}"#] {
            let e = load(bad).err().expect("refused").to_string();
            assert!(e.contains("tc.json") && e.contains("`chat_template`"), "{e}");
        }
    }
}
