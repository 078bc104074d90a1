use osstream_core::{ByteSize, Seconds};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How `osstream vdisk import` stores a new image (reading understands both, whatever
/// this says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One object per image, `PREFIX/NAME`, read with range GETs. Read-only.
    #[default]
    Object,
    /// `PREFIX/NAME/osstream-manifest.json` plus fixed-size chunk objects
    /// `PREFIX/NAME/chunks/NNNNNNNNNNNN`; all-zero chunks are not stored. Writable
    /// (private vdisks) when the backend is `writable`.
    Chunked,
}

/// `[backends.NAME]` with `kind = "s3"`.
///
/// Every credential or endpoint key left out is taken from the usual AWS environment
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket holding the images.
    pub bucket: String,
    /// A key prefix ("folder") inside the bucket. Default: the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// The endpoint URL of an S3-compatible server (MinIO, Ceph RGW...). Default: AWS.
    pub endpoint: Option<String>,
    /// The region. Default: from the environment, else `us-east-1`.
    pub region: Option<String>,
    /// Default: `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// Default: `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// Allow a plain `http://` endpoint. Default: false.
    #[serde(default)]
    pub allow_http: bool,
    /// Address buckets as `BUCKET.endpoint` instead of `endpoint/BUCKET`. Default: false
    /// (path style, what most S3-compatible servers expect).
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Open chunked images read-write (private vdisks). Default: false.
    #[serde(default)]
    pub writable: bool,
    /// How `osstream vdisk import` stores new images. Default: `object`.
    #[serde(default)]
    pub layout: Layout,
    /// Chunk size of new chunked images. Default: `1MiB`.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: ByteSize,
    /// Reads larger than this are split into parallel range GETs; also the multipart
    /// part size of imports (at least 5 MiB there, S3's minimum). Default: `8MiB`.
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// Requests in flight to the endpoint at once, for all images of this backend.
    /// Reads waiting for a slot are merged with adjacent waiting reads into one GET, so
    /// a moderate number gives fewer, larger GETs (measured against s3rver: 4-8 slots
    /// read sequentially 2x faster than 16). Raise it for high-latency endpoints.
    /// Default: 8.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Retries of a request after a temporary failure (HTTP 429, 5xx, timeout, reset),
    /// with exponential backoff. Default: 5.
    #[serde(default = "default_retries")]
    pub retries: usize,
    /// A request not finished within this time is abandoned and retried. Default: `30s`.
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
    /// Written chunks kept in memory before they are uploaded without waiting for a
    /// flush (chunked images). Default: `64MiB`.
    #[serde(default = "default_dirty_limit")]
    pub dirty_limit: ByteSize,
}

fn default_chunk_size() -> ByteSize {
    ByteSize::mib(1)
}

fn default_part_size() -> ByteSize {
    ByteSize::mib(8)
}

fn default_concurrency() -> usize {
    8
}

fn default_retries() -> usize {
    5
}

fn default_timeout() -> Seconds {
    Seconds(Duration::from_secs(30))
}

fn default_dirty_limit() -> ByteSize {
    ByteSize::mib(64)
}
