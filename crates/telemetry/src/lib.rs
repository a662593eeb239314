//! `tower-telemetry`: how Tower's binaries log, set up in one place for both.
//!
//! * [`LogArgs`] is the `--log-format` flag (env `TOWER_LOG_FORMAT`) that `tower-server`
//!   and `tower-agent` add to their own flags; [`LogFormat`] is its value.
//! * [`init`] installs the subscriber: events go to stderr, filtered by `TOWER_LOG`
//!   ([`FILTER_ENV`], `EnvFilter` syntax) or, when that is unset or empty, by
//!   [`DEFAULT_FILTER`], which keeps Tower at INFO and its dependencies at ERROR.
//! * Text lines are coloured only when stderr is a terminal (and `NO_COLOR` is unset), so
//!   `kubectl logs` and log collectors get plain text. JSON is one object per line:
//!   `timestamp` (RFC 3339, UTC), `level`, `target`, and `fields` holding `message` and
//!   the event's structured fields (`cluster`, `tunnel`, …). Fields stay nested rather than
//!   flattened into the top level: Tower logs a field named `target` (a stream's target),
//!   which would otherwise collide with the event's own.
//! * Nothing a peer sends can forge a line or drive a terminal: text lines escape control
//!   characters (newlines, ESC, C1, Unicode line separators and bidi overrides) in every
//!   field and message ([`EscapedFields`]), JSON escapes them by construction. [`Escaped`]
//!   does the same for text printed elsewhere (a table on a terminal).

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable holding the log filter, in `EnvFilter` syntax
/// (`info`, `info,tower_tunnel=debug`, `debug,rustls=info`, …).
pub const FILTER_ENV: &str = "TOWER_LOG";

/// The filter when [`FILTER_ENV`] is unset or empty: Tower's own crates at INFO, every
/// other crate (rustls, hyper, h2, yamux, kube, tower, …) capped at ERROR.
///
/// Why dependencies are capped: their WARN and INFO lines describe what a peer did, one
/// line per connection, and Tower already handles those cases and logs them itself with
/// the context an operator needs (cluster, tunnel, remote address). The motivating case:
/// rustls warns "Illegal SNI extension: ignoring IP address presented as hostname" for
/// every TLS client that sends an IP address as SNI (wrk, some HTTP libraries, load
/// balancer health checks do), which under load buries real warnings and costs a write
/// per connection. ERROR still gets through: a dependency's error is worth seeing.
/// Setting `TOWER_LOG` replaces this default entirely (`TOWER_LOG=info` shows every
/// crate's INFO again; `TOWER_LOG=info,rustls=debug` looks into one).
///
/// Crates are named one by one, not as a `tower_` prefix: `EnvFilter` matches targets by
/// prefix, and `tower_` would also match the `tower_http` dependency.
pub const DEFAULT_FILTER: &str = "error,tower_server=info,tower_agent=info,tower_tunnel=info,tower_auth=info,tower_proto=info,tower_telemetry=info";

/// How log lines are written on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target and fields (message included).
    Json,
}

/// The `--log-format` flag, for a binary to flatten into (or augment) its own flags.
#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    /// Log line format on stderr: text (coloured only on a terminal) or json (one object
    /// per line). TOWER_LOG sets the filter (default: Tower at info, dependencies at error).
    #[arg(
        long,
        env = "TOWER_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

/// Installs the process's subscriber: `format` on stderr, filtered by `TOWER_LOG` or
/// [`DEFAULT_FILTER`]. `log` crate records (rustls logs through it) are captured too.
///
/// Fails when `TOWER_LOG` is not a valid filter (bad configuration: the binaries exit 2
/// with the reason) or when a subscriber is already installed.
pub fn init(format: LogFormat) -> Result<(), String> {
    init_with_default(format, DEFAULT_FILTER)
}

/// As [`init`], with `default` as the filter when `TOWER_LOG` is unset (a binary's own
/// verbosity flag, say: [`klog_filter`]).
pub fn init_with_default(format: LogFormat, default: &str) -> Result<(), String> {
    let filter = filter_or(std::env::var_os(FILTER_ENV), default)?;
    subscriber(format, filter, colour(), std::io::stderr)
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))
}

