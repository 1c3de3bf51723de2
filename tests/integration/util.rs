//! Helpers for the integration tests: a temp workspace with a config, the real binary, Parquet read-back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::process::{Command, Output};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub const ACCOUNT: &str = "0000123456-00001";
/// 2021-08-15T00:00:00Z in µs.
pub const DAY0: i64 = 1_628_985_600_000_000;
pub const DAY_US: i64 = 86_400_000_000;

/// A temp directory holding `tsusage.toml`, `inbox/`, `out/` and `state/`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace::with_config("")
    }

    /// A workspace whose config has `extra` appended (TOML).
    pub fn with_config(extra: &str) -> Workspace {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let config = format!(
            "account_name = \"{ACCOUNT}\"\n{extra}\n[output]\ndir = \"{}\"\n[state]\npath = \"{}\"\n",
            root.join("out").display(),
            root.join("state/tsusage.db").display()
        );
        std::fs::write(root.join("tsusage.toml"), config).expect("config");
        std::fs::create_dir_all(root.join("inbox")).expect("inbox");
        Workspace { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("tsusage.toml")
    }

    pub fn inbox(&self) -> PathBuf {
        self.path("inbox")
    }

    pub fn out(&self) -> PathBuf {
        self.path("out")
    }

    /// Writes `text` to `inbox/name`.
    pub fn drop_file(&self, name: &str, text: &str) {
        std::fs::write(self.inbox().join(name), text).expect("drop file");
    }

    /// Runs the real binary with `args`, then `--config`, in the workspace directory.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tsusage"));
        cmd.args(args)
            .arg("--config")
            .arg(self.config())
            .current_dir(self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("TSUSAGE_") && !env.iter().any(|(e, _)| *e == k) {
                cmd.env_remove(k);
            }
        }
        Run(cmd.output().expect("run tsusage"))
    }

    pub fn ingest(&self) -> Run {
        let inbox = self.inbox();
        self.run(&["ingest", inbox.to_str().expect("utf-8 path")])
    }

    /// All rows under `out/usage/`, sorted by (iccid, usage_start).
    pub fn rows(&self) -> Vec<Row> {
        read_rows(&self.out().join("usage"))
    }

    /// Lines of every callbacks rejects file, parsed.
    pub fn callback_rejects(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for path in files_under(&self.out().join("rejects")) {
            if path.to_string_lossy().ends_with("-callbacks.jsonl") {
                let text = std::fs::read_to_string(&path).expect("rejects");
                out.extend(
                    text.lines()
                        .map(|l| serde_json::from_str(l).expect("json line")),
                );
            }
        }
        out
    }
}

/// The result of one run of the binary.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// The run report's path: the last line on stdout.
    pub fn report_path(&self) -> PathBuf {
        let stdout = self.stdout();
        let last = stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no stdout; stderr: {}", self.stderr()));
        PathBuf::from(last)
    }
    /// The run report, read from the path printed last on stdout.
    pub fn report(&self) -> serde_json::Value {
        let path = self.report_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("report {}: {e}", path.display()));
        serde_json::from_str(&text).expect("report json")
    }
    /// Asserts the exit code, showing the output when it differs.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code(),
            code,
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// One Parquet row, with the partition directory it was found in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Row {
    pub iccid: String,
    pub usage_start: i64,
    pub usage_end: i64,
    pub data_usage_bytes: i64,
    pub sms_usage: i64,
    pub mo_sms: i64,
    pub mt_sms: i64,
    pub account_name: String,
    pub request_id: String,
    pub received_at: i64,
    pub partition: String,
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Reads every Parquet file under `dir`, checking schema v1's types on the way.
pub fn read_rows(dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for path in files_under(dir) {
        assert!(
            path.extension().is_some_and(|e| e == "parquet"),
            "unexpected file in the output: {}",
            path.display()
        );
        let partition = path
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = std::fs::File::open(&path).expect("open parquet");
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet reader");
        let schema = builder.schema().clone();
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let expected: Vec<(&str, DataType)> = vec![
            ("account_name", DataType::Utf8),
            ("iccid", DataType::Utf8),
            ("usage_start", ts.clone()),
            ("usage_end", ts.clone()),
            ("data_usage_bytes", DataType::Int64),
            ("sms_usage", DataType::Int64),
            ("mo_sms", DataType::Int64),
            ("mt_sms", DataType::Int64),
            ("request_id", DataType::Utf8),
            ("received_at", ts),
        ];
        let got: Vec<(&str, DataType)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.data_type().clone()))
            .collect();
        assert_eq!(got, expected, "schema of {}", path.display());
        for batch in builder.build().expect("reader") {
            let batch = batch.expect("batch");
            let s = |i: usize| batch.column(i).as_string::<i32>().clone();
            let n = |i: usize| batch.column(i).as_primitive::<Int64Type>().clone();
            let t = |i: usize| {
                batch
                    .column(i)
                    .as_primitive::<TimestampMicrosecondType>()
                    .clone()
            };
            let (account, iccid, start, end) = (s(0), s(1), t(2), t(3));
            let (data, sms, mo, mt, request, received) = (n(4), n(5), n(6), n(7), s(8), t(9));
            for r in 0..batch.num_rows() {
                rows.push(Row {
                    iccid: iccid.value(r).to_owned(),
                    usage_start: start.value(r),
                    usage_end: end.value(r),
                    data_usage_bytes: data.value(r),
                    sms_usage: sms.value(r),
                    mo_sms: mo.value(r),
                    mt_sms: mt.value(r),
                    account_name: account.value(r).to_owned(),
                    request_id: request.value(r).to_owned(),
                    received_at: received.value(r),
                    partition: partition.clone(),
                });
            }
        }
    }
    rows.sort();
    rows
}

