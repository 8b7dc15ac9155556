//! `--model demo`: the embedded default model, needing no files. A small Llama-architecture network
//! (4 layers, hidden 256, grouped-query attention) whose weights are drawn from the project's own PRNG with
//! a fixed seed — so they never change with a dependency upgrade — and a byte-level tokenizer shipped in the
//! source tree. Its outputs are meaningless until an adapter teaches it something: the example adapters in
//! `adapters/` were trained on it with `server train`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::tokenizer::{Tokenizer, TokenizerError};
use super::weights::InMemoryWeights;
use crate::rng::Rng;

/// The demo model's `config.json` (transformers 4.x form).
pub const CONFIG_JSON: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": 259,
  "hidden_size": 256,
  "intermediate_size": 768,
  "num_hidden_layers": 4,
  "num_attention_heads": 8,
  "num_key_value_heads": 4,
  "head_dim": 32,
  "hidden_act": "silu",
  "max_position_embeddings": 1024,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "pad_token_id": 2,
  "torch_dtype": "float32"
}"#;

/// Byte-level tokenizer: `<s>`=0, `</s>`=1, `<pad>`=2, then the 256 bytes.
pub const TOKENIZER_JSON: &str = include_str!("demo/tokenizer.json");
/// With a chat template for `{"messages": ...}` training data.
pub const TOKENIZER_CONFIG_JSON: &str = include_str!("demo/tokenizer_config.json");

/// Seed of the demo weights. Changing it (or the generator) invalidates the example adapters.
pub const SEED: u64 = 0x10_4A5E_57E5;
/// Standard deviation of the demo weights (transformers' `initializer_range`).
const INIT_STD: f64 = 0.02;

pub fn config() -> ModelConfig {
    ModelConfig::from_json_str(CONFIG_JSON, "demo/config.json").expect("the embedded demo config is valid")
}

pub fn tokenizer() -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_parts(
        TOKENIZER_JSON.as_bytes(),
        "demo/tokenizer.json",
        Some((TOKENIZER_CONFIG_JSON, "demo/tokenizer_config.json")),
    )
}

/// The demo weights by Hugging Face name, f32 on the CPU.
pub fn weights() -> candle_core::Result<InMemoryWeights> {
    random_weights(&config(), SEED, INIT_STD, "demo")
}

/// Weights for `config` drawn from [`Rng`]: every tensor from its own stream (`seed`, index in name
/// order), normal(0, std) for matrices, ones for norms, zeros for biases.
pub fn random_weights(config: &ModelConfig, seed: u64, std: f64, name: &str) -> candle_core::Result<InMemoryWeights> {
    let c = config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![c.vocab_size, h]), ("model.norm.weight".into(), vec![h])];
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (m, out, inp, bias) in [
            ("self_attn.q_proj", c.q_dim(), h, c.qkv_bias),
            ("self_attn.k_proj", c.kv_dim(), h, c.qkv_bias),
            ("self_attn.v_proj", c.kv_dim(), h, c.qkv_bias),
            ("self_attn.o_proj", h, c.q_dim(), c.o_bias),
            ("mlp.gate_proj", i, h, c.mlp_bias),
            ("mlp.up_proj", i, h, c.mlp_bias),
            ("mlp.down_proj", h, i, c.mlp_bias),
        ] {
            shapes.push((format!("{p}.{m}.weight"), vec![out, inp]));
            if bias {
                shapes.push((format!("{p}.{m}.bias"), vec![out]));
            }
        }
    }
    shapes.sort();
    let mut tensors = HashMap::new();
    for (index, (tname, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if tname.ends_with("norm.weight") {
            vec![1.0; n]
        } else if tname.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let mut rng = Rng::derive(seed, index as u64);
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        tensors.insert(tname, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(InMemoryWeights::new(name, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::WeightSource;

    #[test]
    fn tokenizer_is_byte_level_with_bos() {
        let t = tokenizer().unwrap();
        assert_eq!(t.vocab_size(), 259);
        let ids = t.encode("Hi é").unwrap();
        assert_eq!(ids, vec![0, 3 + b'H' as u32, 3 + b'i' as u32, 3 + b' ' as u32, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(t.decode(&ids[1..]).unwrap(), "Hi é");
        assert_eq!(t.token_to_id("</s>"), Some(1));
        assert!(t.chat.template.is_some());
    }

    #[test]
    fn weights_are_deterministic() {
        let a = weights().unwrap();
        let b = weights().unwrap();
        let name = "model.layers.2.mlp.up_proj.weight";
        let ta = a.tensor(name, &[768, 256], candle_core::DType::F32, &Device::Cpu).unwrap();
        let tb = b.tensor(name, &[768, 256], candle_core::DType::F32, &Device::Cpu).unwrap();
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(va, tb.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let std = (va.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / va.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "{std}");
    }
}
