//! The pretend container's files, and the `tar` that `kubectl cp` runs in it.
//!
//! [`PodFiles`] is one pod's filesystem: regular files (absolute path → bytes) and the
//! directories that hold them, in memory, shared by every exec into the pod; the stand-in
//! keeps one per pod (`Filesystems`). `TarCommand` parses the `tar` command lines
//! `kubectl cp` sends, and `extract` and `create` run them, sans-IO: archive bytes in,
//! archive bytes out, GNU tar's messages and exit code beside them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::path::Component;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Directories every pod starts with.
const SEEDED_DIRS: [&str; 2] = ["/", "/tmp"];

/// The last line GNU tar writes when anything went wrong.
const EXITING_WITH_FAILURE: &str = "tar: Exiting with failure status due to previous errors\n";

/// One pod's files, in memory. Cloning shares them: every exec into the pod, over any
/// connection, sees the same files. It starts with the directories `/` and `/tmp`.
#[derive(Debug, Clone)]
pub struct PodFiles(Arc<Mutex<Tree>>);

#[derive(Debug)]
struct Tree {
    files: BTreeMap<String, Bytes>,
    dirs: BTreeSet<String>,
}

impl Default for PodFiles {
    fn default() -> Self {
        PodFiles(Arc::new(Mutex::new(Tree {
            files: BTreeMap::new(),
            dirs: SEEDED_DIRS.iter().map(|d| (*d).to_owned()).collect(),
        })))
    }
}

impl PodFiles {
    /// An empty filesystem (only `/` and `/tmp`).
    pub fn new() -> Self {
        Self::default()
    }

    fn tree(&self) -> MutexGuard<'_, Tree> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The contents of the regular file at `path` (absolute), if there is one.
    pub fn read(&self, path: &str) -> Option<Bytes> {
        self.tree().files.get(&resolve("/", path)).cloned()
    }

    /// Writes the regular file at `path` (absolute), creating its parent directories as
    /// `tar -x` does. Fails with GNU tar's words when `path` or a parent is in the way.
    pub fn write(&self, path: &str, contents: Bytes) -> Result<(), &'static str> {
        let path = resolve("/", path);
        let mut tree = self.tree();
        if tree.dirs.contains(&path) {
            return Err("Cannot open: Is a directory");
        }
        tree.make_parents(&path)?;
        tree.files.insert(path, contents);
        Ok(())
    }

    /// Creates the directory at `path` (absolute) and its parents.
    pub fn make_dir(&self, path: &str) -> Result<(), &'static str> {
        let path = resolve("/", path);
        let mut tree = self.tree();
        if tree.files.contains_key(&path) {
            return Err("Cannot mkdir: File exists");
        }
        tree.make_parents(&path)?;
        tree.dirs.insert(path);
        Ok(())
    }

    /// Whether `path` (absolute) is a directory.
    pub fn is_dir(&self, path: &str) -> bool {
        self.tree().dirs.contains(&resolve("/", path))
    }

    /// Whether `path` (absolute) is a regular file.
    pub fn is_file(&self, path: &str) -> bool {
        self.tree().files.contains_key(&resolve("/", path))
    }
}

impl Tree {
    fn make_parents(&mut self, path: &str) -> Result<(), &'static str> {
        let mut parent = path;
        while let Some((dir, _)) = parent.rsplit_once('/') {
            let dir = if dir.is_empty() { "/" } else { dir };
            if self.files.contains_key(dir) {
                return Err("Cannot open: Not a directory");
            }
            self.dirs.insert(dir.to_owned());
            if dir == "/" {
                break;
            }
            parent = dir;
        }
        Ok(())
    }

    /// `path` and everything under it, sorted by path: `(path, None)` for a directory,
    /// `(path, Some(contents))` for a file.
    fn subtree(&self, path: &str) -> Vec<(String, Option<Bytes>)> {
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        let under = |p: &String| p.starts_with(&prefix);
        let mut out: Vec<_> = std::iter::once((path.to_owned(), None))
            .chain(
                self.dirs
                    .range(prefix.clone()..)
                    .take_while(|p| under(p))
                    .map(|p| (p.clone(), None)),
            )
            .chain(
                self.files
                    .range(prefix.clone()..)
                    .take_while(|(p, _)| under(p))
                    .map(|(p, b)| (p.clone(), Some(b.clone()))),
            )
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// One filesystem per pod, created on first use and kept as long as the stand-in runs
/// (it outlives a deleted pod of the same name).
#[derive(Debug, Default)]
pub(crate) struct Filesystems(Mutex<HashMap<(String, String), PodFiles>>);

impl Filesystems {
    /// The files of pod `name` in `namespace`.
    pub(crate) fn pod(&self, namespace: &str, name: &str) -> PodFiles {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .clone()
    }
}

/// `path` resolved against `base` (absolute): `.`, `..` and repeated slashes are gone.
pub(crate) fn resolve(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = if path.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|p| !p.is_empty()).collect()
    };
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// What a `tar` command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TarCommand {
    /// `-x`: unpack the archive on stdin into `directory`.
    Extract {
        /// The directory of the last `-C` (or `/`).
        directory: String,
    },
    /// `-c`: write an archive of `members` to stdout.
    Create {
        /// Each operand with the directory of the `-C` before it (or `/`).
        members: Vec<(String, String)>,
    },
}

