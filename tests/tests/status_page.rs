//! The status page (`/` and `/clusters/{name}` on the admin listener) in a real browser:
//! headless Chromium driven through chromedriver (WebDriver, with the `fantoccini`
//! client), against a real tower-server with two agents, one of them then stopped.
//!
//! Assertions are on the rendered DOM and its visible text, never on pixels. A
//! screenshot of each state goes to `$CARGO_TARGET_TMPDIR/status-page/` (the path is
//! printed). Chromium and chromedriver come from Debian's `chromium` and
//! `chromium-driver` packages (`.ci/run` installs them); without them the test fails,
//! it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tower_e2e::{
    Https, Member, Process, TempDir, admin_get, admin_token, agent, free_port, kubectl,
    kubectl_with_input, metric_value, server, wait_for,
};

/// An executable from PATH or /usr/bin, or a failure that says which package has it.
fn tool(names: &[&str], package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/bin"));
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |d| d.join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{names:?} missing: install Debian's `{package}` package (.ci/run does)")
        })
}

/// A WebDriver command fantoccini has no method for: `method` on `path`, below the
/// session's URL, with a JSON `body`.
#[derive(Debug)]
struct SessionCommand {
    method: http::Method,
    path: String,
    body: Option<Value>,
}

impl WebDriverCompatibleCommand for SessionCommand {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!(
            "session/{}/{}",
            session.unwrap_or_default(),
            self.path
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            self.method.clone(),
            self.body.as_ref().map(Value::to_string),
        )
    }
}

/// A chromedriver and a headless Chromium session it drives.
struct Browser {
    client: Client,
    /// Where Chromium saves downloads.
    downloads: PathBuf,
    _driver: Process,
    _profile: TempDir,
}

impl Browser {
    async fn start(javascript: bool) -> Browser {
        let chromium = tool(&["chromium", "chromium-browser"], "chromium");
        let chromedriver = tool(&["chromedriver"], "chromium-driver");
        let profile = TempDir::new("chromium-profile");
        let downloads = profile.path().join("downloads");
        std::fs::create_dir_all(&downloads).expect("downloads dir");
        let port = free_port();
        let mut command = Command::new(chromedriver);
        command.arg(format!("--port={port}"));
        let (driver, _stdout) = Process::spawn(command, profile.path().join("chromedriver.log"));
        let addr = format!("127.0.0.1:{port}").parse().expect("address");
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            let (code, body) = admin_get(addr, "/status");
            (code == 200 && body.contains("\"ready\":true")).then_some(())
        });
        let mut options = serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.path().join("data").display()),
                "--window-size=1400,900",
            ],
        });
        options["prefs"] = json!({
            "download.default_directory": downloads,
            "download.prompt_for_download": false,
        });
        if !javascript {
            options["prefs"]["profile.managed_default_content_settings.javascript"] = json!(2);
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        // The console's messages, for what failed to load or was refused.
        capabilities.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "starting Chromium through chromedriver: {e}\n{}",
                    std::fs::read_to_string(profile.path().join("chromedriver.log"))
                        .unwrap_or_default()
                )
            });
        Browser {
            client,
            downloads,
            _driver: driver,
            _profile: profile,
        }
    }

    /// Sends a WebDriver command fantoccini has no method for.
    async fn command(&self, method: http::Method, path: String, body: Option<Value>) -> Value {
        let what = format!("{method} {path}");
        self.client
            .issue_cmd(SessionCommand { method, path, body })
            .await
            .unwrap_or_else(|e| panic!("WebDriver {what}: {e}"))
    }

    /// A Chrome DevTools Protocol command, through chromedriver.
    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.command(
            http::Method::POST,
            "goog/cdp/execute".into(),
            Some(json!({ "cmd": cmd, "params": params })),
        )
        .await
    }

    /// The accessible name Chromium computes for the first element matching `css` (its
    /// accessibility tree, as a screen reader gets it: WebDriver's Get Computed Label).
    async fn accessible_name(&self, css: &str) -> String {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        let path = format!("element/{}/computedlabel", element.element_id());
        let name = self.command(http::Method::GET, path, None).await;
        name.as_str().unwrap_or_default().to_owned()
    }

    /// The console's messages since the last call, as "LEVEL message".
    async fn console(&self) -> Vec<String> {
        let body = Some(json!({ "type": "browser" }));
        let log = self
            .command(http::Method::POST, "se/log".into(), body)
            .await;
        log.as_array()
            .into_iter()
            .flatten()
            .map(|entry| format!("{} {}", entry["level"], entry["message"]))
            .collect()
    }

    /// The visible text of the first element matching `css`, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.ok(),
            Err(_) => None,
        }
    }

    /// Clicks the element with id `id` (which must be there), as a person would.
    async fn click(&self, id: &str) {
        self.client
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking #{id}: {e}"));
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.attr(name).await.ok().flatten()
    }

    async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .map_or(0, |all| all.len())
    }

    /// Polls `check` until it gives `Some`, up to `timeout`; fails with `what` and the
    /// page's text.
    async fn until<T, F, Fut>(&self, what: &str, timeout: Duration, check: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > deadline {
                let body = self.text("body").await.unwrap_or_default();
                panic!("timed out after {timeout:?} waiting for {what}; the page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A screenshot of the window into `dir/name.png`.
    async fn screenshot(&self, dir: &Path, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write the screenshot");
    }
}

/// Presses and releases `key` wherever the focus is, as a person at a keyboard does.
async fn press(b: &Browser, key: fantoccini::key::Key) {
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    let key = char::from(key);
    let actions = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: key })
        .then(KeyAction::Up { value: key });
    b.client.perform_actions(actions).await.expect("key press");
}

