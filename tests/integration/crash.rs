//! Crash safety, proven by killing: `kill -9` of `tsusage run` at random moments (pauses injected at
//! the narrow windows), reruns to completion, and a comparison with the simulator's truth while a
//! reader polls the output; `kill -9` of `tsusage listen` under load, counting acknowledged losses.
//!
//! CI runs light variants. The full-strength ones are `#[ignore]`d; run them with
//! `cargo test --release --test integration crash:: -- --ignored --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tsusage::sim::{self, SimConfig, SimHandle};
use tsusage::state::{SqliteStore, Store};

use crate::util::*;

const DAYS: i64 = 2;

/// xorshift, seeded per test so a failing schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn seed() -> u64 {
    std::env::var("TSUSAGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

fn day_start(day: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(DAY0 + day * DAY_US).expect("day")
}

/// The run's environment: the standalone simulator, a listener on `port`, pauses at the narrow windows.
fn run_env(ws: &Workspace, sim: &SimHandle, port: u16) -> Vec<(String, String)> {
    [
        ("TSUSAGE_API__BASE_URL", sim.base_url()),
        ("TSUSAGE_API__APP_KEY", "key".into()),
        ("TSUSAGE_API__APP_SECRET", "secret".into()),
        ("TSUSAGE_API__USERNAME", "user".into()),
        ("TSUSAGE_API__PASSWORD", "password".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC", "20".into()),
        ("TSUSAGE_API__MAX_IN_FLIGHT", "4".into()),
        (
            "TSUSAGE_INPUT__PATHS",
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE", "10".into()),
        ("TSUSAGE_CALLBACKS__SOURCE", "listener".into()),
        (
            "TSUSAGE_CALLBACKS__LISTEN_ADDR",
            format!("127.0.0.1:{port}"),
        ),
        (
            "TSUSAGE_CALLBACKS__PUBLIC_URL",
            format!("http://127.0.0.1:{port}/callbacks"),
        ),
        ("TSUSAGE_CALLBACKS__USERNAME", "cb-user".into()),
        ("TSUSAGE_CALLBACKS__PASSWORD", "cb-secret-sentinel".into()),
        ("TSUSAGE_CALLBACKS__SETTLE_SECS", "1".into()),
        ("TSUSAGE_CALLBACKS__DEADLINE_SECS", "4".into()),
        ("TSUSAGE_CALLBACKS__MAX_RESUBMITS", "5".into()),
        (
            "TSUSAGE_TEST_PAUSE",
            "after_post=60,journal_commit=5,parquet_publish=200".into(),
        ),
        ("TSUSAGE_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Reads every Parquet file under `usage/` over and over until told to stop; counts bad reads.
fn poll_output(
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
) -> Vec<String> {
    let mut bad = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for path in files_under(&dir) {
            if path.extension().is_none_or(|e| e != "parquet") {
                bad.push(format!(
                    "not a Parquet file in the output: {}",
                    path.display()
                ));
                continue;
            }
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // swapped away
                Err(e) => {
                    bad.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let read = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.build())
                .map_err(|e| e.to_string())
                .and_then(|reader| {
                    reader
                        .map(|b| b.map(|b| b.num_rows()))
                        .sum::<Result<usize, _>>()
                        .map_err(|e| e.to_string())
                });
            match read {
                Ok(_) => {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => bad.push(format!("{}: {e}", path.display())),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bad
}

async fn crash_harness(kills: usize, n: u32) {
    let seed = seed();
    let mut rng = Rng(seed);
    eprintln!("crash harness: seed {seed} (replay with TSUSAGE_CRASH_SEED={seed})");
    let sim = sim::start(SimConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        redelivery_interval_ms: 300,
        duplicate_fraction: 0.1,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let ws = Workspace::new();
    let list: Vec<String> = (0..n).map(iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n", list.join("\n")),
    )
    .expect("iccids");
    let port = free_port();
    let env = run_env(&ws, &sim, port);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (dir, stop, reads) = (ws.out().join("usage"), stop.clone(), reads.clone());
        std::thread::spawn(move || poll_output(dir, stop, reads))
    };

    let mut killed = 0;
    let mut finals = Vec::new();
    let started = Instant::now();
    while killed < kills {
        let mut child = spawn_run(&ws, "2021-08-15", "2021-08-16", &env);
        let delay = Duration::from_millis(rng.between(100, 700));
        let born = Instant::now();
        let exited = tokio::task::spawn_blocking(move || {
            while born.elapsed() < delay {
                if let Ok(Some(status)) = child.try_wait() {
                    return (child, Some(status));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (child, None)
        })
        .await
        .expect("join");
        match exited {
            (mut child, None) => {
                child.kill().expect("kill -9");
                child.wait().expect("reap");
                killed += 1;
            }
            (child, Some(status)) => {
                // Finished before the kill: nothing is left to interrupt.
                finals.push(status.code());
                drop(child);
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the harness takes too long"
        );
    }
    assert_eq!(
        killed, kills,
        "every kill landed in a run with work left (runs finished early: {finals:?})"
    );
    // The last run, left alone.
    let child = spawn_run(&ws, "2021-08-15", "2021-08-16", &env);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("run");
    stop.store(true, Ordering::Relaxed);
    let bad = reader.join().expect("reader");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(bad.is_empty(), "a reader saw a bad file: {bad:?}");

    // Every row exact, none twice.
    let mut expected = BTreeMap::new();
    for i in 0..n {
        let id = iccid(i);
        for day in 0..DAYS {
            if let Some(u) = sim::usage_for(&id, day_start(day), day_start(day + 1)) {
                expected.insert(
                    (id.clone(), DAY0 + day * DAY_US),
                    (u.data_bytes as i64, u.sms as i64),
                );
            }
        }
    }
    let rows = ws.rows();
    let keys: BTreeSet<(String, i64)> = rows
        .iter()
        .map(|r| (r.iccid.clone(), r.usage_start))
        .collect();
    assert_eq!(keys.len(), rows.len(), "duplicate rows");
    let got: BTreeMap<(String, i64), (i64, i64)> = rows
        .into_iter()
        .map(|r| ((r.iccid, r.usage_start), (r.data_usage_bytes, r.sms_usage)))
        .collect();
    assert!(
        got == expected,
        "{} rows, {} expected",
        got.len(),
        expected.len()
    );

    let jobs = u64::from(n.div_ceil(10)) * DAYS as u64;
    let stats = sim.stats();
    let resends = stats.promo_accepted.saturating_sub(jobs);
    eprintln!(
        "crash harness: {killed} kills, {} runs finished early, {} rows exact, 0 duplicates, {} Parquet reads all good, \
         {} requests for {jobs} jobs ({resends} resends), {} callbacks delivered",
        finals.len(),
        got.len(),
        reads.load(Ordering::Relaxed),
        stats.promo_accepted,
        stats.callbacks_delivered
    );
    // A build that resent jobs whose requestId is recorded would send them all again after each kill.
    assert!(
        resends <= killed as u64 * 10,
        "{resends} resends for {killed} kills"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_runs_then_rerun_gives_the_uninterrupted_output() {
    crash_harness(3, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full strength: cargo test --release --test integration crash:: -- --ignored"]
async fn kill_9_during_runs_full_strength() {
    crash_harness(12, 1000).await;
}

/// Sends `n` distinct callbacks from two threads while the listener is killed `kills` times and
/// restarted, each commit held `pause` (e.g. `journal_commit=20`: a listener that answered before
/// committing would lose callbacks there); returns (acknowledged, missing from the journal).
fn listener_durability(kills: usize, n: usize, pause: &str) -> (usize, usize) {
    let ws = Workspace::new();
    let port = free_port();
    // Every commit to the segment, however small (the listener's groups are a few callbacks).
    let pause = [
        ("TSUSAGE_TEST_PAUSE", pause),
        ("TSUSAGE_TEST_INLINE_BELOW", "0"),
    ];
    let listener = Arc::new(std::sync::Mutex::new(spawn_listen(&ws, port, &pause)));
    let acked_count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Two senders, each sending callbacks one after another and, like the vendor, sending a callback
    // again until it is acknowledged.
    let senders: Vec<_> = (0..2)
        .map(|t| {
            let (acked_count, done) = (acked_count.clone(), done.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0.. {
                    let request_id = format!("load-{t}-{i}");
                    let records: Vec<String> = (0..5)
                        .map(|r| record(&iccid(r), 0, &format!("\"{i}\"")))
                        .collect();
                    let body = usage_callback(&request_id, 1, &records);
                    loop {
                        if done.load(Ordering::Relaxed) {
                            return acked;
                        }
                        if post(port, "application/json", body.as_bytes()) == 200 {
                            acked.push(request_id);
                            acked_count.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                acked
            })
        })
        .collect();
    let mut rng = Rng(seed());
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.between(50, 250)));
        let mut child = listener.lock().expect("lock");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        *child = spawn_listen(&ws, port, &pause);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (acked_count.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    done.store(true, Ordering::Relaxed);
    let acked: Vec<String> = senders
        .into_iter()
        .flat_map(|s| s.join().expect("sender"))
        .collect();
    {
        let mut child = listener.lock().expect("lock");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    let store = SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    let journaled: BTreeSet<String> = store
        .callbacks_since(0, usize::MAX >> 1)
        .expect("journal")
        .into_iter()
        .map(|entry| entry.request_id)
        .collect();
    let missing = acked.iter().filter(|id| !journaled.contains(*id)).count();
    // What the killed listeners left past their committed bytes, later listeners cut off; the last
    // one stopped cleanly.
    for (file, committed, len) in segment_lengths(&ws.path("state/tsusage.db")) {
        assert_eq!(
            committed, len,
            "{file}: an unreferenced tail survived recovery"
        );
    }
    eprintln!(
        "listener durability: {kills} kills, {} callbacks acknowledged, {missing} acknowledged but missing, {} journaled",
        acked.len(),
        journaled.len()
    );
    (acked.len(), missing)
}

#[test]
fn acknowledged_callbacks_survive_kill_9_of_the_listener() {
    let (acked, missing) = listener_durability(3, 300, "journal_commit=20");
    assert!(acked >= 300);
    assert_eq!(missing, 0);
}

#[test]
fn acknowledged_callbacks_survive_kill_9_during_segment_appends() {
    // Appends held 20 ms between the write and its fsync: most kills land in one.
    let (acked, missing) = listener_durability(3, 300, "journal_append=20");
    assert!(acked >= 300);
    assert_eq!(missing, 0);
}

#[test]
#[ignore = "full strength: cargo test --release --test integration crash:: -- --ignored"]
fn acknowledged_callbacks_survive_kill_9_of_the_listener_full_strength() {
    let (acked, missing) = listener_durability(25, 5000, "journal_commit=10,journal_append=10");
    assert!(acked >= 5000);
    assert_eq!(missing, 0);
}

/// `kill -9` of `ingest` while its first partition is staged (its callbacks committed, nothing
/// published, rows spilled or in memory): the rerun rebuilds every partition from the journal, lands
/// exactly the rows a clean ingest lands, and leaves no staging or spill files behind.
#[test]
fn ingest_killed_while_publishing_heals_on_the_rerun() {
    let ws = Workspace::new();
    let mut expected = BTreeMap::new();
    for n in 0..60u32 {
        // 3 days; each key appears in two files and the later file (journal order) wins.
        let records: Vec<String> = (0..30u32)
            .map(|i| {
                let (id, day) = ((n % 30 + i) % 45, i64::from(i % 3));
                expected.insert((iccid(id), day), i64::from(n * 100 + i));
                record(&iccid(id), day, &format!("\"{}\"", n * 100 + i))
            })
            .collect();
        ws.drop_file(
            &format!("cb-{n:03}.json"),
            &usage_callback(&format!("req-{n}"), 1, &records),
        );
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsusage"))
        .arg("ingest")
        .arg(ws.inbox())
        .arg("--config")
        .arg(ws.config())
        .env("TSUSAGE_TEST_PAUSE", "parquet_publish=30000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ingest");
    let staging = ws.out().join(".staging");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_under(&staging)
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "parquet"))
    {
        assert!(Instant::now() < deadline, "ingest never staged a partition");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    assert!(
        ws.rows().is_empty(),
        "nothing was published before the kill"
    );

    ws.ingest().expect_code(0);
    let rows = ws.rows();
    assert_one_row_per_key(&rows, &expected);
    assert!(
        files_under(&ws.out().join(".staging")).is_empty(),
        "no staging files left"
    );
    assert!(
        files_under(&ws.out().join(".spill")).is_empty(),
        "no spill files left"
    );
}

/// The rows are one per (iccid, day) key, with the `data_usage_bytes` of `expected`.
fn assert_one_row_per_key(rows: &[Row], expected: &BTreeMap<(String, i64), i64>) {
    let got: BTreeMap<(String, i64), i64> = rows
        .iter()
        .map(|r| {
            let day = (r.usage_start - DAY0) / DAY_US;
            ((r.iccid.clone(), day), r.data_usage_bytes)
        })
        .collect();
    assert_eq!(rows.len(), got.len(), "one row per key");
    assert_eq!(&got, expected);
}

/// Every segment of the journal at `db` is as long as its committed bytes: no unreferenced tail
/// is left once the writers are gone and a later writer has recovered.
fn segment_lengths(db: &Path) -> Vec<(String, u64, u64)> {
    let conn = rusqlite::Connection::open(db).expect("open store");
    let mut stmt = conn
        .prepare("SELECT file, committed FROM segments ORDER BY id")
        .expect("segments");
    let dir = db.with_extension(tsusage::state::SEGMENT_DIR_EXTENSION);
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("query")
        .map(|r| {
            let (file, committed) = r.expect("row");
            let len = std::fs::metadata(dir.join(&file)).map_or(0, |m| m.len());
            (file, committed as u64, len)
        })
        .collect()
}

/// `kill -9` of `ingest` while a journal commit's bodies are being appended to its segment (written,
/// not yet fsynced, no index row committed): the rerun cuts that unreferenced tail off, journals
/// every callback exactly once and lands exactly the rows of an uninterrupted ingest.
#[test]
fn ingest_killed_during_a_segment_append_truncates_the_tail_on_the_rerun() {
    let ws = Workspace::new();
    let mut expected = BTreeMap::new();
    for n in 0..40u32 {
        let records: Vec<String> = (0..25u32)
            .map(|i| {
                let (id, day) = ((n + i) % 35, i64::from(i % 2));
                expected.insert((iccid(id), day), i64::from(n * 100 + i));
                record(&iccid(id), day, &format!("\"{}\"", n * 100 + i))
            })
            .collect();
        ws.drop_file(
            &format!("cb-{n:03}.json"),
            &usage_callback(&format!("req-{n}"), 1, &records),
        );
    }
    let db = ws.path("state/tsusage.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsusage"))
        .arg("ingest")
        .arg(ws.inbox())
        .arg("--config")
        .arg(ws.config())
        .env("TSUSAGE_TEST_PAUSE", "journal_append=30000")
        .env("TSUSAGE_TEST_INLINE_BELOW", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ingest");
    let seg_dir = db.with_extension(tsusage::state::SEGMENT_DIR_EXTENSION);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_under(&seg_dir)
        .iter()
        .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    {
        assert!(
            Instant::now() < deadline,
            "ingest never appended to a segment"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let before = segment_lengths(&db);
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(
        before[0].2 > before[0].1,
        "the kill left an unreferenced tail: {before:?}"
    );
    let waiting = std::fs::read_dir(ws.inbox())
        .expect("inbox")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
        .count();
    assert_eq!(waiting, 40, "no file moved: nothing committed");

    let segments_always = [("TSUSAGE_TEST_INLINE_BELOW", "0")];
    let inbox = ws.inbox();
    let ingest = ["ingest", inbox.to_str().expect("utf-8 path")];
    ws.run_env(&ingest, &segments_always).expect_code(0);
    let after = segment_lengths(&db);
    assert_eq!(
        after.len(),
        2,
        "the rerun wrote a segment of its own: {after:?}"
    );
    for (file, committed, len) in &after {
        assert_eq!(committed, len, "{file}: tail cut back to what is committed");
    }
    assert_eq!(after[0].1, before[0].1, "committed bytes untouched");
    let store = SqliteStore::open(&db).expect("store");
    assert_eq!(
        store.journal_len().expect("journal"),
        40,
        "each callback once"
    );
    let rows = ws.rows();
    assert_one_row_per_key(&rows, &expected);
    // The bodies read back from the segments (a rebuild of every partition) give the same rows.
    std::fs::remove_dir_all(ws.out().join("usage")).expect("remove output");
    let conn = rusqlite::Connection::open(&db).expect("open store");
    conn.execute("DELETE FROM partitions", [])
        .expect("forget writes");
    drop(conn);
    ws.run_env(&ingest, &segments_always).expect_code(0);
    assert_eq!(ws.rows().len(), rows.len());
}

/// A drop directory's batches commit on their own thread while the next batch is gathered: when a
/// commit fails (here every segment append), `ingest` stops with the store's error, moves no file
/// and publishes nothing; once the disk is healthy the rerun journals each callback exactly once.
#[test]
fn ingest_whose_journal_commit_fails_moves_nothing_and_the_rerun_lands_everything() {
    let ws = Workspace::new();
    // About 21 MB of callbacks: more than two batches (8 MiB each), so that the next full batch
    // finds the committing thread gone, and the last one too.
    let files = 4_000u32;
    let mut expected = BTreeMap::new();
    for n in 0..files {
        let records: Vec<String> = (0..25u32)
            .map(|i| {
                let (id, day) = (iccid((n + i) % 500), i64::from(i % 3));
                let data = i64::from(n * 100 + i);
                expected.insert((id.clone(), day), data);
                record(&id, day, &format!("\"{data}\""))
            })
            .collect();
        ws.drop_file(
            &format!("cb-{n:05}.json"),
            &usage_callback(&format!("req-{n}"), 1, &records),
        );
    }
    let inbox = ws.inbox();
    let ingest = ["ingest", inbox.to_str().expect("utf-8 path")];
    let failed = ws.run_env(
        &ingest,
        &[
            ("TSUSAGE_TEST_FAIL", "journal_append"),
            ("TSUSAGE_TEST_INLINE_BELOW", "0"),
        ],
    );
    failed.expect_code(1);
    assert!(
        failed
            .stderr()
            .contains("injected failure at journal_append"),
        "the store's error is reported: {}",
        failed.stderr()
    );
    let waiting = std::fs::read_dir(&inbox)
        .expect("inbox")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
        .count();
    assert_eq!(waiting, files as usize, "no file moved: nothing committed");
    assert!(
        files_under(&ws.out().join("usage")).is_empty(),
        "nothing published"
    );

    ws.run(&ingest).expect_code(0);
    let store = SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    assert_eq!(
        store.journal_len().expect("journal"),
        u64::from(files),
        "each callback once"
    );
    let processed = std::fs::read_dir(inbox.join("processed"))
        .expect("processed")
        .count();
    assert_eq!(processed, files as usize, "every file moved once committed");
    // The newest callback (the last file) wins each ICCID-day.
    assert_one_row_per_key(&ws.rows(), &expected);
}
