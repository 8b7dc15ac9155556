//! Counting the LoraServe calls its handlers never see: refused by the API-key interceptor, or failed in
//! tonic's decoding (a message past `--max-request-bytes`, malformed protobuf), or for an unknown method.
//! The handlers count their own calls in `loraserve_requests_total` (service.rs) and mark the request as
//! seen; [`CountUnseen`], wrapped around the whole LoraServe service, counts the rest from the status tonic
//! answered with, so every finished call is counted exactly once. Restated on the way:
//!
//! - a client gone before its message arrived (its stream reset or its connection dropped, seen as its
//!   request body failing to read; tonic answers a stream cut short or UNKNOWN): CANCELLED, or
//!   DEADLINE_EXCEEDED close to its deadline;
//! - a deadline that comes before the handler answers (the message has not arrived): answered
//!   DEADLINE_EXCEEDED here, just before tonic's own timer would answer CANCELLED "Timeout expired"
//!   (`deadline.rs`);
//! - a request malformed below protobuf, which tonic answers INTERNAL (a stream that ends before its message
//!   is whole; a compressed flag without or against its `grpc-encoding`; compressed bytes that do not
//!   decompress): INVALID_ARGUMENT, the client's doing, not a server error for the alerts;
//! - a compressed message past `--max-request-bytes` once decompressed, which tonic answers
//!   RESOURCE_EXHAUSTED: OUT_OF_RANGE, as the same message sent uncompressed.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::arrival::Arrival;
use super::deadline::{ended_by, within, CallDeadline};

/// Set by a handler when it takes a call (it then counts the call itself).
#[derive(Clone, Default)]
pub struct HandlerSeen(Arc<AtomicBool>);

impl HandlerSeen {
    /// Marks `req` as taken by its handler.
    pub fn mark<T>(req: &tonic::Request<T>) {
        if let Some(s) = req.extensions().get::<HandlerSeen>() {
            s.0.store(true, Ordering::Relaxed);
        }
    }
}

/// The method label of a request path (`/loraserve.v1.LoraServe/Generate` → `Generate`).
fn rpc_label(path: &str) -> &'static str {
    const RPCS: [&str; 8] = [
        "Generate",
        "GenerateStream",
        "ListAdapters",
        "LoadAdapter",
        "UnloadAdapter",
        "Tokenize",
        "Detokenize",
        "Info",
    ];
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.into_iter().find(|r| *r == method).unwrap_or("unknown")
}

/// Wraps the LoraServe service (see the module header).
#[derive(Clone)]
pub struct CountUnseen<S> {
    inner: S,
}

impl<S> CountUnseen<S> {
    pub fn new(inner: S) -> Self {
        CountUnseen { inner }
    }
}

impl<S: NamedService> NamedService for CountUnseen<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<Body>> for CountUnseen<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    // tonic's body, which the answer given here (a status, no body) shares with the inner service's.
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let seen = HandlerSeen::default();
        let gone = Arc::new(AtomicBool::new(false));
        let mut req = req.map(|body| Body::new(Watched { body, gone: gone.clone() }));
        req.extensions_mut().insert(seen.clone());
        let rpc = rpc_label(req.uri().path());
        // A header out of the spec is the handler's to refuse.
        let deadline = CallDeadline::of(req.headers(), req.extensions().get::<Arrival>()).ok().flatten();
        let call = self.inner.call(req);
        Box::pin(async move {
            // Dropped before the answer (the connection gone): counted then.
            let timed_out_from = deadline.and_then(|d| d.timed_out_from());
            let mut left = Left { rpc, seen: seen.clone(), armed: true, timed_out_from };
            let answered = match deadline.and_then(|d| d.answer_by()) {
                Some(at) => within(at, call).await,
                None => Some(call.await),
            };
            left.armed = false;
            let Some(answered) = answered else {
                // Before tonic's timer (CANCELLED "Timeout expired"): a handler that took the call counted it as
                // it was dropped; one that never saw it waited for the request message.
                let mut what = "deadline exceeded";
                if !seen.0.load(Ordering::Relaxed) {
                    what = "deadline exceeded before the request message arrived";
                    super::service::count(rpc, tonic::Code::DeadlineExceeded);
                }
                return Ok(tonic::Status::deadline_exceeded(what).into_http());
            };
            let mut resp = answered?.map(Body::new);
            if !seen.0.load(Ordering::Relaxed) {
                // Refused before any handler ran: a trailers-only response, its status in the headers.
                let mut status = tonic::Status::from_header_map(resp.headers());
                if gone.load(Ordering::Relaxed) {
                    // Whatever tonic made of it ("Missing request message.", UNKNOWN "h2 protocol error"), no
                    // one reads this answer: cancelled, or ended by its deadline close to it.
                    let code = ended_by(timed_out_from);
                    let left = tonic::Status::new(code, "the client left before its request message was whole");
                    let _ = left.add_header(resp.headers_mut());
                    status = Some(left);
                } else if let Some(cut) = status.as_ref().and_then(restated) {
                    // Cannot fail: the message is ours, plain ASCII.
                    let _ = cut.add_header(resp.headers_mut());
                    status = Some(cut);
                }
                super::service::count(rpc, status.map_or(tonic::Code::Unknown, |s| s.code()));
            }
            Ok(resp)
        })
    }
}

