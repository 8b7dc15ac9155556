//! Structured output (vLLM's structured outputs, TGI's grammars): a request's output confined to a
//! language — a regex, one of a list of choices, the JSON texts of a JSON Schema ([`json_schema`]), or any
//! JSON object.
//!
//! The language compiles to an anchored DFA over bytes ([`Guide`]). Before each pick, the tokens whose bytes
//! ([`TokenBytes`]) keep the output a prefix of some text of the language are allowed, and the tokens that end the
//! request (EOS, `stop_token_ids`) where the output is a whole text of it, or, for a stop token that is also text,
//! where the language allows that text (vLLM's rule: picked, it ends the output there, cut as `max_new_tokens` cuts
//! it); every other logit is −∞. The allowed set of a DFA state is worked out once, by walking the vocabulary in byte
//! order so that tokens sharing a prefix share its walk and a dead prefix skips all tokens that start with it (in
//! chunks, in parallel), and kept with the guide; it starts on the thread pool as soon as a pick reaches the state,
//! overlapping the next forward. A set's cell is filled only by whoever put it in; others wait, so no pool
//! job ever waits. [`Guides`] keeps the most recently used guides, so repeated schemas compile once.

pub mod int_range;
pub mod json_schema;
pub mod pattern;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use crate::model::token_bytes::TokenBytes;
use crate::model::Tokenizer;

/// The most memory a guide's DFA (and its construction) may take.
const DFA_LIMIT: usize = 64 << 20;
/// Guides kept by [`Guides`].
const GUIDES_KEPT: usize = 16;
/// Bytes of allowed sets kept per guide (512 sets for a 128k vocabulary); past it they are worked out again.
const MASK_BYTES: usize = 8 << 20;
/// Bytes of compiled automata kept by [`Guides`] (beyond the most recent one).
const GUIDES_BYTES: usize = 256 << 20;
/// Tokens per parallel chunk of the vocabulary walk.
const WALK_CHUNK: usize = 8192;

/// What a request confines its output to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Constraint {
    /// The whole output matches this regex (Rust `regex` syntax, without look-around or backreferences).
    Regex(String),
    /// The output is one of these texts.
    Choice(Vec<String>),
    /// The output is a JSON text valid against this schema (its JSON text).
    JsonSchema(String),
    /// The output is a JSON object (vLLM's `json_object`, OpenAI's `response_format` of that type).
    JsonObject,
}

impl Constraint {
    /// The request field the constraint came in, for messages.
    pub fn field(&self) -> &'static str {
        match self {
            Constraint::Regex(_) => "structured_output.regex",
            Constraint::Choice(_) => "structured_output.choice",
            Constraint::JsonSchema(_) => "structured_output.json_schema",
            Constraint::JsonObject => "structured_output.json_object",
        }
    }

    /// The regex of the language, or what is wrong with the constraint.
    pub fn regex(&self) -> Result<String, String> {
        match self {
            Constraint::Regex(r) => Ok(r.clone()),
            Constraint::Choice(c) if c.is_empty() => Err("no choices given".into()),
            Constraint::Choice(c) => Ok(c.iter().map(|s| regex_syntax::escape(s)).collect::<Vec<_>>().join("|")),
            Constraint::JsonSchema(s) => json_schema::regex_of_schema(s),
            Constraint::JsonObject => Ok(json_schema::regex_of_any_object()),
        }
    }
}

/// A compiled constraint for one tokenizer: its DFA and the allowed tokens of each state reached so far.
pub struct Guide {
    constraint: Constraint,
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    /// By state index: some text of the language starts with the output that reached the state. (A DFA
    /// state that is not dead may still be hopeless: regex-automata reports a match one byte late, so the
    /// state after a byte past a whole text is alive only to say the text before it matched.)
    live: Vec<bool>,
    tokenizer: Arc<Tokenizer>,
    /// The allowed tokens at each place reached, once worked out (a cell being filled while they are).
    masks: Mutex<HashMap<Cursor, Arc<OnceLock<Arc<Mask>>>>>,
    /// How many allowed sets to keep ([`MASK_BYTES`] of them).
    masks_kept: usize,
}

