//! The engine thread: owns the model and the KV cache, runs the continuous-batching loop.
//!
//! Each iteration takes in new requests, drops those whose client left or whose deadline passed (freeing
//! their batch slot, KV blocks and adapter lease right there), asks the [`Scheduler`] for the next step,
//! runs ONE forward over the flattened batch — rows grouped by adapter into batched-LoRA segments — samples
//! the rows that need a token, and streams tokens and text back. Nothing here blocks on I/O: adapter loads
//! happened before a request was submitted.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::logits::{fetch_rows, LogSoftmax, RowLogits};
use super::request::{EngineError, Event, FinishReason, PromptLogprobs, StopReason, ValidRequest};
use super::sampler::{self, NoToken, Sampler};
use super::scheduler::{PlannedRow, Scheduler, SchedulerConfig, SeqId, SeqSlot};
use super::text::StopText;
use crate::lora::{LoraRows, LoraSegment};
use crate::model::kv_cache::{PagedKvCache, PrefixChain};
use crate::model::{AttentionMode, Batch, Model, SeqInput, Tokenizer};
use crate::telemetry as t;

/// Engine limits.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub max_batch_rows: usize,
    /// Tokens per step (prefill chunks are cut to fit).
    pub max_batch_tokens: usize,
    pub block_size: usize,
    pub kv_cache_bytes: usize,
    /// Requests accepted but not yet running; beyond it submit fails (`RESOURCE_EXHAUSTED`).
    pub queue_capacity: usize,
    /// Keep computed prompt blocks and share them with later requests that start with the same tokens.
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_rows: 32,
            max_batch_tokens: 512,
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            queue_capacity: 256,
            prefix_caching: true,
        }
    }
}

pub(crate) enum Command {
    Submit(Box<ValidRequest>, Queued),
    /// Stop taking requests; finish the ones there are, then exit.
    Drain,
    /// Fail everything still running and exit.
    Abort,
}

/// Counters the handle and tests read.
#[derive(Default, Debug)]
pub struct EngineStats {
    /// Submitted and waiting to run: not yet admitted into the running batch, or preempted out of it.
    pub pending: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub steps: AtomicUsize,
    /// Running sequences preempted for KV-cache blocks.
    pub preemptions: AtomicUsize,
    pub stopped: AtomicBool,
    /// Steps left to fail with a panic in the forward: the fault the engine's unit tests inject (no input
    /// makes a forward fail on demand).
    #[cfg(test)]
    pub(crate) fail_steps: AtomicUsize,
}

/// A submitted request's place in the queue count (`pending` and the queue gauge), given back when dropped:
/// when the request joins the running batch, or leaves before it does by whatever path (refused, reaped,
/// aborted, dropped with the channel, unwound by a panic).
pub(crate) struct Queued {
    stats: Arc<EngineStats>,
    _gauge: t::Queued,
    /// When it began to wait.
    since: Instant,
}

impl Queued {
    fn new(stats: &Arc<EngineStats>) -> Queued {
        Queued { stats: stats.clone(), _gauge: t::Queued::enter(), since: Instant::now() }
    }

    /// Counts one more request; also returns how many were waiting before it.
    pub(crate) fn enter(stats: &Arc<EngineStats>) -> (Queued, usize) {
        let before = stats.pending.fetch_add(1, Ordering::Relaxed);
        (Queued::new(stats), before)
    }

