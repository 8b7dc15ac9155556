//! Folders the offline commands write whole (`train`'s adapter, `merge`'s and `quantize`'s checkpoints): a
//! check that one can be written, made before the work that fills it so that a long run is never lost to a
//! path that was wrong from the start, and the temporary folder beside it that is renamed into place at the
//! end, so that readers never see half of one.

use std::path::{Path, PathBuf};

/// Why a folder cannot be written there; the text names the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {reason}")]
pub struct OutputError {
    pub path: String,
    pub reason: String,
}

fn error(path: &Path, reason: impl std::fmt::Display) -> OutputError {
    OutputError { path: path.display().to_string(), reason: reason.to_string() }
}

/// `out` without a trailing slash: `out/` is the folder `out` (a trailing slash would make a file or a
/// dangling link at `out` look absent).
fn normalized(out: &Path) -> PathBuf {
    out.components().collect()
}

/// `path` as an absolute path naming the same place: its longest existing part with symbolic links resolved
/// (so `link/..` is where the link's target's parent is, as the kernel reads it), then the parts that do not
/// exist yet with `.` and `..` folded by name (nothing under a missing folder can be a link).
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    let mut out = loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            break real;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(up), Some(last)) => {
                rest.push(last);
                existing = up;
            }
            _ => break PathBuf::new(),
        }
    };
    for c in rest.into_iter().rev() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether `path` is `folder` or inside it, however each is spelled (`./out/log` is inside `out`, and an
/// absolute path inside a relative one).
pub fn within(path: &Path, folder: &Path) -> bool {
    resolved(path).starts_with(resolved(folder))
}

/// The folder `out` would be written in.
fn parent_of(out: &Path) -> &Path {
    out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Checks, without leaving anything behind, that `out` can be made as a new folder: nothing is at that path
/// (not even a link to nowhere), and the nearest part of its parent that exists is a folder this process can
/// create entries in (the missing parts are made when the folder is written).
pub fn check_new(out: &Path) -> Result<(), OutputError> {
    let out = &normalized(out);
    if out.file_name().is_none() {
        // `.`, `..`, `a/..`, `/`: a folder that exists, or no name to make one under.
        return Err(error(out, "names no new folder (end the path with the new folder's name)"));
    }
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(error(out, "already exists (choose a new output folder)"));
    }
    let mut at = parent_of(out);
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(error(at, "not a folder")),
            // Missing, or under something that is no folder: look further up.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                match at.parent() {
                    Some(up) if !up.as_os_str().is_empty() => at = up,
                    _ => break,
                }
            }
            Err(e) => return Err(error(at, e)),
        }
    }
    // Permissions alone do not say (ACLs, read-only mounts, root): try, as the write will.
    let probe =
        tempfile::Builder::new().prefix(".loraserve-probe-").tempdir_in(if at.exists() { at } else { Path::new(".") });
    probe.map(drop).map_err(|e| error(at, format_args!("cannot create files here: {e}")))
}

/// Makes `out`'s parent folders and, in the parent, the temporary folder to fill and then [`publish`]: named
/// `.<name>.partial-…`, removed if dropped unpublished.
pub fn partial(out: &Path) -> Result<tempfile::TempDir, OutputError> {
    let out = &normalized(out);
    check_new(out)?;
    let parent = parent_of(out);
    std::fs::create_dir_all(parent).map_err(|e| error(parent, e))?;
    let name = out.file_name().map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    tempfile::Builder::new().prefix(&format!(".{name}.partial-")).tempdir_in(parent).map_err(|e| error(parent, e))
}

