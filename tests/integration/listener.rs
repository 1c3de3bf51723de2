//! The listener facing the internet: wrong paths and methods, slow clients, addresses not allowed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use tsusage::state::Store as _;

use crate::util::*;

/// Sends raw bytes, returns the status code (0 when the connection closed without an answer).
fn raw(port: u16, request: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn stop(child: std::process::Child) -> std::process::Output {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait_with_output().expect("listen ends")
}

#[test]
fn other_paths_methods_and_slow_headers_are_refused() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(
        &ws,
        port,
        &[("TSUSAGE_CALLBACKS__HEADER_TIMEOUT_SECS", "1")],
    );
    assert_eq!(
        raw(
            port,
            "POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        404
    );
    assert_eq!(
        raw(
            port,
            "GET /callbacks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ),
        405
    );
    assert_eq!(raw(port, "BLAH\r\n\r\n"), 400);

    // A client that never finishes its headers is cut off after header_timeout_secs.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    slow.write_all(b"POST /callbacks HTTP/1.1\r\nHost: x\r\n")
        .expect("partial headers");
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "cut off after {waited:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "not before the timeout: {waited:?}"
    );

    // The listener still works for everyone else.
    let good = usage_callback("req-ok", 1, &[record(&iccid(1), 0, r#""1""#)]);
    assert_eq!(post(port, "application/json", good.as_bytes()), 200);
    stop(child);
}

#[test]
fn addresses_outside_the_allow_list_cannot_connect() {
    let ws = Workspace::new();
    let port = free_port();
    let child = spawn_listen(
        &ws,
        port,
        &[("TSUSAGE_CALLBACKS__ALLOW_FROM", r#"["203.0.113.0/24"]"#)],
    );
    let good = usage_callback("req-denied", 1, &[record(&iccid(1), 0, r#""1""#)]);
    assert_eq!(
        post(port, "application/json", good.as_bytes()),
        0,
        "closed without an answer"
    );
    stop(child);
    let store = tsusage::state::SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    assert!(store.callbacks_since(0, 10).expect("journal").is_empty());

    let port = free_port();
    let child = spawn_listen(
        &ws,
        port,
        &[("TSUSAGE_CALLBACKS__ALLOW_FROM", r#"["127.0.0.1", "::1"]"#)],
    );
    assert_eq!(post(port, "application/json", good.as_bytes()), 200);
    stop(child);
}

#[test]
fn a_bad_allow_list_entry_is_a_config_error_naming_it() {
    let ws = Workspace::new();
    let run = ws.run_env(
        &["listen"],
        &[("TSUSAGE_CALLBACKS__ALLOW_FROM", r#"["10.0.0.0/40"]"#)],
    );
    run.expect_code(2);
    assert!(
        run.stderr().contains("callbacks.allow_from") && run.stderr().contains("10.0.0.0/40"),
        "{}",
        run.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_https_with_the_configured_certificate() {
    let ws = Workspace::new();
    // A private CA and a server certificate for 127.0.0.1 signed by it.
    let (ca, ca_key, cert, key, csr, ext) = (
        ws.path("ca.pem"),
        ws.path("ca-key.pem"),
        ws.path("cert.pem"),
        ws.path("key.pem"),
        ws.path("req.csr"),
        ws.path("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
    )
    .expect("ext");
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |s: &str| std::ffi::OsStr::new(s).to_owned();
    let p = |p: &std::path::PathBuf| p.as_os_str().to_owned();
    openssl(&[
        &os("req"),
        &os("-x509"),
        &os("-newkey"),
        &os("rsa:2048"),
        &os("-nodes"),
        &os("-days"),
        &os("1"),
        &os("-subj"),
        &os("/CN=test-ca"),
        &os("-keyout"),
        &p(&ca_key),
        &os("-out"),
        &p(&ca),
    ]);
    openssl(&[
        &os("req"),
        &os("-newkey"),
        &os("rsa:2048"),
        &os("-nodes"),
        &os("-subj"),
        &os("/CN=localhost"),
        &os("-keyout"),
        &p(&key),
        &os("-out"),
        &p(&csr),
    ]);
    openssl(&[
        &os("x509"),
        &os("-req"),
        &os("-in"),
        &p(&csr),
        &os("-CA"),
        &p(&ca),
        &os("-CAkey"),
        &p(&ca_key),
        &os("-CAcreateserial"),
        &os("-days"),
        &os("1"),
        &os("-extfile"),
        &p(&ext),
        &os("-out"),
        &p(&cert),
    ]);
    let port = free_port();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let child = spawn_listen(
        &ws,
        port,
        &[
            ("TSUSAGE_CALLBACKS__TLS_CERT_FILE", &c),
            ("TSUSAGE_CALLBACKS__TLS_KEY_FILE", &k),
        ],
    );

    tsusage::tls::install_crypto_provider();
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca).expect("ca")).expect("pem");
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .build()
        .expect("client");
    let body = usage_callback("req-tls", 1, &[record(&iccid(1), 0, r#""1""#)]);
    let response = client
        .post(format!("https://127.0.0.1:{port}/callbacks"))
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("https post");
    assert_eq!(response.status().as_u16(), 200);
    // Plain HTTP to the HTTPS port gets no answer.
    let plain =
        tokio::task::spawn_blocking(move || post(port, "application/json", body.as_bytes()))
            .await
            .expect("join");
    assert_eq!(plain, 0);
    stop(child);
    let store = tsusage::state::SqliteStore::open(&ws.path("state/tsusage.db")).expect("store");
    assert_eq!(store.callbacks_since(0, 10).expect("journal").len(), 1);
}
