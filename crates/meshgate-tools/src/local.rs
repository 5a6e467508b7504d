//! `meshgate up`: the whole local system in the foreground (brokers, then meshgate or nginx in front), stopped as one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{self, BrokerProcess, RunDir};
use meshgate::config::Config;
use meshgate::Meshgate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontEnd {
    Meshgate,
    Nginx,
}

impl FrontEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontEnd::Meshgate => "meshgate",
            FrontEnd::Nginx => "nginx",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Meshgate(#[from] meshgate::Error),
}

enum Front {
    Meshgate(Box<Meshgate>),
    Nginx(std::process::Child),
}

/// A running local system.
pub struct Local {
    pub run: RunDir,
    brokers: Vec<BrokerProcess>,
    front: Option<Front>,
    /// With nginx in front, replication (and the HTTP API) still runs in this process.
    replicator: Option<Box<Meshgate>>,
    pub front_end: FrontEnd,
    pub config: Config,
}

impl Local {
    /// Starts the brokers, then the front end. Anything started is stopped again on error.
    pub async fn start(config: Config, run_dir: &Path, front_end: FrontEnd) -> Result<Local, UpError> {
        let run = RunDir::new(run_dir)?;
        let brokers = cluster::start_brokers(&config, &run, false).await?;
        let mut local = Local { run, brokers, front: None, replicator: None, front_end, config };
        let front = match front_end {
            FrontEnd::Meshgate => {
                Meshgate::start(local.config.clone()).await.map(|m| Front::Meshgate(Box::new(m))).map_err(UpError::from)
            }
            FrontEnd::Nginx => local.start_nginx().await.map(Front::Nginx),
        };
        match front {
            Ok(f) => local.front = Some(f),
            Err(e) => {
                local.stop().await;
                return Err(e);
            }
        }
        if front_end == FrontEnd::Nginx && local.config.replication.enabled {
            let parts = meshgate::Parts { proxy: false, replication: true };
            match Meshgate::start_parts(local.config.clone(), parts).await {
                Ok(m) => local.replicator = Some(Box::new(m)),
                Err(e) => {
                    local.stop().await;
                    return Err(e.into());
                }
            }
        }
        Ok(local)
    }

    async fn start_nginx(&self) -> Result<std::process::Child, UpError> {
        let prefix = self.run.root.join("nginx");
        std::fs::create_dir_all(&prefix).map_err(|err| cluster::ClusterError::Io {
            what: "cannot create",
            path: prefix.display().to_string(),
            err,
        })?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, cluster::nginx::render(&self.config)).map_err(|err| cluster::ClusterError::Io {
            what: "cannot write",
            path: conf.display().to_string(),
            err,
        })?;
        Ok(cluster::nginx::start(&conf, &prefix, &self.config.listen.mqtt).await?)
    }

    /// The in-process meshgate: the proxy, or with nginx in front the replicator.
    pub fn meshgate(&self) -> Option<&Meshgate> {
        match &self.front {
            Some(Front::Meshgate(m)) => Some(m),
            _ => self.replicator.as_deref(),
        }
    }

    pub fn broker_pids(&self) -> Vec<(String, u32)> {
        self.brokers.iter().map(|b| (b.name.clone(), b.pid())).collect()
    }

    /// What runs where, and how to try it.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let mut s = String::from("meshgate local system is up\n\n");
        for b in &self.brokers {
            s.push_str(&format!(
                "  {:<8} mosquitto  {:<17} pid {:<7} log {}\n",
                b.name,
                b.address,
                b.pid(),
                self.run.log(&b.name).display()
            ));
        }
        let mqtt = &c.listen.mqtt;
        let (host, port) = mqtt.rsplit_once(':').unwrap_or((mqtt, "1883"));
        match &self.front {
            Some(Front::Meshgate(m)) => {
                s.push_str(&format!("  front    meshgate   {mqtt:<17} (MQTT clients connect here)\n"));
                if let Some(http) = m.http_addr() {
                    s.push_str(&format!(
                        "  http     meshgate   {http:<17} /health /brokers /clients /events /metrics\n"
                    ));
                }
            }
            Some(Front::Nginx(child)) => {
                s.push_str(&format!(
                    "  front    nginx      {mqtt:<17} pid {} (config {})\n",
                    child.id(),
                    self.run.root.join("nginx/nginx.conf").display()
                ));
            }
            None => {}
        }
        if self.config.replication.enabled {
            s.push_str("  repl     meshgate   every broker to every other (loop-free), retained state converged\n");
        }
        if let Some(http) = self.replicator.as_ref().and_then(|m| m.http_addr()) {
            s.push_str(&format!("  http     meshgate   {http:<17} /replication /metrics (replication only)\n"));
        }
        s.push_str(&format!(
            "\nTry it:\n  mosquitto_sub -h {host} -p {port} -t 'demo/#' -v &\n  mosquitto_pub -h {host} -p {port} -t demo/hello -m 'hi'\n"
        ));
        if let Some(http) = self.meshgate().and_then(|m| m.http_addr()) {
            s.push_str(&format!("  curl -s http://{http}/brokers\n"));
        }
        s.push_str("\nCtrl-C stops everything.\n");
        s
    }

    /// Stops the front end, then the brokers; leaves no process behind.
    pub async fn stop(&mut self) {
        if let Some(r) = self.replicator.take() {
            (*r).shutdown().await;
        }
        match self.front.take() {
            Some(Front::Meshgate(m)) => (*m).shutdown().await,
            Some(Front::Nginx(mut child)) => {
                cluster::stop_pid(child.id(), Duration::from_secs(3));
                let _ = child.wait();
            }
            None => {}
        }
        let brokers = std::mem::take(&mut self.brokers);
        let run_root: PathBuf = self.run.root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for mut b in brokers {
                b.stop(Duration::from_secs(3));
                // A broker restarted by the suite after a kill is no child of ours; its pid
                // file names it.
                let pid_file = run_root.join(format!("{}.pid", b.name));
                if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
                    if pid != b.pid() && cluster::alive(pid) {
                        cluster::stop_pid(pid, Duration::from_secs(3));
                    }
                }
                let _ = std::fs::remove_file(pid_file);
            }
        })
        .await;
    }
}
