//! `tsusage run` end to end against the simulator: faults on, every row checked against the
//! simulator's truth, the completeness file, dirty values, the listener's refusals and durability,
//! and a separate `tsusage listen` process.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use chrono::{DateTime, Utc};
use tsusage::config::Config;
use tsusage::pipeline;
use tsusage::plan::DateRange;
use tsusage::state::{SqliteStore, Store};

use crate::util::*;

const DAYS: i64 = 3;

fn workspace(n: u32) -> Workspace {
    let ws = Workspace::new();
    let list: Vec<String> = (0..n).map(iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n", list.join("\n")),
    )
    .expect("iccids");
    ws
}

fn env(ws: &Workspace, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (
            "TSUSAGE_INPUT__PATHS".into(),
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE".into(), "100".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC".into(), "25".into()),
        ("TSUSAGE_API__MAX_IN_FLIGHT".into(), "4".into()),
        ("TSUSAGE_API__BACKOFF_MIN_MS".into(), "20".into()),
        ("TSUSAGE_API__BACKOFF_MAX_SECS".into(), "1".into()),
        ("TSUSAGE_API__MAX_ATTEMPTS_PER_JOB".into(), "10".into()),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push(((*k).into(), (*v).into()));
    }
    env
}

fn range() -> DateRange {
    DateRange::from_args(None, Some("2021-08-15"), Some("2021-08-17")).expect("range")
}

fn day_start(day: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(DAY0 + day * DAY_US).expect("day")
}

/// Rows keyed by (ICCID, usage_start): (data bytes, sms, mo, mt).
type Rows = BTreeMap<(String, i64), (i64, i64, i64, i64)>;

/// The simulator's truth for `n` ICCIDs over the three days: rows with usage, and pairs without.
fn truth(n: u32) -> (Rows, BTreeSet<(String, String)>) {
    let mut rows = BTreeMap::new();
    let mut none = BTreeSet::new();
    for i in 0..n {
        let id = iccid(i);
        for day in 0..DAYS {
            match tsusage::sim::usage_for(&id, day_start(day), day_start(day + 1)) {
                Some(u) => {
                    rows.insert(
                        (id.clone(), DAY0 + day * DAY_US),
                        (
                            u.data_bytes as i64,
                            u.sms as i64,
                            u.mo_sms as i64,
                            u.mt_sms as i64,
                        ),
                    );
                }
                None => {
                    none.insert((id.clone(), day_start(day).format("%Y-%m-%d").to_string()));
                }
            }
        }
    }
    (rows, none)
}

fn output_rows(ws: &Workspace) -> Rows {
    let rows = ws.rows();
    let mut out = BTreeMap::new();
    for r in rows {
        assert_eq!(r.usage_end - r.usage_start, DAY_US);
        let previous = out.insert(
            (r.iccid.clone(), r.usage_start),
            (r.data_usage_bytes, r.sms_usage, r.mo_sms, r.mt_sms),
        );
        assert!(
            previous.is_none(),
            "duplicate row for {} at {}",
            r.iccid,
            r.usage_start
        );
    }
    out
}

