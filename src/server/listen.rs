//! The gRPC listener as tonic takes it: accepted sockets get TCP_NODELAY (tonic's own `serve` sets it, but
//! leaves the sockets of a listener it is handed as they are; without it a message written while earlier
//! data is unacknowledged, such as the first token after the response headers, waits ~40 ms for the
//! client's delayed ACK), and an accept that fails for want of resources (out of file descriptors) pauses
//! the loop instead of spinning: tonic retries such errors at once, logging them only at trace level.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tokio_stream::Stream;

/// How long accepting pauses after an error that is not about one connection.
const PAUSE: Duration = Duration::from_millis(100);

/// Accepted connections of `listener`, with TCP_NODELAY.
pub fn incoming(listener: tokio::net::TcpListener) -> Paced<tonic::transport::server::TcpIncoming> {
    Paced::new(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
}

/// A stream of accepted connections that pauses after an error that is not about one connection (which
/// retrying at once would repeat: EMFILE, ENFILE, ENOBUFS), logging it as a warning.
pub struct Paced<S> {
    inner: S,
    pause: Option<Pin<Box<Sleep>>>,
}

impl<S> Paced<S> {
    pub fn new(inner: S) -> Self {
        Paced { inner, pause: None }
    }
}

/// Errors about the one connection being accepted: the next accept may well succeed.
fn about_one_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock | TimedOut)
}

impl<S, T> Stream for Paced<S>
where
    S: Stream<Item = std::io::Result<T>> + Unpin,
{
    type Item = std::io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = &mut self.pause {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Err(e)) if !about_one_connection(&e) => {
                    tracing::warn!(error = %e, pause_ms = PAUSE.as_millis() as u64, "accepting a connection failed (out of file descriptors? raise `ulimit -n`)");
                    self.pause = Some(Box::pin(tokio::time::sleep(PAUSE)));
                }
                other => return Poll::Ready(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn a_resource_error_pauses_accepting_and_a_connection_error_does_not() {
        let emfile = || Err(std::io::Error::from_raw_os_error(24)); // EMFILE
        let reset = || Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let items: Vec<std::io::Result<u32>> = vec![emfile(), emfile(), Ok(1), reset(), Ok(2)];
        let mut s = Paced::new(tokio_stream::iter(items));
        let start = tokio::time::Instant::now();
        assert_eq!(s.next().await.unwrap().unwrap(), 1, "resource errors are not passed on");
        assert_eq!(start.elapsed(), 2 * PAUSE, "one pause per resource error");
        assert!(s.next().await.unwrap().is_err(), "a connection's error is passed on, for tonic to skip");
        assert_eq!(s.next().await.unwrap().unwrap(), 2);
        assert_eq!(start.elapsed(), 2 * PAUSE, "and costs no pause");
        assert!(s.next().await.is_none());
    }
}
