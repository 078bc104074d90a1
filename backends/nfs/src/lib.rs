//! The `nfs` image backend: raw images on an NFSv3 server, read through a user-space NFS
//! client (no kernel mount, no root on the osstream host).
//!
//! Each `NAME.img` in the configured folder of the export is the image `NAME`. Reads use
//! a small pool of NFS connections, so requests run in parallel; a stale file handle or
//! a broken connection is a temporary error: the connection is rebuilt, the handle looked
//! up again, and the read retried (a few times, with backoff) before the client sees an
//! error. The generation is the file's mtime and size. Images are read-only.
//!
//! ```toml
//! [backends.nas]
//! kind = "nfs"
//! server = "nas.example"      # host or address
//! export = "/export"          # the mount path
//! folder = "vdisks"           # inside the export; default: the export's root
//! nfs_port = 2049             # default: asked from the portmapper
//! mount_port = 20048          # default: asked from the portmapper
//! connections = 4
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    self, LOOKUP3args, Nfs3Option, Nfs3Result, READ3args, READDIRPLUS3args, diropargs3, fattr3,
    filename3, nfs_fh3, nfsstat3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioConnector;
use nfs3_client::{Nfs3Client, Nfs3ConnectionBuilder};
use osstream_core::{
    BackendContext, BlockSource, Bytes, BytesMut, Capability, Chunks, DynBackend, DynSource, Error,
    ErrorKind, Extent, Geometry, ImageBackend, ImageStat, OpenMode, ReadOpts, Registry, Result,
    SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range, read_only_error,
    validate_image_name,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// The registry kind.
pub const KIND: &str = "nfs";

/// Largest READ the backend asks for (nfs-ganesha's and Linux knfsd's usual maximum).
const MAX_READ: u32 = 1 << 20;
/// Attempts per operation before a temporary failure reaches the client.
const ATTEMPTS: u32 = 4;

/// `[backends.NAME]` with `kind = "nfs"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NfsConfig {
    /// The NFS server's host name or address.
    pub server: String,
    /// The export (mount path) on the server.
    pub export: String,
    /// A folder inside the export holding the images. Default: the export's root.
    #[serde(default)]
    pub folder: String,
    /// The NFS port. Default: asked from the server's portmapper.
    pub nfs_port: Option<u16>,
    /// The MOUNT port. Default: asked from the server's portmapper.
    pub mount_port: Option<u16>,
    /// Parallel connections to the server. Default: 4.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// The file extension that marks an image. Default: `img`.
    #[serde(default = "default_extension")]
    pub extension: String,
    /// An NFS call (or a reconnect) taking longer than this is abandoned as a temporary
    /// failure and retried on a new connection. Default: `10s`.
    #[serde(default = "default_timeout")]
    pub timeout: osstream_core::Seconds,
}

fn default_timeout() -> osstream_core::Seconds {
    osstream_core::Seconds(Duration::from_secs(10))
}

fn default_connections() -> usize {
    4
}

fn default_extension() -> String {
    "img".to_owned()
}

/// Adds the `nfs` kind to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_backend::<NfsConfig>();
}

impl osstream_core::BackendKind for NfsConfig {
    const KIND: &'static str = KIND;

    fn build(self, _ctx: &BackendContext, name: &str) -> Result<DynBackend> {
        Ok(Arc::new(NfsBackend::new(name, self)) as DynBackend)
    }
}

type Client = Nfs3Client<<TokioConnector as nfs3_client::net::Connector>::Connection>;

/// One pooled connection and the file handle of the images' folder on it.
struct Conn {
    client: Client,
    folder: nfs_fh3,
}

/// Images on an NFSv3 server.
pub struct NfsBackend {
    name: String,
    config: NfsConfig,
    pool: Arc<Pool>,
}

struct Pool {
    config: NfsConfig,
    slots: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
}

impl fmt::Debug for NfsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsBackend")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

fn rpc_error(err: impl fmt::Display, op: &'static str) -> Error {
    Error::new(ErrorKind::Io, format!("NFS {op} failed: {err}"))
        .with_op(op)
        .set_temporary()
}

