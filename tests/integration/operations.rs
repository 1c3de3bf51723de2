//! The listener's operations endpoints on the real `tsusage listen`: `GET /healthz` follows the
//! store, `GET /metrics` counts exactly what was answered, parses as Prometheus text, shows no secret.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// A raw HTTP/1.1 GET without credentials: `(status, content type, body)`; status 0 when nothing
/// answered.
fn get(port: u16, path: &str) -> (u16, String, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new(), String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn stop(child: std::process::Child) -> std::process::Output {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait_with_output().expect("listen ends")
}

/// Checks the Prometheus text exposition line by line and returns its samples by
/// `name{labels}` (labels as written). Panics, naming the line, on anything else.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = Vec::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF:\n{text}");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next(), parts.next(), parts.next());
            let (Some(kind), Some(name), Some(value)) = (kind, name, value) else {
                panic!("bad comment line {line:?}");
            };
            assert!(name_ok(name), "bad metric name in {line:?}");
            match kind {
                "HELP" => helped.push(name.to_owned()),
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "unknown"].contains(&value),
                        "bad type in {line:?}"
                    );
                    typed.insert(name.to_owned(), value.to_owned());
                }
                "UNIT" => {}
                _ => panic!("bad comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value not a number in {line:?}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                for pair in labels.split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    assert!(name_ok(k), "bad label name {k:?} in {line:?}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "label value not quoted in {line:?}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| typed.contains_key(*base))
            })
            .unwrap_or(name);
        assert!(
            typed.contains_key(family) && helped.iter().any(|h| h == family),
            "sample {line:?} has no TYPE and HELP line before it"
        );
        samples.insert(series.to_owned(), value);
    }
    samples
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, content_type, body) = get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain"),
        "{content_type}"
    );
    parse_exposition(&body)
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    let value = |m: &BTreeMap<String, f64>| {
        *m.get(series)
            .unwrap_or_else(|| panic!("no {series} in {m:?}"))
    };
    value(after) - value(before)
}

