//! The sampling controls that decide where generation ends or which tokens may be drawn, through the server:
//! `min_tokens`, `ignore_eos`, `stop_token_ids` (and stop strings kept in the text), `min_p`, `logit_bias` and
//! `allowed_token_ids`, on the demo model with its `upper` adapter (which answers, then emits EOS). Each
//! generated token is checked against a teacher-forced dense forward of the same model. And the sampling
//! defaults a model's generation_config.json gives the requests that leave them unset.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::serve::{config, req, start};
use loraserve::engine::sampler::argmax;
use loraserve::lora::peft;
use loraserve::lora::{LoraRows, LoraSegment};
use loraserve::model::{self, AttentionMode, Batch, LoadOptions, LoadedModel, ModelSpec, SeqInput};
use loraserve::quant::QuantMode;
use loraserve::server::proto::{FinishReason, GenerateRequest, GenerateResponse};
use loraserve::server::service::Limits;
use loraserve::server::ServeConfig;

const PROMPT: &str = "cat moon fire\n";

fn adapters() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters")
}

/// The demo model (dense f32, as the test server runs it) and the example adapters.
fn demo_config() -> ServeConfig {
    ServeConfig { model: ModelSpec::Demo, ..config(adapters()) }
}

/// The demo model and the `upper` adapter, loaded here for the teacher-forced reference.
fn reference() -> (LoadedModel, peft::LoadedAdapter) {
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu };
    let m = model::load(&ModelSpec::Demo, &opts).unwrap();
    let a = peft::load_dir(&adapters().join("upper"), &m.model.lora_layout(), &Device::Cpu).unwrap();
    (m, a)
}

/// The logits that predicted each of `out`'s tokens: a dense forward over the prompt and `out`, with `upper`.
fn logits_of(m: &LoadedModel, a: &peft::LoadedAdapter, out: &[u32]) -> Vec<Vec<f32>> {
    let prompt = m.tokenizer.encode(PROMPT).unwrap();
    let (n, k) = (prompt.len(), out.len());
    let seq: Vec<u32> = prompt.iter().chain(out).copied().collect();
    let tokens = &seq[..n + k - 1];
    let rows: Vec<usize> = (n - 1..n + k - 1).collect();
    let seqs = [SeqInput { len: tokens.len(), past: 0, blocks: &[] }];
    let segments = [LoraSegment::new(0..tokens.len(), &a.weights)];
    let batch = Batch { tokens, seqs: &seqs, logit_rows: &rows };
    let dense = AttentionMode::Dense { differentiable: false };
    m.model.forward(&batch, dense, &LoraRows::Segments(&segments)).unwrap().to_vec2::<f32>().unwrap()
}

/// The demo tokenizer's token for the one character `c` (byte-level: one token per byte, after BOS).
fn byte_token(m: &LoadedModel, c: &str) -> u32 {
    m.tokenizer.encode(c).unwrap().last().copied().unwrap()
}

/// The greedy pick of a row with the EOS tokens held back.
fn argmax_without(row: &[f32], eos: &[u32]) -> u32 {
    let mut row = row.to_vec();
    eos.iter().for_each(|&t| row[t as usize] = f32::NEG_INFINITY);
    argmax(&row).expect("a number to pick")
}

/// Every token of `out` is the greedy pick of its teacher-forced row, with `held` masked for the first
/// `until` tokens.
fn assert_greedy(m: &LoadedModel, a: &peft::LoadedAdapter, out: &[u32], held: &[u32], until: usize) {
    for (i, (row, &t)) in logits_of(m, a, out).iter().zip(out).enumerate() {
        let want = if i < until { argmax_without(row, held) } else { argmax(row).expect("a number to pick") };
        assert_eq!(t, want, "token {i}");
    }
}

