//! LoRA adapters against the PEFT-made fixtures: golden outputs for every adapter (f32, dense base), one
//! mixed-adapter forward equal to each request alone, a row reading the KV blocks another row writes in the
//! same forward (the prefix cache's sharing within a step), loads in every dtype and under rewrites, and merged
//! checkpoints. The refusals are in `malformed_adapters.rs`.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{expected, fixture, rel_l2, run_case};
use loraserve::engine::{generate, GenerateJob, SamplingParams};
use loraserve::lora::peft::{self, LoadedAdapter};
use loraserve::lora::{LoraRows, LoraSegment};
use loraserve::model::kv_cache::PagedKvCache;
use loraserve::model::{self, AttentionMode, Batch, LoadOptions, LoadedModel, ModelSpec, SeqInput};
use loraserve::quant::QuantMode;

const MODELS: [&str; 3] = ["llama", "mistral", "qwen2"];

fn load_model(dir: &Path, quant: QuantMode) -> LoadedModel {
    let opts = LoadOptions { dtype: DType::F32, quant, device: Device::Cpu };
    model::load(&ModelSpec::Dir(dir.to_path_buf()), &opts).unwrap()
}

fn adapter_dirs(model: &str) -> Vec<(String, PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(fixture(model).join("adapters"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    v.sort();
    v
}

fn load_adapter(m: &LoadedModel, dir: &Path) -> LoadedAdapter {
    peft::load_dir(dir, &m.model.lora_layout(), &Device::Cpu).unwrap()
}

/// `adapter` on `m` gives PEFT's last-prompt logits and greedy tokens for every case.
fn assert_matches_peft(m: &LoadedModel, a: &LoadedAdapter, cases: &[common::Case], what: &str) {
    for c in cases {
        let (_, out) = run_case(m, c, Some(&a.weights), what);
        let err = rel_l2(&out.prompt_logits, &c.last_logits);
        assert!(err <= 1e-4, "{what} {:?}: logits rel err {err:e}", c.prompt);
        assert_eq!(out.token_ids, c.greedy_new_ids, "{what} {:?}", c.prompt);
    }
}

#[test]
fn every_fixture_adapter_matches_peft() {
    for name in MODELS {
        let m = load_model(&fixture(name).join("model"), QuantMode::None);
        let exp = expected(name);
        for (adapter, dir) in adapter_dirs(name) {
            assert_matches_peft(&m, &load_adapter(&m, &dir), &exp.results[&adapter], &format!("{name}/{adapter}"));
        }
    }
}

/// VeLoRA (PEFT's `velora_config`) changes only the backward pass: served, it gives PEFT's eval-mode outputs.
#[test]
fn velora_adapters_are_served_as_peft_serves_them() {
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let dir = fixture("llama-velora/adapter");
    assert_matches_peft(&m, &load_adapter(&m, &dir), &expected("llama-velora").results["velora"], "velora");
}

/// Every llama fixture adapter and the base, over all prompts, in ONE paged forward (prefill), then one
/// mixed decode step — equal to each request run alone.
#[test]
fn mixed_adapter_batch_equals_each_request_alone() {
    for quant in [QuantMode::None, QuantMode::Nf4] {
        let m = load_model(&fixture("llama/model"), quant);
        let adapters: Vec<(String, LoadedAdapter)> =
            adapter_dirs("llama").into_iter().map(|(n, d)| (n, load_adapter(&m, &d))).collect();
        let prompts = expected("llama").prompts;
        // Requests: (prompt, adapter index or None for the base), interleaved so segments alternate.
        let mut requests = Vec::new();
        for (pi, p) in prompts.iter().enumerate() {
            for ai in 0..=adapters.len() {
                requests.push((
                    m.tokenizer.encode(p).unwrap(),
                    if (ai + pi) % (adapters.len() + 1) == 0 {
                        None
                    } else {
                        Some((ai + pi) % (adapters.len() + 1) - 1)
                    },
                ));
            }
        }
        let alone: Vec<Vec<f32>> = requests
            .iter()
            .map(|(ids, a)| {
                let job = GenerateJob {
                    prompt_ids: ids,
                    max_new_tokens: 2,
                    sampling: SamplingParams::default(),
                    stop_at_eos: false,
                    adapter: a.map(|i| &adapters[i].1.weights),
                };
                generate(&m.model, &job).unwrap().prompt_logits
            })
            .collect();

        let geo = m.model.kv_geometry(4);
        let mut cache = PagedKvCache::new(geo, 256);
        let tables: Vec<Vec<u32>> = requests
            .iter()
            .map(|(ids, _)| cache.allocator_mut().allocate(geo.blocks_for(ids.len() + 1)).unwrap())
            .collect();
        let mut tokens = Vec::new();
        let mut segments = Vec::new();
        let mut last_rows = Vec::new();
        for (ids, a) in &requests {
            let start = tokens.len();
            tokens.extend_from_slice(ids);
            if let Some(i) = a {
                segments.push(LoraSegment::new(start..tokens.len(), &adapters[*i].1.weights));
            }
            last_rows.push(tokens.len() - 1);
        }
        let seqs: Vec<SeqInput> =
            requests.iter().zip(&tables).map(|((ids, _), t)| SeqInput { len: ids.len(), past: 0, blocks: t }).collect();
        let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &last_rows };
        let logits = m.model.forward(&batch, AttentionMode::Paged(&mut cache), &LoraRows::Segments(&segments)).unwrap();
        for (i, want) in alone.iter().enumerate() {
            let got = logits.get(i).unwrap().to_vec1::<f32>().unwrap();
            let err = rel_l2(&got, want);
            assert!(err <= 1e-5, "{quant:?} request {i} (adapter {:?}): mixed vs alone {err:e}", requests[i].1);
        }
        // The reference batched-LoRA op gives the same logits as the fast one.
        let mut cache2 = PagedKvCache::new(geo, 256);
        let tables2: Vec<Vec<u32>> = requests
            .iter()
            .map(|(ids, _)| cache2.allocator_mut().allocate(geo.blocks_for(ids.len() + 1)).unwrap())
            .collect();
        let seqs2: Vec<SeqInput> = requests
            .iter()
            .zip(&tables2)
            .map(|((ids, _), t)| SeqInput { len: ids.len(), past: 0, blocks: t })
            .collect();
        let batch2 = Batch { tokens: &tokens, seqs: &seqs2, logit_rows: &last_rows };
        let reference = m
            .model
            .forward(&batch2, AttentionMode::Paged(&mut cache2), &LoraRows::SegmentsReference(&segments))
            .unwrap();
        let err = rel_l2(
            &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &reference.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(err <= 1e-5, "{quant:?}: fast vs reference batched LoRA {err:e}");
    }
}

/// `server merge --model <model> --adapter <adapter> --output <out> <extra>`.
fn merge_cli(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("merge")
        .args(extra)
        .args([std::ffi::OsStr::new("--model"), model.as_os_str(), "--adapter".as_ref(), adapter.as_os_str()])
        .args([std::ffi::OsStr::new("--output"), out.as_os_str()])
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap()
}

#[test]
fn merged_checkpoint_gives_the_adapter_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (adapter, dir) in adapter_dirs("llama") {
        let out = tmp.path().join(&adapter);
        assert!(merge_cli(&fixture("llama/model"), &dir, &out, &[]).status.success(), "merge {adapter}");
        let merged = load_model(&out, QuantMode::None);
        for c in &expected("llama").results[&adapter] {
            let ids = merged.tokenizer.encode(&c.prompt).unwrap();
            let job = GenerateJob {
                prompt_ids: &ids,
                max_new_tokens: 12,
                sampling: SamplingParams::default(),
                stop_at_eos: false,
                adapter: None,
            };
            let out = generate(&merged.model, &job).unwrap();
            let err = rel_l2(&out.prompt_logits, &c.last_logits);
            assert!(err <= 1e-4, "merged {adapter} {:?}: {err:e}", c.prompt);
            assert_eq!(out.token_ids, c.greedy_new_ids);
        }
    }
    // In bf16, config.json says so under both keys transformers reads (5.x `dtype`, 4.x `torch_dtype`).
    let (adapter, dir) = &adapter_dirs("llama")[0];
    let out = tmp.path().join(format!("{adapter}-bf16"));
    assert!(merge_cli(&fixture("llama/model"), dir, &out, &["--dtype", "bf16"]).status.success(), "merge --dtype bf16");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((&config["dtype"], &config["torch_dtype"]), (&"bfloat16".into(), &"bfloat16".into()));
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
    // Without --dtype the base's own dtype is kept, as PEFT's merge_and_unload does: merged into the bf16
    // checkpoint, the result is bf16 again.
    let again = tmp.path().join(format!("{adapter}-bf16-again"));
    assert!(merge_cli(&out, dir, &again, &[]).status.success(), "merge into a bf16 base");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let bytes = std::fs::read(again.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
}

/// An adapter that brings its own chat template hands it to the merged model (its "tool_use" one too), which
/// then renders conversations as the adapter was served; one without keeps the base's; one with named
/// templates only is refused.
#[test]
fn a_merged_checkpoint_takes_the_adapters_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = &adapter_dirs("llama")[0];
    let adapter = tmp.path().join("adapter");
    common::copy_dir(dir, &adapter);
    let base = tmp.path().join("base");
    common::copy_dir(&fixture("llama/model"), &base);
    std::fs::write(base.join("chat_template.jinja"), "BASE").unwrap();
    let plain = tmp.path().join("plain");
    assert!(merge_cli(&base, &adapter, &plain, &[]).status.success());
    assert_eq!(std::fs::read_to_string(plain.join("chat_template.jinja")).unwrap(), "BASE");
    std::fs::write(adapter.join("tokenizer_config.json"), r#"{"chat_template": "OWN"}"#).unwrap();
    let out = tmp.path().join("merged");
    assert!(merge_cli(&base, &adapter, &out, &[]).status.success());
    let tok = loraserve::model::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.chat.template.as_deref(), Some("OWN"));
    // A "default" and a "tool_use" template: both go.
    let named = r#"{"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}"#;
    std::fs::write(adapter.join("tokenizer_config.json"), named).unwrap();
    let out = tmp.path().join("merged-tools");
    assert!(merge_cli(&base, &adapter, &out, &[]).status.success());
    let tok = loraserve::model::Tokenizer::from_dir(&out).unwrap();
    assert_eq!((tok.chat.template.as_deref(), tok.chat.tool_use.as_deref()), (Some("D"), Some("T")));
    // Named templates only: no template to hand on, and no silent fallback to the base's.
    std::fs::write(adapter.join("tokenizer_config.json"), r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#)
        .unwrap();
    let o = merge_cli(&base, &adapter, &tmp.path().join("named"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("named [\"rag\"]"), "{err}");
    assert!(!tmp.path().join("named").exists());
}

#[test]
fn merge_refuses_an_nf4_base_unless_asked_to_dequantize() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], out: &str| {
        merge_cli(&fixture("llama-bnb-nf4/model"), &fixture("llama/adapters/qv-r4"), &tmp.path().join(out), extra)
    };
    // An adapter's file instead of its folder is named as such.
    let file = fixture("llama/adapters/qv-r4/adapter_config.json");
    let o = merge_cli(&fixture("llama/model"), &file, &tmp.path().join("f"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a file: an adapter is the folder"), "{err}");
    let refused = run(&[], "a");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--dequantize"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!tmp.path().join("a").exists());
    let ok = run(&["--dequantize"], "b");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let merged = load_model(&tmp.path().join("b"), QuantMode::None);
    assert!(merged.model.nf4_footprint().0 == 0);
}

/// The all-cores load (a GPU server's) gives the sequential load's weights, bit for bit.
#[test]
fn parallel_load_equals_sequential() {
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let layout = m.model.lora_layout();
    for (name, dir) in adapter_dirs("llama") {
        let (a, b) = (
            peft::load_dir(&dir, &layout, &Device::Cpu).unwrap().weights,
            peft::load_dir_parallel(&dir, &layout, &Device::Cpu).unwrap().weights,
        );
        let flat = |w: &loraserve::lora::LoraWeights| -> Vec<(String, Vec<f32>, Vec<f32>, f32)> {
            w.targets()
                .map(|(id, m)| {
                    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (id.to_string(), v(&m.a), v(&m.b_t), m.scale)
                })
                .collect()
        };
        let (fa, fb) = (flat(&a), flat(&b));
        assert!(!fa.is_empty(), "{name}");
        assert!(fa == fb, "{name}: parallel load differs");
    }
}

/// A and Bᵀ come back exactly from every dtype, through both loads, with B's rows (70) not a whole number of
/// the loader's 64-row transpose blocks.
#[test]
fn weights_round_trip_exactly_from_every_dtype() {
    use loraserve::lora::peft::{write_dir, AdapterMeta, BaseLayout};
    use loraserve::lora::{LinearId, LoraModule, LoraWeights, ModuleKind};
    let (r, in_f, out_f) = (3, 8, 70);
    let layout = BaseLayout { layers: 1, dims: [(in_f, out_f); 7] };
    let id = LinearId::new(0, ModuleKind::QProj);
    // Small integers: exact in F16 and BF16.
    let a: Vec<f32> = (0..r * in_f).map(|i| (i % 17) as f32 - 8.0).collect();
    let b_t: Vec<f32> = (0..r * out_f).map(|i| (i % 29) as f32 - 14.0).collect();
    let mut w = LoraWeights::new(1);
    let t = |v: &[f32], n| Tensor::from_vec(v.to_vec(), (r, n), &Device::Cpu).unwrap();
    w.insert(id, LoraModule { a: t(&a, in_f), b_t: t(&b_t, out_f), scale: 1.0 });
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir().unwrap();
        let meta = AdapterMeta {
            r,
            lora_alpha: r as f64,
            use_rslora: false,
            lora_dropout: 0.0,
            base_model_name_or_path: "tiny".into(),
            dtype,
        };
        write_dir(&tmp.path().join("a"), &w, &meta).unwrap();
        for load in [peft::load_dir, peft::load_dir_parallel] {
            let got = load(&tmp.path().join("a"), &layout, &Device::Cpu).unwrap().weights;
            let m = got.module(id).unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!((v(&m.a), v(&m.b_t)), (a.clone(), b_t.clone()), "{dtype:?}");
        }
    }
}

/// An operator overwriting the weights in place (`cp new/* adapters/x/`: truncate, then write) while loads
/// run: every load gives the adapter or an error naming the weights file, and the process lives (reading a
/// memory-mapped file that is truncated under the map dies of SIGBUS, which took the whole server down).
#[test]
fn weights_rewritten_in_place_while_loading_never_crash_the_loader() {
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let layout = m.model.lora_layout();
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("llama/adapters/patterns");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let weights = tmp.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut ok, mut refused) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::io::Write;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut f = std::fs::File::create(&weights).unwrap(); // truncates in place, as cp does
                for part in bytes.chunks(bytes.len().div_ceil(4)) {
                    f.write_all(part).unwrap();
                    std::thread::yield_now();
                }
            }
        });
        for i in 0..400 {
            let r = if i % 2 == 0 {
                peft::load_dir(tmp.path(), &layout, &Device::Cpu)
            } else {
                peft::load_dir_parallel(tmp.path(), &layout, &Device::Cpu)
            };
            match r {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    eprintln!("loads during in-place rewrites: {ok} whole, {refused} refused");
    assert!(refused > 0, "the rewrites never overlapped a load: the test shows nothing");
}

/// What the prefix cache's sharing within one step rests on: in one paged forward, a sequence whose block
/// table starts with another's blocks, its rows first in the batch, reads the keys and values the other's rows
/// write into those blocks in that very forward (every layer writes the whole step's before any row attends).
/// Its last token then has the logits of the other's last token, the same context. Without the other's rows
/// it reads blocks nobody wrote, and differs: the test can fail.
#[test]
fn a_row_reads_the_blocks_another_row_writes_in_the_same_forward() {
    for quant in [QuantMode::None, QuantMode::Nf4] {
        let m = load_model(&fixture("llama/model"), quant);
        let (_, dir) = adapter_dirs("llama").into_iter().find(|(n, _)| n == "qkvo-r8").unwrap();
        let adapter = load_adapter(&m, &dir);
        let ids = m.tokenizer.encode("red cat blue dog one two").unwrap();
        let n = ids.len();
        let geo = m.model.kv_geometry(4);
        let shared = (n - 1) / 4;
        let past = shared * 4;
        let run = |with_owner: bool| {
            let mut cache = PagedKvCache::new(geo, 16);
            let owner = cache.allocator_mut().allocate(geo.blocks_for(n)).unwrap();
            let mut sharer = owner[..shared].to_vec();
            sharer.extend(cache.allocator_mut().allocate(geo.blocks_for(n) - shared).unwrap());
            let mut tokens = ids[past..].to_vec();
            let mut seqs = vec![SeqInput { len: n - past, past, blocks: &sharer }];
            let mut logit_rows = vec![n - past - 1];
            if with_owner {
                tokens.extend_from_slice(&ids);
                seqs.push(SeqInput { len: n, past: 0, blocks: &owner });
                logit_rows.push(tokens.len() - 1);
            }
            let segments = [LoraSegment::new(0..tokens.len(), &adapter.weights)];
            let batch = Batch { tokens: &tokens, seqs: &seqs, logit_rows: &logit_rows };
            let attn = AttentionMode::Paged(&mut cache);
            let logits = m.model.forward(&batch, attn, &LoraRows::Segments(&segments)).unwrap();
            logits.to_vec2::<f32>().unwrap()
        };
        let both = run(true);
        let err = rel_l2(&both[0], &both[1]);
        assert!(err <= 1e-5, "{quant:?}: the sharer's last token vs the owner's: {err:e}");
        let alone = run(false);
        assert!(rel_l2(&alone[0], &both[1]) > 1e-2, "{quant:?}: unwritten blocks gave the same logits");
    }
}
