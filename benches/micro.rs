//! Criterion micro-benchmarks: `cargo bench --bench micro` (or
//! `scripts/bench.sh --micro`). No server needed.
//!
//! * the in-memory store's uncontended `lock` + `release`, through the public API;
//! * decoding each script's reply (`ticketlock::__bench::decode`), including a
//!   `read` reply of 1000 tickets.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ticketlock::LockStore;

fn in_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("in_memory");
    group.throughput(Throughput::Elements(1));
    for (name, runtime) in [
        (
            "lock+release/current_thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        ),
        // Driven from `block_on`, outside the workers: every lock's issue
        // task then runs on a worker and wakes this thread back up.
        (
            "lock+release/multi_thread_block_on",
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        ),
    ] {
        let store = LockStore::in_memory();
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| async {
                let guard = store.lock(black_box("conv-1")).await.expect("lock");
                guard.release().await.expect("release");
            })
        });
    }
    group.finish();
}

fn read_reply(tickets: i64) -> Vec<i64> {
    let mut reply = vec![1, tickets, 1_795_678_927_228_496, tickets];
    for n in 0..tickets {
        reply.push(n);
        reply.push(60_000 - n);
    }
    reply
}

fn decode(c: &mut Criterion) {
    let cases: [(&str, &str, Vec<i64>); 6] = [
        (
            "issue",
            "issue",
            vec![7, 1_795_678_927_228_496, 3, 59_000, -1],
        ),
        ("poll", "poll", vec![0, 3, 4, 1200, 58_000, -1]),
        ("release", "release", vec![1, 8]),
        ("update", "update", vec![2, 9]),
        ("read/10", "read", read_reply(10)),
        ("read/1000", "read", read_reply(1000)),
    ];
    let mut group = c.benchmark_group("decode");
    for (label, script, reply) in &cases {
        assert!(
            ticketlock::__bench::decode(script, reply),
            "{label}: the sample reply does not fit {script}.lua's contract"
        );
        group.bench_function(*label, |b| {
            b.iter(|| ticketlock::__bench::decode(black_box(script), black_box(reply)))
        });
    }
    group.finish();
}

criterion_group!(benches, in_memory, decode);
criterion_main!(benches);
