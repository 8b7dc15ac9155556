//! Adapter files read as PEFT reads them, and every refusal naming its key or tensor: config keys loraserve
//! cannot reproduce, layer filters and their combinations, defaults, bad tensors, VeLoRA projections, and
//! weights files whose header or length is wrong.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use loraserve::lora::peft;
use loraserve::model::{self, LoadOptions, LoadedModel, ModelSpec};
use loraserve::quant::QuantMode;

fn load_model(dir: &Path, quant: QuantMode) -> LoadedModel {
    let opts = LoadOptions { dtype: DType::F32, quant, device: Device::Cpu };
    model::load(&ModelSpec::Dir(dir.to_path_buf()), &opts).unwrap()
}

/// A copy of the llama `patterns` adapter with its config edited by `cfg` and its tensors by `tensors`.
fn broken(
    cfg: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("llama/adapters/patterns");
    let mut c: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg(&mut c);
    std::fs::write(tmp.path().join("adapter_config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    tensors(&mut t);
    candle_core::safetensors::save(&t, tmp.path().join("adapter_model.safetensors")).unwrap();
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let layout = m.model.lora_layout();
    match (
        peft::load_dir(tmp.path(), &layout, &Device::Cpu),
        peft::load_dir_parallel(tmp.path(), &layout, &Device::Cpu),
    ) {
        (Err(e), Err(p)) => {
            assert_eq!(e.to_string(), p.to_string(), "the parallel load reports the same first error");
            e.to_string()
        }
        _ => panic!("broken adapter loaded"),
    }
}

fn set(key: &'static str, v: serde_json::Value) -> impl FnOnce(&mut serde_json::Map<String, serde_json::Value>) {
    move |c| {
        c.insert(key.into(), v);
    }
}

fn keep(_: &mut HashMap<String, Tensor>) {}

#[test]
fn refuses_unsupported_config_keys_naming_them() {
    use serde_json::json;
    for (key, value, words) in [
        ("use_dora", json!(true), "DoRA"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
        ("bias", json!("lora_only"), "bias"),
        ("lora_bias", json!(true), "lora_bias"),
        ("init_lora_weights", json!("pissa"), "changes the base"),
        ("init_lora_weights", json!("olora"), "changes the base"),
        ("init_lora_weights", json!("corda"), "changes the base"),
        ("init_lora_weights", json!("loftq"), "changes the base"),
        ("peft_type", json!("IA3"), "LORA"),
        ("peft_type", json!(null), "missing"),
        ("target_modules", json!(5), "target_modules"),
        ("r", json!(0), "`r`"),
        ("lora_alpha", json!(1e40), "not a finite f32"),
    ] {
        let e = broken(set(key, value.clone()), keep);
        assert!(e.contains(&format!("`{key}`")) && e.contains(words), "{key}={value}: {e}");
        assert!(e.contains("adapter_config.json"), "{e}");
    }
    let e = broken(set("rank_pattern", json!({"(unclosed": 4})), keep);
    assert!(e.contains("rank_pattern.(unclosed"), "{e}");
    // Initialisations that rewrite the base, and variants with a forward (or weights) of their own: PEFT
    // writes `use_bdlora` and the `*_config` keys as settings objects.
    for (key, value) in [
        ("init_lora_weights", json!("lora_ga")),
        ("use_bdlora", json!({"nblocks": 2, "target_modules_bd_a": ["q_proj"]})),
        ("use_qalora", json!(true)),
        ("monteclora_config", json!({"num_samples": 2})),
        ("arrow_config", json!({"top_k": 2})),
        ("kasa_config", json!({"beta": 0.1})),
        // PEFT turns an empty object into these variants' default settings: on.
        ("monteclora_config", json!({})),
        ("kasa_config", json!({})),
        // Not a settings object: PEFT fails on it, so a reader must not take it as "off".
        ("kasa_config", json!([])),
        ("monteclora_config", json!(false)),
    ] {
        let e = broken(set(key, value.clone()), keep);
        assert!(e.contains(&format!("`{key}`")), "{key}={value}: {e}");
    }
}

/// An adapter for the llama fixture (3 layers, hidden 96) with `config` and random rank-4 tensors for
/// `modules` (`model.layers.<l>.<parent>.<kind>`), loaded; the error text if refused.
fn adapter_with(config: serde_json::Value, modules: &[&str]) -> Result<loraserve::lora::LoraWeights, String> {
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let layout = m.model.lora_layout();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("adapter_config.json"), config.to_string()).unwrap();
    let mut t = HashMap::new();
    for (i, module) in modules.iter().enumerate() {
        let kind = loraserve::lora::ModuleKind::from_name(module.rsplit('.').next().unwrap()).unwrap();
        let (in_f, out_f) = layout.dims(kind);
        let r = |shape: (usize, usize), seed: u64| {
            let mut rng = loraserve::rng::Rng::new(seed);
            let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| 0.1 * rng.normal() as f32).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        t.insert(format!("base_model.model.{module}.lora_A.weight"), r((4, in_f), 2 * i as u64));
        t.insert(format!("base_model.model.{module}.lora_B.weight"), r((out_f, 4), 2 * i as u64 + 1));
    }
    candle_core::safetensors::save(&t, tmp.path().join("adapter_model.safetensors")).unwrap();
    peft::load_dir(tmp.path(), &layout, &Device::Cpu).map(|a| a.weights).map_err(|e| e.to_string())
}

fn targeted(w: &loraserve::lora::LoraWeights) -> Vec<String> {
    w.targets().map(|(id, _)| id.module_path()).collect()
}

/// PEFT's layer filtering: a module named in full is targeted whatever `layers_to_transform` says, and a
/// `layers_pattern` must follow a dot (`.*?\.{pattern}\.(\d+)\.`), so `model.layers` matches no module of a
/// causal LM (PEFT then finds nothing to target) while an empty pattern means the default one.
#[test]
fn layer_filters_match_peft() {
    use serde_json::json;
    let q0 = "model.layers.0.self_attn.q_proj";
    let (v1, v2) = ("model.layers.1.self_attn.v_proj", "model.layers.2.self_attn.v_proj");
    let cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [q0, "v_proj"], "layers_to_transform": [1]});
    assert_eq!(targeted(&adapter_with(cfg.clone(), &[q0, v1]).unwrap()), [q0, v1]);
    let e = adapter_with(cfg.clone(), &[v1]).unwrap_err();
    assert!(e.contains("targets `layers.0.self_attn.q_proj`") || e.contains(q0), "{e}");
    let e = adapter_with(cfg, &[q0, v1, v2]).unwrap_err();
    assert!(e.contains(v2) && e.contains("not targeted"), "{e}");
    let with_pattern = |pattern| json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj"], "layers_to_transform": [2], "layers_pattern": pattern});
    for pattern in [json!("layers"), json!(["h", "layers"]), json!(""), json!([])] {
        assert_eq!(
            targeted(&adapter_with(with_pattern(pattern.clone()), &[v2]).unwrap()),
            [v2],
            "layers_pattern {pattern}"
        );
    }
    for pattern in [json!("model.layers"), json!(["h", "model.layers"])] {
        let e = adapter_with(with_pattern(pattern.clone()), &[v2]).unwrap_err();
        assert!(e.contains(v2) && e.contains("not targeted"), "layers_pattern {pattern}: {e}");
    }
    // The q_proj named in full is still targeted when the pattern matches nothing.
    let cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [q0, "v_proj"],
                     "layers_to_transform": [1], "layers_pattern": "model.layers"});
    assert_eq!(targeted(&adapter_with(cfg, &[q0]).unwrap()), [q0]);
}