/// Where an output is: its DFA state, and whether the next token is its first where the tokenizer spells
/// a first token differently (SentencePiece's decoders drop its leading space: the text holds it without).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cursor {
    state: StateID,
    first: bool,
}

/// The tokens allowed at one place.
#[derive(Debug)]
pub struct Mask {
    /// Bit `id` set: token `id` keeps the output a prefix of a text of the language.
    words: Vec<u64>,
    /// How many bits are set.
    allowed: usize,
    /// The output is a whole text of the language: the ending tokens may end it.
    pub whole: bool,
}

impl Mask {
    pub fn allows(&self, id: u32) -> bool {
        self.words.get(id as usize / 64).is_some_and(|w| w >> (id % 64) & 1 == 1)
    }

    /// The allowed token ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        ones(&self.words, false)
    }

    /// `logits` with every token this mask does not allow at −∞ (ids past the mask's vocabulary too), and `ending`
    /// allowed where the output is whole; those also in `stops` where the mask allows them as text. Touches only the
    /// fewer of the allowed and the other tokens after one fill or copy, so a mask that allows almost everything
    /// (inside a JSON string) costs about a copy.
    pub fn apply(&self, logits: &[f32], ending: &[u32], stops: &[u32]) -> Vec<f32> {
        let n = logits.len().min(self.words.len() * 64);
        let mut out = if self.allowed < n / 2 {
            let mut out = vec![f32::NEG_INFINITY; logits.len()];
            for id in ones(&self.words, false).take_while(|&id| (id as usize) < n) {
                out[id as usize] = logits[id as usize];
            }
            out
        } else {
            let mut out = logits.to_vec();
            for id in ones(&self.words, true).take_while(|&id| (id as usize) < n) {
                out[id as usize] = f32::NEG_INFINITY;
            }
            out[n..].fill(f32::NEG_INFINITY);
            out
        };
        // The ending tokens end the output where it is whole. A stop token the language allows as text here
        // stays allowed: the request asked to stop on it (and where the language needs that text to go on,
        // masking it would leave nothing to pick). EOS never: an output ended by EOS is whole.
        for &t in ending {
            if let Some(&l) = logits.get(t as usize) {
                let as_text = self.allows(t) && stops.contains(&t);
                out[t as usize] = if self.whole || as_text { l } else { f32::NEG_INFINITY };
            }
        }
        out
    }

    fn is_empty(&self) -> bool {
        self.allowed == 0
    }
}

/// The positions of the set bits of `words` (of the clear ones with `clear`), in order.
fn ones(words: &[u64], clear: bool) -> impl Iterator<Item = u32> + '_ {
    words.iter().enumerate().flat_map(move |(i, &w)| {
        let mut w = if clear { !w } else { w };
        std::iter::from_fn(move || {
            (w != 0).then(|| {
                let b = w.trailing_zeros();
                w &= w - 1;
                (i * 64) as u32 + b
            })
        })
    })
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("constraint", &self.constraint).finish_non_exhaustive()
    }
}

/// Guides are compared by identity: two compilations are two guides.
impl PartialEq for Guide {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Guide {
    /// Compiles `constraint` for `tokenizer`; the message says what is wrong (without the field's name).
    pub fn compile(constraint: &Constraint, tokenizer: Arc<Tokenizer>) -> Result<Guide, String> {
        let bytes = tokenizer.token_bytes().map_err(|e| format!("the model's tokenizer is not supported: {e}"))?;
        if !bytes.spells_every_byte() {
            return Err("the model's tokenizer is not supported: some bytes are no token of their own".into());
        }
        let dfa = build_dfa(&constraint.regex()?)?;
        let start = dfa.start_state(&start::Config::new().anchored(Anchored::Yes)).map_err(|e| e.to_string())?;
        let live = live_states(&dfa, start);
        let masks_kept = (MASK_BYTES / (bytes.len().div_ceil(8)).max(1)).max(16);
        let guide =
            Guide { constraint: constraint.clone(), dfa, start, live, tokenizer, masks: Mutex::default(), masks_kept };
        let first = guide.mask(guide.start());
        if first.is_empty() && !first.whole {
            return Err("no text matches it".into());
        }
        Ok(guide)
    }

