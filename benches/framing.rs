//! Micro-benchmarks of the paths every byte and every connection takes: the packet scanner
//! over a forwarded stream, the remaining-length decoder, and CONNECT check + parse.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

use meshgate::mqtt::{self, encode, FrameScanner};

/// A stream of `n` QoS 0 PUBLISHes with 80-byte payloads, as a subscriber's socket carries it.
fn publishes(n: usize) -> Vec<u8> {
    let payload = [b'x'; 80];
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(encode::publish(4, &format!("sensors/{}/temp", i % 64), &payload));
    }
    out
}

fn scanner(c: &mut Criterion) {
    let stream = publishes(1000);
    let mut g = c.benchmark_group("frame_scanner");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    // One read per 64 KiB (what the forwarder reads under load) and per 1.5 KiB (a few packets).
    for chunk in [65_536usize, 1_500] {
        g.bench_function(format!("1000 publishes, {chunk}-byte reads"), |b| {
            b.iter_batched(
                || FrameScanner::new(1 << 20),
                |mut s| {
                    let mut packets = 0u32;
                    for part in stream.chunks(chunk) {
                        s.feed(black_box(part), |_| packets += 1).unwrap();
                    }
                    packets
                },
                BatchSize::SmallInput,
            )
        });
    }
    // Large packets: the scanner skips bodies without looking at them.
    let big: Vec<u8> = (0..16).flat_map(|_| encode::publish(4, "t", &[0u8; 60_000])).collect();
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("16 publishes of 60 KB", |b| {
        b.iter(|| {
            let mut s = FrameScanner::new(1 << 20);
            s.feed(black_box(&big), |_| {}).unwrap();
        })
    });
    g.finish();
}

fn remaining_length(c: &mut Criterion) {
    let encoded: Vec<Vec<u8>> = [0usize, 127, 128, 16_383, 16_384, 2_097_152, 268_435_455]
        .iter()
        .map(|&v| {
            let mut out = Vec::new();
            mqtt::encode_length(v, &mut out);
            out
        })
        .collect();
    c.bench_function("decode_length, 1 to 4 bytes (7 values)", |b| {
        b.iter(|| {
            for e in &encoded {
                black_box(mqtt::decode_length(black_box(e)));
            }
        })
    });
}

fn connect(c: &mut Criterion) {
    let mut g = c.benchmark_group("connect");
    let v4 = encode::connect(4, "sensor-0042-livingroom", true, 60, None, None);
    let v5 = encode::connect(5, "sensor-0042-livingroom", false, 60, Some("device"), Some("s3cret-password"));
    for (name, packet) in [("3.1.1", &v4), ("5 with credentials", &v5)] {
        g.bench_function(format!("check {name}"), |b| b.iter(|| mqtt::connect::check(black_box(packet), 1 << 20)));
        g.bench_function(format!("parse {name}"), |b| b.iter(|| mqtt::connect::parse(black_box(packet)).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, scanner, remaining_length, connect);
criterion_main!(benches);