/// The text of `column` in the row of `cluster`.
async fn cell(b: &Browser, cluster: &str, column: &str) -> String {
    b.text(&format!("#row-{cluster} [data-col={column}]"))
        .await
        .unwrap_or_default()
}

/// How many seconds ago a Since cell says ("12 s ago": 12); a minute or more is `None`.
fn seconds_ago(text: &str) -> Option<u64> {
    text.strip_suffix(" s ago")?.parse().ok()
}

/// The bytes a cell shows ("8.1 KiB", "512 B"), to the precision it shows them.
fn shown_bytes(text: &str) -> f64 {
    let parsed = text.split_once(' ').and_then(|(n, unit)| {
        let n: f64 = n.parse().ok()?;
        let power = ["B", "KiB", "MiB", "GiB", "TiB"]
            .iter()
            .position(|u| *u == unit)?;
        Some(n * 1024f64.powi(i32::try_from(power).ok()?))
    });
    parsed.unwrap_or_else(|| panic!("not a byte count: {text:?}"))
}

/// When `/v1/clusters` says `cluster` connected (RFC 3339, as served).
fn connected_since(server: &tower_e2e::Server, cluster: &str) -> String {
    let list = server.clusters();
    let entry = list
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == cluster))
        .unwrap_or_else(|| panic!("{cluster} not in {list}"));
    entry["connected_since"]
        .as_str()
        .unwrap_or_else(|| panic!("{cluster} not connected: {entry}"))
        .to_owned()
}

