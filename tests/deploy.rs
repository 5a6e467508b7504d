//! `meshgate cluster render --target multipass|systemd|keepalived`: the files checked in under deploy/ are exactly what the command writes, and what it writes is usable.
//!
//! Nothing here connects anywhere: the deployment addresses are only written and read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MESHGATE: &str = env!("CARGO_BIN_EXE_meshgate");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn meshgate(args: &[&str]) -> Output {
    Command::new(MESHGATE).args(args).current_dir(root()).output().expect("meshgate runs")
}

fn ok(args: &[&str]) -> String {
    let out = meshgate(args);
    assert!(out.status.success(), "meshgate {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn deploy_examples_are_what_the_renderer_writes() {
    for target in ["multipass", "systemd", "keepalived"] {
        let shipped = root().join("deploy").join(target);
        let out = tempfile::tempdir().unwrap();
        let network = shipped.join("network.toml");
        ok(&["cluster", "render", "--target", target, "--network", path(&network), "--out", path(out.path())]);
        let (want, got) = (files(&shipped), files(out.path()));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "deploy/{target} has other files than the renderer writes"
        );
        for (name, text) in &got {
            assert_eq!(
                &want[name], text,
                "deploy/{target}/{name} is stale: run `meshgate cluster render --target {target}`"
            );
        }
    }
}

#[test]
fn rendered_meshgate_configs_validate() {
    for target in ["multipass", "systemd"] {
        let config = root().join("deploy").join(target).join("meshgate.toml");
        let summary = ok(&["validate", "--config", path(&config)]);
        assert_eq!(summary.lines().filter(|l| l.starts_with("broker ")).count(), 5, "{summary}");
        assert!(summary.contains("listen mqtt 0.0.0.0:1883"), "{summary}");
    }
}

#[test]
fn hosts_given_once_are_kept_for_the_next_render() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("site");
    ok(&[
        "cluster",
        "render",
        "--target",
        "systemd",
        "--hosts",
        "mq1.example,mq2.example,mq3.example",
        "--out",
        path(&dir),
    ]);
    let first = files(&dir);
    assert_eq!(first.keys().filter(|n| n.ends_with(".conf") && n.starts_with("broker")).count(), 3);
    assert!(first["meshgate.toml"].contains("address = \"mq3.example:1883\""));
    // HTTP stays on loopback unless the front end's own address is given.
    assert!(first["meshgate.toml"].contains("http = \"127.0.0.1:8080\""));
    ok(&["cluster", "render", "--target", "systemd", "--out", path(&dir)]);
    assert_eq!(files(&dir), first, "a second render from network.toml changes nothing");
}

#[test]
fn no_hosts_is_one_line_naming_the_fix() {
    let out = tempfile::tempdir().unwrap();
    let r = meshgate(&["cluster", "render", "--target", "systemd", "--out", path(&out.path().join("x"))]);
    // Exit 2: a usage mistake, like a bad config (1 is kept for failures while running).
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--hosts"), "{err}");
    let r =
        meshgate(&["cluster", "render", "--target", "multipass", "--hosts", "mq1.example", "--out", path(out.path())]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("IPv4"), "{err}");
    let r =
        meshgate(&["cluster", "render", "--target", "systemd", "--hosts", "not a host!", "--out", path(out.path())]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("not an address or host name"), "{err}");
}

#[test]
fn a_bad_keepalived_network_is_one_line_and_exit_2() {
    let out = tempfile::tempdir().unwrap();
    let net = out.path().join("network.toml");
    let render = || meshgate(&["cluster", "render", "--target", "keepalived", "--out", path(out.path())]);
    for (text, expected) in [
        (None, "--network"),
        (Some("virtual_address = \"192.0.2.100/24\"\nvirtual_router_id = 51\n[[instance]]\nname = \"a\"\naddress = \"192.0.2.1\"\n"), "at least two"),
        (
            Some(
                "virtual_address = \"192.0.2.100\"\nvirtual_router_id = 51\n[[instance]]\nname = \"a\"\naddress = \"192.0.2.1\"\n\
                 [[instance]]\nname = \"b\"\naddress = \"192.0.2.2\"\n",
            ),
            "prefix length",
        ),
        (Some("virtual_address = \"192.0.2.100/24\"\nrouter = 51\n"), "unknown field `router`"),
    ] {
        if let Some(t) = text {
            std::fs::write(&net, t).unwrap();
        }
        let r = render();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{err} should say {expected}");
    }
    // Nothing was written next to the bad file.
    assert_eq!(files(out.path()).len(), 1);
}

#[test]
fn the_local_target_is_still_the_default() {
    let out = tempfile::tempdir().unwrap();
    let mosquitto: PathBuf = out.path().join("mosquitto");
    let nginx = out.path().join("nginx.conf");
    ok(&["cluster", "render", "--out", path(&mosquitto), "--nginx-out", path(&nginx)]);
    assert_eq!(files(&mosquitto), files(&root().join("configs/mosquitto")));
    assert_eq!(
        std::fs::read_to_string(&nginx).unwrap(),
        std::fs::read_to_string(root().join("nginx/meshgate-stream.conf")).unwrap()
    );
}
