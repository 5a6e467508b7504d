//! The access log: one line per ended client session (nginx's stream `access_log`, HAProxy's `tcplog`), as text or JSON, to stdout or a file, written off the session's task.
//!
//! A session that ends hands its record to a bounded channel and goes; one writer task formats
//! and writes, flushing when the channel runs dry, so a slow disk never holds a client task.
//! When the channel is full the record is dropped and counted
//! (`meshgate_access_log_dropped_total`) rather than making sessions wait.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AccessLogConfig, AccessLogFormat};

/// Records waiting for the writer, at most: a burst of this many sessions ending at once
/// (a failover) is logged in full.
const QUEUE: usize = 65_536;

/// One ended session, as the log shows it (the JSON field names are nginx's variable names
/// where one exists, see README).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    /// When the session ended, RFC 3339 with milliseconds, UTC.
    pub time: String,
    /// The client's address and port (`$remote_addr:$remote_port`).
    pub client: SocketAddr,
    pub client_id: String,
    /// `None` when the CONNECT had no username.
    pub username: Option<String>,
    /// "3.1", "3.1.1" or "5".
    pub protocol: &'static str,
    /// The broker's name and address (`$upstream_addr`).
    pub broker: String,
    pub upstream: String,
    /// Bytes from the client, the CONNECT included (`$bytes_received`), and to it, the CONNACK
    /// included (`$bytes_sent`).
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Seconds from the CONNACK to the end (`$session_time`).
    pub duration_s: f64,
    /// How it ended: client_closed, broker_closed, client_error, broker_error, malformed, or
    /// the reason meshgate closed it (broker_down, failback, drain, shutdown, ...).
    pub end: String,
    /// What went wrong, for the *_error and malformed ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Record {
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }

    /// nginx-like: fields in a fixed order, strings quoted where they may hold spaces.
    fn text(&self) -> String {
        let quoted = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut line = format!(
            "{} {} client_id={} user={} mqtt={} broker={} upstream={} in={} out={} packets_in={} packets_out={} duration={:.3}s end={}",
            self.time,
            self.client,
            quoted(&self.client_id),
            self.username.as_deref().map_or_else(|| "-".to_string(), quoted),
            self.protocol,
            self.broker,
            self.upstream,
            self.bytes_in,
            self.bytes_out,
            self.packets_in,
            self.packets_out,
            self.duration_s,
            self.end,
        );
        if let Some(d) = &self.detail {
            line.push_str(&format!(" detail={}", quoted(d)));
        }
        line
    }

    fn line(&self, format: AccessLogFormat) -> String {
        let mut l = match format {
            AccessLogFormat::Text => self.text(),
            AccessLogFormat::Json => serde_json::to_string(self).expect("a record serializes"),
        };
        l.push('\n');
        l
    }
}

enum Msg {
    Record(Box<Record>),
    /// A reload: the settings to use from now on; the file is opened again (after logrotate).
    Reopen(AccessLogConfig),
}

/// Where sessions send their records; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    dropped: prometheus::IntCounter,
    /// `[access_log] enabled` as last set: a session does not build a record nobody writes.
    enabled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AccessLog {
    /// Starts the writer; it ends with `stop` after writing what was queued (the returned
    /// task: await it after the last session ended). The file is opened now, so a path that
    /// cannot be written is one clear error at start.
    pub async fn start(
        cfg: &AccessLogConfig,
        registry: &prometheus::Registry,
        stop: &CancellationToken,
    ) -> Result<(AccessLog, JoinHandle<()>), std::io::Error> {
        let out = open(cfg).await?;
        let dropped = prometheus::IntCounter::new(
            "meshgate_access_log_dropped_total",
            "Access log records dropped because the writer fell behind",
        )
        .expect("valid metric");
        registry.register(Box::new(dropped.clone())).expect("registered once");
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_loop(rx, out, cfg.clone(), stop.clone()));
        let enabled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(cfg.enabled));
        Ok((AccessLog { tx, dropped, enabled }, task))
    }

    /// Queues `record` without waiting; when the writer is behind by `QUEUE` records it is
    /// dropped and counted.
    pub fn log(&self, record: Record) {
        if self.tx.try_send(Msg::Record(Box::new(record))).is_err() {
            self.dropped.inc();
        }
    }

    /// Whether records are written: sessions ask before they build one.
    pub fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// New settings (a reload): the writer switches over and opens the file again.
    pub fn reopen(&self, cfg: &AccessLogConfig) {
        self.enabled.store(cfg.enabled, std::sync::atomic::Ordering::Relaxed);
        let _ = self.tx.try_send(Msg::Reopen(cfg.clone()));
    }
}

type Out = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

async fn open(cfg: &AccessLogConfig) -> Result<Out, std::io::Error> {
    Ok(match &cfg.path {
        None => Box::new(tokio::io::stdout()),
        Some(path) => Box::new(open_file(path).await?),
    })
}

async fn open_file(path: &PathBuf) -> Result<tokio::fs::File, std::io::Error> {
    // Its directory is made as for state files, so `run/` need not exist beforehand.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("access log {}: {e}", path.display())))?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("access log {}: {e}", path.display())))
}

async fn write_loop(mut rx: mpsc::Receiver<Msg>, out: Out, mut cfg: AccessLogConfig, stop: CancellationToken) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            // Sessions end during shutdown too: what they queued is written before the end.
            _ = stop.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(msg) = msg else { break };
        let mut batch = vec![msg];
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        for m in batch {
            match m {
                Msg::Record(r) if cfg.enabled => {
                    if let Err(e) = out.write_all(r.line(cfg.format).as_bytes()).await {
                        warn!("cannot write the access log: {e}");
                    }
                }
                Msg::Record(_) => {}
                Msg::Reopen(new) => {
                    let _ = out.flush().await;
                    match open(&new).await {
                        Ok(o) => {
                            out = tokio::io::BufWriter::with_capacity(64 * 1024, o);
                            cfg = new;
                        }
                        Err(e) => warn!("{e}; access log keeps its old file"),
                    }
                }
            }
        }
        // Flushed whenever the queue runs dry: lines appear within one wake-up of their
        // session's end, and a busy period writes in 64 KiB blocks.
        if let Err(e) = out.flush().await {
            warn!("cannot write the access log: {e}");
        }
    }
    let _ = out.flush().await;
}

/// Seconds with millisecond precision, for `duration_s`.
pub fn seconds(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: "2026-12-05T06:30:00.123Z".into(),
            client: "127.0.0.2:50000".parse().unwrap(),
            client_id: "dev \"1\"".into(),
            username: None,
            protocol: "3.1.1",
            broker: "broker1".into(),
            upstream: "127.0.0.10:1883".into(),
            bytes_in: 40,
            bytes_out: 6,
            packets_in: 3,
            packets_out: 2,
            duration_s: 1.5,
            end: "client_closed".into(),
            detail: None,
        }
    }

    #[test]
    fn text_lines_quote_what_may_hold_spaces() {
        assert_eq!(
            record().line(AccessLogFormat::Text),
            "2026-12-05T06:30:00.123Z 127.0.0.2:50000 client_id=\"dev \\\"1\\\"\" user=- mqtt=3.1.1 broker=broker1 \
             upstream=127.0.0.10:1883 in=40 out=6 packets_in=3 packets_out=2 duration=1.500s end=client_closed\n"
        );
    }

    #[test]
    fn json_lines_are_one_object() {
        let line = record().line(AccessLogFormat::Json);
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["client_id"].as_str(), v["bytes_in"].as_u64()), (Some("dev \"1\""), Some(40)));
        assert!(v.get("detail").is_none());
    }
}
