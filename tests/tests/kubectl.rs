//! kubectl, unchanged, through tower-server and tower-agent to the stand-in member.

use std::io::{Read, Write};
use std::time::Duration;

use tower_e2e::{
    Agent, CURRENT_THREAD_LOG, KubectlStream, Member, Server, agent, kubectl, kubectl_with_input,
    server, wait_for_with,
};

const WAIT: Duration = Duration::from_secs(30);

/// Waits until no watch, log stream, exec, attach or port-forward session is open at the
/// member's API server: what a caller leaves must not stay open behind the tunnel.
fn member_streams_close(member: &Member) {
    wait_for_with(
        "the member's streams to close",
        WAIT,
        || (member.api.open_streams() == 0).then_some(()),
        || format!("{} still open at the member", member.api.open_streams()),
    );
}

/// Both processes run the current-thread runtime, as on one CPU (their logs say so).
fn on_current_thread(server: &Server, agent: &Agent) {
    for (who, log) in [
        ("server", server.process.log()),
        ("agent", agent.process.log()),
    ] {
        assert!(log.contains(CURRENT_THREAD_LOG), "{who}: {log}");
    }
}

#[test]
fn get_create_replace_delete_and_large_lists() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &["devs", "ops"]);

    let pods = kubectl(&kc, &["get", "pods", "-n", "default", "-o", "name"]).success();
    assert!(
        pods.contains("pod/web-0") && pods.contains("pod/web-1"),
        "{pods}"
    );
    let table = kubectl(&kc, &["get", "pods", "-A"]).success();
    assert!(table.contains("web-0"), "{table}");

    let dir = tower_e2e::TempDir::new("manifests");
    let manifest = |value: &str| {
        let path = dir.path().join(format!("cm-{value}.yaml"));
        std::fs::write(
            &path,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tower-e2e\n  namespace: default\ndata:\n  key: {value}\n"),
        )
        .expect("manifest");
        path
    };
    let v1 = manifest("one");
    let v2 = manifest("two");
    kubectl(&kc, &["create", "-f", v1.to_str().expect("path")]).success();
    let get_value = || {
        kubectl(
            &kc,
            &[
                "get",
                "configmap",
                "tower-e2e",
                "-n",
                "default",
                "-o",
                "jsonpath={.data.key}",
            ],
        )
    };
    assert_eq!(get_value().success(), "one");
    kubectl(&kc, &["replace", "-f", v2.to_str().expect("path")]).success();
    assert_eq!(get_value().success(), "two");
    let again = kubectl(&kc, &["create", "-f", v1.to_str().expect("path")]);
    assert_ne!(again.code(), Some(0));
    assert!(
        again.stderr().contains("AlreadyExists") || again.stderr().contains("already exists"),
        "{}",
        again.stderr()
    );
    kubectl(&kc, &["delete", "configmap", "tower-e2e", "-n", "default"]).success();
    let gone = get_value();
    assert_ne!(gone.code(), Some(0));
    assert!(
        gone.stderr().contains("NotFound") || gone.stderr().contains("not found"),
        "{}",
        gone.stderr()
    );

    // A list of more than 50 MB arrives whole.
    let json = kubectl(&kc, &["get", "configmaps", "-n", "bulk", "-o", "json"]).success();
    assert!(
        json.len() >= 50 * 1024 * 1024,
        "list was {} bytes",
        json.len()
    );
    let list: serde_json::Value = serde_json::from_str(&json).expect("complete JSON");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 550, "every configmap the stand-in seeded");
    const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["metadata"]["name"], format!("bulk-{i:04}"));
        // Each payload is 100 KiB of the alphabet, rotated by the item's index.
        let payload = item["data"]["payload"].as_str().expect("payload");
        let expected = ALPHABET.chars().cycle().skip(i % ALPHABET.len());
        assert!(
            payload.len() == 100 * 1024 && payload.chars().zip(expected).all(|(a, b)| a == b),
            "payload of bulk-{i:04} arrived intact"
        );
    }
    // kubectl lists in pages of 500 (`--chunk-size`), as the member's API server pages
    // (limit and continue): two pages for 550. It asked for gzip (Go's HTTP transport
    // does), so the member sent each page compressed, and they arrived intact through
    // the tunnel: kubectl read them above.
    let pages: Vec<_> = member
        .api
        .calls()
        .into_iter()
        .filter(|c| {
            c.path_and_query
                .starts_with("/api/v1/namespaces/bulk/configmaps")
        })
        .collect();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(pages[0].path_and_query.contains("limit=500"), "{pages:?}");
    assert!(pages[1].path_and_query.contains("continue="), "{pages:?}");
    for page in &pages {
        assert_eq!(page.accept_encoding.as_deref(), Some("gzip"), "{page:?}");
    }
    assert_eq!(member.api.gzipped_responses(), 2);

    // The member saw the agent's own credential and the JWT's user and groups, never
    // the caller's JWT.
    let calls = member.api.calls();
    assert!(!calls.is_empty());
    for call in &calls {
        assert_eq!(call.credential, "token", "{call:?}");
        assert_eq!(call.impersonate_user.as_deref(), Some("alice"), "{call:?}");
        assert_eq!(call.impersonate_groups, ["devs", "ops"], "{call:?}");
        // No watches here: everything took the agent's HTTP/1.1 pool.
        assert_eq!(call.version, http::Version::HTTP_11, "{call:?}");
    }
}

