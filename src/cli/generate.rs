//! The generation commands: `generate` (one prompt, in this process) and `client` (calls to a running
//! server), with the sampling flags they share and the resolution of `--adapter`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::{to_stdout, ModelArgs};
use crate::engine::structured::{Constraint, Guide};
use crate::engine::{self, GenerateJob, SamplingParams};
use crate::model::chat::{AdapterTemplate, PromptEnd};
use crate::model::GenerationDefaults;
use crate::server::request_log::RequestId;

/// Sampling flags shared by `generate` and `client generate` (the server takes them per request). Negative
/// numbers parse, so that an out-of-range value gets the message naming its range.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("structured").multiple(false)))]
pub struct SamplingArgs {
    /// 0 = greedy. Unset: the model's generation_config.json default (--generation-config auto), else 0.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]. Unset: the model's default, else 1.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// 0 = off. Unset: the model's default, else 0.
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Seeds sampling (the same seed, the same tokens); without it each run samples differently
    #[arg(long)]
    pub seed: Option<u64>,
    /// Above 0, 1 = off: a positive logit of a token in the prompt or output is divided by it, a negative
    /// one multiplied by it. Unset: the model's default, else 1.
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// In [-2, 2]: subtracted from a token's logit per occurrence in the output.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// In [-2, 2]: subtracted from the logit of every token in the output.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// In [0, 1], 0 = off: after top-p, drop tokens less likely than this times the most likely one. Unset:
    /// the model's default, else 0.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// No EOS (and no stop string) before this many tokens; at most --max-new-tokens.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: u32,
    /// Go on past EOS tokens, to --max-new-tokens (or a stop string).
    #[arg(long)]
    pub ignore_eos: bool,
    /// A token id that ends generation as EOS does (repeatable).
    #[arg(long = "stop-token-id")]
    pub stop_token_ids: Vec<u32>,
    /// `ID=BIAS`: add BIAS (in [-100, 100]) to token ID's logit (repeatable; OpenAI's logit_bias).
    #[arg(long = "logit-bias", value_name = "ID=BIAS", value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Only these token ids can be generated (repeatable; vLLM's allowed_token_ids).
    #[arg(long = "allowed-token-id", value_name = "ID")]
    pub allowed_token_ids: Vec<u32>,
    /// A word the output never spells as the model's tokens for it (repeatable; vLLM's bad_words).
    #[arg(long = "bad-word", value_name = "WORD")]
    pub bad_words: Vec<String>,
    /// Structured output: the whole output matches this regex (Rust regex syntax).
    #[arg(long, group = "structured", value_name = "REGEX")]
    pub regex: Option<String>,
    /// Structured output: the output is one of these texts (repeatable).
    #[arg(long = "choice", group = "structured", value_name = "TEXT")]
    pub choices: Vec<String>,
    /// Structured output: the output is JSON valid against this JSON Schema (its text, or @FILE).
    #[arg(long, group = "structured", value_name = "SCHEMA")]
    pub json_schema: Option<String>,
    /// Structured output: the output is a JSON object.
    #[arg(long, group = "structured")]
    pub json_object: bool,
}

