//! The connection to one bucket: object_store's S3 client plus what osstream adds on top
//! (a shared concurrency limit, length checks, one more retry round, error mapping).

use std::ops::Range;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ListResult, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutPayload, PutResult, RetryConfig,
};
use osstream_core::{Bytes, Error, ErrorKind, Result};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::S3Config;

/// Extra attempts osstream makes when a response passed object_store's own retries but
/// is still unusable (a body of the wrong length, a transport error it does not retry).
const EXTRA_ATTEMPTS: u32 = 2;

/// One bucket and key prefix.
#[derive(Debug)]
pub(crate) struct Store {
    /// The backend's name, for messages.
    pub backend: String,
    /// `s3:ENDPOINT/BUCKET` (`s3:aws:REGION/BUCKET` on AWS): where the bucket lives, for
    /// image identities.
    pub location: String,
    s3: AmazonS3,
    prefix: Path,
    limit: Semaphore,
    /// Calls made to the bucket (retries of one call not counted).
    calls: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn new(backend: &str, config: &S3Config) -> Result<Store> {
        let config_error =
            |what: String| Error::new(ErrorKind::Config, format!("backends.{backend}: {what}"));
        if config.bucket.is_empty() {
            return Err(config_error("bucket must not be empty".into()));
        }
        if config.concurrency == 0 {
            return Err(config_error("concurrency must be at least 1".into()));
        }
        if let Some(endpoint) = &config.endpoint
            && endpoint.starts_with("http://")
            && !config.allow_http
        {
            return Err(config_error(format!(
                "endpoint {endpoint:?} is plain http: set allow_http = true (or use https://)"
            )));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_allow_http(config.allow_http)
            .with_virtual_hosted_style_request(config.virtual_hosted_style)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: config.retries,
                retry_timeout: config.timeout.0 * (config.retries as u32 + 1),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(config.timeout.0)
                    .with_connect_timeout(config.timeout.0.min(Duration::from_secs(5)))
                    .with_allow_http(config.allow_http)
                    .with_pool_max_idle_per_host(config.concurrency.max(4)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let endpoint = builder
            .get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint)
            .map(|e| e.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| {
                let region = builder
                    .get_config_value(&object_store::aws::AmazonS3ConfigKey::Region)
                    .unwrap_or_else(|| "us-east-1".to_owned());
                format!("aws:{region}")
            });
        let location = format!("s3:{endpoint}/{}", config.bucket);
        let s3 = builder
            .build()
            .map_err(|e| config_error(format!("cannot set up the S3 client: {e}")))?;
        let prefix = Path::parse(config.prefix.trim_matches('/')).map_err(|e| {
            config_error(format!(
                "prefix = {:?} is not a valid key prefix: {e}",
                config.prefix
            ))
        })?;
        Ok(Store {
            backend: backend.to_owned(),
            location,
            s3,
            prefix,
            limit: Semaphore::new(config.concurrency),
            calls: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The key of `parts` joined under the prefix.
    pub fn path(&self, parts: &[&str]) -> Path {
        parts
            .iter()
            .fold(self.prefix.clone(), |path, part| path.join(*part))
    }

    /// The prefix every image lives under.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// Calls made to the bucket so far (each `head`, `get`, `put`, `list`, `delete`...).
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_call(&self) {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for one of the backend's request slots.
    pub async fn permit(&self) -> SemaphorePermit<'_> {
        self.limit
            .acquire()
            .await
            .expect("the request semaphore is never closed")
    }

    fn error(&self, err: object_store::Error, op: &'static str, path: &Path) -> Error {
        map_error(err, op, &self.backend, path)
    }

    /// Runs `attempt` until it succeeds, fails for good, or has failed temporarily
    /// `EXTRA_ATTEMPTS + 1` times, with backoff between attempts. object_store already
    /// retries what it recognises (429, 5xx, timeouts, connection errors before a
    /// response); this round catches what it passes through: bodies cut short or reset
    /// mid-way, and lengths that do not match.
    async fn retrying<T, F, Fut>(
        &self,
        what: &'static str,
        path: &Path,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) if err.is_temporary() && tries <= EXTRA_ATTEMPTS => {
                    tracing::warn!(backend = %self.backend, %path, attempt = tries, error = %err, "retrying an S3 {what}");
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub async fn head(&self, path: &Path) -> Result<ObjectMeta> {
        self.count_call();
        self.retrying("head", path, || async {
            let _permit = self.permit().await;
            self.s3
                .head(path)
                .await
                .map_err(|e| self.error(e, "head", path))
        })
        .await
    }

    /// Reads `range` of the object; `None` if the object does not exist. The body must be
    /// exactly the range asked for, else the read is retried and finally fails: a short
    /// or misplaced response never reaches a client. With `if_match`, a changed object
    /// is an error rather than a mix of old and new bytes.
    ///
    /// `object_len` is the object's size: a one-byte range is fetched as two bytes and
    /// cut, because some servers (s3rver among them) answer `Range: bytes=N-N` with the
    /// whole object.
    pub async fn get_range(
        &self,
        path: &Path,
        range: Range<u64>,
        object_len: u64,
        if_match: Option<&str>,
    ) -> Result<Option<Bytes>> {
        self.get_range_slotted(path, range, object_len, if_match, true)
            .await
    }

    /// [`Store::get_range`] for a caller that already holds a slot from
    /// [`Store::permit`].
    pub async fn get_range_holding_slot(
        &self,
        path: &Path,
        range: Range<u64>,
        object_len: u64,
        if_match: Option<&str>,
    ) -> Result<Option<Bytes>> {
        self.get_range_slotted(path, range, object_len, if_match, false)
            .await
    }

    async fn get_range_slotted(
        &self,
        path: &Path,
        range: Range<u64>,
        object_len: u64,
        if_match: Option<&str>,
        take_slot: bool,
    ) -> Result<Option<Bytes>> {
        if range == (0..1) && object_len == 1 {
            return Ok(self.get_all(path).await?.map(|(bytes, _)| bytes));
        }
        if range.end - range.start == 1 && object_len >= 2 {
            let wide = if range.end < object_len {
                range.start..range.end + 1
            } else {
                range.start - 1..range.end
            };
            let skip = (range.start - wide.start) as usize;
            return Ok(Box::pin(
                self.get_range_slotted(path, wide, object_len, if_match, take_slot),
            )
            .await?
            .map(|bytes| bytes.slice(skip..skip + 1)));
        }
        self.count_call();
        let want = range.end - range.start;
        self.retrying("read", path, || async {
            let _permit = if take_slot {
                Some(self.permit().await)
            } else {
                None
            };
            let result = self.get_once(path, range.clone(), if_match).await;
            match result {
                Ok(Some(bytes)) if bytes.len() as u64 != want => Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "S3 returned {} bytes for a {want}-byte range {}..{} of {path}",
                        bytes.len(),
                        range.start,
                        range.end
                    ),
                )
                .with_op("get")
                .with_context("backend", &self.backend)
                .set_temporary()),
                other => other,
            }
        })
        .await
    }

    async fn get_once(
        &self,
        path: &Path,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> Result<Option<Bytes>> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: if_match.map(str::to_owned),
            ..GetOptions::default()
        };
        let result = match self.s3.get_opts(path, options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(e, "get", path)),
        };
        // Not every S3-compatible server honours If-Match on GET: compare the ETag too.
        if let (Some(want), Some(got)) = (if_match, result.meta.e_tag.as_deref())
            && want != got
        {
            return Err(self.error(
                object_store::Error::Precondition {
                    path: path.to_string(),
                    source: format!("ETag {got} instead of {want}").into(),
                },
                "get",
                path,
            ));
        }
        match result.bytes().await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) => Err(self.error(e, "get", path)),
        }
    }

    /// Reads a whole (small) object; `None` if it does not exist.
    pub async fn get_all(&self, path: &Path) -> Result<Option<(Bytes, ObjectMeta)>> {
        self.count_call();
        self.retrying("read", path, || async {
            let _permit = self.permit().await;
            let result = match self.s3.get(path).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.error(e, "get", path)),
            };
            let meta = result.meta.clone();
            let bytes = result
                .bytes()
                .await
                .map_err(|e| self.error(e, "get", path))?;
            Ok(Some((bytes, meta)))
        })
        .await
    }

    /// Stores `data` as the object `path` (a PUT replaces an object atomically, so a
    /// retried PUT is harmless).
    pub async fn put(&self, path: &Path, data: Bytes) -> Result<PutResult> {
        self.count_call();
        self.retrying("write", path, || async {
            let _permit = self.permit().await;
            self.s3
                .put(path, PutPayload::from_bytes(data.clone()))
                .await
                .map_err(|e| self.error(e, "put", path))
        })
        .await
    }

    pub async fn delete(&self, path: &Path) -> Result<()> {
        self.count_call();
        self.retrying("delete", path, || async {
            let _permit = self.permit().await;
            match self.s3.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.error(e, "delete", path)),
            }
        })
        .await
    }

    /// Every object under `prefix`, recursively.
    pub async fn list_all(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.count_call();
        self.retrying("list", prefix, || async {
            let _permit = self.permit().await;
            self.s3
                .list(Some(prefix))
                .try_collect()
                .await
                .map_err(|e| self.error(e, "list", prefix))
        })
        .await
    }

    /// The objects and sub-prefixes directly under `prefix`.
    pub async fn list_dir(&self, prefix: &Path) -> Result<ListResult> {
        self.count_call();
        self.retrying("list", prefix, || async {
            let _permit = self.permit().await;
            let root = (!prefix.as_ref().is_empty()).then_some(prefix);
            self.s3
                .list_with_delimiter(root)
                .await
                .map_err(|e| self.error(e, "list", prefix))
        })
        .await
    }

    /// Starts a multipart upload (the caller bounds its parallel parts).
    pub async fn put_multipart(
        &self,
        path: &Path,
    ) -> Result<Box<dyn object_store::MultipartUpload>> {
        self.count_call();
        let _permit = self.permit().await;
        self.s3
            .put_multipart(path)
            .await
            .map_err(|e| self.error(e, "create multipart upload", path))
    }
}