impl TarCommand {
    /// Parses `tar`'s arguments (without `tar` itself) in the forms GNU tar accepts: old
    /// style (`cf - PATH`), short clusters (`-xmf -`, `-f-`, `-CDIR`) and long options
    /// (`--file=-`, `--directory DIR`). The archive must be `-` (stdin or stdout).
    /// `Err` is the message to print after `tar: `.
    pub(crate) fn parse(args: &[String]) -> Result<TarCommand, String> {
        let mut state = Parse {
            mode: None,
            archive: "-".to_owned(),
            directory: "/".to_owned(),
            members: Vec::new(),
        };
        let mut args = args.iter();
        let mut operands_only = false;
        let mut first = true;
        while let Some(arg) = args.next() {
            let old_style = std::mem::take(&mut first) && !arg.starts_with('-');
            if operands_only || (!old_style && (arg == "-" || !arg.starts_with('-'))) {
                let member = (state.directory.clone(), arg.clone());
                state.members.push(member);
            } else if arg == "--" {
                operands_only = true;
            } else if let Some(long) = arg.strip_prefix("--") {
                let (name, value) = match long.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_owned())),
                    None => (long, None),
                };
                let value = match (name, value) {
                    ("file" | "directory", None) => Some(
                        args.next()
                            .cloned()
                            .ok_or_else(|| format!("option '--{name}' requires an argument"))?,
                    ),
                    (_, value) => value,
                };
                state.long(name, value)?;
            } else if old_style {
                // `cf - PATH`: each letter that takes an argument takes the next one.
                for letter in arg.chars() {
                    let value =
                        if takes_value(letter) {
                            Some(args.next().cloned().ok_or_else(|| {
                                format!("option requires an argument -- '{letter}'")
                            })?)
                        } else {
                            None
                        };
                    state.short(letter, value)?;
                }
            } else {
                let cluster = &arg[1..];
                for (at, letter) in cluster.char_indices() {
                    if takes_value(letter) {
                        let rest = &cluster[at + letter.len_utf8()..];
                        let value = if rest.is_empty() {
                            args.next().cloned().ok_or_else(|| {
                                format!("option requires an argument -- '{letter}'")
                            })?
                        } else {
                            rest.to_owned()
                        };
                        state.short(letter, Some(value))?;
                        break;
                    }
                    state.short(letter, None)?;
                }
            }
        }
        if state.archive != "-" {
            return Err(format!(
                "{}: the stand-in's tar reads and writes `-f -` only",
                state.archive
            ));
        }
        match state.mode {
            Some('x') if state.members.is_empty() => Ok(TarCommand::Extract {
                directory: state.directory,
            }),
            Some('x') => Err("the stand-in's tar extracts whole archives only".to_owned()),
            Some(_) if state.members.is_empty() => {
                Err("Cowardly refusing to create an empty archive".to_owned())
            }
            Some(_) => Ok(TarCommand::Create {
                members: state.members,
            }),
            None => Err("You must specify one of the '-cx' options".to_owned()),
        }
    }
}

fn takes_value(letter: char) -> bool {
    matches!(letter, 'f' | 'C')
}

struct Parse {
    mode: Option<char>,
    archive: String,
    directory: String,
    members: Vec<(String, String)>,
}

impl Parse {
    fn set_mode(&mut self, mode: char) -> Result<(), String> {
        match self.mode {
            Some(other) if other != mode => {
                Err("You may not specify more than one '-cx' option".to_owned())
            }
            _ => {
                self.mode = Some(mode);
                Ok(())
            }
        }
    }

