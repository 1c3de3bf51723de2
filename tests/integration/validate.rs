//! `tsusage validate FILE...`: ICCID lists from CSV, every edge a spreadsheet produces.

use crate::util::*;

fn rejects_csv(ws: &Workspace) -> Vec<csv::StringRecord> {
    let Some(path) = files_under(&ws.out().join("rejects"))
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with("-iccids.csv"))
    else {
        return Vec::new();
    };
    let mut reader = csv::Reader::from_path(path).expect("rejects csv");
    assert_eq!(
        reader.headers().expect("header"),
        vec!["file", "line", "raw_value", "reason"]
    );
    reader.records().map(|r| r.expect("record")).collect()
}

#[test]
fn header_bom_crlf_quotes_blank_lines_and_extra_columns() {
    let ws = Workspace::new();
    let text = format!(
        "\u{feff}name,ICCID,note\r\n\"a\",\"{}\",x\r\n\r\nb,{} ,y\r\nc,{},\"quoted, comma\"\r\nd,{},dup\r\n",
        iccid(1),
        iccid(2),
        iccid(3),
        iccid(1)
    );
    std::fs::write(ws.path("list.csv"), text).expect("write");
    let run = ws.run(&["validate", "list.csv"]);
    run.expect_code(0);
    let s = &run.report()["iccids"];
    assert_eq!(
        (
            s["rows"].as_u64(),
            s["accepted"].as_u64(),
            s["duplicates"].as_u64()
        ),
        (Some(4), Some(3), Some(1))
    );
    assert!(rejects_csv(&ws).is_empty());
    assert!(
        run.stdout()
            .contains("4 rows  3 ICCIDs  1 duplicate  0 rejected"),
        "{}",
        run.stdout()
    );
}

#[test]
fn headerless_single_column_with_19_digit_iccids() {
    let ws = Workspace::new();
    // 19 digits, valid Luhn: 891480000000000012 + check digit.
    let nineteen = "8914800000000000121";
    std::fs::write(ws.path("plain.csv"), format!("{}\n{nineteen}\n", iccid(5))).expect("write");
    let run = ws.run(&["validate", "plain.csv"]);
    run.expect_code(0);
    assert_eq!(run.report()["iccids"]["accepted"], 2);
    assert_eq!(run.report()["iccids"]["luhn_warnings"], 0);
}

#[test]
fn bad_rows_are_rejected_with_file_line_and_reason() {
    let ws = Workspace::new();
    let text = format!(
        "iccid\n{}\n8.91480E+19\n891480000000000001\n8914-8000-0000-0000-01\n79148000000000000012\n{}\n",
        iccid(1),
        iccid(2)
    );
    std::fs::write(ws.path("bad.csv"), text).expect("write");
    let run = ws.run(&["validate", "bad.csv"]);
    run.expect_code(3);
    let rejects = rejects_csv(&ws);
    let got: Vec<(String, String)> = rejects
        .iter()
        .map(|r| (r[1].to_owned(), r[2].to_owned()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("3".into(), "8.91480E+19".into()),
            ("4".into(), "891480000000000001".into()),
            ("5".into(), "8914-8000-0000-0000-01".into()),
            ("6".into(), "79148000000000000012".into()),
        ]
    );
    assert!(rejects[0][0].ends_with("bad.csv"));
    assert!(
        rejects[0][3].contains("spreadsheet")
            && rejects[0][3].contains("export the column as text"),
        "{}",
        &rejects[0][3]
    );
    assert!(rejects[1][3].contains("has 18 digits"));
    assert!(rejects[2][3].contains("'-' at position 5"));
    assert!(rejects[3][3].contains("does not start with 89"));
    assert_eq!(run.report()["iccids"]["accepted"], 2);
    assert_eq!(
        run.report()["iccids"]["rejected_by_reason"]["iccid_length"],
        1
    );
    assert!(
        run.stdout().lines().any(|l| l.starts_with("rejects: ")),
        "{}",
        run.stdout()
    );
}

#[test]
fn bad_luhn_warns_by_default_and_rejects_when_strict() {
    let ws = Workspace::new();
    // The vendor's own example ICCID fails the Luhn check.
    std::fs::write(
        ws.path("luhn.csv"),
        format!("iccid\n89148000000800139708\n{}\n", iccid(1)),
    )
    .expect("write");
    let lenient = ws.run(&["validate", "luhn.csv"]);
    lenient.expect_code(0);
    assert_eq!(lenient.report()["iccids"]["luhn_warnings"], 1);
    assert_eq!(lenient.report()["iccids"]["accepted"], 2);
    assert!(
        lenient.stderr().contains("fails the Luhn check"),
        "{}",
        lenient.stderr()
    );

    let strict = ws.run_env(
        &["validate", "luhn.csv"],
        &[("TSUSAGE_INPUT__STRICT_LUHN", "true")],
    );
    strict.expect_code(3);
    assert_eq!(strict.report()["iccids"]["accepted"], 1);
    let rejects = rejects_csv(&ws);
    assert!(
        rejects
            .iter()
            .any(|r| &r[2] == "89148000000800139708" && r[3].contains("Luhn"))
    );
}

#[test]
fn semicolon_files_and_multiple_inputs_are_merged() {
    let ws = Workspace::new();
    std::fs::write(
        ws.path("a.csv"),
        format!("Name;Iccid\nx;{}\ny;{}\n", iccid(1), iccid(2)),
    )
    .expect("write");
    std::fs::write(ws.path("b.csv"), format!("{}\n{}\n", iccid(2), iccid(3))).expect("write");
    let run = ws.run(&["validate", "a.csv", "b.csv"]);
    run.expect_code(0);
    let s = &run.report()["iccids"];
    assert_eq!(
        (
            s["files"].as_u64(),
            s["accepted"].as_u64(),
            s["duplicates"].as_u64()
        ),
        (Some(2), Some(3), Some(1))
    );
}

#[test]
fn a_file_without_an_iccid_column_is_reported_not_guessed() {
    let ws = Workspace::new();
    std::fs::write(ws.path("cols.csv"), "name,sim\nx,y\n").expect("write");
    let run = ws.run(&["validate", "cols.csv"]);
    run.expect_code(3);
    let rejects = rejects_csv(&ws);
    assert_eq!(rejects.len(), 1);
    assert!(
        rejects[0][3].contains("no column named iccid"),
        "{}",
        &rejects[0][3]
    );
}

#[test]
fn a_missing_input_file_is_a_usage_error() {
    let ws = Workspace::new();
    let run = ws.run(&["validate", "nope.csv"]);
    run.expect_code(2);
    assert!(run.stderr().contains("nope.csv"), "{}", run.stderr());
}
