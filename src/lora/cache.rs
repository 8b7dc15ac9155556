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
//! - **Versions and hot swap.** Every acquire stats the adapter's two files; when they changed, the next
//!   acquire loads the new version while leases on the old one finish undisturbed (a request never mixes
//!   versions). New files that fail to load are reported to every request (`FAILED_PRECONDITION`, naming the
//!   file) until they change again, and the old version is not served. A filesystem watcher
//!   ([`super::watch`]) drops stale entries eagerly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::Notify;

use super::peft::{self, AdapterError, BaseLayout};
use super::store::{AdapterStore, AdapterVersion, FileStamp, StoreError};
use super::LoraWeights;
use crate::telemetry as t;

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
    #[error("adapter cache full: `{id}` needs {bytes} bytes and all {leased} leased bytes of the {budget}-byte device tier are in use by running requests")]
    Full { id: String, bytes: usize, leased: usize, budget: usize },
    #[error("loading adapter `{id}` failed: {reason}")]
    Internal { id: String, reason: String },
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

type Key = (String, String); // (adapter id, version id)

struct DeviceEntry {
    weights: Arc<LoraWeights>,
    bytes: usize,
    leases: usize,
    /// Superseded (files changed, unloaded): never handed to new requests; evicted once unleased.
    stale: bool,
    tick: u64,
}

struct HostEntry {
    weights: Arc<LoraWeights>,
    bytes: usize,
    tick: u64,
}

#[derive(Default)]
struct State {
    tick: u64,
    device: HashMap<Key, DeviceEntry>,
    host: HashMap<Key, HostEntry>,
    /// The version new requests get, per adapter id.
    current: HashMap<String, AdapterVersion>,
    /// Files that failed to load, by stamp: reported again until the files change.
    failed: HashMap<String, (FileStamp, CacheError)>,
    device_bytes: usize,
    host_bytes: usize,
    /// Host-to-device copies under way, by key: requests for the same key wait on the same copy.
    promoting: HashMap<Key, Promotion>,
    /// Device bytes those copies will need: counted against the budget before they start.
    reserved: usize,
    /// Per adapter, the generation of its state: bumped when a load starts, and by an unload or a refresh
    /// that drops it. A load that finishes in an older generation (a newer load, an unload or a file
    /// change came meanwhile) is stale: it serves the requests that waited for it, but never becomes current.
    generation: HashMap<String, u64>,
    last_generation: u64,
}

/// A promotion's outcome, for every request waiting on it (`None` until the copy is done).
type Promotion = tokio::sync::watch::Receiver<Option<Result<Arc<LoraWeights>, CacheError>>>;

/// A finished load.
struct Loaded {
    version: AdapterVersion,
    /// The adapter's generation when the load started (see `State::generation`).
    generation: u64,
    /// The host-tier copy, in RAM (the same tensors as `device` when the base is on the CPU).
    host: Arc<LoraWeights>,
    /// The device-tier copy, where the base lives.
    device: Arc<LoraWeights>,
    bytes: usize,
}

/// A disk load's outcome, for every request waiting on it.
type LoadFuture = futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Loaded>, CacheError>>>;

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
    /// Current version, if it has been loaded.
    pub version: Option<String>,
    pub device_resident: bool,
    pub host_resident: bool,
    pub bytes: usize,
    pub leases: usize,
}

/// Drops a device entry, returning it. Not counted here: only the evictions that make room for another
/// adapter are (`insert_device`); a superseded version or an unload leaving is routine, not cache pressure
/// (the thrashing alert reads the count).
fn evict_device(st: &mut State, key: &Key) -> Option<DeviceEntry> {
    let e = st.device.remove(key)?;
    st.device_bytes -= e.bytes;
    Some(e)
}