#[test]
fn apply_patch_and_attach_through_the_tunnel() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "frank", &["devs"]);
    let manifest = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: default\ndata:\n  key: {value}\n"
        )
    };
    let value = || {
        kubectl(
            &kc,
            &["get", "configmap", "applied", "-o", "jsonpath={.data.key}"],
        )
        .success()
    };
    // Client-side apply: create, then a three-way strategic-merge PATCH.
    let out = kubectl_with_input(&kc, &["apply", "-f", "-"], manifest("one").as_bytes());
    assert_eq!(out.success().trim(), "configmap/applied created");
    let out = kubectl_with_input(&kc, &["apply", "-f", "-"], manifest("two").as_bytes());
    assert_eq!(out.success().trim(), "configmap/applied configured");
    assert_eq!(value(), "two");
    // A merge patch.
    kubectl(
        &kc,
        &[
            "patch",
            "configmap",
            "applied",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"key":"three"}}"#,
        ],
    )
    .success();
    assert_eq!(value(), "three");
    // Server-side apply: a PATCH whose body type (application/apply-patch+yaml) the member
    // must see unchanged. The member's apiserver refuses it: `data.key` now belongs to
    // kubectl-patch, and its 409 (a Status with a cause per field) reaches kubectl whole.
    let refused = kubectl_with_input(
        &kc,
        &["apply", "--server-side", "-f", "-"],
        manifest("four").as_bytes(),
    );
    assert_eq!(refused.code(), Some(1), "{}", refused.stderr());
    assert!(
        refused.stderr().contains(
            "Apply failed with 1 conflict: conflict with \"kubectl-patch\" using v1: .data.key"
        ),
        "{}",
        refused.stderr()
    );
    assert_eq!(value(), "three");
    // `force=true` takes the field.
    let out = kubectl_with_input(
        &kc,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        manifest("four").as_bytes(),
    );
    assert_eq!(out.success().trim(), "configmap/applied serverside-applied");
    assert_eq!(value(), "four");
    let patches: Vec<_> = member
        .api
        .calls()
        .into_iter()
        .filter(|c| c.method == "PATCH")
        .collect();
    // Which manager sent each (kubectl 1.32, `apply.go`): the client-side apply, the patch,
    // the refused apply, the forced one, kubectl keeping the client-side apply's
    // annotation under a manager of its own, then moving what the client-side apply's
    // manager still owns to its server-side one (a JSON patch of managedFields, made
    // because the member's objects carry them) and applying once more.
    let managers: Vec<_> = patches
        .iter()
        .map(|c| {
            let query = c.path_and_query.split_once('?').map_or("", |(_, q)| q);
            let param = |name: &str| {
                query
                    .split('&')
                    .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or("")
            };
            (param("fieldManager"), param("force"))
        })
        .collect();
    assert_eq!(
        managers,
        [
            ("kubectl-client-side-apply", ""),
            ("kubectl-patch", ""),
            ("kubectl", "false"),
            ("kubectl", "true"),
            ("kubectl-last-applied", ""),
            ("kubectl", ""),
            ("kubectl", "true"),
        ],
        "{patches:?}"
    );
    // The member recorded each writer's fields: Tower passed every manager through.
    let fields = kubectl(
        &kc,
        &[
            "get",
            "configmap",
            "applied",
            "--show-managed-fields",
            "-o",
            "jsonpath={range .metadata.managedFields[*]}{.manager}:{.operation} {end}",
        ],
    )
    .success();
    // (Ordered by the second each was written, so compared as a set.)
    let mut fields: Vec<&str> = fields.split_whitespace().collect();
    fields.sort_unstable();
    assert_eq!(fields, ["kubectl-last-applied:Apply", "kubectl:Apply"]);

    // Server-side dry runs: the member checks and answers each, and stores nothing. A
    // Tower that lost `dryRun` on the way would make every one a real write.
    let out = kubectl_with_input(
        &kc,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            "-",
        ],
        manifest("five").as_bytes(),
    );
    assert_eq!(
        out.success().trim(),
        "configmap/applied serverside-applied (server dry run)"
    );
    assert_eq!(value(), "four");
    let out = kubectl(
        &kc,
        &[
            "create",
            "configmap",
            "dry",
            "--from-literal=a=b",
            "--dry-run=server",
            "-o",
            "jsonpath={.metadata.uid}/{.metadata.resourceVersion}",
        ],
    );
    let out = out.success();
    assert!(
        out.ends_with('/') && out.len() > 1,
        "a uid, no resourceVersion: {out}"
    );
    let missing = kubectl(&kc, &["get", "configmap", "dry"]);
    assert!(
        missing.stderr().contains("NotFound"),
        "{}",
        missing.stderr()
    );
    let out = kubectl(&kc, &["delete", "configmap", "applied", "--dry-run=server"]);
    assert_eq!(
        out.success().trim(),
        "configmap \"applied\" deleted (server dry run)"
    );
    assert_eq!(value(), "four");
    // A field a custom resource's schema does not declare: refused under kubectl's default
    // strict validation; with `--validate=warn` dropped, and the member's `Warning` header
    // reaches kubectl through Tower.
    let cluster = "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: warned\nspec:\n  provider: x\n  anything: 1\n";
    let strict = kubectl_with_input(&kc, &["create", "-f", "-"], cluster.as_bytes());
    assert!(
        strict
            .stderr()
            .contains("strict decoding error: unknown field \"spec.anything\""),
        "{}",
        strict.stderr()
    );
    let warned = kubectl_with_input(
        &kc,
        &["create", "--validate=warn", "-f", "-"],
        cluster.as_bytes(),
    );
    assert_eq!(
        warned.success().trim(),
        "cluster.cluster.kubesphere.io/warned created"
    );
    assert!(
        warned
            .stderr()
            .contains("Warning: unknown field \"spec.anything\""),
        "{}",
        warned.stderr()
    );
    kubectl(&kc, &["delete", "cluster", "warned"]).success();
    // `--validate=false` (fieldValidation=Ignore): dropped without a word.
    let ignored = kubectl_with_input(
        &kc,
        &["create", "--validate=false", "-f", "-"],
        cluster.as_bytes(),
    );
    assert_eq!(
        ignored.success().trim(),
        "cluster.cluster.kubesphere.io/warned created"
    );
    assert!(
        !ignored.stderr().contains("Warning"),
        "{}",
        ignored.stderr()
    );
    kubectl(&kc, &["delete", "cluster", "warned"]).success();
    // The same for a built-in kind, which the member decodes into its Go struct: a
    // misspelt field deep in a pod template is refused, or with `--validate=warn` dropped
    // and named; server-side apply refuses it whatever kubectl asks.
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: typo\nspec:\n  selector:\n    matchLabels: {app: typo}\n  template:\n    metadata:\n      labels: {app: typo}\n    spec:\n      containers:\n      - name: app\n        image: app\n        securityContext:\n          readOnlyRootFileSystem: true\n          runAsNonRoot: true\n";
    let typo = "spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem";
    let strict = kubectl_with_input(&kc, &["create", "-f", "-"], deployment.as_bytes());
    assert!(
        strict.stderr().contains(&format!(
            "Deployment in version \"v1\" cannot be handled as a Deployment: strict decoding error: unknown field \"{typo}\""
        )),
        "{}",
        strict.stderr()
    );
    let ssa = kubectl_with_input(
        &kc,
        &["apply", "--server-side", "--validate=warn", "-f", "-"],
        deployment.as_bytes(),
    );
    assert!(
        ssa.stderr().contains(
            "failed to create typed patch object (default/typo; apps/v1, Kind=Deployment): \
             .spec.template.spec.containers[name=\"app\"].securityContext.readOnlyRootFileSystem: \
             field not declared in schema"
        ),
        "{}",
        ssa.stderr()
    );
    let warned = kubectl_with_input(
        &kc,
        &["create", "--validate=warn", "-f", "-"],
        deployment.as_bytes(),
    );
    assert_eq!(warned.success().trim(), "deployment.apps/typo created");
    assert!(
        warned
            .stderr()
            .contains(&format!("Warning: unknown field \"{typo}\"")),
        "{}",
        warned.stderr()
    );
    let context = kubectl(
        &kc,
        &[
            "get",
            "deployment",
            "typo",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].securityContext}",
        ],
    );
    assert_eq!(context.success(), r#"{"runAsNonRoot":true}"#);
    kubectl(&kc, &["delete", "deployment", "typo"]).success();
    // kubectl's client-side apply of a built-in kind sends a strategic merge patch of only
    // what changed: the member merges a pod template's containers by name, where a merge
    // patch would have replaced the list with the one container the patch names.
    let two = |image_a: &str, env: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: merged\nspec:\n  selector:\n    matchLabels: {{app: merged}}\n  template:\n    metadata:\n      labels: {{app: merged}}\n    spec:\n      containers:\n      - name: a\n        image: {image_a}\n        env: [{env}]\n      - name: b\n        image: b:1\n        ports: [{{containerPort: 8080}}]\n"
        )
    };
    let containers = || {
        kubectl(
            &kc,
            &[
                "get",
                "deployment",
                "merged",
                "-o",
                "jsonpath={range .spec.template.spec.containers[*]}{.name}={.image}/{.env[*].name}/{.ports[*].containerPort};{end}",
            ],
        )
        .success()
    };
    kubectl_with_input(
        &kc,
        &["apply", "-f", "-"],
        two("a:1", "{name: ONE, value: '1'}").as_bytes(),
    )
    .success();
    let out = kubectl_with_input(
        &kc,
        &["apply", "-f", "-"],
        two("a:2", "{name: ONE, value: '1'}, {name: TWO, value: '2'}").as_bytes(),
    );
    assert_eq!(out.success().trim(), "deployment.apps/merged configured");
    assert_eq!(containers(), "a=a:2/ONE TWO/;b=b:1//8080;");
    let sidecar = r#"{"spec":{"template":{"spec":{"containers":[{"name":"c","image":"c:1"}]}}}}"#;
    kubectl(&kc, &["patch", "deployment", "merged", "-p", sidecar]).success();
    assert_eq!(containers(), "a=a:2/ONE TWO/;b=b:1//8080;c=c:1//;");
    let patched = kubectl(
        &kc,
        &[
            "patch",
            "deployment",
            "merged",
            "--type",
            "merge",
            "-p",
            sidecar,
        ],
    );
    patched.success();
    assert_eq!(containers(), "c=c:1//;");
    kubectl(&kc, &["delete", "deployment", "merged"]).success();

    // (The apply and the create say so in the query, the delete in its DeleteOptions.)
    let dry_runs = member
        .api
        .calls()
        .into_iter()
        .filter(|c| c.path_and_query.contains("dryRun=All"))
        .count();
    assert_eq!(dry_runs, 2);

    // attach: stdin reaches the container's process and its output comes back.
    let attached = kubectl_with_input(&kc, &["attach", "-i", "web-0"], b"attached through tower\n");
    assert_eq!(attached.success(), "attached through tower\n");
    // The same over SPDY. kubectl falls back to SPDY quietly, so the method the member
    // saw is the proof of the transport: GET is WebSocket, POST is SPDY.
    let mut spdy = tower_e2e::kubectl_command(&kc);
    spdy.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .args(["attach", "-i", "web-0"]);
    let attached = tower_e2e::run_with_input(spdy, b"attached over spdy\n");
    assert_eq!(attached.success(), "attached over spdy\n");
    let calls = member.api.calls();
    let attach_methods: Vec<&str> = calls
        .iter()
        .filter(|c| c.path_and_query.contains("/attach?"))
        .map(|c| c.method.as_str())
        .collect();
    assert_eq!(attach_methods, ["GET", "POST"], "{calls:?}");
    member_streams_close(&member);
    for call in &calls {
        assert_eq!(call.impersonate_user.as_deref(), Some("frank"), "{call:?}");
        assert_eq!(call.impersonate_groups, ["devs"], "{call:?}");
    }
}

