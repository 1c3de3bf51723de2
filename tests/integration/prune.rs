//! Retention: nights under `state.retain_days` keep the store bounded, the archive rebuilds the same
//! Parquet, a day asked again after its callbacks were archived is rebuilt from archive and journal,
//! and a prune killed mid-way loses nothing.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{Days, NaiveDate};
use tsusage::collect::archive;
use tsusage::state::{SqliteStore, Store};

use crate::util::*;

const ICCIDS: u32 = 2000;

fn first_night() -> NaiveDate {
    NaiveDate::from_ymd_opt(2021, 9, 1).expect("date")
}

fn workspace() -> Workspace {
    let ws = Workspace::new();
    let list: Vec<String> = (0..ICCIDS)
        .map(|i| {
            let body = format!("89148000000{i:08}");
            format!(
                "{body}{}",
                tsusage::ingest::luhn_check_digit(body.as_bytes())
            )
        })
        .collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n", list.join("\n")),
    )
    .expect("iccids");
    ws
}

fn env(ws: &Workspace, days_later: u64) -> Vec<(String, String)> {
    vec![
        (
            "TSUSAGE_INPUT__PATHS".into(),
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_PLAN__CHUNK_SIZE".into(), "200".into()),
        ("TSUSAGE_API__REQUESTS_PER_SEC".into(), "100".into()),
        ("TSUSAGE_SIM__CALLBACK_MODE".into(), "batched".into()),
        // Night N is received N days after night 0.
        ("TSUSAGE_TEST_DAYS_LATER".into(), days_later.to_string()),
    ]
}

fn run(ws: &Workspace, args: &[&str], env: &[(String, String)]) -> Run {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ws.run_env(args, &env)
}

/// Night `n` (received `n` days after night 0), with `env` added.
fn night(ws: &Workspace, n: u64, extra: &[&str], more_env: &[(&str, &str)]) -> Run {
    let date = (first_night() + Days::new(n)).to_string();
    let mut args = vec!["run", "--simulate", "--date", &date];
    args.extend_from_slice(extra);
    let mut env = env(ws, n);
    env.extend(
        more_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    run(ws, &args, &env)
}

const RETAIN_3: &[(&str, &str)] = &[("TSUSAGE_STATE__RETAIN_DAYS", "3")];

fn store(ws: &Workspace) -> SqliteStore {
    SqliteStore::open(&ws.path("state/tsusage.db")).expect("store")
}

/// The ids of every journaled callback.
fn journal_ids(ws: &Workspace) -> BTreeSet<i64> {
    store(ws)
        .callbacks_since(0, usize::MAX >> 1)
        .expect("journal")
        .into_iter()
        .map(|entry| entry.id)
        .collect()
}

/// The ids of every archived callback, each once (asserted).
fn archived_ids(ws: &Workspace) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    let files = archive::archive_files_under(&ws.out().join("archive")).expect("archive");
    for path in files {
        archive::read(&path, &mut |cb| {
            assert!(ids.insert(cb.id), "callback {} archived twice", cb.id);
            Ok(())
        })
        .expect("read archive");
    }
    ids
}

/// A partition's rows, sorted.
fn partition_rows(ws: &Workspace, day: NaiveDate) -> Vec<Row> {
    let mut rows = read_rows(&ws.out().join("usage").join(format!("usage_date={day}")));
    rows.sort();
    rows
}

fn store_bytes(ws: &Workspace) -> u64 {
    let size = |p: &str| std::fs::metadata(ws.path(p)).map_or(0, |m| m.len());
    size("state/tsusage.db") + size("state/tsusage.db-wal")
}

#[test]
fn nights_under_retention_keep_the_store_bounded_and_the_archive_rebuilds_the_same_parquet() {
    let ws = workspace();
    let nights = 9;
    let mut sizes = Vec::new();
    let mut journal = Vec::new();
    for n in 0..nights {
        let run = night(&ws, n, &[], RETAIN_3);
        run.expect_code(0);
        let report = run.report();
        let archived = report["prune"]["callbacks_archived"].as_u64();
        assert!(archived.is_some(), "night {n}: {}", report["prune"]);
        sizes.push(store_bytes(&ws));
        journal.push(journal_ids(&ws).len());
    }
    // The journal holds the nights within retention (3 days, plus tonight's), never more.
    let per_night = journal[0];
    assert!(per_night >= 20, "{journal:?}");
    for (n, len) in journal.iter().enumerate() {
        assert!(
            *len <= per_night * 4,
            "night {n}: {len} callbacks journaled ({journal:?})"
        );
    }
    assert!(journal[nights as usize - 1] >= per_night * 3, "{journal:?}");
    // ... and the store's size stops growing (pages freed by a prune are reused).
    let late = &sizes[5..];
    let (min, max) = (
        late.iter().copied().min().unwrap_or(0),
        late.iter().copied().max().unwrap_or(0),
    );
    assert!(
        max as f64 <= min as f64 * 1.25,
        "store bytes per night: {sizes:?}"
    );

    // Every callback is in exactly one place, and the Parquet of every night is still there.
    let (kept, archived) = (journal_ids(&ws), archived_ids(&ws));
    assert!(kept.is_disjoint(&archived));
    assert!(archived.len() >= per_night * 4, "{}", archived.len());

    // A rebuild from the archive alone (a fresh store) gives the same Parquet for the archived days.
    let fresh = workspace();
    let archive_dir = ws.out().join("archive");
    let restored = run(
        &fresh,
        &["ingest", archive_dir.to_str().expect("path")],
        &env(&fresh, 0),
    );
    restored.expect_code(0);
    assert_eq!(
        restored.report()["restored"]["callbacks"].as_u64(),
        Some(archived.len() as u64)
    );
    for n in 0..4 {
        let day = first_night() + Days::new(n);
        let original = partition_rows(&ws, day);
        assert!(!original.is_empty());
        assert!(
            partition_rows(&fresh, day) == original,
            "{day}: the archive rebuilds the same rows"
        );
    }

    // A day asked again, for half its ICCIDs, after its callbacks were archived: rebuilt from its
    // archive and the journal. The new answers win; the other half keeps its archived rows.
    let day0 = first_night();
    let before = partition_rows(&ws, day0);
    let all = std::fs::read_to_string(ws.path("iccids.csv")).expect("iccids");
    let half: Vec<&str> = all.lines().take(1 + ICCIDS as usize / 2).collect();
    std::fs::write(ws.path("half.csv"), half.join("\n") + "\n").expect("half");
    let half: BTreeSet<&str> = half.into_iter().skip(1).collect();
    let half_list = format!("[\"{}\"]", ws.path("half.csv").display());
    let again = night(
        &ws,
        0,
        &["--force"],
        &[
            ("TSUSAGE_STATE__RETAIN_DAYS", "3"),
            ("TSUSAGE_INPUT__PATHS", &half_list),
        ],
    );
    again.expect_code(0);
    assert_eq!(again.report()["submit"]["submitted"].as_u64(), Some(5));
    let after = partition_rows(&ws, day0);
    assert_eq!(after.len(), before.len(), "one row per ICCID, none lost");
    let mut renewed = 0;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(
            (&old.iccid, old.usage_start, old.data_usage_bytes),
            (&new.iccid, new.usage_start, new.data_usage_bytes)
        );
        if half.contains(old.iccid.as_str()) {
            assert_ne!(old.request_id, new.request_id, "the newer answer wins");
            assert!(new.received_at > old.received_at);
            renewed += 1;
        } else {
            assert_eq!(old, new, "rebuilt from the archive as it was");
        }
    }
    assert!(renewed > 0 && renewed < after.len(), "{renewed}");
}

