//! Output on object storage (`output.url = "s3://bucket/prefix"`): the S3 client, whole-object
//! uploads, and the atomic replacement of a Parquet partition.
//!
//! # The visibility rule: one object per partition
//!
//! On S3 a partition is **one object**, `{prefix}/usage/usage_date=YYYY-MM-DD/part-00000.parquet`
//! (the local layout's name; `output.max_rows_per_file` does not split it, its row groups of 1M
//! rows do the job of files for readers that parallelize). A rerun replaces it with a single PUT,
//! or a completed multipart upload for objects above [`PART_BYTES`]: S3 makes an object visible
//! whole, at completion, and a GET after that returns the new object, one before it the old one
//! (strong read-after-write consistency). So a reader listing `usage/` sees each partition old or
//! new, never half-written, never doubled: the same guarantee as the local `RENAME_EXCHANGE`.
//! Several objects per partition (new names first, then a manifest or a delete of the old ones)
//! would show listing readers (Spark, DuckDB, polars on `s3://…/usage/`) both sets at once; they
//! do not read manifests.
//!
//! What S3 cannot give: a reader that fetched the old footer and reads a column range after the
//! swap gets bytes of the new object. Readers that pin the ETag (Spark's S3A change detection,
//! `object_store` with `If-Match`) fail and retry such a read; others should read a partition
//! whole, or not while a run writes it.
//!
//! The Parquet file is encoded exactly as for a local directory (in `output.dir/.staging/`,
//! fsynced), then uploaded: the bytes on S3 are the bytes a local run writes, and a failed upload
//! is retried from the file without encoding again. An interrupted multipart upload is aborted and
//! never visible. After the new object is in place, any other object under the partition (left by
//! an earlier layout) is deleted; an empty partition deletes its object.
//!
//! Credentials come from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`
//! only: never the config file, never printed (errors name the `s3://` URL, and any secret that
//! a server echoes is cut out of them). TLS is rustls with the ring provider, as everywhere here.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::WriteError;
use crate::config::{ObjectUrl, OutputConfig, Secret};

/// The environment variables credentials come from (the AWS SDKs' names).
pub const ENV_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const ENV_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const ENV_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// The region when `output.region` is not set; `us-east-1` when neither is.
pub const ENV_REGION: &str = "AWS_REGION";
pub const DEFAULT_REGION: &str = "us-east-1";

/// Files up to this size go up in one PUT; larger ones as a multipart upload of parts this size
/// (S3's smallest part is 5 MiB).
pub const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once (memory: about `(1 + this) × PART_BYTES` per upload).
const PARTS_IN_FLIGHT: usize = 2;
/// Tries of one request after the first (connection errors, 5xx, throttling).
const MAX_RETRIES: usize = 3;
/// No retry starts later than this after the first try of a request.
const RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting to the endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One request, first byte to last (a part of [`PART_BYTES`] at 1 MB/s fits).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Threads of the runtime that carries the uploads (the write stage itself is synchronous).
const IO_THREADS: usize = 2;

/// The directory of the Parquet partitions below the prefix, as locally below `output.dir`.
pub const USAGE_DIR: &str = "usage";

