//! Tokenize and Detokenize against Generate: the ids Generate runs for each prompt form, the refusals they
//! share, and the text of ids.

mod common;

use common::serve::{chat, config, req, start};
use loraserve::server::proto::GenerateRequest;

/// Tokenize gives the ids Generate runs (its `prompt_token_ids`) for each prompt form, base and adapter,
/// truncated alike, with or without the special tokens, and the same refusals; it counts a prompt past the
/// context that Generate refuses; its token strings are the vocabulary's; a raw prompt's adapter is looked up,
/// not loaded. Detokenize spells the special tokens out unless told not to, and refuses an id the tokenizer
/// has no token for, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_gives_the_ids_generate_runs() {
    use loraserve::server::proto::{DetokenizeRequest, ListAdaptersRequest, TokenizeRequest};
    let adapters = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters");
    let cfg = loraserve::server::ServeConfig { model: loraserve::model::ModelSpec::Demo, ..config(adapters) };
    let (_h, mut c) = start(cfg).await;
    let tok = loraserve::model::demo::tokenizer().unwrap();
    let text = |prompt: &str| TokenizeRequest { prompt: prompt.into(), ..Default::default() };
    // Before anything loads `upper`: a raw prompt only looks it up.
    let t = c.tokenize(TokenizeRequest { adapter_id: "upper".into(), ..text("Hi") }).await.unwrap().into_inner();
    assert_eq!((t.token_ids.len(), t.adapter_version.as_str()), (3, ""));
    let listed = c.list_adapters(ListAdaptersRequest {}).await.unwrap().into_inner().adapters;
    let upper = listed.iter().find(|a| a.adapter_id == "upper").unwrap();
    assert!(!upper.device_resident && !upper.host_resident && upper.version.is_empty(), "{upper:?}");
    let turns = chat(&[("system", "Be brief."), ("user", "cat moon fire")]);
    let conversation = || TokenizeRequest { messages: turns.clone(), ..Default::default() };
    for adapter in ["", "upper"] {
        let forms = [
            (req(adapter, "cat moon fire\n", 4), text("cat moon fire\n")),
            (GenerateRequest { messages: turns.clone(), ..req(adapter, "", 4) }, conversation()),
            (
                GenerateRequest { truncate_prompt_tokens: Some(5), ..req(adapter, "cat moon fire\n", 4) },
                TokenizeRequest { truncate_prompt_tokens: Some(5), ..text("cat moon fire\n") },
            ),
            (
                GenerateRequest { messages: turns.clone(), truncate_prompt_tokens: Some(7), ..req(adapter, "", 4) },
                TokenizeRequest { truncate_prompt_tokens: Some(7), ..conversation() },
            ),
            (
                GenerateRequest { add_special_tokens: Some(false), ..req(adapter, "cat moon fire\n", 4) },
                TokenizeRequest { add_special_tokens: Some(false), ..text("cat moon fire\n") },
            ),
            (
                GenerateRequest {
                    add_special_tokens: Some(false),
                    truncate_prompt_tokens: Some(3),
                    ..req(adapter, "cat moon fire\n", 4)
                },
                TokenizeRequest {
                    add_special_tokens: Some(false),
                    truncate_prompt_tokens: Some(3),
                    ..text("cat moon fire\n")
                },
            ),
        ];
        let mut seen = Vec::new();
        for (generate, tokenize) in forms {
            let what = format!("{adapter:?} {tokenize:?}");
            let g = c.generate(GenerateRequest { prompt_logprobs: Some(0), ..generate }).await.unwrap().into_inner();
            let rendered = !tokenize.messages.is_empty();
            let r = TokenizeRequest { adapter_id: adapter.into(), return_token_strs: true, ..tokenize };
            let t = c.tokenize(r).await.unwrap().into_inner();
            assert_eq!(t.token_ids, g.prompt_token_ids, "{what}");
            // The version of the adapter that rendered the conversation; a raw prompt's is not loaded for it.
            let version = if rendered { g.adapter_version.as_str() } else { "" };
            assert_eq!((t.adapter_version.as_str(), t.max_model_len), (version, 1024), "{what}");
            let strs: Vec<String> = t.token_ids.iter().map(|&id| tok.id_to_token(id).unwrap()).collect();
            assert_eq!(t.token_strs, strs, "{what}");
            seen.push(t.token_ids);
        }
        // With the BOS, without it, and their last three tokens (the BOS kept only where it was put).
        let bos = tok.encode("").unwrap();
        assert_eq!((bos.len(), seen[4].len()), (1, 14));
        assert_eq!(seen[0], [&bos[..], &seen[4]].concat());
        assert_eq!(seen[2], [&bos[..], &seen[4][10..]].concat());
        assert_eq!(seen[5], seen[4][11..]);
    }
    // add_generation_prompt: true is the default; false leaves continue_final_message's rendering as it is.
    let ends = [(None, false), (Some(true), false), (None, true), (Some(false), true), (Some(false), false)];
    let mut rendered = Vec::new();
    for (add_generation_prompt, continue_final_message) in ends {
        let r = TokenizeRequest { add_generation_prompt, continue_final_message, ..conversation() };
        rendered.push(c.tokenize(r).await.unwrap().into_inner().token_ids);
    }
    assert_eq!((&rendered[0], &rendered[2]), (&rendered[1], &rendered[3]));
    assert!(rendered[0] != rendered[2] && rendered[0] != rendered[4] && rendered[2] != rendered[4]);
    // Generate refuses what is past the context; Tokenize counts it.
    let long = "ab".repeat(550);
    let s = c.generate(req("", &long, 4)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().starts_with("prompt: 1101 prompt tokens"), "{s:?}");
    let t = c.tokenize(text(&long)).await.unwrap().into_inner();
    assert_eq!((t.token_ids.len(), t.token_strs.len()), (1101, 0));
    let refused = [
        (TokenizeRequest::default(), tonic::Code::InvalidArgument, "prompt: is empty (give a prompt or messages)"),
        (
            TokenizeRequest { messages: chat(&[("user", "U")]), ..text("Hi") },
            tonic::Code::InvalidArgument,
            "messages: given with prompt: give one of prompt and messages",
        ),
        (
            TokenizeRequest { continue_final_message: true, ..text("Hi") },
            tonic::Code::InvalidArgument,
            "continue_final_message: needs messages",
        ),
        (
            TokenizeRequest { chat_template_kwargs: "{}".into(), ..text("Hi") },
            tonic::Code::InvalidArgument,
            "chat_template_kwargs: needs messages",
        ),
        (
            TokenizeRequest { truncate_prompt_tokens: Some(1025), ..text("Hi") },
            tonic::Code::InvalidArgument,
            "truncate_prompt_tokens: must be in 1..=1024 (the model's context), got 1025",
        ),
        (
            TokenizeRequest { add_generation_prompt: Some(false), ..text("Hi") },
            tonic::Code::InvalidArgument,
            "add_generation_prompt: needs messages",
        ),
        (
            TokenizeRequest { add_generation_prompt: Some(true), continue_final_message: true, ..conversation() },
            tonic::Code::InvalidArgument,
            "add_generation_prompt: true with continue_final_message",
        ),
        (
            TokenizeRequest { add_special_tokens: Some(true), ..conversation() },
            tonic::Code::InvalidArgument,
            "add_special_tokens: applies to prompt (a conversation's special tokens are its chat template's)",
        ),
        (TokenizeRequest { adapter_id: "missing".into(), ..text("Hi") }, tonic::Code::NotFound, "adapter `missing`"),
        (
            TokenizeRequest { adapter_id: "missing".into(), ..conversation() },
            tonic::Code::NotFound,
            "adapter `missing`",
        ),
        (TokenizeRequest { adapter_id: "../upper".into(), ..text("Hi") }, tonic::Code::InvalidArgument, "adapter_id: "),
    ];
    for (r, code, words) in refused {
        let s = c.tokenize(r).await.unwrap_err();
        assert_eq!(s.code(), code, "{s:?}");
        assert!(s.message().starts_with(words), "{s:?}");
    }
    let by_ids = GenerateRequest { prompt_token_ids: vec![3, 4], add_special_tokens: Some(false), ..req("", "", 4) };
    let s = c.generate(by_ids).await.unwrap_err();
    let words = "add_special_tokens: applies to prompt (prompt_token_ids run as given)";
    assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, words));
    let by_ids = GenerateRequest { prompt_token_ids: vec![3, 4], add_generation_prompt: Some(false), ..req("", "", 4) };
    let s = c.generate(by_ids).await.unwrap_err();
    let words = "add_generation_prompt: needs messages (a conversation to render)";
    assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, words));
    let ids = c.tokenize(text("cat moon fire\n")).await.unwrap().into_inner().token_ids;
    let detokenize = |skip_special_tokens| DetokenizeRequest { token_ids: ids.clone(), skip_special_tokens };
    let spelled = |r: tonic::Response<loraserve::server::proto::DetokenizeResponse>| r.into_inner().text;
    let bos = tok.decode_with(&ids[..1], false).unwrap();
    assert!(!bos.is_empty());
    assert_eq!(spelled(c.detokenize(detokenize(None)).await.unwrap()), format!("{bos}cat moon fire\n"));
    assert_eq!(spelled(c.detokenize(detokenize(Some(true))).await.unwrap()), "cat moon fire\n");
    assert_eq!(spelled(c.detokenize(DetokenizeRequest::default()).await.unwrap()), "");
    let s = c.detokenize(DetokenizeRequest { token_ids: vec![70, 3, 259], ..Default::default() }).await.unwrap_err();
    let words = "token_ids[2]: 259 is no token of the tokenizer (its vocabulary: 259 tokens)";
    assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, words));
}
