//! The tasks that fill the adapter cache: disk loads (read, check and copy an adapter's files, single
//! flight per adapter and files' stamp, on the blocking pool) and host-to-device promotions. Each runs as a
//! task of its own, so requests that give up neither abandon nor repeat it; each installs what it made into
//! the tiers unless it went stale meanwhile (see the generations in [`super::tiers::State`]).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use super::tiers::{publish, Key};
use super::{AdapterCache, CacheError, Inner};
use crate::lora::peft::{self, AdapterError};
use crate::lora::store::{AdapterStore, AdapterVersion, FileStamp};
use crate::lora::LoraWeights;
use crate::model::chat::AdapterTemplate;
use crate::model::TokenizerError;
use crate::telemetry as t;

/// A finished load.
pub(super) struct Loaded {
    pub(super) version: AdapterVersion,
    /// The host-tier copy, in RAM (the same tensors as `device` when the base is on the CPU).
    pub(super) host: Arc<LoraWeights>,
    /// The device-tier copy, where the base lives.
    pub(super) device: Arc<LoraWeights>,
    pub(super) bytes: usize,
}

/// A disk load's outcome, for every request waiting on it.
pub(super) type LoadFuture =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Loaded>, CacheError>>>;

impl AdapterCache {
    /// Loads `id` at `stamp` once, however many callers ask concurrently: the load is a task of its own
    /// ([`disk_load`]), so callers giving up (deadline, cancellation) neither abandon nor repeat it. A load
    /// made stale meanwhile (an unload came) is not joined: a new one starts. `None` when a load of these
    /// files finished between the caller's look into the tiers and this call: look again (it is there).
    pub(super) async fn load(
        &self,
        id: &str,
        dir: PathBuf,
        stamp: FileStamp,
    ) -> Result<Option<Arc<Loaded>>, CacheError> {
        use futures::FutureExt;
        let shared = {
            // Lock order: `inflight`, then `state`.
            let mut inflight = self.inner.inflight.lock().expect("inflight lock");
            let mut st = self.inner.state.lock().expect("cache lock");
            match inflight.get(id) {
                Some((s, g, f)) if *s == stamp && st.is_newest(id, *g) => f.clone(),
                _ if st.current.get(id).is_some_and(|v| {
                    let key = (id.to_string(), v.id.clone());
                    v.stamp == stamp && (st.device.contains_key(&key) || st.host.contains_key(&key))
                }) =>
                {
                    return Ok(None)
                }
                _ => {
                    let generation = st.bump(id);
                    drop(st);
                    let task =
                        tokio::spawn(disk_load(self.inner.clone(), id.to_string(), dir, stamp.clone(), generation));
                    let (inner, owned, s) = (self.inner.clone(), id.to_string(), stamp.clone());
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            // The task died (a panic) before clearing its entry: clear it, so the next request
                            // loads again instead of getting this error until the files change.
                            inner.end_load(&owned, &s, generation);
                            Err(CacheError::Internal { id: owned, reason: e.to_string() })
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(id.to_string(), (stamp, generation, f.clone()));
                    f
                }
            }
        };
        shared.await.map(Some)
    }
}

/// A disk load, as a task of its own (see [`AdapterCache::load`]): read and check the files on the blocking
/// pool (on all cores and copied to the device on a GPU), then, unless the load is stale (see
/// `State::generation`), install the result whether or not a request still waits, so that a client's retry
/// after its deadline finds it: current, in the host tier, and in the device tier if it fits there without
/// evicting anything (the requests that still wait evict for it). Files that fail are remembered as failed
/// (see `State::failed`).
async fn disk_load(
    inner: Arc<Inner>,
    id: String,
    dir: PathBuf,
    stamp: FileStamp,
    generation: u64,
) -> Result<Arc<Loaded>, CacheError> {
    inner.disk_loads.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let (inner2, id2) = (inner.clone(), id.clone());
    let res = tokio::task::spawn_blocking(move || read_files(&inner2, id2, &dir))
        .await
        .unwrap_or_else(|e| Err(CacheError::Internal { id: id.clone(), reason: e.to_string() }));
    let result = {
        let mut st = inner.state.lock().expect("cache lock");
        let newest = st.is_newest(&id, generation);
        match res {
            Ok(l) => {
                metrics::histogram!(t::ADAPTER_LOAD_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
                if newest {
                    let key = st.install(&id, &l, inner.config.host_bytes);
                    let fits = st.device_bytes + st.reserved + l.bytes <= inner.config.device_bytes;
                    if !st.device.contains_key(&key) && fits {
                        let _ = st.insert_device(&key, &l.device, l.bytes, inner.config.device_bytes, 0);
                    }
                    publish(&st);
                }
                Ok(Arc::new(l))
            }
            Err(e) if !newest => Err(e),
            Err(e) => {
                // Broken (or too large) new files: never fall back to the old version. Remembered until the
                // files change, unless they only failed to read (EMFILE, EIO, a stale NFS handle, a copy in
                // progress): the next request tries again.
                if matches!(e, CacheError::Invalid(_) | CacheError::TooLarge { .. }) {
                    let transient = matches!(&e, CacheError::Invalid(a) if matches!(**a, AdapterError::Read { .. }));
                    if !transient {
                        st.failed.insert(id.clone(), (stamp.clone(), e.clone()));
                    }
                    st.current.remove(&id);
                    st.supersede(&id, None);
                    publish(&st);
                }
                Err(e)
            }
        }
    };
    // Done: later requests find the outcome in the tiers (or in `failed`), not here.
    inner.end_load(&id, &stamp, generation);
    result
}

impl Inner {
    /// Forgets the in-flight entry of the load of `id` at `stamp` in `generation` (not a newer one's).
    pub(super) fn end_load(&self, id: &str, stamp: &FileStamp, generation: u64) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if inflight.get(id).is_some_and(|(s, g, _)| s == stamp && *g == generation) {
            inflight.remove(id);
        }
    }
}

