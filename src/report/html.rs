//! The run report as a self-contained HTML page (`runs/<run_id>.html`, beside the JSON): the status,
//! completeness per day, rejects by reason, the request rate over time, the partitions written.
//!
//! No external assets (CSS inline, charts as inline SVG): it opens offline, from a mail attachment or
//! an artifact store. Like the summary block it reads the report as JSON, so a stored report renders
//! the same way.

use std::fmt::Write as _;

use serde_json::Value;

use super::summary::{f, n, text};

/// The states of a planned (ICCID, window) pair, in chart order: key in the report, label, colour.
const STATES: &[(&str, &str, &str)] = &[
    ("usage", "usage", "#2e7d32"),
    ("no_usage", "no usage", "#9ccc65"),
    ("rejected", "rejected", "#f9a825"),
    ("failed_request", "failed", "#c62828"),
    ("missing", "missing", "#6a1b9a"),
];
/// Width of the charts' drawing area, in SVG units (pixels at 100 %).
const CHART_WIDTH: f64 = 640.0;
/// The rate chart draws at most this many bars; longer runs are grouped into wider buckets.
const MAX_RATE_BARS: usize = 120;

const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:60em;padding:1em 1.5em;color:#222}
header{border-radius:6px;padding:.6em 1em;margin-bottom:1em;color:#fff}
header.complete{background:#2e7d32}header.partial{background:#ef6c00}header.failed{background:#c62828}
header h1{margin:0;font-size:1.5em}header p{margin:.2em 0 0}
h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.2em .7em;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}tr.total td{font-weight:600;border-top:1px solid #999}
.legend span{display:inline-block;margin-right:1em}.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
#rejects-table td,#rejects-table th{text-align:left}#rejects-table td:last-child,#rejects-table th:last-child{text-align:right}
.note{color:#666}code{font-size:.92em}svg{display:block;max-width:100%;height:auto}
";

/// The page for `report` (the run report as JSON).
pub fn render(report: &Value) -> String {
    let status = text(report, &["status"]);
    let run_id = text(report, &["run_id"]);
    let mut page = String::with_capacity(16 * 1024);
    let _ = writeln!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>tsusage {} {}: {}</title><style>{STYLE}</style></head><body>",
        esc(&text(report, &["command"])),
        esc(&run_id),
        esc(&status)
    );
    header(&mut page, report);
    completeness(&mut page, report);
    rejects(&mut page, report);
    rate(&mut page, report);
    partitions(&mut page, report);
    files(&mut page, report);
    let _ = writeln!(
        page,
        "<footer class=\"note\"><p>tsusage {} · run report <code>{}.json</code> · \
         exit codes: 0 complete, 1 failed, 2 usage error, 3 partial</p></footer>\n</body></html>",
        esc(&text(report, &["tool_version"])),
        esc(&run_id)
    );
    page
}

fn header(page: &mut String, report: &Value) {
    let status = text(report, &["status"]);
    let class = match status.as_str() {
        "complete" | "partial" | "failed" => status.as_str(),
        _ => "failed",
    };
    let mut facts = vec![
        format!("exit code {}", n(report, &["exit_code"])),
        format!("<code>tsusage {}</code>", esc(&text(report, &["command"]))),
    ];
    if report["plan"].is_object() {
        facts.push(format!(
            "{} to {}",
            esc(&text(report, &["plan", "from"])),
            esc(&text(report, &["plan", "to"]))
        ));
    }
    facts.push(format!(
        "started {}, finished {}",
        esc(&text(report, &["started_at"])),
        esc(&text(report, &["finished_at"]))
    ));
    let _ = writeln!(
        page,
        "<header class=\"{class}\"><h1 id=\"status\">{} {}</h1><p>run <code>{}</code> · {}</p></header>",
        esc(&text(report, &["command"])),
        esc(&status),
        esc(&text(report, &["run_id"])),
        facts.join(" · ")
    );
}

/// Completeness per window: a stacked bar per day and the same numbers as a table.
fn completeness(page: &mut String, report: &Value) {
    page.push_str("<section id=\"completeness\"><h2>Completeness by day</h2>\n");
    let collect = &report["collect"];
    let Some(windows) = collect["by_window"].as_object().filter(|w| !w.is_empty()) else {
        page.push_str(
            "<p class=\"note\">This command plans no ICCID-days (only <code>tsusage run</code> \
             does), so there is no completeness to show; the partitions written are below.</p>\
             </section>\n",
        );
        return;
    };
    let totals: Vec<u64> = windows
        .values()
        .map(|w| STATES.iter().map(|(k, _, _)| n(w, &[k])).sum())
        .collect();
    let complete_days = windows
        .values()
        .filter(|w| STATES.iter().skip(2).all(|(k, _, _)| n(w, &[k]) == 0))
        .count();
    let _ = writeln!(
        page,
        "<p id=\"days\"><strong><span id=\"days-complete\">{complete_days}</span> of \
         <span id=\"days-total\">{}</span> days complete</strong> (every planned ICCID has usage \
         or is reported without usage).</p>",
        windows.len()
    );
    let max = totals.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (label_w, row_h) = (90.0, 22.0);
    let height = row_h * windows.len() as f64 + 4.0;
    let _ = write!(
        page,
        "<svg viewBox=\"0 0 {} {height}\" width=\"{}\" role=\"img\" aria-label=\"completeness per day\">",
        CHART_WIDTH + label_w,
        CHART_WIDTH + label_w
    );
    for (row, (day, w)) in windows.iter().enumerate() {
        let y = row as f64 * row_h + 2.0;
        let _ = write!(
            page,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 14.0,
            esc(day)
        );
        let mut x = label_w;
        for (key, label, colour) in STATES {
            let count = n(w, &[key]);
            if count == 0 {
                continue;
            }
            let width = count as f64 / max * CHART_WIDTH;
            let _ = write!(
                page,
                "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{width:.1}\" height=\"{}\" fill=\"{colour}\">\
                 <title>{} {label}: {count}</title></rect>",
                row_h - 4.0,
                esc(day)
            );
            x += width;
        }
    }
    page.push_str("</svg>\n<p class=\"legend\">");
    for (_, label, colour) in STATES {
        let _ = write!(
            page,
            "<span><i style=\"background:{colour}\"></i>{label}</span>"
        );
    }
    page.push_str("</p>\n<table id=\"completeness-table\"><tr><th>day</th>");
    for (_, label, _) in STATES {
        let _ = write!(page, "<th>{label}</th>");
    }
    page.push_str("<th>planned</th></tr>\n");
    for ((day, w), total) in windows.iter().zip(&totals) {
        let _ = write!(page, "<tr id=\"day-{}\"><td>{}</td>", esc(day), esc(day));
        for (key, _, _) in STATES {
            let _ = write!(page, "<td data-state=\"{key}\">{}</td>", n(w, &[key]));
        }
        let _ = writeln!(page, "<td>{total}</td></tr>");
    }
    page.push_str("<tr class=\"total\" id=\"completeness-total\"><td>all days</td>");
    let states = &collect["completeness"];
    for (key, _, _) in STATES {
        let _ = write!(page, "<td data-state=\"{key}\">{}</td>", n(states, &[key]));
    }
    let _ = writeln!(page, "<td>{}</td></tr></table>", totals.iter().sum::<u64>());
    let input = n(states, &["rejected_input"]);
    if input > 0 {
        let _ = writeln!(
            page,
            "<p id=\"rejected-input\"><strong>{input}</strong> rows of the ICCID lists were \
             rejected: they belong to no day (the ICCID is unreadable), so they are not in the \
             chart. See the ICCID rejects file.</p>"
        );
    }
    if let Some(path) = collect["completeness_file"].as_str() {
        let _ = writeln!(
            page,
            "<p class=\"note\">Every pair that is not usage, with its reason, job and requestIds: \
             <code>{}</code>.</p>",
            esc(path)
        );
    }
    page.push_str("</section>\n");
}

/// Rejects by stage and reason code.
fn rejects(page: &mut String, report: &Value) {
    let mut rows: Vec<(String, String, u64)> = Vec::new();
    let mut by_reason = |stage: &str, value: &Value| {
        for (reason, count) in value.as_object().into_iter().flatten() {
            rows.push((
                stage.to_owned(),
                reason.clone(),
                count.as_u64().unwrap_or(0),
            ));
        }
    };
    by_reason("ICCID list", &report["iccids"]["rejected_by_reason"]);
    by_reason("usage record", &report["records"]["rejected_by_reason"]);
    let whole = n(report, &["callbacks", "rejected"]);
    if whole > 0 {
        rows.push(("callback body".into(), "not a callback".into(), whole));
    }
    let fault = n(report, &["callbacks", "fault"]);
    if fault > 0 {
        rows.push(("callback".into(), "fault callback".into(), fault));
    }
    let mut refused: std::collections::BTreeMap<String, u64> = Default::default();
    for failure in report["submit"]["failures"]
        .as_array()
        .into_iter()
        .flatten()
    {
        *refused.entry(text(failure, &["error_code"])).or_default() += 1;
    }
    for (code, count) in refused {
        rows.push(("request (refused)".into(), code, count));
    }
    let left = n(report, &["submit", "not_submitted"]);
    if left > 0 {
        rows.push(("request".into(), "not sent in this run".into(), left));
    }
    page.push_str("<section id=\"rejects\"><h2>Rejects by reason</h2>\n");
    if rows.is_empty() {
        page.push_str("<p id=\"no-rejects\">Nothing was rejected.</p></section>\n");
        return;
    }
    page.push_str(
        "<table id=\"rejects-table\"><tr><th>what</th><th>reason</th><th>count</th></tr>\n",
    );
    for (stage, reason, count) in &rows {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td><code>{}</code></td><td>{count}</td></tr>",
            esc(stage),
            esc(reason)
        );
    }
    page.push_str("</table>\n<p class=\"note\">The rejects files below list each one with its source.</p></section>\n");
}

/// Requests sent per second (from `submit.sent_per_second`), grouped into wider buckets for long runs.
fn rate(page: &mut String, report: &Value) {
    let submit = &report["submit"];
    if !submit.is_object() {
        return;
    }
    page.push_str("<section id=\"rate\"><h2>Requests over time</h2>\n");
    let _ = writeln!(
        page,
        "<p>{} requests ({} retries, {} throttled, {} server errors) in {:.1} s: \
         <strong id=\"achieved-rate\">{:.1}</strong> requests/s achieved, at most {} in flight.</p>",
        n(submit, &["attempts"]),
        n(submit, &["retries"]),
        n(submit, &["throttled"]),
        n(submit, &["server_errors"]),
        f(submit, &["elapsed_secs"]),
        f(submit, &["achieved_rate_per_sec"]),
        n(submit, &["max_in_flight"]),
    );
    let mut seconds: std::collections::BTreeMap<i64, u64> = Default::default();
    for pair in submit["sent_per_second"].as_array().into_iter().flatten() {
        if let (Some(second), Some(count)) = (pair[0].as_i64(), pair[1].as_u64()) {
            *seconds.entry(second).or_default() += count;
        }
    }
    let (Some(first), Some(last)) = (
        seconds.keys().next().copied(),
        seconds.keys().next_back().copied(),
    ) else {
        page.push_str("<p class=\"note\">No request was sent.</p></section>\n");
        return;
    };
    let span = (last - first + 1) as usize;
    let bucket = span.div_ceil(MAX_RATE_BARS).max(1);
    let mut bars = vec![0u64; span.div_ceil(bucket)];
    for (second, count) in &seconds {
        if let Some(bar) = bars.get_mut((second - first) as usize / bucket) {
            *bar += count;
        }
    }
    let peak = bars.iter().copied().max().unwrap_or(0).max(1);
    let (height, left, bottom) = (140.0, 44.0, 20.0);
    let bar_w = CHART_WIDTH / bars.len() as f64;
    let per = if bucket == 1 {
        "second".to_owned()
    } else {
        format!("{bucket} s")
    };
    let _ = write!(
        page,
        "<svg viewBox=\"0 0 {} {}\" width=\"{}\" role=\"img\" aria-label=\"requests per {per}\">\
         <text x=\"0\" y=\"12\" font-size=\"11\">{peak}</text><text x=\"0\" y=\"{height}\" font-size=\"11\">0</text>\
         <line x1=\"{left}\" y1=\"{height}\" x2=\"{}\" y2=\"{height}\" stroke=\"#999\"/>",
        CHART_WIDTH + left,
        height + bottom,
        CHART_WIDTH + left,
        CHART_WIDTH + left
    );
    for (i, count) in bars.iter().enumerate() {
        let h = *count as f64 / peak as f64 * (height - 4.0);
        let _ = write!(
            page,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#1565c0\">\
             <title>{}–{} s: {count}</title></rect>",
            left + i as f64 * bar_w,
            height - h,
            (bar_w - 1.0).max(0.5),
            i * bucket,
            (i + 1) * bucket
        );
    }
    let _ = writeln!(
        page,
        "<text x=\"{left}\" y=\"{}\" font-size=\"11\">0 s</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{span} s</text></svg>\n\
         <p class=\"note\">Requests sent per {per}, from the first request (wall clock, \
         including retries).</p></section>",
        height + 15.0,
        CHART_WIDTH + left,
        height + 15.0
    );
}

fn partitions(page: &mut String, report: &Value) {
    let output = &report["output"];
    let Some(parts) = output["partitions"].as_array() else {
        return;
    };
    page.push_str("<section id=\"partitions\"><h2>Partitions written</h2>\n");
    if parts.is_empty() {
        page.push_str("<p>None: nothing new to write.</p></section>\n");
        return;
    }
    page.push_str(
        "<table id=\"partitions-table\"><tr><th>partition</th><th>rows</th><th>files</th>\
         <th>records read</th><th>collapsed</th></tr>\n",
    );
    for p in parts {
        let _ = writeln!(
            page,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&text(p, &["partition"])),
            n(p, &["rows"]),
            n(p, &["files"]),
            n(p, &["records_in"]),
            n(p, &["collapsed"])
        );
    }
    let _ = writeln!(
        page,
        "<tr class=\"total\"><td>all</td><td id=\"rows-written\">{}</td><td>{}</td><td></td><td>{}</td></tr></table>\n\
         <p class=\"note\">A partition is rewritten whole: its rows are all the rows it holds now, \
         not only this run's.</p></section>",
        n(output, &["rows_written"]),
        n(output, &["files_written"]),
        n(output, &["collapsed"])
    );
}

