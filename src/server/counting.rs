//! Counting the LoraServe calls its handlers never see: refused by the API-key interceptor, or failed in
//! tonic's decoding (a message past `--max-request-bytes`, malformed protobuf), or for an unknown method.
//! The handlers count their own calls in `loraserve_requests_total` (service.rs) and mark the request as
//! seen; [`CountUnseen`], wrapped around the whole LoraServe service, counts the rest from the status tonic
//! answered with, so every finished call is counted exactly once: a call left before its message arrived
//! (tonic's timeout answered first, or the client went away) as CANCELLED. A request stream that ends before
//! its message is whole (cut short, or reset by the client mid-upload), which tonic answers INTERNAL, is
//! answered and counted INVALID_ARGUMENT instead: the client's doing, not a server error for the alerts.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

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
    const RPCS: [&str; 5] = ["Generate", "GenerateStream", "ListAdapters", "LoadAdapter", "UnloadAdapter"];
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
{
    type Response = http::Response<B>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let seen = HandlerSeen::default();
        req.extensions_mut().insert(seen.clone());
        let rpc = rpc_label(req.uri().path());
        let call = self.inner.call(req);
        Box::pin(async move {
            // Dropped before the answer (tonic's timeout for the message, the connection gone): counted then.
            let mut left = Left { rpc, seen: seen.clone(), armed: true };
            let mut resp = call.await?;
            left.armed = false;
            if !seen.0.load(Ordering::Relaxed) {
                // Refused before any handler ran: a trailers-only response, its status in the headers.
                let mut status = tonic::Status::from_header_map(resp.headers());
                if let Some(cut) = status.as_ref().and_then(cut_short) {
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

/// tonic's INTERNAL for a request stream that ended before its message was whole, as the client's fault.
fn cut_short(status: &tonic::Status) -> Option<tonic::Status> {
    const CUT: [&str; 2] = ["Missing request message.", "Unexpected EOF decoding stream."];
    (status.code() == tonic::Code::Internal && CUT.contains(&status.message())).then(|| {
        tonic::Status::invalid_argument(format!(
            "malformed request: the request stream ended before its message was whole ({})",
            status.message()
        ))
    })
}

/// Counts a call whose future was dropped before tonic answered it, unless its handler took it.
struct Left {
    rpc: &'static str,
    seen: HandlerSeen,
    armed: bool,
}

impl Drop for Left {
    fn drop(&mut self) {
        if self.armed && !self.seen.0.load(Ordering::Relaxed) {
            super::service::count(self.rpc, tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only tonic's two messages for a stream that ended early are the client's; any other INTERNAL stays.
    #[test]
    fn a_request_cut_short_is_invalid_argument() {
        for m in ["Missing request message.", "Unexpected EOF decoding stream."] {
            let s = cut_short(&tonic::Status::internal(m)).unwrap();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().starts_with("malformed request: ") && s.message().contains(m), "{s:?}");
        }
        assert!(cut_short(&tonic::Status::internal("something else")).is_none());
        assert!(cut_short(&tonic::Status::cancelled("Missing request message.")).is_none());
    }

    #[test]
    fn paths_map_to_method_labels() {
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/Generate"), "Generate");
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/GenerateStream"), "GenerateStream");
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/Nope"), "unknown");
    }
}
