//! `server train`: gradients against finite differences, a learnable task learned and served, PEFT layout
//! compatibility with the PEFT-made fixtures, the server reproducing the trainer's logits, bit-for-bit resume
//! after SIGKILL, and bad data refused with nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{fixture, rel_l2};
use loraserve::engine::{generate, GenerateJob, SamplingParams};
use loraserve::lora::peft;
use loraserve::lora::trainable::{LoraSpec, TrainableLora};
use loraserve::lora::{LoraRows, ModuleKind};
use loraserve::model::{self, AttentionMode, Batch, LoadOptions, LoadedModel, ModelSpec, SeqInput};
use loraserve::quant::QuantMode;
use loraserve::rng::Rng;
use loraserve::train::data::Example;
use loraserve::train::trainer::{batch_nll, micro_batch_grads};

fn llama(quant: QuantMode) -> LoadedModel {
    model::load(&ModelSpec::Dir(fixture("llama/model")), &LoadOptions { dtype: DType::F32, quant, device: Device::Cpu })
        .unwrap()
}

const ATTN: [ModuleKind; 4] = [ModuleKind::QProj, ModuleKind::KProj, ModuleKind::VProj, ModuleKind::OProj];

/// LoRA gradients match central finite differences (f32, ε = 1e-2): |fd − analytic| ≤ 1e-3 + 2e-2·|analytic|.
#[test]
fn lora_gradients_match_finite_differences() {
    for quant in [QuantMode::None, QuantMode::Nf4] {
        let m = llama(quant);
        let spec = LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, dropout: 0.0, targets: ModuleKind::ALL.to_vec() };
        let lora = TrainableLora::init(&m.model.lora_layout(), spec, 3, &Device::Cpu).unwrap();
        // B starts at zero (PEFT's init), which would make every A gradient zero: randomise it.
        let mut rng = Rng::new(9);
        for v in lora.vars().iter().skip(1).step_by(2) {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.05).collect();
            v.set(&candle_core::Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let tok = &m.tokenizer;
        let mk = |p: &str, c: &str| {
            let mut ids = tok.encode(p).unwrap();
            let n = ids.len();
            ids.extend(tok.encode_with(c, false).unwrap());
            let targets = (0..ids.len()).map(|i| i >= n).collect();
            Example { ids, targets }
        };
        let examples = [mk("alpha beta", " gamma delta"), mk("red cat", " blue dog one")];
        let refs: Vec<&Example> = examples.iter().collect();
        let loss = |l: &TrainableLora| -> f64 {
            let (nll, n) = batch_nll(&m.model, l, &refs, true).unwrap();
            nll.to_scalar::<f32>().unwrap() as f64 / n as f64
        };
        let (nll, n) = batch_nll(&m.model, &lora, &refs, true).unwrap();
        let grads = (nll / n as f64).unwrap().backward().unwrap();
        let vars = lora.vars();
        let eps = 1e-2f32;
        let mut checked = 0;
        for (vi, v) in vars.iter().enumerate().step_by(5) {
            let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let base = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for _ in 0..3 {
                let i = rng.below(base.len() as u64) as usize;
                let at = |delta: f32| {
                    let mut p = base.clone();
                    p[i] += delta;
                    v.set(&candle_core::Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap()).unwrap();
                    loss(&lora)
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                v.set(&candle_core::Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap()).unwrap();
                let an = g[i] as f64;
                assert!(
                    (fd - an).abs() <= 1e-3 + 2e-2 * an.abs(),
                    "{quant:?} var {vi} elem {i}: finite difference {fd} vs analytic {an}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 12);
    }
}

/// Activation checkpointing gives the plain backward's loss and gradients, bit for bit, dropout masks included
/// (each layer run again draws the masks it drew the first time), and leaves the dropout generator where the
/// plain run does.
#[test]
fn checkpointed_gradients_are_the_plain_backwards() {
    // Without dropout a layer's input reaches the LoRA A matmuls directly: its gradient then carries those
    // weights' graph, which a layer run again must not differentiate a second time. Qwen2's q/k/v have biases
    // and its head is the embedding.
    let cases = [("llama", QuantMode::None, 0.1), ("llama", QuantMode::Nf4, 0.1), ("llama", QuantMode::Nf4, 0.0)];
    for (name, quant, dropout) in cases.into_iter().chain([("qwen2", QuantMode::Nf4, 0.0)]) {
        let opts = LoadOptions { dtype: DType::F32, quant, device: Device::Cpu };
        let m = model::load(&ModelSpec::Dir(fixture(&format!("{name}/model"))), &opts).unwrap();
        let spec = LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, dropout, targets: ModuleKind::ALL.to_vec() };
        let lora = TrainableLora::init(&m.model.lora_layout(), spec, 3, &Device::Cpu).unwrap();
        let mut rng = Rng::new(11);
        for v in lora.vars().iter().skip(1).step_by(2) {
            let vals: Vec<f32> = (0..v.elem_count()).map(|_| rng.normal() as f32 * 0.05).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let tok = &m.tokenizer;
        // Every token a target; only the second half; a sequence of two.
        let examples: Vec<Example> = [("alpha beta gamma delta", 0), ("red cat blue dog one two three", 4), ("x", 0)]
            .iter()
            .map(|&(t, untargeted)| {
                let ids = tok.encode(t).unwrap();
                let ids = if ids.len() < 2 { vec![ids[0], ids[0]] } else { ids };
                Example { targets: (0..ids.len()).map(|i| i >= untargeted).collect(), ids }
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let start = lora.rng_state();
        let mut runs = Vec::new();
        for checkpointing in [false, true] {
            lora.set_rng_state(start.clone());
            let (loss, grads) = micro_batch_grads(&m.model, &lora, &refs, 9, checkpointing).unwrap();
            let grads: Vec<Vec<f32>> =
                grads.iter().map(|g| g.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
            runs.push((loss, grads, lora.rng_state().uniform()));
        }
        let ((loss, plain, next), (loss_ckpt, ckpt, next_ckpt)) = (&runs[0], &runs[1]);
        let quant = (name, quant, dropout);
        assert_eq!(loss, loss_ckpt, "{quant:?}");
        assert_eq!(next, next_ckpt, "{quant:?}: the dropout generator ends elsewhere");
        assert_eq!(plain.len(), ModuleKind::ALL.len() * m.model.config().num_hidden_layers * 2);
        for (i, (p, c)) in plain.iter().zip(ckpt).enumerate() {
            assert!(p.iter().any(|&g| g != 0.0), "{quant:?} var {i}: no gradient to compare");
            assert!(p == c, "{quant:?} var {i}: checkpointed vs plain gradient {:e}", rel_l2(c, p));
        }
    }
}

fn server() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_server"));
    c.env("LORASERVE_LOG", "info").env("NO_COLOR", "1");
    c
}

/// A synthetic task: every prompt (random words) is answered with the same phrase.
fn write_task(path: &Path, n: usize, seed: u64) {
    let words = ["apple", "river", "stone", "cloud", "green", "seven", "light", "paper", "quick", "music"];
    let mut rng = Rng::new(seed);
    let mut text = String::new();
    for _ in 0..n {
        let k = 2 + rng.below(4) as usize;
        let p: Vec<&str> = (0..k).map(|_| words[rng.below(words.len() as u64) as usize]).collect();
        text.push_str(
            &serde_json::json!({"prompt": format!("{}:", p.join(" ")), "completion": " ok done"}).to_string(),
        );
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "train".into(),
        "--model".into(),
        fixture("llama/model").display().to_string(),
        "--data".into(),
        data.display().to_string(),
    ];
    v.extend(["--output".into(), out.display().to_string()]);
    v.extend(
        ["--rank", "8", "--alpha", "16", "--lr", "5e-3", "--batch-size", "8", "--grad-accum", "1", "--seed", "5"]
            .map(String::from),
    );
    v
}

/// Loss falls by at least 5× on the synthetic task, and the written adapter, served, answers held-out prompts
/// with the trained completion.
#[test]
fn learns_a_task_and_serves_it_on_held_out_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("task.jsonl");
    write_task(&data, 64, 1);
    let out = tmp.path().join("adapter");
    let o = server().args(train_args(&data, &out)).args(["--max-steps", "60", "--eval-ratio", "0.1"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("trainable params: ")
            && stdout.contains(" || all params: ")
            && stdout.contains(" || trainable%: "),
        "{stdout}"
    );
    let log: Vec<serde_json::Value> = std::fs::read_to_string(PathBuf::from(format!("{}.log.jsonl", out.display())))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = log.iter().filter_map(|l| l["loss"].as_f64()).collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first / 5.0, "loss {first} → {last}");
    assert!(log.iter().any(|l| l.get("eval_loss").is_some()), "an eval loss was logged");
    for key in ["step", "loss", "lr", "tokens_per_s", "eta_s"] {
        assert!(log[0].get(key).is_some(), "log lacks {key}");
    }

    let m = llama(QuantMode::Nf4);
    let a = peft::load_dir(&out, &m.model.lora_layout(), &Device::Cpu).unwrap();
    for prompt in ["cloud paper seven music:", "green green apple:", "light quick:"] {
        let ids = m.tokenizer.encode(prompt).unwrap();
        let job = GenerateJob {
            prompt_ids: &ids,
            max_new_tokens: 8,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
            adapter: Some(&a.weights),
        };
        let g = generate(&m.model, &job).unwrap();
        let text = m.tokenizer.decode(&g.token_ids).unwrap();
        assert_eq!(text, " ok done", "held-out prompt {prompt:?}");
        assert_eq!(g.token_ids.last(), Some(&1), "it learned to stop (EOS)");
    }
}

/// The written adapter has PEFT's layout: same tensor names, shapes and dtype as the PEFT-made fixture with
/// the same rank and targets, config keys PEFT writes; and the serving path reproduces the trainer's logits.
#[test]
fn output_matches_peft_layout_and_the_server_reproduces_training_logits() {
    let m = llama(QuantMode::Nf4);
    let spec = LoraSpec { rank: 8, alpha: 16.0, use_rslora: false, dropout: 0.05, targets: ATTN.to_vec() };
    let lora = TrainableLora::init(&m.model.lora_layout(), spec, 11, &Device::Cpu).unwrap();
    // Give B values (a trained adapter's B is non-zero).
    let mut rng = Rng::new(2);
    for v in lora.vars().iter().skip(1).step_by(2) {
        let vals: Vec<f32> = (0..v.elem_count()).map(|_| rng.normal() as f32 * 0.1).collect();
        v.set(&candle_core::Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ours");
    let meta = peft::AdapterMeta {
        r: 8,
        lora_alpha: 16.0,
        use_rslora: false,
        lora_dropout: 0.05,
        base_model_name_or_path: "tiny-llama".into(),
        dtype: DType::F32,
    };
    peft::write_dir(&out, &lora.to_weights(3).unwrap(), &meta).unwrap();

    let header = |p: &Path| -> serde_json::Map<String, serde_json::Value> {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
        h.remove("__metadata__");
        h
    };
    let ours = header(&out.join("adapter_model.safetensors"));
    let theirs = header(&fixture("llama/adapters/qkvo-r8/adapter_model.safetensors"));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "tensor names");
    for (k, v) in &theirs {
        assert_eq!(ours[k]["shape"], v["shape"], "{k} shape");
        assert_eq!(ours[k]["dtype"], v["dtype"], "{k} dtype");
    }
    let cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    let peft_cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama/adapters/qkvo-r8/adapter_config.json")).unwrap())
            .unwrap();
    for k in cfg.keys() {
        assert!(peft_cfg.contains_key(k), "`{k}` is not a key PEFT writes");
    }
    for k in [
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "task_type",
        "use_rslora",
        "base_model_name_or_path",
    ] {
        assert!(cfg.contains_key(k), "missing `{k}`");
    }
    assert_eq!(cfg["peft_type"], "LORA");

    // Trainer's forward (dense attention, trainable tensors, dropout off) vs the server's (paged attention,
    // batched-LoRA op over the saved folder).
    lora.set_training(false);
    let served = peft::load_dir(&out, &m.model.lora_layout(), &Device::Cpu).unwrap();
    for prompt in ["alpha beta gamma", "serve the adapter", "red cat blue dog one two"] {
        let ids = m.tokenizer.encode(prompt).unwrap();
        let seqs = [SeqInput { len: ids.len(), past: 0, blocks: &[] }];
        let batch = Batch { tokens: &ids, seqs: &seqs, logit_rows: &[ids.len() - 1] };
        let trained = m
            .model
            .forward(&batch, AttentionMode::Dense { differentiable: true }, &LoraRows::Train(&lora))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let job = GenerateJob {
            prompt_ids: &ids,
            max_new_tokens: 1,
            sampling: SamplingParams::default(),
            stop_at_eos: false,
            adapter: Some(&served.weights),
        };
        let serving = generate(&m.model, &job).unwrap().prompt_logits;
        let e = rel_l2(&serving, &trained);
        assert!(e <= 1e-4, "{prompt:?}: served vs trained logits {e:e}");
    }
}

/// A run killed with SIGKILL mid-way and resumed (with `--gradient-checkpointing`) ends with exactly the adapter
/// of an uninterrupted run (without).
#[test]
fn resume_after_sigkill_is_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("task.jsonl");
    write_task(&data, 48, 3);
    let extra = ["--max-steps", "12", "--checkpoint-every", "2", "--dropout", "0.1"];
    // Into a folder that does not exist yet: created, as merge and quantize do.
    let straight = tmp.path().join("new/straight");
    let o = server().args(train_args(&data, &straight)).args(extra).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lora_dropout"].to_string(), "0.1", "as PEFT writes it, not 0.10000000149011612");

    let resumed = tmp.path().join("resumed");
    let log = PathBuf::from(format!("{}.log.jsonl", resumed.display()));
    let mut child = server()
        .args(train_args(&data, &resumed))
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it is past a checkpoint (step 6 logged ⇒ step 4 checkpointed).
    let start = std::time::Instant::now();
    loop {
        let steps = std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
        if steps >= 6 {
            break;
        }
        assert!(start.elapsed().as_secs() < 120, "training never reached step 6");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!resumed.exists(), "no adapter from the killed run");
    // The same command without --resume must not train over the checkpoints (nor crash after training).
    let checkpoints = PathBuf::from(format!("{}.checkpoints", resumed.display()));
    let listing = || {
        let mut v: Vec<String> =
            std::fs::read_dir(&checkpoints).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let before = listing();
    let o = server().args(train_args(&data, &resumed)).args(extra).env("LORASERVE_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pass --resume to continue it"), "{err}");
    assert_eq!(listing(), before, "the refused run left the checkpoints as they were");
    // A checkpoint whose state.json claims the run is over (edited) is refused, not "resumed" past the end.
    let edited = tmp.path().join("edited.checkpoints");
    for step in &before {
        common::copy_dir(&checkpoints.join(step), &edited.join(step));
    }
    let state = edited.join(before.last().unwrap()).join("state.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["step"] = 12.into();
    std::fs::write(&state, v.to_string()).unwrap();
    let log_before = std::fs::read(&log).unwrap();
    // A resume with `more` arguments: whether it succeeded, and its standard error.
    let resume = |more: &[&str]| {
        let o = server()
            .args(train_args(&data, &resumed))
            .args(extra)
            .args(more)
            .arg("--resume")
            .env("LORASERVE_LOG", "off")
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (ok, err) = resume(&["--checkpoint-dir", edited.to_str().unwrap()]);
    assert!(!ok && err.contains("at step 12, not below this run's 12 steps"), "{err}");
    assert_eq!(std::fs::read(&log).unwrap(), log_before, "the refused resume left the log alone");
    // So is a resume on another base, or the same one loaded otherwise, or with other clipping.
    for other in [&["--quant", "none"][..], &["--dtype", "bf16"], &["--max-grad-norm", "5"]] {
        let (ok, err) = resume(other);
        assert!(!ok && err.contains("saved by a run with other settings"), "{other:?}: {err}");
    }
    assert_eq!(std::fs::read(&log).unwrap(), log_before, "the refused resumes left the log alone");
    // A line the kill cut short is still the log's (and dropped by the resume below).
    let mut cut = log_before.clone();
    let last = String::from_utf8_lossy(&log_before).lines().last().unwrap().to_string();
    cut.extend_from_slice(&last.as_bytes()[..last.len() / 2]);
    std::fs::write(&log, cut).unwrap();
    // Resumed with activation checkpointing, which changes how the gradients are computed but not what they are.
    let o = server()
        .args(train_args(&data, &resumed))
        .args(extra)
        .args(["--resume", "--gradient-checkpointing"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming"), "it resumed from a checkpoint");
    // The log holds each step once, in order: the killed run's steps past its checkpoint were dropped.
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>());
    let a = std::fs::read(straight.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    assert!(!PathBuf::from(format!("{}.checkpoints", resumed.display())).exists(), "checkpoints removed after success");
}

#[test]
fn bad_data_fails_clearly_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 7] = [
        ("", "empty"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n", ":1: the tokenizer has no chat template"),
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\n{oops}\n", ":2: invalid JSON"),
        ("{\"prompt\": \"a\"}\n", ":1: field `completion`"),
        ("{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n", ":1: messages[0].role `wizard`"),
        ("{\"prompt\": \"a rather long prompt here\", \"completion\": \"b\"}\n", "truncated away"),
        ("{\"label\": 3}\n", ":1: expected"),
    ];
    for (i, (text, words)) in cases.iter().enumerate() {
        let data = tmp.path().join(format!("d{i}.jsonl"));
        std::fs::write(&data, text).unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let o = server()
            .args(train_args(&data, &out))
            .args(["--max-seq-len", "4", "--max-steps", "2"])
            .env("LORASERVE_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} succeeded");
        assert!(err.contains(words) && err.contains(&format!("d{i}.jsonl")), "case {i}: {err}");
        assert!(!out.exists(), "case {i} left an output folder");
        assert!(!PathBuf::from(format!("{}.checkpoints", out.display())).exists());
    }
}

/// A `--rank` whose trainable state is past the machine's memory is refused by flag (its allocation aborted).
#[test]
fn a_rank_past_the_machines_memory_is_refused_by_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_task(&data, 4, 1);
    let mut args = train_args(&data, &tmp.path().join("out"));
    let rank = args.iter().position(|a| a == "--rank").unwrap();
    args[rank + 1] = "4294967296".into();
    let o = server().args(&args).env("LORASERVE_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--rank 4294967296") && err.contains("more than this machine's memory"), "{err}");
}

/// A run that diverges (a learning rate of 1e30: B, zero at first, takes steps of ±1e30, then A does, and
/// the forward of step 3 overflows to a NaN loss) stops there with an error naming the step, writes no adapter, and keeps its checkpoint;
/// a checkpoint holding NaN (as one saved by a diverged run could) is refused on resume, naming the tensor.
#[test]
fn a_diverging_run_stops_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_task(&data, 8, 1);
    let out = tmp.path().join("out");
    let mut args = train_args(&data, &out);
    let lr = args.iter().position(|a| a == "--lr").unwrap();
    args[lr + 1] = "1e30".into();
    args.extend(["--max-steps", "6", "--checkpoint-every", "1"].map(String::from));
    let o = server().args(&args).env("LORASERVE_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a diverged run succeeded: {err}");
    assert!(err.contains("step 3: the loss is NaN") && err.contains("training diverged"), "{err}");
    assert!(!out.exists(), "a diverged run wrote an adapter");
    let checkpoint = tmp.path().join("out.checkpoints/step-00000002/tensors.safetensors");
    let mut tensors = candle_core::safetensors::load(&checkpoint, &Device::Cpu).unwrap();
    let p = &tensors["param.0"];
    let poisoned = Tensor::full(f32::NAN, p.dims(), &Device::Cpu).unwrap().to_dtype(p.dtype()).unwrap();
    tensors.insert("param.0".into(), poisoned);
    candle_core::safetensors::save(&tensors, &checkpoint).unwrap();
    let o = server().args(&args).arg("--resume").env("LORASERVE_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "resumed from NaN: {err}");
    assert!(err.contains("tensors.safetensors: param.0 holds NaN"), "{err}");
    assert!(!out.exists());
    // A learning rate past f32 (1e39) overflows the weights at the second update, whose loss was still
    // finite: caught before that step's checkpoint, which would have replaced step 1's, the last good one.
    let out = tmp.path().join("out2");
    let mut args = train_args(&data, &out);
    args[lr + 1] = "1e39".into();
    args.extend(["--max-steps", "4", "--checkpoint-every", "1"].map(String::from));
    let o = server().args(&args).env("LORASERVE_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("step 2: LoRA parameter 0 holds NaN after the update"), "{err}");
    assert!(err.contains("(lower --lr)"), "clipping is on by default: {err}");
    let checkpoints = tmp.path().join("out2.checkpoints");
    assert!(checkpoints.join("step-00000001").exists() && !checkpoints.join("step-00000002").exists());
    assert!(!out.exists());
}

/// Settings that would train nothing useful, or that contradict each other, are refused by flag before any
/// training, with nothing written.
#[test]
fn bad_settings_are_refused_by_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_task(&data, 8, 1);
    let data_file = data.display().to_string();
    let readme = tmp.path().join("README.md");
    std::fs::write(&readme, "# notes\n").unwrap();
    let readme = readme.display().to_string();
    let folder = tmp.path().display().to_string();
    let link = tmp.path().join("link.jsonl");
    std::os::unix::fs::symlink(tmp.path().join("README.md"), &link).unwrap();
    let link = link.display().to_string();
    // Outputs that could never be written: refused before training, not after it.
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let dangling = dangling.display().to_string();
    let under_a_file = format!("{readme}/adapter");
    // The last case's own default checkpoint folder (case i writes to out{i}).
    let in_checkpoints = tmp.path().join("out18.checkpoints").display().to_string();
    // Inside case 21's output, spelled with `..`.
    let in_output = tmp.path().join("sub/../out21/log.jsonl").display().to_string();
    let cases: [(&[&str], &str); 22] = [
        (&["--output", &dangling], "dangling: already exists"),
        (&["--output", &under_a_file], "README.md: not a folder"),
        (&["--log-file", &folder], "exists and is not a regular file"),
        (&["--log-file", &link], "is a symbolic link"),
        (&["--max-steps", "0"], "--max-steps must be ≥ 1"),
        (&["--checkpoint-every", "0"], "--checkpoint-every must be ≥ 1"),
        (&["--max-grad-norm=-1"], "--max-grad-norm must be a number ≥ 0"),
        (&["--log-file", &data_file], "is the --data file"),
        (&["--log-file", &readme], "exists and is not a training log"),
        (&["--weight-decay=-1"], "--weight-decay must be a number ≥ 0, got -1"),
        (&["--alpha", "0"], "--alpha must be a number > 0"),
        (&["--lr", "NaN"], "--lr must be a number > 0"),
        (&["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1), got 2"),
        (&["--eval-ratio", "1"], "--eval-ratio must be in [0, 1), got 1"),
        (&["--target-modules", "q_proj,,v_proj"], "--target-modules: an empty name"),
        (&["--eval-ratio", "0.1", "--eval-data", "d.jsonl"], "--eval-data and --eval-ratio both"),
        (&["--resume"], "--resume: no checkpoint in"),
        (&["--max-seq-len", "513"], "--max-seq-len 513 exceeds the model's context of 512 positions"),
        (&["--log-file", &in_checkpoints], "is inside --checkpoint-dir"),
        // One step, and a warmup's first step has a learning rate of 0: the adapter would not change. Said
        // before the model loads when --max-steps says so, after the data is read when the data does.
        (&["--max-steps", "1"], "--max-steps 1 with --warmup-ratio 0.03 trains at a learning rate of 0"),
        (&["--epochs", "1"], "every one of the run's 1 optimizer steps would have a learning rate of 0"),
        (&["--log-file", &in_output], "is inside --output"),
    ];
    for (i, (extra, words)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        // The base arguments, less the flags this case sets.
        let mut args = train_args(&data, &out);
        if let Some(at) = args.iter().position(|a| a == extra[0]) {
            args.drain(at..at + 2);
        }
        let steps: &[&str] =
            if extra.contains(&"--max-steps") || extra.contains(&"--epochs") { &[] } else { &["--max-steps", "2"] };
        let o = server().args(args).args(*extra).args(steps).env("LORASERVE_LOG", "off").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(words), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left an output folder");
    }
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), "# notes\n");
    write_task(&data, 8, 1);
    assert!(std::fs::read_to_string(&data).unwrap().lines().count() == 8, "the data file is intact");
}

/// An `--eval-data` token the model's vocabulary lacks (a tokenizer may add tokens past the embedding) is
/// refused before training, naming the file, as one in `--data` is. Before, the run trained, then failed at
/// its first evaluation with an index error naming no file.
#[test]
fn eval_data_outside_the_vocabulary_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(fixture("llama/model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap()).unwrap();
    tokenizer["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": 320, "content": "<extra>",
        "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let (data, eval) = (tmp.path().join("d.jsonl"), tmp.path().join("eval.jsonl"));
    write_task(&data, 8, 1);
    std::fs::write(&eval, "{\"prompt\": \"a <extra> b:\", \"completion\": \" ok done\"}\n").unwrap();
    let out = tmp.path().join("out");
    let mut args = train_args(&data, &out);
    args[2] = model.display().to_string();
    let o = server().args(args).args(["--max-steps", "2", "--eval-data"]).arg(&eval).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(
            "eval.jsonl:1: encodes to token \"<extra>\" (id 320), outside the model's vocabulary of 320 tokens"
        ),
        "{err}"
    );
    assert!(!err.contains("step="), "refused before training: {err}");
    assert!(!out.exists());
}

/// A checkpoint folder the user named may hold other files: a finished run removes its own checkpoints and
/// nothing else. A held-out fraction of a one-example file is refused, not silently empty.
#[test]
fn checkpoints_go_and_nothing_else_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_task(&data, 8, 1);
    let ckpt = tmp.path().join("work");
    for dir in ["notes", "step-by-step", "step-1-results"] {
        std::fs::create_dir_all(ckpt.join(dir)).unwrap();
    }
    std::fs::write(ckpt.join("important.txt"), "keep").unwrap();
    let out = tmp.path().join("out");
    let o = server()
        .args(train_args(&data, &out))
        .args(["--max-steps", "3", "--checkpoint-every", "1", "--checkpoint-dir"])
        .arg(&ckpt)
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut left: Vec<String> =
        std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(
        left,
        ["important.txt", "notes", "step-1-results", "step-by-step"],
        "only the run's own checkpoints were removed"
    );

    let one = tmp.path().join("one.jsonl");
    std::fs::write(&one, "{\"prompt\": \"a:\", \"completion\": \" b\"}\n").unwrap();
    let out = tmp.path().join("out-one");
    let o = server()
        .args(train_args(&one, &out))
        .args(["--max-steps", "2", "--eval-ratio", "0.5"])
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("has one example, nothing to hold out"), "{err}");
    assert!(!out.exists());
}

/// `--chat-template` renders a model without a template of its own: conversations train with it, and the
/// adapter carries it (`chat_template.jinja`), so `server generate` with that adapter and no flag prompts with
/// it; an adapter trained on prompt/completion lines carries none; a missing or empty file is refused by flag.
#[test]
fn a_chat_template_given_trains_conversations_and_travels_with_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    let file = tmp.path().join("t.jinja");
    std::fs::write(&file, template).unwrap();
    let data = tmp.path().join("chat.jsonl");
    let line = serde_json::json!({"messages": [{"role": "user", "content": "apple river"}, {"role": "assistant", "content": "ok done"}]});
    std::fs::write(&data, format!("{line}\n{line}\n")).unwrap();
    let train = |data: &Path, out: &Path| {
        let o = server()
            .args(train_args(data, out))
            .args(["--max-steps", "2", "--chat-template"])
            .arg(&file)
            .env("LORASERVE_LOG", "off")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let out = tmp.path().join("chat");
    train(&data, &out);
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), template);
    let o = server()
        .args(["generate", "--model", fixture("llama/model").to_str().unwrap(), "--adapter", out.to_str().unwrap()])
        .args(["--message", "user=apple river", "--max-new-tokens", "2", "--json"])
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tok = loraserve::model::Tokenizer::from_dir(&fixture("llama/model")).unwrap();
    assert_eq!(v["prompt_token_ids"], serde_json::json!(tok.encode("<|user|>apple river\n<|assistant|>").unwrap()));

    let plain = tmp.path().join("plain.jsonl");
    write_task(&plain, 4, 2);
    let out = tmp.path().join("plain");
    train(&plain, &out);
    assert!(out.join("adapter_model.safetensors").is_file() && !out.join("chat_template.jinja").exists());

    let empty = tmp.path().join("empty.jinja");
    std::fs::write(&empty, " \n").unwrap();
    for (path, words) in
        [(tmp.path().join("missing.jinja"), "missing.jinja"), (empty, "empty.jinja: the file is empty")]
    {
        let out = tmp.path().join("never");
        let o = server()
            .args(train_args(&data, &out))
            .arg("--chat-template")
            .arg(&path)
            .env("LORASERVE_LOG", "off")
            .output();
        let err = String::from_utf8_lossy(&o.as_ref().unwrap().stderr).to_string();
        assert!(!o.unwrap().status.success() && err.contains("--chat-template") && err.contains(words), "{err}");
        assert!(!out.exists());
    }
}

/// `--output out/` (as shells complete it) is the folder `out`: its log and checkpoints go beside it, not
/// inside, and the adapter is written there; a log asked for inside the output folder is refused up front.
#[test]
fn output_with_a_trailing_slash_and_files_inside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_task(&data, 8, 1);
    let out = tmp.path().join("slash");
    let mut args = train_args(&data, &out);
    *args.iter_mut().find(|a| **a == out.display().to_string()).unwrap() += "/";
    let o = server().args(&args).args(["--max-steps", "2"]).env("LORASERVE_LOG", "off").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(tmp.path().join("slash.log.jsonl").is_file(), "the log beside the adapter folder");

    let inside = tmp.path().join("inside");
    let o = server()
        .args(train_args(&data, &inside))
        .args(["--max-steps", "2", "--log-file"])
        .arg(inside.join("log.jsonl"))
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--log-file") && err.contains("is inside --output"), "{err}");
    assert!(!inside.exists(), "nothing written");
}
