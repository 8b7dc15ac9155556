//! The chat template an adapter brings: an adapter saved with its tokenizer (TRL, transformers) carries the
//! template it was trained with in its folder (`chat_template.jinja`, `tokenizer_config.json`), and the
//! server renders that adapter's conversations with it instead of the model's (as LoRAX and vLLM use an
//! adapter's own tokenizer files). Read with the adapter's files, compiled on first use against the base
//! tokenizer, which encodes the rendering.

use std::path::Path;
use std::sync::OnceLock;

use super::{ChatError, ChatFiles, ChatTemplate};
use crate::model::Tokenizer;

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
    /// the model's). Chat files that cannot be read are that error, never the model's template instead.
    pub fn read(dir: &Path, id: &str) -> Option<Self> {
        let files = match ChatFiles::from_dir(dir) {
            Ok(f) if !f.has_template() => return None,
            files => files.map_err(|e| e.to_string()),
        };
        Some(AdapterTemplate { whose: format!("adapter `{id}`"), files, compiled: OnceLock::new() })
    }

    /// Why the folder's chat files could not be read, if they could not (for a warning at load).
    pub fn read_error(&self) -> Option<&str> {
        self.files.as_ref().err().map(String::as_str)
    }

    /// The template, compiled with the folder's special tokens (the base tokenizer's when the folder has no
    /// `tokenizer_config.json`), and told which of the folder's added tokens `base` lacks: a rendering that
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