/// `min_tokens` holds EOS back: the answer goes on where it used to end, every token the greedy pick with
/// EOS masked until `min_tokens`, the plain greedy pick after. `ignore_eos` runs past EOS to
/// `max_new_tokens`, the EOS token staying in the ids. Stop strings count only past `min_tokens` (vLLM); with
/// `include_stop_str_in_output` the text ends after the one found, unary and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn min_tokens_and_ignore_eos_move_the_end() {
    let (h, client) = start(demo_config()).await;
    let (m, upper) = reference();
    let eos = m.model.config().eos_token_ids.clone();
    let generate = |r: GenerateRequest| {
        let mut c = client.clone();
        async move { c.generate(r).await.unwrap().into_inner() }
    };
    let finish = |o: &GenerateResponse| FinishReason::try_from(o.finish_reason).unwrap();

    let plain = generate(req("upper", PROMPT, 40)).await;
    assert_eq!((plain.text.as_str(), finish(&plain)), ("CAT MOON FIRE", FinishReason::EosToken));
    let n0 = plain.token_ids.len();
    assert!(eos.contains(&plain.token_ids[n0 - 1]));

    let min_tokens = n0 as u32 + 4;
    let held = generate(GenerateRequest { min_tokens, ..req("upper", PROMPT, 40) }).await;
    let ids = &held.token_ids;
    assert!(ids.len() >= min_tokens as usize, "{held:?}");
    assert_eq!(ids[..n0 - 1], plain.token_ids[..n0 - 1]);
    assert!(ids[..min_tokens as usize].iter().all(|t| !eos.contains(t)), "{ids:?}");
    assert_eq!(finish(&held) == FinishReason::EosToken, eos.contains(ids.last().unwrap()));
    assert_greedy(&m, &upper, ids, &eos, min_tokens as usize);

    let past = generate(GenerateRequest { ignore_eos: true, ..req("upper", PROMPT, n0 as u32 + 6) }).await;
    assert_eq!(past.token_ids.len(), n0 + 6);
    assert_eq!(past.token_ids[..n0], plain.token_ids[..]);
    assert_eq!(finish(&past), FinishReason::Length);
    assert!(past.text.starts_with("CAT MOON FIRE"), "{:?}", past.text);
    assert_greedy(&m, &upper, &past.token_ids, &[], 0);

    // "MOON" ends at the 8th token (the demo's tokens are bytes): it stops the answer unless min_tokens ≥ 8.
    let stop = |min_tokens| GenerateRequest { stop: vec!["MOON".into()], min_tokens, ..req("upper", PROMPT, 40) };
    let stopped = generate(stop(7)).await;
    assert_eq!((stopped.text.as_str(), finish(&stopped)), ("CAT ", FinishReason::StopSequence));
    // Which one stopped it (vLLM's stop_reason): of several, the one found; none at EOS.
    use loraserve::server::proto::generate_response::StopReason;
    assert_eq!(stopped.stop_reason, Some(StopReason::StopString("MOON".into())));
    let two = GenerateRequest { stop: vec!["FIRE".into(), " M".into()], ..req("upper", PROMPT, 40) };
    let two = generate(two).await;
    assert_eq!((two.text.as_str(), two.stop_reason), ("CAT", Some(StopReason::StopString(" M".into()))));
    let passed = generate(stop(8)).await;
    assert_eq!((passed.text.as_str(), finish(&passed)), ("CAT MOON FIRE", FinishReason::EosToken));
    assert_eq!(passed.stop_reason, None);
    assert_eq!(passed.token_ids, plain.token_ids);
    // include_stop_str_in_output: the text ends after the stop string, unary and streamed; the ids as before.
    let kept = GenerateRequest { include_stop_str_in_output: true, ..stop(0) };
    let unary = generate(kept.clone()).await;
    assert_eq!((unary.text.as_str(), finish(&unary)), ("CAT MOON", FinishReason::StopSequence));
    assert_eq!(unary.token_ids, generate(stop(0)).await.token_ids);
    let mut s = client.clone().generate_stream(kept).await.unwrap().into_inner();
    let (mut streamed, mut last) = (String::new(), None::<loraserve::server::proto::GenerateResponse>);
    while let Some(m) = tokio_stream::StreamExt::next(&mut s).await {
        let m = m.unwrap();
        streamed.push_str(&m.text);
        assert!(last.is_none_or(|l| l.stop_reason.is_none()), "stop_reason before the final message");
        last = Some(m);
    }
    assert_eq!(streamed, "CAT MOON");
    assert_eq!(last.unwrap().stop_reason, Some(StopReason::StopString("MOON".into())), "on the final message");
    h.shutdown();
    h.wait().await.unwrap();
}

/// A stop token ends the answer where it first comes, kept in the ids, out of the text unless
/// `include_stop_str_in_output` (vLLM); `min_tokens` holds it back as it holds EOS; `ignore_eos` does not touch
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_token_ids_end_the_answer() {
    let (h, mut client) = start(demo_config()).await;
    let (m, upper) = reference();
    let eos = m.model.config().eos_token_ids.clone();
    let m_id = byte_token(&m, "M");
    let with = |min_tokens, ignore_eos| GenerateRequest {
        stop_token_ids: vec![m_id],
        min_tokens,
        ignore_eos,
        ..req("upper", PROMPT, 40)
    };
    for ignore_eos in [false, true] {
        let out = client.generate(with(0, ignore_eos)).await.unwrap().into_inner();
        assert_eq!(out.text, "CAT ", "ignore_eos {ignore_eos}");
        assert_eq!(out.token_ids.last(), Some(&m_id));
        assert_eq!(FinishReason::try_from(out.finish_reason), Ok(FinishReason::StopToken));
        let stop = loraserve::server::proto::generate_response::StopReason::StopTokenId(m_id);
        assert_eq!(out.stop_reason, Some(stop));
    }
    let kept = client.generate(GenerateRequest { include_stop_str_in_output: true, ..with(0, false) }).await;
    assert_eq!(kept.unwrap().into_inner().text, "CAT M");
    // "M" is the 5th token: min_tokens 5 holds it (and EOS) back for the first five.
    let held = client.generate(with(5, false)).await.unwrap().into_inner().token_ids;
    let ends = [&eos[..], &[m_id]].concat();
    assert!(held[..5].iter().all(|t| !ends.contains(t)), "{held:?}");
    assert_greedy(&m, &upper, &held, &ends, 5);
    h.shutdown();
    h.wait().await.unwrap();
}

