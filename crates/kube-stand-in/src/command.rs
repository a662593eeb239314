//! The stand-in's simulated container: what `exec` runs, whatever transport carries it
//! (WebSocket `v5.channel.k8s.io`/`v4.channel.k8s.io` or SPDY/3.1).

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::files::{self, PodFiles, TarCommand};

/// The largest archive `tar -x` takes from stdin: the files live in memory.
const MAX_ARCHIVE: usize = 256 << 20;
/// How much of an archive goes into one stdout chunk.
const STDOUT_CHUNK: usize = 64 << 10;

/// Runs `command` as the stand-in's pretend container would and returns its exit code.
///
/// * `cat` copies stdin to stdout until stdin ends (the client closes its stdin stream).
/// * `echo ARGS…` writes the arguments joined by spaces and a newline.
/// * `whoami` writes the user the call was made as (the impersonated user, when present).
/// * `sh -c "exit N"` exits with code N; `false` exits 1; `true` exits 0.
/// * `stderr TEXT` writes TEXT and a newline to stderr.
/// * `tar` as `kubectl cp` runs it, on the pod's `files`: `tar -x` (e.g.
///   `tar --no-same-permissions --no-same-owner -xmf - -C DIR`) reads an archive from stdin
///   and stores its regular files and directories under DIR; `tar -c` (`tar cf - PATH…`,
///   `-C DIR` allowed before a PATH) writes an archive of the PATHs to stdout, and for a
///   missing one `tar: PATH: Cannot stat: No such file or directory` on stderr and exit 2.
///   The archive is always `-f -`; messages and exit codes are GNU tar's.
/// * `test -d|-e|-f PATH` (kubectl cp asks `test -d` of its destination) exits 0 or 1.
/// * anything else writes `command not found` to stderr and exits 127.
pub async fn run_command(
    command: &[String],
    user: &str,
    files: &PodFiles,
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
        "tar" => tar(&command[1..], files, stdin, &stdout, &stderr).await,
        "test" => match &command[1..] {
            [flag, path] if flag == "-d" => i32::from(!files.is_dir(path)),
            [flag, path] if flag == "-f" => i32::from(!files.is_file(path)),
            [flag, path] if flag == "-e" => i32::from(!files.is_dir(path) && !files.is_file(path)),
            _ => {
                let _ = stderr
                    .send(Bytes::from_static(
                        b"test: only `test -d|-e|-f PATH` is simulated\n",
                    ))
                    .await;
                2
            }
        },
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

/// `tar` on the pod's files; see [`run_command`].
async fn tar(
    args: &[String],
    files: &PodFiles,
    mut stdin: mpsc::Receiver<Bytes>,
    stdout: &mpsc::Sender<Bytes>,
    stderr: &mpsc::Sender<Bytes>,
) -> i32 {
    let outcome = match TarCommand::parse(args) {
        Err(message) => {
            let _ = stderr.send(Bytes::from(format!("tar: {message}\n"))).await;
            return 2;
        }
        Ok(TarCommand::Extract { directory }) => {
            let mut archive = BytesMut::new();
            while let Some(chunk) = stdin.recv().await {
                if archive.len() + chunk.len() > MAX_ARCHIVE {
                    let message = format!(
                        "tar: the stand-in takes archives of at most {} MiB\n",
                        MAX_ARCHIVE >> 20
                    );
                    let _ = stderr.send(Bytes::from(message)).await;
                    return 2;
                }
                archive.extend_from_slice(&chunk);
            }
            files::extract(files, &directory, &archive)
        }
        Ok(TarCommand::Create { members }) => {
            let (archive, outcome) = files::create(files, &members);
            // GNU tar reports as it goes and writes the archive's last record (all of it,
            // for a missing file: the end-of-archive blocks) when it closes, so the
            // messages come first.
            if !outcome.stderr.is_empty() {
                let _ = stderr.send(Bytes::from(outcome.stderr)).await;
            }
            let archive = Bytes::from(archive);
            for start in (0..archive.len()).step_by(STDOUT_CHUNK) {
                let end = (start + STDOUT_CHUNK).min(archive.len());
                if stdout.send(archive.slice(start..end)).await.is_err() {
                    return 141;
                }
            }
            return outcome.code;
        }
    };
    if !outcome.stderr.is_empty() {
        let _ = stderr.send(Bytes::from(outcome.stderr)).await;
    }
    outcome.code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::tests::listing;

    /// Runs `line` (split on spaces) with `input` on stdin; returns (code, stdout, stderr).
    async fn run(files: &PodFiles, line: &str, input: &[u8]) -> (i32, Vec<u8>, String) {
        let command: Vec<String> = line.split(' ').map(str::to_owned).collect();
        let (stdin_tx, stdin_rx) = mpsc::channel(16);
        let (stdout_tx, stdout_rx) = mpsc::channel(16);
        let (stderr_tx, stderr_rx) = mpsc::channel(16);
        let input = Bytes::copy_from_slice(input);
        let feed = async move {
            // In chunks, as a transport delivers them.
            for start in (0..input.len()).step_by(10_000) {
                let end = (start + 10_000).min(input.len());
                stdin_tx.send(input.slice(start..end)).await.expect("stdin");
            }
        };
        let (code, (), out, err) = tokio::join!(
            run_command(&command, "tester", files, stdin_rx, stdout_tx, stderr_tx),
            feed,
            drain(stdout_rx),
            drain(stderr_rx),
        );
        (code, out, String::from_utf8(err).expect("utf-8 stderr"))
    }

    async fn drain(mut output: mpsc::Receiver<Bytes>) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = output.recv().await {
            all.extend_from_slice(&chunk);
        }
        all
    }

    /// What `kubectl cp LOCAL pod:/tmp/upload.bin` sends: the file named by its destination's
    /// base name, from Go's archive/tar (ustar headers).
    fn upload_archive(name: &str, data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_data(&mut header, name, data)
            .expect("append");
        builder.into_inner().expect("finish")
    }

    #[tokio::test]
    async fn tar_round_trips_a_file_through_the_pods_files() {
        let files = PodFiles::new();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (code, out, err) = run(
            &files,
            "tar --no-same-permissions --no-same-owner -xmf - -C /tmp",
            &upload_archive("upload.bin", &data),
        )
        .await;
        assert_eq!((code, out.as_slice(), err.as_str()), (0, &b""[..], ""));
        assert_eq!(files.read("/tmp/upload.bin").as_deref(), Some(&data[..]));
        assert_eq!(run(&files, "test -d /tmp/upload.bin", b"").await.0, 1);
        assert_eq!(run(&files, "test -f /tmp/upload.bin", b"").await.0, 0);
        assert_eq!(run(&files, "test -d /tmp", b"").await.0, 0);

        // Another exec, as another connection would run it, sees the same files.
        let (code, archive, err) = run(&files.clone(), "tar cf - /tmp/upload.bin", b"").await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(err, "tar: Removing leading `/' from member names\n");
        let entries = listing(&archive);
        assert_eq!(entries, [("tmp/upload.bin".to_owned(), data.clone())]);

        let (code, archive, _) = run(&files, "tar cf - -C /tmp upload.bin", b"").await;
        assert_eq!(code, 0);
        let names: Vec<String> = listing(&archive)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["upload.bin"]);
    }

    #[tokio::test]
    async fn tar_of_a_missing_file_fails_as_gnu_tar_does() {
        let files = PodFiles::new();
        let (code, archive, err) = run(&files, "tar cf - /tmp/missing.bin", b"").await;
        assert_eq!(code, 2);
        assert_eq!(
            err,
            "tar: Removing leading `/' from member names\n\
             tar: /tmp/missing.bin: Cannot stat: No such file or directory\n\
             tar: Exiting with failure status due to previous errors\n"
        );
        // Like GNU tar, it still ends the (empty) archive properly.
        assert!(listing(&archive).is_empty());

        let (code, _, err) = run(&files, "tar -xmf - -C /tmp", b"not a tar archive").await;
        assert_eq!(code, 2);
        assert!(
            err.starts_with("tar: This does not look like a tar archive\n"),
            "{err}"
        );
        let (code, _, err) = run(&files, "tar -xzf - -C /tmp", b"").await;
        assert_eq!((code, err.as_str()), (2, "tar: invalid option -- 'z'\n"));
    }
}