#[test]
fn watch_and_logs_stream_event_by_event() {
    let member = Member::start();
    // As deployed: one CPU each, so both run the current-thread runtime.
    let server = server().one_cpu().start();
    let agent = agent(&server, &member, "member-1")
        .one_cpu()
        .connect(&server);
    on_current_thread(&server, &agent);
    let kc = server.kubeconfig("member-1", "bob", &["viewers"]);

    let watch = KubectlStream::spawn(
        &kc,
        &["get", "configmaps", "-n", "default", "-w", "-o", "name"],
    );
    watch.wait_line("the initial list", WAIT, |l| l == "configmap/settings");
    for name in ["watched-1", "watched-2"] {
        let manifest = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: default\n"
        );
        kubectl_with_input(&kc, &["create", "-f", "-"], manifest.as_bytes()).success();
        let expected = format!("configmap/{name}");
        watch.wait_line(&expected, WAIT, |l| l == expected);
    }

    // The watch reached the member multiplexed on HTTP/2, the rest over HTTP/1.1.
    let calls = member.api.calls();
    let (watches, others): (Vec<_>, Vec<_>) = calls
        .iter()
        .partition(|c| c.path_and_query.contains("watch=true"));
    assert!(!watches.is_empty() && !others.is_empty(), "{calls:?}");
    assert!(
        watches.iter().all(|c| c.version == http::Version::HTTP_2),
        "{watches:?}"
    );
    assert!(
        others.iter().all(|c| c.version == http::Version::HTTP_11),
        "{others:?}"
    );

    // logs -f: the first 20 lines, then lines the stand-in writes every 100 ms. They
    // must arrive as they are written, not gathered into bigger reads on the way.
    let logs = KubectlStream::spawn(&kc, &["logs", "-f", "web-0", "-n", "default"]);
    logs.wait_line("followed log line 21", WAIT, |l| {
        l == "log line 21 from web-0"
    });
    let first = std::time::Instant::now();
    let mut last = first;
    for n in 22..=50 {
        let want = format!("log line {n} from web-0");
        logs.wait_line(&want, WAIT, |l| l == want);
        let now = std::time::Instant::now();
        assert!(
            now - last < Duration::from_secs(2),
            "line {n} came {:?} after the one before; the stand-in writes one per 100 ms",
            now - last
        );
        last = now;
    }
    // 29 lines written 100 ms apart (2.9 s) cannot have arrived in one burst; if line 21
    // came late, the lines written meanwhile arrive together, hence the margin.
    assert!(
        last - first >= Duration::from_millis(1500),
        "lines 21-50 arrived within {:?}: they were held back and delivered together",
        last - first
    );

    // Once the callers leave, the member side is left clean: the watch and the log
    // stream end at the stand-in too, not only at kubectl.
    assert_eq!(
        member.api.open_streams(),
        2,
        "the watch and the log stream are open"
    );
    drop(watch);
    drop(logs);
    member_streams_close(&member);

    // Every call, the watch and the log stream included, ran as the JWT's user.
    let calls = member.api.calls();
    assert!(calls.iter().any(|c| c.path_and_query.contains("/log?")));
    for call in &calls {
        assert_eq!(call.credential, "token", "{call:?}");
        assert_eq!(call.impersonate_user.as_deref(), Some("bob"), "{call:?}");
        assert_eq!(call.impersonate_groups, ["viewers"], "{call:?}");
    }
}

