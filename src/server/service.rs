//! The LoraServe gRPC service (proto types stay in `server/`: here, `conversation.rs`, `client.rs`). Each
//! request is validated once, at the edge, into a [`ValidRequest`] (fields checked, adapter leased, prompt
//! tokenized, deadline parsed); the engine streams [`Event`](crate::engine::Event)s back, which become
//! `GenerateResponse` messages (`completions.rs`). A request for `n` completions is `n` sequences in the
//! engine, answered as one call.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::arrival::Arrival;
use super::completions::{self, Completions, Events, StreamTagger, MAX_N};
use super::counting::HandlerSeen;
use super::deadline::{by_deadline, ended_by, not_past, within, CallDeadline};
use super::prompt::PromptInput;
use super::proto::{self, lora_serve_server::LoraServe};
use super::request_log::{self, RequestId, RequestLog};
use super::status::{self, invalid};
use super::tokenize;
use crate::engine::structured::{Constraint, Guide, Guides};
use crate::engine::{Engine, SamplingParams, ValidRequest};
use crate::lora::cache::{AdapterCache, AdapterLease};
use crate::model::{ChatError, ChatTemplate, GenerationDefaults, Tokenizer};
use crate::telemetry as t;

/// Limits applied at validation.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_new_tokens_cap: u32,
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_new_tokens_cap: 4096, max_stop_strings: 16, max_stop_bytes: 256 }
    }
}

/// What the service needs once the model is loaded.
pub struct Ready {
    pub engine: Arc<Engine>,
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template, for requests that give `messages`; why there is none otherwise.
    pub chat: Result<ChatTemplate, ChatError>,
    pub cache: AdapterCache,
    /// The model's context length (positions).
    pub context: usize,
    /// The model's vocabulary size (logits per row).
    pub vocab: usize,
    /// The model's end-of-sequence tokens.
    pub eos: Vec<u32>,
    /// The sampling settings of requests that leave them unset (the model's generation_config.json, unless
    /// `--generation-config none`).
    pub defaults: GenerationDefaults,
    /// Structured output's compiled constraints, the latest kept.
    pub guides: Arc<Guides>,
    /// Where conversations render: worker processes, at most one rendering a core (`render.rs`).
    pub renderer: super::render::Renderer,
    /// Structured-output compiles at once: one a core.
    pub compiles: Arc<tokio::sync::Semaphore>,
    /// Where request text (prompts, rendered conversations) is encoded: threads of their own, one a core.
    pub encoders: super::encoders::Encoders,
    /// The `Info` RPC's answer.
    pub info: proto::InfoResponse,
}

/// Shared by the service and the server's lifecycle.
pub struct ServiceState {
    pub ready: OnceLock<Ready>,
    pub draining: AtomicBool,
    pub limits: Limits,
}

#[derive(Clone)]
pub struct Service {
    pub state: Arc<ServiceState>,
}

/// The compiled guide of a request's structured output (compiled off the runtime's threads: a large JSON
/// Schema takes a while), within the request's deadline (the compile goes on, and its guide is kept, for a
/// retry).
async fn guide_of(ready: &Ready, s: proto::StructuredOutput, deadline: Option<Instant>) -> Result<Arc<Guide>, Status> {
    use proto::structured_output::Kind;
    let constraint = match s.kind {
        None => return Err(invalid("structured_output", "give one of regex, choice, json_schema and json_object")),
        Some(Kind::Regex(r)) => Constraint::Regex(r),
        Some(Kind::Choice(c)) => Constraint::Choice(c.choices),
        Some(Kind::JsonSchema(j)) => Constraint::JsonSchema(j),
        Some(Kind::JsonObject(_)) => Constraint::JsonObject,
    };
    let field = constraint.field();
    let pending = match ready.guides.lookup(&constraint) {
        Ok(done) => return done.map_err(|e| invalid(field, e)),
        Err(pending) => pending,
    };
    // At most one compile a core: a compile goes on past its request's deadline (for the retry), so
    // without a bound, requests that leave at once could start any number (each up to the automaton's
    // limit in memory).
    let (guides, turns) = (ready.guides.clone(), ready.compiles.clone());
    let compile = async move {
        let turn = turns.acquire_owned().await.expect("never closed");
        tokio::task::spawn_blocking(move || {
            let _turn = turn; // held until the compile ends, also past a deadline that left it
            guides.compile(&constraint, &pending)
        })
        .await
    };
    let compiled = match deadline {
        Some(d) => within(d, compile)
            .await
            .ok_or_else(|| Status::deadline_exceeded(format!("deadline exceeded compiling {field}")))?,
        None => compile.await,
    };
    compiled.map_err(|e| Status::internal(format!("compiling {field}: {e}")))?.map_err(|e| invalid(field, e))
}

