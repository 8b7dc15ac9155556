//! Continuous batching, as pure logic: which sequences run in the next step, how many of their tokens, and
//! which KV blocks they get. No model, no threads — unit-testable.
//!
//! Each step is one forward over a flattened batch: first every running sequence that is decoding (one
//! token each), then prefill chunks — of sequences part-way through their prompt and of newly admitted
//! ones — up to a token budget, so a long prompt is spread over several steps instead of stalling the
//! running decodes. Admission is first-come-first-served and stops at the first request whose chunk does
//! not fit (no starvation by smaller late-comers). When a decoding sequence needs a new block and none is
//! free, the most recently arrived running sequence is preempted: its blocks are freed and it goes back to
//! the front of the queue to be recomputed (prompt + tokens so far) — never an out-of-memory; a step that
//! preempts admits no one.
//!
//! With the prefix cache ([`crate::model::kv_blocks`]) a sequence being admitted first shares the cached
//! blocks its tokens start with, and only the rest is computed (and counted against the token budget); the
//! last token is always computed, since its logits pick the next one. The full blocks a step will compute are
//! named as it is planned, so a sequence admitted later in the same step already shares them: every layer
//! writes the whole step's keys and values into the cache before any row attends (the CPU and the CUDA paged
//! attention alike), so its rows read what the earlier rows write. A burst of requests with the same system
//! prompt computes it once. If the step fails, the worker takes those names back ([`BatchPlan::named`]). A
//! preempted sequence often finds its own blocks again.

use std::collections::{HashMap, VecDeque};

use crate::model::kv_cache::{BlockAllocator, PrefixChain};

pub type SeqId = u64;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_batch_rows: usize,
    /// Most tokens (rows of the flattened batch) in one step.
    pub max_batch_tokens: usize,
    /// KV block size in positions.
    pub block_size: usize,
}

/// What the scheduler knows of a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSlot {
    /// Tokens known: prompt plus generated so far.
    pub len: usize,
    /// Leading tokens whose keys/values are in the cache.
    pub computed: usize,
    pub blocks: Vec<u32>,
    /// Arrival order: lower runs first and is preempted last.
    pub priority: u64,
    /// Its place in the prefix cache (`None`: its blocks are neither named nor shared).
    pub prefix: Option<PrefixChain>,
    /// May start from cached blocks (a sequence that scores its prompt needs every position computed).
    pub reuse: bool,
}

impl SeqSlot {
    /// A sequence outside the prefix cache.
    pub fn new(prompt_len: usize, priority: u64) -> Self {
        SeqSlot { len: prompt_len, computed: 0, blocks: Vec::new(), priority, prefix: None, reuse: false }
    }

    /// In the prefix cache: its full blocks are named in `chain`, and with `reuse` it starts from cached ones.
    pub fn cached(mut self, chain: PrefixChain, reuse: bool) -> Self {
        self.prefix = Some(chain);
        self.reuse = reuse;
        self
    }

    /// Gives its blocks back, last first (the head of a cached prefix outlives its tail); nothing computed.
    fn release(&mut self, alloc: &mut BlockAllocator) {
        alloc.release(self.blocks.drain(..).rev());
        self.computed = 0;
        if let Some(chain) = &mut self.prefix {
            chain.reset();
        }
    }
}

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedRow {
    pub seq: SeqId,
    /// First token position computed (== the sequence's `computed`).
    pub start: usize,
    /// Tokens computed this step.
    pub len: usize,
    /// This chunk reaches the last known token: its logits pick the next token.
    pub samples: bool,
}

/// The next step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPlan {
    pub rows: Vec<PlannedRow>,
    /// Sequences preempted while planning (their blocks are free again; they wait to be recomputed).
    pub preempted: Vec<SeqId>,
    /// Blocks named in the prefix cache for what this step computes: their names are taken back
    /// ([`BlockAllocator::forget`]) if it fails.
    pub named: Vec<u32>,
}

