//! Output on object storage against a real S3 server on loopback (SeaweedFS in CI): a simulated run
//! writes the same rows to `s3://` as to a local directory, a partition object is the local file
//! byte for byte, a rerun replaces partitions whole under a polling reader and leaves no stale
//! object, and bad credentials or endpoints fail fast, naming the URL and never the secret.
//!
//! The server comes from `TSUSAGE_TEST_S3_ENDPOINT` and `TSUSAGE_TEST_S3_BUCKET` (a bucket that
//! exists) with the standard `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`; without
//! them (outside CI) the test process starts one itself, and where none can be started the tests
//! are ignored (see `crate::servers`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::DateTime;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tsusage::config::{Config, OutputConfig, PartitionBy};
use tsusage::ingest::Iccid;
use tsusage::normalize::UsageRow;
use tsusage::output::bucket::Bucket;
use tsusage::pipeline;
use tsusage::plan::DateRange;
use tsusage::write::parquet::{PartitionWriter, WriterOptions};

use crate::util::*;

/// The S3 server the tests use.
struct S3Env {
    endpoint: String,
    bucket: String,
    store: Arc<AmazonS3>,
}

/// The server (see `crate::servers`): from the environment, else started by this test process.
fn s3_env() -> S3Env {
    let server = crate::servers::s3();
    let (endpoint, bucket) = (server.endpoint.clone(), server.bucket.clone());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_bucket_name(&bucket)
        .with_region(&server.region)
        .with_access_key_id(&server.access_key_id)
        .with_secret_access_key(&server.secret_access_key)
        .with_client_options(ClientOptions::new().with_allow_http(true))
        .build()
        .expect("test S3 client");
    S3Env {
        endpoint,
        bucket,
        store: Arc::new(store),
    }
}

/// A prefix no other test (or earlier run) uses.
fn unique_prefix(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("t-{}-{nanos}/{name}", std::process::id())
}

impl S3Env {
    fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The `TSUSAGE_OUTPUT__*` overrides that send a run's output to `prefix`.
    fn output_env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("TSUSAGE_OUTPUT__URL".into(), self.url(prefix)),
            ("TSUSAGE_OUTPUT__ENDPOINT".into(), self.endpoint.clone()),
            ("TSUSAGE_OUTPUT__PATH_STYLE".into(), "true".into()),
        ]
    }

    /// Every object below `prefix/`, as (key below the prefix, size).
    fn list(&self, prefix: &str) -> BTreeMap<String, u64> {
        block_on(list_under(&self.store, prefix))
    }

    fn get(&self, key: &str) -> Bytes {
        let store = self.store.clone();
        let path = Key::from(key);
        block_on(async move { store.get(&path).await?.bytes().await })
            .unwrap_or_else(|e| panic!("get {key}: {e}"))
    }

    /// Copies every object below `prefix/` into `dir`, keeping the layout (to read like a local
    /// output directory).
    fn download(&self, prefix: &str, dir: &Path) {
        for key in self.list(prefix).keys() {
            let path = dir.join(key);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, self.get(&format!("{prefix}/{key}"))).expect("write");
        }
    }
}

/// Every object below `prefix/`, as (key below the prefix, size): a listing per level with the
/// delimiter (no stream to drive).
async fn list_under(store: &AmazonS3, prefix: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![Key::from(prefix)];
    while let Some(dir) = dirs.pop() {
        let listed = store
            .list_with_delimiter(Some(&dir))
            .await
            .unwrap_or_else(|e| panic!("list {dir}: {e}"));
        for object in listed.objects {
            // SeaweedFS lists an emptied directory as a 0-byte object of its own name.
            if object.location == dir {
                continue;
            }
            let key = object.location.as_ref();
            let relative = key
                .strip_prefix(&format!("{prefix}/"))
                .unwrap_or(key)
                .to_owned();
            out.insert(relative, object.size);
        }
        dirs.extend(listed.common_prefixes);
    }
    out
}

/// Runs `future` to completion on a runtime of its own (the tests are synchronous).
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// A workspace whose ICCID list is `iccids` (plus one bad row, for a rejects file).
fn workspace(iccids: &[String]) -> Workspace {
    let ws = Workspace::new();
    write_iccids(&ws, iccids);
    ws
}

fn write_iccids(ws: &Workspace, iccids: &[String]) {
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\nnot-an-iccid\n", iccids.join("\n")),
    )
    .expect("iccids");
}

