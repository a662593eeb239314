//! The signals that start a binary's graceful shutdown.

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` at SIGTERM (what Kubernetes sends a pod) or SIGINT. The handlers are
/// installed when this returns, so a binary calls it before the line on stdout that tells
/// a parent (a test, a script) it may signal: a signal before them would kill the process
/// instead of draining it. Must be called within a tokio runtime.
pub fn cancel_on_signal(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    /// A signal sent right after the call is caught, not fatal: were the handler installed
    /// later (in the spawned task), SIGINT's default action would end this test process.
    #[tokio::test]
    async fn a_signal_right_after_the_call_cancels_instead_of_killing() {
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone()).unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
            .await
            .expect("SIGINT cancels the token");
    }
}
