//! A request's prompt, the same for `Generate` and `Tokenize`: the one form it is given in (`prompt`,
//! `messages` or, for `Generate`, `prompt_token_ids`) checked, then turned into the model's token ids (the
//! text encoded, the conversation rendered with the chat template that applies) and truncated as asked.
//! What these ids then run into (the context, the KV cache) is the caller's to check.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tonic::Status;

use super::conversation::{conversation_ids, kwargs_of, message_list};
use super::proto;
use super::service::{Ready, ServiceState};
use super::status::invalid;
use crate::engine::truncate_prompt;
use crate::lora::cache::AdapterLease;
use crate::model::chat::{Kwargs, PromptEnd};

/// A request's prompt fields, as it gave them.
pub(super) struct PromptInput {
    pub prompt: String,
    pub messages: Vec<proto::ChatMessage>,
    /// `None` where the call has no such field (`Tokenize`).
    pub token_ids: Option<Vec<u32>>,
    pub continue_final_message: bool,
    pub chat_template_kwargs: String,
    pub truncate_prompt_tokens: Option<u32>,
    /// Whether `prompt` is encoded with the tokenizer's special tokens; unset = yes.
    pub add_special_tokens: Option<bool>,
    /// Whether `messages` end with the template's generation prompt; unset = yes, unless the final message is
    /// continued.
    pub add_generation_prompt: Option<bool>,
}

impl PromptInput {
    /// Checks that exactly one form is given.
    pub fn check_form(&self) -> Result<(), Status> {
        let forms = [
            ("prompt", !self.prompt.is_empty()),
            ("messages", !self.messages.is_empty()),
            ("prompt_token_ids", self.token_ids.as_ref().is_some_and(|ids| !ids.is_empty())),
        ];
        let mut given = forms.iter().filter(|(_, given)| *given).map(|(name, _)| *name);
        let one_of = match self.token_ids {
            Some(_) => "prompt, messages and prompt_token_ids",
            None => "prompt and messages",
        };
        match (given.next(), given.next()) {
            (None, _) => {
                let give = one_of.replace(" and ", " or ");
                Err(invalid("prompt", format!("is empty (give a {give})")))
            }
            (Some(first), Some(second)) => Err(invalid(second, format!("given with {first}: give one of {one_of}"))),
            _ => Ok(()),
        }
    }

    /// Checks what needs no tokenizer and no adapter (the conversation's fields, the truncation's range),
    /// after [`check_form`](Self::check_form).
    pub fn check(self, ready: &Ready) -> Result<Prompt, Status> {
        if self.continue_final_message && self.messages.is_empty() {
            return Err(invalid(
                "continue_final_message",
                "needs messages (a conversation whose final message to continue)",
            ));
        }
        if self.add_generation_prompt.is_some() && self.messages.is_empty() {
            return Err(invalid("add_generation_prompt", "needs messages (a conversation to render)"));
        }
        let end = PromptEnd::of(self.add_generation_prompt, self.continue_final_message)
            .map_err(|why| invalid("add_generation_prompt", format!("true with continue_final_message: {why}")))?;
        let kwargs = match self.chat_template_kwargs.as_str() {
            "" => Kwargs::new(),
            _ if self.messages.is_empty() => {
                return Err(invalid("chat_template_kwargs", "needs messages (variables for the chat template)"))
            }
            text => kwargs_of(text)?,
        };
        if self.add_special_tokens.is_some() && self.prompt.is_empty() {
            let why = match self.messages.is_empty() {
                false => "applies to prompt (a conversation's special tokens are its chat template's)",
                true => "applies to prompt (prompt_token_ids run as given)",
            };
            return Err(invalid("add_special_tokens", why));
        }
        let messages = message_list(&self.messages)?;
        if let Some(k) = self.truncate_prompt_tokens.filter(|&k| k == 0 || k as usize > ready.context) {
            let context = ready.context;
            return Err(invalid(
                "truncate_prompt_tokens",
                format!("must be in 1..={context} (the model's context), got {k}"),
            ));
        }
        let source = match self.token_ids {
            _ if !messages.is_empty() => Source::Conversation { messages, end, kwargs },
            Some(ids) if !ids.is_empty() => Source::Ids(ids),
            _ => Source::Text { text: self.prompt, add_special_tokens: self.add_special_tokens.unwrap_or(true) },
        };
        Ok(Prompt { source, truncate: self.truncate_prompt_tokens })
    }
}