fn status_error(status: nfsstat3, what: &str, op: &'static str) -> Error {
    let kind = match status {
        nfsstat3::NFS3ERR_NOENT => ErrorKind::NotFound,
        nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_PERM => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    };
    let error = Error::new(kind, format!("NFS {op} of {what} failed: {status:?}")).with_op(op);
    if matches!(
        status,
        nfsstat3::NFS3ERR_STALE | nfsstat3::NFS3ERR_JUKEBOX | nfsstat3::NFS3ERR_IO
    ) {
        error.set_temporary()
    } else {
        error
    }
}

fn generation(attrs: &fattr3) -> String {
    format!(
        "{}.{:09}-{}",
        attrs.mtime.seconds, attrs.mtime.nseconds, attrs.size
    )
}

impl Pool {
    async fn connect(&self) -> Result<Conn> {
        let config = &self.config;
        let credential = opaque_auth::auth_unix(&auth_unix {
            stamp: 0,
            machinename: Opaque::borrowed(b"osstream"),
            uid: 0,
            gid: 0,
            gids: vec![],
        });
        let mut builder =
            Nfs3ConnectionBuilder::new(TokioConnector, &config.server, &config.export)
                .connect_from_privileged_port(false)
                .credential(credential);
        if let Some(port) = config.mount_port {
            builder = builder.mount_port(port);
        }
        if let Some(port) = config.nfs_port {
            builder = builder.nfs3_port(port);
        }
        let connection = builder.mount().await.map_err(|e| {
            rpc_error(
                format!("{e} (server {}, export {})", config.server, config.export),
                "mount",
            )
        })?;
        let mut folder = connection.root_nfs_fh3();
        let mut client = connection.into_nfs3_client();
        for part in config.folder.split('/').filter(|p| !p.is_empty()) {
            folder = lookup(&mut client, &folder, part).await?.0;
        }
        Ok(Conn { client, folder })
    }

    /// Runs `work` on a pooled connection, rebuilding the connection and retrying with
    /// backoff on temporary failures.
    async fn run<T, F>(&self, op: &'static str, mut work: F) -> Result<T>
    where
        F: for<'c> FnMut(
            &'c mut Conn,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>,
        >,
    {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            let mut guard = slot.lock().await;
            let limit = self.config.timeout.0;
            let timed_out =
                |what: &str| rpc_error(format!("no answer within {limit:?} ({what})"), op);
            if guard.is_none() {
                match tokio::time::timeout(limit, self.connect()).await {
                    Ok(Ok(conn)) => *guard = Some(conn),
                    Ok(Err(err)) => {
                        last = Some(err);
                        continue;
                    }
                    Err(_) => {
                        last = Some(timed_out("connect"));
                        continue;
                    }
                }
            }
            // The connection leaves the slot while it is used: if this future is dropped
            // mid-call (a hedged read that lost, a cancelled prefetch), the connection goes
            // with it, half-sent request and unread reply included, and the slot is empty
            // for the next caller, who connects afresh.
            let mut conn = guard.take().expect("connected above");
            let outcome = tokio::time::timeout(limit, work(&mut conn))
                .await
                .unwrap_or_else(|_| Err(timed_out("call")));
            match outcome {
                Ok(value) => {
                    *guard = Some(conn);
                    return Ok(value);
                }
                Err(err) if err.is_temporary() => {
                    tracing::debug!(%err, attempt, op, "NFS operation failed; reconnecting and retrying");
                    last = Some(err);
                }
                Err(err) => {
                    *guard = Some(conn);
                    return Err(err);
                }
            }
        }
        Err(last
            .unwrap_or_else(|| Error::new(ErrorKind::Io, "NFS operation failed"))
            .with_op(op))
    }
}

async fn lookup(
    client: &mut Client,
    dir: &nfs_fh3,
    name: &str,
) -> Result<(nfs_fh3, Option<fattr3>)> {
    let args = LOOKUP3args {
        what: diropargs3 {
            dir: dir.clone(),
            name: filename3::from(name.as_bytes().to_vec()),
        },
    };
    match client
        .lookup(&args)
        .await
        .map_err(|e| rpc_error(e, "lookup"))?
    {
        Nfs3Result::Ok(ok) => {
            let attrs = match ok.obj_attributes {
                Nfs3Option::Some(a) => Some(a),
                Nfs3Option::None => None,
            };
            Ok((ok.object, attrs))
        }
        Nfs3Result::Err((status, _)) => Err(status_error(status, name, "lookup")),
    }
}

