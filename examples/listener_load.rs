//! Listener throughput: durable callbacks/s (journaled with group commit, 2xx after the commit)
//! against the same server with journaling switched off (a store that keeps nothing); with
//! `TSUSAGE_TEST_PG_URL` set, also on PostgreSQL with one and with three listeners (its database's
//! `public` schema is emptied before each run).
//!
//!   cargo run --release --example listener_load -- [CALLBACKS] [CONCURRENCY] [RECORDS]
//!
//! Defaults: 5,000 callbacks of 100 usage records, 32 concurrent loopback connections. The load
//! generator runs in the same process and shares the machine's cores with the server.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tsusage::collect::Intake;
use tsusage::collect::http_listener::{self, ListenerState};
use tsusage::config::{CallbacksConfig, PartitionBy, Secret};
use tsusage::plan::Job;
use tsusage::state::{
    ArchiveFile, ArchivedCallback, FinishedRun, JobUpdate, JournalEntry, Journaled, NewCallback,
    OutstandingJob, PendingPartition, PruneCounts, RecordedRequest, RunGuard, SqliteStore,
    StateError, Store, StoredCallback, WindowStatusCount,
};
use tsusage::write::rejects::RecordRejects;

/// The same server with journaling switched off: every callback is "journaled" into nothing.
struct NullStore(i64);

