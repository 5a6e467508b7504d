//! `meshgate check` beside real nginx: hung brokers taken out of nginx's upstream, tier order, failed reloads, sessions kept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Net};
use meshgate::sidecar::{self, SidecarOptions};
use meshgate::{Meshgate, Parts};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// nginx with its own prefix, its stream server including `upstream.conf`.
struct Nginx {
    prefix: PathBuf,
    child: Child,
}

impl Nginx {
    async fn start(dir: &Path, listen: std::net::SocketAddr, net: &Net) -> Nginx {
        let prefix = dir.to_path_buf();
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let mut upstream = String::from("upstream mqtt_brokers {\n    least_conn;\n");
        for (i, b) in net.brokers.iter().enumerate() {
            upstream.push_str(&format!(
                "    server {} max_fails=3 fail_timeout=30s{};\n",
                b.addr,
                if i > 0 { " backup" } else { "" }
            ));
        }
        upstream.push_str("}\n");
        std::fs::write(prefix.join("upstream.conf"), upstream).unwrap();
        let conf = format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes 1;\npid nginx.pid;\nerror_log logs/error.log notice;\n\
             events {{ worker_connections 1024; }}\nstream {{\n    include {up};\n    server {{\n        listen {listen};\n        proxy_pass mqtt_brokers;\n        proxy_connect_timeout 1s;\n        proxy_timeout 90s;\n    }}\n}}\n",
            up = prefix.join("upstream.conf").display()
        );
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let child = meshgate_tools::cluster::nginx::start(&prefix.join("nginx.conf"), &prefix, &listen.to_string())
            .await
            .expect("nginx starts");
        Nginx { prefix, child }
    }

    fn cmd(&self, extra: &str) -> String {
        format!("nginx -p {p} -c {p}/nginx.conf -e {p}/logs/error.log {extra}", p = self.prefix.display())
    }

    fn upstream(&self) -> PathBuf {
        self.prefix.join("upstream.conf")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        meshgate_tools::cluster::stop_pid(self.child.id(), Duration::from_secs(3));
        let _ = self.child.wait();
    }
}