/// The affinity header must agree with the body: a router hashed on it, so a mismatch means the request may
/// sit on a replica whose cache was never warmed for its adapter. Absent is fine (the body is the truth).
fn check_adapter_header(meta: &tonic::metadata::MetadataMap, adapter_id: &str) -> Result<(), Status> {
    let Some(h) = meta.get(super::ADAPTER_ID_HEADER) else { return Ok(()) };
    let h = h.to_str().map_err(|_| invalid(super::ADAPTER_ID_HEADER, "not ASCII"))?;
    if h != adapter_id {
        return Err(invalid(
            super::ADAPTER_ID_HEADER,
            format!("header `{h}` disagrees with adapter_id `{adapter_id}`"),
        ));
    }
    Ok(())
}

/// Records `loraserve_requests_total{rpc, code}`.
pub(crate) fn count(rpc: &'static str, code: tonic::Code) {
    metrics::counter!(t::REQUESTS_TOTAL, "rpc" => rpc, "code" => status::code_label(code)).increment(1);
}

/// Counts the call's answer, its status message [`status::bound`]ed for the header that carries it.
fn counted<T>(rpc: &'static str, r: Result<T, Status>) -> Result<T, Status> {
    count(rpc, r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok));
    r.map_err(status::bound)
}

/// Counts a call whose handler is dropped before it finished (the client cancelled or went away) as
/// CANCELLED, or DEADLINE_EXCEEDED when it left close to its deadline ([`ended_by`]).
struct CancelCount {
    rpc: &'static str,
    armed: bool,
    /// Past it, a call dropped was ended by its deadline ([`CallDeadline::timed_out_from`]).
    timed_out_from: Option<Instant>,
}

impl CancelCount {
    fn new(rpc: &'static str, timed_out_from: Option<Instant>) -> Self {
        CancelCount { rpc, armed: true, timed_out_from }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelCount {
    fn drop(&mut self) {
        if self.armed {
            count(self.rpc, ended_by(self.timed_out_from));
        }
    }
}

/// The handler's deadline of `req`, and from when its client leaving counts as timed out (`deadline.rs`).
fn deadline_of<T>(req: &Request<T>) -> (Result<Option<Instant>, Status>, Option<Instant>) {
    match CallDeadline::of(req.metadata().as_ref(), req.extensions().get::<Arrival>()) {
        Ok(Some(d)) => (Ok(d.handler()), d.timed_out_from()),
        Ok(None) => (Ok(None), None),
        Err(s) => (Err(s), None),
    }
}

/// A unary call's frame: marks the request seen, reads its deadline, runs `work` with the request, its
/// deadline (or why the deadline cannot be read) and from when its client leaving counts as timed out, and
/// counts the answer once, or CANCELLED / DEADLINE_EXCEEDED when the call is dropped before it answers
/// ([`CancelCount`]).
async fn unary<T, R, F: std::future::Future<Output = Result<R, Status>>>(
    rpc: &'static str,
    req: Request<T>,
    work: impl FnOnce(Request<T>, Result<Option<Instant>, Status>, Option<Instant>) -> F,
) -> Result<Response<R>, Status> {
    HandlerSeen::mark(&req);
    let (deadline, timed_out_from) = deadline_of(&req);
    let mut guard = CancelCount::new(rpc, timed_out_from);
    let r = work(req, deadline, timed_out_from).await;
    guard.disarm();
    counted(rpc, r.map(Response::new))
}

/// When `req` reached the server ([`Arrival`]; now, for a call that did not come through the server's layers).
fn arrival_of<T>(req: &Request<T>) -> Instant {
    req.extensions().get::<Arrival>().map_or_else(Instant::now, |a| a.0)
}

/// A streamed call's end: counted and logged with the one code.
fn end_stream(log: &mut RequestLog, code: tonic::Code, message: &str) {
    count("GenerateStream", code);
    log.end(code, message);
}

/// Ends a stream at its deadline: the engine stops the request (its events dropped), then the status goes out.
async fn end_at_deadline(
    events: Events,
    log: &mut RequestLog,
    tx: &mpsc::Sender<Result<proto::GenerateResponse, Status>>,
) {
    drop(events);
    let s = Status::deadline_exceeded("deadline exceeded");
    end_stream(log, s.code(), s.message());
    let _ = tx.send(Err(log.id().tag(s))).await;
}

/// A request on its way to the engine, plus what the response needs.
struct Admitted {
    /// Its completions' events (one, or the request's `n`).
    events: Events,
    n: usize,
    adapter_version: String,
    /// The prompt's length, for the log.
    prompt_tokens: usize,
    /// Whether completion 0 scores the prompt (`prompt_logprobs`).
    scores_prompt: bool,
    /// The engine it was handed to.
    engine: Arc<Engine>,
}

impl Service {
    fn ready(&self) -> Result<&Ready, Status> {
        if self.state.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable("server is shutting down"));
        }
        self.state.ready.get().ok_or_else(|| Status::unavailable("model is still loading"))
    }

