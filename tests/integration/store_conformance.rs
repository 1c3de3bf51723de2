//! One conformance suite for the state store: every store behaviour, run against every backend,
//! with the answers compared with SQLite's (the reference). A behaviour is a call sequence over
//! the `Store` trait that says every answer users rely on as text ([`BEHAVIOURS`]); a backend is
//! a way to open a fresh, empty store ([`SQLITE`], [`POSTGRES`]).
//!
//! A third backend is one more `Backend` here and one more test, `#[cfg_attr(…, ignore = …)]` where
//! it needs a server (PostgreSQL's comes from `crate::servers`: the CI's, or one this test process
//! starts; where none can be had the test is ignored, with the reason).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tsusage::state::{
    ArchiveFile, Digest, JobUpdate, Journaled, NewCallback, PgStore, SqliteStore, Store,
    body_digest,
};

use crate::postgres::TestDb;
use crate::servers::pg_url;
use crate::util::*;

/// A store backend under test.
struct Backend {
    name: &'static str,
    /// A fresh, empty store of this backend.
    fresh: fn() -> Fresh,
}

/// A fresh store, what holds its data (a temp dir, a test database) and how to open it again.
struct Fresh {
    store: Box<dyn Store>,
    /// Opens the same data again: its schema version and the store.
    reopen: Box<dyn Fn() -> (i64, Box<dyn Store>)>,
    /// Dropped last, after the stores.
    _holds: Box<dyn Any>,
}

/// SQLite, always there: the reference every other backend's answers are compared with.
const SQLITE: Backend = Backend {
    name: "SQLite",
    fresh: || {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let open = |path: &Path| SqliteStore::open(path).expect("sqlite");
        let store = Box::new(open(&path));
        Fresh {
            store,
            reopen: Box::new(move || -> (i64, Box<dyn Store>) {
                let store = open(&path);
                (store.schema_version().expect("version"), Box::new(store))
            }),
            _holds: Box::new(dir),
        }
    },
};

/// PostgreSQL: a database of its own on the test server.
const POSTGRES: Backend = Backend {
    name: "PostgreSQL",
    fresh: || {
        let db = TestDb::new(&pg_url());
        let url = db.url.clone();
        let open = |url: &str| PgStore::open(url).expect("postgres");
        let store = Box::new(open(&url));
        Fresh {
            store,
            reopen: Box::new(move || -> (i64, Box<dyn Store>) {
                let store = open(&url);
                (store.schema_version().expect("version"), Box::new(store))
            }),
            _holds: Box::new(db),
        }
    },
};

/// A store behaviour: a call sequence and its answers as text, and checks that those answers say
/// what they should (so that equal to SQLite's cannot mean equally wrong).
struct Behaviour {
    name: &'static str,
    run: fn(&mut dyn Store) -> Vec<String>,
    spot_checks: fn(&[String]),
}

/// Every store behaviour; each runs on a fresh store of every backend.
const BEHAVIOURS: &[Behaviour] = &[
    Behaviour {
        name: "one call sequence over the whole trait",
        run: exercise,
        spot_checks: exercise_says_what_it_should,
    },
    Behaviour {
        name: "claims and leases by the store's clock",
        run: claims,
        spot_checks: claims_say_what_they_should,
    },
];

/// Runs every behaviour on a fresh `backend` store and on a fresh SQLite store: the same answers,
/// and reopening the store migrates nothing twice.
fn conforms(backend: &Backend) {
    for behaviour in BEHAVIOURS {
        eprintln!("{}: {}", backend.name, behaviour.name);
        let mut sqlite = (SQLITE.fresh)();
        let mut tested = (backend.fresh)();
        let expected = (behaviour.run)(&mut *sqlite.store);
        let got = (behaviour.run)(&mut *tested.store);
        assert_eq!(expected.len(), got.len());
        for (e, g) in expected.iter().zip(&got) {
            assert_eq!(e, g);
        }
        (behaviour.spot_checks)(&got);
        // Reopening migrates nothing twice.
        drop(tested.store);
        let (version, reopened) = (tested.reopen)();
        assert_eq!(version, 7, "v7: PostgreSQL has the segment tables too");
        assert_eq!(
            reopened.journal_len().expect("len"),
            sqlite.store.journal_len().expect("len")
        );
    }
}

