//! What a request's prompt becomes: chat templates (loraserve's rendering against transformers'
//! `apply_chat_template` for published templates, `chat-templates/`, and a request's `messages` through the
//! server) and `truncate_prompt_tokens`.

mod common;

use common::fixture;
use common::serve::{chat, config, req, start};
use loraserve::model::chat::strftime_utc;
use loraserve::model::{ChatError, ChatTemplate, Tokenizer};
use loraserve::server::proto::{ChatMessage, GenerateRequest};
use serde_json::Value;

fn expected() -> Value {
    let path = fixture("chat-templates/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Every template × conversation renders to transformers' text, with and without the generation prompt and with
/// its final message continued, or is
/// refused with the template's own message where transformers' raised it; the prompt's ids are the rendered
/// text's, with the tokenizer's BOS put before it only where the template did not write it. Llama 3.2's
/// template writes today's date: the day make.py ran is replaced by today.
#[test]
fn templates_render_as_transformers_renders_them() {
    let e = expected();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let today = |text: &str| {
        let made = format!("Today Date: {}", e["today"].as_str().unwrap());
        text.replace(&made, &format!("Today Date: {}", strftime_utc("%d %b %Y", now).unwrap()))
    };
    let (mut rendered, mut refused) = (0, 0);
    for case in e["results"].as_array().unwrap() {
        let (name, conv) = (case["template"].as_str().unwrap(), case["conversation"].as_str().unwrap());
        let mut tok = Tokenizer::from_dir(&fixture("llama/model")).unwrap();
        tok.chat.template = Some(e["templates"][name].as_str().unwrap().to_string());
        let chat = ChatTemplate::new(&tok).unwrap();
        let messages = e["conversations"][conv].as_array().unwrap();
        for key in ["prompt", "full", "continue"] {
            let what = format!("{name} × {conv} ({key})");
            let want = &case[key];
            let got = match key {
                "prompt" => chat.render_prompt(messages, false, &Default::default()),
                "full" => chat.render(messages, false, &Default::default()),
                _ => chat.render_prompt(messages, true, &Default::default()),
            };
            if let Some(message) = want["error"].as_str() {
                let want = match message.strip_prefix("continue_final_message is set but the final message does not") {
                    Some(_) => ChatError::Render("continue_final_message: the chat template leaves out (part of) the final message, so it cannot be continued".into()),
                    None => ChatError::Render(format!("the chat template refused the conversation: {message}")),
                };
                assert_eq!(got, Err(want), "{what}");
                refused += 1;
                continue;
            }
            let text = got.unwrap_or_else(|e| panic!("{what}: {e}"));
            let want_text = today(want["text"].as_str().unwrap());
            assert_eq!(text, want_text, "{what}");
            rendered += 1;
            if key != "full" {
                let writes_bos = text.starts_with("<s>");
                let want_ids = if want_text != want["text"].as_str().unwrap() {
                    // Another day than make.py's: the ids of its text with today's date.
                    assert!(writes_bos, "{what}");
                    tok.encode_with(&want_text, false).unwrap()
                } else {
                    ids(&want[if writes_bos { "ids_plain" } else { "ids_special" }])
                };
                assert_eq!(
                    chat.prompt_ids(&tok, messages, key == "continue", &Default::default()).unwrap(),
                    want_ids,
                    "{what}"
                );
            }
        }
    }
    // 8 templates × 10 conversations × 3, the refusals being llama-2's and mistral's, and for continuing, the
    // tool turn llama-2 and zephyr leave out.
    assert_eq!((rendered, refused), (222, 18));
}

/// `strftime_now`'s formatting equals Python's `datetime.strftime` (naive, UTC), `-` flags and all.
#[test]
fn strftime_matches_python() {
    for case in expected()["strftime"].as_array().unwrap() {
        let (t, f) = (case["instant"].as_i64().unwrap(), case["format"].as_str().unwrap());
        assert_eq!(strftime_utc(f, t).unwrap(), case["text"].as_str().unwrap(), "{t} {f}");
    }
}

/// A copy of the fixture llama with `template` as its chat_template.jinja.
fn llama_with_template(dir: &std::path::Path, template: &str) -> std::path::PathBuf {
    let model = dir.join("model");
    common::copy_dir(&fixture("llama/model"), &model);
    std::fs::write(model.join("chat_template.jinja"), template).unwrap();
    model
}

async fn prompt_ids(
    c: &mut loraserve::server::proto::lora_serve_client::LoraServeClient<tonic::transport::Channel>,
    r: GenerateRequest,
) -> (Vec<u32>, Vec<u32>) {
    let m = c.generate(GenerateRequest { prompt_logprobs: Some(0), ..r }).await.unwrap().into_inner();
    (m.prompt_token_ids, m.token_ids)
}

/// A template that loops without end fails its conversation at its budget (FAILED_PRECONDITION naming it), or
/// at the request's deadline (DEADLINE_EXCEEDED), while raw prompts and health answer meanwhile: it renders on
/// a blocking thread. Before, such renderings held the async workers, and with one a core nothing answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_loops_without_end_holds_up_only_its_own_request() {
    let tmp = tempfile::tempdir().unwrap();
    let spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let mut cfg = config(fixture("llama/adapters"));
    cfg.model = loraserve::model::ModelSpec::Dir(llama_with_template(tmp.path(), spin));
    let (_h, c) = start(cfg).await;
    let conversation = || GenerateRequest { messages: chat(&[("user", "Hi")]), ..req("", "", 2) };
    let spinning: Vec<_> = (0..4)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(conversation()).await })
        })
        .collect();
    let mut late = c.clone();
    let mut timed = tonic::Request::new(conversation());
    timed.set_timeout(std::time::Duration::from_millis(300));
    let timed = tokio::spawn(async move { late.generate(timed).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut plain = c.clone();
    let answered = tokio::time::timeout(std::time::Duration::from_secs(30), plain.generate(req("", "Hello", 2)));
    assert_eq!(answered.await.expect("a raw prompt waited on the renderings").unwrap().into_inner().token_ids.len(), 2);
    // Answered while every rendering still runs (each takes its whole budget, a second or more); rendered on
    // the async workers, the raw prompt waited for one of them to end.
    assert!(spinning.iter().all(|t| !t.is_finished()), "the raw prompt was answered only after a rendering ended");
    let s = timed.await.unwrap().unwrap_err();
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
    for r in spinning {
        let s = r.await.unwrap().unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("ran past 50000000 template instructions"), "{s:?}");
    }
}

