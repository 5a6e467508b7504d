//! nginx as the alternative front end: its stream config rendered from meshgate's config, and nginx run as a child with its own prefix.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{io, ClusterError};
use meshgate::config::Config;

/// The nginx stream config equivalent to `config`: priority-1 brokers are the primary servers,
/// every other broker is a `backup` (nginx cannot order backups; that is meshgate's point).
pub fn render(config: &Config) -> String {
    let mut servers = String::new();
    for b in &config.brokers {
        let mut line = format!("        server {}", b.address);
        if b.weight != 1 {
            line.push_str(&format!(" weight={}", b.weight));
        }
        line.push_str(&format!(" max_fails={} fail_timeout={}s", b.max_fails, b.fail_timeout.as_secs().max(1)));
        if b.max_conns > 0 {
            line.push_str(&format!(" max_conns={}", b.max_conns));
        }
        if b.priority > 1 {
            line.push_str(" backup");
        }
        if !b.enabled {
            line.push_str(" down");
        }
        servers.push_str(&format!("{line};  # {}\n", b.name));
    }
    format!(
        "# nginx stream front end equivalent to meshgate's config, rendered by `meshgate cluster render`.\n\
         # The first tier is the primary; every other broker is a `backup`. nginx balances its backups as\n\
         # one group and cannot order them; `meshgate run --nginx-conf` reads this same file and turns\n\
         # the backups into sequential tiers in file order.\n\
         # `meshgate up --front-end nginx` runs nginx with this file as a child process with its own\n\
         # prefix (never the system service); paths below are relative to that prefix.\n\
         \n\
         load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 1;\n\
         pid nginx.pid;\n\
         error_log logs/error.log notice;\n\
         \n\
         events {{\n\
         \x20   worker_connections 4096;\n\
         }}\n\
         \n\
         stream {{\n\
         \x20   log_format mqtt '$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time \"$upstream_addr\"';\n\
         \n\
         \x20   upstream mqtt_brokers {{\n\
         \x20       least_conn;\n\
         {servers}\
         \x20   }}\n\
         \n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       proxy_pass mqtt_brokers;\n\
         \x20       proxy_connect_timeout 1s;\n\
         \x20       # At least 1.5 x the clients' keepalive (60 s), so idle MQTT sessions are not cut.\n\
         \x20       proxy_timeout 90s;\n\
         \x20       access_log logs/mqtt_access.log mqtt;\n\
         \x20   }}\n\
         }}\n",
        listen = config.listen.mqtt,
    )
}

/// Finds nginx and its stream module, or says how to install them.
pub fn nginx_binary() -> Result<std::path::PathBuf, ClusterError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let bin = std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .ok_or(ClusterError::NginxMissing)?;
    if !Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists() {
        return Err(ClusterError::NginxMissing);
    }
    Ok(bin)
}

/// Runs nginx in the foreground under `prefix` with `conf`; waits until it accepts TCP on `listen`.
pub async fn start(conf: &Path, prefix: &Path, listen: &str) -> Result<Child, ClusterError> {
    let bin = nginx_binary()?;
    std::fs::create_dir_all(prefix.join("logs")).map_err(io("cannot create", prefix))?;
    let error_log = prefix.join("logs").join("error.log");
    // Every nginx invocation names its own prefix, config and error log, so nothing touches
    // the system service's files.
    let nginx = || {
        let mut c = Command::new(&bin);
        c.arg("-p").arg(prefix).arg("-c").arg(conf).arg("-e").arg(&error_log);
        c
    };
    let test = nginx().arg("-t").arg("-q").output().map_err(io("cannot run", &bin))?;
    if !test.status.success() {
        let msg = String::from_utf8_lossy(&test.stderr);
        let line = msg.lines().find(|l| l.contains("emerg") || l.contains("error")).unwrap_or(msg.trim());
        return Err(ClusterError::NginxConfig { conf: conf.display().to_string(), message: line.to_string() });
    }
    let mut child = nginx()
        .arg("-g")
        .arg("daemon off;")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("cannot start", &bin))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(child);
        }
        if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let tail = super::last_line(&error_log).unwrap_or_else(|| "(empty)".into());
            return Err(ClusterError::NginxConfig { conf: conf.display().to_string(), message: tail });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_nginx_config_equals_the_rendered_output() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let config = Config::load(&root.join("configs/meshgate.toml")).unwrap();
        let shipped = std::fs::read_to_string(root.join("nginx/meshgate-stream.conf")).unwrap();
        assert_eq!(shipped, render(&config), "nginx/meshgate-stream.conf is stale: run `meshgate cluster render`");
    }

    #[test]
    fn rendered_config_reads_back_as_the_same_pool() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let config = Config::load(&root.join("configs/meshgate.toml")).unwrap();
        let (back, _) = Config::from_nginx(&render(&config), "rendered", "", "(defaults)").unwrap();
        assert_eq!(back.listen.mqtt, config.listen.mqtt);
        for (a, b) in back.brokers.iter().zip(&config.brokers) {
            assert_eq!(
                (&a.address, a.priority, a.weight, a.max_fails, a.fail_timeout),
                (&b.address, b.priority, b.weight, b.max_fails, b.fail_timeout)
            );
        }
    }
}
