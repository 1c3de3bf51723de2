//! The state store on PostgreSQL (`state.url`), against a real server on loopback: answers from
//! every calling context, journal ids in commit order under concurrent writers, the run lock, and
//! three `tsusage listen` replicas on one store with one killed under load. (The same answers as
//! SQLite for the same calls: `store_conformance`.)
//!
//! The server comes from `TSUSAGE_TEST_PG_URL` (`postgres://postgres@127.0.0.1:PORT/postgres`), or
//! else is started by the test process (see `crate::servers`); each test works in a database of its
//! own, created for it and dropped after.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tsusage::state::{Journaled, PgStore, Store};

use crate::store_conformance::{Cb, cb, journal};
use crate::util::*;

pub use crate::servers::pg_url;

/// A database of its own for one test, dropped (with its connections) when this is.
pub struct TestDb {
    admin: String,
    name: String,
    /// The URL of the test's database.
    pub url: String,
}

fn admin_sql(url: &str, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to TSUSAGE_TEST_PG_URL");
        let conn = tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = conn.await;
    });
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestDb {
    pub fn new(admin: &str) -> TestDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "tsusage_test_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        admin_sql(admin, &format!("CREATE DATABASE {name}"));
        TestDb {
            admin: admin.to_owned(),
            url: with_database(admin, &name),
            name,
        }
    }

    /// The environment that points a `tsusage` command at this database.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("TSUSAGE_STATE__URL".into(), self.url.clone()),
            ("TSUSAGE_STATE__PATH".into(), String::new()),
        ]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        admin_sql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn postgres_store_answers_from_a_thread_the_blocking_pool_and_inside_async_tasks() {
    let admin = pg_url();
    let db = TestDb::new(&admin);
    let mut store = PgStore::open(&db.url).expect("open");
    let body = cb(
        "req-1",
        "{\"requestId\":\"req-1\"}",
        &["usage_date=2021-08-15"],
        None,
    );
    assert_eq!(journal(&mut store, &[body], DAY0), [Journaled::New(1)]);
    // Inside a task on a current-thread runtime (block_on inside a runtime would panic).
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = current.block_on(async move {
        assert_eq!(store.journal_high_water().expect("high water"), 1);
        store
    });
    // Inside a task, and on the blocking pool, of a multi-thread runtime.
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = multi.block_on(async move {
        let store = tokio::spawn(async move {
            assert_eq!(store.journal_len().expect("len"), 1);
            store
        })
        .await
        .expect("task");
        tokio::task::spawn_blocking(move || {
            assert_eq!(store.callbacks_since(0, 10).expect("since").len(), 1);
            store
        })
        .await
        .expect("blocking")
    });
    // From a plain thread, as the state writer calls it.
    std::thread::spawn(move || assert_eq!(store.journal_len().expect("len"), 1))
        .join()
        .expect("thread");
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn journal_ids_are_committed_in_order_so_a_reader_following_them_misses_none() {
    // Three writers (three processes' worth of stores) journal concurrently while a reader follows
    // the journal by id, as `run` does. An id handed out before a smaller one commits would be
    // skipped by the reader for good.
    let admin = pg_url();
    let db = TestDb::new(&admin);
    drop(PgStore::open(&db.url).expect("migrate"));
    let (writers, batches, per_batch) = (3, 60, 8);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (url, done) = (db.url.clone(), done.clone());
        std::thread::spawn(move || {
            let store = PgStore::open(&url).expect("reader");
            let (mut cursor, mut seen) = (0i64, BTreeSet::new());
            loop {
                let finished = done.load(Ordering::SeqCst);
                for entry in store.callbacks_since(cursor, 1000).expect("since") {
                    cursor = entry.id;
                    seen.insert(entry.request_id);
                }
                if finished {
                    return seen;
                }
            }
        })
    };
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let url = db.url.clone();
            std::thread::spawn(move || {
                let mut store = PgStore::open(&url).expect("writer");
                for b in 0..batches {
                    let batch: Vec<Cb> = (0..per_batch)
                        .map(|i| {
                            let r = format!("w{w}-b{b}-{i}");
                            cb(&r, &format!("{{\"requestId\":\"{r}\"}}"), &[], None)
                        })
                        .collect();
                    journal(&mut store, &batch, DAY0);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.join().expect("reader");
    assert_eq!(seen.len(), writers * batches * per_batch);
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn the_run_lock_is_one_holder_at_a_time_named_and_free_again_when_released() {
    let admin = pg_url();
    let db = TestDb::new(&admin);
    let a = PgStore::open(&db.url).expect("a");
    let b = PgStore::open(&db.url).expect("b");
    let held = a.lock("run-1", "run").expect("first");
    let err = b.lock("run-2", "ingest").expect_err("held").to_string();
    assert!(err.contains("in use by tsusage run run-1 pid"), "{err}");
    drop(held);
    let again = b.lock("run-3", "prune").expect("free again");
    // A holder whose store went away keeps the lock until the guard goes.
    drop(b);
    assert!(a.lock("run-4", "run").is_err());
    drop(again);
    drop(a.lock("run-5", "run").expect("free"));
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn state_url_selects_postgres_and_its_password_is_never_shown() {
    let admin = pg_url();
    let db = TestDb::new(&admin);
    let ws = Workspace::new();
    let env = db.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let status = ws.run_env(&["status"], &env);
    status.expect_code(0);
    assert!(
        !ws.path("state/tsusage.db").exists(),
        "no SQLite file when state.url is set"
    );
    // Both given: a config error naming the keys.
    let both = ws.run_env(&["status"], &[("TSUSAGE_STATE__URL", db.url.as_str())]);
    both.expect_code(2);
    assert!(
        both.stderr().contains("state.path") && both.stderr().contains("state.url"),
        "{}",
        both.stderr()
    );
    // A wrong password is refused and not printed.
    let secret = "pw-sentinel-8231";
    let bad = db
        .url
        .replacen("://postgres@", &format!("://nobody:{secret}@"), 1);
    let run = ws.run_env(
        &["status"],
        &[
            ("TSUSAGE_STATE__URL", bad.as_str()),
            ("TSUSAGE_STATE__PATH", ""),
        ],
    );
    assert_ne!(run.code(), 0);
    assert!(run.stderr().contains("nobody:***@"), "{}", run.stderr());
    assert!(!run.stderr().contains(secret) && !run.stdout().contains(secret));
}

/// Three `tsusage listen` on one store, callbacks round-robin across them, one in five also
/// delivered to the next replica, one replica `kill -9`ed under load: every acknowledged callback
/// is in the journal exactly once.
#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn three_listeners_on_one_store_journal_every_acknowledged_callback_exactly_once() {
    let admin = pg_url();
    let db = TestDb::new(&admin);
    let ws = Workspace::new();
    let env = db.env();
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    extra.push(("TSUSAGE_TEST_PAUSE", "journal_commit=5"));
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas: Vec<_> = ports
        .iter()
        .map(|p| Some(spawn_listen(&ws, *p, &extra)))
        .collect();
    let n = 600usize;
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let dead = Arc::new(AtomicU64::new(u64::MAX));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (next, acked, dead, ports) =
                (next.clone(), acked.clone(), dead.clone(), ports.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut redelivered = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if i >= n {
                        return (mine, redelivered);
                    }
                    let request_id = format!("multi-{i}");
                    let records: Vec<String> = (0..5)
                        .map(|r| record(&iccid(r), 0, &format!("\"{i}\"")))
                        .collect();
                    let body = usage_callback(&request_id, 1, &records);
                    // Round-robin; until acknowledged, the same body goes to the next replica
                    // (the vendor sends it again; a load balancer routes it elsewhere).
                    let mut target = i % 3;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        if post(ports[target], "application/json", body.as_bytes()) == 200 {
                            break;
                        }
                        assert!(Instant::now() < deadline, "{request_id} never acknowledged");
                        target = (target + 1) % 3;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    // One in five is delivered again, to another replica.
                    if i.is_multiple_of(5) {
                        let other = (target + 1) % 3;
                        if other as u64 != dead.load(Ordering::SeqCst)
                            && post(ports[other], "application/json", body.as_bytes()) == 200
                        {
                            redelivered += 1;
                        }
                    }
                    mine.push(request_id);
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Under load, kill -9 replica 1 and leave it dead.
    while acked.load(Ordering::SeqCst) < (n / 3) as u64 {
        std::thread::sleep(Duration::from_millis(5));
    }
    dead.store(1, Ordering::SeqCst);
    let mut killed = replicas[1].take().expect("replica 1");
    killed.kill().expect("kill -9");
    killed.wait().expect("reap");
    let acked_at_kill = acked.load(Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    let mut redelivered = 0;
    for s in senders {
        let (mine, r) = s.join().expect("sender");
        acknowledged.extend(mine);
        redelivered += r;
    }
    for child in replicas.into_iter().flatten() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait_with_output();
    }
    let store = PgStore::open(&db.url).expect("store");
    let mut copies: BTreeMap<String, u64> = BTreeMap::new();
    for entry in store.callbacks_since(0, usize::MAX >> 1).expect("journal") {
        *copies.entry(entry.request_id).or_default() += 1;
    }
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|r| !copies.contains_key(*r))
        .collect();
    let doubled: Vec<(&String, &u64)> = copies.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "three listeners: {} acknowledged ({acked_at_kill} before the kill), {redelivered} redelivered to another replica, {} journaled, {} missing, {} doubled",
        acknowledged.len(),
        copies.len(),
        missing.len(),
        doubled.len()
    );
    assert_eq!(acknowledged.len(), n);
    assert!(redelivered > 0, "redeliveries reached another replica");
    assert!(
        missing.is_empty(),
        "acknowledged but not journaled: {missing:?}"
    );
    assert!(doubled.is_empty(), "journaled more than once: {doubled:?}");
    // Nothing but what was sent (a callback being sent when the replica died may be in the
    // journal unacknowledged; it is one of ours).
    assert!(copies.keys().all(|r| r.starts_with("multi-")));
}

/// Durable journal commits on PostgreSQL from `writers` concurrent stores, `per_batch` callbacks of
/// ~1 KB each per commit: prints callbacks/s. `cargo test --release --test integration
/// postgres::journal_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn journal_throughput() {
    let admin = pg_url();
    for (writers, per_batch) in [(1, 1), (1, 16), (1, 64), (3, 16), (3, 64)] {
        let db = TestDb::new(&admin);
        drop(PgStore::open(&db.url).expect("migrate"));
        let batches = 2000 / per_batch.max(1) + 20;
        let started = Instant::now();
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let url = db.url.clone();
                std::thread::spawn(move || {
                    let mut store = PgStore::open(&url).expect("writer");
                    for b in 0..batches {
                        let batch: Vec<Cb> = (0..per_batch)
                            .map(|i| {
                                let r = format!("w{w}-b{b}-{i}");
                                let pad = "x".repeat(1000);
                                cb(
                                    &r,
                                    &format!("{{\"requestId\":\"{r}\",\"p\":\"{pad}\"}}"),
                                    &["usage_date=2021-08-15"],
                                    None,
                                )
                            })
                            .collect();
                        journal(&mut store, &batch, DAY0);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer");
        }
        let n = writers * batches * per_batch;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "journal_throughput: {writers} writers x {per_batch} per commit: {n} callbacks in {secs:.2} s = {:.0}/s, {:.2} ms per commit",
            n as f64 / secs,
            secs * 1000.0 / (writers * batches) as f64 * writers as f64
        );
    }
}
