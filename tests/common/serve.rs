//! The in-process server the gRPC tests talk to: the fixture llama (dense f32 on the CPU) serving an
//! adapters folder on port 0, and request builders.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};
use loraserve::engine::EngineConfig;
use loraserve::lora::cache::CacheConfig;
use loraserve::model::{LoadOptions, ModelSpec};
use loraserve::quant::QuantMode;
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::GenerateRequest;
use loraserve::server::{self, service::Limits, ServeConfig, ServerHandle};
use tonic::transport::Channel;

use super::fixture;

/// Serves `adapters` with the fixture llama: small batches and KV blocks, so tests reach their limits.
pub fn config(adapters: PathBuf) -> ServeConfig {
    ServeConfig {
        model: ModelSpec::Dir(fixture("llama/model")),
        load: LoadOptions { dtype: DType::F32, quant: QuantMode::None, device: Device::Cpu },
        chat_template: None,
        generation_config: true,
        adapters,
        cache: CacheConfig { device_bytes: 64 << 20, host_bytes: 64 << 20, default_wait: Duration::from_millis(300) },
        engine: EngineConfig {
            max_batch_rows: 32,
            max_batch_tokens: 256,
            block_size: 4,
            kv_cache_bytes: 8 << 20,
            queue_capacity: 256,
            prefix_caching: true,
        },
        limits: Limits { max_new_tokens_cap: 256, ..Default::default() },
        preload: vec![],
        api_keys: None,
        tls: None,
        max_request_bytes: 64 << 10,
        drain_timeout: Duration::from_secs(10),
        template_worker: Some(env!("CARGO_BIN_EXE_server").into()),
    }
}

pub async fn start(cfg: ServeConfig) -> (ServerHandle, LoraServeClient<Channel>) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = server::start(cfg, grpc, metrics).await.unwrap();
    assert!(h.ready().await, "server failed to load");
    let client = LoraServeClient::connect(format!("http://{}", h.grpc_addr)).await.unwrap();
    (h, client)
}

pub fn req(adapter: &str, prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest { adapter_id: adapter.into(), prompt: prompt.into(), max_new_tokens: n, ..Default::default() }
}

/// A conversation's turns as `(role, content)` pairs.
pub fn chat(messages: &[(&str, &str)]) -> Vec<loraserve::server::proto::ChatMessage> {
    let turn = |&(role, content): &(&str, &str)| loraserve::server::proto::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    messages.iter().map(turn).collect()
}
