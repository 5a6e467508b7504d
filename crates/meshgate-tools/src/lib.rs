//! meshgate's tooling: everything that drives or measures the daemon from outside, never the reverse.
//!
//! - `cluster`: local Mosquitto processes, rendered broker/nginx/HAProxy/deploy configs.
//! - `local`: `meshgate up`, the whole local system in the foreground.
//! - `suite`: test scenarios against a running system, with JSON lines and HTML reports.
//! - `bench`: the load generator and the comparison against Mosquitto, nginx and HAProxy.
//! - `client`: the failover-aware demo client.
//! - `report`: what the suite's HTML page and the benchmark comparison's charts share (the SVG chart kit).
//! - `procfs`: the one reader of /proc (process memory, CPU time, process trees, machine facts).
//!
//! The daemon (`meshgate`) knows nothing of this crate; the `meshgate` command (the workspace
//! root) puts both behind one CLI.
#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod cluster;
pub mod local;
pub mod procfs;
pub mod report;
pub mod suite;
