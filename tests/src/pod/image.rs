//! The image a pod runs: which binary of this workspace each entrypoint path stands for,
//! its user and command, read from deploy/Containerfile's final stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bin_path;

/// A container image: its user, entrypoint, command and the binaries it holds.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image's `USER` (uid, gid).
    pub user: (u32, u32),
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `ENV`.
    pub env: Vec<(String, String)>,
    /// Path in the image → file on this machine; `None` runs command paths as they are on
    /// this machine (for tests of the harness itself with /bin/sh).
    pub(super) files: Option<BTreeMap<String, PathBuf>>,
}

impl Image {
    /// Tower's image as deploy/Containerfile builds it: its final stage's `USER`,
    /// `ENTRYPOINT`, `CMD` and the files its `COPY` lines install (/tower-server,
    /// /tower-agent, and /agent, the agent again under the name KubeSphere's console
    /// Deployment runs), each mapped to the workspace binary of the same name. Read from
    /// the Containerfile itself, so a line taken out of it is taken out of the tests' image
    /// too. `ENV` is distroless's (the base image), which the Containerfile does not say.
    pub fn tower() -> Image {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let stage = FinalStage::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Image {
            user: stage.user,
            entrypoint: stage.entrypoint,
            cmd: stage.cmd,
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                (
                    "SSL_CERT_FILE".into(),
                    "/etc/ssl/certs/ca-certificates.crt".into(),
                ),
            ],
            files: Some(
                stage
                    .files
                    .into_iter()
                    .map(|(path, name)| (path, bin_path(&name)))
                    .collect(),
            ),
        }
    }

    /// An image whose commands are this machine's own (`/bin/sh`), run as `user`.
    pub fn host_tools(user: (u32, u32)) -> Image {
        Image {
            user,
            entrypoint: vec!["/bin/sh".into()],
            cmd: Vec::new(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            files: None,
        }
    }

    /// The file on this machine behind `path` in the image.
    pub(super) fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        match &self.files {
            None => Ok(PathBuf::from(path)),
            Some(files) => files.get(path).cloned().ok_or_else(|| {
                format!(
                    "exec: {path:?}: no such file or directory in the image (it has {:?})",
                    files.keys().collect::<Vec<_>>()
                )
            }),
        }
    }
}

/// What the final stage of a Containerfile makes of its image (the stages before it only
/// build what it copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalStage {
    /// `USER uid:gid` (numeric; distroless has no /etc/passwd to resolve a name).
    pub user: (u32, u32),
    /// `ENTRYPOINT`, in exec (JSON) form.
    pub entrypoint: Vec<String>,
    /// `CMD`, in exec (JSON) form.
    pub cmd: Vec<String>,
    /// Path in the image → the file name `COPY --from=…` took it from (a binary the build
    /// stage put there under the name cargo gave it).
    pub files: BTreeMap<String, String>,
}

impl FinalStage {
    /// Reads the final stage of `containerfile`: line continuations joined, comments
    /// dropped; a `COPY` whose destination ends in `/` installs each source under its own
    /// name there, else its one source under the destination's. What it cannot model (a
    /// `COPY` from the build context, `ADD`, a user name, shell-form commands) is an error.
    pub fn parse(containerfile: &str) -> Result<FinalStage, String> {
        let mut instructions = Vec::new();
        let mut pending = String::new();
        for line in containerfile.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    pending.push_str(part);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(trimmed);
                    instructions.push(std::mem::take(&mut pending));
                }
            }
        }
        let last_from = instructions
            .iter()
            .rposition(|i| keyword(i) == "FROM")
            .ok_or("no FROM")?;
        let mut stage = FinalStage {
            user: (0, 0),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            files: BTreeMap::new(),
        };
        for instruction in &instructions[last_from + 1..] {
            let rest = instruction[keyword(instruction).len()..].trim();
            match keyword(instruction).as_str() {
                "COPY" => stage.copy(rest)?,
                "ADD" => return Err(format!("ADD is not modelled: {instruction}")),
                "USER" => {
                    let (uid, gid) = rest.split_once(':').unwrap_or((rest, rest));
                    let id = |v: &str| {
                        v.parse::<u32>()
                            .map_err(|_| format!("USER {rest}: only numeric ids are modelled"))
                    };
                    stage.user = (id(uid)?, id(gid)?);
                }
                "ENTRYPOINT" => stage.entrypoint = exec_form(instruction, rest)?,
                "CMD" => stage.cmd = exec_form(instruction, rest)?,
                _ => {}
            }
        }
        Ok(stage)
    }

    fn copy(&mut self, args: &str) -> Result<(), String> {
        let words: Vec<&str> = args.split_whitespace().collect();
        if !words.iter().any(|w| w.starts_with("--from=")) {
            return Err(format!(
                "COPY {args}: only COPY --from=<stage> (a built binary) is modelled"
            ));
        }
        let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        let Some((dest, sources)) = paths.split_last().filter(|(_, s)| !s.is_empty()) else {
            return Err(format!("COPY {args}: no source and destination"));
        };
        for source in sources {
            let name = source.rsplit('/').next().unwrap_or(source).to_owned();
            let path = if dest.ends_with('/') {
                format!("{dest}{name}")
            } else if sources.len() == 1 {
                (*dest).to_owned()
            } else {
                return Err(format!(
                    "COPY {args}: several sources need a destination ending in /"
                ));
            };
            self.files.insert(path, name);
        }
        Ok(())
    }
}