fn run_env(ws: &Workspace, extra: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (
            "TSUSAGE_INPUT__PATHS".into(),
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE".into(), "100".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC".into(), "50".into()),
        ("TSUSAGE_API__MAX_IN_FLIGHT".into(), "4".into()),
    ];
    env.extend(extra);
    env
}

/// A simulated run over `from..=to`, in-process (on a runtime of its own: the tests are
/// synchronous, so that their S3 helpers can block).
fn simulated_run(
    ws: &Workspace,
    extra: Vec<(String, String)>,
    from: &str,
    to: &str,
) -> pipeline::Outcome {
    let config = Config::load_with_env(&ws.config(), run_env(ws, extra)).expect("config");
    let range = DateRange::from_args(None, Some(from), Some(to)).expect("range");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(pipeline::run(
            &config,
            pipeline::RunOptions::simulated(range),
        ))
        .expect("run")
}

/// The simulator's truth: rows with usage per partition for `iccids` over `days` from DAY0.
fn expected_rows_per_partition(iccids: &[String], days: i64) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for day in 0..days {
        let start = DateTime::from_timestamp_micros(DAY0 + day * DAY_US).expect("day");
        let end = DateTime::from_timestamp_micros(DAY0 + (day + 1) * DAY_US).expect("day");
        let n = iccids
            .iter()
            .filter(|i| tsusage::sim::usage_for(i, start, end).is_some())
            .count() as u64;
        out.insert(format!("usage_date={}", start.format("%Y-%m-%d")), n);
    }
    out
}

/// Rows without what differs between two runs of the same input (request ids, receipt times).
fn values(rows: &[Row]) -> Vec<Row> {
    rows.iter()
        .map(|r| Row {
            request_id: String::new(),
            received_at: 0,
            ..r.clone()
        })
        .collect()
}

/// Rows in a Parquet object, or why it cannot be read.
fn row_count(bytes: Bytes) -> Result<u64, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    let mut n = 0u64;
    for batch in reader {
        n += batch.map_err(|e| e.to_string())?.num_rows() as u64;
    }
    Ok(n)
}

#[test]
#[cfg_attr(
    tsusage_no_s3,
    ignore = "no S3 server here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn a_simulated_run_writes_to_s3_exactly_what_it_writes_to_a_local_directory() {
    let s3 = s3_env();
    let prefix = unique_prefix("same-as-local");
    let iccids: Vec<String> = (0..250).map(iccid).collect();
    let (local, remote) = (workspace(&iccids), workspace(&iccids));

    let here = simulated_run(&local, vec![], "2021-08-15", "2021-08-16");
    let there = simulated_run(&remote, s3.output_env(&prefix), "2021-08-15", "2021-08-16");
    assert_eq!(
        here.report.exit_code, 3,
        "the bad ICCID row makes it partial"
    );
    assert_eq!(there.report.exit_code, 3);

    // The objects: one per partition in the local Hive layout, and the run's files beside them.
    let run_id = &there.report.run_id;
    let objects = s3.list(&prefix);
    let keys: BTreeSet<&str> = objects.keys().map(String::as_str).collect();
    let expected: BTreeSet<String> = [
        "usage/usage_date=2021-08-15/part-00000.parquet".to_owned(),
        "usage/usage_date=2021-08-16/part-00000.parquet".to_owned(),
        format!("runs/{run_id}.json"),
        format!("runs/{run_id}.html"),
        format!("runs/{run_id}-completeness.csv"),
        format!("rejects/{run_id}-iccids.csv"),
    ]
    .into();
    assert_eq!(keys, expected.iter().map(String::as_str).collect());
    assert!(
        !remote.out().join("usage").exists(),
        "with output.url nothing is written to output.dir/usage/"
    );

    // The rows, read back with the parquet crate: the same values as the local run's, which are
    // the simulator's truth.
    let mirror = tempfile::tempdir().expect("tempdir");
    s3.download(&prefix, mirror.path());
    let from_s3 = read_rows(&mirror.path().join("usage"));
    let from_dir = local.rows();
    assert_eq!(values(&from_s3), values(&from_dir));
    let mut per_partition: BTreeMap<String, u64> = BTreeMap::new();
    for r in &from_s3 {
        *per_partition.entry(r.partition.clone()).or_default() += 1;
    }
    assert_eq!(per_partition, expected_rows_per_partition(&iccids, 2));
    let output = there.report.output.as_ref().expect("output report");
    assert_eq!(output.rows_written, from_s3.len() as u64);
    assert_eq!(
        output.location.as_deref(),
        Some(format!("{}/usage/", s3.url(&prefix)).as_str())
    );
    let meta = parquet_metadata(
        &mirror
            .path()
            .join("usage/usage_date=2021-08-15/part-00000.parquet"),
    );
    assert!(meta.contains(&("tsusage.run_id".to_owned(), run_id.clone())));

    // The report, its page, the completeness and rejects files are the local copies.
    for rel in [
        format!("runs/{run_id}.json"),
        format!("runs/{run_id}-completeness.csv"),
        format!("rejects/{run_id}-iccids.csv"),
    ] {
        assert_eq!(
            std::fs::read(mirror.path().join(&rel)).expect("downloaded"),
            std::fs::read(remote.out().join(&rel)).expect("local copy"),
            "{rel}"
        );
    }
}

