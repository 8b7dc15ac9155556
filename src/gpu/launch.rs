//! Kernel choice and launch geometry for the GPU kernels in `kernels/`: plain arithmetic, kept apart from
//! the device code so it is unit-tested on machines without a GPU.

use super::routes::{self, Route, Routes};

/// The NF4 kernels' CUDA C source (NVRTC compiles it on first use).
pub const NF4_SOURCE: &str = include_str!("kernels/nf4.cu");
/// The batched-LoRA kernels' CUDA C source.
pub const LORA_SOURCE: &str = include_str!("kernels/lora.cu");
/// The paged-attention kernels' CUDA C source.
pub const ATTENTION_SOURCE: &str = include_str!("kernels/attention.cu");
/// The greedy-pick kernel's CUDA C source.
pub const SAMPLE_SOURCE: &str = include_str!("kernels/sample.cu");
/// The fused element-wise kernels' CUDA C source (residual add + RMS norm, SiLU·mul).
pub const FUSED_SOURCE: &str = include_str!("kernels/fused.cu");

/// One kernel launch: which function, and its grid and block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// The splits of K that give `tiles` output tiles at least `blocks` blocks (the most K's `steps` allow if
/// none does); 1 when `blocks` is 0.
fn splits_for(tiles: usize, steps: usize, blocks: usize) -> usize {
    let allowed = NF4_SPLITS.iter().copied().filter(|&s| s <= steps);
    allowed.clone().find(|&s| tiles * s >= blocks).unwrap_or_else(|| allowed.max().unwrap_or(1))
}
/// Warps per GEMV thread block, as `WARPS_PER_BLOCK` in `kernels/nf4.cu`.
const GEMV_WARPS: usize = 4;
/// The GEMV kernels compiled (`nf4_gemv_r{R}`): rows handled, output columns a block.
const GEMV_KERNELS: [(usize, usize, &str); 4] =
    [(1, 4, "nf4_gemv_r1"), (2, 4, "nf4_gemv_r2"), (4, 8, "nf4_gemv_r4"), (8, 8, "nf4_gemv_r8")];
/// The tensor-core kernels by the rows of their output tile (`nf4_matmul_mma{BM}`): 16 for batches of 9..16
/// rows, 32 beyond. Each tile is `MMA_BN` columns wide (as in `kernels/nf4.cu`), computed by 4 warps.
const MMA_KERNELS: [(usize, &str); 2] = [(16, "nf4_matmul_mma16"), (32, "nf4_matmul_mma32")];
const MMA_BN: usize = 32;
/// K per step of the tensor-core kernels (`MMA_BK`): a split of K takes whole steps.
const MMA_BK: usize = 128;
const MMA_THREADS: u32 = 128;
/// The splits of K the device bench compares for decode batches (`gridDim.z` of the tensor-core kernels).
pub const NF4_SPLITS: [usize; 4] = [1, 2, 4, 8];
/// Output tiles a split-K launch may have: the length of the `tile_done` counters each stream keeps
/// (`gpu::nf4`). 16,384 tiles of 32 columns are 512Ki outputs, four times a 128k vocabulary.
pub const NF4_SPLIT_TILES_MAX: usize = 16_384;
/// Weight elements the kernels take: their NF4 block indices (`e / 64`) are 32-bit.
const NF4_MAX_ELEMENTS: usize = 1 << 37;
/// CUDA's limit on grid.y and grid.z.
const MAX_GRID_YZ: usize = 65_535;

/// The launch computing `y[m, n] = x[m, k] · W[n, k]ᵀ` for an NF4 weight: for `k % 64 == 0` the route the
/// table in effect ([`routes::in_effect`]) gives the rows (a GEMV kernel sized to them, or tensor-core tiles),
/// the generic kernel for other widths. Errors name the shape the kernels cannot take.
pub fn nf4_matmul(m: usize, n: usize, k: usize) -> Result<Launch, String> {
    nf4_matmul_routed(routes::in_effect()?, m, n, k)
}

/// [`nf4_matmul`] under the routing table `routes`.
pub fn nf4_matmul_routed(routes: &Routes, m: usize, n: usize, k: usize) -> Result<Launch, String> {
    if m == 0 || n == 0 || k == 0 {
        return Err(format!("NF4 matmul of an empty shape (m={m}, n={n}, k={k})"));
    }
    if n.checked_mul(k).is_none_or(|e| e >= NF4_MAX_ELEMENTS) {
        return Err(format!(
            "NF4 weight of {n} × {k}: the kernels index its NF4 blocks with 32 bits (under 2^37 elements)"
        ));
    }
    // The kernels take m, n, k as `int` and step through K in 1,024-wide strides.
    if m.max(n).max(k + 1024) > i32::MAX as usize {
        return Err(format!("NF4 matmul of {m} × {n} × {k}: the kernels count rows, columns and K with 32 bits"));
    }
    if !k.is_multiple_of(64) {
        // Blocks straddle rows: the scalar kernel, one warp per output.
        if m > MAX_GRID_YZ || n.div_ceil(GEMV_WARPS) > u32::MAX as usize {
            return Err(format!("NF4 matmul too large for one launch (m={m}, n={n})"));
        }
        return Ok(Launch {
            kernel: "nf4_matmul_generic",
            grid: (n.div_ceil(GEMV_WARPS) as u32, m as u32, 1),
            block: (32 * GEMV_WARPS as u32, 1, 1),
        });
    }
    match routes.route(m) {
        Route::Gemv => {
            let Some(&(_, cols, kernel)) = GEMV_KERNELS.iter().find(|&&(r, _, _)| r >= m) else {
                return Err(format!("no GEMV kernel for {m} rows (the route table `{routes}` is wrong)"));
            };
            Ok(Launch { kernel, grid: (n.div_ceil(cols) as u32, 1, 1), block: (32 * GEMV_WARPS as u32, 1, 1) })
        }
        Route::Mma { bm, blocks } => {
            // Split-K is for launches of few tiles (decode batches); one past the split counters' length has
            // blocks enough whole.
            let tiles = n.div_ceil(MMA_BN) * m.div_ceil(bm);
            let splits = if tiles > NF4_SPLIT_TILES_MAX { 1 } else { splits_for(tiles, k.div_ceil(MMA_BK), blocks) };
            nf4_mma(m, n, k, bm, splits)
        }
    }
}