/// What to continue: raw text or a conversation (shared by `generate` and `client generate`).
#[derive(Args, Debug, Clone)]
pub struct PromptArgs {
    /// The prompt (encoded with the tokenizer's special tokens, e.g. BOS, unless --add-special-tokens false).
    #[arg(long, required_unless_present_any = ["messages", "prompt_token_ids"], conflicts_with_all = ["messages", "prompt_token_ids"])]
    pub prompt: Option<String>,
    /// The prompt as token ids, run as they are (comma-separated: --prompt-token-ids 1,415,2502), instead of
    /// --prompt or --message (vLLM's TokensPrompt).
    #[arg(long, value_name = "IDS", value_delimiter = ',', conflicts_with = "messages")]
    pub prompt_token_ids: Vec<u32>,
    /// `ROLE=TEXT`: one turn of a conversation to continue instead of --prompt (repeatable, in order),
    /// rendered with the chat template that applies (the adapter's own, else `--chat-template`, else the
    /// model's) and its generation prompt (unless --add-generation-prompt false or --continue-final-message),
    /// e.g. --message system=Be\ brief. --message user=Hi.
    #[arg(long = "message", id = "messages", value_name = "ROLE=TEXT", value_parser = parse_message)]
    pub messages: Vec<(String, String)>,
    /// Continue the final --message instead of starting a new assistant turn (an answer's prefill, e.g.
    /// --message assistant='{"a": ').
    #[arg(long, requires = "messages", conflicts_with = "prompt")]
    pub continue_final_message: bool,
    /// At most N prompt tokens, as vLLM's truncate_prompt_tokens cuts a longer prompt: --prompt keeps its BOS
    /// (unless --add-special-tokens false) and its text's last tokens, --message turns their last tokens. At
    /// least 1 (with --prompt and its BOS, more than the tokens its tokenizer puts first: 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub truncate_prompt_tokens: Option<u32>,
    /// A JSON object of more chat template variables (vLLM's chat_template_kwargs), e.g.
    /// '{"enable_thinking": false}'. Each must be one the template reads.
    #[arg(long, value_name = "JSON", requires = "messages", conflicts_with = "prompt", value_parser = crate::model::chat::parse_kwargs)]
    pub chat_template_kwargs: Option<crate::model::chat::Kwargs>,
    /// `false` renders --message turns as they are, without the template's generation prompt (a new assistant
    /// turn; transformers' and vLLM's add_generation_prompt). Default true, unless --continue-final-message.
    #[arg(long, value_name = "BOOL")]
    pub add_generation_prompt: Option<bool>,
    /// `false` encodes --prompt without the tokenizer's special tokens (its BOS): for a prompt that writes
    /// them itself (vLLM's add_special_tokens). Default true.
    #[arg(long, value_name = "BOOL")]
    pub add_special_tokens: Option<bool>,
}

/// `--message ROLE=TEXT` (the text may hold `=`; the role may not be empty).
fn parse_message(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((role, text)) if !role.trim().is_empty() => Ok((role.trim().to_string(), text.to_string())),
        _ => Err(format!("`{s}`: expected ROLE=TEXT, e.g. user=Hello")),
    }
}

impl PromptArgs {
    /// The conversation flags need a conversation (clap's `requires` does not see a `--prompt-token-ids`
    /// given instead).
    fn check(&self) -> Result<()> {
        if self.add_generation_prompt.is_some() && self.messages.is_empty() {
            bail!("--add-generation-prompt needs --message (a conversation)");
        }
        if let Err(why) = PromptEnd::of(self.add_generation_prompt, self.continue_final_message) {
            bail!("--add-generation-prompt true with --continue-final-message: {why}");
        }
        if self.add_special_tokens.is_some() && self.prompt.is_none() {
            bail!("--add-special-tokens applies to --prompt (a conversation's special tokens are its chat template's, ids run as given)");
        }
        if self.messages.is_empty() {
            for (given, flag) in [
                (self.continue_final_message, "--continue-final-message"),
                (self.chat_template_kwargs.is_some(), "--chat-template-kwargs"),
            ] {
                if given {
                    bail!("{flag} needs --message (a conversation)");
                }
            }
        }
        Ok(())
    }

