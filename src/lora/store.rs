//! The adapters root on disk: adapter ids, their folders, their versions, listing.
//!
//! An id is `[A-Za-z0-9._-]` segments joined by `/` (no empty, `.` or `..` segment), at most 128 bytes, and
//! names the folder `<root>/<id>/`. The resolved folder and its two files must stay inside the root after
//! following symlinks. The root itself is resolved at every lookup, so re-pointing a symlinked root (a release
//! symlink, git-sync) switches every adapter to the new target at once. Folders whose name starts with `.` are
//! not listed (they can still be asked for by id).
//! A version is derived from the adapter's files: sizes and modification times of `adapter_config.json` and
//! `adapter_model.safetensors` (and of the chat files it may bring: `tokenizer_config.json`,
//! `chat_template.jinja`, `additional_chat_templates/`) plus a SHA-256 of the config and the safetensors
//! header, so an edit on disk is seen at the next request by a few `stat` calls (the hash is recomputed only
//! when those change).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::model::chat::template_files;

/// Most bytes an adapter id may have.
pub const MAX_ID_BYTES: usize = 128;

/// Errors resolving adapter ids.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("invalid adapter id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("adapter `{id}` not found under {root}")]
    NotFound { id: String, root: String },
    #[error("adapter `{id}`: {path} resolves outside the adapters root {root} (symlinks may not leave it)")]
    Escapes { id: String, path: String, root: String },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// The folder was found, then its config was gone (renamed away by a publish or a rollback): another try
    /// finds what is there then.
    #[error("{path} disappeared while it was read (the adapter's folder is being replaced?)")]
    Vanished { path: String },
}

impl StoreError {
    /// An error reading `path` of a folder found a moment before: gone now is [`StoreError::Vanished`].
    fn of_io(path: &Path, e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::Vanished { path: path.display().to_string() },
            _ => StoreError::Io { path: path.display().to_string(), reason: e.to_string() },
        }
    }
}

/// Checks an adapter id against the contract's rules.
pub fn validate_id(id: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| Err(StoreError::InvalidId { id: id.chars().take(160).collect(), reason: reason.into() });
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_ID_BYTES {
        return bad(&format!("longer than {MAX_ID_BYTES} bytes"));
    }
    for seg in id.split('/') {
        if seg.is_empty() {
            return bad("empty path segment (leading, trailing or double `/`)");
        }
        if seg == "." || seg == ".." {
            return bad("`.` and `..` segments are not allowed");
        }
        if let Some(c) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return bad(&format!("character {c:?} is not allowed (use A-Z a-z 0-9 . _ - and / between segments)"));
        }
    }
    Ok(())
}

/// What identifies one state of an adapter's files: per file its size, modification time and, on Unix, its
/// inode and status-change time. The last two catch a rewrite that keeps size and modification time (`cp -p`,
/// `rsync -a`, `touch -d`, reproducible builds): the kernel sets ctime on every write and nobody can set it back.
/// (Not the device number: it is assigned per mount, so replicas sharing one NFS export would disagree.) A
/// metadata change (`chmod`) or a copy of the same bytes is a new version too: loading again is the safe side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    config: FileState,
    weights: FileState,
    /// The chat files an adapter may bring (`tokenizer_config.json`, `chat_template.jinja`,
    /// `additional_chat_templates/*.jinja`), each by its path in the folder; absent ones stamped as such.
    chat: Vec<(String, FileState)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FileState {
    len: u64,
    mtime: Option<SystemTime>,
    /// (inode, ctime seconds, ctime nanoseconds); zeros where the platform has none.
    id: [i64; 3],
}

impl FileState {
    fn of(m: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let id = {
            use std::os::unix::fs::MetadataExt;
            [m.ino() as i64, m.ctime(), m.ctime_nsec()]
        };
        #[cfg(not(unix))]
        let id = [0; 3];
        FileState { len: m.len(), mtime: m.modified().ok(), id }
    }
}

/// An adapter version: the stamp that produced it and the resulting short string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterVersion {
    pub stamp: FileStamp,
    /// 16 hex digits, shown to clients as `adapter_version`.
    pub id: String,
}

/// The adapters root.
#[derive(Clone, Debug)]
pub struct AdapterStore {
    root: PathBuf,
}

