//! The alert rules in deploy/host/monitoring: valid for Prometheus (`promtool check
//! rules`), each alert proven on synthetic series (`promtool test rules`), and the
//! PrometheusRule the same rules as the plain file.
//!
//! promtool comes with Debian's `prometheus` package (`.ci/run` installs it). Without it
//! these tests fail: they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/host/monitoring")
}

/// promtool, from PATH or where Debian puts it.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("promtool is missing: install Debian's `prometheus` package (.ci/run does)")
    })
}

fn promtool_run(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid_and_each_alert_is_unit_tested() {
    let checked = promtool_run(&["check", "rules", "tower.rules.yaml"]);
    assert!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    let tested = promtool_run(&["test", "rules", "tower.rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert has a test that expects it to fire and one moment it must not.
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(monitoring().join("tower.rules.yaml")).expect("rules"),
    )
    .expect("rules YAML");
    let tests: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(monitoring().join("tower.rules.test.yaml")).expect("tests"),
    )
    .expect("tests YAML");
    let alerts: Vec<&str> = rules["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        [
            "TowerMemberDisconnected",
            "TowerNoReplicaReady",
            "TowerClusterHighErrorRate",
            "TowerTunnelRttHigh"
        ]
    );
    let cases: Vec<&serde_yaml::Value> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().expect("cases"))
        .collect();
    for alert in alerts {
        let of = |fires: bool| {
            cases.iter().any(|c| {
                c["alertname"].as_str() == Some(alert)
                    && c["exp_alerts"].as_sequence().is_some_and(|e| e.is_empty()) != fires
            })
        };
        assert!(of(true), "no test expects {alert} to fire");
        assert!(of(false), "no test expects {alert} to stay quiet");
    }
}

#[test]
fn the_prometheus_rule_holds_the_plain_rules() {
    let read = |name: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(monitoring().join(name)).expect(name))
            .expect(name)
    };
    let plain = read("tower.rules.yaml");
    let object = read("prometheusrule.yaml");
    assert_eq!(object["kind"], "PrometheusRule");
    assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(object["metadata"]["namespace"], "ke-system");
    assert_eq!(object["spec"]["groups"], plain["groups"]);
}
