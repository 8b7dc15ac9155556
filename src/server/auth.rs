//! API keys: `--api-key-file` holds one key per line (blank lines and `#` comments ignored); every call to
//! the LoraServe service must carry `authorization: Bearer <key>`. Health and reflection stay open.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

/// The accepted keys.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl ApiKeys {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err(format!("{}: no API keys in the file", path.display()));
        }
        Ok(ApiKeys(Arc::new(keys)))
    }

    /// Whether `presented` equals one of the keys (compared in time independent of where they differ).
    fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(false, |ok, k| ok | constant_time_eq(k, presented))
    }

    /// The interceptor for the LoraServe service.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` are `Bearer`.
        let key = header.and_then(|h| h.split_once(' ')).filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
        match (header, key) {
            (_, Some((_, key))) if self.accepts(key.trim().as_bytes()) => Ok(req),
            (_, Some(_)) => Err(Status::unauthenticated("invalid API key")),
            (Some(_), None) => Err(Status::unauthenticated("`authorization` metadata is not `Bearer <key>`")),
            (None, None) => Err(Status::unauthenticated("missing `authorization: Bearer <key>` metadata")),
        }
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
        assert!(k.check(req(Some("Bearer alpha"))).is_ok());
        assert!(k.check(req(Some("Bearer beta"))).is_ok());
        assert!(k.check(req(Some("bearer alpha"))).is_ok() && k.check(req(Some("BEARER alpha"))).is_ok());
        let e = k.check(req(Some("Basic alpha"))).unwrap_err();
        assert!(e.message().contains("not `Bearer <key>`"), "{e:?}");
        assert_eq!(k.check(req(Some("Bearer gamma"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(k.check(req(Some("alpha"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(k.check(req(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        std::fs::write(tmp.path(), "\n# none\n").unwrap();
        assert!(ApiKeys::from_file(tmp.path()).is_err());
    }
}