/// `min_p` 1 keeps only the most likely token, so any seed at any temperature gives the greedy answer; at 0
/// the same seeds leave it. In between it narrows what is drawn: 0.5 keeps only tokens at least half as
/// likely as the best one, checked against the teacher-forced rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn min_p_narrows_what_is_drawn() {
    let (h, mut client) = start(demo_config()).await;
    let (m, upper) = reference();
    let greedy = client.generate(req("upper", PROMPT, 40)).await.unwrap().into_inner().token_ids;
    let mut left_greedy = 0;
    for seed in 0..4 {
        let sampled =
            |min_p| GenerateRequest { temperature: Some(2.0), seed: Some(seed), min_p, ..req("upper", PROMPT, 40) };
        let out = client.generate(sampled(Some(1.0))).await.unwrap().into_inner();
        assert_eq!(out.token_ids, greedy, "seed {seed}");
        let free = client.generate(sampled(Some(0.0))).await.unwrap().into_inner();
        left_greedy += usize::from(free.token_ids != greedy);
        let half = client.generate(sampled(Some(0.5))).await.unwrap().into_inner().token_ids;
        for (i, (row, &t)) in logits_of(&m, &upper, &half).iter().zip(&half).enumerate() {
            // At temperature 2 the probabilities are softmax(row / 2): p_t / p_max = exp((l_t - l_max) / 2).
            let best = row[argmax(row).expect("a number to pick") as usize];
            assert!(((row[t as usize] - best) / 2.0).exp() >= 0.5 - 1e-4, "seed {seed} token {i}");
        }
    }
    assert!(left_greedy > 0, "sampling at temperature 2 never left the greedy answer: min_p 1 proved nothing");
    h.shutdown();
    h.wait().await.unwrap();
}

/// `logit_bias` and `allowed_token_ids` change each pick as they change its row: every greedy token is the
/// argmax of its teacher-forced row with the bias added (its logprob still the raw row's), or of the allowed
/// tokens alone, which also keep EOS out; a sampled request draws allowed tokens only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logit_bias_and_allowed_token_ids_shape_each_pick() {
    let (h, mut client) = start(demo_config()).await;
    let (m, upper) = reference();
    let plain = client.generate(req("upper", PROMPT, 12)).await.unwrap().into_inner().token_ids;
    // Ban the answer's first token, favour "a" a little.
    let bias = [(plain[0], -100.0f32), (byte_token(&m, "a"), 2.0)];
    let biased = GenerateRequest { logit_bias: bias.into_iter().collect(), logprobs: true, ..req("upper", PROMPT, 12) };
    let out = client.generate(biased).await.unwrap().into_inner();
    assert_ne!(out.token_ids, plain, "the bias changed nothing");
    let rows = logits_of(&m, &upper, &out.token_ids);
    for (i, ((row, &t), &lp)) in rows.iter().zip(&out.token_ids).zip(&out.logprobs).enumerate() {
        let mut biased = row.clone();
        bias.iter().for_each(|&(b, v)| biased[b as usize] += v);
        assert_eq!(Some(t), argmax(&biased), "token {i}");
        let raw = loraserve::engine::logits::logprob(row, t);
        assert!((lp - raw).abs() <= 1e-4, "token {i}: logprob {lp} vs the raw row's {raw}");
    }
    // Lowercase letters and the space only: the `upper` adapter's capitals and its EOS are out.
    let allowed: Vec<u32> = "abcdefghijklmnopqrstuvwxyz ".chars().map(|c| byte_token(&m, &c.to_string())).collect();
    let only = |temperature| GenerateRequest {
        allowed_token_ids: allowed.clone(),
        temperature,
        seed: Some(5),
        ..req("upper", PROMPT, 12)
    };
    let out = client.generate(only(Some(0.0))).await.unwrap().into_inner();
    assert_eq!((out.token_ids.len(), FinishReason::try_from(out.finish_reason)), (12, Ok(FinishReason::Length)));
    for (i, (row, &t)) in logits_of(&m, &upper, &out.token_ids).iter().zip(&out.token_ids).enumerate() {
        let best = allowed.iter().copied().max_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]).then(b.cmp(&a)));
        assert_eq!(Some(t), best, "token {i}");
    }
    let sampled = client.generate(only(Some(1.5))).await.unwrap().into_inner().token_ids;
    assert!(sampled.iter().all(|t| allowed.contains(t)), "{sampled:?}");
    assert_ne!(sampled, out.token_ids, "nothing was sampled");
    h.shutdown();
    h.wait().await.unwrap();
}

/// A copy of the fixture llama whose generation_config.json also sets `settings`.
fn llama_with_generation_config(dir: &std::path::Path, settings: serde_json::Value) -> PathBuf {
    let model = dir.join("model");
    common::copy_dir(&common::fixture("llama/model"), &model);
    let file = model.join("generation_config.json");
    let mut g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    g.as_object_mut().unwrap().extend(settings.as_object().unwrap().clone());
    std::fs::write(&file, g.to_string()).unwrap();
    model
}

