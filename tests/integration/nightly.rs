//! Night after night on one state store: the scheduler's `tsusage run --simulate --date D`, ten
//! consecutive nights of 10,000 ICCIDs, each night complete and exact, and each night's tracker
//! reading only that night's callbacks; on the SQLite file and on PostgreSQL (`state.url`).

use std::collections::BTreeMap;

use chrono::{DateTime, Days, NaiveDate, Utc};

use crate::postgres::{TestDb, pg_url};
use crate::util::*;

const ICCIDS: u32 = 10_000;
const NIGHTS: u64 = 10;

/// Valid-Luhn 20-digit ICCIDs for large lists: `89148000000` + 8 digits + check digit.
fn big_iccid(i: u32) -> String {
    let body = format!("89148000000{i:08}");
    format!(
        "{body}{}",
        tsusage::ingest::luhn_check_digit(body.as_bytes())
    )
}

fn first_night() -> NaiveDate {
    NaiveDate::from_ymd_opt(2021, 9, 1).expect("date")
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

/// The simulator's truth for `day`: (ICCID → data bytes, sms, mo, mt) and how many have no usage.
fn truth(iccids: &[String], day: NaiveDate) -> (BTreeMap<String, [i64; 4]>, u64) {
    let (start, end) = (midnight(day), midnight(day + Days::new(1)));
    let mut rows = BTreeMap::new();
    let mut none = 0;
    for id in iccids {
        match tsusage::sim::usage_for(id, start, end) {
            Some(u) => {
                rows.insert(
                    id.clone(),
                    [
                        u.data_bytes as i64,
                        u.sms as i64,
                        u.mo_sms as i64,
                        u.mt_sms as i64,
                    ],
                );
            }
            None => none += 1,
        }
    }
    (rows, none)
}

/// A workspace with `n` ICCIDs in `iccids.csv`.
pub fn nightly_workspace(n: u32) -> (Workspace, Vec<String>) {
    let ws = Workspace::new();
    let iccids: Vec<String> = (0..n).map(big_iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n", iccids.join("\n")),
    )
    .expect("iccids");
    (ws, iccids)
}

pub fn nightly_env(ws: &Workspace) -> Vec<(String, String)> {
    vec![
        (
            "TSUSAGE_INPUT__PATHS".into(),
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE".into(), "200".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC".into(), "50".into()),
    ]
}

/// Runs night `day`, checks it exits 0 with every ICCID-day usage or no usage in the simulator's
/// counts, and returns its report.
fn complete_night(
    ws: &Workspace,
    env: &[(String, String)],
    iccids: &[String],
    day: NaiveDate,
) -> (serde_json::Value, BTreeMap<String, [i64; 4]>) {
    let run = run_night(ws, env, day);
    run.expect_code(0);
    let report = run.report();
    let (expected, no_usage) = truth(iccids, day);
    let completeness = &report["collect"]["completeness"];
    assert_eq!(
        completeness["usage"].as_u64(),
        Some(expected.len() as u64),
        "night {day}: {completeness}"
    );
    assert_eq!(
        completeness["no_usage"].as_u64().unwrap_or(0),
        no_usage,
        "night {day}: {completeness}"
    );
    assert_eq!(
        completeness.as_object().map(|o| o.len()),
        Some(if no_usage > 0 { 2 } else { 1 }),
        "night {day}: nothing but usage and no usage: {completeness}"
    );
    (report, expected)
}

/// Runs the nightly command for `day`, as a scheduler does.
pub fn run_night(ws: &Workspace, env: &[(String, String)], day: NaiveDate) -> Run {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let date = day.to_string();
    ws.run_env(&["run", "--simulate", "--date", &date], &env)
}

#[test]
fn ten_nights_on_one_store_are_each_complete_exact_and_read_only_their_own_callbacks() {
    ten_nights(Vec::new());
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn ten_nights_on_one_postgres_store_are_each_complete_exact_and_read_only_their_own_callbacks() {
    let admin = pg_url();
    let db = TestDb::new(&admin);
    ten_nights(postgres_env(&db));
}

/// Ten nights on one store; `store` is the environment that names it (empty: the workspace's
/// SQLite file).
fn ten_nights(store: Vec<(String, String)>) {
    let (ws, iccids) = nightly_workspace(ICCIDS);
    let mut env = nightly_env(&ws);
    env.extend(store);
    for night in 0..NIGHTS {
        let day = first_night() + Days::new(night);
        // Every ICCID-day is usage or no usage, none failed, missing or "not submitted".
        let (report, expected) = complete_night(&ws, &env, &iccids, day);
        // This night's 50 jobs, and nothing of earlier nights. A job whose callbacks are slower
        // than the simulated deadline (30 s, on a loaded machine) is asked again: that is counted
        // as a re-request, and is not a job of another night.
        let submitted = report["submit"]["submitted"].as_u64().expect("submitted");
        let resubmitted = report["collect"]["resubmitted"]
            .as_u64()
            .expect("resubmitted");
        assert_eq!(
            submitted - resubmitted,
            50,
            "{day}: {submitted} sent, {resubmitted} again"
        );

        // The tracker read this night's callbacks and nothing older: each journaled this night.
        let tracking = &report["collect"];
        let journaled = report["listener"]["journaled"].as_u64().expect("journaled");
        assert!(journaled >= 50, "night {day}: {journaled} callbacks");
        let read = tracking["callbacks_read"].as_u64().expect("callbacks_read");
        if resubmitted == 0 {
            assert_eq!(
                read, journaled,
                "night {day}: the tracker reads what this night journaled, not the history"
            );
        } else {
            // The answers to a request asked again may still come after every job is complete:
            // they are journaled (and written) but the tracker, done, no longer reads them.
            assert!(
                read <= journaled,
                "night {day}: the tracker read {read} callbacks, more than this night's {journaled}"
            );
        }
        assert_eq!(
            tracking["unmatched_callbacks"].as_u64(),
            Some(0),
            "night {day}: earlier nights' callbacks are not this night's unmatched"
        );

        // Only this night's partition was written, and its rows are the simulator's, exactly.
        let partition = format!("usage_date={day}");
        let written: Vec<&str> = report["output"]["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter_map(|p| p["partition"].as_str())
            .collect();
        assert_eq!(written, [partition.as_str()], "night {day}");
        let rows = read_rows(&ws.out().join("usage").join(&partition));
        let got: BTreeMap<String, [i64; 4]> = rows
            .iter()
            .map(|r| {
                assert_eq!(r.usage_start, midnight(day).timestamp_micros());
                (
                    r.iccid.clone(),
                    [r.data_usage_bytes, r.sms_usage, r.mo_sms, r.mt_sms],
                )
            })
            .collect();
        assert_eq!(got.len(), rows.len(), "night {day}: one row per ICCID");
        assert!(got == expected, "night {day}: rows equal the simulator's");
    }
}

#[test]
fn a_submission_ending_while_the_collector_looks_away_still_has_every_request_tracked() {
    submission_ending_while_the_collector_looks_away(Vec::new());
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn on_postgres_a_submission_ending_while_the_collector_looks_away_still_has_every_request_tracked()
{
    let admin = pg_url();
    let db = TestDb::new(&admin);
    submission_ending_while_the_collector_looks_away(postgres_env(&db));
}

/// The store `db`; the simulator delivering 64 callbacks at a time (16 by default): a PostgreSQL
/// commit costs more than SQLite's, so its throughput comes from larger groups per commit, and
/// 16 at a time on a loaded 2-core machine can outlast the simulated 30 s deadline.
fn postgres_env(db: &TestDb) -> Vec<(String, String)> {
    let mut env = db.env();
    env.push(("TSUSAGE_SIM__CALLBACK_MAX_IN_FLIGHT".into(), "64".into()));
    env
}

fn submission_ending_while_the_collector_looks_away(store: Vec<(String, String)>) {
    // Each look at the journal is followed by a 400 ms pause, so the submission (10 jobs in half a
    // second) ends while the collector is between reading and deciding. A collector that polled the
    // store for requestIds and then saw the finished task would stop with jobs "not submitted".
    let (ws, iccids) = nightly_workspace(200);
    let mut env = nightly_env(&ws);
    env.retain(|(k, _)| !k.starts_with("TSUSAGE_PLAN__") && !k.starts_with("TSUSAGE_API__"));
    env.push(("TSUSAGE_PLAN__CHUNK_SIZE".into(), "20".into()));
    env.push(("TSUSAGE_API__REQUESTS_PER_SEC".into(), "20".into()));
    env.push(("TSUSAGE_TEST_PAUSE".into(), "collect_look=400".into()));
    env.extend(store);
    for night in 0..4 {
        let day = first_night() + Days::new(night);
        let (report, _) = complete_night(&ws, &env, &iccids, day);
        assert_eq!(report["collect"]["complete"].as_u64(), Some(10));
    }
}
