//! Chat templates: the tokenizer's Jinja `chat_template` rendered as transformers' `apply_chat_template`
//! renders it (and so vLLM and TGI, which call it), through minijinja, and the rendered conversation's token
//! ids. One renderer serves both users: the server turns a request's `messages` into its prompt, and
//! `server train` turns `{"messages"}` lines into examples, so an adapter is prompted the way it was trained.
//!
//! What transformers' environment has, this one has too: `trim_blocks` and `lstrip_blocks`, loop controls
//! (`{% break %}`), `raise_exception(message)`, `strftime_now(format)`, a `tojson` that writes what Python's
//! `json.dumps` writes (no HTML escaping; `indent`, `sort_keys`, `ensure_ascii`, `separators`), Python's string
//! and dict methods (`.strip()`, `.items()`; minijinja-contrib's pycompat), maps that keep their insertion
//! order, and every named special token of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, …)
//! as a variable. `{% generation %}` blocks (transformers' assistant-mask marker) render as plain text.
//! `tests/fixtures/chat-templates/` holds transformers' renderings of published templates; `tests/chat.rs`
//! compares.
//!
//! Token ids: the rendered text is encoded with the tokenizer's special tokens unless it already starts with
//! the BOS token (a template that writes BOS itself): the same ids as `apply_chat_template(tokenize=True)`
//! (which adds no special tokens) for every template that writes BOS or a tokenizer without one, and BOS +
//! rendering where a template leaves BOS out on a tokenizer that has one, as raw prompts get it.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

use super::Tokenizer;

/// Why a conversation could not be turned into a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The model renders no conversations: it has no chat template, only named ones, or one that does not
    /// compile. The same for every request.
    #[error("{0}")]
    Unavailable(String),
    /// This conversation: the template refused it (`raise_exception`) or failed rendering it.
    #[error("{0}")]
    Render(String),
}

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: Vec<(String, String)>,
    bos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("special", &self.special).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The tokenizer's chat template, compiled.
    pub fn new(tok: &Tokenizer) -> Result<Self, ChatError> {
        if tok.chat_template.is_none() && !tok.chat_template_names.is_empty() {
            return Err(ChatError::Unavailable(format!(
                "the tokenizer's chat templates are named {:?} and none is named \"default\", so none is the chat template (transformers refuses to pick one too); save the one to use as chat_template.jinja in the model folder",
                tok.chat_template_names
            )));
        }
        let Some(template) = tok.chat_template.as_deref() else {
            return Err(ChatError::Unavailable(
                "the tokenizer has no chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja), so conversations cannot be rendered: add one to the model folder"
                    .into(),
            ));
        };
        Self::compile(template, tok.special_tokens.clone())
    }

    /// `template` with these named special tokens (`("bos_token", "<s>")`, …).
    pub fn compile(template: &str, special: Vec<(String, String)>) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // jinja2's defaults, which transformers keeps: undefined values print as nothing, a single trailing
        // newline of the template is dropped.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Refusal(msg)))
        });
        env.add_function("strftime_now", |format: String| -> Result<String, JinjaError> {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            strftime_utc(&format, now).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", without_generation_blocks(template))
            .map_err(|e| ChatError::Unavailable(format!("the chat template does not compile: {e}")))?;
        let bos = special.iter().find(|(k, _)| k == "bos_token").map(|(_, v)| v.clone()).filter(|b| !b.is_empty());
        Ok(ChatTemplate { env, special, bos })
    }

    /// The text of `messages` (a list of `{"role", "content", …}` objects), with the assistant's generation
    /// prompt after them or not.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, ChatError> {
        let t = self.env.get_template("chat").expect("added at compile");
        let mut ctx: std::collections::BTreeMap<&str, JinjaValue> =
            self.special.iter().map(|(k, v)| (k.as_str(), JinjaValue::from(v.as_str()))).collect();
        ctx.insert("messages", JinjaValue::from_serialize(messages));
        ctx.insert("add_generation_prompt", JinjaValue::from(add_generation_prompt));
        t.render(ctx).map_err(|e| ChatError::Render(render_message(&e)))
    }

    /// Whether `rendered` is encoded with the tokenizer's special tokens: not when it starts with BOS already.
    pub fn add_special_tokens(&self, rendered: &str) -> bool {
        self.bos.as_deref().is_none_or(|bos| !rendered.starts_with(bos))
    }

    /// The prompt of a conversation to continue: rendered with the generation prompt, then encoded.
    pub fn prompt_ids(&self, tok: &Tokenizer, messages: &[Value]) -> Result<Vec<u32>, ChatError> {
        let text = self.render(messages, true)?;
        tok.encode_with(&text, self.add_special_tokens(&text))
            .map_err(|e| ChatError::Render(format!("encoding the rendered conversation: {e}")))
    }
}

/// A template's `raise_exception(message)`.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// A template's own refusal (`raise_exception`) is its message, as transformers reports it; other failures say
/// where in the template they happened.
fn render_message(e: &JinjaError) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if let Some(Refusal(message)) = inner.downcast_ref::<Refusal>() {
            return format!("the chat template refused the conversation: {message}");
        }
        source = inner.source();
    }
    format!("rendering the chat template: {e}")
}