impl BatchPlan {
    pub fn tokens(&self) -> usize {
        self.rows.iter().map(|r| r.len).sum()
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler { cfg, waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a new sequence (already in `seqs`).
    pub fn enqueue(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Forgets a sequence (finished, cancelled, failed) and frees its blocks.
    pub fn remove(&mut self, id: SeqId, seqs: &mut HashMap<SeqId, SeqSlot>, alloc: &mut BlockAllocator) {
        self.running.retain(|&s| s != id);
        self.waiting.retain(|&s| s != id);
        if let Some(slot) = seqs.get_mut(&id) {
            slot.release(alloc);
        }
    }

    /// Names in the prefix cache the full blocks `row` leaves computed, `tokens` being its sequence's.
    fn name_row(
        &self,
        row: &PlannedRow,
        tokens: &[u32],
        seqs: &mut HashMap<SeqId, SeqSlot>,
        alloc: &mut BlockAllocator,
        named: &mut Vec<u32>,
    ) {
        let slot = seqs.get_mut(&row.seq).expect("planned sequence exists");
        if let Some(chain) = &mut slot.prefix {
            alloc.name_blocks(chain, &slot.blocks, tokens, row.start + row.len, self.cfg.block_size, named);
        }
    }

    /// Frees `id`'s blocks and puts it back in the queue, in arrival order, to be recomputed.
    fn preempt(&mut self, id: SeqId, seqs: &mut HashMap<SeqId, SeqSlot>, alloc: &mut BlockAllocator) {
        self.running.retain(|&s| s != id);
        let slot = seqs.get_mut(&id).expect("preempted sequence exists");
        slot.release(alloc);
        let prio = slot.priority;
        let at = self.waiting.iter().position(|w| seqs[w].priority > prio).unwrap_or(self.waiting.len());
        self.waiting.insert(at, id);
    }

    /// Grows `id`'s block table to cover `positions`; false when the allocator is out of blocks.
    fn grow(
        &self,
        id: SeqId,
        positions: usize,
        seqs: &mut HashMap<SeqId, SeqSlot>,
        alloc: &mut BlockAllocator,
    ) -> bool {
        let slot = seqs.get_mut(&id).expect("sequence exists");
        let need = positions.div_ceil(self.cfg.block_size).saturating_sub(slot.blocks.len());
        if need == 0 {
            return true;
        }
        match alloc.allocate(need) {
            Some(b) => {
                slot.blocks.extend(b);
                true
            }
            None => false,
        }
    }

    /// Plans the next step; `tokens` gives a sequence's known tokens (for the prefix cache).
    pub fn plan<'t>(
        &mut self,
        seqs: &mut HashMap<SeqId, SeqSlot>,
        alloc: &mut BlockAllocator,
        tokens: impl Fn(SeqId) -> &'t [u32],
    ) -> BatchPlan {
        let mut plan = BatchPlan::default();
        let mut budget = self.cfg.max_batch_tokens;
        self.running.sort_by_key(|id| seqs[id].priority);

        // 1. Decodes and unfinished prefills of running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let (len, computed) = (seqs[&id].len, seqs[&id].computed);
            let want = (len - computed).min(budget);
            if want == 0 || plan.rows.len() == self.cfg.max_batch_rows {
                i += 1;
                continue;
            }
            if !self.grow(id, computed + want, seqs, alloc) {
                // Out of blocks: preempt the youngest running sequence (possibly this one) and retry. (A victim
                // whose blocks all are shared frees none; the next pass preempts the next youngest. Its blocks
                // stay cached, so its recompute is cheap. vLLM picks its victims the same way.)
                let victim = *self.running.iter().max_by_key(|s| seqs[s].priority).expect("running is non-empty");
                self.preempt(victim, seqs, alloc);
                plan.preempted.push(victim);
                plan.rows.retain(|r| r.seq != victim);
                if victim == id {
                    continue; // `running[i]` is now the next sequence
                }
                // Retry this one (the victim may have been before it: recompute its index).
                i = self.running.iter().position(|&s| s == id).expect("still running");
                budget = self.cfg.max_batch_tokens - plan.tokens();
                continue;
            }
            plan.rows.push(PlannedRow { seq: id, start: computed, len: want, samples: computed + want == len });
            budget -= want;
            i += 1;
        }

        // Their rows are final now (no more preemption): name the full blocks they compute.
        for i in 0..plan.rows.len() {
            let r = plan.rows[i];
            self.name_row(&r, tokens(r.seq), seqs, alloc, &mut plan.named);
        }

        // 2. Admit waiting sequences, first come first served, while rows, tokens and blocks last. Not in a
        // step that had to preempt (as vLLM): the blocks it freed are for the running sequences' next tokens,
        // and a victim admitted again at once would only be preempted again, its chunk computed for nothing.
        if !plan.preempted.is_empty() {
            return plan;
        }
        while let Some(&id) = self.waiting.front() {
            if plan.rows.len() == self.cfg.max_batch_rows || budget == 0 {
                break;
            }
            let slot = seqs.get_mut(&id).expect("waiting sequence exists");
            let len = slot.len;
            if let (true, Some(chain)) = (slot.reuse, slot.prefix.as_mut()) {
                // Full blocks of all tokens but the last: its logits are needed, and its position would be
                // written into a shared block.
                let known = tokens(id);
                debug_assert_eq!(known.len(), len, "the scheduler and the caller agree on the tokens");
                slot.blocks = alloc.share_prefix(chain, &known[..len.saturating_sub(1)], self.cfg.block_size);
                slot.computed = slot.blocks.len() * self.cfg.block_size;
            }
            let start = slot.computed;
            let want = (len - start).min(budget);
            if !self.grow(id, start + want, seqs, alloc) {
                // Give back what sharing and a partial grow took, and wait for blocks.
                seqs.get_mut(&id).expect("waiting sequence exists").release(alloc);
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            let row = PlannedRow { seq: id, start, len: want, samples: start + want == len };
            // Named now, so the next admitted sequence of the same prefix shares them in this very step.
            self.name_row(&row, tokens(id), seqs, alloc, &mut plan.named);
            plan.rows.push(row);
            budget -= want;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(blocks: usize, rows: usize, tokens: usize) -> (Scheduler, HashMap<SeqId, SeqSlot>, BlockAllocator) {
        let s = Scheduler::new(SchedulerConfig { max_batch_rows: rows, max_batch_tokens: tokens, block_size: 4 });
        (s, HashMap::new(), BlockAllocator::new(blocks))
    }

    fn add(s: &mut Scheduler, seqs: &mut HashMap<SeqId, SeqSlot>, id: SeqId, prompt: usize) {
        seqs.insert(id, SeqSlot::new(prompt, id));
        s.enqueue(id);
    }

    /// Applies a plan as the worker would: positions computed, one token appended per sampling row.
    fn step(plan: &BatchPlan, seqs: &mut HashMap<SeqId, SeqSlot>) {
        for r in &plan.rows {
            let slot = seqs.get_mut(&r.seq).unwrap();
            slot.computed += r.len;
            if r.samples {
                slot.len += 1;
            }
        }
    }

    #[test]
    fn prefill_is_chunked_by_the_token_budget_and_decodes_go_first() {
        let (mut s, mut seqs, mut a) = setup(64, 8, 10);
        add(&mut s, &mut seqs, 1, 3);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows, vec![PlannedRow { seq: 1, start: 0, len: 3, samples: true }]);
        step(&p, &mut seqs);
        add(&mut s, &mut seqs, 2, 25);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        // Sequence 1 decodes one token; sequence 2 gets the remaining 9 of the budget.
        assert_eq!(
            p.rows,
            vec![
                PlannedRow { seq: 1, start: 3, len: 1, samples: true },
                PlannedRow { seq: 2, start: 0, len: 9, samples: false }
            ]
        );
        step(&p, &mut seqs);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 9, len: 9, samples: false });
        step(&p, &mut seqs);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 18, len: 7, samples: true });
        assert_eq!(seqs[&2].blocks.len(), 7, "25 positions in blocks of 4");
    }

    #[test]
    fn admission_is_fifo_and_bounded_by_rows_and_blocks() {
        let (mut s, mut seqs, mut a) = setup(3, 2, 100);
        add(&mut s, &mut seqs, 1, 4); // 1 block
        add(&mut s, &mut seqs, 2, 9); // 3 blocks: does not fit next to 1
        add(&mut s, &mut seqs, 3, 1); // would fit, but must not jump the queue
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.waiting(), 2);
        assert_eq!(a.used_blocks(), 1, "the partial grow of sequence 2 was given back");
        s.remove(1, &mut seqs, &mut a);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
        // Max 2 rows: with 2 and 3 running nothing else is admitted.
        let (mut s, mut seqs, mut a) = setup(100, 2, 100);
        for id in 1..=3 {
            add(&mut s, &mut seqs, id, 2);
        }
        assert_eq!(s.plan(&mut seqs, &mut a, |_| &[]).rows.len(), 2);
    }

    #[test]
    fn out_of_blocks_preempts_the_youngest_and_recomputes_it_later() {
        let (mut s, mut seqs, mut a) = setup(4, 8, 100);
        add(&mut s, &mut seqs, 1, 4);
        add(&mut s, &mut seqs, 2, 4);
        add(&mut s, &mut seqs, 3, 8);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows.len(), 3);
        assert_eq!(a.free_blocks(), 0);
        step(&p, &mut seqs);
        // Every sequence now needs a new block for its next token: the youngest (3) is preempted, and
        // its two blocks let 1 and 2 continue.
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.preempted, vec![3]);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(seqs[&3].computed, 0);
        assert!(seqs[&3].blocks.is_empty());
        step(&p, &mut seqs);
        s.remove(1, &mut seqs, &mut a);
        s.remove(2, &mut seqs, &mut a);
        // Recompute: its whole known sequence (8 prompt + 1 generated) is prefilled again, then it samples.
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows, vec![PlannedRow { seq: 3, start: 0, len: 9, samples: true }]);
    }

    /// The blocks a preemption frees go to the running sequences: neither the victim nor anyone else waiting
    /// is admitted in that step (the victim's first chunk would fit, and be preempted again next step).
    #[test]
    fn a_step_that_preempts_admits_no_one() {
        let (mut s, mut seqs, mut a) = setup(3, 8, 5);
        add(&mut s, &mut seqs, 1, 4);
        add(&mut s, &mut seqs, 2, 8);
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 0, len: 1, samples: false });
        step(&p, &mut seqs);
        add(&mut s, &mut seqs, 3, 1);
        // 1 takes the last free block for its next token; 2's next chunk needs one more: 2 is preempted, and
        // its freed block would hold a 4-token chunk of it (or all of 3), but the step admits no one.
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.rows, vec![PlannedRow { seq: 1, start: 4, len: 1, samples: true }]);
        assert_eq!((s.waiting(), a.free_blocks()), (2, 1));
        step(&p, &mut seqs);
        // The next step admits again, oldest first.
        let p = s.plan(&mut seqs, &mut a, |_| &[]);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(p.preempted.is_empty());
    }

    /// Sequences in the prefix cache, with their tokens, stepped as the worker steps them; `written` is what
    /// each block position holds (the token whose keys and values a step wrote there).
    struct Cached {
        s: Scheduler,
        seqs: HashMap<SeqId, SeqSlot>,
        a: BlockAllocator,
        tokens: HashMap<SeqId, Vec<u32>>,
        written: HashMap<u32, [Option<u32>; 4]>,
    }

    impl Cached {
        fn new(blocks: usize, tokens: usize) -> Self {
            let (s, seqs, a) = setup(blocks, 8, tokens);
            Cached { s, seqs, a, tokens: HashMap::new(), written: HashMap::new() }
        }

        fn add(&mut self, id: SeqId, prompt: &[u32], salt: &str, reuse: bool) {
            self.seqs.insert(id, SeqSlot::new(prompt.len(), id).cached(PrefixChain::new(salt), reuse));
            self.tokens.insert(id, prompt.to_vec());
            self.s.enqueue(id);
        }

        fn plan(&mut self) -> BatchPlan {
            let tokens = &self.tokens;
            self.s.plan(&mut self.seqs, &mut self.a, |id| &tokens[&id])
        }

        /// Runs a step of `plan`: positions written and computed; token 7 appended by sampling rows. A row
        /// writes only into blocks its sequence alone holds, unnamed, or that this plan named for it (which
        /// others may share already); one sequence writes each block, and a block this plan named is full when
        /// the step is done. Then every sequence's blocks hold its own tokens, shared ones included.
        fn step(&mut self, plan: &BatchPlan) {
            let mut writer = HashMap::new();
            for r in &plan.rows {
                let (slot, tokens) = (&self.seqs[&r.seq], &self.tokens[&r.seq]);
                for (p, &token) in tokens.iter().enumerate().skip(r.start).take(r.len) {
                    let b = slot.blocks[p / 4];
                    let own = (self.a.holders(b), self.a.is_named(b)) == (1, false);
                    assert!(own || plan.named.contains(&b), "a write into block {b}, shared or cached");
                    assert_eq!(*writer.entry(b).or_insert(r.seq), r.seq, "two writers of block {b}");
                    self.written.entry(b).or_default()[p % 4] = Some(token);
                }
            }
            for b in &plan.named {
                assert_eq!(
                    writer.get(b).map(|_| self.written[b][3].is_some()),
                    Some(true),
                    "named block {b} not filled"
                );
            }
            for r in &plan.rows {
                self.seqs.get_mut(&r.seq).unwrap().computed += r.len;
                if r.samples {
                    self.seqs.get_mut(&r.seq).unwrap().len += 1;
                    self.tokens.get_mut(&r.seq).unwrap().push(7);
                }
            }
            for (id, slot) in &self.seqs {
                for p in 0..slot.computed {
                    let b = slot.blocks[p / 4];
                    assert_eq!(self.written[&b][p % 4], Some(self.tokens[id][p]), "sequence {id} position {p}");
                }
            }
        }

        fn remove(&mut self, id: SeqId) {
            self.s.remove(id, &mut self.seqs, &mut self.a);
            self.seqs.remove(&id);
        }
    }

    #[test]
    fn an_admitted_sequence_starts_after_its_cached_prefix() {
        let mut c = Cached::new(64, 100);
        let prompt: Vec<u32> = (0..10).collect();
        c.add(1, &prompt, "", true);
        let p = c.plan();
        assert_eq!(p.rows, vec![PlannedRow { seq: 1, start: 0, len: 10, samples: true }]);
        c.step(&p);
        // The same prompt: its two full blocks are shared, its last 2 tokens computed.
        c.add(2, &prompt, "", true);
        let p = c.plan();
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 8, len: 2, samples: true });
        assert_eq!(c.seqs[&2].blocks[..2], c.seqs[&1].blocks[..2]);
        c.step(&p);
        // Sequence 1 now knows 12 tokens: a prompt of those 12 looks up the 11 before its last, which hold two
        // full blocks.
        let grown = c.tokens[&1].clone();
        assert_eq!(grown.len(), 12);
        c.add(3, &grown[..12], "", true);
        let p = c.plan();
        assert_eq!(p.rows[2], PlannedRow { seq: 3, start: 8, len: 4, samples: true }, "11 known tokens: 2 full blocks");
        c.step(&p);
        // A prompt of whole blocks leaves its last block to compute (its last token's logits are needed).
        c.add(4, &prompt[..8], "", true);
        assert_eq!(c.plan().rows.last().unwrap(), &PlannedRow { seq: 4, start: 4, len: 4, samples: true });
    }

    /// Two sequences of the same prompt admitted in one step: the second shares the blocks the first computes
    /// in that step, and computes its last tokens only.
    #[test]
    fn a_sequence_shares_the_blocks_an_earlier_one_computes_in_the_same_step() {
        let prompt: Vec<u32> = (0..10).collect();
        // Two sequences of `prompt`, in steps of at most `budget` tokens.
        let twice = |budget: usize| {
            let mut c = Cached::new(64, budget);
            c.add(1, &prompt, "", true);
            c.add(2, &prompt, "", true);
            c
        };
        let mut c = twice(100);
        let p = c.plan();
        assert_eq!(
            p.rows,
            vec![
                PlannedRow { seq: 1, start: 0, len: 10, samples: true },
                PlannedRow { seq: 2, start: 8, len: 2, samples: true }
            ]
        );
        assert_eq!(p.named, c.seqs[&1].blocks[..2]);
        c.step(&p);
        // In chunks of 6 tokens: the first step computes 6 of the first sequence's 10 and names its first
        // block; the second, its other 4, naming the second block, which the second sequence, admitted in that
        // step with the 2 tokens of budget left, shares already.
        let mut c = twice(6);
        let p = c.plan();
        assert_eq!(p.rows, vec![PlannedRow { seq: 1, start: 0, len: 6, samples: false }]);
        assert_eq!(p.named.len(), 1);
        c.step(&p);
        let p = c.plan();
        assert_eq!(
            p.rows,
            vec![
                PlannedRow { seq: 1, start: 6, len: 4, samples: true },
                PlannedRow { seq: 2, start: 8, len: 2, samples: true }
            ]
        );
        c.step(&p);
    }

    #[test]
    fn no_reuse_across_salts_or_when_the_prompt_is_scored() {
        let mut c = Cached::new(64, 100);
        let prompt: Vec<u32> = (0..9).collect();
        c.add(1, &prompt, "a@1", true);
        let p = c.plan();
        c.step(&p);
        c.add(2, &prompt, "a@2", true); // another version of the adapter
        c.add(3, &prompt, "a@1", false); // scores its prompt
        c.add(4, &prompt, "a@1", true);
        let p = c.plan();
        let starts: Vec<(SeqId, usize)> = p.rows.iter().map(|r| (r.seq, r.start)).collect();
        assert_eq!(starts, vec![(1, 9), (2, 0), (3, 0), (4, 8)]);
    }

    #[test]
    fn a_preempted_sequence_finds_its_own_blocks_again() {
        let mut c = Cached::new(4, 100);
        c.add(1, &[1, 2, 3, 4], "", true);
        c.add(2, &(10..18).collect::<Vec<u32>>(), "", true);
        let p = c.plan();
        c.step(&p);
        assert_eq!(c.a.free_blocks(), 1);
        // 1 takes the last free block; 2 needs one more: 2 is preempted, its two blocks stay cached.
        let p = c.plan();
        assert_eq!(p.preempted, vec![2]);
        c.step(&p);
        c.remove(1);
        assert_eq!((c.a.used_blocks(), c.a.cached_blocks()), (0, 3));
        // Recomputed: 9 known tokens, 8 of them in its two cached blocks.
        let p = c.plan();
        assert_eq!(p.rows, vec![PlannedRow { seq: 2, start: 8, len: 1, samples: true }]);
    }

    /// Shared blocks are held once per sequence; every block comes back, and admission that cannot get its
    /// blocks gives back the shared ones too.
    #[test]
    fn cached_blocks_are_counted_right_under_random_use() {
        let mut c = Cached::new(10, 16);
        let mut next = 0;
        let mut rng = crate::rng::Rng::new(11);
        for _ in 0..800 {
            if rng.below(3) == 0 {
                next += 1;
                let len = 1 + rng.below(12) as usize;
                let prompt: Vec<u32> = (0..len as u32).map(|i| if i < 5 { rng.below(2) as u32 } else { i }).collect();
                c.add(next, &prompt, if rng.below(5) == 0 { "x" } else { "" }, rng.below(6) != 0);
            }
            let p = c.plan();
            let mut held: Vec<u32> = c.seqs.values().flat_map(|x| x.blocks.iter().copied()).collect();
            held.sort_unstable();
            held.dedup();
            assert_eq!(held.len(), c.a.used_blocks());
            for r in &p.rows {
                let slot = &c.seqs[&r.seq];
                assert_eq!(r.start, slot.computed);
                assert!(r.len > 0, "a row computes something: {r:?}");
                assert!(r.start + r.len <= slot.blocks.len() * 4, "room for the chunk");
                assert!(r.start + r.len <= slot.len);
            }
            c.step(&p);
            for r in &p.rows {
                if c.seqs[&r.seq].len > 20 {
                    c.remove(r.seq);
                }
            }
        }
        for id in c.seqs.keys().copied().collect::<Vec<_>>() {
            c.remove(id);
        }
        assert_eq!(c.a.used_blocks(), 0);
    }

    #[test]
    fn blocks_never_exceed_capacity_and_are_all_returned() {
        let (mut s, mut seqs, mut a) = setup(10, 4, 16);
        let mut next = 0;
        let mut rng = crate::rng::Rng::new(3);
        for _ in 0..500 {
            if rng.below(3) == 0 {
                next += 1;
                add(&mut s, &mut seqs, next, 1 + rng.below(12) as usize);
            }
            let p = s.plan(&mut seqs, &mut a, |_| &[]);
            let held: usize = seqs.values().map(|x| x.blocks.len()).sum();
            assert_eq!(held, a.used_blocks());
            assert!(a.used_blocks() <= 10);
            step(&p, &mut seqs);
            for r in &p.rows {
                if seqs[&r.seq].len > 20 {
                    s.remove(r.seq, &mut seqs, &mut a);
                }
            }
        }
        for id in seqs.keys().copied().collect::<Vec<_>>() {
            s.remove(id, &mut seqs, &mut a);
        }
        assert_eq!(a.used_blocks(), 0);
    }
}