    /// Counts `n` more requests in one step, if the queue has room for all of them within `capacity`; else
    /// counts none and returns how many are waiting. (One at a time, two calls could each take part of the
    /// room and both be refused.)
    pub(crate) fn enter_all(stats: &Arc<EngineStats>, n: usize, capacity: usize) -> Result<Vec<Queued>, usize> {
        let room = |p: usize| p.checked_add(n).filter(|&after| after <= capacity);
        stats.pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, room)?;
        Ok((0..n).map(|_| Queued::new(stats)).collect())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in the engine.
struct Live {
    req: ValidRequest,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    generated: usize,
    sampler: Sampler,
    text: StopText,
    /// The prompt scored so far, while [`ValidRequest::prompt_logprobs`] asks for it and it is not yet sent.
    prompt: Option<PromptLogprobs>,
    /// While the request waits to join the running batch: until it first does, and again after a preemption
    /// until it is recomputed (vLLM counts preempted requests as waiting too).
    queued: Option<Queued>,
    /// Whether it has joined the running batch once.
    admitted: bool,
    /// Prompt tokens found in the prefix cache when it joined.
    cached_tokens: usize,
    last_token_at: Option<Instant>,
}

impl Live {
    /// The positions of `row` whose logits score a prompt token (position `p` predicts token `p + 1`) and are
    /// not scored yet: none once the prompt is sent, and a sequence recomputed after a preemption does not
    /// score its positions again.
    fn prompt_positions(&self, row: &PlannedRow) -> Range<usize> {
        let Some(p) = &self.prompt else { return 0..0 };
        let start = row.start.max(p.logprobs.len());
        let end = (row.start + row.len).min(self.prompt_len - 1);
        start..end.max(start)
    }