/// transformers' `{% generation %}…{% endgeneration %}` (marking assistant text for
/// `return_assistant_tokens_mask`) is no Jinja statement: rendered here as a plain block, whitespace control
/// kept.
fn without_generation_blocks(template: &str) -> String {
    let open = fancy_regex::Regex::new(r"\{%(-?)\s*generation\s*(-?)%\}").expect("valid regex");
    let close = fancy_regex::Regex::new(r"\{%(-?)\s*endgeneration\s*(-?)%\}").expect("valid regex");
    let t = open.replace_all(template, "{%${1} if true ${2}%}");
    close.replace_all(&t, "{%${1} endif ${2}%}").into_owned()
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, those four settable.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, JinjaError> {
    let bad = |what: String| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let indent: Option<JinjaValue> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (i64::try_from(v.clone()), v.as_str()) {
            (Ok(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(bad(format!("indent must be a number or a string, got {v}"))),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => return Err(bad(format!("separators must be two strings, got {other:?}"))),
    };
    let json = serde_json::to_value(&value).map_err(|e| bad(e.to_string()))?;
    let py = PyJson { indent, item, key, sort_keys, ensure_ascii };
    let mut out = String::new();
    py.write(&mut out, &json, 0);
    Ok(JinjaValue::from_safe_string(out))
}

/// Python's `json.dumps` layout.
struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, v: &Value, depth: usize) {
        match v {
            Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    self.separate(out, i, depth + 1);
                    self.write(out, x, depth + 1);
                }
                self.close(out, depth);
                out.push(']');
            }
            Value::Object(map) if !map.is_empty() => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    self.separate(out, i, depth + 1);
                    self.string(out, k);
                    out.push_str(&self.key);
                    self.write(out, x, depth + 1);
                }
                self.close(out, depth);
                out.push('}');
            }
            Value::String(s) => self.string(out, s),
            other => out.push_str(&other.to_string()),
        }
    }

    fn separate(&self, out: &mut String, i: usize, depth: usize) {
        if i > 0 {
            out.push_str(&self.item);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn close(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn string(&self, out: &mut String, s: &str) {
        // serde_json escapes as Python does (\" \\ \n \r \t \b \f, other controls as \u00XX).
        let quoted = Value::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
}

/// `time.strftime(format, time.gmtime(secs))` for the C locale's directives templates use; others are refused
/// by name. UTC: a server's clock, not a user's.
pub fn strftime_utc(format: &str, secs: i64) -> Result<String, String> {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('b') | Some('h') => write!(out, "{}", &MONTHS[month as usize - 1][..3]),
            Some('B') => write!(out, "{}", MONTHS[month as usize - 1]),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('m') => write!(out, "{month:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('S') => write!(out, "{second:02}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('Y') => write!(out, "{year}"),
            Some('%') => write!(out, "%"),
            Some(other) => return Err(format!("strftime_now: unsupported directive %{other} in {format:?}")),
            None => return Err(format!("strftime_now: {format:?} ends in a lone %")),
        };
    }
    Ok(out)
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian; Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(t: &str) -> ChatTemplate {
        ChatTemplate::compile(t, vec![("bos_token".into(), "<s>".into()), ("eos_token".into(), "</s>".into())]).unwrap()
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-719_468, -1, 0, 59, 60, 365, 10_956, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(strftime_utc("%d %b %Y %j %a", 951_782_400).unwrap(), "29 Feb 2000 060 Tue");
    }

    #[test]
    fn unsupported_directives_are_named() {
        assert!(strftime_utc("%Q", 0).unwrap_err().contains("%Q"));
        assert!(strftime_utc("50%", 0).unwrap_err().contains("lone %"));
    }

    #[test]
    fn tojson_arguments() {
        let t = template("{{ x | tojson(sort_keys=true, ensure_ascii=true, separators=[',', ':']) }}");
        let x = serde_json::json!({"b": "é😀", "a": [1, {}]});
        let out = t.env.get_template("chat").unwrap().render(minijinja::context! { x => x }).unwrap();
        assert_eq!(out, r#"{"a":[1,{}],"b":"\u00e9\ud83d\ude00"}"#);
        let bad = template("{{ 1 | tojson(width=2) }}");
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn bos_is_added_only_when_the_template_leaves_it_out() {
        let t = template("x");
        assert!(t.add_special_tokens("<|user|>"));
        assert!(!t.add_special_tokens("<s><|user|>"));
        let no_bos = ChatTemplate::compile("x", vec![]).unwrap();
        assert!(no_bos.add_special_tokens("<s>"));
    }

    #[test]
    fn refusals_carry_the_templates_message() {
        let t = template("{{ raise_exception('roles must alternate') }}");
        let e = t.render(&[], true).unwrap_err();
        assert_eq!(e, ChatError::Render("the chat template refused the conversation: roles must alternate".into()));
        let t = template("{{ messages[0]['content'] + 1 }}");
        let e = t.render(&[serde_json::json!({"role": "user", "content": "a"})], true).unwrap_err();
        assert!(matches!(&e, ChatError::Render(m) if m.starts_with("rendering the chat template:")), "{e}");
        let e = ChatTemplate::compile("{% for %}", vec![]).unwrap_err();
        assert!(matches!(&e, ChatError::Unavailable(m) if m.contains("does not compile")), "{e}");
    }
}
