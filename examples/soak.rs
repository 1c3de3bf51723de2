//! Soak: `tsusage listen` as an operator runs it, under sustained load for a given time, killed with
//! SIGKILL and restarted at once a few times, on one store. Every `SAMPLE` seconds it samples the
//! listener's RSS, the callbacks acknowledged since the last sample and the store's size; at the end
//! it checks that every acknowledged callback is in the journal and prints a table.
//!
//!   cargo build --release --bin tsusage --example soak
//!   target/release/examples/soak [SECS] [KILLS] [CONNECTIONS]
//!
//! Defaults: 600 s, 3 kills (evenly spaced), 128 keep-alive loopback connections, each sending
//! distinct 10-record usage callbacks one after another; a callback not answered 200 (the listener
//! is down, or answered 503) is sent again, as the vendor does, until it is. The store is a fresh
//! SQLite file under `$SOAK_DIR` (default: a new temporary directory), or, with `SOAK_PG_URL`
//! set, that PostgreSQL database (its `public` schema is emptied first). `SOAK_BIN` names the
//! binary (default: `tsusage` beside this example's directory). `benches/compare/soak.sh` runs it.
//!
//! The load generator shares the machine with the listener (one thread of its own).

#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Seconds between samples.
const SAMPLE: u64 = 10;
/// Usage records per callback.
const RECORDS: usize = 10;
const USER: &str = "soak-user";
const PASS: &str = "soak-secret";
const ACCOUNT: &str = "0000123456-00001";

/// Where the listener journals.
enum StoreAt {
    Sqlite(PathBuf),
    Postgres(String),
}

struct Listener {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    store: StoreAt,
    child: Child,
}

impl Listener {
    fn spawn(bin: &Path, dir: &Path, port: u16, store: StoreAt) -> Result<Listener> {
        let child = start(bin, dir, &store)?;
        Ok(Listener {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            port,
            store,
            child,
        })
    }

    /// SIGKILL, then a new process on the same store at once; how long until it serves again.
    fn kill_and_restart(&mut self) -> Result<Duration> {
        self.child.kill()?;
        self.child.wait()?;
        let started = Instant::now();
        self.child = start(&self.bin, &self.dir, &self.store)?;
        wait_healthy(self.port, Duration::from_secs(60))?;
        Ok(started.elapsed())
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()));
        status
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// SIGTERM: in-flight requests finish, the run report is written. Returns the store.
    fn stop(mut self) -> Result<StoreAt> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        Ok(self.store)
    }
}

fn start(bin: &Path, dir: &Path, store: &StoreAt) -> Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(["listen", "--config"])
        .arg(dir.join("tsusage.toml"))
        .current_dir(dir)
        .env("TSUSAGE_CALLBACKS__USERNAME", USER)
        .env("TSUSAGE_CALLBACKS__PASSWORD", PASS)
        .env("TSUSAGE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let StoreAt::Postgres(url) = store {
        cmd.env("TSUSAGE_STATE__URL", url);
    }
    Ok(cmd.spawn()?)
}

fn wait_healthy(port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("the listener on port {port} did not become healthy in {within:?}").into())
}

/// A valid-Luhn ICCID (20 digits).
fn iccid(i: u64) -> String {
    let body = format!("8914800000{:09}", i % 1_000_000_000);
    let digit = tsusage::ingest::luhn_check_digit(body.as_bytes());
    format!("{body}{digit}")
}

/// The callback `seq` of connection `conn` in soak `nonce`: distinct requestId, ICCIDs and counts
/// (a soak on a store an earlier soak filled sends new callbacks, not redeliveries).
fn callback(nonce: u64, conn: usize, seq: u64) -> String {
    let mut records = Vec::with_capacity(RECORDS);
    for r in 0..RECORDS as u64 {
        let device = (conn as u64 * 7919 + seq * RECORDS as u64 + r) % 100_000;
        let day = (seq + r) % 28 + 1;
        records.push(format!(
            r#"{{"deviceIdentifierCollection":[{{"id":"{}","kind":"ICCID"}}],"dataUsage":"{}","smsUsage":"{}","moSms":"1","mtSms":"0","startDate":"2026-11-{day:02}T00:00:00.0000000","endDate":"2026-11-{day:02}T23:59:59.0000000"}}"#,
            iccid(device),
            seq * 1024 + r,
            r % 5,
        ));
    }
    format!(
        r#"{{"username":"{USER}","password":"{PASS}","requestId":"soak{nonce}-{conn}-{seq}","deviceResponse":{{"devicePromoUsageResponse":[{}]}},"callbackCount":1,"maxCallbackThreshold":4}}"#,
        records.join(",")
    )
}