/// An S3 bucket and prefix the output goes to, with a small runtime of its own so that the
/// synchronous writers can wait for uploads from any thread.
pub struct Bucket {
    url: ObjectUrl,
    store: Arc<AmazonS3>,
    /// Cut out of every error message (a server may echo what it was sent).
    secrets: Vec<Secret>,
    part_bytes: usize,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("url", &self.url.to_string())
            .field("credentials", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        // Dropping a runtime blocks; a command may end inside another runtime, where that panics.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Bucket {
    /// The bucket of `output.url`, or `None` when the output is the local directory. Credentials
    /// from the process environment.
    pub fn open(output: &OutputConfig) -> Result<Option<Bucket>, WriteError> {
        Bucket::open_with_env(output, |name| std::env::var(name).ok())
    }

    /// [`Bucket::open`] with the environment given as a lookup, for tests.
    pub fn open_with_env(
        output: &OutputConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Bucket>, WriteError> {
        let Some(raw) = &output.url else {
            return Ok(None);
        };
        let url = ObjectUrl::parse(raw).map_err(|message| WriteError::Bucket {
            url: raw.clone(),
            message,
        })?;
        let fail = |message: String| WriteError::Bucket {
            url: url.to_string(),
            message,
        };
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        let (Some(key_id), Some(secret)) = (var(ENV_ACCESS_KEY_ID), var(ENV_SECRET_ACCESS_KEY))
        else {
            return Err(fail(format!(
                "set {ENV_ACCESS_KEY_ID} and {ENV_SECRET_ACCESS_KEY} in the environment \
                 (credentials for output.url are never read from the config file)"
            )));
        };
        let token = var(ENV_SESSION_TOKEN);
        let region = output
            .region
            .clone()
            .or_else(|| var(ENV_REGION))
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        // reqwest (under object_store) needs rustls' process-wide provider before any client.
        crate::tls::install_crypto_provider();
        let allow_http = output
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&region)
            .with_access_key_id(&key_id)
            .with_secret_access_key(&secret)
            .with_virtual_hosted_style_request(!output.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_user_agent(
                        concat!("tsusage/", env!("CARGO_PKG_VERSION"))
                            .parse()
                            .map_err(|_| fail("bad user agent".into()))?,
                    ),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            });
        if let Some(token) = &token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &output.endpoint {
            builder =
                builder.with_endpoint(bucket_endpoint(endpoint, &url.bucket, output.path_style));
        }
        let mut secrets = vec![Secret::new(secret.clone())];
        secrets.extend(token.map(Secret::new));
        let scrub = |message: String| scrub(message, &secrets);
        let store = builder.build().map_err(|e| fail(scrub(e.to_string())))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .thread_name("tsusage-upload")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start the upload runtime: {e}")))?;
        Ok(Some(Bucket {
            url,
            store: Arc::new(store),
            secrets,
            part_bytes: PART_BYTES,
            runtime: Some(runtime),
        }))
    }

    /// Uploads in parts of `bytes` (at least 5 MiB on AWS) from files larger than that.
    pub fn with_part_bytes(mut self, bytes: usize) -> Bucket {
        self.part_bytes = bytes.max(1);
        self
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self) -> &ObjectUrl {
        &self.url
    }

    /// The `s3://` URL of `relative` (a key below the prefix), for messages and reports.
    pub fn url_of(&self, relative: &str) -> String {
        format!("{}/{relative}", self.url)
    }

    /// The full key of `relative` below the prefix.
    fn key(&self, relative: &str) -> Key {
        match self.url.prefix.is_empty() {
            true => Key::from(relative),
            false => Key::from(format!("{}/{relative}", self.url.prefix)),
        }
    }

    /// Checks that the endpoint answers and takes the credentials (one listing of the prefix), so
    /// that a command fails before it asks the vendor for anything.
    pub fn check(&self) -> Result<(), WriteError> {
        let store = self.store.clone();
        let prefix = self.key(USAGE_DIR);
        self.block(async move { store.list_with_delimiter(Some(&prefix)).await })?
            .map(drop)
            .map_err(|e| self.error(&self.url.to_string(), &e))
    }

    /// Uploads the local file `local` as the object `relative` (one PUT, or a multipart upload
    /// completed at the end: visible whole or not at all).
    pub fn put_file(&self, relative: &str, local: &Path) -> Result<(), WriteError> {
        let size = std::fs::metadata(local)
            .map_err(|e| WriteError::io(local, e))?
            .len();
        let store = self.store.clone();
        let key = self.key(relative);
        let path = local.to_owned();
        let part = self.part_bytes;
        let outcome = self.block(async move {
            if size <= part as u64 {
                let bytes = std::fs::read(&path).map_err(Upload::Read)?;
                store
                    .put(&key, PutPayload::from(bytes))
                    .await
                    .map_err(Upload::Store)?;
                return Ok(());
            }
            let upload = store.put_multipart(&key).await.map_err(Upload::Store)?;
            let mut upload = WriteMultipart::new_with_chunk_size(upload, part);
            let sent = send_parts(&mut upload, &path, part).await;
            match sent {
                Ok(()) => upload.finish().await.map(drop).map_err(Upload::Store),
                Err(e) => {
                    // Nothing of an aborted upload is ever visible; the old object stays.
                    let _ = upload.abort().await;
                    Err(e)
                }
            }
        })?;
        outcome.map_err(|e| match e {
            Upload::Read(e) => WriteError::io(local, e),
            Upload::Store(e) => self.error(&self.url_of(relative), &e),
        })
    }

