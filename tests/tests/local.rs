//! The README's first command, `tower-local`: server, agent and an upstream in one
//! process, and a kubeconfig that kubectl uses through the tunnel.

use std::process::Command;

use tower_e2e::{ANY_PORTS, Member, TempDir};

/// Runs `tower-local --check` on port 0 (it exits once `kubectl version` has worked
/// through the tunnel); returns its stdout.
fn check(dir: &TempDir, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tower-local"))
        .args(["--check", "--dir"])
        .arg(dir.path())
        .args(ANY_PORTS)
        .args(extra)
        .env_remove("KUBECONFIG")
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run tower-local");
    assert!(
        output.status.success(),
        "tower-local --check failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn tower_local_serves_a_stand_in_through_the_tunnel() {
    let dir = TempDir::new("tower-local");
    let out = check(&dir, &[]);
    assert!(out.contains("kubectl works through the tunnel"), "{out}");
    // `kubectl version` printed the stand-in's version, fetched through the tunnel.
    assert!(out.contains("\"serverVersion\""), "{out}");
    // What it leaves behind is what the README says: a kubeconfig naming the cluster
    // under the frontend, and the generated CA.
    let kubeconfig = std::fs::read_to_string(dir.path().join("kubeconfig")).expect("kubeconfig");
    assert!(kubeconfig.contains("/clusters/local"), "{kubeconfig}");
    assert!(dir.path().join("state/ca.crt").exists());
}

#[test]
fn tower_local_serves_the_users_own_kubeconfig() {
    // "Your own cluster": any API server with a kubeconfig; here a stand-in of its own,
    // which records who called it.
    let member = Member::start();
    let dir = TempDir::new("tower-local-own");
    let kubeconfig = member.kubeconfig.to_str().expect("path");
    let out = check(
        &dir,
        &[
            "--kubeconfig",
            kubeconfig,
            "--cluster",
            "mine",
            "--user",
            "dana",
        ],
    );
    assert!(out.contains("kubectl works through the tunnel"), "{out}");
    let calls = member.api.calls();
    let version = calls
        .iter()
        .find(|c| c.path_and_query.starts_with("/version"))
        .unwrap_or_else(|| panic!("kubectl version reached the user's cluster: {calls:?}"));
    // With the kubeconfig's own credential, impersonating tower-local's user.
    assert_eq!(version.credential, "token", "{version:?}");
    assert_eq!(version.impersonate_user.as_deref(), Some("dana"));
    assert_eq!(version.impersonate_groups, ["system:masters"]);
}
