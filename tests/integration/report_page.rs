//! The run report's page (`out/runs/<run_id>.html`) in a real browser: headless Chromium renders it
//! offline, and the DOM it built shows the report's own counts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Chromium gets this long per page.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// Debian's `chromium` (or another name for it on the PATH).
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `page` with `mode` (`--dump-dom` or `--screenshot=...`); its stdout.
fn headless(browser: &Path, mode: &str, page: &Path) -> String {
    let profile = tempfile::tempdir().expect("profile");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(mode)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish {mode} within {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("chromium output");
    assert!(
        output.status.success(),
        "chromium {mode}: {:?}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the `<td data-state="STATE">` cells in the DOM's row with `id`.
fn state_cells(dom: &str, row_id: &str) -> Vec<(String, u64)> {
    let start = dom
        .find(&format!("id=\"{row_id}\""))
        .unwrap_or_else(|| panic!("no row {row_id} in the DOM"));
    let row = &dom[start..start + dom[start..].find("</tr>").expect("row end")];
    row.split("<td data-state=\"")
        .skip(1)
        .map(|cell| {
            let (state, rest) = cell.split_once("\">").expect("cell");
            let value = rest.split('<').next().expect("value");
            (state.to_owned(), value.parse().expect("a count"))
        })
        .collect()
}

#[test]
fn the_html_report_renders_in_headless_chromium_with_the_reports_counts() {
    let ws = Workspace::new();
    let list: Vec<String> = (0..40).map(iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n8.91480E+19\n", list.join("\n")),
    )
    .expect("iccids");
    let run = ws.run_env(
        &[
            "run",
            "--simulate",
            "--from",
            "2021-08-15",
            "--to",
            "2021-08-16",
        ],
        &[
            ("TSUSAGE_INPUT__PATHS", "[\"iccids.csv\"]"),
            ("TSUSAGE_PLAN__CHUNK_SIZE", "10"),
            ("TSUSAGE_SIM__DIRTY_FRACTION", "0.2"),
        ],
    );
    run.expect_code(3);
    let report = run.report();
    let page = run.report_path().with_extension("html");
    assert!(page.is_file(), "{} beside the JSON", page.display());
    let html = std::fs::read_to_string(&page).expect("page");
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<link"),
        "the page loads nothing from elsewhere"
    );

    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED the browser check: no chromium on the PATH (`apt-get install -y chromium`; \
             .ci/run installs it)"
        );
        return;
    };
    let dom = headless(&browser, "--dump-dom", &page);
    let run_id = report["run_id"].as_str().expect("run id");
    assert!(
        dom.contains(&format!("<title>tsusage run {run_id}: partial</title>")),
        "{dom}"
    );
    assert!(dom.contains("<h1 id=\"status\">run partial</h1>"), "{dom}");
    // The totals row shows the report's completeness, state by state.
    let completeness = &report["collect"]["completeness"];
    let totals = state_cells(&dom, "completeness-total");
    assert_eq!(totals.len(), 5, "{totals:?}");
    for (state, count) in &totals {
        assert_eq!(
            *count,
            completeness[state.as_str()].as_u64().unwrap_or(0),
            "{state}: {completeness}"
        );
    }
    assert!(
        totals.iter().any(|(s, n)| s == "rejected" && *n > 0),
        "dirty values show as rejected: {totals:?}"
    );
    // Each day: 40 ICCIDs planned; the days are whole (usage, no usage or rejected).
    for day in ["2021-08-15", "2021-08-16"] {
        let cells = state_cells(&dom, &format!("day-{day}"));
        assert_eq!(
            cells.iter().map(|(_, n)| n).sum::<u64>(),
            40,
            "{day}: {cells:?}"
        );
        let by_window = &report["collect"]["by_window"][day];
        for (state, count) in &cells {
            assert_eq!(
                *count,
                by_window[state.as_str()].as_u64().unwrap_or(0),
                "{day} {state}"
            );
        }
    }
    assert!(dom.contains("<span id=\"days-total\">2</span>"), "{dom}");
    assert!(
        dom.contains("<strong>1</strong> rows of the ICCID lists were rejected"),
        "{dom}"
    );
    let rows = report["output"]["rows_written"].as_u64().expect("rows");
    assert!(
        dom.contains(&format!("<td id=\"rows-written\">{rows}</td>")),
        "{dom}"
    );
    assert_eq!(ws.rows().len() as u64, rows);
    assert!(
        dom.contains("<code>iccid_spreadsheet_number</code>"),
        "{dom}"
    );

    // And it draws: a screenshot of the page is a real PNG.
    let shot = ws.path("report.png");
    headless(&browser, &format!("--screenshot={}", shot.display()), &page);
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
