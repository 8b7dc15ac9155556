//! The adapter cache: LRU order, byte budgets, leases under pressure, single-flight loads, hot swap
//! (version change mid-request, broken updates, deleted adapters), id rules and path confinement, and a
//! churn test of 1,000 adapters through a cache with room for 10.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use loraserve::lora::cache::{AdapterCache, CacheConfig, CacheError};
use loraserve::lora::peft::{write_dir, AdapterMeta, BaseLayout};
use loraserve::lora::store::{AdapterStore, StoreError};
use loraserve::lora::{batched, LinearId, LoraModule, LoraSegment, LoraWeights, ModuleKind};

const IN: usize = 8;

fn layout() -> BaseLayout {
    BaseLayout { layers: 1, dims: [(IN, IN); 7] }
}

fn q() -> LinearId {
    LinearId::new(0, ModuleKind::QProj)
}

/// A rank-1 adapter on q_proj whose delta for x = e0 is `value` in output 0 (scale α/r = 1).
fn write_adapter(root: &Path, id: &str, value: f32) {
    let mut w = LoraWeights::new(1);
    let mut a = vec![0f32; IN];
    a[0] = value;
    let mut b_t = vec![0f32; IN];
    b_t[0] = 1.0;
    w.insert(
        q(),
        LoraModule {
            a: Tensor::from_vec(a, (1, IN), &Device::Cpu).unwrap(),
            b_t: Tensor::from_vec(b_t, (1, IN), &Device::Cpu).unwrap(),
            scale: 1.0,
        },
    );
    let meta = AdapterMeta {
        r: 1,
        lora_alpha: 1.0,
        use_rslora: false,
        lora_dropout: 0.0,
        base_model_name_or_path: "tiny".into(),
        dtype: candle_core::DType::F32,
    };
    let dir = root.join(id);
    if dir.exists() {
        // Replace in place (hot swap): write beside, then swap the files.
        let tmp = root.join(format!(".{}.new", id.replace('/', "_")));
        let _ = std::fs::remove_dir_all(&tmp);
        write_dir(&tmp, &w, &meta).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::rename(tmp.join(f), dir.join(f)).unwrap();
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    } else {
        write_dir(&dir, &w, &meta).unwrap();
    }
}

/// What the adapter computes: output 0 of its delta for x = e0.
fn output_of(w: &LoraWeights) -> f32 {
    let mut x = vec![0f32; IN];
    x[0] = 1.0;
    let x = Tensor::from_vec(x, (1, IN), &Device::Cpu).unwrap();
    let y = Tensor::zeros((1, IN), candle_core::DType::F32, &Device::Cpu).unwrap();
    batched::apply(&y, &x, q(), &[LoraSegment::new(0..1, w)]).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap()[0]
}

/// Bytes of one test adapter.
const ONE: usize = 2 * IN * 4;

fn cache(root: &Path, device_adapters: usize, host_adapters: usize) -> AdapterCache {
    let store = AdapterStore::open(root).unwrap();
    let config = CacheConfig {
        device_bytes: device_adapters * ONE,
        host_bytes: host_adapters * ONE,
        default_wait: Duration::from_millis(200),
    };
    AdapterCache::new(store, layout(), Device::Cpu, config)
}

fn resident(c: &AdapterCache) -> Vec<String> {
    c.list().into_iter().filter(|s| s.device_resident).map(|s| s.id).collect()
}

#[tokio::test]
async fn lru_order_and_budget() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        write_adapter(tmp.path(), id, i as f32 + 1.0);
    }
    let c = cache(tmp.path(), 2, 0);
    drop(c.acquire("a", None).await.unwrap());
    drop(c.acquire("b", None).await.unwrap());
    drop(c.acquire("a", None).await.unwrap()); // a is now most recent
    drop(c.acquire("c", None).await.unwrap()); // evicts b, the least recently used
    assert_eq!(resident(&c), vec!["a", "c"]);
    let versions: Vec<bool> = c.list().iter().map(|s| s.version.is_some()).collect();
    assert_eq!(versions, [true, false, true], "an adapter in no tier has no current version");
    assert!(c.device_bytes() <= 2 * ONE);
    drop(c.acquire("b", None).await.unwrap()); // evicts a
    assert_eq!(resident(&c), vec!["b", "c"]);
    assert_eq!(c.disk_loads(), 4, "no host tier: b was loaded again");
}

