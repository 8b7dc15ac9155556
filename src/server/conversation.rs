//! A request's conversation: `messages` checked and rendered into prompt ids with the template that applies
//! (the adapter's own, else the server's), and `chat_template_kwargs` read as the JSON object the template
//! sees.

use serde_json::Value;
use tonic::Status;

use std::sync::Arc;
use std::time::Instant;

use super::proto;
use super::render::RenderFailure;
use super::service::{Ready, ServiceState};
use super::status::invalid;
use crate::model::chat::{parse_kwargs, AdapterTemplate, Kwargs, PromptEnd};
use crate::model::{ChatError, ChatTemplate};

/// A request's `messages` as the `{"role", "content"}` objects templates read; an empty role is refused
/// (before any adapter is leased for the conversation).
pub(super) fn message_list(messages: &[proto::ChatMessage]) -> Result<Vec<Value>, Status> {
    let mut list = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if m.role.is_empty() {
            return Err(invalid(&format!("messages[{i}].role"), "is empty"));
        }
        list.push(serde_json::json!({ "role": m.role, "content": m.content }));
    }
    Ok(list)
}

/// The prompt of a conversation ([`message_list`]): the adapter's chat template (when it brings one) or the
/// server's renders it, ending as `end` says (its generation prompt, the final message continued, or as it
/// is), in a rendering worker ([`super::render`]) by `deadline`; the text is encoded on an encoder thread
/// (`encoders.rs`; a template may write 64 MiB).
pub(super) async fn conversation_ids(
    state: &Arc<ServiceState>,
    adapter: Option<Arc<AdapterTemplate>>,
    list: Vec<Value>,
    end: PromptEnd,
    kwargs: Kwargs,
    deadline: Option<Instant>,
) -> Result<Vec<u32>, Status> {
    let ready = state.ready.get().expect("admitting requests means ready");
    let chat = template_of(ready, adapter.as_deref())?;
    chat.check_kwargs(&kwargs).map_err(|e| invalid("chat_template_kwargs", e))?;
    let text = ready.renderer.render(chat, list, end, kwargs, deadline).await.map_err(|e| match e {
        RenderFailure::Deadline => Status::deadline_exceeded("deadline exceeded rendering the conversation"),
        RenderFailure::Chat(e) => chat_status(e),
    })?;
    let state = state.clone();
    let encode = move || {
        let ready = state.ready.get().expect("admitting requests means ready");
        template_of(ready, adapter.as_deref())?.prompt_ids_of(&ready.tokenizer, &text).map_err(chat_status)
    };
    ready.encoders.run(deadline, "encoding the conversation", encode).await?
}

/// The template that renders a conversation: the adapter's own, else the server's.
fn template_of<'a>(ready: &'a Ready, adapter: Option<&'a AdapterTemplate>) -> Result<&'a ChatTemplate, Status> {
    match adapter {
        Some(a) => a.template(&ready.tokenizer).map_err(|e| chat_status(e.clone())),
        None => ready.chat.as_ref().map_err(|e| chat_status(e.clone())),
    }
}

/// The template's fault (no template, one that fails every conversation or runs past its limits) is
/// FAILED_PRECONDITION; the conversation's (a template's refusal of it) INVALID_ARGUMENT naming `messages`.
fn chat_status(e: ChatError) -> Status {
    match e {
        ChatError::Unavailable(_) => Status::failed_precondition(format!("messages: {e}")),
        ChatError::Render(_) => invalid("messages", e),
    }
}

/// `chat_template_kwargs` ([`parse_kwargs`]); INVALID_ARGUMENT naming the field.
pub(super) fn kwargs_of(text: &str) -> Result<Kwargs, Status> {
    parse_kwargs(text).map_err(|e| invalid("chat_template_kwargs", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys keep their order, numbers their form (1 stays an integer, 1.0 a float); anything but an object
    /// is refused naming the field.
    #[test]
    fn kwargs_are_a_json_object_in_the_order_given() {
        let kwargs = kwargs_of(r#"{"z": 1, "a": 1.0, "tools": [{"type": "function", "function": {"name": "f"}}]}"#);
        let text = serde_json::Value::Object(kwargs.unwrap()).to_string();
        assert_eq!(text, r#"{"z":1,"a":1.0,"tools":[{"type":"function","function":{"name":"f"}}]}"#);
        for (bad, words) in [("[1]", "expected a JSON object, got [1]"), ("{", "invalid JSON"), ("NaN", "invalid JSON")]
        {
            let e = kwargs_of(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().starts_with(&format!("chat_template_kwargs: {words}")), "{bad}: {}", e.message());
        }
    }
}