fn files(page: &mut String, report: &Value) {
    let rejects: Vec<&str> = report["rejects_files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if rejects.is_empty() {
        return;
    }
    page.push_str("<section id=\"files\"><h2>Rejects files</h2><ul>");
    for path in rejects {
        let _ = write!(page, "<li><code>{}</code></li>", esc(path));
    }
    page.push_str("</ul></section>\n");
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        serde_json::json!({
            "run_id": "20260512T101112Z-1a2b3", "command": "run", "status": "partial",
            "exit_code": 3, "tool_version": "0.1.0",
            "plan": {"from": "2021-08-15", "to": "2021-08-16"},
            "iccids": {"rejected_by_reason": {"iccid_scientific_notation": 2}},
            "records": {"rejected_by_reason": {"value_signed": 1}},
            "submit": {"attempts": 3, "achieved_rate_per_sec": 2.5, "elapsed_secs": 1.2,
                       "sent_per_second": [[1000, 2], [1001, 1]],
                       "failures": [{"error_code": "INPUT_INVALID.Date"}]},
            "collect": {
                "completeness": {"usage": 5, "no_usage": 1, "rejected": 1, "rejected_input": 2},
                "by_window": {"2021-08-15": {"usage": 3, "no_usage": 1},
                              "2021-08-16": {"usage": 2, "rejected": 1}},
                "completeness_file": "out/runs/x-completeness.csv"},
            "output": {"rows_written": 5, "files_written": 2,
                       "partitions": [{"partition": "usage_date=2021-08-15", "rows": 3, "files": 1}]},
            "rejects_files": ["out/rejects/<x>-iccids.csv"],
        })
    }

    #[test]
    fn the_page_counts_days_states_rejects_and_partitions() {
        let page = render(&report());
        assert!(page.contains("<title>tsusage run 20260512T101112Z-1a2b3: partial</title>"));
        assert!(
            page.contains(
                "<span id=\"days-complete\">1</span> of <span id=\"days-total\">2</span>"
            )
        );
        assert!(page.contains(
            "<tr id=\"day-2021-08-16\"><td>2021-08-16</td><td data-state=\"usage\">2</td>\
             <td data-state=\"no_usage\">0</td><td data-state=\"rejected\">1</td>"
        ));
        assert!(page.contains("<strong>2</strong> rows of the ICCID lists"));
        assert!(page.contains("<code>value_signed</code></td><td>1</td>"));
        assert!(page.contains("<code>INPUT_INVALID.Date</code></td><td>1</td>"));
        assert!(page.contains("<td id=\"rows-written\">5</td>"));
        assert!(
            page.contains("<title>0–1 s: 2</title>"),
            "one bar per second"
        );
        assert!(page.contains("&lt;x&gt;-iccids.csv"), "paths are escaped");
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external assets"
        );
    }

    #[test]
    fn a_report_without_planned_days_says_so() {
        let page = render(&serde_json::json!({"command": "ingest", "status": "complete"}));
        assert!(page.contains("there is no completeness to show"));
        assert!(page.contains("Nothing was rejected."));
    }
}
