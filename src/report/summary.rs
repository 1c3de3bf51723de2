//! The summary block printed at the end of a command (and by `tsusage report`): status first, one
//! line per stage with its key counts, then the paths, the run report's own path last.
//!
//! It reads the report as JSON ([`serde_json::Value`]), the form it is stored in, so that a report
//! written by an older version, with fields missing, prints the same way (a missing count is 0).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Stage labels are padded to this width, so that the counts line up.
const LABEL_WIDTH: usize = 11;
/// Path labels (`rejects:`, `completeness:`, `html:`) are padded to this width.
const PATH_LABEL_WIDTH: usize = 14;
/// Lines are cut to this many characters (a terminal's width), except the path lines.
pub const MAX_WIDTH: usize = 80;

/// The summary block of `report` (the run report as JSON) saved at `report_path`: the lines to print,
/// `report_path` the last one.
pub fn block(report: &Value, report_path: &Path) -> Vec<String> {
    let mut lines = vec![status_line(report)];
    let mut stage = |label: &str, text: String| {
        lines.push(cut(format!("  {label:<LABEL_WIDTH$}{text}")));
    };
    let command = text(report, &["command"]);
    let s = &report["iccids"];
    if s.is_object() {
        let mut parts = vec![
            count(n(s, &["rows"]), "row"),
            format!("{} ICCIDs", n(s, &["accepted"])),
        ];
        push_nonzero(&mut parts, n(s, &["duplicates"]), "duplicate");
        parts.push(format!("{} rejected", n(s, &["rejected"])));
        if n(s, &["files_rejected"]) > 0 {
            parts.push(format!("{} files rejected", n(s, &["files_rejected"])));
        }
        push_nonzero(&mut parts, n(s, &["luhn_warnings"]), "Luhn warning");
        stage("iccids", parts.join("  "));
    }
    let p = &report["plan"];
    if p.is_object() {
        let skipped =
            n(p, &["already_submitted"]) + n(p, &["already_complete"]) + n(p, &["already_failed"]);
        let mut parts = vec![
            format!("{}..{}", text(p, &["from"]), text(p, &["to"])),
            count(n(p, &["windows"]), "window"),
            count(n(p, &["jobs"]), "job"),
            format!("{} skipped", skipped),
        ];
        for (key, what) in [
            ("requested_again", "asked again"),
            ("unknown_outcome", "resent"),
        ] {
            if n(p, &[key]) > 0 {
                parts.push(format!("{} {what}", n(p, &[key])));
            }
        }
        stage("plan", parts.join("  "));
    }
    let s = &report["submit"];
    if s.is_object() {
        let parts = [
            format!("{}/{} accepted", n(s, &["submitted"]), n(s, &["jobs"])),
            format!("{} refused", n(s, &["failed"])),
            format!("{} left", n(s, &["not_submitted"])),
            format!("{} sent", n(s, &["attempts"])),
            count(n(s, &["retries"]), "retry"),
            format!("{:.1} req/s", f(s, &["achieved_rate_per_sec"])),
        ];
        stage("submit", parts.join("  "));
        if let Some(why) = s["stopped"].as_str() {
            stage("stopped", why.to_owned());
        }
    }
    let c = &report["collect"];
    if c.is_object() {
        let mut parts = vec![
            format!("{}/{} jobs complete", n(c, &["complete"]), n(c, &["jobs"])),
            count(n(c, &["callbacks"]), "callback"),
            format!("{} re-requested", n(c, &["resubmitted"])),
        ];
        push_nonzero(
            &mut parts,
            n(report, &["callbacks", "rejected"]),
            "bad body",
        );
        stage("collect", parts.join("  "));
        let states = &c["completeness"];
        let mut parts = vec![
            format!("{} usage", n(states, &["usage"])),
            format!("{} no usage", n(states, &["no_usage"])),
        ];
        for (key, name) in [
            ("rejected", "rejected"),
            ("failed_request", "failed"),
            ("missing", "missing"),
            ("rejected_input", "rejected input"),
        ] {
            let value = n(states, &[key]);
            if value > 0 {
                parts.push(format!("{value} {name}"));
            }
        }
        stage("ICCID-days", parts.join("  "));
    }
    let l = &report["listener"];
    if l.is_object() && command != "run" {
        let parts = [
            format!("{} acknowledged", n(l, &["acknowledged"])),
            format!("{} unauthorized", n(l, &["unauthorized"])),
            format!("{} malformed", n(l, &["malformed"])),
            format!("{} journal failures", n(l, &["journal_failures"])),
        ];
        stage("listener", parts.join("  "));
    }
    let d = &report["drop_dir"];
    if d.is_object() && command != "run" {
        let parts = [
            format!("{} read", n(d, &["files"])),
            format!("{} processed", n(d, &["processed"])),
            format!("{} rejected", n(d, &["rejected"])),
            format!("{} skipped", n(d, &["skipped"]) + n(d, &["too_large"])),
        ];
        stage("files", parts.join("  "));
    }
    let r = &report["restored"];
    if r.is_object() {
        let parts = [
            format!("{} archive files", n(r, &["files"])),
            count(n(r, &["callbacks"]), "callback"),
            format!("{} new", n(r, &["journaled"])),
        ];
        stage("restored", parts.join("  "));
    }
    let cb = &report["callbacks"];
    if cb.is_object() && command != "run" {
        let mut parts = vec![
            format!("{} received", n(cb, &["received"])),
            format!("{} new", n(cb, &["journaled"])),
            format!("{} rejected", n(cb, &["rejected"])),
        ];
        let rec = &report["records"];
        if rec.is_object() {
            parts.push(format!(
                "records {} ok, {} rejected",
                n(rec, &["accepted"]),
                n(rec, &["rejected"])
            ));
        }
        stage("callbacks", parts.join("  "));
    }
    let o = &report["output"];
    if o.is_object() {
        let partitions = o["partitions"].as_array().map_or(0, Vec::len) as u64;
        let mut text = [
            count(n(o, &["rows_written"]), "row"),
            count(partitions, "partition"),
            count(n(o, &["files_written"]), "file"),
        ]
        .join("  ");
        if partitions > 0 {
            match o["location"].as_str() {
                Some(url) => text.push_str(&format!("  in {url}")),
                None => text.push_str(&format!("  in {}/", usage_dir(report_path).display())),
            }
        }
        stage("output", text);
    }
    let pr = &report["prune"];
    if pr.is_object() {
        stage(
            "prune",
            format!(
                "{} archived (received before {})  store {:.1} → {:.1} MB",
                count(n(pr, &["callbacks_archived"]), "callback"),
                text(pr, &["horizon"]).get(..10).unwrap_or_default(),
                n(pr, &["store_bytes_before"]) as f64 / 1e6,
                n(pr, &["store_bytes_after"]) as f64 / 1e6
            ),
        );
    }
    let mut path_line = |label: &str, path: &str| {
        lines.push(format!("{:<PATH_LABEL_WIDTH$}{path}", format!("{label}:")));
    };
    for path in report["rejects_files"].as_array().into_iter().flatten() {
        if let Some(path) = path.as_str() {
            path_line("rejects", path);
        }
    }
    if let Some(path) = c["completeness_file"].as_str() {
        path_line("completeness", path);
    }
    let html = html_path(report_path);
    if html.exists() {
        path_line("html", &html.display().to_string());
    }
    lines.push(report_path.display().to_string());
    lines
}