/// Whether `path` is a file: `Ok(false)` when nothing is there, an error naming the path when it cannot be
/// looked at (permissions), which must not pass for "missing".
fn is_file(path: &Path) -> Result<bool, StoreError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.is_file()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => Ok(false),
        Err(e) => Err(StoreError::Io { path: path.display().to_string(), reason: e.to_string() }),
    }
}

impl AdapterStore {
    /// Opens a root folder (it must exist).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let store = AdapterStore { root: root.to_path_buf() };
        store.canonical_root()?;
        Ok(store)
    }

    /// The root with every symlink resolved, as it is now.
    fn canonical_root(&self) -> Result<PathBuf, StoreError> {
        let io = |reason: String| StoreError::Io { path: self.root.display().to_string(), reason };
        let canonical = self.root.canonicalize().map_err(|e| {
            io(if e.kind() == std::io::ErrorKind::NotFound {
                "the adapters root does not exist (create it, or point --adapters at the adapters folder)".into()
            } else {
                format!("adapters root: {e}")
            })
        })?;
        if !canonical.is_dir() {
            return Err(io("adapters root is not a folder".into()));
        }
        Ok(canonical)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of adapter `id`: validated, existing, inside the root.
    pub fn resolve(&self, id: &str) -> Result<PathBuf, StoreError> {
        validate_id(id)?;
        let root = self.canonical_root()?;
        let path = root.join(id);
        let canonical = match path.canonicalize() {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                return Err(self.not_found(id))
            }
            Err(e) => return Err(StoreError::Io { path: path.display().to_string(), reason: e.to_string() }),
        };
        let escapes = |p: &Path| StoreError::Escapes {
            id: id.to_string(),
            path: p.display().to_string(),
            root: self.root.display().to_string(),
        };
        if !canonical.starts_with(&root) {
            return Err(escapes(&path));
        }
        let (config, weights) = (canonical.join("adapter_config.json"), canonical.join("adapter_model.safetensors"));
        if !is_file(&config)? {
            // Weights without a config: a broken adapter, not a missing one.
            if is_file(&weights)? {
                return Err(StoreError::Io {
                    path: config.display().to_string(),
                    reason: "missing: the adapter folder holds adapter_model.safetensors but no adapter_config.json"
                        .into(),
                });
            }
            return Err(self.not_found(id));
        }
        // Every file the adapter's version covers is read, the chat files too (a template is rendered into
        // prompts a caller can read back), so none may lead out either.
        let chat = template_files(&canonical).map_err(|e| StoreError::Io {
            path: canonical.join("additional_chat_templates").display().to_string(),
            reason: e.to_string(),
        })?;
        let files = ["adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"].map(String::from);
        for name in files.iter().chain(&chat) {
            if canonical.join(name).canonicalize().is_ok_and(|c| !c.starts_with(&root)) {
                return Err(escapes(&path.join(name)));
            }
        }
        Ok(canonical)
    }

    fn not_found(&self, id: &str) -> StoreError {
        StoreError::NotFound { id: id.to_string(), root: self.root.display().to_string() }
    }

    /// Cheap: the [`FileStamp`] of the adapter's files (one `stat` each, and a look into
    /// `additional_chat_templates/`).
    pub fn stamp(dir: &Path) -> Result<FileStamp, StoreError> {
        let meta = |name: &str| -> Result<FileState, StoreError> {
            let p = dir.join(name);
            match std::fs::metadata(&p) {
                Ok(m) => Ok(FileState::of(&m)),
                // A missing weights file is reported when loading (naming the file); stamp it as absent, and
                // the chat files are optional.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "adapter_config.json" => {
                    Ok(FileState::default())
                }
                Err(e) => Err(StoreError::of_io(&p, e)),
            }
        };
        let mut chat = Vec::new();
        let templates =
            template_files(dir).map_err(|e| StoreError::of_io(&dir.join("additional_chat_templates"), e))?;
        for name in std::iter::once("tokenizer_config.json".to_string()).chain(templates) {
            let state = meta(&name)?;
            chat.push((name, state));
        }
        Ok(FileStamp { config: meta("adapter_config.json")?, weights: meta("adapter_model.safetensors")?, chat })
    }

    /// The adapter's version: a hash of its config, its safetensors header and its stamp, so it changes
    /// whenever one of its files is written.
    pub fn version(dir: &Path) -> Result<AdapterVersion, StoreError> {
        let stamp = Self::stamp(dir)?;
        let mut h = Sha256::new();
        let cfg = dir.join("adapter_config.json");
        h.update(crate::input::read(&cfg).map_err(|e| StoreError::of_io(&cfg, e))?);
        let weights = dir.join("adapter_model.safetensors");
        if let Ok(mut f) = std::fs::File::open(&weights) {
            use std::io::Read;
            let mut len = [0u8; 8];
            if f.read_exact(&mut len).is_ok() {
                let n = u64::from_le_bytes(len).min(100 << 20);
                let mut header = vec![0u8; n as usize];
                let got = f.read(&mut header).unwrap_or(0);
                h.update(&header[..got]);
            }
        }
        for name in stamp.chat.iter().map(|(name, _)| name) {
            h.update(name.as_bytes());
        }
        for f in [stamp.config, stamp.weights].iter().chain(stamp.chat.iter().map(|(_, f)| f)) {
            h.update(f.len.to_le_bytes());
            let nanos = f.mtime.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
            h.update(nanos.to_le_bytes());
            f.id.iter().for_each(|v| h.update(v.to_le_bytes()));
        }
        let digest = h.finalize();
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(AdapterVersion { stamp, id })
    }

    /// Every adapter under the root (folders holding `adapter_config.json`, at most 5 segments deep), as ids,
    /// and the adapter folders it leaves out because their path is no valid id (a space in a name, say):
    /// requests could never name them, so the server says so at start. Hidden folders (an upload in
    /// progress) are left out silently.
    pub fn scan(&self) -> (Vec<String>, Vec<Unlisted>) {
        self.scan_stepping(&mut || {})
    }

    /// [`scan`](Self::scan), calling `step` after each folder entry it looks at: a listing of a large folder
    /// is many calls, and a caller timing the file system counts each (`cache::LookClock::step`).
    pub fn scan_stepping(&self, step: &mut dyn FnMut()) -> (Vec<String>, Vec<Unlisted>) {
        let mut walk = Walk { ids: Vec::new(), unlisted: Vec::new(), step };
        if let Ok(root) = self.canonical_root() {
            walk.dir(&root, &root, String::new(), 0, None);
        }
        let Walk { mut ids, mut unlisted, .. } = walk;
        ids.sort();
        unlisted.sort_by(|a, b| a.path.cmp(&b.path));
        (ids, unlisted)
    }
}