/// An instruction's keyword, upper-cased.
fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// `["a", "b"]` as the words of a command; the shell form is an error.
fn exec_form(instruction: &str, rest: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(rest)
        .map_err(|_| format!("{instruction}: only the exec (JSON) form is modelled"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_final_stage_of_a_containerfile_gives_the_images_files_user_and_command() {
        let text = "FROM rust AS build\nCOPY . .\nRUN cargo build \\\n  --release\n\
                    # a comment\nFROM distroless\n\
                    COPY --from=build /out/tower-server \\\n     /out/tower-agent /\n\
                    COPY --from=build /out/tower-agent /agent\n\
                    USER 65532:65532\nENTRYPOINT [\"/tower-server\"]\nCMD [\"serve\"]\n";
        let stage = FinalStage::parse(text).unwrap();
        assert_eq!(
            stage,
            FinalStage {
                user: (65532, 65532),
                entrypoint: vec!["/tower-server".into()],
                cmd: vec!["serve".into()],
                files: BTreeMap::from([
                    ("/agent".into(), "tower-agent".into()),
                    ("/tower-agent".into(), "tower-agent".into()),
                    ("/tower-server".into(), "tower-server".into()),
                ]),
            }
        );
        // Without the /agent line, the image has no /agent.
        let without = text.replace("COPY --from=build /out/tower-agent /agent\n", "");
        assert!(
            !FinalStage::parse(&without)
                .unwrap()
                .files
                .contains_key("/agent")
        );
        // What is not modelled is said, not guessed.
        for (bad, says) in [
            ("FROM x\nCOPY agent /agent\n", "only COPY --from"),
            ("FROM x\nCOPY --from=b /a /b /c\n", "ending in /"),
            ("FROM x\nUSER nonroot\n", "numeric"),
            ("FROM x\nCMD serve\n", "exec (JSON) form"),
            ("COPY --from=b /a /\n", "no FROM"),
        ] {
            let error = FinalStage::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn the_shipped_containerfile_installs_the_agent_as_agent_for_the_consoles_deployment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
        let stage = FinalStage::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            stage.files.get("/agent").map(String::as_str),
            Some("tower-agent")
        );
        assert_eq!(stage.entrypoint, ["/tower-server"]);
        assert_eq!(stage.user, (65532, 65532));
    }

    #[test]
    fn the_image_is_a_glibc_build_on_debian_13_in_both_stages() {
        // Not musl, whose allocator doubled the server's CPU per GiB (BENCHMARKS.md); and
        // Debian 13's glibc, not 12's, whose memcpy is slow on AMD Zen (the Containerfile
        // says why), in both stages, so that the binaries need no newer glibc than the
        // runtime stage has.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
        let text = std::fs::read_to_string(path).unwrap();
        let instructions: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .collect();
        assert!(
            !instructions.iter().any(|line| line.contains("musl")),
            "the image builds for musl"
        );
        let stages: Vec<&str> = instructions
            .iter()
            .copied()
            .filter(|line| line.starts_with("FROM "))
            .collect();
        assert_eq!(
            stages,
            [
                "FROM rust:1-trixie AS build",
                "FROM gcr.io/distroless/cc-debian13:nonroot"
            ]
        );
    }
}