/// `n` rows in one day partition, with values spread enough that the file does not compress to
/// nothing (so that a large `n` needs a multipart upload).
fn rows(n: u32, salt: i64) -> Vec<UsageRow> {
    let account: Arc<str> = Arc::from(ACCOUNT);
    (0..n)
        .map(|i| {
            let mix = (i64::from(i) + salt).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64);
            UsageRow {
                account_name: account.clone(),
                iccid: Iccid::parse(&iccid(i % 10_000)).expect("iccid"),
                usage_start: DAY0 + i64::from(i / 10_000) * 1_000_000,
                usage_end: DAY0 + DAY_US,
                data_usage_bytes: mix.rem_euclid(1 << 40),
                sms_usage: mix.rem_euclid(997),
                mo_sms: mix.rem_euclid(89),
                mt_sms: mix.rem_euclid(83),
                request_id: Arc::from(format!("{:032x}", mix as u64 as u128 * 0x1_0000_0001)),
                received_at: DAY0 + DAY_US + mix.rem_euclid(1 << 30),
            }
        })
        .collect()
}

fn output_config(s3: &S3Env, prefix: &str, dir: &Path) -> OutputConfig {
    OutputConfig {
        dir: dir.to_owned(),
        partition_by: PartitionBy::Day,
        max_rows_per_file: tsusage::config::DEFAULT_MAX_ROWS_PER_FILE,
        zstd_level: tsusage::config::DEFAULT_ZSTD_LEVEL,
        url: Some(s3.url(prefix)),
        endpoint: Some(s3.endpoint.clone()),
        region: None,
        path_style: true,
    }
}