/// vLLM's `--generation-config auto`: a request that leaves a sampling setting unset gets the model's
/// generation_config.json value (all five here), one that sets it gets its own (a temperature of 0 is
/// greedy); with `none`, unset is greedy. `server generate` and `server client generate` without sampling
/// flags get them alike; `generate --generation-config none` is greedy. An explicit top_p of 0 is refused, not
/// read as unset. Defaults out of range stop the server at start, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unset_sampling_settings_take_the_models_generation_config() {
    let tmp = tempfile::tempdir().unwrap();
    let settings =
        serde_json::json!({"temperature": 1.3, "top_k": 7, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2});
    let model = llama_with_generation_config(tmp.path(), settings);
    let cfg = |auto: bool| ServeConfig {
        model: ModelSpec::Dir(model.clone()),
        generation_config: auto,
        ..config(adapters())
    };
    let (h, mut c) = start(cfg(true)).await;
    let (_h_none, mut plain) = start(cfg(false)).await;
    let ask = |seed: u64| GenerateRequest { seed: Some(seed), ignore_eos: true, ..req("", "Hello world", 16) };
    let explicit = |seed| GenerateRequest {
        temperature: Some(1.3),
        top_k: Some(7),
        top_p: Some(0.9),
        min_p: Some(0.05),
        repetition_penalty: Some(1.2),
        ..ask(seed)
    };
    // Greedy, and without the model's repetition penalty (which greedy requests keep, as in vLLM).
    let greedy = GenerateRequest { temperature: Some(0.0), repetition_penalty: Some(1.0), ..ask(0) };
    let greedy_ids = c.generate(greedy.clone()).await.unwrap().into_inner().token_ids;
    assert_eq!(plain.generate(ask(0)).await.unwrap().into_inner().token_ids, greedy_ids, "none: unset is greedy");
    assert_eq!(plain.generate(greedy).await.unwrap().into_inner().token_ids, greedy_ids);
    let mut sampled = 0;
    for seed in 1..4 {
        let by_default = c.generate(ask(seed)).await.unwrap().into_inner().token_ids;
        assert_eq!(by_default, c.generate(explicit(seed)).await.unwrap().into_inner().token_ids, "seed {seed}");
        assert_eq!(by_default, plain.generate(explicit(seed)).await.unwrap().into_inner().token_ids, "seed {seed}");
        sampled += usize::from(by_default != greedy_ids);
        if seed == 1 {
            let addr = h.grpc_addr.to_string();
            let call = ["--prompt", "Hello world", "--seed", "1", "--ignore-eos", "--max-new-tokens", "16", "--json"];
            let local = ["generate", "--model", model.to_str().unwrap(), "--quant", "none"];
            let ids = |args: &[&str]| {
                let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
                    .args(args)
                    .env("LORASERVE_LOG", "off")
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
                let v = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
                (v["token_ids"].clone(), v["seed"].clone())
            };
            let want = (serde_json::json!(by_default), serde_json::json!(1));
            assert_eq!(ids(&[&local[..], &call].concat()), want, "server generate fills the same defaults");
            assert_eq!(
                ids(&[&["client", "--addr", &addr, "generate"][..], &call].concat()),
                want,
                "the client sends none"
            );
            let none = ids(&[&local[..], &call, &["--generation-config", "none"]].concat());
            let greedy = (serde_json::json!(greedy_ids), serde_json::Value::Null);
            assert_eq!(none, greedy, "generate --generation-config none is greedy");
        }
    }
    assert!(sampled > 0, "the defaults sample: no seed gave anything but the greedy answer");
    for (r, field) in [
        (GenerateRequest { top_p: Some(0.0), ..ask(1) }, "top_p"),
        (GenerateRequest { repetition_penalty: Some(0.0), ..ask(1) }, "repetition_penalty"),
    ] {
        let s = c.generate(r).await.unwrap_err();
        assert!(s.code() == tonic::Code::InvalidArgument && s.message().starts_with(field), "{s:?}");
    }

    // Out of range or of the wrong type: refused at start under auto, naming the file and the way out; under
    // none the model serves.
    for (name, bad, words) in [
        ("range", serde_json::json!({"top_p": 1.5}), "top_p must be in (0, 1]"),
        ("type", serde_json::json!({"temperature": "hot"}), "field `temperature`: expected a number"),
    ] {
        let bad = llama_with_generation_config(&tmp.path().join(name), bad);
        let bad_cfg =
            |auto| ServeConfig { model: ModelSpec::Dir(bad.clone()), generation_config: auto, ..config(adapters()) };
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = loraserve::server::start(bad_cfg(true), grpc, metrics).await.unwrap();
        let e = h.wait().await.expect_err("refused at start").to_string();
        let named = e.contains("generation_config.json") && e.contains(words) && e.contains("--generation-config none");
        assert!(named, "{e}");
        let (_h, mut served) = start(bad_cfg(false)).await;
        assert_eq!(served.generate(ask(0)).await.unwrap().into_inner().token_ids.len(), 16, "{name}");
    }
}

/// The greedy pick among the tokens structured output allows after `text`, worked out here without the
/// server's automaton: a one-character token (the demo's are bytes) when `viable(text + it)`, EOS when
/// `whole(text)`.
fn guided_pick(m: &LoadedModel, row: &[f32], text: &str, viable: &dyn Fn(&str) -> bool, whole: bool) -> u32 {
    let eos = &m.model.config().eos_token_ids;
    let mut masked = vec![f32::NEG_INFINITY; row.len()];
    for id in 0..row.len() as u32 {
        let t = m.tokenizer.decode(&[id]).unwrap();
        let ok = if eos.contains(&id) { whole } else { t.chars().count() == 1 && viable(&format!("{text}{t}")) };
        if ok {
            masked[id as usize] = row[id as usize];
        }
    }
    argmax(&masked).expect("a token the guide allows")
}

