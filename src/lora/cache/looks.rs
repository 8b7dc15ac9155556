//! Looks at the adapters folder: the cache's `stat`s, look-ups and listings, each run on tokio's blocking pool
//! with one of [`MAX_LOOKUPS`] turns, and each with a clock. How long the folder has kept a running look
//! waiting ([`AdapterCache::longest_silence`]) is how a hung mount (a dead NFS server) shows: in the server's
//! health, and in how long a call without a deadline waits for its looks ([`AdapterCache::unless_unanswered`]).
//! A look of many calls (a listing of a large folder) restarts its clock at each ([`LookClock::step`]), so
//! only one call that does not return counts, not a long listing that goes on answering.

use std::collections::HashMap;
use std::future::Future;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::AdapterCache;

/// The most looks at the adapters folder ([`AdapterCache::look`]) on the blocking pool at once.
pub const MAX_LOOKUPS: usize = 64;

/// The most listings ([`AdapterCache::listing`]) at once, each holding one of the [`MAX_LOOKUPS`] turns: slow
/// listings of a large folder, which take as long as they take, leave the other turns to requests' looks.
pub const MAX_LISTINGS: usize = 4;

/// The looks at the adapters folder running now, each with when the folder last answered it (its start, or
/// its last step).
#[derive(Default)]
pub(super) struct Looking {
    next: u64,
    heard: HashMap<u64, Instant>,
}

/// A running look's clock ([`AdapterCache::look_stepping`]), started when the look has its turn (a look
/// waiting for a blocking thread is waiting for the folder too: the pool's threads are held by loads from it),
/// and counted among the running looks until dropped, also when the look panics.
struct LookClock {
    cache: AdapterCache,
    number: u64,
}

impl LookClock {
    fn start(cache: &AdapterCache) -> Self {
        let mut l = cache.inner.looking.lock().unwrap_or_else(PoisonError::into_inner);
        let number = l.next;
        l.next += 1;
        l.heard.insert(number, Instant::now());
        LookClock { cache: cache.clone(), number }
    }

    /// The folder answered one of the look's calls: restarts its clock.
    fn step(&self) {
        let mut l = self.cache.inner.looking.lock().unwrap_or_else(PoisonError::into_inner);
        l.heard.insert(self.number, Instant::now());
    }
}

impl Drop for LookClock {
    fn drop(&mut self) {
        self.cache.inner.looking.lock().unwrap_or_else(PoisonError::into_inner).heard.remove(&self.number);
    }
}