#[tokio::test]
async fn host_tier_promotes_without_reading_disk() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        write_adapter(tmp.path(), id, i as f32 + 1.0);
    }
    let c = cache(tmp.path(), 1, 3);
    for id in ["a", "b", "c", "a", "b"] {
        let lease = c.acquire(id, None).await.unwrap();
        assert_eq!(output_of(lease.weights()), 1.0 + ["a", "b", "c"].iter().position(|x| *x == id).unwrap() as f32);
    }
    assert_eq!(c.disk_loads(), 3, "second round came from the host tier");
    assert_eq!(c.promotions(), 2);
    assert_eq!(resident(&c), vec!["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_host_hits_promote_once() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    write_adapter(tmp.path(), "b", 2.0);
    let c = cache(tmp.path(), 1, 2);
    drop(c.acquire("a", None).await.unwrap());
    drop(c.acquire("b", None).await.unwrap()); // a leaves the device tier, stays on the host
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { output_of(c.acquire("a", None).await.unwrap().weights()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1.0);
    }
    assert_eq!((c.disk_loads(), c.promotions()), (2, 1));
    assert_eq!((resident(&c), c.leases(), c.device_bytes()), (vec!["a".to_string()], 0, ONE));
}

#[tokio::test(start_paused = true)]
async fn a_host_hit_without_room_waits_and_names_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    write_adapter(tmp.path(), "b", 2.0);
    let c = cache(tmp.path(), 1, 2);
    drop(c.acquire("a", None).await.unwrap());
    let lb = c.acquire("b", None).await.unwrap(); // the whole device tier is leased
    let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
    match c.acquire("a", Some(deadline)).await {
        Err(CacheError::Full { id, bytes, leased, budget }) => {
            assert_eq!((id.as_str(), bytes, leased, budget), ("a", ONE, ONE, ONE))
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(c.promotions(), 0, "no copy is made that could not be inserted");
    drop(lb);
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 1.0);
    assert_eq!((c.disk_loads(), c.promotions()), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn leased_adapters_survive_pressure_and_waiters_get_in_after_release() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        write_adapter(tmp.path(), id, i as f32 + 1.0);
    }
    let c = cache(tmp.path(), 2, 0);
    let la = c.acquire("a", None).await.unwrap();
    let lb = c.acquire("b", None).await.unwrap();
    // Everything is leased: c waits until its deadline, then RESOURCE_EXHAUSTED-style failure.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
    match c.acquire("c", Some(deadline)).await {
        Err(CacheError::Full { id, .. }) => assert_eq!(id, "c"),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(resident(&c), vec!["a", "b"]);
    assert!(c.device_bytes() <= 2 * ONE);
    // A waiter gets in as soon as a lease is released.
    let c2 = c.clone();
    let waiter = tokio::spawn(async move {
        c2.acquire("c", Some(tokio::time::Instant::now() + Duration::from_secs(5)))
            .await
            .map(|l| output_of(l.weights()))
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!waiter.is_finished());
    drop(la);
    assert_eq!(waiter.await.unwrap().unwrap(), 3.0);
    assert!(resident(&c).contains(&"b".to_string()), "b is still leased and stays");
    drop(lb);
}

/// An adapter that cannot fit while others are leased evicts nothing: the unleased adapters stay for the
/// requests that use them (before, all were evicted, then the acquire waited anyway).
#[tokio::test(start_paused = true)]
async fn an_acquire_that_cannot_fit_evicts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        write_adapter(tmp.path(), id, i as f32 + 1.0);
    }
    write_ranked(tmp.path(), "wide", 4.0, 3); // 3 × ONE bytes
    let c = cache(tmp.path(), 3, 0);
    let la = c.acquire("a", None).await.unwrap();
    drop(c.acquire("b", None).await.unwrap());
    drop(c.acquire("c", None).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
    match c.acquire("wide", Some(deadline)).await {
        Err(CacheError::Full { id, bytes, leased, budget }) => {
            assert_eq!((id.as_str(), bytes, leased, budget), ("wide", 3 * ONE, ONE, 3 * ONE))
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(resident(&c), vec!["a", "b", "c"], "evicted for an insert that could not happen");
    drop(la);
    assert_eq!(output_of(c.acquire("wide", None).await.unwrap().weights()), 4.0);
    assert_eq!(resident(&c), vec!["wide"]);
}

/// A request waiting for device room keeps what it read: each lease released wakes it, and it does not read
/// the adapter from disk again (without a host tier to hold it, it did, once per release).
#[tokio::test(start_paused = true)]
async fn a_waiting_request_reads_its_adapter_once() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    write_adapter(tmp.path(), "b", 2.0);
    let c = cache(tmp.path(), 1, 0);
    let la = c.acquire("a", None).await.unwrap();
    let c2 = c.clone();
    let waiter = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        c2.acquire("b", Some(deadline)).await.map(|l| output_of(l.weights()))
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 0..5 {
        // Another request on `a` comes and goes: a release, which wakes the waiter.
        drop(c.acquire("a", None).await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
    }
    drop(la);
    assert_eq!(waiter.await.unwrap().unwrap(), 2.0);
    assert_eq!(c.disk_loads(), 2, "b was read again while it waited");
}

/// A weights file replaced by rename while it is read (a publish file by file) never gives one version's
/// name to another's weights: every version served computes one thing. Before, the version was stamped from
/// the files before the weights were read by path, so a rename in between labelled new weights with the old
/// version (and the prefix cache, keyed by version, mixed them).
#[test]
fn a_file_replaced_while_read_never_mixes_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, side) = (tmp.path().join("root"), tmp.path().join("side"));
    write_adapter(&side, "one", 1.0);
    write_adapter(&side, "two", 2.0);
    write_adapter(&root, "x", 1.0);
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flipper = {
        let (stop, flips, root, side) = (stop.clone(), flips.clone(), root.clone(), side.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let odd = flips.load(Ordering::Relaxed) % 2 == 1;
                let from = side.join(if odd { "one" } else { "two" }).join("adapter_model.safetensors");
                std::fs::copy(from, root.join("x/.next")).unwrap();
                std::fs::rename(root.join("x/.next"), root.join("x/adapter_model.safetensors")).unwrap();
                flips.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let c = cache(&root, 4, 0);
    let mut seen: std::collections::HashMap<String, f32> = Default::default();
    let (mut served, since) = (0, std::time::Instant::now());
    // At least 3 s, and until both sides have raced a hundred times (a loaded machine starves one or the
    // other), at most a minute.
    let enough = |served: usize| served > 100 && flips.load(Ordering::Relaxed) > 100;
    while since.elapsed() < Duration::from_secs(3) || (!enough(served) && since.elapsed() < Duration::from_secs(60)) {
        rt.block_on(c.unload("x")).unwrap();
        let Ok(lease) = rt.block_on(c.acquire("x", None)) else { continue }; // changed while read: UNAVAILABLE
        let out = output_of(lease.weights());
        let first = *seen.entry(lease.version().to_string()).or_insert(out);
        assert_eq!(first, out, "version {} served both adapters", lease.version());
        served += 1;
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(enough(served), "{served} loads, {} swaps", flips.load(Ordering::Relaxed));
}

/// An adapter larger than the whole device tier is refused; the refusal is remembered like broken files.
#[tokio::test]
async fn too_large_for_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    let store = AdapterStore::open(tmp.path()).unwrap();
    let c = AdapterCache::new(
        store,
        layout(),
        Device::Cpu,
        CacheConfig { device_bytes: ONE - 1, host_bytes: 0, default_wait: Duration::from_millis(10) },
    );
    for _ in 0..3 {
        assert!(matches!(c.acquire("a", None).await, Err(CacheError::TooLarge { .. })));
    }
    assert_eq!(c.disk_loads(), 1, "the refusal is remembered until the files change, not read again each time");
    std::thread::sleep(Duration::from_millis(5));
    write_adapter(tmp.path(), "a", 2.0);
    assert!(matches!(c.acquire("a", None).await, Err(CacheError::TooLarge { .. })));
    assert_eq!(c.disk_loads(), 2, "new files are read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_acquires_load_once() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "team/hot", 7.0);
    let c = cache(tmp.path(), 4, 4);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { output_of(c.acquire("team/hot", None).await.unwrap().weights()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 7.0);
    }
    assert_eq!(c.disk_loads(), 1);
    assert_eq!(c.leases(), 0);
}

#[tokio::test]
async fn version_change_mid_request() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    let c = cache(tmp.path(), 4, 4);
    let old = c.acquire("a", None).await.unwrap();
    std::thread::sleep(Duration::from_millis(5));
    write_adapter(tmp.path(), "a", 2.0);
    let new = c.acquire("a", None).await.unwrap();
    assert_ne!(old.version(), new.version());
    assert_eq!(output_of(old.weights()), 1.0, "the running request keeps its version");
    assert_eq!(output_of(new.weights()), 2.0);
    drop(old); // the superseded version leaves the cache with its last lease
    let status = c.list();
    assert_eq!(status[0].version.as_deref(), Some(new.version()));
    assert_eq!(c.device_bytes(), ONE);
}

/// `cp -p` over the files (same inode, same size, the old modification time put back): still a new version.
#[tokio::test]
async fn a_rewrite_keeping_size_and_mtime_is_a_new_version() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    write_adapter(tmp.path(), "b", 2.0);
    let c = cache(tmp.path(), 4, 4);
    let old = c.acquire("a", None).await.unwrap();
    assert_eq!(output_of(old.weights()), 1.0);
    std::thread::sleep(Duration::from_millis(20));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let (src, dst) = (tmp.path().join("b").join(f), tmp.path().join("a").join(f));
        let mtime = std::fs::metadata(&dst).unwrap().modified().unwrap();
        std::fs::write(&dst, std::fs::read(src).unwrap()).unwrap();
        std::fs::File::options().write(true).open(&dst).unwrap().set_modified(mtime).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().modified().unwrap(), mtime);
    }
    let new = c.acquire("a", None).await.unwrap();
    assert_eq!(output_of(new.weights()), 2.0, "the rewritten weights, not the cached ones");
    assert_ne!(old.version(), new.version());
}

#[tokio::test]
async fn broken_update_serves_nothing_broken() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    let c = cache(tmp.path(), 4, 4);
    let old = c.acquire("a", None).await.unwrap();
    std::fs::write(tmp.path().join("a/adapter_config.json"), "{ not json").unwrap();
    for _ in 0..2 {
        match c.acquire("a", None).await {
            Err(CacheError::Invalid(e)) => assert!(e.to_string().contains("adapter_config.json"), "{e}"),
            other => panic!("expected the broken files to be reported, got {other:?}"),
        }
    }
    assert_eq!(c.disk_loads(), 2, "the failure is remembered until the files change");
    assert_eq!(output_of(old.weights()), 1.0, "the running request is undisturbed");
    drop(old);
    assert_eq!(c.device_bytes(), 0, "the old version is gone, not silently kept for new requests");
    std::thread::sleep(Duration::from_millis(5));
    write_adapter(tmp.path(), "a", 3.0);
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 3.0);
}