    /// Deletes the objects directly below `relative/` except `keep` (file names).
    pub fn delete_others(&self, relative: &str, keep: &[String]) -> Result<u64, WriteError> {
        let store = self.store.clone();
        let dir = self.key(relative);
        let keep = keep.to_vec();
        let outcome = self.block(async move {
            let listed = store.list_with_delimiter(Some(&dir)).await?;
            let mut deleted = 0u64;
            for object in listed.objects {
                // Some servers (SeaweedFS) list an emptied directory as an object of its own name.
                if object.location == dir {
                    continue;
                }
                let name = object.location.filename().unwrap_or_default().to_owned();
                if !keep.contains(&name) {
                    store.delete(&object.location).await?;
                    deleted += 1;
                }
            }
            Ok::<u64, object_store::Error>(deleted)
        })?;
        outcome.map_err(|e| self.error(&self.url_of(relative), &e))
    }

    /// Replaces partition `name` (e.g. `usage_date=2021-08-15`) with `files` (at most one: see the
    /// module docs), uploaded under `usage/name/` by file name; then removes any other object there.
    /// With no file the partition's objects are deleted.
    pub fn replace_partition(&self, name: &str, files: &[PathBuf]) -> Result<(), WriteError> {
        let dir = format!("{USAGE_DIR}/{name}");
        if files.len() > 1 {
            return Err(WriteError::Bucket {
                url: self.url_of(&dir),
                message: format!(
                    "{} files for one partition: on object storage a partition is one object",
                    files.len()
                ),
            });
        }
        let mut keep = Vec::new();
        for file in files {
            let file_name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.put_file(&format!("{dir}/{file_name}"), file)?;
            keep.push(file_name);
        }
        let stale = self.delete_others(&dir, &keep)?;
        if stale > 0 {
            tracing::info!(
                partition = name,
                deleted = stale,
                "removed objects of an earlier layout"
            );
        }
        Ok(())
    }

    /// Uploads `local`, a file below `out_dir`, to the same path below the prefix (a rejects file,
    /// a run report, a completeness file); returns its `s3://` URL.
    pub fn upload_beside(&self, out_dir: &Path, local: &Path) -> Result<String, WriteError> {
        let relative = local
            .strip_prefix(out_dir)
            .map_err(|_| WriteError::Bucket {
                url: self.url.to_string(),
                message: format!("{} is not below output.dir", local.display()),
            })?;
        let relative = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        self.put_file(&relative, local)?;
        Ok(self.url_of(&relative))
    }

    /// Runs `future` on the upload runtime and waits for it from this (synchronous) thread.
    fn block<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, WriteError> {
        let gone = || WriteError::Bucket {
            url: self.url.to_string(),
            message: "the upload runtime has stopped".into(),
        };
        let runtime = self.runtime.as_ref().ok_or_else(gone)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| gone())
    }

    /// An error of the store about `url`, with the credentials cut out and a hint at the usual
    /// causes.
    fn error(&self, url: &str, e: &object_store::Error) -> WriteError {
        let mut message = scrub(describe(e), &self.secrets);
        if [
            "403 Forbidden",
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        ]
        .iter()
        .any(|m| message.contains(m))
        {
            message.push_str(&format!(
                " (check {ENV_ACCESS_KEY_ID}, {ENV_SECRET_ACCESS_KEY} and output.region)"
            ));
        } else if message.contains("(Connect)") || message.contains("error sending request") {
            message.push_str(" (check output.endpoint and that the server is up)");
        }
        WriteError::Bucket {
            url: url.to_owned(),
            message,
        }
    }
}

