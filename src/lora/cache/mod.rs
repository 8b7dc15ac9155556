//! The adapter cache: lazy, single-flight loads into two byte-budgeted LRU tiers, leases that pin what
//! running requests use, and hot swap when an adapter's files change.
//!
//! - **Tiers.** `device` holds adapters where the base lives (GPU memory on a CUDA build; RAM on the CPU
//!   build); `host` keeps recently used adapters in RAM so a device eviction is not a disk reload. Each is
//!   bounded in bytes and evicts least-recently-used entries; a device miss that hits the host tier promotes.
//! - **Leases.** [`AdapterCache::acquire`] returns an [`AdapterLease`] pinning one *version* of an adapter for
//!   the request's whole life; a leased entry is never evicted. When every byte of the device tier is leased
//!   a new acquire waits for a release until its deadline, then fails with [`CacheError::Full`] — never an
//!   overshoot of the budget.
//! - **Single flight.** Concurrent first requests for an adapter share one load, which runs on tokio's
//!   blocking pool (never on the engine thread); concurrent requests for a host-tier adapter share one
//!   promotion, copied outside the cache lock so hits on other adapters never wait behind it. Loads and
//!   promotions are tasks of their own: requests that give up (deadline, cancellation) neither abandon nor
//!   repeat them, and what they read lands in the tiers for the client's retry.
//! - **Versions and hot swap.** Every acquire stats the adapter's files (weights, config, chat template), on
//!   the blocking pool (a hung file system holds a blocking thread, not an async worker); when they
//!   changed, the next acquire loads the new version while leases on the old one finish undisturbed (a
//!   request never mixes versions). New files found broken (or too large) are reported to every request
//!   (`FAILED_PRECONDITION`, naming the file) until they change again, and the old version is not served;
//!   files that failed to read (`UNAVAILABLE`) are read again by the next request. A filesystem watcher
//!   ([`super::watch`]) drops stale entries eagerly.
//! - **Looks at the folder** ([`AdapterCache::look`]) run on the blocking pool, a bounded number at once,
//!   and how long the folder has kept one waiting is known ([`AdapterCache::longest_silence`]): a hung mount
//!   shows there.
//!
//! Submodules: `tiers` (the state under the cache lock: entries, eviction, generations, gauges), `load`
//! (the disk-load and promotion tasks that fill the tiers) and `looks` (the looks at the folder).

mod load;
mod looks;
mod tiers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use tokio::sync::{Notify, Semaphore};

use super::peft::{AdapterError, BaseLayout};
use super::store::{AdapterStore, FileStamp, StoreError};
use super::LoraWeights;
use crate::telemetry as t;
use load::{promote, LoadFuture, Loaded};
pub use looks::{MAX_LISTINGS, MAX_LOOKUPS};
use tiers::{evict_device, publish, Key, Promotion, State};

/// Why an adapter could not be acquired. Cloned to every request waiting on the same load.
#[derive(Debug, thiserror::Error, Clone)]
pub enum CacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The adapter's files are invalid or do not fit the base.
    #[error("{0}")]
    Invalid(Arc<AdapterError>),
    #[error("adapter `{id}` needs {bytes} bytes but the device adapter cache holds at most {budget} (--adapter-cache-bytes)")]
    TooLarge { id: String, bytes: usize, budget: usize },
    /// `leased`: the bytes running requests hold (and copies under way will), which no eviction can free.
    #[error("adapter cache full: `{id}` needs {bytes} bytes, but running requests hold {leased} of the {budget}-byte device tier (--adapter-cache-bytes) and none was released in time")]
    Full { id: String, bytes: usize, leased: usize, budget: usize },
    #[error("loading adapter `{id}` failed: {reason}")]
    Internal { id: String, reason: String },
    /// The look at its folder did not end in time: a hung file system, or [`MAX_LOOKUPS`] looks held by one.
    #[error("adapter `{id}`: the adapters folder did not answer in time (a hung file system?)")]
    Unanswered { id: String },
}

