//! Request ids and the request log. Every Generate call that reaches its handler has an id: the client's
//! `x-request-id` (vLLM's and Envoy's header) or, without one, one made here; the response's metadata
//! carries it back either way (its headers, or the trailers of a call that fails), so a client can quote it.
//! At the call's end one line is logged on the target `loraserve::request`, as TGI logs each request: the
//! id, the adapter and its version, the tokens, how each completion finished and the seed of each that
//! sampled (TGI logs the seed too), and where the time went (queue, first token, total). The line is `info`,
//! `warn` for the server's own failures; `LORASERVE_LOG=info,loraserve::request=off` turns it off. Prompts
//! and outputs are never logged; an error's message may quote what the request sent (escaped, and cut to
//! [`MAX_LOGGED`] bytes, as the adapter id).

use std::fmt;
use std::time::{Duration, Instant};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Response, Status};

use super::deadline::ended_by;
use super::status::{code_label, invalid};
use crate::engine::{Event, FinishReason};

/// The metadata key of a request's id, in the request and in its response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest request id taken, in bytes (a UUID is 36; W3C's `traceparent` 55).
pub const MAX_REQUEST_ID: usize = 128;

/// The most bytes of a request's adapter id, and of an error message, a log line quotes.
pub const MAX_LOGGED: usize = 256;

const NOT_VISIBLE: &str = "must be visible ASCII (no spaces or control characters)";

/// A request's id: visible ASCII, no spaces, 1 to [`MAX_REQUEST_ID`] bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(AsciiMetadataValue);

impl RequestId {
    /// The id the client gave in `x-request-id`, or a new one when it gave none (or an empty one, as proto3
    /// reads an empty string: unset). One that breaks the rules above is INVALID_ARGUMENT naming the header:
    /// it would be quoted in logs, where a space or a control character could forge a field.
    pub fn of(meta: &MetadataMap) -> Result<RequestId, Status> {
        let Some(v) = meta.get(REQUEST_ID_HEADER) else { return Ok(RequestId::new()) };
        match v.to_str() {
            Ok("") => Ok(RequestId::new()),
            Ok(s) => RequestId::parse(s),
            Err(_) => Err(NOT_VISIBLE.to_string()),
        }
        .map_err(|why| invalid(REQUEST_ID_HEADER, why))
    }

    /// `s` as a request id, or why it cannot be one.
    pub fn parse(s: &str) -> Result<RequestId, String> {
        if s.is_empty() || s.len() > MAX_REQUEST_ID {
            return Err(format!("must be 1 to {MAX_REQUEST_ID} bytes, got {}", s.len()));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(NOT_VISIBLE.to_string());
        }
        Ok(RequestId(AsciiMetadataValue::try_from(s).expect("visible ASCII")))
    }

    /// A new id: 32 random hexadecimal digits, as vLLM's (a UUID4's hex).
    fn new() -> RequestId {
        use crate::engine::sampler::unseeded;
        let id = format!("{:016x}{:016x}", unseeded(), unseeded());
        RequestId(AsciiMetadataValue::try_from(id).expect("hexadecimal digits are visible ASCII"))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("checked visible ASCII")
    }

    /// Sets `x-request-id` in `meta` to this id.
    pub fn insert_into(&self, meta: &mut MetadataMap) {
        meta.insert(REQUEST_ID_HEADER, self.0.clone());
    }

    /// `s` with this id in its metadata (the trailers it goes out in).
    pub fn tag(&self, mut s: Status) -> Status {
        self.insert_into(s.metadata_mut());
        s
    }

    /// `r` with this id in its metadata: the response's headers, or a failed call's trailers.
    pub fn stamp<T>(&self, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        r.map(|mut r| {
            self.insert_into(r.metadata_mut());
            r
        })
        .map_err(|s| self.tag(s))
    }
}

