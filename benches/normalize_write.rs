//! Criterion benches for the hot stages: callback parse + normalize, the journal commit, collapse, and
//! the Parquet write.
//!
//! Run: `cargo bench --bench normalize_write`. Throughput is in usage records.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tsusage::collect::Intake;
use tsusage::config::{JournalCompression, PartitionBy};
use tsusage::normalize::collapse::{RowSet, usage_row};
use tsusage::state::{Digest, NewCallback, SqliteStore, Store};
use tsusage::write::parquet::{PartitionWriter, WriterOptions};

/// `callbacks` usage callbacks of `records` records each, all on 2021-08-15, string counts as the
/// vendor sends them, with the echoed credentials.
fn vendor_shaped_callbacks(callbacks: usize, records: usize) -> Vec<String> {
    (0..callbacks)
        .map(|c| {
            let recs: Vec<String> = (0..records)
                .map(|r| {
                    let n = (c * records + r) as u64;
                    format!(
                        r#"{{"deviceIdentifierCollection":[{{"id":"8914800000{:010}","kind":"ICCID"}}],"dataUsage":"{}","smsUsage":"{}","moSms":"1","mtSms":"2","startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000"}}"#,
                        n,
                        n * 7919 % 50_000_000,
                        n % 30
                    )
                })
                .collect();
            format!(
                r#"{{"username":"u","password":"p","requestId":"req-{c}","deviceResponse":{{"devicePromoUsageResponse":[{}]}},"callbackCount":1,"maxCallbackThreshold":4}}"#,
                recs.join(",")
            )
        })
        .collect()
}

/// `n` digests no other commit of the bench has (`commit` counts the commits): nothing is
/// recognized as journaled before.
fn fresh_digests(commit: u64, n: usize) -> Vec<Digest> {
    (0..n as u64)
        .map(|i| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&commit.to_be_bytes());
            d[8..].copy_from_slice(&i.to_be_bytes());
            d
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (callbacks, records) = (100, 100);
    let bodies = vendor_shaped_callbacks(callbacks, records);
    let total = (callbacks * records) as u64;

    let mut group = c.benchmark_group("normalize_write");
    group.throughput(Throughput::Elements(total));
    group.sample_size(20);

    group.bench_function("prepare_100x100", |b| {
        b.iter(|| {
            let mut intake = Intake::new(false, PartitionBy::Day);
            let mut rejects = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                let prepared = intake.prepare(body, format!("bench[{i}]"), &mut rejects);
                black_box(prepared.is_ok());
            }
            assert_eq!(intake.records.accepted, total);
        })
    });

    let prepared: Vec<_> = {
        let mut intake = Intake::new(false, PartitionBy::Day);
        let mut rejects = Vec::new();
        bodies
            .iter()
            .filter_map(|b| intake.prepare(b, String::new(), &mut rejects).ok())
            .collect()
    };
    // The journal: commits of the 100 callbacks (1.1 MB of bodies) into one store, appended to its
    // segment as LZ4 blocks, zstd frames or plain (the drop directory's batches), and kept in the
    // rows, each body compressed alone (what the listener's commits do), every commit fsynced. Each
    // commit's digests are new (a counter), so nothing is recognized as journaled before.
    // Kept in the rows, the bodies come compressed one by one, as the listener's senders do (a
    // body of its own is the rows' encoding; uncompressed, 1.1 MB of them would go to the segment).
    let compressed: Vec<_> = prepared
        .iter()
        .map(|p| tsusage::state::encode_body(&p.body))
        .collect();
    // The same bodies packed in LZ4 frames ahead, as the drop directory's parsing threads do: the
    // commit then only appends the frames.
    let mut packed = prepared.clone();
    let mut frames = tsusage::state::Frames::new(JournalCompression::Lz4).expect("frames");
    tsusage::collect::pack(&mut frames, packed.iter_mut().collect());
    // The last one is a listener's group commit: 9 callbacks (the group its writer commits under
    // 32 connections), what each callback in it waits for.
    for (name, compression, in_rows, source) in [
        (
            "journal_segment_lz4_100x100",
            JournalCompression::Lz4,
            false,
            &prepared[..],
        ),
        (
            "journal_segment_zstd_100x100",
            JournalCompression::Zstd,
            false,
            &prepared[..],
        ),
        (
            "journal_segment_packed_100x100",
            JournalCompression::Lz4,
            false,
            &packed[..],
        ),
        (
            "journal_segment_plain_100x100",
            JournalCompression::None,
            false,
            &prepared[..],
        ),
        (
            "journal_rows_100x100",
            JournalCompression::Zstd,
            true,
            &prepared[..],
        ),
        (
            "journal_listener_group_9",
            JournalCompression::Zstd,
            true,
            &prepared[..9],
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open_with(&dir.path().join("t.db"), compression).expect("store");
        let mut store = if in_rows {
            store
        } else {
            store.always_segments()
        };
        let mut commit = 0u64;
        let records: u64 = source.iter().map(|p| p.records.len() as u64).sum();
        group.throughput(Throughput::Elements(records));
        group.bench_function(name, |b| {
            b.iter(|| {
                commit += 1;
                let digests = fresh_digests(commit, source.len());
                let new: Vec<_> = source
                    .iter()
                    .zip(&digests)
                    .zip(&compressed)
                    .map(|((p, d), (body, encoding))| NewCallback {
                        digest: d,
                        encoded: in_rows.then_some((&body[..], *encoding)),
                        ..p.as_new()
                    })
                    .collect();
                black_box(store.journal(&new, 1).expect("journal").len())
            })
        });
    }
    group.throughput(Throughput::Elements(total));
    let account: Arc<str> = Arc::from("0000123456-00001");
    let spill = tempfile::tempdir().expect("tempdir");
    // The records of the 100 callbacks in a row set, and their one partition taken out of it.
    let fill = || {
        let mut set = RowSet::new(PartitionBy::Day, account.clone(), 64 << 20, spill.path());
        for p in &prepared {
            let origin = set.add_origin(&p.request_id, None, 1);
            for r in &p.records {
                set.push(origin, r).expect("push");
            }
        }
        let part = set.take("usage_date=2021-08-15").expect("partition");
        (set, part)
    };
    let collapse = || {
        let (set, part) = fill();
        let rows: Vec<_> = part
            .collapsed()
            .expect("merge")
            .map(|r| usage_row(&r.expect("row"), set.origins()).expect("origin"))
            .collect();
        rows
    };
    group.bench_function("collapse_100x100", |b| {
        b.iter(|| black_box(collapse().len()))
    });

    let rows = collapse();
    let out = tempfile::tempdir().expect("tempdir");
    let writer = PartitionWriter::new(out.path(), WriterOptions::new("bench"));
    group.bench_function("parquet_write_10k_rows", |b| {
        b.iter(|| black_box(writer.write("usage_date=2021-08-15", &rows).expect("write")))
    });
    // The publish path: collapsed rows typed straight into the column builders.
    group.bench_function("collapse_write_10k_rows", |b| {
        b.iter(|| {
            let (set, part) = fill();
            let rows = part.collapsed().expect("merge");
            black_box(
                writer
                    .write_collapsed("usage_date=2021-08-15", rows, set.origins())
                    .expect("write"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
