//! The submitter against the built-in simulator over loopback: tokens that expire, wrong credentials,
//! throttling, 5xx, refusals, the in-flight cap, and a vendor that is down.

use std::sync::Arc;
use std::time::Duration;

use tsusage::collect::Writer;
use tsusage::config::Config;
use tsusage::pipeline;
use tsusage::plan::{self, DateRange};
use tsusage::sim::{self, SimConfig, SimHandle};
use tsusage::state::{SqliteStore, Store};
use tsusage::submit::{self, ApiClient, SubmitOptions};

use crate::util::*;

fn sim_config() -> SimConfig {
    SimConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        ..SimConfig::default()
    }
}

async fn start(config: SimConfig) -> SimHandle {
    sim::start(config).await.expect("simulator starts")
}

/// A workspace with `n` ICCIDs in `iccids.csv`.
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

/// The environment pointing a run at `sim`, plus `extra`.
fn env(ws: &Workspace, sim: &SimHandle, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("TSUSAGE_API__BASE_URL".into(), sim.base_url()),
        ("TSUSAGE_API__APP_KEY".into(), "key".into()),
        ("TSUSAGE_API__APP_SECRET".into(), "secret".into()),
        ("TSUSAGE_API__USERNAME".into(), "user".into()),
        ("TSUSAGE_API__PASSWORD".into(), "right-password".into()),
        (
            "TSUSAGE_INPUT__PATHS".into(),
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE".into(), "2".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC".into(), "200".into()),
        ("TSUSAGE_API__BACKOFF_MIN_MS".into(), "20".into()),
        ("TSUSAGE_API__BACKOFF_MAX_SECS".into(), "1".into()),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push(((*k).into(), (*v).into()));
    }
    env
}

fn config(ws: &Workspace, sim: &SimHandle, extra: &[(&str, &str)]) -> Config {
    Config::load_with_env(&ws.config(), env(ws, sim, extra)).expect("config")
}

fn day() -> DateRange {
    DateRange::from_args(Some("2021-08-15"), None, None).expect("date")
}

