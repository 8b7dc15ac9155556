//! Tests of the config reader: both transformers forms, defaults, and every refusal by field.

use super::*;

const V5: &str = r#"{
    "model_type": "llama", "vocab_size": 320, "hidden_size": 96, "intermediate_size": 256,
    "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": false,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "bos_token_id": 0, "eos_token_id": 1
}"#;

const V4_LLAMA3: &str = r#"{
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]
}"#;

#[test]
fn parses_transformers_5_form() {
    let c = ModelConfig::from_json_str(V5, "config.json").unwrap();
    assert_eq!(c.family, ModelFamily::Llama);
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.gqa_group(), 2);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert_eq!(c.eos_token_ids, vec![1]);
    assert!(!c.qkv_bias && !c.tie_word_embeddings);
}

#[test]
fn parses_transformers_4_form_with_llama3_rope() {
    let c = ModelConfig::from_json_str(V4_LLAMA3, "config.json").unwrap();
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.num_key_value_heads, 8);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    // High frequencies (short wavelengths) are untouched, low ones divided by the factor.
    let plain = ModelConfig { rope_scaling: RopeScaling::Default, ..c.clone() }.rope_inv_freq();
    let scaled = c.rope_inv_freq();
    assert_eq!(scaled[0], plain[0]);
    let last = plain.len() - 1;
    assert!((scaled[last] - plain[last] / 8.0).abs() <= plain[last] * 1e-6);
}

