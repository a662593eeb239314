//! KubeSphere's old agent's flags, which its agent Deployments may still pass: each is
//! refused with what to use instead, or, where tower-agent does what it asks anyway,
//! accepted with a line saying so.

/// Flags of KubeSphere's old agent that tower-agent has no use for, hidden from `--help`.
///
/// Its own (kubesphere/tower `cmd/agent/app/options.go`): `--max-retry` and
/// `--max-retry-interval`. It also registered klog's (`cmd/agent/app/agent.go`:
/// `klog.InitFlags` into a Go FlagSet, then each name's `_` turned into `-`); its go.mod
/// pins k8s.io/klog/v2 v2.90.1, whose `klog.go` `init` defines exactly `log_dir`,
/// `log_file`, `log_file_max_size`, `logtostderr`, `alsologtostderr`, `v`,
/// `add_dir_header`, `skip_headers`, `one_output`, `skip_log_headers`, `stderrthreshold`,
/// `vmodule` and `log_backtrace_at` (klog v1.0.0, which older releases used, the same
/// but `one_output`). `--v` is [`Cli::verbosity`]. `--log-flush-frequency` is
/// k8s.io/component-base's, which the old agent never registered: it gets clap's error.
/// Boolean ones take Go's forms: `--flag`, `--flag=true`, `--flag=0`, …
#[derive(clap::Args, Debug, Default, Clone)]
pub struct OldAgentFlags {
    /// Refused: tower-agent retries for ever.
    #[arg(long, hide = true)]
    pub max_retry: Option<String>,
    /// Refused: see --reconnect-max.
    #[arg(long, hide = true)]
    pub max_retry_interval: Option<String>,
    /// klog: refused (log files).
    #[arg(long, hide = true)]
    pub log_dir: Option<String>,
    /// klog: refused (log files).
    #[arg(long, hide = true)]
    pub log_file: Option<String>,
    /// klog: refused (log files).
    #[arg(long, hide = true)]
    pub log_file_max_size: Option<String>,
    /// klog: `true` (klog's default) accepted, `false` (log files) refused.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub logtostderr: Option<String>,
    /// klog: accepted (no effect, as in klog while it logs to stderr).
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub alsologtostderr: Option<String>,
    /// klog: accepted (no effect, as in klog while it logs to stderr).
    #[arg(long, hide = true)]
    pub stderrthreshold: Option<String>,
    /// klog: `false` accepted, `true` refused (line format).
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub add_dir_header: Option<String>,
    /// klog: `false` accepted, `true` refused (line format).
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub skip_headers: Option<String>,
    /// klog: `false` accepted, `true` refused (log files).
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub one_output: Option<String>,
    /// klog: `false` accepted, `true` refused (log files).
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub skip_log_headers: Option<String>,
    /// klog: refused (per-file verbosity: TOWER_LOG).
    #[arg(long, hide = true)]
    pub vmodule: Option<String>,
    /// klog: refused (no equivalent).
    #[arg(long, hide = true)]
    pub log_backtrace_at: Option<String>,
}

/// What tower-agent makes of KubeSphere's old agent's flags ([`OldAgentFlags`]): the first
/// that asks for something it does not do is refused with the reason and what to use
/// instead; the others, which ask for what it does anyway, come back as (flag, why) to be
/// logged, so none is ignored silently. Harmless: `--logtostderr` (tower-agent logs to
/// standard error and nowhere else), `--alsologtostderr` and `--stderrthreshold` (klog
/// itself ignores them while it logs to stderr, its default), and a boolean set to klog's
/// default. Refused: whatever asks for log files, another line format, per-file
/// verbosity or stack traces.
pub(super) fn old_agent_flags(old: &OldAgentFlags) -> Result<Vec<(String, String)>, String> {
    const FILES: &str = "tower-agent writes no log files: it logs to standard error \
                         (kubectl logs), as much as --v or TOWER_LOG asks";
    const FORMAT: &str = "tower-agent's lines have one format, chosen with --log-format text|json";
    let klog = |flag: &str, value: &str, why: &str| {
        format!(
            "--{flag}={value} (one of klog's flags, which KubeSphere's old agent accepted) \
             is not supported: {why}"
        )
    };
    if old.max_retry.is_some() {
        return Err(
            "--max-retry (KubeSphere's old agent) is not supported: tower-agent \
                    dials again for ever, with jittered backoff up to --reconnect-max"
                .into(),
        );
    }
    if old.max_retry_interval.is_some() {
        return Err(
            "--max-retry-interval (KubeSphere's old agent) is not supported: \
                    use --reconnect-max DURATION"
                .into(),
        );
    }
    for (flag, value) in [
        ("log-dir", &old.log_dir),
        ("log-file", &old.log_file),
        ("log-file-max-size", &old.log_file_max_size),
    ] {
        if let Some(value) = value {
            return Err(klog(flag, value, FILES));
        }
    }
    if let Some(value) = &old.vmodule {
        return Err(klog(
            "vmodule",
            value,
            "for more detail from one part, use TOWER_LOG (e.g. \
             TOWER_LOG=info,tower_agent::upstream=debug), or --v for all of it",
        ));
    }
    if let Some(value) = &old.log_backtrace_at {
        return Err(klog(
            "log-backtrace-at",
            value,
            "there is no stack trace at a log line; raise --v or TOWER_LOG instead",
        ));
    }
    let mut accepted = Vec::new();
    let mut note = |flag: &str, why: String| accepted.push((format!("--{flag}"), why));
    // Booleans other than --logtostderr: klog's default (false) asks for nothing.
    for (flag, value, why) in [
        ("add-dir-header", &old.add_dir_header, FORMAT),
        ("skip-headers", &old.skip_headers, FORMAT),
        ("one-output", &old.one_output, FILES),
        ("skip-log-headers", &old.skip_log_headers, FILES),
    ] {
        let Some(value) = value else { continue };
        match parse_go_bool(value) {
            Some(false) => note(
                flag,
                format!(
                    "--{flag}={value} (KubeSphere's old agent's klog flag) is klog's \
                     default, which asks for nothing"
                ),
            ),
            Some(true) => return Err(klog(flag, value, why)),
            None => return Err(not_a_bool(flag, value)),
        }
    }
    if let Some(value) = &old.logtostderr {
        match parse_go_bool(value) {
            Some(true) => note(
                "logtostderr",
                "--logtostderr (KubeSphere's old agent's klog flag): tower-agent logs to \
                 standard error anyway"
                    .into(),
            ),
            Some(false) => return Err(klog("logtostderr", value, FILES)),
            None => return Err(not_a_bool("logtostderr", value)),
        }
    }
    if let Some(value) = &old.alsologtostderr {
        if parse_go_bool(value).is_none() {
            return Err(not_a_bool("alsologtostderr", value));
        }
        note(
            "alsologtostderr",
            format!(
                "--alsologtostderr={value} (KubeSphere's old agent's klog flag) has no \
                 effect: tower-agent logs to standard error only"
            ),
        );
    }
    if let Some(value) = &old.stderrthreshold {
        note(
            "stderrthreshold",
            format!(
                "--stderrthreshold={value} (KubeSphere's old agent's klog flag) has no \
                 effect: every line tower-agent logs goes to standard error; --v or \
                 TOWER_LOG chooses which"
            ),
        );
    }
    Ok(accepted)
}

/// A boolean as Go's `strconv.ParseBool` reads it (klog's flags are Go flags).
fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn not_a_bool(flag: &str, value: &str) -> String {
    format!("--{flag}={value:?}: not a boolean (true or false)")
}
