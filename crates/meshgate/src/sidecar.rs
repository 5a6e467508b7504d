//! `meshgate check`: nginx stays on the data path and meshgate does its health checking, rewriting nginx's upstream file.
//!
//! Open-source nginx learns that a broker failed only when a TCP connect to it fails, so it
//! never notices a hung broker, and it cannot order its backups. meshgate probes the brokers
//! and, whenever the set of available brokers changes, rewrites the upstream file: unavailable
//! brokers are marked `down`; with `tiers` only the best available tier is left up, so nginx
//! follows broker1, then broker2, ... If every broker is unavailable none is marked down, as
//! nginx itself would then try them all. The new file is written atomically (temporary file,
//! then rename), validated (`nginx -t`), and nginx is reloaded; a failed validation or reload
//! puts the previous file back, is logged and counted, and is retried.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::pool::Pool;

#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// The nginx file holding the `upstream` block meshgate maintains (included by nginx.conf).
    pub upstream_file: PathBuf,
    /// Name of the upstream block (what `proxy_pass` names).
    pub upstream_name: String,
    /// Leave only the best available tier up.
    pub tiers: bool,
    /// Validation command, run after the new file is in place (e.g. "nginx -t").
    pub test_cmd: Option<String>,
    /// Reload command (e.g. "nginx -s reload" or "systemctl reload nginx").
    pub reload_cmd: String,
    /// Minimum time between two reloads, so a flapping broker cannot make nginx reload in a loop.
    pub min_interval: Duration,
    /// Retry delay after a failed validation or reload.
    pub retry: Duration,
}

struct Metrics {
    reloads: IntCounterVec,
    marked_down: IntGauge,
}