/// The tensor-core launch for `m` rows in tiles of `bm` rows (16 or 32) with K split `splits` ways (a block
/// per tile and split, `grid.z = splits`), whatever [`nf4_matmul`] would pick: `benches/gpu_kernels.rs` times
/// these [`nf4_candidates`] against each other. Like the GEMV kernels, these need whole NF4 blocks per row
/// (`k % 64 == 0`); a split takes whole 128-wide steps of K, at least one.
pub fn nf4_mma(m: usize, n: usize, k: usize, bm: usize, splits: usize) -> Result<Launch, String> {
    let Some(&(_, kernel)) = MMA_KERNELS.iter().find(|&&(b, _)| b == bm) else {
        return Err(format!("no tensor-core NF4 kernel with {bm}-row tiles"));
    };
    if m == 0 || n == 0 || k == 0 {
        return Err(format!("NF4 matmul of an empty shape (m={m}, n={n}, k={k})"));
    }
    if !k.is_multiple_of(64) {
        return Err(format!("the tensor-core NF4 kernels need whole NF4 blocks per row, k = {k}"));
    }
    let (gx, gy) = (n.div_ceil(MMA_BN), m.div_ceil(bm));
    if gy > MAX_GRID_YZ || gx > u32::MAX as usize {
        return Err(format!("NF4 matmul too large for one launch (m={m}, n={n})"));
    }
    if splits == 0 || splits > k.div_ceil(MMA_BK) {
        return Err(format!("K = {k} is {} steps of {MMA_BK}: it cannot be split {splits} ways", k.div_ceil(MMA_BK)));
    }
    if splits > 1 && gx * gy > NF4_SPLIT_TILES_MAX {
        return Err(format!(
            "a split-K NF4 matmul takes up to {NF4_SPLIT_TILES_MAX} output tiles, m={m} × n={n} makes {}",
            gx * gy
        ));
    }
    Ok(Launch { kernel, grid: (gx as u32, gy as u32, splits as u32), block: (MMA_THREADS, 1, 1) })
}

/// Floats of `partial` scratch an NF4 launch needs: a tile of output per block when K is split, none
/// otherwise (and none for the GEMV and generic kernels, which never split).
pub fn nf4_workspace(l: &Launch) -> usize {
    match MMA_KERNELS.iter().find(|&&(_, name)| name == l.kernel) {
        Some(&(bm, _)) if l.grid.2 > 1 => l.grid.0 as usize * l.grid.1 as usize * l.grid.2 as usize * bm * MMA_BN,
        _ => 0,
    }
}

/// Whether `l` is one of [`nf4_candidates`] for this shape (checked without listing them, for the device
/// bench's timed calls).
pub fn nf4_is_candidate(m: usize, n: usize, k: usize, l: &Launch) -> bool {
    if nf4_matmul(m, n, k).as_ref() == Ok(l) {
        return true;
    }
    let splits = l.grid.2 as usize;
    MMA_KERNELS.iter().any(|&(bm, name)| {
        name == l.kernel
            && candidate_tile(bm, m)
            && NF4_SPLITS.contains(&splits)
            && nf4_mma(m, n, k, bm, splits).as_ref() == Ok(l)
    })
}

/// Whether the candidates include `bm`-row tensor-core tiles for `m` rows: 16-row tiles always (split K ways
/// they may beat the GEMV), 32-row tiles past 16 rows.
fn candidate_tile(bm: usize, m: usize) -> bool {
    bm == 16 || m > 16
}

