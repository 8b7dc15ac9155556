//! The gRPC listener as tonic takes it: accepted sockets get TCP_NODELAY (tonic's own `serve` sets it, but
//! leaves the sockets of a listener it is handed as they are; without it a message written while earlier
//! data is unacknowledged, such as the first token after the response headers, waits ~40 ms for the
//! client's delayed ACK), and an accept that fails for want of resources (out of file descriptors) pauses
//! the loop instead of spinning: tonic retries such errors at once, logging them only at trace level. Each
//! accepted socket also carries the server's switch ([`Cuttable`]): tonic runs every connection as a task of
//! its own, which a client that stopped reading or holds a health Watch keeps alive, so once the drain is
//! over the server cuts them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// How long accepting pauses after an error that is not about one connection.
const PAUSE: Duration = Duration::from_millis(100);

/// Accepted connections of `listener`, with TCP_NODELAY, each cut when `cut` is cancelled.
pub fn incoming(
    listener: tokio::net::TcpListener,
    cut: CancellationToken,
) -> impl Stream<Item = io::Result<Cuttable<TcpStream>>> + Send + 'static {
    let accepted = Paced::new(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)));
    // A child token each: cancelling the server's reaches every connection, and a connection's polls take
    // only its own token's lock, not one shared by them all.
    accepted.map(move |r| r.map(|socket| Cuttable::new(socket, cut.child_token())))
}

/// A connection the server can end from outside its task: once the switch is cancelled, every read and
/// write fails (the task is woken for it, also while it waits on the socket), so hyper drops the connection
/// and the socket closes. Reading and writing each keep their own wait, as a socket keeps a waker for each.
pub struct Cuttable<T> {
    io: T,
    read_cut: Pin<Box<WaitForCancellationFutureOwned>>,
    write_cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<T> Cuttable<T> {
    pub fn new(io: T, switch: CancellationToken) -> Self {
        let read_cut = Box::pin(switch.clone().cancelled_owned());
        Cuttable { io, read_cut, write_cut: Box::pin(switch.cancelled_owned()) }
    }
}

/// Ready with an error once the switch is cancelled; otherwise registers the task to be woken then.
fn poll_cut(cut: &mut Pin<Box<WaitForCancellationFutureOwned>>, cx: &mut Context<'_>) -> Poll<io::Error> {
    cut.as_mut().poll(cx).map(|()| io::Error::new(io::ErrorKind::ConnectionAborted, "the server closed the connection"))
}

impl<T: AsyncRead + Unpin> AsyncRead for Cuttable<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = poll_cut(&mut self.read_cut, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Cuttable<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = poll_cut(&mut self.write_cut, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = poll_cut(&mut self.write_cut, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = poll_cut(&mut self.write_cut, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Cuttable<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
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

    /// A read waiting on a quiet peer, and a write waiting on a full one, both end when the switch is cut:
    /// the cut wakes the task that waits, and every later call fails too.
    #[tokio::test]
    async fn cutting_ends_waiting_reads_and_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let switch = CancellationToken::new();
        let (ours, mut peer) = tokio::io::duplex(8);
        let mut conn = Cuttable::new(ours, switch.clone());
        conn.write_all(b"12345678").await.unwrap();
        let (mut reader, mut writer) = tokio::io::split(conn);
        let read = tokio::spawn(async move { reader.read(&mut [0; 4]).await });
        let write = tokio::spawn(async move { writer.write_all(b"more").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!read.is_finished() && !write.is_finished(), "both wait on the peer");
        switch.cancel();
        let read = read.await.unwrap().unwrap_err();
        let write = write.await.unwrap().unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(write.kind(), io::ErrorKind::ConnectionAborted);
        let mut got = [0; 8];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"12345678", "what was written before the cut arrived");
    }
}