/// The page beside a report: `runs/<run_id>.html` for `runs/<run_id>.json`.
pub fn html_path(report_path: &Path) -> PathBuf {
    report_path.with_extension("html")
}

/// `out/usage` for `out/runs/<run_id>.json`.
fn usage_dir(report_path: &Path) -> PathBuf {
    report_path
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("usage"), |out| out.join("usage"))
}

fn status_line(report: &Value) -> String {
    let mut line = format!(
        "{} {} (exit {})   run {}",
        text(report, &["command"]),
        text(report, &["status"]),
        n(report, &["exit_code"]),
        text(report, &["run_id"]),
    );
    let started = chrono::DateTime::parse_from_rfc3339(&text(report, &["started_at"]));
    let finished = chrono::DateTime::parse_from_rfc3339(&text(report, &["finished_at"]));
    if let (Ok(started), Ok(finished)) = (started, finished) {
        let ms = (finished - started).num_milliseconds().max(0);
        line.push_str(&format!("   {:.1} s", ms as f64 / 1000.0));
    }
    cut(line)
}

/// The number at `path` under `value` (0 when absent: an older report, or a stage that did not run).
pub(crate) fn n(value: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(value, |v, key| &v[*key])
        .as_u64()
        .unwrap_or(0)
}

pub(crate) fn f(value: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(value, |v, key| &v[*key])
        .as_f64()
        .unwrap_or(0.0)
}

