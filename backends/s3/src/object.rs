//! The one-object layout: an image is one object, read with range GETs.

use std::sync::Arc;

use futures_util::future::try_join_all;
use object_store::path::Path;
use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, Error, ErrorKind, Extent, ExtentKind, Geometry,
    ReadOpts, Result, SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range, read_only_error,
};

use crate::store::Store;

/// One object, served read-only.
#[derive(Debug)]
pub(crate) struct ObjectSource {
    pub info: SourceInfo,
    pub store: Arc<Store>,
    pub path: Path,
    /// Sent as `If-Match`, so a replaced object fails reads instead of mixing versions.
    pub etag: Option<String>,
    /// Reads larger than this become parallel range GETs of this size.
    pub part_size: u64,
}

/// Splits `offset..offset+len` into pieces of at most `part` bytes.
pub(crate) fn split(offset: u64, len: u64, part: u64) -> Vec<std::ops::Range<u64>> {
    let end = offset + len;
    let mut pieces = Vec::with_capacity(len.div_ceil(part) as usize);
    let mut at = offset;
    while at < end {
        let next = (at + part).min(end);
        pieces.push(at..next);
        at = next;
    }
    pieces
}

#[async_trait]
impl BlockSource for ObjectSource {
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
        if len == 0 {
            return Ok(Chunks::new());
        }
        let reads = split(offset, len as u64, self.part_size)
            .into_iter()
            .map(|range| async {
                self.store
                    .get_range(&self.path, range, self.info.size, self.etag.as_deref())
                    .await?
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "S3 object {} is gone (deleted while being served)",
                                self.path
                            ),
                        )
                        .with_op("read_at")
                        .with_context("backend", &self.store.backend)
                    })
            });
        let parts: Vec<Bytes> = try_join_all(reads).await?;
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
        check_range(&self.info, "extents", offset, len)?;
        Ok(vec![Extent {
            length: len,
            kind: ExtentKind::Data,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_covers_the_range_in_order() {
        assert_eq!(split(0, 10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(split(5, 3, 8), vec![5..8]);
        assert_eq!(split(8, 8, 8), vec![8..16]);
    }
}
