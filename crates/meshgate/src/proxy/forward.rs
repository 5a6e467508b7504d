//! Byte forwarding between a client and its broker once the session is established.
//!
//! Idle IoT sessions are the common case, so an idle session holds no buffer at all and its
//! waiting costs a few words: both directions are driven by one hand-written poll function
//! (no readiness futures with their waiter nodes inside the session's task), and reads go
//! into one 64 KiB buffer per worker thread, used only inside a synchronous poll. Only when
//! the other side cannot take everything at once is the rest copied to the heap, and that
//! buffer is freed as soon as it has drained; until then the direction reads nothing more, so
//! a slow receiver pushes back on its sender instead of growing the buffer.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::mqtt::{FrameError, FrameScanner};

/// Read size. Larger than nginx's 16 KiB `proxy_buffer_size`: under load one read then
/// carries hundreds of small MQTT packets, so there are fewer system calls per message.
/// `pub(crate)` for the tests in `proxy::tests`, which check buffering stays within one read.
pub(crate) const CHUNK: usize = 64 * 1024;

thread_local! {
    /// The read buffer of every session this worker thread drives. It is borrowed only inside
    /// a poll (never across an await), so sessions cannot see each other's bytes. Allocated
    /// and zeroed once per thread instead of once per read.
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Writing to the other side failed: which socket broke matters to a session that must
    /// tell a failed broker from a client that left.
    #[error("writing: {0}")]
    Write(io::Error),
    #[error("client sent a malformed stream: {0}")]
    Malformed(#[from] FrameError),
}

/// Counters one direction updates as bytes pass.
pub struct Tally<'a> {
    pub bytes: &'a AtomicU64,
    pub packets: &'a AtomicU64,
    pub total_bytes: &'a prometheus::IntCounter,
}

/// What one direction holds between polls: bytes read but not yet taken by the destination,
/// and whether a TLS destination still has some to flush. It lives outside the forwarding
/// future, so forwarding can stop (a session that moves to another broker) and pick up again
/// without losing a byte.
#[derive(Debug, Default)]
pub struct Held {
    /// `None` unless the destination was full. Boxed so an idle session holds one word for it
    /// instead of a Vec's three.
    #[allow(clippy::box_collection)]
    pending: Option<Box<Vec<u8>>>,
    /// A TLS destination may hold written bytes in its record buffer until flushed; plain TCP
    /// never does.
    unflushed: bool,
}

impl Held {
    /// Everything read has been handed to the destination.
    pub fn is_empty(&self) -> bool {
        self.pending.is_none() && !self.unflushed
    }

    /// What was read but not yet written (the destination failed: a session leaving a failed
    /// broker takes it over), and whether the destination may hold unflushed bytes.
    pub fn take(&mut self) -> (Vec<u8>, bool) {
        let pending = self.pending.take().map(|b| *b).unwrap_or_default();
        (pending, std::mem::take(&mut self.unflushed))
    }
}

/// One direction's checking and counting: with a scanner, the stream is checked packet by
/// packet and forwarding stops at the first malformed packet, before it is sent.
pub struct Side<'a> {
    pub scanner: Option<&'a mut FrameScanner>,
    pub tally: Tally<'a>,
    /// The session's subscription and QoS-flow tracking, shared by both directions; `true`
    /// when this direction carries the client's packets.
    pub tap: Option<(&'a super::track::SharedTrack, bool)>,
    pub held: &'a mut Held,
}

/// How forwarding ended.
#[derive(Debug)]
pub enum Ended {
    ClientClosed,
    BrokerClosed,
    /// Reading from the client or writing to the broker failed, or the client's stream was
    /// not MQTT.
    ClientSide(ForwardError),
    /// Reading from the broker or writing to the client failed.
    BrokerSide(ForwardError),
}

/// Copies client to broker (`up`) and broker to client (`down`) until either side closes or
/// fails.
pub fn forward<'a, C, B>(
    client: &'a mut C,
    broker: &'a mut B,
    up: Side<'a>,
    down: Side<'a>,
) -> impl Future<Output = Ended> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction { side: up };
    let mut down = Direction { side: down };
    // A plain poll function, not an async fn, so the session's task holds the two directions
    // and two references, nothing else. The streams are used one direction after the other
    // within a poll; a TCP socket keeps separate read and write wake-up slots (client read +
    // broker write, broker read + client write), so one task can wait on both.
    poll_fn(move |cx| {
        if let Poll::Ready(r) = up.poll(cx, &mut *client, &mut *broker) {
            return Poll::Ready(match r {
                Ok(()) => Ended::ClientClosed,
                Err(e) => Ended::ClientSide(e),
            });
        }
        if let Poll::Ready(r) = down.poll(cx, &mut *broker, &mut *client) {
            return Poll::Ready(match r {
                Ok(()) => Ended::BrokerClosed,
                Err(e) => Ended::BrokerSide(e),
            });
        }
        Poll::Pending
    })
}

struct Direction<'a> {
    side: Side<'a>,
}

impl Direction<'_> {
    /// Moves bytes until `from` has nothing more for now (`Pending`, with wake-ups
    /// registered), reaches EOF (`Ready(Ok)`) or fails. Tokio's cooperative budget makes the
    /// socket polls return `Pending` after a while, so a busy direction cannot starve the
    /// other one or other sessions.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<Result<(), ForwardError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let result = self.move_bytes(cx, from, to);
        if self.side.held.unflushed {
            // Pending registers the write wake-up, which polls this direction again.
            if let Poll::Ready(r) = Pin::new(&mut *to).poll_flush(cx) {
                r.map_err(ForwardError::Write)?;
                self.side.held.unflushed = false;
            }
        }
        result
    }

    fn move_bytes<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<Result<(), ForwardError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let held = &mut *self.side.held;
            if let Some(pending) = &mut held.pending {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, pending)).map_err(ForwardError::Write)?;
                held.unflushed = true;
                if n == 0 {
                    return Poll::Ready(Err(ForwardError::Write(ErrorKind::WriteZero.into())));
                }
                pending.drain(..n);
                if pending.is_empty() {
                    held.pending = None;
                }
                continue;
            }
            let eof = BUF.with(|buf| self.read_and_send(cx, &mut *from, &mut *to, &mut buf.borrow_mut()));
            if ready!(eof)? {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// One read into the thread's buffer, checked and counted, and written on as far as the
    /// destination takes it; the rest goes to `pending`. `Ready(Ok(true))` at EOF.
    fn read_and_send<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        buf: &mut [u8],
    ) -> Poll<Result<bool, ForwardError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut rb = ReadBuf::new(buf);
        ready!(Pin::new(from).poll_read(cx, &mut rb))?;
        let data = rb.filled();
        if data.is_empty() {
            return Poll::Ready(Ok(true));
        }
        let mut packets = 0u64;
        if let Some(scanner) = self.side.scanner.as_deref_mut() {
            match self.side.tap {
                None => scanner.feed(data, |_| packets += 1)?,
                Some((tap, from_client)) => tap.lock().feed(from_client, scanner, data, &mut packets)?,
            }
        }
        let tally = &self.side.tally;
        tally.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        tally.packets.fetch_add(packets, Ordering::Relaxed);
        tally.total_bytes.inc_by(data.len() as u64);
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut *to).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ForwardError::Write(ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(k)) => {
                    off += k;
                    self.side.held.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ForwardError::Write(e))),
                // The write wake-up is registered; the rest waits on the heap.
                Poll::Pending => {
                    self.side.held.pending = Some(Box::new(data[off..].to_vec()));
                    break;
                }
            }
        }
        Poll::Ready(Ok(false))
    }
}
