//! `osstream vdisk import` for S3: a local raw file stored as one object (multipart
//! upload, parts in parallel) or as a chunked image (chunk PUTs in parallel, the manifest
//! last, so an image is only visible once complete).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::StreamExt;
use object_store::WriteMultipart;
use object_store::path::Path;
use osstream_core::{Bytes, Error, ErrorKind, ImportOptions, Result};

use crate::chunked::{MANIFEST, Manifest, chunk_path, data_prefix};
use crate::config::S3Config;
use crate::store::{Store, map_error};

/// S3's smallest multipart part (except the last).
const MIN_PART: u64 = 5 * 1024 * 1024;

fn open(from: &std::path::Path) -> Result<(Arc<std::fs::File>, u64)> {
    let file = std::fs::File::open(from)
        .map_err(|e| Error::from_io(e, format!("cannot open {}", from.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::from_io(e, format!("cannot stat {}", from.display())))?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a regular file", from.display()),
        ));
    }
    Ok((Arc::new(file), meta.len()))
}

/// Reads `len` bytes at `offset` of `file` on the blocking pool.
async fn read_part(file: &Arc<std::fs::File>, offset: u64, len: u64) -> Result<Bytes> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::from_io(e, format!("cannot read the image at offset {offset}")))?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Unexpected, format!("read task failed: {e}")))?
}

/// Stores the file as the single object `path`.
pub(crate) async fn object(
    store: &Store,
    path: &Path,
    from: &std::path::Path,
    config: &S3Config,
    options: &ImportOptions,
) -> Result<()> {
    let (file, size) = open(from)?;
    // S3 takes at most 10,000 parts: large images get larger parts (whole MiB).
    let part = config
        .part_size
        .bytes()
        .max(MIN_PART)
        .max(size.div_ceil(10_000).next_multiple_of(1 << 20));
    if size <= part {
        let data = read_part(&file, 0, size).await?;
        store.put(path, data).await?;
        options.report(size);
        return Ok(());
    }
    let upload = store.put_multipart(path).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part as usize);
    let result: Result<()> = async {
        let mut offset = 0;
        while offset < size {
            options.check_cancelled()?;
            let len = part.min(size - offset);
            let data = read_part(&file, offset, len).await?;
            writer
                .wait_for_capacity(config.concurrency)
                .await
                .map_err(|e| map_error(e, "upload part", &store.backend, path))?;
            writer.put(data);
            offset += len;
            options.report(offset);
        }
        Ok(())
    }
    .await;
    let result = result.and_then(|()| options.check_cancelled());
    match result {
        Ok(()) => writer
            .finish()
            .await
            .map(drop)
            .map_err(|e| map_error(e, "complete multipart upload", &store.backend, path)),
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(%path, error = %abort, "could not abort the multipart upload");
            }
            Err(e)
        }
    }
}

/// Stores the file as a chunked image under `base`: chunks first, under a new data
/// prefix (all-zero ones are skipped), the manifest last. Returns the manifest it wrote;
/// a failed upload removes the chunks it stored.
pub(crate) async fn chunked(
    store: &Store,
    base: &Path,
    from: &std::path::Path,
    config: &S3Config,
    options: &ImportOptions,
) -> Result<Manifest> {
    let (file, size) = open(from)?;
    let chunk_size = config.chunk_size.bytes();
    if chunk_size == 0 || chunk_size > 1 << 30 {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "backends.{}: chunk_size must be from 1 byte to 1GiB",
                store.backend
            ),
        ));
    }
    let manifest = Manifest::new(size, chunk_size);
    let done = AtomicU64::new(0);
    // After a failure (or an interrupt) no new chunk starts, but the PUTs already running
    // are waited for: one dropped mid-request could still land after the clean-up below
    // and be left behind.
    let failed = AtomicBool::new(false);
    let results: Vec<Result<()>> = futures_util::stream::iter(0..manifest.chunks())
        .map(|index| {
            let (file, manifest, done, failed) = (&file, &manifest, &done, &failed);
            async move {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let result = async {
                    options.check_cancelled()?;
                    let offset = index * manifest.chunk_size;
                    let len = manifest.chunk_len(index);
                    let data = read_part(file, offset, len).await?;
                    if data.iter().any(|&b| b != 0) {
                        store
                            .put(&chunk_path(base, &manifest.data, index, None), data)
                            .await?;
                    }
                    options.report(done.fetch_add(len, Ordering::Relaxed) + len);
                    Ok::<(), Error>(())
                }
                .await;
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                result
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    let stored = results.into_iter().collect::<Result<Vec<()>>>().map(drop);
    let result = match stored {
        Ok(()) => store
            .put(&base.clone().join(MANIFEST), manifest.to_bytes())
            .await
            .map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let prefix = data_prefix(base, &manifest.data);
        let cleaned = async {
            for meta in store.list_all(&prefix).await? {
                store.delete(&meta.location).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(clean) = cleaned.await {
            tracing::warn!(%prefix, error = %clean, "could not remove the chunks of a failed import");
        }
        return Err(e);
    }
    Ok(manifest)
}