impl NfsBackend {
    /// A backend named `name`; connections are made on first use.
    pub fn new(name: &str, config: NfsConfig) -> Self {
        let slots = (0..config.connections.max(1))
            .map(|_| Mutex::new(None))
            .collect();
        let pool = Arc::new(Pool {
            config: config.clone(),
            slots,
            next: AtomicUsize::new(0),
        });
        NfsBackend {
            name: name.to_owned(),
            config,
            pool,
        }
    }

    fn file_name(&self, image: &str) -> Result<String> {
        validate_image_name(image)?;
        Ok(format!("{image}.{}", self.config.extension))
    }

    async fn lookup_image(&self, image: &str) -> Result<(nfs_fh3, fattr3)> {
        let file = self.file_name(image)?;
        self.pool
            .run("lookup", |conn| {
                let file = file.clone();
                Box::pin(async move {
                    let folder = conn.folder.clone();
                    let (handle, attrs) = lookup(&mut conn.client, &folder, &file).await?;
                    let attrs = attrs
                        .ok_or_else(|| rpc_error("the server sent no attributes", "lookup"))?;
                    Ok((handle, attrs))
                })
            })
            .await
            .map_err(|e| e.with_context("backend", &self.name))
    }
}

#[async_trait]
impl ImageBackend for NfsBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn identity(&self, image: &str) -> Result<String> {
        let file = self.file_name(image)?;
        let path: Vec<&str> = [self.config.export.as_str(), self.config.folder.as_str()]
            .iter()
            .flat_map(|part| part.split('/'))
            .filter(|segment| !segment.is_empty() && *segment != ".")
            .chain(std::iter::once(file.as_str()))
            .collect();
        Ok(format!("nfs:{}:/{}", self.config.server, path.join("/")))
    }

    async fn list(&self) -> Result<Vec<ImageStat>> {
        let suffix = format!(".{}", self.config.extension);
        let mut images = self
            .pool
            .run("readdirplus", |conn| {
                let suffix = suffix.clone();
                Box::pin(async move {
                    let mut found = Vec::new();
                    let (mut cookie, mut verifier) = (0, nfs3::cookieverf3::default());
                    loop {
                        let args = READDIRPLUS3args {
                            dir: conn.folder.clone(),
                            cookie,
                            cookieverf: verifier,
                            dircount: 64 * 1024,
                            maxcount: 256 * 1024,
                        };
                        let ok = match conn
                            .client
                            .readdirplus(&args)
                            .await
                            .map_err(|e| rpc_error(e, "readdirplus"))?
                        {
                            Nfs3Result::Ok(ok) => ok,
                            Nfs3Result::Err((status, _)) => {
                                return Err(status_error(
                                    status,
                                    "the images folder",
                                    "readdirplus",
                                ));
                            }
                        };
                        verifier = ok.cookieverf;
                        let eof = ok.reply.eof;
                        for entry in ok.reply.entries.0 {
                            cookie = entry.cookie;
                            let name = String::from_utf8_lossy(&entry.name.0).into_owned();
                            let (Some(image), Nfs3Option::Some(attrs)) =
                                (name.strip_suffix(&suffix), entry.name_attributes)
                            else {
                                continue;
                            };
                            if validate_image_name(image).is_ok()
                                && attrs.type_ == nfs3::ftype3::NF3REG
                            {
                                found.push(ImageStat {
                                    name: image.to_owned(),
                                    size: attrs.size,
                                    generation: generation(&attrs),
                                    writable: false,
                                });
                            }
                        }
                        if eof {
                            return Ok(found);
                        }
                    }
                })
            })
            .await
            .map_err(|e| e.with_context("backend", &self.name))?;
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    async fn stat(&self, image: &str) -> Result<ImageStat> {
        let (_, attrs) = self.lookup_image(image).await?;
        Ok(ImageStat {
            name: image.to_owned(),
            size: attrs.size,
            generation: generation(&attrs),
            writable: false,
        })
    }

    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        if mode.is_writable() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("the nfs backend '{}' serves images read-only", self.name),
            )
            .with_op("open"));
        }
        let (handle, attrs) = self.lookup_image(image).await?;
        Ok(Arc::new(NfsSource {
            info: SourceInfo {
                name: image.to_owned(),
                identity: self.identity(image)?,
                size: attrs.size,
                generation: generation(&attrs),
            },
            file: self.file_name(image)?,
            handle: Mutex::new(handle),
            pool: self.pool.clone(),
        }))
    }
}

