//! `server client`: a small gRPC client for people without grpcurl — generate (unary or streaming),
//! tokenize and detokenize, the server's info, list, load and unload adapters, and a `grpc.health.v1` check
//! (container health checks and exec probes). It sends the API key as `authorization: Bearer` and the adapter
//! id as the `x-adapter-id` header that adapter-affinity routers hash on.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Request;

use super::proto::{self, lora_serve_client::LoraServeClient};
use super::request_log::RequestId;
use crate::cli::to_stdout;
use crate::engine::SamplingParams;

/// Connection settings.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `http://host:port`, `https://host:port` (TLS), or `host:port` (plain HTTP/2, as grpcurl writes it).
    pub addr: String,
    pub api_key: Option<String>,
    /// PEM certificate(s) of the CA that signed the server's TLS certificate (`https://` addresses); without
    /// it the system's trusted CAs verify the server.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Each call's deadline, sent as `grpc-timeout` (`None`: no deadline, the server's own waits apply).
    pub deadline: Option<Duration>,
}

/// A generate call.
#[derive(Clone, Debug, Default)]
pub struct GenerateCall {
    pub adapter_id: String,
    pub prompt: String,
    /// `(role, content)` turns of a conversation, instead of `prompt`.
    pub messages: Vec<(String, String)>,
    /// The prompt as token ids, instead of `prompt` or `messages`.
    pub prompt_token_ids: Vec<u32>,
    pub max_new_tokens: u32,
    /// Validated (`SamplingParams::validate`). Of the settings a model may default, only those in `given`
    /// are sent: the server fills the others from the model's generation_config.json.
    pub sampling: SamplingParams,
    /// The sampling settings the caller gave.
    pub given: crate::model::GenerationDefaults,
    pub stop: Vec<String>,
    /// Keep what ended the text at its end: the stop string found, or the stop token's text.
    pub include_stop_str_in_output: bool,
    /// Leave special tokens out of the text (unset: the server's default, true).
    pub skip_special_tokens: Option<bool>,
    /// Keep only the last this many prompt tokens.
    pub truncate_prompt_tokens: Option<u32>,
    /// Encode `prompt` with the tokenizer's special tokens (unset: the server's default, true).
    pub add_special_tokens: Option<bool>,
    /// End `messages` with the generation prompt (unset: the server's default).
    pub add_generation_prompt: Option<bool>,
    /// Continue the final message of `messages` instead of starting a new assistant turn.
    pub continue_final_message: bool,
    /// More chat template variables, with `messages`.
    pub chat_template_kwargs: Option<crate::model::chat::Kwargs>,
    /// Ask for each token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`: also this many of the most likely tokens at each step.
    pub top_logprobs: u32,
    /// Score the prompt: its tokens' log-probabilities, and this many of the most likely tokens at each of
    /// their positions.
    pub prompt_logprobs: Option<u32>,
    /// Share cached prompt blocks only with requests of this salt.
    pub cache_salt: String,
    /// Structured output: what the output is confined to.
    pub structured: Option<crate::engine::structured::Constraint>,
    /// How many completions of the prompt (unset: one).
    pub n: Option<u32>,
    /// Words the output never spells as the model's tokens for them.
    pub bad_words: Vec<String>,
    /// The call's `x-request-id` (unset: the server makes one).
    pub request_id: Option<RequestId>,
}

async fn channel(t: &Target, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    // Schemes are case-insensitive (RFC 3986 §3.1): `HTTPS://` is TLS too.
    let addr = match t.addr.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => format!("http://{}", t.addr),
    };
    let mut endpoint = Channel::from_shared(addr.clone()).map_err(|e| anyhow::anyhow!("--addr `{}`: {e}", t.addr))?;
    match (addr.starts_with("https://"), &t.ca_cert) {
        (true, Some(path)) => {
            let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", path.display()))?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint =
                endpoint.tls_config(tls).map_err(|e| anyhow::anyhow!("--ca-cert {}: {}", path.display(), chain(&e)))?;
        }
        (true, None) => {
            let tls = ClientTlsConfig::new().with_native_roots();
            endpoint = endpoint.tls_config(tls).map_err(|e| anyhow::anyhow!("--addr {addr}: {}", chain(&e)))?;
        }
        (false, Some(_)) => anyhow::bail!("--ca-cert is for https:// addresses; --addr {addr} is plain HTTP/2"),
        (false, None) => {}
    }
    if let Some(d) = timeout {
        endpoint = endpoint.connect_timeout(d).timeout(d);
    }
    endpoint.connect().await.map_err(|e| anyhow::anyhow!("connecting to {addr}: {}", chain(&e)))
}

