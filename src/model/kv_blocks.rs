//! Which KV-cache blocks are free, which sequences hold them, and the prefix cache: full blocks remembered by
//! what they hold, so a sequence whose tokens start like an earlier one's (under the same adapter version)
//! shares that one's blocks instead of computing them again — vLLM's automatic prefix caching.
//!
//! A full block's keys and values depend on its tokens, on every token before them and on the adapter, so a
//! block is named by a chain: its tokens and its parent's name, and at the root a salt (the adapter, its
//! version, the request's cache salt), kept as its SHA-256 digest so a long salt costs no memory. Tokens are
//! compared whole, never by a hash, so two different prefixes under one salt cannot share a block.
//!
//! Blocks are reference-counted. A named block that no sequence holds any more stays cached and evictable:
//! it is handed out again (its name forgotten) only once no never-named block is left, least recently released
//! first. The scheduler releases a sequence's blocks last block first, so a prompt's head outlives its tail
//! (a tail is of no use without its head).
//!
//! Pure bookkeeping: no tensors, no threads.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// What a named block's keys and values were computed from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BlockName {
    parent: Parent,
    tokens: Box<[u32]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Parent {
    /// The first block of a sequence: the digest of the salt of what else its keys and values depend on.
    Root([u8; 32]),
    /// The [`Cached::content`] of the block before.
    Block(u64),
}

/// A name's block, and the id its children name it by (never reused, so a child of an evicted block can never
/// be found again through a new block of the same name).
#[derive(Clone, Copy, Debug)]
struct Cached {
    block: u32,
    content: u64,
}

/// A sequence's place in the prefix cache: how many of its leading blocks are named (found there, or named
/// by it for the step that computes them) and the last one's content id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixChain {
    salt: [u8; 32],
    named: usize,
    last: Option<u64>,
}

impl PrefixChain {
    /// A sequence whose keys and values depend on `salt` besides its tokens (the adapter's id and version,
    /// the request's cache salt).
    pub fn new(salt: &str) -> Self {
        PrefixChain { salt: Sha256::digest(salt.as_bytes()).into(), named: 0, last: None }
    }

    /// Leading blocks named so far.
    pub fn named_blocks(&self) -> usize {
        self.named
    }

    /// Forgets the blocks (the sequence gave them back).
    pub fn reset(&mut self) {
        self.named = 0;
        self.last = None;
    }

    fn name(&self, tokens: &[u32]) -> BlockName {
        let parent = match self.last {
            Some(c) => Parent::Block(c),
            None => Parent::Root(self.salt),
        };
        BlockName { parent, tokens: tokens.into() }
    }
}

/// Block ids: free, held (reference-counted), or cached and evictable.
#[derive(Debug)]
pub struct BlockAllocator {
    capacity: usize,
    /// Never named (or no longer): handed out first, low ids first (popped from the end).
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Each block's name while it is cached.
    names: Vec<Option<BlockName>>,
    table: HashMap<BlockName, Cached>,
    /// Named blocks no sequence holds, by release time (oldest evicted first), and each one's time.
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    next_content: u64,
}