/// What no in-process limit stops: a template that asks for a petabyte at once, or nests a value 300,000
/// deep (its drop overflows the stack), took the whole server down (an abort); one whose printing walks 2^40
/// leaves held its rendering slot for hours past its request's deadline, so that one request a core locked out
/// every conversation. Rendered in worker processes, each fails its own conversation (FAILED_PRECONDITION
/// naming what ended the worker, DEADLINE_EXCEEDED at the deadline) and the next conversations render.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_takes_its_worker_down_fails_only_its_own_conversation() {
    let tmp = tempfile::tempdir().unwrap();
    let template = "{% set c = messages[0].content %}{% if c == 'huge' %}{{ messages | tojson(indent=1000000000000000) }}\
{% elif c == 'deep' %}{% set ns = namespace(v=[]) %}{% for i in range(300) %}{% for j in range(1000) %}\
{% set ns.v = [ns.v] %}{% endfor %}{% endfor %}{{ ns.v | length }}\
{% elif c == 'slow' %}{% set ns = namespace(v=[1]) %}{% for i in range(40) %}{% set ns.v = [ns.v, ns.v] %}{% endfor %}{{ ns.v }}\
{% else %}[INST] {{ c }} [/INST]{% endif %}";
    let mut cfg = config(fixture("llama/adapters"));
    cfg.model = loraserve::model::ModelSpec::Dir(llama_with_template(tmp.path(), template));
    let (_h, c) = start(cfg).await;
    let say = |text: &str| GenerateRequest { messages: chat(&[("user", text)]), ..req("", "", 2) };
    let mut c1 = c.clone();
    let fine = c1.generate(say("Hi")).await.unwrap().into_inner().token_ids;
    for (text, words) in [("huge", "memory allocation of"), ("deep", "overflowed its stack")] {
        let s = c1.generate(say(text)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{text}: {s:?}");
        assert!(s.message().contains("ended its worker process") && s.message().contains(words), "{text}: {s:?}");
        assert_eq!(c1.generate(say("Hi")).await.unwrap().into_inner().token_ids, fine, "after {text}");
    }
    // More slow renderings than cores, each cut at its deadline: then a conversation renders at once.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slow: Vec<_> = (0..cores + 1)
        .map(|_| {
            let mut c = c.clone();
            let mut r = tonic::Request::new(say("slow"));
            r.set_timeout(std::time::Duration::from_millis(1500));
            tokio::spawn(async move { c.generate(r).await })
        })
        .collect();
    for r in slow {
        let s = r.await.unwrap().unwrap_err();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
    }
    let mut r = tonic::Request::new(say("Hi"));
    r.set_timeout(std::time::Duration::from_secs(5));
    assert_eq!(c1.generate(r).await.expect("the slow renderings' slots were freed").into_inner().token_ids, fine);
}