/// An error with its causes, `outer: inner: …` (tonic's transport errors say only "transport error" at the
/// top; the cause — refused, TLS handshake, DNS — is underneath).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// The largest response message the client reads. gRPC's default of 4 MiB is too small for the first message
/// of a long prompt scored with `prompt_logprobs` (~150 bytes a prompt token with 20 top tokens).
const MAX_RESPONSE_BYTES: usize = 1 << 30;

pub async fn connect(t: &Target) -> anyhow::Result<LoraServeClient<Channel>> {
    Ok(LoraServeClient::new(channel(t, None).await?).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// Asks `grpc.health.v1` about `service` (empty: the whole server) and prints the status; true when SERVING.
/// Health needs no API key, like the kubelet's own gRPC probe.
pub async fn health(t: &Target, service: &str, timeout: Duration) -> anyhow::Result<bool> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let mut client = HealthClient::new(channel(t, Some(timeout)).await?);
    let r = client.check(HealthCheckRequest { service: service.into() }).await?.into_inner();
    let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    // The exit status is the answer here (container probes): printing is best effort.
    let _ = to_stdout(format_args!("{}\n", status.as_str_name()));
    Ok(status == ServingStatus::Serving)
}

/// Wraps `msg` with the API key and, when given, the adapter-affinity header. A key no header can carry is
/// an error (`--api-key`), never a call sent without it.
pub fn request<T>(t: &Target, msg: T, adapter_id: Option<&str>) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(msg);
    if let Some(d) = t.deadline {
        r.set_timeout(d);
    }
    // Trimmed as the server reads keys; an empty one (`LORASERVE_API_KEY=`) is none.
    if let Some(k) = t.api_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
        super::auth::check_key(k).map_err(|e| anyhow::anyhow!("--api-key (LORASERVE_API_KEY): {e}"))?;
        let v = MetadataValue::try_from(format!("Bearer {k}"))
            .map_err(|e| anyhow::anyhow!("--api-key (LORASERVE_API_KEY): {e}"))?;
        r.metadata_mut().insert("authorization", v);
    }
    // An id no header can carry (not ASCII) goes in the body only: the server then names what is wrong with
    // the id itself, not with a header the user never set.
    if let Some(id) = adapter_id.filter(|i| !i.is_empty() && i.is_ascii()) {
        if let Ok(v) = MetadataValue::try_from(id) {
            r.metadata_mut().insert(super::ADAPTER_ID_HEADER, v);
        }
    }
    Ok(r)
}

impl GenerateCall {
    fn to_proto(&self) -> proto::GenerateRequest {
        let s = &self.sampling;
        proto::GenerateRequest {
            adapter_id: self.adapter_id.clone(),
            prompt: self.prompt.clone(),
            prompt_token_ids: self.prompt_token_ids.clone(),
            max_new_tokens: self.max_new_tokens,
            temperature: self.given.temperature,
            top_p: self.given.top_p,
            top_k: self.given.top_k,
            seed: s.seed,
            stop: self.stop.clone(),
            include_stop_str_in_output: self.include_stop_str_in_output,
            skip_special_tokens: self.skip_special_tokens,
            bad_words: self.bad_words.clone(),
            truncate_prompt_tokens: self.truncate_prompt_tokens,
            add_special_tokens: self.add_special_tokens,
            add_generation_prompt: self.add_generation_prompt,
            continue_final_message: self.continue_final_message,
            repetition_penalty: self.given.repetition_penalty,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            min_p: self.given.min_p,
            min_tokens: s.min_tokens,
            ignore_eos: s.ignore_eos,
            stop_token_ids: s.stop_token_ids.clone(),
            prompt_logprobs: self.prompt_logprobs,
            logit_bias: s.logit_bias.iter().copied().collect(),
            allowed_token_ids: s.allowed_token_ids.clone(),
            messages: chat_messages(&self.messages),
            chat_template_kwargs: kwargs_text(self.chat_template_kwargs.as_ref()),
            cache_salt: self.cache_salt.clone(),
            structured_output: self.structured.as_ref().map(structured_output),
            n: self.n,
        }
    }
}

/// `--message ROLE=TEXT` turns as the request's messages.
fn chat_messages(messages: &[(String, String)]) -> Vec<proto::ChatMessage> {
    messages.iter().map(|(role, content)| proto::ChatMessage { role: role.clone(), content: content.clone() }).collect()
}