/// A prompt whose fields are checked ([`PromptInput::check`]).
pub(super) struct Prompt {
    source: Source,
    truncate: Option<u32>,
}

enum Source {
    Text { text: String, add_special_tokens: bool },
    Ids(Vec<u32>),
    Conversation { messages: Vec<Value>, end: PromptEnd, kwargs: Kwargs },
}

impl Prompt {
    /// Whether the adapter must be leased before [`ids`](Self::ids): a conversation renders with its
    /// adapter's template when it brings one.
    pub fn is_conversation(&self) -> bool {
        matches!(self.source, Source::Conversation { .. })
    }

    /// The field the prompt came from, for errors about its length.
    pub fn field(&self) -> &'static str {
        match self.source {
            Source::Text { .. } => "prompt",
            Source::Ids(_) => "prompt_token_ids",
            Source::Conversation { .. } => "messages",
        }
    }

    /// The prompt's token ids, truncated as asked: ids given are checked against the model's vocabulary,
    /// text is encoded on the encoder threads, a conversation rendered in a worker process (`render.rs`),
    /// all within `deadline`. Never empty, and every id has an embedding.
    pub async fn ids(
        self,
        state: &Arc<ServiceState>,
        adapter: Option<&AdapterLease>,
        deadline: Option<Instant>,
    ) -> Result<Vec<u32>, Status> {
        let ready = state.ready.get().expect("a checked prompt means ready");
        let field = self.field();
        // The ids the tokenizer puts before a raw text, which truncation keeps.
        let mut prefix: &[u32] = &[];
        let mut ids = match self.source {
            Source::Ids(ids) => {
                let vocab = ready.vocab;
                if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                    let why = format!("{id} is outside the model's vocabulary of {vocab} tokens");
                    return Err(invalid(&format!("prompt_token_ids[{i}]"), why));
                }
                ids
            }
            Source::Text { text, add_special_tokens } => {
                if add_special_tokens {
                    prefix = ready.tokenizer.text_prefix();
                }
                // Off the async workers (`encoders.rs`): a megabyte of prompt takes ~0.5 s to encode.
                let tokenizer = ready.tokenizer.clone();
                let encode = move || tokenizer.encode_with(&text, add_special_tokens);
                let encoded = ready.encoders.run(deadline, "encoding the prompt", encode).await?;
                encoded.map_err(|e| invalid("prompt", e))?
            }
            Source::Conversation { messages, end, kwargs } => {
                // A chat template is a program (an adapter's may come from anyone): it renders in a worker
                // process, within the request's deadline (`render.rs`).
                let template = adapter.and_then(|a| a.weights().template.clone());
                conversation_ids(state, template, messages, end, kwargs, deadline).await?
            }
        };
        if let Some(k) = self.truncate {
            // A raw text keeps the ids its tokenizer puts before it; ids given and conversations are cut as
            // they are.
            truncate_prompt(&mut ids, k, prefix).map_err(|e| invalid("truncate_prompt_tokens", e))?;
        }
        if ids.is_empty() {
            // A tokenizer without BOS whose normalizer drops the whole text: nothing to continue from.
            return Err(invalid(field, "encodes to no tokens"));
        }
        // A tokenizer may hold tokens the model has no embedding for: such an id would fail the forward of
        // every request batched with it (ids given are checked above, by index).
        ready.tokenizer.check_in_vocab(&ids, ready.vocab).map_err(|why| invalid(field, why))?;
        Ok(ids)
    }
}
