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