/// Byte budgets of the two tiers.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    pub device_bytes: usize,
    pub host_bytes: usize,
    /// How long an acquire without a deadline waits for leased bytes to be released.
    pub default_wait: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { device_bytes: 1 << 30, host_bytes: 4 << 30, default_wait: Duration::from_secs(10) }
    }
}

/// Weights a request has read or copied for an adapter, kept while it waits for device room (a wait ends at
/// every lease released: each retry must not read or copy them again).
enum Held {
    /// A finished disk load it made or joined.
    Loaded(Arc<Loaded>),
    /// A promotion's copy of the version `key`.
    Promoted { key: Key, weights: Arc<LoraWeights>, bytes: usize },
}

/// What the tiers hold for an adapter's current version.
enum Cached {
    /// Device-tier hit, leased.
    Hit(AdapterLease),
    /// In a tier, but the device tier cannot free `bytes`: `leased` of its bytes are in use.
    NoRoom { bytes: usize, leased: usize },
    /// In the host tier only, being copied to the device: wait for the copy, then lease it under `key`.
    Promoting { key: Key, copy: Promotion, bytes: usize },
    /// Not cached (or its files changed): load from disk.
    Miss,
}

struct Inner {
    store: AdapterStore,
    layout: BaseLayout,
    device: Device,
    config: CacheConfig,
    state: Mutex<State>,
    space: Notify,
    /// Loads under way, by adapter: the files' stamp, the load's generation, its outcome.
    inflight: Mutex<HashMap<String, (FileStamp, u64, LoadFuture)>>,
    disk_loads: AtomicU64,
    promotions: AtomicU64,
    /// Turns for looks at the adapters folder ([`MAX_LOOKUPS`]).
    lookups: Arc<Semaphore>,
    /// Turns for listings, within those ([`MAX_LISTINGS`]).
    listings: Arc<Semaphore>,
    /// The looks running now ([`AdapterCache::longest_silence`]).
    looking: Mutex<looks::Looking>,
}

/// The adapter cache (cheap to clone; all clones share state).
#[derive(Clone)]
pub struct AdapterCache {
    inner: Arc<Inner>,
}

/// A request's hold on one version of an adapter; releases it when dropped.
pub struct AdapterLease {
    inner: Arc<Inner>,
    key: Key,
    weights: Arc<LoraWeights>,
}

impl AdapterLease {
    pub fn id(&self) -> &str {
        &self.key.0
    }

    /// The version string clients see (`adapter_version`).
    pub fn version(&self) -> &str {
        &self.key.1
    }

    pub fn weights(&self) -> &LoraWeights {
        &self.weights
    }
}

/// One more lease on the same version (the `n` completions of one request each hold one): counted as any
/// lease, so the version stays resident until the last is dropped.
impl Clone for AdapterLease {
    fn clone(&self) -> Self {
        let mut st = self.inner.state.lock().expect("cache lock");
        // Counted where `Drop` will uncount it: the device entry, if the version still has one.
        if let Some(e) = st.device.get_mut(&self.key) {
            e.leases += 1;
        }
        AdapterLease { inner: self.inner.clone(), key: self.key.clone(), weights: self.weights.clone() }
    }
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock().expect("cache lock");
        let remove = match st.device.get_mut(&self.key) {
            Some(e) => {
                e.leases -= 1;
                e.stale && e.leases == 0
            }
            None => false,
        };
        if remove {
            evict_device(&mut st, &self.key);
        }
        publish(&st);
        drop(st);
        self.inner.space.notify_waiters();
    }
}

impl std::fmt::Debug for AdapterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterLease").field("id", &self.key.0).field("version", &self.key.1).finish()
    }
}

/// One adapter as [`AdapterCache::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterStatus {
    pub id: String,
    /// Current version, while it is resident in a tier.
    pub version: Option<String>,
    pub device_resident: bool,
    pub host_resident: bool,
    pub bytes: usize,
    pub leases: usize,
}