    /// Scores prompt position `p` from its logits `row`.
    fn score_prompt(&mut self, p: usize, row: &[f32]) {
        let top = self.req.prompt_logprobs.unwrap_or(0);
        let acc = self.prompt.as_mut().expect("asked for prompt logprobs");
        debug_assert_eq!(acc.logprobs.len(), p, "prompt positions are scored in order");
        let row = LogSoftmax::new(row);
        acc.logprobs.push(row.of(self.tokens[p + 1]));
        if top > 0 {
            acc.top_logprobs.push(row.top(top));
        }
    }
}

pub(crate) fn run(
    model: Model,
    mut cache: PagedKvCache,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    stats: Arc<EngineStats>,
) {
    let geo = cache.geometry();
    let capacity = cache.allocator().capacity();
    stats.kv_blocks_total.store(capacity, Ordering::Relaxed);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_rows: cfg.max_batch_rows,
        max_batch_tokens: cfg.max_batch_tokens,
        block_size: cfg.block_size,
    });
    let mut slots: HashMap<SeqId, SeqSlot> = HashMap::new();
    let mut live: HashMap<SeqId, Live> = HashMap::new();
    let mut next_id: SeqId = 0;
    let mut draining = false;
    let mut aborted = false;
    let mut failed_in_a_row = 0;
    let eos = model.config().eos_token_ids.clone();

    loop {
        // 1. Intake: block while idle, otherwise take whatever has arrived.
        let mut commands = Vec::new();
        if sched.is_idle() {
            if draining {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => commands.push(c),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(c) = rx.try_recv() {
            commands.push(c);
        }
        for c in commands {
            match c {
                Command::Submit(req, _) if draining => {
                    let _ = req.events.send(Event::Failed(EngineError::ShuttingDown));
                }
                Command::Submit(req, queued) => {
                    // `Engine::submit` refuses these before the queue; the scheduler could never place one.
                    let needed = geo.blocks_for(super::kv_positions(req.prompt_ids.len(), req.max_new_tokens));
                    if needed > capacity {
                        let _ = req.events.send(Event::Failed(EngineError::TooLong { needed, capacity }));
                        continue;
                    }
                    next_id += 1;
                    let id = next_id;
                    metrics::counter!(t::PROMPT_TOKENS_TOTAL).increment(req.prompt_ids.len() as u64);
                    let mut slot = SeqSlot::new(req.prompt_ids.len(), id);
                    if cfg.prefix_caching {
                        // A scored prompt needs the logits of every position: it computes them all.
                        slot = slot.cached(PrefixChain::new(&salt(&req)), req.prompt_logprobs.is_none());
                    }
                    slots.insert(id, slot);
                    sched.enqueue(id);
                    live.insert(
                        id,
                        Live {
                            tokens: req.prompt_ids.clone(),
                            prompt_len: req.prompt_ids.len(),
                            generated: 0,
                            sampler: Sampler::new(req.sampling.clone(), sampler::unseeded(), &req.prompt_ids, &eos),
                            text: match StopText::new(req.stop.clone(), req.include_stop_str_in_output) {
                                text if req.skip_special_tokens => text,
                                text => text.keeping_special_tokens(),
                            },
                            prompt: req
                                .prompt_logprobs
                                .map(|_| PromptLogprobs { ids: req.prompt_ids.clone(), ..Default::default() }),
                            queued: Some(queued),
                            admitted: false,
                            cached_tokens: 0,
                            last_token_at: None,
                            req: *req,
                        },
                    );
                }
                Command::Drain => draining = true,
                // Everything after it in this intake fails too: an abort follows a drain.
                Command::Abort => aborted = true,
            }
        }
        if aborted {
            for (_, l) in live.drain() {
                let _ = l.req.events.send(Event::Failed(EngineError::ShuttingDown));
            }
            return stop(&stats, &rx);
        }

        // 2. Reap: clients that left, deadlines that passed.
        let now = Instant::now();
        let gone: Vec<(SeqId, Option<EngineError>)> = live
            .iter()
            .filter_map(|(&id, l)| {
                if l.req.events.is_closed() {
                    Some((id, None))
                } else if l.req.deadline.is_some_and(|d| now >= d) {
                    Some((id, Some(EngineError::DeadlineExceeded)))
                } else {
                    None
                }
            })
            .collect();
        for (id, err) in gone {
            let l = live.remove(&id).expect("live");
            if let Some(e) = err {
                let _ = l.req.events.send(Event::Failed(e));
            }
            sched.remove(id, &mut slots, cache.allocator_mut());
            slots.remove(&id);
        }

        // 3. Plan and run one step.
        let plan = sched.plan(&mut slots, cache.allocator_mut(), |id| live[&id].tokens.as_slice());
        if !plan.preempted.is_empty() {
            stats.preemptions.fetch_add(plan.preempted.len(), Ordering::Relaxed);
            metrics::counter!(t::PREEMPTIONS_TOTAL).increment(plan.preempted.len() as u64);
        }
        for id in &plan.preempted {
            // Waiting again: counted in the queue until it runs.
            if let Some(l) = live.get_mut(id) {
                l.queued.get_or_insert_with(|| Queued::enter(&stats).0);
            }
        }
        // (Read after the plan: a request admitted in the place of one reaped above waited until then.)
        let planned = Instant::now();
        for r in &plan.rows {
            let l = live.get_mut(&r.seq).expect("planned sequence is live");
            // Running now: no longer queued. The first time, it starts after what the prefix cache held.
            let waited = l.queued.take().map(|q| planned.duration_since(q.since));
            if !std::mem::replace(&mut l.admitted, true) {
                let queue_time = waited.unwrap_or_default();
                metrics::histogram!(t::REQUEST_QUEUE_TIME_SECONDS).record(queue_time.as_secs_f64());
                let _ = l.req.events.send(Event::Started { queue_time });
                l.cached_tokens = r.start;
                if slots[&r.seq].reuse {
                    metrics::counter!(t::PREFIX_CACHE_QUERIES_TOTAL).increment(l.prompt_len as u64);
                    metrics::counter!(t::PREFIX_CACHE_HITS_TOTAL).increment(r.start as u64);
                }
            }
        }
        publish(&stats, &sched, &cache);
        if plan.rows.is_empty() {
            continue;
        }
        // A panic in the forward (a kernel or shape bug some batch hits) fails that batch like an error, and
        // the engine goes on serving: the failed sequences' KV blocks are freed below.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            if stats.fail_steps.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                panic!("injected fault");
            }
            step(&model, &mut cache, &plan.rows, &slots, &live)
        }))
        .unwrap_or_else(|panic| Err(candle_core::Error::msg(format!("panic in the forward: {}", panic_text(&panic)))));
        stats.steps.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(t::BATCH_SIZE).record(plan.rows.len() as f64);
        let Stepped { sampled, prompt } = match outcome {
            Ok(s) => {
                failed_in_a_row = 0;
                s
            }
            Err(e) => {
                tracing::error!(error = %e, "forward failed; failing the batch");
                let message = crate::candle_message(&e);
                // The blocks this step was to fill hold nothing their names say.
                cache.allocator_mut().forget(&plan.named);
                for r in &plan.rows {
                    if let Some(l) = live.remove(&r.seq) {
                        let _ = l.req.events.send(Event::Failed(EngineError::Internal(message.clone())));
                    }
                    sched.remove(r.seq, &mut slots, cache.allocator_mut());
                    slots.remove(&r.seq);
                }
                failed_in_a_row += 1;
                if failed_in_a_row == MAX_FAILED_STEPS {
                    // Not one batch's bad luck: the engine is broken (a poisoned lock, a sticky device
                    // error). Stop, so that the server exits and is restarted.
                    tracing::error!(steps = MAX_FAILED_STEPS, "every step fails: stopping the engine");
                    for (_, l) in live.drain() {
                        let _ = l.req.events.send(Event::Failed(EngineError::Internal(message.clone())));
                    }
                    return stop(&stats, &rx);
                }
                // The gauges say what the failed rows gave back (an idle engine publishes nothing more).
                publish(&stats, &sched, &cache);
                continue;
            }
        };
        for r in &plan.rows {
            slots.get_mut(&r.seq).expect("slot").computed += r.len;
        }
        for (id, positions, rows) in prompt {
            let l = live.get_mut(&id).expect("live");
            for (p, row) in positions.zip(&rows) {
                l.score_prompt(p, row);
            }
        }

        // 4. Sample, stream, finish.
        let now = Instant::now();
        for (row, logits) in plan.rows.iter().filter(|r| r.samples).zip(sampled) {
            let id = row.seq;
            let l = live.get_mut(&id).expect("live");
            // The prompt is scored whole by the step that samples the first token: it goes right before it.
            if let Some(p) = l.prompt.take() {
                let _ = l.req.events.send(Event::Prompt(p));
            }
            let token = match l.sampler.pick(&logits) {
                Ok(token) => token,
                Err(e) => {
                    let with = l.req.adapter.as_ref().map_or("the base model".to_string(), |a| {
                        format!("adapter `{}` (version {})", a.id(), a.version())
                    });
                    let message = format!("{e}, at output token {} with {with}", l.generated + 1);
                    let failed = match e {
                        NoToken::Broken => {
                            tracing::error!(adapter = %with, "{e}; failing the request");
                            EngineError::Internal(message)
                        }
                        // The request's own doing, not the model's.
                        NoToken::BadWords => EngineError::Unsatisfiable(message),
                    };
                    let _ = l.req.events.send(Event::Failed(failed));
                    live.remove(&id);
                    sched.remove(id, &mut slots, cache.allocator_mut());
                    slots.remove(&id);
                    continue;
                }
            };
            let (logprobs, top_logprobs) = report_logprobs(&l.req, &logits, token);
            l.tokens.push(token);
            l.generated += 1;
            slots.get_mut(&id).expect("slot").len += 1;
            metrics::counter!(t::GENERATED_TOKENS_TOTAL).increment(1);
            match l.last_token_at {
                None => metrics::histogram!(t::TIME_TO_FIRST_TOKEN_SECONDS)
                    .record(now.duration_since(l.req.arrival).as_secs_f64()),
                Some(prev) => {
                    metrics::histogram!(t::INTER_TOKEN_LATENCY_SECONDS).record(now.duration_since(prev).as_secs_f64())
                }
            }
            l.last_token_at = Some(now);
            // A token that ends the request (EOS, a stop token) stays out of the text unless the request keeps
            // what stopped it (vLLM). Stop strings count from the token after `min_tokens` on, as EOS does.
            let ends = l.req.sampling.ends_at(token, &eos);
            let (text, hit_stop) = if ends.is_some() && !l.req.include_stop_str_in_output {
                (String::new(), false)
            } else {
                l.text.push(&tokenizer, token, l.generated > l.req.sampling.min_tokens as usize)
            };
            let finish = if hit_stop {
                Some(FinishReason::StopSequence)
            } else if let Some(end) = ends {
                Some(end)
            } else if l.generated >= l.req.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let (text, finish) = match finish {
                Some(FinishReason::StopSequence) | None => (text, finish),
                Some(end) => {
                    let (rest, hit_stop) = l.text.flush(&tokenizer);
                    (text + &rest, Some(if hit_stop { FinishReason::StopSequence } else { end }))
                }
            };
            let sent = l.req.events.send(Event::Tokens { ids: vec![token], text, logprobs, top_logprobs });
            if let Some(reason) = finish {
                let l = live.remove(&id).expect("live");
                // (Every stop-string finish comes from `StopText` cutting at the string it records.)
                debug_assert!(reason != FinishReason::StopSequence || l.text.found().is_some());
                let stop_reason = match reason {
                    FinishReason::StopSequence => l.text.found().map(|s| StopReason::String(s.to_string())),
                    FinishReason::StopToken => Some(StopReason::Token(token)),
                    FinishReason::EosToken | FinishReason::Length => None,
                };
                let _ = l.req.events.send(Event::Finished {
                    reason,
                    prompt_tokens: l.prompt_len,
                    cached_tokens: l.cached_tokens,
                    generated_tokens: l.generated,
                    stop_reason,
                    seed: l.sampler.seed(),
                });
                metrics::histogram!(t::REQUEST_DURATION_SECONDS)
                    .record(now.duration_since(l.req.arrival).as_secs_f64());
                sched.remove(id, &mut slots, cache.allocator_mut());
                slots.remove(&id);
            } else if sent.is_err() {
                // The client left mid-stream: stop now.
                live.remove(&id);
                sched.remove(id, &mut slots, cache.allocator_mut());
                slots.remove(&id);
            }
        }
        publish(&stats, &sched, &cache);
    }
    stop(&stats, &rx);
}

