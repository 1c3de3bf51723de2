//! Several workers, one range: 3 `tsusage run` on one PostgreSQL store against one simulator,
//! callbacks journaled by one `tsusage listen`; one worker `kill -9`ed mid-run.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use chrono::{DateTime, Days, NaiveDate, Utc};

use crate::postgres::{TestDb, pg_url};
use crate::util::*;

const ICCIDS: u32 = 60;
const DAYS: u64 = 3;
const RATE: f64 = 20.0;
const BURST: f64 = 2.0;

fn day(i: u64) -> NaiveDate {
    NaiveDate::from_ymd_opt(2021, 8, 15).expect("day") + Days::new(i)
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    d.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

/// `(window start, first ICCID)` of the jobs `pid` holds claims on now.
fn claimed_by(url: &str, pid: u32) -> BTreeSet<(String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let conn = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT window_start, iccids FROM jobs WHERE claimed_by LIKE $1",
                &[&format!("% pid {pid}")],
            )
            .await
            .expect("claims");
        drop(client);
        let _ = conn.await;
        rows.iter()
            .map(|r| {
                let start: String = r.get(0);
                let iccids: String = r.get(1);
                let first = iccids.split(',').next().unwrap_or_default().to_owned();
                (start.chars().take(10).collect(), first)
            })
            .collect()
    })
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn three_workers_share_one_range_within_one_budget_and_survive_a_kill() {
    let admin = pg_url();
    let db = TestDb::new(&admin);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = rt
        .block_on(tsusage::sim::start(tsusage::sim::SimConfig {
            listen_addr: "127.0.0.1:0".parse().expect("addr"),
            ..tsusage::sim::SimConfig::default()
        }))
        .expect("sim");

    let ws = Workspace::new();
    let iccids: Vec<String> = (0..ICCIDS).map(iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n", iccids.join("\n")),
    )
    .expect("iccids");
    let port = free_port();
    let db_env: Vec<(String, String)> = db.env();
    let db_env_ref: Vec<(&str, &str)> = db_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut listener = spawn_listen(&ws, port, &db_env_ref);

    let mut env = db_env.clone();
    for (k, v) in [
        ("TSUSAGE_API__BASE_URL", sim.base_url()),
        ("TSUSAGE_API__APP_KEY", "k".into()),
        ("TSUSAGE_API__APP_SECRET", "s".into()),
        ("TSUSAGE_API__USERNAME", "u".into()),
        ("TSUSAGE_API__PASSWORD", "p".into()),
        (
            "TSUSAGE_INPUT__PATHS",
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE", "1".into()),
        ("TSUSAGE_PLAN__LEASE_SECS", "4".into()),
        ("TSUSAGE_PLAN__CLAIM_BATCH", "10".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC", format!("{RATE}")),
        ("TSUSAGE_API__BURST", format!("{BURST}")),
        ("TSUSAGE_CALLBACKS__SOURCE", "external".into()),
        (
            "TSUSAGE_CALLBACKS__PUBLIC_URL",
            format!("http://127.0.0.1:{port}/callbacks"),
        ),
        ("TSUSAGE_CALLBACKS__USERNAME", "cb-user".into()),
        ("TSUSAGE_CALLBACKS__PASSWORD", "cb-secret-sentinel".into()),
        ("TSUSAGE_CALLBACKS__SETTLE_SECS", "1".into()),
    ] {
        env.push((k.to_owned(), v));
    }
    // The first worker plans and registers the callback; the others join at once.
    let mut workers: Vec<Child> = (0..3)
        .map(|_| spawn_run(&ws, "2021-08-15", "2021-08-17", &env))
        .collect();

    // Kill one worker once about a third of the jobs are sent.
    let jobs = u64::from(ICCIDS) * DAYS;
    let started = Instant::now();
    while sim.stats().promo_accepted < jobs / 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = workers.remove(0);
    let killed = claimed_by(&db.url, victim.id());
    let mut victim = victim;
    victim.kill().expect("kill -9");
    let _ = victim.wait();
    let at_kill = sim.stats().promo_arrival_ms;

    let mut reports = Vec::new();
    for w in workers {
        let out = w.wait_with_output().expect("worker");
        let run = Run(out);
        run.expect_code(0);
        reports.push(run.report());
    }
    let stats = sim.stats();
    let _ = listener.kill();
    let _ = listener.wait();

    // Every job asked; none twice, except those the killed worker held when it died.
    let mut asked: BTreeMap<(String, String), u32> = BTreeMap::new();
    for (_, start, first, n) in &stats.promo_accepted_log {
        assert_eq!(*n, 1);
        *asked.entry((start.clone(), first.clone())).or_default() += 1;
    }
    assert_eq!(asked.len() as u64, jobs, "every job asked");
    let mut resent = 0;
    for (key, n) in &asked {
        if killed.contains(key) {
            assert!(*n <= 2, "{key:?} asked {n} times");
            resent += n - 1;
        } else {
            assert_eq!(
                *n, 1,
                "{key:?} asked {n} times outside the killed worker's lease"
            );
        }
    }

    // The rate: never above limit * elapsed + burst; while all three sent, within 2 % of it.
    let arrivals = &stats.promo_arrival_ms;
    let t0 = arrivals[0];
    for (i, t) in arrivals.iter().enumerate() {
        let allowed = BURST + RATE * (t - t0) as f64 / 1000.0 + 1.0;
        assert!(
            (i + 1) as f64 <= allowed,
            "{} requests by {} ms, allowed {allowed}",
            i + 1,
            t - t0
        );
    }
    let (n, span_ms) = (
        at_kill.len() as f64,
        (at_kill[at_kill.len() - 1] - t0) as f64,
    );
    let measured = (n - BURST) / (span_ms / 1000.0);
    eprintln!(
        "workers: {n} requests in {span_ms} ms before the kill: {measured:.2}/s (limit {RATE}); \
         {} requests in all, {resent} re-sent of {} the killed worker held",
        arrivals.len(),
        killed.len()
    );
    for r in &reports {
        eprintln!(
            "worker {}: claims {} submit attempts {} budget {}",
            r["run_id"], r["claims"], r["submit"]["attempts"], r["submit"]["budget"]
        );
    }
    assert!(
        (measured - RATE).abs() / RATE <= 0.02,
        "measured {measured:.2}/s against {RATE}/s"
    );

    // Every pair exact against the simulator.
    let rows = ws.rows();
    let mut expected = BTreeMap::new();
    for id in &iccids {
        for d in 0..DAYS {
            let (s, e) = (midnight(day(d)), midnight(day(d + 1)));
            if let Some(u) = tsusage::sim::usage_for(id, s, e) {
                expected.insert(
                    (id.clone(), s.timestamp_micros()),
                    [
                        u.data_bytes as i64,
                        u.sms as i64,
                        u.mo_sms as i64,
                        u.mt_sms as i64,
                    ],
                );
            }
        }
    }
    let got: BTreeMap<(String, i64), [i64; 4]> = rows
        .iter()
        .map(|r| {
            (
                (r.iccid.clone(), r.usage_start),
                [r.data_usage_bytes, r.sms_usage, r.mo_sms, r.mt_sms],
            )
        })
        .collect();
    assert_eq!(rows.len(), got.len(), "no doubled rows");
    assert_eq!(got, expected);
    rt.block_on(sim.shutdown());
}