    /// The prompt's token ids for this model (truncated as asked); a conversation is rendered with
    /// `adapter`'s chat template when it brings one, else the model's.
    fn ids(&self, tok: &crate::model::Tokenizer, adapter: Option<&AdapterTemplate>, vocab: usize) -> Result<Vec<u32>> {
        let (mut ids, prefix) = match &self.prompt {
            Some(prompt) => match self.add_special_tokens.unwrap_or(true) {
                true => (tok.encode(prompt)?, tok.text_prefix()),
                false => (tok.encode_with(prompt, false)?, &[][..]),
            },
            None if !self.prompt_token_ids.is_empty() => {
                // As the server checks them: every id given, before any truncation.
                if let Some(id) = self.prompt_token_ids.iter().find(|&&id| id as usize >= vocab) {
                    bail!("--prompt-token-ids: {id} is outside the model's vocabulary of {vocab} tokens");
                }
                (self.prompt_token_ids.clone(), &[][..])
            }
            None => {
                let model_template;
                let chat = match adapter {
                    Some(a) => a.template(tok).context("--message")?,
                    None => {
                        model_template = crate::model::ChatTemplate::new(tok).context("--message")?;
                        &model_template
                    }
                };
                let kwargs = self.chat_template_kwargs.clone().unwrap_or_default();
                chat.check_kwargs(&kwargs).map_err(|e| anyhow::anyhow!("--chat-template-kwargs {e}"))?;
                let list: Vec<_> = self
                    .messages
                    .iter()
                    .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                    .collect();
                let end = PromptEnd::of(self.add_generation_prompt, self.continue_final_message)
                    .map_err(anyhow::Error::msg)?;
                let text = chat.render_conversation(&list, end, &kwargs).context("--message")?;
                (chat.prompt_ids_of(tok, &text).context("--message")?, &[][..])
            }
        };
        if let Some(k) = self.truncate_prompt_tokens {
            engine::truncate_prompt(&mut ids, k, prefix)
                .map_err(|e| anyhow::anyhow!("--truncate-prompt-tokens {e}"))?;
        }
        // As the server checks them: a tokenizer may hold tokens the model has no embedding for.
        tok.check_in_vocab(&ids, vocab).map_err(|why| {
            anyhow::anyhow!("{}: {why}", if self.prompt.is_some() { "--prompt" } else { "--message" })
        })?;
        Ok(ids)
    }
}

/// `--logit-bias ID=BIAS`.
fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=BIAS, e.g. 42=-100"))?;
    let id = id.trim().parse().map_err(|e| format!("`{s}`: token id `{id}`: {e}"))?;
    let bias = bias.trim().parse().map_err(|e| format!("`{s}`: bias `{bias}`: {e}"))?;
    Ok((id, bias))
}

impl SamplingArgs {
    /// The structured output these flags ask for.
    pub fn constraint(&self) -> Result<Option<Constraint>> {
        Ok(if let Some(r) = &self.regex {
            Some(Constraint::Regex(r.clone()))
        } else if !self.choices.is_empty() {
            Some(Constraint::Choice(self.choices.clone()))
        } else if let Some(s) = &self.json_schema {
            Some(Constraint::JsonSchema(match s.strip_prefix('@') {
                Some(file) => std::fs::read_to_string(file).with_context(|| format!("--json-schema @{file}"))?,
                None => s.clone(),
            }))
        } else {
            self.json_object.then_some(Constraint::JsonObject)
        })
    }

    /// The sampling settings a model may default that these flags give.
    pub fn given(&self) -> GenerationDefaults {
        GenerationDefaults {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
        }
    }