/// The logprobs `req` asks for of `token`, picked from `logits`: its own and the most likely tokens' (one
/// each, or none when not asked).
fn report_logprobs(req: &ValidRequest, logits: &RowLogits, token: u32) -> (Vec<f32>, Vec<Vec<(u32, f32)>>) {
    if !req.logprobs {
        return (Vec::new(), Vec::new());
    }
    let Some(row) = logits.log_softmax() else {
        // A row whose logprobs are wanted is fetched whole (see `step`): this only flags a bug.
        return (vec![f32::NAN], if req.top_logprobs > 0 { vec![Vec::new()] } else { Vec::new() });
    };
    let top = if req.top_logprobs > 0 { vec![row.top(req.top_logprobs)] } else { Vec::new() };
    (vec![row.of(token)], top)
}

/// Consecutive failed steps after which the engine stops (see the forward's error path).
const MAX_FAILED_STEPS: usize = 8;

/// A panic's message (`panic!` with a literal or a formatted string), or a placeholder.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Marks the engine stopped and fails the requests submitted since the last intake.
fn stop(stats: &EngineStats, rx: &Receiver<Command>) {
    stats.stopped.store(true, Ordering::Relaxed);
    while let Ok(c) = rx.try_recv() {
        if let Command::Submit(req, _) = c {
            let _ = req.events.send(Event::Failed(EngineError::ShuttingDown));
        }
    }
}