/// The filter for klog's `--v=N` (the flag KubeSphere's agent Deployment passes): 0 and
/// 1 are the default; 2 and 3 show Tower's debug lines (klog's V(2) is "useful steady
/// state"); 4 and 5 every crate's debug lines (V(4) is "debug"); 6 and up Tower's trace.
pub fn klog_filter(verbosity: u8) -> String {
    const TOWER: [&str; 6] = [
        "tower_server",
        "tower_agent",
        "tower_tunnel",
        "tower_auth",
        "tower_proto",
        "tower_telemetry",
    ];
    let tower_at = |level: &str| {
        TOWER
            .iter()
            .map(|c| format!("{c}={level}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match verbosity {
        0 | 1 => DEFAULT_FILTER.to_owned(),
        2 | 3 => format!("error,{}", tower_at("debug")),
        4 | 5 => "debug".to_owned(),
        _ => format!("debug,{}", tower_at("trace")),
    }
}

/// The filter `TOWER_LOG`'s value (`None` when unset) asks for.
#[cfg(test)]
fn filter(value: Option<OsString>) -> Result<EnvFilter, String> {
    filter_or(value, DEFAULT_FILTER)
}

/// The filter `TOWER_LOG`'s value asks for, `default` when it is unset or empty.
fn filter_or(value: Option<OsString>, default: &str) -> Result<EnvFilter, String> {
    let value = match value {
        None => String::new(),
        Some(value) => value
            .into_string()
            .map_err(|v| format!("{FILTER_ENV}={v:?} is not UTF-8"))?,
    };
    // Empty counts as unset, so a manifest can write `value: ""` for the default.
    let directives = match value.trim() {
        "" => default,
        set => set,
    };
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| format!("{FILTER_ENV}={directives:?} is not a valid log filter: {e}"))
}

/// Colour only for a person at a terminal who has not asked for none (no-color.org).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The subscriber [`init`] installs, writing to `writer` (tests capture it).
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).fmt_fields(EscapedFields).finish()),
        // Tower opens no spans of its own; a dependency's (with TOWER_LOG raised) shows
        // as the current `span`, without the whole list on every line.
        LogFormat::Json => Box::new(
            builder
                .with_ansi(false)
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Whether `c` may not appear as itself in a log line: C0 and C1 controls (newline, ESC,
/// …), DEL, the Unicode line and paragraph separators and the bidirectional overrides
/// and isolates (which reorder what a reader sees).
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Writes through to `inner`, with every character [`must_escape`] gives as its Rust
/// escape (`\n`, `\u{1b}`).
struct EscapingWriter<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for EscapingWriter<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(must_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            for escaped in c.escape_default() {
                self.0.write_char(escaped)?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// `T`'s `Display`, with control characters escaped (see the crate docs): for text from
/// the wire that is printed where a log line or a terminal would take it as is.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        write!(EscapingWriter(f), "{}", self.0)
    }
}

/// The text format's fields, as `tracing-subscriber` writes them (`message`, then
/// `name=value` separated by spaces; `Display` fields as they are, `Debug` ones and strings
/// in `Debug`), with every character [`must_escape`] escaped: a field given with `%` from
/// something a peer sent cannot start a line of its own or colour a terminal.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer: &mut writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    empty: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{value}"))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        use fmt::Write;
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // `log` records' metadata, which the line shows already (as the default does).
        if name.starts_with("log.") {
            return;
        }
        self.result = (|| {
            if !self.empty {
                self.writer.write_char(' ')?;
            }
            self.empty = false;
            if name != "message" {
                let name = name.strip_prefix("r#").unwrap_or(name);
                if self.writer.has_ansi_escapes() {
                    write!(self.writer, "\u{1b}[3m{name}\u{1b}[0m\u{1b}[2m=\u{1b}[0m")?;
                } else {
                    write!(self.writer, "{name}=")?;
                }
            }
            write!(EscapingWriter(self.writer), "{value:?}")
        })();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use clap::{Args, CommandFactory, FromArgMatches, Parser};

    use super::*;

    /// A writer that keeps what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// Runs `f` with `subscriber` as the thread's default, one test at a time: tracing
    /// caches each call site's interest across all live dispatchers, and a call site first
    /// hit on one thread while another thread's test builds its dispatcher can keep an
    /// interest computed for the wrong filter (tracing-core's `callsite.rs`, the rebuild
    /// that is not under its lock), so a line would leak through or vanish.
    fn with_subscriber(subscriber: impl tracing::Subscriber + Send + Sync, f: impl FnOnce()) {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        tracing::subscriber::with_default(subscriber, f);
    }

    /// What a subscriber with `TOWER_LOG` = `env` writes for a dependency's WARN (rustls's
    /// IP-as-SNI line, under its real target) and two of Tower's lines.
    fn logged(format: LogFormat, env: Option<&str>, ansi: bool) -> String {
        let out = Captured::default();
        let filter = filter(env.map(OsString::from)).unwrap();
        with_subscriber(subscriber(format, filter, ansi, out.clone()), || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension: ignoring IP address presented as hostname (127.0.0.1)");
            tracing::info!(target: "hyper_util::client::legacy::pool", "pooling idle connection");
            tracing::info!(target: "tower_server::agents", cluster = "member-1", tunnel = 7, "agent connected");
            tracing::debug!(target: "tower_server::frontend", target = "kubernetes", "proxying");
            tracing::error!(target: "h2::proto::connection", "connection error");
        });
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn by_default_dependencies_log_only_errors_and_tower_logs_info() {
        for env in [None, Some(""), Some("  ")] {
            let log = logged(LogFormat::Text, env, false);
            assert!(!log.contains("Illegal SNI"), "{env:?}: {log}");
            assert!(!log.contains("pooling idle connection"), "{env:?}: {log}");
            assert!(log.contains("agent connected"), "{env:?}: {log}");
            assert!(log.contains("cluster=\"member-1\""), "{env:?}: {log}");
            assert!(!log.contains("proxying"), "debug is off: {log}");
            assert!(log.contains("connection error"), "errors pass: {log}");
        }
    }

    #[test]
    fn an_explicit_tower_log_replaces_the_default() {
        let log = logged(LogFormat::Text, Some("info"), false);
        assert!(log.contains("Illegal SNI"), "{log}");
        assert!(log.contains("pooling idle connection"), "{log}");
        let log = logged(LogFormat::Text, Some("warn,tower_server=debug"), false);
        assert!(log.contains("Illegal SNI"), "{log}");
        assert!(log.contains("proxying"), "{log}");
        assert!(!log.contains("pooling idle connection"), "{log}");
    }

    #[test]
    fn an_invalid_tower_log_is_an_error_naming_it() {
        let e = filter(Some("info,tower_server=loud".into())).unwrap_err();
        assert!(
            e.contains("TOWER_LOG") && e.contains("tower_server=loud"),
            "{e}"
        );
    }

    #[test]
    fn the_default_filter_names_every_tower_crate_but_not_tower_http() {
        let manifest = include_str!("../../../Cargo.toml");
        let crates: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("tower-"))
            .filter(|l| l.contains("path = "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| *name != "kube-stand-in")
            .collect();
        assert!(crates.len() >= 6, "{crates:?}");
        for name in crates {
            let directive = format!("tower_{}=info", name.replace('-', "_"));
            assert!(
                DEFAULT_FILTER.split(',').any(|d| d == directive),
                "{directive} is missing from DEFAULT_FILTER"
            );
        }
        assert!(!DEFAULT_FILTER.split(',').any(|d| d.starts_with("tower=")
            || d.starts_with("tower_=")
            || d.starts_with("tower_http")));
    }

    #[test]
    fn text_is_plain_unless_asked_for_colour() {
        let plain = logged(LogFormat::Text, None, false);
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        let coloured = logged(LogFormat::Text, None, true);
        assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    }

    #[test]
    fn json_is_one_object_per_line_with_the_fields_nested() {
        let log = logged(LogFormat::Json, Some("info,tower_server=debug"), true);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 5, "{log}");
        assert!(!log.contains('\u{1b}'), "{log:?}");
        for line in &lines {
            for key in ["timestamp", "level", "target"] {
                assert!(line[key].is_string(), "{key}: {line}");
            }
            assert!(line["fields"]["message"].is_string(), "{line}");
        }
        let connected = lines
            .iter()
            .find(|l| l["fields"]["message"] == "agent connected")
            .unwrap();
        assert_eq!(connected["level"], "INFO");
        assert_eq!(connected["target"], "tower_server::agents");
        assert_eq!(connected["fields"]["cluster"], "member-1");
        assert_eq!(connected["fields"]["tunnel"], 7);
        // A field named `target` keeps its value beside the event's own target.
        let proxying = lines
            .iter()
            .find(|l| l["fields"]["message"] == "proxying")
            .unwrap();
        assert_eq!(proxying["target"], "tower_server::frontend");
        assert_eq!(proxying["fields"]["target"], "kubernetes");
    }

    #[test]
    fn text_from_the_wire_cannot_forge_a_line_or_drive_a_terminal() {
        let evil = "HS256\nFORGED INFO tower_server: hi\u{1b}[31m\u{85}\u{202e}\u{2028}x";
        let out = Captured::default();
        let filter = filter(Some("info".into())).unwrap();
        with_subscriber(
            subscriber(LogFormat::Text, filter, false, out.clone()),
            || {
                tracing::info!(reason = %evil, quoted = ?evil, plain = evil, n = 7, "refused {evil}");
                tracing::info!(
                    error = &std::io::Error::other(evil) as &(dyn std::error::Error + 'static),
                    "failed"
                );
            },
        );
        let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
        assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");
        for c in ['\u{1b}', '\u{85}', '\u{202e}', '\u{2028}'] {
            assert!(!log.contains(c), "{c:?} in {log:?}");
        }
        assert!(log.contains("refused HS256\\nFORGED INFO"), "{log}");
        assert!(log.contains(" reason=HS256\\nFORGED"), "{log}");
        assert!(log.contains("\\u{1b}[31m"), "{log}");
        assert!(log.contains(" n=7"), "{log}");
        // Ordinary text is untouched.
        assert_eq!(
            Escaped("member-1 \"ok\" é").to_string(),
            "member-1 \"ok\" é"
        );
        assert_eq!(Escaped("a\tb\r\n\u{1b}").to_string(), "a\\tb\\r\\n\\u{1b}");
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn log_format_is_a_flag_with_its_env_var_and_a_clear_error() {
        let arg = Cli::command()
            .get_arguments()
            .find(|a| a.get_long() == Some("log-format"))
            .cloned()
            .unwrap();
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("TOWER_LOG_FORMAT")
        );
        let parsed = Cli::try_parse_from(["t", "--log-format", "json"]).unwrap();
        assert_eq!(parsed.log.log_format, LogFormat::Json);
        let e = Cli::try_parse_from(["t", "--log-format", "xml"])
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 2);
        let message = e.to_string();
        assert!(
            message.contains("text") && message.contains("json"),
            "{message}"
        );
        // The same flag added to a command built elsewhere (the agent's `Cli`).
        let command = LogArgs::augment_args(clap::Command::new("agent"));
        let matches = command
            .try_get_matches_from(["agent", "--log-format=text"])
            .unwrap();
        assert_eq!(
            LogArgs::from_arg_matches(&matches).unwrap().log_format,
            LogFormat::Text
        );
    }

    #[test]
    fn klog_verbosity_maps_to_valid_filters_that_widen_with_v() {
        assert_eq!(klog_filter(0), DEFAULT_FILTER);
        for v in 0..=9 {
            let directives = klog_filter(v);
            assert!(
                filter_or(None, &directives).is_ok(),
                "--v={v}: {directives}"
            );
        }
        assert!(klog_filter(2).contains("tower_agent=debug"));
        assert_eq!(klog_filter(4), "debug");
        assert!(klog_filter(6).contains("tower_agent=trace"));
        // TOWER_LOG, when set, still wins over the flag.
        assert!(filter_or(Some("info".into()), &klog_filter(6)).is_ok());
    }
}
