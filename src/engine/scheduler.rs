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

use std::collections::{HashMap, VecDeque};

use crate::model::kv_cache::BlockAllocator;

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
}

impl SeqSlot {
    pub fn new(prompt_len: usize, priority: u64) -> Self {
        SeqSlot { len: prompt_len, computed: 0, blocks: Vec::new(), priority }
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
            alloc.release(slot.blocks.drain(..));
            slot.computed = 0;
        }
    }

    /// Frees `id`'s blocks and puts it back in the queue, in arrival order, to be recomputed.
    fn preempt(&mut self, id: SeqId, seqs: &mut HashMap<SeqId, SeqSlot>, alloc: &mut BlockAllocator) {
        self.running.retain(|&s| s != id);
        let slot = seqs.get_mut(&id).expect("preempted sequence exists");
        alloc.release(slot.blocks.drain(..));
        slot.computed = 0;
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

    /// Plans the next step.
    pub fn plan(&mut self, seqs: &mut HashMap<SeqId, SeqSlot>, alloc: &mut BlockAllocator) -> BatchPlan {
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
                // Out of blocks: preempt the youngest running sequence (possibly this one) and retry.
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
            let len = seqs[&id].len;
            let want = len.min(budget);
            if !self.grow(id, want, seqs, alloc) {
                // Release what a partial grow took and wait for blocks.
                let slot = seqs.get_mut(&id).expect("waiting sequence exists");
                alloc.release(slot.blocks.drain(..));
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            plan.rows.push(PlannedRow { seq: id, start: 0, len: want, samples: want == len });
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
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows, vec![PlannedRow { seq: 1, start: 0, len: 3, samples: true }]);
        step(&p, &mut seqs);
        add(&mut s, &mut seqs, 2, 25);
        let p = s.plan(&mut seqs, &mut a);
        // Sequence 1 decodes one token; sequence 2 gets the remaining 9 of the budget.
        assert_eq!(
            p.rows,
            vec![
                PlannedRow { seq: 1, start: 3, len: 1, samples: true },
                PlannedRow { seq: 2, start: 0, len: 9, samples: false }
            ]
        );
        step(&p, &mut seqs);
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 9, len: 9, samples: false });
        step(&p, &mut seqs);
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 18, len: 7, samples: true });
        assert_eq!(seqs[&2].blocks.len(), 7, "25 positions in blocks of 4");
    }

    #[test]
    fn admission_is_fifo_and_bounded_by_rows_and_blocks() {
        let (mut s, mut seqs, mut a) = setup(3, 2, 100);
        add(&mut s, &mut seqs, 1, 4); // 1 block
        add(&mut s, &mut seqs, 2, 9); // 3 blocks: does not fit next to 1
        add(&mut s, &mut seqs, 3, 1); // would fit, but must not jump the queue
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.waiting(), 2);
        assert_eq!(a.used_blocks(), 1, "the partial grow of sequence 2 was given back");
        s.remove(1, &mut seqs, &mut a);
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
        // Max 2 rows: with 2 and 3 running nothing else is admitted.
        let (mut s, mut seqs, mut a) = setup(100, 2, 100);
        for id in 1..=3 {
            add(&mut s, &mut seqs, id, 2);
        }
        assert_eq!(s.plan(&mut seqs, &mut a).rows.len(), 2);
    }

    #[test]
    fn out_of_blocks_preempts_the_youngest_and_recomputes_it_later() {
        let (mut s, mut seqs, mut a) = setup(4, 8, 100);
        add(&mut s, &mut seqs, 1, 4);
        add(&mut s, &mut seqs, 2, 4);
        add(&mut s, &mut seqs, 3, 8);
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows.len(), 3);
        assert_eq!(a.free_blocks(), 0);
        step(&p, &mut seqs);
        // Every sequence now needs a new block for its next token: the youngest (3) is preempted, and
        // its two blocks let 1 and 2 continue.
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.preempted, vec![3]);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(seqs[&3].computed, 0);
        assert!(seqs[&3].blocks.is_empty());
        step(&p, &mut seqs);
        s.remove(1, &mut seqs, &mut a);
        s.remove(2, &mut seqs, &mut a);
        // Recompute: its whole known sequence (8 prompt + 1 generated) is prefilled again, then it samples.
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows, vec![PlannedRow { seq: 3, start: 0, len: 9, samples: true }]);
    }

    /// The blocks a preemption frees go to the running sequences: neither the victim nor anyone else waiting
    /// is admitted in that step (the victim's first chunk would fit, and be preempted again next step).
    #[test]
    fn a_step_that_preempts_admits_no_one() {
        let (mut s, mut seqs, mut a) = setup(3, 8, 5);
        add(&mut s, &mut seqs, 1, 4);
        add(&mut s, &mut seqs, 2, 8);
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows[1], PlannedRow { seq: 2, start: 0, len: 1, samples: false });
        step(&p, &mut seqs);
        add(&mut s, &mut seqs, 3, 1);
        // 1 takes the last free block for its next token; 2's next chunk needs one more: 2 is preempted, and
        // its freed block would hold a 4-token chunk of it (or all of 3), but the step admits no one.
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.rows, vec![PlannedRow { seq: 1, start: 4, len: 1, samples: true }]);
        assert_eq!((s.waiting(), a.free_blocks()), (2, 1));
        step(&p, &mut seqs);
        // The next step admits again, oldest first.
        let p = s.plan(&mut seqs, &mut a);
        assert_eq!(p.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(p.preempted.is_empty());
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
            let p = s.plan(&mut seqs, &mut a);
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