/// Publishes the tiers' gauges: what each tier holds, as its budget counts it. (On a CPU server both tiers are
/// RAM and an adapter in both is one copy: there the sum of the two overstates the memory.)
fn publish(st: &State) {
    metrics::gauge!(t::ADAPTER_CACHE_RESIDENT_BYTES, "tier" => t::TIER_DEVICE).set(st.device_bytes as f64);
    metrics::gauge!(t::ADAPTER_CACHE_RESIDENT_BYTES, "tier" => t::TIER_HOST).set(st.host_bytes as f64);
    metrics::gauge!(t::ADAPTERS_RESIDENT, "tier" => t::TIER_DEVICE).set(st.device.len() as f64);
    metrics::gauge!(t::ADAPTERS_RESIDENT, "tier" => t::TIER_HOST).set(st.host.len() as f64);
}

enum Insert {
    Done,
    NoSpace { leased: usize },
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks every device entry of `id` other than `keep` stale and evicts those not leased.
    fn supersede(&mut self, id: &str, keep: Option<&str>) {
        let keys: Vec<Key> = self.device.keys().filter(|k| k.0 == id && Some(k.1.as_str()) != keep).cloned().collect();
        for k in keys {
            let e = self.device.get_mut(&k).expect("key");
            e.stale = true;
            if e.leases == 0 {
                evict_device(self, &k);
            }
        }
        let host: Vec<Key> = self.host.keys().filter(|k| k.0 == id && Some(k.1.as_str()) != keep).cloned().collect();
        for k in host {
            if let Some(h) = self.host.remove(&k) {
                self.host_bytes -= h.bytes;
            }
        }
    }

    /// One more lease on `key`, the adapter's current version, if it is in the device tier, marking it most
    /// recently used. An entry superseded earlier by the same version (unloaded, then loaded again while
    /// still leased) holds the same bytes and is current again.
    fn lease_resident(&mut self, inner: &Arc<Inner>, key: &Key) -> Option<AdapterLease> {
        let tick = self.next_tick();
        let e = self.device.get_mut(key)?;
        e.stale = false;
        e.leases += 1;
        e.tick = tick;
        Some(AdapterLease { inner: inner.clone(), key: key.clone(), weights: e.weights.clone() })
    }

    /// A lease on `key` (the current version): on the resident entry when another request put it there
    /// first, else on `weights`, inserted. `Err(leased bytes)` when there is no room.
    fn lease_or_insert(
        &mut self,
        inner: &Arc<Inner>,
        key: Key,
        weights: &Arc<LoraWeights>,
        bytes: usize,
    ) -> Result<AdapterLease, usize> {
        if let Some(lease) = self.lease_resident(inner, &key) {
            return Ok(lease);
        }
        match self.insert_device(&key, weights, bytes, inner.config.device_bytes, 1) {
            Insert::Done => Ok(AdapterLease { inner: inner.clone(), key, weights: weights.clone() }),
            Insert::NoSpace { leased } => Err(leased),
        }
    }