struct Sidecar {
    mg: Option<Meshgate>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    async fn start(net: &Net, nginx: &Nginx, tiers: bool, reload_cmd: Option<&str>) -> Sidecar {
        let mg = Meshgate::start_parts(net.config(""), Parts { proxy: false, replication: false }).await.unwrap();
        let pool = mg.pool().clone();
        wait_until(Duration::from_secs(5), || pool.brokers().iter().all(|b| b.probe_up().is_some())).await.unwrap();
        let opts = SidecarOptions {
            upstream_file: nginx.upstream(),
            upstream_name: "mqtt_brokers".into(),
            tiers,
            test_cmd: Some(nginx.cmd("-t -q")),
            reload_cmd: reload_cmd.map(str::to_string).unwrap_or_else(|| nginx.cmd("-s reload")),
            min_interval: Duration::from_millis(200),
            retry: Duration::from_millis(500),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(sidecar::run(pool, opts, stop.clone()));
        Sidecar { mg: Some(mg), stop, task }
    }

    fn pool(&self) -> &Arc<meshgate::pool::Pool> {
        self.mg.as_ref().unwrap().pool()
    }

    fn reloads(&self, result: &str) -> u64 {
        let text = self.pool().metrics.render();
        let key = format!("meshgate_nginx_reloads_total{{result=\"{result}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
    }

    async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
        self.mg.take().unwrap().shutdown().await;
    }
}

/// Which broker a new client through `front` lands on: it subscribes through the front end,
/// then each broker gets one publish directly. `None` if no CONNACK came within `limit`.
async fn served_by(front: std::net::SocketAddr, net: &Net, limit: Duration) -> Option<String> {
    let id = format!("probe-{}", rand_id());
    let (mut c, ack) = raw::connect(front, 4, &id, limit).await.ok()?;
    assert_eq!(ack.code, 0);
    let topic = format!("which/{id}");
    c.write_all(&raw::subscribe_packet(1, &topic, 0)).await.ok()?;
    raw::read_packet(&mut c, Duration::from_secs(2)).await.ok()?; // SUBACK
    for b in &net.brokers {
        if let Ok((mut p, _)) = raw::connect(b.addr, 4, &format!("{id}-pub"), Duration::from_millis(300)).await {
            let _ = p.write_all(&raw::publish_packet(&topic, b.name.as_bytes(), 0, 0, false)).await;
        }
    }
    let (first, body) = raw::read_packet(&mut c, Duration::from_secs(2)).await.ok()?;
    Some(String::from_utf8_lossy(&raw::parse_publish(first, &body)?.payload).into_owned())
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1000 + std::process::id() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_broker_leaves_nginx_within_2s_and_comes_back_sessions_survive() {
    let mut net = Net::start(2);
    let dir = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(&dir.path().join("with"), net.slot.addr(1, 1883), &net).await;
    let plain = Nginx::start(&dir.path().join("without"), net.slot.addr(2, 1883), &net).await;
    let sidecar = Sidecar::start(&net, &nginx, false, None).await;
    assert_eq!(served_by(net.slot.addr(1, 1883), &net, Duration::from_secs(2)).await.as_deref(), Some("broker1"));

    let hung_at = Instant::now();
    blocking(|| net.broker("broker1").hang());
    // With the sidecar: new clients through nginx reach broker2 within 2 s.
    let mut served = None;
    while hung_at.elapsed() < Duration::from_secs(3) && served.as_deref() != Some("broker2") {
        served = served_by(net.slot.addr(1, 1883), &net, Duration::from_millis(300)).await;
    }
    let took = hung_at.elapsed();
    eprintln!("with the sidecar, new clients reached broker2 {took:?} after the hang");
    assert_eq!(served.as_deref(), Some("broker2"));
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let text = std::fs::read_to_string(nginx.upstream()).unwrap();
    assert!(text.lines().any(|l| l.contains(&net.brokers[0].addr.to_string()) && l.contains(" down;")), "{text}");
    // Without it, nginx keeps sending new clients to the hung broker: they hang.
    let r = raw::connect(net.slot.addr(2, 1883), 4, "no-sidecar", Duration::from_secs(3)).await;
    assert!(matches!(&r, Err(e) if e.starts_with(raw::ERR_CONNACK_TIMEOUT)), "{:?}", r.map(|x| x.1.code));

    // A session established through nginx now, on broker2, survives the reload that follows.
    let (mut kept, ack) = raw::connect(net.slot.addr(1, 1883), 4, "kept", Duration::from_secs(2)).await.unwrap();
    assert_eq!(ack.code, 0);
    let before = sidecar.reloads("ok");
    blocking(|| net.broker("broker1").resume());
    wait_until(Duration::from_secs(5), || sidecar.reloads("ok") > before)
        .await
        .expect("reloaded after broker1 came back");
    let mut back = None;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) && back.as_deref() != Some("broker1") {
        back = served_by(net.slot.addr(1, 1883), &net, Duration::from_millis(500)).await;
    }
    assert_eq!(back.as_deref(), Some("broker1"), "new clients go to broker1 again");
    kept.write_all(&raw::pingreq_packet()).await.unwrap();
    let (first, _) =
        raw::read_packet(&mut kept, Duration::from_secs(2)).await.expect("the session survived the reloads");
    assert_eq!(first, 0xd0);
    sidecar.stop().await;
    drop(plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_mode_sends_clients_to_broker3_only() {
    let mut net = Net::start(4);
    let dir = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(dir.path(), net.slot.addr(1, 1883), &net).await;
    let sidecar = Sidecar::start(&net, &nginx, true, None).await;
    blocking(|| {
        net.broker("broker1").kill();
        net.broker("broker2").hang();
    });
    let pool = sidecar.pool().clone();
    wait_until(Duration::from_secs(3), || {
        let b = pool.brokers();
        b[0].probe_up() == Some(false) && b[1].probe_up() == Some(false)
    })
    .await
    .expect("both marked down");
    // The gauge moves only once nginx has reloaded with the new file.
    let down_gauge = || {
        let m = sidecar.pool().metrics.render();
        m.lines().find_map(|l| l.strip_prefix("meshgate_nginx_servers_down ")).map(|v| v.trim().to_string())
    };
    wait_until(Duration::from_secs(3), || down_gauge().as_deref() == Some("3"))
        .await
        .expect("broker1, broker2 and broker4 marked down, broker3 left up, nginx reloaded");
    let text = std::fs::read_to_string(nginx.upstream()).unwrap();
    assert!(text.lines().any(|l| l.contains(&net.brokers[2].addr.to_string()) && !l.contains(" down;")), "{text}");
    // `nginx -s reload` returns before the old worker stops taking connections; the next few
    // clients may still meet the previous upstream.
    let t = Instant::now();
    while served_by(net.slot.addr(1, 1883), &net, Duration::from_millis(500)).await.as_deref() != Some("broker3") {
        assert!(t.elapsed() < Duration::from_secs(3), "nginx never took the new upstream");
    }
    for _ in 0..10 {
        assert_eq!(served_by(net.slot.addr(1, 1883), &net, Duration::from_secs(2)).await.as_deref(), Some("broker3"));
    }
    blocking(|| net.broker("broker2").resume());
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reload_keeps_the_old_file_and_is_counted() {
    let mut net = Net::start(2);
    let dir = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(dir.path(), net.slot.addr(1, 1883), &net).await;
    let original = std::fs::read_to_string(nginx.upstream()).unwrap();
    let sidecar = Sidecar::start(&net, &nginx, false, Some("echo 'reload refused' >&2; exit 3")).await;
    // The first rewrite (meshgate's rendering of the same pool) already needs a reload, which fails.
    wait_until(Duration::from_secs(5), || sidecar.reloads("reload_failed") >= 1).await.expect("failed reload counted");
    blocking(|| net.broker("broker1").hang());
    wait_until(Duration::from_secs(5), || sidecar.reloads("reload_failed") >= 2).await.expect("retried and counted");
    assert_eq!(std::fs::read_to_string(nginx.upstream()).unwrap(), original, "the old upstream file is still in place");
    assert_eq!(sidecar.reloads("ok"), 0);
    let events = sidecar.pool().events.since(0);
    assert!(events.iter().any(|e| e.message.contains("reload refused")), "{events:?}");
    blocking(|| net.broker("broker1").resume());
    sidecar.stop().await;
}