#[test]
fn a_prune_killed_before_its_commit_loses_nothing_and_the_rerun_archives_exactly_once() {
    let ws = workspace();
    for n in 0..3 {
        night(&ws, n, &[], &[]).expect_code(0);
    }
    let all = journal_ids(&ws);
    // After everything: the nights were received up to two days ahead.
    let tomorrow = (chrono::Utc::now().date_naive() + Days::new(4)).to_string();

    // Killed while its archive files are written but not yet recorded.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsusage"))
        .args(["prune", "--before", &tomorrow, "--config"])
        .arg(ws.config())
        .env("TSUSAGE_TEST_PAUSE", "prune_commit=30000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn prune");
    let archive_dir = ws.out().join("archive");
    let deadline = Instant::now() + Duration::from_secs(60);
    while archive::archive_files_under(&archive_dir)
        .expect("list")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the prune wrote no archive file");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    assert_eq!(journal_ids(&ws), all, "nothing left the journal");

    // The rerun removes the orphan and archives everything but the newest callback, once.
    let rerun = run(&ws, &["prune", "--before", &tomorrow], &env(&ws, 0));
    rerun.expect_code(0);
    let report = rerun.report();
    assert!(
        report["prune"]["orphans_removed"].as_u64() >= Some(1),
        "{report}"
    );
    let (kept, archived) = (journal_ids(&ws), archived_ids(&ws));
    assert_eq!(
        kept.len(),
        1,
        "the newest stays, so journal ids never repeat"
    );
    assert!(kept.is_disjoint(&archived));
    let union: BTreeSet<i64> = kept.union(&archived).copied().collect();
    assert_eq!(union, all, "every callback in exactly one place");
    assert_eq!(
        report["prune"]["callbacks_archived"].as_u64(),
        Some(archived.len() as u64)
    );

    // A prune again has nothing left to move; the rebuild from the archive is the same Parquet.
    let again = run(&ws, &["prune", "--before", &tomorrow], &env(&ws, 0));
    again.expect_code(0);
    assert_eq!(
        again.report()["prune"]["callbacks_archived"].as_u64(),
        Some(0)
    );
    let fresh = workspace();
    run(
        &fresh,
        &["ingest", archive_dir.to_str().expect("path")],
        &env(&fresh, 0),
    )
    .expect_code(0);
    // The callback left in the journal is the last night's: that night's partition is whole in
    // the archive unless it is a usage callback.
    let newest = *kept.iter().next().expect("one kept");
    let kept_kind = store(&ws)
        .callbacks_since(newest - 1, 1)
        .expect("journal")
        .first()
        .map(|entry| entry.kind.clone())
        .unwrap_or_default();
    for n in 0..3 {
        if n == 2 && kept_kind == "usage" {
            continue;
        }
        let day = first_night() + Days::new(n);
        let original = partition_rows(&ws, day);
        assert!(!original.is_empty());
        assert!(
            partition_rows(&fresh, day) == original,
            "{day}: the archive rebuilds the same rows"
        );
    }
}