/// A listing under way ([`AdapterStore::scan_stepping`]): what it found so far.
struct Walk<'a> {
    ids: Vec<String>,
    unlisted: Vec<Unlisted>,
    step: &'a mut dyn FnMut(),
}

impl Walk<'_> {
    /// Lists the adapters under `dir` (ids `prefix/…`); adapter folders no id can name go to `unlisted`,
    /// with the reason: their own name's, or their parent's (`invalid`).
    fn dir(&mut self, root: &Path, dir: &Path, prefix: String, depth: usize, invalid: Option<&str>) {
        if depth > 4 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        (self.step)();
        for e in entries.flatten() {
            (self.step)();
            let name = e.file_name().to_string_lossy().into_owned();
            let id = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let Ok(canonical) = path.canonicalize() else { continue };
            if !canonical.starts_with(root) || !canonical.is_dir() {
                continue;
            }
            let reason = match invalid {
                Some(r) => Some(r.to_string()),
                None => validate_id(&id).err().map(|e| e.to_string()),
            };
            if canonical.join("adapter_config.json").is_file() {
                match &reason {
                    None => self.ids.push(id.clone()),
                    Some(r) => self.unlisted.push(Unlisted { path: path.clone(), reason: r.clone() }),
                }
            }
            self.dir(root, &canonical, id, depth + 1, reason.as_deref());
        }
    }
}

