//! keepalived configs for a floating (VRRP) address in front of two or more meshgate instances: one file per instance, rendered from the instances, the address and the router id.
//!
//! Every instance runs `meshgate run` with the same `[coordination]` (they share state through
//! etcd) and one keepalived. keepalived holds the virtual address on one of them and moves it
//! when that instance's meshgate stops answering `/health`. VRRP goes unicast between the
//! instances' own addresses, so it works where multicast does not (clouds, some switches).
//! Nothing here connects anywhere: these are files for an operator to copy.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use super::deploy::File;
use meshgate::config::Config;

/// Seconds between two runs of the track script (keepalived's `interval`).
pub const CHECK_INTERVAL_S: u32 = 1;
/// Failed checks in a row before an instance gives up the address: with one check a second the
/// address leaves a dead meshgate 2 to 3 s after it stopped answering, and one slow answer (a
/// busy host) or two never move it, which would cut every client connection for nothing.
pub const FALL: u32 = 3;
/// Passed checks in a row before an instance may hold the address again.
pub const RISE: u32 = 2;
/// keepalived's own `timeout` for one check (whole seconds); curl gives up first (CURL_MAX_TIME),
/// so a check ends before the next one is due and a hung meshgate counts as one failure a second.
pub const CHECK_TIMEOUT_S: u32 = 1;
/// curl's limit for one `/health` answer.
pub const CURL_MAX_TIME: &str = "0.8";
/// Seconds between VRRP advertisements (`advert_int`).
pub const ADVERT_INT_S: u32 = 1;
/// The first instance's priority; each next one is PRIORITY_STEP lower. Priorities only decide
/// who takes the address (at start, and among several backups): with `nopreempt` a higher one
/// never takes it from a healthy holder. High values keep VRRP's skew time short: a backup
/// takes over (256 - priority) / 256 advertisement intervals after the holder resigns.
pub const PRIORITY_FIRST: u32 = 200;
pub const PRIORITY_STEP: u32 = 10;
/// The most instances the priorities leave room for (the last gets 200 - 19 * 10 = 10).
pub const MAX_INSTANCES: usize = 20;
/// Where `curl` lives on Debian and Ubuntu; keepalived runs the check without a shell or PATH.
pub const CURL: &str = "/usr/bin/curl";
const DEFAULT_HTTP_PORT: u16 = 8080;

/// The floating address and the instances behind it, as written in `network.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The address clients connect to, IPv4 with its prefix length ("192.0.2.100/24").
    pub virtual_address: String,
    /// VRRP's router id, 1..=255: unique among the VRRP groups of one network segment.
    pub virtual_router_id: u32,
    /// The interface the virtual address goes on, where an instance names none.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// In priority order: the first healthy one takes the address at start.
    #[serde(rename = "instance", default)]
    pub instances: Vec<Instance>,
}

/// One meshgate instance and the host it runs on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Its `[coordination] instance` name (also the file name: `keepalived-<name>.conf`).
    pub name: String,
    /// The host's own IPv4 address on the clients' segment: VRRP is sent from and to it.
    pub address: String,
    /// meshgate's `[listen] http` on that host (default: the address with the base config's
    /// HTTP port).
    pub http: Option<String>,
    /// The interface the virtual address goes on (default: the network's `interface`).
    pub interface: Option<String>,
}

fn default_interface() -> String {
    "eth0".into()
}

