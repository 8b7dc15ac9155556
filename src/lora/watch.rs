//! The filesystem watch on the adapters root: drops cached versions whose files changed as soon as the
//! kernel reports it (requests re-stat the files anyway; the watch frees the memory without waiting for one),
//! and follows a root reached through a symlink that a deploy re-points, or a root folder replaced by a new one.
//! Its re-check of the root every two seconds is one of the cache's looks ([`AdapterCache::look`]), so a hung
//! mount shows in the cache's longest unanswered look (and the server's health) with no request naming an
//! adapter.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cache::AdapterCache;

impl AdapterCache {
    /// Watches the adapters root (where the platform allows) and refreshes on changes, until the returned
    /// handle is dropped. A root reached through a symlink (a release link, git-sync) is watched where it
    /// points; every [`ROOT_RECHECK`] the path is resolved again, and when the link was re-pointed, or the
    /// root folder was replaced (deleted and created again: the kernel's watch died with the old one), the
    /// watch moves to what is there now and the cache refreshes. Returns once the first watch is in place.
    pub async fn watch(&self) -> Option<AdapterWatch> {
        use notify::Watcher;
        let shared = Arc::new(Shared::default());
        let (cache, seen) = (self.clone(), shared.clone());
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if event.kind.is_remove() {
                let watched = seen.watched.lock().expect("watched root");
                if watched.as_ref().is_some_and(|w| event.paths.contains(w)) {
                    seen.removed.store(true, Ordering::Relaxed);
                }
            }
            cache.refresh();
        })
        .map_err(|e| tracing::warn!(error = %e, "no filesystem watcher; changes are seen at request time"))
        .ok()?;
        let root = self.store().root().to_path_buf();
        // notify's watch and unwatch block until its thread has walked the tree: never on a runtime worker.
        // The watcher travels to the blocking pool and back.
        let first = root.clone();
        let (w, target) = tokio::task::spawn_blocking(move || {
            let target = RootTarget::of(&first)?;
            watcher.watch(&target.path, notify::RecursiveMode::Recursive).map_err(|e| e.to_string())?;
            Ok::<_, String>((watcher, target))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| tracing::warn!(error = %e, root = %root.display(), "cannot watch the adapters root; changes are seen at request time"))
        .ok()?;
        watcher = w;
        *shared.watched.lock().expect("watched root") = Some(target.path.clone());
        let cache = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ROOT_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // What is watched now (`None` after a failed re-watch: tried again at every tick, reported once).
            let mut watched = Some(target);
            let mut reported: Option<RootTarget> = None;
            loop {
                tick.tick().await;
                let r = root.clone();
                // A look like a request's (one of the cache's turns; a hung mount shows in the server's
                // health even when no request names an adapter).
                let Ok(Ok(now)) = cache.look(move |_| RootTarget::of(&r)).await else { continue };
                // The kernel ends a watch when its folder is deleted; a folder created again at the path (often
                // with the same inode number) is new to it.
                let removed = shared.removed.swap(false, Ordering::Relaxed);
                if watched.as_ref() == Some(&now) && !removed {
                    continue;
                }
                let (old, new, cache) = (watched.take(), now.path.clone(), cache.clone());
                let moved = tokio::task::spawn_blocking(move || {
                    if let Some(old) = &old {
                        // Fails harmlessly when the old folder is gone (the kernel ended its watch).
                        let _ = watcher.unwatch(&old.path);
                    }
                    let r = watcher.watch(&new, notify::RecursiveMode::Recursive);
                    // Whatever the watch did, the files under the root changed: drop what is stale.
                    cache.refresh();
                    (watcher, r)
                })
                .await;
                let Ok((w, r)) = moved else {
                    tracing::warn!("the adapters root watch stopped; changes are seen at request time");
                    break;
                };
                watcher = w;
                match r {
                    Ok(()) => {
                        tracing::info!(root = %root.display(), to = %now.path.display(), "adapters root replaced or re-pointed; watching it again");
                        *shared.watched.lock().expect("watched root") = Some(now.path.clone());
                        watched = Some(now);
                        reported = None;
                    }
                    Err(e) if reported.as_ref() != Some(&now) => {
                        tracing::warn!(error = %e, root = %now.path.display(), "cannot watch the new adapters root; changes are seen at request time until it can be");
                        reported = Some(now);
                    }
                    Err(_) => {}
                }
            }
        });
        Some(AdapterWatch { task })
    }
}

/// What the watch's callback tells the root re-check: the folder watched, and whether the kernel reported it
/// deleted.
#[derive(Default)]
struct Shared {
    watched: Mutex<Option<PathBuf>>,
    removed: AtomicBool,
}

/// The folder the adapters root names now: its resolved path and, on Unix, its device and inode, which tell a
/// new folder at the path from the watched one renamed away (one deleted is reported by its watch: inode
/// numbers are reused).
#[derive(Clone, Debug, PartialEq, Eq)]
struct RootTarget {
    path: PathBuf,
    inode: (u64, u64),
}

impl RootTarget {
    fn of(root: &std::path::Path) -> Result<Self, String> {
        let path = root.canonicalize().map_err(|e| e.to_string())?;
        let meta = std::fs::metadata(&path).map_err(|e| e.to_string())?;
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let inode = {
            let _ = meta;
            (0, 0)
        };
        Ok(RootTarget { path, inode })
    }
}

/// How often [`AdapterCache::watch`] resolves the adapters root again, to follow a re-pointed symlink.
pub const ROOT_RECHECK: Duration = Duration::from_secs(2);

/// The filesystem watch on the adapters root; stops when dropped.
pub struct AdapterWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AdapterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
