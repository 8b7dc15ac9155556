//! A malformed model folder gives a one-line error naming the file and the problem — never a panic —
//! both from the library and from the `server` binary.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{copy_dir, fixture};
use loraserve::model::{self, LoadOptions, ModelSpec};
use loraserve::quant::QuantMode;

fn copy_model(dst: &Path) {
    copy_dir(&fixture("llama/model"), dst);
}

fn load_err(dir: &Path) -> String {
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu };
    match model::load(&ModelSpec::Dir(dir.to_path_buf()), &opts) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
    }
}

/// Rewrites model.safetensors with `edit` applied to its tensors.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_files_are_named() {
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_model(tmp.path());
        std::fs::remove_file(tmp.path().join(file)).unwrap();
        let e = load_err(tmp.path());
        let expect = if file == "model.safetensors" { "no model.safetensors" } else { file };
        assert!(e.contains(expect), "{file}: {e}");
    }
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let p = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 1000).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
    // A file cut inside its header.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(20).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

/// The safetensors crate's size checks do not name their tensor: the error does.
#[test]
fn a_header_whose_sizes_do_not_match_names_the_tensor() {
    use serde_json::{json, Value};
    let norm = "model.norm.weight";
    // (what, the field of the norm's entry set, to what, the error's words)
    for (what, field, to, expect) in [
        ("one more row", "shape", json!([97]), "takes 388 bytes, its data_offsets [1464576, 1464960] hold 384"),
        ("overflow", "shape", json!([1u64 << 62, 8]), "overflows"),
        ("offsets", "data_offsets", json!([1464576, 0]), "do not start where"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_model(tmp.path());
        common::edit_safetensors_header(&tmp.path().join("model.safetensors"), |h: &mut Value| h[norm][field] = to);
        let e = load_err(tmp.path());
        assert!(e.contains("model.safetensors") && e.contains("tensor `model.norm.weight`: its"), "{what}: {e}");
        assert!(e.contains(expect), "{what}: {e}");
    }
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    rewrite_weights(tmp.path(), |t| {
        t.insert(
            "model.layers.1.self_attn.k_proj.weight".into(),
            Tensor::zeros((47, 96), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("[47, 96]") && e.contains("[48, 96]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    rewrite_weights(tmp.path(), |t| {
        t.insert("model.norm.weight".into(), Tensor::ones(96, DType::I64, &Device::Cpu).unwrap());
    });
    let e = load_err(tmp.path());
    assert!(e.contains("model.norm.weight") && e.contains("unsupported dtype"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    rewrite_weights(tmp.path(), |t| {
        t.remove("model.layers.2.mlp.down_proj.weight");
    });
    let e = load_err(tmp.path());
    assert!(e.contains("model.layers.2.mlp.down_proj.weight") && e.contains("not found"), "{e}");
}

/// Tensors the config gives no parameter are refused by name (layers past `num_hidden_layers`, unknown
/// modules), not silently dropped; those transformers and vLLM skip by design (extra biases, stored rotary
/// frequencies) load.
#[test]
fn tensors_the_config_does_not_describe_are_named() {
    let extra = || Tensor::zeros(96, DType::F32, &Device::Cpu).unwrap().reshape((1, 96)).unwrap();
    for (name, refused) in [
        ("model.layers.3.mlp.up_proj.weight", true),
        ("model.layers.0.mlp.foo_proj.weight", true),
        ("model.layers.0.self_attn.q_proj.bias", false),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", false),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_model(tmp.path());
        rewrite_weights(tmp.path(), |t| {
            t.insert(name.into(), extra());
        });
        let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu };
        match model::load(&ModelSpec::Dir(tmp.path().to_path_buf()), &opts) {
            Ok(_) => assert!(!refused, "{name} was ignored"),
            Err(e) => {
                let e = e.to_string();
                assert!(refused, "{name}: {e}");
                assert!(e.contains("model.safetensors") && e.contains(name) && e.contains("not a parameter"), "{e}");
            }
        }
    }
    // A config with fewer layers than the file: the first unused layer is named.
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 2");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.layers.2.") && e.contains("more)"), "{e}");
}

/// A tied checkpoint (the qwen2) that also stores `lm_head.weight`: equal to the embedding, it loads and gives
/// the reference logits; one value one step off, it is refused naming both tensors.
#[test]
fn a_tied_checkpoint_may_store_its_head_only_as_the_embedding() {
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu };
    let case = &common::expected("qwen2").results["base"][0];
    for differs in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fixture("qwen2/model"), tmp.path());
        rewrite_weights(tmp.path(), |t| {
            let embed = t["model.embed_tokens.weight"].clone();
            let mut values = embed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if differs {
                let last = values.last_mut().unwrap();
                *last = f32::from_bits(last.to_bits() + 1);
            }
            t.insert("lm_head.weight".into(), Tensor::from_vec(values, embed.shape(), &Device::Cpu).unwrap());
        });
        if differs {
            let e = load_err(tmp.path());
            assert!(e.contains("lm_head.weight differs from model.embed_tokens.weight"), "{e}");
        } else {
            let m = model::load(&ModelSpec::Dir(tmp.path().to_path_buf()), &opts).unwrap();
            let (_, out) = common::run_case(&m, case, None, "qwen2 with its head stored");
            assert!(common::rel_l2(&out.prompt_logits, &case.last_logits) <= 1e-4);
            assert_eq!(out.token_ids, case.greedy_new_ids);
        }
    }
}

