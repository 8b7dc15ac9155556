//! Guides against a plain oracle: a token is allowed exactly when some text of the language starts with the
//! output so far and its bytes (checked by walking the token's bytes one by one, and a regex for wholeness).

use std::sync::Arc;

use regex_automata::meta::Regex;

use super::*;
use crate::model::Tokenizer;
use crate::rng::Rng;

fn fixture_tokenizer(name: &str) -> Arc<Tokenizer> {
    let dir = format!("{}/tests/fixtures/{name}/model", env!("CARGO_MANIFEST_DIR"));
    Arc::new(Tokenizer::from_dir(std::path::Path::new(&dir)).unwrap())
}

/// The allowed set, token by token: every byte's state not dead.
fn naive(g: &Guide, state: StateID) -> Vec<u32> {
    let table = g.bytes();
    (0..table.len() as u32)
        .filter(|&id| {
            let Some(b) = table.get(id).filter(|b| !b.is_empty()) else { return false };
            let mut s = state;
            b.iter().all(|&x| {
                s = g.dfa.next_state(s, x);
                !g.dead(s)
            })
        })
        .collect()
}

/// Random walks through allowed tokens: every state's mask equals the token-by-token walk's, the text so far
/// is whole exactly when the regex matches it, and each walk's text, finished byte by byte through live
/// states, is a match of the regex (a second engine: allowed tokens are never a dead end).
#[test]
fn masks_equal_the_token_by_token_walk() {
    let regexes = [
        r"[a-z]+@[a-z]+\.(com|org)",
        r"(re|lu)+ x?",
        "yes|no|maybe",
        r"\{[ ]?\x22a\x22:[ ]?[0-9]{1,3}[ ]?\}",
        r"héllo (wörld|there)",
    ];
    for name in ["qwen2", "llama"] {
        let tok = fixture_tokenizer(name);
        for re in regexes {
            let g = Guide::compile(&Constraint::Regex(re.into()), tok.clone()).unwrap();
            let whole = Regex::new(&format!("^(?:{re})$")).unwrap();
            let mut rng = Rng::new(7);
            for _walk in 0..20 {
                let (mut s, mut text) = (g.start(), Vec::<u8>::new());
                for _ in 0..24 {
                    let m = g.mask(s);
                    let ids: Vec<u32> = m.ids().collect();
                    assert_eq!(ids, naive(&g, s), "{name} {re:?} after {:?}", String::from_utf8_lossy(&text));
                    assert_eq!(m.whole, whole.is_match(&text), "{re:?} {:?}", String::from_utf8_lossy(&text));
                    if ids.is_empty() {
                        assert!(m.whole, "a dead end that is not a whole text: {:?}", String::from_utf8_lossy(&text));
                        break;
                    }
                    let id = ids[rng.next_u64() as usize % ids.len()];
                    text.extend_from_slice(g.bytes().get(id).unwrap());
                    s = g.advance(s, id);
                }
                let mut done = text.clone();
                while !g.mask(s).whole {
                    let b = (0..=255u8).find(|&b| !g.dead(g.dfa.next_state(s, b))).expect("a live state goes on");
                    done.push(b);
                    s = g.dfa.next_state(s, b);
                }
                assert!(whole.is_match(&done), "{re:?}: {:?} does not finish", String::from_utf8_lossy(&text));
            }
        }
    }
}

#[test]
fn choices_spell_exactly_their_texts() {
    let tok = fixture_tokenizer("qwen2");
    let g = Guide::compile(&Constraint::Choice(vec!["a.b".into(), "a+".into(), "relu".into()]), tok.clone()).unwrap();
    let spell = |text: &str| {
        let ids = tok.encode_with(text, false).unwrap();
        let mut s = g.start();
        for &id in &ids {
            if !g.mask(s).allows(id) {
                return None;
            }
            s = g.advance(s, id);
        }
        Some(g.mask(s).whole)
    };
    assert_eq!((spell("a.b"), spell("a+"), spell("relu")), (Some(true), Some(true), Some(true)));
    assert_eq!(spell("a"), Some(false), "a prefix is not whole");
    assert_eq!((spell("axb"), spell("aa")), (None, None), "the regex syntax in a choice is literal");
}

