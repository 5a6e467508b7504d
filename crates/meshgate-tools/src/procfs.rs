//! Reading Linux's /proc: whether a process is alive, its resident memory and CPU time with its
//! descendants', and the machine facts a benchmark report records; and pinning a process tree
//! to CPUs, thread by thread as /proc lists them. The one place in the tools that knows /proc's
//! file formats.
//!
//! A process can exit between any two reads, so per-process readings are `Option`s: `None` means
//! "gone (or never there)", which callers treat as a normal outcome, not an error.

use std::path::Path;

/// The fields of `/proc/PID/stat` after the command name. The name sits in parentheses and may
/// itself contain spaces and parentheses, so the fields start after the *last* ')'.
struct Stat {
    state: char,
    ppid: u32,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid })
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// Resident memory of one process, KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user and system) one process has used, ns: the sum of every thread's
/// `/proc/PID/task/TID/schedstat` run time, which counts in nanoseconds where `/proc/PID/stat`
/// counts 10 ms ticks. A thread that exits between two readings takes its time with it; the
/// proxies measured here keep their threads.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(total)
}

/// Every process below `root` (children, grandchildren, ...), from each process's parent pid.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(s) = stat(pid) {
                parents.push((pid, s.ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// `per_process` of `pid` (which must exist) plus that of each descendant still there: a
/// front end's figure includes its workers (nginx's master and workers, for one).
fn tree_sum(pid: u32, per_process: fn(u32) -> Option<u64>) -> Option<u64> {
    let own = per_process(pid)?;
    Some(own + descendants(pid).into_iter().map(|c| per_process(c).unwrap_or(0)).sum::<u64>())
}

/// [`tree_sum`] over several pids; `None` when none is given or any is gone.
fn trees_sum(pids: &[u32], per_process: fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| tree_sum(p, per_process)).sum()
}

/// Resident memory of several processes and all their descendants, KiB.
pub fn rss_of(pids: &[u32]) -> Option<u64> {
    trees_sum(pids, rss_kib)
}

/// CPU time used so far by several processes and all their descendants, ns.
pub fn cpu_of(pids: &[u32]) -> Option<u64> {
    trees_sum(pids, cpu_ns)
}

/// What this machine is, as far as /proc tells.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineFacts {
    /// The first CPU's model name.
    pub cpu: Option<String>,
    pub memory_kib: Option<u64>,
    /// This process's open-file limit: (soft, hard), as /proc writes them ("unlimited" too).
    pub open_files: Option<(String, String)>,
    pub kernel: Option<String>,
}

pub fn machine() -> MachineFacts {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    let cpu = read("/proc/cpuinfo").and_then(|t| {
        t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string())
    });
    let memory_kib = read("/proc/meminfo").and_then(|t| {
        t.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    });
    // "Max open files            1024                 524288               files"
    let open_files = read("/proc/self/limits").and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("Max open files"))?;
        let mut v = line.split_whitespace().skip(3);
        Some((v.next()?.to_string(), v.next()?.to_string()))
    });
    let kernel = read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    MachineFacts { cpu, memory_kib, open_files, kernel }
}

/// Pins `root`, every descendant and every thread of each to `cpus` (threads and processes
/// they start later inherit it): a front end's workers may exist already, or not yet.
pub fn pin_tree(root: u32, cpus: &[usize]) -> std::io::Result<()> {
    use nix::sched::sched_setaffinity;
    let set = cpu_set(cpus)?;
    for pid in std::iter::once(root).chain(descendants(root)) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            // A thread that ended meanwhile is no error.
            match sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

fn cpu_set(cpus: &[usize]) -> std::io::Result<nix::sched::CpuSet> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(std::io::Error::from)?;
    }
    Ok(set)
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    match sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread (and what it starts from now on) to `cpus`.
pub fn pin_self(cpus: &[usize]) -> std::io::Result<()> {
    let set = cpu_set(cpus)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(Into::into)
}

/// Open file descriptors of several processes and all their descendants.
pub fn fds_of(pids: &[u32]) -> Option<u64> {
    trees_sum(pids, |pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_is_readable() {
        assert!(tree_sum(std::process::id(), rss_kib).unwrap() > 0);
    }

    #[test]
    fn own_process_is_alive_and_a_missing_one_is_not() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!alive(u32::MAX));
        assert_eq!(rss_kib(u32::MAX), None);
    }

    #[test]
    fn a_child_is_a_descendant() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let found = descendants(std::process::id()).contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        use nix::sys::resource::{getrusage, UsageWho};
        use nix::sys::time::TimeValLike;
        // This thread's CPU time by the kernel's other account, so a busy machine that takes
        // the core away mid-spin makes the spin longer, not the test flaky.
        let thread_us = || {
            let u = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
            u.user_time().num_microseconds() + u.system_time().num_microseconds()
        };
        let before = cpu_of(&[std::process::id()]).unwrap();
        let (start, deadline) = (thread_us(), std::time::Instant::now() + std::time::Duration::from_secs(5));
        let mut x = 0u64;
        while thread_us() - start < 20_000 && std::time::Instant::now() < deadline {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let used = cpu_of(&[std::process::id()]).unwrap() - before;
        // 20 ms of spinning on this thread: at least most of it is counted, in nanoseconds.
        assert!(used >= 15_000_000, "counted {used} ns for 20 ms of spinning");
        assert_eq!(cpu_of(&[]), None);
    }

    #[test]
    fn machine_facts_are_read() {
        let m = machine();
        assert!(m.memory_kib.is_some_and(|k| k > 0));
        assert!(m.kernel.is_some());
        assert!(m.open_files.is_some());
    }
}