pub(crate) fn text(value: &Value, path: &[&str]) -> String {
    path.iter()
        .fold(value, |v, key| &v[*key])
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `1 file`, `3 files`, `1 retry`, `2 retries`.
fn count(value: u64, noun: &str) -> String {
    if value == 1 {
        format!("1 {noun}")
    } else if let Some(stem) = noun.strip_suffix('y') {
        format!("{value} {stem}ies")
    } else {
        format!("{value} {noun}s")
    }
}

fn push_nonzero(parts: &mut Vec<String>, value: u64, noun: &str) {
    if value > 0 {
        parts.push(count(value, noun));
    }
}

/// Cuts a line to [`MAX_WIDTH`] characters, ending it with `…` when cut.
fn cut(line: String) -> String {
    if line.chars().count() <= MAX_WIDTH {
        return line;
    }
    let mut out: String = line.chars().take(MAX_WIDTH - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_run() -> Value {
        serde_json::json!({
            "run_id": "20260512T101112Z-1a2b3",
            "command": "run",
            "started_at": "2026-05-12T10:11:12.000Z",
            "finished_at": "2026-05-12T10:11:15.250Z",
            "status": "partial",
            "exit_code": 3,
            "iccids": {"files": 1, "rows": 1004, "accepted": 1000, "duplicates": 1, "rejected": 3,
                       "files_rejected": 0, "luhn_warnings": 12},
            "plan": {"from": "2021-08-15", "to": "2021-08-17", "windows": 3, "jobs": 15,
                     "already_submitted": 0, "already_complete": 0, "already_failed": 0},
            "submit": {"jobs": 15, "submitted": 15, "failed": 0, "not_submitted": 0,
                       "attempts": 15, "retries": 0, "achieved_rate_per_sec": 19.86},
            "collect": {"jobs": 15, "complete": 15, "resubmitted": 0, "callbacks": 2868,
                        "completeness": {"usage": 2853, "no_usage": 147, "rejected_input": 3},
                        "completeness_file": "out/runs/20260512T101112Z-1a2b3-completeness.csv"},
            "listener": {"acknowledged": 2868},
            "callbacks": {"received": 2868, "journaled": 2868, "rejected": 0},
            "records": {"records": 2853, "accepted": 2853, "rejected": 0},
            "output": {"rows_written": 2853, "files_written": 3,
                       "partitions": [{"partition": "usage_date=2021-08-15"},
                                      {"partition": "usage_date=2021-08-16"},
                                      {"partition": "usage_date=2021-08-17"}]},
            "rejects_files": ["out/rejects/20260512T101112Z-1a2b3-iccids.csv",
                              "out/rejects/20260512T101112Z-1a2b3-callbacks.jsonl"],
        })
    }

    #[test]
    fn a_run_summary_fits_in_12_lines_of_80_columns_with_the_report_last() {
        let path = Path::new("out/runs/20260512T101112Z-1a2b3.json");
        let lines = block(&sample_run(), path);
        assert!(lines.len() <= 12, "{}", lines.join("\n"));
        for line in &lines {
            assert!(line.chars().count() <= MAX_WIDTH, "too wide: {line}");
        }
        assert_eq!(
            lines[0],
            "run partial (exit 3)   run 20260512T101112Z-1a2b3   3.2 s"
        );
        assert_eq!(
            lines[1],
            "  iccids     1004 rows  1000 ICCIDs  1 duplicate  3 rejected  12 Luhn warnings"
        );
        assert_eq!(
            lines[3],
            "  submit     15/15 accepted  0 refused  0 left  15 sent  0 retries  19.9 req/s"
        );
        assert_eq!(
            lines[5],
            "  ICCID-days 2853 usage  147 no usage  3 rejected input"
        );
        assert_eq!(
            lines[6],
            "  output     2853 rows  3 partitions  3 files  in out/usage/"
        );
        assert_eq!(
            lines[7],
            "rejects:      out/rejects/20260512T101112Z-1a2b3-iccids.csv"
        );
        assert_eq!(lines.last().map(String::as_str), path.to_str());
    }

    #[test]
    fn a_report_without_a_stage_prints_no_line_for_it() {
        let report = serde_json::json!({
            "run_id": "r", "command": "validate", "status": "complete", "exit_code": 0,
            "iccids": {"rows": 4, "accepted": 3, "duplicates": 1, "rejected": 0},
            "rejects_files": [],
        });
        let lines = block(&report, Path::new("out/runs/r.json"));
        assert_eq!(
            lines,
            [
                "validate complete (exit 0)   run r",
                "  iccids     4 rows  3 ICCIDs  1 duplicate  0 rejected",
                "out/runs/r.json",
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_to_the_terminal_width() {
        let line = cut("x".repeat(100));
        assert_eq!(line.chars().count(), MAX_WIDTH);
        assert!(line.ends_with('…'));
    }
}