    /// Puts `weights` into the device tier with `leases` leases, evicting unleased LRU entries as needed.
    fn insert_device(
        &mut self,
        key: &Key,
        weights: &Arc<LoraWeights>,
        bytes: usize,
        budget: usize,
        leases: usize,
    ) -> Insert {
        while self.device_bytes + bytes > budget {
            // Stale entries first, then least recently used; leased entries never.
            let victim = self
                .device
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .min_by_key(|(_, e)| (!e.stale, e.tick))
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    if evict_device(self, &k).is_some_and(|e| !e.stale) {
                        metrics::counter!(t::ADAPTER_CACHE_EVICTIONS_TOTAL, "tier" => t::TIER_DEVICE).increment(1);
                    }
                }
                None => {
                    let leased = self.device.values().map(|e| e.bytes).sum();
                    return Insert::NoSpace { leased };
                }
            }
        }
        let tick = self.next_tick();
        self.device_bytes += bytes;
        self.device.insert(key.clone(), DeviceEntry { weights: weights.clone(), bytes, leases, stale: false, tick });
        Insert::Done
    }

    /// Starts a new generation of `id`'s state and returns it.
    fn bump(&mut self, id: &str) -> u64 {
        self.last_generation += 1;
        self.generation.insert(id.to_string(), self.last_generation);
        self.last_generation
    }

    /// Whether a load started in `generation` is the newest word on `id`.
    fn is_newest(&self, id: &str, generation: u64) -> bool {
        self.generation.get(id) == Some(&generation)
    }

    /// A lease on a stale load's weights for a request that waited for it: on its device entry if there is
    /// one, else inserted marked stale, so that it is never handed to a new request and leaves with its last
    /// lease. `Err(leased bytes)` when there is no room.
    fn lease_stale(&mut self, inner: &Arc<Inner>, key: Key, l: &Loaded) -> Result<AdapterLease, usize> {
        if self.current.get(&key.0).is_some_and(|v| v.id == key.1) {
            // The same files are current again (loaded anew since): an ordinary lease.
            return self.lease_or_insert(inner, key, &l.device, l.bytes);
        }
        let tick = self.next_tick();
        if let Some(e) = self.device.get_mut(&key) {
            e.leases += 1;
            e.tick = tick;
            return Ok(AdapterLease { inner: inner.clone(), key, weights: e.weights.clone() });
        }
        match self.insert_device(&key, &l.device, l.bytes, inner.config.device_bytes, 1) {
            Insert::Done => {
                self.device.get_mut(&key).expect("inserted").stale = true;
                Ok(AdapterLease { inner: inner.clone(), key, weights: l.device.clone() })
            }
            Insert::NoSpace { leased } => Err(leased),
        }
    }

    /// Makes a finished load the adapter's current version (superseding older ones) and keeps it in the host
    /// tier; returns its key.
    fn install(&mut self, id: &str, l: &Loaded, host_budget: usize) -> Key {
        self.failed.remove(id);
        if self.current.get(id).map(|v| &v.stamp) != Some(&l.version.stamp) {
            self.current.insert(id.to_string(), l.version.clone());
            self.supersede(id, Some(&l.version.id));
        }
        let key = (id.to_string(), l.version.id.clone());
        self.insert_host(&key, &l.host, l.bytes, host_budget);
        key
    }

    /// Keeps a host copy (best effort: skipped when larger than the whole tier).
    fn insert_host(&mut self, key: &Key, weights: &Arc<LoraWeights>, bytes: usize, budget: usize) {
        if bytes > budget || self.host.contains_key(key) {
            return;
        }
        while self.host_bytes + bytes > budget {
            let victim = self.host.iter().min_by_key(|(_, e)| e.tick).map(|(k, _)| k.clone()).expect("non-empty");
            let e = self.host.remove(&victim).expect("victim");
            self.host_bytes -= e.bytes;
            metrics::counter!(t::ADAPTER_CACHE_EVICTIONS_TOTAL, "tier" => t::TIER_HOST).increment(1);
        }
        let tick = self.next_tick();
        self.host_bytes += bytes;
        self.host.insert(key.clone(), HostEntry { weights: weights.clone(), bytes, tick });
    }
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
        loop {
            // Resolved and stamped again after every wait: the files may have changed meanwhile.
            let dir = self.inner.store.resolve(id)?;
            let stamp = AdapterStore::stamp(&dir)?;
            let space = self.inner.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let cached = self.try_cached(id, &stamp, first)?;
            first = false;
            match cached {
                Cached::Hit(lease) => return Ok(lease),
                Cached::NoRoom { bytes, leased } => {
                    self.wait_for_space(id, bytes, leased, deadline, space).await?;
                    continue;
                }
                Cached::Promoting { key, mut copy, bytes } => {
                    let weights = match copy.wait_for(Option::is_some).await {
                        Ok(done) => done.clone().expect("is_some")?,
                        Err(_) => return Err(CacheError::Internal { id: id.into(), reason: "promotion lost".into() }),
                    };
                    match self.insert_promoted(key, &weights, bytes) {
                        Cached::Hit(lease) => return Ok(lease),
                        Cached::NoRoom { bytes, leased } => {
                            self.wait_for_space(id, bytes, leased, deadline, space).await?
                        }
                        // Superseded or unloaded while it was copied: look again.
                        Cached::Promoting { .. } | Cached::Miss => {}
                    }
                    continue;
                }
                Cached::Miss => {}
            }
            let loaded = self.load(id, dir.clone(), stamp.clone()).await?;
            let outcome = {
                let mut st = self.inner.state.lock().expect("cache lock");
                let r = if st.is_newest(id, loaded.generation) {
                    // The load installed it already, unless the tiers moved on since.
                    let key = st.install(id, &loaded, self.inner.config.host_bytes);
                    st.lease_or_insert(&self.inner, key, &loaded.device, loaded.bytes)
                } else {
                    // A newer load, an unload or a file change came while it loaded: this request, which
                    // asked before, runs with it; it never becomes current.
                    st.lease_stale(&self.inner, (id.to_string(), loaded.version.id.clone()), &loaded)
                };
                publish(&st);
                r
            };
            match outcome {
                Ok(lease) => return Ok(lease),
                Err(leased) => self.wait_for_space(id, loaded.bytes, leased, deadline, space).await?,
            }
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

    /// A lease on a promoted copy: `Hit`, `NoRoom`, or `Miss` when `key` is no longer the adapter's current
    /// version.
    fn insert_promoted(&self, key: Key, weights: &Arc<LoraWeights>, bytes: usize) -> Cached {
        let mut st = self.inner.state.lock().expect("cache lock");
        if st.current.get(&key.0).map(|v| &v.id) != Some(&key.1) {
            return Cached::Miss;
        }
        let r = match st.lease_or_insert(&self.inner, key, weights, bytes) {
            Ok(lease) => Cached::Hit(lease),
            Err(leased) => Cached::NoRoom { bytes, leased },
        };
        publish(&st);
        r
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

    /// Loads `id` at `stamp` once, however many callers ask concurrently: the load is a task of its own
    /// ([`disk_load`]), so callers giving up (deadline, cancellation) neither abandon nor repeat it. A load
    /// made stale meanwhile (an unload came) is not joined: a new one starts.
    async fn load(&self, id: &str, dir: PathBuf, stamp: FileStamp) -> Result<Arc<Loaded>, CacheError> {
        use futures::FutureExt;
        let shared = {
            // Lock order: `inflight`, then `state`.
            let mut inflight = self.inner.inflight.lock().expect("inflight lock");
            let mut st = self.inner.state.lock().expect("cache lock");
            match inflight.get(id) {
                Some((s, g, f)) if *s == stamp && st.is_newest(id, *g) => f.clone(),
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
        shared.await
    }

    /// Loads `id` into the cache without keeping a lease (`LoadAdapter`, `--preload`); returns its version.
    pub async fn load_adapter(&self, id: &str) -> Result<String, CacheError> {
        let lease = self.acquire(id, None).await?;
        Ok(lease.version().to_string())
    }

    /// Drops `id` from both tiers (running requests keep their leased version until they finish). Returns
    /// whether anything was resident.
    pub fn unload(&self, id: &str) -> Result<bool, CacheError> {
        super::store::validate_id(id)?;
        // Lock order: `inflight`, then `state`.
        let inflight = self.inner.inflight.lock().expect("inflight lock");
        let loading = inflight.contains_key(id);
        let mut st = self.inner.state.lock().expect("cache lock");
        let had_current = st.current.remove(id).is_some();
        let had = had_current || st.device.keys().any(|k| k.0 == id) || st.host.keys().any(|k| k.0 == id);
        st.failed.remove(id);
        st.supersede(id, None);
        if loading {
            // The load under way finishes for the requests waiting on it, but brings nothing back.
            st.bump(id);
        }
        publish(&st);
        drop((st, inflight));
        if !had && !loading {
            // Nothing cached, and no such adapter either: NOT_FOUND, as for a request naming it.
            self.inner.store.resolve(id)?;
        }
        Ok(had)
    }

    /// Every adapter under the root with its cache status.
    pub fn list(&self) -> Vec<AdapterStatus> {
        let ids = self.inner.store.list();
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
    let res = tokio::task::spawn_blocking(move || read_files(&inner2, id2, &dir, generation))
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
    fn end_load(&self, id: &str, stamp: &FileStamp, generation: u64) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if inflight.get(id).is_some_and(|(s, g, _)| s == stamp && *g == generation) {
            inflight.remove(id);
        }
    }
}

/// Reads and checks adapter `id`'s files in `dir` (blocking).
fn read_files(inner: &Inner, id: String, dir: &std::path::Path, generation: u64) -> Result<Loaded, CacheError> {
    // The files may change between the request's stat and the read: version by what is read.
    let version = AdapterStore::version(dir)?;
    let gpu = !inner.device.is_cpu();
    // On a GPU server the CPU is otherwise idle: convert on all cores.
    let load = if gpu { peft::load_dir_parallel } else { peft::load_dir };
    let adapter = load(dir, &inner.layout, &Device::Cpu).map_err(|e| CacheError::Invalid(Arc::new(e)))?;
    if gpu {
        check_gpu_limits(dir, &adapter.weights)?;
    }
    let host = Arc::new(adapter.weights);
    // Refused before any copy to the device: it could never be leased.
    let (bytes, budget) = (host.bytes(), inner.config.device_bytes);
    if bytes > budget {
        return Err(CacheError::TooLarge { id, bytes, budget });
    }
    let device = if gpu {
        Arc::new(to_device(&host, &inner.device).map_err(|e| CacheError::Internal { id, reason: e.to_string() })?)
    } else {
        host.clone()
    };
    Ok(Loaded { version, generation, host, device, bytes })
}

/// A promotion, as a task of its own, so that requests giving up (cancelled, timed out) neither abandon nor
/// repeat the copy: copy the host weights to the device (on the blocking pool on a GPU), put the copy in the
/// device tier unleased if the key is still current (evicting as needed; skipped when everything is leased),
/// then end the promotion and hand the copy to the waiting requests, which lease it (or insert it, if it was
/// evicted meanwhile). Ending the promotion and the insert happen under one lock: a request looking in
/// between finds one or the other, never neither.
async fn promote(
    inner: Arc<Inner>,
    key: Key,
    host: Arc<LoraWeights>,
    bytes: usize,
    tx: tokio::sync::watch::Sender<Option<Result<Arc<LoraWeights>, CacheError>>>,
) {
    inner.promotions.fetch_add(1, Ordering::Relaxed);
    let copy = if inner.device.is_cpu() {
        to_device(&host, &inner.device).map_err(|e| e.to_string())
    } else {
        let device = inner.device.clone();
        tokio::task::spawn_blocking(move || to_device(&host, &device).map_err(|e| e.to_string()))
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
fn to_device(w: &LoraWeights, device: &Device) -> candle_core::Result<LoraWeights> {
    if device.is_cpu() {
        return Ok(w.clone());
    }
    let copy = w.to_device(device)?;
    device.synchronize()?;
    Ok(copy)
}

/// Refuses, at load, an adapter the GPU's batched-LoRA kernels cannot run (rank above their maximum), so it
/// fails its own requests with the reason instead of every batch it would join.
fn check_gpu_limits(dir: &std::path::Path, w: &LoraWeights) -> Result<(), CacheError> {
    let max = crate::gpu::launch::LORA_MAX_RANK;
    match w.targets().find(|(_, m)| m.rank() > max) {
        None => Ok(()),
        Some((id, m)) => Err(CacheError::Invalid(Arc::new(AdapterError::Config {
            file: dir.join("adapter_config.json").display().to_string(),
            key: "r".into(),
            reason: format!("{id} has rank {}, above the GPU kernels' maximum of {max}", m.rank()),
        }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    }
}
