//! Guides against a plain oracle: a token is allowed exactly when some text of the language starts with the
//! output so far and its bytes (checked by walking the token's bytes one by one, and a regex for wholeness).

use std::sync::Arc;

use regex_automata::meta::Regex;

use super::Whole;
use super::*;
use crate::model::Tokenizer;
use crate::rng::Rng;

fn fixture_tokenizer(name: &str) -> Arc<Tokenizer> {
    let dir = format!("{}/tests/fixtures/{name}/model", env!("CARGO_MANIFEST_DIR"));
    Arc::new(Tokenizer::from_dir(std::path::Path::new(&dir)).unwrap())
}

/// The allowed set, token by token: every byte's state not dead.
fn naive(g: &Guide, at: Cursor) -> Vec<u32> {
    let table = g.bytes();
    (0..table.len() as u32)
        .filter(|&id| {
            let Some(b) = g.spelled(at, id).filter(|_| table.get(id).is_some_and(|b| !b.is_empty())) else {
                return false;
            };
            let mut s = at.state;
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
                let mut s = s.state;
                while !g.dfa.is_match_state(g.dfa.next_eoi_state(s)) {
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
    // Every choice is whole, one that starts another included, and the empty one; so is every match of a
    // regex, not only the leftmost-first one.
    let g = Guide::compile(&Constraint::Choice(vec!["".into(), "a".into(), "ab".into(), "re".into()]), tok.clone());
    let g = g.unwrap();
    let whole = |text: &str| {
        let s = text.bytes().fold(g.start().state, |s, b| g.dfa.next_state(s, b));
        g.mask(Cursor { state: s, first: false }).whole
    };
    assert!(whole("") && whole("a") && whole("ab") && whole("re") && !whole("r") && !whole("abc"));
    for (re, texts) in [("1|10", &["1", "10"][..]), ("a+?", &["a", "aaa"]), ("(x|xy)z?", &["x", "xy", "xz", "xyz"])] {
        for t in texts {
            assert!(super::Whole::new(re).is_match(t), "{re} takes {t}");
        }
    }
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
    // regex-syntax quotes the whole pattern in its messages: a long one is cut to its last line.
    let deep = format!("{}a{}", "(?:b|".repeat(400), ")".repeat(400));
    let e = err(Constraint::Regex(deep));
    assert!(e.starts_with("invalid regex") && e.contains("nest") && e.len() < 400, "{e}");
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
/// −∞ past the tokenizer's vocabulary, and the ending tokens where the text is whole, a stop token also where
/// it is allowed as text, EOS never (token 1, `"`, is text one regex allows and the other does not; 2 too).
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
            // 1 a stop token, 2 an EOS that is text (not special), vocab + 5 past the vocabulary.
            let out = m.apply(&logits, &[1, 2, vocab as u32 + 5], &[1]);
            for (id, (&o, &l)) in out.iter().zip(&logits).enumerate() {
                let ending = [1, 2, vocab + 5].contains(&id);
                let allowed = if ending { m.whole || (id == 1 && m.allows(1)) } else { m.allows(id as u32) };
                let want = if allowed { l } else { f32::NEG_INFINITY };
                assert_eq!(o, want, "{re:?} step {step} token {id}");
            }
            s = g.advance(s, m.ids().next().unwrap());
        }
    }
}

/// Eight sequences under one constraint on a 40,000-token vocabulary (several walk chunks), picking in turn
/// as the engine thread does, each pick starting the next state's allowed set on the thread pool, several
/// sequences reaching the same state in the same round: all finish (a pool job waiting on a cell another
/// job fills could hang the pool), and every pick is one the mask allowed.
#[test]
fn concurrent_prefetches_never_hang() {
    use crate::engine::{Sampler, SamplingParams};
    let (json, eos) = crate::model::synthetic::tokenizer_json(40_000, 3);
    let tok = Arc::new(Tokenizer::from_parts(json.as_bytes(), "synthetic/tokenizer.json", None).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // A fresh guide each round: each is a new race for the same states.
        for round in 0..10 {
            let guide = Arc::new(Guide::compile(&Constraint::JsonObject, tok.clone()).unwrap());
            let params = SamplingParams { guide: Some(guide.clone()), ..Default::default() };
            let mut walks: Vec<(Sampler, Cursor)> =
                (0..8).map(|i| (Sampler::new(params.clone(), i, &[], &[eos]), guide.start())).collect();
            let mut rng = Rng::new(round);
            // A few rows shared by all, made beforehand: picks follow each other at once, and sequences that
            // pick from the same row reach the same states.
            let rows: Vec<Vec<f32>> = (0..4).map(|_| (0..40_000).map(|_| rng.normal() as f32).collect()).collect();
            for step in 0..40 {
                for (i, (sampler, state)) in walks.iter_mut().enumerate() {
                    let t = sampler.sample(&rows[(step + i / 4) % rows.len()]).unwrap();
                    let mask = guide.mask(*state);
                    assert!(mask.allows(t) || (t == eos && mask.whole), "token {t}");
                    if t != eos {
                        *state = guide.advance(*state, t);
                    }
                }
            }
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(120)).expect("every walk finished");
}

/// With Llama 2's decoder, a text's first token loses its leading space: the guide walks what decoding
/// gives, so the output decoded as the server decodes it (alone, from its first token) is a whole text of the
/// language, a leading space included where the language asks for one.
#[test]
fn sentencepiece_outputs_decode_to_their_language() {
    let json = crate::model::token_bytes::sentencepiece_json();
    let tok = Arc::new(Tokenizer::from_parts(&json, "sentencepiece/tokenizer.json", None).unwrap());
    let table = tok.token_bytes().unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert!(table.first_differs());
    assert_eq!(
        (table.get(id("\u{2581}hello")), table.get_first(id("\u{2581}hello"))),
        (Some(&b" hello"[..]), Some(&b"hello"[..]))
    );
    for (c, want) in [
        (Constraint::Choice(vec![" hello".into(), "a b".into()]), &[" hello", "a b"][..]),
        (Constraint::Regex("(hello|a)( a| b)*".into()), &[]),
    ] {
        let g = Guide::compile(&c, tok.clone()).unwrap();
        let whole = Whole::new(&c.regex().unwrap());
        let mut rng = Rng::new(9);
        let mut ended = 0;
        for _ in 0..40 {
            let (mut at, mut ids) = (g.start(), Vec::new());
            for _ in 0..12 {
                let m = g.mask(at);
                let allowed: Vec<u32> = m.ids().collect();
                if m.whole && (allowed.is_empty() || rng.below(3) == 0) {
                    let text = tok.decode(&ids).unwrap();
                    assert!(whole.is_match(&text), "{c:?}: {text:?} from {ids:?}");
                    assert!(want.is_empty() || want.contains(&text.as_str()), "{text:?}");
                    ended += 1;
                    break;
                }
                let t = allowed[rng.below(allowed.len() as u64) as usize];
                ids.push(t);
                at = g.advance(at, t);
            }
        }
        assert!(ended > 10, "{c:?}: {ended} walks ended whole");
    }
}

/// Places whose prefetch jobs are still queued (every pool thread busy), asked for by as many callers
/// outside the pool as the pool has threads: the callers wait for the jobs, which fill them. (Were the
/// callers to fill them themselves, their chunks would queue behind jobs waiting on those very cells,
/// holding every pool thread: a hang.)
#[test]
fn callers_outside_the_pool_wait_for_queued_prefetches() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (json, _) = crate::model::synthetic::tokenizer_json(40_000, 4);
    let tok = Arc::new(Tokenizer::from_parts(json.as_bytes(), "synthetic/tokenizer.json", None).unwrap());
    let g = Arc::new(Guide::compile(&Constraint::Regex("[a-z]{0,64}".into()), tok).unwrap());
    let threads = rayon::current_num_threads();
    // After 1, 2, … `a`s (the synthetic vocabulary's first 256 ids are the bytes): places not worked out yet.
    let places: Vec<Cursor> =
        (1..=threads).map(|k| (0..k).fold(g.start(), |at, _| g.advance(at, b'a' as u32))).collect();
    let gate = Arc::new(std::sync::RwLock::new(()));
    let held = gate.write().unwrap();
    let busy = Arc::new(AtomicUsize::new(0));
    for _ in 0..threads {
        let (gate, busy) = (gate.clone(), busy.clone());
        rayon::spawn(move || {
            busy.fetch_add(1, Ordering::SeqCst);
            drop(gate.read().unwrap());
        });
    }
    while busy.load(Ordering::SeqCst) < threads {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for &at in &places {
        g.prefetch(at);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for &at in &places {
        let (g, tx) = (g.clone(), tx.clone());
        std::thread::spawn(move || tx.send(g.mask(at).allowed).unwrap());
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(held);
    for _ in &places {
        let allowed = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("every caller got its allowed set");
        assert!(allowed > 26, "{allowed}");
    }
}
