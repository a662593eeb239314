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
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use tower_e2e::{
    Https, Member, Process, TempDir, admin_get, admin_token, agent, free_port, kubectl, server,
    wait_for,
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

/// A chromedriver and a headless Chromium session it drives.
struct Browser {
    client: Client,
    _driver: Process,
    _profile: TempDir,
}

impl Browser {
    async fn start(javascript: bool) -> Browser {
        let chromium = tool(&["chromium", "chromium-browser"], "chromium");
        let chromedriver = tool(&["chromedriver"], "chromium-driver");
        let profile = TempDir::new("chromium-profile");
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
        if !javascript {
            options["prefs"] =
                serde_json::json!({ "profile.managed_default_content_settings.javascript": 2 });
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
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
            _driver: driver,
            _profile: profile,
        }
    }

    /// The visible text of the first element matching `css`, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.ok(),
            Err(_) => None,
        }
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
        // The script runs (and refreshes the page in place).
        assert_eq!(b.count("html[data-js=on]").await, 1);
        b.screenshot(&shots, "1-two-connected").await;
    });

    // Traffic to member-1: its numbers move on the page without a reload.
    let kc = server.kubeconfig("member-1", "alice", &[]);
    for _ in 0..3 {
        kubectl(&kc, &["get", "pods"]).success();
    }
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
                (rps != "0" && p50.ends_with("ms") && out != "0 B").then_some(())
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
        // The replicas holding the tunnels.
        assert!(!cell(&b, "member-1", "replicas").await.is_empty());
    });

    // member-2's agent stops: its row turns, and leads the table.
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
        assert_eq!(cell(&b, "member-2", "streams").await, "0");
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
        b.client
            .find(Locator::Id("link-member-1"))
            .await
            .expect("link")
            .click()
            .await
            .expect("follow the link");
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
        b.client
            .find(Locator::Id("agent-yaml-show"))
            .await
            .expect("button")
            .click()
            .await
            .expect("click");
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
