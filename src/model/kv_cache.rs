//! The paged KV cache: fixed-size blocks of token positions, per layer one key and one value arena of
//! `[num_blocks, block_size, kv_heads, head_dim]` f32 (in host memory, or in GPU memory beside a
//! GPU-resident model), and the [`BlockAllocator`] of their blocks ([`super::kv_blocks`]: reference counts, the
//! prefix cache).
//!
//! Sequences own block tables (lists of block ids); the cache itself knows nothing about sequences, so the
//! engine can admit, grow, preempt and free them by moving block ids around. Memory is fixed at creation
//! from a byte budget, so a full cache means "wait", never an out-of-memory.

pub use super::kv_blocks::{BlockAllocator, PrefixChain};

/// Shape of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Token positions per block.
    pub block_size: usize,
}

impl KvGeometry {
    /// Bytes one block occupies across all layers (keys and values).
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_size * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// One layer's key and value arenas in host memory.
pub struct LayerKv {
    pub block_size: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// One layer's arenas, wherever the cache lives.
pub enum LayerArenas<'a> {
    Host(&'a mut LayerKv),
    #[cfg(feature = "cuda")]
    Cuda(&'a mut crate::gpu::attention::LayerKvCuda),
}

/// Every layer's arenas: in host memory, or in GPU memory beside a GPU-resident model.
enum Arenas {
    Host(Vec<LayerKv>),
    #[cfg(feature = "cuda")]
    Cuda(Vec<crate::gpu::attention::LayerKvCuda>),
}

/// The cache arenas plus the allocator of their blocks.
pub struct PagedKvCache {
    geometry: KvGeometry,
    arenas: Arenas,
    allocator: BlockAllocator,
}

impl PagedKvCache {
    /// A cache of `num_blocks` blocks in host memory.
    pub fn new(geometry: KvGeometry, num_blocks: usize) -> Self {
        let per_layer = Self::per_layer(geometry, num_blocks);
        let layers = (0..geometry.layers)
            .map(|_| LayerKv { block_size: geometry.block_size, k: vec![0f32; per_layer], v: vec![0f32; per_layer] })
            .collect();
        PagedKvCache { geometry, arenas: Arenas::Host(layers), allocator: BlockAllocator::new(num_blocks) }
    }

    /// A cache of `num_blocks` blocks on `device` (the model's), zero-filled.
    pub fn on_device(
        geometry: KvGeometry,
        num_blocks: usize,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        match device {
            candle_core::Device::Cpu => Ok(Self::new(geometry, num_blocks)),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => {
                let per_layer = Self::per_layer(geometry, num_blocks);
                let layers = (0..geometry.layers)
                    .map(|_| crate::gpu::attention::LayerKvCuda::zeros(d, geometry.block_size, per_layer))
                    .collect::<candle_core::Result<_>>()?;
                Ok(PagedKvCache { geometry, arenas: Arenas::Cuda(layers), allocator: BlockAllocator::new(num_blocks) })
            }
            #[allow(unreachable_patterns)]
            other => candle_core::bail!("no KV cache for device {:?}", other.location()),
        }
    }

    fn per_layer(geometry: KvGeometry, num_blocks: usize) -> usize {
        num_blocks * geometry.block_size * geometry.kv_heads * geometry.head_dim
    }

    /// A cache of as many blocks as fit in `budget_bytes` (a budget short of one block is refused), on `device`.
    pub fn with_budget(
        geometry: KvGeometry,
        budget_bytes: usize,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let blocks = budget_bytes / geometry.block_bytes().max(1);
        if blocks == 0 {
            candle_core::bail!(
                "a budget of {budget_bytes} bytes holds no KV block (one block of {} tokens takes {} bytes for this model; --kv-cache-bytes)",
                geometry.block_size,
                geometry.block_bytes()
            );
        }
        // Past the machine's memory, the zero-filled arenas' allocation aborts the process: said by flag instead.
        if let (true, Some(total)) = (device.is_cpu(), host_memory_bytes()) {
            let needed = blocks as u128 * geometry.block_bytes() as u128;
            if needed > total as u128 {
                candle_core::bail!(
                    "a budget of {budget_bytes} bytes is more than this machine's memory ({total} bytes; --kv-cache-bytes)"
                );
            }
        }
        Self::on_device(geometry, blocks, device)
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// Layer `layer`'s arenas.
    pub fn layer(&mut self, layer: usize) -> LayerArenas<'_> {
        match &mut self.arenas {
            Arenas::Host(layers) => LayerArenas::Host(&mut layers[layer]),
            #[cfg(feature = "cuda")]
            Arenas::Cuda(layers) => LayerArenas::Cuda(&mut layers[layer]),
        }
    }

    /// Layer `layer`'s arenas when the cache is in host memory.
    pub fn host_layer_mut(&mut self, layer: usize) -> Option<&mut LayerKv> {
        match self.layer(layer) {
            LayerArenas::Host(kv) => Some(kv),
            #[cfg(feature = "cuda")]
            LayerArenas::Cuda(_) => None,
        }
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    pub fn allocator_mut(&mut self) -> &mut BlockAllocator {
        &mut self.allocator
    }

    /// Bytes of the arenas.
    pub fn bytes(&self) -> usize {
        self.allocator.capacity() * self.geometry.block_bytes()
    }
}

/// The machine's memory (Linux's `MemTotal`), where it can be read.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_sizes_the_cache() {
        let g = KvGeometry { layers: 2, kv_heads: 2, head_dim: 4, block_size: 16 };
        assert_eq!(g.block_bytes(), 2 * 2 * 16 * 2 * 4 * 4);
        let c = PagedKvCache::with_budget(g, g.block_bytes() * 10 + 5, &candle_core::Device::Cpu).unwrap();
        assert_eq!(c.allocator().capacity(), 10);
        assert_eq!(g.blocks_for(17), 2);
        let e = PagedKvCache::with_budget(g, g.block_bytes() - 1, &candle_core::Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("holds no KV block") && e.contains("--kv-cache-bytes"), "{e}");
        // A petabyte aborted the process in its zero-filled allocation.
        let e = PagedKvCache::with_budget(g, 1 << 50, &candle_core::Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("more than this machine's memory") && e.contains("--kv-cache-bytes"), "{e}");
    }
}
