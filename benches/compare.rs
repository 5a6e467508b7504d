//! `cargo bench --bench compare`: Mosquitto directly, nginx, HAProxy and meshgate under the same
//! loads, medians and ratios into docs/benchmarks.md (see `meshgate bench compare --help`).
//! `cargo bench --bench compare -- --smoke` is the short CI mode.

use clap::Parser;

#[derive(Parser)]
#[command(name = "compare", about = "meshgate bench compare, as a cargo bench target")]
struct Cli {
    #[command(flatten)]
    args: meshgate_tools::bench::compare::CompareArgs,
}

fn main() {
    let mut args = Cli::parse().args;
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench targets without it.
    // The comparison takes minutes, and its smoke mode already runs in tests/bench_smoke.rs.
    if !args.bench {
        println!("compare: skipped outside `cargo bench` (tests/bench_smoke.rs runs its smoke mode)");
        return;
    }
    // The meshgate binary cargo built alongside this target runs the front end and the loads.
    args.meshgate_bin.get_or_insert_with(|| env!("CARGO_BIN_EXE_meshgate").into());
    if args.out.is_none() && !args.smoke {
        args.out = Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"));
    }
    if let Err(e) = meshgate_tools::bench::compare::main(args) {
        eprintln!("compare: error: {e:#}");
        std::process::exit(1);
    }
}
