//! The gRPC server (`server serve`): the LoraServe service, `grpc.health.v1`, server reflection, optional API
//! keys and TLS, request size limits, Prometheus `/metrics`, and a graceful shutdown.
//!
//! [`start`] takes bound listeners (tests bind port 0), answers health immediately with NOT_SERVING, loads the
//! model on a blocking thread, then turns SERVING. [`ServerHandle::shutdown`] (SIGTERM/SIGINT in `main`)
//! turns health NOT_SERVING, refuses new requests, lets in-flight ones finish within the drain timeout, stops
//! the engine and returns.
//!
//! - [`service`]: the LoraServe implementation (validation at the edge); [`status`]: errors → gRPC codes
//!   (chat templates': `conversation.rs`).
//! - [`codec`]: undecodable messages → INVALID_ARGUMENT; [`auth`]: API keys; [`metrics_http`]: `/metrics`.
//! - [`client`]: the small client behind `server client`.
//! - Private: `counting.rs` (calls no handler saw, tonic's decoding faults restated), `deadline.rs`
//!   (`grpc-timeout`), `encoders.rs` (the threads that encode request text), `prompt.rs` (a request's prompt
//!   into token ids, for Generate and Tokenize), `tokenize.rs` (Tokenize, Detokenize), `conversation.rs` and
//!   [`render`] (chat templates), `listen.rs` (the accepted sockets), `arrival.rs` (when a call came),
//!   `grpc_only.rs` (HTTP requests that are no gRPC call), `health.rs` (`grpc.health.v1`, and the
//!   adapters folder's status: [`ADAPTERS_HEALTH_SERVICE`]).

mod arrival;
pub mod auth;
pub mod client;
pub mod codec;
pub(crate) mod completions;
mod conversation;
mod counting;
mod deadline;
mod encoders;
mod grpc_only;
mod health;
mod listen;
pub mod metrics_http;
mod prompt;
pub mod render;
pub mod request_log;
pub mod service;
pub mod status;
mod tokenize;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineConfig};
use crate::lora::cache::{AdapterCache, CacheConfig};
use crate::lora::store::AdapterStore;
use crate::model::{self, LoadOptions, ModelSpec};
use crate::telemetry as t;
use service::{Limits, Ready, Service, ServiceState};

/// Generated protobuf and gRPC code (`OUT_DIR`), and the descriptor set reflection serves.
pub mod proto {
    tonic::include_proto!("loraserve.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/loraserve_descriptor.bin"));
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // Not `#[from]`, which makes the inner error a `source` too: a printed chain would say everything twice.
    #[error("loading the model: {0}")]
    Model(model::ModelError),
    #[error("adapters root: {0}")]
    Store(crate::lora::store::StoreError),
    #[error("preloading adapter `{id}`: {reason}")]
    Preload { id: String, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the engine thread stopped unexpectedly (see the error logged before); exiting so the server is restarted"
    )]
    EngineStopped,
}

impl From<model::ModelError> for ServerError {
    fn from(e: model::ModelError) -> Self {
        ServerError::Model(e)
    }
}

impl From<crate::lora::store::StoreError> for ServerError {
    fn from(e: crate::lora::store::StoreError) -> Self {
        ServerError::Store(e)
    }
}

/// Everything `server serve` configures.
#[derive(Clone)]
pub struct ServeConfig {
    pub model: ModelSpec,
    pub load: LoadOptions,
    /// A chat template to render conversations with instead of the model's (`--chat-template`); adapters
    /// that bring their own keep theirs.
    pub chat_template: Option<String>,
    /// Requests that leave a sampling setting unset get the model's generation_config.json default for it
    /// (`--generation-config auto`, vLLM's default), or the neutral value (`none`).
    pub generation_config: bool,
    pub adapters: PathBuf,
    pub cache: CacheConfig,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub preload: Vec<String>,
    pub api_keys: Option<auth::ApiKeys>,
    /// PEM certificate chain and private key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    pub max_request_bytes: usize,
    pub drain_timeout: Duration,
    /// The `server` executable whose `render-worker` renders chat templates (`render.rs`): the binary's own
    /// path when it serves. None renders them on the server's threads (an embedding without the binary),
    /// where a hostile template can take the process down.
    pub template_worker: Option<PathBuf>,
}