    /// Validates, leases the adapter, tokenizes, submits.
    async fn admit(&self, req: Request<proto::GenerateRequest>, deadline: Option<Instant>) -> Result<Admitted, Status> {
        let ready = self.ready()?;
        let arrival = Instant::now();
        check_adapter_header(req.metadata(), &req.get_ref().adapter_id)?;
        let key = req.extensions().get::<super::auth::KeyIndex>().copied();
        let mut r = req.into_inner();
        let limits = self.state.limits;
        let input = PromptInput {
            prompt: std::mem::take(&mut r.prompt),
            messages: std::mem::take(&mut r.messages),
            token_ids: Some(std::mem::take(&mut r.prompt_token_ids)),
            continue_final_message: r.continue_final_message,
            chat_template_kwargs: std::mem::take(&mut r.chat_template_kwargs),
            truncate_prompt_tokens: r.truncate_prompt_tokens,
            add_special_tokens: r.add_special_tokens,
            add_generation_prompt: r.add_generation_prompt,
        };
        input.check_form()?;
        // Each completion takes a place in the queue: more than it holds could never be accepted.
        let queue = ready.engine.config().queue_capacity;
        let n = match r.n {
            None => 1,
            Some(n) if !(1..=MAX_N).contains(&n) => {
                return Err(invalid("n", format!("must be in 1..={MAX_N}, got {n}")));
            }
            Some(n) if n as usize > queue => {
                let why = format!("{n} completions are more than the request queue holds ({queue}, --max-queue)");
                return Err(invalid("n", why));
            }
            Some(n) => n as usize,
        };
        let cap = limits.max_new_tokens_cap;
        if r.max_new_tokens > cap {
            let why = format!("must be at most {cap} (or 0: as many as fit), got {}", r.max_new_tokens);
            return Err(invalid("max_new_tokens", why));
        }
        // What the request leaves unset, the model's generation_config.json may set (vLLM's defaults).
        let given = GenerationDefaults {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
        };
        let mut sampling = SamplingParams {
            seed: r.seed,
            frequency_penalty: r.frequency_penalty,
            presence_penalty: r.presence_penalty,
            min_tokens: r.min_tokens,
            ignore_eos: r.ignore_eos,
            stop_token_ids: r.stop_token_ids,
            logit_bias: {
                // In id order, not the map's: the same request gets the same error message.
                let mut bias: Vec<(u32, f32)> = r.logit_bias.into_iter().collect();
                bias.sort_unstable_by_key(|&(t, _)| t);
                bias
            },
            allowed_token_ids: r.allowed_token_ids,
            ..SamplingParams::default()
        }
        .with(given.or(ready.defaults));
        sampling.validate().map_err(Status::invalid_argument)?;
        if r.max_new_tokens > 0 {
            sampling.validate_lengths(r.max_new_tokens as usize).map_err(Status::invalid_argument)?;
        }
        if r.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid("top_logprobs", format!("must be in 0..={MAX_TOP_LOGPROBS}, got {}", r.top_logprobs)));
        }
        if r.top_logprobs > 0 && !r.logprobs {
            return Err(invalid("top_logprobs", "requires logprobs"));
        }
        if let Some(n) = r.prompt_logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(invalid("prompt_logprobs", format!("must be in 0..={MAX_TOP_LOGPROBS}, got {n}")));
        }
        if sampling.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            let n = sampling.stop_token_ids.len();
            return Err(invalid("stop_token_ids", format!("at most {MAX_STOP_TOKEN_IDS} ids, got {n}")));
        }
        // A few short words: encoded here (a prompt goes to the encoders' threads).
        sampling.bad_words = crate::engine::bad_words::bad_words_ids(&ready.tokenizer, &r.bad_words)
            .map_err(Status::invalid_argument)?;
        if let Some(s) = r.structured_output.take() {
            sampling.guide = Some(guide_of(ready, s, deadline).await?);
        }
        sampling.validate_model(ready.vocab, &ready.eos).map_err(Status::invalid_argument)?;
        if r.stop.len() > limits.max_stop_strings {
            return Err(invalid(
                "stop",
                format!("at most {} stop strings, got {}", limits.max_stop_strings, r.stop.len()),
            ));
        }
        for (i, s) in r.stop.iter().enumerate() {
            if s.is_empty() || s.len() > limits.max_stop_bytes {
                return Err(invalid(&format!("stop[{i}]"), format!("must be 1..={} bytes", limits.max_stop_bytes)));
            }
        }
        let prompt = input.check(ready)?;
        // A conversation is rendered with its adapter's template when the adapter brings one: the adapter is
        // leased first. A raw prompt is checked whole before any adapter load.
        let leased_first = prompt.is_conversation();
        let mut adapter = None;
        if leased_first {
            adapter = lease_request_adapter(ready, &r.adapter_id, deadline).await?;
        }
        let field = prompt.field();
        let prompt_ids = prompt.ids(&self.state, adapter.as_ref(), deadline).await?;
        let max_new_tokens = match r.max_new_tokens {
            // Unset: as many as fit (vLLM's default `max_tokens`), in the context and in the KV cache, up to the
            // cap. A prompt the KV cache cannot hold with one new token is refused below, as any request it
            // cannot hold (FAILED_PRECONDITION naming --kv-cache-bytes).
            0 => {
                let (prompt, context) = (prompt_ids.len(), ready.context);
                if prompt >= context {
                    let why = format!("{prompt} prompt tokens leave no room for a new token in the model's context of {context} positions");
                    return Err(invalid(field, why));
                }
                // The bound Info states (`max_total_tokens`: the context, or the KV cache's where lower).
                let room = (ready.info.max_total_tokens as usize).saturating_sub(prompt).clamp(1, cap as usize);
                sampling
                    .validate_lengths(room)
                    .map_err(|e| Status::invalid_argument(format!("{e}: what fits after {prompt} prompt tokens")))?;
                room
            }
            n => n as usize,
        };
        let total = prompt_ids.len() + max_new_tokens;
        if total > ready.context {
            return Err(invalid(
                field,
                format!(
                    "{} prompt tokens + max_new_tokens {} exceed the model's context of {} positions",
                    prompt_ids.len(),
                    max_new_tokens,
                    ready.context
                ),
            ));
        }
        // What can never run is refused before its adapter is loaded (or waited for).
        ready.engine.check_fits(prompt_ids.len(), max_new_tokens).map_err(status::from_submit)?;
        if !leased_first {
            adapter = lease_request_adapter(ready, &r.adapter_id, deadline).await?;
        }
        let adapter_version = adapter.as_ref().map(|l| l.version().to_string()).unwrap_or_default();
        let scores_prompt = r.prompt_logprobs.is_some();
        let prompt_tokens = prompt_ids.len();
        let (tx, rx) = mpsc::unbounded_channel();
        let first = ValidRequest {
            prompt_ids,
            max_new_tokens,
            sampling,
            stop: r.stop,
            include_stop_str_in_output: r.include_stop_str_in_output,
            skip_special_tokens: r.skip_special_tokens.unwrap_or(true),
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs as usize,
            prompt_logprobs: r.prompt_logprobs.map(|n| n as usize),
            adapter,
            // Requests of different API keys never share cached prompt blocks.
            cache_salt: match key {
                Some(super::auth::KeyIndex(i)) => format!("api key {i}\0{}", r.cache_salt),
                None => r.cache_salt,
            },
            deadline,
            arrival,
            events: tx,
        };
        let mut receivers = vec![rx];
        let mut completions = Vec::with_capacity(n);
        for i in 1..n {
            let (tx, rx) = mpsc::unbounded_channel();
            completions.push(first.sibling(i as u64, tx));
            receivers.push(rx);
        }
        completions.insert(0, first);
        ready.engine.submit_all(completions).map_err(status::from_submit)?;
        let events = completions::merge(receivers);
        Ok(Admitted { events, n, adapter_version, prompt_tokens, scores_prompt, engine: ready.engine.clone() })
    }
}