fn publish(stats: &EngineStats, sched: &Scheduler, cache: &PagedKvCache) {
    let used = cache.allocator().used_blocks();
    stats.running.store(sched.running(), Ordering::Relaxed);
    stats.kv_blocks_used.store(used, Ordering::Relaxed);
    metrics::gauge!(t::KV_CACHE_BLOCKS_USED).set(used as f64);
    metrics::gauge!(t::KV_CACHE_BLOCKS_CACHED).set(cache.allocator().cached_blocks() as f64);
}

/// What besides its tokens decides whom a sequence shares cached blocks with: the adapter version it runs with
/// (its keys and values depend on it; a new version computes new ones) and the request's cache salt (which
/// the server prefixes with the API key's). Parts are separated by a byte no id holds.
fn salt(req: &ValidRequest) -> String {
    let (id, version) = req.adapter.as_ref().map_or(("", ""), |l| (l.id(), l.version()));
    format!("{id}\0{version}\0{}", req.cache_salt)
}

/// What one step computed.
#[derive(Default)]
struct Stepped {
    /// The logits of the sampling rows, in plan order (on a GPU, the rows of samplers that pick the argmax,
    /// and want no logprob, only as their argmax).
    sampled: Vec<RowLogits>,
    /// For each planned sequence scoring its prompt: the positions ([`Live::prompt_positions`]) and their
    /// logits.
    prompt: Vec<(SeqId, Range<usize>, Vec<Vec<f32>>)>,
}

