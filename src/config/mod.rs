//! Configuration: one TOML file with documented defaults, every key overridable from the environment.
//!
//! Loading goes file → TOML table → environment overrides (`TSUSAGE_` + key path upper-cased, sections
//! joined by `__`, e.g. `TSUSAGE_PLAN__CHUNK_SIZE=100`) → typed [`Config`] → [`Config::validate`].
//! Secrets (`api.app_key`, `api.app_secret`, `api.username`, `api.password`, `callbacks.username`,
//! `callbacks.password`) come from the environment only: a file that holds one is rejected, and
//! `Debug` never shows them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod allow_list;
pub mod sim;

pub use sim::{DEFAULT_SIM_LISTEN_ADDR, SimSection};

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "TSUSAGE_";
/// The configuration file to use when `--config` is not given.
pub const ENV_CONFIG: &str = "TSUSAGE_CONFIG";
/// The configuration file looked for in the working directory when neither `--config` nor
/// `$TSUSAGE_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "tsusage.toml";
/// Environment variables with the prefix that are not configuration keys.
pub const ENV_RESERVED: &[&str] = &[
    "TSUSAGE_LOG",
    "TSUSAGE_LOG_FORMAT",
    ENV_CONFIG,
    crate::failpoint::ENV,
    crate::failpoint::ENV_FAIL,
    crate::failpoint::ENV_DAYS_LATER,
    "TSUSAGE_CRASH_SEED",
];
/// Variables with this prefix name the test servers (`TSUSAGE_TEST_PG_URL`, `TSUSAGE_TEST_S3_*`,
/// exported by `scripts/services.sh`): not configuration keys either, so that the `tsusage`
/// processes a test starts with them in its environment still load their configuration.
pub const ENV_TEST_PREFIX: &str = "TSUSAGE_TEST_";

/// Default `plan.window_days`: one request per UTC day.
pub const DEFAULT_WINDOW_DAYS: u32 = 1;
/// Default `plan.chunk_size`: related vendor endpoints fail above 200 devices per request.
pub const DEFAULT_CHUNK_SIZE: u32 = 200;
/// Largest accepted `plan.chunk_size`.
pub const MAX_CHUNK_SIZE: u32 = 10_000;
/// Default `api.base_url`: the vendor's production gateway.
pub const DEFAULT_API_BASE_URL: &str = "https://thingspace.verizon.com/api";
/// Default `api.requests_per_sec`: conservative, the real limit is per contract.
pub const DEFAULT_REQUESTS_PER_SEC: u32 = 5;
/// Default `api.max_in_flight`: concurrent requests to the vendor.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 8;
/// Default `api.burst`: requests that may go at once after a quiet spell.
pub const DEFAULT_BURST: u32 = 1;
/// Default `api.timeout_secs`: one HTTP request to the vendor, connect to last byte.
pub const DEFAULT_API_TIMEOUT_SECS: u64 = 30;
/// Default `api.max_attempts_per_job`: tries of one request (the first and its retries).
pub const DEFAULT_MAX_ATTEMPTS_PER_JOB: u32 = 5;
/// Default `api.retry_budget_percent`: retries allowed in a run, as a percentage of its jobs.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 50;
/// The retry budget is never below this many retries, however few the jobs.
pub const MIN_RETRY_BUDGET: u32 = 10;
/// Default `api.backoff_min_ms`: first backoff ceiling; each retry doubles it (full jitter below it).
pub const DEFAULT_BACKOFF_MIN_MS: u64 = 500;
/// Default `api.backoff_max_secs`: the backoff ceiling never exceeds this.
pub const DEFAULT_BACKOFF_MAX_SECS: u64 = 30;
/// Default `callbacks.service_name`: the ThingSpace callback service usage results are sent to.
pub const DEFAULT_CALLBACK_SERVICE: &str = "DeviceUsage";
/// Default `callbacks.max_body_bytes`: a callback body larger than this is refused with 413 (32 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Default `callbacks.max_connections`: connections the listener holds open at once.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Default `callbacks.request_timeout_secs`: reading a request's body and journaling it.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Default `callbacks.header_timeout_secs`: a client that has not sent its headers by then is cut off.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Default `callbacks.listen_addr`: 9001 is one of the ports the vendor will call.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:9001";
/// Default `callbacks.public_url`.
pub const DEFAULT_PUBLIC_URL: &str = "https://etl.example.com:9001/callbacks";
/// Default `callbacks.drop_dir`.
pub const DEFAULT_DROP_DIR: &str = "inbox";
/// Default `callbacks.deadline_secs`: wait half an hour for a request's callbacks.
pub const DEFAULT_DEADLINE_SECS: u64 = 1800;
/// Default `callbacks.settle_secs`: after a request's completion message, how long without a new
/// callback before its missing ICCIDs count as "no usage" (covers one vendor redelivery, ~5 min).
pub const DEFAULT_SETTLE_SECS: u64 = 600;
/// Default `callbacks.max_resubmits`.
pub const DEFAULT_MAX_RESUBMITS: u32 = 2;
/// Default `callbacks.max_file_bytes`: a drop-directory file larger than this is skipped (256 MiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;
/// Default `output.dir`.
pub const DEFAULT_OUTPUT_DIR: &str = "out";
/// Default `output.max_rows_per_file`: a partition is split into several files past this.
pub const DEFAULT_MAX_ROWS_PER_FILE: u64 = 1_000_000;
/// Default `output.zstd_level`.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Default `state.path`.
pub const DEFAULT_STATE_PATH: &str = "state/tsusage.db";