#[test]
fn exec_and_port_forward_upgrade_end_to_end() {
    let member = Member::start();
    // As deployed: one CPU each, so both run the current-thread runtime.
    let server = server().one_cpu().start();
    let agent = agent(&server, &member, "member-1")
        .one_cpu()
        .connect(&server);
    on_current_thread(&server, &agent);
    let kc = server.kubeconfig("member-1", "carol", &["devs"]);

    let echoed = kubectl_with_input(
        &kc,
        &["exec", "-i", "web-0", "--", "cat"],
        b"hello through tower\n",
    )
    .success();
    assert_eq!(echoed, "hello through tower\n");
    let big: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let echoed = kubectl_with_input(&kc, &["exec", "-i", "web-0", "--", "cat"], &big).success();
    assert!(
        echoed.as_bytes() == big.as_slice(),
        "stdin of {} bytes round-trips",
        big.len()
    );
    let whoami = kubectl(&kc, &["exec", "web-0", "--", "whoami"]);
    assert_eq!(whoami.success(), "carol\n", "stderr: {}", whoami.stderr());
    let failed = kubectl(&kc, &["exec", "web-0", "--", "sh", "-c", "exit 3"]);
    assert_eq!(failed.code(), Some(3), "{}", failed.stderr());
    // kubectl falls back to SPDY quietly when a WebSocket upgrade fails, so the method
    // the member saw is the proof: GET is WebSocket, POST is SPDY.
    let exec_methods = |calls: &[tower_kube_stand_in::Call]| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.path_and_query.contains("/exec?"))
            .map(|c| c.method.clone())
            .collect()
    };
    let websocket = exec_methods(&member.api.calls());
    assert!(
        websocket.len() == 4 && websocket.iter().all(|m| m == "GET"),
        "{websocket:?}"
    );

    // The same over SPDY/3.1, kubectl's older transport.
    let mut spdy = tower_e2e::kubectl_command(&kc);
    spdy.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .args(["exec", "-i", "web-0", "--", "cat"]);
    let echoed = tower_e2e::run_with_input(spdy, &big);
    assert!(
        echoed.0.status.success() && echoed.0.stdout == big,
        "stdin of {} bytes round-trips over SPDY: {}",
        big.len(),
        echoed.stderr()
    );
    assert_eq!(
        exec_methods(&member.api.calls()).last().map(String::as_str),
        Some("POST")
    );

    for websockets in ["true", "false"] {
        // The sessions before this one (the execs, the last port-forward, whose kubectl
        // was killed) end at the member asynchronously: counted from none.
        member_streams_close(&member);
        let forward = KubectlStream::spawn_with_env(
            &kc,
            &["port-forward", "pod/web-0", ":80", "-n", "default"],
            &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)],
        );
        let line = forward.wait_line("port-forward to listen", WAIT, |l| {
            l.starts_with("Forwarding from 127.0.0.1:")
        });
        let port: u16 = line
            .trim_start_matches("Forwarding from 127.0.0.1:")
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("local port");
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))
            .expect("connect to the forwarded port");
        conn.set_read_timeout(Some(WAIT)).expect("timeout");
        let payload: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
        let writer = {
            let mut conn = conn.try_clone().expect("clone");
            let payload = payload.clone();
            std::thread::spawn(move || conn.write_all(&payload))
        };
        let mut back = vec![0; payload.len()];
        conn.read_exact(&mut back).expect("echoed bytes");
        writer.join().expect("writer").expect("write");
        assert!(
            back == payload,
            "1 MiB round-trips through port-forward (websockets={websockets})"
        );
        assert_eq!(
            member.api.open_streams(),
            1,
            "the session is open at the member"
        );
        let method = if websockets == "true" { "GET" } else { "POST" };
        let calls = member.api.calls();
        let forwarded = calls
            .iter()
            .rfind(|c| c.path_and_query.contains("/portforward"))
            .expect("a port-forward call");
        assert_eq!(forwarded.method, method, "websockets={websockets}");
    }

    // Every exec and port-forward session has ended at the member too.
    member_streams_close(&member);

    // Upgrades need HTTP/1.1 all the way, and they too run as the JWT's user and groups.
    let calls = member.api.calls();
    for call in &calls {
        assert_eq!(call.version, http::Version::HTTP_11, "{call:?}");
        assert_eq!(call.impersonate_user.as_deref(), Some("carol"), "{call:?}");
        assert_eq!(call.impersonate_groups, ["devs"], "{call:?}");
    }
}

