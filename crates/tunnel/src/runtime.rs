//! The tokio runtime both binaries run on.
//!
//! One worker per CPU the process may use, as tokio's default: `TOKIO_WORKER_THREADS`
//! when set, else [`std::thread::available_parallelism`], which follows the cgroup's
//! CPU quota (both Deployments limit their pod to one CPU). Where that is one, the
//! runtime is tokio's current-thread scheduler instead of a work-stealing one with a
//! single worker: with nobody to steal from, the work-stealing scheduler's queues,
//! searching and parking protocol only cost (BENCHMARKS.md, "One CPU: the current-thread
//! runtime"). linkerd2-proxy (its `linkerd2-proxy/src/rt.rs`) makes the same
//! choice, for the same reason: its threaded scheduler "would provide no benefit".

use std::env::{self, VarError};
use std::io;
use std::num::NonZeroUsize;

/// The variable tokio itself reads for its worker count, honoured the same way.
const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

/// Builds the runtime (I/O and time drivers on): current-thread for one worker,
/// multi-threaded otherwise.
///
/// # Errors
///
/// `TOKIO_WORKER_THREADS` that is not a positive integer, or tokio failing to start.
pub fn build() -> io::Result<tokio::runtime::Runtime> {
    let workers = worker_threads(env::var(WORKER_THREADS), || {
        std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
    })?;
    with_workers(workers)
}

/// A runtime of `workers` workers: current-thread for one.
fn with_workers(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    // One decision, so that the line the tests read says what was built.
    let (scheduler, mut builder) = if workers == 1 {
        (
            "current-thread",
            tokio::runtime::Builder::new_current_thread(),
        )
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        ("multi-thread", builder)
    };
    tracing::info!(workers, scheduler, "tokio runtime");
    builder.enable_all().build()
}

/// The worker count from the variable's value, or from `cpus` when it is not set. tokio
/// panics on a bad value; a binary says so and exits.
fn worker_threads(
    var: Result<String, VarError>,
    cpus: impl FnOnce() -> usize,
) -> io::Result<usize> {
    let invalid = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{WORKER_THREADS}: {what}"),
        )
    };
    match var {
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(0) => Err(invalid("must be at least 1".to_owned())),
            Ok(n) => Ok(n),
            Err(e) => Err(invalid(format!(
                "{value:?} is not a number of threads: {e}"
            ))),
        },
        Err(VarError::NotPresent) => Ok(cpus().max(1)),
        Err(VarError::NotUnicode(value)) => Err(invalid(format!("{value:?} is not UTF-8"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_variable_wins_over_the_cpus_and_bad_values_are_refused() {
        assert_eq!(worker_threads(Ok("3".into()), || 8).unwrap(), 3);
        assert_eq!(worker_threads(Ok(" 1\n".into()), || 8).unwrap(), 1);
        assert_eq!(worker_threads(Err(VarError::NotPresent), || 8).unwrap(), 8);
        assert_eq!(worker_threads(Err(VarError::NotPresent), || 0).unwrap(), 1);
        for bad in ["0", "", "two", "-1"] {
            let e = worker_threads(Ok(bad.into()), || 8).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().starts_with(WORKER_THREADS), "{e}");
        }
    }

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        for (workers, flavor) in [
            (1, tokio::runtime::RuntimeFlavor::CurrentThread),
            (2, tokio::runtime::RuntimeFlavor::MultiThread),
        ] {
            let runtime = with_workers(workers).unwrap();
            assert_eq!(runtime.handle().runtime_flavor(), flavor);
            assert_eq!(runtime.metrics().num_workers(), workers);
            // Both drivers are on: a timer and a socket work inside it.
            runtime.block_on(async {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            });
        }
    }
}