/// Job statuses in the state store, counted.
fn statuses(ws: &Workspace) -> std::collections::BTreeMap<String, u64> {
    let store = SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    store.job_status_counts().expect("counts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_submitted_once_and_its_request_id_recorded() {
    let sim = start(sim_config()).await;
    let ws = workspace(20);
    let outcome = pipeline::submit(&config(&ws, &sim, &[]), day())
        .await
        .expect("submit");
    let report = &outcome.report;
    assert_eq!(report.exit_code, 0, "{}", report.summary());
    let s = report.submit.as_ref().expect("submit section");
    assert_eq!(
        (s.jobs, s.submitted, s.failed, s.not_submitted),
        (10, 10, 0, 0)
    );
    assert_eq!(s.attempts, 10);
    let stats = sim.stats();
    assert_eq!(stats.promo_accepted, 10);
    assert_eq!(stats.promo_devices_accepted, 20);
    assert_eq!((stats.logins_ok, stats.oauth_tokens_issued), (1, 1));
    assert_eq!(statuses(&ws).get("submitted"), Some(&10));

    // The same command again: every job already has its requestId, nothing is sent.
    let again = pipeline::submit(&config(&ws, &sim, &[]), day())
        .await
        .expect("rerun");
    let plan = again.report.plan.as_ref().expect("plan");
    assert_eq!(
        (plan.jobs, plan.new_jobs, plan.already_submitted),
        (10, 0, 10)
    );
    assert_eq!(sim.stats().promo_requests, 10, "no request sent twice");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_bearer_is_renewed_once_per_expiry_and_no_job_is_lost() {
    let sim = start(SimConfig {
        token_ttl_secs: 1,
        ..sim_config()
    })
    .await;
    let ws = workspace(60);
    // 30 jobs at 12/s: about 2.5 s, so the one-second bearer expires two or three times.
    let cfg = config(
        &ws,
        &sim,
        &[
            ("TSUSAGE_API__REQUESTS_PER_SEC", "12"),
            ("TSUSAGE_API__MAX_IN_FLIGHT", "4"),
        ],
    );
    let started = std::time::Instant::now();
    let outcome = pipeline::submit(&cfg, day()).await.expect("submit");
    let elapsed = started.elapsed().as_secs_f64();
    let s = outcome.report.submit.as_ref().expect("submit");
    assert_eq!(
        (s.submitted, s.not_submitted),
        (30, 0),
        "{}",
        outcome.report.summary()
    );
    let stats = sim.stats();
    assert_eq!(stats.promo_accepted, 30);
    assert!(
        stats.oauth_tokens_issued >= 2,
        "the bearer expired at least once: {stats:?}"
    );
    assert!(
        stats.oauth_tokens_issued as f64 <= elapsed.ceil() + 1.0,
        "one renewal per expiry, not one per task: {} tokens in {elapsed:.1} s",
        stats.oauth_tokens_issued
    );
    assert_eq!(s.oauth_tokens, stats.oauth_tokens_issued);
    // Renewed when its expires_in ran out, or on the gateway's 401: once per expiry either way.
    assert!(s.reauthentications < stats.oauth_tokens_issued);
    assert_eq!(stats.logins_ok, 1, "the session outlives the bearer");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_renewed_by_exactly_one_login() {
    let sim = start(SimConfig {
        session_idle_ttl_secs: 1,
        ..sim_config()
    })
    .await;
    let ws = workspace(16);
    let cfg = config(&ws, &sim, &[("TSUSAGE_API__MAX_IN_FLIGHT", "8")]);
    let client = Arc::new(ApiClient::new(&cfg.api).expect("client"));
    client.authenticate().await.expect("login");
    tokio::time::sleep(Duration::from_millis(1500)).await; // the session dies idle

    let iccids: Vec<_> = (0..16)
        .map(|i| tsusage::ingest::Iccid::parse(&iccid(i)).expect("iccid"))
        .collect();
    let windows = plan::windows(day().from, day().to, 1).expect("windows");
    let jobs = plan::plan(ACCOUNT, &iccids, &windows, 2);
    let mut store = SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    store.record_jobs(&jobs).expect("intent");
    let writer = Arc::new(Writer::spawn(Box::new(store), "test".into()));
    let options = SubmitOptions::new(&cfg.api, jobs.len());
    let report = submit::submit(client.clone(), writer, jobs, &options)
        .await
        .expect("submit");
    assert_eq!(report.submitted, 8);
    let stats = sim.stats();
    assert_eq!(
        stats.logins_ok, 2,
        "one login, then exactly one re-login: {stats:?}"
    );
    assert!(stats.session_rejected >= 1);
    assert_eq!(report.reauthentications, 1);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_stop_after_one_login_with_a_clear_message_and_exit_1() {
    let sim = start(SimConfig {
        password: Some("right-password".into()),
        ..sim_config()
    })
    .await;
    let ws = workspace(4);
    let env = env(&ws, &sim, &[("TSUSAGE_API__PASSWORD", "wrong-password")]);
    let config_path = ws.config();
    let dir = ws.dir.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tsusage"));
        cmd.args(["submit", "--date", "2021-08-15", "--config"])
            .arg(config_path)
            .current_dir(dir);
        cmd.envs(env);
        cmd.output().expect("run")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("login rejected: check TSUSAGE_API__USERNAME/PASSWORD"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("wrong-password"),
        "the password is never printed"
    );
    let stats = sim.stats();
    assert!(stats.logins_failed <= 2, "{stats:?}");
    assert_eq!(stats.promo_requests, 0);
    assert!(!stats.account_locked);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_fails_its_job_without_retry_and_names_the_error_code() {
    let sim = start(SimConfig {
        accounts: vec!["0000999999-00001".into()],
        ..sim_config()
    })
    .await;
    let ws = workspace(6);
    let outcome = pipeline::submit(&config(&ws, &sim, &[]), day())
        .await
        .expect("submit");
    let report = &outcome.report;
    assert_eq!(report.exit_code, 3);
    let s = report.submit.as_ref().expect("submit");
    assert_eq!((s.failed, s.attempts, s.retries), (3, 3, 0));
    assert!(
        s.failures
            .iter()
            .all(|f| f.error_code == "REQUEST_FAILED.AccountNotFound" && f.status == 400)
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&outcome.report_path).expect("report"))
            .expect("json");
    assert_eq!(
        saved["submit"]["failures"][0]["error_code"],
        "REQUEST_FAILED.AccountNotFound"
    );
    assert_eq!(statuses(&ws).get("failed"), Some(&3));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_503s_still_get_every_job_accepted_within_1_5_attempts_per_job() {
    let sim = start(SimConfig {
        error_5xx_fraction: 0.2,
        ..sim_config()
    })
    .await;
    let ws = workspace(200);
    let outcome = pipeline::submit(
        &config(&ws, &sim, &[("TSUSAGE_API__MAX_ATTEMPTS_PER_JOB", "8")]),
        day(),
    )
    .await
    .expect("submit");
    let s = outcome.report.submit.as_ref().expect("submit");
    assert_eq!(
        (s.jobs, s.submitted),
        (100, 100),
        "{}",
        outcome.report.summary()
    );
    assert!(s.server_errors > 0);
    assert!(
        s.attempts as f64 <= 1.5 * 100.0,
        "{} attempts for 100 jobs",
        s.attempts
    );
    assert_eq!(sim.stats().promo_accepted, 100);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_never_exceed_the_cap() {
    let sim = start(SimConfig {
        latency_ms: 100,
        ..sim_config()
    })
    .await;
    let ws = workspace(60);
    let outcome = pipeline::submit(
        &config(&ws, &sim, &[("TSUSAGE_API__MAX_IN_FLIGHT", "3")]),
        day(),
    )
    .await
    .expect("submit");
    let s = outcome.report.submit.as_ref().expect("submit");
    assert_eq!(s.submitted, 30);
    let stats = sim.stats();
    assert_eq!(
        stats.promo_max_in_flight, 3,
        "the cap is reached and never passed"
    );
    assert!(s.max_in_flight <= 3);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_that_is_down_ends_the_run_within_the_retry_budget_and_a_rerun_resumes() {
    let down = start(SimConfig {
        error_5xx_fraction: 1.0,
        ..sim_config()
    })
    .await;
    let ws = workspace(40);
    let started = std::time::Instant::now();
    let outcome = pipeline::submit(&config(&ws, &down, &[]), day())
        .await
        .expect("submit ends");
    assert!(started.elapsed() < Duration::from_secs(20));
    let report = &outcome.report;
    assert_eq!(report.exit_code, 3);
    let s = report.submit.as_ref().expect("submit");
    assert_eq!(s.submitted, 0);
    assert_eq!(s.not_submitted, 20);
    assert!(
        s.retries <= u64::from(s.retry_budget),
        "{} retries, budget {}",
        s.retries,
        s.retry_budget
    );
    assert!(
        s.stopped
            .as_deref()
            .unwrap_or_default()
            .contains("retry budget"),
        "{:?}",
        s.stopped
    );
    assert!(s.attempts <= 20 + u64::from(s.retry_budget));
    assert_eq!(
        statuses(&ws).get("planned"),
        Some(&20),
        "all jobs stay to be submitted"
    );
    down.shutdown().await;

    let up = start(sim_config()).await;
    let outcome = pipeline::submit(&config(&ws, &up, &[]), day())
        .await
        .expect("resume");
    let s = outcome.report.submit.as_ref().expect("submit");
    assert_eq!((s.submitted, s.not_submitted), (20, 0));
    assert_eq!(outcome.report.exit_code, 0);
    assert_eq!(statuses(&ws).get("submitted"), Some(&20));
    up.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_waited_out_and_the_rate_is_never_exceeded() {
    let sim = start(SimConfig {
        rate_limit_per_sec: 10,
        retry_after_secs: 1,
        ..sim_config()
    })
    .await;
    let ws = workspace(60);
    let cfg = config(
        &ws,
        &sim,
        &[
            ("TSUSAGE_API__REQUESTS_PER_SEC", "40"),
            ("TSUSAGE_API__BURST", "2"),
            ("TSUSAGE_API__MAX_IN_FLIGHT", "1"),
            ("TSUSAGE_API__MAX_ATTEMPTS_PER_JOB", "10"),
        ],
    );
    let outcome = pipeline::submit(&cfg, day()).await.expect("submit");
    let s = outcome.report.submit.as_ref().expect("submit");
    assert_eq!(
        (s.submitted, s.not_submitted),
        (30, 0),
        "{}",
        outcome.report.summary()
    );
    let stats = sim.stats();
    assert!(
        !stats.promo_throttled_ms.is_empty(),
        "the sim throttled: {stats:?}"
    );
    assert_eq!(s.throttled, stats.promo_rejected_429);
    let arrivals = &stats.promo_arrival_ms;
    // No request arrives while a Retry-After is running (a few ms of slack for timers).
    for &t in &stats.promo_throttled_ms {
        let early: Vec<u64> = arrivals
            .iter()
            .copied()
            .filter(|&a| a > t && a + 20 < t + 1000)
            .collect();
        assert!(
            early.is_empty(),
            "requests at {early:?} ms, within the Retry-After of the 429 at {t} ms"
        );
    }
    // In no one-second window more than the rate plus the burst.
    for (i, &a) in arrivals.iter().enumerate() {
        let in_window = arrivals[i..].iter().take_while(|&&b| b < a + 1000).count();
        assert!(
            in_window <= 40 + 2,
            "{in_window} requests in the second from {a} ms"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_register_list_and_delete_talk_to_the_vendor() {
    let sim = start(sim_config()).await;
    let ws = workspace(1);
    let mut env = env(&ws, &sim, &[]);
    env.push((
        "TSUSAGE_CALLBACKS__PUBLIC_URL".into(),
        "https://etl.example.com:9001/callbacks".into(),
    ));
    env.push(("TSUSAGE_CALLBACKS__USERNAME".into(), "cb-user".into()));
    env.push((
        "TSUSAGE_CALLBACKS__PASSWORD".into(),
        "cb-secret-sentinel".into(),
    ));
    let config_path = ws.config();
    let dir = ws.dir.path().to_owned();
    let tsusage = move |action: &'static str| {
        let (env, config_path, dir) = (env.clone(), config_path.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tsusage"));
            cmd.args(["callbacks", action, "--config"])
                .arg(config_path)
                .current_dir(dir)
                .envs(env);
            Run(cmd.output().expect("run"))
        })
    };
    let registered = tsusage("register").await.expect("join");
    registered.expect_code(0);
    assert!(
        registered
            .stdout()
            .contains("registered https://etl.example.com:9001/callbacks for DeviceUsage")
    );
    let listed = tsusage("list").await.expect("join");
    listed.expect_code(0);
    assert_eq!(
        listed.stdout().trim(),
        "DeviceUsage\thttps://etl.example.com:9001/callbacks"
    );
    assert!(!listed.stdout().contains("cb-secret-sentinel"));
    tsusage("delete").await.expect("join").expect_code(0);
    let listed = tsusage("list").await.expect("join");
    assert_eq!(listed.stdout().trim(), "");
    let again = tsusage("delete").await.expect("join");
    again.expect_code(1);
    assert!(
        again
            .stderr()
            .contains("INPUT_INVALID.Callback.NotRegistered"),
        "{}",
        again.stderr()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_skips_what_run_completed_by_the_same_rules() {
    let sim = start(sim_config()).await;
    let ws = workspace(20);
    let ran = pipeline::run(
        &config(&ws, &sim, &[]),
        pipeline::RunOptions::simulated(day()),
    )
    .await
    .expect("run");
    assert_eq!(ran.report.exit_code, 0, "{}", ran.report.summary());
    assert_eq!(statuses(&ws).get("complete"), Some(&10));

    let outcome = pipeline::submit(&config(&ws, &sim, &[]), day())
        .await
        .expect("submit");
    let plan = outcome.report.plan.as_ref().expect("plan");
    assert_eq!((plan.jobs, plan.already_complete), (10, 10));
    let s = outcome.report.submit.as_ref().expect("submit");
    assert_eq!(
        (s.jobs, s.attempts),
        (0, 0),
        "nothing complete is sent again"
    );
    assert_eq!(sim.stats().promo_requests, 0);
    sim.shutdown().await;
}
