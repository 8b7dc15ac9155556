//! Every metric loraserve exports: names (as consts, prefix `loraserve_`), descriptions, histogram buckets,
//! and the guard that counts a request in the queue gauge. A leaf module: any layer records through the
//! `metrics` facade with these names; the server installs the Prometheus recorder and serves `/metrics`.
//! Label values come from bounded sets only — adapter ids never become label values.

/// `{rpc, code}` — finished RPCs by method and gRPC status code.
pub const REQUESTS_TOTAL: &str = "loraserve_requests_total";
/// Seconds from a generate request's arrival to its last token.
pub const REQUEST_DURATION_SECONDS: &str = "loraserve_request_duration_seconds";
/// Seconds from arrival to the first generated token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "loraserve_time_to_first_token_seconds";
/// Seconds a request waited in the engine's queue before it first ran (vLLM's `request_queue_time_seconds`):
/// from its submission, after validation and its adapter's load, to its first step.
pub const REQUEST_QUEUE_TIME_SECONDS: &str = "loraserve_request_queue_time_seconds";
/// Seconds between consecutive tokens of one request.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "loraserve_inter_token_latency_seconds";
/// Requests admitted by the server and not running in the engine: waiting for their adapter, in the engine's
/// queue, or preempted and waiting to run again (gauge).
pub const QUEUE_REQUESTS: &str = "loraserve_queue_requests";
/// Rows (sequences) in each engine step (histogram).
pub const BATCH_SIZE: &str = "loraserve_batch_size";
pub const PROMPT_TOKENS_TOTAL: &str = "loraserve_prompt_tokens_total";
pub const GENERATED_TOKENS_TOTAL: &str = "loraserve_generated_tokens_total";
/// `{tier}` — adapter acquisitions served from a tier.
pub const ADAPTER_CACHE_HITS_TOTAL: &str = "loraserve_adapter_cache_hits_total";
/// `{tier}` — acquisitions the tier could not serve.
pub const ADAPTER_CACHE_MISSES_TOTAL: &str = "loraserve_adapter_cache_misses_total";
/// `{tier}` — adapters evicted from a tier to make room (superseded versions and unloads are not counted).
pub const ADAPTER_CACHE_EVICTIONS_TOTAL: &str = "loraserve_adapter_cache_evictions_total";
/// `{tier}` — bytes of adapter weights resident in a tier, as its budget counts them (gauge). On a CPU server
/// both tiers are RAM and an adapter in both is one copy, so the two tiers' sum overstates the memory.
pub const ADAPTER_CACHE_RESIDENT_BYTES: &str = "loraserve_adapter_cache_resident_bytes";
/// `{tier}` — adapters resident in a tier (gauge).
pub const ADAPTERS_RESIDENT: &str = "loraserve_adapters_resident";
/// Seconds to read, check and (on a GPU) copy an adapter from disk (loads that succeeded, whether or not the
/// device tier had room for it).
pub const ADAPTER_LOAD_DURATION_SECONDS: &str = "loraserve_adapter_load_duration_seconds";
/// Bytes the base model keeps resident (gauge).
pub const BASE_MODEL_RESIDENT_BYTES: &str = "loraserve_base_model_resident_bytes";
/// KV-cache blocks held by running sequences (gauge).
pub const KV_CACHE_BLOCKS_USED: &str = "loraserve_kv_cache_blocks_used";
/// Running sequences preempted because the KV cache ran out of blocks: their blocks freed, they wait to be
/// recomputed (vLLM's `num_preemptions_total`). A steady rate means `--kv-cache-bytes` is too small for the
/// load.
pub const PREEMPTIONS_TOTAL: &str = "loraserve_preemptions_total";
/// Prompt tokens of requests looked up in the prefix cache, counted when a request first runs (vLLM's
/// `prefix_cache_queries`). With [`PREFIX_CACHE_HITS_TOTAL`], the hit rate.
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "loraserve_prefix_cache_queries_total";
/// Of those, the tokens whose keys and values were found cached and not computed (vLLM's
/// `prefix_cache_hits`).
pub const PREFIX_CACHE_HITS_TOTAL: &str = "loraserve_prefix_cache_hits_total";
/// KV-cache blocks named in the prefix cache, held by a sequence or kept for reuse (gauge). Kept blocks are
/// evicted when new ones are needed, so they are not counted in [`KV_CACHE_BLOCKS_USED`].
pub const KV_CACHE_BLOCKS_CACHED: &str = "loraserve_kv_cache_blocks_cached";
/// Seconds the adapters folder has left a running look unanswered (since the look began, or a listing's last
/// step), the longest of them, 0 when none runs (gauge, set about once a second). The folder answers in
/// microseconds; a value that grows is a hung mount (the health service `loraserve.adapters` is NOT_SERVING
/// past the cache's wait).
pub const ADAPTERS_FOLDER_LOOK_SECONDS: &str = "loraserve_adapters_folder_look_seconds";
/// `{version}` — always 1.
pub const BUILD_INFO: &str = "loraserve_build_info";