/// The keys that hold secrets: environment only, never in the file, never printed.
const SECRET_KEYS: &[(&str, &str)] = &[
    ("api", "app_key"),
    ("api", "app_secret"),
    ("api", "username"),
    ("api", "password"),
    ("callbacks", "username"),
    ("callbacks", "password"),
];

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {path}: {key}: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error(
        "config {path}: {key} is a secret and must not be in the file; set {env} in the environment"
    )]
    SecretInFile {
        path: PathBuf,
        key: String,
        env: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error(
        "no configuration file: --config was not given, {ENV_CONFIG} is not set, and there is no \
         {DEFAULT_CONFIG_FILE} in {}; pass --config FILE (the bundled sample: --config data/tsusage.toml)",
        cwd.display()
    )]
    NotFound { cwd: PathBuf },
}

/// Which configuration file a command reads: `explicit` (`--config`), else `from_env`
/// (`$TSUSAGE_CONFIG`, when set and not empty), else `cwd/tsusage.toml` when it exists.
pub fn locate(
    explicit: Option<&Path>,
    from_env: Option<&std::ffi::OsStr>,
    cwd: &Path,
) -> Result<PathBuf, ConfigError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let local = cwd.join(DEFAULT_CONFIG_FILE);
    if local.is_file() {
        return Ok(PathBuf::from(DEFAULT_CONFIG_FILE));
    }
    Err(ConfigError::NotFound {
        cwd: cwd.to_owned(),
    })
}

/// A secret string: never shown by `Debug`, never serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret's value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"[redacted]\")")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The whole configuration (every key, with its default: docs/configuration.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The billing account, kept as text: it has leading zeros (`0000123456-00001`).
    pub account_name: String,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub plan: PlanConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub callbacks: CallbacksConfig,
    pub output: OutputConfig,
    pub state: StateConfig,
    #[serde(default)]
    pub sim: SimSection,
}

/// `[input]`: the ICCID lists.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// CSV files: a column named `iccid` (any case), or the only column.
    pub paths: Vec<PathBuf>,
    /// Reject ICCIDs whose Luhn check digit is wrong (default: warn and keep them; some real ones fail).
    pub strict_luhn: bool,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            paths: vec![PathBuf::from("data/iccids.csv")],
            strict_luhn: false,
        }
    }
}

/// `[plan]`: how a date range and an ICCID list become requests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Days per request window.
    pub window_days: u32,
    /// ICCIDs per request.
    pub chunk_size: u32,
    /// `run` also re-pulls this many days before the range asked for, complete or not: SMS usage
    /// arrives up to 3 days late, and the newest answer replaces the older one.
    pub lookback_days: u32,
    /// On a store shared by several workers (PostgreSQL): how long a worker's claim on a batch of
    /// jobs lasts without renewal; a killed worker's jobs return to the others after it.
    pub lease_secs: u64,
    /// On a shared store: jobs a worker claims at a time.
    pub claim_batch: u32,
}

/// Default `plan.lease_secs`: renewed every third of it while the jobs are tracked.
pub const DEFAULT_LEASE_SECS: u64 = 300;
/// Default `plan.claim_batch`.
pub const DEFAULT_CLAIM_BATCH: u32 = 100;

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            window_days: DEFAULT_WINDOW_DAYS,
            chunk_size: DEFAULT_CHUNK_SIZE,
            lookback_days: 0,
            lease_secs: DEFAULT_LEASE_SECS,
            claim_batch: DEFAULT_CLAIM_BATCH,
        }
    }
}

