//! The one forward of the Llama family (Llama 2/3, Mistral, Qwen2): embeddings, decoder layers of
//! RMSNorm → grouped-query attention with RoPE → RMSNorm → SwiGLU MLP, final norm, LM head.
//!
//! A forward runs over a *flattened* batch: the new tokens of several sequences stacked as rows, each
//! sequence with its own past length (continuous batching mixes prefill chunks and decode steps in one
//! call). Every linear layer is a [`Linear`] — dense or NF4 base plus the LoRA deltas of the rows' adapters.
//! Attention is either the paged serving kernel over the KV cache or dense tensor ops (training, and the
//! reference the serving path is checked against). The dense forward also runs a layer at a time
//! ([`Model::dense_layers`]), for training with activation checkpointing.

use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::attention::{
    dense_attention, paged_attention, rope_in_place, rope_tables, rope_tensor, AttnShape, PagedSeq,
};
use super::config::ModelConfig;
use super::frozen::frozen_matmul;
use super::kv_cache::{KvGeometry, LayerArenas, PagedKvCache};
use super::linear::{Linear, LinearLoad};
use super::weights::WeightSource;
use super::ModelError;
use crate::lora::{LinearId, LoraRows, ModuleKind};
use crate::tensor_io::{tensor_from_f32, with_f32};

/// One sequence's rows in a forward batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// New tokens of this sequence in this forward.
    pub len: usize,
    /// Positions already in its KV cache (0 without a cache).
    pub past: usize,
    /// Its KV block table (paged attention only), covering `past + len` positions.
    pub blocks: &'a [u32],
}

/// A flattened batch: `tokens` holds every sequence's new tokens back to back, in `seqs` order.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub seqs: &'a [SeqInput<'a>],
    /// Rows whose logits are wanted (e.g. the last row of each sequence), in output order.
    pub logit_rows: &'a [usize],
}

/// How attention reads and writes keys and values.
pub enum AttentionMode<'a> {
    /// No cache: each sequence attends over its own rows only (`past` must be 0). `differentiable` keeps
    /// the autograd graph for training.
    Dense { differentiable: bool },
    /// The serving path: keys/values go into, and are read from, the paged cache.
    Paged(&'a mut PagedKvCache),
}

struct DecoderLayer {
    input_norm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_norm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    attn: AttnShape,
}

/// The layers of a cacheless forward over one batch, run one at a time ([`Model::dense_layers`]).
pub struct DenseLayers<'m> {
    model: &'m Model,
    /// RoPE tables of the batch's rows, `[rows, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// (first row, rows) of each sequence.
    seqs: Vec<(usize, usize)>,
    differentiable: bool,
}

impl DenseLayers<'_> {
    /// Decoder layers in the model.
    pub fn len(&self) -> usize {
        self.model.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.model.layers.is_empty()
    }

    /// Layer `l` over `(x, h)` as [`Model::dense_layers`] or the layer before returned them.
    pub fn run(&self, l: usize, x: &Tensor, h: &Tensor, lora: &LoraRows) -> Result<(Tensor, Tensor)> {
        let a = &self.model.layers[l].attn;
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let mut outs = Vec::with_capacity(self.seqs.len());
            for &(row, len) in &self.seqs {
                let shape3 = |t: &Tensor, heads: usize| t.narrow(0, row, len)?.reshape((len, heads, a.head_dim));
                let (c, sn) = (self.cos.narrow(0, row, len)?, self.sin.narrow(0, row, len)?);
                let qs = rope_tensor(&shape3(q, a.heads)?, &c, &sn)?;
                let ks = rope_tensor(&shape3(k, a.kv_heads)?, &c, &sn)?;
                outs.push(dense_attention(&qs, &ks, &shape3(v, a.kv_heads)?, a)?);
            }
            Tensor::cat(&outs, 0)
        };
        self.model.layer(l, x, h, lora, self.differentiable, attend)
    }
}

/// Each sequence of `batch` with its first row.
fn paged_seqs<'a>(batch: &Batch<'a>) -> Vec<PagedSeq<'a>> {
    let mut row = 0;
    batch
        .seqs
        .iter()
        .map(|s| {
            let p = PagedSeq { row, len: s.len, past: s.past, blocks: s.blocks };
            row += s.len;
            p
        })
        .collect()
}

