//! The listener facing the internet: wrong paths and methods, slow clients, addresses not allowed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

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