/// `LoraConfig.__post_init__`'s refusals: layer filters beside a regex (or all-linear, also a string), a
/// layer pattern alone; and a pattern list holding something other than strings.
#[test]
fn layer_filter_combinations_peft_refuses_are_refused() {
    use serde_json::json;
    for (cfg, key, words) in [
        (json!({"target_modules": ".*q_proj", "layers_to_transform": [0]}), "layers_to_transform", "is a string"),
        (json!({"target_modules": "all-linear", "layers_to_transform": 0}), "layers_to_transform", "is a string"),
        (json!({"target_modules": ".*q_proj", "layers_to_transform": []}), "layers_to_transform", "is a string"),
        (json!({"target_modules": "all-linear", "layers_pattern": "layers"}), "layers_pattern", "is a string"),
        (
            json!({"target_modules": ["q_proj"], "layers_pattern": "layers"}),
            "layers_pattern",
            "without `layers_to_transform`",
        ),
        (
            json!({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["layers", 3]}),
            "layers_pattern",
            "3 is not a pattern",
        ),
    ] {
        let mut cfg = cfg;
        cfg["peft_type"] = json!("LORA");
        cfg["r"] = json!(4);
        let e = adapter_with(cfg.clone(), &["model.layers.0.self_attn.q_proj"]).unwrap_err();
        assert!(e.contains(&format!("`{key}`")) && e.contains(words), "{cfg}: {e}");
    }
}

