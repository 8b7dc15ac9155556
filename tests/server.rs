//! The real server on port 0, spoken to over gRPC: goldens (unary and streaming), 64 concurrent mixed
//! requests, every status code of the contract, cancellation freeing KV blocks and leases, health,
//! reflection, TLS, and the Prometheus exposition. Shutting down is `drain.rs`'s (in process) and
//! `server_binary.rs`'s (SIGTERM to the binary).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use common::serve::{config, req, start};
use common::{copy_dir, expected, fixture};
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::{self, GenerateRequest};
use loraserve::server::{self, auth::ApiKeys};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

/// Requests with the tokens the fixtures give them: greedy for every adapter and prompt, then greedy under
/// the sampling penalties (whose rows bring their logits whole, beside rows picked by their argmax).
fn goldens() -> Vec<(GenerateRequest, Vec<u32>)> {
    let exp = expected("llama");
    let mut out = Vec::new();
    for (name, cases) in &exp.results {
        let adapter = if name == "base" { "" } else { name };
        for c in cases {
            out.push((req(adapter, &c.prompt, c.greedy_new_ids.len() as u32), c.greedy_new_ids.clone()));
        }
    }
    for case in common::penalty_cases("llama-penalties").into_values() {
        for r in case.results {
            let base = req(case.adapter.as_deref().unwrap_or(""), &r.prompt, r.new_ids.len() as u32);
            let penalized = GenerateRequest {
                repetition_penalty: Some(case.repetition_penalty),
                frequency_penalty: case.frequency_penalty,
                presence_penalty: case.presence_penalty,
                ..base
            };
            out.push((penalized, r.new_ids));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn goldens_unary_and_streaming() {
    let (h, mut client) = start(config(fixture("llama/adapters"))).await;
    for (request, want) in goldens() {
        let what = format!("{:?} {:?} {:?}", request.adapter_id, request.prompt, request.repetition_penalty);
        let r = client.generate(request.clone()).await.unwrap().into_inner();
        assert_eq!(r.token_ids, want, "{what} unary");
        assert_eq!(r.finish_reason(), proto::FinishReason::Length);
        assert_eq!(
            r.prompt_tokens as usize,
            expected("llama").results["base"].iter().find(|c| c.prompt == request.prompt).unwrap().input_ids.len()
        );
        assert_eq!(r.adapter_version.is_empty(), request.adapter_id.is_empty());
        let mut s = client.generate_stream(request).await.unwrap().into_inner();
        let (mut ids, mut text, mut last) = (Vec::new(), String::new(), None);
        while let Some(m) = s.next().await {
            let m = m.unwrap();
            ids.extend(m.token_ids.iter().copied());
            text.push_str(&m.text);
            last = Some(m.finish_reason());
        }
        assert_eq!(ids, want, "{what} streaming");
        assert_eq!(text, r.text);
        assert_eq!(last, Some(proto::FinishReason::Length));
    }
    h.shutdown();
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_mixed_requests_equal_each_alone() {
    let (h, client) = start(config(fixture("llama/adapters"))).await;
    let cases = goldens();
    assert!(cases.len() <= 64, "every case runs");
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut c = client.clone();
            let (request, want) = cases[i % cases.len()].clone();
            tokio::spawn(async move {
                let what = format!("{:?} {:?} {:?}", request.adapter_id, request.prompt, request.repetition_penalty);
                let got = if i % 2 == 0 {
                    c.generate(request).await.unwrap().into_inner().token_ids
                } else {
                    let mut s = c.generate_stream(request).await.unwrap().into_inner();
                    let mut ids = Vec::new();
                    while let Some(m) = s.next().await {
                        ids.extend(m.unwrap().token_ids);
                    }
                    ids
                };
                assert_eq!(got, want, "request {i}: {what}");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let engine = h.engine().unwrap();
    assert!(engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed) < 64 * 12, "requests were batched");
    h.shutdown();
    h.wait().await.unwrap();
}

/// The goldens, each twice at once, through a KV cache they outgrow together and in prefill chunks of 5
/// tokens: sequences are preempted and recomputed (finding their own cached blocks), later ones start from
/// blocks earlier ones left in the prefix cache, and every answer is still the golden one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preempted_and_cached_sequences_still_answer_the_goldens() {
    let mut cfg = config(fixture("llama/adapters"));
    cfg.engine.max_batch_tokens = 5;
    // 1152 bytes a token (3 layers · 3 kv heads · 16 dims · k and v · 4 bytes): 14 blocks of 4 tokens.
    cfg.engine.kv_cache_bytes = 64 << 10;
    let (h, client) = start(cfg).await;
    let tasks: Vec<_> = goldens()
        .into_iter()
        .flat_map(|case| [case.clone(), case])
        .map(|(request, want)| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let what = format!("{:?} {:?} {:?}", request.adapter_id, request.prompt, request.repetition_penalty);
                let r = c.generate(request).await.unwrap().into_inner();
                assert_eq!(r.token_ids, want, "{what}");
                r.cached_prompt_tokens
            })
        })
        .collect();
    let mut cached = 0;
    for t in tasks {
        cached += t.await.unwrap();
    }
    let preemptions = h.engine().unwrap().stats().preemptions.load(std::sync::atomic::Ordering::Relaxed);
    assert!(preemptions > 0 && cached > 0, "the test covers neither preemption nor reuse: {preemptions}, {cached}");
    h.shutdown();
    h.wait().await.unwrap();
}

async fn code_of(r: Result<tonic::Response<proto::GenerateResponse>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_status_code_of_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Good adapters, a broken one, one for another base (wrong shapes).
    for name in ["qv-r4", "qkvo-r8"] {
        copy_dir(&fixture("llama/adapters").join(name), &root.join(name));
    }
    copy_dir(&fixture("llama/adapters/qv-r4"), &root.join("broken"));
    std::fs::write(root.join("broken/adapter_config.json"), "{\"r\": 4, ").unwrap();
    copy_dir(&fixture("mistral/adapters/qv-r4"), &root.join("other-base"));
    let mut cfg = config(root.to_path_buf());
    // Room for one adapter in the device tier.
    let one = std::fs::metadata(root.join("qkvo-r8/adapter_model.safetensors")).unwrap().len() as usize;
    cfg.cache.device_bytes = one + 16;
    // The tiny model generates fast: wait only briefly for pinned bytes to be released.
    cfg.cache.default_wait = Duration::from_millis(20);
    let (h, mut c) = start(cfg).await;

    let ok = code_of(c.generate(req("qv-r4", "alpha", 2)).await).await;
    assert_eq!(ok.0, Code::Ok);
    for (r, field) in [
        (req("", "", 4), "prompt"),
        (req("", "alpha", 257), "max_new_tokens"),
        (GenerateRequest { temperature: Some(-1.0), ..req("", "alpha", 4) }, "temperature"),
        (GenerateRequest { top_p: Some(1.5), ..req("", "alpha", 4) }, "top_p"),
        (GenerateRequest { top_p: Some(-0.1), ..req("", "alpha", 4) }, "top_p"),
        (GenerateRequest { repetition_penalty: Some(-1.0), ..req("", "alpha", 4) }, "repetition_penalty"),
        (GenerateRequest { frequency_penalty: 2.5, ..req("", "alpha", 4) }, "frequency_penalty"),
        (GenerateRequest { presence_penalty: f32::NAN, ..req("", "alpha", 4) }, "presence_penalty"),
        (GenerateRequest { min_p: Some(1.01), ..req("", "alpha", 4) }, "min_p"),
        (GenerateRequest { min_tokens: 5, ..req("", "alpha", 4) }, "min_tokens"),
        (GenerateRequest { logprobs: true, top_logprobs: 21, ..req("", "alpha", 4) }, "top_logprobs"),
        (GenerateRequest { top_logprobs: 2, ..req("", "alpha", 4) }, "top_logprobs: requires logprobs"),
        (GenerateRequest { prompt_logprobs: Some(21), ..req("", "alpha", 4) }, "prompt_logprobs: must be in 0..=20"),
        (GenerateRequest { stop_token_ids: vec![5, 320], ..req("", "alpha", 4) }, "stop_token_ids[1]: token id 320"),
        (GenerateRequest { stop_token_ids: vec![5; 65], ..req("", "alpha", 4) }, "stop_token_ids: at most 64"),
        (GenerateRequest { logit_bias: [(5, 101.0)].into(), ..req("", "alpha", 4) }, "logit_bias[5] must be in"),
        (GenerateRequest { logit_bias: [(320, 1.0)].into(), ..req("", "alpha", 4) }, "logit_bias: token id 320"),
        (GenerateRequest { allowed_token_ids: vec![5, 320], ..req("", "alpha", 4) }, "allowed_token_ids[1]: token"),
        // The fixture llama's EOS is 1.
        (GenerateRequest { allowed_token_ids: vec![1], min_tokens: 2, ..req("", "alpha", 4) }, "cannot be met"),
        (GenerateRequest { stop: vec![String::new()], ..req("", "alpha", 4) }, "stop[0]"),
        (req("", &"alpha ".repeat(200), 4), "context"),
        (req("../etc", "alpha", 4), "adapter_id: invalid adapter id"),
        (req(&"x".repeat(129), "alpha", 4), "adapter_id: invalid adapter id"),
    ] {
        let (code, msg) = code_of(c.generate(r).await).await;
        assert_eq!(code, Code::InvalidArgument, "{field}: {msg}");
        assert!(msg.contains(field), "{field}: {msg}");
    }
    // The affinity header must agree with the body.
    let mut r = tonic::Request::new(req("qv-r4", "alpha", 2));
    r.metadata_mut().insert("x-adapter-id", "qkvo-r8".parse().unwrap());
    let (code, msg) = code_of(c.generate(r).await).await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("x-adapter-id"));
    // Invalid UTF-8 in the prompt never reaches the engine: the message does not decode.
    let (code, msg) = raw_generate_with_bad_utf8(h.grpc_addr).await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // NOT_FOUND, FAILED_PRECONDITION (broken files; wrong base), both naming the file.
    assert_eq!(code_of(c.generate(req("missing", "alpha", 2)).await).await.0, Code::NotFound);
    let unload = c.unload_adapter(proto::UnloadAdapterRequest { adapter_id: "missing".into() }).await;
    assert_eq!(unload.unwrap_err().code(), Code::NotFound);
    let (code, msg) = code_of(c.generate(req("broken", "alpha", 2)).await).await;
    assert_eq!(code, Code::FailedPrecondition);
    assert!(msg.contains("adapter_config.json"), "{msg}");
    let (code, msg) = code_of(c.generate(req("other-base", "alpha", 2)).await).await;
    assert_eq!(code, Code::FailedPrecondition);
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    // RESOURCE_EXHAUSTED: the one device slot is pinned by a lease, as a running request holds one (held here
    // for as long as it takes: a running request of the tiny model could end before the check, on a busy
    // machine).
    let pinned = h.cache().unwrap().acquire("qkvo-r8", None).await.unwrap();
    let (code, msg) = code_of(c.generate(req("qv-r4", "alpha", 2)).await).await;
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    // DEADLINE_EXCEEDED, enforced by the server (the header alone, no client-side timer) and never the CANCELLED
    // "Timeout expired" of tonic's own timer for the header. LoadAdapter waits for room within its own deadline,
    // not the server's default wait; so does a Generate waiting for its adapter.
    let load = proto::LoadAdapterRequest { adapter_id: "qv-r4".into() };
    let started = std::time::Instant::now();
    let (code, msg) = common::wire::raw_call_with_timeout(h.grpc_addr, "LoadAdapter", "300m", &load).await;
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");
    assert!(started.elapsed() >= Duration::from_millis(200), "gave up before its deadline: {:?}", started.elapsed());
    let (code, msg) =
        common::wire::raw_call_with_timeout(h.grpc_addr, "Generate", "300m", &req("qv-r4", "alpha", 4)).await;
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");
    drop(pinned);
    // A deadline that passes while tokens are generated: the handler's deadline ends the call.
    let (code, msg) = common::wire::raw_call_with_timeout(h.grpc_addr, "Generate", "30m", &req("", "alpha", 250)).await;
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");
    // So does a stream's, after the handler has returned (it used to wait for the client to give up, and
    // count CANCELLED; this client never gives up).
    let (code, msg) =
        common::wire::raw_call_with_timeout(h.grpc_addr, "GenerateStream", "30m", &req("", "alpha", 250)).await;
    assert_eq!((code, msg.as_str()), (Code::DeadlineExceeded, "deadline exceeded"));
    // UNAVAILABLE once draining.
    h.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Ok(mut c2) = LoraServeClient::connect(format!("http://{}", h.grpc_addr)).await {
        let (code, _) = code_of(c2.generate(req("", "alpha", 2)).await).await;
        assert!(matches!(code, Code::Unavailable), "{code:?}");
    }
    h.wait().await.unwrap();
}