/// `messages` through the server, with Mistral's template: the prompt is transformers' rendering's ids (BOS
/// written by the template, not added again; a new assistant turn, or with `continue_final_message` the final
/// message continued), the tokens those of the same ids sent as text, with the base and with an adapter; the template's refusal is INVALID_ARGUMENT with its message, and so are a request with
/// both a prompt and messages, with neither, and with an empty role; the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_rendered_with_the_models_template() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    let model = llama_with_template(tmp.path(), e["templates"]["mistral"].as_str().unwrap());
    let mut cfg = config(fixture("llama/adapters"));
    cfg.model = loraserve::model::ModelSpec::Dir(model);
    let (_h, mut c) = start(cfg).await;
    let case = |conv: &str, key: &str| {
        let found =
            e["results"].as_array().unwrap().iter().find(|r| r["template"] == "mistral" && r["conversation"] == conv);
        found.unwrap()[key].clone()
    };
    // A new assistant turn for each, and the answer begun in `prefill` continued.
    for (conv, key) in [("user", "prompt"), ("no-system-multi-turn", "prompt"), ("prefill", "continue")] {
        let want = case(conv, key);
        let continue_final_message = key == "continue";
        let turns: Vec<(&str, &str)> = e["conversations"][conv]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        // The same ids as text: transformers' rendering without its leading "<s>", which the server adds.
        let text = want["text"].as_str().unwrap().strip_prefix("<s>").unwrap();
        for adapter in ["", "qkvo-r8"] {
            let r = GenerateRequest { messages: chat(&turns), continue_final_message, ..req(adapter, "", 6) };
            let by_messages = prompt_ids(&mut c, r).await;
            assert_eq!(by_messages.0, ids(&want["ids_plain"]), "{conv} {adapter:?}");
            let by_text = prompt_ids(&mut c, req(adapter, text, 6)).await;
            assert_eq!(by_messages, by_text, "{conv} {adapter:?}");
        }
    }
    let refused = [
        (
            GenerateRequest { messages: chat(&[("system", "S"), ("user", "U")]), ..req("", "", 4) },
            "messages: the chat template refused the conversation: Conversation roles must alternate user/assistant/user/assistant/...",
        ),
        (
            GenerateRequest { messages: chat(&[("user", "U"), ("tool", "T")]), ..req("", "", 4) },
            "messages: the chat template refused the conversation: Only user and assistant roles are supported!",
        ),
        (GenerateRequest { messages: chat(&[("user", "U")]), ..req("", "Hello", 4) }, "messages: given with prompt"),
        (req("", "", 4), "prompt: is empty (give a prompt, messages or prompt_token_ids)"),
        (GenerateRequest { continue_final_message: true, ..req("", "Hi", 4) }, "continue_final_message: needs messages"),
        (GenerateRequest { messages: chat(&[("user", "U"), ("", "A")]), ..req("", "", 4) }, "messages[1].role: is empty"),
    ];
    for (r, words) in refused {
        let s = c.generate(r).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(words), "{s:?}");
    }
    let ok = c.generate(GenerateRequest { messages: chat(&[("user", "U")]), ..req("", "", 4) }).await.unwrap();
    assert_eq!(ok.into_inner().token_ids.len(), 4);
}

