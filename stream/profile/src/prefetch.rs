//! Streaming a boot set ahead of the client.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use osstream_core::{CancellationToken, DynSource, ReadOpts};
use tokio::task::JoinSet;

use crate::layer::Counters;

/// Turns a boot set (blocks in the order a boot reads them) into backend reads: the
/// blocks are taken `window` bytes at a time (that much is in flight at once anyway, so
/// order inside it does not matter), and neighbours inside a window are joined into reads
/// of at most `read_size` bytes, never reading a byte outside the boot set or past `size`.
/// Returns `(offset, length)` pairs in the order to read them.
pub fn coalesce(
    boot_set: impl IntoIterator<Item = u64>,
    block_size: u64,
    read_size: u64,
    window: u64,
    size: u64,
) -> Vec<(u64, u64)> {
    let per_window = (window / block_size).max(1) as usize;
    let per_read = (read_size / block_size).max(1);
    let mut reads = Vec::new();
    let mut blocks: Vec<u64> = boot_set
        .into_iter()
        .filter(|b| b.saturating_mul(block_size) < size)
        .collect();
    for chunk in blocks.chunks_mut(per_window) {
        chunk.sort_unstable();
        let mut run: Option<(u64, u64)> = None; // (first block, blocks)
        for &block in chunk.iter() {
            run = match run {
                Some((first, count)) if first + count == block && count < per_read => {
                    Some((first, count + 1))
                }
                Some((first, count)) if first + count > block => Some((first, count)), // duplicate
                Some(done) => {
                    reads.push(extent(done, block_size, size));
                    Some((block, 1))
                }
                None => Some((block, 1)),
            };
        }
        if let Some(done) = run {
            reads.push(extent(done, block_size, size));
        }
    }
    reads
}

fn extent((first, count): (u64, u64), block_size: u64, size: u64) -> (u64, u64) {
    let offset = first * block_size;
    (offset, (count * block_size).min(size - offset))
}

/// Reads `reads` through `source` as prefetch, `depth` at a time, until done or
/// `cancel`led. Failures are counted and skipped: a demand read will try again.
pub(crate) async fn stream(
    source: DynSource,
    reads: Vec<(u64, u64)>,
    depth: usize,
    cancel: CancellationToken,
    counters: Arc<Counters>,
    label: String,
) {
    let started = Instant::now();
    let total: u64 = reads.iter().map(|r| r.1).sum();
    let mut pending = reads.into_iter();
    let mut running = JoinSet::new();
    let (mut done_bytes, mut failed) = (0u64, 0u64);
    loop {
        while running.len() < depth.max(1) {
            let Some((offset, len)) = pending.next() else {
                break;
            };
            let source = source.clone();
            running.spawn(async move {
                let opts = ReadOpts { prefetch: true };
                source
                    .read_at(offset, len as usize, opts)
                    .await
                    .map(|_| len)
            });
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            next = running.join_next() => next,
        };
        match next {
            None => break,
            Some(Ok(Ok(len))) => {
                done_bytes += len;
                counters.prefetch_reads.fetch_add(1, Ordering::Relaxed);
                counters.prefetch_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Some(Ok(Err(err))) => {
                failed += 1;
                counters.prefetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%label, %err, "a prefetch read failed; demand reads will try again");
            }
            Some(Err(err)) => {
                failed += 1;
                tracing::warn!(%label, %err, "a prefetch read task failed");
            }
        }
    }
    running.abort_all();
    let stopped = cancel.is_cancelled();
    tracing::info!(
        %label,
        bytes = done_bytes,
        of = total,
        failed,
        ms = started.elapsed().as_millis() as u64,
        "boot set prefetch {}",
        if stopped { "stopped: the client left" } else { "done" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_join_up_to_the_read_size_inside_a_window() {
        // Blocks of 1 unit; reads of 4; windows of 8.
        let reads = coalesce([5, 1, 2, 3, 4, 9, 10, 30, 31, 32], 1, 4, 8, 100);
        assert_eq!(
            reads,
            vec![(1, 4), (5, 1), (9, 2), (30, 1), (31, 2)],
            "the first window holds 5,1,2,3,4,9,10,30; 31 and 32 are in the second"
        );
    }

    #[test]
    fn windows_keep_the_boot_order_and_the_end_is_clipped() {
        let reads = coalesce([8, 9, 0, 1], 4096, 1 << 20, 2 * 4096, 9 * 4096 + 100);
        assert_eq!(reads, vec![(8 * 4096, 4096 + 100), (0, 2 * 4096)]);
        assert!(coalesce([50], 4096, 8192, 8192, 4096).is_empty());
    }
}