/// A request body that notes when reading it fails: the client reset its stream or its connection went
/// (a body that merely ends early is the client's malformed request instead).
struct Watched {
    body: Body,
    gone: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &frame {
            self.gone.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// tonic's answer to a request malformed below protobuf, or too large once decompressed, as the module header
/// says it is answered instead.
fn restated(status: &tonic::Status) -> Option<tonic::Status> {
    const CUT: [&str; 2] = ["Missing request message.", "Unexpected EOF decoding stream."];
    let m = status.message();
    if status.code() == tonic::Code::ResourceExhausted && m.starts_with("Error decompressing: size limit") {
        return Some(tonic::Status::out_of_range(m));
    }
    if status.code() != tonic::Code::Internal {
        return None;
    }
    let what = if CUT.contains(&m) {
        format!("the request stream ended before its message was whole ({m})")
    } else if m.starts_with("protocol error: received message with") || m.starts_with("Error decompressing: ") {
        // tonic's decoder words the server's side as the client's ("while sending request").
        m.trim_end_matches(", while sending request").to_string()
    } else {
        return None;
    };
    Some(tonic::Status::invalid_argument(format!("malformed request: {what}")))
}

/// Counts a call whose future was dropped before it was answered, unless its handler took it: CANCELLED, or
/// DEADLINE_EXCEEDED close to its deadline ([`ended_by`]).
struct Left {
    rpc: &'static str,
    seen: HandlerSeen,
    armed: bool,
    timed_out_from: Option<Instant>,
}

impl Drop for Left {
    fn drop(&mut self) {
        if self.armed && !self.seen.0.load(Ordering::Relaxed) {
            super::service::count(self.rpc, ended_by(self.timed_out_from));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only tonic's messages for a stream that ended early or a message it could not unframe are the
    /// client's; any other INTERNAL stays.
    #[test]
    fn tonic_decoding_faults_are_restated_as_the_clients() {
        for m in ["Missing request message.", "Unexpected EOF decoding stream."] {
            let s = restated(&tonic::Status::internal(m)).unwrap();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().starts_with("malformed request: ") && s.message().contains(m), "{s:?}");
        }
        let flag = "protocol error: received message with compressed-flag but no grpc-encoding was specified";
        let s = restated(&tonic::Status::internal(flag)).unwrap();
        assert_eq!(s.message(), format!("malformed request: {flag}"));
        let gz = "Error decompressing: invalid gzip header, while sending request";
        let s = restated(&tonic::Status::internal(gz)).unwrap();
        assert_eq!(s.message(), "malformed request: Error decompressing: invalid gzip header");
        let big = "Error decompressing: size limit, of 65536 bytes, exceeded while decompressing message";
        let s = restated(&tonic::Status::resource_exhausted(big)).unwrap();
        assert_eq!((s.code(), s.message()), (tonic::Code::OutOfRange, big));
        assert!(restated(&tonic::Status::resource_exhausted("queue full")).is_none());
        assert!(restated(&tonic::Status::internal("something else")).is_none());
        assert!(restated(&tonic::Status::cancelled("Missing request message.")).is_none());
    }

    #[test]
    fn paths_map_to_method_labels() {
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/Generate"), "Generate");
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/GenerateStream"), "GenerateStream");
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/Nope"), "unknown");
    }
}
