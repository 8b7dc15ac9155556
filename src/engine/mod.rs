//! The engine: everything between a validated request and its tokens.
//!
//! - [`request`]: [`ValidRequest`] in, [`Event`]s out.
//! - [`scheduler`]: continuous batching as pure logic (admission, chunked prefill, preemption).
//! - [`worker`]: the engine thread owning the model and KV cache.
//! - [`sampler`]: greedy / temperature / top-k / top-p with a seed, penalties, logit bias, allowed tokens,
//!   [`bad_words`], under a request's [`sampling_params`] (their checks, and which tokens end it);
//!   [`logits`]: the rows it picks from, and their log-softmax for logprobs; [`text`]: streaming text with stop
//!   strings; [`structured`]: structured output, the tokens that keep the output in a regex's language.
//! - [`generate()`]: one request start to finish on the calling thread (`server generate`, golden tests).
//!
//! [`Engine`] starts the thread and is the handle requests are submitted through.

pub mod bad_words;
pub mod generate;
pub mod logits;
mod penalties;
pub mod request;
pub mod sampler;
pub mod sampling_params;
pub mod scheduler;
pub mod structured;
pub mod text;
pub mod worker;

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

pub use generate::{generate, GenerateJob, Generated};
pub use request::{truncate_prompt, EngineError, Event, FinishReason, PromptLogprobs, StopReason, ValidRequest};
pub use sampler::Sampler;
pub use sampling_params::SamplingParams;
pub use worker::{EngineConfig, EngineStats};

use crate::model::kv_cache::PagedKvCache;
use crate::model::{Model, Tokenizer};
use worker::Command;

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{}", queue_full(*.waiting, *.asked, *.capacity))]
    QueueFull { waiting: usize, asked: usize, capacity: usize },
    #[error("server is shutting down")]
    ShuttingDown,
    /// More KV blocks than the whole cache: refused before the queue, so that it never takes a place there
    /// (and never makes a request that could run hear "queue full").
    #[error(transparent)]
    TooLong(EngineError),
    /// A prompt id the model has no embedding for (a tokenizer with tokens the model lacks): it would fail
    /// the forward of every request batched with it.
    #[error("prompt token id {id} (position {at}) is outside the model's vocabulary of {vocab} tokens")]
    OutOfVocab { id: u32, at: usize, vocab: usize },
}