/// Key-value metadata of a Parquet file.
pub fn parquet_metadata(path: &Path) -> Vec<(String, String)> {
    let file = std::fs::File::open(path).expect("open parquet");
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet reader");
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// A usage record's JSON with the given raw field texts (JSON fragments, e.g. `"\"3072\""` or `3072`).
pub fn record(iccid: &str, day: i64, data: &str) -> String {
    record_full(
        iccid,
        &format!("\"{}\"", date(day)),
        &format!("\"{}\"", date(day + 1)),
        data,
        "\"2\"",
    )
}

pub fn record_full(iccid: &str, start: &str, end: &str, data: &str, sms: &str) -> String {
    let data = if data.is_empty() {
        String::new()
    } else {
        format!(r#""dataUsage":{data},"#)
    };
    format!(
        r#"{{"deviceIdentifierCollection":[{{"id":"{iccid}","kind":"ICCID"}}],{data}"smsUsage":{sms},"moSms":"1","mtSms":"1","startDate":{start},"endDate":{end}}}"#
    )
}

/// `2021-08-15T00:00:00.0000000` plus `day` days.
pub fn date(day: i64) -> String {
    let d = chrono::DateTime::from_timestamp_micros(DAY0 + day * DAY_US).expect("date");
    format!("{}.0000000", d.format("%Y-%m-%dT%H:%M:%S"))
}

/// A usage callback body with credentials, as the vendor sends it.
pub fn usage_callback(request_id: &str, count: u32, records: &[String]) -> String {
    format!(
        r#"{{"username":"cb-user","password":"cb-secret-sentinel","requestId":"{request_id}","deviceResponse":{{"devicePromoUsageResponse":[{}]}},"callbackCount":{count},"maxCallbackThreshold":4}}"#,
        records.join(",")
    )
}

pub fn completion_callback(request_id: &str) -> String {
    format!(
        r#"{{"username":"cb-user","password":"cb-secret-sentinel","requestId":"{request_id}","deviceResponse":{{}},"comment":"Request Completed Processing","callbackCount":1,"maxCallbackThreshold":4}}"#
    )
}

/// Valid-Luhn ICCIDs for tests: `89148000000000000xx` + check digit (20 digits).
pub fn iccid(i: u32) -> String {
    let body = format!("891480000000000{i:04}");
    format!(
        "{body}{}",
        tsusage::ingest::luhn_check_digit(body.as_bytes())
    )
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `tsusage run --from FROM --to TO` as a child process in `ws`, with `env` and its output piped.
pub fn spawn_run(ws: &Workspace, from: &str, to: &str, env: &[(String, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tsusage"))
        .args(["run", "--from", from, "--to", to, "--config"])
        .arg(ws.config())
        .current_dir(ws.dir.path())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run")
}

/// `tsusage listen` as a child process on `port`, with callback credentials `user`/`pass`.
pub fn spawn_listen(ws: &Workspace, port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tsusage"));
    cmd.args(["listen", "--config"])
        .arg(ws.config())
        .current_dir(ws.dir.path())
        .env(
            "TSUSAGE_CALLBACKS__LISTEN_ADDR",
            format!("127.0.0.1:{port}"),
        )
        .env(
            "TSUSAGE_CALLBACKS__PUBLIC_URL",
            format!("http://127.0.0.1:{port}/callbacks"),
        )
        .env("TSUSAGE_CALLBACKS__USERNAME", "cb-user")
        .env("TSUSAGE_CALLBACKS__PASSWORD", "cb-secret-sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    wait_listening(cmd.spawn().expect("spawn listen"), port)
}

/// Waits (up to 5 s) until `child` accepts connections on `port`; kills it and fails otherwise.
pub fn wait_listening(mut child: Child, port: u16) -> Child {
    let up = (0..200).any(|_| {
        let connected = TcpStream::connect(("127.0.0.1", port)).is_ok();
        if !connected {
            std::thread::sleep(Duration::from_millis(25));
        }
        connected
    });
    if !up {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tsusage listen did not come up on port {port}");
    }
    child
}

/// A raw HTTP/1.1 POST; returns the status code, or 0 when nothing answered.
pub fn post(port: u16, content_type: &str, body: &[u8]) -> u16 {
    // A listener that is down (or being killed) answers nothing: status 0.
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let head = format!(
        "POST /callbacks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    let _ = stream.write_all(body);
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}
