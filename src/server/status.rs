//! The errors of the layers below (engine, adapter cache, store, adapter files) mapped to gRPC statuses in
//! one place (chat templates and their renderings: `conversation.rs`), and the stable `code` label of each status for `loraserve_requests_total`. Request
//! validation builds its `INVALID_ARGUMENT` through [`invalid`] here too.

use tonic::{Code, Status};

use crate::engine::{EngineError, SubmitError};
use crate::lora::cache::CacheError;
use crate::lora::peft::AdapterError;
use crate::lora::store::StoreError;

/// An invalid request field: `INVALID_ARGUMENT` naming the field.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    let m = format!("{field}: {reason}");
    Status::invalid_argument(bounded(&m).unwrap_or(m))
}

/// The longest status message sent whole, in bytes on the wire: it travels percent-encoded in a header
/// (`grpc-message`), and clients drop a response whose headers pass 8–16 KiB (grpcio: 8 KiB). A message that
/// names a place deep in a request (a JSON Schema's pointer through a long `$ref` chain) or quotes what the
/// request sent can be longer.
const MESSAGE_MAX: usize = 4096;

/// Bytes `c` takes in `grpc-message`: tonic percent-encodes every byte of a non-ASCII character, controls,
/// the space and ``"#%<>`?{}``.
fn wire_len(c: char) -> usize {
    match c {
        ' ' | '"' | '#' | '%' | '<' | '>' | '`' | '?' | '{' | '}' => 3,
        c if c.is_ascii() && !c.is_ascii_control() => 1,
        c => 3 * c.len_utf8(),
    }
}

/// `m` past [`MESSAGE_MAX`] on the wire: its start and end with the middle left out (both ends say what and
/// where); `None` when it fits.
fn bounded(m: &str) -> Option<String> {
    if m.chars().map(wire_len).sum::<usize>() <= MESSAGE_MAX {
        return None;
    }
    // Each end gets half the budget, less room for the note between them.
    let half = MESSAGE_MAX / 2 - 64;
    let within = |chars: &mut dyn Iterator<Item = (usize, char)>| {
        let mut spent = 0;
        chars
            .take_while(|&(_, c)| {
                spent += wire_len(c);
                spent <= half
            })
            .last()
    };
    let head = within(&mut m.char_indices()).map_or(0, |(i, c)| i + c.len_utf8());
    let tail = within(&mut m.char_indices().rev()).map_or(m.len(), |(i, _)| i);
    Some(format!("{} … ({} bytes left out) … {}", &m[..head], tail - head, &m[tail..]))
}

/// `s` with its message cut as `bounded` cuts it: every status a handler answers goes through here.
pub fn bound(s: Status) -> Status {
    match bounded(s.message()) {
        Some(m) => Status::new(s.code(), m),
        None => s,
    }
}

pub fn from_cache(e: CacheError, deadline_passed: bool) -> Status {
    match &e {
        // Every id a request gives is its `adapter_id` field.
        CacheError::Store(StoreError::InvalidId { .. }) => invalid("adapter_id", e),
        // A valid id whose folder the server's own files put out of bounds: the request is fine, the server
        // is not set up to serve it.
        CacheError::Store(StoreError::Escapes { .. }) => Status::failed_precondition(e.to_string()),
        CacheError::Store(StoreError::NotFound { .. }) => Status::not_found(e.to_string()),
        // Files that failed to read (EIO, a copy in progress) or a folder that went away as it was read (a
        // publish by rename): another try may work.
        CacheError::Invalid(a) if matches!(**a, AdapterError::Read { .. }) => Status::unavailable(e.to_string()),
        CacheError::Store(StoreError::Vanished { .. }) => Status::unavailable(e.to_string()),
        CacheError::Store(StoreError::Io { .. }) | CacheError::Invalid(_) => Status::failed_precondition(e.to_string()),
        CacheError::Full { .. } if deadline_passed => {
            Status::deadline_exceeded(format!("deadline exceeded waiting for adapter cache space: {e}"))
        }
        // Larger than the whole device tier: no retry helps until the server is configured otherwise.
        CacheError::TooLarge { .. } => Status::failed_precondition(e.to_string()),
        CacheError::Full { .. } => Status::resource_exhausted(e.to_string()),
        CacheError::Internal { .. } => Status::internal(e.to_string()),
        CacheError::Unanswered { .. } if deadline_passed => {
            Status::deadline_exceeded(format!("deadline exceeded looking up the adapter: {e}"))
        }
        CacheError::Unanswered { .. } => Status::unavailable(e.to_string()),
    }
}