/// The `x-request-id` in `meta`, if it carries one that reads as text (a response's, for the client).
pub fn id_in(meta: &MetadataMap) -> Option<&str> {
    meta.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok())
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Generate call's log line, filled in as the call goes ([`admitted`](Self::admitted), [`see`](Self::see))
/// and written once: by [`end`](Self::end), or when dropped first (the client left: CANCELLED, or
/// DEADLINE_EXCEEDED past its deadline, as the call is counted).
pub struct RequestLog {
    id: RequestId,
    rpc: &'static str,
    start: Instant,
    timed_out_from: Option<Instant>,
    /// The request's `adapter_id` ("" for the base model) and the version it ran with.
    adapter: String,
    version: String,
    prompt_tokens: usize,
    /// Completion 0's (the others share its prompt, and most often its cached blocks).
    cached_prompt_tokens: usize,
    queue_time: Option<Duration>,
    generated_tokens: usize,
    /// Each completion's, in index order (`None` until it finishes).
    finish: Vec<Option<FinishReason>>,
    /// Each completion's seed when it sampled, in index order (`None` until it finishes, or greedy).
    seeds: Vec<Option<u64>>,
    first_token: Option<Duration>,
    ended: bool,
}

impl RequestLog {
    /// A call for `adapter` ("" for the base model) that arrived at `start`, ended by its deadline when it
    /// ends after `timed_out_from`.
    pub fn new(
        id: RequestId,
        rpc: &'static str,
        adapter: &str,
        start: Instant,
        timed_out_from: Option<Instant>,
    ) -> Self {
        RequestLog {
            id,
            rpc,
            start,
            timed_out_from,
            adapter: clip(adapter).to_string(),
            version: String::new(),
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            queue_time: None,
            generated_tokens: 0,
            finish: Vec::new(),
            seeds: Vec::new(),
            first_token: None,
            ended: false,
        }
    }

    /// The call's id.
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// The request passed validation and went to the engine as `n` completions, with that adapter version.
    pub fn admitted(&mut self, version: &str, prompt_tokens: usize, n: usize) {
        self.version = version.to_string();
        self.prompt_tokens = prompt_tokens;
        self.finish = vec![None; n];
        self.seeds = vec![None; n];
    }

    /// What completion `i` reported.
    pub fn see(&mut self, i: usize, ev: &Event) {
        match ev {
            Event::Started { queue_time } => {
                if i == 0 {
                    self.queue_time = Some(*queue_time);
                }
            }
            Event::Tokens { ids, .. } => {
                if !ids.is_empty() && self.first_token.is_none() {
                    self.first_token = Some(self.start.elapsed());
                }
                self.generated_tokens += ids.len();
            }
            Event::Finished { reason, cached_tokens, seed, .. } => {
                if let (Some(f), Some(s)) = (self.finish.get_mut(i), self.seeds.get_mut(i)) {
                    (*f, *s) = (Some(*reason), *seed);
                }
                if i == 0 {
                    self.cached_prompt_tokens = *cached_tokens;
                }
            }
            Event::Prompt(_) | Event::Failed(_) => {}
        }
    }

    /// Writes the line for a call that answered `r`.
    pub fn end_with<T>(&mut self, r: &Result<T, Status>) {
        match r {
            Ok(_) => self.end(Code::Ok, ""),
            Err(s) => self.end(s.code(), s.message()),
        }
    }

    /// Writes the line: the call ended with `code` (and, failed, `message`). Once; later calls do nothing.
    pub fn end(&mut self, code: Code, message: &str) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let (finish, seed) = (finish(&self.finish), seeds(&self.seeds));
        let message = clip(message);
        let (queue, ttft, total) = (Secs(self.queue_time), Secs(self.first_token), Secs(Some(self.start.elapsed())));
        macro_rules! line {
            ($level:ident, $($how:tt)*) => {
                tracing::$level!(
                    target: "loraserve::request",
                    request_id = ?self.id.as_str(),
                    rpc = self.rpc,
                    adapter = ?self.adapter,
                    adapter_version = ?self.version,
                    code = code_label(code),
                    prompt_tokens = self.prompt_tokens,
                    cached_prompt_tokens = self.cached_prompt_tokens,
                    generated_tokens = self.generated_tokens,
                    n = self.finish.len(),
                    %finish,
                    %seed,
                    queue_s = %queue,
                    first_token_s = %ttft,
                    total_s = %total,
                    $($how)*
                )
            };
        }
        // The server's own failures are worth a look; a client's bad request or its leaving are not.
        match code {
            Code::Ok => line!(info, "request finished"),
            Code::Internal | Code::Unknown | Code::DataLoss => line!(warn, error = ?message, "request failed"),
            _ => line!(info, error = ?message, "request failed"),
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !self.ended {
            let (code, why) = left(self.timed_out_from);
            self.end(code, why);
        }
    }
}

