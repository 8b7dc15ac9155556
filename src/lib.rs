//! loraserve: a multi-adapter LLM inference server. One Llama-family base model stays resident (NF4 by
//! default); every request names a LoRA adapter; requests for different adapters share one forward pass.
//!
//! Layout (dependencies point one way: `server → engine → model → {quant, lora}`; `train → model, quant, lora`):
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the `server` command line and its subcommands |
//! | [`model`] | HF config/weights/tokenizer loading; the one forward; KV cache; the demo model |
//! | [`quant`] | NF4: codec, CPU kernels, bitsandbytes checkpoint layout |
//! | [`lora`] | PEFT adapters, the adapter store and cache, the batched-LoRA op |
//! | [`engine`] | requests, continuous-batching scheduler, the engine thread, sampling, streaming text |
//! | [`server`] | the gRPC service, health, reflection, auth, TLS, `/metrics`, graceful shutdown, the client |
//! | [`train`] | `server train`: data, the QLoRA loop, AdamW and schedules, checkpoints |
//! | [`telemetry`] | every metric name, description and bucket set |
//! | [`rng`] | the project's deterministic PRNG |
//! | [`gpu`] | CUDA kernels (feature `cuda`, NVRTC at run time) and their launch geometry |
//! | [`cpu_linear`] | CPU `x·Wᵀ` skeletons (decode rows / panels) and the dense linear op |
//! | [`tensor_io`] | tensor ↔ slice plumbing for the CPU kernels |

pub mod cli;
pub mod cpu_linear;
pub mod engine;
pub mod gpu;
pub mod lora;
pub mod model;
pub mod quant;
pub mod rng;
pub mod server;
pub mod telemetry;
pub mod tensor_io;
pub mod train;