/// Every launch that computes `m × n × k` in full: the one [`nf4_matmul`] picks, then the tensor-core tiles
/// with each of [`NF4_SPLITS`] that the shape allows (16-row tiles at any row count, GEMV rows included: split
/// K ways they may beat the GEMV; 32-row tiles past 16 rows). The device bench times them all to settle the
/// routing; `gpu::nf4::launch_into` takes only these.
pub fn nf4_candidates(m: usize, n: usize, k: usize) -> Vec<Launch> {
    let mut out: Vec<Launch> = nf4_matmul(m, n, k).into_iter().collect();
    for (bm, _) in MMA_KERNELS {
        if candidate_tile(bm, m) {
            for splits in NF4_SPLITS {
                match nf4_mma(m, n, k, bm, splits) {
                    Ok(l) if !out.contains(&l) => out.push(l),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Largest adapter rank the LoRA kernels take (`MAX_RANK` in `kernels/lora.cu`: the per-row scratch width).
pub const LORA_MAX_RANK: usize = 128;
const SHRINK_WARPS: u32 = 4;
/// Input features per shrink block (`SHRINK_CHUNK` in `kernels/lora.cu`).
const SHRINK_CHUNK: usize = 512;
const EXPAND_THREADS: usize = 256;

/// The shrink's split of the input features: its blocks per row, and the partial sums it leaves per row
/// (`splits · LORA_MAX_RANK` floats of scratch a row).
pub fn lora_splits(in_features: usize) -> usize {
    in_features.div_ceil(SHRINK_CHUNK)
}

/// The two launches of the batched-LoRA op for `rows` rows: shrink (a block per row and 512 input features)
/// then expand (a block per row and 256 output features).
pub fn lora(rows: usize, in_features: usize, out_features: usize) -> Result<(Launch, Launch), String> {
    if rows == 0 || in_features == 0 || out_features == 0 {
        return Err(format!("batched LoRA of an empty shape ({rows} rows, {in_features} → {out_features})"));
    }
    if !in_features.is_multiple_of(4) {
        return Err(format!("batched LoRA kernels need in_features divisible by 4, got {in_features}"));
    }
    if rows > u32::MAX as usize
        || out_features.div_ceil(EXPAND_THREADS) > MAX_GRID_YZ
        || lora_splits(in_features) > MAX_GRID_YZ
    {
        return Err(format!(
            "batched LoRA too large for one launch ({rows} rows, {in_features} → {out_features} features)"
        ));
    }
    let shrink = Launch {
        kernel: "lora_shrink",
        grid: (rows as u32, lora_splits(in_features) as u32, 1),
        block: (32 * SHRINK_WARPS, 1, 1),
    };
    let expand = Launch {
        kernel: "lora_expand",
        grid: (rows as u32, out_features.div_ceil(EXPAND_THREADS) as u32, 1),
        block: (EXPAND_THREADS as u32, 1, 1),
    };
    Ok((shrink, expand))
}

/// The per-row segment index the LoRA kernels read (`-1`: a base-model row), from segments given as
/// ordered, non-overlapping row ranges (segment `i` is entry `i` of the adapter table).
pub fn lora_row_segments(rows: usize, segments: &[(usize, usize)]) -> Result<Vec<i32>, String> {
    let mut out = vec![-1i32; rows];
    let mut end = 0;
    for (i, &(r0, r1)) in segments.iter().enumerate() {
        if r0 < end || r1 < r0 || r1 > rows {
            return Err(format!("LoRA segments overlap or exceed the batch: {r0}..{r1} of {rows} rows"));
        }
        out[r0..r1].fill(i as i32);
        end = r1;
    }
    Ok(out)
}

/// Limits of `kernels/attention.cu`, the largest bounds it is compiled for: query heads per kv head, head
/// dimension.
pub const ATTENTION_GROUP_MAX: usize = 8;
pub const ATTENTION_HEAD_DIM_MAX: usize = 256;
const ATTENTION_WARPS: u32 = 4;
/// The attention kernels compiled (`paged_attention_g{G}_d{D}`): bounds on the query heads per kv head and on
/// head_dim, smallest first; the launcher takes the first that holds the model's heads.
pub const ATTENTION_KERNELS: [(usize, usize, &str); 12] = [
    (1, 64, "paged_attention_g1_d64"),
    (1, 128, "paged_attention_g1_d128"),
    (1, 256, "paged_attention_g1_d256"),
    (2, 64, "paged_attention_g2_d64"),
    (2, 128, "paged_attention_g2_d128"),
    (2, 256, "paged_attention_g2_d256"),
    (4, 64, "paged_attention_g4_d64"),
    (4, 128, "paged_attention_g4_d128"),
    (4, 256, "paged_attention_g4_d256"),
    (8, 64, "paged_attention_g8_d64"),
    (8, 128, "paged_attention_g8_d128"),
    (8, 256, "paged_attention_g8_d256"),
];

/// The two launches of paged attention: the cache write (one block per row) and the attention (one block
/// per row and kv head, the kernel compiled for the smallest bounds on group and head_dim that hold these
/// heads: fewer registers a thread, more blocks an SM).
pub fn paged_attention(
    rows: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
) -> Result<(Launch, Launch), String> {
    if window == Some(0) {
        return Err("paged attention with a sliding window of 0 positions".into());
    }
    if rows == 0 || heads == 0 || kv_heads == 0 {
        return Err(format!("paged attention of an empty shape ({rows} rows, {heads}/{kv_heads} heads)"));
    }
    if !heads.is_multiple_of(kv_heads) || heads / kv_heads > ATTENTION_GROUP_MAX {
        return Err(format!(
            "paged attention kernel takes up to {ATTENTION_GROUP_MAX} query heads per kv head, got {heads}/{kv_heads}"
        ));
    }
    if head_dim == 0 || head_dim > ATTENTION_HEAD_DIM_MAX {
        return Err(format!("paged attention kernel takes head_dim 1..={ATTENTION_HEAD_DIM_MAX}, got {head_dim}"));
    }
    if rows > u32::MAX as usize || kv_heads > MAX_GRID_YZ {
        return Err(format!("paged attention too large for one launch ({rows} rows, {kv_heads} kv heads)"));
    }
    let group = heads / kv_heads;
    let (_, _, kernel) = ATTENTION_KERNELS
        .iter()
        .copied()
        .find(|&(g, d, _)| g >= group && d >= head_dim)
        .expect("the largest bounds are the limits checked above");
    let write = Launch { kernel: "kv_write", grid: (rows as u32, 1, 1), block: (256, 1, 1) };
    let attend = Launch { kernel, grid: (rows as u32, kv_heads as u32, 1), block: (32 * ATTENTION_WARPS, 1, 1) };
    Ok((write, attend))
}

/// Threads of the argmax kernel's block (`ARGMAX_THREADS` in `kernels/sample.cu`).
const ARGMAX_THREADS: u32 = 256;

/// What the argmax kernel writes for a row with nothing to pick, every logit NaN or −∞ (`ARGMAX_NONE` in
/// `kernels/sample.cu`).
pub const ARGMAX_NONE: u32 = u32::MAX;

/// The pick the argmax kernel wrote: `None` for [`ARGMAX_NONE`].
pub fn argmax_pick(written: u32) -> Option<u32> {
    (written != ARGMAX_NONE).then_some(written)
}

/// The launch picking each row's argmax of `logits [rows, vocab]`: one block per row.
pub fn argmax_rows(rows: usize, vocab: usize) -> Result<Launch, String> {
    if rows == 0 || vocab == 0 {
        return Err(format!("argmax over an empty shape ({rows} rows of {vocab} logits)"));
    }
    if rows > i32::MAX as usize || vocab > i32::MAX as usize {
        return Err(format!("argmax too large for one launch ({rows} rows of {vocab} logits)"));
    }
    Ok(Launch { kernel: "argmax_rows", grid: (rows as u32, 1, 1), block: (ARGMAX_THREADS, 1, 1) })
}

/// Threads of the fused element-wise kernels' blocks (`NORM_THREADS` in `kernels/fused.cu`).
const FUSED_THREADS: u32 = 256;

/// The launch of the fused residual add and RMS norm over `rows` rows of `hidden` features: a block per row.
pub fn add_rms_norm(rows: usize, hidden: usize) -> Result<Launch, String> {
    if rows == 0 || hidden == 0 {
        return Err(format!("add + RMS norm of an empty shape ({rows} rows of {hidden})"));
    }
    if rows > i32::MAX as usize {
        return Err(format!("add + RMS norm too large for one launch ({rows} rows of {hidden})"));
    }
    if hidden > i32::MAX as usize {
        return Err(format!("add + RMS norm over {hidden} features: the kernel indexes features with 32 bits"));
    }
    Ok(Launch { kernel: "add_rms_norm", grid: (rows as u32, 1, 1), block: (FUSED_THREADS, 1, 1) })
}

/// Blocks past which `silu_mul` strides rather than adding blocks (ample for any GPU's SMs).
const SILU_MUL_MAX_BLOCKS: usize = 4096;

/// The launch of the fused SwiGLU gate over `n` elements: grid-stride blocks of 256 threads.
pub fn silu_mul(n: usize) -> Result<Launch, String> {
    if n == 0 {
        return Err("SiLU·mul over no elements".into());
    }
    if n > i32::MAX as usize {
        return Err(format!("SiLU·mul over {n} elements: the kernel counts elements with 32 bits"));
    }
    let blocks = n.div_ceil(FUSED_THREADS as usize).min(SILU_MUL_MAX_BLOCKS);
    Ok(Launch { kernel: "silu_mul", grid: (blocks as u32, 1, 1), block: (FUSED_THREADS, 1, 1) })
}

/// What the attention kernels read per row: the cache slot its new key/value goes to, its position, and
/// where its sequence's block table starts in the concatenated `tables`.
#[derive(Debug, PartialEq, Eq)]
pub struct AttentionTables {
    pub row_slot: Vec<i32>,
    pub row_pos: Vec<i32>,
    pub row_table: Vec<i32>,
    pub tables: Vec<i32>,
}

/// Builds [`AttentionTables`] from the sequences of a step (which must cover the rows in order, each with a
/// block table long enough for `past + len` positions).
pub fn attention_tables(
    seqs: &[crate::model::attention::PagedSeq],
    block_size: usize,
) -> Result<AttentionTables, String> {
    let mut t = AttentionTables { row_slot: vec![], row_pos: vec![], row_table: vec![], tables: vec![] };
    for s in seqs {
        if s.row != t.row_pos.len() {
            return Err(format!("sequences must cover the batch rows in order: one starts at row {}", s.row));
        }
        if s.blocks.len() * block_size < s.past + s.len {
            return Err(format!("block table of {} blocks is short of {} positions", s.blocks.len(), s.past + s.len));
        }
        let offset = table_int(t.tables.len(), "block table offset")?;
        for &b in s.blocks {
            t.tables.push(table_int(b as usize, "block")?);
        }
        for i in 0..s.len {
            let pos = s.past + i;
            t.row_slot
                .push(table_int(s.blocks[pos / block_size] as usize * block_size + pos % block_size, "cache slot")?);
            t.row_pos.push(table_int(pos, "position")?);
            t.row_table.push(offset);
        }
    }
    Ok(t)
}

/// An entry of the attention kernels' 32-bit tables.
fn table_int(v: usize, what: &str) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} {v} does not fit the attention kernels' 32-bit tables"))
}

/// NVRTC targets by compute capability, oldest first (the `nf4_matmul_mma*` kernels' TF32 `mma.sync` needs 8.0).
const NVRTC_ARCHES: [((i32, i32), &str); 7] = [
    ((8, 0), "compute_80"),
    ((8, 6), "compute_86"),
    ((8, 7), "compute_87"),
    ((8, 9), "compute_89"),
    ((9, 0), "compute_90"),
    ((10, 0), "compute_100"),
    ((12, 0), "compute_120"),
];

/// The NVRTC target for a GPU of compute capability `major.minor`: the newest known one not above it (its PTX
/// runs on later GPUs through the driver's JIT). GPUs before 8.0 (no TF32 tensor cores) are refused.
pub fn nvrtc_arch(major: i32, minor: i32) -> Result<&'static str, String> {
    NVRTC_ARCHES.iter().rev().find(|&&(cc, _)| cc <= (major, minor)).map(|&(_, arch)| arch).ok_or_else(|| {
        format!("GPU of compute capability {major}.{minor}: loraserve's kernels need 8.0 or newer (TF32 tensor cores)")
    })
}

#[cfg(test)]
mod tests {
    use super::super::routes::{GEMV_MAX_ROWS, MMA_TILE_ROWS};
    use super::*;

    /// The route table's limits are the kernels compiled here, and a split takes the fewest splits that reach
    /// the blocks asked for.
    #[test]
    fn routes_name_kernels_that_exist_and_split_as_asked() {
        assert_eq!(GEMV_KERNELS.iter().map(|&(r, _, _)| r).max(), Some(GEMV_MAX_ROWS));
        assert_eq!(MMA_KERNELS.map(|(bm, _)| bm), MMA_TILE_ROWS);
        assert_eq!(splits_for(128, 32, 512), 4);
        assert_eq!(splits_for(344, 32, 512), 2);
        assert_eq!(splits_for(128, 32, 0), 1);
        assert_eq!(splits_for(8, 32, 512), 8, "the most there is when none reaches");
        assert_eq!(splits_for(8, 3, 512), 2, "no more splits than steps");
        // A tuned table: 16 rows on 4096 outputs make 128 tiles, split 4 ways to reach 512 blocks.
        let tuned = Routes::parse("1:gemv,16:mma16/512,*:mma32").unwrap();
        assert_eq!(nf4_matmul_routed(&tuned, 1, 4096, 4096).unwrap().kernel, "nf4_gemv_r1");
        assert_eq!(
            nf4_matmul_routed(&tuned, 2, 4096, 4096).unwrap(),
            Launch { kernel: "nf4_matmul_mma16", grid: (128, 1, 4), block: (128, 1, 1) }
        );
        assert_eq!(nf4_matmul_routed(&tuned, 16, 4096, 4096).unwrap().grid, (128, 1, 4));
        assert_eq!(nf4_matmul_routed(&tuned, 17, 4096, 4096).unwrap().grid, (128, 1, 1));
        // Past the split counters' length a launch never splits, whatever blocks the route asks for.
        let many = Routes::parse("*:mma16/100000").unwrap();
        assert_eq!(nf4_matmul_routed(&many, 4096, 4096, 4096).unwrap().grid, (128, 256, 1));
        assert_eq!(nf4_matmul_routed(&many, 2, 4096, 4096).unwrap().grid, (128, 1, 8));
        // Whatever the table, widths that are not whole NF4 blocks take the generic kernel.
        assert_eq!(nf4_matmul_routed(&tuned, 16, 97, 96).unwrap().kernel, "nf4_matmul_generic");
    }

    #[test]
    fn decode_rows_pick_the_smallest_gemv_that_holds_them() {
        for (m, kernel, cols) in
            [(1, "nf4_gemv_r1", 4), (2, "nf4_gemv_r2", 4), (3, "nf4_gemv_r4", 8), (8, "nf4_gemv_r8", 8)]
        {
            let l = nf4_matmul(m, 4096, 4096).unwrap();
            assert_eq!(l.kernel, kernel, "m={m}");
            assert_eq!(l.grid, (4096 / cols, 1, 1), "m={m}");
            assert_eq!(l.block, (128, 1, 1));
        }
        assert_eq!(nf4_matmul(9, 11008, 4096).unwrap().kernel, "nf4_matmul_mma16");
        // Columns not a multiple of the columns per block: the last block is partly idle, none is missing.
        assert_eq!(nf4_matmul(1, 4097, 64).unwrap().grid.0, 1025);
        assert_eq!(nf4_matmul(8, 4097, 64).unwrap().grid.0, 513);
    }

    #[test]
    fn batches_past_eight_rows_use_tensor_core_tiles_that_cover_the_output() {
        // Decode batches: one row tile, 4096 outputs over 128 blocks (the H200 has 132 SMs).
        for (m, kernel) in
            [(9, "nf4_matmul_mma16"), (16, "nf4_matmul_mma16"), (17, "nf4_matmul_mma32"), (32, "nf4_matmul_mma32")]
        {
            let l = nf4_matmul(m, 4096, 11008).unwrap();
            assert_eq!((l.kernel, l.grid, l.block), (kernel, (128, 1, 1), (128, 1, 1)), "m={m}");
        }
        for m in [33, 64, 65] {
            let l = nf4_matmul(m, 4096, 4096).unwrap();
            assert_eq!((l.kernel, l.grid.1 as usize), ("nf4_matmul_mma32", m.div_ceil(32)), "m={m}");
        }
        // Any tile height on request (the bench's comparison), the tiles still covering every row.
        assert_eq!(
            nf4_mma(32, 4096, 4096, 16, 1).unwrap(),
            Launch { kernel: "nf4_matmul_mma16", grid: (128, 2, 1), block: (128, 1, 1) }
        );
        assert!(nf4_mma(32, 4096, 4096, 8, 1).unwrap_err().contains("8-row"));
        assert!(nf4_mma(32, 4096, 4100, 16, 1).unwrap_err().contains("whole NF4 blocks"));
        let l = nf4_matmul(1000, 4100, 4096).unwrap();
        assert_eq!(l.grid, (129, 32, 1));
        assert!(l.grid.0 as usize * MMA_BN >= 4100 && l.grid.1 as usize * 32 >= 1000);
        assert!(nf4_matmul(32 * MAX_GRID_YZ + 1, 64, 64).unwrap_err().contains("too large"));
        assert!(nf4_matmul(32 * MAX_GRID_YZ, 64, 64).is_ok());
    }

    /// Split-K: a block per tile and split (grid.z), scratch for one tile per block, whole 128-wide steps of K
    /// for every split, and the counters' capacity respected.
    #[test]
    fn split_k_launches_take_whole_steps_and_their_scratch() {
        let l = nf4_mma(32, 4096, 4096, 16, 4).unwrap();
        assert_eq!((l.kernel, l.grid, l.block), ("nf4_matmul_mma16", (128, 2, 4), (128, 1, 1)));
        assert_eq!(nf4_workspace(&l), 128 * 2 * 4 * 16 * 32);
        assert_eq!(nf4_workspace(&nf4_mma(32, 4096, 4096, 32, 1).unwrap()), 0, "no split, no scratch");
        assert_eq!(nf4_workspace(&nf4_matmul(8, 4096, 4096).unwrap()), 0, "the GEMV never splits");
        // 192 = 1.5 steps: two splits at most (the second a half step), not three.
        assert_eq!(nf4_mma(9, 64, 192, 16, 2).unwrap().grid.2, 2);
        assert!(nf4_mma(9, 64, 192, 16, 3).unwrap_err().contains("cannot be split 3 ways"));
        assert!(nf4_mma(9, 64, 192, 16, 0).is_err());
        assert!(nf4_mma(9, 64, 0, 16, 1).unwrap_err().contains("empty"));
        // Past the counters: 16,385 tiles split is refused, unsplit is fine.
        let n = 32 * (NF4_SPLIT_TILES_MAX + 1);
        assert!(nf4_mma(16, n, 256, 16, 2).unwrap_err().contains("output tiles"));
        assert!(nf4_mma(16, n, 256, 16, 1).is_ok());
    }

    #[test]
    fn candidates_are_the_pick_then_every_tile_and_split_the_shape_allows() {
        // Decode batch on a 7B shape: the pick first, then 2 tile heights × 4 splits (the pick not repeated).
        let c = nf4_candidates(24, 4096, 4096);
        assert_eq!(c[0], nf4_matmul(24, 4096, 4096).unwrap());
        assert_eq!(c.len(), 8);
        assert!(c.iter().all(|l| l.grid.0 == 128 && NF4_SPLITS.contains(&(l.grid.2 as usize))));
        // Up to 16 rows no 32-row tiles; K of 256 is 2 steps: splits 1 and 2 only.
        assert_eq!(nf4_candidates(16, 64, 256).len(), 2);
        assert_eq!(nf4_candidates(17, 64, 256).len(), 4);
        // The GEMV rows: the GEMV, then 16-row tiles split 1..8 ways.
        let c = nf4_candidates(8, 4096, 4096);
        assert_eq!((c.len(), c[0].kernel), (5, "nf4_gemv_r8"));
        assert!(c[1..].iter().all(|l| l.kernel == "nf4_matmul_mma16"));
        // Odd widths have no alternative.
        assert_eq!(nf4_candidates(20, 97, 96), vec![nf4_matmul(20, 97, 96).unwrap()]);
        // The cheap membership test agrees with the list, and refuses launches made for other shapes.
        for (m, n, k) in [(24, 4096, 4096), (8, 4096, 4096), (16, 64, 256), (20, 97, 96), (100, 130, 192)] {
            let c = nf4_candidates(m, n, k);
            assert!(c.iter().all(|l| nf4_is_candidate(m, n, k, l)), "{m}×{n}×{k}");
            for bm in [16, 32] {
                for splits in 1..=9 {
                    if let Ok(l) = nf4_mma(m, n, k, bm, splits) {
                        assert_eq!(nf4_is_candidate(m, n, k, &l), c.contains(&l), "{m}×{n}×{k} {l:?}");
                    }
                }
            }
        }
        let l = nf4_mma(32, 4096, 4096, 16, 4).unwrap();
        assert!(!nf4_is_candidate(32, 4096 + 32, 4096, &l), "another shape's grid");
        assert!(!nf4_is_candidate(16, 4096, 4096, &l), "too many row tiles");
    }

    #[test]
    fn shapes_the_kernels_cannot_take_are_refused_by_name() {
        assert!(nf4_matmul(0, 4096, 4096).unwrap_err().contains("empty"));
        assert!(nf4_matmul(1, 1 << 20, 1 << 17).unwrap_err().contains("32 bits"));
        assert!(nf4_matmul(1, (1 << 20) - 1, 1 << 17).is_ok());
        assert!(nf4_matmul(1, 64, i32::MAX as usize - 1023).unwrap_err().contains("32 bits"));
        assert!(nf4_matmul(1 << 31, 64, 64).unwrap_err().contains("32 bits"));
        assert!(nf4_matmul(MAX_GRID_YZ + 1, 64, 96).unwrap_err().contains("too large"));
    }

    /// K not a multiple of 64 (the fixture models' 96- and 160-wide layers): blocks straddle rows, so the
    /// scalar kernel, one warp per output, whatever the rows.
    #[test]
    fn odd_widths_take_the_generic_kernel() {
        for m in [1, 7, 33, 512] {
            let l = nf4_matmul(m, 97, 96).unwrap();
            assert_eq!((l.kernel, l.grid, l.block), ("nf4_matmul_generic", (25, m as u32, 1), (128, 1, 1)));
        }
        assert_eq!(nf4_matmul(3, 64, 160).unwrap().kernel, "nf4_matmul_generic");
        assert_eq!(nf4_matmul(3, 64, 192).unwrap().kernel, "nf4_gemv_r4");
    }

    #[test]
    fn every_kernel_the_launcher_picks_is_defined_in_the_source() {
        for (r, cols, name) in GEMV_KERNELS {
            assert_eq!(name, format!("nf4_gemv_r{r}"));
            assert!(NF4_SOURCE.contains(&format!("NF4_GEMV({r}, {cols})\n")), "{name} not instantiated in nf4.cu");
        }
        for (bm, name) in MMA_KERNELS {
            assert_eq!(name, format!("nf4_matmul_mma{bm}"));
            assert!(NF4_SOURCE.contains(&format!("NF4_MMA({bm})\n")), "{name} not instantiated in nf4.cu");
        }
        assert!(NF4_SOURCE.contains("extern \"C\" __global__ void nf4_matmul_generic("));
        assert!(NF4_SOURCE.contains(&format!("#define WARPS_PER_BLOCK {GEMV_WARPS}\n")));
        assert!(NF4_SOURCE.contains(&format!("#define MMA_BN {MMA_BN}\n")));
        assert!(NF4_SOURCE.contains(&format!("#define MMA_BK {MMA_BK}\n")));
        assert!(NF4_SOURCE.contains(&format!("#define MMA_THREADS {MMA_THREADS}\n")));
        // NVRTC on the serving machine has no toolkit headers.
        for src in [NF4_SOURCE, LORA_SOURCE, ATTENTION_SOURCE, SAMPLE_SOURCE, FUSED_SOURCE] {
            assert!(!src.contains("#include"));
        }
        assert!(ATTENTION_SOURCE.contains("extern \"C\" __global__ void kv_write("));
        for (g, d, name) in ATTENTION_KERNELS {
            assert_eq!(name, format!("paged_attention_g{g}_d{d}"));
            assert!(ATTENTION_SOURCE.contains(&format!("PAGED_ATTENTION({g}, {d})\n")), "{name} not instantiated");
        }
        assert_eq!(
            ATTENTION_KERNELS.last().map(|&(g, d, _)| (g, d)),
            Some((ATTENTION_GROUP_MAX, ATTENTION_HEAD_DIM_MAX))
        );
        assert!(ATTENTION_SOURCE.contains(&format!("#define ATTN_WARPS {ATTENTION_WARPS}\n")));
        for name in ["lora_shrink", "lora_expand"] {
            assert!(LORA_SOURCE.contains(&format!("extern \"C\" __global__ void {name}(")), "{name}");
        }
        assert!(LORA_SOURCE.contains(&format!("#define MAX_RANK {LORA_MAX_RANK}\n")));
        assert!(LORA_SOURCE.contains(&format!("#define SHRINK_WARPS {SHRINK_WARPS}\n")));
        assert!(LORA_SOURCE.contains(&format!("#define SHRINK_CHUNK {SHRINK_CHUNK}\n")));
        assert!(LORA_SOURCE.contains(&format!("#define EXPAND_THREADS {EXPAND_THREADS}\n")));
        assert!(SAMPLE_SOURCE.contains("extern \"C\" __global__ void argmax_rows("));
        assert!(SAMPLE_SOURCE.contains(&format!("#define ARGMAX_THREADS {ARGMAX_THREADS}\n")));
        assert!(SAMPLE_SOURCE.contains(&format!("#define ARGMAX_NONE {ARGMAX_NONE:#x}u\n")));
        for name in ["add_rms_norm", "silu_mul"] {
            assert!(FUSED_SOURCE.contains(&format!("extern \"C\" __global__ void {name}(")), "{name}");
        }
        assert!(FUSED_SOURCE.contains(&format!("#define NORM_THREADS {FUSED_THREADS}\n")));
    }

    #[test]
    fn fused_launches_cover_every_row_and_element() {
        let l = add_rms_norm(32, 4096).unwrap();
        assert_eq!((l.kernel, l.grid, l.block), ("add_rms_norm", (32, 1, 1), (FUSED_THREADS, 1, 1)));
        assert!(add_rms_norm(0, 4096).unwrap_err().contains("empty"));
        assert!(add_rms_norm(3, 0).unwrap_err().contains("empty"));
        assert!(add_rms_norm(1, 1 << 31).unwrap_err().contains("32 bits"));
        let l = silu_mul(32 * 11008).unwrap();
        assert_eq!((l.kernel, l.grid, l.block), ("silu_mul", (1376, 1, 1), (FUSED_THREADS, 1, 1)));
        // A long prefill strides over the elements with a bounded grid.
        assert_eq!(silu_mul(2048 * 14336).unwrap().grid.0 as usize, SILU_MUL_MAX_BLOCKS);
        assert_eq!(silu_mul(1).unwrap().grid, (1, 1, 1));
        assert!(silu_mul(0).unwrap_err().contains("no elements"));
        assert!(silu_mul(1 << 31).unwrap_err().contains("32 bits"));
    }

    #[test]
    fn argmax_takes_a_block_per_row_and_refuses_empty_shapes() {
        let l = argmax_rows(32, 32000).unwrap();
        assert_eq!((l.kernel, l.grid, l.block), ("argmax_rows", (32, 1, 1), (ARGMAX_THREADS, 1, 1)));
        assert!(argmax_rows(0, 10).unwrap_err().contains("empty"));
        assert!(argmax_rows(3, 0).unwrap_err().contains("empty"));
        assert!(argmax_rows(1, 1 << 31).unwrap_err().contains("too large"));
    }

    #[test]
    fn nvrtc_targets_the_newest_known_arch_and_refuses_pre_ampere() {
        assert_eq!(nvrtc_arch(9, 0), Ok("compute_90"));
        assert_eq!(nvrtc_arch(8, 6), Ok("compute_86"));
        assert_eq!(nvrtc_arch(10, 3), Ok("compute_100"));
        assert_eq!(nvrtc_arch(13, 0), Ok("compute_120"));
        assert!(nvrtc_arch(7, 5).unwrap_err().contains("8.0 or newer"));
    }

    #[test]
    fn attention_tables_follow_the_cpu_cache_layout() {
        use crate::model::attention::PagedSeq;
        let (a, b) = ([7u32, 2], [4u32]);
        let seqs = [
            PagedSeq { row: 0, len: 1, past: 5, blocks: &a }, // decode: position 5 → block 2, slot 1
            PagedSeq { row: 1, len: 3, past: 0, blocks: &b }, // prefill of 3 tokens in block 4
        ];
        let t = attention_tables(&seqs, 4).unwrap();
        assert_eq!(t.row_slot, vec![2 * 4 + 1, 16, 17, 18]);
        assert_eq!(t.row_pos, vec![5, 0, 1, 2]);
        assert_eq!(t.row_table, vec![0, 2, 2, 2]);
        assert_eq!(t.tables, vec![7, 2, 4]);
        let short = [PagedSeq { row: 0, len: 2, past: 3, blocks: &b }];
        assert!(attention_tables(&short, 4).unwrap_err().contains("short"));
        let gap = [PagedSeq { row: 1, len: 1, past: 0, blocks: &b }];
        assert!(attention_tables(&gap, 4).unwrap_err().contains("in order"));
        // A slot past 32 bits is refused, not wrapped into another sequence's cache.
        let far = [1u32 << 30];
        let past = [PagedSeq { row: 0, len: 1, past: 0, blocks: &far }];
        assert!(attention_tables(&past, 4).unwrap_err().contains("cache slot 4294967296 does not fit"));
    }

    #[test]
    fn attention_launches_and_limits() {
        let (w, a) = paged_attention(5, 32, 8, 128, Some(4096)).unwrap();
        assert_eq!((w.kernel, w.grid), ("kv_write", (5, 1, 1)));
        assert_eq!((a.kernel, a.grid, a.block), ("paged_attention_g4_d128", (5, 8, 1), (128, 1, 1)));
        // The smallest compiled bounds holding the heads: Llama 2 (32/32 × 128), Qwen2 (28/4 × 128: a group
        // of 7), the fixture models (head_dim 16), Gemma-like 256-wide heads.
        let kernel = |heads, kv, hd| paged_attention(1, heads, kv, hd, None).unwrap().1.kernel;
        assert_eq!(kernel(32, 32, 128), "paged_attention_g1_d128");
        assert_eq!(kernel(28, 4, 128), "paged_attention_g8_d128");
        assert_eq!(kernel(6, 3, 16), "paged_attention_g2_d64");
        assert_eq!(kernel(8, 8, 80), "paged_attention_g1_d128");
        assert_eq!(kernel(16, 8, 256), "paged_attention_g2_d256");
        assert_eq!(kernel(24, 8, 65), "paged_attention_g4_d128");
        assert!(paged_attention(1, 32, 2, 128, None).unwrap_err().contains("query heads per kv head"));
        assert!(paged_attention(1, 28, 8, 128, None).is_err(), "heads not a multiple of kv heads");
        // Any head_dim up to the maximum: 16 (the fixture models), 80, 96.
        for hd in [16, 80, 96, 256] {
            assert!(paged_attention(1, 8, 8, hd, None).is_ok(), "{hd}");
        }
        assert!(paged_attention(1, 8, 8, 257, None).unwrap_err().contains("head_dim"));
        assert!(paged_attention(1, 8, 8, 0, None).is_err());
        assert!(paged_attention(0, 8, 8, 64, None).is_err());
        // The CPU path attends to nothing with a 0 window; the kernel reads 0 as "no window": refuse it.
        assert!(paged_attention(1, 8, 8, 64, Some(0)).unwrap_err().contains("window of 0"));
    }

    #[test]
    fn lora_launches_cover_every_row_and_output() {
        let (s, e) = lora(37, 4096, 11008).unwrap();
        assert_eq!((s.kernel, s.grid, s.block), ("lora_shrink", (37, 8, 1), (128, 1, 1)));
        assert_eq!((e.kernel, e.grid, e.block), ("lora_expand", (37, 43, 1), (256, 1, 1)));
        assert!(e.grid.1 as usize * EXPAND_THREADS >= 11008);
        // Input chunks of 512 features, the last one partial (down_proj's 11008 = 21.5 chunks).
        assert_eq!(lora(2, 11008, 4096).unwrap().0.grid, (2, 22, 1));
        assert_eq!((lora_splits(100), lora_splits(512), lora_splits(513)), (1, 1, 2));
        assert!(lora(1, 4094, 64).unwrap_err().contains("divisible by 4"));
        assert!(lora(0, 64, 64).unwrap_err().contains("empty"));
    }

    #[test]
    fn row_segments_mark_base_rows_and_refuse_bad_tables() {
        assert_eq!(lora_row_segments(7, &[(1, 3), (3, 4), (5, 7)]).unwrap(), vec![-1, 0, 0, 1, -1, 2, 2]);
        assert_eq!(lora_row_segments(2, &[(0, 0), (0, 2)]).unwrap(), vec![1, 1]);
        assert!(lora_row_segments(4, &[(0, 3), (2, 4)]).is_err(), "overlap");
        assert!(lora_row_segments(4, &[(0, 5)]).is_err(), "past the batch");
        assert!(lora_row_segments(4, &[(3, 2)]).is_err(), "reversed");
    }
}