impl AdapterCache {
    /// `look` (at the adapters folder: a few `stat`s) on tokio's blocking pool, at most [`MAX_LOOKUPS`] at
    /// once, each running to its end whoever still waits for it: a hung mount (a dead NFS server) then holds
    /// that many blocking threads, not the async workers serving every call, nor the rest of the pool (disk
    /// loads, promotions, compiles); further looks wait for a turn, within their callers' deadlines. An
    /// error only when `look` panicked.
    pub async fn look<T: Send + 'static>(
        &self,
        look: impl FnOnce(&AdapterCache) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        self.look_stepping(move |c, _| look(c)).await
    }

    /// [`Self::look`] for a look of many calls (a listing), which steps its clock after each.
    async fn look_stepping<T: Send + 'static>(
        &self,
        look: impl FnOnce(&AdapterCache, &LookClock) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let turn = self.inner.lookups.clone().acquire_owned().await.expect("never closed");
        let clock = LookClock::start(self);
        tokio::task::spawn_blocking(move || {
            let _turn = turn; // held until the look ends, also past a caller that left
            look(&clock.cache, &clock)
        })
        .await
    }

    /// [`Self::list`] as a look at the folder that steps its clock at each entry: a large folder on a slow
    /// file system takes as long as it takes, but one call that hangs shows. At most [`MAX_LISTINGS`] run at
    /// once, each holding its turn to its end (also past a caller that left); a further listing waits for one.
    pub async fn listing(&self) -> Result<Vec<super::AdapterStatus>, tokio::task::JoinError> {
        let one = self.inner.listings.clone().acquire_owned().await.expect("never closed");
        self.look_stepping(move |c, clock| {
            let _one = one;
            c.list_stepping(&mut || clock.step())
        })
        .await
    }

    /// How long the folder has left the longest-waiting running look ([`Self::look`], or a listing's)
    /// unanswered: since the look began, or since its last step; `None` when none runs. The folder answers
    /// in microseconds when healthy: seconds are a hung mount (the server's health reports it,
    /// `server::health`).
    pub fn longest_silence(&self) -> Option<Duration> {
        let l = self.inner.looking.lock().unwrap_or_else(PoisonError::into_inner);
        l.heard.values().min().map(Instant::elapsed)
    }

    /// `work` (that looks at the folder) for a call without a deadline: `None` (the folder did not answer)
    /// once the call has waited the cache's default wait while the folder has left some running look
    /// unanswered that long (the call's own, one holding the turn it waits for, or another: one folder
    /// that hangs is a mount that does), and its output otherwise. A listing that goes on stepping is waited
    /// for as long as it takes.
    pub async fn unless_unanswered<F: Future>(&self, work: F) -> Option<F::Output> {
        let wait = self.inner.config.default_wait;
        let start = Instant::now();
        tokio::pin!(work);
        loop {
            let (waited, silent) = (start.elapsed(), self.longest_silence().unwrap_or_default());
            if waited >= wait && silent >= wait {
                return None;
            }
            // The soonest both can hold: a silence grows no faster than the clock (and a step restarts it).
            let next = wait.saturating_sub(waited).max(wait.saturating_sub(silent)).max(Duration::from_millis(1));
            if let Ok(out) = tokio::time::timeout(next, work.as_mut()).await {
                return Some(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use candle_core::Device;

    use super::*;
    use crate::lora::cache::CacheConfig;
    use crate::lora::peft::BaseLayout;
    use crate::lora::store::AdapterStore;

    /// A cache over the empty folder `dir` whose default wait is `wait`.
    fn cache(dir: &std::path::Path, wait: Duration) -> AdapterCache {
        let layout = BaseLayout { layers: 1, dims: [(8, 8); 7] };
        let config = CacheConfig { device_bytes: 1 << 20, host_bytes: 1 << 20, default_wait: wait };
        AdapterCache::new(AdapterStore::open(dir).unwrap(), layout, Device::Cpu, config)
    }

    /// Looks at a hung adapters folder (here, looks that block until the test lets them go) hold at most
    /// [`MAX_LOOKUPS`] blocking threads: the next look waits for a turn, and runs once one is free. The one
    /// async worker stays free meanwhile (the timeout below fires on it; a look run on it would hang the test).
    #[tokio::test(flavor = "current_thread")]
    async fn looks_at_a_hung_folder_hold_at_most_max_lookups_threads() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cache(tmp.path(), Duration::from_secs(5));
        let open = Arc::new(AtomicBool::new(false));
        let wait = |open: &AtomicBool| {
            while !open.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let hung: Vec<_> = (0..MAX_LOOKUPS)
            .map(|_| {
                let (c, open) = (c.clone(), open.clone());
                tokio::spawn(async move { c.look(move |_| wait(&open)).await })
            })
            .collect();
        while c.inner.lookups.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let next = c.look(|c| c.list().len());
        tokio::pin!(next);
        let waited = tokio::time::timeout(Duration::from_millis(200), next.as_mut()).await;
        assert!(waited.is_err(), "a look past the cap ran while {MAX_LOOKUPS} hung");
        open.store(true, Ordering::Release);
        assert_eq!(next.await.unwrap(), 0, "the look that waited runs once a turn is free");
        for h in hung {
            h.await.unwrap().unwrap();
        }
        assert_eq!(c.inner.lookups.available_permits(), MAX_LOOKUPS);
    }

    /// A look that blocks until its `go` is sent, with its clock stepped at each send but the last; the
    /// returned receiver hears when the look has started and after each step.
    fn hang(
        c: &AdapterCache,
        steps: usize,
    ) -> (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>, tokio::task::JoinHandle<()>) {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (heard, hear) = std::sync::mpsc::channel::<()>();
        let c = c.clone();
        let look = tokio::spawn(async move {
            c.look_stepping(move |_, clock| {
                heard.send(()).unwrap();
                for _ in 0..steps {
                    wait.recv().unwrap();
                    clock.step();
                    heard.send(()).unwrap();
                }
                wait.recv().unwrap();
            })
            .await
            .unwrap()
        });
        (go, hear, look)
    }

    /// `longest_silence` is the longest any running look has gone unanswered: the older look's, not a newer
    /// one's, until a step restarts its clock; nothing once every look has ended, a look that panicked too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_longest_silence_is_the_longest_unanswered_look() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cache(tmp.path(), Duration::from_secs(5));
        assert_eq!(c.longest_silence(), None);
        let (go_a, heard_a, a) = hang(&c, 1);
        heard_a.recv().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b_started = Instant::now();
        let (go_b, heard_b, b) = hang(&c, 0);
        heard_b.recv().unwrap();
        let b_heard = Instant::now();
        // The first look began 20 ms before `b_started`: its silence, not the second's.
        let since_b = b_started.elapsed();
        assert!(c.longest_silence().unwrap() >= since_b + Duration::from_millis(20), "the first look's silence");
        // A step answers the first look: the second has waited longest now.
        go_a.send(()).unwrap();
        heard_a.recv().unwrap();
        let at_least = b_heard.elapsed();
        let silence = c.longest_silence().unwrap();
        assert!(silence >= at_least && silence <= b_started.elapsed(), "{silence:?}: not the second look's");
        c.look(|_| ()).await.unwrap();
        go_b.send(()).unwrap();
        b.await.unwrap();
        let silence = c.longest_silence().expect("the first look still runs");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(c.longest_silence().unwrap() > silence, "the silence grows");
        go_a.send(()).unwrap();
        a.await.unwrap();
        assert_eq!(c.longest_silence(), None);
        assert!(c.look(|_| panic!("a look that panics")).await.is_err());
        assert_eq!(c.longest_silence(), None, "a look that panicked still counted");
    }

    /// Without a deadline a call waits for its looks as long as the folder answers them: a listing that steps
    /// every 20 ms for 800 ms in all (past the 500 ms wait) ends; a look unanswered for 1.5 s is given up
    /// after the wait; a quick look ends while another hangs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unless_unanswered_waits_while_the_folder_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let wait = Duration::from_millis(500);
        let c = cache(tmp.path(), wait);
        let listing = c.look_stepping(|_, clock| {
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(20));
                clock.step();
            }
            "listed"
        });
        let start = Instant::now();
        assert_eq!(c.unless_unanswered(listing).await.map(Result::unwrap), Some("listed"));
        assert!(start.elapsed() >= Duration::from_millis(800));

        let start = Instant::now();
        let slow = c.look(|_| std::thread::sleep(Duration::from_millis(1500)));
        assert!(c.unless_unanswered(slow).await.is_none(), "a look unanswered for 1.5 s");
        let waited = start.elapsed();
        assert!(waited >= wait && waited < Duration::from_millis(1400), "given up after {waited:?}");
        while c.longest_silence().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let (go, heard, hung) = hang(&c, 0);
        heard.recv().unwrap();
        tokio::time::sleep(wait).await;
        let quick = c.look(|_| "a quick look");
        assert_eq!(c.unless_unanswered(quick).await.map(Result::unwrap), Some("a quick look"));
        go.send(()).unwrap();
        hung.await.unwrap();
    }

    /// A runtime whose blocking pool has one thread.
    fn one_blocking_thread() -> tokio::runtime::Runtime {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).max_blocking_threads(1).enable_all().build().unwrap()
    }

    /// A look that has its turn but waits for a blocking thread (the pool's threads held, as by loads from a
    /// hung mount) is unanswered from then on: it counts in the longest silence, and a call without a
    /// deadline gives up after the wait.
    #[test]
    fn a_look_waiting_for_a_blocking_thread_is_unanswered() {
        one_blocking_thread().block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let wait = Duration::from_millis(200);
            let c = cache(tmp.path(), wait);
            let (go, held) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || held.recv().unwrap());
            let look = tokio::spawn({
                let c = c.clone();
                async move { c.look(|_| ()).await }
            });
            let since = Instant::now();
            while c.longest_silence().is_none() {
                assert!(since.elapsed() < Duration::from_secs(30), "the waiting look never counted");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(c.longest_silence().unwrap() >= Duration::from_millis(20));
            let start = Instant::now();
            assert!(c.unless_unanswered(c.look(|_| ())).await.is_none(), "a call waited on");
            assert!(start.elapsed() >= wait);
            assert!(!look.is_finished(), "the look ran while the only blocking thread was held");
            go.send(()).unwrap();
            busy.await.unwrap();
            look.await.unwrap().unwrap();
            while c.longest_silence().is_some() {
                assert!(since.elapsed() < Duration::from_secs(30), "a look never ended");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }

    /// At most [`MAX_LISTINGS`] listings run at once: with every listing turn held, the next waits for one;
    /// a listing whose caller left (a deadline, a cancelled call) keeps its turn until it has run.
    #[test]
    fn listings_take_at_most_max_listings_turns() {
        one_blocking_thread().block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let c = cache(tmp.path(), Duration::from_secs(5));
            let held = c.inner.listings.clone().acquire_many_owned(MAX_LISTINGS as u32).await.unwrap();
            let next = c.listing();
            tokio::pin!(next);
            assert!(tokio::time::timeout(Duration::from_millis(100), next.as_mut()).await.is_err());
            drop(held);
            assert!(next.await.unwrap().is_empty(), "the empty folder, listed once a turn is free");

            // The only blocking thread held: a listing waits for it, and its caller leaves.
            let (go, thread) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || thread.recv().unwrap());
            let left = c.listing();
            assert!(tokio::time::timeout(Duration::from_millis(100), left).await.is_err());
            assert_eq!(c.inner.listings.available_permits(), MAX_LISTINGS - 1, "the turn left with the caller");
            go.send(()).unwrap();
            busy.await.unwrap();
            let since = Instant::now();
            while c.inner.listings.available_permits() < MAX_LISTINGS {
                assert!(since.elapsed() < Duration::from_secs(30), "the listing never gave its turn back");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
}
