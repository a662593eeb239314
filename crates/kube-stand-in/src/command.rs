//! The stand-in's simulated container: what `exec` runs, whatever transport carries it
//! (WebSocket `v5.channel.k8s.io`/`v4.channel.k8s.io` or SPDY/3.1).

use bytes::Bytes;
use tokio::sync::mpsc;

/// Runs `command` as the stand-in's pretend container would and returns its exit code.
///
/// * `cat` copies stdin to stdout until stdin ends (the client closes its stdin stream).
/// * `echo ARGS…` writes the arguments joined by spaces and a newline.
/// * `whoami` writes the user the call was made as (the impersonated user, when present).
/// * `sh -c "exit N"` exits with code N; `false` exits 1; `true` exits 0.
/// * `stderr TEXT` writes TEXT and a newline to stderr.
/// * anything else writes `command not found` to stderr and exits 127.
pub async fn run_command(
    command: &[String],
    user: &str,
    mut stdin: mpsc::Receiver<Bytes>,
    stdout: mpsc::Sender<Bytes>,
    stderr: mpsc::Sender<Bytes>,
) -> i32 {
    let Some(program) = command.first() else {
        let _ = stderr.send(Bytes::from_static(b"no command given\n")).await;
        return 126;
    };
    match program.as_str() {
        "cat" => {
            while let Some(chunk) = stdin.recv().await {
                if stdout.send(chunk).await.is_err() {
                    return 141;
                }
            }
            0
        }
        "echo" => {
            let _ = stdout
                .send(Bytes::from(format!("{}\n", command[1..].join(" "))))
                .await;
            0
        }
        "whoami" => {
            let _ = stdout.send(Bytes::from(format!("{user}\n"))).await;
            0
        }
        "true" => 0,
        "false" => 1,
        "stderr" => {
            let _ = stderr
                .send(Bytes::from(format!("{}\n", command[1..].join(" "))))
                .await;
            0
        }
        "sh" if command.len() == 3 && command[1] == "-c" => {
            match command[2]
                .strip_prefix("exit ")
                .map(|n| n.trim().parse::<i32>())
            {
                Some(Ok(code)) => code,
                _ => {
                    let _ = stderr
                        .send(Bytes::from_static(b"sh: only `exit N` is simulated\n"))
                        .await;
                    2
                }
            }
        }
        other => {
            let _ = stderr
                .send(Bytes::from(format!("{other}: command not found\n")))
                .await;
            127
        }
    }
}