/// The gRPC service name, also the `grpc.health.v1` service that reports readiness.
pub const SERVICE_NAME: &str = "loraserve.v1.LoraServe";
pub use health::ADAPTERS_HEALTH_SERVICE;

/// Streams one HTTP/2 connection may hold open at once: past the requests a server runs and queues at its
/// defaults (`--max-batch-size` + `--max-queue`), so only a client holding streams idle meets it; gRPC
/// clients queue calls past it, and proxies open another connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// How long a connection may go without the server receiving anything before it pings the client, and how
/// long the answer may take before the connection is closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// After the drain timeout has failed the requests still running (or a failed start), how long their clients
/// get to read the failure before the server stops waiting for the connections left open.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Waits [`CLOSE_GRACE`] for the server to finish its connections, then cuts those left (a client that stopped
/// reading, a health Watch, neither of which ends by itself) and waits for the server to stop.
async fn close(
    mut serve: JoinHandle<Result<(), tonic::transport::Error>>,
    cut: &CancellationToken,
) -> Result<Result<(), tonic::transport::Error>, tokio::task::JoinError> {
    if let Ok(r) = tokio::time::timeout(CLOSE_GRACE, &mut serve).await {
        return r;
    }
    tracing::warn!("connections still open (clients that stopped reading, health watches): closing them");
    cut.cancel();
    // A cut connection ends at its next poll, which the cut itself wakes: this wait is a backstop.
    match tokio::time::timeout(CLOSE_GRACE, &mut serve).await {
        Ok(r) => r,
        Err(_) => {
            serve.abort();
            Ok(Ok(()))
        }
    }
}

/// The request header that carries the adapter id for adapter-affinity routing (Envoy hashes on it; the
/// bundled client sets it; the service refuses a value that disagrees with the body's `adapter_id`).
pub const ADAPTER_ID_HEADER: &str = "x-adapter-id";