/// Reads and checks adapter `id`'s files in `dir` (blocking).
fn read_files(inner: &Inner, id: String, dir: &std::path::Path) -> Result<Loaded, CacheError> {
    let gpu = !inner.device.is_cpu();
    let (mut tries, mut read_again) = (0, false);
    let (version, template, mut adapter) = loop {
        // The files may change between the request's stat and the read: version by what is read.
        let version = AdapterStore::version(dir)?;
        // The chat files right after the stamp the version hashes, before the (slower) weights.
        let template = AdapterTemplate::read(dir, &id).map_err(|e| {
            let (file, reason) = match e {
                TokenizerError::Read { file, reason } => (file, reason),
                // `read` fails only on a read; any other error would name the folder.
                e => (dir.display().to_string(), e.to_string()),
            };
            // Retried by the next request, as a failed read of the weights is.
            CacheError::Invalid(Arc::new(AdapterError::Read { file, reason }))
        })?;
        // On a GPU server the CPU is otherwise idle: convert on all cores.
        let load = if gpu { peft::load_dir_parallel } else { peft::load_dir };
        let adapter = match load(dir, &inner.layout, &Device::Cpu) {
            Ok(adapter) => adapter,
            // Files found broken are remembered until they change: read them once more first, as a folder
            // renamed away and back during the read (a publish, a rollback) gives its old stamp to a
            // failure that was only its absence ("missing" weights).
            Err(_) if !read_again => {
                read_again = true;
                continue;
            }
            Err(e) => return Err(CacheError::Invalid(Arc::new(e))),
        };
        // The files are read by path after the version's stamp: one replaced meanwhile (a publish file by
        // file, by rename) would give one version's name to another's weights. Read again, a few times.
        if AdapterStore::stamp(dir)? == version.stamp {
            break (version, template, adapter);
        }
        tries += 1;
        if tries == 3 {
            let reason = "its files changed while they were read, 3 times in a row (they are being rewritten): \
                          try again once they are in place";
            return Err(CacheError::Invalid(Arc::new(AdapterError::Read {
                file: dir.display().to_string(),
                reason: reason.into(),
            })));
        }
    };
    if gpu {
        check_gpu_limits(dir, &adapter.weights)?;
    }
    if let Some(template) = template {
        // Its raw prompts are served still; its conversations get this error.
        if let Some(e) = template.read_error() {
            tracing::warn!(adapter = %id, error = %e, "the adapter's chat files cannot be read: requests with messages for it will be refused");
        }
        adapter.weights.template = Some(Arc::new(template));
    }
    let host = Arc::new(adapter.weights);
    // Refused before any copy to the device: it could never be leased.
    let (bytes, budget) = (host.bytes(), inner.config.device_bytes);
    if bytes > budget {
        return Err(CacheError::TooLarge { id, bytes, budget });
    }
    let device = if gpu {
        Arc::new(
            to_device(&host, &inner.device)
                .map_err(|e| CacheError::Internal { id, reason: crate::candle_message(&e) })?,
        )
    } else {
        host.clone()
    };
    Ok(Loaded { version, host, device, bytes })
}