/// Structured output steers each greedy pick: every token is the most likely one of those that keep the
/// output the start of a text of the language (worked out here from the language itself), and EOS comes
/// only where the text is whole. `upper` wants "CAT MOON FIRE": a choice list turns it into "CAT MOON!",
/// four capitals at most make it "CATV" (the space it wants next is not allowed, and "V" is likelier than
/// EOS); streamed, the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn structured_output_keeps_each_pick_in_its_language() {
    use loraserve::server::proto::{structured_output::Kind, Choices, StructuredOutput};
    let (h, client) = start(demo_config()).await;
    let (m, upper) = reference();
    let with = |kind| GenerateRequest {
        structured_output: Some(StructuredOutput { kind: Some(kind) }),
        ..req("upper", PROMPT, 40)
    };
    let choices = ["MOON", "CAT FIRE", "CAT MOON!", "no"];
    type Lang = Box<dyn Fn(&str) -> bool>;
    let cases: [(Kind, &str, Lang, Lang); 2] = [
        (
            Kind::Choice(Choices { choices: choices.iter().map(|c| c.to_string()).collect() }),
            "CAT MOON!",
            Box::new(move |t: &str| choices.iter().any(|c| c.starts_with(t))),
            Box::new(move |t: &str| choices.contains(&t)),
        ),
        (
            Kind::Regex("[A-Z]{2,4}".into()),
            "CATV",
            Box::new(|t: &str| t.len() <= 4 && t.chars().all(|c| c.is_ascii_uppercase())),
            Box::new(|t: &str| (2..=4).contains(&t.len()) && t.chars().all(|c| c.is_ascii_uppercase())),
        ),
    ];
    for (kind, want, viable, whole) in cases {
        let out = client.clone().generate(with(kind.clone())).await.unwrap().into_inner();
        assert_eq!((out.text.as_str(), out.finish_reason), (want, FinishReason::EosToken as i32), "{kind:?}");
        let mut text = String::new();
        for (row, &t) in logits_of(&m, &upper, &out.token_ids).iter().zip(&out.token_ids) {
            assert_eq!(t, guided_pick(&m, row, &text, &*viable, whole(&text)), "{kind:?} after {text:?}");
            text.push_str(&m.tokenizer.decode(&[t]).unwrap());
        }
        let mut s = client.clone().generate_stream(with(kind)).await.unwrap().into_inner();
        let mut streamed = String::new();
        while let Some(m) = tokio_stream::StreamExt::next(&mut s).await {
            streamed.push_str(&m.unwrap().text);
        }
        assert_eq!(streamed, want);
    }
    h.shutdown();
    h.wait().await.unwrap();
}

/// JSON through the base model (random weights, so nothing but the constraint shapes the text): greedy and
/// sampled, the answer is a JSON text its schema accepts, or any JSON object; a regex holds while sampling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn structured_output_makes_valid_json_and_regex_matches() {
    use loraserve::server::proto::{structured_output::Kind, JsonObject, StructuredOutput};
    use serde_json::Value;
    let (h, client) = start(demo_config()).await;
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}, "note": {"type": "null"}},
        "required": ["name", "ok", "size"]}"#;
    let with = |kind, seed: Option<u64>| GenerateRequest {
        structured_output: Some(StructuredOutput { kind: Some(kind) }),
        temperature: seed.map(|_| 1.0),
        seed,
        ..req("", "Answer in JSON: ", 120)
    };
    for seed in [None, Some(1), Some(2), Some(3)] {
        let out = client.clone().generate(with(Kind::JsonSchema(schema.into()), seed)).await.unwrap().into_inner();
        assert_eq!(out.finish_reason, FinishReason::EosToken as i32, "{seed:?}: {:?}", out.text);
        let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{:?}: {e}", out.text));
        assert!(v["name"].as_str().is_some_and(|n| n.chars().count() <= 6), "{v}");
        assert!(v["ok"].is_boolean() && ["S", "M", "L"].contains(&v["size"].as_str().unwrap()), "{v}");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| ["name", "ok", "size", "note"].contains(&k.as_str())), "{v}");

        let any = client.clone().generate(with(Kind::JsonObject(JsonObject {}), seed)).await.unwrap().into_inner();
        if any.finish_reason == FinishReason::EosToken as i32 {
            assert!(serde_json::from_str::<Value>(&any.text).unwrap().is_object(), "{:?}", any.text);
        } else {
            assert!(any.text.starts_with('{'), "{:?}", any.text);
        }

        // At most 11 tokens (the demo's are bytes): it always ends whole, well within max_new_tokens.
        let re = "[a-c]{1,3}-(x|yz)[0-9]{0,4}!";
        let out = client.clone().generate(with(Kind::Regex(re.into()), seed)).await.unwrap().into_inner();
        let whole = regex_automata::meta::Regex::new(&format!("^(?:{re})$")).unwrap();
        assert_eq!(out.finish_reason, FinishReason::EosToken as i32, "{:?}", out.text);
        assert!(whole.is_match(&out.text), "{:?}", out.text);
    }
    // A stop token the language needs as text (the demo's tokens are bytes: "!") is picked where that text
    // comes, and ends the output there, as vLLM's stop_token_ids do (it was masked: nothing left, INTERNAL).
    let bang = 3 + u32::from(b'!');
    let stop_on_bang = GenerateRequest { stop_token_ids: vec![bang], ..with(Kind::Regex("ab!".into()), None) };
    let out = client.clone().generate(stop_on_bang).await.unwrap().into_inner();
    assert_eq!(
        (out.text.as_str(), out.finish_reason, out.token_ids.last()),
        ("ab", FinishReason::StopToken as i32, Some(&bang))
    );
    h.shutdown();
    h.wait().await.unwrap();
}

