//! Chat templates: a Jinja `chat_template` rendered as transformers' `apply_chat_template` renders it (and so
//! vLLM and TGI, which call it), through minijinja, and the rendered conversation's token ids. The prompt
//! opens a new assistant turn (the generation prompt) or continues the final message
//! (`continue_final_message`). One renderer serves both users: the server turns a request's `messages` into
//! its prompt, and `server train` turns `{"messages"}` lines into examples, so an adapter is prompted the way
//! it was trained. The template is a folder's ([`ChatFiles`], `files.rs`): the model's (or `--chat-template`),
//! or an adapter's own ([`AdapterTemplate`], `adapter.rs`). A request's `chat_template_kwargs` ([`Kwargs`]) set
//! more variables, checked against those the template reads ([`ChatTemplate::variables`], found as jinja2's
//! `meta.find_undeclared_variables` finds them). A folder's "tool_use" template renders the calls whose kwargs
//! give `tools`, as transformers picks it.
//!
//! transformers' environment, as far as chat templates reach: `trim_blocks` and `lstrip_blocks`, newlines
//! normalised to `\n`, loop controls (`{% break %}`), `raise_exception(message)`, `strftime_now(format)` (in
//! UTC) and `tojson` as Python computes them (`python.rs`), Python's string and dict methods (`.strip()`,
//! `.items()`; minijinja-contrib's pycompat), maps that keep their insertion order, `tools` and `documents`
//! set to none, and every `*_token` of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, …,
//! `extra_special_tokens`) as a variable. `{% generation %}` blocks (transformers' assistant-mask marker) render
//! as plain text. Values print as Python prints them (`python::formatter`: floats as `repr`, `1e+20`; lists and dicts
//! as `repr`, `['a', None]`; `| string` too), `round` rounds as Python's (ties to even) and `'x' is sequence` holds
//! (but `~` and `join` still use minijinja's text: `'n=' ~ 1e20` is `n=100000000000000000000.0`). Known differences
//! (minijinja is not jinja2): `undefined | length` is an error, not 0; tuples are lists (`(1, 2)` prints `[1, 2]`,
//! `.items()` gives lists); `'%s' % x` is unsupported; `trim` keeps the ASCII separators `\x1c`–`\x1f`; some of
//! Python's string methods and jinja2's filters (`rsplit`, `partition`, `zfill`, `truncate`, `wordcount`, `urlencode`,
//! …) are refused by name.
//! `tests/fixtures/chat-templates/` holds transformers' renderings of published templates; `tests/prompts.rs`
//! compares.
//!
//! Token ids: the rendered text is encoded without special tokens and, unless it starts with the BOS token
//! after any whitespace (a template that writes BOS itself, maybe after the newlines of its `{% %}` blocks),
//! after the ones the tokenizer puts before a text (BOS; never the EOS an `add_eos_token` tokenizer appends).
//! That is `apply_chat_template(tokenize=True)`'s ids (it adds nothing) for every template that writes BOS
//! and every tokenizer without one; where a template leaves BOS out on a tokenizer that has one, the prompt
//! gets it as a raw prompt does, and as `server train` trained it.

mod adapter;
mod files;
mod python;

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Value as JinjaValue;
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

pub use adapter::AdapterTemplate;
pub use files::{template_files, ChatFiles};
pub use python::strftime_utc;

use super::tokenizer::TokenSpans;
use super::Tokenizer;

/// Why a conversation could not be turned into a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// No conversations can be rendered: the model (or the adapter that brings its own template) has no chat
    /// template, only named ones, one that does not compile, or one that uses a filter, test or function
    /// this server lacks; or an adapter's template rendered a token the base tokenizer lacks. Not the
    /// request's fault.
    #[error("{0}")]
    Unavailable(String),
    /// This conversation: the template refused it (`raise_exception`), failed rendering it, or rendered it
    /// as no text.
    #[error("{0}")]
    Render(String),
}

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    /// The folder's "tool_use" template, compiled alike: it renders calls whose kwargs give `tools`.
    tool_use: Option<Box<ChatTemplate>>,
    env: Environment<'static>,
    special: Vec<(String, String)>,
    bos: Option<String>,
    /// [`ChatTemplate::variables`].
    variables: Vec<String>,
    /// Tokens the template's folder adds that the encoding tokenizer lacks (an adapter's), with why.
    foreign: Vec<(String, String)>,
    /// The source, as given: what a rendering in another process compiles ([`ChatTemplate::sources`]).
    source: String,
}

