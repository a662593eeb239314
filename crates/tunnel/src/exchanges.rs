//! The exchanges in flight on a session, as the proxies on either side count them.
//!
//! An exchange is a request and its response, from the request's first byte to the
//! response body's end, on a stream of its own (the agent's HTTP/1.1 streams, the
//! server's pooled ones; upgrades until they close). The session's flush reads the count
//! ([`crate::coalesce`]): with a second exchange in flight, another stream may write in
//! the same turn of the worker, so a due flush waits for the turn's end and takes its
//! frames along; with one or none, nothing is coming, and waiting would only cost the
//! lone request a second poll of the driver, the worker's look for I/O, and with two or
//! more workers the wake-up of a sleeping one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The count of one session's exchanges in flight ([`crate::SessionHandle::exchanges`]).
#[derive(Clone, Debug, Default)]
pub struct Exchanges(Arc<AtomicUsize>);

impl Exchanges {
    /// Counts an exchange in flight until the returned guard is dropped.
    pub fn begin(&self) -> Exchange {
        self.0.fetch_add(1, Ordering::Relaxed);
        Exchange(self.0.clone())
    }

    /// Whether more than one exchange is in flight. A hint: read without ordering, as
    /// a count off by one for an instant costs one flush its batching or its haste.
    pub(crate) fn several(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 1
    }
}

/// An exchange counted in [`Exchanges`] while it lives.
#[derive(Debug)]
pub struct Exchange(Arc<AtomicUsize>);

impl Drop for Exchange {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