    pub fn constraint(&self) -> &Constraint {
        &self.constraint
    }

    /// Where the output is before any of it.
    pub fn start(&self) -> Cursor {
        Cursor { state: self.start, first: self.bytes().first_differs() }
    }

    /// The tokens allowed at `at`, worked out now unless kept or being worked out (then waited for).
    pub fn mask(&self, at: Cursor) -> Arc<Mask> {
        match self.cell(at) {
            (cell, true) => cell.get_or_init(|| Arc::new(self.work_out(at))).clone(),
            // Whoever put the cell in fills it: a pool job, or a caller outside the pool that is doing so now.
            (cell, false) => cell.wait().clone(),
        }
    }

    /// Starts working out the tokens allowed at `at` on the thread pool, unless they are kept or under way:
    /// called as a token is picked, it overlaps the work with the next forward. A cell is filled only by the
    /// one that put it in (others wait), so no pool job ever waits: a job waiting on a cell that a caller
    /// outside the pool is filling would hold a pool thread that caller's own chunks need.
    pub fn prefetch(self: &Arc<Self>, at: Cursor) {
        if self.dead(at.state) {
            return;
        }
        if let (cell, true) = self.cell(at) {
            let guide = self.clone();
            rayon::spawn(move || {
                cell.get_or_init(|| Arc::new(guide.work_out(at)));
            });
        }
    }

    /// The cell of the allowed tokens at `at`, and whether this call put it in (all of them are dropped once
    /// more than the guide keeps are in; a cell being filled then is still filled, for those holding it).
    fn cell(&self, at: Cursor) -> (Arc<OnceLock<Arc<Mask>>>, bool) {
        let mut masks = self.masks.lock().expect("guide masks");
        if let Some(c) = masks.get(&at) {
            return (c.clone(), false);
        }
        if masks.len() >= self.masks_kept {
            masks.clear();
        }
        let cell = Arc::new(OnceLock::new());
        masks.insert(at, cell.clone());
        (cell, true)
    }

    /// Where the output is after `token` at `at` (a token allowed there; another leaves a hopeless state,
    /// a special token, which spells nothing, the state as it was).
    pub fn advance(&self, at: Cursor, token: u32) -> Cursor {
        let bytes = self.spelled(at, token).unwrap_or_default();
        Cursor { state: bytes.iter().fold(at.state, |s, &b| self.dfa.next_state(s, b)), first: false }
    }

    /// What token `id` adds to the text at `at` (`None`: a special token).
    fn spelled(&self, at: Cursor, id: u32) -> Option<&[u8]> {
        match at.first {
            true => self.bytes().get_first(id),
            false => self.bytes().get(id),
        }
    }

    fn bytes(&self) -> &TokenBytes {
        self.tokenizer.token_bytes().expect("checked when compiled")
    }

    /// No text of the language starts with the output that reached `s`.
    fn dead(&self, s: StateID) -> bool {
        !self.live.get(s.as_usize() >> self.dfa.stride2()).copied().unwrap_or(false)
    }

    /// The tokens allowed at `at`: the vocabulary in byte order, in chunks walked in parallel.
    fn work_out(&self, at: Cursor) -> Mask {
        use rayon::prelude::*;
        let table = self.bytes();
        let mut words = vec![0u64; table.len().div_ceil(64)];
        let allowed: Vec<Vec<u32>> = table.sorted().par_chunks(WALK_CHUNK).map(|ids| self.walk(at, ids)).collect();
        for id in allowed.iter().flatten() {
            words[*id as usize / 64] |= 1 << (id % 64);
        }
        let allowed = allowed.iter().map(Vec::len).sum();
        Mask { words, allowed, whole: self.dfa.is_match_state(self.dfa.next_eoi_state(at.state)) }
    }