/// A model without a chat template, with one that does not compile, or with one using a filter the server
/// lacks, refuses `messages` with FAILED_PRECONDITION naming why (an empty role is still the request's own
/// mistake); raw prompts run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_usable_template_refuses_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = llama_with_template(tmp.path(), "{% for m in messages %}{{ m.content }");
    let lacking = tmp.path().join("lacking");
    std::fs::create_dir(&lacking).unwrap();
    let lacking = llama_with_template(&lacking, "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}");
    for (model, words) in [
        (fixture("llama/model"), "messages: the tokenizer has no chat template"),
        (broken, "messages: the chat template does not compile"),
        (lacking, "messages: rendering the chat template: unknown filter"),
    ] {
        let mut cfg = config(fixture("llama/adapters"));
        cfg.model = loraserve::model::ModelSpec::Dir(model);
        let (_h, mut c) = start(cfg).await;
        let s = c.generate(GenerateRequest { messages: chat(&[("user", "Hi")]), ..req("", "", 4) }).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
        assert!(s.message().starts_with(words), "{s:?}");
        let s = c.generate(GenerateRequest { messages: chat(&[("", "Hi")]), ..req("", "", 4) }).await.unwrap_err();
        assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, "messages[0].role: is empty"));
        assert_eq!(c.generate(req("", "Hello", 3)).await.unwrap().into_inner().token_ids.len(), 3);
        // Info says so (the one that compiles too: it fails on every conversation).
        let info = c.info(loraserve::server::proto::InfoRequest {}).await.unwrap().into_inner();
        assert!(!info.chat_template, "{words}");
    }
    // And says a usable one is.
    let mut cfg = config(fixture("llama/adapters"));
    cfg.model = loraserve::model::ModelSpec::Dir(llama_with_template(tmp.path(), "{{ messages[0].content }}"));
    let (_h, mut c) = start(cfg).await;
    assert!(c.info(loraserve::server::proto::InfoRequest {}).await.unwrap().into_inner().chat_template);
}

/// A tokenizer with tokens the model has no embedding for (a fine-tune that added tokens without resizing the
/// embeddings): a prompt or conversation that encodes to one is refused INVALID_ARGUMENT naming the token,
/// before the engine, whose forward it would fail for every request batched with it; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_past_the_models_vocabulary_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = llama_with_template(tmp.path(), "{% for m in messages %}{{ m.content }}{% endfor %}");
    let path = model.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = serde_json::json!({"id": 320, "content": "<zzz>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true});
    t["added_tokens"].as_array_mut().unwrap().push(added);
    std::fs::write(&path, t.to_string()).unwrap();
    let mut cfg = config(fixture("llama/adapters"));
    cfg.model = loraserve::model::ModelSpec::Dir(model);
    let (_h, mut c) = start(cfg).await;
    let words = r#"encodes to token "<zzz>" (id 320), outside the model's vocabulary of 320 tokens"#;
    // More times than the failed steps in a row that stop the engine, were they to reach it.
    for _ in 0..5 {
        let conversation = GenerateRequest { messages: chat(&[("user", "a <zzz>")]), ..req("", "", 4) };
        for (r, field) in [(req("", "hello <zzz> world", 4), "prompt"), (conversation, "messages")] {
            let s = c.generate(r).await.unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert!(s.message().starts_with(&format!("{field}: {words}")), "{s:?}");
        }
    }
    assert_eq!(c.generate(req("", "hello world", 4)).await.unwrap().into_inner().token_ids.len(), 4);
}

/// `truncate_prompt_tokens`, as vLLM truncates: a raw prompt keeps its BOS and its text's last ids, a
/// conversation its last ids; the answer is the engine's for the ids kept; a limit past the prompt changes
/// nothing; it applies before the context check, so a prompt too long for the context runs once cut; 0, a
/// limit past the context, and one that leaves room for BOS alone are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_prompt_tokens_keeps_the_last_ids() {
    use loraserve::engine::{generate, GenerateJob, SamplingParams};
    let adapters = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters");
    let cfg = loraserve::server::ServeConfig { model: loraserve::model::ModelSpec::Demo, ..config(adapters) };
    let (_h, mut c) = start(cfg).await;
    let prompt = "cat moon fire\n";
    let (full, _) = prompt_ids(&mut c, req("", prompt, 8)).await;
    let cut = |k| GenerateRequest { truncate_prompt_tokens: Some(k), ..req("", prompt, 8) };
    let (kept, tokens) = prompt_ids(&mut c, cut(6)).await;
    assert_eq!(kept, [&full[..1], &full[full.len() - 5..]].concat());
    assert_eq!(kept[0], 0, "the demo's BOS");
    let opts = loraserve::model::LoadOptions {
        dtype: candle_core::DType::F32,
        quant: loraserve::quant::QuantMode::None,
        device: candle_core::Device::Cpu,
    };
    let m = loraserve::model::load(&loraserve::model::ModelSpec::Demo, &opts).unwrap();
    let job = GenerateJob {
        prompt_ids: &kept,
        max_new_tokens: 8,
        sampling: SamplingParams::default(),
        stop_at_eos: true,
        adapter: None,
    };
    assert_eq!(tokens, generate(&m.model, &job).unwrap().token_ids);
    assert_eq!(c.generate(cut(6)).await.unwrap().into_inner().prompt_tokens, 6);
    assert_eq!(prompt_ids(&mut c, cut(full.len() as u32 + 5)).await.0, full);
    // The demo's context is 1024 positions: 1100 bytes do not fit, their last 1000 do.
    let long = "ab".repeat(550);
    let s = c.generate(req("", &long, 8)).await.unwrap_err();
    assert!(
        s.message().starts_with("prompt: 1101 prompt tokens") && s.message().contains("exceed the model's context"),
        "{s:?}"
    );
    // The error names the field the prompt came from.
    let ids = GenerateRequest { prompt_token_ids: vec![5; 1100], ..req("", "", 8) };
    let turn = GenerateRequest { messages: chat(&[("user", &long)]), ..req("", "", 8) };
    for (r, field) in [(ids, "prompt_token_ids"), (turn, "messages")] {
        let s = c.generate(r).await.unwrap_err();
        assert!(
            s.message().starts_with(&format!("{field}: ")) && s.message().contains("exceed the model's context"),
            "{s:?}"
        );
    }
    let fits = c.generate(GenerateRequest { truncate_prompt_tokens: Some(1000), ..req("", &long, 8) }).await;
    assert_eq!(fits.unwrap().into_inner().prompt_tokens, 1000);
    // A conversation's ids are cut as they are (the template's text, and the BOS before it, go first).
    let turn = GenerateRequest { messages: chat(&[("user", "cat moon fire")]), ..req("", "", 8) };
    let (whole, _) = prompt_ids(&mut c, turn.clone()).await;
    let (cut_turn, _) = prompt_ids(&mut c, GenerateRequest { truncate_prompt_tokens: Some(6), ..turn }).await;
    assert_eq!(cut_turn, whole[whole.len() - 6..]);
    for (k, words) in [
        (0, "truncate_prompt_tokens: must be in 1..=1024 (the model's context), got 0"),
        (1025, "truncate_prompt_tokens: must be in 1..=1024 (the model's context), got 1025"),
        (1, "truncate_prompt_tokens: 1 leaves no room for the prompt's text after the 1 token(s) the tokenizer puts before it; at least 2"),
    ] {
        let s = c.generate(cut(k)).await.unwrap_err();
        assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, words));
    }
}

