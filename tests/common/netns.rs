//! What the network-namespace tests share (tests/netns.rs, tests/keepalived.rs): commands, namespaces named `<prefix>-<pid>-...` and their cleanup, children that die with the test, threads inside a namespace.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

/// Runs a command to completion; Err carries its stderr (one line).
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("`{cmd} {}` failed: {}", args.join(" "), err.trim().replace('\n', " ")))
    }
}

pub fn must(cmd: &str, args: &[&str]) -> String {
    run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn ip(args: &[&str]) -> String {
    must("ip", args)
}

/// Every process still inside a namespace of ours was started by one of these tests.
pub fn kill_namespace_processes(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Namespaces `<prefix>-<pid>-...` of earlier runs whose process is gone (a SIGKILLed test
/// cannot run Drop).
pub fn remove_stale_namespaces(prefix: &str) {
    let Ok(list) = run("ip", &["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = name.split('-');
        if parts.next() != Some(prefix) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // a run in progress (or a reused pid: then it waits for a later run)
        }
        kill_namespace_processes(name);
        let _ = run("ip", &["netns", "del", name]);
    }
}

/// Kills the process if the test process dies without running Drop (a SIGKILL, an abort).
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Runs `f` on a thread inside namespace `ns`: its sockets and the processes it starts are there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a valid fd for the call; CLONE_NEWNET moves only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        });
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A lab's teardown: its processes killed, its namespaces (and with them every bridge and veth)
/// deleted, and, when the test failed, the last `tail` lines of each `*.log` in `dir`.
pub fn tear_down(what: &str, procs: &mut [(String, Child)], namespaces: &[String], dir: &Path, tail: usize) {
    for (_, child) in procs.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    for ns in namespaces.iter().rev() {
        kill_namespace_processes(ns);
        if let Err(e) = run("ip", &["netns", "del", ns]) {
            eprintln!("{what} cleanup: {e}");
        }
    }
    if std::thread::panicking() {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().rev().take(tail).collect();
                eprintln!("--- {} (last lines)", p.display());
                for l in lines.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}