#[derive(Debug, thiserror::Error)]
pub enum KeepalivedError {
    #[error("{path}: {message}")]
    Network { path: String, message: String },
    #[error("no keepalived network description at {0}: write one (see deploy/keepalived/network.toml) or pass --network FILE")]
    NoNetwork(String),
    #[error("a floating address needs at least two instances, got {0}")]
    TooFew(usize),
    #[error("at most {MAX_INSTANCES} instances (their priorities descend by {PRIORITY_STEP} from {PRIORITY_FIRST}), got {0}")]
    TooMany(usize),
    #[error("instance name {0:?} must be letters, digits, '-', '_' or '.' (it names a file)")]
    BadName(String),
    #[error("instance {0:?} appears twice")]
    DuplicateName(String),
    #[error("instance {name}: address {address:?} must be an IPv4 address (VRRP is sent from it)")]
    BadAddress { name: String, address: String },
    #[error("instances {0} and {1} have the same address")]
    DuplicateAddress(String, String),
    #[error("instance {name}: http {http:?} must be ip:port, meshgate's [listen] http on that host")]
    BadHttp { name: String, http: String },
    #[error("instance {0}: no http address: the base config has [listen] http off, so give `http` for the instance (the track script reads /health)")]
    NoHttp(String),
    #[error("interface {0:?} is not an interface name (1 to 15 characters, no spaces or '/')")]
    BadInterface(String),
    #[error("virtual_address {0:?} must be an IPv4 address with its prefix length, e.g. \"192.0.2.100/24\"")]
    BadVirtualAddress(String),
    #[error("virtual_address {vip} is instance {name}'s own address: it must be a free one")]
    VirtualIsInstance { vip: String, name: String },
    #[error("virtual_router_id {0} must be 1..=255")]
    BadRouterId(u32),
}

impl Network {
    pub fn load(path: &Path) -> Result<Network, KeepalivedError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeepalivedError::NoNetwork(path.display().to_string()))
            }
            Err(e) => {
                return Err(KeepalivedError::Network { path: path.display().to_string(), message: e.to_string() })
            }
        };
        Network::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Network, KeepalivedError> {
        toml::from_str(text).map_err(|e| KeepalivedError::Network {
            path: origin.to_string(),
            message: e.message().trim().replace('\n', " "),
        })
    }
}

/// An instance with everything filled in and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub name: String,
    pub address: Ipv4Addr,
    pub http: SocketAddr,
    pub interface: String,
    pub priority: u32,
}

/// The checked network: the virtual address, its prefix length, and the instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub vip: Ipv4Addr,
    pub prefix: u8,
    pub router_id: u8,
    pub instances: Vec<Resolved>,
}

fn interface_ok(s: &str) -> bool {
    // Linux: IFNAMSIZ - 1 bytes, no '/', no whitespace (and keepalived splits on whitespace).
    !s.is_empty() && s.len() <= 15 && !s.contains('/') && !s.contains(char::is_whitespace) && s != "." && s != ".."
}

/// Checks the network against the base config (whose `[listen] http` port is the default HTTP
/// port of every instance) and fills in the defaults.
pub fn plan(base: &Config, net: &Network) -> Result<Plan, KeepalivedError> {
    let n = net.instances.len();
    if n < 2 {
        return Err(KeepalivedError::TooFew(n));
    }
    if n > MAX_INSTANCES {
        return Err(KeepalivedError::TooMany(n));
    }
    let router_id = u8::try_from(net.virtual_router_id)
        .ok()
        .filter(|r| *r > 0)
        .ok_or(KeepalivedError::BadRouterId(net.virtual_router_id))?;
    let (vip, prefix) = net
        .virtual_address
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok().filter(|p| (1..=32).contains(p))?)))
        .ok_or_else(|| KeepalivedError::BadVirtualAddress(net.virtual_address.clone()))?;
    if !interface_ok(&net.interface) {
        return Err(KeepalivedError::BadInterface(net.interface.clone()));
    }
    // `None`: [listen] http is off in the base config; a port it cannot parse means the default.
    let base_http_port =
        base.listen.http.as_deref().map(|h| h.parse::<SocketAddr>().map(|s| s.port()).unwrap_or(DEFAULT_HTTP_PORT));
    let mut names = HashSet::new();
    let mut instances: Vec<Resolved> = Vec::with_capacity(n);
    for (i, inst) in net.instances.iter().enumerate() {
        let name = &inst.name;
        let name_ok = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !name.starts_with('.');
        if !name_ok {
            return Err(KeepalivedError::BadName(name.clone()));
        }
        if !names.insert(name.as_str()) {
            return Err(KeepalivedError::DuplicateName(name.clone()));
        }
        let address: Ipv4Addr = inst
            .address
            .parse()
            .map_err(|_| KeepalivedError::BadAddress { name: name.clone(), address: inst.address.clone() })?;
        if let Some(other) = instances.iter().find(|o| o.address == address) {
            return Err(KeepalivedError::DuplicateAddress(other.name.clone(), name.clone()));
        }
        if address == vip {
            return Err(KeepalivedError::VirtualIsInstance { vip: vip.to_string(), name: name.clone() });
        }
        let http = match &inst.http {
            Some(h) => {
                h.parse::<SocketAddr>().map_err(|_| KeepalivedError::BadHttp { name: name.clone(), http: h.clone() })?
            }
            None => {
                SocketAddr::new(address.into(), base_http_port.ok_or_else(|| KeepalivedError::NoHttp(name.clone()))?)
            }
        };
        let interface = inst.interface.clone().unwrap_or_else(|| net.interface.clone());
        if !interface_ok(&interface) {
            return Err(KeepalivedError::BadInterface(interface));
        }
        let priority = PRIORITY_FIRST - PRIORITY_STEP * i as u32;
        instances.push(Resolved { name: name.clone(), address, http, interface, priority });
    }
    Ok(Plan { vip, prefix, router_id, instances })
}