/// The lease on a request's adapter (`None` for the base model alone).
async fn lease_request_adapter(
    ready: &Ready,
    id: &str,
    deadline: Option<Instant>,
) -> Result<Option<AdapterLease>, Status> {
    if id.is_empty() {
        return Ok(None);
    }
    // Admitted and not yet in the engine: queued, so the autoscaler sees requests piling up behind a full
    // adapter cache too. (`LoadAdapter` calls are not requests waiting to run.)
    let _waiting = t::Queued::enter();
    lease_adapter(&ready.cache, id, deadline).await.map(Some)
}

/// Leases adapter `id`, within the request's deadline: waiting for its load, its copy to the device or room
/// in the device tier all count, and running out is `DEADLINE_EXCEEDED` (the load itself goes on, for the
/// retry).
pub(super) async fn lease_adapter(
    cache: &AdapterCache,
    id: &str,
    deadline: Option<Instant>,
) -> Result<AdapterLease, Status> {
    let acquire = cache.acquire(id, deadline.map(tokio::time::Instant::from_std));
    let acquired = by_deadline(deadline, &format!("waiting for adapter `{id}`"), acquire).await?;
    acquired.map_err(|e| status::from_cache(e, deadline.is_some_and(|d| Instant::now() >= d)))
}

/// Checks that adapter `id` is there (NOT_FOUND otherwise), within `deadline`, through the cache's looks at
/// the adapters folder ([`AdapterCache::look`]: off the async workers).
pub(super) async fn look_up(cache: &AdapterCache, id: &str, deadline: Option<Instant>) -> Result<(), Status> {
    let found = at_folder(cache, deadline, &format!("looking up adapter `{id}`"), cache.find(id)).await?;
    found.map_err(|e| status::from_cache(e, false))
}