/// What no retry can fix is FAILED_PRECONDITION naming the flag to change, not the retryable
/// RESOURCE_EXHAUSTED: an adapter larger than the whole device tier, a request needing more KV blocks than the
/// whole cache (3 layers · 3 kv heads · 16 dims · k and v · 4 bytes = 1152 bytes a token; 64 KiB hold 56).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_can_never_fit_are_failed_precondition() {
    let mut cfg = config(fixture("llama/adapters"));
    cfg.cache.device_bytes = 1000;
    cfg.engine.kv_cache_bytes = 64 << 10;
    let (h, mut c) = start(cfg).await;
    let (code, msg) = code_of(c.generate(req("qv-r4", "alpha", 2)).await).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("--adapter-cache-bytes"), "{msg}");
    // Too long for the KV cache is found before the adapter is leased (or loaded, or waited for).
    for adapter in ["", "qv-r4"] {
        let (code, msg) = code_of(c.generate(req(adapter, "alpha", 200)).await).await;
        assert_eq!(code, Code::FailedPrecondition, "{msg}");
        assert!(msg.contains("--kv-cache-bytes"), "{adapter}: {msg}");
    }
    assert_eq!(code_of(c.generate(req("", "alpha", 8)).await).await.0, Code::Ok, "a request that fits still runs");
    // At the boundary: the last token is sampled, never fed back, so 40 prompt ids and 17 new tokens fill
    // the 56 positions exactly; one token more does not fit.
    let exact = |n| GenerateRequest { prompt_token_ids: vec![5; 40], ignore_eos: true, ..req("", "", n) };
    assert_eq!(c.generate(exact(17)).await.unwrap().into_inner().token_ids.len(), 17);
    assert_eq!(code_of(c.generate(exact(18)).await).await.0, Code::FailedPrecondition);
    // Info says so: 40 + 17 is the most a request may ask for here (the context is 512).
    let info = c.info(proto::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.max_total_tokens, info.max_model_len), (40 + 17, 512));
    // max_new_tokens 0 asks for as many as fit: here, what the KV cache holds; a prompt it cannot hold with one
    // new token is refused as any such request.
    assert_eq!(c.generate(exact(0)).await.unwrap().into_inner().token_ids.len(), 17);
    let full = GenerateRequest { prompt_token_ids: vec![5; 57], ..req("", "", 0) };
    let (code, msg) = code_of(c.generate(full).await).await;
    assert!(code == Code::FailedPrecondition && msg.contains("--kv-cache-bytes"), "{code:?} {msg}");
    h.shutdown();
    h.wait().await.unwrap();
    // Refused before the queue: not "retry later" when the queue is full, and never taking a place in it.
    let mut cfg = config(fixture("llama/adapters"));
    (cfg.engine.kv_cache_bytes, cfg.engine.queue_capacity) = (64 << 10, 0);
    let (h, mut c) = start(cfg).await;
    let (code, msg) = code_of(c.generate(req("", "alpha", 200)).await).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert_eq!(code_of(c.generate(req("", "alpha", 8)).await).await.0, Code::ResourceExhausted, "the queue is full");
    h.shutdown();
    h.wait().await.unwrap();
}