pub fn from_submit(e: SubmitError) -> Status {
    match e {
        SubmitError::QueueFull { .. } => Status::resource_exhausted(e.to_string()),
        SubmitError::ShuttingDown => Status::unavailable(e.to_string()),
        SubmitError::TooLong(e) => from_engine(e),
        SubmitError::OutOfVocab { .. } => Status::invalid_argument(e.to_string()),
    }
}

/// The status of a request whose events ended before it did: UNAVAILABLE where the engine has stopped (a
/// request handed over as it stopped, after it had failed the queued ones: a shutdown, or failed steps), as
/// the queued ones got; INTERNAL while it runs (a bug).
pub fn unfinished(engine: &crate::engine::Engine) -> Status {
    if engine.stats().stopped.load(std::sync::atomic::Ordering::Relaxed) {
        from_engine(EngineError::ShuttingDown)
    } else {
        Status::internal("engine dropped the request")
    }
}

pub fn from_engine(e: EngineError) -> Status {
    match e {
        EngineError::DeadlineExceeded => Status::deadline_exceeded("deadline exceeded"),
        EngineError::ShuttingDown => Status::unavailable("server is shutting down"),
        // More KV blocks than the whole cache: a shorter request, or a larger cache, is needed.
        EngineError::TooLong { .. } => Status::failed_precondition(e.to_string()),
        EngineError::Internal(_) => Status::internal(e.to_string()),
        EngineError::Unsatisfiable(_) => Status::invalid_argument(e.to_string()),
    }
}

/// The label value of `loraserve_requests_total{code}` (a bounded set: gRPC code names).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request the engine dropped unfinished is INTERNAL while it runs, UNAVAILABLE (as the requests queued
    /// when it stopped) once it has stopped: one handed over in the moment between its last look at its queue
    /// and its end is dropped with the queue.
    #[test]
    fn an_unfinished_request_is_unavailable_once_the_engine_stopped() {
        let m = crate::model::load(&crate::model::ModelSpec::Demo, &Default::default()).unwrap();
        let config = crate::engine::EngineConfig { kv_cache_bytes: 8 << 20, ..Default::default() };
        let engine = crate::engine::Engine::start(m.model, std::sync::Arc::new(m.tokenizer), config).unwrap();
        assert_eq!(unfinished(&engine).code(), tonic::Code::Internal);
        engine.shutdown(std::time::Duration::from_secs(10));
        let s = unfinished(&engine);
        assert_eq!((s.code(), s.message()), (tonic::Code::Unavailable, "server is shutting down"));
    }

    /// The `grpc-message` header tonic writes for `s`.
    fn on_the_wire(s: &Status) -> String {
        let mut h = tonic::codegen::http::HeaderMap::new();
        s.add_header(&mut h).unwrap();
        h["grpc-message"].to_str().unwrap().to_string()
    }

    /// A message past the header budget keeps its start and end, cut on character boundaries, and the budget
    /// is counted as the header carries it: percent-encoding triples spaces and each byte of a non-ASCII
    /// character (a 4,000-byte message of them was 12 KiB on the wire, past grpcio's 8 KiB).
    #[test]
    fn long_messages_are_cut_in_the_middle() {
        assert_eq!(invalid("f", "short").message(), "f: short");
        let long = format!("{}é{}", "a".repeat(3000), "€".repeat(2000));
        let s = invalid("field", &long);
        let m = s.message();
        assert!(m.starts_with("field: aaa") && m.ends_with("€€€") && m.contains("bytes left out"), "{m}");
        assert!(on_the_wire(&s).len() <= MESSAGE_MAX, "{}", on_the_wire(&s).len());
        for long in [" ".repeat(4000), "é".repeat(1500), "{\"a\"}?".repeat(700), "a".repeat(4096)] {
            let s = bound(Status::not_found(long.clone()));
            assert_eq!(s.code(), Code::NotFound);
            assert!(on_the_wire(&s).len() <= MESSAGE_MAX, "{}: {}", &long[..10], on_the_wire(&s).len());
        }
        let fits = "a".repeat(MESSAGE_MAX);
        assert_eq!(bound(Status::internal(fits.clone())).message(), fits);
    }
}
