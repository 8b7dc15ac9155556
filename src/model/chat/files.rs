//! What a tokenizer folder says about chat, read as transformers 5 reads it: the chat template
//! (`tokenizer_config.json`'s `chat_template`, overridden whole by `chat_template.jinja` and
//! `additional_chat_templates/<name>.jinja`), the named special tokens chat templates see, and the added tokens.
//! The model's folder and an adapter's folder are read alike: an adapter saved with its tokenizer brings the
//! template it was trained with.

use std::path::Path;

use serde_json::Value;

use crate::model::TokenizerError;

/// A folder's chat template, special tokens and added tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatFiles {
    /// The chat template (the one named "default"), when there is one.
    pub template: Option<String>,
    /// The names of the chat templates when none is named "default": then `template` is `None`, and
    /// conversations are refused, as transformers refuses to pick one.
    pub names: Vec<String>,
    /// The template named "tool_use", beside a "default" one: transformers renders with it when the call
    /// gives `tools` (here, `chat_template_kwargs` with a `tools` that is not null).
    pub tool_use: Option<String>,
    /// The named special tokens `tokenizer_config.json` sets (`("bos_token", "<s>")`, …, a model's own
    /// `image_token`s and `extra_special_tokens` too), which chat templates see as variables.
    pub special_tokens: Vec<(String, String)>,
    /// `tokenizer_config.json`'s `added_tokens_decoder`: each added token's id and text.
    pub added_tokens: Vec<(u32, String)>,
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`.
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// The folder of named templates.
const EXTRA: &str = "additional_chat_templates";

/// The template files a folder may hold besides `tokenizer_config.json`, as paths relative to it (those of
/// `additional_chat_templates/` sorted by name). Adapter versions stamp them. A folder that cannot be listed
/// (`additional_chat_templates/`, the error's path) is an error, never a folder without templates.
pub fn template_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = vec!["chat_template.jinja".to_string()];
    let entries = match std::fs::read_dir(dir.join(EXTRA)) {
        Ok(entries) => entries,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            return Ok(out)
        }
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(name) = name.to_str().filter(|n| n.ends_with(".jinja")) {
            names.push(name.to_string());
        }
    }
    names.sort();
    out.extend(names.into_iter().map(|n| format!("{EXTRA}/{n}")));
    Ok(out)
}

/// A failed read of `file`: what the operator must fix (permissions, not UTF-8, a folder) is `Load`, anything
/// else (EIO, EMFILE, a stale NFS handle) `Read`, which may pass.
fn error_of(file: &Path, e: std::io::Error) -> TokenizerError {
    use std::io::ErrorKind::{InvalidData, InvalidInput, IsADirectory, PermissionDenied};
    let (file, reason) = (file.display().to_string(), e.to_string());
    match e.kind() {
        PermissionDenied | InvalidData | InvalidInput | IsADirectory => TokenizerError::Load { file, reason },
        _ => TokenizerError::Read { file, reason },
    }
}

impl ChatFiles {
    /// Reads `dir`'s `tokenizer_config.json` and template files; each is optional.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let read = |file: &Path| match crate::input::read_to_string(file) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(error_of(file, e)),
        };
        let config_file = dir.join("tokenizer_config.json");
        let mut files = match read(&config_file)? {
            Some(text) => Self::from_config(&text, &config_file.display().to_string())?,
            None => ChatFiles::default(),
        };
        // Template files win over `tokenizer_config.json`'s `chat_template` whole, as transformers 5 loads them:
        // `chat_template.jinja` is "default", `additional_chat_templates/<name>.jinja` add names (a "default"
        // there replaces it). With a "default", that is the chat template; without one, only names.
        let mut named = Vec::new();
        for rel in template_files(dir).map_err(|e| error_of(&dir.join(EXTRA), e))? {
            if let Some(template) = read(&dir.join(&rel))? {
                let name = rel.strip_prefix(&format!("{EXTRA}/")).unwrap_or("default.jinja");
                named.push((name.trim_end_matches(".jinja").to_string(), template));
            }
        }
        if !named.is_empty() {
            files.use_named(named);
        }
        Ok(files)
    }

    /// What `tokenizer_config.json`'s text (from `file`) says.
    pub fn from_config(text: &str, file: &str) -> Result<Self, TokenizerError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| TokenizerError::Load { file: file.to_string(), reason: format!("invalid JSON: {e}") })?;
        let bad = |reason: String| TokenizerError::Load { file: file.to_string(), reason };
        if !v.is_object() {
            return Err(bad("top level is not an object".to_string()));
        }
        let mut files = ChatFiles::default();
        match v.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => files.template = Some(s.clone()),
            // Named templates: the one named "default" is the chat template.
            Some(Value::Array(list)) => {
                let mut named = Vec::new();
                for t in list {
                    let field = |k: &str| t.get(k).and_then(|x| x.as_str());
                    let (Some(name), Some(template)) = (field("name"), field("template")) else {
                        return Err(bad(format!(
                            "`chat_template`: expected entries {{\"name\", \"template\"}}, got {t}"
                        )));
                    };
                    named.push((name.to_string(), template.to_string()));
                }
                files.use_named(named);
            }
            Some(other) => {
                return Err(bad(format!(
                    "`chat_template`: expected a string or a list of named templates, got {other}"
                )))
            }
        }
        let token_str = |t: &Value| match t {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        // As transformers 5 names them: the standard seven, then a model's own `*_token` strings and
        // `extra_special_tokens` given as a map of names (a list names none).
        let mut special: Vec<(String, String)> =
            SPECIAL_TOKENS.iter().filter_map(|&k| v.get(k).and_then(token_str).map(|t| (k.to_string(), t))).collect();
        if let Some(o) = v.as_object() {
            for (k, t) in o {
                if k.ends_with("_token") && !SPECIAL_TOKENS.contains(&k.as_str()) {
                    if let Some(t) = t.as_str() {
                        special.push((k.clone(), t.to_string()));
                    }
                }
            }
        }
        if let Some(extra) = v.get("extra_special_tokens").and_then(|e| e.as_object()) {
            for (k, t) in extra {
                if let Some(t) = token_str(t) {
                    special.retain(|(name, _)| name != k);
                    special.push((k.clone(), t));
                }
            }
        }
        files.special_tokens = special;
        if let Some(added) = v.get("added_tokens_decoder").and_then(|a| a.as_object()) {
            for (id, t) in added {
                let (Ok(id), Some(content)) = (id.parse::<u32>(), token_str(t)) else {
                    return Err(bad(format!("`added_tokens_decoder`: expected id → {{\"content\"}}, got `{id}`: {t}")));
                };
                files.added_tokens.push((id, content));
            }
        }
        Ok(files)
    }

    /// Named templates, as transformers resolves them: the last one named "default" is the chat template,
    /// and the last one named "tool_use" the one for calls with tools; without a "default" there is none,
    /// and the names are kept for the refusal.
    fn use_named(&mut self, named: impl IntoIterator<Item = (String, String)>) {
        let (mut default, mut tool_use, mut names) = (None, None, Vec::new());
        for (name, template) in named {
            match name.as_str() {
                "default" => default = Some(template),
                "tool_use" => {
                    tool_use = Some(template);
                    names.push(name);
                }
                _ => names.push(name),
            }
        }
        self.names = if default.is_some() { Vec::new() } else { names };
        self.tool_use = default.is_some().then_some(tool_use).flatten();
        self.template = default;
    }

    /// Replaces the folder's templates with `template` (`--chat-template`), for calls with tools too.
    pub fn set_template(&mut self, template: String) {
        self.template = Some(template);
        self.names.clear();
        self.tool_use = None;
    }

    /// Whether the folder names a chat template of its own (or only named ones, which is a choice too).
    pub fn has_template(&self) -> bool {
        self.template.is_some() || !self.names.is_empty()
    }

    /// The named special token `name` (`"eos_token"`, …), when set.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(k, _)| k == name).map(|(_, t)| t.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5 saves the chat template as `chat_template.jinja`: it is read, and wins over the
    /// `tokenizer_config.json` key; named templates without a "default" leave none.
    #[test]
    fn template_files_win_over_the_config_key() {
        let dir = tempfile::tempdir().unwrap();
        let read = || ChatFiles::from_dir(dir.path()).unwrap();
        assert_eq!(read(), ChatFiles::default(), "an empty folder says nothing");
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "from config"}"#).unwrap();
        assert_eq!(read().template.as_deref(), Some("from config"));
        std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
        assert_eq!(read().template.as_deref(), Some("from file"));
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        std::fs::create_dir(dir.path().join("additional_chat_templates")).unwrap();
        std::fs::write(dir.path().join("additional_chat_templates/tool_use.jinja"), "T").unwrap();
        assert_eq!((read().template, read().names), (None, vec!["tool_use".to_string()]));
        assert!(read().has_template());
        std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
        assert_eq!(read().template.as_deref(), Some("from file"));
        assert_eq!(read().tool_use.as_deref(), Some("T"), "beside a default, tool_use is for calls with tools");
        std::fs::write(dir.path().join("additional_chat_templates/default.jinja"), "D").unwrap();
        assert_eq!((read().template.as_deref(), read().tool_use.as_deref()), (Some("D"), Some("T")));
        assert_eq!(
            template_files(dir.path()).unwrap(),
            [
                "chat_template.jinja",
                "additional_chat_templates/default.jinja",
                "additional_chat_templates/tool_use.jinja"
            ]
        );
    }

    /// The special tokens chat templates see: the standard ones (a string or an AddedToken's content), a
    /// model's own `*_token` strings, and `extra_special_tokens` given as a map; the added tokens by id.
    #[test]
    fn special_and_added_tokens_as_transformers_names_them() {
        let config = r#"{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
            "image_token": "<img>", "add_bos_token": true, "pad_token": null,
            "extra_special_tokens": {"audio_token": "<au>", "image_token": "<image>"},
            "added_tokens_decoder": {"0": {"content": "<s>", "special": true}, "7": {"content": "[PAD]"}}}"#;
        let f = ChatFiles::from_config(config, "tc.json").unwrap();
        let names: Vec<(&str, &str)> = f.special_tokens.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            names,
            [("bos_token", "<s>"), ("eos_token", "</s>"), ("audio_token", "<au>"), ("image_token", "<image>")]
        );
        assert_eq!(f.special_token("eos_token"), Some("</s>"));
        assert_eq!(f.added_tokens, [(0, "<s>".to_string()), (7, "[PAD]".to_string())]);
        let e = ChatFiles::from_config(r#"{"added_tokens_decoder": {"x": {}}}"#, "tc.json").unwrap_err();
        assert!(e.to_string().contains("tc.json") && e.to_string().contains("`added_tokens_decoder`"), "{e}");
    }

    /// A list of named templates: the one named "default" is the chat template; without one, none is (and
    /// the names are kept for the error); malformed forms are refused naming the key.
    #[test]
    fn named_chat_templates() {
        let load = |config: &str| ChatFiles::from_config(config, "tc.json");
        let t =
            load(r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#)
                .unwrap();
        assert_eq!((t.template.as_deref(), t.names.len(), t.tool_use.as_deref()), (Some("D"), 0, Some("T")));
        let t = load(r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]}"#)
            .unwrap();
        assert_eq!((t.template, t.names, t.tool_use), (None, vec!["tool_use".to_string(), "rag".to_string()], None));
        for bad in [r#"{"chat_template": 5}"#, r#"{"chat_template": [{"name": "default"}]}"#, "{", "[]", "null"] {
            let e = load(bad).expect_err("refused").to_string();
            assert!(e.contains("tc.json"), "{e}");
        }
    }
}
