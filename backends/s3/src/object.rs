//! The one-object layout: an image is one object, read with range GETs.
//!
//! Reads waiting for one of the backend's request slots are coalesced: whoever gets a
//! slot takes the oldest waiting read plus every waiting read adjacent to or overlapping
//! it (up to `part_size` in all), fetches them with one GET and hands each reader its
//! slice of the body. A sequential client with many requests in flight (nbdcopy, a
//! booting OS reading ahead) thus costs a few large GETs instead of many small ones,
//! which is what object stores charge for in time and money; a lone read is not delayed.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use futures_util::future::try_join_all;
use object_store::path::Path;
use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, Error, ErrorKind, Extent, Geometry, ReadOpts, Result,
    SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range, read_only_error,
};
use tokio::sync::oneshot;

use crate::store::Store;

/// One read waiting for a GET.
#[derive(Debug)]
struct Waiter {
    range: Range<u64>,
    reply: oneshot::Sender<Result<Bytes>>,
}

/// One object, served read-only.
#[derive(Debug)]
pub(crate) struct ObjectSource {
    info: SourceInfo,
    store: Arc<Store>,
    path: Path,
    /// Sent as `If-Match`, so a replaced object fails reads instead of mixing versions.
    etag: Option<String>,
    /// Reads larger than this become parallel range GETs of this size, and coalesced
    /// GETs never grow beyond it.
    part_size: u64,
    waiting: Mutex<Vec<Waiter>>,
}

impl ObjectSource {
    pub fn new(
        info: SourceInfo,
        store: Arc<Store>,
        path: Path,
        etag: Option<String>,
        part_size: u64,
    ) -> ObjectSource {
        ObjectSource {
            info,
            store,
            path,
            etag,
            part_size,
            waiting: Mutex::new(Vec::new()),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the oldest waiting read and every waiting read that touches the growing
    /// range, up to `part_size` bytes in all.
    fn take_batch(&self) -> Option<(Range<u64>, Vec<Waiter>)> {
        let mut waiting = self.waiting();
        // Reads whose reader went away (client disconnected) are not fetched.
        waiting.retain(|w| !w.reply.is_closed());
        if waiting.is_empty() {
            return None;
        }
        let first = waiting.remove(0);
        let mut span = first.range.clone();
        let mut batch = vec![first];
        loop {
            let before = batch.len();
            let mut i = 0;
            while i < waiting.len() {
                let r = &waiting[i].range;
                let start = span.start.min(r.start);
                let end = span.end.max(r.end);
                if r.start <= span.end && r.end >= span.start && end - start <= self.part_size {
                    span = start..end;
                    batch.push(waiting.remove(i));
                } else {
                    i += 1;
                }
            }
            if batch.len() == before {
                return Some((span, batch));
            }
        }
    }

    /// Reads one range (at most `part_size`), coalesced with other waiting reads.
    async fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        let (reply, mut answer) = oneshot::channel();
        self.waiting().push(Waiter {
            range: range.clone(),
            reply,
        });
        loop {
            tokio::select! {
                biased;
                result = &mut answer => match result {
                    Ok(result) => return result,
                    // The reader that took this read was cancelled mid-GET: queue again.
                    Err(_) => {
                        let (reply, again) = oneshot::channel();
                        answer = again;
                        self.waiting().push(Waiter { range: range.clone(), reply });
                    }
                },
                slot = self.store.permit() => {
                    let Some((span, batch)) = self.take_batch() else {
                        // Another reader took this read along with its own: wait for
                        // it, and queue again if that reader was cancelled.
                        drop(slot);
                        match (&mut answer).await {
                            Ok(result) => return result,
                            Err(_) => {
                                let (reply, again) = oneshot::channel();
                                answer = again;
                                self.waiting().push(Waiter { range: range.clone(), reply });
                                continue;
                            }
                        }
                    };
                    let result = self
                        .store
                        .get_range_holding_slot(&self.path, span.clone(), self.info.size, self.etag.as_deref())
                        .await
                        .and_then(|body| body.ok_or_else(|| self.gone()));
                    drop(slot);
                    // With several readers, each gets a copy of its part: a slice would
                    // keep the whole body alive for as long as any part is cached.
                    let several = batch.len() > 1;
                    for waiter in batch {
                        let share = match &result {
                            Ok(body) if several => Ok(Bytes::copy_from_slice(&body[
                                (waiter.range.start - span.start) as usize
                                    ..(waiter.range.end - span.start) as usize
                            ])),
                            Ok(body) => Ok(body.slice(
                                (waiter.range.start - span.start) as usize
                                    ..(waiter.range.end - span.start) as usize,
                            )),
                            Err(e) => Err(e.clone()),
                        };
                        let _ = waiter.reply.send(share);
                    }
                }
            }
        }
    }

    fn gone(&self) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "S3 object {} is gone (deleted while being served)",
                self.path
            ),
        )
        .with_op("read_at")
        .with_context("backend", &self.store.backend)
    }
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
            .map(|range| self.read_range(range));
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
        osstream_core::all_data(&self.info, offset, len)
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