/// A constraint that cannot be honoured is INVALID_ARGUMENT naming its field and what is wrong, and the
/// server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_structured_output_is_invalid_argument() {
    use loraserve::server::proto::{structured_output::Kind, Choices, StructuredOutput};
    let (h, client) = start(demo_config()).await;
    let with = |kind: Option<Kind>| GenerateRequest {
        structured_output: Some(StructuredOutput { kind }),
        ..req("upper", PROMPT, 8)
    };
    let regex = |r: &str| with(Some(Kind::Regex(r.into())));
    let cases = [
        (with(None), "structured_output: give one of regex, choice, json_schema and json_object"),
        (regex("(a"), "structured_output.regex: invalid regex"),
        (regex("[ab]*a[ab]{24}"), "structured_output.regex: its automaton is larger than 64 MiB"),
        (with(Some(Kind::Choice(Choices { choices: vec![] }))), "structured_output.choice: no choices given"),
        (
            with(Some(Kind::JsonSchema(r#"{"properties": {"n": {"type": "number", "minimum": 0}}}"#.into()))),
            "structured_output.json_schema: /properties/n: keyword `minimum` is not supported here",
        ),
        (
            GenerateRequest { allowed_token_ids: vec![5], ..regex("a") },
            "structured_output.regex cannot be combined with allowed_token_ids",
        ),
        (GenerateRequest { min_tokens: 2, ..regex("a") }, "structured_output.regex cannot be combined with min_tokens"),
        (
            GenerateRequest { ignore_eos: true, ..regex("a") },
            "structured_output.regex needs a token that ends the output",
        ),
    ];
    for (r, want) in cases {
        let e = client.clone().generate(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().starts_with(want), "{want}: {}", e.message());
    }
    // With a stop token, ignore_eos is fine: the stop token ends the whole text.
    let stop = GenerateRequest { ignore_eos: true, stop_token_ids: vec![1], ..regex("CAT") };
    assert_eq!(client.clone().generate(stop).await.unwrap().into_inner().text, "CAT");
    h.shutdown();
    h.wait().await.unwrap();
}

/// An adapter whose scale overflows the forward (`lora_alpha` 1e38: finite, but its q/k/v go past f32) leaves
/// nothing to pick: every request with it fails as INTERNAL naming the cause and the adapter, greedy or
/// sampled, allow-listed or constrained, and never answers a token it does not allow (token 0 used to come
/// back, OK). The others are served meanwhile, alongside it in the same batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_adapter_whose_forward_overflows_fails_its_requests_only() {
    use loraserve::server::proto::{structured_output::Kind, StructuredOutput};
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&adapters().join("upper"), &tmp.path().join("upper"));
    common::copy_dir(&adapters().join("upper"), &tmp.path().join("overflow"));
    let cfg_path = tmp.path().join("overflow/adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = serde_json::json!(1e38);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (h, client) = start(ServeConfig { model: ModelSpec::Demo, ..config(tmp.path().to_path_buf()) }).await;
    let broken = |r: GenerateRequest| GenerateRequest { adapter_id: "overflow".into(), ..r };
    let regex = StructuredOutput { kind: Some(Kind::Regex("[a-z]+".into())) };
    let cases = [
        broken(req("", PROMPT, 6)),
        broken(GenerateRequest { temperature: Some(0.8), seed: Some(3), ..req("", PROMPT, 6) }),
        broken(GenerateRequest { allowed_token_ids: vec![100, 101], ..req("", PROMPT, 6) }),
        broken(GenerateRequest { structured_output: Some(regex), ..req("", PROMPT, 6) }),
        broken(GenerateRequest { logprobs: true, top_logprobs: 3, ..req("", PROMPT, 6) }),
    ];
    let calls: Vec<_> = cases
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(r).await })
        })
        .collect();
    let served: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(req("upper", PROMPT, 16)).await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert!(e.message().contains("NaN or −∞") && e.message().contains("adapter `overflow`"), "{}", e.message());
    }
    for call in served {
        assert_eq!(call.await.unwrap().unwrap().into_inner().text, "CAT MOON FIRE");
    }
    h.shutdown();
    h.wait().await.unwrap();
}