/// One forward over the planned rows.
fn step(
    model: &Model,
    cache: &mut PagedKvCache,
    rows: &[PlannedRow],
    slots: &HashMap<SeqId, SeqSlot>,
    live: &HashMap<SeqId, Live>,
) -> candle_core::Result<Stepped> {
    // Order the batch by adapter so each adapter's rows form one segment of the batched-LoRA op; keep
    // sampling rows in plan order for the caller.
    let adapter_key =
        |r: &PlannedRow| live[&r.seq].req.adapter.as_ref().map(|l| l.weights() as *const _ as usize).unwrap_or(0);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| adapter_key(&rows[i]));
    let mut tokens = Vec::new();
    let mut seqs = Vec::with_capacity(rows.len());
    let mut segments: Vec<LoraSegment> = Vec::new();
    let mut first_row = vec![0usize; rows.len()];
    let mut last_row = vec![0usize; rows.len()];
    for &i in &order {
        let r = &rows[i];
        let l = &live[&r.seq];
        let start = tokens.len();
        tokens.extend_from_slice(&l.tokens[r.start..r.start + r.len]);
        seqs.push(SeqInput { len: r.len, past: r.start, blocks: &slots[&r.seq].blocks });
        (first_row[i], last_row[i]) = (start, tokens.len() - 1);
        if let Some(lease) = &l.req.adapter {
            match segments.last_mut() {
                Some(s) if std::ptr::eq(s.adapter, lease.weights()) && s.rows.1 == start => s.rows.1 = tokens.len(),
                _ => segments.push(LoraSegment::new(start..tokens.len(), lease.weights())),
            }
        }
    }
    // The sampling rows' logits first, then the prompt positions'.
    let mut logit_rows: Vec<usize> =
        rows.iter().enumerate().filter(|(_, r)| r.samples).map(|(i, _)| last_row[i]).collect();
    let sampling = logit_rows.len();
    let mut scored = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let positions = live[&r.seq].prompt_positions(r);
        if !positions.is_empty() {
            logit_rows.extend(positions.clone().map(|p| first_row[i] + p - r.start));
            scored.push((r.seq, positions));
        }
    }
    if logit_rows.is_empty() {
        // Pure prefill chunks: run for the KV cache, no logits needed.
        let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &[] };
        model.forward_hidden(&batch, AttentionMode::Paged(cache), &LoraRows::Segments(&segments))?;
        // A GPU reports a kernel's failure asynchronously: wait here, so it fails this batch, not the next.
        model.device().synchronize()?;
        return Ok(Stepped::default());
    }
    let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &logit_rows };
    let logits = model.forward(&batch, AttentionMode::Paged(cache), &LoraRows::Segments(&segments))?;
    let mut prompt_rows = match logit_rows.len() - sampling {
        0 => Vec::new(),
        n => logits.narrow(0, sampling, n)?.to_vec2::<f32>()?,
    }
    .into_iter();
    let prompt = scored
        .into_iter()
        .map(|(seq, positions)| {
            let rows = prompt_rows.by_ref().take(positions.len()).collect();
            (seq, positions, rows)
        })
        .collect();
    let logits = logits.narrow(0, 0, sampling)?;
    let sampled = if sampling == 0 {
        Vec::new()
    } else if model.device().is_cpu() {
        logits.to_vec2::<f32>()?.into_iter().map(RowLogits::Full).collect()
    } else {
        // A row whose logprob is wanted needs its whole row too.
        let argmax: Vec<bool> = rows
            .iter()
            .filter(|r| r.samples)
            .map(|r| live[&r.seq].sampler.picks_argmax() && !live[&r.seq].req.logprobs)
            .collect();
        fetch_rows(&logits, &argmax)?
    };
    Ok(Stepped { sampled, prompt })
}