    /// The allowed ones of `ids` (in byte order): `states[k]` is the state after the first `k` bytes of the
    /// token before, so a token walks only the bytes past the prefix it shares with it; after a dead prefix,
    /// the tokens that start with it are skipped (both compare the bytes themselves, so they hold in any
    /// order; byte order only makes them frequent).
    fn walk(&self, at: Cursor, ids: &[u32]) -> Vec<u32> {
        let mut allowed = Vec::new();
        let mut states = vec![at.state];
        let mut prev: &[u8] = &[];
        let mut dead: Option<&[u8]> = None;
        for &id in ids {
            let b = self.spelled(at, id).expect("sorted ids spell something");
            if dead.is_some_and(|d| b.starts_with(d)) {
                continue;
            }
            dead = None;
            let shared = prev.iter().zip(b).take_while(|(x, y)| x == y).count().min(states.len() - 1);
            states.truncate(shared + 1);
            prev = b;
            let mut alive = true;
            for (k, &byte) in b.iter().enumerate().skip(shared) {
                let next = self.dfa.next_state(states[k], byte);
                if self.dead(next) {
                    dead = Some(&b[..=k]);
                    alive = false;
                    break;
                }
                states.push(next);
            }
            if alive {
                allowed.push(id);
            }
        }
        allowed
    }
}

/// The anchored DFA of `regex`. Every match counts, not only the leftmost-first one: with `a|ab`, both `a` and
/// `ab` are whole texts (leftmost-first would drop the threads still running past a match).
fn build_dfa(regex: &str) -> Result<dense::DFA<Vec<u32>>, String> {
    dense::Builder::new()
        .configure(
            dense::DFA::config()
                .match_kind(MatchKind::All)
                .start_kind(StartKind::Anchored)
                .determinize_size_limit(Some(DFA_LIMIT))
                .dfa_size_limit(Some(DFA_LIMIT)),
        )
        .thompson(thompson::Config::new().nfa_size_limit(Some(DFA_LIMIT)))
        .build(regex)
        .map_err(|e| match brief(chain(&e)) {
            m if m.contains("exceeded") => format!("its automaton is larger than {} MiB: {m}", DFA_LIMIT >> 20),
            m => format!("invalid regex: {m}"),
        })
}

/// The longest error message quoted whole: regex-syntax's messages quote the pattern, which for a schema's
/// regex can be a megabyte (and no gRPC status carries that).
const MESSAGE_QUOTED: usize = 1024;

/// `m`, or past [`MESSAGE_QUOTED`] its last line (regex-syntax's `error: …` after the quoted pattern), cut.
fn brief(m: String) -> String {
    if m.len() <= MESSAGE_QUOTED {
        return m;
    }
    let last = m.lines().last().unwrap_or("").trim();
    let mut cut = last.len().min(MESSAGE_QUOTED / 4);
    while !last.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = if cut < last.len() { "…" } else { "" };
    format!("{}{more} (cut from a message of {} bytes quoting the pattern)", &last[..cut], m.len())
}

/// An error and its sources, as one message (regex-automata's own message is only the outermost one).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// The states reachable from `start` from which a whole text of the language can still be reached (by
/// state index): those reachable forward, then marked backward from the ones where the text is whole.
fn live_states(dfa: &dense::DFA<Vec<u32>>, start: StateID) -> Vec<bool> {
    let reps: Vec<u8> = dfa.byte_classes().representatives(..).filter_map(|u| u.as_u8()).collect();
    let index = |s: StateID| s.as_usize() >> dfa.stride2();
    let mut seen: HashMap<StateID, u32> = HashMap::from([(start, 0)]);
    let mut order = vec![start];
    let mut preds: Vec<Vec<u32>> = vec![Vec::new()];
    let mut i = 0;
    while i < order.len() {
        for &b in &reps {
            let next = dfa.next_state(order[i], b);
            if dfa.is_dead_state(next) || dfa.is_quit_state(next) {
                continue;
            }
            let j = *seen.entry(next).or_insert_with(|| {
                order.push(next);
                preds.push(Vec::new());
                (order.len() - 1) as u32
            });
            preds[j as usize].push(i as u32);
        }
        i += 1;
    }
    let mut live = vec![false; order.iter().map(|&s| index(s)).max().unwrap_or(0) + 1];
    let mut stack: Vec<u32> =
        (0..order.len() as u32).filter(|&k| dfa.is_match_state(dfa.next_eoi_state(order[k as usize]))).collect();
    for &k in &stack {
        live[index(order[k as usize])] = true;
    }
    while let Some(k) = stack.pop() {
        for &p in &preds[k as usize] {
            let slot = &mut live[index(order[p as usize])];
            if !*slot {
                *slot = true;
                stack.push(p);
            }
        }
    }
    live
}

/// The guides compiled lately, most recent first, for one tokenizer.
pub struct Guides {
    tokenizer: Arc<Tokenizer>,
    /// Each constraint with its compilation: the guide, or why it has none (a constraint that does not
    /// compile is not compiled again while kept), or a cell being filled while it compiles.
    kept: Mutex<Vec<(Constraint, Compiled)>>,
}

type Compiled = Arc<OnceLock<Result<Arc<Guide>, String>>>;

impl Guides {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Guides { tokenizer, kept: Mutex::default() }
    }

