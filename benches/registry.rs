//! A CONNECT's registration in the session registry, with 10 and with 10,000 sessions already
//! open: the cost must not grow with the number of sessions (it is paid by every client of a
//! failed broker at once, in the reconnect storm).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshgate::pool::{Pool, SessionInfo};
use meshgate::Config;

fn info(client_id: String) -> SessionInfo {
    SessionInfo {
        client_id,
        username: None,
        version: 4,
        clean: true,
        keepalive: 60,
        persistent: false,
        peer: SocketAddr::from(([127, 0, 0, 1], 50000)),
        connected_at: SystemTime::now(),
    }
}

fn registration(c: &mut Criterion) {
    let config = Config::from_toml("[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n", "bench").unwrap();
    let mut group = c.benchmark_group("register");
    for open in [10usize, 10_000] {
        let pool = Arc::new(Pool::new(&config));
        let held: Vec<_> =
            (0..open).map(|i| pool.register(pool.pick(&[]).unwrap(), info(format!("device-{i}")))).collect();
        assert_eq!(pool.session_count(), open);
        let mut n = 0u64;
        group.bench_with_input(BenchmarkId::new("sessions_open", open), &open, |b, _| {
            b.iter(|| {
                n += 1;
                // Register and unregister (the guard's drop) one more client.
                let s = pool.register(pool.pick(&[]).unwrap(), info(format!("new-{n}")));
                black_box(&s);
            })
        });
        drop(held);
    }
    group.finish();
}

criterion_group!(benches, registration);
criterion_main!(benches);