/// Info answers what the server was started with and what the model is (the fixture llama's config.json):
/// the limits a client sizes its requests by.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn info_says_what_the_server_runs_and_its_limits() {
    let mut cfg = config(fixture("llama/adapters"));
    (cfg.engine.queue_capacity, cfg.engine.prefix_caching) = (9, false);
    let (h, mut c) = start(cfg).await;
    let info = c.info(proto::InfoRequest {}).await.unwrap().into_inner();
    let want = proto::InfoResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        model_id: "model".into(),
        model_type: "llama".into(),
        quantization: "none".into(),
        dtype: "f32".into(),
        device: "cpu".into(),
        max_model_len: 512,
        // 8 MiB of KV blocks hold more than the context.
        max_total_tokens: 512,
        vocab_size: 320,
        eos_token_ids: vec![1],
        max_new_tokens: 256,
        max_n: 9,
        max_queue: 9,
        max_batch_size: 32,
        max_stop_strings: 16,
        max_stop_bytes: 256,
        max_top_logprobs: 20,
        max_request_bytes: 64 << 10,
        chat_template: false,
        prefix_caching: false,
        adapter_cache_bytes: 64 << 20,
        host_adapter_cache_bytes: 64 << 20,
        max_stop_token_ids: 64,
        max_bad_words: 64,
        max_bad_word_bytes: 256,
    };
    assert_eq!(info, want);
    // The limits it states are the ones requests meet.
    let ask_n = |n| GenerateRequest { n: Some(n), ..req("", "alpha", 1) };
    assert_eq!(code_of(c.generate(ask_n(info.max_n)).await).await.0, Code::Ok);
    assert_eq!(code_of(c.generate(ask_n(info.max_n + 1)).await).await.0, Code::InvalidArgument);
    let fill = |total: u32| GenerateRequest { prompt_token_ids: vec![5; 500], ..req("", "", total - 500) };
    assert_eq!(code_of(c.generate(fill(info.max_total_tokens)).await).await.0, Code::Ok);
    assert_eq!(code_of(c.generate(fill(info.max_total_tokens + 1)).await).await.0, Code::InvalidArgument);
    // max_new_tokens 0: as many as fit, the cap (256) or the context's room, none at all refused.
    let fit = |prompt: usize| GenerateRequest { prompt_token_ids: vec![5; prompt], ignore_eos: true, ..req("", "", 0) };
    for (prompt, new) in [(2, 256), (500, 12)] {
        assert_eq!(c.generate(fit(prompt)).await.unwrap().into_inner().token_ids.len(), new, "{prompt}");
    }
    let s = c.generate(fit(512)).await.unwrap_err();
    let words =
        "prompt_token_ids: 512 prompt tokens leave no room for a new token in the model's context of 512 positions";
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, words));
    let messages = vec![proto::ChatMessage { role: "user".into(), content: "hi".into() }];
    let chat = c.generate(GenerateRequest { messages, ..req("", "", 1) }).await;
    assert_eq!(code_of(chat).await.0, Code::FailedPrecondition, "no chat template, as Info says");
    h.shutdown();
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_full_is_resource_exhausted() {
    let mut cfg = config(fixture("llama/adapters"));
    cfg.engine.max_batch_rows = 1;
    cfg.engine.queue_capacity = 1;
    let (h, c) = start(cfg).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { code_of(c.generate(req("", "alpha beta", 100)).await).await.0 })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    assert!(codes.contains(&Code::Ok), "{codes:?}");
    h.shutdown();
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_guard_the_service_but_not_health() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), "secret-1\nsecret-2\n").unwrap();
    let mut cfg = config(fixture("llama/adapters"));
    cfg.api_keys = Some(ApiKeys::from_file(tmp.path()).unwrap());
    let (h, mut c) = start(cfg).await;
    assert_eq!(code_of(c.generate(req("", "alpha", 2)).await).await.0, Code::Unauthenticated);
    let mut r = tonic::Request::new(req("", "alpha", 2));
    r.metadata_mut().insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(code_of(c.generate(r).await).await.0, Code::Unauthenticated);
    let mut r = tonic::Request::new(req("", "alpha", 2));
    r.metadata_mut().insert("authorization", "Bearer secret-1".parse().unwrap());
    assert_eq!(code_of(c.generate(r).await).await.0, Code::Ok);
    // Requests of different keys share no cached prompt blocks: the second key computes the prompt the first
    // key's requests find cached.
    let mut cached_as = async |key: &str| {
        let mut r = tonic::Request::new(req("", "red cat blue dog one two", 2));
        r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        c.generate(r).await.unwrap().into_inner().cached_prompt_tokens
    };
    let first = [cached_as("secret-1").await, cached_as("secret-1").await];
    let second = [cached_as("secret-2").await, cached_as("secret-2").await];
    assert_eq!((first, second), ([0, 12], [0, 12]));
    // Past --max-request-bytes (64 KiB here): refused while decoding, before the handler.
    let mut r = tonic::Request::new(req("", &"x".repeat(70 << 10), 2));
    r.metadata_mut().insert("authorization", "Bearer secret-1".parse().unwrap());
    assert_eq!(code_of(c.generate(r).await).await.0, Code::OutOfRange);
    // Tokenize, Detokenize and Info are guarded too, and counted under their own names.
    let s = c.tokenize(proto::TokenizeRequest { prompt: "alpha".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = c.detokenize(proto::DetokenizeRequest { token_ids: vec![1], ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(c.info(proto::InfoRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    // Calls the handlers never saw are counted too (these codes come from this test only).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let parsed = parse_prometheus(&common::metrics_text(h.metrics_addr).await);
    let total = |code: &str| {
        let key = format!("{}{{code=\"{code}\",rpc=\"Generate\"}}", loraserve::telemetry::REQUESTS_TOTAL);
        parsed.samples.get(&key).copied().unwrap_or(0.0)
    };
    assert_eq!((total("UNAUTHENTICATED"), total("OUT_OF_RANGE")), (2.0, 1.0));
    for rpc in ["Tokenize", "Detokenize", "Info"] {
        let key = format!("{}{{code=\"UNAUTHENTICATED\",rpc=\"{rpc}\"}}", loraserve::telemetry::REQUESTS_TOTAL);
        assert_eq!(parsed.samples.get(&key), Some(&1.0), "{rpc}");
    }
    // The bundled client never sends a call without a key it was given but no header can carry.
    let t = loraserve::server::client::Target {
        addr: h.grpc_addr.to_string(),
        api_key: Some("ключ".into()),
        ..Default::default()
    };
    let e = loraserve::server::client::list(&t).await.unwrap_err().to_string();
    assert!(e.starts_with("--api-key (LORASERVE_API_KEY): the API key has 'к' at byte 0"), "{e}");
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let s = health
        .check(tonic_health::pb::HealthCheckRequest { service: "loraserve.v1.LoraServe".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    h.shutdown();
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancellation_frees_batch_slot_kv_blocks_and_lease() {
    let (h, c) = start(config(fixture("llama/adapters"))).await;
    let engine = h.engine().unwrap();
    let cache = h.cache().unwrap();
    let mut s = c.clone().generate_stream(req("qkvo-r8", "alpha beta gamma", 250)).await.unwrap().into_inner();
    s.next().await.unwrap().unwrap();
    assert!(engine.stats().kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_eq!(cache.leases(), 1);
    drop(s); // the client goes away mid-generation
    let freed = async {
        while engine.stats().kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed) != 0
            || cache.leases() != 0
            || engine.stats().running.load(std::sync::atomic::Ordering::Relaxed) != 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), freed).await.expect("resources freed after cancellation");
    // Unary cancellation (client-side timeout drops the call).
    let mut c2 = c.clone();
    let mut r = tonic::Request::new(req("qv-r4", "alpha", 250));
    r.set_timeout(Duration::from_millis(50));
    let _ = c2.generate(r).await;
    let freed = async {
        while engine.stats().kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed) != 0 || cache.leases() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), freed).await.expect("resources freed after unary cancellation");
    h.shutdown();
    h.wait().await.unwrap();
}

/// A streaming client that leaves while its request still waits in the queue frees the queue slot and the
/// adapter lease at once (as vLLM aborts), not when the requests ahead of it have run and its own has started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_abandoned_in_the_queue_frees_its_slot_and_lease_at_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut cfg = config(fixture("llama/adapters"));
    cfg.engine.max_batch_rows = 1;
    let (h, c) = start(cfg).await;
    let engine = h.engine().unwrap();
    let cache = h.cache().unwrap();
    // Ten base-model requests of 250 tokens each (no EOS on this prompt), one at a time.
    let ahead: Vec<_> = (0..10)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(req("", "alpha beta", 250)).await.map(|_| ()) })
        })
        .collect();
    let queued = async {
        while engine.stats().pending.load(Relaxed) < 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), queued).await.expect("requests queued");
    let s = c.clone().generate_stream(req("qkvo-r8", "alpha", 10)).await.unwrap().into_inner();
    assert_eq!(cache.leases(), 1, "the queued stream holds its adapter");
    drop(s);
    let released = async {
        while cache.leases() != 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), released).await.expect("lease released");
    let still_waiting = engine.stats().pending.load(Relaxed);
    assert!(still_waiting >= 5, "the lease went only once the queue ahead had drained ({still_waiting} waiting)");
    for t in ahead {
        t.await.unwrap().unwrap();
    }
    h.shutdown();
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_both_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let (h, _) = start(config(fixture("llama/adapters"))).await;
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap().connect().await.unwrap();
    let mut r = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = r.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = s.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("no service list") };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("loraserve.v1.LoraServe") && names.contains("grpc.health.v1.Health"), "{names:?}");
    // v1alpha too (older grpcurl).
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::{
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let channel = Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap().connect().await.unwrap();
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut r = ServerReflectionClient::new(channel);
        let mut s = r.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
        let resp = s.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("v1alpha") };
        assert!(list.service.iter().any(|s| s.name == "loraserve.v1.LoraServe"));
    }
    h.shutdown();
    h.wait().await.unwrap();
}

