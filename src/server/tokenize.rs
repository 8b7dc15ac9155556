//! `Tokenize` and `Detokenize` (vLLM's `/tokenize` and `/detokenize`): a prompt's token ids exactly as
//! `Generate` would run them (`prompt.rs`: the same checks, template and truncation; no context check), without
//! generating; and the text of token ids. Both run their tokenizer work on the encoder threads, within the
//! call's deadline.

use std::sync::Arc;
use std::time::Instant;

use tonic::Status;

use super::deadline::not_past;
use super::prompt::PromptInput;
use super::proto;
use super::service::{lease_adapter, look_up, Ready, ServiceState};
use super::status::invalid;

/// `Tokenize`.
pub(super) async fn tokenize(
    state: &Arc<ServiceState>,
    ready: &Ready,
    r: proto::TokenizeRequest,
    deadline: Option<Instant>,
) -> Result<proto::TokenizeResponse, Status> {
    let input = PromptInput {
        prompt: r.prompt,
        messages: r.messages,
        token_ids: None,
        continue_final_message: r.continue_final_message,
        chat_template_kwargs: r.chat_template_kwargs,
        truncate_prompt_tokens: r.truncate_prompt_tokens,
        add_special_tokens: r.add_special_tokens,
        add_generation_prompt: r.add_generation_prompt,
    };
    input.check_form()?;
    let prompt = input.check(ready)?;
    not_past(deadline)?;
    // A conversation renders with its adapter's template when it brings one: leased as Generate leases it.
    // A raw text encodes the same with any adapter: its adapter is only looked up, not loaded (loading would
    // take device cache room, or wait for it, for nothing).
    let adapter = match r.adapter_id.as_str() {
        "" => None,
        id if prompt.is_conversation() => Some(lease_adapter(&ready.cache, id, deadline).await?),
        id => {
            look_up(&ready.cache, id, deadline).await?;
            None
        }
    };
    let token_ids = prompt.ids(state, adapter.as_ref(), deadline).await?;
    let token_strs = match r.return_token_strs {
        false => Vec::new(),
        true => {
            // A string per token: off the async workers, as the encoding (a megabyte of prompt: up to a
            // million tokens).
            let (tokenizer, ids) = (ready.tokenizer.clone(), token_ids.clone());
            let strings = move || {
                ids.iter()
                    .map(|&id| {
                        // Every id here came out of the tokenizer (or its template's text): it has a token.
                        let why =
                            || Status::internal(format!("token {id} has no string in the tokenizer's vocabulary"));
                        tokenizer.id_to_token(id).ok_or_else(why)
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            ready.encoders.run(deadline, "spelling the tokens", strings).await??
        }
    };
    Ok(proto::TokenizeResponse {
        token_ids,
        max_model_len: ready.context as u32,
        token_strs,
        adapter_version: adapter.map(|a| a.version().to_string()).unwrap_or_default(),
    })
}

/// `Detokenize`.
pub(super) async fn detokenize(
    ready: &Ready,
    r: proto::DetokenizeRequest,
    deadline: Option<Instant>,
) -> Result<proto::DetokenizeResponse, Status> {
    not_past(deadline)?;
    let tokenizer = ready.tokenizer.clone();
    let skip_special = r.skip_special_tokens.unwrap_or(false);
    let decode = move || {
        // The tokenizer's decode leaves out ids it has no token for: here they are refused, not dropped.
        let unknown = r.token_ids.iter().enumerate().find(|(_, &id)| tokenizer.id_to_token(id).is_none());
        if let Some((i, id)) = unknown {
            let why = format!("{id} is no token of the tokenizer (its vocabulary: {} tokens)", tokenizer.vocab_size());
            return Err(invalid(&format!("token_ids[{i}]"), why));
        }
        tokenizer.decode_with(&r.token_ids, skip_special).map_err(|e| invalid("token_ids", e))
    };
    let text = ready.encoders.run(deadline, "decoding the token ids", decode).await??;
    Ok(proto::DetokenizeResponse { text })
}