/// Maps an object_store error into osstream's error: missing objects are `NotFound`,
/// a changed object (`If-Match` failed) is `Conflict`, transport and server failures that
/// survived object_store's retries are temporary `Io` errors.
pub(crate) fn map_error(
    err: object_store::Error,
    op: &'static str,
    backend: &str,
    path: &Path,
) -> Error {
    let detail = describe(&err);
    let (mut kind, mut temporary) = match &err {
        object_store::Error::NotFound { .. } => (ErrorKind::NotFound, false),
        object_store::Error::Precondition { .. } => (ErrorKind::Conflict, false),
        object_store::Error::AlreadyExists { .. } => (ErrorKind::Conflict, false),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => (ErrorKind::PermissionDenied, false),
        object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. } => {
            (ErrorKind::Unsupported, false)
        }
        _ => (ErrorKind::Io, true),
    };
    // object_store keeps the HTTP status inside a type it does not export, so the status
    // is read from its message. These answers will not get better by retrying; others
    // (408, 429, and 400s such as RequestTimeout, IncompleteBody or ExpiredToken, which
    // S3 and Ceph send for transient trouble) stay temporary.
    let transient_400 = [
        "RequestTimeout",
        "IncompleteBody",
        "ExpiredToken",
        "SlowDown",
    ]
    .iter()
    .any(|code| detail.contains(code));
    if kind == ErrorKind::Io
        && let Some(status) = http_status(&detail)
        && matches!(status, 400 | 401 | 403 | 404 | 405 | 411 | 416)
        && !(status == 400 && transient_400)
    {
        temporary = false;
        kind = match status {
            401 | 403 => ErrorKind::PermissionDenied,
            404 => ErrorKind::NotFound,
            _ => ErrorKind::InvalidInput,
        };
    }
    let hint = if detail.contains("NoSuchBucket") {
        " (the bucket does not exist: check `bucket` and `endpoint`)"
    } else if detail.contains("169.254.169.254") {
        " (no credentials found: set access_key_id and secret_access_key, or AWS_ACCESS_KEY_ID \
         and AWS_SECRET_ACCESS_KEY)"
    } else if detail.contains("InvalidAccessKeyId") || detail.contains("SignatureDoesNotMatch") {
        " (the endpoint refused the credentials: check access_key_id and secret_access_key)"
    } else {
        ""
    };
    let message = match kind {
        ErrorKind::Conflict if op == "get" => format!(
            "S3 object {path} changed while it was being served (its ETag no longer matches); \
             re-register the vdisk or reconnect to read the new content"
        ),
        _ => format!("S3 {op} of {path} failed: {detail}{hint}"),
    };
    let error = Error::new(kind, message)
        .with_op(op)
        .with_context("backend", backend);
    if temporary {
        error.set_temporary()
    } else {
        error
    }
}

/// The error and its causes on one line ("error sending request: ... Connection refused"),
/// with the XML bodies S3 servers send folded into it.
fn describe(err: &object_store::Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = inner.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The HTTP status object_store reports ("... status code: 404 Not Found ..."), if any.
fn http_status(detail: &str) -> Option<u16> {
    let at = detail.find("status code: ")? + "status code: ".len();
    detail.get(at..at + 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::http_status;

    #[test]
    fn the_status_is_read_from_object_stores_message() {
        assert_eq!(
            http_status("Server returned non-2xx status code: 403 Forbidden: <Error>"),
            Some(403)
        );
        assert_eq!(http_status("HTTP error: error sending request"), None);
    }
}