/// `--chat-template-kwargs` as the request's JSON text (empty: none).
fn kwargs_text(kwargs: Option<&crate::model::chat::Kwargs>) -> String {
    kwargs.map(|m| serde_json::Value::Object(m.clone()).to_string()).unwrap_or_default()
}

/// The request field of a structured output.
fn structured_output(c: &crate::engine::structured::Constraint) -> proto::StructuredOutput {
    use crate::engine::structured::Constraint;
    use proto::structured_output::Kind;
    let kind = match c {
        Constraint::Regex(r) => Kind::Regex(r.clone()),
        Constraint::Choice(c) => Kind::Choice(proto::Choices { choices: c.clone() }),
        Constraint::JsonSchema(s) => Kind::JsonSchema(s.clone()),
        Constraint::JsonObject => Kind::JsonObject(proto::JsonObject {}),
    };
    proto::StructuredOutput { kind: Some(kind) }
}

/// Runs a generate call, printing the text (streamed as it arrives with `stream`), or the whole response as
/// JSON with `json`. With more than one completion, each is printed whole once it is done, in index order
/// (the JSON: the shared fields and a `choices` list).
pub async fn generate(t: &Target, call: &GenerateCall, stream: bool, json: bool) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let mut req = request(t, call.to_proto(), Some(&call.adapter_id))?;
    if let Some(id) = &call.request_id {
        id.insert_into(req.metadata_mut());
    }
    let n = call.n.unwrap_or(1).max(1) as usize;
    let mut response = proto::GenerateResponse::default();
    // The id the server ran the call under (the one given, or the one it made).
    let request_id: String;
    if stream {
        let mut choices: Vec<proto::GenerateResponse> =
            (0..n as u32).map(|index| proto::GenerateResponse { index, ..Default::default() }).collect();
        let s = client.generate_stream(req).await?;
        request_id = id_of(s.metadata());
        let mut s = s.into_inner();
        while let Some(msg) = s.next().await {
            let msg = msg?;
            let i = msg.index as usize;
            anyhow::ensure!(i < n, "the server sent completion {i} of {n}");
            if !json && n == 1 {
                to_stdout(format_args!("{}", msg.text))?;
            }
            if !msg.prompt_token_ids.is_empty() {
                response.prompt_token_ids = msg.prompt_token_ids;
                response.prompt_logprobs = msg.prompt_logprobs;
                response.prompt_top_logprobs = msg.prompt_top_logprobs;
            }
            response.prompt_tokens = response.prompt_tokens.max(msg.prompt_tokens);
            response.adapter_version = msg.adapter_version;
            let c = &mut choices[i];
            c.text.push_str(&msg.text);
            c.token_ids.extend(msg.token_ids);
            c.logprobs.extend(msg.logprobs);
            c.top_logprobs.extend(msg.top_logprobs);
            c.cached_prompt_tokens = c.cached_prompt_tokens.max(msg.cached_prompt_tokens);
            c.finish_reason = msg.finish_reason;
            c.stop_reason = msg.stop_reason.or(c.stop_reason.take());
            c.seed = msg.seed.or(c.seed);
        }
        if !json && n == 1 {
            to_stdout(format_args!("\n"))?;
        }
        if let Some(c) = choices.iter().find(|c| c.finish_reason == 0) {
            anyhow::bail!("the stream ended before completion {} of {n} did", c.index);
        }
        response.choices = choices;
    } else {
        let r = client.generate(req).await?;
        request_id = id_of(r.metadata());
        response = r.into_inner();
        if response.choices.is_empty() {
            let one = proto::GenerateResponse {
                text: std::mem::take(&mut response.text),
                token_ids: std::mem::take(&mut response.token_ids),
                logprobs: std::mem::take(&mut response.logprobs),
                top_logprobs: std::mem::take(&mut response.top_logprobs),
                cached_prompt_tokens: response.cached_prompt_tokens,
                finish_reason: response.finish_reason,
                stop_reason: response.stop_reason.take(),
                seed: response.seed,
                ..Default::default()
            };
            response.choices.push(one);
        }
        anyhow::ensure!(response.choices.len() == n, "asked for {n} completions, got {}", response.choices.len());
        if !json && n == 1 {
            to_stdout(format_args!("{}\n", response.choices[0].text))?;
        }
    }
    if !json && n > 1 {
        for c in &response.choices {
            to_stdout(format_args!("[{}] {}\n", c.index, c.text))?;
        }
    }
    if json {
        let reason = |c: &proto::GenerateResponse| {
            proto::FinishReason::try_from(c.finish_reason).map(|r| r.as_str_name()).unwrap_or("UNKNOWN")
        };
        // vLLM's: the stop string, the stop token id, or null.
        let stop_reason = |c: &proto::GenerateResponse| -> serde_json::Value {
            use proto::generate_response::StopReason;
            match &c.stop_reason {
                Some(StopReason::StopString(s)) => s.as_str().into(),
                Some(StopReason::StopTokenId(id)) => (*id).into(),
                None => serde_json::Value::Null,
            }
        };
        let add_logprobs = |json: &mut serde_json::Value, c: &proto::GenerateResponse| {
            if call.logprobs {
                json["logprobs"] = c.logprobs.clone().into();
            }
            if call.top_logprobs > 0 {
                json["top_logprobs"] = top_json(&c.top_logprobs);
            }
        };
        let mut json = match response.choices.as_slice() {
            [c] => {
                let mut json = serde_json::json!({
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "prompt_tokens": response.prompt_tokens,
                    "cached_prompt_tokens": c.cached_prompt_tokens,
                    "finish_reason": reason(c),
                    "stop_reason": stop_reason(c),
                    "seed": c.seed,
                    "adapter_version": response.adapter_version,
                    "request_id": request_id,
                });
                add_logprobs(&mut json, c);
                json
            }
            all => {
                let choices: Vec<serde_json::Value> = all
                    .iter()
                    .map(|c| {
                        let mut json = serde_json::json!({
                            "index": c.index,
                            "text": c.text,
                            "token_ids": c.token_ids,
                            "cached_prompt_tokens": c.cached_prompt_tokens,
                            "finish_reason": reason(c),
                            "stop_reason": stop_reason(c),
                            "seed": c.seed,
                        });
                        add_logprobs(&mut json, c);
                        json
                    })
                    .collect();
                serde_json::json!({
                    "choices": choices,
                    "prompt_tokens": response.prompt_tokens,
                    "adapter_version": response.adapter_version,
                    "request_id": request_id,
                })
            }
        };
        if let Some(top) = call.prompt_logprobs {
            json["prompt_token_ids"] = response.prompt_token_ids.into();
            json["prompt_logprobs"] = response.prompt_logprobs.into();
            if top > 0 {
                json["prompt_top_logprobs"] = top_json(&response.prompt_top_logprobs);
            }
        }
        to_stdout(format_args!("{json}\n"))?;
    }
    Ok(())
}

