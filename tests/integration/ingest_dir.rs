//! `tsusage ingest DIR`: drop directory → journal → Parquet, with the value policy and idempotence.

use crate::util::*;

/// The value policy's cases: (dataUsage JSON fragment, expected reject code or None if accepted).
const POLICY: &[(&str, Option<&str>)] = &[
    (r#""3072""#, None),
    (r#"" 3072 ""#, None), // recovered: whitespace
    ("3072", None),        // recovered: JSON integer
    (r#""""#, Some("value_empty")),
    (r#""null""#, Some("value_null")),
    ("null", Some("value_null")),
    ("", Some("value_missing")), // field absent
    (r#""-1""#, Some("value_signed")),
    (r#""+5""#, Some("value_signed")),
    (r#""1.5E3""#, Some("value_fraction_or_exponent")),
    ("3072.0", Some("value_fraction_or_exponent")),
    (r#""３０７２""#, Some("value_non_ascii_digits")),
    (r#""1,024""#, Some("value_thousands_separator")),
    (r#""0x10""#, Some("value_hex")),
    (r#""9223372036854775808""#, Some("value_out_of_range")),
];

#[test]
fn dirty_drop_dir_lands_good_rows_rejects_bad_ones_and_exits_3() {
    let ws = Workspace::new();
    // One record per policy case, each on its own ICCID.
    let records: Vec<String> = POLICY
        .iter()
        .enumerate()
        .map(|(i, (data, _))| record(&iccid(i as u32), 0, data))
        .collect();
    ws.drop_file("a-usage.json", &usage_callback("req-a", 1, &records));
    ws.drop_file("a-done.json", &completion_callback("req-a"));
    // A record with a bad ICCID and one with impossible dates, next to a good one.
    let mixed = vec![
        record("8.91480E+19", 0, r#""1""#),
        record_full(
            &iccid(90),
            r#""2024-02-30T00:00:00.0000000""#,
            &format!("\"{}\"", date(1)),
            r#""1""#,
            r#""0""#,
        ),
        record(&iccid(91), 1, r#""4096""#),
    ];
    ws.drop_file("b.json", &usage_callback("req-b", 1, &mixed));
    // Malformed: not JSON; JSON but not a callback.
    ws.drop_file(
        "c-broken.json",
        r#"{"requestId": "req-c", "deviceResponse": "#,
    );
    ws.drop_file("d-other.json", r#"{"hello": "world"}"#);

    let run = ws.ingest();
    run.expect_code(3);

    let accepted: Vec<usize> = POLICY
        .iter()
        .enumerate()
        .filter(|(_, p)| p.1.is_none())
        .map(|(i, _)| i)
        .collect();
    let rows = ws.rows();
    let mut expected_iccids: Vec<String> = accepted.iter().map(|&i| iccid(i as u32)).collect();
    expected_iccids.push(iccid(91));
    expected_iccids.sort();
    assert_eq!(
        rows.iter().map(|r| r.iccid.clone()).collect::<Vec<_>>(),
        expected_iccids
    );
    for row in &rows {
        assert_eq!(
            row.account_name, ACCOUNT,
            "unmatched callbacks take the configured account"
        );
        let expected_data = if row.iccid == iccid(91) { 4096 } else { 3072 };
        assert_eq!(row.data_usage_bytes, expected_data, "{row:?}");
        assert_eq!((row.sms_usage, row.mo_sms, row.mt_sms), (2, 1, 1));
    }
    let day0 = rows
        .iter()
        .find(|r| r.iccid == iccid(0))
        .expect("day 0 row");
    assert_eq!((day0.usage_start, day0.usage_end), (DAY0, DAY0 + DAY_US));
    assert_eq!(day0.partition, "usage_date=2021-08-15");
    assert_eq!(day0.request_id, "req-a");
    let day1 = rows
        .iter()
        .find(|r| r.iccid == iccid(91))
        .expect("day 1 row");
    assert_eq!(day1.partition, "usage_date=2021-08-16");

    // One reject line per bad record, each with a reason; two whole-body rejects.
    let rejects = ws.callback_rejects();
    let mut codes: Vec<String> = rejects
        .iter()
        .map(|r| r["code"].as_str().expect("code").to_owned())
        .collect();
    codes.sort();
    let mut expected_codes: Vec<String> = POLICY
        .iter()
        .filter_map(|p| p.1.map(str::to_owned))
        .collect();
    expected_codes.extend(
        [
            "iccid_spreadsheet_number",
            "timestamp_impossible",
            "body_not_json",
            "body_not_callback",
        ]
        .map(String::from),
    );
    expected_codes.sort();
    assert_eq!(codes, expected_codes);
    for r in &rejects {
        assert!(!r["reason"].as_str().unwrap_or_default().is_empty(), "{r}");
        assert!(
            r["source"].as_str().unwrap_or_default().contains("inbox/"),
            "{r}"
        );
    }
    let signed = rejects
        .iter()
        .find(|r| r["raw"] == "-1")
        .expect("the -1 reject");
    assert_eq!(signed["request_id"], "req-a");
    assert_eq!(signed["field"], "dataUsage");
    assert_eq!(signed["iccid"], iccid(7));
    assert_eq!(signed["record"], 7);
    let excel = rejects
        .iter()
        .find(|r| r["code"] == "iccid_spreadsheet_number")
        .expect("excel");
    assert!(
        excel["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("scientific notation"),
        "{excel}"
    );

    // The report counts each stage.
    let report = run.report();
    assert_eq!(report["status"], "partial");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["records"]["records"], POLICY.len() + 3);
    assert_eq!(report["records"]["accepted"], accepted.len() + 1);
    assert_eq!(report["records"]["recovered"], 2);
    assert_eq!(report["records"]["rejected_by_reason"]["value_signed"], 2);
    assert_eq!(report["callbacks"]["rejected"], 2);
    assert_eq!(report["callbacks"]["completion"], 1);
    assert_eq!(report["callbacks"]["unmatched"], 3);
    assert_eq!(report["drop_dir"]["processed"], 3);
    assert_eq!(report["drop_dir"]["rejected"], 2);
    assert_eq!(report["output"]["rows_written"], rows.len());

    // Files moved: good ones to processed/, the malformed ones kept in rejected/.
    assert!(ws.inbox().join("processed/a-usage.json").exists());
    assert!(ws.inbox().join("rejected/c-broken.json").exists());
    assert!(ws.inbox().join("rejected/d-other.json").exists());
}

#[test]
fn reingest_and_redelivery_add_no_rows_and_newest_value_wins() {
    let ws = Workspace::new();
    let first = usage_callback(
        "req-1",
        1,
        &[
            record(&iccid(1), 0, r#""100""#),
            record(&iccid(2), 0, r#""200""#),
        ],
    );
    ws.drop_file("first.json", &first);
    ws.ingest().expect_code(0);
    let rows_before = ws.rows();
    assert_eq!(rows_before.len(), 2);

    // The same file dropped again: nothing new in the journal, nothing rewritten.
    ws.drop_file("first.json", &first);
    let again = ws.ingest();
    again.expect_code(0);
    assert_eq!(again.report()["callbacks"]["already_journaled"], 1);
    assert_eq!(again.report()["output"]["rows_written"], 0);
    assert_eq!(ws.rows(), rows_before);
    assert!(
        ws.inbox().join("processed/first-1.json").exists(),
        "re-dropped file kept under a free name"
    );

    // A redelivery (callbackCount 2) and a re-pull with a changed value: one row per key, newest wins.
    let redelivered = usage_callback(
        "req-1",
        2,
        &[
            record(&iccid(1), 0, r#""100""#),
            record(&iccid(2), 0, r#""200""#),
        ],
    );
    ws.drop_file("redelivered.json", &redelivered);
    ws.ingest().expect_code(0);
    let repull = usage_callback("req-2", 1, &[record(&iccid(2), 0, r#""250""#)]);
    ws.drop_file("repull.json", &repull);
    let run = ws.ingest();
    run.expect_code(0);
    let rows = ws.rows();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].data_usage_bytes, 100);
    assert_eq!(
        (rows[1].data_usage_bytes, rows[1].request_id.as_str()),
        (250, "req-2")
    );
    let partition = &run.report()["output"]["partitions"][0];
    assert_eq!(partition["records_in"], 5);
    assert_eq!(partition["collapsed"], 3);
    assert_eq!(partition["rows"], 2);
}

#[test]
fn ndjson_and_json_array_files_are_read_line_by_line_and_item_by_item() {
    let ws = Workspace::new();
    let a = usage_callback("req-n1", 1, &[record(&iccid(1), 0, r#""1""#)]);
    let b = usage_callback("req-n2", 1, &[record(&iccid(2), 0, r#""2""#)]);
    ws.drop_file("lines.ndjson", &format!("{a}\r\n\n{{not json\n{b}\n"));
    let c = usage_callback("req-j1", 1, &[record(&iccid(3), 0, r#""3""#)]);
    let d = completion_callback("req-j1");
    ws.drop_file("array.json", &format!("[{c}, {d}]"));
    let e = usage_callback("req-l1", 1, &[record(&iccid(4), 0, r#""4""#)]);
    ws.drop_file("one.jsonl", &e);

    let run = ws.ingest();
    run.expect_code(3);
    let got: Vec<(String, i64)> = ws
        .rows()
        .into_iter()
        .map(|r| (r.iccid, r.data_usage_bytes))
        .collect();
    assert_eq!(
        got,
        vec![(iccid(1), 1), (iccid(2), 2), (iccid(3), 3), (iccid(4), 4)]
    );
    let rejects = ws.callback_rejects();
    assert_eq!(rejects.len(), 1);
    assert!(
        rejects[0]["source"]
            .as_str()
            .unwrap_or_default()
            .ends_with("lines.ndjson:3"),
        "{}",
        rejects[0]
    );
    assert_eq!(rejects[0]["code"], "body_not_json");
    assert_eq!(run.report()["callbacks"]["completion"], 1);
    assert!(
        ws.inbox().join("processed/lines.ndjson").exists(),
        "a file with good lines is processed"
    );
}

#[test]
fn credentials_never_rest_on_disk() {
    let ws = Workspace::new();
    ws.drop_file(
        "a.json",
        &usage_callback("req-s", 1, &[record(&iccid(1), 0, r#""1""#)]),
    );
    ws.drop_file(
        "bad.json",
        &usage_callback("req-t", 1, &[record(&iccid(2), 0, r#""-1""#)]),
    );
    ws.ingest().expect_code(3);
    for path in files_under(ws.dir.path()) {
        if path.starts_with(ws.inbox()) {
            continue; // the user's own files, moved, not copied
        }
        let bytes = std::fs::read(&path).expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("cb-secret-sentinel"),
            "secret found in {}",
            path.display()
        );
    }
    // The journal keeps the rest of the body.
    let db = std::fs::read(ws.path("state/tsusage.db")).expect("db");
    let wal = std::fs::read(ws.path("state/tsusage.db-wal")).unwrap_or_default();
    let all = [db, wal].concat();
    assert!(String::from_utf8_lossy(&all).contains("req-s"));
}

#[test]
fn symlinks_fifos_and_unfinished_uploads_are_left_alone() {
    let ws = Workspace::new();
    let outside = ws.path("outside.json");
    std::fs::write(
        &outside,
        usage_callback("req-x", 1, &[record(&iccid(1), 0, r#""1""#)]),
    )
    .expect("write");
    std::os::unix::fs::symlink(&outside, ws.inbox().join("link.json")).expect("symlink");
    ws.drop_file(
        "upload.json.part",
        &usage_callback("req-p", 1, &[record(&iccid(2), 0, r#""1""#)]),
    );
    ws.drop_file(
        ".hidden.json",
        &usage_callback("req-h", 1, &[record(&iccid(3), 0, r#""1""#)]),
    );
    ws.drop_file("notes.txt", "hello");
    let fifo = ws.inbox().join("pipe.json");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    ws.drop_file(
        "good.json",
        &usage_callback("req-g", 1, &[record(&iccid(4), 0, r#""9""#)]),
    );

    let run = ws.ingest();
    run.expect_code(0);
    let rows = ws.rows();
    assert_eq!(
        rows.iter().map(|r| r.iccid.clone()).collect::<Vec<_>>(),
        vec![iccid(4)]
    );
    assert_eq!(run.report()["drop_dir"]["skipped"], 5);
    assert!(ws.inbox().join("link.json").exists() && ws.inbox().join("upload.json.part").exists());
    assert!(outside.exists());
}

#[test]
fn output_files_carry_metadata_and_no_temp_files_remain() {
    let ws = Workspace::new();
    ws.drop_file(
        "a.json",
        &usage_callback("req-m", 1, &[record(&iccid(1), 0, r#""1""#)]),
    );
    let run = ws.ingest();
    run.expect_code(0);
    let run_id = run.report()["run_id"].as_str().expect("run id").to_owned();
    let file = ws
        .out()
        .join("usage/usage_date=2021-08-15/part-00000.parquet");
    let meta = parquet_metadata(&file);
    let get = |k: &str| {
        meta.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("tsusage.schema_version").as_deref(), Some("1"));
    assert_eq!(get("tsusage.run_id"), Some(run_id));
    assert_eq!(
        get("tsusage.tool_version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let out = ws.out();
    let leftovers: Vec<_> = files_under(&out)
        .into_iter()
        .filter_map(|p| {
            p.strip_prefix(&out)
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        })
        .filter(|p| p.contains(".staging") || p.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn large_partitions_split_into_deterministic_files() {
    let ws2 = Workspace::new();
    let records: Vec<String> = (0..7).map(|i| record(&iccid(i), 0, r#""5""#)).collect();
    ws2.drop_file("a.json", &usage_callback("req-big", 1, &records));
    let inbox = ws2.inbox();
    let run = ws2.run_env(
        &["ingest", inbox.to_str().expect("path")],
        &[("TSUSAGE_OUTPUT__MAX_ROWS_PER_FILE", "3")],
    );
    run.expect_code(0);
    let names: Vec<String> = files_under(&ws2.out().join("usage"))
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        names,
        [
            "part-00000.parquet",
            "part-00001.parquet",
            "part-00002.parquet"
        ]
    );
    assert_eq!(ws2.rows().len(), 7);
    // Rewritten under the default bound, the partition is one file: no stale part files remain.
    ws2.drop_file(
        "b.json",
        &usage_callback("req-big2", 1, &[record(&iccid(0), 0, r#""6""#)]),
    );
    ws2.ingest().expect_code(0);
    assert_eq!(files_under(&ws2.out().join("usage")).len(), 1);
    assert_eq!(ws2.rows().len(), 7);
}

#[test]
fn fault_callbacks_are_journaled_listed_and_make_the_run_partial() {
    let ws = Workspace::new();
    ws.drop_file(
        "fault.json",
        r#"{"username":"u","password":"cb-secret-sentinel","requestId":"req-f","faultResponse":{"faultcode":"REQUEST_FAILED.UnexpectedError","faultstring":"Unexpected error","status":"Failed"}}"#,
    );
    let run = ws.ingest();
    run.expect_code(3);
    assert_eq!(run.report()["callbacks"]["fault"], 1);
    assert_eq!(run.report()["callbacks"]["journaled"], 1);
    let rejects = ws.callback_rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0]["code"], "request_fault");
    assert_eq!(rejects[0]["request_id"], "req-f");
    assert!(
        rejects[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("REQUEST_FAILED.UnexpectedError")
    );
    assert!(ws.inbox().join("processed/fault.json").exists());
    assert!(ws.rows().is_empty());
}

/// The rows an ingest keeps from intake and a rebuild from the journal write the same partitions:
/// same rows, same winners of every collision, same request ids and receive times.
#[test]
fn rows_from_intake_and_a_rebuild_from_the_journal_are_identical() {
    let ws = Workspace::new();
    for n in 0..6u32 {
        // Three days; every ICCID appears in several callbacks with a different value, so the
        // newest (last journaled) must win; one bad record per callback is rejected.
        let records: Vec<String> = (0..40u32)
            .map(|i| {
                record(
                    &iccid(i % 25),
                    i64::from(i % 3),
                    &format!("\"{}\"", n * 1000 + i),
                )
            })
            .chain([record(&iccid(1), 0, r#""-5""#)])
            .collect();
        ws.drop_file(
            &format!("cb-{n}.json"),
            &usage_callback(&format!("req-{n}"), 1, &records),
        );
    }
    let first = ws.ingest();
    first.expect_code(3);
    let from_intake = ws.rows();
    assert_eq!(from_intake.len(), 40, "40 distinct (ICCID, day) keys");
    assert!(
        from_intake.iter().all(|r| r.request_id == "req-5"),
        "the last callback wins"
    );

    // Forget that the partitions were written: the next command rebuilds them from the journal.
    let db = rusqlite::Connection::open(ws.path("state/tsusage.db")).expect("state store");
    assert_eq!(db.execute("DELETE FROM partitions", []).expect("reset"), 3);
    drop(db);
    let again = ws.ingest();
    again.expect_code(0);
    assert_eq!(again.report()["output"]["rows_written"], 40);
    assert_eq!(
        again.report()["output"]["partitions"],
        first.report()["output"]["partitions"],
        "same records in, same collapsed"
    );
    assert_eq!(ws.rows(), from_intake);
}
