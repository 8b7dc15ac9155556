//! Helpers shared by the integration tests: fixture paths, expected outputs and running their cases,
//! tolerances, copying adapter folders, scraping a server's `/metrics`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod serve;
pub mod wire;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

#[derive(Deserialize, Debug, Clone)]
pub struct Case {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy_new_ids: Vec<u32>,
    /// Absent from the NF4 checkpoint's expected outputs.
    pub greedy_text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Expected {
    #[serde(default)]
    pub prompts: Vec<String>,
    pub results: std::collections::BTreeMap<String, Vec<Case>>,
}

pub fn expected(model_dir: &str) -> Expected {
    let p = fixture(model_dir).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A case of `llama-penalties/expected.json` (greedy tokens under the sampling penalties) or of
/// `llama-logprobs/expected.json` (which sets no frequency or presence penalty).
#[derive(Deserialize, Debug, Clone)]
pub struct PenaltyCase {
    pub adapter: Option<String>,
    pub repetition_penalty: f32,
    #[serde(default)]
    pub frequency_penalty: f32,
    #[serde(default)]
    pub presence_penalty: f32,
    pub results: Vec<PenaltyResult>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct PenaltyResult {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    /// `llama-logprobs/expected.json` only: each new token's log-probability under the model.
    pub logprobs: Option<Vec<f32>>,
    /// `llama-logprobs/expected.json` only: at each step, the most likely tokens (most likely first) ...
    pub top_ids: Option<Vec<Vec<u32>>>,
    /// ... and their log-probabilities.
    pub top_logprobs: Option<Vec<Vec<f32>>>,
    /// `llama-logprobs/expected.json` only: each prompt token's log-probability after the first ...
    pub prompt_logprobs: Option<Vec<f32>>,
    /// ... the most likely tokens at each of those positions ...
    pub prompt_top_ids: Option<Vec<Vec<u32>>>,
    /// ... and their log-probabilities.
    pub prompt_top_logprobs: Option<Vec<Vec<f32>>>,
}

/// The cases of `tests/fixtures/<dir>/expected.json` by name (`llama-penalties`, `llama-logprobs`).
pub fn penalty_cases(dir: &str) -> std::collections::BTreeMap<String, PenaltyCase> {
    #[derive(Deserialize)]
    struct File {
        cases: std::collections::BTreeMap<String, PenaltyCase>,
    }
    let p = fixture(dir).join("expected.json");
    serde_json::from_str::<File>(&std::fs::read_to_string(&p).unwrap()).unwrap().cases
}

/// Runs a reference case as the reference stack did: the prompt's tokens (checked against the case's), then
/// `greedy_new_ids.len()` greedy tokens with no stop at EOS, with `adapter`. Returns the tokens and the run.
pub fn run_case(
    m: &loraserve::model::LoadedModel,
    c: &Case,
    adapter: Option<&loraserve::lora::LoraWeights>,
    what: &str,
) -> (Vec<u32>, loraserve::engine::Generated) {
    use loraserve::engine::{generate, GenerateJob, SamplingParams};
    let ids = m.tokenizer.encode(&c.prompt).unwrap();
    assert_eq!(ids, c.input_ids, "{what}: token ids of {:?}", c.prompt);
    let job = GenerateJob {
        prompt_ids: &ids,
        max_new_tokens: c.greedy_new_ids.len(),
        sampling: SamplingParams::default(),
        stop_at_eos: false,
        adapter,
    };
    let out = generate(&m.model, &job).unwrap();
    (ids, out)
}

/// ‖a − b‖₂ / ‖b‖₂.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Copies the files of `src` into `dst` (created if missing).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Rewrites the JSON header of the safetensors file at `path` with `edit`, keeping its data as it is.
pub fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// The Prometheus text exposition served on `addr`: `GET /metrics` over plain TCP (HTTP/1.0), the body.
pub async fn metrics_text(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}