/// `work` that looks at the adapters folder, within the call's `deadline` (DEADLINE_EXCEEDED naming what it
/// was `doing`). Without a deadline it is UNAVAILABLE once it has waited as long as an adapter's acquire
/// would (the cache's default wait) while a look has gone that long unanswered
/// ([`AdapterCache::unless_unanswered`]): the folder did not answer (a hung mount), and a retry may find it
/// answering.
async fn at_folder<F: std::future::Future>(
    cache: &AdapterCache,
    deadline: Option<Instant>,
    doing: &str,
    work: F,
) -> Result<F::Output, Status> {
    if deadline.is_some() {
        return by_deadline(deadline, doing, work).await;
    }
    cache.unless_unanswered(work).await.ok_or_else(|| {
        let wait = cache.config().default_wait;
        Status::unavailable(format!(
            "{doing}: the adapters folder did not answer in {} s (a hung file system?)",
            wait.as_secs_f64()
        ))
    })
}

/// The most `top_logprobs` (and `prompt_logprobs`) a request may ask for (OpenAI's limit, vLLM's default
/// `max_logprobs`).
pub(super) const MAX_TOP_LOGPROBS: u32 = 20;

/// The most `stop_token_ids` a request may give.
pub(super) const MAX_STOP_TOKEN_IDS: usize = 64;

type GenerateStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoraServe for Service {
    async fn generate(
        &self,
        req: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::GenerateResponse>, Status> {
        let start = arrival_of(&req);
        let id = RequestId::of(req.metadata());
        let echo = id.clone().ok();
        let r = unary("Generate", req, |req, deadline, timed_out_from| async move {
            let mut log = RequestLog::new(id?, "Generate", &req.get_ref().adapter_id, start, timed_out_from);
            let r = async {
                let deadline = deadline?;
                let mut a = self.admit(req, deadline).await?;
                log.admitted(&a.adapter_version, a.prompt_tokens, a.n);
                let mut out = Completions::new(a.n, a.adapter_version);
                loop {
                    let next = match deadline {
                        // Dropping the events tells the engine to stop the request's completions.
                        Some(d) => within(d, a.events.next())
                            .await
                            .ok_or_else(|| Status::deadline_exceeded("deadline exceeded"))?,
                        None => a.events.next().await,
                    };
                    let Some((i, ev)) = next else { break };
                    log.see(i, &ev);
                    if out.add(i, ev).map_err(status::from_engine)? {
                        return Ok(out.into_response());
                    }
                }
                Err(status::unfinished(&a.engine))
            }
            .await;
            log.end_with(&r);
            r
        })
        .await;
        match echo {
            Some(id) => id.stamp(r),
            None => r,
        }
    }

    type GenerateStreamStream = GenerateStream;

    async fn generate_stream(&self, req: Request<proto::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        HandlerSeen::mark(&req);
        let start = arrival_of(&req);
        let (deadline, timed_out_from) = deadline_of(&req);
        let mut guard = CancelCount::new("GenerateStream", timed_out_from);
        let id = match RequestId::of(req.metadata()) {
            Ok(id) => id,
            Err(s) => {
                guard.disarm();
                return counted("GenerateStream", Err(s));
            }
        };
        let adapter = &req.get_ref().adapter_id;
        let mut log = RequestLog::new(id.clone(), "GenerateStream", adapter, start, timed_out_from);
        let (admitted, deadline) = match deadline {
            Ok(deadline) => (self.admit(req, deadline).await, deadline),
            Err(s) => (Err(s), None),
        };
        guard.disarm();
        let mut a = match admitted {
            Ok(a) => a,
            Err(s) => {
                log.end(s.code(), s.message());
                return id.stamp(counted("GenerateStream", Err(s)));
            }
        };
        log.admitted(&a.adapter_version, a.prompt_tokens, a.n);
        let (tx, rx) = mpsc::channel::<Result<proto::GenerateResponse, Status>>(64);
        tokio::spawn(async move {
            let mut log = log;
            // Every way out counts the call and logs it with the one code: a client that left, as this.
            let left = || request_log::left(timed_out_from);
            let mut tagger = StreamTagger::new(a.n, a.adapter_version, a.scores_prompt);
            // tonic's timer covers the handler only: past it, the deadline is this task's to keep, as the
            // unary call's (else the client gives up first and the call counts CANCELLED). Watched first, while
            // waiting for events and while a slow reader holds up a send.
            let expired = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                // A client that leaves while its request waits in the queue (or in a long prefill) sends
                // nothing to fail on: watch the channel too, so that its slot and adapter lease go at once.
                let ev = tokio::select! {
                    biased;
                    () = &mut expired => return end_at_deadline(a.events, &mut log, &tx).await,
                    ev = a.events.next() => ev,
                    () = tx.closed() => {
                        // Returning drops `a.events`, which tells the engine to stop.
                        let (code, why) = left();
                        return end_stream(&mut log, code, why);
                    }
                };
                let Some((i, ev)) = ev else { break };
                log.see(i, &ev);
                let (out, failure) = match tagger.messages(i, ev) {
                    Ok(msgs) => (msgs.into_iter().map(Ok).collect(), None),
                    Err(e) => {
                        // `bound` makes a new status: the id goes on after it.
                        let s = log.id().tag(status::bound(status::from_engine(e)));
                        let failure = (s.code(), s.message().to_string());
                        (vec![Err(s)], Some(failure))
                    }
                };
                for msg in out {
                    let sent = tokio::select! {
                        biased;
                        () = &mut expired => return end_at_deadline(a.events, &mut log, &tx).await,
                        sent = tx.send(msg) => sent,
                    };
                    // A failed send means the client left: dropping `a.events` tells the engine to stop.
                    if sent.is_err() {
                        let (code, why) = left();
                        return end_stream(&mut log, code, why);
                    }
                }
                // A completion's failure, or every completion's end, ends the call.
                if let Some((code, message)) = failure {
                    return end_stream(&mut log, code, &message);
                }
                if tagger.done() {
                    return end_stream(&mut log, tonic::Code::Ok, "");
                }
            }
            // The engine dropped the request without finishing it: as the unary call.
            let s = status::unfinished(&a.engine);
            end_stream(&mut log, s.code(), s.message());
            let _ = tx.send(Err(log.id().tag(s))).await;
        });
        id.stamp(Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as GenerateStream)))
    }

    async fn list_adapters(
        &self,
        req: Request<proto::ListAdaptersRequest>,
    ) -> Result<Response<proto::ListAdaptersResponse>, Status> {
        unary("ListAdapters", req, |_, deadline, _| async move {
            let (cache, doing) = (&self.ready()?.cache, "listing adapters");
            let listed = at_folder(cache, deadline?, doing, cache.listing()).await?;
            let listed = listed.map_err(|e| Status::internal(format!("{doing}: {e}")))?;
            let adapters = listed
                .into_iter()
                .map(|s| proto::AdapterInfo {
                    adapter_id: s.id,
                    version: s.version.unwrap_or_default(),
                    device_resident: s.device_resident,
                    host_resident: s.host_resident,
                    bytes: s.bytes as u64,
                    leases: s.leases as u32,
                })
                .collect();
            Ok(proto::ListAdaptersResponse { adapters })
        })
        .await
    }

    async fn load_adapter(
        &self,
        req: Request<proto::LoadAdapterRequest>,
    ) -> Result<Response<proto::LoadAdapterResponse>, Status> {
        unary("LoadAdapter", req, |req, deadline, _| async move {
            let ready = self.ready()?;
            let deadline = deadline?;
            check_adapter_header(req.metadata(), &req.get_ref().adapter_id)?;
            let id = req.into_inner().adapter_id;
            if id.is_empty() {
                return Err(invalid("adapter_id", "is empty"));
            }
            not_past(deadline)?;
            // Loaded and left in the cache unleased.
            let lease = lease_adapter(&ready.cache, &id, deadline).await?;
            Ok(proto::LoadAdapterResponse { adapter_version: lease.version().to_string() })
        })
        .await
    }

    async fn unload_adapter(
        &self,
        req: Request<proto::UnloadAdapterRequest>,
    ) -> Result<Response<proto::UnloadAdapterResponse>, Status> {
        unary("UnloadAdapter", req, |req, deadline, _| async move {
            let ready = self.ready()?;
            let deadline = deadline?;
            check_adapter_header(req.metadata(), &req.get_ref().adapter_id)?;
            let id = req.into_inner().adapter_id;
            let doing = format!("unloading adapter `{id}`");
            let unloaded = at_folder(&ready.cache, deadline, &doing, ready.cache.unload(&id)).await?;
            let was_loaded = unloaded.map_err(|e| status::from_cache(e, false))?;
            Ok(proto::UnloadAdapterResponse { was_loaded })
        })
        .await
    }

    async fn tokenize(
        &self,
        req: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        unary("Tokenize", req, |req, deadline, _| async move {
            let ready = self.ready()?;
            let deadline = deadline?;
            check_adapter_header(req.metadata(), &req.get_ref().adapter_id)?;
            tokenize::tokenize(&self.state, ready, req.into_inner(), deadline).await
        })
        .await
    }

    async fn info(&self, req: Request<proto::InfoRequest>) -> Result<Response<proto::InfoResponse>, Status> {
        HandlerSeen::mark(&req);
        counted("Info", self.ready().map(|ready| Response::new(ready.info.clone())))
    }

    async fn detokenize(
        &self,
        req: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        unary("Detokenize", req, |req, deadline, _| async move {
            tokenize::detokenize(self.ready()?, req.into_inner(), deadline?).await
        })
        .await
    }
}
