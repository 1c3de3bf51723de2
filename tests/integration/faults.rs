//! Disk faults: a journal commit that fails is never acknowledged; a Parquet write that fails leaves
//! the previous partition as it was, with nothing half-written where readers look.

use std::process::Command;
use tsusage::state::Store as _;

use crate::util::*;

#[test]
fn a_failing_journal_commit_answers_503_and_the_listener_exits_1() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(&ws, port, &[("TSUSAGE_TEST_FAIL", "journal_commit")]);
    let body = usage_callback("req-f", 1, &[record(&iccid(1), 0, r#""1""#)]);
    assert_eq!(post(port, "application/json", body.as_bytes()), 503);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().expect("listen ends");
    assert_eq!(output.status.code(), Some(1));
    let store = tsusage::state::SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    assert!(
        store.callbacks_since(0, 10).expect("journal").is_empty(),
        "nothing half-committed"
    );
}

#[test]
fn a_failing_parquet_write_leaves_the_previous_partition_intact() {
    let ws = Workspace::new();
    ws.drop_file(
        "a.json",
        &usage_callback("req-1", 1, &[record(&iccid(1), 0, r#""10""#)]),
    );
    ws.ingest().expect_code(0);
    let file = ws
        .out()
        .join("usage/usage_date=2021-08-15/part-00000.parquet");
    let before = std::fs::read(&file).expect("partition");

    ws.drop_file(
        "b.json",
        &usage_callback("req-2", 1, &[record(&iccid(2), 0, r#""20""#)]),
    );
    let inbox = ws.inbox();
    let failed = ws.run_env(
        &["ingest", inbox.to_str().expect("path")],
        &[("TSUSAGE_TEST_FAIL", "parquet_write")],
    );
    failed.expect_code(1);
    assert!(
        failed
            .stderr()
            .contains("injected failure at parquet_write"),
        "{}",
        failed.stderr()
    );
    assert_eq!(
        std::fs::read(&file).expect("partition"),
        before,
        "the old partition is untouched"
    );
    let visible: Vec<_> = files_under(&ws.out().join("usage"));
    assert_eq!(
        visible,
        vec![file.clone()],
        "no temporary file where readers look"
    );
    assert_eq!(ws.rows().len(), 1);

    // The callback is journaled, the partition still pending: the next ingest writes it.
    let healed = ws.ingest();
    healed.expect_code(0);
    assert_eq!(
        ws.rows()
            .iter()
            .map(|r| r.data_usage_bytes)
            .collect::<Vec<_>>(),
        vec![10, 20]
    );
}