/// A promotion, as a task of its own, so that requests giving up (cancelled, timed out) neither abandon nor
/// repeat the copy: copy the host weights to the device (on the blocking pool on a GPU), put the copy in the
/// device tier unleased if the key is still current (evicting as needed; skipped when everything is leased),
/// then end the promotion and hand the copy to the waiting requests, which lease it (or insert it, if it was
/// evicted meanwhile). Ending the promotion and the insert happen under one lock: a request looking in
/// between finds one or the other, never neither.
pub(super) async fn promote(
    inner: Arc<Inner>,
    key: Key,
    host: Arc<LoraWeights>,
    bytes: usize,
    tx: tokio::sync::watch::Sender<Option<Result<Arc<LoraWeights>, CacheError>>>,
) {
    inner.promotions.fetch_add(1, Ordering::Relaxed);
    let copy = if inner.device.is_cpu() {
        to_device(&host, &inner.device).map_err(|e| crate::candle_message(&e))
    } else {
        let device = inner.device.clone();
        tokio::task::spawn_blocking(move || to_device(&host, &device).map_err(|e| crate::candle_message(&e)))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    let copy = copy.map(Arc::new).map_err(|reason| CacheError::Internal { id: key.0.clone(), reason });
    {
        let mut st = inner.state.lock().expect("cache lock");
        st.reserved -= bytes;
        st.promoting.remove(&key);
        let current = st.current.get(&key.0).is_some_and(|v| v.id == key.1);
        if let (Ok(w), true, false) = (&copy, current, st.device.contains_key(&key)) {
            let _ = st.insert_device(&key, w, bytes, inner.config.device_bytes, 0);
        }
        publish(&st);
    }
    let _ = tx.send(Some(copy));
    inner.space.notify_waiters();
}

/// The device-tier copy of host weights (the same tensors when the device is the CPU). On a GPU the copy is
/// complete when this returns: each host thread has its own stream, and the engine's stream reads it next.
pub(super) fn to_device(w: &LoraWeights, device: &Device) -> candle_core::Result<LoraWeights> {
    if device.is_cpu() {
        return Ok(w.clone());
    }
    let copy = w.to_device(device)?;
    device.synchronize()?;
    Ok(copy)
}

/// Refuses, at load, an adapter the GPU's batched-LoRA kernels cannot run (rank above their maximum, a layer
/// whose input width is not a multiple of 4), so it fails its own requests with the reason instead of every
/// batch it would join.
fn check_gpu_limits(dir: &std::path::Path, w: &LoraWeights) -> Result<(), CacheError> {
    let max = crate::gpu::launch::LORA_MAX_RANK;
    let refuse = |key: &str, reason: String| {
        let file = dir.join("adapter_config.json").display().to_string();
        Err(CacheError::Invalid(Arc::new(AdapterError::Config { file, key: key.into(), reason })))
    };
    if let Some((id, m)) = w.targets().find(|(_, m)| m.rank() > max) {
        return refuse("r", format!("{id} has rank {}, above the GPU kernels' maximum of {max}", m.rank()));
    }
    if let Some((id, m)) = w.targets().find(|(_, m)| !m.a.dims()[1].is_multiple_of(4)) {
        let width = m.a.dims()[1];
        return refuse(
            "target_modules",
            format!("{id} has {width} input features; the GPU kernels need a multiple of 4"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::peft::BaseLayout;
    use crate::lora::synthetic::{random_adapter, ATTENTION};

    #[test]
    fn adapters_above_the_gpu_kernels_rank_are_refused_by_file_and_module() {
        let layout = BaseLayout { layers: 1, dims: [(64, 64); 7] };
        let max = crate::gpu::launch::LORA_MAX_RANK;
        let dir = std::path::Path::new("adapters/wide");
        let ok = random_adapter(&layout, max, &ATTENTION, 1, &Device::Cpu).unwrap();
        assert!(check_gpu_limits(dir, &ok).is_ok());
        let wide = random_adapter(&layout, max + 1, &ATTENTION, 1, &Device::Cpu).unwrap();
        let e = check_gpu_limits(dir, &wide).unwrap_err().to_string();
        assert!(e.contains("adapters/wide/adapter_config.json") && e.contains("`r`"), "{e}");
        assert!(
            e.contains("model.layers.0.self_attn.q_proj has rank 129, above the GPU kernels' maximum of 128"),
            "{e}"
        );
        // An input width the shrink kernel's 16-byte loads cannot take.
        let odd = BaseLayout { layers: 1, dims: [(66, 64); 7] };
        let e = check_gpu_limits(dir, &random_adapter(&odd, 4, &ATTENTION, 1, &Device::Cpu).unwrap()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("`target_modules`") && e.contains("q_proj has 66 input features"), "{e}");
    }
}