/// The `x-request-id` a response came with ("" from a server that sends none).
fn id_of(meta: &tonic::metadata::MetadataMap) -> String {
    super::request_log::id_in(meta).unwrap_or_default().to_string()
}

/// `[[{"token_id", "logprob"}, …], …]`, a list per step.
fn top_json(steps: &[proto::TopLogprobs]) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = steps
        .iter()
        .map(|step| {
            let tokens = step.token_ids.iter().zip(&step.logprobs);
            tokens.map(|(id, lp)| serde_json::json!({"token_id": id, "logprob": lp})).collect()
        })
        .collect();
    steps.into()
}

pub async fn list(t: &Target) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let r = client.list_adapters(request(t, proto::ListAdaptersRequest {}, None)?).await?.into_inner();
    for a in r.adapters {
        let tier = match (a.device_resident, a.host_resident) {
            (true, _) => "device",
            (false, true) => "host",
            _ => "-",
        };
        to_stdout(format_args!(
            "{}\tversion={}\ttier={tier}\tbytes={}\tleases={}\n",
            a.adapter_id,
            if a.version.is_empty() { "-" } else { &a.version },
            a.bytes,
            a.leases
        ))?;
    }
    Ok(())
}

pub async fn load(t: &Target, id: &str) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let r = client
        .load_adapter(request(t, proto::LoadAdapterRequest { adapter_id: id.into() }, Some(id))?)
        .await?
        .into_inner();
    to_stdout(format_args!("{id}\tversion={}\n", r.adapter_version))?;
    Ok(())
}

pub async fn unload(t: &Target, id: &str) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let r = client
        .unload_adapter(request(t, proto::UnloadAdapterRequest { adapter_id: id.into() }, Some(id))?)
        .await?
        .into_inner();
    to_stdout(format_args!("{id}\twas_loaded={}\n", r.was_loaded))?;
    Ok(())
}