/// One request counted in [`QUEUE_REQUESTS`] for as long as this lives. Two layers add to the gauge (the
/// engine's queue, and the server's requests waiting for their adapter), so it moves by deltas, never set.
pub struct Queued(());

impl Queued {
    pub fn enter() -> Self {
        metrics::gauge!(QUEUE_REQUESTS).increment(1.0);
        Queued(())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        metrics::gauge!(QUEUE_REQUESTS).decrement(1.0);
    }
}

/// The cache tiers, the only values of the `tier` label.
pub const TIER_DEVICE: &str = "device";
pub const TIER_HOST: &str = "host";

/// Latency buckets (seconds): 1 ms … 2 min.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Inter-token latency buckets (seconds): 0.5 ms … 5 s.
pub const TOKEN_LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Batch size buckets (rows per step).
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// (name, kind, description) for every metric, for registration and for tests of the exposition.
pub const ALL: &[(&str, &str, &str)] = &[
    (REQUESTS_TOTAL, "counter", "Finished RPCs by method and gRPC status code"),
    (REQUEST_DURATION_SECONDS, "histogram", "Seconds from arrival of a generate request to its last token"),
    (TIME_TO_FIRST_TOKEN_SECONDS, "histogram", "Seconds from arrival to the first generated token"),
    (INTER_TOKEN_LATENCY_SECONDS, "histogram", "Seconds between consecutive generated tokens of a request"),
    (REQUEST_QUEUE_TIME_SECONDS, "histogram", "Seconds a request waited in the engine's queue before it first ran"),
    (QUEUE_REQUESTS, "gauge", "Requests waiting for their adapter or to join the running batch"),
    (BATCH_SIZE, "histogram", "Sequences in each engine step"),
    (PROMPT_TOKENS_TOTAL, "counter", "Prompt tokens of admitted requests"),
    (GENERATED_TOKENS_TOTAL, "counter", "Generated tokens"),
    (ADAPTER_CACHE_HITS_TOTAL, "counter", "Adapter acquisitions served from a cache tier"),
    (ADAPTER_CACHE_MISSES_TOTAL, "counter", "Adapter acquisitions a cache tier could not serve"),
    (ADAPTER_CACHE_EVICTIONS_TOTAL, "counter", "Adapters evicted from a cache tier to make room for others"),
    (ADAPTER_CACHE_RESIDENT_BYTES, "gauge", "Bytes of adapter weights resident in a cache tier"),
    (ADAPTERS_RESIDENT, "gauge", "Adapters resident in a cache tier"),
    (
        ADAPTER_LOAD_DURATION_SECONDS,
        "histogram",
        "Seconds to read, check and (on a GPU) copy an adapter from disk (successful loads)",
    ),
    (BASE_MODEL_RESIDENT_BYTES, "gauge", "Bytes the base model keeps resident"),
    (KV_CACHE_BLOCKS_USED, "gauge", "KV-cache blocks held by running sequences"),
    (PREEMPTIONS_TOTAL, "counter", "Running sequences preempted for KV-cache blocks, to be recomputed"),
    (PREFIX_CACHE_QUERIES_TOTAL, "counter", "Prompt tokens looked up in the prefix cache"),
    (PREFIX_CACHE_HITS_TOTAL, "counter", "Prompt tokens found in the prefix cache, not computed"),
    (KV_CACHE_BLOCKS_CACHED, "gauge", "KV-cache blocks named in the prefix cache (held or kept for reuse)"),
    (
        ADAPTERS_FOLDER_LOOK_SECONDS,
        "gauge",
        "Seconds the adapters folder has left a running look unanswered, the longest (0 when none runs)",
    ),
    (BUILD_INFO, "gauge", "Build information; always 1"),
];

/// Registers descriptions (and so `# HELP` / `# TYPE` lines) for every metric, and starts the tiered cache
/// counters at 0 for both tiers, so hit ratios and eviction rates have a series from the first scrape (and
/// the queue gauge, which an autoscaler reads, and the adapters folder's look gauge, which an alert reads).
pub fn describe() {
    for &(name, kind, help) in ALL {
        match kind {
            "counter" => metrics::describe_counter!(name, help),
            "gauge" => metrics::describe_gauge!(name, help),
            _ => metrics::describe_histogram!(name, help),
        }
    }
    for name in [PREEMPTIONS_TOTAL, PREFIX_CACHE_QUERIES_TOTAL, PREFIX_CACHE_HITS_TOTAL] {
        metrics::counter!(name).increment(0);
    }
    // Moved by increments only: 0 until the first request (the engine sets the KV-cache gauges as it starts).
    metrics::gauge!(QUEUE_REQUESTS).increment(0.0);
    // Set by the server's health task once it is ready.
    metrics::gauge!(ADAPTERS_FOLDER_LOOK_SECONDS).set(0.0);
    for name in [ADAPTER_CACHE_HITS_TOTAL, ADAPTER_CACHE_MISSES_TOTAL, ADAPTER_CACHE_EVICTIONS_TOTAL] {
        for tier in [TIER_DEVICE, TIER_HOST] {
            metrics::counter!(name, "tier" => tier).increment(0);
        }
    }
}
