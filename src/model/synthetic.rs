//! Synthetic models for benchmarks: a named Llama-family shape (`llama-1b`, `llama2-7b`, `llama3-8b`, ...)
//! with random weights built directly in memory, no files. Dense weights come from the project's PRNG; for
//! an NF4 base the packed codes and scales are drawn directly, so a 7B-shape base costs seconds, not the
//! minutes quantizing random f32 weights would. And a tokenizer of a real vocabulary's size
//! ([`tokenizer_json`]).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::config::ModelConfig;
use super::linear::{BaseWeight, Linear};
use super::weights::InMemoryWeights;
use super::{LoadOptions, Model, ModelError};
use crate::quant::nf4::{double_quantize, BLOCK};
use crate::quant::{Absmax, Nf4Weight, QuantMode};
use crate::rng::Rng;

/// The shapes `--shape` accepts.
pub const SHAPES: &[&str] = &["demo", "llama-1b", "llama2-7b", "llama3-8b"];

/// `config.json` of a named shape.
pub fn shape_config(name: &str) -> Option<ModelConfig> {
    let (vocab, hidden, inter, layers, heads, kv, theta) = match name {
        "demo" => return Some(super::demo::config()),
        // TinyLlama-1.1B's geometry.
        "llama-1b" => (32000, 2048, 5632, 22, 32, 4, 10000.0),
        "llama2-7b" => (32000, 4096, 11008, 32, 32, 32, 10000.0),
        "llama3-8b" => (128256, 4096, 14336, 32, 32, 8, 500000.0),
        _ => return None,
    };
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": theta,
        "bos_token_id": 1, "eos_token_id": 2
    });
    Some(ModelConfig::from_json_str(&json.to_string(), name).expect("built-in shape config"))
}

/// Weight std of synthetic models (transformers' initializer_range).
const STD: f32 = 0.02;

fn normal_vec(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    // Chunks of 1M values from their own streams so large tensors fill in parallel, deterministically.
    const CHUNK: usize = 1 << 20;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = Rng::derive(seed, (stream << 20) ^ c as u64);
        for x in out {
            *x = rng.normal() as f32 * STD;
        }
    });
    v
}

/// A random NF4 weight drawn directly: uniform codes, scales like those of normal(0, 0.02) blocks of 64.
fn random_nf4(out: usize, inp: usize, seed: u64, stream: u64) -> Nf4Weight {
    let n = out * inp;
    let mut packed = vec![0u8; n.div_ceil(2)];
    packed.par_chunks_mut(1 << 20).enumerate().for_each(|(c, out)| {
        let mut rng = Rng::derive(seed, (stream << 20) ^ c as u64 ^ (1 << 62));
        for chunk in out.chunks_mut(8) {
            let bytes = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    });
    let mut rng = Rng::derive(seed, stream);
    // The absmax of 64 normal draws is about 2.4 sigma.
    let absmax: Vec<f32> = (0..n.div_ceil(BLOCK)).map(|_| STD * (2.4 + 0.3 * rng.normal() as f32).abs()).collect();
    Nf4Weight::from_parts(
        vec![out, inp],
        packed,
        Absmax::Double(double_quantize(&absmax)),
        crate::quant::codebook::NF4_CODE,
    )
    .expect("consistent synthetic parts")
}

/// Builds a model of the named shape with random weights.
pub fn build(name: &str, opts: &LoadOptions, seed: u64) -> Result<Model, ModelError> {
    let config = shape_config(name)
        .ok_or_else(|| ModelError::Invalid(format!("unknown shape `{name}` (known: {})", SHAPES.join(", "))))?;
    super::check_device(opts)?;
    let c = &config;
    let h = c.hidden_size;
    let dev = &opts.device;
    // Non-linear tensors (embeddings, norms, head) as an in-memory source.
    let mut small = HashMap::new();
    let put = |small: &mut HashMap<String, Tensor>, name: String, shape: Vec<usize>, stream: u64, ones: bool| {
        let n: usize = shape.iter().product();
        let v = if ones { vec![1f32; n] } else { normal_vec(n, seed, stream) };
        small.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        Ok::<(), candle_core::Error>(())
    };
    put(&mut small, "model.embed_tokens.weight".into(), vec![c.vocab_size, h], 1, false)?;
    put(&mut small, "lm_head.weight".into(), vec![c.vocab_size, h], 2, false)?;
    // Stored in bf16, as the published checkpoints of these shapes are (a GPU keeps them so: see
    // `Model::assemble`).
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let t = small[name].to_dtype(candle_core::DType::BF16)?;
        small.insert(name.to_string(), t);
    }
    put(&mut small, "model.norm.weight".into(), vec![h], 3, true)?;
    for l in 0..c.num_hidden_layers {
        put(&mut small, format!("model.layers.{l}.input_layernorm.weight"), vec![h], 0, true)?;
        put(&mut small, format!("model.layers.{l}.post_attention_layernorm.weight"), vec![h], 0, true)?;
    }
    let src = InMemoryWeights::new(name, small);
    // Each linear is made on the host and moved to the device one at a time (`Model::assemble`), so a
    // GPU-resident 7B shape never holds the whole base in host memory.
    Model::assemble(config, &src, opts.dtype, dev, |id, inp, out, _| {
        let stream = 100 + id.index() as u64;
        let base = match opts.quant {
            QuantMode::Nf4 => BaseWeight::Nf4(Arc::new(random_nf4(out, inp, seed, stream))),
            QuantMode::None => BaseWeight::Dense(
                Tensor::from_vec(normal_vec(out * inp, seed, stream), (out, inp), &Device::Cpu)?
                    .to_dtype(opts.dtype)?,
            ),
        };
        Ok(Linear { id, in_features: inp, out_features: out, base, bias: None })
    })
}