/// The head (status line and headers, names lower-cased) of the admin listener's answer
/// to `GET path`.
fn response_head(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).expect("read");
    let response = String::from_utf8_lossy(&response);
    let (head, _) = response.split_once("\r\n\r\n").expect("a head");
    head.lines()
        .map(|line| match line.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The console's errors and warnings (a resource that failed to load, one the policy
/// refused, a script error) since the last look.
async fn console_problems(b: &Browser) -> Vec<String> {
    b.console()
        .await
        .into_iter()
        .filter(|m| m.starts_with("\"SEVERE\"") || m.starts_with("\"WARNING\""))
        .collect()
}

/// agent.yaml with the value of its Secret's `token` (minted afresh on each fetch) left
/// out; fails if there is none.
fn without_token(yaml: &str) -> String {
    let mut found = false;
    let masked = yaml
        .lines()
        .map(|line| match line.strip_prefix("  token: ") {
            Some(token) if !token.is_empty() => {
                found = true;
                "  token: …"
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(found, "no token in\n{yaml}");
    masked
}

/// This replica's id (`--server-id`), which the table shows as holding the tunnels.
const REPLICA: &str = "status-page-replica";

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    eprintln!("status page screenshots: {}", dir.display());
    dir
}

#[test]
fn the_status_page_shows_the_fleet_in_a_real_browser() {
    let shots = screenshots();
    let member = Member::start();
    let dir = TempDir::new("status-page");
    let clusters = dir.path().join("clusters.yaml");
    std::fs::write(
        &clusters,
        "clusters:\n  - name: member-1\n  - name: member-2\n  - name: member-3\n",
    )
    .expect("clusters file");
    let server = server()
        .args(&[
            "--clusters",
            clusters.to_str().expect("path"),
            "--proxy-publish-address",
            "https://tower.example.com:8080",
            "--server-id",
            REPLICA,
        ])
        .start();
    let _first = agent(&server, &member, "member-1").connect(&server);
    let mut second = agent(&server, &member, "member-2").connect(&server);
    let page = format!("http://{}/", server.admin);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let b = runtime.block_on(Browser::start(true));

    // Served with a policy that allows the page's own inline style and script, by their
    // hashes, and nothing else.
    let head = response_head(server.admin, "/");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy:"))
        .unwrap_or_else(|| panic!("no Content-Security-Policy in\n{head}"))
        .trim();
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
    assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");

    // Every registered cluster, connected or not, in a real table.
    runtime.block_on(async {
        b.client.goto(&page).await.expect("open the page");
        assert_eq!(b.count("#clusters tbody tr").await, 3);
        assert_eq!(b.count("#clusters thead th[scope=col]").await, 13);
        assert_eq!(b.count("#clusters tbody th[scope=row]").await, 3);
        assert!(b.text("#clusters caption").await.is_some());
        for (cluster, state, text) in [
            ("member-1", "up", "Connected"),
            ("member-2", "up", "Connected"),
            ("member-3", "never", "Never connected"),
        ] {
            assert_eq!(
                b.attr(&format!("#row-{cluster}"), "data-state")
                    .await
                    .as_deref(),
                Some(state),
                "{cluster}"
            );
            assert!(
                cell(&b, cluster, "state").await.ends_with(text),
                "{cluster}"
            );
        }
        // Problems first: the cluster that never connected leads.
        assert_eq!(
            b.attr("#clusters tbody tr", "data-cluster")
                .await
                .as_deref(),
            Some("member-3")
        );
        let summary = b.text("#summary").await.expect("summary");
        assert_eq!(summary, "3 clusters: 2 connected, 1 never connected");
        assert_eq!(cell(&b, "member-1", "agent").await, "hidden");
        assert_eq!(cell(&b, "member-1", "rps").await, "0");
        assert_eq!(cell(&b, "member-1", "p50").await, "—");
        assert_eq!(cell(&b, "member-1", "bytes-in").await, "0 B");
        // Connected since: a moment ago, the instant /v1/clusters gives in full.
        for cluster in ["member-1", "member-2"] {
            let since = cell(&b, cluster, "since").await;
            let ago = seconds_ago(&since).unwrap_or_else(|| panic!("{cluster}: {since:?}"));
            assert!(ago < 60, "{cluster} connected {since}");
            assert_eq!(
                b.attr(&format!("#row-{cluster} [data-col=since] time"), "datetime")
                    .await,
                Some(connected_since(&server, cluster)),
                "{cluster}"
            );
        }
        // The script runs (and refreshes the page in place).
        assert_eq!(b.count("html[data-js=on]").await, 1);
        // Under the policy above: the inline style applies (the sticky row headers are
        // its), the script ran, and nothing was refused or failed to load.
        let position = b
            .client
            .execute(
                "return getComputedStyle(document.querySelector('#clusters tbody th[scope=row]')).position;",
                vec![],
            )
            .await
            .expect("script");
        assert_eq!(position, "sticky", "the inline style applies");
        let problems = console_problems(&b).await;
        assert!(problems.is_empty(), "the console: {problems:#?}");

        // For a screen reader: each label names an input that exists, and the
        // accessibility tree has it as that input's name; the skip link leads somewhere.
        for (id, name) in [
            ("token", "User token in the admin group (--admin-group)"),
            ("filter", "Filter clusters by name"),
        ] {
            let labelled = b
                .client
                .execute(
                    "const l = document.querySelector(`label[for=\"${arguments[0]}\"]`); return !!l && !!l.control && l.control.id === arguments[0] && l.control.tagName === 'INPUT';",
                    vec![json!(id)],
                )
                .await
                .expect("script");
            assert_eq!(labelled, true, "label[for={id}] names the input #{id}");
            assert_eq!(b.accessible_name(&format!("#{id}")).await, name);
        }
        let target = b
            .client
            .execute(
                "const a = document.querySelector('a[href^=\"#\"]'); const t = a && document.getElementById(a.getAttribute('href').slice(1)); return t ? t.tagName : null;",
                vec![],
            )
            .await
            .expect("script");
        assert_eq!(target, "MAIN", "the skip link's target");
        b.screenshot(&shots, "1-two-connected").await;
    });

    // Traffic to member-1: its numbers move on the page without a reload.
    let kc = server.kubeconfig("member-1", "alice", &[]);
    for _ in 0..3 {
        kubectl(&kc, &["get", "pods"]).success();
    }
    // A request with a body: an 8 KiB value in a ConfigMap.
    let body = 8192;
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sized\n  namespace: default\ndata:\n  k: {}\n",
        "v".repeat(body)
    );
    kubectl_with_input(&kc, &["create", "-f", "-"], manifest.as_bytes()).success();
    let request_bytes = metric_value(
        server.admin,
        "tower_cluster_bytes_total{cluster=\"member-1\",direction=\"request\"}",
    )
    .expect("member-1's request bytes");
    assert!(request_bytes >= body as f64, "{request_bytes}");
    let https = Https::frontend(&server);
    let token =
        tower_e2e::Server::minter().user_token("alice", &[], Some(Duration::from_secs(3600)));
    for _ in 0..20 {
        let reply = https.get(
            "/clusters/member-1/api/v1/namespaces/default/pods",
            Some(&token),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    runtime.block_on(async {
        let marker = b
            .client
            .execute("window.__sameDocument = 1; return 1;", vec![])
            .await
            .expect("mark the document");
        assert_eq!(marker, 1);
        b.until(
            "member-1's figures to move",
            Duration::from_secs(20),
            || async {
                let rps = cell(&b, "member-1", "rps").await;
                let p50 = cell(&b, "member-1", "p50").await;
                let out = cell(&b, "member-1", "bytes-out").await;
                let bytes_in = cell(&b, "member-1", "bytes-in").await;
                (rps != "0"
                    && p50.ends_with("ms")
                    && out != "0 B"
                    && shown_bytes(&bytes_in) >= body as f64)
                    .then_some(())
            },
        )
        .await;
        assert!(
            cell(&b, "member-1", "rps")
                .await
                .parse::<f64>()
                .expect("a number")
                > 0.0
        );
        assert_eq!(cell(&b, "member-1", "errors").await, "0.0 %");
        assert!(cell(&b, "member-1", "p99").await.ends_with("ms"));
        // On loopback the round trip is some microseconds.
        let rtt = cell(&b, "member-1", "rtt").await;
        assert!(rtt.ends_with("µs") || rtt.ends_with("ms"), "{rtt}");
        // member-2 had none.
        assert_eq!(cell(&b, "member-2", "rps").await, "0");
        // Refreshed in place, not reloaded.
        let same = b
            .client
            .execute("return window.__sameDocument === 1;", vec![])
            .await
            .expect("script");
        assert_eq!(same, true, "the page was reloaded instead of refreshed");
        // Everything it loaded (the page, and each refresh since) came from its own
        // origin, whole; nothing failed or was refused.
        let loaded = b
            .client
            .execute(
                "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).map(e => ({ url: e.name, origin: new URL(e.name).origin, status: e.responseStatus, type: e.initiatorType }));",
                vec![],
            )
            .await
            .expect("script");
        let loaded = loaded.as_array().expect("entries");
        assert!(
            loaded.iter().any(|e| e["type"] == "fetch"),
            "a refresh: {loaded:#?}"
        );
        let origin = format!("http://{}", server.admin);
        for entry in loaded {
            assert_eq!(entry["origin"], origin.as_str(), "{entry}");
            assert_eq!(entry["status"], 200, "{entry}");
        }
        let problems = console_problems(&b).await;
        assert!(problems.is_empty(), "the console: {problems:#?}");
        b.screenshot(&shots, "2-after-traffic").await;

        // A token that is not an admin's is refused with the reason, and not kept.
        b.client
            .find(Locator::Id("token"))
            .await
            .expect("token field")
            .send_keys("not-a-token\u{E007}")
            .await
            .expect("type");
        let said = b
            .until("the refusal", Duration::from_secs(10), || async {
                b.text("#token-status")
                    .await
                    .filter(|t| t.starts_with("Token not used"))
            })
            .await;
        assert!(said.contains("user token refused"), "{said}");
        // An admin's token shows the agents' versions.
        b.client
            .find(Locator::Id("token"))
            .await
            .expect("token field")
            .send_keys(&format!("{}\u{E007}", admin_token()))
            .await
            .expect("type");
        b.until("agent versions", Duration::from_secs(10), || async {
            (cell(&b, "member-1", "agent").await == env!("CARGO_PKG_VERSION")).then_some(())
        })
        .await;
        // The replicas holding the tunnels: this one, as /v1/clusters says.
        assert_eq!(cell(&b, "member-1", "replicas").await, REPLICA);
        assert_eq!(
            b.text("header strong").await.as_deref(),
            Some(REPLICA),
            "the replica that answers"
        );
    });
    let listed = server.clusters();
    let member_1 = listed
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == "member-1"))
        .expect("member-1 listed");
    assert_eq!(member_1["replicas"], json!([REPLICA]), "{listed}");

    // Open streams. member-2 has carried no request: only its tunnel's control stream
    // (member-1's connections are pooled, each holding a stream). One more while a
    // download through it is open, back to one when its caller goes.
    let streams = |want: &'static str| {
        let b = &b;
        async move {
            b.until(
                &format!("member-2's streams at {want}"),
                Duration::from_secs(20),
                || async { (cell(b, "member-2", "streams").await == want).then_some(()) },
            )
            .await;
        }
    };
    runtime.block_on(streams("1"));
    let held = https.open("/clusters/member-2/debug/bytes?size=4000000000", &token);
    assert_eq!(held.status, 200, "{}", held.head);
    runtime.block_on(streams("2"));
    drop(held);
    runtime.block_on(streams("1"));

    // member-2's agent stops: its row turns, and leads the table. Since then, not since it
    // connected: a second later, so that the page can tell the two apart.
    let connected = humantime::parse_rfc3339(&connected_since(&server, "member-2")).expect("time");
    wait_for(
        "a second past member-2's connection",
        Duration::from_secs(5),
        || (SystemTime::now() >= connected + Duration::from_secs(1)).then_some(()),
    );
    let killed = SystemTime::now();
    second.process.kill();
    wait_for("member-2 to disconnect", Duration::from_secs(20), || {
        (!server.connected("member-2")).then_some(())
    });
    runtime.block_on(async {
        b.until("member-2 flagged disconnected", Duration::from_secs(15), || async {
            (b.attr("#row-member-2", "data-state").await.as_deref() == Some("down")).then_some(())
        })
        .await;
        assert_eq!(cell(&b, "member-2", "state").await, "▲ Disconnected");
        let since = cell(&b, "member-2", "since").await;
        let ago = seconds_ago(&since).unwrap_or_else(|| panic!("disconnected {since:?}"));
        assert!(ago < 60, "disconnected {since}");
        let at = b
            .attr("#row-member-2 [data-col=since] time", "datetime")
            .await
            .expect("a time");
        let at = humantime::parse_rfc3339(&at).expect("RFC 3339");
        // (The page shows whole seconds.)
        assert!(
            at > connected && at + Duration::from_secs(1) > killed,
            "disconnected since {at:?}: connected {connected:?}, stopped {killed:?}"
        );
        assert_eq!(cell(&b, "member-2", "streams").await, "0");
        assert_eq!(cell(&b, "member-2", "replicas").await, "—");
        assert_eq!(cell(&b, "member-2", "rtt").await, "—");
        assert_eq!(
            b.attr("#clusters tbody tr", "data-cluster").await.as_deref(),
            Some("member-2")
        );
        assert_eq!(
            b.text("#summary").await.as_deref(),
            Some("3 clusters: 1 connected, 1 disconnected, 1 never connected")
        );
        let title = b.client.title().await.expect("title");
        assert_eq!(title, "Tower: 2 of 3 clusters not connected");
        assert_eq!(b.attr("#row-member-1", "data-state").await.as_deref(), Some("up"));
        b.screenshot(&shots, "3-one-disconnected").await;

        // The filter narrows the rows by name, and holds across refreshes.
        let filter = b.client.find(Locator::Id("filter")).await.expect("filter");
        assert!(filter.is_displayed().await.expect("shown"));
        filter.send_keys("member-3").await.expect("type");
        let visible = |id: &'static str| {
            let b = &b;
            async move {
                b.client
                    .find(Locator::Id(id))
                    .await
                    .expect("row")
                    .is_displayed()
                    .await
                    .expect("displayed")
            }
        };
        assert!(visible("row-member-3").await);
        assert!(!visible("row-member-1").await && !visible("row-member-2").await);
        assert_eq!(
            b.text("#filter-status").await.as_deref(),
            Some("1 of 3 clusters match")
        );
        let updated = b.text("#updated").await;
        b.until("a refresh", Duration::from_secs(15), || async {
            (b.text("#updated").await != updated).then_some(())
        })
        .await;
        assert!(!visible("row-member-1").await, "the filter holds across a refresh");
        filter.clear().await.expect("clear");
        filter.send_keys(" ").await.expect("type");
        assert!(visible("row-member-1").await);

        // A narrow window: the table scrolls sideways in its own region, the cluster
        // names stay in view.
        b.client
            .set_window_size(420, 800)
            .await
            .expect("narrow window");
        let scrolls = b
            .client
            .execute(
                "const r = document.querySelector('.scroll'); return r.scrollWidth > r.clientWidth && document.documentElement.scrollWidth <= window.innerWidth + 1;",
                vec![],
            )
            .await
            .expect("script");
        assert_eq!(scrolls, true, "the table scrolls in its region, the page does not");
        let name = b
            .client
            .find(Locator::Css("#link-member-2"))
            .await
            .expect("link");
        assert!(name.is_displayed().await.expect("displayed"));
        b.screenshot(&shots, "4-narrow-window").await;
        b.client
            .set_window_size(1400, 900)
            .await
            .expect("wide window");

        // By keyboard alone: Tab from the top reaches the first row's link (the one
        // that needs attention) past a few controls, and Enter follows it.
        b.client.goto(&page).await.expect("reload");
        let mut reached = None;
        for tabs in 1..=12 {
            press(&b, fantoccini::key::Key::Tab).await;
            let id = b
                .client
                .active_element()
                .await
                .expect("focus")
                .attr("id")
                .await
                .expect("id");
            if tabs == 1 {
                let first = b.client.active_element().await.expect("focus");
                let text = first.text().await.expect("text");
                assert_eq!(text, "Skip to content", "Tab first reaches the skip link");
            }
            if id.as_deref() == Some("link-member-2") {
                reached = Some(tabs);
                break;
            }
        }
        let tabs = reached.expect("Tab reaches the first cluster's link");
        assert!(tabs <= 6, "{tabs} tabs to the first row");
        press(&b, fantoccini::key::Key::Enter).await;
        let heading = b
            .until("member-2's page", Duration::from_secs(10), || async {
                b.text("#cluster-heading").await
            })
            .await;
        assert_eq!(heading, "Cluster member-2: ▲ Disconnected");
        b.client.back().await.expect("back");

        // One cluster: its figures, charts drawn from the samples, and its agent.yaml.
        b.click("link-member-1").await;
        let heading = b
            .until("the cluster page", Duration::from_secs(10), || async {
                b.text("#cluster-heading").await
            })
            .await;
        assert_eq!(heading, "Cluster member-1: ● Connected");
        b.until("a chart with samples", Duration::from_secs(20), || async {
            let n: usize = b.attr("#chart-rps", "data-points").await?.parse().ok()?;
            (n >= 1 && b.count("#chart-rps polyline").await >= 1).then_some(())
        })
        .await;
        for chart in [
            "chart-rps",
            "chart-p99",
            "chart-errors",
            "chart-streams",
            "chart-bytes",
            "chart-rtt",
        ] {
            assert_eq!(b.attr(&format!("#{chart}"), "role").await.as_deref(), Some("img"));
            let caption = b.text(&format!("#{chart}-caption")).await.expect("caption");
            assert!(!caption.contains("no samples"), "{caption}");
            // A screen reader names the image by its caption.
            assert_eq!(b.accessible_name(&format!("#{chart}")).await, caption);
        }
        assert!(b.count("#points tbody tr").await >= 1);
        // agent.yaml with an admin token, sent as a header (never in the URL).
        b.client
            .find(Locator::Id("token"))
            .await
            .expect("token field")
            .send_keys(&format!("{}\u{E007}", admin_token()))
            .await
            .expect("type");
        b.click("agent-yaml-show").await;
        let yaml = b
            .until("agent.yaml", Duration::from_secs(10), || async {
                let area = b.client.find(Locator::Id("agent-yaml")).await.ok()?;
                let text = area.prop("value").await.ok().flatten()?;
                (!text.is_empty() && area.is_displayed().await.ok()?).then_some(text)
            })
            .await;
        assert!(yaml.contains("kind: Deployment"), "{yaml}");
        assert!(yaml.contains("member-1"));
        assert!(yaml.contains("https://tower.example.com:8080"));
        assert!(
            !b.client.current_url().await.expect("url").as_str().contains("eyJ"),
            "the token never goes into a URL"
        );
        b.screenshot(&shots, "5-cluster-page").await;

        // Copy: the clipboard then holds agent.yaml. Read back with the permission a
        // person would grant on the browser's prompt.
        b.cdp(
            "Browser.grantPermissions",
            json!({
                "origin": format!("http://{}", server.admin),
                "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
            }),
        )
        .await;
        let status = |want: &'static str| {
            let b = &b;
            async move {
                b.until(want, Duration::from_secs(10), || async {
                    (b.text("#agent-yaml-status").await.as_deref() == Some(want)).then_some(())
                })
                .await;
            }
        };
        b.click("agent-yaml-copy").await;
        status("Copied agent.yaml to the clipboard.").await;
        let copied = b
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1]; navigator.clipboard.readText().then(done, e => done('clipboard: ' + e));",
                vec![],
            )
            .await
            .expect("script");
        // Each fetch of agent.yaml mints a fresh agent token: what Copy fetched is shown
        // in the text area, and differs from the first only there.
        let shown = b
            .client
            .find(Locator::Id("agent-yaml"))
            .await
            .expect("text area")
            .prop("value")
            .await
            .expect("value")
            .expect("a value");
        assert_eq!(copied.as_str(), Some(shown.as_str()), "the clipboard");
        assert_eq!(without_token(&shown), without_token(&yaml));

        // Download: a file named for the cluster, holding agent.yaml.
        b.click("agent-yaml-download").await;
        status("Downloaded member-1-agent.yaml.").await;
        let file = b.downloads.join("member-1-agent.yaml");
        let downloaded = b
            .until("the download", Duration::from_secs(10), || async {
                std::fs::read_to_string(&file).ok().filter(|t| !t.is_empty())
            })
            .await;
        assert_eq!(
            without_token(&downloaded),
            without_token(&yaml),
            "{}",
            file.display()
        );
        b.client.clone().close().await.expect("close");
    });

    // Without JavaScript the table is all there, and the page reloads itself.
    runtime.block_on(async {
        let b = Browser::start(false).await;
        b.client.goto(&page).await.expect("open the page");
        assert_eq!(b.count("html[data-js]").await, 0, "JavaScript is off");
        assert_eq!(b.count("#clusters tbody tr").await, 3);
        assert_eq!(cell(&b, "member-2", "state").await, "▲ Disconnected");
        assert_eq!(cell(&b, "member-1", "state").await, "● Connected");
        assert!(cell(&b, "member-1", "rps").await.parse::<f64>().is_ok());
        assert_eq!(b.count("noscript").await, 2);
        let filter = b.client.find(Locator::Id("filter")).await.expect("filter");
        assert!(
            !filter.is_displayed().await.expect("displayed"),
            "no filter without JavaScript"
        );
        let body = b.text("body").await.unwrap_or_default();
        assert!(
            body.contains("Without JavaScript the page cannot send a token"),
            "{body}"
        );
        b.screenshot(&shots, "6-without-javascript").await;
        // It reloads itself (a meta refresh, inside <noscript>).
        let updated = b.text("#updated").await;
        b.until(
            "a reload without JavaScript",
            Duration::from_secs(20),
            || async {
                let now = b.text("#updated").await;
                (now.is_some() && now != updated).then_some(())
            },
        )
        .await;
        assert_eq!(b.count("#clusters tbody tr").await, 3);
        b.client.close().await.expect("close");
    });
}
