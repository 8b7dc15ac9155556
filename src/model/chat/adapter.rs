//! The chat template an adapter brings: an adapter saved with its tokenizer (TRL, transformers) carries the
//! template it was trained with in its folder (`chat_template.jinja`, `tokenizer_config.json`), and the
//! server renders that adapter's conversations with it instead of the model's (as LoRAX and vLLM use an
//! adapter's own tokenizer files). Read with the adapter's files, compiled on first use against the base
//! tokenizer, which encodes the rendering.

use std::path::Path;
use std::sync::OnceLock;

use super::{ChatError, ChatFiles, ChatTemplate};
use crate::model::{Tokenizer, TokenizerError};

/// An adapter folder's chat template.
#[derive(Debug)]
pub struct AdapterTemplate {
    /// "adapter `id`", for errors.
    whose: String,
    files: Result<ChatFiles, String>,
    compiled: OnceLock<Result<ChatTemplate, ChatError>>,
}

impl AdapterTemplate {
    /// What adapter `id`'s folder `dir` brings: `None` when it names no chat template (its conversations get
    /// the model's). Chat files that are wrong (malformed JSON, unreadable) are that error, never the model's
    /// template instead; a read that failed midway and may pass (EIO, EMFILE) is the `Err`, for a retry.
    pub fn read(dir: &Path, id: &str) -> Result<Option<Self>, TokenizerError> {
        let files = match ChatFiles::from_dir(dir) {
            Ok(f) if !f.has_template() => return Ok(None),
            Err(e @ TokenizerError::Read { .. }) => return Err(e),
            files => files.map_err(|e| e.to_string()),
        };
        Ok(Some(AdapterTemplate { whose: format!("adapter `{id}`"), files, compiled: OnceLock::new() }))
    }

    /// Why the folder's chat files could not be read, if they could not (for a warning at load).
    pub fn read_error(&self) -> Option<&str> {
        self.files.as_ref().err().map(String::as_str)
    }

    /// The template, compiled with the folder's special tokens (the base tokenizer's for each the folder does
    /// not set), and told which of the folder's added tokens `base` lacks: a rendering that
    /// holds one is refused, since `base` would encode it as plain text.
    pub fn template(&self, base: &Tokenizer) -> Result<&ChatTemplate, ChatError> {
        self.compiled
            .get_or_init(|| {
                let whose = &self.whose;
                let files = self.files.as_ref().map_err(|e| ChatError::Unavailable(format!("{whose}: {e}")))?;
                let template =
                    ChatTemplate::from_files(files, whose, &base.chat.special_tokens).map_err(|e| match e {
                        ChatError::Unavailable(m) if !m.starts_with(whose.as_str()) => {
                            ChatError::Unavailable(format!("{whose}: {m}"))
                        }
                        e => e,
                    })?;
                let foreign = files.added_tokens.iter().filter(|(id, text)| base.token_to_id(text) != Some(*id));
                Ok(template.with_foreign_tokens(whose, foreign.cloned().collect()))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adapter's folder sets some special tokens: the rest are the base tokenizer's; a folder naming no
    /// template brings none; unreadable chat files are the adapter's error, not the base's template.
    #[test]
    fn an_adapters_template_takes_the_special_tokens_it_does_not_set_from_the_base() {
        let base = crate::model::demo::tokenizer().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(AdapterTemplate::read(dir.path(), "a").unwrap().is_none(), "no template of its own");
        let config =
            r#"{"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}", "eos_token": "<E>"}"#;
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        let t = AdapterTemplate::read(dir.path(), "a").unwrap().unwrap();
        let user = [serde_json::json!({"role": "user", "content": "hi"})];
        let text = t.template(&base).unwrap().render(&user, true, &Default::default()).unwrap();
        assert_eq!(text, format!("{}|<E>|hi", base.special_token("bos_token").unwrap()));
        std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
        let t = AdapterTemplate::read(dir.path(), "a").unwrap().unwrap();
        let e = t.template(&base).unwrap_err().to_string();
        assert!(e.starts_with("adapter `a`: ") && e.contains("tokenizer_config.json: invalid JSON"), "{e}");
    }
}