/// The time VRRP waits after the holder resigns (a priority-0 advertisement, sent when its check
/// fails) before a backup of this priority takes the address: RFC 3768's skew time.
pub fn skew_time(priority: u32) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(ADVERT_INT_S)) * (256 - priority) / 256
}

/// The track script's command line for one instance.
pub fn check_command(http: SocketAddr) -> String {
    format!("{CURL} -fsS --max-time {CURL_MAX_TIME} -o /dev/null http://{http}/health")
}

/// keepalived's config for instance `i` of the plan.
pub fn render_instance(plan: &Plan, i: usize) -> String {
    let me = &plan.instances[i];
    let peers: String = plan
        .instances
        .iter()
        .filter(|o| o.name != me.name)
        .map(|o| format!("        {}    # {}\n", o.address, o.name))
        .collect();
    // The backup VRRP picks first when this one goes: the highest priority of the others.
    let next = plan.instances.iter().find(|o| o.name != me.name).expect("a plan has at least two instances");
    let order: Vec<String> = plan.instances.iter().map(|o| format!("{} {}", o.name, o.priority)).collect();
    format!(
        "# keepalived for meshgate instance {name}, rendered by `meshgate cluster render --target keepalived`.\n\
         # Install as /etc/keepalived/keepalived.conf on {name}'s host ({address}), then\n\
         # `systemctl restart keepalived`. Clients connect to {vip}: meshgate's [listen] mqtt must be\n\
         # 0.0.0.0:<port> (the address comes and goes; a listener bound to it would fail at start),\n\
         # and every instance runs with the same [coordination] so they share state through etcd.\n\
         # The track script needs curl (`apt-get install curl`): keepalived disables a check whose\n\
         # program is missing, and the address would then stay on a dead meshgate.\n\
         \n\
         global_defs {{\n\
         \x20   router_id meshgate-{name}\n\
         \x20   # The check needs no privilege, so it does not run as root; keepalived refuses a\n\
         \x20   # script that a non-root user could replace.\n\
         \x20   script_user nobody\n\
         \x20   enable_script_security\n\
         }}\n\
         \n\
         # meshgate serves: /health answers 200, i.e. it runs and has a broker to send clients to.\n\
         # A refused connection, a timeout or a 503 (no broker reachable from this host) fails the\n\
         # check: another instance may still reach the brokers. If none can, every instance fails\n\
         # and the address is nowhere until one recovers.\n\
         vrrp_script meshgate_health {{\n\
         \x20   script \"{check}\"\n\
         \x20   interval {interval}\n\
         \x20   timeout {timeout}\n\
         \x20   # The address leaves a meshgate that stopped serving {fall_lo} to {fall} s later ({fall} failed checks\n\
         \x20   # in a row, one a second), then the next instance takes it within its VRRP skew time\n\
         \x20   # (below 1 s). One slow answer never moves it: moving cuts every client connection.\n\
         \x20   fall {fall}\n\
         \x20   rise {rise}\n\
         \x20   # At start the address waits for meshgate to answer, not for keepalived.\n\
         \x20   init_fail\n\
         }}\n\
         \n\
         vrrp_instance meshgate {{\n\
         \x20   # BACKUP everywhere with nopreempt: the address moves only when its holder fails,\n\
         \x20   # never back when a higher priority instance recovers: moving it cuts every client\n\
         \x20   # connection to it, and the instances are equivalent. Priorities ({order}) decide\n\
         \x20   # who takes it at start and which backup takes it first.\n\
         \x20   state BACKUP\n\
         \x20   nopreempt\n\
         \x20   interface {interface}\n\
         \x20   virtual_router_id {router_id}\n\
         \x20   priority {priority}\n\
         \x20   advert_int {advert}\n\
         \x20   # Unicast VRRP between the instances' own addresses: no multicast needed. If this\n\
         \x20   # host (or its keepalived) dies while holding the address, {next} takes it after\n\
         \x20   # 3 missed advertisements and its skew time ({down:.2} s).\n\
         \x20   unicast_src_ip {address}\n\
         \x20   unicast_peer {{\n\
         {peers}\
         \x20   }}\n\
         \x20   virtual_ipaddress {{\n\
         \x20       {vip}/{prefix} dev {interface}\n\
         \x20   }}\n\
         \x20   track_script {{\n\
         \x20       meshgate_health\n\
         \x20   }}\n\
         }}\n",
        name = me.name,
        address = me.address,
        vip = plan.vip,
        prefix = plan.prefix,
        check = check_command(me.http),
        interval = CHECK_INTERVAL_S,
        timeout = CHECK_TIMEOUT_S,
        fall = FALL * CHECK_INTERVAL_S,
        fall_lo = (FALL - 1) * CHECK_INTERVAL_S,
        rise = RISE,
        order = order.join(", "),
        interface = me.interface,
        router_id = plan.router_id,
        priority = me.priority,
        advert = ADVERT_INT_S,
        next = next.name,
        down = f64::from(3 * ADVERT_INT_S) + skew_time(next.priority).as_secs_f64(),
    )
}

