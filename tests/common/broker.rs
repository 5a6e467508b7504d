//! Starts real Mosquitto brokers on a test's own loopback addresses and always stops them, even when the test panics.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::slot::Slot;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";
const READY_DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// How long hang()/resume() wait for the kernel to report the new process state.
const SIGNAL_DEADLINE: Duration = Duration::from_secs(5);

/// One real mosquitto process. Dropping it SIGKILLs and reaps the process.
pub struct Mosquitto {
    pub name: String,
    pub addr: SocketAddr,
    /// None before the first spawn and after kill(). Behind a Mutex so the &self methods can reap
    /// (try_wait needs &mut Child) while Mosquitto stays Sync for tests that share it.
    child: Mutex<Option<Child>>,
    config_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    /// Holds the config, log and password file; removed on drop.
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Writes a config (listener on `addr`, anonymous allowed, no persistence, log to a file in a
    /// fresh temp dir, plus `extra` lines appended verbatim), starts `mosquitto -c` in the
    /// foreground and waits until it answers an MQTT CONNECT with a CONNACK (deadline 10 s).
    /// Panics with the log's tail if it doesn't.
    pub fn start(name: &str, addr: SocketAddr, extra: &str) -> Mosquitto {
        let broker = Self::spawn(name, addr, "allow_anonymous true\n", extra);
        broker.wait_ready();
        broker
    }

    /// A broker whose listener speaks TLS (`extra` holds cafile/certfile/keyfile lines). Ready
    /// once its process holds the listening socket: a plain MQTT probe cannot talk to it.
    pub fn start_tls(name: &str, addr: SocketAddr, extra: &str) -> Mosquitto {
        let broker = Self::spawn(name, addr, "allow_anonymous true\n", extra);
        let deadline = Instant::now() + READY_DEADLINE;
        while !owns_listener(broker.pid().unwrap_or(0), addr) {
            assert!(broker.is_running(), "mosquitto {name} exited\n{}", broker.diagnostics());
            assert!(Instant::now() < deadline, "mosquitto {name} not listening on {addr}\n{}", broker.diagnostics());
            std::thread::sleep(POLL);
        }
        broker
    }

    /// Same as `start`, but only `user`/`pass` may connect (password file made with
    /// `mosquitto_passwd -b -c`, anonymous access off).
    pub fn start_with_password(name: &str, addr: SocketAddr, user: &str, pass: &str) -> Mosquitto {
        let dir = make_dir(name);
        let passwd = dir.path().join(format!("{name}.passwd"));
        let out = Command::new(MOSQUITTO_PASSWD)
            .arg("-b")
            .arg("-c")
            .arg(&passwd)
            .arg(user)
            .arg(pass)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO_PASSWD}: {e}"));
        assert!(
            out.status.success(),
            "mosquitto_passwd failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let auth = format!("allow_anonymous false\npassword_file {}\n", passwd.display());
        let broker = Self::spawn_in(dir, name, addr, &auth, "");
        broker.wait_ready();
        broker
    }

    /// Writes the config and starts the process without waiting for it to answer, so a pool can
    /// start all its brokers at once.
    fn spawn(name: &str, addr: SocketAddr, auth: &str, extra: &str) -> Mosquitto {
        Self::spawn_in(make_dir(name), name, addr, auth, extra)
    }

    /// `{dir}` in `extra` stands for the broker's own temp dir (e.g. for persistence_location).
    fn spawn_in(dir: tempfile::TempDir, name: &str, addr: SocketAddr, auth: &str, extra: &str) -> Mosquitto {
        let extra = &extra.replace("{dir}", &dir.path().display().to_string());
        let config_path = dir.path().join(format!("{name}.conf"));
        let log_path = dir.path().join(format!("{name}.log"));
        let stderr_path = dir.path().join(format!("{name}.stderr"));
        // `user root`: as root, mosquitto 2 otherwise switches to the `mosquitto` user, which
        // cannot write the log in our temp dir. Ignored when not running as root.
        let mut config = format!(
            "listener {port} {ip}\n{auth}persistence false\nlog_dest file {log}\nuser root\n",
            port = addr.port(),
            ip = addr.ip(),
            log = log_path.display(),
        );
        if !extra.is_empty() {
            config.push_str(extra);
            config.push('\n');
        }
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let broker = Mosquitto {
            name: name.to_string(),
            addr,
            child: Mutex::new(None),
            config_path,
            log_path,
            stderr_path,
            dir,
        };
        broker.spawn_process();
        broker
    }

    fn spawn_process(&self) {
        // Config errors are printed to stderr before the log file is opened, so keep stderr too
        // (appending, so a restart doesn't erase the previous run's complaints).
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.stderr_path.display()));
        let mut cmd = Command::new(MOSQUITTO);
        // Foreground (no -d): we own the process and must be able to signal and reap it.
        cmd.arg("-c").arg(&self.config_path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Kill the broker if the test process dies without running Drop (SIGKILL from a
                // nextest timeout, abort, ...).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect; then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = spawn_from_long_lived_thread(cmd)
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO} for {}: {e}", self.name));
        *self.lock_child() = Some(child);
    }