#[test]
fn sqlite_answers_every_behaviour_as_it_should() {
    conforms(&SQLITE);
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn postgres_gives_the_same_answers_as_sqlite_for_the_same_calls() {
    conforms(&POSTGRES);
}

fn exercise_says_what_it_should(got: &[String]) {
    assert!(got.contains(&"record_jobs: Ok(4)".to_owned()), "{got:#?}");
    assert!(
        got.contains(&"record_jobs again: Ok(0)".to_owned()),
        "{got:#?}"
    );
    assert!(
        got.contains(&"journal 1: [New(1), New(2), AlreadyJournaled, New(3)]".to_owned()),
        "{got:#?}"
    );
    assert!(
        got.contains(&"journal 2: [AlreadyJournaled, New(4), New(5)]".to_owned()),
        "{got:#?}"
    );
    assert!(got.contains(&"journal 3: [New(6)]".to_owned()), "{got:#?}");
    assert!(
        got.contains(&"pending all written: Ok([])".to_owned()),
        "{got:#?}"
    );
}

/// Two workers claim, renew and take over three jobs. Leases run on the store's clock: no call
/// takes a worker's own time, so a worker whose clock runs ahead has nothing to steal with.
fn claims(store: &mut dyn Store) -> Vec<String> {
    let mut said = Vec::new();
    let mut say = |what: &str, answer: String| said.push(format!("{what}: {answer}"));
    let jobs = [job(1, 15), job(2, 15), job(3, 15)];
    store.record_jobs(&jobs).expect("record");
    // In id order, the order claims take them in: j1, j2, j3.
    let mut ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    ids.sort_unstable();
    let name = |claimed: Vec<String>| -> String {
        let names: Vec<String> = claimed
            .iter()
            .map(|c| format!("j{}", ids.iter().position(|i| i == c).map_or(0, |p| p + 1)))
            .collect();
        names.join(",")
    };
    let since = store.clock_ms().expect("clock");
    let now = chrono::Utc::now().timestamp_millis();
    say(
        "the store's clock is this host's, within a minute",
        ((since - now).abs() < 60_000).to_string(),
    );
    let a = store
        .claim_jobs(&ids, "a", 60_000, since, 2)
        .expect("claim");
    say("a claims two", name(a));
    let b = store
        .claim_jobs(&ids, "b", 60_000, since, 5)
        .expect("claim");
    say("b claims what a does not hold", name(b));
    let c = store
        .claim_jobs(&ids, "c", 60_000, since, 5)
        .expect("claim");
    say("c finds every lease live", name(c));
    let held = store.renew_claims("a", &ids[..2], 60_000).expect("renew");
    say("a renews its two", held.to_string());
    let held = store.renew_claims("b", &ids[..2], 60_000).expect("renew");
    say("b renews none of a's", held.to_string());
    // a's leases lapse (renewed to end a second ago, by the store's clock): b takes them over.
    store.renew_claims("a", &ids[..2], -1_000).expect("renew");
    let b = store
        .claim_jobs(&ids, "b", 60_000, since, 5)
        .expect("claim");
    say("b takes over a's lapsed leases and keeps its own", name(b));
    let held = store.renew_claims("a", &ids[..2], 60_000).expect("renew");
    say("a's renewal finds them gone", held.to_string());
    said
}

fn claims_say_what_they_should(got: &[String]) {
    let expected = [
        "the store's clock is this host's, within a minute: true",
        "a claims two: j1,j2",
        "b claims what a does not hold: j3",
        "c finds every lease live: ",
        "a renews its two: 2",
        "b renews none of a's: 0",
        "b takes over a's lapsed leases and keeps its own: j1,j2,j3",
        "a's renewal finds them gone: 0",
    ];
    assert_eq!(got, expected);
}

fn job(i: u32, day: u32) -> tsusage::plan::Job {
    let iccids: Vec<tsusage::ingest::Iccid> = (0..3)
        .map(|k| tsusage::ingest::Iccid::parse(&iccid(i * 10 + k)).expect("iccid"))
        .collect();
    let start = chrono::NaiveDate::from_ymd_opt(2021, 8, day).expect("day");
    let window = tsusage::plan::Window {
        start,
        end: start + chrono::Days::new(1),
    };
    tsusage::plan::Job {
        id: tsusage::plan::JobId::new(ACCOUNT, window, &iccids),
        account_name: ACCOUNT.into(),
        window,
        iccids: iccids.into(),
    }
}

/// A callback to journal: its body, digest and partitions.
pub struct Cb {
    request_id: String,
    body: String,
    digest: Digest,
    partitions: BTreeSet<String>,
    received_at: Option<i64>,
}

pub fn cb(request_id: &str, text: &str, partitions: &[&str], received_at: Option<i64>) -> Cb {
    Cb {
        request_id: request_id.into(),
        body: text.into(),
        digest: body_digest(text),
        partitions: partitions.iter().map(|p| (*p).to_owned()).collect(),
        received_at,
    }
}

pub fn journal(store: &mut dyn Store, batch: &[Cb], received_at: i64) -> Vec<Journaled> {
    let batch: Vec<NewCallback<'_>> = batch
        .iter()
        .map(|c| NewCallback {
            request_id: &c.request_id,
            kind: "usage",
            source: "listener",
            body: &c.body,
            encoded: None,
            packed: None,
            digest: &c.digest,
            partitions: &c.partitions,
            received_at: c.received_at,
        })
        .collect();
    store.journal(&batch, received_at).expect("journal")
}

/// One sequence of calls over the whole trait; every answer users rely on, as text (times that
/// are "now" left out).
fn exercise(store: &mut dyn Store) -> Vec<String> {
    let mut said = Vec::new();
    let mut say = |what: &str, answer: String| said.push(format!("{what}: {answer}"));
    let jobs: Vec<_> = (0..4).map(|i| job(i, 15 + i % 2)).collect();
    say("record_jobs", format!("{:?}", store.record_jobs(&jobs)));
    say(
        "record_jobs again",
        format!("{:?}", store.record_jobs(&jobs[..2])),
    );
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let mut with_unknown = ids.clone();
    with_unknown.push("never-planned");
    say(
        "job_statuses",
        format!(
            "{:?}",
            sorted(store.job_statuses(&with_unknown).expect("statuses"))
        ),
    );
    let updates = vec![
        JobUpdate::Submitted {
            job_id: ids[0].into(),
            request_id: "req-a".into(),
            attempts: 1,
        },
        JobUpdate::Submitted {
            job_id: ids[1].into(),
            request_id: "req-b".into(),
            attempts: 2,
        },
        JobUpdate::Submitted {
            job_id: ids[0].into(),
            request_id: "req-a2".into(),
            attempts: 1,
        },
        JobUpdate::Failed {
            job_id: ids[2].into(),
            attempts: 1,
            error: "400 bad request".into(),
        },
        JobUpdate::GaveUp {
            job_id: ids[3].into(),
            attempts: 5,
            error: "503".into(),
        },
    ];
    store.apply_job_updates(&updates).expect("updates");
    // A requestId recorded twice is kept once.
    store
        .apply_job_updates(&updates[..1])
        .expect("updates again");
    say(
        "job_status_counts",
        format!("{:?}", store.job_status_counts()),
    );
    say(
        "window_status_counts",
        format!(
            "{:?}",
            store.window_status_counts("2021-08-15T00:00:00Z", "2021-08-16T00:00:00Z")
        ),
    );
    let outstanding: Vec<(String, String)> = store
        .outstanding_jobs()
        .expect("outstanding")
        .into_iter()
        .map(|job| (job.job_id, job.window_start))
        .collect();
    say("outstanding_jobs", format!("{outstanding:?}"));
    say(
        "requests_of_jobs",
        format!("{:?}", store.requests_of_jobs(&ids)),
    );
    say(
        "request_accounts",
        format!(
            "{:?}",
            sorted(
                store
                    .request_accounts(&["req-a", "req-b", "req-unknown"])
                    .expect("accounts")
            )
        ),
    );

    store.begin_run("run-1", "run").expect("begin");
    store
        .finish_run("run-1", 3, "{\"ok\":true}")
        .expect("finish");
    store.begin_run("run-2", "listen").expect("begin");
    let last = store
        .last_run()
        .expect("last run")
        .map(|run| (run.run_id, run.command, run.exit_code));
    say("last_run", format!("{last:?}"));

    // The journal: a duplicate inside a batch, a redelivery in a later batch, an archived one.
    let d15 = "usage_date=2021-08-15";
    let d16 = "usage_date=2021-08-16";
    let first = [
        cb("req-a", "{\"requestId\":\"req-a\",\"n\":1}", &[d15], None),
        cb(
            "req-b",
            "{\"requestId\":\"req-b\",\"n\":1}",
            &[d15, d16],
            None,
        ),
        cb("req-a", "{\"requestId\":\"req-a\",\"n\":1}", &[d15], None),
        cb("req-x", "{\"requestId\":\"req-x\"}", &[], None),
    ];
    say("journal 1", format!("{:?}", journal(store, &first, DAY0)));
    let second = [
        cb(
            "req-b",
            "{\"requestId\":\"req-b\",\"n\":1}",
            &[d15, d16],
            None,
        ),
        cb("req-a", "{\"requestId\":\"req-a\",\"n\":2}", &[d15], None),
        cb("req-c", "{\"requestId\":\"req-c\"}", &[d16], Some(DAY0 - 5)),
    ];
    say(
        "journal 2",
        format!("{:?}", journal(store, &second, DAY0 + 10)),
    );
    say("journal_len", format!("{:?}", store.journal_len()));
    say(
        "journal_high_water",
        format!("{:?}", store.journal_high_water()),
    );
    say(
        "callbacks_since 0",
        format!("{:?}", store.callbacks_since(0, 100)),
    );
    say(
        "callbacks_since 2 limit 2",
        format!("{:?}", store.callbacks_since(2, 2)),
    );
    say(
        "pending_partitions",
        format!("{:?}", store.pending_partitions()),
    );
    say(
        "partition_callbacks",
        format!("{:?}", store.partition_callbacks(d15, 3)),
    );
    let mut seen = Vec::new();
    store
        .callbacks_for_partition(d16, 100, &mut |c| {
            seen.push(format!("{c:?}"));
            std::ops::ControlFlow::Continue(())
        })
        .expect("for partition");
    say("callbacks_for_partition", format!("{seen:?}"));
    let mut seen = Vec::new();
    store
        .callbacks_of_requests(&["req-a", "req-c"], 4, &mut |id, r, body| {
            seen.push(format!("{id} {r} {body}"))
        })
        .expect("of requests");
    say("callbacks_of_requests", format!("{seen:?}"));

    store.mark_written(d15, 3, 10, 1, "run-1").expect("mark");
    // An older write never moves the mark back.
    store.mark_written(d15, 1, 10, 1, "run-1").expect("mark");
    say(
        "pending after mark_written",
        format!("{:?}", store.pending_partitions()),
    );
    store.mark_written(d16, 5, 4, 1, "run-1").expect("mark");
    store.mark_written(d15, 4, 11, 1, "run-1").expect("mark");
    say(
        "pending all written",
        format!("{:?}", store.pending_partitions()),
    );

    // Retention: what may leave, then the archive's commit.
    store
        .apply_job_updates(&[JobUpdate::Completed {
            job_id: ids[0].into(),
        }])
        .expect("complete");
    let mut archivable = Vec::new();
    store
        .archivable(DAY0 + 11, &mut |c| {
            archivable.push(c);
            std::ops::ControlFlow::Continue(())
        })
        .expect("archivable");
    say("archivable", format!("{archivable:?}"));
    let file = ArchiveFile {
        file: "2021-08/journal-1-5.ndjson.zst".into(),
        callbacks: archivable.len() as u64,
        first_id: archivable.iter().map(|c| c.id).min().unwrap_or(0),
        last_id: archivable.iter().map(|c| c.id).max().unwrap_or(0),
        bytes: 123,
        partitions: [(d15.to_owned(), 2u64), (d16.to_owned(), 1u64)].into(),
    };
    let gone: Vec<i64> = archivable.iter().map(|c| c.id).collect();
    say(
        "commit_archive",
        format!(
            "{:?}",
            store.commit_archive(&[file], &gone, DAY0 + 86_400_000_000 * 30, "run-2")
        ),
    );
    store.reclaim_space().expect("reclaim");
    say("archive_files", format!("{:?}", store.archive_files()));
    say(
        "partition_archives",
        format!("{:?}", store.partition_archives(d16)),
    );
    say(
        "journal_len after prune",
        format!("{:?}", store.journal_len()),
    );
    say(
        "callbacks_since after prune",
        format!("{:?}", store.callbacks_since(0, 100)),
    );
    say(
        "job_status_counts at the end",
        format!("{:?}", store.job_status_counts()),
    );
    // The next id continues after the newest, never reusing an archived one.
    let third = [cb("req-d", "{\"requestId\":\"req-d\"}", &[d16], None)];
    say(
        "journal 3",
        format!("{:?}", journal(store, &third, DAY0 + 20)),
    );
    said
}

fn sorted<K: Ord, V>(map: std::collections::HashMap<K, V>) -> BTreeMap<K, V> {
    map.into_iter().collect()
}