/// Why an upload failed: reading the local file, or the store.
enum Upload {
    Read(std::io::Error),
    Store(object_store::Error),
}

/// Reads `path` in parts of `part` bytes into `upload`, at most [`PARTS_IN_FLIGHT`] in flight.
/// (The reads block this runtime's thread briefly; it carries nothing else.)
async fn send_parts(upload: &mut WriteMultipart, path: &Path, part: usize) -> Result<(), Upload> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(Upload::Read)?;
    loop {
        let mut chunk = Vec::with_capacity(part);
        let read = (&mut file)
            .take(part as u64)
            .read_to_end(&mut chunk)
            .map_err(Upload::Read)?;
        if read == 0 {
            return Ok(());
        }
        upload
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(Upload::Store)?;
        upload.put(bytes::Bytes::from(chunk));
    }
}

/// The endpoint object_store wants: with path-style requests the server's URL; with
/// virtual-hosted style the bucket's own host (`https://bucket.host`).
fn bucket_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if path_style {
        return endpoint.to_owned();
    }
    match endpoint.split_once("://") {
        Some((scheme, host)) => format!("{scheme}://{bucket}.{host}"),
        None => endpoint.to_owned(),
    }
}

/// The store's error with its causes, on one line.
fn describe(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// Secrets shorter than this are not cut out of messages (it would mangle them, and real AWS
/// secrets are 40 characters).
const MIN_SCRUBBED_LEN: usize = 8;

/// `message` with every secret replaced by `[redacted]`.
fn scrub(mut message: String, secrets: &[Secret]) -> String {
    for secret in secrets {
        if secret.expose().len() >= MIN_SCRUBBED_LEN {
            message = message.replace(secret.expose(), "[redacted]");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(url: &str) -> OutputConfig {
        OutputConfig {
            dir: PathBuf::from("out"),
            partition_by: crate::config::PartitionBy::Day,
            max_rows_per_file: 1,
            zstd_level: 3,
            url: Some(url.to_owned()),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
            path_style: true,
        }
    }

    #[test]
    fn virtual_hosted_style_puts_the_bucket_in_the_host() {
        assert_eq!(
            bucket_endpoint("https://s3.example.com/", "b1", false),
            "https://b1.s3.example.com"
        );
        assert_eq!(
            bucket_endpoint("http://127.0.0.1:8333/", "b1", true),
            "http://127.0.0.1:8333"
        );
    }

    #[test]
    fn missing_credentials_are_named_without_reading_the_config() {
        let err = Bucket::open_with_env(&output("s3://tsusage-test/p"), |_| None)
            .expect_err("no credentials")
            .to_string();
        assert!(
            err.starts_with("s3://tsusage-test/p: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{err}"
        );
    }

    #[test]
    fn keys_sit_below_the_prefix_and_debug_hides_the_secret() {
        let env = |name: &str| match name {
            ENV_ACCESS_KEY_ID => Some("AKIDEXAMPLE".to_owned()),
            ENV_SECRET_ACCESS_KEY => Some("sentinel-secret-4711".to_owned()),
            _ => None,
        };
        let bucket = Bucket::open_with_env(&output("s3://tsusage-test/a/b/"), env)
            .expect("opens")
            .expect("a bucket");
        assert_eq!(
            bucket
                .key("usage/usage_date=2021-08-15/part-00000.parquet")
                .as_ref(),
            "a/b/usage/usage_date=2021-08-15/part-00000.parquet"
        );
        assert_eq!(
            bucket.url_of("runs/r.json"),
            "s3://tsusage-test/a/b/runs/r.json"
        );
        let debug = format!("{bucket:?}");
        assert!(!debug.contains("sentinel-secret-4711"), "{debug}");
        assert_eq!(
            scrub("sig sentinel-secret-4711 x".into(), &bucket.secrets),
            "sig [redacted] x"
        );
    }
}
