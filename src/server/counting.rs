//! Counting the LoraServe calls its handlers never see: refused by the API-key interceptor, or failed in
//! tonic's decoding (a message past `--max-request-bytes`, malformed protobuf), or for an unknown method.
//! The handlers count their own calls in `loraserve_requests_total` (service.rs) and mark the request as
//! seen; [`CountUnseen`], wrapped around the whole LoraServe service, counts the rest from the status tonic
//! answered with, so every finished call is counted exactly once.

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
            let resp = call.await?;
            if !seen.0.load(Ordering::Relaxed) {
                // Refused before any handler ran: a trailers-only response, its status in the headers.
                let code = tonic::Status::from_header_map(resp.headers()).map_or(tonic::Code::Unknown, |s| s.code());
                super::service::count(rpc, code);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_method_labels() {
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/Generate"), "Generate");
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/GenerateStream"), "GenerateStream");
        assert_eq!(rpc_label("/loraserve.v1.LoraServe/Nope"), "unknown");
    }
}