    /// The validated parameters of a call of `max_new_tokens` tokens, `defaults` filling what the flags
    /// leave unset.
    pub fn params(&self, max_new_tokens: usize, defaults: GenerationDefaults) -> Result<SamplingParams> {
        let p = SamplingParams {
            seed: self.seed,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            min_tokens: self.min_tokens,
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
            logit_bias: {
                // One entry per token, the last given winning (as a JSON object's keys would).
                let map: std::collections::BTreeMap<u32, f32> = self.logit_bias.iter().copied().collect();
                map.into_iter().collect()
            },
            allowed_token_ids: self.allowed_token_ids.clone(),
            ..SamplingParams::default()
        }
        .with(self.given().or(defaults));
        p.validate().and_then(|()| p.validate_lengths(max_new_tokens)).map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: PromptArgs,
    /// Tokens to generate at most; 0 asks for as many as fit after the prompt in the model's context, up to
    /// `serve`'s default --max-new-tokens-cap (as a default server answers max_new_tokens 0).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// A LoRA adapter: a folder in PEFT layout, or an adapter id under `--adapters`.
    #[arg(long)]
    pub adapter: Option<String>,
    /// The adapters root that adapter ids are resolved in.
    #[arg(long, env = "LORASERVE_ADAPTERS", default_value = "adapters")]
    pub adapters: std::path::PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// `auto`: the sampling flags left unset take the model's generation_config.json values (as `serve`
    /// does); `none` (or vLLM's `vllm`): the neutral values (greedy).
    #[arg(long, env = "LORASERVE_GENERATION_CONFIG", value_enum, default_value = "auto")]
    pub generation_config: super::GenerationConfigArg,
    /// Print `{"prompt_token_ids": [...], "token_ids": [...], "text": "...", "seed": S}` (with --n above 1,
    /// the completions in "choices", each with its "index"); "seed" is the one it sampled with (the one drawn
    /// without --seed), null when greedy.
    #[arg(long)]
    pub json: bool,
    /// Generate N completions of the prompt (1 to 16), one after the other (the server batches them and
    /// computes the prompt once); with --seed S, completion i samples with S + i, as the server seeds them.
    /// Printed `[i] text` per completion (above 1).
    #[arg(long, value_name = "N")]
    pub n: Option<u32>,
    /// `false` spells the tokenizer's special tokens out in the text instead of leaving them out (vLLM's
    /// skip_special_tokens; e.g. Llama 3.1's <|python_tag|>).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub skip_special_tokens: bool,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Server address.
    #[arg(long, env = "LORASERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// API key (sent as `authorization: Bearer <key>`).
    #[arg(long, env = "LORASERVE_API_KEY")]
    pub api_key: Option<String>,
    /// With an `https://` address: PEM certificate of the CA that signed the server's certificate (without
    /// it, the system's trusted CAs).
    #[arg(long, env = "LORASERVE_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// The call's deadline in seconds, sent as `grpc-timeout` (grpcurl's -max-time): the server stops the
    /// call and answers DEADLINE_EXCEEDED when it passes (unset: no deadline; the server's own waits apply).
    #[arg(long, value_name = "SECONDS", value_parser = positive_seconds)]
    pub deadline: Option<std::time::Duration>,
    #[command(subcommand)]
    pub call: ClientCall,
}

/// A positive number of seconds, as a duration.
fn positive_seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs = s.parse::<f64>().map_err(|e| e.to_string())?;
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "expected a positive number of seconds".into())
}

/// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ClientCall {
    /// Generate (add --stream to stream the text as it is produced).
    Generate {
        /// Adapter id (empty: the base model).
        #[arg(long, default_value = "")]
        adapter: String,
        #[command(flatten)]
        input: PromptArgs,
        /// Tokens to generate at most; 0 asks for as many as fit (the server's cap, or the room the prompt
        /// leaves in the context and the KV cache).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: u32,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop strings (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Keep what ended the text at its end: the stop string found, or the text of the stop token
        /// (vLLM's include_stop_str_in_output).
        #[arg(long)]
        include_stop_str_in_output: bool,
        /// `false` spells the tokenizer's special tokens out in the text instead of leaving them out (vLLM's
        /// skip_special_tokens; e.g. Llama 3.1's <|python_tag|>).
        #[arg(long, value_name = "BOOL")]
        skip_special_tokens: Option<bool>,
        #[arg(long)]
        stream: bool,
        /// Print the response as JSON.
        #[arg(long)]
        json: bool,
        /// Ask for each token's log-probability under the model (printed with --json, as "logprobs"; JSON has
        /// no −∞, which prints as null).
        #[arg(long)]
        logprobs: bool,
        /// Also the N most likely tokens at each step (ids), with their log-probabilities (0 to 20; implies
        /// --logprobs; printed with --json, as "top_logprobs"; a −∞ logprob prints as null).
        #[arg(long, default_value_t = 0)]
        top_logprobs: u32,
        /// Score the prompt: each prompt token's log-probability given those before it (the first has none),
        /// and the N most likely tokens at each of those positions (0 to 20; printed with --json, as
        /// "prompt_token_ids", "prompt_logprobs" and, for N > 0, "prompt_top_logprobs"; a −∞ logprob prints
        /// as null).
        #[arg(long, value_name = "N")]
        prompt_logprobs: Option<u32>,
        /// Share cached prompt blocks only with requests of the same salt (vLLM's cache_salt; one per
        /// tenant).
        #[arg(long, default_value = "")]
        cache_salt: String,
        /// Generate N completions of the prompt (1 to 16; OpenAI's and vLLM's n; with --seed S, completion i
        /// samples with S + i). Printed once each is done, `[i] text` per completion (with --json, a
        /// "choices" list).
        #[arg(long, value_name = "N")]
        n: Option<u32>,
        /// The call's id, sent as `x-request-id` and written in the server's log line for it (unset: the
        /// server makes one; --json prints it as "request_id", and an error names it).
        #[arg(long, value_name = "ID", value_parser = RequestId::parse)]
        request_id: Option<RequestId>,
    },
    /// The token ids Generate would run for a prompt or a conversation, comma-separated (--prompt-token-ids
    /// takes them back).
    Tokenize {
        /// Adapter id, whose chat template renders --message when it brings one (empty: the base model).
        #[arg(long, default_value = "")]
        adapter: String,
        #[command(flatten)]
        input: PromptArgs,
        /// Also each token's string in the vocabulary: one `id<TAB>"string"` line per token (a JSON string,
        /// e.g. `15043<TAB>"▁Hello"`).
        #[arg(long)]
        token_strs: bool,
        /// Print the response as JSON ("token_ids", "count", "max_model_len", "adapter_version", and
        /// "token_strs" with --token-strs).
        #[arg(long)]
        json: bool,
    },
    /// The text of token ids.
    Detokenize {
        /// Comma-separated: --token-ids 1,15043
        #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
        token_ids: Vec<u32>,
        /// `true` leaves the tokenizer's special tokens (its BOS, …) out of the text; unset = false.
        #[arg(long, value_name = "BOOL")]
        skip_special_tokens: Option<bool>,
    },
    /// What the server runs and the limits a request meets, as JSON.
    Info,
    /// List adapters and their cache status.
    List,
    /// Load an adapter into the cache.
    Load { adapter: String },
    /// Drop an adapter from the cache.
    Unload { adapter: String },
    /// Ask `grpc.health.v1`; exit 0 when SERVING, 1 otherwise (for container health checks).
    Health {
        /// The service to ask about: empty for the whole server, `loraserve.v1.LoraServe` for the API,
        /// `loraserve.adapters` for the adapters folder (NOT_SERVING while a look at it hangs).
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the answer.
        #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = positive_seconds)]
        timeout: std::time::Duration,
    },
}