/// An adapter folder that [`AdapterStore::scan`] leaves out of its ids, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unlisted {
    pub path: PathBuf,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder whose config went away after the folder was found (a publish renamed it aside) is
    /// [`StoreError::Vanished`], which requests get as UNAVAILABLE (retry), not FAILED_PRECONDITION (broken
    /// files); another I/O fault stays [`StoreError::Io`].
    #[test]
    fn a_config_gone_mid_read_is_vanished_not_broken() {
        let dir = tempfile::tempdir().unwrap();
        for e in [AdapterStore::stamp(dir.path()).unwrap_err(), AdapterStore::version(dir.path()).unwrap_err()] {
            assert!(matches!(&e, StoreError::Vanished { path } if path.ends_with("adapter_config.json")), "{e:?}");
            assert!(e.to_string().contains("disappeared while it was read"), "{e}");
            let status = crate::server::status::from_cache(crate::lora::cache::CacheError::Store(e), false);
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        std::fs::create_dir(dir.path().join("adapter_config.json")).unwrap();
        let e = AdapterStore::version(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
    }

    #[test]
    fn id_rules() {
        for ok in ["a", "team/adapter-1", "x.y_z", "a/b/c", &"a".repeat(128)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("..", "`..`"),
            ("a/../b", "`..`"),
            ("./a", "`.`"),
            ("/abs", "empty path segment"),
            ("a/", "empty path segment"),
            ("a//b", "empty path segment"),
            ("a b", "' '"),
            ("a\\b", "'\\\\'"),
            ("ü", "'ü'"),
            (&"a".repeat(129), "128 bytes"),
        ] {
            let e = validate_id(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    fn adapter(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
    }

    #[test]
    fn resolve_confines_to_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        adapter(&root.join("good"));
        adapter(&root.join("team/nested"));
        adapter(&tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("empty")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("escape")).unwrap();
            std::os::unix::fs::symlink(root.join("good"), root.join("alias")).unwrap();
        }
        let s = AdapterStore::open(&root).unwrap();
        assert!(s.resolve("good").is_ok());
        assert!(s.resolve("team/nested").is_ok());
        assert!(matches!(s.resolve("missing"), Err(StoreError::NotFound { .. })));
        assert!(matches!(s.resolve("empty"), Err(StoreError::NotFound { .. })));
        std::fs::create_dir(root.join("no-config")).unwrap();
        std::fs::write(root.join("no-config/adapter_model.safetensors"), b"").unwrap();
        let e = s.resolve("no-config").unwrap_err().to_string();
        assert!(e.contains("no-config/adapter_config.json: missing"), "{e}");
        let e = AdapterStore::open(&tmp.path().join("nowhere")).unwrap_err().to_string();
        assert!(e.contains("nowhere: the adapters root does not exist"), "{e}");
        assert!(matches!(s.resolve("../outside"), Err(StoreError::InvalidId { .. })));
        #[cfg(unix)]
        {
            assert!(matches!(s.resolve("escape"), Err(StoreError::Escapes { .. })));
            assert!(s.resolve("alias").is_ok(), "a symlink that stays inside is fine");
        }
        let listed = s.scan().0;
        assert!(listed.contains(&"good".to_string()) && listed.contains(&"team/nested".to_string()));
        assert!(!listed.iter().any(|i| i == "escape" || i == "empty"));
        // An adapter folder no id can name is reported, not skipped in silence; other folders are not.
        adapter(&root.join("team/my adapter"));
        adapter(&root.join("My Team/bot"));
        std::fs::create_dir_all(root.join("not an adapter")).unwrap();
        let (ids, unlisted) = s.scan();
        assert_eq!(ids, listed);
        let paths: Vec<_> = unlisted.iter().map(|u| u.path.clone()).collect();
        assert_eq!(paths, [root.join("My Team/bot"), root.join("team/my adapter")], "{unlisted:?}");
        assert!(unlisted.iter().all(|u| u.reason.contains("character ' ' is not allowed")), "{unlisted:?}");
    }

    /// A listing steps at each folder entry it looks at (a caller times each call, not the whole listing),
    /// and lists what a listing without steps does.
    #[test]
    fn a_listing_steps_at_each_entry() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..12 {
            adapter(&tmp.path().join(format!("team-{}/a{i}", i % 3)));
        }
        let s = AdapterStore::open(tmp.path()).unwrap();
        let mut steps = 0;
        let stepped = s.scan_stepping(&mut || steps += 1);
        assert_eq!(stepped, s.scan());
        assert_eq!(stepped.0.len(), 12);
        // A bound: at least one step a folder entry (the root's 3 teams, the teams' 12 adapters, and each
        // one's config).
        assert!(steps >= 3 + 12 + 12, "{steps} steps");
    }

    /// A folder inside the root whose files are symlinks leaving it is out of bounds like a folder symlink;
    /// files linked within the root are fine. Hidden folders are not listed but resolve.
    #[cfg(unix)]
    #[test]
    fn file_symlinks_are_confined_too_and_hidden_folders_unlisted() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        adapter(&tmp.path().join("outside"));
        adapter(&root.join("blobs/src"));
        for (name, target) in [("linked-out", tmp.path().join("outside")), ("linked-in", root.join("blobs/src"))] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            symlink(target.join("adapter_config.json"), root.join(name).join("adapter_config.json")).unwrap();
        }
        adapter(&root.join(".hidden"));
        let s = AdapterStore::open(&root).unwrap();
        let e = s.resolve("linked-out").unwrap_err();
        assert!(matches!(e, StoreError::Escapes { .. }), "{e}");
        assert!(e.to_string().contains("linked-out/adapter_config.json resolves outside"), "{e}");
        assert!(s.resolve("linked-in").is_ok());
        assert!(s.resolve(".hidden").is_ok());
        // Listed: a folder under the root, whose requests then say what is wrong with it.
        assert_eq!(s.scan().0, ["blobs/src", "linked-in", "linked-out"]);
        // The chat files are read into prompts: a template, a tokenizer config or a folder of templates
        // linked out is refused the same way.
        std::fs::write(tmp.path().join("secret"), "{{ 'x' }}").unwrap();
        std::fs::create_dir(tmp.path().join("templates")).unwrap();
        symlink(tmp.path().join("secret"), tmp.path().join("templates/default.jinja")).unwrap();
        for (name, link, target) in [
            ("chat-out", "chat_template.jinja", tmp.path().join("secret")),
            ("config-out", "tokenizer_config.json", tmp.path().join("secret")),
            ("extra-out", "additional_chat_templates", tmp.path().join("templates")),
        ] {
            adapter(&root.join(name));
            symlink(target, root.join(name).join(link)).unwrap();
            let e = s.resolve(name).unwrap_err().to_string();
            assert!(e.contains(&format!("{name}/{link}")) && e.contains("resolves outside"), "{e}");
        }
        std::fs::create_dir(root.join("chat-out/additional_chat_templates")).unwrap();
        std::fs::remove_file(root.join("chat-out/chat_template.jinja")).unwrap();
        symlink(tmp.path().join("secret"), root.join("chat-out/additional_chat_templates/tool_use.jinja")).unwrap();
        let e = s.resolve("chat-out").unwrap_err().to_string();
        assert!(e.contains("chat-out/additional_chat_templates/tool_use.jinja resolves outside"), "{e}");
    }

    /// A root given as a symlink follows it at every lookup: re-pointed (a release symlink swapped, as
    /// git-sync does), every adapter comes from the new target; the old one deleted changes nothing.
    #[cfg(unix)]
    #[test]
    fn a_symlinked_root_is_followed_when_it_is_repointed() {
        let tmp = tempfile::tempdir().unwrap();
        adapter(&tmp.path().join("r1/old"));
        adapter(&tmp.path().join("r2/new"));
        let current = tmp.path().join("current");
        std::os::unix::fs::symlink("r1", &current).unwrap();
        let s = AdapterStore::open(&current).unwrap();
        assert_eq!(s.resolve("old").unwrap(), tmp.path().join("r1/old").canonicalize().unwrap());
        assert_eq!(s.scan().0, ["old"]);
        let next = tmp.path().join("next");
        std::os::unix::fs::symlink("r2", &next).unwrap();
        std::fs::rename(&next, &current).unwrap();
        std::fs::remove_dir_all(tmp.path().join("r1")).unwrap();
        assert_eq!(s.resolve("new").unwrap(), tmp.path().join("r2/new").canonicalize().unwrap());
        assert!(matches!(s.resolve("old"), Err(StoreError::NotFound { .. })));
        assert_eq!(s.scan().0, ["new"]);
        std::fs::remove_file(&current).unwrap();
        let e = s.resolve("new").unwrap_err().to_string();
        assert!(e.contains("the adapters root does not exist"), "{e}");
    }

    #[test]
    fn version_changes_with_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        adapter(tmp.path());
        let v1 = AdapterStore::version(tmp.path()).unwrap();
        assert_eq!(v1, AdapterStore::version(tmp.path()).unwrap());
        assert_eq!(v1.id.len(), 16);
        std::fs::write(tmp.path().join("adapter_config.json"), "{\"r\": 8}").unwrap();
        let v2 = AdapterStore::version(tmp.path()).unwrap();
        assert_ne!(v1.id, v2.id);
        assert_ne!(v1.stamp, v2.stamp);
    }
}