#[tokio::test]
async fn deleted_adapter_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    let c = cache(tmp.path(), 4, 4);
    drop(c.acquire("a", None).await.unwrap());
    std::fs::remove_dir_all(tmp.path().join("a")).unwrap();
    assert!(matches!(c.acquire("a", None).await, Err(CacheError::Store(StoreError::NotFound { .. }))));
    c.refresh();
    assert_eq!(c.device_bytes(), 0);
    assert!(c.list().is_empty());
}

#[tokio::test]
async fn ids_are_checked_and_confined() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    write_adapter(tmp.path(), "outside", 1.0);
    #[cfg(unix)]
    std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("escape")).unwrap();
    let c = cache(&root, 4, 4);
    for bad in ["..", "../outside", "/etc/passwd", "", &"x".repeat(129), "a b"] {
        assert!(matches!(c.acquire(bad, None).await, Err(CacheError::Store(StoreError::InvalidId { .. }))), "{bad:?}");
    }
    #[cfg(unix)]
    assert!(matches!(c.acquire("escape", None).await, Err(CacheError::Store(StoreError::Escapes { .. }))));
    assert!(matches!(c.acquire("missing", None).await, Err(CacheError::Store(StoreError::NotFound { .. }))));
}

#[tokio::test]
async fn unload_and_preload() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    let c = cache(tmp.path(), 4, 4);
    let v = c.load_adapter("a").await.unwrap();
    assert_eq!(c.list()[0].version.as_deref(), Some(v.as_str()));
    let running = c.acquire("a", None).await.unwrap();
    assert!(c.unload("a").await.unwrap());
    assert_eq!(output_of(running.weights()), 1.0);
    assert!(!c.list()[0].host_resident);
    drop(running);
    assert_eq!(c.device_bytes(), 0);
    assert_eq!(c.list()[0].version, None, "unloaded: no current version");
    assert!(!c.unload("a").await.unwrap(), "an adapter that exists but is not cached: nothing to unload");
    assert!(matches!(c.unload("missing").await, Err(CacheError::Store(StoreError::NotFound { .. }))));
}