pub(super) fn run_client(args: ClientArgs) -> Result<()> {
    let target = crate::server::client::Target {
        addr: args.addr,
        api_key: args.api_key,
        ca_cert: args.ca_cert,
        deadline: args.deadline,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match args.call {
            ClientCall::Generate {
                adapter,
                input,
                max_new_tokens,
                sampling,
                stop,
                include_stop_str_in_output,
                skip_special_tokens,
                stream,
                json,
                logprobs,
                top_logprobs,
                prompt_logprobs,
                cache_salt,
                n,
                request_id,
            } => {
                // The flags' own mistakes, named here before any call (the server refuses them too).
                let given = sampling.given();
                let bad_words = sampling.bad_words.clone();
                let structured = sampling.constraint()?;
                // 0 asks the server for as many as fit: its length is the server's to check.
                let checked = if max_new_tokens == 0 { usize::MAX } else { max_new_tokens as usize };
                let sampling = sampling.params(checked, GenerationDefaults::default())?;
                input.check()?;
                check_n(n)?;
                let call = crate::server::client::GenerateCall {
                    adapter_id: adapter,
                    prompt: input.prompt.unwrap_or_default(),
                    prompt_token_ids: input.prompt_token_ids,
                    messages: input.messages,
                    truncate_prompt_tokens: input.truncate_prompt_tokens,
                    add_special_tokens: input.add_special_tokens,
                    add_generation_prompt: input.add_generation_prompt,
                    continue_final_message: input.continue_final_message,
                    chat_template_kwargs: input.chat_template_kwargs,
                    include_stop_str_in_output,
                    skip_special_tokens,
                    max_new_tokens,
                    sampling,
                    given,
                    stop,
                    logprobs: logprobs || top_logprobs > 0,
                    top_logprobs,
                    prompt_logprobs,
                    cache_salt,
                    structured,
                    n,
                    bad_words,
                    request_id,
                };
                crate::server::client::generate(&target, &call, stream, json).await
            }
            ClientCall::Tokenize { adapter, input, token_strs, json } => {
                input.check()?;
                if !input.prompt_token_ids.is_empty() {
                    bail!("--prompt-token-ids: tokenize takes --prompt or --message (the ids are already tokens)");
                }
                let call = crate::server::client::TokenizeCall {
                    adapter_id: adapter,
                    prompt: input.prompt.unwrap_or_default(),
                    messages: input.messages,
                    continue_final_message: input.continue_final_message,
                    chat_template_kwargs: input.chat_template_kwargs,
                    truncate_prompt_tokens: input.truncate_prompt_tokens,
                    add_special_tokens: input.add_special_tokens,
                    add_generation_prompt: input.add_generation_prompt,
                    token_strs,
                };
                crate::server::client::tokenize(&target, call, json).await
            }
            ClientCall::Detokenize { token_ids, skip_special_tokens } => {
                crate::server::client::detokenize(&target, token_ids, skip_special_tokens).await
            }
            ClientCall::Info => crate::server::client::info(&target).await,
            ClientCall::List => crate::server::client::list(&target).await,
            ClientCall::Load { adapter } => crate::server::client::load(&target, &adapter).await,
            ClientCall::Unload { adapter } => crate::server::client::unload(&target, &adapter).await,
            ClientCall::Health { service, timeout } => {
                if crate::server::client::health(&target, &service, timeout).await? {
                    Ok(())
                } else {
                    std::process::exit(1)
                }
            }
        }
    })
}