/// A running server.
pub struct ServerHandle {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    state: Arc<ServiceState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl ServerHandle {
    /// Starts the graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the model is loaded and the server answers requests (or it stopped).
    pub async fn ready(&self) -> bool {
        loop {
            if self.state.ready.get().is_some() {
                return true;
            }
            if self.task.is_finished() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The engine, once loaded (tests read its accounting).
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.state.ready.get().map(|r| r.engine.clone())
    }

    /// The adapter cache, once loaded.
    pub fn cache(&self) -> Option<AdapterCache> {
        self.state.ready.get().map(|r| r.cache.clone())
    }

    /// Whether the server has stopped (on its own, or after a shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the server to stop; the error, if it failed.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Loads the model and everything that depends on it (blocking: run on a blocking thread).
fn load(cfg: &ServeConfig) -> Result<Ready, ServerError> {
    let started = std::time::Instant::now();
    // The adapters root first: a mistyped --adapters fails now, not after minutes of loading a large model.
    let store = AdapterStore::open(&cfg.adapters)?;
    for u in store.scan().1 {
        tracing::warn!(folder = %u.path.display(), reason = %u.reason, "adapter folder not served: its path is no valid adapter id");
    }
    let mut loaded = model::load(&cfg.model, &cfg.load)?;
    if let Some(t) = &cfg.chat_template {
        loaded.tokenizer.chat.set_template(t.clone());
    }
    let m = &loaded.model;
    let (nf4_params, nf4_bytes) = m.nf4_footprint();
    tracing::info!(
        model = %cfg.model,
        params = m.num_parameters(),
        resident_bytes = m.resident_bytes(),
        nf4_bits_per_param = if nf4_params > 0 { nf4_bytes as f64 * 8.0 / nf4_params as f64 } else { 0.0 },
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    metrics::gauge!(t::BASE_MODEL_RESIDENT_BYTES).set(m.resident_bytes() as f64);
    let cache = AdapterCache::new(store, m.lora_layout(), m.device().clone(), cfg.cache);
    let context = m.config().max_position_embeddings;
    let vocab = m.config().vocab_size;
    // Tokens the model has no embedding for are refused in each prompt that holds them: said once now.
    let past = loaded.tokenizer.ids_past(vocab);
    if !past.is_empty() {
        let first: Vec<_> = past.iter().take(5).map(|(id, t)| format!("{t:?} ({id})")).collect();
        tracing::warn!(
            vocab_size = vocab,
            tokens = past.len(),
            first = %first.join(", "),
            "the tokenizer has tokens past the model's vocabulary: prompts that encode to them are refused"
        );
    }
    let eos = m.config().eos_token_ids.clone();
    // Refused at start, not in every request that leaves them unset.
    let defaults = match cfg.generation_config {
        false => Default::default(),
        true => m.config().sampling_defaults().map_err(|e| {
            ServerError::Model(model::ModelError::Invalid(format!(
                "{e} (serve with --generation-config none to leave the model's sampling defaults out)"
            )))
        })?,
    };
    if !defaults.is_empty() {
        tracing::info!(?defaults, "sampling defaults from generation_config.json for requests that leave them unset");
    }
    let chat = model::ChatTemplate::new(&loaded.tokenizer);
    // Whether `messages` can render (what Info says): a template that cannot render one user turn fails in our
    // environment, not on a conversation (a directive or filter minijinja lacks), and is said now, not first in
    // a request's error.
    let chat_usable = match &chat {
        Ok(chat) => {
            match chat.render(&[serde_json::json!({"role": "user", "content": "Hello"})], true, &Default::default()) {
                Err(model::ChatError::Render(e) | model::ChatError::Unavailable(e))
                    if !e.starts_with(model::chat::REFUSED) =>
                {
                    tracing::warn!(reason = %e, "the chat template fails on a one-turn conversation: requests with messages will likely be refused");
                    false
                }
                _ => {
                    tracing::info!("chat template loaded: requests may give messages");
                    true
                }
            }
        }
        Err(e) if loaded.tokenizer.chat.template.is_some() => {
            tracing::warn!(reason = %e, "requests with messages will be refused");
            false
        }
        Err(e) => {
            tracing::info!(reason = %e, "requests with messages will be refused");
            false
        }
    };
    let family = loaded.model.config().family.as_str();
    let tokenizer = Arc::new(loaded.tokenizer);
    let engine = Engine::start(loaded.model, tokenizer.clone(), cfg.engine).map_err(model::ModelError::from)?;
    let guides = Arc::new(crate::engine::structured::Guides::new(tokenizer.clone()));
    let renderer = render::Renderer::new(cfg.template_worker.clone());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let compiles = Arc::new(tokio::sync::Semaphore::new(cores));
    let encoders = encoders::Encoders::new(cores).map_err(ServerError::Io)?;
    let info = info_of(cfg, &engine, chat_usable, family, context, vocab, &eos);
    Ok(Ready {
        engine,
        tokenizer,
        chat,
        cache,
        context,
        vocab,
        eos,
        defaults,
        guides,
        renderer,
        compiles,
        encoders,
        info,
    })
}

/// A model folder's id for clients: its name, never its path (the server's file system is not the client's
/// business); a Hugging Face cache snapshot (`models--org--name/snapshots/<sha>`) as `org/name`.
fn model_id_of(dir: &std::path::Path) -> String {
    // `.`, `a/..`: the folder they name (loaded, so it resolves).
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent = dir.parent();
    let snapshot = parent.filter(|p| name(p).as_deref() == Some("snapshots")).and_then(|p| p.parent()).and_then(name);
    if let Some(repo) = snapshot.as_deref().and_then(|r| r.strip_prefix("models--")) {
        return repo.replacen("--", "/", 1);
    }
    name(&dir).unwrap_or_default()
}

/// The `Info` RPC's answer: what the server runs and the limits a request meets.
fn info_of(
    cfg: &ServeConfig,
    engine: &Engine,
    chat: bool,
    family: &str,
    context: usize,
    vocab: usize,
    eos: &[u32],
) -> proto::InfoResponse {
    let as_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let queue = engine.config().queue_capacity;
    proto::InfoResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        model_id: match &cfg.model {
            ModelSpec::Dir(dir) => model_id_of(dir),
            spec => spec.to_string(),
        },
        model_type: family.to_string(),
        quantization: match cfg.load.quant {
            crate::quant::QuantMode::Nf4 => "nf4",
            crate::quant::QuantMode::None => "none",
        }
        .to_string(),
        dtype: cfg.load.dtype.as_str().to_string(),
        device: if cfg.load.device.is_cuda() { "cuda" } else { "cpu" }.to_string(),
        max_model_len: as_u32(context),
        max_total_tokens: as_u32(context.min(engine.max_request_tokens())),
        vocab_size: as_u32(vocab),
        eos_token_ids: eos.to_vec(),
        max_new_tokens: cfg.limits.max_new_tokens_cap,
        max_n: completions::MAX_N.min(as_u32(queue)),
        max_queue: as_u32(queue),
        max_batch_size: as_u32(engine.config().max_batch_rows),
        max_stop_strings: as_u32(cfg.limits.max_stop_strings),
        max_stop_bytes: as_u32(cfg.limits.max_stop_bytes),
        max_top_logprobs: service::MAX_TOP_LOGPROBS,
        max_stop_token_ids: as_u32(service::MAX_STOP_TOKEN_IDS),
        max_bad_words: as_u32(crate::engine::bad_words::MAX_BAD_WORDS),
        max_bad_word_bytes: as_u32(crate::engine::bad_words::MAX_BAD_WORD_BYTES),
        max_request_bytes: cfg.max_request_bytes as u64,
        chat_template: chat,
        prefix_caching: engine.config().prefix_caching,
        adapter_cache_bytes: cfg.cache.device_bytes as u64,
        host_adapter_cache_bytes: cfg.cache.host_bytes as u64,
    }
}

/// Starts serving gRPC on `grpc` and `/metrics` on `metrics`.
pub async fn start(cfg: ServeConfig, grpc: TcpListener, metrics: TcpListener) -> Result<ServerHandle, ServerError> {
    let grpc_addr = grpc.local_addr()?;
    let metrics_addr = metrics.local_addr()?;
    // The recorder before anything can count: a gauge that moves by deltas (the queue) would otherwise lose
    // the increments of requests served before the `/metrics` task first ran, and go negative as they end.
    metrics_http::handle();
    let (stop, mut stop_rx) = watch::channel(false);
    let state = Arc::new(ServiceState { ready: OnceLock::new(), draining: false.into(), limits: cfg.limits });

    // `/metrics` outlives the drain: Prometheus sees the shutdown's last requests and counts.
    let (metrics_done, mut metrics_done_rx) = watch::channel(false);
    let metrics_task = tokio::spawn(metrics_http::serve(metrics, async move {
        let _ = metrics_done_rx.wait_for(|done| *done).await;
    }));

    let health = tonic_health::server::HealthReporter::new();
    let health_service = health::service(health.clone());
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    health.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
    health.set_service_status(ADAPTERS_HEALTH_SERVICE, tonic_health::ServingStatus::NotServing).await;
    // Both reflection protocols: v1, and v1alpha that older grpcurl and other tools still speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err = |e: tonic_reflection::server::Error| ServerError::Io(std::io::Error::other(e.to_string()));
    let reflection_v1 = reflection().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_err)?;

    let svc = Service { state: state.clone() };
    let max = cfg.max_request_bytes;
    // Requests compressed as grpcio, grpc-go and grpc-java clients send them (a channel's `compression`);
    // answers go out uncompressed (each streamed message is a few tokens).
    use tonic::codec::CompressionEncoding::{Deflate, Gzip};
    let lora_server = proto::lora_serve_server::LoraServeServer::new(svc)
        .max_decoding_message_size(max)
        .accept_compressed(Gzip)
        .accept_compressed(Deflate);
    let health_service = health_service.accept_compressed(Gzip).accept_compressed(Deflate);
    let (reflection_v1, reflection_v1alpha) = (
        reflection_v1.accept_compressed(Gzip).accept_compressed(Deflate),
        reflection_v1alpha.accept_compressed(Gzip).accept_compressed(Deflate),
    );
    // HTTP/2 limits: streams a connection may hold open at once (tonic sets no limit, and each open stream
    // holds memory until its call ends: one connection opened 14,250 that never sent a message), and pings
    // that find a peer gone without a FIN (its streams, and a health Watch, would otherwise stay open).
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some((cert, key)) = &cfg.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServerError::Tls(client::chain(&e)))?;
    }
    let keys = cfg.api_keys.clone();
    let router = builder
        .layer(arrival::StampArrival)
        .layer(grpc_only::GrpcOnly)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Calls refused before a handler runs (API key, decoding) are counted by the CountUnseen wrapper.
    let router = match keys {
        Some(k) => router.add_service(counting::CountUnseen::new(
            tonic::service::interceptor::InterceptedService::new(lora_server, move |r| k.check(r)),
        )),
        None => router.add_service(counting::CountUnseen::new(lora_server)),
    };