/// What compiles a [`ChatTemplate`] again elsewhere (the server's rendering workers): its source, its folder's
/// "tool_use" template's, and its special tokens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateSources {
    pub template: String,
    pub tool_use: Option<String>,
    pub special: Vec<(String, String)>,
}

/// Template variables a request sets (`chat_template_kwargs`): names to JSON values.
pub type Kwargs = serde_json::Map<String, Value>;

/// `chat_template_kwargs` text: a JSON object, its keys in the order given (a template's `tojson` writes them
/// so).
pub fn parse_kwargs(text: &str) -> Result<Kwargs, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("expected a JSON object, got {other}")),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// The variables the renderer sets itself.
const RESERVED: [&str; 2] = ["messages", "add_generation_prompt"];

/// What one rendering may spend: template instructions (minijinja's fuel) and bytes of text written. Far
/// above what a published template needs for any conversation a request can carry (Llama 3.2's with tools
/// spends ~40 instructions a message), so that a template that loops without end, or prints without end,
/// fails its own conversations instead of holding a server thread or its memory.
pub const RENDER_FUEL: u64 = 50_000_000;
pub const RENDER_MAX_BYTES: usize = 64 << 20;

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("special", &self.special).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The tokenizer's chat template, compiled.
    pub fn new(tok: &Tokenizer) -> Result<Self, ChatError> {
        Self::from_files(&tok.chat, "the tokenizer", &[])
    }

    /// The chat template of `files` (a folder's, [`ChatFiles`]), compiled with the folder's special tokens
    /// and, for each it does not set, `fallback`'s (the base tokenizer's, for an adapter's folder). `whose`
    /// names the folder in errors.
    pub fn from_files(files: &ChatFiles, whose: &str, fallback: &[(String, String)]) -> Result<Self, ChatError> {
        if files.template.is_none() && !files.names.is_empty() {
            return Err(ChatError::Unavailable(format!(
                "{whose}'s chat templates are named {:?} and none is named \"default\", so none is the chat template (transformers refuses to pick one too); save the one to use as chat_template.jinja",
                files.names
            )));
        }
        let Some(template) = files.template.as_deref() else {
            return Err(ChatError::Unavailable(format!(
                "{whose} has no chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja), so conversations cannot be rendered: add one to the model folder, or give --chat-template"
            )));
        };
        // The folder's special tokens, each it does not set taken from `fallback`.
        let mut special = fallback.to_vec();
        for (name, token) in &files.special_tokens {
            match special.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = token.clone(),
                None => special.push((name.clone(), token.clone())),
            }
        }
        let tool_use = match &files.tool_use {
            Some(t) => Some(Box::new(
                Self::compile(t, special.clone())
                    .map_err(|e| ChatError::Unavailable(format!("{whose}'s \"tool_use\" chat template: {e}")))?,
            )),
            None => None,
        };
        Ok(ChatTemplate { tool_use, ..Self::compile(template, special)? })
    }

    /// `template` with these special tokens (`("bos_token", "<s>")`, …).
    pub fn compile(template: &str, special: Vec<(String, String)>) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // jinja2's defaults, which transformers keeps: undefined values print as nothing, a single trailing
        // newline of the template is dropped, and these two.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(RENDER_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Refusal(msg)))
        });
        env.add_function("strftime_now", |format: String| -> Result<String, JinjaError> {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            strftime_utc(&format, now).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e))
        });
        env.add_filter("tojson", python::tojson);
        env.add_filter("round", python::round);
        env.add_filter("string", python::string);
        env.set_formatter(python::formatter);
        // jinja2's `sequence` test: anything with a length and items (strings and dicts too).
        env.add_test("sequence", |v: JinjaValue| {
            use minijinja::value::ValueKind as K;
            matches!(v.kind(), K::Seq | K::Map | K::String)
        });
        // jinja2's lexer reads \r\n and \r as \n (`newline_sequence`), in text and string literals alike.
        let source = template.replace("\r\n", "\n").replace('\r', "\n");
        env.add_template_owned("chat", without_generation_blocks(&source))
            .map_err(|e| ChatError::Unavailable(format!("the chat template does not compile: {e}")))?;
        let globals: std::collections::HashSet<&str> = env.globals().map(|(name, _)| name).collect();
        let mut variables: Vec<String> = read_variables(&env, &source)
            .into_iter()
            .filter(|v| !globals.contains(v.as_str()) && !RESERVED.contains(&v.as_str()))
            .collect();
        variables.sort();
        let bos = special.iter().find(|(k, _)| k == "bos_token").map(|(_, v)| v.clone()).filter(|b| !b.is_empty());
        let source = template.to_string();
        Ok(ChatTemplate { tool_use: None, env, special, bos, variables, foreign: Vec::new(), source })
    }

    /// What [`ChatTemplate::from_sources`] compiles into a template that renders as this one does.
    pub fn sources(&self) -> TemplateSources {
        TemplateSources {
            template: self.source.clone(),
            tool_use: self.tool_use.as_ref().map(|t| t.source.clone()),
            special: self.special.clone(),
        }
    }

    /// The template of [`ChatTemplate::sources`]: it renders what the one they came from renders (its
    /// foreign-token check belongs to the encoding, [`ChatTemplate::encode`], and is not carried).
    pub fn from_sources(sources: &TemplateSources) -> Result<Self, ChatError> {
        let tool_use = match &sources.tool_use {
            Some(t) => Some(Box::new(Self::compile(t, sources.special.clone())?)),
            None => None,
        };
        Ok(ChatTemplate { tool_use, ..Self::compile(&sources.template, sources.special.clone())? })
    }

    /// Refuses renderings that hold one of `tokens` (id, text), which `whose` folder adds and the tokenizer
    /// that encodes the rendering lacks (or has under another id): it would be encoded as plain text.
    pub fn with_foreign_tokens(mut self, whose: &str, tokens: Vec<(u32, String)>) -> Self {
        self.foreign = tokens
            .into_iter()
            .map(|(id, text)| {
                let why = format!(
                    "the rendered conversation holds `{text}`, a token {whose}'s tokenizer_config.json adds as id {id} and the base model's tokenizer does not have as that id"
                );
                (text, why)
            })
            .collect();
        self
    }

    /// The variables a request's `chat_template_kwargs` may set: those the template reads, but for the
    /// renderer's own (`messages`, `add_generation_prompt`) and its functions. Sorted.
    pub fn variables(&self) -> &[String] {
        &self.variables
    }

    /// The template that renders a call with `kwargs`: the "tool_use" one when they give `tools` (not null,
    /// an empty list included) and the folder has one, as transformers picks it; else this one.
    fn pick(&self, kwargs: &Kwargs) -> &ChatTemplate {
        match (&self.tool_use, kwargs.get("tools")) {
            (Some(t), Some(tools)) if !tools.is_null() => t,
            _ => self,
        }
    }

    /// Refuses `kwargs` naming a variable the template that renders them (the "tool_use" one when they give
    /// `tools`) does not read (a misspelt `enable_thinking` would otherwise change nothing, silently) or one
    /// the renderer sets itself. A null `tools` or `documents` is what the renderer sets anyway
    /// (transformers' defaults), so it passes whatever the template reads.
    pub fn check_kwargs(&self, kwargs: &Kwargs) -> Result<(), String> {
        let this = self.pick(kwargs);
        for (name, value) in kwargs {
            if value.is_null() && matches!(name.as_str(), "tools" | "documents") {
                continue;
            }
            if RESERVED.contains(&name.as_str()) {
                return Err(format!("`{name}` is set by the server: give it as the request's own `{name}`"));
            }
            if this.variables.binary_search(name).is_err() {
                return Err(format!(
                    "`{name}`: the chat template reads no variable of that name (it reads {:?})",
                    this.variables
                ));
            }
        }
        Ok(())
    }

    /// The text of `messages` (a list of `{"role", "content", …}` objects), with the assistant's generation
    /// prompt after them or not, and `kwargs` as variables (checked with [`ChatTemplate::check_kwargs`]; they
    /// may override `tools`, `documents` and the special tokens, as in transformers; with `tools`, the
    /// folder's "tool_use" template renders).
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        kwargs: &Kwargs,
    ) -> Result<String, ChatError> {
        let t = self.pick(kwargs).env.get_template("chat").expect("added at compile");
        let mut ctx: std::collections::BTreeMap<&str, JinjaValue> =
            self.special.iter().map(|(k, v)| (k.as_str(), JinjaValue::from(v.as_str()))).collect();
        ctx.insert("messages", JinjaValue::from_serialize(messages));
        ctx.insert("add_generation_prompt", JinjaValue::from(add_generation_prompt));
        // transformers passes both, None when the call has none.
        ctx.insert("tools", JinjaValue::from(()));
        ctx.insert("documents", JinjaValue::from(()));
        for (k, v) in kwargs {
            if !RESERVED.contains(&k.as_str()) {
                ctx.insert(k.as_str(), JinjaValue::from_serialize(v));
            }
        }
        let mut text = Capped::default();
        t.render_captured_to(ctx, &mut text).map_err(|e| {
            // A filter, test or function the server lacks fails every conversation that reaches it, whatever
            // the conversation: the template's fault, not the request's; so does one past the rendering's
            // limits. (A method depends on the value it is called on, which the request may give, `tools`
            // say: that stays the request's.)
            let unknown = [ErrorKind::UnknownFilter, ErrorKind::UnknownTest, ErrorKind::UnknownFunction];
            match e.kind() {
                ErrorKind::OutOfFuel => ChatError::Unavailable(format!(
                    "rendering the chat template: it ran past {RENDER_FUEL} template instructions (a loop without end?)"
                )),
                ErrorKind::WriteFailure if text.over => ChatError::Unavailable(format!(
                    "rendering the chat template: its text passed {} MiB",
                    RENDER_MAX_BYTES >> 20
                )),
                kind if unknown.contains(&kind) => ChatError::Unavailable(render_message(&e)),
                _ => ChatError::Render(render_message(&e)),
            }
        })?;
        String::from_utf8(text.text)
            .map_err(|_| ChatError::Render("the chat template wrote text that is not UTF-8".into()))
    }

    /// The ids of a rendered conversation (module docs), each with its byte span in `rendered` (the ids put
    /// before it span nothing).
    pub fn encode(&self, tok: &Tokenizer, rendered: &str) -> Result<TokenSpans, ChatError> {
        if let Some((_, why)) =
            self.foreign.iter().find(|(text, _)| !text.is_empty() && rendered.contains(text.as_str()))
        {
            return Err(ChatError::Unavailable(why.clone()));
        }
        let (mut ids, mut spans) = tok
            .encode_with_offsets(rendered, false)
            .map_err(|e| ChatError::Render(format!("encoding the rendered conversation: {e}")))?;
        if self.bos.as_deref().is_none_or(|bos| !rendered.trim_start().starts_with(bos)) {
            let prefix = tok.text_prefix();
            ids.splice(0..0, prefix.iter().copied());
            spans.splice(0..0, prefix.iter().map(|_| (0, 0)));
        }
        Ok((ids, spans))
    }

    /// The conversation rendered to end as `end` says ([`render_prompt`](Self::render_prompt), or without the
    /// generation prompt: transformers' `add_generation_prompt=False`).
    pub fn render_conversation(
        &self,
        messages: &[Value],
        end: PromptEnd,
        kwargs: &Kwargs,
    ) -> Result<String, ChatError> {
        match end {
            PromptEnd::GenerationPrompt => self.render(messages, true, kwargs),
            PromptEnd::ContinueFinal => self.render_prompt(messages, true, kwargs),
            PromptEnd::AsIs => self.render(messages, false, kwargs),
        }
    }

    /// The text a model continues: the conversation with the generation prompt after it (a new assistant
    /// turn), or with `continue_final` its final message left open (transformers' `continue_final_message`,
    /// vLLM's assistant prefill): rendered with a marker after that message's content and cut there, the
    /// whitespace before the marker dropped too when the template trims the content (Rust's whitespace, which
    /// unlike Python's `rstrip` leaves `\x1c`–`\x1f`). A conversation holding the marker text is refused.
    pub fn render_prompt(
        &self,
        messages: &[Value],
        continue_final: bool,
        kwargs: &Kwargs,
    ) -> Result<String, ChatError> {
        if !continue_final {
            return self.render(messages, true, kwargs);
        }
        const TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
        // The marker must be found where this code put it, not in a message's own text (transformers would
        // cut there).
        if let Some(i) = messages.iter().position(|m| m.to_string().contains(TAG.trim_end())) {
            return Err(ChatError::Render(format!(
                "continue_final_message: message {i} contains `{}`, the marker that finds where the final message ends",
                TAG.trim_end()
            )));
        }
        let mut list = messages.to_vec();
        let Some(Value::String(last)) = list.last_mut().and_then(|m| m.get_mut("content")) else {
            return Err(ChatError::Render(
                "continue_final_message: the final message has no content to continue".into(),
            ));
        };
        let last_text = std::mem::take(last);
        *last = format!("{last_text}{TAG}");
        let mut text = self.render(&list, false, kwargs)?;
        let cut = text.rfind(TAG.trim_end()).filter(|_| text.contains(last_text.trim()));
        let Some(cut) = cut else {
            return Err(ChatError::Render(
                "continue_final_message: the chat template leaves out (part of) the final message, so it cannot be continued".into(),
            ));
        };
        let spacing_kept = text[cut..].starts_with(TAG);
        text.truncate(cut);
        if !spacing_kept {
            text.truncate(text.trim_end().len());
        }
        Ok(text)
    }

    /// The prompt ids of a conversation ([`ChatTemplate::render_prompt`], then encoded). A conversation the
    /// template renders as no text (roles it does not know, dropped) is refused: there is nothing of it to
    /// continue.
    pub fn prompt_ids(
        &self,
        tok: &Tokenizer,
        messages: &[Value],
        continue_final: bool,
        kwargs: &Kwargs,
    ) -> Result<Vec<u32>, ChatError> {
        let text = self.render_prompt(messages, continue_final, kwargs)?;
        self.prompt_ids_of(tok, &text)
    }

    /// The prompt ids of a conversation [`ChatTemplate::render_prompt`] rendered as `text` (wherever it ran).
    pub fn prompt_ids_of(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ChatError> {
        if text.is_empty() {
            return Err(ChatError::Render(
                "the chat template rendered the conversation as no text (does it know these roles?)".into(),
            ));
        }
        Ok(self.encode(tok, text)?.0)
    }
}