/// The flag that gave `c`.
fn flag_of(c: &Constraint) -> &'static str {
    match c {
        Constraint::Regex(_) => "regex",
        Constraint::Choice(_) => "choice",
        Constraint::JsonSchema(_) => "json-schema",
        Constraint::JsonObject => "json-object",
    }
}

/// `--adapter`: a folder holding `adapter_config.json`, else an adapter id under the adapters root.
fn resolve_adapter(arg: &str, root: &std::path::Path) -> Result<std::path::PathBuf> {
    let as_dir = std::path::Path::new(arg);
    if as_dir.join("adapter_config.json").is_file() {
        return Ok(as_dir.to_path_buf());
    }
    if as_dir.is_file() {
        bail!("--adapter {arg}: is a file; give the adapter's folder (the one holding adapter_config.json)");
    }
    let path_like =
        as_dir.is_absolute() || [".", ".."].contains(&arg) || arg.starts_with("./") || arg.starts_with("../");
    match as_dir.try_exists() {
        Ok(false) if path_like => bail!("--adapter {arg}: no such folder"),
        Err(e) if path_like => bail!("--adapter {arg}: {e}"),
        _ => {}
    }
    // A folder that is not also an id under the root (`ads/sub` with no `adapters/ads/sub`) was meant as a path.
    if as_dir.is_dir() && (path_like || !root.join(arg).is_dir()) {
        bail!("--adapter {arg}: {} is missing", as_dir.join("adapter_config.json").display());
    }
    let store = crate::lora::store::AdapterStore::open(root)?;
    Ok(store.resolve(arg)?)
}

/// `--n`: 1 to the server's most completions.
fn check_n(n: Option<u32>) -> Result<()> {
    let max_n = crate::server::completions::MAX_N;
    match n {
        Some(n) if !(1..=max_n).contains(&n) => bail!("--n {n}: expected 1 to {max_n} completions"),
        _ => Ok(()),
    }
}