/// `[api]`: the vendor API (or the simulator).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Base URL; OAuth lives at `{base_url}/ts/v1/...`, everything else at `{base_url}/m2m/v1/...`.
    pub base_url: String,
    /// Sustained request rate to the vendor.
    pub requests_per_sec: u32,
    /// Concurrent requests to the vendor.
    pub max_in_flight: u32,
    /// Requests allowed at once on top of the sustained rate (token-bucket burst).
    pub burst: u32,
    /// One HTTP request's timeout.
    pub timeout_secs: u64,
    /// Tries of one request before it is left for a later run (429, 5xx, timeouts, connection errors).
    pub max_attempts_per_job: u32,
    /// Retries allowed in a run, as a percentage of its jobs (at least 10): a vendor that is down
    /// ends the run in bounded time, with the rest left for a resume.
    pub retry_budget_percent: u32,
    /// First backoff ceiling; doubled per retry up to `backoff_max_secs`, full jitter below it.
    pub backoff_min_ms: u64,
    pub backoff_max_secs: u64,
    #[serde(skip_serializing)]
    pub app_key: Option<Secret>,
    #[serde(skip_serializing)]
    pub app_secret: Option<Secret>,
    #[serde(skip_serializing)]
    pub username: Option<Secret>,
    #[serde(skip_serializing)]
    pub password: Option<Secret>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            base_url: DEFAULT_API_BASE_URL.to_owned(),
            requests_per_sec: DEFAULT_REQUESTS_PER_SEC,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            burst: DEFAULT_BURST,
            timeout_secs: DEFAULT_API_TIMEOUT_SECS,
            max_attempts_per_job: DEFAULT_MAX_ATTEMPTS_PER_JOB,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            backoff_min_ms: DEFAULT_BACKOFF_MIN_MS,
            backoff_max_secs: DEFAULT_BACKOFF_MAX_SECS,
            app_key: None,
            app_secret: None,
            username: None,
            password: None,
        }
    }
}

/// Where callbacks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackSource {
    /// An in-process HTTP listener during `run`.
    Listener,
    /// A separate `tsusage listen` journaling into the shared state store.
    External,
    /// JSON files dropped in `callbacks.drop_dir`.
    DropDir,
}

/// `[callbacks]`: receiving the vendor's callbacks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    pub source: CallbackSource,
    pub listen_addr: SocketAddr,
    /// What ThingSpace is told to call.
    pub public_url: String,
    /// The callback service name to register `public_url` for.
    pub service_name: String,
    pub drop_dir: PathBuf,
    /// How long to wait for a request's callbacks before re-requesting it.
    pub deadline_secs: u64,
    /// After the completion message, quiet time before ICCIDs without a record count as no usage.
    pub settle_secs: u64,
    pub max_resubmits: u32,
    /// Drop-directory files larger than this are skipped and reported.
    pub max_file_bytes: u64,
    /// Listener: larger bodies are refused (413).
    pub max_body_bytes: u64,
    /// Listener: connections held open at once; more wait to be accepted.
    pub max_connections: u32,
    /// Listener: time to read a request's body and journal it (408 past it).
    pub request_timeout_secs: u64,
    /// Listener: time a client has to send its request headers before the connection is closed.
    pub header_timeout_secs: u64,
    /// Listener: source addresses or networks allowed to connect (the vendor publishes its callback
    /// addresses); empty allows all.
    pub allow_from: Vec<String>,
    /// Listener: serve HTTPS with this PEM certificate chain (with `tls_key_file`); production
    /// callbacks must be HTTPS.
    pub tls_cert_file: Option<PathBuf>,
    /// Listener: the PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    #[serde(skip_serializing)]
    pub username: Option<Secret>,
    #[serde(skip_serializing)]
    pub password: Option<Secret>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        CallbacksConfig {
            source: CallbackSource::Listener,
            listen_addr: parse_default_addr(DEFAULT_LISTEN_ADDR),
            public_url: DEFAULT_PUBLIC_URL.to_owned(),
            service_name: DEFAULT_CALLBACK_SERVICE.to_owned(),
            drop_dir: PathBuf::from(DEFAULT_DROP_DIR),
            deadline_secs: DEFAULT_DEADLINE_SECS,
            settle_secs: DEFAULT_SETTLE_SECS,
            max_resubmits: DEFAULT_MAX_RESUBMITS,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            header_timeout_secs: DEFAULT_HEADER_TIMEOUT_SECS,
            allow_from: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            username: None,
            password: None,
        }
    }
}

/// How the output is partitioned: by the data's own date, never by run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionBy {
    /// `usage_date=YYYY-MM-DD/`
    Day,
    /// `usage_month=YYYY-MM/`
    Month,
}