/// The completeness file's rows: `(iccid, window_start, state)`.
fn completeness(path: &std::path::Path) -> Vec<(String, String, String)> {
    let mut reader = csv::Reader::from_path(path).expect("completeness csv");
    reader
        .records()
        .map(|r| {
            let r = r.expect("row");
            (r[0].to_owned(), r[1].to_owned(), r[3].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_vendor_still_yields_exactly_the_simulators_truth() {
    let n = 2000;
    let ws = workspace(n);
    let env = env(
        &ws,
        &[
            ("TSUSAGE_SIM__DUPLICATE_FRACTION", "0.2"),
            ("TSUSAGE_SIM__DROP_FRACTION", "0.05"),
            ("TSUSAGE_SIM__REORDER", "true"),
            ("TSUSAGE_SIM__CALLBACK_MODE", "per_device"),
            ("TSUSAGE_SIM__TOKEN_TTL_SECS", "2"),
            ("TSUSAGE_SIM__SESSION_IDLE_TTL_SECS", "1"),
            ("TSUSAGE_SIM__RATE_LIMIT_PER_SEC", "20"),
            ("TSUSAGE_SIM__ERROR_5XX_FRACTION", "0.1"),
        ],
    );
    let config = Config::load_with_env(&ws.config(), env).expect("config");
    let outcome = pipeline::run(&config, pipeline::RunOptions::simulated(range()))
        .await
        .expect("run");
    let report = &outcome.report;
    assert_eq!(report.exit_code, 0, "{}", report.summary());

    let (expected, no_usage) = truth(n);
    let got = output_rows(&ws);
    assert_eq!(got.len(), expected.len(), "{}", report.summary());
    assert!(got == expected, "every row equals the simulator's truth");

    let collect = report.collect.as_ref().expect("collect");
    let listed = completeness(&collect.completeness_file);
    assert!(
        listed.iter().all(|(_, _, state)| state == "no_usage"),
        "{listed:?}"
    );
    let listed: BTreeSet<(String, String)> = listed.into_iter().map(|(i, d, _)| (i, d)).collect();
    assert_eq!(
        listed, no_usage,
        "the completeness file lists exactly the pairs without usage"
    );
    assert_eq!(
        collect.completeness.get("usage").copied(),
        Some(expected.len() as u64)
    );
    assert_eq!(
        collect.completeness.get("no_usage").copied(),
        Some(no_usage.len() as u64)
    );

    let submit = report.submit.as_ref().expect("submit");
    assert_eq!(
        submit.submitted + submit.not_submitted,
        60 + collect.tracking.resubmitted
    );
    let callbacks = report.callbacks.as_ref().expect("callbacks");
    assert!(
        callbacks.already_journaled > 0,
        "duplicates were delivered and recognized"
    );
    let partitions: u64 = report.output.as_ref().map_or(0, |o| o.collapsed);
    eprintln!(
        "fault run: {} requests ({} attempts, {} retries, {} throttled, {} 5xx, {} re-requested), {} callbacks \
         ({} journaled, {} identical duplicates), {} records collapsed, {} rows",
        submit.submitted,
        submit.attempts,
        submit.retries,
        submit.throttled,
        submit.server_errors,
        collect.tracking.resubmitted,
        callbacks.received,
        callbacks.journaled,
        callbacks.already_journaled,
        partitions,
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_values_are_rejected_and_listed_while_good_rows_land_intact() {
    let n = 300;
    let ws = workspace(n);
    let env = env(
        &ws,
        &[
            ("TSUSAGE_SIM__DIRTY_FRACTION", "0.05"),
            ("TSUSAGE_PLAN__CHUNK_SIZE", "50"),
        ],
    );
    let config = Config::load_with_env(&ws.config(), env).expect("config");
    let outcome = pipeline::run(&config, pipeline::RunOptions::simulated(range()))
        .await
        .expect("run");
    let report = &outcome.report;
    assert_eq!(report.exit_code, 3, "{}", report.summary());
    let records = report.records.as_ref().expect("records");
    assert!(records.rejected > 0);

    let (expected, _) = truth(n);
    let got = output_rows(&ws);
    for (key, values) in &got {
        assert_eq!(expected.get(key), Some(values), "a landed row is exact");
    }
    let collect = report.collect.as_ref().expect("collect");
    let rejected: Vec<_> = completeness(&collect.completeness_file)
        .into_iter()
        .filter(|(_, _, s)| s == "rejected")
        .collect();
    assert!(!rejected.is_empty());
    assert_eq!(
        got.len() + rejected.len(),
        expected.len(),
        "every pair with usage is a row or a listed reject"
    );
    let rejects = ws.callback_rejects();
    assert!(!rejects.is_empty());
    assert!(
        rejects
            .iter()
            .all(|r| r["source"] == "listener" && r["field"] == "dataUsage"),
        "{rejects:?}"
    );
}

fn journaled_request_ids(ws: &Workspace) -> Vec<String> {
    let store = SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    store
        .callbacks_since(0, 1000)
        .expect("journal")
        .into_iter()
        .map(|entry| entry.request_id)
        .collect()
}

#[test]
fn the_listener_refuses_bad_callers_and_an_acknowledged_callback_survives_kill_9() {
    let ws = Workspace::new();
    let port = free_port();
    let mut child = spawn_listen(&ws, port, &[("TSUSAGE_CALLBACKS__MAX_BODY_BYTES", "4096")]);

    let wrong = usage_callback("req-wrong", 1, &[record(&iccid(1), 0, r#""1""#)])
        .replace("cb-secret-sentinel", "guess");
    assert_eq!(post(port, "application/json", wrong.as_bytes()), 401);
    let big = usage_callback(
        "req-big",
        1,
        &(0..100)
            .map(|i| record(&iccid(i), 0, r#""1""#))
            .collect::<Vec<_>>(),
    );
    assert!(big.len() > 4096);
    assert_eq!(post(port, "application/json", big.as_bytes()), 413);
    let good = usage_callback("req-good", 1, &[record(&iccid(2), 0, r#""7""#)]);
    assert_eq!(post(port, "text/plain", good.as_bytes()), 415);
    assert_eq!(post(port, "application/json", b"{not json"), 401);

    assert_eq!(post(port, "application/json", good.as_bytes()), 200);
    child.kill().expect("kill -9");
    child.wait().expect("reap");

    assert_eq!(
        journaled_request_ids(&ws),
        vec!["req-good".to_owned()],
        "only the acknowledged callback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_listen_process_gives_the_same_output_as_the_in_process_listener() {
    let n = 200;
    let inline = workspace(n);
    let config = Config::load_with_env(&inline.config(), env(&inline, &[])).expect("config");
    let outcome = pipeline::run(&config, pipeline::RunOptions::simulated(range()))
        .await
        .expect("in-process run");
    assert_eq!(outcome.report.exit_code, 0, "{}", outcome.report.summary());

    let external = workspace(n);
    let port = free_port();
    let mut listen = spawn_listen(&external, port, &[]);
    let env = env(
        &external,
        &[
            ("TSUSAGE_CALLBACKS__SOURCE", "external"),
            (
                "TSUSAGE_CALLBACKS__PUBLIC_URL",
                &format!("http://127.0.0.1:{port}/callbacks"),
            ),
            ("TSUSAGE_CALLBACKS__USERNAME", "cb-user"),
            ("TSUSAGE_CALLBACKS__PASSWORD", "cb-secret-sentinel"),
        ],
    );
    let config = Config::load_with_env(&external.config(), env).expect("config");
    let outcome = pipeline::run(&config, pipeline::RunOptions::simulated(range()))
        .await
        .expect("external run");
    let pid = listen.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = listen.wait();
    assert_eq!(outcome.report.exit_code, 0, "{}", outcome.report.summary());
    assert!(
        outcome.report.listener.is_none(),
        "no listener in the run itself"
    );

    assert_eq!(output_rows(&external), output_rows(&inline));
    assert_eq!(output_rows(&external).len(), truth(n).0.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_skips_complete_windows_force_asks_again_and_lookback_repulls() {
    let n = 40;
    let ws = workspace(n);
    let config = Config::load_with_env(
        &ws.config(),
        env(&ws, &[("TSUSAGE_PLAN__CHUNK_SIZE", "20")]),
    )
    .expect("config");
    let first = pipeline::run(&config, pipeline::RunOptions::simulated(range()))
        .await
        .expect("first");
    assert_eq!(first.report.exit_code, 0, "{}", first.report.summary());
    let rows = ws.rows();
    assert_eq!(first.report.submit.as_ref().map(|s| s.submitted), Some(6));

    // The same range again: every window is complete, nothing is asked, the output is identical.
    let again = pipeline::run(&config, pipeline::RunOptions::simulated(range()))
        .await
        .expect("again");
    let plan = again.report.plan.as_ref().expect("plan");
    assert_eq!((plan.jobs, plan.already_complete), (6, 6));
    assert_eq!(again.report.submit.as_ref().map(|s| s.attempts), Some(0));
    assert_eq!(again.report.exit_code, 0);
    assert_eq!(ws.rows(), rows);

    // --force asks again; the newer answers replace the older ones, never adding rows.
    let forced = pipeline::run(
        &config,
        pipeline::RunOptions {
            force: true,
            ..pipeline::RunOptions::simulated(range())
        },
    )
    .await
    .expect("forced");
    assert_eq!(
        forced.report.plan.as_ref().map(|p| p.requested_again),
        Some(6)
    );
    assert_eq!(forced.report.submit.as_ref().map(|s| s.submitted), Some(6));
    let after = ws.rows();
    assert_eq!(after.len(), rows.len());
    let values = |rows: &[Row]| {
        rows.iter()
            .map(|r| (r.iccid.clone(), r.usage_start, r.data_usage_bytes))
            .collect::<Vec<_>>()
    };
    assert_eq!(values(&after), values(&rows));
    assert!(
        after
            .iter()
            .zip(&rows)
            .all(|(a, b)| a.request_id != b.request_id),
        "newest answers win"
    );

    // A nightly run of the next day with plan.lookback_days = 2 re-pulls the two days before it.
    let nightly = Config::load_with_env(
        &ws.config(),
        env(
            &ws,
            &[
                ("TSUSAGE_PLAN__CHUNK_SIZE", "20"),
                ("TSUSAGE_PLAN__LOOKBACK_DAYS", "2"),
            ],
        ),
    )
    .expect("config");
    let next_day = DateRange::from_args(Some("2021-08-18"), None, None).expect("date");
    let run = pipeline::run(&nightly, pipeline::RunOptions::simulated(next_day))
        .await
        .expect("nightly");
    let plan = run.report.plan.as_ref().expect("plan");
    assert_eq!(
        (plan.from.as_str(), plan.windows, plan.requested_again),
        ("2021-08-16", 3, 4)
    );
    assert_eq!(run.report.exit_code, 0, "{}", run.report.summary());
}

#[test]
fn a_second_run_on_the_same_state_store_is_refused_naming_the_holder() {
    let ws = workspace(4);
    // Hold the lock as a running `tsusage run` would.
    let lock = tsusage::state::RunLock::acquire(&ws.path("state/tsusage.db"), "holder-run", "run")
        .expect("lock");
    let run = ws.run(&["run", "--simulate", "--date", "2021-08-15"]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("in use by tsusage run (run holder-run, pid"),
        "{}",
        run.stderr()
    );
    drop(lock);

    // A lock file left behind by a killed run (the kernel dropped its flock) does not block: the
    // next run takes it over and says so.
    std::fs::write(
        ws.path("state/tsusage.db.lock"),
        "tsusage run (run dead-run, pid 999999, started then)",
    )
    .expect("stale lock");
    let inbox = ws.inbox();
    let ingest = ws.run(&["ingest", inbox.to_str().expect("path")]);
    ingest.expect_code(0);
    assert!(
        ingest.stderr().contains("taking over the state store lock"),
        "{}",
        ingest.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_dropped_as_files_feed_the_same_tracking() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let n = 60;
    let ws = workspace(n);
    let sim = tsusage::sim::start(tsusage::sim::SimConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        ..tsusage::sim::SimConfig::default()
    })
    .await
    .expect("sim");
    // Someone else receives the callbacks and drops each as a file (written, then renamed in).
    let inbox = ws.inbox();
    let counter = std::sync::Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (inbox, counter) = (inbox.clone(), counter.clone());
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let tmp = inbox.join(format!(".cb-{n}.json.part"));
                std::fs::write(&tmp, &body).expect("write");
                std::fs::rename(&tmp, inbox.join(format!("cb-{n}.json"))).expect("rename");
                "ok"
            }
        }),
    );
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_url = format!("http://{}/hook", hook.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(hook, app).await });

    let env = vec![
        ("TSUSAGE_API__BASE_URL".to_owned(), sim.base_url()),
        ("TSUSAGE_API__APP_KEY".to_owned(), "k".to_owned()),
        ("TSUSAGE_API__APP_SECRET".to_owned(), "s".to_owned()),
        ("TSUSAGE_API__USERNAME".to_owned(), "u".to_owned()),
        ("TSUSAGE_API__PASSWORD".to_owned(), "p".to_owned()),
        (
            "TSUSAGE_INPUT__PATHS".to_owned(),
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE".to_owned(), "20".to_owned()),
        ("TSUSAGE_API__REQUESTS_PER_SEC".to_owned(), "50".to_owned()),
        (
            "TSUSAGE_CALLBACKS__SOURCE".to_owned(),
            "drop_dir".to_owned(),
        ),
        (
            "TSUSAGE_CALLBACKS__DROP_DIR".to_owned(),
            ws.inbox().display().to_string(),
        ),
        ("TSUSAGE_CALLBACKS__SETTLE_SECS".to_owned(), "1".to_owned()),
    ];
    let config = Config::load_with_env(&ws.config(), env).expect("config");
    let client = tsusage::submit::ApiClient::new(&config.api).expect("client");
    client
        .register_callback(ACCOUNT, "DeviceUsage", &hook_url, None, None)
        .await
        .expect("register the hook");

    let outcome = pipeline::run(&config, pipeline::RunOptions::new(range()))
        .await
        .expect("run");
    assert_eq!(outcome.report.exit_code, 0, "{}", outcome.report.summary());
    assert_eq!(output_rows(&ws).len(), truth(n).0.len());
    assert!(
        ws.inbox()
            .join("processed")
            .read_dir()
            .expect("processed")
            .count()
            > 0
    );
    sim.shutdown().await;
}