/// `UnloadAdapter`'s `was_loaded` says whether a version was resident: one evicted from both tiers was not,
/// as `ListAdapters` shows it.
#[tokio::test]
async fn an_adapter_evicted_from_both_tiers_was_not_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    write_adapter(tmp.path(), "b", 2.0);
    let c = cache(tmp.path(), 1, 0);
    c.load_adapter("a").await.unwrap();
    c.load_adapter("b").await.unwrap();
    let a = c.list().into_iter().find(|s| s.id == "a").unwrap();
    assert!(!a.device_resident && !a.host_resident && a.version.is_none(), "{a:?}");
    assert!(!c.unload("a").await.unwrap());
    assert!(c.unload("b").await.unwrap());
}

/// A request for `id` that starts its load from disk, then is gone. It is polled until the load is under way
/// (the folder is looked up first, on the blocking pool); the poll that starts the load registers it before
/// returning, so the loop stops there (unless the load already finished within that very poll: in practice,
/// reading the files takes far longer).
async fn start_a_load_and_give_up(c: &AdapterCache, id: &str) {
    let acquire = c.acquire(id, None);
    tokio::pin!(acquire);
    let since = std::time::Instant::now();
    loop {
        assert!(futures::poll!(acquire.as_mut()).is_pending(), "the acquire ended before its load started");
        if c.loads_in_flight() > 0 || c.disk_loads() > 0 {
            return;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "the load never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A request that gives up while its adapter loads (deadline, client gone) neither abandons nor repeats the
/// load: the load finishes on its own and lands in the cache, where the retry finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_outlives_the_request_that_started_it() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(tmp.path(), "a", 1.0);
    let c = cache(tmp.path(), 4, 4);
    start_a_load_and_give_up(&c, "a").await;
    let since = std::time::Instant::now();
    while c.device_bytes() == 0 {
        assert!(since.elapsed() < Duration::from_secs(10), "the abandoned load never landed: {:?}", c.list());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(c.list()[0].leases, 0, "installed unleased");
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 1.0);
    assert_eq!(c.disk_loads(), 1, "the retry found the load done instead of loading again");
}

/// 1,000 adapters, room for 10, four threads acquiring at random: no errors, the budget holds at every
/// observation, and every lease computes with its own adapter.
#[test]
fn churn_thousand_adapters_through_ten_slots() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 1000;
    for i in 0..n {
        write_adapter(tmp.path(), &format!("g{}/a{i}", i % 10), i as f32 + 1.0);
    }
    let c = cache(tmp.path(), 10, 50);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4u64)
        .map(|tid| {
            let (c, stop, done, handle) = (c.clone(), stop.clone(), done.clone(), rt.handle().clone());
            std::thread::spawn(move || {
                let mut rng = loraserve::rng::Rng::new(tid);
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.below(n as u64) as usize;
                    let id = format!("g{}/a{i}", i % 10);
                    let lease = handle.block_on(c.acquire(&id, None)).unwrap_or_else(|e| panic!("{id}: {e}"));
                    assert_eq!(output_of(lease.weights()), i as f32 + 1.0, "{id} computed with the wrong adapter");
                    assert!(c.device_bytes() <= 10 * ONE, "budget exceeded: {}", c.device_bytes());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 100, "only {} acquisitions", done.load(Ordering::Relaxed));
    assert_eq!(c.leases(), 0);
    assert!(c.device_bytes() <= 10 * ONE);
}

/// Waits until the cache dropped the stale version (no acquire in between), failing after `within`.
async fn dropped(c: &AdapterCache, within: Duration) {
    let since = std::time::Instant::now();
    while c.device_bytes() != 0 {
        assert!(since.elapsed() < within, "the stale version is still cached: {:?}", c.list());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The watcher drops stale versions without waiting for a request, also when the root is a symlink that a
/// deploy re-points (release link, git-sync): after the switch it watches the new target.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_a_re_pointed_root() {
    let tmp = tempfile::tempdir().unwrap();
    let (r1, r2, root) = (tmp.path().join("r1"), tmp.path().join("r2"), tmp.path().join("current"));
    std::fs::create_dir_all(&r1).unwrap();
    std::fs::create_dir_all(&r2).unwrap();
    write_adapter(&r1, "a", 1.0);
    write_adapter(&r2, "a", 2.0);
    std::os::unix::fs::symlink(&r1, &root).unwrap();
    let c = cache(&root, 4, 4);
    let _watch = c.watch().await.expect("a filesystem watcher on Linux");
    drop(c.acquire("a", None).await.unwrap());
    write_adapter(&r1, "a", 1.5);
    dropped(&c, Duration::from_secs(10)).await;

    drop(c.acquire("a", None).await.unwrap());
    // Re-point the link the way deploys do: a new link renamed over the old one.
    std::os::unix::fs::symlink(&r2, tmp.path().join("next")).unwrap();
    std::fs::rename(tmp.path().join("next"), &root).unwrap();
    dropped(&c, loraserve::lora::watch::ROOT_RECHECK * 5).await;
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 2.0);
    // The new target is watched; the old one, deleted, is not missed.
    std::fs::remove_dir_all(&r1).unwrap();
    write_adapter(&r2, "a", 3.0);
    dropped(&c, Duration::from_secs(10)).await;
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 3.0);
}

/// A root folder deleted and created again, or renamed away and replaced (deploys that replace the whole
/// folder), is watched again: the kernel's watch ended with the old folder, or stayed with it.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_a_replaced_root_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("adapters");
    write_adapter(&root, "a", 1.0);
    let c = cache(&root, 4, 4);
    let _watch = c.watch().await.expect("a filesystem watcher on Linux");
    drop(c.acquire("a", None).await.unwrap());
    for (renamed, value) in [(false, 2.0), (true, 4.0)] {
        if renamed {
            // The old folder, still watched, is not the root any more.
            std::fs::rename(&root, tmp.path().join("adapters.old")).unwrap();
        } else {
            std::fs::remove_dir_all(&root).unwrap();
        }
        write_adapter(&root, "a", value);
        // Long enough for the watch to have moved to the new folder.
        tokio::time::sleep(loraserve::lora::watch::ROOT_RECHECK * 2).await;
        assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), value);
        write_adapter(&root, "a", value + 1.0);
        dropped(&c, Duration::from_secs(10)).await;
        assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), value + 1.0);
    }
}

