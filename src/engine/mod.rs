//! The engine: everything between a validated request and its tokens.
//!
//! - [`sampler`]: greedy / temperature / top-k / top-p with a seed.
//! - [`generate`]: one request start to finish on the calling thread (`server generate`, golden tests).

pub mod generate;
pub mod sampler;

pub use generate::{generate, FinishReason, GenerateJob, Generated};
pub use sampler::{Sampler, SamplingParams};
