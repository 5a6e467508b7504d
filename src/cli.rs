//! Command-line interface: parsing, logging setup, signals, and dispatch to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(name = "meshgate", version, about = "MQTT-aware failover proxy for a prioritized pool of Mosquitto brokers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. "info", "meshgate=debug" (RUST_LOG works too).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy, health checks and HTTP API in the foreground.
    Run(RunArgs),
    /// Validate a configuration and print what it means, then exit.
    Check(RunArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// meshgate TOML config.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Take `listen` and the brokers from an nginx stream config (other settings from --config).
    #[arg(long)]
    pub nginx_conf: Option<PathBuf>,
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad usage or configuration (as sysexits' EX_USAGE family).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Check(args) => load(&args).map(|c| {
            print_summary(&c);
        }),
        Command::Run(args) => match load(&args) {
            Ok(config) => run(config, args),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts joined, no backtrace.
            eprintln!("meshgate: error: {e:#}");
            match e.downcast_ref::<crate::config::ConfigError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::from(1),
            }
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn load(args: &RunArgs) -> anyhow::Result<Config> {
    match (&args.nginx_conf, &args.config) {
        (Some(nginx), base) => {
            let (config, stream) = Config::load_nginx(nginx, base.as_deref())?;
            let backups = stream.servers.iter().filter(|s| s.backup).count();
            tracing::info!(
                upstream = %stream.upstream,
                "nginx upstream imported: {} server(s); {backups} backup server(s) become sequential tiers 2..{} in file order",
                stream.servers.len(),
                backups + 1
            );
            Ok(config)
        }
        (None, Some(path)) => Ok(Config::load(path)?),
        (None, None) => {
            let default = Path::new("configs/meshgate.toml");
            if default.exists() {
                Ok(Config::load(default)?)
            } else {
                anyhow::bail!("no configuration given: pass --config FILE (configs/meshgate.toml is the five-broker example) or --nginx-conf FILE")
            }
        }
    }
}

fn print_summary(c: &Config) {
    println!("listen mqtt {} http {}", c.listen.mqtt, c.listen.http.as_deref().unwrap_or("off"));
    println!(
        "health probe {} every {:?}, timeout {:?}, rise {}, fall {}",
        c.health.probe.as_str(),
        c.health.interval,
        c.health.timeout,
        c.health.rise,
        c.health.fall
    );
    for b in &c.brokers {
        println!(
            "broker {:<10} {:<22} priority {} weight {} max_fails {} fail_timeout {:?} max_conns {}{}",
            b.name,
            b.address,
            b.priority,
            b.weight,
            b.max_fails,
            b.fail_timeout,
            b.max_conns,
            if b.enabled { "" } else { " (down)" }
        );
    }
}

fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                let r = load(&args).map_err(|e| format!("{e:#}"));
                if let Err(why) = &r {
                    tracing::error!("reload refused, keeping the running configuration: {why}");
                }
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        crate::run(config, shutdown, rx).await?;
        Ok(())
    })
}