/// A loaded Llama-family model.
pub struct Model {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(weight)
    } else {
        candle_nn::ops::rms_norm(x, weight, eps as f32)
    }
}

/// `x + d` and its RMS norm: one fused kernel on a GPU when serving, the two ops elsewhere.
fn add_norm(x: &Tensor, d: &Tensor, weight: &Tensor, eps: f64, differentiable: bool) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if !differentiable && x.device().is_cuda() {
        return crate::gpu::fused::add_rms_norm(x, d, weight, eps as f32);
    }
    let x = (x + d)?;
    let h = rms_norm(&x, weight, eps, differentiable)?;
    Ok((x, h))
}

/// The SwiGLU gate `silu(gate) · up`: one fused kernel on a GPU when serving, the two ops elsewhere.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn swiglu(gate: &Tensor, up: &Tensor, differentiable: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if !differentiable && gate.device().is_cuda() {
        return crate::gpu::fused::silu_mul(gate, up);
    }
    candle_nn::Activation::Silu.forward(gate)? * up
}

/// The dtype the embedding table and the head are kept in: the compute dtype, except on a GPU computing in f32
/// from a bf16 or f16 checkpoint, where they stay as stored and are widened, exactly, where used. They are the
/// largest tensors outside the decoder (a 7B's two: 1 GiB in f32, 0.5 as stored).
fn table_dtype(src: &dyn WeightSource, name: &str, dtype: DType, device: &Device) -> DType {
    match src.stored_dtype(name) {
        Some(stored @ (DType::BF16 | DType::F16)) if dtype == DType::F32 && device.is_cuda() => stored,
        _ => dtype,
    }
}

/// Whether two tensors are stored with the same dtype, shape and bytes: the same values, found in the mapped
/// files without a copy of either (a tied checkpoint that also stores its head, as some merges do).
fn same_stored_bytes(src: &dyn WeightSource, a: &str, b: &str) -> bool {
    match (src.raw(a), src.raw(b)) {
        (Some(a), Some(b)) => a.dtype == b.dtype && a.shape == b.shape && a.data == b.data,
        _ => false,
    }
}

/// Whether two tensors of one shape hold exactly the same values.
fn same_values(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.eq(b)?.flatten_all()?.min(0)?.to_scalar::<u8>()? == 1)
}

/// Elements of the head widened at a time when it is stored narrower than the compute dtype (32 MiB of f32:
/// on a GPU the widened slice is still in L2 when the product reads it).
const HEAD_SLICE_ELEMS: usize = 8 << 20;

/// `x · headᵀ`; a head stored narrower than `x` is widened a slice of rows at a time (exact), each slice
/// multiplied in `x`'s dtype, so the logits are those of the widened head without a widened copy of it.
pub fn head_product(x: &Tensor, head: &Tensor) -> Result<Tensor> {
    head_product_in_slices(x, head, HEAD_SLICE_ELEMS)
}

