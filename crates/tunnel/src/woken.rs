//! A future that is polled again only once it has woken its task.
//!
//! A task that waits for several things at once (`tokio::select!`, or a poll that checks
//! a cancellation besides its I/O) polls every one of them each time any of them wakes
//! it. Most of those polls find nothing: a session's close, a server's drain or a tunnel's
//! end fire once in a long while. tokio-util's `WaitForCancellationFuture` pays two locks
//! for each such poll (the token's `is_cancelled` and `Notify`'s waiter list), about 300
//! instructions; a small request polled them about eight times on each side (counted with
//! callgrind, benches/reference/counts.sh; BENCHMARKS.md, "Cancellations polled only when
//! they fire").
//!
//! [`WokenOnly`] gives its future a waker of its own, which records that the future woke,
//! then wakes the task. A later poll goes to the future only when it did; otherwise it
//! costs a comparison of wakers and one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

pin_project_lite::pin_project! {
    /// `future`, polled only when it woke its task (and on the first poll).
    pub struct WokenOnly<F> {
        #[pin]
        future: F,
        gate: Arc<Gate>,
        // The task waker the gate holds, compared with each poll's (`will_wake`) without
        // taking the gate's lock.
        task: Option<Waker>,
        // Once ready, ready at every poll after (as a cancellation stays cancelled).
        done: bool,
    }
}

/// What the future's waker does: note that it woke, then wake the task.
struct Gate {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before the task is woken: the poll it leads to sees it.
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = &*task {
            task.wake_by_ref();
        }
    }
}

/// `future`, polled only when it woke its task. For signals that are polled far more
/// often than they fire, such as a cancellation watched beside a connection's I/O; once
/// fired, it stays ready.
pub fn woken_only<F: Future<Output = ()>>(future: F) -> WokenOnly<F> {
    let gate = Arc::new(Gate {
        // The first poll goes through: it registers the gate's waker.
        woken: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    WokenOnly {
        future,
        gate,
        task: None,
        done: false,
    }
}

impl<F: Future<Output = ()>> Future for WokenOnly<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(());
        }
        // The task to wake comes first, so a wake after the check below finds it.
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *this.gate.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            *this.task = Some(waker);
        }
        if !this.gate.woken.load(Ordering::Acquire)
            || !this.gate.woken.swap(false, Ordering::AcqRel)
        {
            return Poll::Pending;
        }
        // The gate's waker, made for the few polls that go through (kept, it would be
        // 16 bytes more in every future that holds one of these).
        let gate = Waker::from(this.gate.clone());
        let polled = this.future.poll(&mut Context::from_waker(&gate));
        *this.done = polled.is_ready();
        polled
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio_util::sync::CancellationToken;

    /// A future that counts its polls and is pending until `ready`, waking the last
    /// waker it was given when made ready.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Probe {
        fn fire(&self) {
            self.ready.store(true, Ordering::Release);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    struct Polled(Arc<Probe>);

    impl Future for Polled {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::Relaxed);
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.0.ready.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Counts the wakes of a task.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Polls `future` as `task` would.
    fn poll_as<F: Future>(future: Pin<&mut F>, task: &Arc<Task>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(&Waker::from(task.clone())))
    }

    #[test]
    fn polls_its_future_only_after_the_future_woke_the_task() {
        let probe = Arc::new(Probe::default());
        let task = Arc::new(Task::default());
        let mut gated = std::pin::pin!(woken_only(Polled(probe.clone())));

        // The first poll registers; polls woken by something else do not reach it.
        for _ in 0..5 {
            assert!(poll_as(gated.as_mut(), &task).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::Relaxed), 1);

        // Its wake reaches the task, and the next poll reaches the future.
        probe.fire();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        assert!(poll_as(gated.as_mut(), &task).is_ready());
        assert_eq!(probe.polls.load(Ordering::Relaxed), 2);
        // And stays ready, as a cancellation does.
        assert!(poll_as(gated.as_mut(), &task).is_ready());
        assert_eq!(probe.polls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_wake_goes_to_the_task_that_polled_last() {
        let probe = Arc::new(Probe::default());
        let (first, second) = (Arc::new(Task::default()), Arc::new(Task::default()));
        let mut gated = std::pin::pin!(woken_only(Polled(probe.clone())));
        assert!(poll_as(gated.as_mut(), &first).is_pending());
        assert!(poll_as(gated.as_mut(), &second).is_pending());
        probe.fire();
        assert_eq!(first.0.load(Ordering::Relaxed), 0);
        assert_eq!(second.0.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_cancellation_watched_beside_busy_work_still_ends_it() {
        let token = CancellationToken::new();
        let cancelled = woken_only(token.clone().cancelled_owned());
        tokio::pin!(cancelled);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let canceller = {
            let token = token.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    tx.send(i).unwrap();
                    tokio::task::yield_now().await;
                }
                token.cancel();
                // Holds the channel open: only the cancellation can end the loop below.
                std::future::pending::<()>().await;
            })
        };
        let mut received = 0;
        // A lost wake would leave the loop waiting: bounded, so the test fails instead.
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    biased;
                    Some(_) = rx.recv() => received += 1,
                    () = &mut cancelled => break,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the cancellation was never seen");
        assert_eq!(received, 100);
        canceller.abort();
    }
}