/// Bodies stream through both processes: a download far larger than either process's
/// memory budget arrives complete and correct while their RSS stays flat.
#[test]
fn large_downloads_stream_without_buffering() {
    let member = Member::start();
    // As deployed: one CPU each, so both run the current-thread runtime.
    let server = server().one_cpu().start();
    let agent = agent(&server, &member, "member-1")
        .one_cpu()
        .connect(&server);
    on_current_thread(&server, &agent);
    let https = tower_e2e::Https::frontend(&server);
    let user = tower_e2e::Server::minter().user_token("alice", &[], None);
    let size: u64 = 1 << 30;
    let before = (server.process.rss_kib(), agent.process.rss_kib());
    let sampler = tower_e2e::RssPeaks::start(&[server.process.pid(), agent.process.pid()]);
    let summary = https.download_checked(
        &format!("/clusters/member-1/debug/bytes?size={size}"),
        &user,
    );
    let peaks = sampler.stop();
    assert_eq!(summary, size, "every byte arrived, in order");
    let (server_peak, agent_peak) = (peaks[0], peaks[1]);
    eprintln!(
        "RSS KiB before/peak during a {} MiB download: server {}/{}, agent {}/{}",
        size >> 20,
        before.0,
        server_peak,
        before.1,
        agent_peak
    );
    assert_stayed_flat(before, (server_peak, agent_peak));
}

