//! Secrets never leak: a full simulated run and a listen session with sentinel secrets, logging at
//! trace level; the sentinels must appear nowhere (stdout, stderr, rejects, reports, Parquet, the
//! state store and its WAL).

use std::process::{Command, Stdio};
use tsusage::state::Store as _;

use crate::util::*;

const SENTINELS: &[&str] = &[
    "app-key-sentinel-1",
    "app-secret-sentinel-2",
    "api-password-sentinel-3",
    "cb-password-sentinel-4",
];

fn assert_clean(what: &str, text: &str) {
    for s in SENTINELS {
        assert!(!text.contains(s), "{what} contains the secret {s}");
    }
}

/// Every file, and every journaled body decoded (the journal stores bodies compressed, where a
/// leaked secret would not show as text).
fn assert_files_clean(ws: &Workspace) {
    for path in files_under(ws.dir.path()) {
        let bytes = std::fs::read(&path).expect("read");
        assert_clean(
            &path.display().to_string(),
            &String::from_utf8_lossy(&bytes),
        );
    }
    let store = tsusage::state::SqliteStore::open(&ws.dir.path().join("state/tsusage.db"))
        .expect("state store");
    let journal = store.callbacks_since(0, 1 << 30).expect("journal");
    assert!(!journal.is_empty(), "callbacks were journaled");
    for entry in journal {
        assert_clean(&format!("journaled callback {}", entry.id), &entry.body);
        assert!(entry.body.starts_with('{'), "decoded body {}", entry.id);
    }
}

/// Every stderr line is one JSON object with a level and this run's id (what `jq` reads line by line).
fn assert_json_lines(stderr: &str, run_id: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "logs were written");
    for line in &lines {
        assert!(line.is_object(), "{line}");
        assert_eq!(line["run_id"], run_id, "{line}");
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
    lines
}

#[test]
fn a_simulated_run_at_trace_level_leaks_no_secret() {
    let (ws, run) = simulated_run_at_trace("text");
    assert!(
        run.stderr().contains("TRACE") || run.stderr().contains("DEBUG"),
        "logging at trace level"
    );
    let run_id = run.report()["run_id"].as_str().expect("run id").to_owned();
    assert!(
        run.stderr()
            .lines()
            .all(|l| l.ends_with(&format!(" run_id={run_id}"))),
        "every text line ends with the run id: {}",
        run.stderr()
    );
    assert_run_clean(&ws, &run);
}

#[test]
fn json_logs_of_a_simulated_run_at_trace_level_parse_line_by_line_and_leak_no_secret() {
    let (ws, run) = simulated_run_at_trace("json");
    let run_id = run.report()["run_id"].as_str().expect("run id").to_owned();
    let lines = assert_json_lines(&run.stderr(), &run_id);
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "TRACE" || l["level"] == "DEBUG"),
        "logging at trace level"
    );
    assert!(
        lines.iter().any(|l| l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("tsusage::submit"))
            || l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("tsusage::collect"))),
        "lines from the submission and collection tasks carry the run id too"
    );
    assert_run_clean(&ws, &run);
}

fn assert_run_clean(ws: &Workspace, run: &Run) {
    assert_clean("stdout", &run.stdout());
    assert_clean("stderr", &run.stderr());
    assert!(!ws.callback_rejects().is_empty(), "rejects were written");
    assert!(!ws.rows().is_empty(), "Parquet was written");
    assert!(
        files_under(&ws.out().join("runs"))
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "html")),
        "the report's page was written (and checked)"
    );
    assert_files_clean(ws);
}

fn simulated_run_at_trace(log_format: &str) -> (Workspace, Run) {
    let ws = Workspace::new();
    let list: Vec<String> = (0..30).map(iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n8.91480E+19\n", list.join("\n")),
    )
    .expect("iccids");
    let output = Command::new(env!("CARGO_BIN_EXE_tsusage"))
        .args([
            "--log",
            "trace",
            "--log-format",
            log_format,
            "run",
            "--simulate",
            "--date",
            "2021-08-15",
            "--config",
        ])
        .arg(ws.config())
        .current_dir(ws.dir.path())
        .env(
            "TSUSAGE_INPUT__PATHS",
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        )
        // The simulator accepts exactly these, and --simulate logs in with them.
        .env("TSUSAGE_SIM__APP_KEY", SENTINELS[0])
        .env("TSUSAGE_SIM__APP_SECRET", SENTINELS[1])
        .env("TSUSAGE_SIM__USERNAME", "api-user")
        .env("TSUSAGE_SIM__PASSWORD", SENTINELS[2])
        .env("TSUSAGE_SIM__DIRTY_FRACTION", "0.3")
        .env("TSUSAGE_CALLBACKS__USERNAME", "cb-user")
        .env("TSUSAGE_CALLBACKS__PASSWORD", SENTINELS[3])
        .output()
        .expect("run");
    let run = Run(output);
    run.expect_code(3); // the bad ICCID row and the dirty values
    (ws, run)
}

#[test]
fn a_listen_session_at_trace_level_leaks_no_secret() {
    let ws = Workspace::new();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tsusage"));
    cmd.args([
        "--log",
        "trace",
        "--log-format",
        "json",
        "listen",
        "--config",
    ])
    .arg(ws.config())
    .current_dir(ws.dir.path())
    .env(
        "TSUSAGE_CALLBACKS__LISTEN_ADDR",
        format!("127.0.0.1:{port}"),
    )
    .env(
        "TSUSAGE_CALLBACKS__PUBLIC_URL",
        format!("http://127.0.0.1:{port}/callbacks"),
    )
    .env("TSUSAGE_CALLBACKS__USERNAME", "cb-user")
    .env("TSUSAGE_CALLBACKS__PASSWORD", SENTINELS[3])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = wait_listening(cmd.spawn().expect("spawn listen"), port);
    let good = usage_callback(
        "req-1",
        1,
        &[
            record(&iccid(1), 0, r#""1""#),
            record(&iccid(2), 0, r#""-1""#),
        ],
    )
    .replace("cb-secret-sentinel", SENTINELS[3]);
    assert_eq!(post(port, "application/json", good.as_bytes()), 200);
    let wrong = good.replace(SENTINELS[3], "guess");
    assert_eq!(post(port, "application/json", wrong.as_bytes()), 401);
    let broken = format!("{{\"password\":\"{}\", \"requestId\": ", SENTINELS[3]);
    assert_eq!(post(port, "application/json", broken.as_bytes()), 401);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().expect("listen ends");
    let run = Run(output);
    run.expect_code(3); // the -1 record was rejected
    let run_id = run.report()["run_id"].as_str().expect("run id").to_owned();
    let lines = assert_json_lines(&run.stderr(), &run_id);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "callback refused: wrong or missing credentials"),
        "{}",
        run.stderr()
    );
    assert_clean("stdout", &run.stdout());
    assert_clean("stderr", &run.stderr());
    assert_eq!(ws.callback_rejects().len(), 1);
    assert_files_clean(&ws);
}