impl AdapterCache {
    /// A cache over `store` for a base of shape `layout`, with device-tier weights on `device`.
    pub fn new(store: AdapterStore, layout: BaseLayout, device: Device, config: CacheConfig) -> Self {
        let cache = AdapterCache {
            inner: Arc::new(Inner {
                store,
                layout,
                device,
                config,
                state: Mutex::new(State::default()),
                space: Notify::new(),
                inflight: Mutex::new(HashMap::new()),
                disk_loads: AtomicU64::new(0),
                promotions: AtomicU64::new(0),
                lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
                listings: Arc::new(Semaphore::new(MAX_LISTINGS)),
                looking: Mutex::default(),
            }),
        };
        publish(&cache.inner.state.lock().expect("cache lock"));
        cache
    }

    pub fn store(&self) -> &AdapterStore {
        &self.inner.store
    }

    pub fn config(&self) -> CacheConfig {
        self.inner.config
    }

    /// Loads from disk so far (single flight: concurrent first requests count once).
    pub fn disk_loads(&self) -> u64 {
        self.inner.disk_loads.load(Ordering::Relaxed)
    }

    /// Loads from disk under way.
    pub fn loads_in_flight(&self) -> usize {
        self.inner.inflight.lock().expect("inflight lock").len()
    }

    /// Host-to-device promotions so far (single flight: concurrent requests for one adapter count once).
    pub fn promotions(&self) -> u64 {
        self.inner.promotions.load(Ordering::Relaxed)
    }

    /// Bytes resident in the device tier.
    pub fn device_bytes(&self) -> usize {
        self.inner.state.lock().expect("cache lock").device_bytes
    }

    /// Total leases held.
    pub fn leases(&self) -> usize {
        self.inner.state.lock().expect("cache lock").device.values().map(|e| e.leases).sum()
    }