/// `[output]`: Parquet, rejects and run reports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Parquet under `{dir}/usage/`, rejects under `{dir}/rejects/`, run reports under `{dir}/runs/`.
    pub dir: PathBuf,
    #[serde(default = "default_partition_by")]
    pub partition_by: PartitionBy,
    #[serde(default = "default_max_rows_per_file")]
    pub max_rows_per_file: u64,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Parquet, rejects, run reports and completeness files on object storage instead of `dir`:
    /// `s3://bucket/prefix` (see the `output::bucket` module). `dir` still holds the journal archive
    /// and the scratch files. Credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
    /// `AWS_SESSION_TOKEN`) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The S3 endpoint, for servers other than AWS (`http://127.0.0.1:8333`); default: AWS's for
    /// `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The bucket's region; default `$AWS_REGION`, else `us-east-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which SeaweedFS, MinIO and Ceph want; default
    /// false: virtual-hosted style (`bucket.endpoint/key`), which AWS wants.
    #[serde(default)]
    pub path_style: bool,
}

/// `output.url` parsed: `s3://bucket/prefix` (the prefix may be empty; no trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`, e.g. `tsusage/prod`; empty for the bucket's root.
    pub prefix: String,
}

impl ObjectUrl {
    /// Parses `s3://bucket[/prefix]`; the bucket must be a valid S3 bucket name.
    pub fn parse(url: &str) -> Result<ObjectUrl, String> {
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(format!("{url:?} is not an s3://bucket/prefix URL"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(format!(
                "{url:?}: {bucket:?} is not an S3 bucket name (3 to 63 of a-z, 0-9, '-', '.')"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.chars().any(char::is_control)
        {
            return Err(format!(
                "{url:?}: the prefix must not hold empty, '.' or '..' parts"
            ));
        }
        Ok(ObjectUrl {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix.is_empty() {
            true => write!(f, "s3://{}", self.bucket),
            false => write!(f, "s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

fn default_partition_by() -> PartitionBy {
    PartitionBy::Day
}
fn default_max_rows_per_file() -> u64 {
    DEFAULT_MAX_ROWS_PER_FILE
}
fn default_zstd_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}

/// `[state]`: the state store, one SQLite file (`path`) or a PostgreSQL database (`url`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The SQLite file (the embedded default). Give this or `url`, not both.
    #[serde(default)]
    pub path: PathBuf,
    /// A PostgreSQL store, `postgres://user:password@host:port/db[?sslmode=require]` (several
    /// listeners and workers sharing one store). Give this or `path`, not both. It may hold a
    /// password: never printed (see [`StateConfig::name`]), never serialized.
    #[serde(default, skip_serializing)]
    pub url: Option<Secret>,
    /// Days of callbacks the journal keeps (by when they were received); older ones whose partitions
    /// are written move to the archive under `output.dir/archive/` at the end of each `run` (or with
    /// `tsusage prune`). 0, the default, keeps everything in the store.
    #[serde(default)]
    pub retain_days: u32,
    /// How the SQLite store's journal segments hold callback bodies: `lz4` (the default: about 10x
    /// smaller than the text, for the least CPU), `zstd` (level 1: about 20x smaller, for a slow or
    /// small disk, at about 0.15 CPU-s more per million records) or `none` (the text itself). Bodies
    /// already journaled stay as they were written, whatever this says later. PostgreSQL keeps
    /// bodies in its `callbacks` table, zstd-compressed, whatever this says.
    #[serde(default)]
    pub journal_compression: JournalCompression,
}

/// `state.journal_compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalCompression {
    /// One LZ4 block per MiB of bodies.
    #[default]
    Lz4,
    /// One zstd frame (level 1) per MiB of bodies.
    Zstd,
    /// The bodies' text as received (credentials removed).
    None,
}

impl StateConfig {
    /// The store as logs and errors name it: the file's path, or the URL with its password
    /// replaced by `***`.
    pub fn name(&self) -> String {
        match &self.url {
            Some(url) => redact_url(url.expose()),
            None => self.path.display().to_string(),
        }
    }
}

/// `url` with the password of its user info and any `password=` parameter replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{user_info}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

/// A default address from its text (a constant that parses; loopback port 0 if it did not).
fn parse_default_addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Config {
    /// Loads `path`, applies the `TSUSAGE_*` variables of the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text, path, env)
    }

    /// Parses configuration text; `path` only names the source in errors.
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        for (section, key) in SECRET_KEYS {
            let in_file = table
                .get(*section)
                .and_then(toml::Value::as_table)
                .is_some_and(|t| t.contains_key(*key));
            if in_file {
                return Err(ConfigError::SecretInFile {
                    path: path.to_owned(),
                    key: format!("{section}.{key}"),
                    env: env_name(&[section, key]),
                });
            }
        }
        let overridden = apply_env(&mut table, env)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let full = e.inner().to_string();
                // toml appends "in `section`"; the key path already says where.
                let message = full.lines().next().unwrap_or_default().to_owned();
                let message = match overridden.iter().find(|(k, _)| *k == key) {
                    Some((_, var)) => format!("{message} (set by {var})"),
                    None => message,
                };
                ConfigError::Key {
                    path: path.to_owned(),
                    key,
                    message,
                }
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks what types alone cannot: ranges, non-empty names, URL schemes.
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Key {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.account_name.trim().is_empty() {
            return Err(bad("account_name", "must not be empty".into()));
        }
        if self.account_name.chars().any(char::is_control) {
            return Err(bad(
                "account_name",
                "must not hold control characters".into(),
            ));
        }
        if !(1..=366).contains(&self.plan.window_days) {
            return Err(bad(
                "plan.window_days",
                format!("{} is out of range 1..=366", self.plan.window_days),
            ));
        }
        if self.plan.lease_secs < 3 {
            return Err(bad(
                "plan.lease_secs",
                format!(
                    "{} is too short: a lease is renewed every third of it (at least 3)",
                    self.plan.lease_secs
                ),
            ));
        }
        if self.plan.claim_batch == 0 {
            return Err(bad("plan.claim_batch", "must be at least 1".into()));
        }
        let repulled = self.plan.lookback_days + self.plan.window_days;
        if self.state.retain_days != 0 && self.state.retain_days <= repulled {
            return Err(bad(
                "state.retain_days",
                format!(
                    "{} must exceed plan.lookback_days + plan.window_days ({repulled}): the days a \
                     run asks again must still be in the journal",
                    self.state.retain_days
                ),
            ));
        }
        match (&self.state.url, self.state.path.as_os_str().is_empty()) {
            (Some(_), false) => {
                return Err(bad(
                    "state.url",
                    "give state.path (SQLite) or state.url (PostgreSQL), not both".into(),
                ));
            }
            (None, true) => {
                return Err(bad(
                    "state.path",
                    "give state.path (a SQLite file) or state.url (postgres://...)".into(),
                ));
            }
            (Some(url), true) => {
                let url = url.expose();
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(bad(
                        "state.url",
                        format!(
                            "{:?} is not a postgres:// or postgresql:// URL",
                            redact_url(url)
                        ),
                    ));
                }
            }
            (None, false) => {}
        }
        if !(1..=MAX_CHUNK_SIZE).contains(&self.plan.chunk_size) {
            return Err(bad(
                "plan.chunk_size",
                format!(
                    "{} is out of range 1..={MAX_CHUNK_SIZE}",
                    self.plan.chunk_size
                ),
            ));
        }
        if self.api.requests_per_sec == 0 {
            return Err(bad("api.requests_per_sec", "must be at least 1".into()));
        }
        for (key, value) in [
            ("api.max_in_flight", self.api.max_in_flight),
            ("api.burst", self.api.burst),
            ("api.max_attempts_per_job", self.api.max_attempts_per_job),
        ] {
            if value == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if self.api.timeout_secs == 0 {
            return Err(bad("api.timeout_secs", "must be at least 1".into()));
        }
        if self.api.backoff_min_ms == 0
            || self.api.backoff_min_ms > self.api.backoff_max_secs * 1000
        {
            return Err(bad(
                "api.backoff_min_ms",
                "must be at least 1 and not above api.backoff_max_secs".into(),
            ));
        }
        for (key, url) in [
            ("api.base_url", &self.api.base_url),
            ("callbacks.public_url", &self.callbacks.public_url),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(
                    key,
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.callbacks.tls_cert_file.is_some() != self.callbacks.tls_key_file.is_some() {
            return Err(bad(
                "callbacks.tls_cert_file",
                "give both tls_cert_file and tls_key_file, or neither".into(),
            ));
        }
        if let Err(e) = allow_list::AllowList::parse(&self.callbacks.allow_from) {
            return Err(bad("callbacks.allow_from", e));
        }
        if self.output.max_rows_per_file == 0 {
            return Err(bad("output.max_rows_per_file", "must be at least 1".into()));
        }
        if let Some(url) = &self.output.url {
            ObjectUrl::parse(url).map_err(|e| bad("output.url", e))?;
        }
        if let Some(endpoint) = &self.output.endpoint {
            if self.output.url.is_none() {
                return Err(bad(
                    "output.endpoint",
                    "is only used with output.url = \"s3://bucket/prefix\"".into(),
                ));
            }
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            let host = endpoint.split_once("://").map_or("", |(_, rest)| rest);
            if !scheme_ok || host.is_empty() || host.trim_end_matches('/').contains('/') {
                return Err(bad(
                    "output.endpoint",
                    format!(
                        "{endpoint:?} is not an http:// or https:// URL with a host and no path"
                    ),
                ));
            }
        }
        if self.output.region.as_deref().is_some_and(str::is_empty) {
            return Err(bad("output.region", "must not be empty".into()));
        }
        if !(1..=22).contains(&self.output.zstd_level) {
            return Err(bad(
                "output.zstd_level",
                format!("{} is out of range 1..=22", self.output.zstd_level),
            ));
        }
        Ok(())
    }
}

/// `TSUSAGE_` + the key path upper-cased, joined by `__`.
pub fn env_name(path: &[&str]) -> String {
    format!("{ENV_PREFIX}{}", path.join("__").to_uppercase())
}

/// Applies `TSUSAGE_*` variables to `table`. A value is read as the type the key has by default
/// (integer, boolean, list), else as a string. Returns the keys set, with their variable names.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let defaults = default_table();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with(ENV_PREFIX)
                && !ENV_RESERVED.contains(&k.as_str())
                && !k.starts_with(ENV_TEST_PREFIX)
        })
        .collect();
    vars.sort();
    let mut overridden = Vec::new();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect();
        if path.iter().any(String::is_empty) || path.len() > 2 {
            return Err(ConfigError::Env {
                var,
                message: "not a configuration key (expected TSUSAGE_KEY or TSUSAGE_SECTION__KEY)"
                    .into(),
            });
        }
        let default = lookup(&defaults, &path);
        let value = env_value(&raw, default).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        let (last, sections) = match path.split_last() {
            Some(split) => split,
            None => continue,
        };
        let mut target = &mut *table;
        for section in sections {
            let entry = target
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            target = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        message: format!("`{section}` is not a section"),
                    });
                }
            };
        }
        target.insert(last.clone(), value);
        overridden.push((path.join("."), var));
    }
    Ok(overridden)
}

