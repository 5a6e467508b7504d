//! An experiment, not part of meshgate: the cheapest TCP forwarder io_uring allows, to measure what batched submission saves per message.
//!
//! Issue 22 asks for front-end CPU per message at most 0.75x nginx's and names io_uring
//! (one submission for the reads and writes of many connections) as a candidate. Before
//! building it into meshgate, this asks whether it can get there at all: it forwards bytes
//! between each client and one upstream, reads no MQTT and keeps no state, one thread, one ring,
//! one `io_uring_enter` per pass over every ready completion. If this costs more than 0.75x
//! nginx per message, so would meshgate on io_uring. docs/benchmarks.md has the numbers and how
//! they were taken:
//!
//! ```sh
//! cargo build --release --example uring_forward
//! taskset -c 1 target/release/examples/uring_forward 127.0.0.1:1884 127.0.0.10:1883
//! ```
//!
//! The ring is set up for one thread that submits and reaps itself (`COOP_TASKRUN`,
//! `SINGLE_ISSUER`, `DEFER_TASKRUN`: completions are run when it asks, without interrupts);
//! `URING_PLAIN=1` measures a default ring instead.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

const BUF: usize = 64 * 1024;
const ACCEPT: u64 = u64::MAX;

/// One direction of a client's pair: what it reads from and writes to, and the bytes between.
struct Half {
    from: RawFd,
    to: RawFd,
    buf: Box<[u8]>,
    /// Bytes read and not yet written: `buf[sent..filled]`.
    filled: usize,
    sent: usize,
}

/// A client and its upstream; `halves[0]` carries client to upstream, `halves[1]` back.
struct Pair {
    halves: [Half; 2],
    /// Operations still in the kernel: the pair's sockets are closed only when none is.
    inflight: u32,
    closing: bool,
}

fn user_data(pair: usize, half: usize, send: bool) -> u64 {
    ((pair as u64) << 2) | ((half as u64) << 1) | send as u64
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: uring_forward LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let listener = TcpListener::bind(listen)?;
    let mut ring = match std::env::var("URING_PLAIN") {
        Ok(_) => IoUring::new(4096)?,
        Err(_) => IoUring::builder().setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun().build(4096)?,
    };
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut queue: VecDeque<squeue::Entry> = VecDeque::new();
    let accept = || {
        opcode::Accept::new(types::Fd(listener.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
            .build()
            .user_data(ACCEPT)
    };
    queue.push_back(accept());
    loop {
        // Everything queued goes in with the one call that waits for the next completion.
        {
            let mut sq = ring.submission();
            while let Some(e) = queue.front() {
                // SAFETY: every buffer an entry points into is a pair's boxed buffer, which
                // stays where it is until the pair is dropped, after its last completion.
                if unsafe { sq.push(e) }.is_err() {
                    break;
                }
                queue.pop_front();
            }
        }
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (data, res) in done {
            if data == ACCEPT {
                queue.push_back(accept());
                if res >= 0 {
                    // SAFETY: the kernel handed this descriptor to us.
                    let client = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(res) };
                    if let Some(pair) = open(client, upstream) {
                        let i = free.pop().unwrap_or_else(|| {
                            pairs.push(None);
                            pairs.len() - 1
                        });
                        let p = pairs[i].insert(pair);
                        for h in 0..2 {
                            queue.push_back(recv(&mut p.halves[h], i, h));
                        }
                        p.inflight = 2;
                    }
                }
                continue;
            }
            let (i, h, send) = ((data >> 2) as usize, ((data >> 1) & 1) as usize, data & 1 == 1);
            let Some(p) = pairs[i].as_mut() else { continue };
            p.inflight -= 1;
            if !p.closing {
                let half = &mut p.halves[h];
                if res <= 0 {
                    p.closing = true;
                } else if send {
                    half.sent += res as usize;
                    queue.push_back(if half.sent < half.filled { send_rest(half, i, h) } else { recv(half, i, h) });
                    p.inflight += 1;
                } else {
                    (half.filled, half.sent) = (res as usize, 0);
                    queue.push_back(send_rest(half, i, h));
                    p.inflight += 1;
                }
                if p.closing {
                    // The other half's receive is still in the kernel: shutting the sockets
                    // down ends it.
                    for fd in [p.halves[0].from, p.halves[0].to] {
                        // SAFETY: the pair owns both descriptors until it is dropped.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    }
                }
            }
            if p.closing && p.inflight == 0 {
                for fd in [p.halves[0].from, p.halves[0].to] {
                    // SAFETY: no operation of the pair is in the kernel any more.
                    unsafe { libc::close(fd) };
                }
                pairs[i] = None;
                free.push(i);
            }
        }
    }
}

/// Connects the client's upstream (blocking: connection set-up is not what this measures).
fn open(client: TcpStream, upstream: SocketAddr) -> Option<Pair> {
    let up = TcpStream::connect(upstream).ok()?;
    for s in [&client, &up] {
        s.set_nodelay(true).ok()?;
    }
    let (c, u) = (client.into_raw_fd(), up.into_raw_fd());
    let half = |from, to| Half { from, to, buf: vec![0; BUF].into_boxed_slice(), filled: 0, sent: 0 };
    Some(Pair { halves: [half(c, u), half(u, c)], inflight: 0, closing: false })
}

fn recv(half: &mut Half, pair: usize, h: usize) -> squeue::Entry {
    opcode::Recv::new(types::Fd(half.from), half.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data(user_data(pair, h, false))
}

fn send_rest(half: &mut Half, pair: usize, h: usize) -> squeue::Entry {
    let rest = &half.buf[half.sent..half.filled];
    opcode::Send::new(types::Fd(half.to), rest.as_ptr(), rest.len() as u32).build().user_data(user_data(pair, h, true))
}
