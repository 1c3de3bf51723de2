//! The real servers of the scale-out tests, PostgreSQL and S3 (SeaweedFS), from one of:
//!
//! 1. the environment that `scripts/services.sh start` prints and `.ci/run` exports
//!    (`TSUSAGE_TEST_PG_URL`; `TSUSAGE_TEST_S3_ENDPOINT`, `TSUSAGE_TEST_S3_BUCKET` and the `AWS_*`
//!    credentials);
//! 2. under CI (`CI` set), nothing else: a missing variable fails the test;
//! 3. otherwise this test process starts them itself, once, when the first test asks for one:
//!    `scripts/services.sh start` with a `SERVICES_DIR` of the process's own (so that parallel test
//!    processes do not share servers), stopped again by an `atexit` hook when the process exits. A
//!    failed start fails every test that needs a server, with the script's stderr.
//!
//! Where the servers cannot be started (build.rs looks for initdb, pg_ctl, python3 and curl, and
//! honours `TSUSAGE_TEST_NO_SERVERS=1`), the tests that need them are compiled with
//! `#[cfg_attr(tsusage_no_pg, ignore = "…")]` / `tsusage_no_s3`: libtest reports them as ignored,
//! with the reason, never as passed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A variable's value, `None` when unset or empty.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The servers this process started: their variables, as `scripts/services.sh start` printed them.
#[derive(Debug)]
struct Started {
    vars: BTreeMap<String, String>,
}

/// The `SERVICES_DIR` of the servers this process started (set before the start, for the stop).
static SERVICES_DIR: OnceLock<PathBuf> = OnceLock::new();

fn services_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh")
}

/// The servers of this process, started by the first caller; every caller panics with the
/// script's output when the start failed.
fn started() -> &'static Started {
    static STARTED: OnceLock<Result<Started, String>> = OnceLock::new();
    match STARTED.get_or_init(start) {
        Ok(started) => started,
        Err(why) => panic!("{why}"),
    }
}

fn start() -> Result<Started, String> {
    let dir = std::env::temp_dir().join(format!("tsusage-test-services-{}", std::process::id()));
    let script = services_script();
    if SERVICES_DIR.set(dir.clone()).is_ok() {
        // SAFETY: `stop_at_exit` is a plain `extern "C" fn` that never unwinds; registering it
        // has no other precondition.
        if unsafe { libc::atexit(stop_at_exit) } != 0 {
            return Err("atexit failed: the servers would not be stopped".to_owned());
        }
    }
    let began = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg("start")
        .env("SERVICES_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "the test servers did not start ({} start, SERVICES_DIR={}, {}):\n{stderr}\
             (set TSUSAGE_TEST_NO_SERVERS=1 to skip these tests, see docs/development.md)",
            script.display(),
            dir.display(),
            out.status
        ));
    }
    let vars = parse_exports(&String::from_utf8_lossy(&out.stdout));
    for (name, value) in S3_CREDENTIALS {
        if vars.get(name).map(String::as_str) != Some(value) {
            return Err(format!(
                "{} start printed {name}={:?}, but this process set {value:?} before main \
                 (S3_CREDENTIALS in tests/integration/servers.rs): keep the two equal",
                script.display(),
                vars.get(name)
            ));
        }
    }
    eprintln!(
        "servers: started by this test process in {:.1} s (SERVICES_DIR={}):\n{stderr}",
        began.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(Started { vars })
}

/// The test-only S3 credentials `scripts/services.sh` configures its server with, and prints.
const S3_CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "tsusage-test"),
    ("AWS_SECRET_ACCESS_KEY", "tsusage-test-secret"),
    ("AWS_REGION", "us-east-1"),
];

/// The code under test reads the S3 credentials from the process environment (an in-process run,
/// and the `tsusage` processes the tests start), as under .ci/run, which exports them. Where this
/// process may start the S3 server itself, they are set here, before `main`: setting the
/// environment once test threads run would race with C code reading it (glibc before 2.40).
/// `start` checks that the script printed the same values.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static SET_S3_CREDENTIALS: extern "C" fn() = set_s3_credentials;