#[test]
fn legacy_type_key_and_linear_scaling() {
    let text = V4_LLAMA3.replace(
        r#""rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
        r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
    );
    let c = ModelConfig::from_json_str(&text, "config.json").unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn qwen2_has_qkv_bias_and_mistral_window() {
    let q = V5.replace("\"llama\"", "\"qwen2\"");
    let c = ModelConfig::from_json_str(&q, "config.json").unwrap();
    assert!(c.qkv_bias && !c.o_bias);
    let m = V5
        .replace("\"llama\"", "\"mistral\"")
        .replace("\"head_dim\": 16,", "\"head_dim\": 16, \"sliding_window\": 4096,");
    let c = ModelConfig::from_json_str(&m, "config.json").unwrap();
    assert_eq!(c.sliding_window, vec![Some(4096); 3]);
    // With `layer_types` it is Ministral's config (transformers loads it as one): the window on the layers
    // listed as sliding only. Entries are checked, for Qwen2 too.
    let types =
        |t: &str| m.replace("\"sliding_window\": 4096,", &format!("\"sliding_window\": 4096, \"layer_types\": {t},"));
    let c = ModelConfig::from_json_str(
        &types(r#"["sliding_attention", "full_attention", "sliding_attention"]"#),
        "config.json",
    );
    assert_eq!(c.unwrap().sliding_window, [Some(4096), None, Some(4096)]);
    for (t, words) in [
        (r#"["sliding_attention", "full_attention"]"#, "`layer_types`: has 2 entries for 3 layers"),
        (r#"["sliding_attention", "chunked_attention", "full_attention"]"#, "`layer_types[1]`: expected"),
        (r#""full_attention""#, "`layer_types`: expected a list"),
    ] {
        let e = ModelConfig::from_json_str(&types(t), "config.json").unwrap_err().to_string();
        assert!(e.contains(words), "{t}: {e}");
        let qwen = types(t)
            .replace("\"mistral\"", "\"qwen2\"")
            .replace("\"layer_types\"", "\"use_sliding_window\": true, \"layer_types\"");
        let e = ModelConfig::from_json_str(&qwen, "config.json").unwrap_err().to_string();
        assert!(e.contains(words), "qwen2 {t}: {e}");
    }
}

#[test]
fn rejects_unsupported_model_type() {
    let t = V5.replace("\"llama\"", "\"gpt2\"");
    let e = ModelConfig::from_json_str(&t, "m/config.json").unwrap_err().to_string();
    assert!(e.contains("m/config.json") && e.contains("gpt2"), "{e}");
}

#[test]
fn names_a_missing_required_field() {
    for field in
        ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads", "model_type"]
    {
        let mut v: Value = serde_json::from_str(V5).unwrap();
        v.as_object_mut().unwrap().remove(field);
        let e = ModelConfig::from_json_str(&v.to_string(), "config.json").unwrap_err();
        assert!(matches!(&e, ConfigError::Missing { field: f, .. } if f == field), "{field}: {e}");
        assert!(e.to_string().contains(field));
    }
}

#[test]
fn names_a_missing_llama3_field_and_a_bad_value() {
    let t = V4_LLAMA3.replace("\"low_freq_factor\": 1.0, ", "");
    let e = ModelConfig::from_json_str(&t, "config.json").unwrap_err().to_string();
    assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    let t = V5.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4");
    let e = ModelConfig::from_json_str(&t, "config.json").unwrap_err().to_string();
    assert!(e.contains("num_key_value_heads"), "{e}");
    let t = V5.replace("\"hidden_size\": 96", "\"hidden_size\": \"96\"");
    let e = ModelConfig::from_json_str(&t, "config.json").unwrap_err().to_string();
    assert!(e.contains("hidden_size"), "{e}");
    let t = V5.replace("\"default\"", "\"yarn\"");
    let e = ModelConfig::from_json_str(&t, "config.json").unwrap_err().to_string();
    assert!(e.contains("yarn"), "{e}");
}

#[test]
fn generation_config_overrides_eos() {
    let mut c = ModelConfig::from_json_str(V5, "config.json").unwrap();
    c.apply_generation_config(r#"{"eos_token_id": [1, 7]}"#, "generation_config.json").unwrap();
    assert_eq!(c.eos_token_ids, vec![1, 7]);
    let e = c.apply_generation_config(r#"{"eos_token_id": "x"}"#, "generation_config.json").unwrap_err();
    assert!(e.to_string().contains("eos_token_id"));
    assert!(c.apply_generation_config(r#"{"eos_token_id": [1, 320]}"#, "generation_config.json").unwrap());
    let e = c.check_eos_in_vocab("generation_config.json").unwrap_err().to_string();
    assert!(e.contains("`eos_token_id`") && e.contains("token id 320 is outside"), "{e}");
    assert!(!c.apply_generation_config(r#"{"eos_token_id": null}"#, "generation_config.json").unwrap());
    for not_an_object in ["[]", "null", "1"] {
        let e = c.apply_generation_config(not_an_object, "generation_config.json").unwrap_err().to_string();
        assert!(e.contains("generation_config.json") && e.contains("top level is not an object"), "{e}");
    }
}

/// `V5` with top-level keys replaced (`Some`) or removed (`None`).
fn edited(edits: &[(&str, Option<Value>)]) -> Result<ModelConfig, ConfigError> {
    let mut v: Value = serde_json::from_str(V5).unwrap();
    let map = v.as_object_mut().unwrap();
    for (k, val) in edits {
        match val {
            Some(x) => map.insert(k.to_string(), x.clone()),
            None => map.remove(*k),
        };
    }
    ModelConfig::from_json_str(&v.to_string(), "config.json")
}

/// Keys a config does not write take transformers' class defaults; written as `null` they are `None`.
#[test]
fn unwritten_keys_take_the_config_classes_defaults() {
    use serde_json::json;
    let (mistral, qwen2) = (Some(json!("mistral")), Some(json!("qwen2")));
    // Mistral: a 4096 window, 8 key/value heads; Llama: one per query head.
    let c = edited(&[
        ("model_type", mistral.clone()),
        ("num_attention_heads", Some(json!(16))),
        ("num_key_value_heads", None),
    ])
    .unwrap();
    assert_eq!((c.sliding_window, c.num_key_value_heads), (vec![Some(4096); 3], 8));
    let c = edited(&[("model_type", mistral.clone()), ("sliding_window", Some(Value::Null))]).unwrap();
    assert_eq!(c.sliding_window, vec![None; 3]);
    let c = edited(&[("num_key_value_heads", None)]).unwrap();
    assert_eq!(c.num_key_value_heads, 6);
    // Qwen2: 32 key/value heads, theta 10000, and when sliding, 4096 from layer 28 on.
    let c = edited(&[
        ("model_type", qwen2.clone()),
        ("num_attention_heads", Some(json!(32))),
        ("hidden_size", Some(json!(512))),
        ("num_key_value_heads", None),
        ("rope_parameters", None),
    ])
    .unwrap();
    assert_eq!((c.num_key_value_heads, c.rope_theta), (32, 10_000.0));
    let slide = |extra: &[(&str, Option<Value>)]| {
        let mut e = vec![("model_type", qwen2.clone()), ("use_sliding_window", Some(json!(true)))];
        e.extend_from_slice(extra);
        edited(&e).unwrap().sliding_window
    };
    assert_eq!(slide(&[]), vec![None; 3]);
    let deep = slide(&[("num_hidden_layers", Some(json!(30)))]);
    assert_eq!((deep[27], deep[28], deep[29]), (None, Some(4096), Some(4096)), "from layer 28 on");
    assert_eq!(slide(&[("max_window_layers", Some(json!(1)))]), vec![None, Some(4096), Some(4096)]);
    assert_eq!(slide(&[("max_window_layers", Some(json!(0))), ("sliding_window", Some(json!(64)))]), vec![Some(64); 3]);
    // BOS 1 and EOS 2 for Llama and Mistral when not written; none when null, and none for Qwen2.
    let c = edited(&[("bos_token_id", None), ("eos_token_id", None)]).unwrap();
    assert_eq!((c.bos_token_id, c.eos_token_ids), (Some(1), vec![2]));
    let c = edited(&[("bos_token_id", Some(Value::Null)), ("eos_token_id", Some(Value::Null))]).unwrap();
    assert_eq!((c.bos_token_id, c.eos_token_ids), (None, vec![]));
    let c = edited(&[("model_type", qwen2), ("eos_token_id", None)]).unwrap();
    assert!(c.eos_token_ids.is_empty());
}

/// As transformers 5 reads RoPE keys: `rope_scaling` wins over `rope_parameters`, a top-level `rope_theta`
/// fills the parameters', and `type` and `rope_type` must not disagree.
#[test]
fn rope_keys_as_transformers_reads_them() {
    use serde_json::json;
    let c = edited(&[("rope_scaling", Some(json!({"rope_type": "linear", "factor": 4.0})))]).unwrap();
    assert_eq!((c.rope_scaling, c.rope_theta), (RopeScaling::Linear { factor: 4.0 }, 10_000.0));
    let c = edited(&[("rope_parameters", Some(json!({"rope_type": "default"}))), ("rope_theta", Some(json!(1e6)))])
        .unwrap();
    assert_eq!(c.rope_theta, 1e6);
    // An empty rope_scaling is absent.
    let c = edited(&[("rope_scaling", Some(json!({})))]).unwrap();
    assert_eq!((c.rope_scaling, c.rope_theta), (RopeScaling::Default, 500000.0));
    // llama3's original context, as transformers 5's model reads it (checked against transformers 5.24): a
    // top-level key first, in either form and over the parameters' value; else the parameters' value; else
    // the model's context.
    let old_ctx = |c: ModelConfig| match c.rope_scaling {
        RopeScaling::Llama3 { original_max_position_embeddings, .. } => original_max_position_embeddings,
        other => panic!("{other:?}"),
    };
    let mut llama3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
    let top = ("original_max_position_embeddings", Some(json!(128)));
    assert_eq!(old_ctx(edited(&[("rope_parameters", Some(llama3.clone()))]).unwrap()), 512.0);
    assert_eq!(old_ctx(edited(&[("rope_parameters", Some(llama3.clone())), top.clone()]).unwrap()), 128.0);
    llama3["original_max_position_embeddings"] = json!(256);
    assert_eq!(old_ctx(edited(&[("rope_parameters", Some(llama3.clone()))]).unwrap()), 256.0);
    assert_eq!(old_ctx(edited(&[("rope_parameters", Some(llama3.clone())), top.clone()]).unwrap()), 128.0);
    assert_eq!(old_ctx(edited(&[("rope_scaling", Some(llama3.clone())), top]).unwrap()), 128.0);
    let e = edited(&[("rope_parameters", Some(llama3)), ("original_max_position_embeddings", Some(json!(0)))]);
    let e = e.unwrap_err().to_string();
    assert!(e.contains("field `original_max_position_embeddings`: must be greater than 0"), "{e}");
    for (params, words) in [
        (json!({"rope_type": "linear", "type": "dynamic", "factor": 2.0}), "disagrees with rope_parameters.type"),
        (json!({"rope_type": null, "type": "linear", "factor": 2.0}), "disagrees"),
        (json!({"rope_type": null}), "expected a string, got null"),
    ] {
        let e = edited(&[("rope_parameters", Some(params))]).unwrap_err().to_string();
        assert!(e.contains("rope_parameters.rope_type") && e.contains(words), "{e}");
    }
    // Factors that divide positions: 0 or below is refused by name (a linear factor of 0 loaded, then every
    // logit was NaN).
    let llama3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
    for (field, value) in [
        ("factor", json!(0)),
        ("factor", json!(-1.0)),
        ("low_freq_factor", json!(0)),
        ("original_max_position_embeddings", json!(0)),
    ] {
        let mut params = llama3.clone();
        params[field] = value.clone();
        let e = edited(&[("rope_parameters", Some(params))]).unwrap_err().to_string();
        assert!(e.contains(&format!("rope_parameters.{field}")) && e.contains("must be greater than 0"), "{e}");
    }
    let e = edited(&[("rope_scaling", Some(json!({"rope_type": "linear", "factor": 0.0})))]).unwrap_err();
    assert!(e.to_string().contains("rope_scaling.factor") && e.to_string().contains("greater than 0"), "{e}");
}

/// A classifier or reward model of a supported family is refused by its `architectures`.
#[test]
fn only_causal_lm_architectures() {
    use serde_json::json;
    assert!(edited(&[("architectures", Some(json!(["LlamaForCausalLM"])))]).is_ok());
    for (arch, words) in [
        (json!(["Qwen2ForSequenceClassification"]), "not a causal language model"),
        (json!("LlamaForCausalLM"), "expected a list of class names"),
    ] {
        let e = edited(&[("architectures", Some(arch))]).unwrap_err().to_string();
        assert!(e.contains("`architectures`") && e.contains(words), "{e}");
    }
}

/// Values that pass as positive f64 but break the forward's f32 (every logit NaN at the first request), and a
/// layer count or head width that would allocate before any tensor is read (an abort at 1e8, a panic at
/// 2^62), are refused by field at load.
#[test]
fn values_past_f32_and_absurd_sizes_are_refused_by_field() {
    for (from, to, words) in [
        (r#""rope_theta": 500000.0"#, r#""rope_theta": 1e-300"#, "field `rope_theta`: 1e-300 gives rotary angles"),
        (
            r#""rope_type": "default""#,
            r#""rope_type": "linear", "factor": 1e-320"#,
            "field `rope_parameters.factor`: Linear { factor: 1e-320 } gives rotary angles that are not finite",
        ),
        (r#""head_dim": 16"#, r#""head_dim": 4000000000000"#, "field `head_dim`: 4000000000000 is past 4096"),
        (r#""head_dim": 16"#, r#""head_dim": 4611686018427387904"#, "is past 4096"),
        (
            r#""num_hidden_layers": 3"#,
            r#""num_hidden_layers": 100000000"#,
            "field `num_hidden_layers`: 100000000 is past 4096",
        ),
        (r#""num_hidden_layers": 3"#, r#""num_hidden_layers": 4611686018427387904"#, "is past 4096"),
    ] {
        assert_eq!(V5.matches(from).count(), 1, "{from}");
        let e = ModelConfig::from_json_str(&V5.replace(from, to), "config.json").unwrap_err().to_string();
        assert!(e.contains(words), "{to}: {e}");
    }
    // At the edge of f32 but fine: a theta of 1e-30 keeps every angle finite.
    ModelConfig::from_json_str(&V5.replace(r#""rope_theta": 500000.0"#, r#""rope_theta": 1e-30"#), "config.json")
        .unwrap();
}
