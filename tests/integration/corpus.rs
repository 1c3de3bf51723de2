//! The bad-input corpus (`data/bad/cases.toml`): every case with the outcome a user relies on, run
//! through the real binary (CSV lists, drop-directory files) or a real listener (HTTP). All failing
//! cases are reported together.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::util::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    kind: String,
    file: Option<String>,
    generate: Option<String>,
    exit: Option<i32>,
    accepted: Option<u64>,
    #[serde(default)]
    reasons: Vec<String>,
    #[serde(default)]
    rows: usize,
    #[serde(default)]
    codes: Vec<String>,
    #[serde(default)]
    skipped: u64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    status: Option<u16>,
    content_type: Option<String>,
    path: Option<String>,
    method: Option<String>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/bad")
}

fn load() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus_dir().join("cases.toml")).expect("cases.toml");
    toml::from_str::<Corpus>(&text)
        .expect("cases.toml parses")
        .case
}

/// Puts the case's input at `target` (copied, or generated).
fn materialize(case: &Case, ws: &Workspace, target: &Path) {
    if let Some(file) = &case.file {
        std::fs::copy(corpus_dir().join(file), target).expect("copy case file");
        return;
    }
    match case.generate.as_deref() {
        Some("csv_long_line") => {
            let mut f = std::fs::File::create(target).expect("create");
            writeln!(f, "iccid\n{}", iccid(1)).expect("write");
            f.write_all(&vec![b'8'; 100 * 1024 * 1024])
                .expect("100 MB line");
        }
        Some("callback_100k") => {
            let records: Vec<String> = (0..100_000u32)
                .map(|i| {
                    let body = format!("8914800000{i:09}");
                    record(&format!("{body}0"), 0, r#""5""#)
                })
                .collect();
            std::fs::write(target, usage_callback("req-100k", 1, &records)).expect("write");
        }
        Some("symlink_outside") => {
            let outside = ws.path("outside.json");
            std::fs::write(
                &outside,
                usage_callback("req-x", 1, &[record(&iccid(5), 0, r#""1""#)]),
            )
            .expect("write");
            std::os::unix::fs::symlink(&outside, target).expect("symlink");
        }
        Some("fifo") => {
            let status = Command::new("mkfifo").arg(target).status().expect("mkfifo");
            assert!(status.success());
        }
        Some("partial_upload") => {
            let partial = target.with_extension("json.part");
            std::fs::write(
                partial,
                usage_callback("req-p", 1, &[record(&iccid(6), 0, r#""1""#)]),
            )
            .expect("write");
        }
        other => panic!("case {:?}: unknown generator {other:?}", case.name),
    }
}

fn check_csv(case: &Case) -> Result<(), String> {
    let ws = Workspace::new();
    let target = ws.path("list.csv");
    materialize(case, &ws, &target);
    let env: Vec<(&str, &str)> = case
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let run = ws.run_env(&["validate", "list.csv"], &env);
    if Some(run.code()) != case.exit {
        return Err(format!(
            "exit {} (expected {:?}); stderr: {}",
            run.code(),
            case.exit,
            run.stderr()
        ));
    }
    let report = run.report();
    if let Some(accepted) = case.accepted
        && report["iccids"]["accepted"] != accepted
    {
        return Err(format!(
            "accepted {} (expected {accepted})",
            report["iccids"]["accepted"]
        ));
    }
    let reasons: Vec<String> = files_under(&ws.out().join("rejects"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("-iccids.csv"))
        .flat_map(|p| {
            let mut reader = csv::Reader::from_path(p).expect("rejects");
            reader
                .records()
                .map(|r| r.expect("row")[3].to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    if reasons.len() != case.reasons.len()
        || !reasons
            .iter()
            .zip(&case.reasons)
            .all(|(got, want)| got.contains(want.as_str()))
    {
        return Err(format!(
            "reject reasons {reasons:?}, expected rows containing {:?}",
            case.reasons
        ));
    }
    Ok(())
}

fn check_drop(case: &Case) -> Result<(), String> {
    let ws = Workspace::new();
    ws.drop_file(
        "good.json",
        &usage_callback("req-good", 1, &[record(&iccid(900), 0, r#""9""#)]),
    );
    let name = case
        .file
        .as_deref()
        .and_then(|f| Path::new(f).file_name())
        .map_or_else(
            || "case.json".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
    materialize(case, &ws, &ws.inbox().join(name));
    let env: Vec<(&str, &str)> = case
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let inbox = ws.inbox();
    let run = ws.run_env(&["ingest", inbox.to_str().expect("path")], &env);
    if Some(run.code()) != case.exit {
        return Err(format!(
            "exit {} (expected {:?}); stderr: {}",
            run.code(),
            case.exit,
            run.stderr()
        ));
    }
    let rows = ws.rows();
    if !rows
        .iter()
        .any(|r| r.iccid == iccid(900) && r.data_usage_bytes == 9)
    {
        return Err("the good callback next to the case did not land".into());
    }
    if rows.len() != case.rows + 1 {
        return Err(format!(
            "{} rows besides the good one (expected {})",
            rows.len() - 1,
            case.rows
        ));
    }
    let mut codes: Vec<String> = ws
        .callback_rejects()
        .iter()
        .map(|r| r["code"].as_str().unwrap_or_default().to_owned())
        .collect();
    codes.sort();
    let mut expected = case.codes.clone();
    expected.sort();
    if codes != expected {
        return Err(format!("reject codes {codes:?}, expected {expected:?}"));
    }
    let skipped = run.report()["drop_dir"]["skipped"]
        .as_u64()
        .unwrap_or_default();
    if skipped != case.skipped {
        return Err(format!(
            "{skipped} files skipped (expected {})",
            case.skipped
        ));
    }
    Ok(())
}

fn http(port: u16, case: &Case) -> u16 {
    let body =
        std::fs::read(corpus_dir().join(case.file.as_deref().unwrap_or_default())).expect("body");
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let head = format!(
        "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        case.method.as_deref().unwrap_or("POST"),
        case.path.as_deref().unwrap_or("/callbacks"),
        case.content_type.as_deref().unwrap_or("application/json"),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn every_case_of_the_bad_input_corpus_gets_its_expected_outcome() {
    let cases = load();
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let ws = Workspace::new();
    let port = free_port();
    let listener = spawn_listen(
        &ws,
        port,
        &[
            ("TSUSAGE_CALLBACKS__PASSWORD", "cb-secret"),
            ("TSUSAGE_CALLBACKS__MAX_BODY_BYTES", "4096"),
        ],
    );
    let mut failures = Vec::new();
    for case in &cases {
        let outcome = match case.kind.as_str() {
            "csv" => check_csv(case),
            "drop" => check_drop(case),
            "http" => {
                let status = http(port, case);
                if Some(status) == case.status {
                    Ok(())
                } else {
                    Err(format!("HTTP {status} (expected {:?})", case.status))
                }
            }
            other => Err(format!("unknown kind {other}")),
        };
        if let Err(why) = outcome {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status();
    let _ = listener.wait_with_output();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
