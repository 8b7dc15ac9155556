//! Reading an adapter's weights file whole into memory, safely against writers that rewrite it in place.
//!
//! Never memory-mapped: a file rewritten in place while mapped (`cp` over it, `rsync --inplace`, `scp`) is
//! truncated under the map, and touching a page past its new end kills the whole server with SIGBUS. A file
//! that shrinks or grows while being read is an error naming that; one rewritten at the same length gives torn
//! bytes, which fail validation or yield weights that the next request's stamp check (`store`) replaces.

use std::io::Read;
use std::ops::{Deref, DerefMut};
use std::path::Path;

/// Bytes per read of a parallel [`read_whole`].
const CHUNK: usize = 4 << 20;
/// Files from this size on are read into anonymous memory asked for in huge pages.
const HUGE_FROM: usize = 2 << 20;

/// A file's bytes in memory. A large one is read into an anonymous mapping advised for transparent huge
/// pages: an adapter of tens of MB then costs a few dozen page faults to fill instead of thousands of 4 KB
/// ones (each zeroed and mapped), which otherwise cost more than the read itself.
#[derive(Debug)]
pub(crate) enum FileBytes {
    Heap(Vec<u8>),
    Anon(memmap2::MmapMut),
}

impl FileBytes {
    fn zeroed(len: usize) -> std::io::Result<Self> {
        if len < HUGE_FROM {
            return Ok(FileBytes::Heap(vec![0; len]));
        }
        let map = memmap2::MmapMut::map_anon(len)?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage); // a hint: without THP the pages are 4 KB, as a Vec's
        Ok(FileBytes::Anon(map))
    }
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Heap(v) => v,
            FileBytes::Anon(m) => m,
        }
    }
}

impl DerefMut for FileBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            FileBytes::Heap(v) => v,
            FileBytes::Anon(m) => m,
        }
    }
}

/// The error of a file that changed size while being read (its kind `Other`: worth another try).
fn changed() -> std::io::Error {
    std::io::Error::other(
        "the file changed while being read (publish adapters by renaming complete files or folders into place, \
         not by rewriting them)",
    )
}

/// The whole file at `path`; in 4 MiB chunks on rayon's pool when `parallel` (a GPU server's cold load, the
/// CPU otherwise idle). The caller names the file in errors and decides from the kind whether another try
/// may succeed.
pub(crate) fn read_whole(path: &Path, parallel: bool) -> std::io::Result<FileBytes> {
    read_in_chunks(path, parallel.then_some(CHUNK))
}

fn read_in_chunks(path: &Path, chunk: Option<usize>) -> std::io::Result<FileBytes> {
    let mut file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut buf = FileBytes::zeroed(len)?;
    let short = |e: std::io::Error| if e.kind() == std::io::ErrorKind::UnexpectedEof { changed() } else { e };
    #[cfg(unix)]
    if let Some(chunk) = chunk {
        use rayon::prelude::*;
        use std::os::unix::fs::FileExt;
        buf.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, part)| file.read_exact_at(part, (i * chunk) as u64))
            .map_err(short)?;
        return match file.read_at(&mut [0u8; 1], len as u64)? {
            0 => Ok(buf),
            _ => Err(changed()),
        };
    }
    let _ = chunk;
    file.read_exact(&mut buf).map_err(short)?;
    match file.read(&mut [0u8; 1])? {
        0 => Ok(buf),
        _ => Err(changed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both reads give the file's bytes: empty, shorter than a chunk, several chunks with a partial last.
    #[test]
    fn sequential_and_chunked_reads_give_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        // The last two in huge-page memory.
        for len in [0usize, 5, 3 * 1000 + 7, HUGE_FROM, HUGE_FROM + 4 * CHUNK + 3] {
            let p = dir.path().join(format!("f{len}"));
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&p, &data).unwrap();
            assert_eq!(*read_in_chunks(&p, None).unwrap(), data, "sequential, {len} bytes");
            assert_eq!(*read_in_chunks(&p, Some(1000)).unwrap(), data, "chunks of 1000, {len} bytes");
            assert_eq!(*read_whole(&p, true).unwrap(), data);
        }
        let missing = read_whole(&dir.path().join("nope"), false).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound, "{missing}");
    }
}
