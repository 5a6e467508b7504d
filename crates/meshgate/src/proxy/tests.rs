//! Fast tests of the session-moving and byte-forwarding parts of the proxy: the rebalancer's
//! failback rate on paused time, and `forward` over in-memory pipes (bounded buffering under a
//! slow reader, byte-exact order, counters, how it ends), with no broker and no network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::forward::{forward, Ended, ForwardError, Held, Side, Tally, CHUNK};
use super::rebalance_loop;
use crate::mqtt::{encode, FrameError, FrameScanner};
use crate::pool::{Health, Pool, Registered, SessionInfo};
use crate::Config;

/// Fails a test that would otherwise hang: on paused time the clock jumps to the deadline as
/// soon as every task is stuck, so this costs no real time.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(600), f).await.expect("stuck: no progress before the deadline")
}

// ---- rebalancer: failback rate --------------------------------------------

fn info(client_id: &str) -> SessionInfo {
    SessionInfo::for_test(client_id)
}

fn set_probe(pool: &Pool, name: &str, up: bool) {
    pool.broker(name).unwrap().set_health(Health {
        up: Some(up),
        since: SystemTime::now(),
        last: None,
        history: Default::default(),
    });
}

/// A primary `a` and a backup `b`; `n` sessions registered on `b` while `a` was down, two on
/// `a` after it came back (those must never be moved).
fn failed_over_pool(rate: f64, n: usize) -> (Arc<Pool>, Vec<Registered>, Vec<Registered>) {
    failed_over_pool_moving(rate, n, "close")
}

fn failed_over_pool_moving(rate: f64, n: usize, moves: &str) -> (Arc<Pool>, Vec<Registered>, Vec<Registered>) {
    let text = format!(
        "[proxy]\nfailback_rate = {rate:?}\nmove = \"{moves}\"\n\
         [[broker]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\npriority = 1\n\
         [[broker]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\npriority = 2\n"
    );
    let pool = Arc::new(Pool::new(&Config::from_toml(&text, "rebalance-test").unwrap()));
    set_probe(&pool, "a", false);
    let on_b: Vec<_> = (0..n).map(|i| pool.register(pool.pick(&[]).unwrap(), info(&format!("backup-{i}")))).collect();
    assert!(on_b.iter().all(|s| s.broker.name == "b"));
    set_probe(&pool, "a", true);
    let on_a: Vec<_> = (0..2).map(|i| pool.register(pool.pick(&[]).unwrap(), info(&format!("primary-{i}")))).collect();
    assert!(on_a.iter().all(|s| s.broker.name == "a"));
    (pool, on_b, on_a)
}