#[test]
fn bad_constraints_are_refused_with_a_reason() {
    let tok = fixture_tokenizer("qwen2");
    let err = |c: Constraint| Guide::compile(&c, tok.clone()).unwrap_err();
    assert!(err(Constraint::Regex("(a".into())).starts_with("invalid regex"));
    assert!(err(Constraint::Regex("a(?=b)".into())).starts_with("invalid regex"), "no look-around");
    assert_eq!(err(Constraint::Regex(r"[^\x00-\x{10FFFF}]".into())), "no text matches it");
    assert_eq!(err(Constraint::Choice(vec![])), "no choices given");
    assert!(err(Constraint::Regex("[ab]*a[ab]{24}".into())).contains("larger than 64 MiB"));
    assert!(err(Constraint::JsonSchema(r#"{"type": "number", "maximum": 9}"#.into())).contains("`maximum`"));
}

/// A schema with every kind of member compiles for a real tokenizer, and so does any JSON object; the
/// empty regex allows nothing but ending the output.
#[test]
fn json_constraints_compile() {
    let tok = fixture_tokenizer("llama");
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"},
        "score": {"type": ["number", "null"]}, "meta": {}}, "required": ["name"]}"#;
    for c in [Constraint::JsonSchema(schema.into()), Constraint::JsonObject] {
        let g = Guide::compile(&c, tok.clone()).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let open: Vec<u32> = g.mask(g.start()).ids().collect();
        assert!(open.iter().all(|&id| g.bytes().get(id).unwrap().starts_with(b"{")), "{c:?} starts with {{");
    }
    let empty = Guide::compile(&Constraint::Regex(String::new()), tok).unwrap();
    let m = empty.mask(empty.start());
    assert!(m.whole && m.is_empty());
}

#[test]
fn guides_are_kept_and_reused() {
    let guides = Guides::new(fixture_tokenizer("qwen2"));
    let a = guides.get(&Constraint::Regex("a+".into())).unwrap();
    let b = guides.get(&Constraint::Regex("b+".into())).unwrap();
    assert!(Arc::ptr_eq(&a, &guides.get(&Constraint::Regex("a+".into())).unwrap()));
    assert!(!Arc::ptr_eq(&a, &b));
    assert!(guides.get(&Constraint::Regex("(".into())).is_err());
    // Requests racing for a new constraint share one compilation.
    let racing: Vec<Arc<Guide>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..4).map(|_| s.spawn(|| guides.get(&Constraint::Regex("c+".into())).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(racing.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
}

/// Both ways of applying a mask (few allowed, most allowed) give the logits of exactly the allowed tokens,
/// −∞ past the tokenizer's vocabulary, and the ending tokens only where the text is whole.
#[test]
fn applied_masks_keep_exactly_the_allowed_logits() {
    let tok = fixture_tokenizer("qwen2");
    let vocab = tok.token_bytes().unwrap().len();
    let logits: Vec<f32> = (0..vocab + 70).map(|i| i as f32 * 0.5 - 3.0).collect();
    for re in ["[0-9]+", r"[^\x00-\x08]*"] {
        let g = Guide::compile(&Constraint::Regex(re.into()), tok.clone()).unwrap();
        let mut s = g.start();
        for step in 0..3 {
            let m = g.mask(s);
            let out = m.apply(&logits, &[1, vocab as u32 + 5]);
            for (id, (&o, &l)) in out.iter().zip(&logits).enumerate() {
                let ending = id == 1 || id == vocab + 5;
                let want = if m.allows(id as u32) || (ending && m.whole) { l } else { f32::NEG_INFINITY };
                assert_eq!(o, want, "{re:?} step {step} token {id}");
            }
            s = g.advance(s, m.ids().next().unwrap());
        }
    }
}
