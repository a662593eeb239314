// Tower's patch (not in upstream yamux): frame bodies kept for reuse.

//! Frame bodies kept for reuse, so that a bulk transfer does not allocate and free a
//! large body per frame.
//!
//! Each data frame's body used to be a fresh `vec![0; len]` on the reading side, freed
//! once the stream's reader had taken it. At 64 KiB a frame, glibc's `free` of such a
//! chunk consolidates the heap and, with its default 128 KiB trim threshold, hands the
//! top of the heap back to the kernel, so the next body faults its pages in again and
//! `calloc` zeroes them: a tenth or more of a receiving tunnel end's CPU during a
//! download (BENCHMARKS.md, "Frame bodies reused"). A small pool of spent bodies, shared
//! by the process's connections, takes that away. Its memory is bounded: at most
//! [`KEEP`] bodies of at most [`LARGEST`] bytes each.
//!
//! A body taken from the pool still holds an earlier frame's bytes. Every user
//! overwrites all of it before it is read: the frame reader reads the whole body into it
//! before the frame exists, the writer clears it and extends it with the data it sends.

use parking_lot::Mutex;

/// Bodies smaller than this come from the allocator as before: its small bins are cheap,
/// and a small body can sit in a slow stream's buffer for long.
const SMALLEST: usize = 16 * 1024;
/// The largest body kept (Tower's tunnel writes frames of at most 64 KiB).
const LARGEST: usize = 64 * 1024;
/// How many bodies the pool keeps at most: 1 MiB at [`LARGEST`].
const KEEP: usize = 16;

static SPARE: Pool = Pool::new();

/// A body for a frame of `len` bytes that its caller will overwrite whole: `len` bytes
/// long, from the pool when it has one.
pub(crate) fn body(len: usize) -> Vec<u8> {
    SPARE.body(len)
}

/// An empty body with room for `len` bytes, from the pool when it has one.
pub(crate) fn empty(len: usize) -> Vec<u8> {
    SPARE.empty(len)
}

/// Gives a spent body back for reuse, or drops it if it is not of a size the pool keeps
/// or the pool is full.
pub(crate) fn recycle(body: Vec<u8>) {
    SPARE.recycle(body)
}

struct Pool {
    bodies: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    const fn new() -> Self {
        Pool {
            bodies: parking_lot::const_mutex(Vec::new()),
        }
    }

    fn body(&self, len: usize) -> Vec<u8> {
        match self.spare(len) {
            Some(mut body) => {
                body.resize(len, 0);
                body
            }
            None => vec![0; len],
        }
    }

    fn empty(&self, len: usize) -> Vec<u8> {
        match self.spare(len) {
            Some(mut body) => {
                body.clear();
                body
            }
            None => Vec::with_capacity(len),
        }
    }

    fn spare(&self, len: usize) -> Option<Vec<u8>> {
        if !(SMALLEST..=LARGEST).contains(&len) {
            return None;
        }
        self.bodies.lock().pop().filter(|body| body.capacity() >= len)
    }

    fn recycle(&self, body: Vec<u8>) {
        if !(SMALLEST..=LARGEST).contains(&body.capacity()) {
            return;
        }
        let mut bodies = self.bodies.lock();
        if bodies.len() < KEEP {
            bodies.push(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_body_is_reused() {
        let pool = Pool::new();
        let mut body = pool.body(LARGEST);
        assert_eq!(body.len(), LARGEST);
        body.fill(7);
        let at = body.as_ptr();
        pool.recycle(body);

        // Cut to the frame's length, still holding the old bytes: the caller's to
        // overwrite whole, as the frame reader does.
        let again = pool.body(SMALLEST);
        assert_eq!((again.as_ptr(), again.len()), (at, SMALLEST));
        assert!(again.iter().all(|&b| b == 7));
        pool.recycle(again);

        let again = pool.empty(SMALLEST);
        assert_eq!(again.as_ptr(), at);
        assert!(again.is_empty() && again.capacity() >= LARGEST);
    }

    #[test]
    fn the_pool_keeps_only_mid_sized_bodies_and_only_so_many() {
        let pool = Pool::new();
        pool.recycle(Vec::with_capacity(SMALLEST - 1));
        pool.recycle(Vec::with_capacity(LARGEST * 2));
        assert!(pool.bodies.lock().is_empty());

        for _ in 0..KEEP * 2 {
            pool.recycle(Vec::with_capacity(LARGEST));
        }
        assert_eq!(pool.bodies.lock().len(), KEEP);
        // Small and oversized frames never take one.
        assert!(pool.spare(SMALLEST - 1).is_none());
        assert!(pool.spare(LARGEST + 1).is_none());
        assert_eq!(pool.bodies.lock().len(), KEEP);
        // A spare too small for the frame is dropped, not handed out short.
        let pool = Pool::new();
        pool.recycle(Vec::with_capacity(SMALLEST));
        assert!(pool.spare(LARGEST).is_none());
        assert!(pool.bodies.lock().is_empty());
    }
}
