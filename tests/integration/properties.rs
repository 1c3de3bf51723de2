//! Property: any shuffle and duplication of a set of callbacks, in any file layout, yields the same
//! Parquet rows (received_at aside, which is the journal time).

use proptest::prelude::*;
use tsusage::config::Config;
use tsusage::pipeline;

use crate::util::*;

/// Callback `c` of a set: its own requestId, `n` records on distinct (ICCID, day) keys.
fn callback(c: usize, n: usize, count: u32) -> String {
    let records: Vec<String> = (0..n)
        .map(|r| {
            let key = (c * 10 + r) as u32;
            record(
                &iccid(key % 40),
                i64::from(key / 40),
                &format!("\"{}\"", key * 1000 + 7),
            )
        })
        .collect();
    usage_callback(&format!("req-{c}"), count, &records)
}

fn config(ws: &Workspace) -> Config {
    Config::load_with_env(&ws.config(), Vec::new()).expect("config")
}

/// Rows without received_at.
fn rows_of(ws: &Workspace) -> Vec<Row> {
    ws.rows()
        .into_iter()
        .map(|mut r| {
            r.received_at = 0;
            r
        })
        .collect()
}

/// Writes `bodies` into the inbox using `layout` (0: one file each, 1: one JSON array, 2: NDJSON).
fn drop_all(ws: &Workspace, bodies: &[String], layout: u8) {
    match layout {
        0 => {
            for (i, b) in bodies.iter().enumerate() {
                ws.drop_file(&format!("cb-{i:03}.json"), b);
            }
        }
        1 => ws.drop_file("all.json", &format!("[{}]", bodies.join(","))),
        _ => ws.drop_file("all.ndjson", &bodies.join("\n")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn shuffled_and_duplicated_callbacks_give_the_same_rows(
        sizes in proptest::collection::vec(1usize..5, 1..6),
        dups in proptest::collection::vec(0u32..3, 6),
        order_seed in any::<u64>(),
        layout in 0u8..3,
        split in any::<bool>(),
    ) {
        let canonical: Vec<String> = sizes.iter().enumerate().map(|(c, &n)| callback(c, n, 1)).collect();
        let baseline = Workspace::new();
        drop_all(&baseline, &canonical, 0);
        pipeline::ingest_dir(&config(&baseline), &baseline.inbox(), false).expect("baseline ingest");
        let expected = rows_of(&baseline);
        prop_assert_eq!(expected.len(), sizes.iter().sum::<usize>());

        // Every callback once, plus redeliveries (callbackCount 2, 3) and exact copies, shuffled.
        let mut bodies = Vec::new();
        for (c, &n) in sizes.iter().enumerate() {
            bodies.push(callback(c, n, 1));
            for d in 0..dups[c] {
                bodies.push(callback(c, n, 2 + d));
                bodies.push(callback(c, n, 1));
            }
        }
        let mut state = order_seed | 1;
        for i in (1..bodies.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bodies.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let ws = Workspace::new();
        if split {
            // Two ingests, half the callbacks each: partitions are rewritten, never appended to.
            let (a, b) = bodies.split_at(bodies.len() / 2);
            drop_all(&ws, a, layout);
            pipeline::ingest_dir(&config(&ws), &ws.inbox(), false).expect("first half");
            drop_all(&ws, b, layout);
        } else {
            drop_all(&ws, &bodies, layout);
        }
        pipeline::ingest_dir(&config(&ws), &ws.inbox(), false).expect("ingest");
        prop_assert_eq!(rows_of(&ws), expected);
    }
}
