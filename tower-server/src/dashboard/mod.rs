//! The status page on the admin listener: `/` (every cluster the registry knows) and
//! `/clusters/{name}` (one cluster over the last minutes, with charts and its agent.yaml).
//!
//! Rendered here, in full, on every request: the page works without JavaScript (it then
//! reloads itself), and with it, its script fetches the same page every few seconds and
//! swaps the live part in, so there is one renderer. Nothing is loaded from elsewhere:
//! the style and the script are inline (allowed by their hashes in the
//! Content-Security-Policy, which allows nothing else), the charts are inline SVG, and
//! the icon comes from this listener.
//! A token typed on the page goes only in an `Authorization` header, to this listener.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sha2::Digest as _;

use crate::history::{POINTS, Point, Recent, SAMPLE_EVERY, WINDOW};

const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("page.js");
/// The page's icon, served at [`ICON_PATH`]: declared, so that no browser asks for a
/// `/favicon.ico` that is not there (a failed load on every visit).
pub(crate) const ICON: &str = include_str!("icon.svg");
/// Where the admin listener serves [`ICON`].
pub(crate) const ICON_PATH: &str = "/favicon.svg";
/// How often the page refreshes itself (with or without JavaScript), seconds.
pub(crate) const REFRESH_SECONDS: u64 = 5;

/// The page's Content-Security-Policy: its own inline style and script, by hash, and
/// requests to this listener; nothing else.
pub(crate) static CSP: LazyLock<String> = LazyLock::new(|| {
    let hash = |s: &str| base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(s));
    format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; connect-src 'self'; img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(STYLE),
        hash(SCRIPT)
    )
});

/// Whether a cluster's agent is connected to this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum State {
    /// It was connected and is not now.
    Disconnected,
    /// Registered, never connected to this replica.
    NeverConnected,
    /// A tunnel is up.
    Connected,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Connected => "Connected",
            State::Disconnected => "Disconnected",
            State::NeverConnected => "Never connected",
        }
    }

    /// The `data-state` attribute and CSS class.
    fn key(self) -> &'static str {
        match self {
            State::Connected => "up",
            State::Disconnected => "down",
            State::NeverConnected => "never",
        }
    }

    /// Shown beside the label, so the state is never told by colour alone.
    fn mark(self) -> &'static str {
        match self {
            State::Connected => "●",
            State::Disconnected => "▲",
            State::NeverConnected => "○",
        }
    }
}

/// One cluster as the page shows it.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) state: State,
    /// When the state began (connected since, disconnected since, registered since).
    pub(crate) since: SystemTime,
    /// Only for an admin (see `admin.rs`); `None` otherwise.
    pub(crate) agent_version: Option<String>,
    pub(crate) replicas: Vec<String>,
    pub(crate) streams: usize,
    pub(crate) recent: Recent,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    pub(crate) rtt: Option<Duration>,
}

/// What every page shows at its top.
#[derive(Debug, Clone)]
pub(crate) struct Context<'a> {
    pub(crate) server_id: &'a str,
    pub(crate) now: SystemTime,
    /// Whether the figures include what an admin token unlocks.
    pub(crate) admin: bool,
}

/// The rows of every cluster `registry` knows (or only `only`), with the agent versions
/// when `admin`.
pub(crate) fn rows(
    registry: &crate::registry::Registry,
    history: &crate::history::History,
    only: Option<&str>,
    admin: bool,
) -> Vec<Row> {
    registry
        .status()
        .into_iter()
        .filter(|s| only.is_none_or(|name| s.name == name))
        .filter_map(|s| {
            let metrics = registry.metrics_of(&s.name)?;
            let tunnel = registry.tunnel(&s.name).ok();
            let state = if s.connected {
                State::Connected
            } else if registry.ever_connected(&s.name) {
                State::Disconnected
            } else {
                State::NeverConnected
            };
            let since = s
                .connected_since
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .unwrap_or_else(|| metrics.state_since());
            let totals = metrics.totals();
            Some(Row {
                recent: history.recent(&s.name, &metrics),
                state,
                since,
                agent_version: s.agent_version.filter(|_| admin),
                replicas: s.replicas,
                streams: s.streams,
                request_bytes: totals.request_bytes,
                response_bytes: totals.response_bytes,
                rtt: tunnel.and_then(|t| t.health.rtt()),
                name: s.name,
            })
        })
        .collect()
}

/// Escapes `s` for HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const NONE: &str = "—";

