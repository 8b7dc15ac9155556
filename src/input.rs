//! Opening and reading the files found in the folders the server and commands are given (a model's config,
//! tokenizer files, shards and chat templates, an adapter's config and chat files, a training checkpoint's
//! state): regular files only. A FIFO or a character device in their place would block the open or the read
//! for as long as nothing writes to it (a load that never ends, a request that never answers), so it is
//! opened without blocking and refused by kind. A file the operator names on the command line (`--data`,
//! `--api-key-file`, TLS files, `--chat-template`, `--json-schema @file`) is read as given: a pipe there
//! (`<(vault read …)`, `/dev/stdin`) is meant. (An adapter's weights are read as they
//! come, as from a mount that may hang: such a read fails its requests at their deadlines, and the server
//! neither waits for it nor stops for it; `tests/server_binary.rs` stands a FIFO in for that mount.)

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `path` opened for reading, when it is (or links to) a regular file.
pub fn open(path: &Path) -> io::Result<File> {
    // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer; reads of a
    // regular file ignore the flag.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32).open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_dir() { "a folder" } else { "a FIFO, socket or device" };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a regular file ({what})")))
}

/// The bytes of the regular file `path`.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The text of the regular file `path`.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO with no writer is refused at once, by kind; a folder too; a symbolic link to a file is read.
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
        let e = read(&fifo).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a regular file (a FIFO, socket or device)"), "{e}");
        assert!(read_to_string(dir.path()).unwrap_err().to_string().contains("(a folder)"));
        std::fs::write(dir.path().join("f"), "text").unwrap();
        std::os::unix::fs::symlink(dir.path().join("f"), dir.path().join("link")).unwrap();
        assert_eq!(read_to_string(&dir.path().join("link")).unwrap(), "text");
        assert_eq!(read(&dir.path().join("nope")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