/// What `client tokenize` sends.
pub struct TokenizeCall {
    pub adapter_id: String,
    pub prompt: String,
    pub messages: Vec<(String, String)>,
    pub continue_final_message: bool,
    pub chat_template_kwargs: Option<crate::model::chat::Kwargs>,
    pub truncate_prompt_tokens: Option<u32>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub token_strs: bool,
}

/// Prints the ids comma-separated (as `--prompt-token-ids` takes them), or one `id<TAB>"string"` line per
/// token with `token_strs` (a JSON string: a token may be a newline), or JSON.
pub async fn tokenize(t: &Target, call: TokenizeCall, json: bool) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let msg = proto::TokenizeRequest {
        adapter_id: call.adapter_id.clone(),
        prompt: call.prompt,
        messages: chat_messages(&call.messages),
        continue_final_message: call.continue_final_message,
        chat_template_kwargs: kwargs_text(call.chat_template_kwargs.as_ref()),
        truncate_prompt_tokens: call.truncate_prompt_tokens,
        return_token_strs: call.token_strs,
        add_special_tokens: call.add_special_tokens,
        add_generation_prompt: call.add_generation_prompt,
    };
    let r = client.tokenize(request(t, msg, Some(&call.adapter_id))?).await?.into_inner();
    if json {
        let mut out = serde_json::json!({
            "token_ids": r.token_ids,
            "count": r.token_ids.len(),
            "max_model_len": r.max_model_len,
            "adapter_version": r.adapter_version,
        });
        if call.token_strs {
            out["token_strs"] = r.token_strs.into();
        }
        return to_stdout(format_args!("{out}\n"));
    }
    if call.token_strs {
        for (id, s) in r.token_ids.iter().zip(&r.token_strs) {
            to_stdout(format_args!("{id}\t{}\n", serde_json::Value::from(s.as_str())))?;
        }
        return Ok(());
    }
    let ids: Vec<String> = r.token_ids.iter().map(u32::to_string).collect();
    to_stdout(format_args!("{}\n", ids.join(",")))
}

/// Prints the text of `token_ids`.
pub async fn detokenize(t: &Target, token_ids: Vec<u32>, skip_special_tokens: Option<bool>) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let msg = proto::DetokenizeRequest { token_ids, skip_special_tokens };
    let r = client.detokenize(request(t, msg, None)?).await?.into_inner();
    to_stdout(format_args!("{}\n", r.text))
}

/// Prints the server's `Info` as JSON.
pub async fn info(t: &Target) -> anyhow::Result<()> {
    let mut client = connect(t).await?;
    let i = client.info(request(t, proto::InfoRequest {}, None)?).await?.into_inner();
    let out = serde_json::json!({
        "version": i.version,
        "model_id": i.model_id,
        "model_type": i.model_type,
        "quantization": i.quantization,
        "dtype": i.dtype,
        "device": i.device,
        "max_model_len": i.max_model_len,
        "max_total_tokens": i.max_total_tokens,
        "vocab_size": i.vocab_size,
        "eos_token_ids": i.eos_token_ids,
        "max_new_tokens": i.max_new_tokens,
        "max_n": i.max_n,
        "max_queue": i.max_queue,
        "max_batch_size": i.max_batch_size,
        "max_stop_strings": i.max_stop_strings,
        "max_stop_bytes": i.max_stop_bytes,
        "max_top_logprobs": i.max_top_logprobs,
        "max_request_bytes": i.max_request_bytes,
        "chat_template": i.chat_template,
        "prefix_caching": i.prefix_caching,
        "adapter_cache_bytes": i.adapter_cache_bytes,
        "host_adapter_cache_bytes": i.host_adapter_cache_bytes,
        "max_stop_token_ids": i.max_stop_token_ids,
        "max_bad_words": i.max_bad_words,
        "max_bad_word_bytes": i.max_bad_word_bytes,
    });
    to_stdout(format_args!("{out:#}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--deadline` goes out as the call's `grpc-timeout`; without one, none is sent.
    #[test]
    fn a_deadline_is_sent_as_grpc_timeout() {
        let t = Target { deadline: Some(Duration::from_millis(1500)), ..Default::default() };
        let r = request(&t, (), None).unwrap();
        let sent = r.metadata().get("grpc-timeout").expect("sent").to_str().unwrap().to_string();
        let (n, unit) = sent.split_at(sent.len() - 1);
        let n: u64 = n.parse().unwrap();
        let d = match unit {
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => panic!("{sent}"),
        };
        assert_eq!(d, Duration::from_millis(1500), "{sent}");
        assert!(request(&Target::default(), (), None).unwrap().metadata().get("grpc-timeout").is_none());
    }
}
