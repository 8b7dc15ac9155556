//! When each call arrived, for `grpc-timeout`. tonic enforces that header itself with a timer it starts
//! as the call comes in, answering CANCELLED ("Timeout expired") when it fires; the handlers end a call a
//! little earlier with the accurate DEADLINE_EXCEEDED, so their deadline must count from no later than
//! tonic's start. [`StampArrival`] is a layer of the whole server: tonic calls it right before it starts
//! its timer (the route services behind it are called later, when the call's task first runs, which a busy
//! machine can delay past the margin).

use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::{http, Service};

/// When the call reached the server: set on every request's extensions by [`StampArrival`].
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub Instant);

/// The layer (`Server::builder().layer(StampArrival)`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StampArrival;

impl<S> tower_layer::Layer<S> for StampArrival {
    type Service = Stamped<S>;

    fn layer(&self, inner: S) -> Stamped<S> {
        Stamped { inner }
    }
}

/// A service whose requests [`StampArrival`] stamps.
#[derive(Clone, Debug)]
pub struct Stamped<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Stamped<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(Arrival(Instant::now()));
        self.inner.call(req)
    }
}
