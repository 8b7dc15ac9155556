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
    Status::invalid_argument(bounded(format!("{field}: {reason}")))
}

/// The longest status message sent whole: it travels in a header (`grpc-message`), and clients drop a
/// response whose headers pass 8–16 KiB. A message that names a place deep in a request (a JSON Schema's
/// pointer through a long `$ref` chain) can be longer.
const MESSAGE_MAX: usize = 4096;

/// `m`, or past [`MESSAGE_MAX`] its start and end with the middle left out (both ends say what and where).
fn bounded(m: String) -> String {
    if m.len() <= MESSAGE_MAX {
        return m;
    }
    let half = MESSAGE_MAX / 2;
    let mut head = half;
    while !m.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = m.len() - half;
    while !m.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} … ({} bytes left out) … {}", &m[..head], tail - head, &m[tail..])
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
    }
}

pub fn from_submit(e: SubmitError) -> Status {
    match e {
        SubmitError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
        SubmitError::ShuttingDown => Status::unavailable(e.to_string()),
        SubmitError::TooLong(e) => from_engine(e),
        SubmitError::OutOfVocab { .. } => Status::invalid_argument(e.to_string()),
    }
}

pub fn from_engine(e: EngineError) -> Status {
    match e {
        EngineError::DeadlineExceeded => Status::deadline_exceeded("deadline exceeded"),
        EngineError::ShuttingDown => Status::unavailable("server is shutting down"),
        // More KV blocks than the whole cache: a shorter request, or a larger cache, is needed.
        EngineError::TooLong { .. } => Status::failed_precondition(e.to_string()),
        EngineError::Internal(_) => Status::internal(e.to_string()),
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

    /// A message past the header budget keeps its start and end, cut on character boundaries.
    #[test]
    fn long_messages_are_cut_in_the_middle() {
        assert_eq!(invalid("f", "short").message(), "f: short");
        let long = format!("{}é{}", "a".repeat(3000), "€".repeat(2000));
        let m = invalid("field", &long).message().to_string();
        assert!(m.len() < MESSAGE_MAX + 100 && m.starts_with("field: aaa") && m.ends_with("€€€"), "{}", m.len());
        assert!(m.contains("bytes left out"));
    }
}