    fn short(&mut self, letter: char, value: Option<String>) -> Result<(), String> {
        match (letter, value) {
            ('c' | 'x', _) => self.set_mode(letter),
            ('f', Some(file)) => {
                self.archive = file;
                Ok(())
            }
            ('C', Some(dir)) => {
                self.directory = resolve(&self.directory, &dir);
                Ok(())
            }
            // Touch (`m`), permissions (`p`) and owners (`o`) mean nothing here.
            ('m' | 'p' | 'o', _) => Ok(()),
            (letter, _) => Err(format!("invalid option -- '{letter}'")),
        }
    }

    fn long(&mut self, name: &str, value: Option<String>) -> Result<(), String> {
        match (name, value) {
            ("create", None) => self.set_mode('c'),
            ("extract" | "get", None) => self.set_mode('x'),
            ("file", Some(file)) => self.short('f', Some(file)),
            ("directory", Some(dir)) => self.short('C', Some(dir)),
            (
                "no-same-permissions"
                | "no-same-owner"
                | "same-permissions"
                | "same-owner"
                | "preserve-permissions"
                | "touch",
                None,
            ) => Ok(()),
            _ => Err(format!("unrecognized option '--{name}'")),
        }
    }
}

/// What `tar` printed on stderr and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// GNU tar's messages, each line starting `tar: `.
    pub(crate) stderr: String,
    /// 0, or 2 after any error.
    pub(crate) code: i32,
}

impl Outcome {
    fn new(warnings: Vec<String>, errors: Vec<String>) -> Outcome {
        let failed = !errors.is_empty();
        let mut stderr: String = warnings
            .into_iter()
            .chain(errors)
            .map(|line| format!("tar: {line}\n"))
            .collect();
        if failed {
            stderr.push_str(EXITING_WITH_FAILURE);
        }
        Outcome {
            stderr,
            code: if failed { 2 } else { 0 },
        }
    }
}

/// `tar -x -C directory`: unpacks `archive` into `files`. Regular files and directories
/// are stored; other entries (links, devices) and names with `..` are refused.
pub(crate) fn extract(files: &PodFiles, directory: &str, archive: &[u8]) -> Outcome {
    let (mut warnings, mut errors) = (Vec::new(), Vec::new());
    if !files.is_dir(directory) {
        errors.push(format!(
            "{directory}: Cannot open: No such file or directory"
        ));
        return Outcome::new(warnings, errors);
    }
    let mut reader = tar::Archive::new(archive);
    let entries = match reader.entries() {
        Ok(entries) => entries,
        Err(_) => {
            errors.push("This does not look like a tar archive".to_owned());
            return Outcome::new(warnings, errors);
        }
    };
    let mut seen_any = false;
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                errors.push(if seen_any {
                    format!("Unexpected EOF in archive ({error})")
                } else {
                    "This does not look like a tar archive".to_owned()
                });
                break;
            }
        };
        seen_any = true;
        let name = match entry.path() {
            Ok(path) => path.into_owned(),
            Err(error) => {
                errors.push(format!("a member name is not valid: {error}"));
                continue;
            }
        };
        let shown = name.to_string_lossy().into_owned();
        if name.components().any(|c| c == Component::ParentDir) {
            errors.push(format!("{shown}: Member name contains '..'"));
            continue;
        }
        let mut parts = Vec::new();
        for component in name.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
                Component::RootDir | Component::Prefix(_) => {
                    let warning = "Removing leading `/' from member names".to_owned();
                    if !warnings.contains(&warning) {
                        warnings.push(warning);
                    }
                }
                Component::CurDir | Component::ParentDir => {}
            }
        }
        let path = resolve(directory, &parts.join("/"));
        let stored = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut contents = Vec::with_capacity(entry.size().try_into().unwrap_or(0));
                if let Err(error) = entry.read_to_end(&mut contents) {
                    errors.push(format!("{shown}: Read error ({error})"));
                    break;
                }
                files.write(&path, Bytes::from(contents))
            }
            tar::EntryType::Directory => files.make_dir(&path),
            _ => Err("Cannot create: the stand-in stores regular files and directories only"),
        };
        if let Err(message) = stored {
            errors.push(format!("{shown}: {message}"));
        }
    }
    Outcome::new(warnings, errors)
}