/// `n` completions (OpenAI's and vLLM's `n`): completion i of a seeded request is the request alone with seed
/// `seed + i`, unary and streamed alike (a stream tags each message with its completion and ends after the
/// last one's end); greedy completions are the greedy answer, and the scored prompt comes once; `n` outside
/// 1..=16 is INVALID_ARGUMENT naming it; a stream dropped mid-way frees every completion's place and lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_completions_are_the_request_alone_with_consecutive_seeds() {
    // Room for completions that run far longer than the test waits for them (below).
    let limits = Limits { max_new_tokens_cap: 1000, ..Limits::default() };
    let (h, mut client) = start(ServeConfig { limits, ..demo_config() }).await;
    let sampled = |seed, n| GenerateRequest { temperature: Some(2.0), seed: Some(seed), n, ..req("upper", PROMPT, 24) };
    let mut alone = Vec::new();
    for i in 0..4 {
        alone.push(client.generate(sampled(7 + i, None)).await.unwrap().into_inner());
    }
    let distinct: std::collections::HashSet<_> = alone.iter().map(|a| &a.token_ids).collect();
    assert!(distinct.len() > 1, "four seeds drew one answer: the comparison below proves little");

    let whole = client.generate(sampled(7, Some(4))).await.unwrap().into_inner();
    assert!(whole.text.is_empty() && whole.token_ids.is_empty() && whole.finish_reason == 0, "{whole:?}");
    assert_eq!((whole.prompt_tokens, &whole.adapter_version), (alone[0].prompt_tokens, &alone[0].adapter_version));
    assert_eq!(whole.choices.len(), 4);
    for (i, (c, a)) in whole.choices.iter().zip(&alone).enumerate() {
        assert_eq!(c.index, i as u32);
        assert_eq!((&c.token_ids, &c.text, c.finish_reason), (&a.token_ids, &a.text, a.finish_reason), "choice {i}");
        assert_eq!((c.seed, a.seed), (Some(7 + i as u64), Some(7 + i as u64)), "the seed each sampled with");
    }

    let mut s = client.generate_stream(sampled(7, Some(4))).await.unwrap().into_inner();
    let mut streamed = vec![GenerateResponse::default(); 4];
    let mut ended = 0;
    while let Some(m) = s.message().await.unwrap() {
        assert!(ended < 4, "a message after every completion ended");
        let c = &mut streamed[m.index as usize];
        assert_eq!(c.finish_reason, 0, "a message of completion {} after its end", m.index);
        assert_eq!(m.adapter_version, alone[0].adapter_version);
        c.token_ids.extend(m.token_ids);
        c.text.push_str(&m.text);
        c.finish_reason = m.finish_reason;
        c.seed = m.seed.or(c.seed);
        ended += usize::from(m.finish_reason != 0);
    }
    assert_eq!(ended, 4);
    for (i, (c, a)) in streamed.iter().zip(&alone).enumerate() {
        assert_eq!((&c.token_ids, &c.text, c.finish_reason), (&a.token_ids, &a.text, a.finish_reason), "stream {i}");
        assert_eq!(c.seed, a.seed, "stream {i}");
    }

    let scored = |n| GenerateRequest { n, prompt_logprobs: Some(0), ..req("upper", PROMPT, 24) };
    let greedy = client.generate(scored(None)).await.unwrap().into_inner();
    let three = client.generate(scored(Some(3))).await.unwrap().into_inner();
    assert_eq!(three.prompt_token_ids, greedy.prompt_token_ids);
    assert_eq!(three.prompt_logprobs.len(), greedy.prompt_logprobs.len());
    for (a, b) in three.prompt_logprobs.iter().zip(&greedy.prompt_logprobs) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    for c in &three.choices {
        assert_eq!((&c.token_ids, &c.text, c.seed, greedy.seed), (&greedy.token_ids, &greedy.text, None, None));
        assert!(c.prompt_token_ids.is_empty() && c.prompt_logprobs.is_empty(), "the prompt's fields are shared");
    }

    // Streamed, the scored prompt comes once, in the first message (completion 0's), as without `n`.
    let mut s = client.generate_stream(scored(Some(3))).await.unwrap().into_inner();
    let mut scored_in = Vec::new();
    let mut at = 0;
    while let Some(m) = s.message().await.unwrap() {
        if !m.prompt_token_ids.is_empty() {
            assert_eq!(m.prompt_token_ids, greedy.prompt_token_ids);
            scored_in.push((at, m.index));
        }
        at += 1;
    }
    assert_eq!(scored_in, [(0, 0)], "the prompt is scored once, by completion 0, in the first message");

    for n in [0, 17] {
        let e = client.generate(sampled(1, Some(n))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(e.message(), format!("n: must be in 1..=16, got {n}"));
    }

    // Three completions of 1000 tokens each need 1000 engine steps; dropped after its first message, the
    // stream's completions end within a few, leaving no sequence and no lease behind.
    use std::sync::atomic::Ordering::Relaxed;
    let (engine, cache) = (h.engine().unwrap(), h.cache().unwrap());
    let stats = engine.stats();
    let steps = stats.steps.load(Relaxed);
    let long = GenerateRequest { n: Some(3), ignore_eos: true, ..req("upper", PROMPT, 1000) };
    let mut s = client.generate_stream(long).await.unwrap().into_inner();
    s.message().await.unwrap().expect("a first message");
    assert_eq!(cache.leases(), 3, "each completion holds its own lease");
    drop(s);
    let since = std::time::Instant::now();
    while stats.running.load(Relaxed) + stats.pending.load(Relaxed) + cache.leases() > 0 {
        assert!(since.elapsed() < std::time::Duration::from_secs(20), "a dropped stream's completions still run");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let ran = stats.steps.load(Relaxed) - steps;
    assert!(ran < 1000, "the completions ran to their end ({ran} steps): dropping the stream stopped nothing");
    h.shutdown();
    h.wait().await.unwrap();
}

/// `skip_special_tokens: false` (vLLM's) spells the tokenizer's special tokens out: the text is the decode of
/// the ids with them kept, unary and streamed, where unset (true) leaves them out of the same ids' text; the
/// token that ends the output stays out unless `include_stop_str_in_output` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_special_tokens_false_spells_them_out() {
    let (h, mut client) = start(demo_config()).await;
    let (m, _) = reference();
    // 2 is `<pad>` (special), 100 an `a`; sampled, the output mixes the two.
    let mixed = |skip| GenerateRequest {
        allowed_token_ids: vec![2, 100],
        temperature: Some(1.0),
        seed: Some(1),
        skip_special_tokens: skip,
        ..req("", PROMPT, 12)
    };
    let kept = client.generate(mixed(Some(false))).await.unwrap().into_inner();
    assert!(kept.token_ids.contains(&2) && kept.token_ids.contains(&100), "{kept:?}");
    assert!(kept.text.contains("<pad>"), "{kept:?}");
    assert_eq!(kept.text, m.tokenizer.decode_with(&kept.token_ids, false).unwrap());
    let skipped = client.generate(mixed(None)).await.unwrap().into_inner();
    assert_eq!(skipped.token_ids, kept.token_ids);
    assert_eq!(skipped.text, m.tokenizer.decode(&kept.token_ids).unwrap());
    assert!(!skipped.text.contains('<'), "{skipped:?}");
    let mut s = client.generate_stream(mixed(Some(false))).await.unwrap().into_inner();
    let mut streamed = String::new();
    while let Some(msg) = s.message().await.unwrap() {
        streamed.push_str(&msg.text);
    }
    assert_eq!(streamed, kept.text);
    // Each of `n` completions spells them out too.
    let two = client.generate(GenerateRequest { n: Some(2), ..mixed(Some(false)) }).await.unwrap().into_inner();
    for c in &two.choices {
        assert_eq!(c.text, m.tokenizer.decode_with(&c.token_ids, false).unwrap(), "completion {}", c.index);
    }
    assert!(two.choices[1].text.contains("<pad>"), "{two:?}");
    // EOS (1), made the first pick, ends the output: its text only with include_stop_str_in_output.
    let eos = |include| GenerateRequest {
        logit_bias: [(1, 100.0)].into(),
        skip_special_tokens: Some(false),
        include_stop_str_in_output: include,
        ..req("", PROMPT, 4)
    };
    let out = client.generate(eos(false)).await.unwrap().into_inner();
    assert_eq!(
        (out.token_ids.as_slice(), out.text.as_str(), out.finish_reason()),
        (&[1][..], "", FinishReason::EosToken)
    );
    let out = client.generate(eos(true)).await.unwrap().into_inner();
    assert_eq!((out.token_ids.as_slice(), out.text.as_str()), (&[1][..], "</s>"));
    h.shutdown();
    h.wait().await.unwrap();
}