/// `network.toml` as read, with the defaults filled in, so the output directory says how it
/// was rendered and a second render gives the same files.
pub fn render_network(plan: &Plan) -> String {
    let mut t = format!(
        "# The floating address and the meshgate instances behind it, read by\n\
         # `meshgate cluster render --target keepalived --out <this directory>`, which writes\n\
         # keepalived-<instance>.conf for each instance here. Change it and render again.\n\
         \n\
         # The address clients connect to, with its prefix length.\n\
         virtual_address = \"{}/{}\"\n\
         # VRRP router id, 1..=255, unique among the VRRP groups on this network segment.\n\
         virtual_router_id = {}\n\
         \n\
         # In priority order: the first healthy instance takes the address at start.\n\
         # name: its [coordination] instance; address: the host's own address (VRRP goes from it);\n\
         # http: meshgate's [listen] http there; interface: where the virtual address goes.\n",
        plan.vip, plan.prefix, plan.router_id
    );
    for i in &plan.instances {
        t.push_str(&format!(
            "[[instance]]\nname = \"{}\"\naddress = \"{}\"\nhttp = \"{}\"\ninterface = \"{}\"\n",
            i.name, i.address, i.http, i.interface
        ));
    }
    t
}

/// Every file: `network.toml`, then `keepalived-<instance>.conf` in priority order.
pub fn render(base: &Config, net: &Network) -> Result<Vec<File>, KeepalivedError> {
    let plan = plan(base, net)?;
    let mut files = vec![File { name: "network.toml".into(), text: render_network(&plan) }];
    for (i, inst) in plan.instances.iter().enumerate() {
        files.push(File { name: format!("keepalived-{}.conf", inst.name), text: render_instance(&plan, i) });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    fn base() -> Config {
        Config::load(&root().join("configs/meshgate.toml")).unwrap()
    }

    fn net(text: &str) -> Network {
        Network::from_toml(text, "t").unwrap()
    }

    const THREE: &str = "virtual_address = \"192.0.2.100/24\"\nvirtual_router_id = 51\n\
        [[instance]]\nname = \"gw-a\"\naddress = \"192.0.2.1\"\n\
        [[instance]]\nname = \"gw-b\"\naddress = \"192.0.2.2\"\nhttp = \"10.0.0.2:9090\"\n\
        [[instance]]\nname = \"gw-c\"\naddress = \"192.0.2.3\"\ninterface = \"ens4\"\n";

    fn conf<'a>(files: &'a [File], name: &str) -> &'a str {
        &files.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no {name}")).text
    }

    /// The lines of a `name { ... }` block (without its braces), one level deep.
    fn block<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let start = text.lines().position(|l| l.trim() == format!("{name} {{")).unwrap_or_else(|| panic!("no {name}"));
        text.lines()
            .skip(start + 1)
            .take_while(|l| l.trim() != "}")
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn one_config_per_instance_with_descending_priorities_and_unicast_peers() {
        let files = render(&base(), &net(THREE)).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["network.toml", "keepalived-gw-a.conf", "keepalived-gw-b.conf", "keepalived-gw-c.conf"]);
        let a = conf(&files, "keepalived-gw-a.conf");
        let inst = block(a, "vrrp_instance meshgate");
        for line in [
            "state BACKUP",
            "nopreempt",
            "interface eth0",
            "virtual_router_id 51",
            "priority 200",
            "advert_int 1",
            "unicast_src_ip 192.0.2.1",
        ] {
            assert!(inst.contains(&line), "gw-a lacks {line:?}: {inst:?}");
        }
        assert_eq!(block(a, "unicast_peer"), ["192.0.2.2    # gw-b", "192.0.2.3    # gw-c"]);
        assert_eq!(block(a, "virtual_ipaddress"), ["192.0.2.100/24 dev eth0"]);
        assert_eq!(block(a, "track_script"), ["meshgate_health"]);
        let b = conf(&files, "keepalived-gw-b.conf");
        assert!(block(b, "vrrp_instance meshgate").contains(&"priority 190"));
        assert_eq!(block(b, "unicast_peer"), ["192.0.2.1    # gw-a", "192.0.2.3    # gw-c"]);
        // An instance's own interface goes on its own line and its address line.
        let c = conf(&files, "keepalived-gw-c.conf");
        let inst = block(c, "vrrp_instance meshgate");
        assert!(inst.contains(&"priority 180") && inst.contains(&"interface ens4"), "{inst:?}");
        assert_eq!(block(c, "virtual_ipaddress"), ["192.0.2.100/24 dev ens4"]);
    }

    #[test]
    fn the_track_script_checks_this_instances_health_and_fails_on_errors() {
        let files = render(&base(), &net(THREE)).unwrap();
        // Default HTTP: the instance's address with the base config's port (8080).
        let script = block(conf(&files, "keepalived-gw-a.conf"), "vrrp_script meshgate_health");
        assert_eq!(
            script,
            [
                "script \"/usr/bin/curl -fsS --max-time 0.8 -o /dev/null http://192.0.2.1:8080/health\"",
                "interval 1",
                "timeout 1",
                "fall 3",
                "rise 2",
                "init_fail",
            ]
        );
        // -f: an HTTP error (503, no broker) fails the check; the given http address is used.
        let b = block(conf(&files, "keepalived-gw-b.conf"), "vrrp_script meshgate_health");
        assert!(b[0].contains(" -fsS ") && b[0].ends_with(" http://10.0.0.2:9090/health\""), "{b:?}");
        let global = block(conf(&files, "keepalived-gw-a.conf"), "global_defs");
        assert!(global.contains(&"script_user nobody") && global.contains(&"enable_script_security"), "{global:?}");
        // curl gives up before keepalived's timeout, and that before the next check is due.
        let max: f64 = CURL_MAX_TIME.parse().unwrap();
        assert!(max < f64::from(CHECK_TIMEOUT_S) && CHECK_TIMEOUT_S <= CHECK_INTERVAL_S);
    }

    #[test]
    fn the_address_moves_in_about_three_seconds() {
        // fall checks a second: at most fall s after meshgate stopped, plus the second
        // instance's skew time.
        let worst = std::time::Duration::from_secs(u64::from(FALL * CHECK_INTERVAL_S))
            + skew_time(PRIORITY_FIRST - PRIORITY_STEP);
        assert!(worst.as_secs_f64() > 2.5 && worst.as_secs_f64() < 3.5, "{worst:?}");
        assert_eq!(skew_time(200).as_millis(), 218);
    }

    #[test]
    fn network_round_trips_through_its_own_file() {
        let p = plan(&base(), &net(THREE)).unwrap();
        let again = plan(&base(), &net(&render_network(&p))).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn shipped_example_equals_the_rendered_output() {
        let dir = root().join("deploy/keepalived");
        let files = render(&base(), &Network::load(&dir.join("network.toml")).unwrap()).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                files.iter().any(|f| f.name == name),
                "deploy/keepalived/{name} is not rendered any more: delete it"
            );
        }
        for f in files {
            let on_disk = std::fs::read_to_string(dir.join(&f.name)).unwrap_or_default();
            assert_eq!(
                on_disk, f.text,
                "deploy/keepalived/{} is stale: run `meshgate cluster render --target keepalived`",
                f.name
            );
        }
    }

    #[test]
    fn invalid_input_is_one_clear_line() {
        let two = |extra: &str, a: &str, b: &str| {
            format!(
                "virtual_address = \"192.0.2.100/24\"\nvirtual_router_id = 51\n{extra}\n\
                 [[instance]]\nname = \"gw-a\"\naddress = \"{a}\"\n[[instance]]\nname = \"gw-b\"\naddress = \"{b}\"\n"
            )
        };
        let err = |text: &str| plan(&base(), &net(text)).unwrap_err().to_string();
        let one = "virtual_address = \"192.0.2.100/24\"\nvirtual_router_id = 51\n[[instance]]\nname = \"a\"\naddress = \"192.0.2.1\"\n";
        for (text, expected) in [
            (one.to_string(), "at least two instances"),
            (two("", "192.0.2.1", "192.0.2.1"), "same address"),
            (two("", "192.0.2.1", "gw-b.example"), "must be an IPv4 address"),
            (two("", "192.0.2.1", "192.0.2.100"), "instance gw-b's own address"),
            (two("interface = \"eth 0\"", "192.0.2.1", "192.0.2.2"), "not an interface name"),
            (two("", "192.0.2.1", "192.0.2.2").replace("51", "0"), "virtual_router_id 0 must be 1..=255"),
            (two("", "192.0.2.1", "192.0.2.2").replace("51", "256"), "must be 1..=255"),
            (two("", "192.0.2.1", "192.0.2.2").replace("/24", ""), "with its prefix length"),
            (two("", "192.0.2.1", "192.0.2.2").replace("/24", "/33"), "with its prefix length"),
            (two("", "192.0.2.1", "192.0.2.2").replace("gw-b", "gw-a"), "appears twice"),
            (two("", "192.0.2.1", "192.0.2.2").replace("gw-b", "../x"), "names a file"),
            (two("", "192.0.2.1", "192.0.2.2") + "http = \"nowhere\"\n", "must be ip:port"),
        ] {
            let e = err(&text);
            assert!(e.contains(expected), "{e:?} should say {expected:?}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        let mut no_http = base();
        no_http.listen.http = None;
        let e = plan(&no_http, &net(&two("", "192.0.2.1", "192.0.2.2"))).unwrap_err().to_string();
        assert!(e.contains("no http address"), "{e}");
        // Unknown keys and missing ones are the TOML reader's one line, naming the file.
        let e =
            Network::from_toml("virtual_address = \"192.0.2.100/24\"\nvip = 1\n", "net.toml").unwrap_err().to_string();
        assert!(e.starts_with("net.toml: ") && e.contains("vip") && !e.contains('\n'), "{e}");
        let e = Network::load(Path::new("/nonexistent/network.toml")).unwrap_err().to_string();
        assert!(e.contains("--network"), "{e}");
    }
}