/// How a conversation's rendering ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PromptEnd {
    /// With the template's generation prompt, a new assistant turn opened (transformers'
    /// `add_generation_prompt=True`, what a request for an answer renders).
    GenerationPrompt,
    /// With its final message left open to continue (`continue_final_message`).
    ContinueFinal,
    /// As it is, no generation prompt (`add_generation_prompt=False`).
    AsIs,
}

impl PromptEnd {
    /// The ending a request's `add_generation_prompt` (unset = true, unless the final message is continued)
    /// and `continue_final_message` ask for; why not, for the pair vLLM refuses too (both true).
    pub fn of(add_generation_prompt: Option<bool>, continue_final: bool) -> Result<Self, &'static str> {
        match (add_generation_prompt, continue_final) {
            (Some(true), true) => Err("a final message continued has no generation prompt after it"),
            (_, true) => Ok(PromptEnd::ContinueFinal),
            (Some(false), false) => Ok(PromptEnd::AsIs),
            (_, false) => Ok(PromptEnd::GenerationPrompt),
        }
    }
}

/// The variables the compiled template `chat` of `env` (from `source`) reads before it sets them, as jinja2's
/// `meta.find_undeclared_variables` (vLLM's check) finds them. minijinja's analysis marks a `{% set x = … %}`
/// target as set before it reads the right side, so `{% set enable_thinking = enable_thinking | default(true)
/// %}` (how Qwen 3.5's template takes that variable) would not count; the same analysis of a copy in which
/// each `set` first prints its right side restores jinja2's order. (Analysis only: the copy never renders.)
fn read_variables(env: &Environment<'_>, source: &str) -> std::collections::HashSet<String> {
    let mut found = env.get_template("chat").expect("added").undeclared_variables(false);
    let set = fancy_regex::Regex::new(r"(?s)\{%([-+]?)\s*set\s+([^=%]+?)\s*=(.*?)([-+]?)%\}").expect("valid regex");
    let reordered = set.replace_all(source, "{{ ($3) }}{%${1} set $2 =$3${4}%}");
    let mut scan = Environment::new();
    if scan.add_template_owned("scan", without_generation_blocks(&reordered)).is_ok() {
        found.extend(scan.get_template("scan").expect("added").undeclared_variables(false));
    }
    found
}