/// TLS: the bundled client reaches a TLS server with the CA's certificate (`--ca-cert`) or through the
/// system's trusted CAs; with another CA, or over plain HTTP/2, it fails and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_serving_and_the_bundled_client() {
    use loraserve::server::client::{health, Target};
    let tls = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
    let mut cfg = config(fixture("llama/adapters"));
    cfg.tls = Some((std::fs::read(tls.join("server.pem")).unwrap(), std::fs::read(tls.join("server.key")).unwrap()));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = server::start(cfg, grpc, metrics).await.unwrap();
    assert!(h.ready().await);
    let port = h.grpc_addr.port();
    let target = |addr: String, ca_cert| Target { addr, api_key: None, ca_cert, deadline: None };
    let wait = Duration::from_secs(10);
    // Schemes are case-insensitive: `HTTPS://` is TLS too.
    for (scheme, host) in [("https", "localhost"), ("https", "127.0.0.1"), ("HTTPS", "localhost")] {
        let t = target(format!("{scheme}://{host}:{port}"), Some(tls.join("ca.pem")));
        assert!(health(&t, "", wait).await.unwrap(), "{scheme} {host}");
    }
    // Another CA: the handshake fails, and the error says more than "transport error".
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), std::fs::read(tls.join("server.pem")).unwrap()).unwrap();
    // Without --ca-cert the system's trusted CAs verify the server: `SSL_CERT_FILE` stands in for the store.
    let https = format!("https://localhost:{port}");
    let with_store = |store: PathBuf| {
        let https = https.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_server"))
                .args(["client", "--addr", &https, "health"])
                .env("SSL_CERT_FILE", store)
                .env_remove("SSL_CERT_DIR")
                .env_remove("LORASERVE_CA_CERT")
                .output()
                .unwrap()
        })
    };
    let trusted = with_store(tls.join("ca.pem")).await.unwrap();
    assert!(trusted.status.success(), "{trusted:?}");
    let untrusted = with_store(other.path().into()).await.unwrap();
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success() && stderr.contains(&format!("connecting to {https}: ")), "{untrusted:?}");
    let e = health(&target(format!("https://localhost:{port}"), Some(other.path().into())), "", wait)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(&format!("connecting to https://localhost:{port}: transport error: ")), "{e}");
    assert!(health(&target(format!("127.0.0.1:{port}"), None), "", wait).await.is_err(), "plain HTTP/2 to TLS");
    h.shutdown();
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_exposition_has_every_contract_metric_with_its_type_and_labels() {
    let (h, mut c) = start(config(fixture("llama/adapters"))).await;
    // A first load (both tiers miss), then a device hit: every tiered counter has a sample of its own.
    c.generate(req("qv-r4", "alpha", 3)).await.unwrap();
    c.generate(req("qv-r4", "alpha", 3)).await.unwrap();
    let _ = c.generate(req("missing", "alpha", 3)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let body = common::metrics_text(h.metrics_addr).await;
    let parsed = parse_prometheus(&body);
    for &(name, kind, _) in loraserve::telemetry::ALL {
        assert_eq!(parsed.types.get(name).map(String::as_str), Some(kind), "# TYPE of {name}");
    }
    let labels = |name: &str| parsed.label_sets.get(name).cloned().unwrap_or_default();
    assert!(labels(loraserve::telemetry::REQUESTS_TOTAL)
        .iter()
        .all(|l| l == &vec!["code".to_string(), "rpc".to_string()]));
    for tiered in [
        loraserve::telemetry::ADAPTER_CACHE_HITS_TOTAL,
        loraserve::telemetry::ADAPTER_CACHE_MISSES_TOTAL,
        loraserve::telemetry::ADAPTER_CACHE_RESIDENT_BYTES,
        loraserve::telemetry::ADAPTERS_RESIDENT,
    ] {
        let values = parsed.label_values.get(&(tiered.to_string(), "tier".to_string())).cloned().unwrap_or_default();
        assert!(!values.is_empty() && values.iter().all(|v| v == "device" || v == "host"), "{tiered}: {values:?}");
    }
    // Adapter ids never become label values.
    assert!(!body.contains("qv-r4") && !body.contains("missing"));
    let ok = parsed
        .samples
        .get(&format!("{}{{code=\"OK\",rpc=\"Generate\"}}", loraserve::telemetry::REQUESTS_TOTAL))
        .copied()
        .unwrap_or(0.0);
    assert!(ok >= 1.0);
    // A first load missed both tiers.
    let host_misses = format!("{}{{tier=\"host\"}}", loraserve::telemetry::ADAPTER_CACHE_MISSES_TOTAL);
    assert!(parsed.samples.get(&host_misses).copied().unwrap_or(0.0) >= 1.0, "{host_misses}");
    assert!(body.contains("loraserve_batch_size_bucket{le=\"1\"}"));
    h.shutdown();
    h.wait().await.unwrap();
}

// ---- helpers ----

/// Sends a GenerateRequest whose prompt bytes are not UTF-8, bypassing the typed client.
async fn raw_generate_with_bad_utf8(addr: std::net::SocketAddr) -> (Code, String) {
    // Field 2 (prompt), wire type 2, length 2, bytes 0xff 0xfe; field 3 (max_new_tokens) = 4.
    let body: Vec<u8> = vec![0x12, 0x02, 0xff, 0xfe, 0x18, 0x04];
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/loraserve.v1.LoraServe/Generate");
    let r: Result<tonic::Response<Vec<u8>>, tonic::Status> =
        grpc.unary(tonic::Request::new(body), path, RawCodec).await;
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[derive(Default, Clone)]
struct RawCodec;
struct RawEnc;
struct RawDec;
impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}
impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}
impl tonic::codec::Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

#[derive(Default)]
struct Parsed {
    types: BTreeMap<String, String>,
    /// metric family → sorted label-name sets seen
    label_sets: BTreeMap<String, Vec<Vec<String>>>,
    /// (family, label) → values seen
    label_values: BTreeMap<(String, String), BTreeSet<String>>,
    /// full series text → value
    samples: BTreeMap<String, f64>,
}

/// A small parser of the Prometheus text format (enough to check names, types and labels).
fn parse_prometheus(text: &str) -> Parsed {
    let mut p = Parsed::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            p.types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| p.types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        let mut names: Vec<String> = Vec::new();
        for kv in labels.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap();
            if k != "le" {
                names.push(k.to_string());
                p.label_values
                    .entry((family.to_string(), k.to_string()))
                    .or_default()
                    .insert(v.trim_matches('"').to_string());
            }
        }
        names.sort();
        let sets = p.label_sets.entry(family.to_string()).or_default();
        if !sets.contains(&names) {
            sets.push(names);
        }
        let mut sorted: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
        sorted.sort();
        p.samples.insert(format!("{name}{{{}}}", sorted.join(",")), value);
    }
    p
}