/// `bad_words` (vLLM's): the output never spells a bad word in the tokens it encodes to; each greedy pick is
/// the argmax of its teacher-forced row with a word's last token banned exactly where the output ends with
/// the rest of the word; a blank word is INVALID_ARGUMENT naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_words_are_never_spelled() {
    let (h, mut client) = start(demo_config()).await;
    let (m, upper) = reference();
    assert_eq!(client.generate(req("upper", PROMPT, 24)).await.unwrap().into_inner().text, "CAT MOON FIRE");
    let bad = GenerateRequest { bad_words: vec!["MOON".into(), " FIRE".into()], ..req("upper", PROMPT, 24) };
    let out = client.generate(bad.clone()).await.unwrap().into_inner();
    assert!(out.text.starts_with("CAT MOO") && !out.text.contains("MOON") && !out.text.contains("FIRE"), "{out:?}");
    // The demo's tokens are bytes: each word is its bytes (the leading space stripped, and the spaced form
    // one token longer, so not banned).
    let words: Vec<Vec<u32>> = ["MOON", "FIRE"].iter().map(|w| m.tokenizer.encode_with(w, false).unwrap()).collect();
    for (i, row) in logits_of(&m, &upper, &out.token_ids).iter().enumerate() {
        let mut row = row.clone();
        for w in &words {
            if out.token_ids[..i].ends_with(&w[..w.len() - 1]) {
                row[w[w.len() - 1] as usize] = f32::NEG_INFINITY;
            }
        }
        assert_eq!(Some(out.token_ids[i]), argmax(&row), "token {i} of {:?}", out.token_ids);
    }
    let mut s = client.generate_stream(bad).await.unwrap().into_inner();
    let mut streamed = Vec::new();
    while let Some(msg) = s.message().await.unwrap() {
        streamed.extend(msg.token_ids);
    }
    assert_eq!(streamed, out.token_ids);
    // Only the output counts: a prompt ending in "MOO" does not ban the "N" after it.
    let n = byte_token(&m, "N");
    let after_moo =
        GenerateRequest { allowed_token_ids: vec![n], bad_words: vec!["MOON".into()], ..req("", "cat MOO", 1) };
    assert_eq!(client.generate(after_moo).await.unwrap().into_inner().token_ids, [n]);
    // Words that ban every token the request allows: an allow list is refused up front, a guide's tokens
    // where they run out (INVALID_ARGUMENT, the request's own doing; not INTERNAL).
    let c = byte_token(&m, "C");
    let all_banned = GenerateRequest { allowed_token_ids: vec![c], bad_words: vec!["C".into()], ..req("", PROMPT, 4) };
    let e = client.generate(all_banned).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::InvalidArgument, "bad_words: they ban every token of allowed_token_ids")
    );
    use loraserve::server::proto::{structured_output::Kind, StructuredOutput};
    let yes = StructuredOutput { kind: Some(Kind::Regex("yes".into())) };
    let guided = GenerateRequest { structured_output: Some(yes), bad_words: vec!["yes".into()], ..req("", PROMPT, 8) };
    let e = client.generate(guided).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let said = "bad_words: they ban every token the request allows here, at output token 3 with the base model";
    assert_eq!(e.message(), said);
    let blank = GenerateRequest { bad_words: vec!["ok".into(), "  ".into()], ..req("upper", PROMPT, 4) };
    let e = client.generate(blank).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.message(), "bad_words[1]: empty or only whitespace");
    h.shutdown();
    h.wait().await.unwrap();
}
