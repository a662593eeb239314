//! The registry of open connections, so that [`crate::StandIn::drop_connections`] can cut
//! them all at once, whoever owns them by then (hyper, or an exec/port-forward session that
//! took over an upgraded connection).
//!
//! Each accepted socket is shared between its connection and the registry (one descriptor
//! per connection, so a stand-in under a 20,000 descriptor limit can serve ~19,900
//! connections); cutting calls `shutdown(Both)` on it. The peers see the TCP connection end
//! without a TLS `close_notify` (a watch ends mid-chunked-body), and the stand-in's own
//! reads and writes fail, so every task serving a cut connection ends on its own.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Every open connection, by id.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<TcpStream>>>,
}

impl Connections {
    /// Registers an accepted socket; it stays registered until the returned stream drops.
    pub(crate) fn register(self: &Arc<Self>, tcp: TcpStream) -> TrackedStream {
        let tcp = Arc::new(tcp);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, tcp.clone());
        TrackedStream {
            tcp,
            id,
            registry: self.clone(),
        }
    }

    /// Shuts down every registered connection (both directions) at once.
    pub(crate) fn cut_all(&self) {
        let open = self.lock();
        for tcp in open.values() {
            // A socket the peer already closed may refuse; it is going away anyway.
            let _ = SockRef::from(tcp.as_ref()).shutdown(Shutdown::Both);
        }
        tracing::debug!(connections = open.len(), "cut every open connection");
    }

    /// How many connections are registered.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<TcpStream>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An accepted TCP stream that is registered in [`Connections`] while it lives.
#[derive(Debug)]
pub(crate) struct TrackedStream {
    tcp: Arc<TcpStream>,
    id: u64,
    registry: Arc<Connections>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        // The registry's is the last other reference: the socket closes with this.
        self.registry.lock().remove(&self.id);
    }
}

/// Retries `op` until the socket stops saying it would block.
fn retry<T>(
    cx: &mut Context<'_>,
    mut ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut op: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        ready!(ready(cx))?;
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.tcp;
        let n = ready!(retry(
            cx,
            |cx| tcp.poll_read_ready(cx),
            || tcp.try_read(buf.initialize_unfilled())
        ))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.tcp;
        retry(cx, |cx| tcp.poll_write_ready(cx), || tcp.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.tcp;
        retry(
            cx,
            |cx| tcp.poll_write_ready(cx),
            || tcp.try_write_vectored(bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(self.tcp.as_ref()).shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn cut_all_ends_both_sides_and_drop_unregisters() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let registry = Arc::new(Connections::default());
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let mut server = registry.register(accepted);
        assert_eq!(registry.len(), 1);

        server.write_all(b"hi").await.expect("write");
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hi");

        registry.cut_all();
        // The peer sees the end of the stream, the server side's own reads end too.
        assert_eq!(client.read(&mut buf).await.expect("eof"), 0);
        assert_eq!(server.read(&mut buf).await.expect("eof"), 0);
        drop(server);
        assert_eq!(registry.len(), 0);
    }
}