pub(super) fn run_generate(args: GenerateArgs) -> Result<()> {
    args.input.check()?;
    check_n(args.n)?;
    if args.input.prompt.as_ref().is_some_and(String::is_empty) {
        bail!("--prompt is empty");
    }
    // 0 (as many as fit) is checked against the room the prompt leaves, once it is known.
    let checked = if args.max_new_tokens == 0 { usize::MAX } else { args.max_new_tokens };
    // The flags' own mistakes before the model loads; then the model's defaults for what they leave unset.
    args.sampling.params(checked, GenerationDefaults::default())?;
    let loaded = args.model.load()?;
    let config = loaded.model.config();
    let defaults = match args.generation_config {
        super::GenerationConfigArg::Auto => config.sampling_defaults().map_err(|e| {
            anyhow::anyhow!("{e} (run with --generation-config none to leave the model's sampling defaults out)")
        })?,
        super::GenerationConfigArg::None => GenerationDefaults::default(),
    };
    let mut sampling = args.sampling.params(checked, defaults)?;
    sampling.bad_words = engine::bad_words::bad_words_ids(&loaded.tokenizer, &args.sampling.bad_words)
        .map_err(|e| anyhow::anyhow!("{e} (--bad-word)"))?;
    let structured = args.sampling.constraint()?;
    let ctx = config.max_position_embeddings;
    if let Some(k) = args.input.truncate_prompt_tokens.filter(|&k| k as usize > ctx) {
        bail!("--truncate-prompt-tokens {k}: more than the model's context of {ctx} positions");
    }
    let adapter = match &args.adapter {
        None => None,
        Some(a) => {
            let dir = resolve_adapter(a, &args.adapters)?;
            let mut adapter = crate::lora::peft::load_dir(&dir, &loaded.model.lora_layout(), loaded.model.device())?;
            adapter.weights.template = AdapterTemplate::read(&dir, a)?.map(std::sync::Arc::new);
            Some(adapter)
        }
    };
    let template = adapter.as_ref().and_then(|a| a.weights.template.as_deref());
    let prompt_ids = args.input.ids(&loaded.tokenizer, template, config.vocab_size)?;
    let tokenizer = std::sync::Arc::new(loaded.tokenizer);
    if let Some(c) = structured {
        let guide = Guide::compile(&c, tokenizer.clone()).map_err(|e| anyhow::anyhow!("--{}: {e}", flag_of(&c)))?;
        sampling.guide = Some(std::sync::Arc::new(guide));
    }
    sampling.validate_model(config.vocab_size, &config.eos_token_ids).map_err(anyhow::Error::msg)?;
    let prompt = prompt_ids.len();
    let max_new_tokens = match args.max_new_tokens {
        0 if prompt >= ctx => {
            bail!("--max-new-tokens 0: {prompt} prompt tokens leave no room for a new token in the model's context of {ctx} positions")
        }
        0 => {
            let room = (ctx - prompt).min(crate::server::service::Limits::default().max_new_tokens_cap as usize);
            sampling
                .validate_lengths(room)
                .map_err(|e| anyhow::anyhow!("{e}: what fits after {prompt} prompt tokens"))?;
            room
        }
        n if prompt + n > ctx => {
            bail!("prompt ({prompt} tokens) + --max-new-tokens ({n}) exceeds the model's context of {ctx} positions")
        }
        n => n,
    };
    let eos = &loaded.model.config().eos_token_ids;
    let n = args.n.unwrap_or(1);
    let mut completions = Vec::with_capacity(n as usize);
    for i in 0..n {
        // Completion i as the server runs it.
        let job = GenerateJob {
            prompt_ids: &prompt_ids,
            max_new_tokens,
            sampling: sampling.for_completion(u64::from(i)),
            stop_at_eos: true,
            adapter: adapter.as_ref().map(|a| &a.weights),
        };
        let out = engine::generate(&loaded.model, &job)?;
        // The token that ended the answer (EOS, a stop token) stays out of its text, as the server leaves it out.
        let text_ids = match out.token_ids.split_last() {
            Some((&last, rest)) if job.sampling.ends_at(last, eos).is_some() => rest,
            _ => &out.token_ids[..],
        };
        let text = tokenizer.decode_with(text_ids, args.skip_special_tokens)?;
        completions.push((out.token_ids, text, out.seed));
    }
    match (args.json, n > 1) {
        (true, false) => {
            let (token_ids, text, seed) = &completions[0];
            let v =
                serde_json::json!({"prompt_token_ids": prompt_ids, "token_ids": token_ids, "text": text, "seed": seed});
            to_stdout(format_args!("{v}\n"))?;
        }
        (true, true) => {
            let choices: Vec<serde_json::Value> = (completions.iter().enumerate())
                .map(|(i, (ids, text, seed))| {
                    serde_json::json!({"index": i, "token_ids": ids, "text": text, "seed": seed})
                })
                .collect();
            let v = serde_json::json!({"prompt_token_ids": prompt_ids, "choices": choices});
            to_stdout(format_args!("{v}\n"))?;
        }
        (false, false) => to_stdout(format_args!("{}\n", completions[0].1))?,
        (false, true) => {
            for (i, (_, text, _)) in completions.iter().enumerate() {
                to_stdout(format_args!("[{i}] {text}\n"))?;
            }
        }
    }
    Ok(())
}