    /// Polls until the broker answers a CONNECT with any CONNACK (a refusal such as "not
    /// authorized" still proves it is serving MQTT). Panics with the log tail on deadline or if the
    /// process exits first (e.g. its address is still taken).
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_DEADLINE;
        let mut last_err;
        loop {
            if !self.is_running() {
                panic!("mosquitto {} ({}) exited before answering MQTT\n{}", self.name, self.addr, self.diagnostics());
            }
            // Someone else listening on our address (a leftover broker, a test reusing an
            // address) would answer the probe too, so first make sure the socket is ours.
            let pid = self.pid().unwrap_or(0);
            if !owns_listener(pid, self.addr) {
                last_err = format!("pid {pid} is not listening on {} yet", self.addr);
            } else {
                match probe(self.addr, deadline) {
                    Ok(()) => return,
                    Err(e) => last_err = e,
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "mosquitto {} ({}) did not answer MQTT within {:?}: {last_err}\n{}",
                    self.name,
                    self.addr,
                    READY_DEADLINE,
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Never panics on poisoning: Drop must always be able to kill the process.
    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().map(Child::id)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL and reap. Idempotent; also works on a hung (stopped) broker.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.lock_child().take() {
            // Fails only if it already exited, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the kernel keeps completing TCP handshakes on the listen socket, but nothing
    /// answers MQTT. Returns once the process is actually stopped.
    pub fn hang(&self) {
        self.signal(Signal::SIGSTOP);
        self.wait_state(|s| s == 'T' || s == 't', "stopped");
    }

    /// SIGCONT after hang(). Returns once the process is no longer stopped.
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
        self.wait_state(|s| s != 'T' && s != 't', "resumed");
    }

    /// Kills the process if it is still alive, then starts it again with the same config and
    /// address and waits until it answers MQTT. The log file keeps growing across restarts.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_process();
        self.wait_ready();
    }

    /// True while the process is alive, including while hung.
    pub fn is_running(&self) -> bool {
        let mut guard = self.lock_child();
        match guard.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Contents of its log file (empty if it has not written one yet).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        let pid = self.pid().unwrap_or_else(|| panic!("mosquitto {} is not running; cannot send {sig}", self.name));
        signal::kill(Pid::from_raw(pid as i32), sig)
            .unwrap_or_else(|e| panic!("cannot send {sig} to mosquitto {} (pid {pid}): {e}", self.name));
    }

    /// Signals are delivered asynchronously; poll /proc so hang() really means "no longer
    /// answering" by the time it returns.
    fn wait_state(&self, want: impl Fn(char) -> bool, what: &str) {
        let pid = self.pid().expect("process vanished while signalling it");
        let deadline = Instant::now() + SIGNAL_DEADLINE;
        loop {
            let state = proc_state(pid);
            match state {
                Some(s) if want(s) => return,
                None => panic!("mosquitto {} (pid {pid}) disappeared while waiting until {what}", self.name),
                _ => {}
            }
            if Instant::now() >= deadline {
                panic!("mosquitto {} (pid {pid}) not {what} after {SIGNAL_DEADLINE:?} (state {state:?})", self.name);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn diagnostics(&self) -> String {
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let config = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        format!(
            "--- config {} ---\n{config}--- stderr (tail) ---\n{}--- log {} (tail) ---\n{}",
            self.config_path.display(),
            tail(&stderr, 20),
            self.log_path.display(),
            tail(&self.log(), 40)
        )
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // A failing test gets the broker's side of the story in its captured output; the temp
        // dir holding the log is about to be deleted.
        if std::thread::panicking() {
            eprintln!("=== mosquitto {} ({}) log tail ===\n{}", self.name, self.addr, tail(&self.log(), 40));
        }
        self.kill();
    }
}

impl std::fmt::Debug for Mosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mosquitto")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("pid", &self.pid())
            .finish()
    }
}

/// Starts n brokers named broker1..brokerN at slot.addr(9 + i, 1883) (broker1 at .10, as in the
/// local layout), i = 1..=n, all spawned
/// before waiting on any, and returns them in order.
pub fn start_pool(slot: &Slot, n: usize) -> Vec<Mosquitto> {
    start_pool_with(slot, n, "")
}

/// `start_pool` with extra config lines for every broker (`{dir}` = the broker's temp dir).
pub fn start_pool_with(slot: &Slot, n: usize, extra: &str) -> Vec<Mosquitto> {
    assert!(n <= 200, "pool of {n} brokers does not fit a slot's addresses");
    let brokers: Vec<Mosquitto> = (1..=n)
        .map(|i| {
            let addr = slot.addr(9 + i as u8, 1883);
            Mosquitto::spawn(&format!("broker{i}"), addr, "allow_anonymous true\n", extra)
        })
        .collect();
    // If one fails to come up, the panic drops the whole Vec and so kills every broker.
    for b in &brokers {
        b.wait_ready();
    }
    brokers
}

fn make_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("meshgate-{name}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create temp dir: {e}"))
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Tests
/// may start or restart brokers from short-lived threads (spawn_blocking workers idle out after
/// 10 s, tokio workers stop with their runtime), which would silently kill the broker mid-test.
/// So every spawn happens on one thread that lives as long as the process.
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("mosquitto-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the mosquitto spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("mosquitto spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("mosquitto spawner thread dropped the request"))?
}

/// One readiness probe: TCP connect, MQTT 3.1.1 CONNECT, expect a CONNACK packet header.
fn probe(addr: SocketAddr, deadline: Instant) -> Result<(), String> {
    let budget =
        deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut s = TcpStream::connect_timeout(&addr, budget).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(budget)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).ok();
    // CONNECT, protocol "MQTT" level 4, clean session, keepalive 10, client id "meshgate-probe".
    let id = b"meshgate-probe";
    let mut pkt = vec![0x10, (12 + id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    pkt.extend_from_slice(&(id.len() as u16).to_be_bytes());
    pkt.extend_from_slice(id);
    s.write_all(&pkt).map_err(|e| format!("write CONNECT: {e}"))?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).map_err(|e| format!("read CONNACK: {e}"))?;
    if connack[0] != 0x20 || connack[1] != 2 {
        return Err(format!("not a CONNACK: {connack:02x?}"));
    }
    // Leave politely so the broker log doesn't fill with "closed its connection" noise.
    let _ = s.write_all(&[0xE0, 0x00]);
    Ok(())
}

/// Whether process `pid` holds a listening TCP socket bound to `addr`: find the socket's inode in
/// /proc/net/tcp, then look for it among the process's fds. IPv6 addresses are not checked (slots
/// are IPv4), so they always count as owned and only the MQTT probe decides.
fn owns_listener(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return true;
    };
    // The kernel prints the address as the raw network-order u32 in hex, the port as a number.
    let local = format!("{:08X}:{:04X}", u32::from_ne_bytes(v4.ip().octets()), v4.port());
    // The calling thread's namespace: /proc/net is the main thread's, and tests/keepalived.rs
    // starts brokers from a thread that has joined another network namespace.
    let Ok(table) = std::fs::read_to_string("/proc/thread-self/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Fields: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

/// The state letter from /proc/<pid>/stat (R, S, T, Z, ...), None if the process is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces; the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    out.push('\n');
    out
}