/// A byte-level BPE `tokenizer.json` of `vocab` tokens (EOS last, special), and EOS's id: the 256 bytes, JSON
/// punctuation, then words of 2 to 10 letters and digits (common letters likelier), half with a leading
/// space. For benchmarks and tests at a real model's vocabulary size; no merges, so it decodes but does not
/// encode like a trained one.
pub fn tokenizer_json(vocab_size: usize, seed: u64) -> (String, u32) {
    let alphabet: Vec<char> = super::token_bytes::byte_level_chars().into_iter().map(|(_, c)| c).collect();
    let spell = |bytes: &[u8]| bytes.iter().map(|&b| alphabet[b as usize]).collect::<String>();
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(spell(&[b]), vocab.len().into());
    }
    for p in ["{\"", "\":", "\",", "\"}", "},", "\": \"", "\", \"", ": ", ", ", "[{", "}]", "\":\"", "true", "false"] {
        vocab.insert(spell(p.as_bytes()), vocab.len().into());
    }
    let mut rng = Rng::new(seed);
    let letters = b"etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789";
    while vocab.len() < vocab_size - 1 {
        let len = 2 + rng.below(9) as usize;
        let mut word: Vec<u8> = if rng.below(2) == 0 { vec![b' '] } else { Vec::new() };
        // Common letters first: a skewed pick.
        word.extend((0..len).map(|_| letters[(rng.below(62) * rng.below(62) / 61) as usize]));
        let token = spell(&word);
        if !vocab.contains_key(&token) {
            vocab.insert(token, vocab.len().into());
        }
    }
    let eos = vocab.len() as u32;
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": eos, "content": "<|end_of_text|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    (json.to_string(), eos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn shapes_resolve() {
        for s in SHAPES {
            assert!(shape_config(s).is_some(), "{s}");
        }
        let c = shape_config("llama2-7b").unwrap();
        assert_eq!(c.head_dim, 128);
        assert!(shape_config("gpt-9").is_none());
    }

    #[test]
    fn demo_shape_builds_in_both_modes() {
        for quant in [QuantMode::Nf4, QuantMode::None] {
            let opts = LoadOptions { dtype: DType::F32, quant, device: Device::Cpu };
            let m = build("demo", &opts, 1).unwrap();
            assert_eq!(m.config().num_hidden_layers, 4);
        }
    }
}
