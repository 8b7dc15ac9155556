//! The adapter cache's two tiers and the bookkeeping behind them, all under the cache lock: device and host
//! entries with their byte counts, LRU ticks and lease counts; eviction (stale first, then least recently
//! used, leased never); the current version, remembered failures, promotions under way and bytes reserved
//! for them; each adapter's generation (which load may still become current); and the tiers' gauges.

use std::collections::HashMap;
use std::sync::Arc;

use super::load::Loaded;
use super::{AdapterLease, CacheError, Inner};
use crate::lora::store::{AdapterVersion, FileStamp};
use crate::lora::LoraWeights;
use crate::telemetry as t;

pub(super) type Key = (String, String); // (adapter id, version id)

pub(super) struct DeviceEntry {
    pub(super) weights: Arc<LoraWeights>,
    pub(super) bytes: usize,
    pub(super) leases: usize,
    /// Superseded (files changed, unloaded): never handed to new requests; evicted once unleased.
    pub(super) stale: bool,
    pub(super) tick: u64,
}

pub(super) struct HostEntry {
    pub(super) weights: Arc<LoraWeights>,
    pub(super) bytes: usize,
    pub(super) tick: u64,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) tick: u64,
    pub(super) device: HashMap<Key, DeviceEntry>,
    pub(super) host: HashMap<Key, HostEntry>,
    /// The version new requests get, per adapter id.
    pub(super) current: HashMap<String, AdapterVersion>,
    /// Files that failed to load, by stamp: reported again until the files change.
    pub(super) failed: HashMap<String, (FileStamp, CacheError)>,
    pub(super) device_bytes: usize,
    pub(super) host_bytes: usize,
    /// Host-to-device copies under way, by key: requests for the same key wait on the same copy.
    pub(super) promoting: HashMap<Key, Promotion>,
    /// Device bytes those copies will need: counted against the budget before they start.
    pub(super) reserved: usize,
    /// Per adapter, the generation of its state: bumped when a load starts, and by an unload or a refresh
    /// that drops it. A load that finishes in an older generation (a newer load, an unload or a file
    /// change came meanwhile) is stale: it serves the requests that waited for it, but never becomes current.
    pub(super) generation: HashMap<String, u64>,
    pub(super) last_generation: u64,
}

/// A promotion's outcome, for every request waiting on it (`None` until the copy is done).
pub(super) type Promotion = tokio::sync::watch::Receiver<Option<Result<Arc<LoraWeights>, CacheError>>>;

/// Drops a device entry, returning it. Not counted here: only the evictions that make room for another
/// adapter are (`insert_device`); a superseded version or an unload leaving is routine, not cache pressure
/// (the thrashing alert reads the count).
pub(super) fn evict_device(st: &mut State, key: &Key) -> Option<DeviceEntry> {
    let e = st.device.remove(key)?;
    st.device_bytes -= e.bytes;
    Some(e)
}

/// Publishes the tiers' gauges: what each tier holds, as its budget counts it. (On a CPU server both tiers are
/// RAM and an adapter in both is one copy: there the sum of the two overstates the memory.)
pub(super) fn publish(st: &State) {
    metrics::gauge!(t::ADAPTER_CACHE_RESIDENT_BYTES, "tier" => t::TIER_DEVICE).set(st.device_bytes as f64);
    metrics::gauge!(t::ADAPTER_CACHE_RESIDENT_BYTES, "tier" => t::TIER_HOST).set(st.host_bytes as f64);
    metrics::gauge!(t::ADAPTERS_RESIDENT, "tier" => t::TIER_DEVICE).set(st.device.len() as f64);
    metrics::gauge!(t::ADAPTERS_RESIDENT, "tier" => t::TIER_HOST).set(st.host.len() as f64);
}

pub(super) enum Insert {
    Done,
    NoSpace { leased: usize },
}

impl State {
    pub(super) fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks every device entry of `id` other than `keep` stale and evicts those not leased.
    pub(super) fn supersede(&mut self, id: &str, keep: Option<&str>) {
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
    pub(super) fn lease_resident(&mut self, inner: &Arc<Inner>, key: &Key) -> Option<AdapterLease> {
        let tick = self.next_tick();
        let e = self.device.get_mut(key)?;
        e.stale = false;
        e.leases += 1;
        e.tick = tick;
        Some(AdapterLease { inner: inner.clone(), key: key.clone(), weights: e.weights.clone() })
    }

    /// A lease on `key` (the current version): on the resident entry when another request put it there
    /// first, else on `weights`, inserted. `Err(leased bytes)` when there is no room.
    pub(super) fn lease_or_insert(
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

    /// Puts `weights` into the device tier with `leases` leases, evicting unleased LRU entries as needed;
    /// when even evicting all of them would leave no room, evicts nothing (`NoSpace`: the caller waits, and
    /// the entries it could not use stay for the requests that do).
    pub(super) fn insert_device(
        &mut self,
        key: &Key,
        weights: &Arc<LoraWeights>,
        bytes: usize,
        budget: usize,
        leases: usize,
    ) -> Insert {
        let leased: usize = self.device.values().filter(|e| e.leases > 0).map(|e| e.bytes).sum();
        if leased + bytes > budget {
            return Insert::NoSpace { leased };
        }
        while self.device_bytes + bytes > budget {
            // Stale entries first, then least recently used; leased entries never. There is one: the unleased
            // bytes cover the shortfall.
            let Some(victim) = self
                .device
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .min_by_key(|(_, e)| (!e.stale, e.tick))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if evict_device(self, &victim).is_some_and(|e| !e.stale) {
                metrics::counter!(t::ADAPTER_CACHE_EVICTIONS_TOTAL, "tier" => t::TIER_DEVICE).increment(1);
            }
        }
        let tick = self.next_tick();
        self.device_bytes += bytes;
        self.device.insert(key.clone(), DeviceEntry { weights: weights.clone(), bytes, leases, stale: false, tick });
        Insert::Done
    }

    /// Starts a new generation of `id`'s state and returns it.
    pub(super) fn bump(&mut self, id: &str) -> u64 {
        self.last_generation += 1;
        self.generation.insert(id.to_string(), self.last_generation);
        self.last_generation
    }

    /// Whether a load started in `generation` is the newest word on `id`.
    pub(super) fn is_newest(&self, id: &str, generation: u64) -> bool {
        self.generation.get(id) == Some(&generation)
    }

    /// A lease on a finished load's weights for a request that made or joined the load. When its version is
    /// current (the load installed it, or the same files were loaded anew since), an ordinary lease. Else a
    /// newer load, an unload or a file change came after the request asked: it runs with what it asked for,
    /// leased on the version's device entry if there is one, else inserted marked stale, so that it never
    /// becomes current, is never handed to a new request and leaves with its last lease. `Err(leased bytes)`
    /// when there is no room.
    pub(super) fn lease_loaded(&mut self, inner: &Arc<Inner>, id: &str, l: &Loaded) -> Result<AdapterLease, usize> {
        let key = (id.to_string(), l.version.id.clone());
        if self.current.get(&key.0).is_some_and(|v| v.id == key.1) {
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
    pub(super) fn install(&mut self, id: &str, l: &Loaded, host_budget: usize) -> Key {
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
    pub(super) fn insert_host(&mut self, key: &Key, weights: &Arc<LoraWeights>, bytes: usize, budget: usize) {
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
