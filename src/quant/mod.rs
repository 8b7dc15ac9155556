//! NF4 base weights: QLoRA's 4-bit NormalFloat with double quantization, byte-compatible with bitsandbytes.
//!
//! - [`codebook`]: the NF4 table and bitsandbytes' signed 8-bit dynamic map.
//! - [`nf4`]: [`Nf4Weight`] — quantize, dequantize (the reference), resident size.
//! - [`matmul`]: the NF4 linear op on the CPU (reference, fused decode path, dequantized-panel path);
//!   `nf4_avx2`: the x86-64 AVX2 block decoder behind both fast paths.
//! - [`op`]: that op as candle custom ops (forward + backward) for the model and for training.
//! - [`bnb`]: the bitsandbytes checkpoint layout (load pre-quantized checkpoints, write `server quantize`).

pub mod bnb;
pub mod codebook;
pub mod matmul;
pub mod nf4;
#[cfg(target_arch = "x86_64")]
pub mod nf4_avx2;
pub mod op;

pub use nf4::{Absmax, DoubleQuant, Nf4Weight};

/// How the base model's decoder linear weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QuantMode {
    /// NF4 with double quantization (QLoRA's format), quantized at load unless the checkpoint already is (a
    /// pre-quantized checkpoint's dense layers, its `llm_int8_skip_modules`, stay dense).
    #[default]
    Nf4,
    /// Dense in the compute dtype.
    None,
}

impl std::str::FromStr for QuantMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nf4" => Ok(QuantMode::Nf4),
            "none" => Ok(QuantMode::None),
            other => Err(format!("unknown quantization `{other}` (expected nf4 or none)")),
        }
    }
}

/// Errors of the NF4 format and the bitsandbytes layout.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{0}")]
    Layout(String),
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Checkpoint { file: String, tensor: String, reason: String },
}
