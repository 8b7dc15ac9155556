//! API keys: `--api-key-file` holds one key per line (blank lines and `#` comments ignored); every call to
//! the LoraServe service must carry `authorization: Bearer <key>`. Health and reflection stay open. The key a
//! call was accepted with goes into its extensions ([`KeyIndex`]): requests of different keys never share
//! cached prompt blocks.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

/// Which key a call was accepted with: its place among the file's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyIndex(pub usize);

/// The accepted keys.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl ApiKeys {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            check_key(line).map_err(|e| format!("{} line {i}: {e}", path.display()))?;
            keys.push(line.as_bytes().to_vec());
        }
        if keys.is_empty() {
            return Err(format!("{}: no API keys in the file", path.display()));
        }
        Ok(ApiKeys(Arc::new(keys)))
    }

    /// Which key `presented` equals, if any (each key compared in time independent of where they differ).
    fn accepts(&self, presented: &[u8]) -> Option<KeyIndex> {
        self.0
            .iter()
            .enumerate()
            .fold(None, |found, (i, k)| if constant_time_eq(k, presented) { Some(KeyIndex(i)) } else { found })
    }

    /// The interceptor for the LoraServe service: refuses a call without an accepted key, and puts the
    /// [`KeyIndex`] of the key into the extensions of a call with one.
    pub fn check(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` are `Bearer`.
        let key = header.and_then(|h| h.split_once(' ')).filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
        let accepted = match (header, key) {
            (_, Some((_, key))) => {
                self.accepts(key.trim().as_bytes()).ok_or_else(|| Status::unauthenticated("invalid API key"))
            }
            (Some(_), None) => Err(Status::unauthenticated("`authorization` metadata is not `Bearer <key>`")),
            (None, None) => Err(Status::unauthenticated("missing `authorization: Bearer <key>` metadata")),
        }?;
        req.extensions_mut().insert(accepted);
        Ok(req)
    }
}

/// Whether `key` can be sent as `authorization: Bearer <key>`: ASCII without control characters other than
/// tab (a header value carries nothing else; a key no client can send would refuse every call made with it).
pub fn check_key(key: &str) -> Result<(), String> {
    match key.char_indices().find(|&(_, c)| !(c.is_ascii_graphic() || c == ' ' || c == '\t')) {
        None if !key.is_empty() => Ok(()),
        None => Err("the API key is empty".into()),
        Some((at, c)) => Err(format!(
            "the API key has {c:?} at byte {at}: an `authorization` header carries ASCII without control characters"
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key file may be a pipe (`--api-key-file <(vault read …)`): the operator named it, so it is read as
    /// given, unlike the files found inside model and adapter folders.
    #[test]
    fn keys_come_from_a_pipe_too() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("keys");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "alpha\n").unwrap())
        };
        let k = ApiKeys::from_file(&fifo).unwrap();
        writer.join().unwrap();
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", "Bearer alpha".parse().unwrap());
        assert!(k.check(r).is_ok());
    }

    #[test]
    fn keys_from_file_and_checks() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), "# keys\nalpha\n\n  beta  \n").unwrap();
        let k = ApiKeys::from_file(tmp.path()).unwrap();
        let req = |h: Option<&str>| {
            let mut r = Request::new(());
            if let Some(h) = h {
                r.metadata_mut().insert("authorization", h.parse().unwrap());
            }
            r
        };
        let index = |r: Result<Request<()>, Status>| r.unwrap().extensions().get::<KeyIndex>().copied();
        assert_eq!(index(k.check(req(Some("Bearer alpha")))), Some(KeyIndex(0)));
        assert_eq!(index(k.check(req(Some("Bearer beta")))), Some(KeyIndex(1)));
        assert!(k.check(req(Some("bearer alpha"))).is_ok() && k.check(req(Some("BEARER alpha"))).is_ok());
        let e = k.check(req(Some("Basic alpha"))).unwrap_err();
        assert!(e.message().contains("not `Bearer <key>`"), "{e:?}");
        assert_eq!(k.check(req(Some("Bearer gamma"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(k.check(req(Some("alpha"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(k.check(req(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        std::fs::write(tmp.path(), "\n# none\n").unwrap();
        assert!(ApiKeys::from_file(tmp.path()).is_err());
        // A key no header can carry would refuse every call made with it: refused up front, by line.
        for (text, line, bad) in [("alpha\nключ\n", 2, "'к' at byte 0"), ("a\u{7f}b\n", 1, "'\\u{7f}' at byte 1")]
        {
            std::fs::write(tmp.path(), text).unwrap();
            let e = ApiKeys::from_file(tmp.path()).err().unwrap();
            assert!(e.contains(&format!("line {line}: the API key has {bad}")), "{e}");
        }
        // A space or tab inside a key is header text like any other.
        std::fs::write(tmp.path(), "a b\n").unwrap();
        assert_eq!(index(ApiKeys::from_file(tmp.path()).unwrap().check(req(Some("Bearer a b")))), Some(KeyIndex(0)));
    }
}