#[test]
#[cfg_attr(
    tsusage_no_s3,
    ignore = "no S3 server here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn a_partition_object_is_the_local_file_byte_for_byte_and_is_replaced_whole_under_a_reader() {
    let s3 = s3_env();
    let prefix = unique_prefix("replace");
    let partition = "usage_date=2021-08-15";
    let object = format!("{prefix}/usage/{partition}/part-00000.parquet");
    let (small, large) = (rows(1_000, 0), rows(300_000, 7));
    let scratch = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::open(&output_config(&s3, &prefix, scratch.path()))
        .expect("bucket")
        .expect("output.url is set")
        // S3's smallest part: the large partition goes up as a multipart upload.
        .with_part_bytes(5 * 1024 * 1024);
    let to_s3 = PartitionWriter::new(scratch.path(), WriterOptions::new("run-replace"))
        .with_bucket(Some(Arc::new(bucket)));
    let local_dir = tempfile::tempdir().expect("tempdir");
    let to_dir = PartitionWriter::new(local_dir.path(), WriterOptions::new("run-replace"));

    to_s3.write(partition, &small).expect("first write");
    assert_eq!(row_count(s3.get(&object)), Ok(1_000));
    // An object of an earlier layout in the partition: the next write must leave no stale object.
    let stale = Key::from(format!("{prefix}/usage/{partition}/part-00001.parquet"));
    let store = s3.store.clone();
    block_on(async move { store.put(&stale, PutPayload::from(s3_bytes())).await }).expect("stale");

    // A reader polls the object while the large partition replaces the small one.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, store, key) = (stop.clone(), s3.store.clone(), Key::from(object.clone()));
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let got = runtime.block_on(async {
                    let object = store.get(&key).await.map_err(|e| e.to_string())?;
                    object.bytes().await.map_err(|e| e.to_string())
                });
                seen.push(got.and_then(row_count));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let written = to_s3.write(partition, &large).expect("replacing write");
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("reader");
    assert_eq!((written.rows, written.files), (300_000, 1));
    assert!(seen.len() >= 2, "the reader polled {} times", seen.len());
    for got in &seen {
        assert!(
            matches!(got, Ok(1_000) | Ok(300_000)),
            "a reader saw {got:?}: neither the old partition nor the new one"
        );
    }
    assert_eq!(seen.first(), Some(&Ok(1_000)));
    assert_eq!(seen.last(), Some(&Ok(300_000)));
    eprintln!(
        "replacing a {} byte partition took {took:?}; the reader read it {} times",
        s3.list(&prefix).values().sum::<u64>(),
        seen.len()
    );

    // The object is the local writer's file, byte for byte, and it is alone in its partition.
    to_dir.write(partition, &large).expect("local write");
    let local_file = local_dir
        .path()
        .join(format!("usage/{partition}/part-00000.parquet"));
    let local_bytes = std::fs::read(&local_file).expect("local file");
    assert!(
        local_bytes.len() > 5 * 1024 * 1024,
        "{} bytes: too small to need a multipart upload",
        local_bytes.len()
    );
    assert!(
        s3.get(&object) == local_bytes,
        "the object differs from the local file"
    );
    let listed: Vec<String> = s3.list(&prefix).into_keys().collect();
    assert_eq!(
        listed,
        vec![format!("usage/{partition}/part-00000.parquet")]
    );
    // The upload alone (the figure quoted in docs/scaling-out.md), to a key outside the usage
    // directory.
    let started = Instant::now();
    to_s3_bucket(&s3, &prefix, scratch.path())
        .put_file("upload-timing.parquet", &local_file)
        .expect("upload");
    let took = started.elapsed();
    eprintln!(
        "uploading {} bytes in parts of 5 MiB took {took:?} ({:.0} MB/s)",
        local_bytes.len(),
        local_bytes.len() as f64 / took.as_secs_f64() / 1e6
    );
    let store = s3.store.clone();
    let timing = Key::from(format!("{prefix}/upload-timing.parquet"));
    block_on(async move { store.delete(&timing).await }).expect("delete");

    // A partition rewritten empty has no object left.
    to_s3.write(partition, &[]).expect("empty write");
    assert!(s3.list(&prefix).is_empty());
    assert!(
        !scratch.path().join("usage").exists() && staging_is_empty(scratch.path()),
        "nothing left in output.dir but an empty staging area"
    );
}

/// The bucket for `prefix`, uploading in parts of S3's smallest size, 5 MiB (so that the large
/// partition goes up as a multipart upload).
fn to_s3_bucket(s3: &S3Env, prefix: &str, dir: &Path) -> Bucket {
    Bucket::open(&output_config(s3, prefix, dir))
        .expect("bucket")
        .expect("output.url is set")
        .with_part_bytes(5 * 1024 * 1024)
}

fn s3_bytes() -> Bytes {
    Bytes::from_static(b"PAR1 not really")
}

fn staging_is_empty(out: &Path) -> bool {
    files_under(&out.join(".staging")).is_empty()
}