/// Runs the rebalancer and samples, half a period after each move, how many of the backup's
/// sessions are closing: one at once, then one more per `1 / rate` seconds, oldest first.
async fn drains_at(rate: f64, n: usize) {
    let (pool, on_b, on_a) = failed_over_pool(rate, n);
    let stop = CancellationToken::new();
    let task = tokio::spawn(rebalance_loop(pool.clone(), stop.clone()));
    let period = Duration::from_secs_f64(1.0 / rate);
    let closing = || on_b.iter().filter(|s| s.is_closing()).count();
    let started = tokio::time::Instant::now();
    tokio::time::sleep(period / 2).await;
    for moved in 1..=n + 3 {
        let expected = moved.min(n);
        assert_eq!(closing(), expected, "at {:?} (rate {rate}/s)", started.elapsed());
        // Oldest first: the closing ones are always the first registered.
        assert!(on_b[..expected].iter().all(|s| s.close_reason() == Some("failback")));
        assert!(on_b[expected..].iter().all(|s| !s.is_closing()));
        tokio::time::sleep(period).await;
    }
    assert!(on_a.iter().all(|s| !s.is_closing()), "sessions on the best tier stay");
    assert_eq!(pool.metrics.sessions_closed.with_label_values(&["failback"]).get(), n as u64);
    stop.cancel();
    within(task).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failback_drains_ten_a_second() {
    drains_at(10.0, 25).await;
}

#[tokio::test(start_paused = true)]
async fn failback_drains_at_the_configured_rate() {
    drains_at(4.0, 9).await;
}

/// With `move = "switch"` the rebalancer asks each session's task to switch (at the same
/// rate); a session closes, and counts as closed, only where its switch fails.
#[tokio::test(start_paused = true)]
async fn failback_asks_sessions_to_switch_at_the_rate() {
    let (pool, on_b, _on_a) = failed_over_pool_moving(10.0, 30, "switch");
    let stop = CancellationToken::new();
    let task = tokio::spawn(rebalance_loop(pool.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(999)).await;
    let asked: Vec<_> = on_b.iter().filter(|s| s.move_requested() == Some("failback")).collect();
    assert_eq!(asked.len(), 10);
    assert!(on_b[..10].iter().all(|s| s.move_requested().is_some()), "oldest first");
    assert_eq!(pool.metrics.sessions_closed.with_label_values(&["failback"]).get(), 0, "asked to move, not closed");
    stop.cancel();
    within(task).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failback_moves_no_more_than_the_rate_in_one_second() {
    let (pool, on_b, _on_a) = failed_over_pool(10.0, 100);
    let stop = CancellationToken::new();
    let task = tokio::spawn(rebalance_loop(pool.clone(), stop.clone()));
    // The first move is immediate, the 11th is due at exactly 1 s.
    tokio::time::sleep(Duration::from_millis(999)).await;
    assert_eq!(on_b.iter().filter(|s| s.is_closing()).count(), 10);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(on_b.iter().filter(|s| s.is_closing()).count(), 50, "after 4.999 s");
    stop.cancel();
    within(task).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(on_b.iter().filter(|s| s.is_closing()).count(), 50, "a stopped rebalancer moves nothing");
}

// ---- forward ---------------------------------------------------------------

/// One direction's counters, owned by the test so they can be read while forwarding runs.
struct Counts {
    bytes: AtomicU64,
    packets: AtomicU64,
    total: prometheus::IntCounter,
}

impl Counts {
    fn new() -> Arc<Counts> {
        Arc::new(Counts {
            bytes: AtomicU64::new(0),
            packets: AtomicU64::new(0),
            total: prometheus::IntCounter::new("t", "t").unwrap(),
        })
    }
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }
}

const MAX_PACKET: u32 = 1 << 20;

/// Forwards between `client` and `broker` in a task, checking both directions as MQTT.
fn spawn_forward<C, B>(client: C, broker: B, up: Arc<Counts>, down: Arc<Counts>) -> JoinHandle<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let (mut client, mut broker) = (client, broker);
        let (mut up_scan, mut down_scan) = (FrameScanner::new(MAX_PACKET), FrameScanner::new(MAX_PACKET));
        let (mut up_held, mut down_held) = (Held::default(), Held::default());
        forward(
            &mut client,
            &mut broker,
            Side {
                scanner: Some(&mut up_scan),
                tally: Tally { bytes: &up.bytes, packets: &up.packets, total_bytes: &up.total },
                tap: None,
                held: &mut up_held,
            },
            Side {
                scanner: Some(&mut down_scan),
                tally: Tally { bytes: &down.bytes, packets: &down.packets, total_bytes: &down.total },
                tap: None,
                held: &mut down_held,
            },
        )
        .await
    })
}

/// `n` MQTT packets (PUBLISHes of many sizes, PINGREQs and PUBACKs; with `large`, some
/// PUBLISHes are larger than one read) whose bytes depend on `seed` and their position, so a
/// lost or swapped piece shows.
fn mqtt_stream(seed: u64, n: usize, large: bool) -> Vec<u8> {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    };
    let mut out = Vec::new();
    for i in 0..n {
        match next() % 10 {
            0 => out.extend_from_slice(&encode::pingreq()),
            1 => out.extend_from_slice(&encode::ack(crate::mqtt::kind::PUBACK, i as u16)),
            r => {
                let len = if large && r == 9 && i % 7 == 0 {
                    CHUNK + 1000 + next() as usize % 5000
                } else {
                    next() as usize % 3000
                };
                let payload: Vec<u8> = (0..len).map(|j| (j as u64 ^ next() ^ i as u64) as u8).collect();
                out.extend(encode::publish(4, &format!("t/{i}"), &payload));
            }
        }
    }
    out
}