/// `prompt_token_ids` run as given: the same answer as the text they encode, base and adapter; nothing added
/// (no BOS before ids that have none); `truncate_prompt_tokens` keeps their last ones; an id past the
/// vocabulary and two prompt forms together are refused naming the field; the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_token_ids_run_as_given() {
    let adapters = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters");
    let cfg = loraserve::server::ServeConfig { model: loraserve::model::ModelSpec::Demo, ..config(adapters) };
    let (_h, mut c) = start(cfg).await;
    let by_ids =
        |adapter: &str, ids: &[u32]| GenerateRequest { prompt_token_ids: ids.to_vec(), ..req(adapter, "", 12) };
    for adapter in ["", "upper"] {
        let by_text = prompt_ids(&mut c, req(adapter, "cat moon fire\n", 12)).await;
        assert_eq!(prompt_ids(&mut c, by_ids(adapter, &by_text.0)).await, by_text, "{adapter:?}");
    }
    let (full, _) = prompt_ids(&mut c, req("upper", "cat moon fire\n", 12)).await;
    let no_bos = prompt_ids(&mut c, by_ids("upper", &full[1..])).await;
    assert_eq!(no_bos.0, full[1..], "nothing put before the ids");
    let cut = GenerateRequest { truncate_prompt_tokens: Some(4), ..by_ids("upper", &full) };
    assert_eq!(prompt_ids(&mut c, cut).await.0, full[full.len() - 4..]);
    let refused = [
        (by_ids("", &[1, 2, 259]), "prompt_token_ids[2]: 259 is outside the model's vocabulary of 259 tokens"),
        (GenerateRequest { prompt_token_ids: vec![1], ..req("", "Hi", 4) }, "prompt_token_ids: given with prompt"),
        (
            GenerateRequest { messages: chat(&[("user", "U")]), ..by_ids("", &[1]) },
            "prompt_token_ids: given with messages",
        ),
    ];
    for (r, words) in refused {
        let s = c.generate(r).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(words), "{s:?}");
    }
    assert_eq!(c.generate(by_ids("", &[0, 70])).await.unwrap().into_inner().token_ids.len(), 12);
}

