//! A short chaos run (40 s, a fault every 10 s) through meshgate and through nginx, with every message accounted for.

mod common;

use std::time::Duration;

use common::Slot;
use meshgate::Config;
use meshgate_tools::local::{FrontEnd, Local};
use meshgate_tools::suite::{self, ChaosOptions, FaultMode, Run};

async fn chaos(front_end: FrontEnd) -> Run {
    let slot = Slot::acquire();
    let dir = tempfile::tempdir().unwrap();
    let replication =
        format!("[replication]\nenabled = true\nstate_file = \"{}\"\n", dir.path().join("repl.json").display());
    let text = common::slot_config_text(&slot, 3, &replication, "max_fails = 3\nfail_timeout = \"30s\"");
    let config = Config::from_toml(&text, "chaos-test").unwrap();
    let run_dir = dir.path().join("run");
    let mut local = Local::start(config.clone(), &run_dir, front_end).await.expect("local system starts");
    let target = suite::Target::local(&config, &run_dir, front_end.as_str()).unwrap();
    let opts = ChaosOptions {
        duration: Duration::from_secs(40),
        cycle: Duration::from_secs(10),
        fault: FaultMode::Mixed,
        ..ChaosOptions::default()
    };
    let run = suite::run_chaos(&target, &opts).await;
    local.stop().await;
    run
}

fn metric(run: &Run, name: &str) -> f64 {
    run.results[0].get(name).unwrap_or_else(|| panic!("{name} recorded"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_through_meshgate_loses_nothing_outside_fault_windows() {
    let run = chaos(FrontEnd::Meshgate).await;
    let r = &run.results[0];
    eprintln!("meshgate chaos: {}", r.summary);
    assert_eq!(metric(&run, "faults"), 3.0, "hang, kill, hang at 10, 20, 30 s");
    assert_eq!(metric(&run, "failed_connects"), 0.0, "no client connect ever failed");
    let takeover = metric(&run, "worst_takeover_s");
    assert!(takeover <= 1.5, "every fault taken over within 1.5 s, worst {takeover}");
    assert_eq!(metric(&run, "lost_outside_fault_windows"), 0.0, "{:?}", r.notes);
    // Losses inside the windows are counted and reported, whatever they are.
    assert!(r.get("lost_inside_fault_windows").is_some());
    assert!(metric(&run, "messages_acknowledged") >= 1000.0, "4 publishers x 10/s x ~38 s");
    assert!(r.passed, "{}", r.summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_through_nginx_shows_what_nginx_does() {
    let run = chaos(FrontEnd::Nginx).await;
    let r = &run.results[0];
    eprintln!("nginx chaos: {}", r.summary);
    assert_eq!(metric(&run, "faults"), 3.0);
    // A hung broker is never noticed: clients cut off by it stay off until it is resumed,
    // and their reconnect attempts through nginx fail.
    assert!(metric(&run, "worst_takeover_s").is_nan(), "a hang is never taken over by nginx");
    assert!(metric(&run, "failed_connects") > 0.0);
    assert!(!r.passed);
    assert!(r.notes.iter().any(|n| n.contains("never notices a hung broker")), "{:?}", r.notes);
}
