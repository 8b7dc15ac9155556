//! Training data: JSONL, one example a line, in three shapes —
//! - `{"text": "..."}`: loss on every token;
//! - `{"prompt": "...", "completion": "..."}`: loss on the completion only;
//! - `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: rendered with the
//!   tokenizer's `chat_template` (Jinja, through minijinja; a tokenizer without one is refused, as
//!   transformers refuses to apply a chat template it does not have); loss on the assistant turns only,
//!   located by rendering each conversation prefix (as TRL does).
//!
//! The prompt is encoded with the tokenizer's special tokens (e.g. BOS), exactly as the server encodes
//! prompts, and the completion as text after it (the ids the server decodes to it); text and completions
//! end with the end-of-sequence token so adapters learn to stop. Examples longer than `--max-seq-len` are
//! truncated — counted and reported — and dropped if nothing trainable is left. Every bad line is an error
//! naming the line and the reason, a token the model has no embedding for too.

use std::cell::OnceCell;
use std::path::Path;

use serde_json::Value;

use crate::model::{ChatTemplate, Tokenizer};

/// The demo tokenizer's chat template: `<|role|>\n{content}\n` per message, the end-of-sequence token after
/// each assistant turn.
pub const PLAIN_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{file}:{line}: {reason}")]
    Line { file: String, line: usize, reason: String },
}

/// One tokenized example: `targets[t]` says whether token `t` is predicted with loss (token 0 never is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
}

impl Example {
    /// Tokens that carry loss.
    pub fn loss_tokens(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

/// How lines become examples: with the model's tokenizer; its end-of-sequence token, after each text and
/// completion; its vocabulary, a line with a token past it refused (a tokenizer may add tokens the model has
/// no embedding for); the longest example, longer ones truncated.
#[derive(Clone, Copy)]
pub struct Encoding<'a> {
    pub tok: &'a Tokenizer,
    pub eos: u32,
    pub vocab: usize,
    pub max_seq_len: Option<usize>,
}

/// What loading found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    pub lines: usize,
    pub examples: usize,
    pub truncated: usize,
    /// Examples with nothing left to learn after truncation.
    pub dropped: usize,
    /// Lines that were conversations (`{"messages"}`), rendered with the chat template.
    pub conversations: usize,
}

/// Loads `path`.
pub fn load_jsonl(path: &Path, enc: Encoding) -> Result<(Vec<Example>, DataStats), DataError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| DataError::File { file: file.clone(), reason: e.to_string() })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // JSON is UTF-8: name the line (and column) where the file stops being it.
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
        DataError::Line { file: file.clone(), line, reason: format!("not UTF-8 (at byte {column} of the line)") }
    })?;
    parse_jsonl(&text, &file, enc)
}

/// Parses JSONL text (`file` names it in errors).
pub fn parse_jsonl(text: &str, file: &str, enc: Encoding) -> Result<(Vec<Example>, DataStats), DataError> {
    // A byte-order mark (Windows editors write one) is no part of the first line's JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Compiled on the first `{"messages"}` line: text and prompt/completion data never need the template.
    let chat = OnceCell::new();
    let mut stats = DataStats::default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        stats.lines += 1;
        let err = |reason: String| DataError::Line { file: file.to_string(), line: n, reason };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let mut ex = example(&v, enc.tok, &chat, enc.eos).map_err(err)?;
        enc.tok.check_in_vocab(&ex.ids, enc.vocab).map_err(err)?;
        if ex.loss_tokens() == 0 {
            // Only a conversation can have none: text and completions are never empty, and end with EOS.
            return Err(err("no token to learn from: the chat template renders no assistant text".into()));
        }
        if v.get("messages").is_some_and(|m| !m.is_null()) {
            stats.conversations += 1;
        }
        if let Some(max) = enc.max_seq_len {
            if ex.ids.len() > max {
                ex.ids.truncate(max);
                ex.targets.truncate(max);
                stats.truncated += 1;
            }
        }
        if ex.loss_tokens() == 0 {
            stats.dropped += 1;
            continue;
        }
        out.push(ex);
    }
    if stats.lines == 0 {
        return Err(DataError::File { file: file.to_string(), reason: "no examples (the file is empty)".into() });
    }
    if out.is_empty() {
        return Err(DataError::File {
            file: file.to_string(),
            reason: format!(
                "all {} examples were truncated away (a limit of {} tokens leaves no target tokens; see --max-seq-len)",
                stats.lines,
                enc.max_seq_len.map_or_else(|| "no".to_string(), |n| n.to_string())
            ),
        });
    }
    stats.examples = out.len();
    Ok((out, stats))
}

