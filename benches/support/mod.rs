//! Helpers shared by the serving benchmarks (`loadgen`, `gpu_serve`): one streaming Generate call timed into
//! an [`Outcome`] (time to first token, inter-token gaps, tokens, errors), percentiles, and random rank-16
//! q,k,v,o adapters written to disk for a synthetic shape.
#![allow(dead_code)]

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use loraserve::lora::peft::{write_dir, AdapterMeta};
use loraserve::lora::synthetic::{random_adapter, ATTENTION};
use loraserve::model::synthetic;
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::GenerateRequest;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// What a set of streaming requests did.
#[derive(Default)]
pub struct Outcome {
    pub requests: usize,
    pub tokens: usize,
    pub errors: Vec<String>,
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
    pub seconds: f64,
    pub prompt_tokens: u32,
}

impl Outcome {
    /// Adds another client's figures (not its `seconds`: the caller times the whole set).
    pub fn merge(&mut self, o: Outcome) {
        self.requests += o.requests;
        self.tokens += o.tokens;
        self.errors.extend(o.errors);
        self.ttft.extend(o.ttft);
        self.itl.extend(o.itl);
        self.prompt_tokens = self.prompt_tokens.max(o.prompt_tokens);
    }
}

/// Sends `req` as GenerateStream on `client` and records its timings into `out`.
pub async fn stream(client: &mut LoraServeClient<Channel>, req: GenerateRequest, out: &mut Outcome) {
    out.requests += 1;
    let sent = Instant::now();
    let mut stream = match client.generate_stream(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            out.errors.push(s.message().to_string());
            return;
        }
    };
    let mut last: Option<Instant> = None;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(m) => {
                out.prompt_tokens = out.prompt_tokens.max(m.prompt_tokens);
                if m.token_ids.is_empty() {
                    continue;
                }
                let now = Instant::now();
                match last {
                    None => out.ttft.push(now.duration_since(sent).as_secs_f64()),
                    Some(p) => out.itl.push(now.duration_since(p).as_secs_f64()),
                }
                last = Some(now);
                out.tokens += m.token_ids.len();
            }
            Err(s) => {
                out.errors.push(s.message().to_string());
                break;
            }
        }
    }
}

/// The `p` quantile (0..=1) of `v`, NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Writes `n` random rank-16 q,k,v,o adapters (`bench/a00`, ...) for `shape` under `root`; returns their ids.
pub fn write_adapters(root: &Path, shape: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let layout = synthetic::shape_config(shape).ok_or_else(|| anyhow::anyhow!("unknown shape {shape}"))?.lora_layout();
    (0..n)
        .map(|i| {
            let id = format!("bench/a{i:02}");
            let w = random_adapter(&layout, 16, &ATTENTION, 1000 + i as u64, &Device::Cpu)?;
            let meta = AdapterMeta {
                r: 16,
                lora_alpha: 32.0,
                use_rslora: false,
                lora_dropout: 0.0,
                base_model_name_or_path: shape.into(),
                dtype: DType::BF16,
            };
            write_dir(&root.join(&id), &w, &meta)?;
            Ok(id)
        })
        .collect()
}