/// A rank-`rank` adapter on q_proj written to a new folder `root/id`, computing `value` like [`write_adapter`]'s:
/// large ranks make loads that take a while.
fn write_ranked(root: &Path, id: &str, value: f32, rank: usize) {
    let mut w = LoraWeights::new(1);
    let (mut a, mut b_t) = (vec![0f32; rank * IN], vec![0f32; rank * IN]);
    a[0] = value;
    b_t[0] = 1.0;
    let t = |v: Vec<f32>| Tensor::from_vec(v, (rank, IN), &Device::Cpu).unwrap();
    w.insert(q(), LoraModule { a: t(a), b_t: t(b_t), scale: 1.0 });
    let meta = AdapterMeta {
        r: rank,
        lora_alpha: rank as f64,
        use_rslora: false,
        lora_dropout: 0.0,
        base_model_name_or_path: "tiny".into(),
        dtype: candle_core::DType::F32,
    };
    write_dir(&root.join(id), &w, &meta).unwrap();
}

fn big_cache(root: &Path) -> AdapterCache {
    let config = CacheConfig { device_bytes: 1 << 30, host_bytes: 1 << 30, default_wait: Duration::from_secs(30) };
    AdapterCache::new(AdapterStore::open(root).unwrap(), layout(), Device::Cpu, config)
}