/// A `messages` list: non-empty, each message a known role with string content, at least one assistant turn.
fn check_messages(messages: &Value) -> Result<&[Value], String> {
    let Some(list) = messages.as_array() else { return Err("`messages` must be a list".into()) };
    if list.is_empty() {
        return Err("`messages` is empty".into());
    }
    for (i, m) in list.iter().enumerate() {
        let role =
            m.get("role").and_then(|r| r.as_str()).ok_or_else(|| format!("messages[{i}].role must be a string"))?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("messages[{i}].role `{role}` (expected system, user or assistant)"));
        }
        m.get("content").and_then(|c| c.as_str()).ok_or_else(|| format!("messages[{i}].content must be a string"))?;
    }
    if !list.iter().any(|m| m["role"] == "assistant") {
        return Err("no assistant message to learn from".into());
    }
    Ok(list)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.get(key).and_then(|x| x.as_str()).ok_or_else(|| format!("field `{key}` must be a string"))
}

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>, String> {
    tok.encode_with(text, special).map_err(|e| e.to_string())
}

fn example(
    v: &Value,
    tok: &Tokenizer,
    chat: &OnceCell<Result<ChatTemplate, String>>,
    eos: u32,
) -> Result<Example, String> {
    let Some(obj) = v.as_object() else { return Err("each line must be a JSON object".into()) };
    // A `messages` list wins over other columns, as chat datasets carry them (ultrachat's `prompt` and
    // `prompt_id`); `text` beside a prompt/completion pair is ambiguous. `null` columns are absent.
    let has = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if !has("messages") && has("text") && (has("prompt") || has("completion")) {
        return Err("has both `text` and `prompt`/`completion`: give one format per line".into());
    }
    if has("messages") {
        // The line's own mistakes first: they hold whatever the template.
        let list = check_messages(&obj["messages"])?;
        let chat = chat
            .get_or_init(|| ChatTemplate::new(tok).map_err(|e| format!("{e}, or write prompt/completion lines")))
            .as_ref()?;
        return chat_example(chat, list, tok);
    }
    if has("prompt") || has("completion") {
        let prompt = encode(tok, str_field(v, "prompt")?, true)?;
        let completion = str_field(v, "completion")?;
        if completion.is_empty() {
            return Err("field `completion` is empty".into());
        }
        let mut ids = prompt;
        let mut targets = vec![false; ids.len()];
        let mut c = tok.encode_continued(completion).map_err(|e| e.to_string())?;
        end_with(&mut c, eos);
        targets.extend(std::iter::repeat_n(true, c.len()));
        ids.extend(c);
        return Ok(Example { ids, targets });
    }
    if has("text") {
        let text = str_field(v, "text")?;
        if text.is_empty() {
            return Err("field `text` is empty".into());
        }
        let mut ids = encode(tok, text, true)?;
        end_with(&mut ids, eos);
        let targets = vec![true; ids.len()];
        return Ok(Example { ids, targets });
    }
    Err("expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}".into())
}

/// Puts the end-of-sequence token after `ids`, unless the text spelled it out already (TRL appends it only where
/// missing): learning to stop, not to say it twice.
fn end_with(ids: &mut Vec<u32>, eos: u32) {
    if ids.last() != Some(&eos) {
        ids.push(eos);
    }
}