/// Renames the filled temporary folder to `out`, which must still not exist: a plain rename over an empty
/// folder succeeds silently on Linux, so the rename itself refuses to replace anything (any other failure
/// keeps the written folder, named in the error). Its files and folders are flushed to disk first and the
/// parent after, so that a power loss leaves the old state or the whole new folder, never empty files under
/// the final name.
/// The temporary folder is private (0700) and safetensors writes 0600: the result gets the modes a new file
/// and folder get under the process's umask (0644 and 0755 under the usual 022).
pub fn publish(tmp: tempfile::TempDir, out: &Path) -> Result<PathBuf, OutputError> {
    let out = &normalized(out);
    let appeared = || error(out, "appeared while it was being written (choose a new output folder)");
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(appeared());
    }
    #[cfg(unix)]
    ordinary_modes(tmp.path(), umask());
    // A flush that fails keeps the folder (under its temporary name, named in the error): it is whole, only
    // maybe not on disk yet.
    let kept = tmp.keep();
    sync_tree(&kept)
        .map_err(|e| error(&kept, format_args!("{}: {} (the written folder is kept here)", e.path, e.reason)))?;
    rename_new(&kept, out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_dir_all(&kept);
            appeared()
        } else {
            // The written folder is whole: kept, and named, for the user to move into place.
            error(out, format_args!("{e} (the written folder is kept at {})", kept.display()))
        }
    })?;
    // Written and named: a failure to flush the name now is no failure of the write.
    if let Err(e) = sync_dir(parent_of(out)) {
        tracing::warn!(error = %e, "the new folder's name may not be on disk yet");
    }
    Ok(out.to_path_buf())
}

/// Renames `from` to `to` only if nothing is at `to` (`AlreadyExists` otherwise). On Linux the kernel checks
/// as it renames, so a folder made at `to` after the caller's own check is never replaced; where the
/// filesystem cannot (and elsewhere) it is a check and then a rename.
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if let Some(done) = rename_noreplace(from, to) {
        return done;
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

/// `renameat2` with `RENAME_NOREPLACE`; `None` where the filesystem, the kernel or a sandbox (seccomp's
/// EPERM) does not take the flag.
#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> Option<std::io::Result<()>> {
    use rustix::{
        fs::{renameat_with, RenameFlags, CWD},
        io::Errno,
    };
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL | Errno::NOSYS | Errno::PERM | Errno::OPNOTSUPP) => None,
        done => Some(done.map_err(Into::into)),
    }
}

/// Flushes every file under `dir`, then `dir` itself, to disk.
pub(crate) fn sync_tree(dir: &Path) -> Result<(), OutputError> {
    for entry in std::fs::read_dir(dir).map_err(|e| error(dir, e))? {
        let entry = entry.map_err(|e| error(dir, e))?;
        let path = entry.path();
        match entry.file_type().map_err(|e| error(&path, e))? {
            t if t.is_dir() => sync_tree(&path)?,
            t if t.is_file() => flush(&path)?,
            _ => {}
        }
    }
    sync_dir(dir)
}

/// Flushes a folder's entries (a rename into it, a file made in it) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), OutputError> {
    #[cfg(unix)]
    flush(dir)?;
    Ok(())
}

/// `fsync` of a file or folder. Filesystems that cannot flush (some FUSE, CIFS and NFS setups answer EINVAL
/// or EOPNOTSUPP, for folders above all) are not an error: there is nothing more to do.
fn flush(path: &Path) -> Result<(), OutputError> {
    match std::fs::File::open(path).and_then(|f| f.sync_all()) {
        Err(e)
            if !(matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported)
                || e.raw_os_error() == Some(95)) =>
        {
            Err(error(path, e))
        }
        _ => Ok(()),
    }
}

/// The process's umask (read from `/proc/self/status`, which leaves it as it is; 022 where that is missing).
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string())))
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022)
}