/// Handle to the engine thread.
pub struct Engine {
    tx: Mutex<Sender<Command>>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    /// The KV cache's geometry and size in blocks, for [`Engine::submit`]'s check.
    kv: (crate::model::kv_cache::KvGeometry, usize),
    /// The model's vocabulary size: prompt ids must be below it.
    vocab: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread with `model`. Its KV cache (`config.kv_cache_bytes`, on the model's device)
    /// is allocated here, so a budget the device cannot hold fails at start, not on the first request.
    pub fn start(model: Model, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> candle_core::Result<Arc<Engine>> {
        let geo = model.kv_geometry(config.block_size);
        let cache = PagedKvCache::with_budget(geo, config.kv_cache_bytes, model.device()).map_err(|e| {
            candle_core::Error::msg(format!(
                "allocating the {}-byte KV cache: {}",
                config.kv_cache_bytes,
                crate::candle_message(&e)
            ))
        })?;
        // On a GPU each host thread has its own stream: the weight uploads and the cache's zero fill issued here
        // must be done before the engine thread's stream reads them.
        model.device().synchronize()?;
        let kv = (cache.geometry(), cache.allocator().capacity());
        let vocab = model.config().vocab_size;
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let s = stats.clone();
        // The KV-cache gauges have a series (a fresh cache: 0) before the first request, and before the server
        // says it serves; the engine thread sets them after each step.
        metrics::gauge!(crate::telemetry::KV_CACHE_BLOCKS_USED).set(0.0);
        metrics::gauge!(crate::telemetry::KV_CACHE_BLOCKS_CACHED).set(0.0);
        let thread = std::thread::Builder::new()
            .name("loraserve-engine".into())
            .spawn(move || worker::run(model, cache, tokenizer, config, rx, s))
            .expect("spawn engine thread");
        Ok(Arc::new(Engine { tx: Mutex::new(tx), stats, config, kv, vocab, thread: Mutex::new(Some(thread)) }))
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Whether the engine thread is still running (false once it stopped, or if it died of a panic).
    pub fn is_running(&self) -> bool {
        self.thread.lock().expect("engine thread").as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether a request of `prompt` tokens and `max_new_tokens` could ever run: its KV blocks fit in the
    /// whole cache. [`Engine::submit`] checks it; the server asks first, before it leases an adapter for it.
    pub fn check_fits(&self, prompt: usize, max_new_tokens: usize) -> Result<(), SubmitError> {
        let (geo, capacity) = self.kv;
        let needed = geo.blocks_for(kv_positions(prompt, max_new_tokens));
        if needed > capacity {
            return Err(SubmitError::TooLong(EngineError::TooLong { needed, capacity }));
        }
        Ok(())
    }

    /// The most prompt tokens + `max_new_tokens` one request can ask for and still fit in the whole KV cache
    /// ([`Engine::check_fits`]'s bound; the model's context may be smaller). The last generated token's keys
    /// are never stored: one more than the positions the cache holds.
    pub fn max_request_tokens(&self) -> usize {
        let (geo, capacity) = self.kv;
        capacity * geo.block_size + 1
    }

    /// Hands a request to the engine; its events arrive on `req.events`.
    pub fn submit(&self, req: ValidRequest) -> Result<(), SubmitError> {
        self.submit_all(vec![req])
    }

    /// Hands the engine requests that stand or fall together (the `n` completions of one call): all of them,
    /// or none when one is refused (the queue must have room for all).
    pub fn submit_all(&self, reqs: Vec<ValidRequest>) -> Result<(), SubmitError> {
        for req in &reqs {
            self.check_fits(req.prompt_ids.len(), req.max_new_tokens)?;
            if let Some((at, &id)) = req.prompt_ids.iter().enumerate().find(|(_, &id)| id as usize >= self.vocab) {
                return Err(SubmitError::OutOfVocab { id, at, vocab: self.vocab });
            }
        }
        let (asked, capacity) = (reqs.len(), self.config.queue_capacity);
        let queued = worker::Queued::enter_all(&self.stats, asked, capacity)
            .map_err(|waiting| SubmitError::QueueFull { waiting, asked, capacity })?;
        let tx = self.tx.lock().expect("engine sender");
        for (req, q) in reqs.into_iter().zip(queued) {
            tx.send(Command::Submit(Box::new(req), q)).map_err(|_| SubmitError::ShuttingDown)?;
        }
        Ok(())
    }

    /// Finishes the requests in the engine, then stops it. Returns once the thread has exited: after
    /// `timeout`, what is still running fails with `ShuttingDown` at the end of the step in progress, which
    /// this call waits for.
    pub fn shutdown(&self, timeout: std::time::Duration) {
        let _ = self.tx.lock().expect("engine sender").send(Command::Drain);
        let started = std::time::Instant::now();
        while !self.stats.stopped.load(Ordering::Relaxed) && self.is_running() && started.elapsed() < timeout {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if !self.stats.stopped.load(Ordering::Relaxed) {
            let _ = self.tx.lock().expect("engine sender").send(Command::Abort);
        }
        if let Some(t) = self.thread.lock().expect("engine thread").take() {
            let _ = t.join();
        }
    }
}

/// [`SubmitError::QueueFull`]'s message.
fn queue_full(waiting: usize, asked: usize, capacity: usize) -> String {
    match asked {
        1 => format!("request queue full ({waiting} waiting)"),
        _ => format!(
            "request queue has room for {} of the {asked} completions asked ({waiting} waiting of {capacity})",
            capacity.saturating_sub(waiting)
        ),
    }
}

/// The most KV-cache positions a request fills: its prompt and every generated token but the last, which is
/// sampled and never fed back (a prompt scored with no new tokens fills its own).
pub(crate) fn kv_positions(prompt: usize, max_new_tokens: usize) -> usize {
    prompt + max_new_tokens.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::model::{LoadOptions, ModelSpec};

    fn demo_engine() -> Arc<Engine> {
        let m = crate::model::load(&ModelSpec::Demo, &LoadOptions::default()).unwrap();
        let config = EngineConfig { kv_cache_bytes: 8 << 20, ..EngineConfig::default() };
        Engine::start(m.model, Arc::new(m.tokenizer), config).unwrap()
    }

    /// A plain greedy request of `prompt` for `n` tokens whose events go to `events`.
    fn request(prompt: &[u32], n: usize, events: tokio::sync::mpsc::UnboundedSender<Event>) -> ValidRequest {
        ValidRequest {
            prompt_ids: prompt.to_vec(),
            max_new_tokens: n,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            logprobs: false,
            top_logprobs: 0,
            prompt_logprobs: None,
            adapter: None,
            cache_salt: String::new(),
            deadline: None,
            arrival: Instant::now(),
            events,
        }
    }

    /// Runs a short request to its end: its last event.
    fn run(engine: &Engine) -> Event {
        run_ids(engine, &[1, 2, 3], 2).1
    }

    /// Runs `prompt` for `n` tokens to its end: the tokens and the last event.
    fn run_ids(engine: &Engine, prompt: &[u32], n: usize) -> (Vec<u32>, Event) {
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.submit(request(prompt, n, events)).unwrap();
        let mut tokens = Vec::new();
        loop {
            match rx.blocking_recv().expect("an end event") {
                Event::Tokens { ids, .. } => tokens.extend(ids),
                Event::Prompt(_) | Event::Started { .. } => {}
                end => return (tokens, end),
            }
        }
    }

    /// A prompt id past the model's vocabulary never reaches the engine thread: its forward would fail every
    /// request batched with it.
    #[test]
    fn prompt_ids_past_the_vocabulary_are_refused_at_submit() {
        let engine = demo_engine();
        let vocab = engine.vocab;
        let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
        let e = engine.submit(request(&[1, 2, vocab as u32], 2, events)).unwrap_err();
        assert_eq!(e, SubmitError::OutOfVocab { id: vocab as u32, at: 2, vocab });
        assert_eq!(engine.stats().pending.load(Ordering::Relaxed), 0);
        assert!(matches!(run(&engine), Event::Finished { .. }), "the engine goes on");
    }

    /// Requests submitted together are accepted together or not at all: a queue without room for every one
    /// of them takes none, and gives back the places it counted.
    #[test]
    fn requests_submitted_together_stand_or_fall_together() {
        let m = crate::model::load(&ModelSpec::Demo, &LoadOptions::default()).unwrap();
        let config = EngineConfig { kv_cache_bytes: 8 << 20, queue_capacity: 2, ..EngineConfig::default() };
        let engine = Engine::start(m.model, Arc::new(m.tokenizer), config).unwrap();
        let mut receivers = Vec::new();
        let three: Vec<ValidRequest> = (0..3)
            .map(|_| {
                let (events, rx) = tokio::sync::mpsc::unbounded_channel();
                receivers.push(rx);
                request(&[1, 2, 3], 2, events)
            })
            .collect();
        let refused = engine.submit_all(three).unwrap_err();
        assert_eq!(refused, SubmitError::QueueFull { waiting: 0, asked: 3, capacity: 2 });
        let said = "request queue has room for 2 of the 3 completions asked (0 waiting of 2)";
        assert_eq!(refused.to_string(), said);
        assert_eq!(engine.stats().pending.load(Ordering::Relaxed), 0);
        // Never sent: their senders are gone with the refused requests.
        let disconnected = Err(tokio::sync::mpsc::error::TryRecvError::Disconnected);
        assert!(receivers.iter_mut().all(|rx| rx.try_recv() == disconnected), "a refused request was sent");
        let mut two = Vec::new();
        for rx in &mut receivers[..2] {
            let (events, new_rx) = tokio::sync::mpsc::unbounded_channel();
            *rx = new_rx;
            two.push(request(&[1, 2, 3], 2, events));
        }
        engine.submit_all(two).unwrap();
        for rx in &mut receivers[..2] {
            let end = std::iter::from_fn(|| rx.blocking_recv()).last();
            assert!(matches!(end, Some(Event::Finished { generated_tokens: 2, .. })), "{end:?}");
        }
    }

    /// A request that waits for room in the running batch says, when it first runs, how long it waited:
    /// behind one that holds the only row, at least until that one leaves.
    #[test]
    fn a_request_reports_how_long_it_waited_to_run() {
        let m = crate::model::load(&ModelSpec::Demo, &LoadOptions::default()).unwrap();
        let config = EngineConfig { kv_cache_bytes: 8 << 20, max_batch_rows: 1, ..EngineConfig::default() };
        let engine = Engine::start(m.model, Arc::new(m.tokenizer), config).unwrap();
        let (long_tx, mut long_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut long = request(&[1, 2, 3], 1000, long_tx);
        long.sampling.ignore_eos = true;
        engine.submit(long).unwrap();
        assert!(matches!(long_rx.blocking_recv(), Some(Event::Started { .. })));
        let (short_tx, mut short_rx) = tokio::sync::mpsc::unbounded_channel();
        let before = Instant::now();
        engine.submit(request(&[4, 5, 6], 2, short_tx)).unwrap();
        let submitted = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        while let Ok(ev) = long_rx.try_recv() {
            assert!(matches!(ev, Event::Tokens { .. }), "the first request ended before it left: {ev:?}");
        }
        // The first request's client leaves: the engine reaps it, and the second one gets the row.
        let left = Instant::now();
        drop(long_rx);
        let waited = match short_rx.blocking_recv() {
            Some(Event::Started { queue_time }) => queue_time,
            ev => panic!("{ev:?}"),
        };
        assert!(waited >= left - submitted, "waited {waited:?}, but the row was taken for {:?}", left - submitted);
        assert!(waited <= before.elapsed(), "waited {waited:?}, longer than it has been");
        let end = std::iter::from_fn(|| short_rx.blocking_recv()).last();
        assert!(matches!(end, Some(Event::Finished { generated_tokens: 2, .. })), "{end:?}");
    }

    /// A preempted request waits again and is counted as waiting (the queue gauge autoscalers read), until it
    /// runs again; nothing stays counted once all have finished.
    #[test]
    fn preempted_requests_count_as_waiting() {
        let m = crate::model::load(&ModelSpec::Demo, &LoadOptions::default()).unwrap();
        let geo = m.model.kv_geometry(EngineConfig::default().block_size);
        // Room for 1000 positions: two requests growing to 908 each meet halfway, and the younger one waits
        // while the older one runs its ~400 steps left (without a prefix cache it cannot start again sooner).
        let kv_cache_bytes = geo.blocks_for(1000) * geo.block_bytes();
        let config = EngineConfig { kv_cache_bytes, prefix_caching: false, ..EngineConfig::default() };
        let engine = Engine::start(m.model, Arc::new(m.tokenizer), config).unwrap();
        let e = engine.clone();
        let ended = std::thread::spawn(move || {
            let runs: Vec<_> = (0..2)
                .map(|i| {
                    let e = e.clone();
                    std::thread::spawn(move || run_ids(&e, &[1 + i, 2, 3, 4, 5, 6, 7, 8], 900).0.len())
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>()
        });
        let stats = engine.stats();
        let since = Instant::now();
        while stats.preemptions.load(Ordering::Relaxed) == 0 {
            assert!(since.elapsed() < Duration::from_secs(60), "no preemption");
            std::thread::yield_now();
        }
        // (Counted in the same engine step as the preemption: wait for that step to end.)
        while stats.pending.load(Ordering::Relaxed) != 1 {
            assert!(since.elapsed() < Duration::from_secs(60), "the preempted request does not count as waiting");
            std::thread::yield_now();
        }
        assert_eq!(ended.join().unwrap(), [900, 900]);
        assert_eq!(stats.pending.load(Ordering::Relaxed), 0);
    }

    /// Blocks named in the prefix cache for a step that fails are taken back: a request whose step failed
    /// leaves nothing a later one could start from.
    #[test]
    fn a_failed_step_leaves_no_cached_block() {
        let engine = demo_engine();
        let prompt: Vec<u32> = (1..=40).collect();
        engine.stats().fail_steps.store(1, Ordering::Relaxed);
        let (_, end) = run_ids(&engine, &prompt, 4);
        assert!(failed_by_the_fault(&end), "{end:?}");
        // The gauges say the blocks went back, though the engine is idle after the failure.
        let since = Instant::now();
        let stats = engine.stats();
        while stats.kv_blocks_used.load(Ordering::Relaxed) + stats.running.load(Ordering::Relaxed) > 0 {
            assert!(since.elapsed() < Duration::from_secs(10), "the gauges still hold the failed step's rows");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (computed, end) = run_ids(&engine, &prompt, 4);
        assert!(matches!(end, Event::Finished { cached_tokens: 0, .. }), "{end:?}");
        let (cached, end) = run_ids(&engine, &prompt, 4);
        assert!(matches!(end, Event::Finished { cached_tokens: 32, .. }), "{end:?}");
        assert_eq!(cached, computed);
    }

    fn failed_by_the_fault(e: &Event) -> bool {
        matches!(e, Event::Failed(EngineError::Internal(m)) if m == "panic in the forward: injected fault")
    }

    /// A panic in the forward fails that step's batch and the engine goes on; only `MAX_FAILED_STEPS` failed
    /// steps in a row stop it (then the server exits and is restarted).
    #[test]
    fn a_panicking_forward_fails_its_batch_and_eight_in_a_row_stop_the_engine() {
        let engine = demo_engine();
        let fail = |n: usize| engine.stats().fail_steps.store(n, Ordering::Relaxed);
        fail(7);
        for _ in 0..7 {
            let e = run(&engine);
            assert!(failed_by_the_fault(&e), "{e:?}");
        }
        assert!(matches!(run(&engine), Event::Finished { generated_tokens: 2, .. }));
        // The success reset the count: seven more failures are still not eight in a row.
        fail(8);
        for _ in 0..7 {
            let e = run(&engine);
            assert!(failed_by_the_fault(&e), "{e:?}");
        }
        assert!(engine.is_running() && !engine.stats().stopped.load(Ordering::Relaxed));
        let e = run(&engine);
        assert!(failed_by_the_fault(&e), "{e:?}");
        let since = Instant::now();
        while engine.is_running() {
            assert!(since.elapsed() < Duration::from_secs(10), "the engine is still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(engine.stats().stopped.load(Ordering::Relaxed));
        assert_eq!(engine.stats().pending.load(Ordering::Relaxed), 0);
    }
}
