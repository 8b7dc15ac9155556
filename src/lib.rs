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
//! | [`input`] | reading the files found in model, adapter and checkpoint folders: regular files only |

pub mod cli;
pub mod cpu_linear;
pub mod engine;
pub mod gpu;
pub mod input;
pub mod lora;
pub mod model;
pub mod output;
pub mod quant;
pub mod rng;
pub mod server;
pub mod telemetry;
pub mod tensor_io;
pub mod train;

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set: for gRPC
/// statuses and the errors a request is failed with (a backtrace belongs in the server's log, not in a
/// client's status message).
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => candle_message(inner),
        Error::Context { inner, context } => format!("{context}\n{}", candle_message(inner)),
        Error::WithPath { inner, path } => format!("path: {path:?} {}", candle_message(inner)),
        // Printed by candle with Debug forms, the wrapped error first; a wrapped candle error may carry a
        // backtrace of its own.
        Error::WrappedContext { wrapped, context } => {
            let inner = wrapped.downcast_ref::<Error>().map_or_else(|| wrapped.to_string(), candle_message);
            format!("{inner}\n{context}")
        }
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Error;

    #[test]
    fn candle_messages_leave_the_backtrace_out() {
        let with_bt = |e: Error| Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = with_bt(Error::Msg("shape mismatch".into()));
        assert!(e.to_string().starts_with("shape mismatch\n"), "candle prints the backtrace: {e}");
        assert_eq!(super::candle_message(&e), "shape mismatch");
        let e = with_bt(Error::Msg("no such tensor".into())).with_path("/m/x.safetensors").context("loading");
        assert_eq!(super::candle_message(&e), "loading\npath: \"/m/x.safetensors\" no such tensor");
        let e = Error::WrappedContext { wrapped: "disk full".into(), context: "saving".into() };
        assert_eq!(super::candle_message(&e), "disk full\nsaving");
        let e =
            Error::WrappedContext { wrapped: Box::new(with_bt(Error::Msg("bad".into()))), context: "saving".into() };
        assert_eq!(super::candle_message(&e), "bad\nsaving");
    }
}