/// One image file on the server.
struct NfsSource {
    info: SourceInfo,
    file: String,
    /// Replaced when the server says the handle went stale (the file was replaced).
    handle: Mutex<nfs_fh3>,
    pool: Arc<Pool>,
}

impl fmt::Debug for NfsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsSource")
            .field("info", &self.info)
            .finish()
    }
}

impl NfsSource {
    /// Reads `count` bytes at `offset` (at most `MAX_READ`), all of them or an error.
    async fn read_piece(&self, offset: u64, count: u32) -> Result<Bytes> {
        let handle = self.handle.lock().await.clone();
        let file = self.file.clone();
        let expected = self.info.generation.clone();
        let (data, fresh) = self
            .pool
            .run("read", |conn| {
                let (handle, file, expected) = (handle.clone(), file.clone(), expected.clone());
                Box::pin(async move {
                    let mut handle = handle;
                    let mut fresh = None;
                    let mut out = BytesMut::with_capacity(count as usize);
                    while out.len() < count as usize {
                        let args = READ3args { file: handle.clone(), offset: offset + out.len() as u64, count: count - out.len() as u32 };
                        match conn.client.read(&args).await.map_err(|e| rpc_error(e, "read"))? {
                            Nfs3Result::Ok(ok) => {
                                // The reply carries the file's attributes after the read: a
                                // file written in place since it was opened fails the read
                                // rather than give a mix of old and new bytes.
                                if let Nfs3Option::Some(attrs) = &ok.file_attributes
                                    && generation(attrs) != expected
                                {
                                    return Err(Error::new(
                                        ErrorKind::Io,
                                        format!("{file} was changed in place on the server while clients read it; replace images with `osstream vdisk import --replace`, and reconnect to read the new one"),
                                    )
                                    .with_op("read"));
                                }
                                if ok.data.is_empty() {
                                    return Err(Error::new(ErrorKind::Io, format!("{file} ended early on the server")).with_op("read"));
                                }
                                out.extend_from_slice(&ok.data);
                            }
                            Nfs3Result::Err((nfsstat3::NFS3ERR_STALE, _)) => {
                                // The handle went stale (a server restart, a failover): look
                                // the file up again; if it is another version of the image,
                                // stop rather than mix two versions in one client's disk.
                                let folder = conn.folder.clone();
                                let (new_handle, attrs) = lookup(&mut conn.client, &folder, &file).await?;
                                if attrs.as_ref().map(generation) != Some(expected.clone()) {
                                    return Err(Error::new(
                                        ErrorKind::Io,
                                        format!("{file} was replaced on the server while open; clients must attach again"),
                                    )
                                    .with_op("read"));
                                }
                                handle = new_handle;
                                fresh = Some(handle.clone());
                            }
                            Nfs3Result::Err((status, _)) => return Err(status_error(status, &file, "read")),
                        }
                    }
                    Ok((out.freeze(), fresh))
                })
            })
            .await?;
        if let Some(fresh) = fresh {
            *self.handle.lock().await = fresh;
        }
        Ok(data)
    }
}

#[async_trait]
impl BlockSource for NfsSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        Capability::read_only()
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            minimum: 1,
            preferred: 64 * 1024,
            maximum: 32 * 1024 * 1024,
        }
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        let mut parts = Vec::new();
        let mut done = 0u64;
        while done < len as u64 {
            let count = (len as u64 - done).min(u64::from(MAX_READ)) as u32;
            parts.push(self.read_piece(offset + done, count).await?);
            done += u64::from(count);
        }
        Ok(Chunks::from_parts(parts))
    }

    async fn write_at(&self, _offset: u64, _data: Bytes, _opts: WriteOpts) -> Result<()> {
        Err(read_only_error(&self.info, "write_at"))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only_error(&self.info, "trim"))
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _opts: ZeroOpts) -> Result<()> {
        Err(read_only_error(&self.info, "write_zeroes"))
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        osstream_core::all_data(&self.info, offset, len)
    }
}