/// An adapter whose config targets no linear layer of the base (a name it lacks, a module that is no linear
/// layer, layers past its depth) would be served as the base under its name: refused, as PEFT refuses it.
#[test]
fn an_adapter_that_targets_nothing_is_refused() {
    use serde_json::json;
    for cfg in [
        json!({"peft_type": "LORA", "r": 4, "target_modules": ["nonexistent"]}),
        json!({"peft_type": "LORA", "r": 4, "target_modules": ["self_attn"]}),
        json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": [7]}),
    ] {
        let e = adapter_with(cfg.clone(), &[]).unwrap_err();
        assert!(e.contains("`target_modules`") && e.contains("matches no linear layer of this base"), "{cfg}: {e}");
    }
}

/// A pattern the regex engine gives up on (its backtracking limit) is refused naming it; it was taken as
/// "no match", so an `alpha_pattern` Python's `re` applies was silently left out.
#[test]
fn a_pattern_past_the_regex_engines_limit_is_refused_by_name() {
    use serde_json::json;
    let bomb = r"((.{0,3}){0,10}(?<=.))*q_proj";
    for (key, value) in
        [("alpha_pattern", json!({bomb: 200})), ("rank_pattern", json!({bomb: 4})), ("target_modules", json!(bomb))]
    {
        let mut cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
        cfg[key] = value;
        let e = adapter_with(cfg, &["model.layers.0.self_attn.q_proj"]).unwrap_err();
        assert!(e.contains(&format!("`{key}")) && e.contains("matching it against `model.layers.0"), "{key}: {e}");
    }
}

/// `"all-linear"` is PEFT's shorthand in any case for `target_modules`; as `exclude_modules` it is a plain
/// regex, which matches no module.
#[test]
fn all_linear_is_case_blind_and_only_a_target() {
    use serde_json::json;
    let q0 = "model.layers.0.self_attn.q_proj";
    for cfg in [
        json!({"peft_type": "LORA", "r": 4, "target_modules": "ALL-Linear", "exclude_modules": "(?!.*layers\\.0\\.self_attn\\.q_proj).*"}),
        json!({"peft_type": "LORA", "r": 4, "target_modules": [q0], "exclude_modules": "all-linear"}),
    ] {
        assert_eq!(targeted(&adapter_with(cfg.clone(), &[q0]).unwrap()), [q0], "{cfg}");
    }
}

/// A config without `r` gets PEFT's default rank, 8, and the tensors are checked against it; one without
/// `target_modules` gets PEFT's default for these model types, q_proj and v_proj.
#[test]
fn missing_keys_take_peft_defaults() {
    let cfg = serde_json::json!({"peft_type": "LORA", "target_modules": ["v_proj"]});
    let v = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.self_attn.v_proj"];
    let e = adapter_with(cfg, &v).unwrap_err();
    assert!(e.contains("lora_A.weight") && e.contains("shape [4, 96], expected [8, 96]"), "{e}");
    let q = v.map(|m| m.replace("v_proj", "q_proj"));
    let qv: Vec<&str> = q.iter().map(String::as_str).chain(v).collect();
    for cfg in [
        serde_json::json!({"peft_type": "LORA", "r": 4}),
        serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": null}),
    ] {
        let mut want = qv.clone();
        want.sort();
        assert_eq!(targeted(&adapter_with(cfg.clone(), &qv).unwrap()), want, "{cfg}");
        let e = adapter_with(cfg, &v).unwrap_err();
        assert!(e.contains("q_proj") && e.contains("no LoRA weights"), "{e}");
    }
}

