//! The real servers of the scale-out tests, PostgreSQL and S3 (SeaweedFS), found through the
//! environment that `scripts/services.sh start` prints and `.ci/run` exports. Outside CI a test
//! without them says SKIPPED loudly and returns; under CI (`CI` set) it fails instead.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// The value of `var`; `None` (after a loud SKIPPED line) when it is unset outside CI.
/// Panics under CI: there the servers must be there.
fn required(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var_os("CI").is_some() => panic!("CI must provide {var}"),
        _ => {
            eprintln!("SKIPPED (no {what}): set {var}, see docs/development.md");
            None
        }
    }
}

/// `TSUSAGE_TEST_PG_URL`, e.g. `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn pg_url() -> Option<String> {
    required("TSUSAGE_TEST_PG_URL", "PostgreSQL")
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

pub fn s3() -> Option<S3> {
    Some(S3 {
        endpoint: required("TSUSAGE_TEST_S3_ENDPOINT", "S3")?,
        bucket: required("TSUSAGE_TEST_S3_BUCKET", "S3")?,
        access_key_id: required("AWS_ACCESS_KEY_ID", "S3")?,
        secret_access_key: required("AWS_SECRET_ACCESS_KEY", "S3")?,
        region: required("AWS_REGION", "S3")?,
    })
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
fn postgresql_answers_at_the_test_url_and_lets_the_test_user_in() {
    let Some(url) = pg_url() else { return };
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
fn s3_stores_and_returns_an_object_with_the_test_credentials() {
    let Some(s3) = s3() else { return };
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