/// Reads `expected.len()` bytes in pieces of at most `piece`, letting every other task run
/// between pieces (a reader slower than its writer), and checks after each piece that the
/// forwarding direction has not read more than `pipe` (what the pipe to this reader holds)
/// plus one read beyond what arrived. Returns the largest such excess seen.
async fn slow_read<R: AsyncRead + Unpin>(
    from: &mut R,
    expected: &[u8],
    piece: usize,
    counts: &Counts,
    pipe: usize,
) -> u64 {
    let mut got = Vec::with_capacity(expected.len());
    let mut buf = vec![0u8; piece];
    let mut widest = 0;
    while got.len() < expected.len() {
        let n = from.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "EOF after {} of {} bytes", got.len(), expected.len());
        let at = got.len();
        got.extend_from_slice(&buf[..n]);
        assert_eq!(first_difference(&got[at..], &expected[at..got.len()]).map(|i| at + i), None, "first bad byte");
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let ahead = counts.bytes() - got.len() as u64;
        assert!(ahead <= (pipe + CHUNK) as u64, "{ahead} bytes read ahead of a slow reader (pipe {pipe})");
        widest = widest.max(ahead);
    }
    widest
}

/// Where `a` and `b` first differ (in a byte or in length); `None` when they are equal. A
/// failing stream comparison then names one offset instead of printing megabytes.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Writes `data` in 1 KiB pieces, counting what the pipe has taken so far.
fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut to: W,
    data: Vec<u8>,
    written: Arc<AtomicU64>,
) -> JoinHandle<W> {
    tokio::spawn(async move {
        for piece in data.chunks(1024) {
            to.write_all(piece).await.unwrap();
            written.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        to
    })
}

/// Streams `up` packets from the client to a slow broker-side reader and `down` packets the
/// other way, over pipes holding `client_pipe` and `broker_pipe` bytes; checks bytes, order and
/// counters, and returns how far each direction read ahead of its reader at most.
async fn stream_both_ways(up: usize, down: usize, client_pipe: usize, broker_pipe: usize) -> (u64, u64) {
    let (up_packets, down_packets) = (up as u64, down as u64);
    let (up, down) = (mqtt_stream(11, up, true), mqtt_stream(12, down, true));
    let (client_far, client_near) = duplex(client_pipe);
    let (broker_near, broker_far) = duplex(broker_pipe);
    let (up_counts, down_counts) = (Counts::new(), Counts::new());
    let task = spawn_forward(client_near, broker_near, up_counts.clone(), down_counts.clone());
    let (mut client_rx, client_tx) = tokio::io::split(client_far);
    let (mut broker_rx, broker_tx) = tokio::io::split(broker_far);
    let client_writer = spawn_writer(client_tx, up.clone(), Default::default());
    let broker_writer = spawn_writer(broker_tx, down.clone(), Default::default());
    let (up_ahead, down_ahead) = within(async {
        tokio::join!(
            slow_read(&mut broker_rx, &up, 700, &up_counts, broker_pipe),
            slow_read(&mut client_rx, &down, 700, &down_counts, client_pipe),
        )
    })
    .await;
    assert_eq!((up_counts.bytes(), up_counts.total.get()), (up.len() as u64, up.len() as u64));
    assert_eq!((down_counts.bytes(), down_counts.total.get()), (down.len() as u64, down.len() as u64));
    assert_eq!((up_counts.packets(), down_counts.packets()), (up_packets, down_packets));
    let mut client_tx = client_writer.await.unwrap();
    let _broker_tx = broker_writer.await.unwrap();
    client_tx.shutdown().await.unwrap();
    assert!(matches!(within(task).await.unwrap(), Ended::ClientClosed));
    (up_ahead, down_ahead)
}

#[tokio::test(start_paused = true)]
async fn a_slow_broker_gets_every_byte_in_order_and_buffering_stays_within_one_read() {
    assert!(mqtt_stream(11, 1500, true).len() > 30 * CHUNK, "long enough to fill every buffer many times");
    let (ahead, _) = stream_both_ways(1500, 0, 256 * 1024, 4096).await;
    // More than the pipe holds: a read was left pending, so the pending path was exercised.
    assert!(ahead > 4096, "never read ahead beyond the pipe: {ahead}");
}

#[tokio::test(start_paused = true)]
async fn a_slow_client_gets_every_byte_in_order_and_buffering_stays_within_one_read() {
    let (_, ahead) = stream_both_ways(0, 1500, 4096, 256 * 1024).await;
    assert!(ahead > 4096, "never read ahead beyond the pipe: {ahead}");
}

#[tokio::test(start_paused = true)]
async fn both_directions_at_once_stay_intact() {
    stream_both_ways(800, 800, 16 * 1024, 16 * 1024).await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_pushes_back_on_its_sender() {
    const CLIENT_PIPE: usize = 128 * 1024;
    const BROKER_PIPE: usize = 4096;
    let up = mqtt_stream(5, 1500, true);
    let (client_far, client_near) = duplex(CLIENT_PIPE);
    let (broker_near, mut broker_far) = duplex(BROKER_PIPE);
    let (up_counts, down_counts) = (Counts::new(), Counts::new());
    let task = spawn_forward(client_near, broker_near, up_counts.clone(), down_counts);
    let (_client_rx, client_tx) = tokio::io::split(client_far);
    let written = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(client_tx, up.clone(), written.clone());
    // The broker side reads nothing: let everything else run until it is stuck.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let read = up_counts.bytes();
    assert!(read > BROKER_PIPE as u64, "forwarding started: {read}");
    assert!(read <= (BROKER_PIPE + CHUNK) as u64, "read {read} with nowhere to put it");
    let sent = written.load(Ordering::Relaxed);
    assert!(sent <= read + CLIENT_PIPE as u64, "sender wrote {sent}, more than read + its pipe");
    assert!(sent < up.len() as u64 && !writer.is_finished(), "the sender is held back");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(up_counts.bytes(), read, "nothing more read while the reader is stalled");
    // Once the reader resumes, everything arrives.
    let mut got = vec![0u8; up.len()];
    within(broker_far.read_exact(&mut got)).await.unwrap();
    assert_eq!(first_difference(&got, &up), None, "first bad byte");
    writer.await.unwrap().shutdown().await.unwrap();
    assert!(matches!(within(task).await.unwrap(), Ended::ClientClosed));
}

#[tokio::test(start_paused = true)]
async fn client_eof_ends_with_client_closed_after_delivering_everything() {
    let (mut client_far, client_near) = duplex(64 * 1024);
    let (broker_near, mut broker_far) = duplex(64 * 1024);
    let up = mqtt_stream(6, 20, false);
    client_far.write_all(&up).await.unwrap();
    client_far.shutdown().await.unwrap();
    let (up_counts, down_counts) = (Counts::new(), Counts::new());
    let task = spawn_forward(client_near, broker_near, up_counts.clone(), down_counts.clone());
    assert!(matches!(within(task).await.unwrap(), Ended::ClientClosed));
    let mut got = Vec::new();
    broker_far.read_to_end(&mut got).await.unwrap();
    assert_eq!(first_difference(&got, &up), None, "first bad byte of {}", up.len());
    assert_eq!((up_counts.bytes(), up_counts.packets()), (up.len() as u64, 20));
    assert_eq!((down_counts.bytes(), down_counts.packets()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn broker_eof_ends_with_broker_closed_after_delivering_everything() {
    let (client_far, client_near) = duplex(64 * 1024);
    let (broker_near, mut broker_far) = duplex(64 * 1024);
    let down = mqtt_stream(7, 20, false);
    broker_far.write_all(&down).await.unwrap();
    broker_far.shutdown().await.unwrap();
    let (up_counts, down_counts) = (Counts::new(), Counts::new());
    let task = spawn_forward(client_near, broker_near, up_counts.clone(), down_counts.clone());
    let (mut client_rx, _client_tx) = tokio::io::split(client_far);
    assert!(matches!(within(task).await.unwrap(), Ended::BrokerClosed));
    let mut got = Vec::new();
    client_rx.read_to_end(&mut got).await.unwrap();
    assert_eq!(first_difference(&got, &down), None, "first bad byte of {}", down.len());
    assert_eq!((down_counts.bytes(), down_counts.packets()), (down.len() as u64, 20));
    assert_eq!(up_counts.bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_broken_broker_connection_ends_on_the_client_side() {
    // "Client side": reading from the client or writing to the broker failed.
    let (mut client_far, client_near) = duplex(1024);
    let (broker_near, broker_far) = duplex(1024);
    drop(broker_far);
    client_far.write_all(&encode::pingreq()).await.unwrap();
    let task = spawn_forward(client_near, broker_near, Counts::new(), Counts::new());
    match within(task).await.unwrap() {
        Ended::ClientSide(ForwardError::Write(e)) => assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe),
        other => panic!("expected a client-side write error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_broken_client_connection_ends_on_the_broker_side() {
    // The client's read side stays open and silent; only writing to it fails.
    let (_client_silent, client_reads) = duplex(1024);
    let (client_writes, client_gone) = duplex(1024);
    drop(client_gone);
    let client = tokio::io::join(client_reads, client_writes);
    let (broker_near, mut broker_far) = duplex(1024);
    broker_far.write_all(&encode::pingreq()).await.unwrap();
    let task = spawn_forward(client, broker_near, Counts::new(), Counts::new());
    match within(task).await.unwrap() {
        Ended::BrokerSide(ForwardError::Write(e)) => assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe),
        other => panic!("expected a broker-side error, got {other:?}"),
    }
}

/// Packets the client-side scanner must refuse, and why.
fn bad_packets() -> Vec<(Vec<u8>, FrameError)> {
    vec![
        (vec![0x00, 0x00], FrameError::Reserved),
        (vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], FrameError::BadLength),
        (vec![0x10, 0x02, 0x00, 0x04], FrameError::SecondConnect),
        (vec![0x30, 0x80, 0x80, 0x40], FrameError::TooLarge { kind: "PUBLISH", len: (1 << 20) + 4, max: MAX_PACKET }),
    ]
}

#[tokio::test(start_paused = true)]
async fn a_malformed_client_stream_stops_before_the_bad_packet_is_forwarded() {
    for (bad, why) in bad_packets() {
        let (mut client_far, client_near) = duplex(64 * 1024);
        let (broker_near, mut broker_far) = duplex(64 * 1024);
        let up_counts = Counts::new();
        let task = spawn_forward(client_near, broker_near, up_counts.clone(), Counts::new());
        let good = mqtt_stream(8, 10, false);
        client_far.write_all(&good).await.unwrap();
        let mut got = vec![0u8; good.len()];
        within(broker_far.read_exact(&mut got)).await.unwrap();
        assert_eq!(first_difference(&got, &good), None);
        // The bad packet, then a good one that must not pass either.
        client_far.write_all(&bad).await.unwrap();
        client_far.write_all(&encode::pingreq()).await.unwrap();
        match within(task).await.unwrap() {
            Ended::ClientSide(ForwardError::Malformed(e)) => assert_eq!(e, why),
            other => panic!("expected {why:?}, got {other:?}"),
        }
        let mut rest = Vec::new();
        broker_far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, Vec::<u8>::new(), "bytes after the last good packet reached the broker ({why:?})");
        assert_eq!((up_counts.bytes(), up_counts.packets()), (good.len() as u64, 10), "{why:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_bad_packet_in_the_same_read_as_good_ones_is_not_forwarded() {
    for (bad, why) in bad_packets() {
        let (mut client_far, client_near) = duplex(64 * 1024);
        let (broker_near, mut broker_far) = duplex(64 * 1024);
        let good = mqtt_stream(9, 5, false);
        let mut all = good.clone();
        all.extend_from_slice(&bad);
        client_far.write_all(&all).await.unwrap();
        let task = spawn_forward(client_near, broker_near, Counts::new(), Counts::new());
        assert!(
            matches!(within(task).await.unwrap(), Ended::ClientSide(ForwardError::Malformed(ref e)) if *e == why),
            "{why:?}"
        );
        let mut got = Vec::new();
        broker_far.read_to_end(&mut got).await.unwrap();
        assert!(got.len() <= good.len() && good.starts_with(&got), "part of the bad packet was forwarded ({why:?})");
    }
}

#[tokio::test(start_paused = true)]
async fn a_malformed_broker_stream_ends_on_the_broker_side() {
    let (client_far, client_near) = duplex(1024);
    let (broker_near, mut broker_far) = duplex(1024);
    broker_far.write_all(&[0x00, 0x00]).await.unwrap();
    let task = spawn_forward(client_near, broker_near, Counts::new(), Counts::new());
    assert!(matches!(within(task).await.unwrap(), Ended::BrokerSide(ForwardError::Malformed(FrameError::Reserved))));
    let (mut client_rx, _client_tx) = tokio::io::split(client_far);
    let mut got = Vec::new();
    client_rx.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "the bad packet reached the client");
}