/// Neither process's RSS (KiB, server and agent) rose 24 MiB above where it was before a
/// transfer of 256 MiB or more: buffering even a tenth of its body would show here.
fn assert_stayed_flat(before: (u64, u64), (server_peak, agent_peak): (u64, u64)) {
    assert!(
        server_peak < before.0 + 24 * 1024,
        "server grew from {} to {server_peak} KiB",
        before.0
    );
    assert!(
        agent_peak < before.1 + 24 * 1024,
        "agent grew from {} to {agent_peak} KiB",
        before.1
    );
}

/// Request bodies stream too: a large upload passes through both processes (to a
/// target that checks every byte) while their RSS stays flat.
#[test]
fn large_uploads_stream_without_buffering() {
    use std::io::{BufRead, BufReader};
    // The upstream: reads the headers, then checks and counts the body.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let sink = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let (mut line, mut length) = (String::new(), 0u64);
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let (mut seen, mut good, mut buf) = (0u64, true, vec![0u8; 64 * 1024]);
            while seen < length {
                let Ok(n) = reader.read(&mut buf) else { break };
                if n == 0 {
                    break;
                }
                good &= buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == ((seen + i as u64) % 251) as u8);
                seen += n as u64;
            }
            let body = format!("received {seen} intact={good}");
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let member = Member::start();
    let server = server().start();
    let agent = agent(&server, &member, "member-1")
        .args(&["--kubesphere-service", &sink])
        .connect(&server);
    let https = tower_e2e::Https::frontend(&server);
    let user = tower_e2e::Server::minter().user_token("alice", &[], None);
    let before = (server.process.rss_kib(), agent.process.rss_kib());
    let size: u64 = 256 << 20;
    let sampler = tower_e2e::RssPeaks::start(&[server.process.pid(), agent.process.pid()]);
    let reply = https.upload("/clusters/member-1/targets/kubesphere/upload", &user, size);
    let peaks = sampler.stop();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, format!("received {size} intact=true"));
    let (server_peak, agent_peak) = (peaks[0], peaks[1]);
    eprintln!(
        "RSS KiB before/peak during a {} MiB upload: server {}/{server_peak}, agent {}/{agent_peak}",
        size >> 20,
        before.0,
        before.1
    );
    assert_stayed_flat(before, (server_peak, agent_peak));
}