#[test]
#[cfg_attr(
    tsusage_no_s3,
    ignore = "no S3 server here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn a_rerun_replaces_each_partition_whole_and_a_polling_reader_sees_old_or_new() {
    let s3 = s3_env();
    let prefix = unique_prefix("rerun");
    let first: Vec<String> = (0..150).map(iccid).collect();
    let second: Vec<String> = (0..400).map(iccid).collect();
    let (old, new) = (
        expected_rows_per_partition(&first, 2),
        expected_rows_per_partition(&second, 2),
    );
    let ws = workspace(&first);
    simulated_run(&ws, s3.output_env(&prefix), "2021-08-15", "2021-08-16");

    // A reader lists the partitions and reads each object whole, over and over.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, store, prefix) = (stop.clone(), s3.store.clone(), prefix.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut seen: Vec<(String, Result<u64, String>)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let listed = runtime.block_on(list_under(&store, &format!("{prefix}/usage")));
                if listed.len() != 2 {
                    seen.push((format!("{} objects", listed.len()), Err("listing".into())));
                }
                for key in listed.keys() {
                    let full = Key::from(format!("{prefix}/usage/{key}"));
                    let got = runtime.block_on(async {
                        let object = store.get(&full).await.map_err(|e| e.to_string())?;
                        object.bytes().await.map_err(|e| e.to_string())
                    });
                    let partition = key.split('/').next().unwrap_or_default().to_owned();
                    seen.push((partition, got.and_then(row_count)));
                }
            }
            seen
        })
    };
    write_iccids(&ws, &second);
    let rerun = simulated_run(&ws, s3.output_env(&prefix), "2021-08-15", "2021-08-16");
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("reader");

    assert!(!seen.is_empty());
    for (partition, got) in &seen {
        let allowed = [old.get(partition), new.get(partition)];
        assert!(
            matches!(got, Ok(n) if allowed.contains(&Some(n))),
            "{partition}: a reader saw {got:?}, neither {allowed:?}"
        );
    }
    let news = seen
        .iter()
        .filter(|(p, got)| got.as_ref().ok() == new.get(p))
        .count();
    eprintln!(
        "the reader read {} partitions, {news} of them new",
        seen.len()
    );

    // After the rerun: exactly the two partition objects under usage/, with the new rows.
    let listed: Vec<String> = s3.list(&format!("{prefix}/usage")).into_keys().collect();
    assert_eq!(
        listed,
        vec![
            "usage_date=2021-08-15/part-00000.parquet".to_owned(),
            "usage_date=2021-08-16/part-00000.parquet".to_owned(),
        ]
    );
    let mirror = tempfile::tempdir().expect("tempdir");
    s3.download(&prefix, mirror.path());
    let mut per_partition: BTreeMap<String, u64> = BTreeMap::new();
    for r in read_rows(&mirror.path().join("usage")) {
        *per_partition.entry(r.partition).or_default() += 1;
    }
    assert_eq!(per_partition, new);
    assert_ne!(old, new, "the rerun must change the partitions");
    let written: Vec<(String, u64)> = rerun
        .report
        .output
        .as_ref()
        .expect("output")
        .partitions
        .iter()
        .map(|p| (p.partition.clone(), p.rows))
        .collect();
    assert_eq!(written, new.into_iter().collect::<Vec<_>>());
}

#[test]
fn bad_credentials_an_unreachable_endpoint_or_none_fail_fast_naming_the_url_not_the_secret() {
    let ws = workspace(&[iccid(1)]);
    let secret = "wrong-secret-sentinel-8841";
    let mut cases: Vec<(&str, Vec<(String, String)>)> = Vec::new();
    // No server needed: a port nothing listens on, and credentials missing.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let common = |endpoint: &str, prefix: &str| {
        vec![
            (
                "TSUSAGE_OUTPUT__URL".to_owned(),
                format!("s3://tsusage-test/{prefix}"),
            ),
            ("TSUSAGE_OUTPUT__ENDPOINT".to_owned(), endpoint.to_owned()),
            ("TSUSAGE_OUTPUT__PATH_STYLE".to_owned(), "true".to_owned()),
            (
                "AWS_ACCESS_KEY_ID".to_owned(),
                "tsusage-test-key".to_owned(),
            ),
        ]
    };
    let mut unreachable = common(&dead, "unreachable");
    unreachable.push(("AWS_SECRET_ACCESS_KEY".into(), secret.into()));
    cases.push(("check output.endpoint", unreachable));
    let mut missing = common(&dead, "missing");
    missing.push(("AWS_SECRET_ACCESS_KEY".into(), String::new()));
    cases.push(("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", missing));
    // With the S3 server (wherever one can be had): its refusal of a wrong secret.
    if cfg!(not(tsusage_no_s3)) {
        let s3 = s3_env();
        let prefix = unique_prefix("denied");
        let mut denied: Vec<(String, String)> = s3.output_env(&prefix);
        denied.push(("AWS_SECRET_ACCESS_KEY".into(), secret.into()));
        cases.push(("check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY", denied));
    }
    for (hint, env) in cases {
        let url = env[0].1.clone();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let started = Instant::now();
        let run = ws.run_env(&["run", "--simulate", "--date", "2021-08-15"], &env);
        let took = started.elapsed();
        run.expect_code(1);
        let stderr = run.stderr();
        assert!(
            stderr.contains(&format!("{url}: ")) && stderr.contains(hint),
            "{url}: expected the URL and {hint:?} in:\n{stderr}"
        );
        assert!(!stderr.contains(secret) && !run.stdout().contains(secret));
        assert!(
            took < Duration::from_secs(20),
            "{url}: failing took {took:?}"
        );
        assert!(
            !ws.out().join("runs").exists(),
            "{url}: the run stopped before doing anything"
        );
    }
}
