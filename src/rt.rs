//! The one module that names the async runtime.
//!
//! async-std is the runtime this project was asked for, but it is discontinued upstream
//! (RUSTSEC-2025-0052; smol, its engine, is the successor). Every runtime-specific call
//! goes through here, so moving to smol is a change to this file alone.

use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};

pub use async_std::net::{TcpListener, TcpStream};
pub use async_std::task::JoinHandle;

/// Runs a future on the runtime's executor.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    async_std::task::spawn(future)
}

/// Runs one of a connection's two tasks: on the same executor as [`spawn`]
/// (async-global-executor, async-std's own), without the task-locals wrapper async-std
/// puts around every task, which nothing here uses and which cost each idle
/// connection 96 bytes. Like [`spawn`]'s handle, dropping the handle lets the task
/// run on: a reader that panics must not take its writer down before the writer has
/// handed the broker what it never wrote.
pub fn spawn_conn<F>(future: F) -> ConnTask<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    // The executor as async-std configures it (its thread count, its threads' names),
    // even when a connection's task is the process's first.
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| drop(async_std::task::spawn(async {})));
    ConnTask(Some(async_global_executor::spawn(future)))
}

/// A task from [`spawn_conn`]: awaited for its output, or dropped to let it run on.
pub struct ConnTask<T>(Option<async_global_executor::Task<T>>);

impl<T> Future for ConnTask<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.0.as_mut() {
            Some(task) => Pin::new(task).poll(cx),
            // Only a dropped handle has no task, and nothing polls it then.
            None => Poll::Pending,
        }
    }
}

impl<T> Drop for ConnTask<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.detach();
        }
    }
}

/// Runs blocking work (a file written and synced) on a thread where it holds up no
/// task, and waits for it.
pub async fn spawn_blocking<F, T>(f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    async_std::task::spawn_blocking(f).await
}

/// Drives a future to completion on the current thread (the binaries' `main`).
pub fn block_on<F: Future>(future: F) -> F::Output {
    async_std::task::block_on(future)
}

/// `None` when `future` did not finish within `limit`.
pub async fn timeout<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    async_std::future::timeout(limit, future).await.ok()
}

pub async fn sleep(duration: Duration) {
    async_std::task::sleep(duration).await
}

/// Lets socket2 set options on an async-std socket.
#[cfg(unix)]
pub fn with_socket<R>(stream: &TcpStream, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: async-std's TcpStream implements AsRawFd but not AsFd. The descriptor
    // stays open while `stream` is borrowed, which outlasts this call.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    f(socket2::SockRef::from(&fd))
}

/// True when the peer has closed its side (or the socket failed). Data written after
/// that would be lost in a socket nobody reads, so writers check before writing frames
/// that must not be lost.
#[cfg(target_os = "linux")]
pub fn peer_closed(stream: &TcpStream) -> bool {
    fd_peer_closed(stream)
}

#[cfg(target_os = "linux")]
fn fd_peer_closed(stream: &impl std::os::fd::AsRawFd) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; poll only reads and writes that struct.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(not(target_os = "linux"))]
pub fn peer_closed(_stream: &TcpStream) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
fn fd_peer_closed<T>(_stream: &T) -> bool {
    false
}

/// A plain TCP connection the server accepted, on async-std's own reactor (async-io)
/// without async-std's wrapper, which does not let a read wait for readiness first.
/// Its writes are as async-std's; its reads go through [`ConnReader`].
#[derive(Clone)]
pub struct Conn(Arc<ConnIo>);

struct ConnIo {
    io: async_io::Async<std::net::TcpStream>,
    /// The last read emptied the socket, or was refused (only its reader reads it:
    /// here rather than in the reader, so that both handles are one pointer, as
    /// async-std's are, and an idle connection's tasks no larger).
    drained: AtomicBool,
}

impl Conn {
    /// Takes over a connection just accepted (nothing else may hold a clone of it).
    pub fn adopt(stream: TcpStream) -> io::Result<Conn> {
        let stream = std::net::TcpStream::try_from(stream)?;
        Ok(Conn(Arc::new(ConnIo {
            io: async_io::Async::new(stream)?,
            drained: AtomicBool::new(false),
        })))
    }

    /// The connection's read side: one per connection (two would share its flag and
    /// its reactor's one reader's place).
    pub(crate) fn reader(&self) -> ConnReader {
        ConnReader(self.0.clone())
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        self.0.io.get_ref().shutdown(how)
    }

    /// See [`peer_closed`].
    pub fn peer_closed(&self) -> bool {
        fd_peer_closed(self.0.io.get_ref())
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &self.0.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &self.0.io).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &self.0.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &self.0.io).poll_close(cx)
    }
}

/// The read side of a [`Conn`]. After a read that found less than it had room for,
/// the socket is empty: the next read waits for readiness before it asks, rather than
/// asking first and hearing "would block". With async-std's reads, a client sending a
/// frame at a time cost the server two such refused reads per frame (the second
/// because the reactor's last event still counts as news); tokio clears readiness on
/// a short read for the same reason.
pub struct ConnReader(Arc<ConnIo>);

impl ConnReader {
    #[cfg(test)]
    fn drained(&self) -> bool {
        self.0.drained.load(Ordering::Relaxed)
    }
}

impl AsyncRead for ConnReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let conn = &*self.0;
        loop {
            if conn.drained.load(Ordering::Relaxed) {
                ready!(conn.io.poll_readable(cx))?;
                conn.drained.store(false, Ordering::Relaxed);
            }
            match conn.io.get_ref().read(buf) {
                Ok(n) => {
                    let drained = n > 0 && n < buf.len();
                    conn.drained.store(drained, Ordering::Relaxed);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.drained.store(true, Ordering::Relaxed)
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::{AsyncReadExt, FutureExt};

    use super::*;

    /// A connected pair: the client's std socket, and the server's side adopted.
    fn pair() -> (std::net::TcpStream, Conn) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let conn = Conn::adopt(TcpStream::from(accepted)).expect("adopt");
        (client, conn)
    }

    #[test]
    fn a_short_read_waits_for_readiness_and_misses_nothing_sent_after_it() {
        let (mut client, conn) = pair();
        let mut reader = conn.reader();
        block_on(async {
            client.write_all(b"abc").expect("write");
            let mut buf = [0u8; 16];
            let n = reader.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], b"abc");
            assert!(
                reader.drained(),
                "a read shorter than its buffer emptied the socket"
            );
            // Sent once the reader waits for readiness: it must wake for it.
            let mut read = reader.read(&mut buf);
            assert!((&mut read).now_or_never().is_none(), "nothing there yet");
            client.write_all(b"defgh").expect("write");
            let n = timeout(Duration::from_secs(10), read)
                .await
                .expect("the reader woke for what came later")
                .expect("read");
            assert_eq!(&buf[..n], b"defgh");
            // A read that fills its buffer does not wait: what is left comes at once.
            client.write_all(b"0123456789").expect("write");
            let mut all = Vec::new();
            let mut small = [0u8; 4];
            while all.len() < 10 {
                let n = reader.read(&mut small).await.expect("read");
                if n == small.len() {
                    assert!(!reader.drained());
                }
                all.extend_from_slice(&small[..n]);
            }
            assert_eq!(all, b"0123456789");
            drop(client);
            assert_eq!(
                reader.read(&mut buf).await.expect("end"),
                0,
                "end of stream"
            );
        });
    }
}