/// An unload while a load is under way wins: the load does not bring the adapter back, although nobody waits
/// for it any more. (16 MB, so that the load is still under way when the unload comes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_during_a_load_is_not_undone_by_it() {
    let tmp = tempfile::tempdir().unwrap();
    write_ranked(tmp.path(), "a", 1.0, 1 << 18);
    let c = big_cache(tmp.path());
    start_a_load_and_give_up(&c, "a").await;
    c.unload("a").await.expect("a loading adapter is known: not NOT_FOUND");
    let since = std::time::Instant::now();
    while c.loads_in_flight() > 0 {
        assert!(since.elapsed() < Duration::from_secs(30), "the load never finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(c.list()[0].version, None, "unloaded, yet resident again: {:?}", c.list());
    assert_eq!(c.device_bytes(), 0);
    // The next request loads it again, as after any unload.
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 1.0);
    assert!(c.list()[0].version.is_some());
}

/// A slow load of an old version that finishes after a new version was published and loaded serves the
/// request that asked before the publish, and does not roll the adapter back. The versions are folders
/// behind a symlink re-pointed by rename (the load of version 1 reads its own folder whatever the timing).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_old_load_does_not_roll_back_a_newer_version() {
    let tmp = tempfile::tempdir().unwrap();
    // Version 1: 64 MB, so its load is still running when version 2 (a few bytes) is published and loaded.
    write_ranked(tmp.path(), "a-v1", 1.0, 1 << 20);
    write_ranked(tmp.path(), "a-v2", 2.0, 1);
    std::os::unix::fs::symlink("a-v1", tmp.path().join("a")).unwrap();
    let c = big_cache(tmp.path());
    let c1 = c.clone();
    let slow = tokio::spawn(async move { c1.acquire("a", None).await.map(|l| output_of(l.weights())) });
    let since = std::time::Instant::now();
    while c.loads_in_flight() == 0 && !slow.is_finished() {
        assert!(since.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    std::os::unix::fs::symlink("a-v2", tmp.path().join("next")).unwrap();
    std::fs::rename(tmp.path().join("next"), tmp.path().join("a")).unwrap();
    let new = c.acquire("a", None).await.unwrap();
    assert_eq!(output_of(new.weights()), 2.0);
    let new_version = new.version().to_string();
    drop(new);
    assert_eq!(slow.await.unwrap().unwrap(), 1.0, "the request that asked first runs with what it asked for");
    let current = c.list().into_iter().find(|a| a.id == "a").unwrap().version;
    assert_eq!(current.as_deref(), Some(new_version.as_str()), "rolled back to the old version");
    assert_eq!(output_of(c.acquire("a", None).await.unwrap().weights()), 2.0);
}