#[test]
fn bad_config_and_missing_shard_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    std::fs::write(tmp.path().join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama-sharded/model"), tmp.path());
    std::fs::remove_file(tmp.path().join("model-00007-of-00014.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model-00007-of-00014.safetensors"), "{e}");

    // A shard named "" or "." is the folder itself: no file name (it failed with "No such device").
    let index = tmp.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(fixture("llama-sharded/model/model.safetensors.index.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for bad in ["", "."] {
        json["weight_map"]["model.norm.weight"] = bad.into();
        std::fs::write(&index, json.to_string()).unwrap();
        let e = load_err(tmp.path());
        assert!(e.contains("index.json") && e.contains("weight_map[model.norm.weight] is not a file name"), "{e}");
    }
}

/// `model.safetensors` wins over a shard index beside it, as in transformers: a folder re-saved as one file
/// keeps its stale index (here naming shards that are gone). Before, the index was read and the load failed.
#[test]
fn a_single_file_wins_over_a_stale_shard_index() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    std::fs::copy(
        fixture("llama-sharded/model/model.safetensors.index.json"),
        tmp.path().join("model.safetensors.index.json"),
    )
    .unwrap();
    let opts = LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu };
    model::load(&ModelSpec::Dir(tmp.path().to_path_buf()), &opts).expect("model.safetensors is read");
}

#[test]
fn cli_prints_one_line_and_exits_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["generate", "--quant", "none", "--prompt", "x", "--model"])
        .arg(tmp.path())
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("tokenizer.json"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

/// `server generate` sizes its KV cache for the whole request at once: on a model whose context is 2^62
/// positions, a request past the machine's memory is refused, naming why (its allocation aborted).
#[test]
fn generate_refuses_a_kv_cache_past_the_machines_memory() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = serde_json::json!(1u64 << 62);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["generate", "--quant", "none", "--prompt", "x", "--max-new-tokens", "4294967295", "--model"])
        .arg(tmp.path())
        .env("LORASERVE_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("max_new_tokens 4294967295 need a KV cache of") && stderr.contains("machine's memory"),
        "{stderr}"
    );
}

/// A FIFO (or socket, or device) where a model's file belongs is refused at once, naming the file: it blocked
/// the load for as long as nothing wrote to it (a server that never started). Run with a watchdog: without the
/// fix these loads never return.
#[test]
fn a_fifo_in_place_of_a_model_file_is_refused_not_waited_on() {
    let fifo_at = |path: &Path| {
        let _ = std::fs::remove_file(path);
        assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
    };
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut errors = vec![];
        for file in ["config.json", "tokenizer_config.json", "model-00003-of-00014.safetensors"] {
            let tmp = tempfile::tempdir().unwrap();
            copy_dir(&fixture("llama-sharded/model"), tmp.path());
            fifo_at(&tmp.path().join(file));
            let e = match file {
                "tokenizer_config.json" => loraserve::model::Tokenizer::from_dir(tmp.path()).err().unwrap().to_string(),
                _ => load_err(tmp.path()),
            };
            errors.push((file, e));
        }
        done.send(errors).unwrap();
    });
    let errors = finished.recv_timeout(std::time::Duration::from_secs(60)).expect("a load waited on a FIFO");
    for (file, e) in errors {
        assert!(e.contains(file) && e.contains("not a regular file (a FIFO, socket or device)"), "{file}: {e}");
    }
}