/// Embedding and head LoRA are named as such, although PEFT's files also hold `…base_layer.weight` copies
/// that sort before the LoRA tensors.
#[test]
fn embedding_and_head_lora_are_refused_as_such() {
    let e = broken(keep_cfg, |t| {
        let w = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        t.insert("base_model.model.lm_head.base_layer.weight".into(), w.clone());
        t.insert("base_model.model.lm_head.lora_A.weight".into(), w);
    });
    assert!(e.contains("lm_head.lora_A.weight") && e.contains("LoRA on lm_head is not supported"), "{e}");
    let e = broken(keep_cfg, |t| {
        let w = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        t.insert("base_model.model.model.embed_tokens.base_layer.weight".into(), w.clone());
        t.insert("base_model.model.model.embed_tokens.lora_embedding_A".into(), w);
    });
    assert!(e.contains("lora_embedding_A") && e.contains("embedding LoRA"), "{e}");
}

fn keep_cfg(_: &mut serde_json::Map<String, serde_json::Value>) {}

#[test]
fn refuses_bad_tensors_naming_them() {
    let q0a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let q0b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let dev = Device::Cpu;
    // Embedding LoRA.
    let e = broken(
        |_| {},
        |t| {
            t.insert(
                "base_model.model.model.embed_tokens.lora_embedding_A".into(),
                Tensor::zeros((8, 320), DType::F32, &dev).unwrap(),
            );
        },
    );
    assert!(e.contains("lora_embedding_A") && e.contains("embedding LoRA"), "{e}");
    // A module the base does not have.
    let e = broken(
        |_| {},
        |t| {
            t.insert(
                "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight".into(),
                Tensor::zeros((8, 96), DType::F32, &dev).unwrap(),
            );
        },
    );
    assert!(e.contains("model.layers.7.self_attn.q_proj") && e.contains("not a linear layer of the base"), "{e}");
    // A layer index as Python never writes it, beside the real one: refused, not taken for layer 0 (the later
    // name replaced the real tensor).
    for alias in ["00", "+0"] {
        let e = broken(
            |_| {},
            |t| {
                let name = q0a.replace("layers.0.", &format!("layers.{alias}."));
                t.insert(name, Tensor::zeros((8, 96), DType::F32, &dev).unwrap());
            },
        );
        let module = format!("model.layers.{alias}.self_attn.q_proj");
        assert!(e.contains(&module) && e.contains("not a linear layer of the base"), "{alias}: {e}");
    }
    // Wrong shape.
    let e = broken(
        |_| {},
        |t| {
            t.insert(q0a.into(), Tensor::zeros((8, 95), DType::F32, &dev).unwrap());
        },
    );
    assert!(e.contains(q0a) && e.contains("[8, 95]"), "{e}");
    // Rank disagreeing with rank_pattern (down_proj is r=4 there).
    let e = broken(
        |_| {},
        |t| {
            t.insert(
                "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight".into(),
                Tensor::zeros((8, 256), DType::F32, &dev).unwrap(),
            );
        },
    );
    assert!(e.contains("layers.1.mlp.down_proj.lora_A") && e.contains("expected [4, 256]"), "{e}");
    // Missing A or B.
    let e = broken(
        |_| {},
        |t| {
            t.remove(q0b);
        },
    );
    assert!(e.contains(q0b) && e.contains("missing"), "{e}");
    // Targeted module without any tensors.
    let e = broken(
        |_| {},
        |t| {
            t.remove(q0a);
            t.remove(q0b);
        },
    );
    assert!(e.contains("layers.0.self_attn.q_proj") && e.contains("targets"), "{e}");
    // A tensor the config does not target.
    let e = broken(
        set("target_modules", serde_json::json!(["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
        keep,
    );
    assert!(e.contains("q_proj") && e.contains("not targeted"), "{e}");
    // NaN / Inf.
    let e = broken(
        |_| {},
        |t| {
            let mut v = t[q0b].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[5] = f32::NAN;
            t.insert(q0b.into(), Tensor::from_vec(v, (96, 8), &dev).unwrap());
        },
    );
    assert!(e.contains(q0b) && e.contains("non-finite"), "{e}");
    // DoRA magnitude and LoRA bias tensors.
    let e = broken(
        |_| {},
        |t| {
            t.insert(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                Tensor::zeros(96, DType::F32, &dev).unwrap(),
            );
        },
    );
    assert!(e.contains("lora_magnitude_vector") && e.contains("DoRA"), "{e}");
}

#[test]
fn refuses_pickle_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("llama/adapters/qv-r4/adapter_config.json"), tmp.path().join("adapter_config.json")).unwrap();
    std::fs::write(tmp.path().join("adapter_model.bin"), b"not really a pickle").unwrap();
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let e = peft::load_dir(tmp.path(), &m.model.lora_layout(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("adapter_model.bin") && e.contains("safetensors"), "{e}");
}

/// A weights file longer or shorter than its header says, or whose header length runs past it, is refused
/// from the header alone, before the file is read into memory (a valid adapter extended to a sparse 3 GB took
/// 3.2 GB and 25 s to refuse).
#[test]
fn a_weights_file_of_the_wrong_length_is_refused_from_its_header() {
    let m = load_model(&fixture("llama/model"), QuantMode::None);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("llama/adapters/qv-r4").join(f), tmp.path().join(f)).unwrap();
    }
    let weights = tmp.path().join("adapter_model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    let load =
        || peft::load_dir(tmp.path(), &m.model.lora_layout(), &Device::Cpu).map(|_| ()).map_err(|e| e.to_string());
    load().expect("the fixture loads");
    let file = std::fs::OpenOptions::new().write(true).open(&weights).unwrap();
    for (to, words) in [
        (len + (256 << 20), format!("the file is {} bytes, but its header describes {len}", len + (256 << 20))),
        (len - 1, format!("the file is {} bytes, but its header describes {len}", len - 1)),
        (100, "a header of".to_string()),
    ] {
        file.set_len(to).unwrap();
        let e = load().unwrap_err();
        assert!(e.contains("adapter_model.safetensors") && e.contains(&words), "{to}: {e}");
    }
    // A header whose sizes do not match its shapes is refused naming the tensor (the crate's error does not).
    std::fs::copy(fixture("llama/adapters/qv-r4/adapter_model.safetensors"), &weights).unwrap();
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    common::edit_safetensors_header(&weights, |h| h[a]["shape"] = serde_json::json!([4, 95]));
    let e = load().unwrap_err();
    assert!(e.contains(&format!("tensor `{a}`: its shape [4, 95] of F32 takes 1520 bytes")), "{e}");
}

/// VeLoRA's projections (served, they are unread: only its backward uses them) are checked like every other
/// tensor.
#[test]
fn velora_projections_are_checked() {
    use serde_json::json;
    let embed = "base_model.model.model.layers.0.self_attn.q_proj.lora_velora_embed";
    let velora = |c: &mut serde_json::Map<String, serde_json::Value>| {
        c.insert("velora_config".into(), json!({"num_groups": 2}));
    };
    let add_embed = |len: usize| {
        move |t: &mut HashMap<String, Tensor>| {
            t.insert(embed.into(), Tensor::ones(len, DType::F32, &Device::Cpu).unwrap());
        }
    };
    // 96 inputs in 2 groups: 48 values.
    let e = broken(keep_cfg, add_embed(48));
    assert!(e.contains(embed) && e.contains("has no velora_config"), "{e}");
    let e = broken(velora, add_embed(96));
    assert!(e.contains(embed) && e.contains("shape [96], expected [48]"), "{e}");
    let e = broken(velora, |t: &mut HashMap<String, Tensor>| {
        t.insert(embed.into(), Tensor::ones(48, DType::U8, &Device::Cpu).unwrap());
    });
    assert!(e.contains(embed) && e.contains("unsupported dtype U8"), "{e}");
    let e = broken(set("velora_config", json!(true)), keep);
    assert!(e.contains("`velora_config`") && e.contains("settings object"), "{e}");
    let e = broken(set("velora_config", json!({"num_groups": 0})), keep);
    assert!(e.contains("`velora_config.num_groups`"), "{e}");
    let stray = "base_model.model.model.layers.0.self_attn.k_proj.lora_velora_embed";
    let e = broken(velora, |t: &mut HashMap<String, Tensor>| {
        for name in ["lora_A.weight", "lora_B.weight"] {
            t.remove(&format!("base_model.model.model.layers.0.self_attn.k_proj.{name}"));
        }
        t.insert(stray.into(), Tensor::ones(48, DType::F32, &Device::Cpu).unwrap());
    });
    assert!(e.contains(stray), "{e}");
}