fn head_product_in_slices(x: &Tensor, head: &Tensor, slice_elems: usize) -> Result<Tensor> {
    if head.dtype() == x.dtype() {
        return frozen_matmul(x, head);
    }
    let (vocab, hidden) = head.dims2()?;
    let slice = (slice_elems / hidden.max(1)).clamp(1, vocab);
    let parts = (0..vocab)
        .step_by(slice)
        .map(|s| frozen_matmul(x, &head.narrow(0, s, slice.min(vocab - s))?.to_dtype(x.dtype())?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

impl Model {
    /// Builds the model from named weights (Hugging Face names).
    pub fn load(config: ModelConfig, ld: &LinearLoad) -> std::result::Result<Self, ModelError> {
        Self::assemble(config, ld.source, ld.dtype, ld.device, |id, inp, out, bias| {
            let prefix = format!("model.layers.{}.{}.{}", id.layer, id.kind.parent(), id.kind.name());
            Linear::load(ld, &prefix, id, inp, out, bias)
        })
    }

    /// Builds the model: embeddings, norms and head from `src`; each decoder linear layer from
    /// `make_linear(id, in_features, out_features, has_bias)`.
    pub fn assemble(
        config: ModelConfig,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
        mut make_linear: impl FnMut(LinearId, usize, usize, bool) -> std::result::Result<Linear, ModelError>,
    ) -> std::result::Result<Self, ModelError> {
        let c = &config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let embed_name = "model.embed_tokens.weight";
        let embed = src.tensor(embed_name, &[c.vocab_size, h], table_dtype(src, embed_name, dtype, device), device)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            // Each base weight moves to the model's device as soon as it is made (NF4 as codes), so the host
            // never holds more than one layer's weight on the way to a GPU.
            let mut lin = |kind: ModuleKind, inp: usize, out: usize, bias: bool| {
                let mut linear = make_linear(LinearId::new(l, kind), inp, out, bias)?;
                linear.base = linear.base.to_device(device)?;
                Ok::<_, ModelError>(linear)
            };
            layers.push(DecoderLayer {
                input_norm: src.tensor(&format!("{p}.input_layernorm.weight"), &[h], dtype, device)?,
                q_proj: lin(ModuleKind::QProj, h, c.q_dim(), c.qkv_bias)?,
                k_proj: lin(ModuleKind::KProj, h, c.kv_dim(), c.qkv_bias)?,
                v_proj: lin(ModuleKind::VProj, h, c.kv_dim(), c.qkv_bias)?,
                o_proj: lin(ModuleKind::OProj, c.q_dim(), h, c.o_bias)?,
                post_norm: src.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h], dtype, device)?,
                gate_proj: lin(ModuleKind::GateProj, h, i, c.mlp_bias)?,
                up_proj: lin(ModuleKind::UpProj, h, i, c.mlp_bias)?,
                down_proj: lin(ModuleKind::DownProj, i, h, c.mlp_bias)?,
                attn: AttnShape {
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    window: c.sliding_window[l],
                },
            });
        }
        let norm = src.tensor("model.norm.weight", &[h], dtype, device)?;
        // Tied: the embedding is the head. A file that also carries an `lm_head.weight` of other values is
        // ambiguous (transformers 4 and vLLM use the embedding, transformers 5 the file's head): refused.
        let lm_head = if c.tie_word_embeddings {
            if src.contains("lm_head.weight") && !same_stored_bytes(src, "lm_head.weight", embed_name) {
                // Not stored alike byte for byte: compare the values (a second table, for the load only).
                let head = src.tensor("lm_head.weight", &[c.vocab_size, h], embed.dtype(), device)?;
                if !same_values(&head, &embed)? {
                    return Err(ModelError::Invalid(format!(
                        "{}: `tie_word_embeddings` is true but the checkpoint's lm_head.weight differs from model.embed_tokens.weight (transformers 4 and vLLM would use the embedding, transformers 5 the head): set tie_word_embeddings to false to use the head, or drop it from the file",
                        src.describe()
                    )));
                }
            }
            embed.clone()
        } else {
            src.tensor("lm_head.weight", &[c.vocab_size, h], table_dtype(src, "lm_head.weight", dtype, device), device)?
        };
        Ok(Model {
            inv_freq: config.rope_inv_freq(),
            config,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Geometry of a KV cache for this model.
    pub fn kv_geometry(&self, block_size: usize) -> KvGeometry {
        KvGeometry {
            layers: self.config.num_hidden_layers,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
            block_size,
        }
    }

    /// The model's shape as LoRA adapters see it.
    pub fn lora_layout(&self) -> crate::lora::peft::BaseLayout {
        self.config.lora_layout()
    }

    /// Every linear layer, in order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj])
    }

    /// The linear layer `id`.
    pub fn linear(&self, id: LinearId) -> Option<&Linear> {
        let l = self.layers.get(id.layer)?;
        Some(match id.kind {
            ModuleKind::QProj => &l.q_proj,
            ModuleKind::KProj => &l.k_proj,
            ModuleKind::VProj => &l.v_proj,
            ModuleKind::OProj => &l.o_proj,
            ModuleKind::GateProj => &l.gate_proj,
            ModuleKind::UpProj => &l.up_proj,
            ModuleKind::DownProj => &l.down_proj,
        })
    }

    /// Every named tensor that is not a decoder linear weight (embeddings, norms, head, biases), for
    /// writing checkpoints.
    pub fn other_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        // In the compute dtype, as every other tensor the checkpoint holds (see `table_dtype`).
        let table = |t: &Tensor| t.to_dtype(self.dtype);
        let mut out = vec![("model.embed_tokens.weight".to_string(), table(&self.embed)?)];
        for (l, layer) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{l}.input_layernorm.weight"), layer.input_norm.clone()));
            out.push((format!("model.layers.{l}.post_attention_layernorm.weight"), layer.post_norm.clone()));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), table(&self.lm_head)?));
        }
        Ok(out)
    }

    /// Bytes resident for the whole model (weights of every tensor; the quantized ones in NF4).
    pub fn resident_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = t(&self.embed) + t(&self.norm);
        if !self.config.tie_word_embeddings {
            total += t(&self.lm_head);
        }
        for l in &self.layers {
            total += t(&l.input_norm) + t(&l.post_norm);
        }
        for lin in self.linears() {
            total += lin.base.resident_bytes() + lin.bias.as_ref().map_or(0, t);
        }
        total
    }

    /// `(parameters, resident bytes)` of the NF4-quantized linear weights.
    pub fn nf4_footprint(&self) -> (usize, usize) {
        self.linears().filter_map(|l| l.base.nf4_footprint()).fold((0, 0), |(p, b), (np, nb)| (p + np, b + nb))
    }

    /// Parameter count (the model's logical size, whatever its storage).
    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * c.hidden_size };
        let mut n = c.vocab_size * c.hidden_size + head + c.hidden_size;
        n += c.num_hidden_layers * 2 * c.hidden_size;
        for lin in self.linears() {
            n += lin.in_features * lin.out_features + lin.bias.as_ref().map_or(0, |b| b.elem_count());
        }
        n
    }

    /// Runs the batch and returns f32 logits `[batch.logit_rows.len(), vocab]`.
    pub fn forward(&self, batch: &Batch, attn: AttentionMode, lora: &LoraRows) -> Result<Tensor> {
        let hidden = self.forward_hidden(batch, attn, lora)?;
        self.logits(&hidden, batch.logit_rows)
    }

    /// Final-norm hidden states of every row `[rows, hidden]`.
    pub fn forward_hidden(&self, batch: &Batch, attn: AttentionMode, lora: &LoraRows) -> Result<Tensor> {
        // On a GPU, the LoRA segments' tables are uploaded once for every linear of this forward.
        #[cfg(feature = "cuda")]
        let plan = match (lora, &self.device) {
            (LoraRows::Segments(segs), Device::Cuda(d)) => {
                let linears = self.layers.len() * ModuleKind::ALL.len();
                Some(crate::gpu::lora::StepPlan::new(d, batch.tokens.len(), segs, linears)?)
            }
            _ => None,
        };
        #[cfg(feature = "cuda")]
        let device_rows = plan.as_ref().map(LoraRows::Device);
        #[cfg(feature = "cuda")]
        let lora = device_rows.as_ref().unwrap_or(lora);
        let cache = match attn {
            AttentionMode::Dense { differentiable } => {
                let (layers, mut x, mut h) = self.dense_layers(batch, differentiable)?;
                for l in 0..layers.len() {
                    (x, h) = layers.run(l, &x, &h, lora)?;
                }
                return Ok(h);
            }
            AttentionMode::Paged(cache) => cache,
        };
        let (x, positions) = self.embed_rows(batch)?;
        let rows = positions.len();
        // The CPU paged path ropes host slices in place, the GPU's kernels rope as they write keys and read
        // queries.
        let (cos, sin) = rope_tables(&positions, &self.inv_freq);
        let paged = paged_seqs(batch);
        for s in &paged {
            let need = (s.past + s.len).div_ceil(cache.geometry().block_size);
            if s.blocks.len() < need {
                candle_core::bail!("sequence has {} KV blocks, needs {need}", s.blocks.len())
            }
        }
        // The GPU's attention tables: uploaded once, used by every layer.
        #[cfg(feature = "cuda")]
        let step_tables = match &self.device {
            Device::Cuda(d) => {
                let rope = (&cos[..], &sin[..], self.inv_freq.len());
                Some(crate::gpu::attention::StepTables::upload(d, &paged, cache.geometry().block_size, rope)?)
            }
            _ => None,
        };
        let (mut x, mut h) = self.first_norm(x, false)?;
        for l in 0..self.layers.len() {
            let a = &self.layers[l].attn;
            let attend = |q: &Tensor, k: &Tensor, v: &Tensor| match cache.layer(l) {
                LayerArenas::Host(kv) => {
                    let mut qv = with_f32(q, |s| s.to_vec())?;
                    let mut kv_rows = with_f32(k, |s| s.to_vec())?;
                    let vv = with_f32(v, |s| s.to_vec())?;
                    rope_in_place(&mut qv, a.heads, a.head_dim, &cos, &sin);
                    rope_in_place(&mut kv_rows, a.kv_heads, a.head_dim, &cos, &sin);
                    let out = paged_attention(&qv, &kv_rows, &vv, &paged, kv, a);
                    tensor_from_f32(out, &[rows, a.heads * a.head_dim], self.dtype, &self.device)
                }
                #[cfg(feature = "cuda")]
                LayerArenas::Cuda(kv) => {
                    let step = step_tables.as_ref().expect("uploaded for a paged GPU forward");
                    crate::gpu::attention::paged_attention(q, k, v, step, kv, a)
                }
            };
            (x, h) = self.layer(l, &x, &h, lora, false, attend)?;
        }
        Ok(h)
    }

    /// The cacheless forward taken apart, for training with activation checkpointing (a layer run again from
    /// its saved input during the backward): the rows entering layer 0 (the residual stream and its normed
    /// copy) and what runs one layer. [`Model::forward_hidden`] in [`AttentionMode::Dense`] is exactly this,
    /// layer after layer.
    pub fn dense_layers(&self, batch: &Batch, differentiable: bool) -> Result<(DenseLayers<'_>, Tensor, Tensor)> {
        let (x, positions) = self.embed_rows(batch)?;
        let (cos, sin) = rope_tables(&positions, &self.inv_freq);
        let (rows, half) = (positions.len(), self.inv_freq.len());
        let cos = Tensor::from_vec(cos, (rows, half), &self.device)?;
        let sin = Tensor::from_vec(sin, (rows, half), &self.device)?;
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        for s in paged_seqs(batch) {
            if s.past != 0 {
                candle_core::bail!("dense attention has no cache: sequence past must be 0")
            }
            seqs.push((s.row, s.len));
        }
        let (x, h) = self.first_norm(x, differentiable)?;
        Ok((DenseLayers { model: self, cos, sin, seqs, differentiable }, x, h))
    }

    /// The embedded rows of `batch` and each row's position.
    fn embed_rows(&self, batch: &Batch) -> Result<(Tensor, Vec<usize>)> {
        let rows = batch.tokens.len();
        let total: usize = batch.seqs.iter().map(|s| s.len).sum();
        if total != rows {
            candle_core::bail!("batch has {rows} tokens but its sequences cover {total}")
        }
        let ids = Tensor::from_slice(batch.tokens, rows, &self.device)?;
        let x = self.embed.index_select(&ids, 0)?.to_dtype(self.dtype)?;
        let positions: Vec<usize> = batch.seqs.iter().flat_map(|s| s.past..s.past + s.len).collect();
        Ok((x, positions))
    }

    /// `x` and `x` normed for what reads it first: layer 0's attention (the final norm with no layers).
    fn first_norm(&self, x: Tensor, differentiable: bool) -> Result<(Tensor, Tensor)> {
        let first_norm = self.layers.first().map_or(&self.norm, |l| &l.input_norm);
        let h = rms_norm(&x, first_norm, self.config.rms_norm_eps, differentiable)?;
        Ok((x, h))
    }

    /// Decoder layer `l`: `x` is the residual stream entering it and `h` that normed by its input norm; returns
    /// the stream leaving it and that normed for what reads it next (the next layer, or the final norm after the
    /// last). Each residual add is fused with the norm after it. `attend` maps the projected q, k, v (before
    /// RoPE) to the attention output.
    fn layer(
        &self,
        l: usize,
        x: &Tensor,
        h: &Tensor,
        lora: &LoraRows,
        differentiable: bool,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[l];
        let eps = self.config.rms_norm_eps;
        let q = layer.q_proj.forward(h, lora, differentiable)?;
        let k = layer.k_proj.forward(h, lora, differentiable)?;
        let v = layer.v_proj.forward(h, lora, differentiable)?;
        let attn_out = layer.o_proj.forward(&attend(&q, &k, &v)?, lora, differentiable)?;
        let (x, h) = add_norm(x, &attn_out, &layer.post_norm, eps, differentiable)?;
        let gate = layer.gate_proj.forward(&h, lora, differentiable)?;
        let up = layer.up_proj.forward(&h, lora, differentiable)?;
        let act = swiglu(&gate, &up, differentiable)?;
        let mlp_out = layer.down_proj.forward(&act, lora, differentiable)?;
        let next_norm = self.layers.get(l + 1).map_or(&self.norm, |n| &n.input_norm);
        add_norm(&x, &mlp_out, next_norm, eps, differentiable)
    }

    /// LM head over the chosen rows of the final hidden states → f32 logits.
    pub fn logits(&self, hidden: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let (n, _) = hidden.dims2()?;
        let selected = if rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r) {
            hidden.clone()
        } else {
            let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &self.device)?;
            hidden.index_select(&idx, 0)?
        };
        head_product(&selected, &self.lm_head)?.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A bf16 head, widened a slice at a time (here 3 rows, the last slice 1 row), gives exactly the logits of
    /// the head widened whole.
    #[test]
    fn a_narrow_head_gives_the_logits_of_its_widened_copy() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let head = Tensor::randn(0f32, 1.0, (10, 8), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let want = x.matmul(&head.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
        for slice_elems in [3 * 8, 8, 1 << 20] {
            let got = head_product_in_slices(&x, &head, slice_elems).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "slices of {slice_elems} elements");
        }
    }

    /// With `tie_word_embeddings` the embedding is the head; a file that also has an `lm_head.weight` of other
    /// values is refused (transformers versions disagree on it), one equal to the embedding loads; a written
    /// checkpoint has no head of its own.
    #[test]
    fn a_tied_head_is_the_embedding_and_a_different_head_beside_it_is_refused() {
        let untied = crate::model::demo::config();
        assert!(!untied.tie_word_embeddings);
        let with_head = crate::model::demo::random_weights(&untied, 3, 0.02, "t").unwrap();
        let tied = ModelConfig { tie_word_embeddings: true, ..untied.clone() };
        let opts = crate::model::LoadOptions { quant: crate::quant::QuantMode::None, ..Default::default() };
        let e = crate::model::build(tied.clone(), &with_head, &opts).err().expect("refused").to_string();
        assert!(e.contains("`tie_word_embeddings`") && e.contains("differs"), "{e}");
        let shape = [tied.vocab_size, tied.hidden_size];
        let embed = with_head.tensor("model.embed_tokens.weight", &shape, DType::F32, &Device::Cpu).unwrap();
        let equal = with_head.with("lm_head.weight", embed);
        let m = crate::model::build(tied, &equal, &opts).unwrap();
        assert!(same_values(&m.lm_head, &m.embed).unwrap(), "the head is not the embedding");
        assert!(m.other_tensors().unwrap().iter().all(|(n, _)| n != "lm_head.weight"));
    }

    /// The byte comparison a tied head takes first: equal only for the same dtype, shape and bytes; a source
    /// without a file layout (in memory) never compares equal this way (the values are compared instead).
    #[test]
    fn stored_bytes_are_equal_only_for_the_same_dtype_shape_and_bytes() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
        let mut one_bit = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        one_bit[11] = f32::from_bits(one_bit[11].to_bits() + 1);
        let tensors: HashMap<String, Tensor> = [
            ("a", t.clone()),
            ("same", t.copy().unwrap()),
            ("one-bit", Tensor::from_vec(one_bit, (3, 4), &dev).unwrap()),
            ("reshaped", t.reshape((4, 3)).unwrap()),
            ("f16", t.to_dtype(DType::F16).unwrap()),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let files = crate::model::weights::SafetensorsFiles::open_files(&[path]).unwrap();
        assert!(same_stored_bytes(&files, "a", "same"));
        for other in ["one-bit", "reshaped", "f16", "missing"] {
            assert!(!same_stored_bytes(&files, "a", other), "{other}");
        }
        let memory = super::super::weights::InMemoryWeights::new("m", tensors);
        assert!(!same_stored_bytes(&memory, "a", "same"));
    }

    #[test]
    fn tables_keep_the_compute_dtype_on_the_cpu() {
        let bf16 = Tensor::zeros((2, 2), DType::BF16, &Device::Cpu).unwrap();
        let src = super::super::weights::InMemoryWeights::new("t", [("e".to_string(), bf16)].into());
        assert_eq!(src.stored_dtype("e"), Some(DType::BF16));
        assert_eq!(table_dtype(&src, "e", DType::F32, &Device::Cpu), DType::F32);
        assert_eq!(table_dtype(&src, "missing", DType::F32, &Device::Cpu), DType::F32);
    }
}