#[cfg(target_os = "linux")]
extern "C" fn set_s3_credentials() {
    if cfg!(tsusage_no_s3)
        || std::env::var_os("CI").is_some()
        || var("TSUSAGE_TEST_S3_ENDPOINT").is_some()
    {
        return;
    }
    for (name, value) in S3_CREDENTIALS {
        // SAFETY: this runs from .init_array, before `main`: the process has one thread.
        unsafe { std::env::set_var(name, value) };
    }
}

/// Stops the servers this process started, as it exits (libtest returns from `main` after its
/// summary, so `atexit` hooks run).
extern "C" fn stop_at_exit() {
    let Some(dir) = SERVICES_DIR.get() else {
        return;
    };
    let _ = Command::new("bash")
        .arg(services_script())
        .arg("stop")
        .env("SERVICES_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
}

/// `export K='V'` lines, as `scripts/services.sh start` prints them.
fn parse_exports(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| {
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(v);
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// `name` as printed by the servers this process starts; under CI, which must provide them, a
/// panic instead.
fn started_var(name: &str) -> String {
    if std::env::var_os("CI").is_some() {
        panic!("CI must provide {name}");
    }
    started()
        .vars
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("scripts/services.sh start printed no {name}"))
}

/// `TSUSAGE_TEST_PG_URL`, e.g. `postgres://postgres@127.0.0.1:5432/postgres`: from the environment,
/// else from the servers this process starts. A test calling this is marked
/// `#[cfg_attr(tsusage_no_pg, ignore = "…")]`.
pub fn pg_url() -> String {
    var("TSUSAGE_TEST_PG_URL").unwrap_or_else(|| {
        if cfg!(tsusage_no_pg) {
            panic!(
                "no PostgreSQL for the tests: built without one (initdb/pg_ctl/python3/curl not \
                 found, or TSUSAGE_TEST_NO_SERVERS=1); set TSUSAGE_TEST_PG_URL, see \
                 docs/development.md"
            );
        }
        started_var("TSUSAGE_TEST_PG_URL")
    })
}

/// The S3 server of the tests, with the standard AWS credentials.
#[derive(Debug, Clone)]
pub struct S3 {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    /// A bucket that exists.
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

/// The S3 server: from the environment (`TSUSAGE_TEST_S3_ENDPOINT` and the rest, all of them),
/// else from the servers this process starts. A test calling this is marked
/// `#[cfg_attr(tsusage_no_s3, ignore = "…")]`.
pub fn s3() -> S3 {
    let get: fn(&str) -> String = if var("TSUSAGE_TEST_S3_ENDPOINT").is_some() {
        |name| var(name).unwrap_or_else(|| panic!("TSUSAGE_TEST_S3_ENDPOINT is set, {name} is not"))
    } else if cfg!(tsusage_no_s3) {
        panic!(
            "no S3 server for the tests: built without one (initdb/pg_ctl/python3/curl not \
             found, or TSUSAGE_TEST_NO_SERVERS=1); set TSUSAGE_TEST_S3_ENDPOINT, see \
             docs/development.md"
        );
    } else {
        started_var
    };
    S3 {
        endpoint: get("TSUSAGE_TEST_S3_ENDPOINT"),
        bucket: get("TSUSAGE_TEST_S3_BUCKET"),
        access_key_id: get("AWS_ACCESS_KEY_ID"),
        secret_access_key: get("AWS_SECRET_ACCESS_KEY"),
        region: get("AWS_REGION"),
    }
}

/// `(user, host:port, database)` of a `postgres://user@host:port/database` URL.
fn pg_parts(url: &str) -> (String, String, String) {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .unwrap_or_else(|| panic!("not a postgres:// URL: {url}"));
    let (authority, database) = rest.split_once('/').unwrap_or((rest, "postgres"));
    let database = database.split('?').next().unwrap_or("postgres");
    let (user, address) = authority
        .rsplit_once('@')
        .unwrap_or(("postgres", authority));
    let user = user.split(':').next().unwrap_or(user);
    (user.to_owned(), address.to_owned(), database.to_owned())
}

#[test]
#[cfg_attr(
    tsusage_no_pg,
    ignore = "no PostgreSQL here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn postgresql_answers_at_the_test_url_and_lets_the_test_user_in() {
    let url = pg_url();
    let (user, address, database) = pg_parts(&url);
    assert!(
        address.starts_with("127.0.0.1:") || address.starts_with("localhost:"),
        "tests use loopback only: {address}"
    );
    let mut stream = TcpStream::connect(&address).unwrap_or_else(|e| panic!("{address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The protocol 3.0 startup message; a trust-authenticated server answers AuthenticationOk.
    let mut body = Vec::new();
    body.extend_from_slice(&196_608_i32.to_be_bytes());
    for (k, v) in [("user", user.as_str()), ("database", database.as_str())] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    stream.write_all(&message).expect("startup");
    let mut answer = [0u8; 9];
    stream.read_exact(&mut answer).expect("an answer");
    assert_eq!(
        answer,
        [b'R', 0, 0, 0, 8, 0, 0, 0, 0],
        "AuthenticationOk from {address} (an 'E' is an error message)"
    );
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
}

/// A signed request to the S3 server with curl (`--aws-sigv4`): `(status, body)`.
fn s3_request(s3: &S3, method: &str, key: &str, data: Option<&str>) -> (u16, String) {
    let url = format!("{}/{}/{key}", s3.endpoint, s3.bucket);
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-X", method])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", s3.region))
        .arg("--user")
        .arg(format!("{}:{}", s3.access_key_id, s3.secret_access_key))
        .args(["-w", "\n%{http_code}"]);
    if let Some(data) = data {
        cmd.args(["--data-binary", data]);
    }
    let out = cmd.arg(&url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
#[cfg_attr(
    tsusage_no_s3,
    ignore = "no S3 server here: initdb/pg_ctl/python3/curl not found or TSUSAGE_TEST_NO_SERVERS=1, see docs/development.md"
)]
fn s3_stores_and_returns_an_object_with_the_test_credentials() {
    let s3 = s3();
    assert!(
        s3.endpoint.starts_with("http://127.0.0.1:")
            || s3.endpoint.starts_with("http://localhost:"),
        "tests use loopback only: {}",
        s3.endpoint
    );
    let key = format!("servers-test/{}.txt", std::process::id());
    assert_eq!(s3_request(&s3, "PUT", &key, Some("hello")).0, 200);
    assert_eq!(
        s3_request(&s3, "GET", &key, None),
        (200, "hello".to_owned())
    );
    let (status, _) = s3_request(&s3, "DELETE", &key, None);
    assert!(status == 204 || status == 200, "DELETE: {status}");
    assert_eq!(s3_request(&s3, "GET", &key, None).0, 404);
    // Wrong credentials are refused: the server checks signatures.
    let wrong = S3 {
        secret_access_key: "wrong".to_owned(),
        ..s3.clone()
    };
    assert_eq!(s3_request(&wrong, "PUT", &key, Some("x")).0, 403);
}

#[test]
fn postgres_urls_are_read_as_user_address_and_database() {
    assert_eq!(
        pg_parts("postgres://postgres@127.0.0.1:55432/postgres"),
        (
            "postgres".to_owned(),
            "127.0.0.1:55432".to_owned(),
            "postgres".to_owned()
        )
    );
    assert_eq!(
        pg_parts("postgresql://u:pw@localhost:5432/db?sslmode=disable").1,
        "localhost:5432"
    );
}

#[test]
fn the_export_lines_of_the_services_script_are_read_as_variables() {
    let vars = parse_exports(
        "export TSUSAGE_TEST_PG_URL='postgres://postgres@127.0.0.1:5/postgres'\n\
         export AWS_REGION='us-east-1'\nnot an export\n",
    );
    assert_eq!(vars.len(), 2);
    assert_eq!(
        vars["TSUSAGE_TEST_PG_URL"],
        "postgres://postgres@127.0.0.1:5/postgres"
    );
    assert_eq!(vars["AWS_REGION"], "us-east-1");
}