/// `kubectl cp` is exec plus tar: a 1 MiB file goes up into the pod and comes back down
/// byte for byte through the tunnel, over both exec transports, and copying a missing
/// remote file fails with tar's own words.
#[test]
fn cp_copies_files_both_ways_over_websocket_and_spdy() {
    /// The `command` values of an exec call, decoded as Go encoded them.
    fn exec_argv(call: &tower_kube_stand_in::Call) -> Vec<String> {
        let query = call.path_and_query.split_once('?').map_or("", |(_, q)| q);
        query
            .split('&')
            .filter_map(|pair| pair.strip_prefix("command="))
            .map(|value| {
                let value = value.replace('+', " ");
                percent_encoding::percent_decode_str(&value)
                    .decode_utf8()
                    .expect("utf-8 argument")
                    .into_owned()
            })
            .collect()
    }

    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "dave", &["devs"]);
    let dir = tower_e2e::TempDir::new("cp");

    for (transport, websockets, method, seed) in [
        ("websocket", "true", "GET", 1_u64),
        ("spdy", "false", "POST", 2),
    ] {
        let cp = |from: &str, to: &str| {
            let mut command = tower_e2e::kubectl_command(&kc);
            command
                .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
                .args(["cp", "-n", "default", from, to]);
            tower_e2e::run_with_input(command, b"")
        };
        // 1 MiB of xorshift output, seeded per transport so that the second download
        // cannot pass on the first upload's bytes.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed;
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let local = dir.path().join(format!("upload-{transport}.bin"));
        std::fs::write(&local, &data).expect("write the local file");
        let local = local.to_str().expect("path");
        let back = dir.path().join(format!("back-{transport}.bin"));
        let back = back.to_str().expect("path");
        let seen_before = member.api.calls().len();

        cp(local, "web-0:/tmp/upload.bin").success();
        let down = cp("web-0:/tmp/upload.bin", back);
        down.success();
        let copied = std::fs::read(back).expect("the downloaded file");
        assert!(
            copied == data,
            "{transport}: {} bytes came back for {} sent (stderr: {})",
            copied.len(),
            data.len(),
            down.stderr()
        );

        // A missing remote file: the pod's tar fails with exit 2 and says why. `kubectl cp`
        // itself cannot be relied on to show that: it stops reading once the (empty)
        // archive has ended, without waiting for the exec's exit status or its stderr
        // (which it prints on stdout), so it exits 0 and prints the message only
        // sometimes, against a real pod too (kubernetes/kubectl#980). It writes nothing
        // locally; whatever it does print is tar's message (or, should the exit status
        // win the race, kubectl's error with the exit code).
        let missing_local = dir.path().join(format!("missing-{transport}.bin"));
        let missing = cp(
            "web-0:/tmp/missing.bin",
            missing_local.to_str().expect("path"),
        );
        assert!(!missing_local.exists(), "{transport}: {:?}", missing.0);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&missing.0.stdout),
            missing.stderr()
        );
        let cannot_stat = "tar: /tmp/missing.bin: Cannot stat: No such file or directory";
        assert!(
            printed.is_empty() || printed.contains(cannot_stat) || printed.contains("exit code 2"),
            "{transport}: {printed}"
        );
        // The same command through `kubectl exec`, which waits for the exit status:
        // the failure and tar's stderr come back through the tunnel.
        let mut exec = tower_e2e::kubectl_command(&kc);
        exec.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .args([
                "exec",
                "-n",
                "default",
                "web-0",
                "--",
                "tar",
                "cf",
                "-",
                "/tmp/missing.bin",
            ]);
        let failed = tower_e2e::run_with_input(exec, b"");
        assert_eq!(failed.code(), Some(2), "{transport}: {}", failed.stderr());
        assert!(
            failed.stderr().contains(cannot_stat),
            "{transport}: {}",
            failed.stderr()
        );

        // What kubectl ran in the pod, over which transport, as whom.
        let calls = member.api.calls();
        let execs: Vec<_> = calls[seen_before..]
            .iter()
            .filter(|c| c.path_and_query.contains("/pods/web-0/exec?"))
            .collect();
        let argvs: Vec<Vec<String>> = execs.iter().map(|c| exec_argv(c)).collect();
        eprintln!("{transport}: kubectl cp ran {argvs:?}");
        assert_eq!(
            argvs,
            [
                vec!["test", "-d", "/tmp/upload.bin"],
                vec!["tar", "-xmf", "-", "-C", "/tmp"],
                vec!["tar", "cf", "-", "/tmp/upload.bin"],
                vec!["tar", "cf", "-", "/tmp/missing.bin"],
                vec!["tar", "cf", "-", "/tmp/missing.bin"],
            ],
            "{transport}"
        );
        for call in execs {
            assert_eq!(call.method, method, "{transport}: {call:?}");
            assert_eq!(call.credential, "token", "{call:?}");
            assert_eq!(call.impersonate_user.as_deref(), Some("dave"), "{call:?}");
            assert_eq!(call.impersonate_groups, ["devs"], "{call:?}");
        }
    }
}