impl Store for NullStore {
    fn lock(&self, _: &str, _: &str) -> Result<RunGuard, StateError> {
        Ok(RunGuard::new(()))
    }
    fn lock_shared(&self, _: &str, _: &str) -> Result<RunGuard, StateError> {
        Ok(RunGuard::new(()))
    }
    fn lock_publish(&self, _: &str) -> Result<Option<RunGuard>, StateError> {
        Ok(None)
    }
    fn shares_work(&self) -> bool {
        false
    }
    fn clock_ms(&self) -> Result<i64, StateError> {
        Ok(0)
    }
    fn claim_jobs(
        &mut self,
        job_ids: &[&str],
        _: &str,
        _: i64,
        _: i64,
        max: usize,
    ) -> Result<Vec<String>, StateError> {
        Ok(job_ids.iter().take(max).map(|s| (*s).to_owned()).collect())
    }
    fn renew_claims(&mut self, _: &str, job_ids: &[&str], _: i64) -> Result<u64, StateError> {
        Ok(job_ids.len() as u64)
    }
    fn release_claims(&mut self, _: &str, _: &[&str]) -> Result<(), StateError> {
        Ok(())
    }
    fn take_tokens(&mut self, _: &str, _: f64, _: f64, want: u32) -> Result<u32, StateError> {
        Ok(want)
    }
    fn callbacks_since(&self, _: i64, _: usize) -> Result<Vec<JournalEntry>, StateError> {
        Ok(Vec::new())
    }
    fn last_run(&self) -> Result<Option<FinishedRun>, StateError> {
        Ok(None)
    }
    fn outstanding_jobs(&self) -> Result<Vec<OutstandingJob>, StateError> {
        Ok(Vec::new())
    }
    fn window_status_counts(&self, _: &str, _: &str) -> Result<Vec<WindowStatusCount>, StateError> {
        Ok(Vec::new())
    }
    fn job_status_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        Ok(Default::default())
    }
    fn record_jobs(&mut self, _: &[Job]) -> Result<u64, StateError> {
        Ok(0)
    }
    fn job_statuses(
        &self,
        _: &[&str],
    ) -> Result<HashMap<String, tsusage::state::JobStatus>, StateError> {
        Ok(HashMap::new())
    }
    fn apply_job_updates(&mut self, _: &[JobUpdate]) -> Result<(), StateError> {
        Ok(())
    }
    fn begin_run(&mut self, _: &str, _: &str) -> Result<(), StateError> {
        Ok(())
    }
    fn finish_run(&mut self, _: &str, _: u8, _: &str) -> Result<(), StateError> {
        Ok(())
    }
    fn journal(&mut self, batch: &[NewCallback<'_>], _: i64) -> Result<Vec<Journaled>, StateError> {
        Ok(batch
            .iter()
            .map(|_| {
                self.0 += 1;
                Journaled::New(self.0)
            })
            .collect())
    }
    fn pending_partitions(&self) -> Result<Vec<PendingPartition>, StateError> {
        Ok(Vec::new())
    }
    fn callbacks_for_partition(
        &self,
        _: &str,
        _: i64,
        _: &mut dyn FnMut(StoredCallback) -> std::ops::ControlFlow<()>,
    ) -> Result<(), StateError> {
        Ok(())
    }
    fn mark_written(&mut self, _: &str, _: i64, _: u64, _: u64, _: &str) -> Result<(), StateError> {
        Ok(())
    }
    fn request_accounts(&self, _: &[&str]) -> Result<HashMap<String, String>, StateError> {
        Ok(HashMap::new())
    }
    fn partition_callbacks(&self, _: &str, _: i64) -> Result<u64, StateError> {
        Ok(0)
    }
    fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
    fn journal_len(&self) -> Result<u64, StateError> {
        Ok(0)
    }
    fn journal_high_water(&self) -> Result<i64, StateError> {
        Ok(self.0)
    }
    fn requests_of_jobs(&self, _: &[&str]) -> Result<Vec<RecordedRequest>, StateError> {
        Ok(Vec::new())
    }
    fn archivable(
        &self,
        _: i64,
        _: &mut dyn FnMut(ArchivedCallback) -> std::ops::ControlFlow<()>,
    ) -> Result<(), StateError> {
        Ok(())
    }
    fn archive_files(&self) -> Result<std::collections::BTreeSet<String>, StateError> {
        Ok(Default::default())
    }
    fn partition_archives(&self, _: &str) -> Result<Vec<String>, StateError> {
        Ok(Vec::new())
    }
    fn commit_archive(
        &mut self,
        _: &[ArchiveFile],
        _: &[i64],
        _: i64,
        _: &str,
    ) -> Result<PruneCounts, StateError> {
        Ok(PruneCounts::default())
    }
    fn reclaim_space(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    fn callbacks_of_requests(
        &self,
        _: &[&str],
        _: i64,
        _: &mut dyn FnMut(i64, String, String),
    ) -> Result<(), StateError> {
        Ok(())
    }
}

fn bodies(callbacks: usize, records: usize) -> Vec<String> {
    (0..callbacks)
        .map(|c| {
            let recs: Vec<String> = (0..records)
                .map(|r| {
                    let n = (c * records + r) as u64;
                    format!(
                        r#"{{"deviceIdentifierCollection":[{{"id":"8914800000{:010}","kind":"ICCID"}}],"dataUsage":"{}","smsUsage":"{}","moSms":"1","mtSms":"2","startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000"}}"#,
                        n,
                        n * 7919 % 50_000_000,
                        n % 30
                    )
                })
                .collect();
            format!(
                r#"{{"username":"load","password":"load-secret","requestId":"req-{c}","deviceResponse":{{"devicePromoUsageResponse":[{}]}},"callbackCount":1,"maxCallbackThreshold":4}}"#,
                recs.join(",")
            )
        })
        .collect()
}

async fn serve(
    store: Box<dyn Store + Send>,
    out: &std::path::Path,
) -> Result<
    (http_listener::ListenerHandle, Arc<tsusage::collect::Writer>),
    Box<dyn std::error::Error>,
> {
    let config = CallbacksConfig {
        listen_addr: "127.0.0.1:0".parse()?,
        public_url: "http://127.0.0.1/callbacks".into(),
        username: Some(Secret::new("load")),
        password: Some(Secret::new("load-secret")),
        ..CallbacksConfig::default()
    };
    let writer = Arc::new(tsusage::collect::Writer::spawn(store, "load".into()));
    let state = Arc::new(ListenerState::new(
        &config,
        writer.clone(),
        Intake::new(false, PartitionBy::Day),
        RecordRejects::new(out.join("rejects.jsonl")),
    )?);
    Ok((http_listener::start(&config, state).await?, writer))
}

/// Posts every body with `concurrency` connections; returns (seconds, callbacks answered 200).
async fn load(addr: SocketAddr, bodies: Arc<Vec<String>>, concurrency: usize) -> (f64, usize) {
    load_spread(&[addr], bodies, concurrency).await
}

/// CPU seconds (user + system) this process has used so far, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` writes into the zeroed struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// "N cores busy, M µs of CPU per callback" for a phase that used `cpu` CPU-s in `secs`.
fn cpu_use(cpu: f64, secs: f64, callbacks: usize) -> String {
    format!(
        "{:.2} cores busy, {:.0} µs CPU per callback",
        cpu / secs,
        cpu * 1e6 / callbacks.max(1) as f64
    )
}

/// [`load`] over several listeners: callback `i` goes to listener `i % addrs.len()`.
async fn load_spread(
    addrs: &[SocketAddr],
    bodies: Arc<Vec<String>>,
    concurrency: usize,
) -> (f64, usize) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap_or_default();
    let urls: Arc<Vec<String>> = Arc::new(
        addrs
            .iter()
            .map(|a| format!("http://{a}/callbacks"))
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, urls, next, bodies) =
            (client.clone(), urls.clone(), next.clone(), bodies.clone());
        tasks.spawn(async move {
            let mut ok = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let sent = client
                    .post(&urls[i % urls.len()])
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(n) = tasks.join_next().await {
        ok += n.unwrap_or(0);
    }
    (started.elapsed().as_secs_f64(), ok)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let callbacks = args.next().transpose()?.unwrap_or(5_000);
    let concurrency = args.next().transpose()?.unwrap_or(32);
    let records = args.next().transpose()?.unwrap_or(100);
    let bodies = Arc::new(bodies(callbacks, records));
    let mb = bodies.iter().map(String::len).sum::<usize>() as f64 / 1e6;
    println!("{callbacks} callbacks x {records} records ({mb:.0} MB), {concurrency} connections");

    let dir = tempfile::tempdir()?;
    let (handle, writer) = serve(Box::new(NullStore(0)), dir.path()).await?;
    let cpu = cpu_seconds();
    let (secs, ok) = load(handle.addr, bodies.clone(), concurrency).await;
    let cpu = cpu_seconds() - cpu;
    handle.shutdown(Duration::from_secs(5)).await;
    drop(writer);
    let off = ok as f64 / secs;
    println!(
        "journaling off:     {ok} answered 200 in {secs:.2} s: {off:.0} callbacks/s ({})",
        cpu_use(cpu, secs, ok)
    );

    let store = SqliteStore::open(&dir.path().join("state/tsusage.db"))?;
    let (handle, writer) = serve(Box::new(store), dir.path()).await?;
    let cpu = cpu_seconds();
    let (secs, ok) = load(handle.addr, bodies.clone(), concurrency).await;
    let cpu = cpu_seconds() - cpu;
    handle.shutdown(Duration::from_secs(5)).await;
    let store = tsusage::collect::Writer::finish_shared(writer)?;
    let on = ok as f64 / secs;
    println!(
        "journaled (durable): {ok} answered 200 in {secs:.2} s: {on:.0} callbacks/s ({} in the journal; {})",
        store.journal_len()?,
        cpu_use(cpu, secs, ok)
    );
    println!("durable / off = {:.2}", on / off);

    // The same on PostgreSQL (`TSUSAGE_TEST_PG_URL`, emptied before each run): one listener, then
    // three listeners (each its own store and writer, as three replicas) sharing the load.
    let Ok(url) = std::env::var("TSUSAGE_TEST_PG_URL") else {
        println!("PostgreSQL: set TSUSAGE_TEST_PG_URL to measure it too");
        return Ok(());
    };
    for replicas in [1usize, 3] {
        empty_database(&url).await?;
        let mut handles = Vec::new();
        for _ in 0..replicas {
            let store = tsusage::state::PgStore::open(&url)?;
            handles.push(serve(Box::new(store), dir.path()).await?);
        }
        let addrs: Vec<SocketAddr> = handles.iter().map(|(h, _)| h.addr).collect();
        let (secs, ok) = load_spread(&addrs, bodies.clone(), concurrency).await;
        let mut journaled = 0;
        for (handle, writer) in handles {
            handle.shutdown(Duration::from_secs(5)).await;
            journaled = tsusage::collect::Writer::finish_shared(writer)?.journal_len()?;
        }
        let pg = ok as f64 / secs;
        println!(
            "PostgreSQL, {replicas} listener(s): {ok} answered 200 in {secs:.2} s: {pg:.0} callbacks/s ({journaled} in the journal); vs SQLite {:.2}",
            pg / on
        );
    }
    Ok(())
}

/// Drops everything in the database's `public` schema.
async fn empty_database(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    client
        .batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        .await?;
    drop(client);
    let _ = conn.await;
    Ok(())
}
