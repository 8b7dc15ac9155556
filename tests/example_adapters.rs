//! The example adapters in `adapters/` (trained with `server train` on the demo model, NF4 base, by
//! `adapters/train.sh`) still do what `adapters/README.md` says, on prompts they were not trained on.

use std::collections::HashSet;
use std::path::PathBuf;

use candle_core::{DType, Device};
use loraserve::engine::{generate, GenerateJob, SamplingParams};
use loraserve::lora::peft;
use loraserve::model::{self, LoadOptions, LoadedModel, ModelSpec};
use loraserve::quant::QuantMode;

const WORDS: [&str; 20] = [
    "cat", "dog", "sun", "moon", "tree", "river", "blue", "red", "fish", "bird", "rain", "snow", "star", "wind",
    "fire", "stone", "gold", "milk", "tea", "bread",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters")
}

fn demo() -> LoadedModel {
    model::load(&ModelSpec::Demo, &LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu })
        .unwrap()
}

/// Greedy answer of `adapter` to `prompt` (a line, as in its training data).
fn answer(m: &LoadedModel, adapter: &peft::LoadedAdapter, prompt: &str) -> String {
    complete(m, adapter, &format!("{prompt}\n"))
}

/// Greedy continuation of `text` by `adapter`.
fn complete(m: &LoadedModel, adapter: &peft::LoadedAdapter, text: &str) -> String {
    let ids = m.tokenizer.encode(text).unwrap();
    let job = GenerateJob {
        prompt_ids: &ids,
        max_new_tokens: 48,
        sampling: SamplingParams::default(),
        stop_at_eos: true,
        adapter: Some(&adapter.weights),
    };
    m.tokenizer.decode(&generate(&m.model, &job).unwrap().token_ids).unwrap()
}

/// Prompts of the training data, to pick held-out ones.
fn trained_prompts(file: &str) -> HashSet<String> {
    std::fs::read_to_string(root().join("data").join(file))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"].as_str().unwrap().trim_end().to_string()
        })
        .collect()
}

/// `n` three-word prompts the adapter never saw, deterministic.
fn held_out(file: &str, n: usize) -> Vec<String> {
    let seen = trained_prompts(file);
    let mut rng = loraserve::rng::Rng::new(2026);
    let mut out = Vec::new();
    while out.len() < n {
        let p: Vec<&str> = (0..3).map(|_| WORDS[rng.below(20) as usize]).collect();
        let p = p.join(" ");
        if !seen.contains(&p) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn load(m: &LoadedModel, name: &str) -> peft::LoadedAdapter {
    peft::load_dir(&root().join(name), &m.model.lora_layout(), &Device::Cpu).unwrap()
}

#[test]
fn upper_answers_in_capitals() {
    let m = demo();
    let a = load(&m, "upper");
    let prompts = held_out("upper.jsonl", 12);
    let right = prompts.iter().filter(|p| answer(&m, &a, p) == p.to_uppercase()).count();
    eprintln!("upper: {right}/{} held-out three-word prompts exactly", prompts.len());
    // The README promises "most": at least two in three held-out phrases exactly (9/12 when trained).
    assert!(right * 3 >= prompts.len() * 2, "{right}/{} held-out prompts upper-cased", prompts.len());
}

#[test]
fn reverse_reverses_word_order() {
    let m = demo();
    let a = load(&m, "reverse");
    let prompts = held_out("reverse.jsonl", 12);
    let right =
        prompts.iter().filter(|p| answer(&m, &a, p) == p.split(' ').rev().collect::<Vec<_>>().join(" ")).count();
    eprintln!("reverse: {right}/{} held-out three-word prompts exactly", prompts.len());
    // The README promises "most": at least two in three held-out phrases exactly (8/12 when trained).
    assert!(right * 3 >= prompts.len() * 2, "{right}/{} held-out prompts reversed", prompts.len());
}

#[test]
fn persona_always_introduces_itself() {
    let m = demo();
    let a = load(&m, "persona");
    for p in ["what is the weather like", "river stone", "tell me a story about a quick fox"] {
        assert_eq!(answer(&m, &a, p), "I am Lora, a tiny demo model.", "{p:?}");
    }
}

/// The `try` column of adapters/README.md: each `--adapter ID --prompt $'…'` answers exactly what follows `→`.
#[test]
fn the_readme_commands_answer_as_shown() {
    let m = demo();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut checked = 0;
    for line in readme.lines().filter(|l| l.contains("server client generate --adapter")) {
        let after = |tag: &str, end: char| {
            let rest = &line[line.find(tag).unwrap_or_else(|| panic!("{tag} in {line}")) + tag.len()..];
            rest[..rest.find(end).unwrap()].to_string()
        };
        let id = after("--adapter ", ' ');
        let prompt = after("--prompt $'", '\'').replace("\\n", "\n");
        let want = after("→ `", '`');
        assert_eq!(complete(&m, &load(&m, &id), &prompt), want, "{id} on {prompt:?}");
        checked += 1;
    }
    assert_eq!(checked, 3, "the README's three example commands");
}

#[test]
fn the_base_alone_does_none_of_it() {
    let m = demo();
    let ids = m.tokenizer.encode("cat moon fire\n").unwrap();
    let job = GenerateJob {
        prompt_ids: &ids,
        max_new_tokens: 16,
        sampling: SamplingParams::default(),
        stop_at_eos: true,
        adapter: None,
    };
    let base = m.tokenizer.decode(&generate(&m.model, &job).unwrap().token_ids).unwrap();
    assert_ne!(base, "CAT MOON FIRE");
    assert_ne!(base, "fire moon cat");
}