/// How a template's refusal of a conversation (`raise_exception`) starts.
pub const REFUSED: &str = "the chat template refused the conversation";

/// A template's `raise_exception(message)`.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// A rendering's text, refused past [`RENDER_MAX_BYTES`] (`over` then tells `render` why the write failed).
#[derive(Default)]
struct Capped {
    text: Vec<u8>,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > RENDER_MAX_BYTES {
            self.over = true;
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A template's own refusal (`raise_exception`) is its message, as transformers reports it; other failures say
/// where in the template they happened.
fn render_message(e: &JinjaError) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if let Some(Refusal(message)) = inner.downcast_ref::<Refusal>() {
            return format!("{REFUSED}: {message}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(t: &str) -> ChatTemplate {
        ChatTemplate::compile(t, vec![("bos_token".into(), "<s>".into()), ("eos_token".into(), "</s>".into())]).unwrap()
    }

    fn user(content: &str) -> Vec<Value> {
        vec![json!({"role": "user", "content": content})]
    }

    /// A template that loops or prints without end fails its conversation (the template's fault:
    /// `Unavailable`) within its budget, instead of holding the thread or taking the memory; a rendering
    /// inside the limits is untouched.
    #[test]
    fn a_template_past_its_limits_fails_its_conversation() {
        let spin = template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x");
        let e = spin.render(&user("hi"), false, &Kwargs::new()).unwrap_err();
        assert!(matches!(e, ChatError::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains(&format!("ran past {RENDER_FUEL} template instructions")), "{e}");
        let flood = template("{% for i in range(100000) %}{{ 'xxxxxxxxxx' * 100000 }}{% endfor %}");
        let e = flood.render(&user("hi"), false, &Kwargs::new()).unwrap_err();
        assert!(matches!(e, ChatError::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("its text passed 64 MiB"), "{e}");
        let fits = template("{% for i in range(60) %}{{ 'x' * 1000000 }}{% endfor %}{{ messages[0]['content'] }}");
        assert_eq!(fits.render(&user("hi"), false, &Kwargs::new()).unwrap().len(), 60_000_002);
    }

    #[test]
    fn tojson_arguments() {
        let t = template("{{ messages[0] | tojson(sort_keys=true, ensure_ascii=true, separators=[',', ':']) }}");
        let x = json!({"b": "é😀\u{7f}", "a": [1, {}, 0.00001, 1e16]});
        assert_eq!(
            t.render(std::slice::from_ref(&x), false, &Kwargs::new()).unwrap(),
            r#"{"a":[1,{},1e-05,1e+16],"b":"\u00e9\ud83d\ude00\u007f"}"#
        );
        // Positionally, as transformers' signature allows: ensure_ascii first.
        let t = template("{{ messages[0]['b'] | tojson(true) }}");
        assert_eq!(t.render(&[x], false, &Kwargs::new()).unwrap(), r#""\u00e9\ud83d\ude00\u007f""#);
        for bad in [
            "{{ 1 | tojson(width=2) }}",
            "{{ {'a': nothing} | tojson }}",
            "{{ 'a' | tojson(true, ensure_ascii=true) }}",
        ] {
            assert!(template(bad).render(&[], false, &Kwargs::new()).is_err(), "{bad}");
        }
        // Keys as Python writes them; sorted as values, not as text.
        let t = template("{{ {10: 1, 9: 2, none: 3, true: 4} | tojson }}|{{ {10: 1, 9: 2} | tojson(sort_keys=true) }}");
        assert_eq!(
            t.render(&[], false, &Kwargs::new()).unwrap(),
            r#"{"10": 1, "9": 2, "null": 3, "true": 4}|{"9": 2, "10": 1}"#
        );
    }

    #[test]
    fn tools_and_documents_are_none_and_crlf_is_a_newline() {
        let t = template("{{ tools is defined }}|{{ tools is none }}|{{ documents is none }}\r\n{% if true %}\r\nx\r\n{% endif %}\r\n");
        assert_eq!(
            t.render(&[], false, &Kwargs::new()).unwrap(),
            "True|True|True\nx\n",
            "printed as Python prints them"
        );
    }

    #[test]
    fn bos_is_put_before_a_rendering_only_when_the_template_leaves_it_out() {
        let tok = crate::model::demo::tokenizer().unwrap();
        let t = template("x");
        assert_eq!(tok.text_prefix(), [0], "the demo's BOS");
        let (ids, spans) = t.encode(&tok, "ab").unwrap();
        assert_eq!((ids, spans), (vec![0, 3 + 97, 3 + 98], vec![(0, 0), (0, 1), (1, 2)]));
        assert_eq!(t.encode(&tok, "<s>ab").unwrap().0, tok.encode_with("<s>ab", false).unwrap());
        // Written after the newlines of the template's blocks, as transformers encodes it: not doubled.
        assert_eq!(t.encode(&tok, "\n \n<s>ab").unwrap().0, tok.encode_with("\n \n<s>ab", false).unwrap());
        let empty = template("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}");
        let e = empty.prompt_ids(&tok, &[json!({"role": "usr", "content": "a"})], false, &Kwargs::new()).unwrap_err();
        assert!(matches!(&e, ChatError::Render(m) if m.contains("as no text")), "{e}");
        assert_eq!(
            empty.prompt_ids(&tok, &user("a"), false, &Kwargs::new()).unwrap(),
            vec![0, 3 + 97],
            "BOS put before"
        );
    }

    /// The marker that finds the end of the final message is refused in a message's own text: transformers'
    /// search would cut the prompt there.
    #[test]
    fn a_conversation_holding_the_continue_marker_is_refused() {
        let t = template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}");
        let said = [
            json!({"role": "user", "content": "say CONTINUE_FINAL_MESSAGE_TAG"}),
            json!({"role": "assistant", "content": "ok"}),
        ];
        let e = t.render_prompt(&said, true, &Kwargs::new()).unwrap_err();
        assert!(matches!(&e, ChatError::Render(m) if m.contains("message 0 contains")), "{e}");
        assert_eq!(t.render_prompt(&said[1..], true, &Kwargs::new()).unwrap(), "<assistant>ok");
    }

    /// The variables a template reads, as jinja2 finds them: a `set` that reads its own target first
    /// (`x = x | default(…)`) counts it; names it sets before reading, its loop variables and functions do not.
    #[test]
    fn variables_read_before_they_are_set_count() {
        let t = template(
            "{%- set enable_thinking = enable_thinking | default(true) %}{% set effort = effort if effort is defined else 'low' %}{%- set ns = namespace(n=0) -%}{% set ns.n = ns.n + 1 %}{% set mine = 1 %}{{ mine }}{% for m in messages %}{{ m.content }}{{ loop.index }}{% endfor %}{{ bos_token }}{{ range(2) | length }}{{ strftime_now('%Y') }}",
        );
        assert_eq!(t.variables(), ["bos_token", "effort", "enable_thinking"]);
        assert!(t
            .check_kwargs(&serde_json::from_str(r#"{"enable_thinking": false, "effort": "high"}"#).unwrap())
            .is_ok());
        for name in ["mine", "ns", "m", "loop", "range"] {
            let e = t.check_kwargs(&serde_json::from_str(&format!("{{\"{name}\": 1}}")).unwrap()).unwrap_err();
            assert!(e.contains("reads no variable"), "{name}: {e}");
        }
        let rendered = t.render(&user("a"), true, &serde_json::from_str(r#"{"enable_thinking": false}"#).unwrap());
        assert_eq!(rendered.unwrap(), format!("1a1<s>2{}", strftime_utc("%Y", now()).unwrap()));
    }

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn refusals_carry_the_templates_message() {
        let t = template("{{ raise_exception('roles must alternate') }}");
        let e = t.render(&[], true, &Kwargs::new()).unwrap_err();
        assert_eq!(e, ChatError::Render("the chat template refused the conversation: roles must alternate".into()));
        let t = template("{{ messages[0]['content'] + 1 }}");
        let e = t.render(&user("a"), true, &Kwargs::new()).unwrap_err();
        assert!(matches!(&e, ChatError::Render(m) if m.starts_with("rendering the chat template:")), "{e}");
        let e = ChatTemplate::compile("{% for %}", vec![]).unwrap_err();
        assert!(matches!(&e, ChatError::Unavailable(m) if m.contains("does not compile")), "{e}");
        // What the server lacks fails every conversation that reaches it: the template's fault.
        for lacking in ["{{ 'a' | nosuchfilter }}", "{{ 'a' is nosuchtest }}", "{{ nosuchfunction() }}"] {
            let e = template(lacking).render(&user("a"), true, &Kwargs::new()).unwrap_err();
            assert!(
                matches!(&e, ChatError::Unavailable(m) if m.starts_with("rendering the chat template:")),
                "{lacking}: {e}"
            );
        }
        let e = template("{{ tools.items() }}").render(&user("a"), true, &Kwargs::new()).unwrap_err();
        assert!(matches!(&e, ChatError::Render(_)), "a method on a value the request gives is the request's: {e}");
    }
    /// Values print as jinja2 prints them (Python's `str`), where minijinja's own text differs; `round` and
    /// `is sequence` as jinja2's. Expected texts are Python 3.11's (transformers' environment).
    #[test]
    fn values_print_round_and_test_as_in_jinja2() {
        let cases = [
            (
                "{{ 1e20 }} {{ 1e-7 }} {{ 1.5e300 }} {{ 0.1 + 0.2 }} {{ 1.0 }} {{ -0.0 }}",
                "1e+20 1e-07 1.5e+300 0.30000000000000004 1.0 -0.0",
            ),
            ("{{ [1, 'a', none, true, 1.5, {'k': 'v'}] }}", "[1, 'a', None, True, 1.5, {'k': 'v'}]"),
            ("{{ {'a': none, 'b': [1e20]} }}", "{'a': None, 'b': [1e+20]}"),
            ("{{ [\"it's\", 'a\"b', 'x\\ny\u{a0}\u{e9}'] }}", "[\"it's\", 'a\"b', 'x\\ny\\xa0\u{e9}']"),
            (
                "{{ 2.5|round }} {{ 3.5|round }} {{ 3|round }} {{ 2.675|round(2) }} {{ 1250|round(-2) }}",
                "2.0 4.0 3 2.67 1200",
            ),
            ("{{ 2.567|round(2, 'floor') }} {{ 2|round(method='ceil') }} {{ -2.5|round }}", "2.56 2.0 -2.0"),
            ("{{ 1.5|round(400) }} {{ 1.5|round(-400) }} {{ -1.5|round(-2147483648) }}", "1.5 0.0 -0.0"),
            (
                "{{ 6000000000000000000|round(-19) }} {{ 9223372036854775807|round(-1) }}",
                "10000000000000000000 9223372036854775810",
            ),
            (
                "{{ 'ab' is sequence }} {{ {'a': 1} is sequence }} {{ [1] is sequence }} {{ 1 is sequence }}",
                "True True True False",
            ),
            ("{{ 'x' }}{{ 7 }}{{ true }}{{ none }}", "x7TrueNone"),
            ("{{ ({'a': none}|string) + (1.5e20|string) + ('x'|string) + (true|string) }}", "{'a': None}1.5e+20xTrue"),
        ];
        for (source, want) in cases {
            let t = ChatTemplate::compile(source, vec![]).unwrap();
            assert_eq!(t.render(&[], false, &Kwargs::new()).unwrap(), want, "{source}");
        }
        let t = ChatTemplate::compile("{{ 2.5|round(0, 'up') }}", vec![]).unwrap();
        assert!(t.render(&[], false, &Kwargs::new()).unwrap_err().to_string().contains("common, ceil or floor"));
    }
}