fn kwargs_of(v: &Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Conversations rendered with more template variables (`chat_template_kwargs`) equal transformers'
/// `apply_chat_template(**kwargs)`: Qwen3- and Qwen 3.5-style `enable_thinking` (tested for, or set from
/// itself), Llama 3.2's `date_string`, `tools` and `tools_in_user_message`, a special token overridden; so do
/// their ids. A name the template does not read, or one the renderer sets, is refused (vLLM drops the first
/// silently).
#[test]
fn kwargs_render_as_transformers_renders_them() {
    let e = expected();
    let tok = Tokenizer::from_dir(&fixture("llama/model")).unwrap();
    let cases = e["kwargs"].as_array().unwrap();
    for case in cases {
        let (name, conv) = (case["template"].as_str().unwrap(), case["conversation"].as_str().unwrap());
        let kwargs = kwargs_of(&case["kwargs"]);
        let what = format!("{name} × {conv} with {kwargs:?}");
        let chat =
            ChatTemplate::compile(e["templates"][name].as_str().unwrap(), tok.chat.special_tokens.clone()).unwrap();
        chat.check_kwargs(&kwargs).unwrap_or_else(|m| panic!("{what}: {m}"));
        let messages = e["conversations"][conv].as_array().unwrap();
        let text = chat.render_prompt(messages, false, &kwargs).unwrap_or_else(|m| panic!("{what}: {m}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
        let want = ids(&case[if text.starts_with("<s>") { "ids_plain" } else { "ids_special" }]);
        assert_eq!(chat.prompt_ids(&tok, messages, false, &kwargs).unwrap(), want, "{what}");
    }
    assert_eq!(cases.len(), 9);
    let thinking = ChatTemplate::compile(e["templates"]["thinking"].as_str().unwrap(), vec![]).unwrap();
    assert_eq!(thinking.variables(), ["enable_thinking"]);
    for (kwargs, words) in [
        (
            serde_json::json!({"enable_thinkng": false}),
            "`enable_thinkng`: the chat template reads no variable of that name (it reads [\"enable_thinking\"])",
        ),
        (serde_json::json!({"add_generation_prompt": false}), "`add_generation_prompt` is set by the server"),
        (serde_json::json!({"messages": []}), "`messages` is set by the server"),
    ] {
        let e = thinking.check_kwargs(&kwargs_of(&kwargs)).unwrap_err();
        assert!(e.starts_with(words), "{e}");
    }
}

/// A folder whose chat templates are named ("default" and "tool_use", here in `additional_chat_templates/`)
/// renders a call whose kwargs give `tools` (an empty list included, not null) with "tool_use", and any other
/// with "default", as transformers picks them; the kwargs are checked against the template that renders.
#[test]
fn named_templates_are_picked_as_transformers_picks_them() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture("llama/model"), tmp.path());
    std::fs::create_dir(tmp.path().join("additional_chat_templates")).unwrap();
    for name in ["default", "tool_use"] {
        let template = e["named"]["templates"][name].as_str().unwrap();
        std::fs::write(tmp.path().join(format!("additional_chat_templates/{name}.jinja")), template).unwrap();
    }
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    let chat = ChatTemplate::new(&tok).unwrap();
    let cases = e["named"]["results"].as_array().unwrap();
    for case in cases {
        let conv = case["conversation"].as_str().unwrap();
        let kwargs = kwargs_of(&case["kwargs"]);
        let what = format!("{conv} with {kwargs:?}");
        chat.check_kwargs(&kwargs).unwrap_or_else(|m| panic!("{what}: {m}"));
        let messages = e["conversations"][conv].as_array().unwrap();
        let text = chat.render_prompt(messages, false, &kwargs).unwrap_or_else(|m| panic!("{what}: {m}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
        assert_eq!(chat.prompt_ids(&tok, messages, false, &kwargs).unwrap(), ids(&case["ids_special"]), "{what}");
    }
    assert_eq!(cases.len(), 4);
    // Without a "tool_use" template, tools go to "default", which reads none: refused, not dropped.
    let default = ChatTemplate::compile(e["named"]["templates"]["default"].as_str().unwrap(), vec![]).unwrap();
    let e = default.check_kwargs(&kwargs_of(&serde_json::json!({"tools": []}))).unwrap_err();
    assert!(e.starts_with("`tools`: the chat template reads no variable"), "{e}");
}

/// The template a conversation is rendered with: an adapter whose folder brings one (chat_template.jinja)
/// renders with it, `chat_template_kwargs` included; other adapters and the base get the server's
/// `--chat-template` over the model's (here: none); the adapter's template is part of its version, so editing
/// or removing it swaps it without a restart. Kwargs the chosen template does not read, kwargs without
/// messages, unreadable chat files and a template rendering a token the base tokenizer lacks are refused with
/// the reason, and the adapter's raw prompts still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_bring_their_own_chat_template() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    for name in ["qkvo-r8", "qv-r4", "all-r16-rslora"] {
        common::copy_dir(&fixture(&format!("llama/adapters/{name}")), &adapters.join(name));
    }
    let own = adapters.join("qkvo-r8");
    std::fs::write(own.join("chat_template.jinja"), e["templates"]["thinking"].as_str().unwrap()).unwrap();
    let tools = adapters.join("all-r16-rslora/chat_template.jinja");
    std::fs::write(tools, "{{ tools[0] | tojson(indent=4) }}").unwrap();
    let mut cfg = config(adapters.clone());
    cfg.chat_template = Some(e["templates"]["chatml"].as_str().unwrap().to_string());
    let (_h, mut c) = start(cfg).await;
    let result = |template: &str, conv: &str| {
        let found =
            e["results"].as_array().unwrap().iter().find(|r| r["template"] == template && r["conversation"] == conv);
        ids(&found.unwrap()["prompt"]["ids_special"])
    };
    let with_kwargs =
        |i: usize| (ids(&e["kwargs"][i]["ids_special"]), e["kwargs"][i]["text"].as_str().unwrap().to_string());
    let turns = |conv: &str| -> Vec<ChatMessage> {
        let list = e["conversations"][conv].as_array().unwrap();
        list.iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect()
    };
    let ask = |adapter: &str, conv: &str, kwargs: Option<Value>| GenerateRequest {
        messages: turns(conv),
        chat_template_kwargs: kwargs.map(|k| k.to_string()).unwrap_or_default(),
        ..req(adapter, "", 4)
    };
    // The base and an adapter without a template: the server's --chat-template (ChatML).
    for adapter in ["", "qv-r4"] {
        assert_eq!(prompt_ids(&mut c, ask(adapter, "user", None)).await.0, result("chatml", "user"), "{adapter:?}");
    }
    // Without the generation prompt (`<|im_start|>assistant\n`): transformers' add_generation_prompt=False,
    // through Generate and Tokenize.
    let found =
        e["results"].as_array().unwrap().iter().find(|r| r["template"] == "chatml" && r["conversation"] == "user");
    let full = ids(&found.unwrap()["full"]["ids_special"]);
    assert_ne!(full, result("chatml", "user"));
    let as_is = GenerateRequest { add_generation_prompt: Some(false), ..ask("", "user", None) };
    assert_eq!(prompt_ids(&mut c, as_is).await.0, full);
    let r = loraserve::server::proto::TokenizeRequest {
        messages: turns("user"),
        add_generation_prompt: Some(false),
        ..Default::default()
    };
    assert_eq!(c.tokenize(r).await.unwrap().into_inner().token_ids, full);
    // The adapter's own, with and without kwargs; the tokens are those of the same ids sent as text.
    for (i, conv, kwargs) in [(0, "user", None), (1, "multi-turn", Some(serde_json::json!({"enable_thinking": false})))]
    {
        let (want, text) = with_kwargs(i);
        let by_messages = prompt_ids(&mut c, ask("qkvo-r8", conv, kwargs.clone())).await;
        assert_eq!(by_messages.0, want, "{conv}");
        // Tokenize renders with the adapter's template too.
        let r = loraserve::server::proto::TokenizeRequest {
            adapter_id: "qkvo-r8".into(),
            messages: turns(conv),
            chat_template_kwargs: kwargs.map(|k| k.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        let t = c.tokenize(r).await.unwrap().into_inner();
        assert_eq!((t.token_ids, t.adapter_version), (want.clone(), version(&mut c, "qkvo-r8").await), "{conv}");
        assert_eq!(by_messages, prompt_ids(&mut c, req("qkvo-r8", &text, 4)).await, "{conv}");
    }
    // `tools` as Llama 3.2's template writes them (`tojson(indent=4)`): keys in the order sent, as in
    // transformers' rendering of that template.
    let case = e["kwargs"].as_array().unwrap().iter().find(|k| k["kwargs"]["tools"].is_array()).unwrap();
    assert_eq!(case["template"], "llama-3.2");
    let text = case["text"].as_str().unwrap();
    let start = text.find("{\n    \"type\": \"function\"").unwrap();
    let tool = &text[start..start + text[start..].find("\n}").unwrap() + 2];
    assert!(tool.find("\"type\"").unwrap() < tool.find("\"function\": {").unwrap(), "{tool}");
    let r = ask("all-r16-rslora", "user", Some(serde_json::json!({"tools": case["kwargs"]["tools"].clone()})));
    let tok = Tokenizer::from_dir(&fixture("llama/model")).unwrap();
    assert_eq!(prompt_ids(&mut c, r).await.0, tok.encode(tool).unwrap());
    let refused = [
        (
            ask("", "user", Some(serde_json::json!({"enable_thinking": false}))),
            "chat_template_kwargs: `enable_thinking`: the chat template reads no variable of that name (it reads [])",
        ),
        (
            ask("qkvo-r8", "user", Some(serde_json::json!({"enable_thinkng": 1}))),
            "chat_template_kwargs: `enable_thinkng`: the chat template reads no variable",
        ),
        (
            GenerateRequest { chat_template_kwargs: "[true]".into(), ..ask("qkvo-r8", "user", None) },
            "chat_template_kwargs: expected a JSON object",
        ),
        (
            GenerateRequest { messages: chat(&[("user", "U"), ("", "A")]), ..ask("qkvo-r8", "user", None) },
            "messages[1].role: is empty",
        ),
        (
            GenerateRequest { chat_template_kwargs: "{}".into(), ..req("qkvo-r8", "Hi", 4) },
            "chat_template_kwargs: needs messages",
        ),
    ];
    for (r, words) in refused {
        let s = c.generate(r).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(words), "{s:?}");
    }
    // Edited, then removed: a new version each time, rendered with what is there now.
    let v1 = version(&mut c, "qkvo-r8").await;
    std::fs::write(
        own.join("chat_template.jinja"),
        e["templates"]["chatml"].as_str().unwrap().replace("<|im_start|>", "<|start|>"),
    )
    .unwrap();
    let v2 = version(&mut c, "qkvo-r8").await;
    let chatml_user =
        e["results"].as_array().unwrap().iter().find(|r| r["template"] == "chatml" && r["conversation"] == "user");
    let edited_text = chatml_user.unwrap()["prompt"]["text"].as_str().unwrap().replace("<|im_start|>", "<|start|>");
    let tok = Tokenizer::from_dir(&fixture("llama/model")).unwrap();
    let edited = prompt_ids(&mut c, ask("qkvo-r8", "user", None)).await.0;
    assert_eq!(edited, tok.encode(&edited_text).unwrap(), "the edited template");
    std::fs::remove_file(own.join("chat_template.jinja")).unwrap();
    let v3 = version(&mut c, "qkvo-r8").await;
    assert_eq!(prompt_ids(&mut c, ask("qkvo-r8", "user", None)).await.0, result("chatml", "user"), "the server's");
    let s = c.generate(ask("qkvo-r8", "user", Some(serde_json::json!({"enable_thinking": false})))).await.unwrap_err();
    assert!(s.message().contains("reads no variable"), "the server's template reads none: {s:?}");
    assert!(v1 != v2 && v2 != v3 && v1 != v3, "{v1} {v2} {v3}");
    // Chat files that cannot be read, and a token the adapter's tokenizer adds that the base lacks.
    let chatml = e["templates"]["chatml"].as_str().unwrap();
    let config =
        serde_json::json!({"chat_template": chatml, "added_tokens_decoder": {"320": {"content": "<|im_start|>"}}});
    for (file, text, code, words) in [
        ("tokenizer_config.json", "{\"chat_template\": ".to_string(), tonic::Code::FailedPrecondition, "messages: adapter `qkvo-r8`: "),
        ("tokenizer_config.json", config.to_string(), tonic::Code::FailedPrecondition, "messages: the rendered conversation holds `<|im_start|>`, a token adapter `qkvo-r8`'s tokenizer_config.json adds as id 320"),
    ] {
        std::fs::write(own.join(file), &text).unwrap();
        let s = c.generate(ask("qkvo-r8", "user", None)).await.unwrap_err();
        assert_eq!(s.code(), code, "{s:?}");
        assert!(s.message().starts_with(words), "{s:?}");
        assert!(words.contains("holds") || s.message().contains("tokenizer_config.json: invalid JSON"), "{s:?}");
        assert_eq!(c.generate(req("qkvo-r8", "Hi", 2)).await.unwrap().into_inner().token_ids.len(), 2);
    }
}

async fn version(
    c: &mut loraserve::server::proto::lora_serve_client::LoraServeClient<tonic::transport::Channel>,
    adapter: &str,
) -> String {
    c.generate(req(adapter, "Hi", 1)).await.unwrap().into_inner().adapter_version
}