/// How a call its client left ended (by its deadline once `timed_out_from` has passed, else cancelled), and
/// the words for it.
pub fn left(timed_out_from: Option<Instant>) -> (Code, &'static str) {
    match ended_by(timed_out_from) {
        Code::DeadlineExceeded => (Code::DeadlineExceeded, "the client left at its deadline"),
        code => (code, "the client left"),
    }
}

/// `s`, cut to at most [`MAX_LOGGED`] bytes (at a character's boundary).
fn clip(s: &str) -> &str {
    if s.len() <= MAX_LOGGED {
        return s;
    }
    let mut end = MAX_LOGGED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Each completion's value, comma-separated in index order ("-" for one without, and for no completion).
struct Each<'a, T>(&'a [Option<T>], fn(&T, &mut fmt::Formatter<'_>) -> fmt::Result);

/// Each completion's finish reason.
fn finish(f: &[Option<FinishReason>]) -> Each<'_, FinishReason> {
    Each(f, |r, f| {
        f.write_str(match r {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::StopToken => "stop_token",
        })
    })
}

/// Each sampled completion's seed.
fn seeds(s: &[Option<u64>]) -> Each<'_, u64> {
    Each(s, |s, f| write!(f, "{s}"))
}

impl<T> fmt::Display for Each<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match v {
                Some(v) => (self.1)(v, f)?,
                None => f.write_str("-")?,
            }
        }
        Ok(())
    }
}

/// Seconds to the millisecond, or "-" when the call never got that far.
struct Secs(Option<Duration>);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{:.3}", d.as_secs_f64()),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(REQUEST_ID_HEADER, v.parse().unwrap());
        m
    }

    #[test]
    fn a_given_id_is_kept_and_a_missing_one_made() {
        let id = RequestId::of(&with_header("trace-7f3a;span=2")).unwrap();
        assert_eq!(id.as_str(), "trace-7f3a;span=2");
        let (a, b) = (RequestId::of(&MetadataMap::new()).unwrap(), RequestId::of(&with_header("")).unwrap());
        for made in [&a, &b] {
            assert_eq!(made.as_str().len(), 32, "{made}");
            assert!(made.as_str().bytes().all(|c| c.is_ascii_hexdigit()), "{made}");
        }
        assert_ne!(a, b, "each call gets its own id");
    }

    #[test]
    fn a_bad_id_is_refused_naming_the_header() {
        for bad in ["two words", &"x".repeat(MAX_REQUEST_ID + 1)] {
            let s = RequestId::of(&with_header(bad)).unwrap_err();
            assert_eq!(s.code(), Code::InvalidArgument, "{bad}");
            assert!(s.message().starts_with("x-request-id: "), "{}", s.message());
        }
        assert!(RequestId::of(&with_header(&"x".repeat(MAX_REQUEST_ID))).is_ok());
    }

    #[test]
    fn the_id_goes_back_in_the_answer_and_in_an_error() {
        let id = RequestId::of(&with_header("abc")).unwrap();
        let ok = id.stamp(Ok(Response::new(()))).unwrap();
        assert_eq!(ok.metadata().get(REQUEST_ID_HEADER).unwrap(), "abc");
        let err = id.stamp::<()>(Err(Status::not_found("no"))).unwrap_err();
        assert_eq!(err.metadata().get(REQUEST_ID_HEADER).unwrap(), "abc");
    }

    #[test]
    fn finish_reasons_and_seeds_read_in_index_order() {
        let f = [Some(FinishReason::Length), None, Some(FinishReason::EosToken)];
        assert_eq!(finish(&f).to_string(), "length,-,eos_token");
        assert_eq!(finish(&[]).to_string(), "-");
        assert_eq!(seeds(&[None, Some(7)]).to_string(), "-,7");
        assert_eq!(Secs(Some(Duration::from_micros(1_234_567))).to_string(), "1.235");
        assert_eq!(Secs(None).to_string(), "-");
        // Cut before the two-byte character that would pass the limit.
        let long = format!("a{}", "é".repeat(MAX_LOGGED));
        assert_eq!(clip(&long).len(), MAX_LOGGED - 1);
        assert_eq!(clip("short"), "short");
    }
}
