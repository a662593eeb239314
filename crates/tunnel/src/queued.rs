//! What a session's streams have written that yamux has not yet sent, bounded.
//!
//! yamux copies every stream write into a frame and queues it until the session's driver
//! writes it out. A stream may queue as much as its send window (256 KiB, more once
//! yamux widened it) and nothing bounds the sum: 500 downloads starting at once held
//! 90 MiB of frames in the agent (heaptrack), however slowly their callers read. So a
//! [`TunnelStream`](crate::TunnelStream) write first takes a permit per byte from its
//! session's [`Queued`] (a FIFO semaphore of [`QUEUE_LIMIT`] permits: no writer starves,
//! the control stream's pongs included), and the socket side gives them back as the DATA
//! bytes leave yamux ([`crate::frames`]).

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Most bytes a session's streams may have queued in yamux: a few milliseconds of the
/// socket's throughput, the same for any number of streams.
pub(crate) const QUEUE_LIMIT: usize = 1024 * 1024;

/// The permits of one session's queue: one per byte that may still be queued.
#[derive(Debug, Clone)]
pub(crate) struct Queued(Arc<Semaphore>);

impl Default for Queued {
    fn default() -> Self {
        Queued(Arc::new(Semaphore::new(QUEUE_LIMIT)))
    }
}

impl Queued {
    /// The semaphore, for a stream's [`tokio_util::sync::PollSemaphore`].
    pub(crate) fn semaphore(&self) -> Arc<Semaphore> {
        self.0.clone()
    }

    /// yamux sent `n` bytes of stream data: their permits come back.
    pub(crate) fn sent(&self, n: usize) {
        if n > 0 {
            self.0.add_permits(n);
        }
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        QUEUE_LIMIT.saturating_sub(self.0.available_permits())
    }
}