/// Renders a conversation prefix by prefix (as TRL does) to find the assistant turns: they carry the loss.
fn chat_example(chat: &ChatTemplate, list: &[Value], tok: &Tokenizer) -> Result<Example, String> {
    let none = Default::default();
    let full = chat.render(list, false, &none).map_err(|e| e.to_string())?;
    let mut spans = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if m["role"] != "assistant" {
            continue;
        }
        let before = chat.render(&list[..i], true, &none).map_err(|e| e.to_string())?;
        let through = chat.render(&list[..=i], false, &none).map_err(|e| e.to_string())?;
        if !full.starts_with(&through) || !through.starts_with(&before) {
            return Err(
                "the chat template does not render conversations prefix by prefix; cannot find the assistant turns"
                    .into(),
            );
        }
        spans.push((before.len(), through.len()));
    }
    // Encoded as the server encodes a conversation's prompt: BOS put before it unless the template wrote it.
    // A token with any of its text in an assistant turn is a target, as in transformers'
    // `return_assistant_tokens_mask` (TRL's `assistant_only_loss`): a generation prompt ending in a space the
    // tokenizer joins to the answer (`Assistant: ` + `there` → `Ġthere`) leaves the answer's first token
    // trained.
    let (ids, offsets) = chat.encode(tok, &full).map_err(|e| e.to_string())?;
    let targets = offsets.iter().map(|&(s, e)| e > s && spans.iter().any(|&(a, b)| s < b && e > a)).collect();
    Ok(Example { ids, targets })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::demo;

    /// `tok`'s encoding, with EOS 1, any vocabulary, no limit.
    fn enc(tok: &Tokenizer) -> Encoding<'_> {
        Encoding { tok, eos: 1, vocab: usize::MAX, max_seq_len: None }
    }

    fn parse(text: &str, max: Option<usize>) -> Result<(Vec<Example>, DataStats), DataError> {
        parse_jsonl(text, "d.jsonl", Encoding { max_seq_len: max, ..enc(&demo::tokenizer().unwrap()) })
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let (plain, _) = parse("{\"text\": \"ab\"}\n", None).unwrap();
        assert_eq!(parse("\u{feff}{\"text\": \"ab\"}\n", None).unwrap().0, plain);
        // Only at the start of the file: elsewhere it is what it is.
        let e = parse("{\"text\": \"ab\"}\n\u{feff}{\"text\": \"ab\"}\n", None).unwrap_err();
        assert!(e.to_string().starts_with("d.jsonl:2: invalid JSON"), "{e}");
    }

    #[test]
    fn three_shapes() {
        let (ex, stats) = parse(
            "{\"text\": \"ab\"}\n\n{\"prompt\": \"hi\", \"completion\": \"yo\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n",
            None,
        )
        .unwrap();
        assert_eq!(stats, DataStats { lines: 3, examples: 3, truncated: 0, dropped: 0, conversations: 1 });
        // text: BOS a b EOS, loss everywhere.
        assert_eq!(ex[0].ids, vec![0, 3 + b'a' as u32, 3 + b'b' as u32, 1]);
        assert_eq!(ex[0].loss_tokens(), 3);
        // prompt/completion: loss on "yo" + EOS only.
        assert_eq!(ex[1].targets, vec![false, false, false, true, true, true]);
        // messages: "<|user|>\nq\n<|assistant|>\nA\n</s>" → loss on "A\n" and the EOS token only.
        let t = demo::tokenizer().unwrap();
        let target_text: Vec<u32> = ex[2].ids.iter().zip(&ex[2].targets).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
        assert_eq!(t.decode(&target_text[..2]).unwrap(), "A\n");
        assert_eq!(*target_text.last().unwrap(), 1);
        assert_eq!(target_text.len(), 3);
    }

    /// A completion is trained as the ids the server decodes to it after its prompt. Encoded as a text of its
    /// own, Llama 2's tokenizer (a normalizer prepends `▁`) gave `" hello"` as `▁ ▁hello`, which decodes as
    /// two spaces and is not what the base model writes after a prompt, and `"hello"` as `▁hello`.
    #[test]
    fn a_completion_is_the_text_after_its_prompt() {
        let sp = crate::model::token_bytes::llama2_tokenizer_json();
        let tok = Tokenizer::from_parts(&sp, "sp/tokenizer.json", None).unwrap();
        let enc = Encoding { eos: 2, ..enc(&tok) };
        let word = |w: &str| tok.token_to_id(w).unwrap();
        for (completion, ids) in [(" hello", vec![word("\u{2581}hello")]), ("hello", vec![word("hello")])] {
            let line = json!({"prompt": "hello", "completion": completion}).to_string();
            let ex = &parse_jsonl(&line, "d", enc).unwrap().0[0];
            assert_eq!(ex.ids[..1], [word("\u{2581}hello")], "the prompt as the server encodes it");
            assert_eq!(ex.ids[1..], [&ids[..], &[2]].concat(), "{completion:?}");
        }
        for completion in [" a b", "\nhello", "  x", "é "] {
            let line = json!({"prompt": "a", "completion": completion}).to_string();
            let ex = &parse_jsonl(&line, "d", enc).unwrap().0[0];
            let targets: Vec<u32> = ex.ids.iter().zip(&ex.targets).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
            assert_eq!(tok.decode_continued(&targets).unwrap(), completion);
        }
    }

    /// A line with a token the model has no embedding for (the tokenizer adds tokens past its vocabulary) is
    /// refused naming the line and the token.
    #[test]
    fn a_token_past_the_vocabulary_is_refused_naming_the_line() {
        let tok = demo::tokenizer().unwrap();
        let b = 3 + b'b' as usize;
        let text = "{\"text\": \"a\"}\n{\"prompt\": \"a\", \"completion\": \"ab\"}\n";
        let e = parse_jsonl(text, "d", Encoding { vocab: b, ..enc(&tok) }).unwrap_err();
        let want = format!("d:2: encodes to token \"b\" (id {b}), outside the model's vocabulary of {b} tokens");
        assert!(e.to_string().starts_with(&want), "{e}");
        assert_eq!(parse_jsonl(text, "d", Encoding { vocab: b + 1, ..enc(&tok) }).unwrap().0.len(), 2);
    }

    /// A conversation whose assistant turns the chat template renders as nothing has nothing to learn: refused
    /// naming the line. Before, it was dropped without a word, and a file of only such lines was said to be
    /// truncated away.
    #[test]
    fn a_conversation_with_nothing_to_learn_is_refused() {
        let mut t = demo::tokenizer().unwrap();
        t.chat.template = Some(
            "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}".into(),
        );
        let line = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n";
        let e = parse_jsonl(&format!("{{\"text\": \"a\"}}\n{line}"), "d", enc(&t)).unwrap_err();
        assert_eq!(e.to_string(), "d:2: no token to learn from: the chat template renders no assistant text");
    }

    /// A text or completion that spells out the end-of-sequence token ends with it once, as TRL appends it only
    /// where missing. Before, it ended with two, and the adapter learned to say it twice.
    #[test]
    fn a_spelled_out_eos_is_not_doubled() {
        for (spelled, plain) in [
            ("{\"text\": \"ab</s>\"}", "{\"text\": \"ab\"}"),
            ("{\"prompt\": \"hi\", \"completion\": \"yo</s>\"}", "{\"prompt\": \"hi\", \"completion\": \"yo\"}"),
        ] {
            assert_eq!(parse(spelled, None).unwrap().0, parse(plain, None).unwrap().0, "{spelled}");
        }
        // Inside the text, it is the text's.
        let ex = &parse("{\"text\": \"a</s>b\"}", None).unwrap().0[0];
        assert_eq!(ex.ids, [0, 3 + b'a' as u32, 1, 3 + b'b' as u32, 1]);
    }

    /// Chat datasets carry other columns beside `messages` (ultrachat: `prompt`, `prompt_id`): the conversation
    /// is the example. Exports of merged datasets write absent columns as `null`.
    #[test]
    fn messages_win_over_other_columns_and_null_columns_are_absent() {
        let conv = r#"[{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]"#;
        let plain = parse(&format!("{{\"messages\": {conv}}}\n"), None).unwrap().0;
        let ultrachat = parse(&format!("{{\"prompt\": \"q\", \"prompt_id\": \"ab12\", \"messages\": {conv}}}\n"), None);
        assert_eq!(ultrachat.unwrap().0, plain);
        let pc = parse("{\"prompt\": \"hi\", \"completion\": \"yo\"}\n", None).unwrap().0;
        let with_null =
            parse("{\"prompt\": \"hi\", \"completion\": \"yo\", \"text\": null, \"messages\": null}\n", None);
        assert_eq!(with_null.unwrap().0, pc);
    }

    /// A conversation trains on the ids the server prompts it with: an example's ids before its assistant turn
    /// are the prompt `messages` without that turn get (demo template: no BOS written, BOS put before).
    #[test]
    fn a_conversation_trains_on_the_prompt_the_server_sends() {
        let tok = demo::tokenizer().unwrap();
        let turns = [json!({"role": "system", "content": "s"}), json!({"role": "user", "content": "q"})];
        let answer = json!({"role": "assistant", "content": "A"});
        let line = json!({"messages": [turns[0], turns[1], answer]}).to_string();
        let ex = &parse(&format!("{line}\n"), None).unwrap().0[0];
        let prompt = ChatTemplate::new(&tok).unwrap().prompt_ids(&tok, &turns, false, &Default::default()).unwrap();
        let first_target = ex.targets.iter().position(|&t| t).unwrap();
        assert_eq!(ex.ids[..first_target], prompt[..]);
        assert_eq!(prompt[0], 0, "BOS");
    }

    /// A generation prompt ending in a space the tokenizer joins to the answer's first word: the token holding
    /// both is a target (transformers' `return_assistant_tokens_mask`), so the answer's start is trained.
    /// Before, only tokens wholly inside the turn were, and that one never was.
    #[test]
    fn a_token_across_the_turns_start_is_trained() {
        // The llama fixture's byte-level tokenizer keeps a token's leading space in its offsets.
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model");
        let mut t = Tokenizer::from_dir(&fixture).unwrap();
        t.chat.template = Some("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}".into());
        let line = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"there\"}]}\n";
        let ex = &parse_jsonl(line, "d", enc(&t)).unwrap().0[0];
        let (ids, offsets) = t.encode_with_offsets("user: q\nassistant: there\n", false).unwrap();
        let start = "user: q\nassistant: ".len();
        let across =
            offsets.iter().position(|&(s, e)| s < start && e > start).expect("a token across the turn's start");
        let at = ex.ids.len() - ids.len(); // after the BOS put before
        assert_eq!(ex.ids[at..], ids[..]);
        assert!(ex.targets[at + across], "the token holding the answer's start is trained: {:?}", ex.targets);
        assert!(!ex.targets[at + across - 1], "the prompt before it is not");
    }

    /// transformers' `{% generation %}` blocks (whitespace control included) render as plain text; a template
    /// is compiled only for `{"messages"}` lines, so text data trains whatever the template holds.
    #[test]
    fn generation_blocks_render_and_only_messages_need_the_template() {
        let messages = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n";
        let mut t = demo::tokenizer().unwrap();
        t.chat.template = Some(PLAIN_CHAT_TEMPLATE.into());
        let want = parse_jsonl(messages, "d", enc(&t)).unwrap().0;
        let marked = PLAIN_CHAT_TEMPLATE.replace(
            "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}",
            "{{ '<|' + message['role'] + '|>\\n' }}{%- generation -%}  {{ message['content'] + '\\n' }}  {%- endgeneration %}",
        );
        assert_ne!(marked, PLAIN_CHAT_TEMPLATE);
        t.chat.template = Some(marked);
        assert_eq!(parse_jsonl(messages, "d", enc(&t)).unwrap().0, want);
        // Named templates, none of them "default": refused, as transformers refuses to pick one.
        let mut named = demo::tokenizer().unwrap();
        named.chat.template = None;
        let e = parse_jsonl(messages, "d", enc(&named)).unwrap_err();
        assert!(
            matches!(&e, DataError::Line { reason, .. } if reason.contains("the tokenizer has no chat template")),
            "{e}"
        );
        named.chat.names = vec!["tool_use".into()];
        let e = parse_jsonl(messages, "d", enc(&named)).unwrap_err();
        assert!(
            matches!(&e, DataError::Line { reason, .. } if reason.contains("[\"tool_use\"] and none is named \"default\"")),
            "{e}"
        );
        t.chat.template = Some("{% broken".into());
        assert!(parse_jsonl("{\"text\": \"ab\"}\n", "d", enc(&t)).is_ok());
        let e = parse_jsonl(messages, "d", enc(&t)).unwrap_err();
        assert!(matches!(&e, DataError::Line { line: 1, reason, .. } if reason.contains("chat template")), "{e}");
    }

    #[test]
    fn bad_lines_name_line_and_reason() {
        let cases = [
            ("{\"text\": \"ok\"}\n{not json}\n", 2, "invalid JSON"),
            ("{\"prompt\": \"p\"}\n", 1, "completion"),
            ("{\"foo\": 1}\n", 1, "expected"),
            ("[1, 2]\n", 1, "object"),
            ("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n", 1, "robot"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n", 1, "no assistant"),
            ("{\"text\": 5}\n", 1, "`text`"),
            (
                "{\"text\": \"a\", \"prompt\": \"p\", \"completion\": \"c\"}\n",
                1,
                "both `text` and `prompt`/`completion`",
            ),
        ];
        for (text, line, words) in cases {
            match parse(text, None) {
                Err(DataError::Line { line: l, reason, .. }) => {
                    assert_eq!(l, line, "{text}");
                    assert!(reason.contains(words), "{text}: {reason}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn empty_file_and_everything_truncated_away() {
        assert!(matches!(parse("\n\n", None), Err(DataError::File { reason, .. }) if reason.contains("empty")));
        let e = parse("{\"prompt\": \"a long prompt\", \"completion\": \"x\"}\n", Some(4)).unwrap_err();
        assert!(matches!(&e, DataError::File { reason, .. } if reason.contains("truncated away")), "{e}");
        let (ex, stats) =
            parse("{\"text\": \"abcdefgh\"}\n{\"prompt\": \"a long prompt\", \"completion\": \"x\"}\n", Some(4))
                .unwrap();
        assert_eq!((stats.truncated, stats.dropped, ex.len()), (2, 1, 1));
        assert_eq!(ex[0].ids.len(), 4);
    }

    /// A file that stops being UTF-8 is refused naming the line.
    #[test]
    fn a_non_utf8_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"\xff\"}\n").unwrap();
        match load_jsonl(&path, enc(&demo::tokenizer().unwrap())) {
            Err(DataError::Line { line: 3, reason, .. }) => {
                assert!(reason.contains("not UTF-8 (at byte 11"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