    /// The guide of `constraint`, compiled now unless kept or being compiled (then waited for). Call it off
    /// the async runtime: compiling a large schema takes a while.
    pub fn get(&self, constraint: &Constraint) -> Result<Arc<Guide>, String> {
        match self.lookup(constraint) {
            Ok(done) => done,
            Err(cell) => self.compile(constraint, &cell),
        }
    }

    /// The guide of `constraint` when it is compiled and kept (it becomes the newest), else the cell a
    /// [`Guides::compile`] fills (the same one for every caller until it is dropped from the kept).
    pub fn lookup(&self, constraint: &Constraint) -> Result<Result<Arc<Guide>, String>, PendingGuide> {
        let cell = {
            let mut kept = self.kept.lock().expect("guides");
            let entry = match kept.iter().position(|(c, _)| c == constraint) {
                Some(i) => kept.remove(i),
                None => (constraint.clone(), Compiled::default()),
            };
            let cell = entry.1.clone();
            kept.insert(0, entry);
            // The most recent ones, within GUIDES_KEPT and GUIDES_BYTES of automata (the newest always).
            let mut bytes = 0;
            let keep = kept
                .iter()
                .take(GUIDES_KEPT)
                .take_while(|(_, c)| {
                    bytes += c.get().and_then(|g| g.as_ref().ok()).map_or(0, |g| g.dfa.memory_usage());
                    bytes <= GUIDES_BYTES
                })
                .count();
            kept.truncate(keep.max(1));
            cell
        };
        match cell.get() {
            Some(done) => Ok(done.clone()),
            None => Err(PendingGuide(cell)),
        }
    }

    /// Compiles `constraint` into `pending` ([`Guides::lookup`]), or waits for the call already compiling it.
    /// Call it off the async runtime.
    pub fn compile(&self, constraint: &Constraint, pending: &PendingGuide) -> Result<Arc<Guide>, String> {
        pending.0.get_or_init(|| Guide::compile(constraint, self.tokenizer.clone()).map(Arc::new)).clone()
    }
}

/// Where a guide not yet compiled goes ([`Guides::lookup`]).
pub struct PendingGuide(Compiled);

/// A regex's whole texts, as a guide's automaton takes them (for tests of the regexes made here).
#[cfg(test)]
struct Whole(dense::DFA<Vec<u32>>, StateID);

#[cfg(test)]
impl Whole {
    fn new(regex: &str) -> Self {
        let dfa = build_dfa(regex).unwrap();
        let start = dfa.start_state(&start::Config::new().anchored(Anchored::Yes)).unwrap();
        Whole(dfa, start)
    }

    fn is_match(&self, text: &str) -> bool {
        let end = text.bytes().fold(self.1, |s, b| self.0.next_state(s, b));
        self.0.is_match_state(self.0.next_eoi_state(end))
    }
}

#[cfg(test)]
mod tests;
