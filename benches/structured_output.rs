//! Structured output's cost on a Llama-3-sized vocabulary: a byte-level BPE tokenizer of 128,256 tokens
//! (the 256 bytes, then words of 2 to 10 letters, half with a leading space, and JSON punctuation; made here
//! from the project's PRNG, since no real tokenizer may be downloaded). For each constraint: the compile time
//! (schema → regex → DFA → live states → the first allowed set); then a 64-token greedy walk over random
//! logits through the sampler, per pick: the first walk works out each DFA state's allowed set (started on
//! the thread pool as the token before is picked, overlapping the next row's logits as it would the next
//! forward), the second finds them kept; against the same picks unconstrained; and the allowed set of each
//! state of that walk worked out alone, in a guide compiled afresh.
//!
//! `cargo bench --bench structured_output`

use std::sync::Arc;
use std::time::Instant;

use loraserve::engine::structured::{Constraint, Guides};
use loraserve::engine::{Sampler, SamplingParams};
use loraserve::model::synthetic::tokenizer_json;
use loraserve::model::Tokenizer;
use loraserve::rng::Rng;

const VOCAB: usize = 128_256;
const STEPS: usize = 64;

/// Milliseconds per pick over a greedy walk of `STEPS` tokens on random logits (the same logits each walk),
/// the text it made, and the slowest pick.
fn walk(params: &SamplingParams, eos: u32, tok: &Tokenizer) -> (f64, f64, String, Vec<u32>) {
    let mut rng = Rng::new(11);
    let mut sampler = Sampler::new(params.clone(), 0, &[], &[eos]);
    let mut ids = Vec::new();
    let (mut total, mut worst) = (0.0f64, 0.0f64);
    for _ in 0..STEPS {
        let logits: Vec<f32> = (0..VOCAB).map(|_| rng.normal() as f32).collect();
        let t = Instant::now();
        let id = sampler.sample(&logits).expect("random logits leave a token to pick");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        total += ms;
        worst = worst.max(ms);
        if id == eos {
            break;
        }
        ids.push(id);
    }
    let n = ids.len().max(1) as f64;
    (total / n, worst, tok.decode(&ids).unwrap(), ids)
}

fn main() {
    let (json, eos) = tokenizer_json(VOCAB, 0x70_4E5);
    let tok = Arc::new(Tokenizer::from_parts(json.as_bytes(), "synthetic/tokenizer.json", None).unwrap());
    let t = Instant::now();
    let table = tok.token_bytes().unwrap().len();
    println!("vocabulary: {table} tokens (+EOS); token bytes table built in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let schema = r#"{"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}, "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8}, "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "[0-9]{5}"}}, "required": ["city"]},
        "score": {"type": ["number", "null"]}, "kind": {"enum": ["person", "company", "other"]}},
        "required": ["name", "age", "kind"]}"#;
    let constraints = [
        ("regex (e-mail)", Constraint::Regex(r"[a-z0-9.]{1,20}@[a-z]{2,12}\.(com|org|net)".into())),
        ("choice (3)", Constraint::Choice(vec!["positive".into(), "negative".into(), "neutral".into()])),
        ("JSON Schema (8 properties)", Constraint::JsonSchema(schema.into())),
        ("any JSON object", Constraint::JsonObject),
    ];
    let plain = SamplingParams::default();
    let (base_ms, ..) = walk(&plain, eos, &tok);
    println!("\n| constraint | compile (ms) | allowed set of a new state (ms, mean / worst; states) | pick, sets worked out as picked (ms, mean / worst) | pick, sets kept (ms) | pick unconstrained (ms) | output |");
    println!("|---|---|---|---|---|---|---|");
    for (name, c) in constraints {
        let guides = Guides::new(tok.clone());
        let t = Instant::now();
        let guide = guides.get(&c).unwrap();
        let compile = t.elapsed().as_secs_f64() * 1e3;
        let params = SamplingParams { guide: Some(guide), ..SamplingParams::default() };
        let (cold, worst, text, ids) = walk(&params, eos, &tok);
        let (warm, _, again, _) = walk(&params, eos, &tok);
        assert_eq!(text, again, "the same picks");
        // The allowed sets alone, state by state along the same picks, in a guide compiled afresh.
        let fresh = Guides::new(tok.clone()).get(&c).unwrap();
        let (mut state, mut sets, mut seen) = (fresh.start(), Vec::new(), std::collections::HashSet::new());
        for &id in &ids {
            if seen.insert(state) {
                let t = Instant::now();
                fresh.mask(state);
                sets.push(t.elapsed().as_secs_f64() * 1e3);
            }
            state = fresh.advance(state, id);
        }
        let set_mean = sets.iter().sum::<f64>() / sets.len().max(1) as f64;
        let set_worst = sets.iter().copied().fold(0.0, f64::max);
        let shown: String = text.chars().take(40).collect();
        println!(
            "| {name} | {compile:.1} | {set_mean:.2} / {set_worst:.1}; {} | {cold:.2} / {worst:.1} | {warm:.3} | {base_ms:.3} | {shown:?} |",
            sets.len()
        );
    }
}