#[test]
fn exec_with_a_terminal_sends_its_size_and_resizes_over_websocket_and_spdy() {
    use tower_kube_stand_in::{ExecTransport, TerminalResize};
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "erin", &[]);

    // kubectl falls back to SPDY quietly, so the method the member saw is the proof of
    // the transport (GET is WebSocket, POST is SPDY), and the stand-in records which
    // channel carried each size.
    for (transport, websockets, method) in [
        (ExecTransport::WebSocket, "true", "GET"),
        (ExecTransport::Spdy, "false", "POST"),
    ] {
        let size = |width, height| TerminalResize {
            transport,
            width,
            height,
        };
        let before = member.api.terminal_resizes().len();
        let sizes = || member.api.terminal_resizes()[before..].to_vec();
        let execs_before = member
            .api
            .calls()
            .iter()
            .filter(|c| c.path_and_query.contains("/exec?"))
            .count();
        let pty = tower_e2e::Pty::open(80, 24);
        let mut command = tower_e2e::kubectl_command(&kc);
        command
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .args(["exec", "-t", "-i", "web-0", "--", "cat"])
            .stdin(pty.terminal())
            .stdout(pty.terminal())
            .stderr(pty.terminal());
        let mut kubectl = command.spawn().expect("kubectl");
        // What kubectl writes to its terminal, read as the terminal's user would.
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let screen = screen.clone();
            let mut master = pty.master();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = master.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    screen.lock().expect("screen").extend_from_slice(&buf[..n]);
                }
            });
        }
        let shown = || String::from_utf8_lossy(&screen.lock().expect("screen")).into_owned();

        // The size at the start, on the resize channel.
        let first = wait_for_with(
            &format!("the terminal's size at the member over {transport:?}"),
            WAIT,
            || sizes().first().copied(),
            || format!("kubectl's terminal: {:?}", shown()),
        );
        assert_eq!(first, size(80, 24));
        // The session is up both ways: typed bytes come back from the pod's `cat`.
        pty.master().write_all(b"typed\r").expect("type");
        wait_for_with(
            &format!("the typed text to come back over {transport:?}"),
            WAIT,
            || shown().contains("typed").then_some(()),
            || format!("kubectl's terminal: {:?}", shown()),
        );

        // The terminal is resized: kubectl reads the new size on SIGWINCH and sends it.
        // kubectl installs its SIGWINCH handler in the background, maybe after the first
        // size went out, so the signal is repeated until the new size arrives.
        pty.resize(132, 43);
        wait_for_with(
            &format!("the new size at the member over {transport:?}"),
            WAIT,
            || {
                tower_e2e::signal_window_change(&kubectl);
                sizes().contains(&size(132, 43)).then_some(())
            },
            || format!("sizes {:?}, terminal {:?}", sizes(), shown()),
        );
        let seen = sizes();
        assert!(
            seen.iter()
                .all(|s| *s == size(80, 24) || *s == size(132, 43)),
            "only the two sizes, on {transport:?}: {seen:?}"
        );
        let execs: Vec<_> = member
            .api
            .calls()
            .into_iter()
            .filter(|c| c.path_and_query.contains("/exec?"))
            .skip(execs_before)
            .collect();
        assert_eq!(execs.len(), 1, "{execs:?}");
        assert_eq!(execs[0].method, method, "{execs:?}");
        assert!(execs[0].path_and_query.contains("tty=true"), "{execs:?}");

        // The user leaves: the session ends at the member too.
        let _ = kubectl.kill();
        let _ = kubectl.wait();
        drop(pty);
        member_streams_close(&member);
    }
}