#[cfg(unix)]
fn ordinary_modes(dir: &Path, umask: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777 & !umask));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => ordinary_modes(&entry.path(), umask),
            Ok(t) if t.is_file() => {
                let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o666 & !umask));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_folder_is_checked_before_any_work() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert_eq!(check_new(&root.join("a/b/c")), Ok(()), "missing parents are fine");
        std::fs::write(root.join("file"), "x").unwrap();
        let e = check_new(&root.join("file/sub")).unwrap_err();
        assert_eq!((e.path.as_str(), e.reason.as_str()), (root.join("file").to_str().unwrap(), "not a folder"));
        let e = check_new(&root.join("file/deeper/sub")).unwrap_err();
        assert_eq!(e.reason, "not a folder");
        assert!(check_new(&root.join("file")).unwrap_err().reason.starts_with("already exists"));
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
        assert!(check_new(&root.join("dangling")).unwrap_err().reason.starts_with("already exists"));
        // A trailing slash names the same path.
        for taken in ["file/", "dangling/"] {
            assert!(check_new(&root.join(taken)).unwrap_err().reason.starts_with("already exists"), "{taken}");
        }
        // A path that ends without a new folder's name (`nodir/..` is the folder the command runs in).
        for nameless in ["nodir/..", "x/y/.."] {
            let e = check_new(&root.join(nameless)).unwrap_err();
            assert!(e.reason.starts_with("names no new folder"), "{nameless}: {e}");
        }
        let names: Vec<_> = std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "the checks leave nothing behind: {names:?}");
    }

    /// `within` compares places, not spellings: a `./` prefix, an absolute path against a relative one, `..`.
    #[test]
    fn within_compares_places() {
        let cwd = std::env::current_dir().unwrap();
        for (path, folder) in [
            (PathBuf::from("out/log.jsonl"), PathBuf::from("./out")),
            (cwd.join("out/ck"), PathBuf::from("out")),
            (PathBuf::from("out/ck"), cwd.join("out/")),
            (PathBuf::from("x/../out/a"), PathBuf::from("out")),
            (PathBuf::from("out"), PathBuf::from("out")),
        ] {
            assert!(within(&path, &folder), "{path:?} in {folder:?}");
        }
        for (path, folder) in [("out2/log", "out"), ("out.log.jsonl", "out"), ("out/../log", "out")] {
            assert!(!within(Path::new(path), Path::new(folder)), "{path} not in {folder}");
        }
        // Through a symbolic link, `..` is the parent of the link's target, as the kernel reads the path.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink(root.join("a/b"), root.join("link")).unwrap();
        assert!(within(&root.join("link/../new/log"), &root.join("a/new")), "link/.. is a, not the root");
        assert!(!within(&root.join("link/../new/log"), &root.join("new")));
        assert!(within(&root.join("link/ck"), &root.join("a/b")), "a link names its target");
    }

    #[test]
    fn a_partial_folder_is_published_whole_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("x/out");
        let p = partial(&out).unwrap();
        assert!(p.path().file_name().unwrap().to_str().unwrap().starts_with(".out.partial-"));
        std::fs::write(p.path().join("f"), "1").unwrap();
        assert!(!out.exists());
        publish(p, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "1");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let m = umask();
        assert_eq!((mode(&out), mode(&out.join("f"))), (0o777 & !m, 0o666 & !m), "umask {m:o}");
        // Under umask 077 the result is private, as a file the user made would be.
        let private = tmp.path().join("private");
        std::fs::create_dir_all(private.join("sub")).unwrap();
        std::fs::write(private.join("sub/f"), "1").unwrap();
        ordinary_modes(&private, 0o077);
        assert_eq!((mode(&private.join("sub")), mode(&private.join("sub/f"))), (0o700, 0o600));
        std::fs::remove_dir_all(&private).unwrap();
        // A folder that appeared meanwhile is never replaced; the partial one goes.
        let late = tmp.path().join("late");
        let p = partial(&late).unwrap();
        std::fs::create_dir(&late).unwrap();
        assert!(publish(p, &late).unwrap_err().reason.starts_with("appeared"));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2, "x and late, nothing partial");
    }

    /// The rename itself refuses a folder made after every check (a plain `rename` replaces an empty one).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_rename_never_replaces_what_appeared_after_the_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
        std::fs::create_dir(&from).unwrap();
        std::fs::write(from.join("f"), "new").unwrap();
        std::fs::create_dir(&to).unwrap();
        let refused = rename_noreplace(&from, &to).expect("the test folder's filesystem takes RENAME_NOREPLACE");
        assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        assert!(from.join("f").exists() && std::fs::read_dir(&to).unwrap().next().is_none(), "neither moved");
        std::fs::remove_dir(&to).unwrap();
        rename_new(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(to.join("f")).unwrap(), "new");
    }
}