impl Metrics {
    fn new(pool: &Pool) -> Metrics {
        let reloads = IntCounterVec::new(
            Opts::new(
                "meshgate_nginx_reloads_total",
                "Upstream rewrites and nginx reloads, by result (ok, test_failed, reload_failed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let marked_down =
            IntGauge::new("meshgate_nginx_servers_down", "Servers marked down in the upstream file nginx runs with")
                .expect("valid metric");
        pool.metrics.registry.register(Box::new(reloads.clone())).expect("unique metric");
        pool.metrics.registry.register(Box::new(marked_down.clone())).expect("unique metric");
        for r in ["ok", "test_failed", "reload_failed"] {
            reloads.with_label_values(&[r]);
        }
        Metrics { reloads, marked_down }
    }
}

/// The upstream block for the pool's current state. Returns the text and how many servers
/// are marked down.
pub fn render(pool: &Pool, opts: &SidecarOptions) -> (String, usize) {
    let now = tokio::time::Instant::now();
    let brokers = pool.brokers();
    let available: Vec<bool> = brokers.iter().map(|b| b.available(now)).collect();
    let best = brokers.iter().zip(&available).filter(|(_, a)| **a).map(|(b, _)| b.priority()).min();
    let primary_tier = brokers.iter().map(|b| b.priority()).min().unwrap_or(1);
    let mut out = format!(
        "# Maintained by `meshgate check`: rewritten whenever the set of available brokers changes.\n\
         # Do not edit; change meshgate's config instead.\n\
         upstream {} {{\n    least_conn;\n",
        opts.upstream_name
    );
    let mut down = 0;
    for (b, avail) in brokers.iter().zip(&available) {
        let cfg = b.config();
        // Nothing available: mark nothing down, so nginx tries them all as it would alone.
        let is_down = match best {
            None => false,
            Some(best) if opts.tiers => cfg.priority != best || !avail,
            Some(_) => !avail,
        };
        let mut line = format!("    server {}", cfg.address);
        if cfg.weight != 1 {
            line.push_str(&format!(" weight={}", cfg.weight));
        }
        line.push_str(&format!(" max_fails={} fail_timeout={}s", cfg.max_fails, cfg.fail_timeout.as_secs().max(1)));
        if cfg.max_conns > 0 {
            line.push_str(&format!(" max_conns={}", cfg.max_conns));
        }
        if cfg.priority > primary_tier {
            line.push_str(" backup");
        }
        if is_down {
            line.push_str(" down");
            down += 1;
        }
        out.push_str(&format!("{line};  # {}\n", b.name));
    }
    out.push_str("}\n");
    (out, down)
}

/// Runs a shell command line; Err carries its status and the last line it printed.
async fn run_cmd(cmd: &str) -> Result<(), String> {
    let out =
        Command::new("/bin/sh").arg("-c").arg(cmd).output().await.map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    Err(format!("`{cmd}` failed ({}): {last}", out.status))
}

/// Keeps the upstream file in step with the pool until `stop`.
pub async fn run(pool: Arc<Pool>, opts: SidecarOptions, stop: CancellationToken) {
    let metrics = Metrics::new(&pool);
    // What nginx runs with now; at start, whatever the file holds.
    let mut applied = std::fs::read_to_string(&opts.upstream_file).ok();
    let mut last_reload: Option<tokio::time::Instant> = None;
    loop {
        let (text, down) = render(&pool, &opts);
        let mut retry = None;
        if applied.as_deref() != Some(text.as_str()) {
            // Debounce: a flapping broker is absorbed here instead of reloading nginx each time.
            if let Some(wait) =
                last_reload.map(|t| (t + opts.min_interval).saturating_duration_since(tokio::time::Instant::now()))
            {
                if !wait.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            last_reload = Some(tokio::time::Instant::now());
            match apply(&opts, &text, applied.as_deref()).await {
                Ok(()) => {
                    metrics.reloads.with_label_values(&["ok"]).inc();
                    metrics.marked_down.set(down as i64);
                    pool.events.push(
                        "nginx_reload",
                        None,
                        format!("nginx upstream rewritten and reloaded: {down} server(s) down"),
                    );
                    applied = Some(text);
                }
                Err((result, why)) => {
                    metrics.reloads.with_label_values(&[result]).inc();
                    error!("{why}; the previous upstream file is kept, retrying in {:?}", opts.retry);
                    pool.events.push(
                        "nginx_reload",
                        None,
                        format!("nginx reload failed, previous upstream kept: {why}"),
                    );
                    retry = Some(opts.retry);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pool.changed.notified() => {}
            // Passive bars expire without an event, and retries need a clock.
            _ = tokio::time::sleep(retry.unwrap_or(Duration::from_millis(250))) => {}
        }
    }
}

async fn apply(opts: &SidecarOptions, text: &str, previous: Option<&str>) -> Result<(), (&'static str, String)> {
    let path = &opts.upstream_file;
    crate::statefile::write_bytes(path, text.as_bytes())
        .map_err(|e| ("test_failed", format!("cannot write {}: {e}", path.display())))?;
    let restore = || match previous {
        Some(p) => {
            if let Err(e) = crate::statefile::write_bytes(path, p.as_bytes()) {
                warn!("cannot restore {}: {e}", path.display());
            }
        }
        None => {
            let _ = std::fs::remove_file(path);
        }
    };
    if let Some(test) = &opts.test_cmd {
        if let Err(e) = run_cmd(test).await {
            restore();
            return Err(("test_failed", e));
        }
    }
    if let Err(e) = run_cmd(&opts.reload_cmd).await {
        restore();
        return Err(("reload_failed", e));
    }
    info!(file = %path.display(), "nginx upstream updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Health;

    fn pool_with_down(down: &[usize]) -> Pool {
        let mut text = String::new();
        for i in 0..4 {
            text.push_str(&format!("[[broker]]\nname = \"b{}\"\naddress = \"127.0.0.{}:1883\"\n", i + 1, 10 + i));
        }
        let pool = Pool::new(&crate::Config::from_toml(&text, "t").unwrap());
        for (i, b) in pool.brokers().iter().enumerate() {
            let up = !down.contains(&i);
            b.set_health(Health {
                up: Some(up),
                since: std::time::SystemTime::now(),
                last: None,
                history: Default::default(),
            });
        }
        pool
    }

    fn opts(tiers: bool) -> SidecarOptions {
        SidecarOptions {
            upstream_file: "u.conf".into(),
            upstream_name: "mqtt_brokers".into(),
            tiers,
            test_cmd: None,
            reload_cmd: "true".into(),
            min_interval: Duration::ZERO,
            retry: Duration::ZERO,
        }
    }

    fn downs(text: &str) -> Vec<String> {
        text.lines().filter(|l| l.contains(" down;")).map(|l| l.rsplit("# ").next().unwrap().to_string()).collect()
    }

    #[test]
    fn unavailable_brokers_are_marked_down() {
        let (text, n) = render(&pool_with_down(&[0]), &opts(false));
        assert_eq!(downs(&text), vec!["b1"]);
        assert_eq!(n, 1);
        assert!(text.contains("upstream mqtt_brokers {\n    least_conn;\n"));
        assert!(text.contains("server 127.0.0.11:1883 max_fails=1 fail_timeout=10s backup;  # b2"), "{text}");
    }

    #[test]
    fn tiers_leave_only_the_best_available_tier_up() {
        let (text, _) = render(&pool_with_down(&[0, 1]), &opts(true));
        assert_eq!(downs(&text), vec!["b1", "b2", "b4"]);
        let (text, _) = render(&pool_with_down(&[]), &opts(true));
        assert_eq!(downs(&text), vec!["b2", "b3", "b4"]);
    }

    #[test]
    fn nothing_is_marked_down_when_everything_is() {
        let (text, n) = render(&pool_with_down(&[0, 1, 2, 3]), &opts(true));
        assert_eq!(n, 0);
        assert!(downs(&text).is_empty());
    }
}