/// `tar -c`: an archive of `members` (each `(directory of its -C, operand)`) from
/// `files`, directories with everything under them, named as GNU tar names them (the
/// operand as given, less a leading `/`). Missing members are reported and skipped.
pub(crate) fn create(files: &PodFiles, members: &[(String, String)]) -> (Vec<u8>, Outcome) {
    let (mut warnings, mut errors) = (Vec::new(), Vec::new());
    let mut builder = tar::Builder::new(Vec::new());
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (directory, operand) in members {
        if !files.is_dir(directory) {
            errors.push(format!(
                "{directory}: Cannot open: No such file or directory"
            ));
            continue;
        }
        if operand.starts_with('/') {
            let warning = "Removing leading `/' from member names".to_owned();
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        let path = resolve(directory, operand);
        let entries = {
            let tree = files.tree();
            if let Some(contents) = tree.files.get(&path) {
                vec![(path.clone(), Some(contents.clone()))]
            } else if tree.dirs.contains(&path) {
                tree.subtree(&path)
            } else {
                errors.push(format!("{operand}: Cannot stat: No such file or directory"));
                continue;
            }
        };
        // The operand as given (less `/`, `.`), then the path below it.
        let named: Vec<&str> = operand
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        let named = named.join("/");
        for (entry_path, contents) in entries {
            let below = &entry_path[path.len()..];
            let name = format!("{named}{below}");
            let name = name.trim_start_matches('/');
            let name = if name.is_empty() { "." } else { name };
            let mut header = tar::Header::new_gnu();
            header.set_mtime(mtime);
            header.set_uid(0);
            header.set_gid(0);
            let appended = match contents {
                Some(contents) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(0o644);
                    header.set_size(contents.len() as u64);
                    builder.append_data(&mut header, name, contents.as_ref())
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    builder.append_data(&mut header, format!("{name}/"), std::io::empty())
                }
            };
            if let Err(error) = appended {
                errors.push(format!("{name}: Cannot add: {error}"));
            }
        }
    }
    let archive = builder.into_inner().unwrap_or_default();
    (archive, Outcome::new(warnings, errors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a tar archive holds: each entry's name and contents, in order.
    pub(crate) fn listing(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut entries = Vec::new();
        for entry in tar::Archive::new(archive).entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").display().to_string();
            let mut contents = Vec::new();
            entry.read_to_end(&mut contents).expect("read");
            entries.push((name, contents));
        }
        entries
    }

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn parses_the_command_lines_kubectl_sends() {
        let extract = |dir: &str| {
            Ok(TarCommand::Extract {
                directory: dir.to_owned(),
            })
        };
        assert_eq!(
            TarCommand::parse(&args(
                "--no-same-permissions --no-same-owner -xmf - -C /tmp"
            )),
            extract("/tmp")
        );
        assert_eq!(TarCommand::parse(&args("-xmf - -C /tmp/")), extract("/tmp"));
        assert_eq!(TarCommand::parse(&args("xf - -C /tmp")), extract("/tmp"));
        assert_eq!(TarCommand::parse(&args("-x -f- -C/tmp")), extract("/tmp"));
        assert_eq!(
            TarCommand::parse(&args("--extract --file=- --directory /tmp")),
            extract("/tmp")
        );
        let create = |members: &[(&str, &str)]| {
            Ok(TarCommand::Create {
                members: members
                    .iter()
                    .map(|(d, p)| ((*d).to_owned(), (*p).to_owned()))
                    .collect(),
            })
        };
        assert_eq!(
            TarCommand::parse(&args("cf - /tmp/upload.bin")),
            create(&[("/", "/tmp/upload.bin")])
        );
        assert_eq!(
            TarCommand::parse(&args("cf - -C /tmp upload.bin")),
            create(&[("/tmp", "upload.bin")])
        );
        assert_eq!(
            TarCommand::parse(&args("-c -f - a -C /tmp b")),
            create(&[("/", "a"), ("/tmp", "b")])
        );
    }

    #[test]
    fn refuses_what_it_does_not_simulate() {
        let err = |line: &str| TarCommand::parse(&args(line)).expect_err(line);
        assert_eq!(err("-xzf - -C /tmp"), "invalid option -- 'z'");
        assert_eq!(
            err("-xf archive.tar"),
            "archive.tar: the stand-in's tar reads and writes `-f -` only"
        );
        assert_eq!(
            err("-cxf -"),
            "You may not specify more than one '-cx' option"
        );
        assert_eq!(err("cf -"), "Cowardly refusing to create an empty archive");
        assert_eq!(
            err("-f - /tmp"),
            "You must specify one of the '-cx' options"
        );
        assert_eq!(err("-xf"), "option requires an argument -- 'f'");
        assert_eq!(err("--xattrs -xf -"), "unrecognized option '--xattrs'");
    }

    #[test]
    fn resolves_paths() {
        assert_eq!(resolve("/", "tmp//a/./b/"), "/tmp/a/b");
        assert_eq!(resolve("/tmp", "a"), "/tmp/a");
        assert_eq!(resolve("/tmp", "../etc/x"), "/etc/x");
        assert_eq!(resolve("/tmp", "/x/../../y"), "/y");
        assert_eq!(resolve("/", "."), "/");
    }

    /// An archive made the way kubectl makes one (Go's archive/tar writes ustar headers).
    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            builder
                .append_data(&mut header, name, *data)
                .expect("append");
        }
        builder.into_inner().expect("finish")
    }

    #[test]
    fn directories_exist_for_every_file() {
        let files = PodFiles::new();
        assert!(files.is_dir("/") && files.is_dir("/tmp") && !files.is_dir("/data"));
        files
            .write("/data/a/b.txt", Bytes::from_static(b"b"))
            .expect("write");
        assert!(files.is_dir("/data") && files.is_dir("/data/a"));
        assert!(files.is_file("/data/a/b.txt") && !files.is_dir("/data/a/b.txt"));
        assert_eq!(
            files.write("/data/a", Bytes::new()),
            Err("Cannot open: Is a directory")
        );
        assert_eq!(
            files.write("/data/a/b.txt/c", Bytes::new()),
            Err("Cannot open: Not a directory")
        );
        // Clones share the files.
        assert_eq!(
            files.clone().read("/data/a/b.txt"),
            Some(Bytes::from_static(b"b"))
        );
    }

    #[test]
    fn extract_stores_files_under_the_directory() {
        let files = PodFiles::new();
        let outcome = extract(
            &files,
            "/tmp",
            &archive(&[("upload.bin", b"hello"), ("sub/dir/x", b"x")]),
        );
        assert_eq!(outcome, Outcome::new(vec![], vec![]));
        assert_eq!(
            files.read("/tmp/upload.bin"),
            Some(Bytes::from_static(b"hello"))
        );
        assert_eq!(files.read("/tmp/sub/dir/x"), Some(Bytes::from_static(b"x")));
    }

    #[test]
    fn extract_reports_bad_input_as_gnu_tar_does() {
        let files = PodFiles::new();
        let outcome = extract(&files, "/nowhere", &archive(&[("a", b"a")]));
        assert_eq!(
            outcome.stderr,
            format!(
                "tar: /nowhere: Cannot open: No such file or directory\n{EXITING_WITH_FAILURE}"
            )
        );
        assert_eq!(outcome.code, 2);
        let outcome = extract(&files, "/tmp", &[b'x'; 1024]);
        assert_eq!(
            outcome.stderr,
            format!("tar: This does not look like a tar archive\n{EXITING_WITH_FAILURE}")
        );
        assert_eq!(outcome.code, 2);
        // GNU tar refuses `..`: nothing escapes the directory.
        let mut evil = tar::Header::new_gnu();
        evil.set_size(1);
        evil.as_gnu_mut().expect("gnu").name[..7].copy_from_slice(b"../evil");
        evil.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&evil, &b"e"[..]).expect("append");
        let outcome = extract(&files, "/tmp", &builder.into_inner().expect("finish"));
        assert!(
            outcome
                .stderr
                .starts_with("tar: ../evil: Member name contains '..'\n")
        );
        assert_eq!(outcome.code, 2);
        assert!(!files.is_file("/evil"));
    }

    #[test]
    fn create_names_members_as_gnu_tar_does() {
        let files = PodFiles::new();
        files
            .write("/tmp/d/one", Bytes::from_static(b"1"))
            .expect("write");
        files
            .write("/tmp/d/sub/two", Bytes::from_static(b"22"))
            .expect("write");
        let (bytes, outcome) = create(&files, &[("/".to_owned(), "/tmp/d".to_owned())]);
        assert_eq!(
            outcome.stderr,
            "tar: Removing leading `/' from member names\n"
        );
        assert_eq!(outcome.code, 0);
        let listed: Vec<String> = listing(&bytes)
            .into_iter()
            .map(|(name, data)| format!("{name}={}", String::from_utf8_lossy(&data)))
            .collect();
        assert_eq!(
            listed,
            ["tmp/d/=", "tmp/d/one=1", "tmp/d/sub/=", "tmp/d/sub/two=22"]
        );
        let (bytes, outcome) = create(&files, &[("/tmp/d".to_owned(), "sub/two".to_owned())]);
        assert_eq!(outcome.stderr, "");
        let names: Vec<String> = listing(&bytes).into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["sub/two"]);
    }
}
