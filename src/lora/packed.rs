//! An adapter's tensors packed into one f32 buffer, for a host → GPU transfer in one copy instead of one per
//! tensor: where each module's A and Bᵀ sit ([`PackedLayout`]), writing them there, and an adapter whose
//! modules are views into such a buffer (on any device). `benches/gpu_kernels.rs` times the transfer this way
//! against the adapter cache's per-tensor copy, from pageable and from page-locked memory.

use candle_core::{Result, Tensor};

use super::{LoraModule, LoraWeights};

/// Elements a tensor's start is aligned to: 4 f32, 16 bytes, as the batched-LoRA kernels' vector loads of A
/// need (they check it).
const ALIGN: usize = 4;

/// Where each module's tensors sit in a packed buffer: module order, A then Bᵀ, each starting on a 16-byte
/// boundary, the padding between them zero.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLayout {
    /// One slot per linear, as [`LoraWeights::modules`].
    pub modules: Vec<Option<PackedModule>>,
    /// f32 elements in all, padding included.
    pub len: usize,
}

/// One module in a packed buffer: element offsets of A `[rank, in]` and Bᵀ `[rank, out]`, and its scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PackedModule {
    pub a: usize,
    pub b_t: usize,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

impl LoraWeights {
    /// This adapter's packed layout.
    pub fn packed_layout(&self) -> Result<PackedLayout> {
        let mut len = 0;
        let modules = self
            .modules()
            .iter()
            .map(|m| {
                m.as_ref()
                    .map(|m| {
                        let (rank, in_features) = m.a.dims2()?;
                        let (b_rank, out_features) = m.b_t.dims2()?;
                        if b_rank != rank {
                            candle_core::bail!("LoRA module: A has rank {rank}, Bᵀ {b_rank}");
                        }
                        let a = len;
                        let b_t = (a + rank * in_features).next_multiple_of(ALIGN);
                        len = (b_t + rank * out_features).next_multiple_of(ALIGN);
                        Ok(PackedModule { a, b_t, rank, in_features, out_features, scale: m.scale })
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(PackedLayout { modules, len })
    }

    /// Writes every tensor where `layout` (this adapter's [`Self::packed_layout`]) puts it, and zeros between;
    /// each element of `out` is written once (page-locked buffers are often write-combined: never read back).
    pub fn pack_into(&self, layout: &PackedLayout, out: &mut [f32]) -> Result<()> {
        if *layout != self.packed_layout()? {
            candle_core::bail!("packing an adapter: the layout is another adapter's");
        }
        if out.len() != layout.len {
            candle_core::bail!("packing an adapter: a buffer of {} elements for a layout of {}", out.len(), layout.len);
        }
        let mut end = 0;
        for (m, p) in self.modules().iter().zip(&layout.modules) {
            let (Some(m), Some(p)) = (m, p) else { continue };
            for (t, start) in [(&m.a, p.a), (&m.b_t, p.b_t)] {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                out[end..start].fill(0.0);
                out[start..start + values.len()].copy_from_slice(&values);
                end = start + values.len();
            }
        }
        out[end..].fill(0.0);
        Ok(())
    }

    /// The adapter whose modules are views into `packed` (1-D contiguous f32, `layout.len` elements, on any
    /// device): no copy; the tensors share its storage. No chat template: the caller carries it over.
    pub fn from_packed(packed: &Tensor, layout: &PackedLayout) -> Result<Self> {
        if packed.dims() != [layout.len] || packed.dtype() != candle_core::DType::F32 || !packed.is_contiguous() {
            candle_core::bail!(
                "a packed adapter is {} contiguous f32 elements, got a {:?} tensor of shape {:?}",
                layout.len,
                packed.dtype(),
                packed.dims()
            );
        }
        let modules = layout
            .modules
            .iter()
            .map(|p| {
                p.map(|p| {
                    let a = packed.narrow(0, p.a, p.rank * p.in_features)?.reshape((p.rank, p.in_features))?;
                    let b_t = packed.narrow(0, p.b_t, p.rank * p.out_features)?.reshape((p.rank, p.out_features))?;
                    Ok(LoraModule { a, b_t, scale: p.scale })
                })
                .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self::from_modules(modules))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::lora::peft::BaseLayout;
    use crate::lora::synthetic::{random_adapter, ATTENTION};
    use crate::lora::ModuleKind;

    /// Odd widths and an odd rank, so A and Bᵀ end off the 16-byte grid and need padding; two layers, four of
    /// the seven projections (empty slots between).
    fn adapter() -> LoraWeights {
        let layout = BaseLayout { layers: 2, dims: [(10, 7), (10, 5), (10, 5), (7, 10), (10, 13), (10, 13), (13, 10)] };
        random_adapter(&layout, 3, &ATTENTION, 7, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_layout_aligns_every_tensor_without_overlap_and_round_trips_exactly() {
        let w = adapter();
        let layout = w.packed_layout().unwrap();
        assert_eq!(layout.modules.len(), w.modules().len());
        let mut spans = vec![];
        for (m, p) in w.modules().iter().zip(&layout.modules) {
            assert_eq!(m.is_some(), p.is_some());
            if let (Some(m), Some(p)) = (m, p) {
                assert_eq!(
                    (p.rank, p.in_features, p.out_features, p.scale),
                    (3, m.a.dim(1).unwrap(), m.b_t.dim(1).unwrap(), 2.0)
                );
                spans.push(p.a..p.a + p.rank * p.in_features);
                spans.push(p.b_t..p.b_t + p.rank * p.out_features);
            }
        }
        assert_eq!(spans.len(), 2 * 2 * 4);
        for (i, s) in spans.iter().enumerate() {
            assert_eq!(s.start % ALIGN, 0, "{s:?} starts 16-byte aligned");
            assert!(s.end <= layout.len);
            if let Some(next) = spans.get(i + 1) {
                assert!(
                    s.end <= next.start && next.start - s.end < ALIGN,
                    "{s:?} then {next:?}: in order, padding only"
                );
            }
        }
        assert!(layout.len - spans.last().unwrap().end < ALIGN);

        let mut buf = vec![f32::NAN; layout.len];
        w.pack_into(&layout, &mut buf).unwrap();
        assert!(buf.iter().all(|v| v.is_finite()), "every element written, padding zero");
        let back =
            LoraWeights::from_packed(&Tensor::from_vec(buf, layout.len, &Device::Cpu).unwrap(), &layout).unwrap();
        assert_eq!(back.bytes(), w.bytes());
        for ((id, m), (id2, b)) in w.targets().zip(back.targets()) {
            assert_eq!(id, id2);
            assert_eq!(m.scale, b.scale);
            for (x, y) in [(&m.a, &b.a), (&m.b_t, &b.b_t)] {
                assert_eq!(x.dims(), y.dims());
                assert_eq!(
                    x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
    }

    #[test]
    fn a_mismatched_buffer_or_layout_is_refused() {
        let w = adapter();
        let layout = w.packed_layout().unwrap();
        assert!(w.pack_into(&layout, &mut vec![0.0; layout.len - 1]).is_err());
        let mut other =
            random_adapter(&BaseLayout { layers: 2, dims: [(10, 7); 7] }, 3, &[ModuleKind::QProj], 1, &Device::Cpu)
                .unwrap()
                .packed_layout()
                .unwrap();
        other.len = layout.len;
        assert!(w.pack_into(&other, &mut vec![0.0; layout.len]).unwrap_err().to_string().contains("another adapter's"));
        // The same modules at another rank: the same slots, other spans.
        let dims = BaseLayout { layers: 2, dims: [(10, 7), (10, 5), (10, 5), (7, 10), (10, 13), (10, 13), (13, 10)] };
        let rank_4 = random_adapter(&dims, 4, &ATTENTION, 7, &Device::Cpu).unwrap().packed_layout().unwrap();
        let mut buf = vec![0.0; rank_4.len];
        assert!(w.pack_into(&rank_4, &mut buf).unwrap_err().to_string().contains("another adapter's"));
        let f64s = Tensor::zeros(layout.len, candle_core::DType::F64, &Device::Cpu).unwrap();
        assert!(LoraWeights::from_packed(&f64s, &layout).unwrap_err().to_string().contains("F64"));
        let short = Tensor::zeros(layout.len - 1, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(LoraWeights::from_packed(&short, &layout).is_err());
    }
}
