//! The `server` binary as a process: SIGTERM drains in-flight requests and exits 0, the bundled client's
//! error texts, and `serve` settings refused at start with one line naming the flag.

use std::path::PathBuf;
use std::time::Duration;

use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::GenerateRequest;

/// A child process killed when dropped: a failed assertion never leaves a server running (holding the test
/// runner's output open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type StderrLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// `server serve` on the demo model and `adapters` (ports chosen by the system, then `extra` flags), once it
/// says it is serving: the process, its gRPC address, the rest of its log, and its metrics address.
fn serve(adapters: &std::path::Path, extra: &[&str]) -> (KillOnDrop, String, StderrLines, String) {
    use std::io::BufRead;
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--adapters"])
            .arg(adapters)
            .args(extra)
            .env("LORASERVE_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("serving") {
            let field = |name: &str| {
                let i = line.find(name).unwrap() + name.len();
                line[i..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
                    .to_string()
            };
            return (child, field("grpc="), lines, field("metrics="));
        }
    }
    panic!("the server never said it was serving");
}

/// SIGTERM: the in-flight request completes, the process exits 0; on the way, the bundled client's output into
/// a closed pipe, its message for an adapter id no header can carry, its sampling flags and `--logprobs`.
#[test]
fn sigterm_drains_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    // `upper` answers, then emits EOS: what --min-tokens and --ignore-eos change.
    let upper = tmp.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters/upper").join(f), upper.join(f)).unwrap();
    }
    let (mut child, addr, lines, _) = serve(tmp.path(), &[]);
    // `server client generate … | head -0`: output into a pipe nobody reads is no error (no panic, exit 0).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["client", "--addr", &addr, "generate", "--prompt", "Hello", "--max-new-tokens", "2"])
        .stdout(writer)
        .output()
        .unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "{o:?}");
    // An id no header can carry: the server names what is wrong with the id, not a header the user never set.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["client", "--addr", &addr, "generate", "--adapter", "ünï", "--prompt", "Hello"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("INVALID_ARGUMENT") && err.contains("'ü'"), "{err}");
    assert!(!err.contains("x-adapter-id"), "{err}");
    // `--deadline` is sent as the call's deadline: a generation as long as the context fits (~1 s here) ends
    // at 0.2 s, DEADLINE_EXCEEDED (the server's answer, or the client's own timer when it fires first).
    let client = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let long = ["generate", "--prompt", "Hello", "--max-new-tokens", "0", "--ignore-eos"];
    let (ok, err) = client(&[&["client", "--addr", &addr, "--deadline", "0.2"][..], &long].concat());
    assert!(!ok && err.starts_with("error: DEADLINE_EXCEEDED: "), "{err}");
    let (ok, err) = client(&["client", "--addr", &addr, "--deadline", "0", "list"]);
    assert!(!ok && err.contains("'--deadline <SECONDS>': expected a positive number of seconds"), "{err}");
    assert!(client(&["client", "--addr", &addr, "--deadline", "30", "list"]).0);
    // The prefix cache is on by default: the same 40-byte prompt again (the demo's byte-level tokenizer, KV
    // blocks of 16) starts from its two cached blocks, and the client prints so.
    let cached = || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["client", "--addr", &addr, "generate", "--max-new-tokens", "1", "--json", "--prompt"])
            .arg("0123456789".repeat(4))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        json["cached_prompt_tokens"].as_u64().unwrap()
    };
    assert_eq!((cached(), cached()), (0, 32));
    // `client tokenize` prints the ids as --prompt-token-ids takes them; `client detokenize` their text.
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let ids = run(&["client", "--addr", &addr, "tokenize", "--prompt", "cat moon fire\n"]);
    assert_eq!(ids, "0,102,100,119,35,112,114,114,113,35,105,108,117,104,13\n");
    let text =
        run(&["client", "--addr", &addr, "detokenize", "--skip-special-tokens", "true", "--token-ids", ids.trim()]);
    assert_eq!(text, "cat moon fire\n\n");
    // `client info`: the demo, as served here.
    let info: serde_json::Value = serde_json::from_str(&run(&["client", "--addr", &addr, "info"])).unwrap();
    assert_eq!(
        (&info["model_id"], &info["max_model_len"], &info["vocab_size"]),
        (&"demo".into(), &1024.into(), &259.into())
    );
    assert_eq!((&info["quantization"], &info["chat_template"]), (&"nf4".into(), &true.into()), "{info}");
    // Each token's string, quoted (a newline is a token); the text alone, without the BOS.
    let strs = run(&["client", "--addr", &addr, "tokenize", "--prompt", "a\n", "--token-strs"]);
    assert_eq!(strs, "0\t\"<s>\"\n100\t\"a\"\n13\t\"Ċ\"\n");
    let alone = run(&["client", "--addr", &addr, "tokenize", "--prompt", "a\n", "--add-special-tokens", "false"]);
    assert_eq!(alone, "100,13\n");
    for args in [&["--prompt-token-ids", "1,2"][..], &["--message", "user=hi", "--add-special-tokens", "true"]] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args([&["client", "--addr", &addr, "tokenize"][..], args].concat())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let words = match args[0] {
            "--prompt-token-ids" => "--prompt-token-ids: tokenize takes --prompt or --message",
            _ => "--add-special-tokens applies to --prompt",
        };
        assert!(!o.status.success() && err.contains(words), "{args:?}: {err}");
    }
    // The client's penalty flags reach the server: each gives the tokens `server generate` gives with it (and
    // other tokens than without it). A value out of range is refused by the client, naming the field.
    let token_ids = |args: &[&str]| -> Vec<u64> {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
    };
    let call = ["--prompt", "Hello", "--max-new-tokens", "16", "--json"];
    let client = ["client", "--addr", &addr, "generate"];
    let local = ["generate", "--model", "demo"];
    let plain = token_ids(&[&client[..], &call].concat());
    for (flag, value) in [("--repetition-penalty", "1.5"), ("--frequency-penalty", "1"), ("--presence-penalty", "1")] {
        let served = token_ids(&[&client[..], &call, &[flag, value]].concat());
        assert_eq!(served, token_ids(&[&local[..], &call, &[flag, value]].concat()), "{flag}");
        assert_ne!(served, plain, "{flag} changes nothing");
    }
    // --max-new-tokens 0: as many as fit, locally as the server counts them (past EOS: the demo's context of
    // 1024 after the prompt's 6 tokens); a prompt that fills the context leaves none.
    let all = ["--prompt", "Hello", "--max-new-tokens", "0", "--ignore-eos", "--json"];
    let served = token_ids(&[&client[..], &all].concat());
    assert_eq!((served.len(), &served), (1018, &token_ids(&[&local[..], &all].concat())));
    let full = "x".repeat(1023);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args([&local[..], &["--max-new-tokens", "0", "--prompt", &full]].concat())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("1024 prompt tokens leave no room for a new token"), "{err}");
    // So does --min-p, against the same sampled call without it ...
    let sampled = [&call[..], &["--temperature", "1", "--seed", "3"]].concat();
    let served = token_ids(&[&client[..], &sampled, &["--min-p", "0.2"]].concat());
    assert_eq!(served, token_ids(&[&local[..], &sampled, &["--min-p", "0.2"]].concat()), "--min-p");
    assert_ne!(served, token_ids(&[&client[..], &sampled].concat()), "--min-p changes nothing");
    // --n: completion i is the call alone with seed 3 + i, streamed or not.
    let mut answers = Vec::new();
    for stream in [&[][..], &["--stream"]] {
        let args = [&client[..], &sampled, &["--n", "2"], stream].concat();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2, "{v}");
        for (i, c) in choices.iter().enumerate() {
            let seed = (3 + i).to_string();
            let alone = token_ids(&[&local[..], &call, &["--temperature", "1", "--seed", &seed]].concat());
            let ids: Vec<u64> = c["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
            assert_eq!((c["index"].as_u64(), &ids), (Some(i as u64), &alone), "{args:?}");
            answers.push(ids);
        }
    }
    assert_ne!(answers[0], answers[1], "seeds 3 and 4 drew one answer: the comparison proves little");
    // `server generate --n 2` runs them one after the other, seeded the same way: the same completions.
    let args = [&local[..], &sampled, &["--n", "2"]].concat();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(&args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids = |c: &serde_json::Value| -> Vec<u64> {
        c["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
    };
    let local_answers: Vec<_> = v["choices"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(local_answers, answers[..2], "{v}");
    // ... and so do the flags that move the end of `upper`'s answer.
    let answer = ["--adapter", "upper", "--prompt", "cat moon fire\n", "--max-new-tokens", "24", "--json"];
    let local_upper = ["generate", "--model", "demo", "--adapters", tmp.path().to_str().unwrap()];
    let plain_answer = token_ids(&[&client[..], &answer].concat());
    // 80 is "M" (the demo's tokens are bytes, offset by 3).
    let allow = ["--allowed-token-id", "100", "--allowed-token-id", "35", "--allowed-token-id", "2"];
    let schema = tmp.path().join("schema.json");
    std::fs::write(&schema, r#"{"type": "object", "properties": {"a": {"enum": ["CAT", "MOON"]}}}"#).unwrap();
    let schema = format!("@{}", schema.display());
    let flags: [&[&str]; 9] = [
        &["--min-tokens", "20"],
        &["--ignore-eos"],
        &["--stop-token-id", "80"],
        &["--logit-bias", "70=-100"],
        &allow,
        &["--truncate-prompt-tokens", "5"],
        &["--choice", "CAT FIRE", "--choice", "MOON"],
        &["--regex", "[A-Z]{2,4}"],
        &["--json-schema", &schema],
    ];
    for flags in flags {
        let served = token_ids(&[&client[..], &answer, flags].concat());
        assert_eq!(served, token_ids(&[&local_upper[..], &answer, flags].concat()), "{flags:?}");
        assert_ne!(served, plain_answer, "{flags:?} changes nothing");
    }
    // --logprobs: one log-probability per token, each ≤ 0, streamed or not; without it, none.
    for stream in [&[][..], &["--stream"]] {
        let args = [&client[..], &call, &["--logprobs"], stream].concat();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let logprobs = v["logprobs"].as_array().unwrap();
        assert_eq!(logprobs.len(), v["token_ids"].as_array().unwrap().len(), "{args:?}");
        assert!(logprobs.iter().all(|p| p.as_f64().unwrap() <= 0.0), "{v}");
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args([&client[..], &call].concat()).output();
    assert!(serde_json::from_slice::<serde_json::Value>(&o.unwrap().stdout).unwrap().get("logprobs").is_none());
    // --top-logprobs 3 (implies --logprobs): three tokens per step, most likely first, the greedy pick first.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args([&client[..], &call, &["--top-logprobs", "3"]].concat())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (ids, logprobs, top) = (&v["token_ids"], &v["logprobs"], v["top_logprobs"].as_array().unwrap());
    assert_eq!(top.len(), ids.as_array().unwrap().len(), "{v}");
    for (step, t) in top.iter().enumerate() {
        let t = t.as_array().unwrap();
        let lp: Vec<f64> = t.iter().map(|e| e["logprob"].as_f64().unwrap()).collect();
        assert!(t.len() == 3 && lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0, "{v}");
        assert_eq!((&t[0]["token_id"], t[0]["logprob"].as_f64()), (&ids[step], logprobs[step].as_f64()), "{v}");
    }
    // --prompt-logprobs 2, streamed or not: the prompt's ids (those `server generate` encodes), then one
    // log-probability per id after the first, and the 2 most likely tokens at each of those positions.
    let local_ids = {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args([&local[..], &call].concat()).output();
        serde_json::from_slice::<serde_json::Value>(&o.unwrap().stdout).unwrap()["prompt_token_ids"].clone()
    };
    for stream in [&[][..], &["--stream"]] {
        let args = [&client[..], &call, &["--prompt-logprobs", "2"], stream].concat();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["prompt_token_ids"], local_ids, "{args:?}");
        let (lps, top) = (v["prompt_logprobs"].as_array().unwrap(), v["prompt_top_logprobs"].as_array().unwrap());
        assert_eq!((lps.len(), top.len()), (local_ids.as_array().unwrap().len() - 1, lps.len()), "{v}");
        for (lp, t) in lps.iter().zip(top) {
            let t: Vec<f64> = t.as_array().unwrap().iter().map(|e| e["logprob"].as_f64().unwrap()).collect();
            assert!(t.len() == 2 && t[0] >= t[1] && t[0] <= 0.0 && lp.as_f64().unwrap() <= t[0], "{v}");
        }
        assert!(v.get("logprobs").is_none(), "{v}");
    }
    // --message: the server renders a conversation with the demo's chat template as `server generate` does
    // (`<|role|>` lines, BOS added: the template writes none), with the adapter.
    let chat = ["--message", "system=Be brief.", "--message", "user=cat moon", "--max-new-tokens", "12", "--json"];
    let local_chat = {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args([&local_upper[..], &["--adapter", "upper"], &chat].concat())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let demo = loraserve::model::demo::tokenizer().unwrap();
    let want = demo.encode("<|system|>\nBe brief.\n<|user|>\ncat moon\n<|assistant|>\n").unwrap();
    assert_eq!(local_chat["prompt_token_ids"], serde_json::json!(want));
    let args = [&client[..], &["--adapter", "upper", "--prompt-logprobs", "0"], &chat].concat();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let served: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(served["prompt_token_ids"], local_chat["prompt_token_ids"]);
    assert_eq!(served["token_ids"], local_chat["token_ids"]);
    assert_eq!(served["text"], local_chat["text"]);
    // --continue-final-message: the answer begun is continued, cut right after its text.
    let prefill = ["--message", "user=cat moon", "--message", "assistant=CAT", "--continue-final-message", "--json"];
    let ids_of = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v["prompt_token_ids"].clone(), v["token_ids"].clone())
    };
    let local_prefill = ids_of(&[&local_upper[..], &["--adapter", "upper"], &prefill].concat());
    let want = demo.encode("<|user|>\ncat moon\n<|assistant|>\nCAT").unwrap();
    assert_eq!(local_prefill.0, serde_json::json!(want));
    let served_prefill = ids_of(&[&client[..], &["--adapter", "upper", "--prompt-logprobs", "0"], &prefill].concat());
    assert_eq!(served_prefill, local_prefill);
    // --chat-template-kwargs: the demo's template reads `eos_token` (after each answer), overridden here, served
    // and local alike; a variable it does not read is refused by both.
    let kwargs = ["--message", "user=a", "--message", "assistant=b", "--message", "user=c", "--json"];
    let eos = [&kwargs[..], &["--chat-template-kwargs", r#"{"eos_token": "!"}"#]].concat();
    let local_kwargs = ids_of(&[&local_upper[..], &["--adapter", "upper"], &eos].concat());
    let want = demo.encode("<|user|>\na\n<|assistant|>\nb\n!<|user|>\nc\n<|assistant|>\n").unwrap();
    assert_eq!(local_kwargs.0, serde_json::json!(want));
    assert_eq!(ids_of(&[&client[..], &["--adapter", "upper", "--prompt-logprobs", "0"], &eos].concat()), local_kwargs);
    let typo = [&kwargs[..], &["--chat-template-kwargs", r#"{"eos_tokn": "!"}"#]].concat();
    for head in [&local_upper[..], &client[..]] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args([head, &typo].concat()).output();
        let err = String::from_utf8_lossy(&o.as_ref().unwrap().stderr).into_owned();
        assert!(
            !o.unwrap().status.success() && err.contains("`eos_tokn`: the chat template reads no variable"),
            "{err}"
        );
    }
    // --prompt-token-ids: the ids `--prompt` encodes give its answer, served and local alike.
    let (prompt_ids, answer_ids) = ids_of(&[&local_upper[..], &answer].concat());
    let given: Vec<String> = prompt_ids.as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let by_ids = ["--adapter", "upper", "--prompt-token-ids", &given.join(","), "--max-new-tokens", "24", "--json"];
    assert_eq!(ids_of(&[&local_upper[..], &by_ids].concat()), (prompt_ids.clone(), answer_ids.clone()));
    let served = ids_of(&[&client[..], &by_ids, &["--prompt-logprobs", "0"]].concat());
    assert_eq!(served, (prompt_ids, answer_ids));
    // A stop token's text is left out, served and local alike ("M" is 80); --include-stop-str-in-output keeps
    // it, and keeps a stop string.
    let text_of = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"].clone()
    };
    let at_m = [&answer[..], &["--stop-token-id", "80"]].concat();
    assert_eq!(text_of(&[&client[..], &at_m].concat()), "CAT ");
    assert_eq!(text_of(&[&local_upper[..], &at_m].concat()), "CAT ");
    assert_eq!(text_of(&[&client[..], &at_m, &["--include-stop-str-in-output"]].concat()), "CAT M");
    let kept = [&client[..], &answer, &["--stop", "MOON", "--include-stop-str-in-output"]].concat();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args(&kept).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"], "CAT MOON");
    for (args, words) in [
        (&["--prompt", "a", "--truncate-prompt-tokens", "0"][..], "--truncate-prompt-tokens"),
        (&["--message", "user"], "expected ROLE=TEXT"),
        (&["--message", "user=a", "--prompt", "b"], "cannot be used with"),
        (&["--prompt", "a", "--continue-final-message"], "cannot be used with"),
        (&["--message", "user=a", "--chat-template-kwargs", "[1]"], "expected a JSON object"),
        (&["--prompt", "a", "--chat-template-kwargs", "{}"], "cannot be used with"),
        (&["--prompt-token-ids", "1", "--continue-final-message"], "--continue-final-message needs --message"),
        (&["--prompt-token-ids", "1", "--message", "user=a"], "cannot be used with"),
        (&[], "--prompt"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server")).args([&client[..], args].concat()).output();
        let err = String::from_utf8_lossy(&o.as_ref().unwrap().stderr).into_owned();
        assert!(!o.unwrap().status.success() && err.contains(words), "{args:?}: {err}");
    }
    for (flag, value) in [
        ("--repetition-penalty", "0"),
        ("--frequency-penalty", "3"),
        ("--presence-penalty", "-2.5"),
        ("--min-p", "1.5"),
        ("--min-tokens", "99"),
        ("--logit-bias", "5=101"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["client", "--addr", &addr, "generate", "--prompt", "Hello", flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let field = flag.trim_start_matches("--").replace('-', "_");
        assert!(!o.status.success() && err.contains(&field), "{flag}: {err}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let running = rt.spawn(async move {
        let mut c = LoraServeClient::connect(format!("http://{addr}")).await.unwrap();
        c.generate(GenerateRequest { prompt: "Hello".into(), max_new_tokens: 200, ..Default::default() }).await
    });
    std::thread::sleep(Duration::from_millis(300));
    std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let r = rt.block_on(running).unwrap().expect("in-flight request completed during the drain");
    assert_eq!(r.into_inner().token_ids.len(), 200);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

/// An adapter read that never ends (its weights a FIFO no one writes, as a read from a hung mount) fails its
/// request at the deadline, and does not hold the process after SIGTERM: it exits once the requests are done.
#[test]
fn sigterm_exits_while_an_adapter_read_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let stuck = tmp.path().join("stuck");
    std::fs::create_dir(&stuck).unwrap();
    let upper = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters/upper");
    std::fs::copy(upper.join("adapter_config.json"), stuck.join("adapter_config.json")).unwrap();
    let fifo = stuck.join("adapter_model.safetensors");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (mut child, addr, _lines, _) = serve(tmp.path(), &["--drain-timeout", "5"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        let mut c = LoraServeClient::connect(format!("http://{addr}")).await.unwrap();
        let mut r = tonic::Request::new(GenerateRequest {
            adapter_id: "stuck".into(),
            prompt: "Hello".into(),
            max_new_tokens: 2,
            ..Default::default()
        });
        r.set_timeout(Duration::from_millis(500));
        c.generate(r).await.unwrap_err().code()
    });
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    // Not a timing target: without the fix the process never exits; a minute stands for "never".
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "still running a minute after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

/// Every Generate call is logged once, at its end, under its request id: the client's `x-request-id` or one
/// the server makes, which comes back in the answer's metadata, an error's too. The line says the adapter,
/// the tokens, how each completion finished (and a sampled one's seed) and where the time went; a client that
/// leaves mid-stream is logged CANCELLED with the tokens it had; an id that is not one is refused naming the
/// header.
#[test]
fn each_generate_call_is_logged_under_its_request_id() {
    use tokio_stream::StreamExt;
    let adapters = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters");
    let (_child, addr, lines, _) = serve(&adapters, &[]);
    // The log, read on a thread of its own.
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let generate = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args([&["client", "--addr", &addr, "generate"][..], args].concat())
            .output()
            .unwrap()
    };
    let json = |o: &std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let given = ["--request-id", "req-ok-1", "--json"];
    let ok = json(&generate(
        &[&["--adapter", "persona", "--prompt", "Hello", "--max-new-tokens", "5"][..], &given].concat(),
    ));
    assert_eq!((&ok["request_id"], &ok["stop_reason"]), (&"req-ok-1".into(), &serde_json::Value::Null));
    assert_eq!(ok["seed"], serde_json::Value::Null, "greedy: no seed");
    // A sampled call without a seed reports the one it drew (TGI's details.seed); sent back, the same tokens.
    let sampled = ["--prompt", "Hello", "--max-new-tokens", "12", "--ignore-eos", "--temperature", "2", "--json"];
    let drawn = json(&generate(&[&sampled[..], &["--request-id", "req-seed-1"]].concat()));
    let seed = drawn["seed"].as_u64().unwrap_or_else(|| panic!("no seed: {drawn}")).to_string();
    let again = json(&generate(&[&sampled[..], &["--seed", &seed]].concat()));
    assert_eq!((&again["token_ids"], &again["seed"]), (&drawn["token_ids"], &drawn["seed"]));
    // With n, each completion draws its own; the second one's, sent back with n = 1, gives its tokens.
    let two = json(&generate(&[&sampled[..], &["--n", "2"]].concat()));
    let second = &two["choices"][1];
    let again = json(&generate(&[&sampled[..], &["--seed", &second["seed"].as_u64().unwrap().to_string()]].concat()));
    assert_eq!((&again["token_ids"], &again["seed"]), (&second["token_ids"], &second["seed"]));
    assert_ne!(two["choices"][0]["seed"], second["seed"]);
    let made = json(&generate(&["--prompt", "Hello", "--max-new-tokens", "3", "--n", "2", "--stream", "--json"]));
    let made = made["request_id"].as_str().unwrap().to_string();
    assert!(made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
    let bad = generate(&["--prompt", "", "--request-id", "req-bad-1"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(err.contains("INVALID_ARGUMENT: prompt: is empty") && err.ends_with("(request id req-bad-1)\n"), "{err}");
    // A failure mid-stream (the output spelled "ye" when the bad word leaves nothing) names it too.
    let mid = ["--regex", "yes", "--bad-word", "yes", "--stream", "--prompt", "Hello", "--request-id", "req-mid-1"];
    let mid = generate(&mid);
    let err = String::from_utf8_lossy(&mid.stderr);
    assert!(!mid.status.success() && String::from_utf8_lossy(&mid.stdout) == "ye", "{err}");
    assert!(
        err.contains("INVALID_ARGUMENT: bad_words: they ban") && err.ends_with("(request id req-mid-1)\n"),
        "{err}"
    );
    // The stop string found, as --json prints it (vLLM's stop_reason).
    let stop =
        json(&generate(&["--prompt", "Hello", "--max-new-tokens", "8", "--stop", "FF", "--stop", "F", "--json"]));
    assert_eq!((&stop["text"], &stop["stop_reason"]), (&"".into(), &"F".into()), "{stop}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = LoraServeClient::connect(format!("http://{addr}")).await.unwrap();
        let long =
            GenerateRequest { prompt: "Hello".into(), max_new_tokens: 1000, ignore_eos: true, ..Default::default() };
        let mut r = tonic::Request::new(long.clone());
        r.metadata_mut().insert("x-request-id", "req-left-1".parse().unwrap());
        let answer = c.generate_stream(r).await.unwrap();
        assert_eq!(answer.metadata().get("x-request-id").unwrap(), "req-left-1");
        let mut stream = answer.into_inner();
        stream.next().await.unwrap().unwrap();
        drop(stream);
        let mut r = tonic::Request::new(long);
        r.metadata_mut().insert("x-request-id", "two words".parse().unwrap());
        let e = c.generate(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("x-request-id: must be visible ASCII"), "{}", e.message());
    });
    // A last call, after all the others ended: once its line is out, theirs are.
    json(&generate(&["--prompt", "Hello", "--max-new-tokens", "1", "--json", "--request-id", "req-last-1"]));
    // Each id's line, once (the refused id has none: it is no id).
    let ids = ["req-ok-1", made.as_str(), "req-bad-1", "req-mid-1", "req-left-1", "req-last-1", "req-seed-1"];
    let mut found = std::collections::BTreeMap::new();
    let mut wait = Duration::from_secs(30);
    while let Ok(line) = log.recv_timeout(wait) {
        assert!(!line.contains("two words"), "{line}");
        if let Some(id) = ids.iter().find(|id| line.contains(&format!("request_id=\"{id}\" "))) {
            assert!(found.insert(*id, line.clone()).is_none(), "logged twice: {line}");
        }
        if found.len() == ids.len() {
            // Whatever else comes soon: no second line for any of them.
            wait = Duration::from_millis(300);
        }
    }
    assert_eq!(found.len(), ids.len(), "lines for {:?} only", found.keys());
    let field = |line: &str, name: &str| -> String {
        let i = line.find(&format!(" {name}=")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 2;
        line[i..].split(' ').next().unwrap().to_string()
    };
    let secs = |line: &str, name: &str| field(line, name).parse::<f64>().unwrap_or_else(|_| panic!("{name}: {line}"));
    let line = &found["req-ok-1"];
    let version = format!("\"{}\"", ok["adapter_version"].as_str().unwrap());
    for (name, want) in [
        ("rpc", "\"Generate\""),
        ("adapter", "\"persona\""),
        ("adapter_version", version.as_str()),
        ("code", "\"OK\""),
        ("prompt_tokens", "6"),
        ("generated_tokens", "5"),
        ("n", "1"),
        ("finish", "length"),
        ("seed", "-"),
    ] {
        assert_eq!(field(line, name), want, "{name}: {line}");
    }
    assert!(line.contains("INFO") && line.contains("request finished") && !line.contains("error="), "{line}");
    let (queue, first, total) = (secs(line, "queue_s"), secs(line, "first_token_s"), secs(line, "total_s"));
    assert!(queue <= first && first <= total && total < 30.0, "{line}");
    assert_eq!(field(&found["req-seed-1"], "seed"), seed, "the seed drawn");
    let line = &found[made.as_str()];
    for (name, want) in [("rpc", "\"GenerateStream\""), ("adapter", "\"\""), ("n", "2"), ("generated_tokens", "6")] {
        assert_eq!(field(line, name), want, "{name}: {line}");
    }
    assert_eq!(field(line, "finish"), "length,length", "{line}");
    let line = &found["req-bad-1"];
    assert_eq!(field(line, "code"), "\"INVALID_ARGUMENT\"", "{line}");
    assert!(line.contains("request failed") && line.contains(" error=\"prompt: is empty"), "{line}");
    assert_eq!((field(line, "first_token_s"), field(line, "finish")), ("-".into(), "-".into()), "{line}");
    let line = &found["req-mid-1"];
    assert_eq!((field(line, "code"), field(line, "generated_tokens")), ("\"INVALID_ARGUMENT\"".into(), "2".into()));
    assert!(line.contains(" error=\"bad_words: they ban every token"), "{line}");
    let line = &found["req-left-1"];
    assert_eq!(field(line, "code"), "\"CANCELLED\"", "{line}");
    let got: usize = field(line, "generated_tokens").parse().unwrap();
    assert!((1..1000).contains(&got) && line.contains(" error=\"the client left\""), "{line}");
}

/// A server that has served nothing yet already exposes the gauges a dashboard or an autoscaler reads (the
/// queue, the KV-cache blocks used and cached), at 0: with no series, an HPA on the queue has nothing to act on.
#[test]
fn an_idle_server_exposes_its_gauges_at_zero() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let (_child, _, _lines, metrics) = serve(tmp.path(), &[]);
    let mut s = std::net::TcpStream::connect(&metrics).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    for gauge in [
        loraserve::telemetry::QUEUE_REQUESTS,
        loraserve::telemetry::KV_CACHE_BLOCKS_USED,
        loraserve::telemetry::KV_CACHE_BLOCKS_CACHED,
    ] {
        assert!(body.lines().any(|l| l == format!("{gauge} 0")), "{gauge}:\n{body}");
    }
}

/// `server serve` settings that could only refuse every request are refused at start, naming the flag; so
/// are a missing adapters root and a TLS file that is not PEM.
#[test]
fn serve_refuses_settings_that_refuse_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let not_pem = tmp.path().join("cert.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let tls = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
    let missing = tmp.path().join("no-such-adapters");
    let cases: Vec<(Vec<String>, String)> = vec![
        (vec!["--max-new-tokens-cap".into(), "0".into()], "--max-new-tokens-cap must be at least 1".into()),
        (vec!["--max-queue".into(), "0".into()], "--max-queue must be at least 1".into()),
        (vec!["--kv-cache-bytes".into(), "0".into()], "--kv-cache-bytes must be at least 1".into()),
        (
            vec![
                "--tls-cert".into(),
                not_pem.display().to_string(),
                "--tls-key".into(),
                tls.join("server.key").display().to_string(),
            ],
            format!("--tls-cert {}: no PEM block", not_pem.display()),
        ),
        (
            vec![
                "--adapters".into(),
                missing.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
            ],
            format!("{}: the adapters root does not exist", missing.display()),
        ),
    ];
    for (args, words) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .arg("serve")
            .args(&args)
            .env("LORASERVE_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} started");
        assert!(err.contains(&words), "{args:?}: {err}");
    }
    assert!(!missing.exists(), "the missing adapters root was created");
    // A log filter that does not parse is said, not replaced by the default in silence.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["serve", "--help"])
        .env("LORASERVE_LOG", "loraserve=debg")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.starts_with("error: LORASERVE_LOG=\"loraserve=debg\": "), "{err}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["serve", "--help"])
        .env("LORASERVE_LOG", std::os::unix::ffi::OsStrExt::from_bytes(&b"inf\xffo"[..]) as &std::ffi::OsStr)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not UTF-8"), "{err}");
    // Switches read from the environment take the usual spellings of yes and no.
    for (value, ok) in [("1", true), ("yes", true), ("0", true), ("off", true), ("maybe", false)] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["serve", "--max-queue", "0"])
            .env("LORASERVE_LOG", "off")
            .env("LORASERVE_NO_PREFIX_CACHING", value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.contains("--max-queue must be at least 1"), ok, "{value}: {err}");
    }
}
