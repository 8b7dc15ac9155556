//! The filesystem watch on the adapters root: drops cached versions whose files changed as soon as the
//! kernel reports it (requests re-stat the files anyway; the watch frees the memory without waiting for one),
//! and follows a root reached through a symlink that a deploy re-points.

use std::time::Duration;

use super::cache::AdapterCache;

impl AdapterCache {
    /// Watches the adapters root (where the platform allows) and refreshes on changes, until the returned
    /// handle is dropped. A root reached through a symlink (a release link, git-sync) is watched where it
    /// points; every [`ROOT_RECHECK`] the path is resolved again, and when the link was re-pointed the watch
    /// moves to the new target and the cache refreshes. Needs a tokio runtime.
    pub fn watch(&self) -> Option<AdapterWatch> {
        use notify::Watcher;
        let cache = self.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                cache.refresh();
            }
        })
        .map_err(|e| tracing::warn!(error = %e, "no filesystem watcher; changes are seen at request time"))
        .ok()?;
        let root = self.store().root().to_path_buf();
        let target = root
            .canonicalize()
            .map_err(|e| tracing::warn!(error = %e, root = %root.display(), "cannot watch the adapters root; changes are seen at request time"))
            .ok()?;
        watcher
            .watch(&target, notify::RecursiveMode::Recursive)
            .map_err(|e| tracing::warn!(error = %e, "cannot watch the adapters root; changes are seen at request time"))
            .ok()?;
        let cache = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ROOT_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // What is watched now (`None` after a failed re-watch: tried again at every tick, reported once).
            let mut watched = Some(target);
            let mut reported: Option<std::path::PathBuf> = None;
            loop {
                tick.tick().await;
                let Ok(now) = tokio::fs::canonicalize(&root).await else { continue };
                if watched.as_ref() == Some(&now) {
                    continue;
                }
                // notify's watch and unwatch block until its thread has walked the new tree: not on a runtime
                // worker. The watcher travels to the blocking pool and back.
                let (old, new, cache) = (watched.take(), now.clone(), cache.clone());
                let moved = tokio::task::spawn_blocking(move || {
                    if let Some(old) = &old {
                        let _ = watcher.unwatch(old);
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
                        tracing::info!(root = %root.display(), to = %now.display(), "adapters root re-pointed");
                        watched = Some(now);
                        reported = None;
                    }
                    Err(e) if reported.as_ref() != Some(&now) => {
                        tracing::warn!(error = %e, root = %now.display(), "cannot watch the re-pointed adapters root; changes are seen at request time until it can be");
                        reported = Some(now);
                    }
                    Err(_) => {}
                }
            }
        });
        Some(AdapterWatch { task })
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