/// A listener up for weeks keeps nothing in memory per callback once it is journaled: nothing in
/// `tsusage listen` reads what a run's tracker would, so nothing waits for it either.
#[test]
fn a_standalone_listener_holds_nothing_per_callback_once_journaled() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(&ws, port, &[]);
    let sent = 300;
    for n in 0..sent {
        let body = usage_callback(
            &format!("req-held-{n}"),
            1,
            &[record(&iccid(n % 50), i64::from(n % 3), r#""4096""#)],
        );
        assert_eq!(post(port, "application/json", body.as_bytes()), 200, "{n}");
    }
    let after = scrape(port);
    assert_eq!(
        after["tsusage_callbacks_acknowledged_total{outcome=\"journaled\"}"],
        f64::from(sent)
    );
    assert_eq!(
        after["tsusage_listener_tracker_news_pending"], 0.0,
        "no run polls a standalone listener: it must keep no news for one"
    );
    stop(child);
    let store = tsusage::state::SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    assert_eq!(
        tsusage::state::Store::journal_len(&store).expect("journal"),
        u64::from(sent)
    );
}

#[test]
fn healthz_is_ready_with_a_working_store_and_needs_no_credentials() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(&ws, port, &[]);
    let (status, content_type, body) = get(port, "/healthz");
    assert_eq!((status, body.trim()), (200, r#"{"status":"ok"}"#));
    assert_eq!(content_type, "application/json");
    // The callback path is POST only; the operations paths are GET only.
    assert_eq!(post_to(port, "/healthz", "{}"), 405);
    stop(child);
}

#[test]
fn healthz_says_503_while_the_store_cannot_commit_and_200_once_it_can() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(&ws, port, &[]);
    assert_eq!(get(port, "/healthz").0, 200);
    // Another process holds the SQLite write lock: the listener's next commit waits for it, and a
    // health check queued behind that commit cannot be answered.
    let mut db = rusqlite::Connection::open(ws.path("state/tsusage.db")).expect("state store");
    let lock = db
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("write lock");
    let body = usage_callback("req-held", 1, &[record(&iccid(1), 0, r#""7""#)]);
    let waiting = std::thread::spawn(move || post(port, "application/json", body.as_bytes()));
    std::thread::sleep(Duration::from_millis(300));
    let in_flight = scrape(port);
    assert_eq!(
        in_flight["tsusage_listener_requests_in_flight"], 1.0,
        "the held callback is in flight"
    );
    let started = Instant::now();
    let (status, _, body) = get(port, "/healthz");
    let waited = started.elapsed();
    assert_eq!(
        (status, body.trim()),
        (503, r#"{"status":"store unavailable"}"#)
    );
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(10),
        "503 after the health timeout (5 s), not {waited:?}"
    );
    lock.rollback().expect("release");
    assert_eq!(
        waiting.join().expect("join"),
        200,
        "journaled once the lock is gone"
    );
    assert_eq!(get(port, "/healthz").0, 200);
    let after = scrape(port);
    assert_eq!(after["tsusage_listener_requests_in_flight"], 0.0);
    // That commit waited for the lock for more than 2.5 s: it is in the top buckets only.
    assert_eq!(after["tsusage_journal_commit_seconds_count"], 1.0);
    assert_eq!(
        after["tsusage_journal_commit_seconds_bucket{le=\"2.5\"}"],
        0.0
    );
    assert_eq!(
        after["tsusage_journal_commit_seconds_bucket{le=\"10.0\"}"],
        1.0
    );
    stop(child);
}

/// POSTs `body` as JSON to `path`; returns the status.
fn post_to(port: u16, path: &str, body: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn metrics_count_exactly_what_was_acknowledged_and_rejected_and_show_no_secret() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(&ws, port, &[("TSUSAGE_CALLBACKS__MAX_BODY_BYTES", "4096")]);
    let before = scrape(port);
    for series in [
        "tsusage_callbacks_acknowledged_total{outcome=\"journaled\"}",
        "tsusage_callbacks_rejected_total{reason=\"unauthorized\"}",
        "tsusage_journal_commit_seconds_count",
    ] {
        assert_eq!(before[series], 0.0, "{series} starts at 0");
    }

    let json = "application/json";
    let bodies: Vec<String> = (1..=3)
        .map(|i| usage_callback(&format!("req-m{i}"), 1, &[record(&iccid(i), 0, r#""10""#)]))
        .collect();
    for body in &bodies {
        assert_eq!(post(port, json, body.as_bytes()), 200);
    }
    // A redelivery of the same body: acknowledged, stored once.
    assert_eq!(post(port, json, bodies[0].as_bytes()), 200);
    // Wrong password, twice; a body that is not JSON cannot carry the credentials either: 401.
    let wrong = bodies[1].replace("cb-secret-sentinel", "guess");
    assert_eq!(post(port, json, wrong.as_bytes()), 401);
    assert_eq!(post(port, json, wrong.as_bytes()), 401);
    assert_eq!(post(port, json, b"{not json"), 401);
    // Right credentials, not a callback: 400.
    let not_a_callback = r#"{"username":"cb-user","password":"cb-secret-sentinel","hello":1}"#;
    assert_eq!(post(port, json, not_a_callback.as_bytes()), 400);
    assert_eq!(post(port, "text/plain", bodies[2].as_bytes()), 415);
    let big = usage_callback(
        "req-big",
        1,
        &(1..=60)
            .map(|i| record(&iccid(i), 0, r#""1""#))
            .collect::<Vec<_>>(),
    );
    assert!(big.len() > 4096);
    assert_eq!(post(port, json, big.as_bytes()), 413);

    let after = scrape(port);
    let expect = [
        (
            "tsusage_callbacks_acknowledged_total{outcome=\"journaled\"}",
            3.0,
        ),
        (
            "tsusage_callbacks_acknowledged_total{outcome=\"already_journaled\"}",
            1.0,
        ),
        (
            "tsusage_callbacks_rejected_total{reason=\"unauthorized\"}",
            3.0,
        ),
        (
            "tsusage_callbacks_rejected_total{reason=\"malformed\"}",
            1.0,
        ),
        (
            "tsusage_callbacks_rejected_total{reason=\"unsupported_media_type\"}",
            1.0,
        ),
        (
            "tsusage_callbacks_rejected_total{reason=\"too_large\"}",
            1.0,
        ),
        (
            "tsusage_callbacks_rejected_total{reason=\"timed_out\"}",
            0.0,
        ),
        (
            "tsusage_callbacks_rejected_total{reason=\"journal_unavailable\"}",
            0.0,
        ),
        // One observation per callback handed to the journal (3 new, 1 redelivery).
        ("tsusage_journal_commit_seconds_count", 4.0),
        ("tsusage_journal_commit_seconds_bucket{le=\"+Inf\"}", 4.0),
    ];
    for (series, moved) in expect {
        assert_eq!(delta(&before, &after, series), moved, "{series}");
    }
    assert_eq!(after["tsusage_listener_requests_in_flight"], 0.0);
    // Buckets are cumulative.
    let buckets: Vec<f64> = after
        .iter()
        .filter(|(k, _)| k.starts_with("tsusage_journal_commit_seconds_bucket"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 15, "14 bounds and +Inf");
    assert!(buckets.iter().all(|b| *b <= 4.0));

    // Nothing a caller sent, and no credential, shows in either answer.
    let (_, _, metrics) = get(port, "/metrics");
    let (_, _, health) = get(port, "/healthz");
    for text in [&metrics, &health] {
        for secret in [
            "cb-secret-sentinel",
            "cb-user",
            "guess",
            "req-m",
            ACCOUNT,
            &iccid(1),
        ] {
            assert!(!text.contains(secret), "{secret:?} in\n{text}");
        }
    }
    stop(child);
    // The run report agrees with the metrics.
    let report = std::fs::read_dir(ws.out().join("runs"))
        .expect("runs")
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .expect("a run report");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.path()).expect("read")).expect("json");
    assert_eq!(report["listener"]["acknowledged"], 4, "{report}");
    assert_eq!(report["listener"]["unauthorized"], 3, "{report}");
}

#[test]
fn a_public_url_on_the_listeners_own_paths_is_refused() {
    let ws = Workspace::new();
    let run = ws.run_env(
        &["listen"],
        &[
            (
                "TSUSAGE_CALLBACKS__PUBLIC_URL",
                "https://etl.example.com/metrics",
            ),
            ("TSUSAGE_CALLBACKS__USERNAME", "u"),
            ("TSUSAGE_CALLBACKS__PASSWORD", "p"),
            ("TSUSAGE_CALLBACKS__LISTEN_ADDR", "127.0.0.1:0"),
        ],
    );
    assert_ne!(run.code(), 0);
    assert!(run.stderr().contains("reserved"), "{}", run.stderr());
}
