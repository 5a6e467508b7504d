//! Byte forwarding between a client and its broker once the session is established.
//!
//! Idle IoT sessions are the common case, so an idle session holds no buffer at all: each
//! direction waits for readiness, reads into a stack buffer and writes it straight on. Only
//! when the other side cannot take everything at once is the rest copied to the heap, and that
//! buffer is freed as soon as it has drained.

use std::io::{self, ErrorKind};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

use crate::mqtt::{FrameError, FrameScanner};

const CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("client sent a malformed stream: {0}")]
    Malformed(#[from] FrameError),
}

/// Counters one direction updates as bytes pass.
pub struct Tally<'a> {
    pub bytes: &'a AtomicU64,
    pub packets: &'a AtomicU64,
    pub total_bytes: &'a prometheus::IntCounter,
}

enum Step {
    Eof,
    Sent,
    /// The destination's socket buffer was full; these bytes still have to go.
    Blocked(Vec<u8>),
    WouldBlock,
}

/// Copies `from` to `to` until `from` reaches EOF. With a scanner, the stream is checked
/// packet by packet and the copy stops at the first malformed packet, before it is sent.
pub async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    mut scanner: Option<&mut FrameScanner>,
    tally: Tally<'_>,
) -> Result<(), ForwardError> {
    loop {
        from.readable().await?;
        // The stack buffer lives only inside this synchronous call, so it is never part of
        // the session's future and costs nothing while the session waits.
        let step = read_and_send(from, to, scanner.as_deref_mut(), &tally)?;
        match step {
            Step::Eof => return Ok(()),
            Step::Sent | Step::WouldBlock => {}
            Step::Blocked(mut pending) => {
                while !pending.is_empty() {
                    to.writable().await?;
                    match to.try_write(&pending) {
                        Ok(n) => {
                            pending.drain(..n);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
}

fn read_and_send(
    from: &TcpStream,
    to: &TcpStream,
    scanner: Option<&mut FrameScanner>,
    tally: &Tally<'_>,
) -> Result<Step, ForwardError> {
    let mut buf = [0u8; CHUNK];
    let n = match from.try_read(&mut buf) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Step::WouldBlock),
        Err(e) => return Err(e.into()),
    };
    let data = &buf[..n];
    let mut packets = 0u64;
    if let Some(scanner) = scanner {
        scanner.feed(data, |_| packets += 1)?;
    }
    tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
    tally.packets.fetch_add(packets, Ordering::Relaxed);
    tally.total_bytes.inc_by(n as u64);
    let mut off = 0;
    while off < n {
        match to.try_write(&data[off..]) {
            Ok(k) => off += k,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Step::Blocked(data[off..].to_vec())),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Step::Sent)
}

/// Writes all of `data` (small: a CONNACK, leftover bytes) using readiness, like [`pump`].
pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