fn rate(rps: f64) -> String {
    if rps == 0.0 {
        "0".into()
    } else if rps < 10.0 {
        format!("{rps:.2}")
    } else {
        format!("{rps:.0}")
    }
}

fn seconds(s: Option<f64>) -> String {
    match s {
        None => NONE.into(),
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

fn percent(r: Option<f64>) -> String {
    match r {
        None => NONE.into(),
        Some(r) => format!("{:.1} %", r * 100.0),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "3 min" for how long ago `then` was.
fn ago(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).unwrap_or_default().as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A `<time>` for `then`: how long ago, with the instant in full for machines and hover.
fn time(now: SystemTime, then: SystemTime) -> String {
    let at = rfc3339(then);
    format!(
        "<time datetime=\"{at}\" title=\"{at}\">{} ago</time>",
        ago(now, then)
    )
}

/// The page around `live` (what the script refreshes), `before` and `after` it (what it
/// does not).
fn page(
    title: &str,
    ctx: &Context<'_>,
    data: &str,
    before: &str,
    live: &str,
    after: &str,
) -> String {
    let mut out =
        String::with_capacity(live.len() + after.len() + STYLE.len() + SCRIPT.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n\
         <link rel=\"icon\" href=\"{ICON_PATH}\" type=\"image/svg+xml\">\n\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\"></noscript>\n\
         <style>{STYLE}</style>\n</head>\n\
         <body data-refresh=\"{REFRESH_SECONDS}\"{data}>\n\
         <a class=\"muted\" href=\"#main\">Skip to content</a>\n\
         <header><h1><a href=\"/\">Tower</a></h1>\
         <p class=\"muted\">replica <strong>{server}</strong> · updated <span id=\"updated\">{updated}</span> · \
         refreshes every {REFRESH_SECONDS} s <span id=\"refresh-status\" role=\"status\"></span></p></header>\n\
         <main id=\"main\">\n{before}<div id=\"live\">\n{live}</div>\n{after}</main>\n\
         <script>{SCRIPT}</script>\n</body>\n</html>\n",
        title = esc(title),
        server = esc(ctx.server_id),
        updated = rfc3339(ctx.now),
    );
    out
}

/// The token form; with it, agent versions show and agent.yaml can be fetched.
fn token_form(what: &str) -> String {
    format!(
        "<section aria-labelledby=\"token-heading\">\n<h2 id=\"token-heading\">Admin token</h2>\n\
         <form id=\"token-form\"><label for=\"token\">User token in the admin group (<code>--admin-group</code>)</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" spellcheck=\"false\" aria-describedby=\"token-help\">\
         <button type=\"submit\">Use token</button></form>\n\
         <p id=\"token-help\" class=\"muted\">{what} The token stays in this page's memory and goes only in an \
         <code>Authorization</code> header to this listener, which answers only on a loopback address: reach it with \
         <code>kubectl -n ke-system port-forward deploy/tower 9090</code>. Mint one with \
         <code>tower-server user-token --user admin --group system:masters --ttl 10m</code>.</p>\n\
         <p id=\"token-status\" role=\"status\"></p>\n\
         <noscript><p>Without JavaScript the page cannot send a token: use <code>curl -H 'Authorization: Bearer …'</code>.</p></noscript>\n\
         </section>\n"
    )
}

/// The fleet: one row per cluster, problems first.
pub(crate) fn overview(ctx: &Context<'_>, rows: &[Row]) -> String {
    let mut rows: Vec<&Row> = rows.iter().collect();
    rows.sort_by(|a, b| (a.state, &a.name).cmp(&(b.state, &b.name)));
    let count = |s: State| rows.iter().filter(|r| r.state == s).count();
    let (up, down, never) = (
        count(State::Connected),
        count(State::Disconnected),
        count(State::NeverConnected),
    );
    let title = if down + never == 0 {
        format!("Tower: {up} of {} clusters connected", rows.len())
    } else {
        format!(
            "Tower: {} of {} clusters not connected",
            down + never,
            rows.len()
        )
    };
    let mut live = String::new();
    let _ = write!(
        live,
        "<p id=\"summary\" class=\"summary\">{} cluster{}: {up} connected",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    if down > 0 {
        let _ = write!(live, ", <span class=\"bad\">{down} disconnected</span>");
    }
    if never > 0 {
        let _ = write!(live, ", <span class=\"bad\">{never} never connected</span>");
    }
    let _ = write!(
        live,
        "</p>\n<div class=\"scroll\" role=\"region\" aria-labelledby=\"caption\" tabindex=\"0\">\n\
         <table id=\"clusters\">\n<caption id=\"caption\">Member clusters as replica {server} sees them; \
         rates, latency and errors over the last {window} s, bytes since the cluster registered</caption>\n<thead><tr>\
         <th scope=\"col\" class=\"text\">Cluster</th><th scope=\"col\" class=\"text\">State</th>\
         <th scope=\"col\" class=\"text\">Since</th><th scope=\"col\" class=\"text\">Agent</th>\
         <th scope=\"col\" class=\"text\">Replicas</th><th scope=\"col\">Streams</th>\
         <th scope=\"col\"><abbr title=\"requests per second\">Req/s</abbr></th>\
         <th scope=\"col\"><abbr title=\"median request duration\">p50</abbr></th>\
         <th scope=\"col\"><abbr title=\"99th percentile request duration\">p99</abbr></th>\
         <th scope=\"col\"><abbr title=\"share of requests answered 5xx\">Errors</abbr></th>\
         <th scope=\"col\"><abbr title=\"request bodies, caller to member\">Bytes in</abbr></th>\
         <th scope=\"col\"><abbr title=\"response bodies, member to caller\">Bytes out</abbr></th>\
         <th scope=\"col\"><abbr title=\"round trip of the tunnel's keepalive ping\">RTT</abbr></th>\
         </tr></thead>\n<tbody>\n",
        server = esc(ctx.server_id),
        window = WINDOW.as_secs(),
    );
    if rows.is_empty() {
        live.push_str(
            "<tr><td class=\"text\" colspan=\"13\">No clusters yet: register one (a clusters file entry or a Cluster object) or connect an agent.</td></tr>\n",
        );
    }
    for row in &rows {
        let name = esc(&row.name);
        let version = match (&row.agent_version, ctx.admin) {
            (Some(v), true) => esc(v),
            (None, true) => NONE.into(),
            (_, false) => "<span class=\"muted\" title=\"enter an admin token to see agent versions\">hidden</span>".into(),
        };
        let replicas = if row.replicas.is_empty() {
            NONE.into()
        } else {
            esc(&row.replicas.join(", "))
        };
        let _ = writeln!(
            live,
            "<tr id=\"row-{name}\" data-cluster=\"{name}\" data-state=\"{key}\" class=\"{key}\">\
             <th scope=\"row\"><a id=\"link-{name}\" href=\"/clusters/{name}\">{name}</a></th>\
             <td class=\"text\" data-col=\"state\"><span class=\"state {key}\">{mark} {label}</span></td>\
             <td class=\"text\" data-col=\"since\">{since}</td>\
             <td class=\"text\" data-col=\"agent\">{version}</td>\
             <td class=\"text\" data-col=\"replicas\">{replicas}</td>\
             <td data-col=\"streams\">{streams}</td>\
             <td data-col=\"rps\">{rps}</td><td data-col=\"p50\">{p50}</td><td data-col=\"p99\">{p99}</td>\
             <td data-col=\"errors\">{errors}</td>\
             <td data-col=\"bytes-in\">{bin}</td><td data-col=\"bytes-out\">{bout}</td>\
             <td data-col=\"rtt\">{rtt}</td></tr>",
            key = row.state.key(),
            mark = row.state.mark(),
            label = row.state.label(),
            since = time(ctx.now, row.since),
            streams = row.streams,
            rps = rate(row.recent.rps),
            p50 = seconds(row.recent.p50),
            p99 = seconds(row.recent.p99),
            errors = percent(row.recent.error_ratio),
            bin = bytes(row.request_bytes),
            bout = bytes(row.response_bytes),
            rtt = seconds(row.rtt.map(|d| d.as_secs_f64())),
        );
    }
    live.push_str("</tbody>\n</table>\n</div>\n");
    let after = token_form("With an admin token, the table shows each cluster's agent version.");
    // Outside the live part, so that what is typed survives the refresh.
    let filter = "<div id=\"filter-box\" hidden><form role=\"search\" id=\"filter-form\">\
                  <label for=\"filter\">Filter clusters by name</label> \
                  <input id=\"filter\" type=\"search\" autocomplete=\"off\" spellcheck=\"false\">\
                  <span id=\"filter-status\" role=\"status\"></span></form></div>\n";
    page(&title, ctx, "", filter, &live, &after)
}

/// One cluster: its figures now and over the last minutes, and its agent.yaml.
pub(crate) fn cluster(ctx: &Context<'_>, row: &Row, points: &[Point]) -> String {
    let name = esc(&row.name);
    let title = format!("Tower: {} ({})", row.name, row.state.label().to_lowercase());
    let mut live = String::new();
    let _ = write!(
        live,
        "<p><a href=\"/\">← All clusters</a></p>\n<h2 id=\"cluster-heading\">Cluster {name}: \
         <span id=\"state\" class=\"state {key}\" data-state=\"{key}\">{mark} {label}</span></h2>\n\
         <dl class=\"figures\" aria-labelledby=\"cluster-heading\">\n",
        key = row.state.key(),
        mark = row.state.mark(),
        label = row.state.label(),
    );
    let version = match (&row.agent_version, ctx.admin) {
        (Some(v), true) => esc(v),
        (None, true) => NONE.into(),
        (_, false) => "hidden (admin token)".into(),
    };
    let replicas = if row.replicas.is_empty() {
        NONE.into()
    } else {
        esc(&row.replicas.join(", "))
    };
    for (id, term, value) in [
        ("since", "Since", time(ctx.now, row.since)),
        ("agent", "Agent version", version),
        ("replicas", "Replicas holding its tunnels", replicas),
        ("streams", "Open streams", row.streams.to_string()),
        ("rps", "Requests per second (1 min)", rate(row.recent.rps)),
        ("p50", "p50 latency (1 min)", seconds(row.recent.p50)),
        ("p99", "p99 latency (1 min)", seconds(row.recent.p99)),
        (
            "errors",
            "Errors, 5xx (1 min)",
            percent(row.recent.error_ratio),
        ),
        ("bytes-in", "Bytes in", bytes(row.request_bytes)),
        ("bytes-out", "Bytes out", bytes(row.response_bytes)),
        (
            "rtt",
            "Tunnel RTT",
            seconds(row.rtt.map(|d| d.as_secs_f64())),
        ),
    ] {
        let _ = writeln!(
            live,
            "<div><dt>{term}</dt><dd data-figure=\"{id}\">{value}</dd></div>"
        );
    }
    live.push_str("</dl>\n");
    let span = SAMPLE_EVERY * POINTS as u32;
    let _ = writeln!(
        live,
        "<h3>Last {} minutes <span class=\"muted\">(a point every {} s; shaded: no tunnel)</span></h3>\n<div class=\"charts\">",
        span.as_secs() / 60,
        SAMPLE_EVERY.as_secs()
    );
    live.push_str(&chart(
        "chart-rps",
        "Requests per second",
        points,
        |p| Some(p.rps),
        rate,
    ));
    live.push_str(&chart(
        "chart-p99",
        "p99 latency",
        points,
        |p| p.p99,
        |v| seconds(Some(v)),
    ));
    live.push_str(&chart(
        "chart-errors",
        "Errors (5xx)",
        points,
        |p| p.error_ratio,
        |v| percent(Some(v)),
    ));
    live.push_str(&chart(
        "chart-streams",
        "Open streams",
        points,
        |p| Some(p.streams as f64),
        |v| format!("{v:.0}"),
    ));
    live.push_str(&chart(
        "chart-bytes",
        "Bytes out per second",
        points,
        |p| Some(p.bytes_out),
        |v| format!("{}/s", bytes(v as u64)),
    ));
    live.push_str(&chart(
        "chart-rtt",
        "Tunnel round trip",
        points,
        |p| p.rtt,
        |v| seconds(Some(v)),
    ));
    live.push_str("</div>\n");
    // The charts' data as a table, for screen readers and for copying.
    let _ = write!(
        live,
        "<details><summary>The charts' data</summary>\n<div class=\"scroll\" role=\"region\" aria-label=\"chart data\" tabindex=\"0\">\
         <table id=\"points\"><caption>Samples of cluster {name}, oldest first</caption>\n<thead><tr>\
         <th scope=\"col\" class=\"text\">Time</th><th scope=\"col\" class=\"text\">Tunnel</th><th scope=\"col\">Req/s</th>\
         <th scope=\"col\">p50</th><th scope=\"col\">p99</th><th scope=\"col\">Errors</th><th scope=\"col\">Streams</th>\
         <th scope=\"col\">Bytes in/s</th><th scope=\"col\">Bytes out/s</th>\
         <th scope=\"col\">RTT</th></tr></thead>\n<tbody>\n"
    );
    for p in points {
        let _ = writeln!(
            live,
            "<tr><th scope=\"row\">{}</th><td class=\"text\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            rfc3339(p.at),
            if p.up { "up" } else { "down" },
            rate(p.rps),
            seconds(p.p50),
            seconds(p.p99),
            percent(p.error_ratio),
            p.streams,
            bytes(p.bytes_in as u64),
            bytes(p.bytes_out as u64),
            seconds(p.rtt),
        );
    }
    live.push_str("</tbody></table></div></details>\n");
    let mut after = token_form(
        "With an admin token, the figures show the agent version, and the cluster's agent.yaml can be shown, copied or downloaded.",
    );
    let _ = write!(
        after,
        "<section aria-labelledby=\"agent-yaml-heading\">\n<h2 id=\"agent-yaml-heading\">agent.yaml</h2>\n\
         <p>The member's manifest: apply it on cluster {name} with <code>kubectl create -f agent.yaml</code>. \
         It holds the agent token and the cluster key: treat it as a secret.</p>\n\
         <div id=\"agent-yaml-actions\"><button type=\"button\" id=\"agent-yaml-show\">Show agent.yaml</button> \
         <button type=\"button\" id=\"agent-yaml-copy\">Copy</button> \
         <button type=\"button\" id=\"agent-yaml-download\">Download</button></div>\n\
         <p id=\"agent-yaml-status\" role=\"status\"></p>\n\
         <textarea id=\"agent-yaml\" class=\"hidden\" readonly spellcheck=\"false\" aria-label=\"agent.yaml of {name}\"></textarea>\n</section>\n"
    );
    let data =
        format!(" data-cluster=\"{name}\" data-agent-yaml=\"/v1/clusters/{name}/agent.yaml\"");
    page(&title, ctx, &data, "", &live, &after)
}

/// A line chart of `value` over `points`, as inline SVG with a text alternative.
fn chart(
    id: &str,
    what: &str,
    points: &[Point],
    value: impl Fn(&Point) -> Option<f64>,
    show: impl Fn(f64) -> String,
) -> String {
    const W: f64 = 300.0;
    const H: f64 = 90.0;
    const TOP: f64 = 12.0;
    let values: Vec<Option<f64>> = points.iter().map(&value).collect();
    let max = values.iter().flatten().copied().fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let slot = W / (POINTS.max(2) - 1) as f64;
    // Right-aligned: the newest point at the right edge.
    let x = |i: usize| W - (points.len() - 1 - i) as f64 * slot;
    let y = |v: f64| H - (v / scale) * (H - TOP);
    // Runs of consecutive values become polylines; a lone value, a dot.
    let mut lines = String::new();
    let mut run: Vec<(f64, f64)> = Vec::new();
    let flush = |run: &mut Vec<(f64, f64)>, lines: &mut String| {
        match run.as_slice() {
            [] => {}
            [(cx, cy)] => {
                let _ = write!(
                    lines,
                    "<circle class=\"dot\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2.5\"/>"
                );
            }
            _ => {
                let points: Vec<String> =
                    run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = write!(
                    lines,
                    "<polyline class=\"line\" points=\"{}\"/>",
                    points.join(" ")
                );
            }
        }
        run.clear();
    };
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => run.push((x(i), y(*v))),
            None => flush(&mut run, &mut lines),
        }
    }
    flush(&mut run, &mut lines);
    let mut gaps = String::new();
    for (i, p) in points.iter().enumerate() {
        if !p.up {
            let _ = write!(
                gaps,
                "<rect class=\"gap\" x=\"{:.1}\" y=\"0\" width=\"{:.1}\" height=\"{H}\"/>",
                (x(i) - slot / 2.0).max(0.0),
                slot
            );
        }
    }
    let last = values.last().copied().flatten();
    let summary = match (points.is_empty(), last) {
        (true, _) => "no samples yet".to_owned(),
        (false, Some(now)) => format!("now {}, highest {}", show(now), show(max)),
        (false, None) => format!("no value now, highest {}", show(max)),
    };
    format!(
        "<figure><figcaption id=\"{id}-caption\">{what}: {summary}</figcaption>\
         <svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-labelledby=\"{id}-caption\" data-points=\"{n}\">\
         {gaps}<line class=\"grid\" x1=\"0\" y1=\"{TOP}\" x2=\"{W}\" y2=\"{TOP}\"/>\
         <line class=\"grid\" x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\"/>\
         <text x=\"2\" y=\"10\">{top}</text>{lines}</svg></figure>\n",
        n = points.len(),
        top = esc(&show(max)),
    )
}

/// The page for a cluster the registry does not know.
pub(crate) fn not_found(ctx: &Context<'_>, name: &str) -> String {
    let live = format!(
        "<p><a href=\"/\">← All clusters</a></p>\n<h2>No cluster {}</h2>\n<p>This replica's registry does not list it.</p>\n",
        esc(name)
    );
    page("Tower: no such cluster", ctx, "", "", &live, "")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(name: &str, state: State) -> Row {
        Row {
            name: name.into(),
            state,
            since: SystemTime::now() - Duration::from_secs(125),
            agent_version: Some("9.9.9<script>".into()),
            replicas: vec!["tower-0".into(), "<b>evil</b>".into()],
            streams: 3,
            recent: Recent {
                rps: 2.5,
                p50: Some(0.004),
                p99: Some(0.2),
                error_ratio: Some(0.01),
                requests: 150,
                window: WINDOW,
            },
            request_bytes: 2048,
            response_bytes: 5 * 1024 * 1024,
            rtt: Some(Duration::from_micros(1500)),
        }
    }

    fn ctx(admin: bool) -> Context<'static> {
        Context {
            server_id: "tower-0",
            now: SystemTime::now(),
            admin,
        }
    }

    #[test]
    fn overview_lists_problems_first_and_escapes_what_peers_sent() {
        let html = overview(
            &ctx(false),
            &[
                row("b-up", State::Connected),
                row("a-up", State::Connected),
                row("z-down", State::Disconnected),
                row("m-new", State::NeverConnected),
            ],
        );
        let order: Vec<usize> = ["row-z-down", "row-m-new", "row-a-up", "row-b-up"]
            .iter()
            .map(|id| html.find(id).unwrap())
            .collect();
        assert!(order.is_sorted(), "{order:?}");
        assert!(html.contains("2 of 4 clusters not connected"));
        assert!(html.contains("&lt;b&gt;evil&lt;/b&gt;"));
        assert!(!html.contains("<b>evil"));
        // Versions only for an admin.
        assert!(!html.contains("9.9.9"));
        let admin = overview(&ctx(true), &[row("a", State::Connected)]);
        assert!(admin.contains("9.9.9&lt;script&gt;"));
        assert!(html.contains(
            "<th scope=\"row\"><a id=\"link-a-up\" href=\"/clusters/a-up\">a-up</a></th>"
        ));
        for figure in [
            "2.50",
            "4.0 ms",
            "200.0 ms",
            "1.0 %",
            "2.0 KiB",
            "5.0 MiB",
            "1.5 ms",
            "2 min ago",
        ] {
            assert!(html.contains(figure), "{figure} in {html}");
        }
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_style_and_script() {
        let csp = CSP.as_str();
        assert!(csp.starts_with("default-src 'none'"));
        assert_eq!(csp.matches("'sha256-").count(), 2);
        assert!(!csp.contains("unsafe"));
        // Inline style attributes would be refused by that policy.
        let html = cluster(&ctx(false), &row("a", State::Connected), &[]);
        assert!(!html.contains(" style="));
        // The icon is declared, from this listener (`img-src 'self'`), so that the
        // browser asks for no /favicon.ico.
        assert!(html.contains("<link rel=\"icon\" href=\"/favicon.svg\""));
        assert!(csp.contains("img-src 'self'"));
        assert!(ICON.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    }

    #[test]
    fn charts_break_where_there_is_no_value_and_say_what_they_show() {
        let at = SystemTime::now();
        let p = |rps: f64, up: bool, rtt: Option<f64>| Point {
            at,
            rps,
            p50: None,
            p99: None,
            error_ratio: None,
            rtt,
            streams: 0,
            up,
            bytes_in: 0.0,
            bytes_out: 0.0,
        };
        let points = [
            p(1.0, true, Some(0.002)),
            p(4.0, true, Some(0.004)),
            p(0.0, false, None),
            p(2.0, true, Some(0.003)),
        ];
        let svg = chart(
            "c",
            "Tunnel round trip",
            &points,
            |p| p.rtt,
            |v| seconds(Some(v)),
        );
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(
            svg.matches("<circle").count(),
            1,
            "a lone value is a dot: {svg}"
        );
        assert_eq!(svg.matches("class=\"gap\"").count(), 1);
        assert!(
            svg.contains("Tunnel round trip: now 3.0 ms, highest 4.0 ms"),
            "{svg}"
        );
        let empty = chart("c", "Requests", &[], |p| Some(p.rps), rate);
        assert!(empty.contains("no samples yet"));
    }
}
