//! The one module that names the async runtime.
//!
//! async-std is the runtime this project was asked for, but it is discontinued upstream
//! (RUSTSEC-2025-0052; smol, its engine, is the successor). Every runtime-specific call
//! goes through here, so moving to smol is a change to this file alone.

use std::future::Future;
use std::time::Duration;

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
    use std::os::fd::AsRawFd;
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
