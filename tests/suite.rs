//! Every suite scenario against both front ends (meshgate and real nginx), on each test's own addresses.

mod common;

use std::time::Duration;

use common::Slot;
use meshgate::Config;
use meshgate_tools::local::{FrontEnd, Local};
use meshgate_tools::suite::{self, Options, Run, Scenario};

async fn run_against(front_end: FrontEnd, brokers: usize, scenarios: &[Scenario]) -> Run {
    let slot = Slot::acquire();
    let dir = tempfile::tempdir().unwrap();
    let replication =
        format!("[replication]\nenabled = true\nstate_file = \"{}\"\n", dir.path().join("repl.json").display());
    // The reference design's passive settings, for both front ends.
    let text = common::slot_config_text(&slot, brokers, &replication, "max_fails = 3\nfail_timeout = \"30s\"");
    let config = Config::from_toml(&text, "suite-test").unwrap();
    let run_dir = dir.path().join("run");
    let mut local = Local::start(config.clone(), &run_dir, front_end).await.expect("local system starts");
    let target = suite::Target::local(&config, &run_dir, front_end.as_str()).unwrap();
    let opts = Options { duration: Duration::from_secs(3), clients: 6, progress: true };
    let run = suite::run(&target, scenarios, &opts).await;
    local.stop().await;
    // The report renders whatever happened.
    // (the report renders whatever happened: checked in report unit tests)
    run
}

fn metric(run: &Run, scenario: &str, name: &str) -> f64 {
    let r = run.results.iter().find(|r| r.scenario == scenario).unwrap_or_else(|| panic!("{scenario} ran"));
    r.get(name).unwrap_or_else(|| panic!("{scenario}.{name} recorded: {:?}", r.metrics))
}

fn passed(run: &Run, scenario: &str) -> bool {
    run.results.iter().find(|r| r.scenario == scenario).unwrap().passed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectivity_clients_replication_retained_through_meshgate() {
    let s = [Scenario::Connectivity, Scenario::Clients, Scenario::Replication, Scenario::Retained];
    let run = run_against(FrontEnd::Meshgate, 3, &s).await;
    assert!(passed(&run, "connectivity"));
    assert_eq!(metric(&run, "connectivity", "failed_connects"), 0.0);
    assert!(passed(&run, "clients"), "{:?}", run.results[1]);
    assert_eq!(metric(&run, "clients", "messages_lost"), 0.0);
    assert!(metric(&run, "clients", "messages_acknowledged") >= 20.0);
    // Replication runs: each message reaches every broker exactly once, no storm.
    assert!(passed(&run, "replication"), "{:?}", run.results[2].summary);
    assert_eq!(metric(&run, "replication", "deliveries_exactly_once"), 9.0);
    assert_eq!(metric(&run, "replication", "deliveries_missing"), 0.0);
    assert_eq!(metric(&run, "replication", "deliveries_duplicated"), 0.0);
    assert!(passed(&run, "retained"), "{:?}", run.results[3].summary);
    assert_eq!(metric(&run, "retained", "brokers_holding_value"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectivity_clients_replication_retained_through_nginx() {
    let s = [Scenario::Connectivity, Scenario::Clients, Scenario::Replication, Scenario::Retained];
    let run = run_against(FrontEnd::Nginx, 3, &s).await;
    assert!(passed(&run, "connectivity"));
    assert!(passed(&run, "clients"), "{:?}", run.results[1]);
    assert_eq!(metric(&run, "clients", "messages_lost"), 0.0);
    assert!(passed(&run, "replication"), "{:?}", run.results[2].summary);
    assert_eq!(metric(&run, "replication", "deliveries_exactly_once"), 9.0);
    assert_eq!(metric(&run, "replication", "deliveries_duplicated"), 0.0);
    assert!(passed(&run, "retained"), "{:?}", run.results[3].summary);
    assert_eq!(metric(&run, "retained", "brokers_holding_value"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_through_meshgate() {
    let run = run_against(FrontEnd::Meshgate, 3, &[Scenario::Failover]).await;
    for fault in ["kill", "hang"] {
        let back = metric(&run, "failover", &format!("{fault}_new_clients_back_s"));
        eprintln!("meshgate {fault}: new clients back after {back:.3} s");
        assert!(back <= 1.5, "{fault}: new clients back after {back} s");
        assert_eq!(metric(&run, "failover", &format!("{fault}_failed_connects")), 0.0, "{fault}");
        assert!(metric(&run, "failover", &format!("{fault}_connect_attempts")) >= 20.0);
        // Every existing client was on the failed broker, and was switched to the next one
        // under its open connection: served again, none cut off.
        assert_eq!(metric(&run, "failover", &format!("{fault}_existing_affected")), 0.0, "{fault}: none cut off");
        assert_eq!(metric(&run, "failover", &format!("{fault}_existing_kept")), 10.0, "{fault}");
        let slowest = metric(&run, "failover", &format!("{fault}_existing_back_max_s"));
        eprintln!("meshgate {fault}: slowest existing client served again after {slowest:.3} s");
        assert!(slowest <= 2.5, "{fault}: slowest existing client back after {slowest} s");
    }
    assert!(passed(&run, "failover"), "{}", run.results[0].summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_through_nginx_never_notices_a_hung_broker() {
    let run = run_against(FrontEnd::Nginx, 3, &[Scenario::Failover]).await;
    // A killed broker refuses TCP, and nginx moves on to the next server at once.
    let back = metric(&run, "failover", "kill_new_clients_back_s");
    eprintln!("nginx kill: new clients back after {back:.3} s");
    assert!(back <= 1.5, "kill: {back}");
    // A hung one accepts TCP: nginx keeps sending new clients there, and they hang.
    assert!(metric(&run, "failover", "hang_new_clients_back_s").is_nan(), "nginx never recovers from a hang");
    let failed = metric(&run, "failover", "hang_failed_connects");
    let attempts = metric(&run, "failover", "hang_connect_attempts");
    eprintln!("nginx hang: {failed} of {attempts} connects failed");
    assert!(failed > 0.0 && failed == attempts, "every connect during the hang failed: {failed}/{attempts}");
    assert!(!passed(&run, "failover"));
    let r = &run.results[0];
    assert!(r.notes.iter().any(|n| n.contains("never noticed")), "{:?}", r.notes);
}
