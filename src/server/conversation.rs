//! A request's conversation: `messages` checked and rendered into prompt ids with the template that applies
//! (the adapter's own, else the server's), and `chat_template_kwargs` read as the JSON object the template
//! sees.

use serde_json::Value;
use tonic::Status;

use super::proto;
use super::service::Ready;
use super::status::invalid;
use crate::model::chat::{parse_kwargs, AdapterTemplate, Kwargs};
use crate::model::ChatError;

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
/// server's renders it, with its generation prompt or the final message continued.
pub(super) fn conversation_ids(
    ready: &Ready,
    adapter: Option<&AdapterTemplate>,
    list: &[Value],
    continue_final: bool,
    kwargs: &Kwargs,
) -> Result<Vec<u32>, Status> {
    let unavailable = |e: &ChatError| Status::failed_precondition(format!("messages: {e}"));
    let chat = match adapter {
        Some(a) => a.template(&ready.tokenizer).map_err(|e| unavailable(&e))?,
        None => ready.chat.as_ref().map_err(unavailable)?,
    };
    chat.check_kwargs(kwargs).map_err(|e| invalid("chat_template_kwargs", e))?;
    chat.prompt_ids(&ready.tokenizer, list, continue_final, kwargs).map_err(|e| match e {
        ChatError::Unavailable(_) => unavailable(&e),
        ChatError::Render(_) => invalid("messages", e),
    })
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