fn env_value(raw: &str, default: Option<&toml::Value>) -> Result<toml::Value, String> {
    let typed = |what: &str| -> Result<toml::Value, String> {
        let doc: toml::Table = format!("v = {raw}")
            .parse()
            .map_err(|_| format!("{raw:?} is not {what}"))?;
        doc.get("v")
            .cloned()
            .ok_or_else(|| format!("{raw:?} is not {what}"))
    };
    match default {
        Some(toml::Value::Integer(_)) => typed("an integer"),
        Some(toml::Value::Float(_)) => typed("a number"),
        Some(toml::Value::Boolean(_)) => typed("true or false"),
        Some(toml::Value::Array(_)) => typed("a TOML list such as [\"a.csv\", \"b.csv\"]"),
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    lookup(value.as_table()?, rest)
}

/// The defaults as a TOML table, to learn each key's type for environment overrides.
fn default_table() -> toml::Table {
    let defaults = Config {
        account_name: String::new(),
        input: InputConfig::default(),
        plan: PlanConfig::default(),
        api: ApiConfig::default(),
        callbacks: CallbacksConfig::default(),
        output: OutputConfig {
            dir: PathBuf::from(DEFAULT_OUTPUT_DIR),
            partition_by: default_partition_by(),
            max_rows_per_file: DEFAULT_MAX_ROWS_PER_FILE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            url: None,
            endpoint: None,
            region: None,
            path_style: false,
        },
        state: StateConfig {
            path: PathBuf::from(DEFAULT_STATE_PATH),
            url: None,
            retain_days: 0,
            journal_compression: JournalCompression::Lz4,
        },
        sim: SimSection::default(),
    };
    toml::Table::try_from(defaults).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
account_name = "0000123456-00001"
[output]
dir = "out"
[state]
path = "state/tsusage.db"
"#;

    #[test]
    fn state_is_a_path_or_a_url_and_the_url_password_is_redacted() {
        let path = Path::new("t.toml");
        let parse = |text: &str, env: &[(&str, &str)]| {
            Config::from_toml_str(
                text,
                path,
                env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            )
        };
        let url = "postgres://u:s3cret@127.0.0.1:5432/db?sslmode=require&password=p2";
        let both = parse(MINIMAL, &[("TSUSAGE_STATE__URL", url)])
            .expect_err("both")
            .to_string();
        assert!(
            both.contains("state.path") && both.contains("state.url"),
            "{both}"
        );
        assert!(!both.contains("s3cret"), "{both}");
        let pg = parse(
            MINIMAL,
            &[("TSUSAGE_STATE__URL", url), ("TSUSAGE_STATE__PATH", "")],
        )
        .expect("url");
        assert_eq!(
            pg.state.name(),
            "postgres://u:***@127.0.0.1:5432/db?sslmode=require&password=***"
        );
        assert!(!format!("{pg:?}").contains("s3cret"));
        let neither = parse(MINIMAL, &[("TSUSAGE_STATE__PATH", "")])
            .expect_err("neither")
            .to_string();
        assert!(neither.contains("state.path"), "{neither}");
        let not_pg = parse(
            MINIMAL,
            &[
                ("TSUSAGE_STATE__URL", "mysql://x"),
                ("TSUSAGE_STATE__PATH", ""),
            ],
        )
        .expect_err("scheme")
        .to_string();
        assert!(not_pg.contains("postgres://"), "{not_pg}");
        // Test-harness variables are not keys.
        assert!(parse(MINIMAL, &[("TSUSAGE_TEST_PG_URL", url)]).is_ok());
    }

    #[test]
    fn locate_prefers_the_flag_then_the_environment_then_the_working_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flag = Path::new("a.toml");
        let env = std::ffi::OsStr::new("b.toml");
        assert_eq!(
            locate(Some(flag), Some(env), dir.path()).expect("flag"),
            flag
        );
        assert_eq!(
            locate(None, Some(env), dir.path()).expect("env"),
            Path::new("b.toml")
        );
        let err = locate(None, Some(std::ffi::OsStr::new("")), dir.path())
            .expect_err("nothing found")
            .to_string();
        assert!(
            err.contains("TSUSAGE_CONFIG is not set")
                && err.contains(&dir.path().display().to_string())
                && err.contains("--config"),
            "{err}"
        );
        std::fs::write(dir.path().join(DEFAULT_CONFIG_FILE), MINIMAL).expect("write");
        assert_eq!(
            locate(None, None, dir.path()).expect("local"),
            Path::new("tsusage.toml")
        );
    }

    #[test]
    fn the_config_log_format_and_test_variables_are_not_config_keys() {
        let config = load(
            MINIMAL,
            &[
                ("TSUSAGE_CONFIG", "elsewhere.toml"),
                ("TSUSAGE_LOG_FORMAT", "json"),
                ("TSUSAGE_TEST_S3_ENDPOINT", "http://127.0.0.1:1"),
            ],
        )
        .expect("reserved variables are ignored");
        assert_eq!(config.output.dir, Path::new("out"));
    }

    #[test]
    fn the_test_server_variables_are_not_config_keys() {
        let config = load(
            MINIMAL,
            &[
                (
                    "TSUSAGE_TEST_PG_URL",
                    "postgres://postgres@127.0.0.1:5432/postgres",
                ),
                ("TSUSAGE_TEST_S3_BUCKET", "tsusage-test"),
            ],
        )
        .expect("test server variables are ignored");
        assert_eq!(config.state.path, Path::new("state/tsusage.db"));
        // Only the TSUSAGE_TEST_ prefix: a near miss is still an unknown key.
        let err = load(MINIMAL, &[("TSUSAGE_TESTS_PG_URL", "x")])
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("TSUSAGE_TESTS_PG_URL"), "{err}");
    }

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml_str(text, Path::new("t.toml"), env)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load(MINIMAL, &[]).expect("minimal config is valid");
        assert_eq!(c.account_name, "0000123456-00001");
        assert_eq!(c.plan.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(c.plan.window_days, 1);
        assert_eq!(c.api.requests_per_sec, 5);
        assert_eq!(c.callbacks.source, CallbackSource::Listener);
        assert_eq!(c.callbacks.listen_addr.to_string(), "127.0.0.1:9001");
        assert_eq!(c.output.partition_by, PartitionBy::Day);
        assert!(!c.input.strict_luhn);
    }

    #[test]
    fn unknown_key_is_rejected_with_file_and_key() {
        let text = format!("{MINIMAL}\n[plan]\nchunksize = 5\n");
        let err = load(&text, &[]).expect_err("unknown key").to_string();
        assert!(
            err.starts_with("config t.toml: plan.chunksize: unknown field `chunksize`"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_keys_with_their_types() {
        let c = load(
            MINIMAL,
            &[
                ("TSUSAGE_PLAN__CHUNK_SIZE", "50"),
                ("TSUSAGE_INPUT__STRICT_LUHN", "true"),
                ("TSUSAGE_ACCOUNT_NAME", "0000999"),
                ("TSUSAGE_CALLBACKS__SOURCE", "drop_dir"),
                ("TSUSAGE_INPUT__PATHS", r#"["a.csv", "b.csv"]"#),
                ("TSUSAGE_LOG", "debug"),
            ],
        )
        .expect("valid overrides");
        assert_eq!(c.plan.chunk_size, 50);
        assert!(c.input.strict_luhn);
        assert_eq!(c.account_name, "0000999");
        assert_eq!(c.callbacks.source, CallbackSource::DropDir);
        assert_eq!(
            c.input.paths,
            vec![PathBuf::from("a.csv"), PathBuf::from("b.csv")]
        );
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let err = load(MINIMAL, &[("TSUSAGE_PLAN__CHUNK_SIZE", "many")])
            .expect_err("not an integer")
            .to_string();
        assert!(
            err.contains("TSUSAGE_PLAN__CHUNK_SIZE") && err.contains("integer"),
            "{err}"
        );
        let err = load(MINIMAL, &[("TSUSAGE_PLAN__CHUNK_SIZE", "0")])
            .expect_err("out of range")
            .to_string();
        assert!(err.contains("plan.chunk_size: 0 is out of range"), "{err}");
        let err = load(MINIMAL, &[("TSUSAGE_PLNA__CHUNK_SIZE", "5")])
            .expect_err("unknown section")
            .to_string();
        assert!(err.contains("unknown field `plna`"), "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment_and_never_show_in_debug() {
        let c = load(
            MINIMAL,
            &[
                ("TSUSAGE_API__PASSWORD", "hunter2-sentinel"),
                ("TSUSAGE_CALLBACKS__PASSWORD", "98765"),
            ],
        )
        .expect("secrets from env");
        assert_eq!(
            c.api.password.as_ref().map(Secret::expose),
            Some("hunter2-sentinel")
        );
        assert_eq!(
            c.callbacks.password.as_ref().map(Secret::expose),
            Some("98765")
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2-sentinel") && !debug.contains("98765"),
            "{debug}"
        );
        assert!(debug.contains("[redacted]"));
    }

    #[test]
    fn secret_in_the_file_is_refused() {
        let text = format!("{MINIMAL}\n[api]\npassword = \"x\"\n");
        let err = load(&text, &[]).expect_err("secret in file").to_string();
        assert!(
            err.contains("api.password is a secret") && err.contains("TSUSAGE_API__PASSWORD"),
            "{err}"
        );
    }

    #[test]
    fn output_on_object_storage_is_checked_key_by_key() {
        let c = load(
            MINIMAL,
            &[
                ("TSUSAGE_OUTPUT__URL", "s3://tsusage-test/nightly/prod/"),
                ("TSUSAGE_OUTPUT__ENDPOINT", "http://127.0.0.1:8333"),
                ("TSUSAGE_OUTPUT__PATH_STYLE", "true"),
            ],
        )
        .expect("valid object storage output");
        assert!(c.output.path_style);
        let url = ObjectUrl::parse(c.output.url.as_deref().unwrap_or_default()).expect("url");
        assert_eq!(
            (url.bucket.as_str(), url.prefix.as_str()),
            ("tsusage-test", "nightly/prod")
        );
        assert_eq!(url.to_string(), "s3://tsusage-test/nightly/prod");
        assert_eq!(
            ObjectUrl::parse("s3://b12").map(|u| u.prefix),
            Ok(String::new())
        );
        for (env, key, needle) in [
            (
                ("TSUSAGE_OUTPUT__URL", "https://b/x"),
                "output.url",
                "not an s3://",
            ),
            (
                ("TSUSAGE_OUTPUT__URL", "s3://B/x"),
                "output.url",
                "bucket name",
            ),
            (
                ("TSUSAGE_OUTPUT__URL", "s3://bkt/a/../b"),
                "output.url",
                "'..'",
            ),
            (
                ("TSUSAGE_OUTPUT__ENDPOINT", "http://h:1"),
                "output.endpoint",
                "only used with",
            ),
        ] {
            let err = load(MINIMAL, &[env]).expect_err(env.1).to_string();
            assert!(
                err.starts_with(&format!("config t.toml: {key}: ")) && err.contains(needle),
                "{err}"
            );
        }
        let err = load(
            MINIMAL,
            &[
                ("TSUSAGE_OUTPUT__URL", "s3://bkt/x"),
                ("TSUSAGE_OUTPUT__ENDPOINT", "127.0.0.1:8333"),
            ],
        )
        .expect_err("no scheme")
        .to_string();
        assert!(err.contains("output.endpoint: \"127.0.0.1:8333\""), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = load("account_name = \"1\"\n[output]\ndir = \"o\"\n", &[])
            .expect_err("no state")
            .to_string();
        assert!(err.contains("missing field `state`"), "{err}");
    }
}
