//! A request's conversation: `messages` rendered into prompt ids with the template that applies (the
//! adapter's own, else the server's), and `chat_template_kwargs` from protobuf's `Struct` into the JSON the
//! template sees.

use tonic::Status;

use super::proto;
use super::service::Ready;
use super::status::invalid;
use crate::model::chat::{AdapterTemplate, Kwargs};
use crate::model::ChatError;

/// The prompt of a request's `messages`: the adapter's chat template (when it brings one) or the server's
/// renders them, with its generation prompt or the final message continued.
pub(super) fn conversation_ids(
    ready: &Ready,
    adapter: Option<&AdapterTemplate>,
    messages: &[proto::ChatMessage],
    continue_final: bool,
    kwargs: &Kwargs,
) -> Result<Vec<u32>, Status> {
    let mut list = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if m.role.is_empty() {
            return Err(invalid(&format!("messages[{i}].role"), "is empty"));
        }
        list.push(serde_json::json!({ "role": m.role, "content": m.content }));
    }
    let unavailable = |e: &ChatError| Status::failed_precondition(format!("messages: {e}"));
    let chat = match adapter {
        Some(a) => a.template(&ready.tokenizer).map_err(|e| unavailable(&e))?,
        None => ready.chat.as_ref().map_err(unavailable)?,
    };
    chat.check_kwargs(kwargs).map_err(|e| invalid("chat_template_kwargs", e))?;
    chat.prompt_ids(&ready.tokenizer, &list, continue_final, kwargs).map_err(|e| match e {
        ChatError::Unavailable(_) => unavailable(&e),
        ChatError::Render(_) => invalid("messages", e),
    })
}

/// `chat_template_kwargs` as JSON. A protobuf `Struct` holds every number as a double: those without a
/// fraction become integers, as the JSON a Python client sends would have them.
pub(super) fn kwargs_of(s: &prost_types::Struct) -> Result<Kwargs, Status> {
    fn json(v: &prost_types::Value, at: &str) -> Result<serde_json::Value, Status> {
        use prost_types::value::Kind;
        use serde_json::Value;
        Ok(match &v.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::BoolValue(b)) => Value::Bool(*b),
            Some(Kind::StringValue(s)) => Value::String(s.clone()),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 => (*n as i64).into(),
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
                .map(Value::Number)
                .ok_or_else(|| invalid(&format!("chat_template_kwargs.{at}"), format!("{n} is no JSON number")))?,
            Some(Kind::ListValue(l)) => Value::Array(
                l.values.iter().enumerate().map(|(i, v)| json(v, &format!("{at}[{i}]"))).collect::<Result<_, _>>()?,
            ),
            Some(Kind::StructValue(s)) => Value::Object(
                s.fields
                    .iter()
                    .map(|(k, v)| Ok::<_, Status>((k.clone(), json(v, &format!("{at}.{k}"))?)))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
    s.fields.iter().map(|(k, v)| Ok::<_, Status>((k.clone(), json(v, k)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    fn value(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    fn object(fields: Vec<(&str, prost_types::Value)>) -> prost_types::Struct {
        prost_types::Struct { fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }
    }

    /// A `Struct`'s doubles without a fraction become integers, at any depth; NaN is refused naming where.
    #[test]
    fn kwargs_are_json_with_integers_where_the_numbers_are_whole() {
        let list = prost_types::ListValue { values: vec![value(Kind::NumberValue(1.0)), value(Kind::NullValue(0))] };
        let s = object(vec![
            ("n", value(Kind::NumberValue(2.0))),
            ("x", value(Kind::NumberValue(2.5))),
            ("big", value(Kind::NumberValue(1e300))),
            ("l", value(Kind::ListValue(list))),
            ("o", value(Kind::StructValue(object(vec![("b", value(Kind::BoolValue(true)))])))),
            ("s", value(Kind::StringValue("t".into()))),
        ]);
        let json = serde_json::Value::Object(kwargs_of(&s).unwrap());
        assert_eq!(
            json,
            serde_json::json!({"n": 2, "x": 2.5, "big": 1e300, "l": [1, null], "o": {"b": true}, "s": "t"})
        );
        assert_eq!(json.to_string(), r#"{"big":1e+300,"l":[1,null],"n":2,"o":{"b":true},"s":"t","x":2.5}"#);
        let nan = value(Kind::NumberValue(f64::NAN));
        let inner = prost_types::ListValue { values: vec![nan] };
        let s = object(vec![("o", value(Kind::StructValue(object(vec![("l", value(Kind::ListValue(inner)))]))))]);
        let e = kwargs_of(&s).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "chat_template_kwargs.o.l[0]: NaN is no JSON number")
        );
    }
}