/// One connection's sender: callbacks in order, each until it is answered 200. Returns how many
/// were acknowledged (0..n all were).
async fn sender(
    client: reqwest::Client,
    url: String,
    nonce: u64,
    conn: usize,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut seq = 0u64;
    let mut body = callback(nonce, conn, seq);
    while !stop.load(Ordering::Relaxed) {
        let answered = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match answered {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                acked.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                body = callback(nonce, conn, seq);
            }
            // Down (killed, restarting) or 503: the vendor sends it again later.
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    seq
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The store's size on disk: the SQLite files and segments, or the PostgreSQL database.
async fn store_bytes(store: &StoreAt, pg: Option<&tokio_postgres::Client>) -> u64 {
    match (store, pg) {
        (StoreAt::Sqlite(dir), _) => dir_bytes(dir),
        (StoreAt::Postgres(_), Some(client)) => client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map_or(0, |row| row.get::<_, i64>(0).max(0) as u64),
        (StoreAt::Postgres(_), None) => 0,
    }
}

/// The requestIds in the journal.
async fn journaled_ids(
    store: &StoreAt,
    pg: Option<&tokio_postgres::Client>,
) -> Result<Vec<String>> {
    match (store, pg) {
        (StoreAt::Sqlite(dir), _) => {
            let db = rusqlite::Connection::open(dir.join("tsusage.db"))?;
            let mut stmt = db.prepare("SELECT request_id FROM callbacks")?;
            let ids = stmt
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(ids)
        }
        (StoreAt::Postgres(_), Some(client)) => Ok(client
            .query("SELECT request_id FROM callbacks", &[])
            .await?
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect()),
        (StoreAt::Postgres(_), None) => Err("no PostgreSQL connection".into()),
    }
}

/// One sample: callbacks/s since the last sample, the listener's RSS and the store's size (bytes),
/// and whether the listener was restarted in the interval.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rate: f64,
    rss: u64,
    size: u64,
    restarted: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let secs = arg(0, 600);
    let kills = arg(1, 3);
    let connections = arg(2, 128) as usize;

    let bin = match std::env::var_os("SOAK_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .ok_or("no directory above the example")?
            .join("tsusage"),
    };
    let dir = match std::env::var_os("SOAK_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("tsusage-soak-{}", std::process::id())),
    };
    std::fs::create_dir_all(dir.join("state"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (store, pg) = match std::env::var("SOAK_PG_URL") {
        Ok(url) => {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
                .await?;
            (StoreAt::Postgres(url), Some(client))
        }
        Err(_) => (StoreAt::Sqlite(dir.join("state")), None),
    };
    // The PostgreSQL URL comes from the environment (TSUSAGE_STATE__URL), as a password should.
    let state = match &store {
        StoreAt::Sqlite(_) => "[state]\npath = \"state/tsusage.db\"\n",
        StoreAt::Postgres(_) => "",
    };
    std::fs::write(
        dir.join("tsusage.toml"),
        format!(
            "account_name = \"{ACCOUNT}\"\n[callbacks]\nsource = \"external\"\n\
             listen_addr = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}/callbacks\"\n\
             max_connections = {}\n[output]\ndir = \"out\"\n{state}",
            connections + 16
        ),
    )?;
    let backend = match &store {
        StoreAt::Sqlite(_) => "SQLite",
        StoreAt::Postgres(_) => "PostgreSQL",
    };
    println!(
        "soak: tsusage listen on {backend}, {secs} s, {kills} kills, {connections} connections, \
         {RECORDS} records per callback, in {}",
        dir.display()
    );
    let mut listener = Listener::spawn(&bin, &dir, port, store)?;
    wait_healthy(port, Duration::from_secs(60))?;

    tsusage::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("http://127.0.0.1:{port}/callbacks");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..connections)
        .map(|conn| {
            tokio::spawn(sender(
                client.clone(),
                url.clone(),
                nonce,
                conn,
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let started = Instant::now();
    let kill_at: Vec<u64> = (1..=kills).map(|k| secs * k / (kills + 1)).collect();
    let mut killed = 0usize;
    let mut restarts = Vec::new();
    let mut last = 0u64;
    let mut samples: Vec<Sample> = Vec::new();
    println!(
        "{:>6} {:>12} {:>9} {:>9} {:>12}",
        "t (s)", "callbacks/s", "RSS MB", "store GB", "acknowledged"
    );
    let mut tick = tokio::time::interval(Duration::from_secs(SAMPLE));
    tick.tick().await;
    let mut restarted = false;
    loop {
        tick.tick().await;
        let elapsed = started.elapsed().as_secs();
        let now = acked.load(Ordering::Relaxed);
        let rate = (now - last) as f64 / SAMPLE as f64;
        last = now;
        let rss = listener.rss_bytes();
        let size = store_bytes(&listener.store, pg.as_ref()).await;
        println!(
            "{elapsed:>6} {rate:>12.0} {:>9.1} {:>9.2} {now:>12}{}",
            rss as f64 / 1e6,
            size as f64 / 1e9,
            if restarted { "  (restarted)" } else { "" }
        );
        samples.push(Sample {
            rate,
            rss,
            size,
            restarted,
        });
        restarted = false;
        if elapsed >= secs {
            break;
        }
        if killed < kill_at.len() && elapsed >= kill_at[killed] {
            // The kill runs on this thread: the senders pause with it for the few milliseconds a
            // restart takes, as they would wait for an answer anyway.
            let took = listener.kill_and_restart()?;
            println!("       kill -9 and restart: serving again after {took:?}");
            restarts.push(took);
            killed += 1;
            restarted = true;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent_by = Vec::with_capacity(connections);
    for s in senders {
        sent_by.push(s.await?);
    }
    let total: u64 = sent_by.iter().sum();
    let store = listener.stop()?;

    // Every acknowledged callback is in the journal.
    let ids = journaled_ids(&store, pg.as_ref()).await?;
    let mut have: Vec<Vec<bool>> = sent_by.iter().map(|&n| vec![false; n as usize]).collect();
    for id in &ids {
        let Some((conn, seq)) = id
            .strip_prefix(format!("soak{nonce}-").as_str())
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        if let (Ok(conn), Ok(seq)) = (conn.parse::<usize>(), seq.parse::<usize>())
            && let Some(slot) = have.get_mut(conn).and_then(|h| h.get_mut(seq))
        {
            *slot = true;
        }
    }
    let missing: usize = have.iter().flatten().filter(|h| !**h).count();

    // Minute by minute: throughput (median of the samples) and RSS.
    let per_minute = 60 / SAMPLE as usize;
    let minutes: Vec<&[Sample]> = samples.chunks(per_minute).collect();
    let first = minutes
        .first()
        .map(|m| median(m.iter().map(|s| s.rate).collect()));
    let last_minute = minutes
        .iter()
        .rev()
        .find(|m| m.len() == per_minute)
        .copied()
        .or(minutes.last().copied())
        .unwrap_or(&[]);
    let last_rate = median(last_minute.iter().map(|s| s.rate).collect());
    // RSS after warm-up: the first minute's end, then every sample not right after a restart.
    let warm: Vec<u64> = samples
        .iter()
        .skip(per_minute - 1)
        .filter(|s| !s.restarted)
        .map(|s| s.rss)
        .collect();
    let rss_first = warm.first().copied().unwrap_or(0);
    let rss_last = warm.last().copied().unwrap_or(0);
    let rss_max = warm.iter().copied().max().unwrap_or(0);
    let size_last = samples.last().map_or(0, |s| s.size);
    println!();
    println!("| {backend} | {secs} s, {kills} kills |");
    println!("|---|---|");
    println!("| acknowledged | {total} |");
    println!(
        "| in the journal, of those | {} (missing {missing}) |",
        total as usize - missing
    );
    println!(
        "| restarts serving again after | {} |",
        restarts
            .iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| callbacks/s, first minute → last minute (median of {SAMPLE} s samples) | {:.0} → {last_rate:.0} ({:.2}x) |",
        first.unwrap_or(0.0),
        last_rate / first.unwrap_or(f64::NAN)
    );
    println!(
        "| RSS after warm-up: first, last, max | {:.1}, {:.1}, {:.1} MB ({:+.1} % last vs first) |",
        rss_first as f64 / 1e6,
        rss_last as f64 / 1e6,
        rss_max as f64 / 1e6,
        (rss_last as f64 / rss_first.max(1) as f64 - 1.0) * 100.0
    );
    println!("| store at the end | {:.2} GB |", size_last as f64 / 1e9);
    if missing > 0 {
        return Err(format!("{missing} acknowledged callbacks are not in the journal").into());
    }
    Ok(())
}