impl BlockAllocator {
    pub fn new(capacity: usize) -> Self {
        BlockAllocator {
            capacity,
            free: (0..capacity as u32).rev().collect(),
            refs: vec![0; capacity],
            names: vec![None; capacity],
            table: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; capacity],
            clock: 0,
            next_content: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks an [`allocate`](Self::allocate) can hand out: never-named ones and cached ones no sequence holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks some sequence holds.
    pub fn used_blocks(&self) -> usize {
        self.capacity - self.free_blocks()
    }

    /// Blocks with a name in the prefix cache, held or not (a block whose parent was evicted first is counted
    /// until it is evicted in turn, though no lookup can reach it any more).
    pub fn cached_blocks(&self) -> usize {
        self.table.len()
    }

    /// Takes `n` blocks (each held once), or none if fewer than `n` can be handed out. Never-named blocks go
    /// first; then cached ones are evicted, least recently released first.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free_blocks() {
            return None;
        }
        let from_free = n.min(self.free.len());
        let at = self.free.len() - from_free;
        let mut out: Vec<u32> = self.free.split_off(at).into_iter().rev().collect();
        while out.len() < n {
            let (_, b) = self.evictable.pop_first().expect("counted above");
            let name = self.names[b as usize].take().expect("an evictable block is named");
            self.table.remove(&name);
            out.push(b);
        }
        for &b in &out {
            self.refs[b as usize] = 1;
        }
        Some(out)
    }

    /// Gives back one hold on each block, in order: a block no one holds any more is free again, or, when
    /// named, stays cached and evictable (those released first are evicted first).
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for b in blocks {
            let i = b as usize;
            assert!(i < self.capacity && self.refs[i] > 0, "release of block {b}, which no sequence holds");
            self.refs[i] -= 1;
            if self.refs[i] > 0 {
                continue;
            }
            if self.names[i].is_some() {
                self.released_at[i] = self.clock;
                self.evictable.insert(self.clock, b);
                self.clock += 1;
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached blocks that hold the leading full blocks of `tokens` after `chain`'s salt, as many as are
    /// cached in a row, each now held once more; `chain` then names them. `chain` must name nothing yet.
    pub fn share_prefix(&mut self, chain: &mut PrefixChain, tokens: &[u32], block_size: usize) -> Vec<u32> {
        debug_assert_eq!(chain.named, 0, "a prefix is looked up before the sequence holds any block");
        let mut shared = Vec::new();
        for block_tokens in tokens.chunks_exact(block_size) {
            let Some(&Cached { block, content }) = self.table.get(&chain.name(block_tokens)) else { break };
            let i = block as usize;
            if self.refs[i] == 0 {
                self.evictable.remove(&self.released_at[i]);
            }
            self.refs[i] += 1;
            shared.push(block);
            chain.named += 1;
            chain.last = Some(content);
        }
        shared
    }

    /// Names the sequence's full blocks after those `chain` names: `blocks` is its block table, `tokens` its
    /// tokens, of which the first `computed` have their keys and values in the cache once the step being
    /// planned has run; the blocks it names are added to `named` (to [`forget`](Self::forget) if that step
    /// fails). When a name is cached
    /// already (another sequence computed the same tokens at the same time, or this one did not look the
    /// prefix up) and some sequence holds that block, this one's copy stays unnamed and the chain goes on from
    /// the cached one; when no one holds it, this sequence's block takes over the name and its content id (so
    /// the blocks named after it stay reachable), and the old copy is free.
    pub fn name_blocks(
        &mut self,
        chain: &mut PrefixChain,
        blocks: &[u32],
        tokens: &[u32],
        computed: usize,
        block_size: usize,
        named: &mut Vec<u32>,
    ) {
        let full = (computed / block_size).min(blocks.len());
        for b in chain.named..full {
            let name = chain.name(&tokens[b * block_size..(b + 1) * block_size]);
            let content = match self.table.get(&name).copied() {
                Some(c) if self.refs[c.block as usize] > 0 => c.content,
                cached => {
                    let content = match cached {
                        Some(old) => {
                            let i = old.block as usize;
                            self.evictable.remove(&self.released_at[i]);
                            self.names[i] = None;
                            self.free.push(old.block);
                            old.content
                        }
                        None => {
                            self.next_content += 1;
                            self.next_content - 1
                        }
                    };
                    let block = blocks[b];
                    debug_assert!(self.names[block as usize].is_none(), "block {block} is named twice");
                    self.names[block as usize] = Some(name.clone());
                    self.table.insert(name, Cached { block, content });
                    named.push(block);
                    content
                }
            };
            chain.named = b + 1;
            chain.last = Some(content);
        }
    }

    /// Takes the names of `blocks` back (their step failed: they do not hold what their names say). A block
    /// no sequence holds is free again. A name the step took over from an unheld cached copy
    /// ([`name_blocks`](Self::name_blocks)) is lost with it: the copy was freed when the step was planned.
    pub fn forget(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            let Some(name) = self.names[i].take() else { continue };
            self.table.remove(&name);
            if self.refs[i] == 0 {
                self.evictable.remove(&self.released_at[i]);
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
impl BlockAllocator {
    /// Sequences holding `block`.
    pub(crate) fn holders(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// Whether `block` has a name in the prefix cache.
    pub(crate) fn is_named(&self, block: u32) -> bool {
        self.names[block as usize].is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_and_takes_back() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.used_blocks(), 3);
        a.release(x);
        assert_eq!(a.free_blocks(), 4);
        assert_eq!(a.allocate(4).unwrap().len(), 4);
    }

    /// Computes a sequence of `tokens` as the scheduler would: shares what is cached, allocates the rest, names
    /// its full blocks. Returns its block table and how many blocks were shared.
    fn run(a: &mut BlockAllocator, salt: &str, tokens: &[u32], bs: usize) -> (Vec<u32>, usize, PrefixChain) {
        let mut chain = PrefixChain::new(salt);
        let mut blocks = a.share_prefix(&mut chain, &tokens[..tokens.len() - 1], bs);
        let shared = blocks.len();
        blocks.extend(a.allocate(tokens.len().div_ceil(bs) - shared).unwrap());
        a.name_blocks(&mut chain, &blocks, tokens, tokens.len(), bs, &mut Vec::new());
        (blocks, shared, chain)
    }

    #[test]
    fn a_prefix_is_shared_by_its_tokens_and_salt_and_never_half_a_block() {
        let mut a = BlockAllocator::new(16);
        let t: Vec<u32> = (0..10).collect();
        let (first, shared, chain) = run(&mut a, "", &t, 4);
        assert_eq!((shared, chain.named_blocks(), a.cached_blocks()), (0, 2, 2), "two full blocks named");
        // The same tokens: the two full blocks are shared, the third (2 tokens) is the sequence's own.
        let (second, shared, _) = run(&mut a, "", &t, 4);
        assert_eq!(shared, 2);
        assert_eq!(second[..2], first[..2]);
        assert_ne!(second[2], first[2]);
        assert_eq!(a.used_blocks(), 4);
        // Another salt (adapter), or the first block different: nothing shared.
        assert_eq!(run(&mut a, "bot@v1", &t, 4).1, 0);
        let mut other = t.clone();
        other[0] = 99;
        assert_eq!(run(&mut a, "", &other, 4).1, 0);
    }

    #[test]
    fn released_blocks_stay_cached_until_needed_and_the_oldest_go_first() {
        let mut a = BlockAllocator::new(4);
        let t: Vec<u32> = (0..9).collect();
        let (blocks, _, _) = run(&mut a, "", &t, 4);
        // Released tail first, as the scheduler does.
        a.release(blocks.iter().rev().copied());
        assert_eq!((a.free_blocks(), a.used_blocks(), a.cached_blocks()), (4, 0, 2));
        // The never-named blocks (the fourth, and the third, which held 1 token) go before any cached one.
        let one = a.allocate(2).unwrap();
        assert_eq!(a.cached_blocks(), 2);
        // The next evicts the least recently released: the tail (block 1), so the head is still found.
        let two = a.allocate(1).unwrap();
        assert_eq!(two, vec![blocks[1]]);
        assert_eq!(a.cached_blocks(), 1);
        let mut chain = PrefixChain::new("");
        assert_eq!(a.share_prefix(&mut chain, &t, 4), vec![blocks[0]]);
        assert_eq!(a.used_blocks(), 4, "a shared cached block is held again, no longer evictable");
        a.release(one.into_iter().chain(two).chain([blocks[0]]));
        assert_eq!(a.used_blocks(), 0);
    }

    #[test]
    fn the_same_block_computed_twice_at_once_is_named_once() {
        let mut a = BlockAllocator::new(8);
        let t: Vec<u32> = (0..9).collect();
        // Two sequences of the same tokens, both computing (neither found the other's blocks).
        let (mut c1, mut c2) = (PrefixChain::new(""), PrefixChain::new(""));
        let b1 = a.allocate(3).unwrap();
        let b2 = a.allocate(3).unwrap();
        a.name_blocks(&mut c1, &b1, &t, 9, 4, &mut Vec::new());
        a.name_blocks(&mut c2, &b2, &t, 9, 4, &mut Vec::new());
        assert_eq!(a.cached_blocks(), 2, "the second sequence's copies stay unnamed");
        assert_eq!(c2, c1, "and its chain goes on from the named ones");
        a.release(b2.iter().rev().copied());
        assert_eq!(a.free_blocks(), 5, "its unnamed copies are free at once, not cached");
        a.release(b1.iter().rev().copied());
        assert_eq!((a.free_blocks(), a.cached_blocks()), (8, 2));
    }

    /// A sequence that computed a cached block itself (it scored its prompt, so did not look it up) takes the
    /// name over when no one holds the cached copy: the chain after it stays reachable, the copy is free.
    #[test]
    fn an_unheld_cached_copy_gives_its_name_to_the_new_one() {
        let mut a = BlockAllocator::new(6);
        let t: Vec<u32> = (0..9).collect();
        let (old, _, _) = run(&mut a, "", &t, 4);
        a.release(old.iter().rev().copied());
        let mut chain = PrefixChain::new("");
        let new = a.allocate(3).unwrap();
        assert!(!new.contains(&old[0]) && !new.contains(&old[1]), "never-named blocks first: {new:?}");
        a.name_blocks(&mut chain, &new[..1], &t, 4, 4, &mut Vec::new());
        assert_eq!((a.cached_blocks(), a.free_blocks(), a.used_blocks()), (2, 3, 3), "the old head is free");
        a.release(new.iter().rev().copied());
        let mut again = PrefixChain::new("");
        // Its new head, then the old second block, named after the same content id.
        assert_eq!(a.share_prefix(&mut again, &t, 4), vec![new[0], old[1]]);
    }

    /// The names of a failed step's blocks are taken back: nothing finds them, and unheld they are free.
    #[test]
    fn forgotten_blocks_are_found_no_more() {
        let mut a = BlockAllocator::new(4);
        let t: Vec<u32> = (0..9).collect();
        let mut chain = PrefixChain::new("");
        let blocks = a.allocate(3).unwrap();
        let mut named = Vec::new();
        a.name_blocks(&mut chain, &blocks, &t, 9, 4, &mut named);
        assert_eq!(named, blocks[..2]);
        a.release(blocks[..1].iter().copied());
        a.forget(&named);
        assert_eq!((a.cached_blocks(), a.used_blocks(), a.free_blocks()), (0, 2, 2));
        assert!(a.share_prefix(&mut PrefixChain::new(""), &t, 4).is_empty());
        a.release(blocks[1..].iter().copied());
        assert_eq!(a.free_blocks(), 4);
    }

    /// A block evicted and named again gets a new content id: the children of its old contents are not found
    /// through it.
    #[test]
    fn children_of_an_evicted_block_are_not_found_again() {
        let mut a = BlockAllocator::new(3);
        let t: Vec<u32> = (0..9).collect();
        let (blocks, _, _) = run(&mut a, "", &t, 4);
        // Release the head first this time, so it is evicted first (after the never-named third block).
        a.release(blocks.iter().copied());
        let two = a.allocate(2).unwrap();
        assert_eq!(two, vec![blocks[2], blocks[0]]);
        a.release(two);
        assert_eq!(a.cached_blocks(), 1, "only the second block is still cached");
        // The head computed again, by a sequence of 5 tokens (one full block).
        let (again, shared, _) = run(&mut a, "", &t[..5], 4);
        assert_eq!(shared, 0);
        a.release(again.iter().rev().copied());
        let mut chain = PrefixChain::new("");
        let found = a.share_prefix(&mut chain, &t, 4);
        assert_eq!(found.len(), 1, "the old second block's parent is gone: {found:?}");
        a.release(found);
    }

    #[test]
    fn random_use_keeps_the_counts_right() {
        let mut a = BlockAllocator::new(12);
        let mut rng = crate::rng::Rng::new(5);
        let mut held: Vec<Vec<u32>> = Vec::new();
        for _ in 0..2000 {
            if !held.is_empty() && rng.below(3) == 0 {
                let i = rng.below(held.len() as u64) as usize;
                a.release(held.swap_remove(i).into_iter().rev());
            } else {
                // Few distinct prompts, so prefixes are often shared.
                let len = 2 + rng.below(14) as usize;
                let t: Vec<u32> = (0..len as u32).map(|i| if i < 6 { rng.below(2) as u32 } else { i }).collect();
                let mut chain = PrefixChain::new(if rng.below(4) == 0 { "x" } else { "" });
                // Some do not look their prefix up (they score their prompt), and name what they compute.
                let mut blocks =
                    if rng.below(5) == 0 { Vec::new() } else { a.share_prefix(&mut chain, &t[..len - 1], 4) };
                match a.allocate(len.div_ceil(4) - blocks.len()) {
                    Some(more) => {
                        blocks.extend(more);
                        a.name_blocks(&mut chain, &blocks, &t, len, 4, &mut Vec::new());
                        held.push(blocks);
                    }
                    None => a.release(blocks.into_iter().rev()),
                }
            }
            let holds: usize = held.iter().map(Vec::len).sum();
            assert_eq!(a.refs.iter().map(|&r| r as usize).sum::<usize>(), holds);
            assert_eq!(a.used_blocks(), a.refs.iter().filter(|&&r| r > 0).count());
            assert_eq!(a.table.len(), a.names.iter().flatten().count());
            assert!(a.evictable.values().all(|&b| a.refs[b as usize] == 0 && a.names[b as usize].is_some()));
            assert!(a.free.iter().all(|&b| a.refs[b as usize] == 0 && a.names[b as usize].is_none()));
        }
        for h in held {
            a.release(h);
        }
        assert_eq!(a.used_blocks(), 0);
    }
}