    // Shutdown begins: refuse new work and report NOT_SERVING before tonic stops accepting connections.
    let drain_state = state.clone();
    let drain_health = health.clone();
    let mut serve_stop = stop_rx.clone();
    // Socket options go here (`listen::incoming`): tonic ignores its builder's TCP settings for a listener
    // it is handed.
    let cut = CancellationToken::new();
    let incoming = listen::incoming(grpc, cut.clone());
    let serve = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = serve_stop.wait_for(|s| *s).await;
        drain_state.draining.store(true, Ordering::Relaxed);
        drain_health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        drain_health.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
    }));

    let task_state = state.clone();
    let stop_on_failure = stop.clone();
    let body = async move {
        // Load, then report SERVING — unless shutdown came first.
        let load_cfg = cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&load_cfg))
            .await
            .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))?;
        let ready = match loaded {
            Ok(r) => r,
            Err(e) => {
                let _ = stop_on_failure.send(true);
                let _ = close(serve, &cut).await;
                return Err(e);
            }
        };
        for id in &cfg.preload {
            if let Err(e) = ready.cache.load_adapter(id).await {
                let _ = stop_on_failure.send(true);
                let engine = ready.engine.clone();
                tokio::task::spawn_blocking(move || engine.shutdown(Duration::ZERO)).await.ok();
                let _ = close(serve, &cut).await;
                return Err(ServerError::Preload { id: id.clone(), reason: e.to_string() });
            }
        }
        let _watcher = ready.cache.watch().await;
        let engine = ready.engine.clone();
        let cache = ready.cache.clone();
        let _ = task_state.ready.set(ready);
        if !*stop_rx.borrow() {
            for service in ["", SERVICE_NAME, ADAPTERS_HEALTH_SERVICE] {
                health.set_service_status(service, tonic_health::ServingStatus::Serving).await;
            }
            // A shutdown since the check above may have set NOT_SERVING already: this is the last word.
            if *stop_rx.borrow() {
                for service in ["", SERVICE_NAME] {
                    health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
                }
            }
            // The adapters folder's status from now on (NOT_SERVING at the shutdown too).
            tokio::spawn(health::watch_adapters_folder(cache, health.clone(), stop_rx.clone()));
            tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, "serving");
        }
        // Serve until told to stop, or until the engine thread dies (a bug): then a live process that fails
        // every request would pass its health checks; stopping lets the orchestrator restart it.
        let engine_died = tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => false,
            _ = async { while engine.is_running() { tokio::time::sleep(Duration::from_millis(100)).await } } => true,
        };
        if engine_died {
            tracing::error!("the engine thread stopped unexpectedly: shutting down");
            let _ = stop_on_failure.send(true);
        }
        tracing::info!(drain_timeout_s = cfg.drain_timeout.as_secs_f64(), "shutting down: draining in-flight requests");
        let mut serve = serve;
        let drained = tokio::time::timeout(cfg.drain_timeout, &mut serve).await;
        let serve_result = match drained {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("drain timeout: failing the requests still running");
                let e = engine.clone();
                tokio::task::spawn_blocking(move || e.shutdown(Duration::ZERO)).await.ok();
                // Their clients get the failure at once, unless one stopped reading (its flow-control window
                // full) or holds a health Watch: its connection would hold the server open for as long as
                // the client lives.
                close(serve, &cut).await
            }
        };
        let e = engine.clone();
        tokio::task::spawn_blocking(move || e.shutdown(Duration::from_secs(5))).await.ok();
        if engine_died {
            return Err(ServerError::EngineStopped);
        }
        match serve_result {
            Ok(r) => r.map_err(ServerError::from),
            Err(e) => Err(ServerError::Io(std::io::Error::other(e.to_string()))),
        }
    };
    let task = tokio::spawn(async move {
        let result = body.await;
        let _ = metrics_done.send(true);
        // Closed by the time the server reports stopped (its listener dropped).
        let _ = tokio::time::timeout(Duration::from_secs(5), metrics_task).await;
        result
    });
    Ok(ServerHandle { grpc_addr, metrics_addr, state, stop, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder is installed when `start` returns, not when the `/metrics` task first runs: on a
    /// current-thread runtime that task has not run yet then, and a gauge moved by deltas (the queue) would
    /// lose the increments of requests served before it, then count their decrements (the −15 a load test
    /// once read). No other test of this binary starts a server or installs the recorder.
    #[test]
    fn the_recorder_is_installed_before_start_returns() {
        let adapters = tempfile::tempdir().unwrap();
        let cfg = ServeConfig {
            model: ModelSpec::Demo,
            load: Default::default(),
            chat_template: None,
            generation_config: true,
            adapters: adapters.path().to_path_buf(),
            cache: Default::default(),
            engine: Default::default(),
            limits: Default::default(),
            preload: vec![],
            api_keys: None,
            tls: None,
            max_request_bytes: 1 << 20,
            drain_timeout: Duration::from_secs(5),
            template_worker: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
            assert!(!metrics_http::installed(), "nothing installed the recorder before this test");
            let h = start(cfg, grpc, metrics).await.unwrap();
            assert!(metrics_http::installed(), "installed before any request can be served");
            assert!(h.ready().await);
            h.shutdown();
            h.wait().await.unwrap();
        });
    }

    #[test]
    fn a_model_id_is_a_folder_name_never_a_path() {
        let tmp = tempfile::tempdir().unwrap();
        let snapshot =
            tmp.path().join("models--meta-llama--Llama-3.2-1B/snapshots/4e20de362430cd3b72f300e6b0f18e50e7166e08");
        std::fs::create_dir_all(&snapshot).unwrap();
        assert_eq!(model_id_of(&snapshot), "meta-llama/Llama-3.2-1B");
        let plain = tmp.path().join("my-model");
        std::fs::create_dir_all(plain.join("sub")).unwrap();
        assert_eq!(model_id_of(&plain), "my-model");
        assert_eq!(model_id_of(&plain.join("sub/..")), "my-model");
    }
}
