//! Gives each test its own block of loopback addresses, held by a file lock so parallel test processes never share one.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Directory shared by every test process on the machine; the lock files in it are the only
/// coordination between processes (cargo test threads and cargo-nextest processes alike).
const SLOT_DIR: &str = "/tmp/meshgate-test-slots";
const MAX_SLOTS: usize = 4000;

/// A block of loopback addresses 127.A.B.0/24 owned by one test until dropped.
///
/// The whole 127.0.0.0/8 range is routed to `lo` on Linux, so each slot can bind any port on its
/// own addresses without colliding with other tests or with services on 127.0.0.x.
pub struct Slot {
    index: usize,
    /// Holding the open file holds the lock; closing it (drop, or process death) releases it.
    _lock: File,
}

impl Slot {
    /// Takes the first free slot (an exclusive non-blocking flock on
    /// /tmp/meshgate-test-slots/slot-<n>.lock, n in 0..4000). The lock is held until the Slot is dropped; if the process dies
    /// the kernel releases it, so a crashed test never leaks a slot.
    pub fn acquire() -> Slot {
        std::fs::create_dir_all(SLOT_DIR).unwrap_or_else(|e| panic!("cannot create {SLOT_DIR}: {e}"));
        for index in 0..MAX_SLOTS {
            let path = PathBuf::from(format!("{SLOT_DIR}/slot-{index}.lock"));
            // No truncate: another process may hold this file locked, and the content is unused.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            // flock(2), exactly what std's File::try_lock does on Linux, called directly because
            // the crate's rust-version predates File::try_lock (1.89). flock locks belong to the
            // open file description, so a second open() conflicts even inside one process and two
            // Slots in the same test never share an index either.
            // SAFETY: the fd is valid for the duration of the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Slot { index, _lock: file };
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                panic!("cannot lock {}: {err}", path.display());
            }
        }
        panic!("all {MAX_SLOTS} test slots in {SLOT_DIR} are taken");
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// 127.A.B.last with A = 10 + index / 250 and B = index % 250: never 127.0.x.x, which the
    /// local system (and anything listening on 127.0.0.1) uses.
    pub fn ip(&self, last: u8) -> IpAddr {
        let a = 10 + self.index / 250;
        let b = self.index % 250;
        IpAddr::V4(Ipv4Addr::new(127, a as u8, b as u8, last))
    }

    pub fn addr(&self, last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(last), port)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({} -> {}/24)", self.index, self.ip(0))
    }
}