    /// Leases adapter `id` (its current version), loading it if needed. Waits for leased bytes to be
    /// released until `deadline` (or the configured default wait).
    pub async fn acquire(&self, id: &str, deadline: Option<tokio::time::Instant>) -> Result<AdapterLease, CacheError> {
        let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.inner.config.default_wait);
        let mut first = true;
        let mut held: Option<Held> = None;
        loop {
            // Resolved and stamped again after every wait: the files may have changed meanwhile.
            let (dir, stamp) = self.locate(id, deadline).await?;
            let space = self.inner.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            // Weights held from before a wait, unless read from files that changed since: look again then.
            let weights = match held.take() {
                Some(Held::Loaded(l)) if l.version.stamp != stamp => None,
                h => h,
            };
            let weights = match weights {
                Some(h) => h,
                None => {
                    let cached = self.try_cached(id, &stamp, first)?;
                    first = false;
                    match cached {
                        Cached::Hit(lease) => return Ok(lease),
                        Cached::NoRoom { bytes, leased } => {
                            self.wait_for_space(id, bytes, leased, deadline, space).await?;
                            continue;
                        }
                        Cached::Promoting { key, mut copy, bytes } => match copy.wait_for(Option::is_some).await {
                            Ok(done) => Held::Promoted { key, weights: done.clone().expect("is_some")?, bytes },
                            Err(_) => {
                                return Err(CacheError::Internal { id: id.into(), reason: "promotion lost".into() })
                            }
                        },
                        Cached::Miss => match self.load(id, dir.clone(), stamp.clone()).await? {
                            Some(loaded) => Held::Loaded(loaded),
                            // Loaded by another request since the look: look again.
                            None => continue,
                        },
                    }
                }
            };
            match self.lease_held(id, &weights, &stamp) {
                Cached::Hit(lease) => return Ok(lease),
                Cached::NoRoom { bytes, leased } => {
                    self.wait_for_space(id, bytes, leased, deadline, space).await?;
                    held = Some(weights);
                }
                // A copy of a version superseded or unloaded meanwhile: look again.
                Cached::Promoting { .. } | Cached::Miss => {}
            }
        }
    }

    /// `id`'s folder and its files' stamp ([`Self::look`]), by `deadline`.
    async fn locate(&self, id: &str, deadline: tokio::time::Instant) -> Result<(PathBuf, FileStamp), CacheError> {
        let owned = id.to_string();
        let look = self.look(move |c| {
            let dir = c.inner.store.resolve(&owned)?;
            let stamp = AdapterStore::stamp(&dir)?;
            Ok((dir, stamp))
        });
        match tokio::time::timeout_at(deadline, look).await {
            Ok(looked) => looked.unwrap_or_else(|e| Err(CacheError::Internal { id: id.into(), reason: e.to_string() })),
            Err(_) => Err(CacheError::Unanswered { id: id.into() }),
        }
    }

    /// A lease on weights the request holds: `Hit`, `NoRoom`, or `Miss` for a promoted copy whose version is
    /// no longer the adapter's current one at `stamp`.
    fn lease_held(&self, id: &str, held: &Held, stamp: &FileStamp) -> Cached {
        let mut st = self.inner.state.lock().expect("cache lock");
        let (r, bytes) = match held {
            Held::Loaded(l) => (st.lease_loaded(&self.inner, id, l), l.bytes),
            Held::Promoted { key, weights, bytes } => {
                if st.current.get(&key.0).is_none_or(|v| v.id != key.1 || &v.stamp != stamp) {
                    return Cached::Miss;
                }
                (st.lease_or_insert(&self.inner, key.clone(), weights, *bytes), *bytes)
            }
        };
        publish(&st);
        match r {
            Ok(lease) => Cached::Hit(lease),
            Err(leased) => Cached::NoRoom { bytes, leased },
        }
    }

    /// The cache lookup, under the cache lock: a device-tier hit is leased; a host-tier hit joins (or starts)
    /// its promotion, which the caller waits for.
    /// `first`: the request's first look (hits and misses are counted once per request, not per retry).
    fn try_cached(&self, id: &str, stamp: &FileStamp, first: bool) -> Result<Cached, CacheError> {
        let hit = |tier: &'static str| {
            if first {
                metrics::counter!(t::ADAPTER_CACHE_HITS_TOTAL, "tier" => tier).increment(1);
            }
        };
        let miss = |tiers: &[&'static str]| {
            if first {
                for &tier in tiers {
                    metrics::counter!(t::ADAPTER_CACHE_MISSES_TOTAL, "tier" => tier).increment(1);
                }
            }
        };
        let mut st = self.inner.state.lock().expect("cache lock");
        if let Some((failed_stamp, err)) = st.failed.get(id) {
            if failed_stamp == stamp {
                return Err(err.clone());
            }
        }
        let Some(version) = st.current.get(id).cloned() else {
            miss(&[t::TIER_DEVICE, t::TIER_HOST]);
            return Ok(Cached::Miss);
        };
        if &version.stamp != stamp {
            // Files changed since the current version was loaded: a new version is needed.
            miss(&[t::TIER_DEVICE, t::TIER_HOST]);
            return Ok(Cached::Miss);
        }
        let key = (id.to_string(), version.id.clone());
        if let Some(lease) = st.lease_resident(&self.inner, &key) {
            hit(t::TIER_DEVICE);
            publish(&st);
            return Ok(Cached::Hit(lease));
        }
        let tick = st.next_tick();
        let Some(h) = st.host.get_mut(&key) else {
            miss(&[t::TIER_DEVICE, t::TIER_HOST]);
            return Ok(Cached::Miss);
        };
        h.tick = tick;
        miss(&[t::TIER_DEVICE]);
        hit(t::TIER_HOST);
        let (host, bytes) = (h.weights.clone(), h.bytes);
        if let Some(copy) = st.promoting.get(&key) {
            return Ok(Cached::Promoting { key, copy: copy.clone(), bytes });
        }
        // No copy when it could not be inserted anyway (other copies under way count as used).
        let unleased: usize = st.device.values().filter(|e| e.leases == 0).map(|e| e.bytes).sum();
        let leased = st.device_bytes - unleased;
        if leased + st.reserved + bytes > self.inner.config.device_bytes {
            return Ok(Cached::NoRoom { bytes, leased: leased + st.reserved });
        }
        st.reserved += bytes;
        let (tx, copy) = tokio::sync::watch::channel(None);
        st.promoting.insert(key.clone(), copy.clone());
        tokio::spawn(promote(self.inner.clone(), key.clone(), host, bytes, tx));
        Ok(Cached::Promoting { key, copy, bytes })
    }

    async fn wait_for_space(
        &self,
        id: &str,
        bytes: usize,
        leased: usize,
        deadline: tokio::time::Instant,
        space: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Result<(), CacheError> {
        match tokio::time::timeout_at(deadline, space).await {
            Ok(()) => Ok(()),
            Err(_) => Err(CacheError::Full { id: id.into(), bytes, leased, budget: self.inner.config.device_bytes }),
        }
    }

    /// Loads `id` into the cache without keeping a lease (`--preload`; the `LoadAdapter` RPC leases through
    /// `acquire`, within its deadline); returns its version.
    pub async fn load_adapter(&self, id: &str) -> Result<String, CacheError> {
        let lease = self.acquire(id, None).await?;
        Ok(lease.version().to_string())
    }

    /// Drops `id` from both tiers (running requests keep their leased version until they finish). Returns
    /// whether a version of it was resident in a tier; NOT_FOUND when nothing was cached under `id` and the
    /// root has no such adapter either (looked for off the async workers, [`Self::look`]).
    pub async fn unload(&self, id: &str) -> Result<bool, CacheError> {
        if let Some(resident) = self.forget(id)? {
            return Ok(resident);
        }
        self.find(id).await?;
        Ok(false)
    }

    /// Whether the root has adapter `id` (NOT_FOUND, or the id's error, when not), looked for off the async
    /// workers ([`Self::look`]).
    pub async fn find(&self, id: &str) -> Result<(), CacheError> {
        let owned = id.to_string();
        let looked = self.look(move |c| c.inner.store.resolve(&owned).map(drop)).await;
        Ok(looked.map_err(|e| CacheError::Internal { id: id.into(), reason: e.to_string() })??)
    }

    /// The cache's part of [`Self::unload`]: `None` when it knew nothing of `id`.
    fn forget(&self, id: &str) -> Result<Option<bool>, CacheError> {
        super::store::validate_id(id)?;
        // Lock order: `inflight`, then `state`.
        let inflight = self.inner.inflight.lock().expect("inflight lock");
        let loading = inflight.contains_key(id);
        let mut st = self.inner.state.lock().expect("cache lock");
        let had_current = st.current.remove(id).is_some();
        let resident = st.device.keys().any(|k| k.0 == id) || st.host.keys().any(|k| k.0 == id);
        st.failed.remove(id);
        st.supersede(id, None);
        if loading {
            // The load under way finishes for the requests waiting on it, but brings nothing back (nor does
            // one just finished: its requests lease it as a stale version, `State::lease_loaded`).
            st.bump(id);
        }
        publish(&st);
        Ok((had_current || resident || loading).then_some(resident))
    }

    /// Every adapter under the root with its cache status, listed on the calling thread (the server lists
    /// through [`Self::listing`]).
    pub fn list(&self) -> Vec<AdapterStatus> {
        self.list_stepping(&mut || {})
    }

    fn list_stepping(&self, step: &mut dyn FnMut()) -> Vec<AdapterStatus> {
        let ids = self.inner.store.scan_stepping(step).0;
        let st = self.inner.state.lock().expect("cache lock");
        ids.into_iter()
            .map(|id| {
                let version = st.current.get(&id).map(|v| v.id.clone());
                let key = version.clone().map(|v| (id.clone(), v));
                let dev = key.as_ref().and_then(|k| st.device.get(k));
                let host = key.as_ref().and_then(|k| st.host.get(k));
                AdapterStatus {
                    device_resident: dev.is_some(),
                    host_resident: host.is_some(),
                    bytes: dev.map(|e| e.bytes).or(host.map(|h| h.bytes)).unwrap_or(0),
                    leases: st.device.iter().filter(|(k, _)| k.0 == id).map(|(_, e)| e.leases).sum(),
                    // "Current version if loaded": `current` outlives eviction from both tiers.
                    version: version.filter(|_| dev.is_some() || host.is_some()),
                    id,
                }
            })
            .collect()
    }

    /// Re-stats every cached adapter and drops versions whose files changed or vanished (the watcher calls
    /// this; acquires check on their own).
    pub fn refresh(&self) {
        let ids: Vec<(String, FileStamp)> = {
            let st = self.inner.state.lock().expect("cache lock");
            st.current.iter().map(|(id, v)| (id.clone(), v.stamp.clone())).collect()
        };
        for (id, stamp) in ids {
            let now = self.inner.store.resolve(&id).ok().and_then(|d| AdapterStore::stamp(&d).ok());
            if now.as_ref() != Some(&stamp) {
                let inflight = self.inner.inflight.lock().expect("inflight lock");
                let mut st = self.inner.state.lock().expect("cache lock");
                if st.current.get(&id).map(|v| &v.stamp) == Some(&stamp) {
                    st.current.remove(&id);
                    st.supersede(&id, None);
                    // A load of these same old files under way must not make them current again (a load of
                    // the new files may: it is not stale).
                    if inflight.get(&id).is_some_and(|(s, _, _)| *s == stamp) {
                        st.bump(&id);
                    }
                    publish(&st);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::peft::{write_dir, AdapterMeta};
    use crate::lora::synthetic::{random_adapter, ATTENTION};

    /// A cache over one small adapter, `a`, written into `dir`.
    fn one_adapter(dir: &std::path::Path) -> AdapterCache {
        let layout = BaseLayout { layers: 1, dims: [(8, 8); 7] };
        let w = random_adapter(&layout, 2, &ATTENTION, 1, &Device::Cpu).unwrap();
        let meta = AdapterMeta {
            r: 2,
            lora_alpha: 2.0,
            use_rslora: false,
            lora_dropout: 0.0,
            base_model_name_or_path: "tiny".into(),
            dtype: candle_core::DType::F32,
        };
        write_dir(&dir.join("a"), &w, &meta).unwrap();
        let config = CacheConfig { device_bytes: 1 << 20, host_bytes: 1 << 20, default_wait: Duration::from_secs(5) };
        AdapterCache::new(AdapterStore::open(dir).unwrap(), layout, Device::Cpu, config)
    }

    /// A request whose load finished just before an unload (the load's in-flight entry already gone, so the
    /// unload could not mark it stale) leases what it asked for, as a stale version: the unload is not undone.
    /// Before, the request installed the load again (current and resident, although unloaded).
    #[tokio::test]
    async fn a_load_finished_before_an_unload_does_not_undo_it() {
        let tmp = tempfile::tempdir().unwrap();
        let c = one_adapter(tmp.path());
        let dir = c.store().resolve("a").unwrap();
        let stamp = AdapterStore::stamp(&dir).unwrap();
        // The acquire's load, finished (installed, its in-flight entry gone), then the unload, then the
        // acquire's lease.
        let loaded = c.load("a", dir, stamp.clone()).await.unwrap().unwrap();
        assert_eq!(c.loads_in_flight(), 0);
        assert!(c.unload("a").await.unwrap());
        let Cached::Hit(lease) = c.lease_held("a", &Held::Loaded(loaded), &stamp) else { panic!("no lease") };
        let status = c.list().pop().unwrap();
        assert_eq!((status.version.as_deref(), status.leases), (None, 1), "unloaded, yet current again: {status:?}");
        drop(lease);
        assert_eq!((c.device_bytes(), c.list()[0].device_resident), (0, false), "the stale version left");
        // The next request loads it again, as after any unload.
        c.acquire("a", None).await.unwrap();
        assert_eq!(c.disk_loads(), 2);
    }

    /// A cloned lease (a request's `n` completions) is a lease of its own: an unloaded version stays resident
    /// until the last of them is dropped, and then leaves.
    #[tokio::test]
    async fn a_cloned_lease_holds_the_version_until_the_last_drops() {
        let tmp = tempfile::tempdir().unwrap();
        let c = one_adapter(tmp.path());
        let lease = c.acquire("a", None).await.unwrap();
        let copy = lease.clone();
        assert_eq!((c.leases(), copy.version()), (2, lease.version()));
        assert!(c.unload("a").await.unwrap());
        let bytes = c.device_bytes();
        assert!(bytes > 0);
        drop(lease);
        assert_eq!((c.leases(), c.device_bytes()), (1, bytes), "the copy still holds it");
        drop(copy);
        assert_eq!((c.leases(), c.device_bytes()), (0, 0), "the stale version left with its last lease");
    }
}
