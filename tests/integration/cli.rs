//! The command line's contract: exit codes and error messages for configuration mistakes.

use crate::util::*;

#[test]
fn config_errors_exit_2_naming_file_and_key() {
    let ws = Workspace::with_config("[plan]\nchunk_size = 0\n");
    let run = ws.ingest();
    run.expect_code(2);
    assert!(
        run.stderr().contains("tsusage.toml") && run.stderr().contains("plan.chunk_size"),
        "{}",
        run.stderr()
    );

    let ws = Workspace::with_config("[plan]\nchunksize = 5\n");
    let run = ws.ingest();
    run.expect_code(2);
    assert!(
        run.stderr().contains("unknown field `chunksize`"),
        "{}",
        run.stderr()
    );

    let ws = Workspace::new();
    let inbox = ws.inbox();
    let run = ws.run_env(
        &["ingest", inbox.to_str().expect("path")],
        &[("TSUSAGE_PLAN__WINDOW_DAYS", "week")],
    );
    run.expect_code(2);
    assert!(
        run.stderr().contains("TSUSAGE_PLAN__WINDOW_DAYS"),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_missing_drop_directory_is_a_usage_error() {
    let ws = Workspace::new();
    let run = ws.run(&["ingest", "no-such-dir"]);
    run.expect_code(2);
    assert!(
        run.stderr().contains("no-such-dir: not a directory"),
        "{}",
        run.stderr()
    );
}

#[test]
fn an_unwritable_state_store_fails_with_exit_1() {
    let ws = Workspace::new();
    std::fs::write(
        ws.path("state"),
        "a file where the state directory should be",
    )
    .expect("write");
    ws.drop_file(
        "a.json",
        &usage_callback("req", 1, &[record(&iccid(1), 0, r#""1""#)]),
    );
    let run = ws.ingest();
    run.expect_code(1);
    assert!(run.stderr().contains("state store"), "{}", run.stderr());
    assert!(
        ws.inbox().join("a.json").exists(),
        "nothing journaled, so the file stays"
    );
}

#[test]
fn the_bundled_sample_ingests_cleanly_and_stays_in_place() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = Workspace::new();
    let inbox = root.join("data/callbacks");
    let before = files_under(&inbox);
    let run = ws.run(&["ingest", inbox.to_str().expect("path"), "--keep"]);
    run.expect_code(0);
    assert_eq!(
        files_under(&inbox),
        before,
        "--keep leaves the sample intact"
    );
    let rows = ws.rows();
    assert_eq!(rows.len(), 150);
    assert!(
        rows.iter()
            .all(|r| r.data_usage_bytes >= 0 && r.account_name == ACCOUNT)
    );
    let partitions: std::collections::BTreeSet<_> =
        rows.iter().map(|r| r.partition.clone()).collect();
    assert_eq!(partitions.len(), 3);
}

#[test]
fn the_readme_run_command_completes_the_sample_against_the_simulator() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = Workspace::new();
    let out = ws.out();
    let state = ws.path("state/tsusage.db");
    let iccids = format!("[\"{}\"]", root.join("data/iccids.csv").display());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tsusage"));
    cmd.args(["run", "--simulate", "--config"])
        .arg(root.join("data/tsusage.toml"))
        .args(["--from", "2021-08-15", "--to", "2021-08-17"])
        .current_dir(ws.dir.path())
        .env("TSUSAGE_OUTPUT__DIR", &out)
        .env("TSUSAGE_STATE__PATH", &state)
        .env("TSUSAGE_INPUT__PATHS", iccids);
    let run = Run(cmd.output().expect("run"));
    run.expect_code(3);
    let report = run.report();
    let completeness = &report["collect"]["completeness"];
    assert_eq!(completeness["rejected_input"], 3, "{completeness}");
    let usage = completeness["usage"].as_u64().expect("usage");
    assert_eq!(
        usage + completeness["no_usage"].as_u64().expect("no usage"),
        3000
    );
    assert_eq!(ws.rows().len() as u64, usage);
    assert!(run.stdout().contains("parquet: "), "{}", run.stdout());
    assert!(run.stdout().contains("completeness: "), "{}", run.stdout());
}

#[test]
fn a_bad_date_is_a_usage_error_printed_once() {
    let ws = Workspace::new();
    for args in [
        &["run", "--simulate", "--date", "2021-13-45"][..],
        &["submit", "--date", "2021-02-30"],
        &[
            "run",
            "--simulate",
            "--from",
            "2021-08-17",
            "--to",
            "2021-08-15",
        ],
        &["status", "--date", "yesterday"],
    ] {
        let run = ws.run(args);
        run.expect_code(2);
        let stderr = run.stderr();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line: {stderr}");
        assert!(
            lines[0].starts_with("tsusage: ")
                && (lines[0].contains("not a date (expected YYYY-MM-DD)")
                    || lines[0].contains("is after --to")),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        !ws.path("state/tsusage.db").exists(),
        "nothing was opened for a command refused at the door"
    );
}
