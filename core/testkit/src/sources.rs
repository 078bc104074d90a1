use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use osstream_core::{
    BlockSource, Capability, Chunks, DynSource, Error, ErrorKind, Extent, Geometry, ReadOpts,
    Result, SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range, read_only_error,
};

/// Deterministic, non-repeating test content: `len` bytes from a seeded xorshift stream.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image held in memory. Writable sources support every operation.
pub struct MemSource {
    info: SourceInfo,
    data: Mutex<Vec<u8>>,
    writable: bool,
}

impl fmt::Debug for MemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSource")
            .field("info", &self.info)
            .field("writable", &self.writable)
            .finish()
    }
}

impl MemSource {
    /// A read-only image named `name` holding `data`.
    pub fn new(name: &str, data: Vec<u8>) -> Self {
        MemSource {
            info: SourceInfo {
                name: name.to_owned(),
                identity: format!("mem:{name}"),
                size: data.len() as u64,
                generation: "mem-1".into(),
            },
            data: Mutex::new(data),
            writable: false,
        }
    }

    /// A writable image named `name` holding `data`.
    pub fn writable(name: &str, data: Vec<u8>) -> Self {
        MemSource {
            writable: true,
            ..MemSource::new(name, data)
        }
    }

    /// The same source under another identity (the same image name on other storage).
    pub fn with_identity(mut self, identity: &str) -> Self {
        self.info.identity = identity.to_owned();
        self
    }

    /// The same source under another generation string (an image that changed).
    pub fn renamed_generation(mut self, generation: &str) -> Self {
        self.info.generation = generation.to_owned();
        self
    }

    /// A copy of the current content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(read_only_error(&self.info, op))
        }
    }
}

#[async_trait]
impl BlockSource for MemSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        if self.writable {
            Capability {
                write: true,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                extents: false,
                multi_conn: true,
                rotational: false,
            }
        } else {
            Capability::read_only()
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry::default()
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        let data = self.data.lock().unwrap();
        let start = offset as usize;
        Ok(Chunks::from(Bytes::copy_from_slice(
            &data[start..start + len],
        )))
    }

    async fn write_at(&self, offset: u64, bytes: Bytes, _opts: WriteOpts) -> Result<()> {
        self.check_writable("write_at")?;
        check_range(&self.info, "write_at", offset, bytes.len() as u64)?;
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + bytes.len()].copy_from_slice(&bytes);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("trim")?;
        check_range(&self.info, "trim", offset, len)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _opts: ZeroOpts) -> Result<()> {
        self.check_writable("write_zeroes")?;
        check_range(&self.info, "write_zeroes", offset, len)?;
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + len as usize].fill(0);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        osstream_core::all_data(&self.info, offset, len)
    }
}

/// Forwards everything to `inner` and instruments reads: counts them (and their bytes),
/// delays each by a fixed time (a slow backend or a high-latency link; reads marked
/// [`ReadOpts::prefetch`] may get a delay of their own), and fails every n-th one with a
/// temporary I/O error (a flaky backend).
///
/// ```
/// # use std::{sync::Arc, time::Duration};
/// # use osstream_testkit::{InstrumentedSource, MemSource};
/// let slow_and_flaky = InstrumentedSource::builder(Arc::new(MemSource::new("x", vec![1; 4096])))
///     .delay(Duration::from_millis(1))
///     .fail_every(3)
///     .build();
/// assert_eq!(slow_and_flaky.reads(), 0);
/// ```
#[derive(Debug)]
pub struct InstrumentedSource {
    inner: DynSource,
    delay: Duration,
    prefetch_delay: Duration,
    fail_every: u64,
    stalled_writes: u64,
    write_stall: Duration,
    writes: AtomicU64,
    reads: AtomicU64,
    prefetch_reads: AtomicU64,
    reading: AtomicU64,
    peak_reading: AtomicU64,
    bytes: AtomicU64,
}

/// Builds an [`InstrumentedSource`].
#[derive(Debug)]
pub struct InstrumentedBuilder {
    inner: DynSource,
    delay: Duration,
    prefetch_delay: Option<Duration>,
    fail_every: u64,
    stalled_writes: u64,
    write_stall: Duration,
}

impl InstrumentedBuilder {
    /// Every read waits `delay` before it reaches the inner source.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Reads marked [`ReadOpts::prefetch`] wait `delay` instead of the one set by
    /// [`InstrumentedBuilder::delay`]: a backend whose speculative reads are long ones.
    pub fn prefetch_delay(mut self, delay: Duration) -> Self {
        self.prefetch_delay = Some(delay);
        self
    }

    /// Every `n`-th read (1-based, over all reads) fails with a temporary I/O error.
    pub fn fail_every(mut self, n: u64) -> Self {
        self.fail_every = n;
        self
    }

    /// The first `count` writes wait `stall` before they reach the inner source (writes
    /// stuck in a backend while newer ones arrive).
    pub fn stall_writes(mut self, count: u64, stall: Duration) -> Self {
        self.stalled_writes = count;
        self.write_stall = stall;
        self
    }

    /// The source.
    pub fn build(self) -> Arc<InstrumentedSource> {
        Arc::new(InstrumentedSource {
            inner: self.inner,
            delay: self.delay,
            prefetch_delay: self.prefetch_delay.unwrap_or(self.delay),
            fail_every: self.fail_every,
            stalled_writes: self.stalled_writes,
            write_stall: self.write_stall,
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            prefetch_reads: AtomicU64::new(0),
            reading: AtomicU64::new(0),
            peak_reading: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }
}

impl InstrumentedSource {
    /// Starts building a wrapper around `inner` that, as built, only counts.
    pub fn builder(inner: DynSource) -> InstrumentedBuilder {
        InstrumentedBuilder {
            inner,
            delay: Duration::ZERO,
            prefetch_delay: None,
            fail_every: 0,
            stalled_writes: 0,
            write_stall: Duration::ZERO,
        }
    }

    /// A wrapper that counts the reads reaching `inner`, each delayed by `delay`.
    pub fn counting(inner: DynSource, delay: Duration) -> Arc<Self> {
        Self::builder(inner).delay(delay).build()
    }

    /// Reads that reached this source (failed ones included).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Reads marked [`ReadOpts::prefetch`] that reached this source (counted in
    /// [`InstrumentedSource::reads`] too).
    pub fn prefetch_reads(&self) -> u64 {
        self.prefetch_reads.load(Ordering::SeqCst)
    }

    /// The most reads that were in progress here at once.
    pub fn peak_concurrent_reads(&self) -> u64 {
        self.peak_reading.load(Ordering::SeqCst)
    }

    /// Bytes requested through this source.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// Counts one read of an [`InstrumentedSource`] as in progress until dropped (when the read
/// returns or is cancelled).
struct ReadInProgress<'a>(&'a InstrumentedSource);

impl<'a> ReadInProgress<'a> {
    fn start(source: &'a InstrumentedSource) -> Self {
        let reading = source.reading.fetch_add(1, Ordering::SeqCst) + 1;
        source.peak_reading.fetch_max(reading, Ordering::SeqCst);
        ReadInProgress(source)
    }
}

impl Drop for ReadInProgress<'_> {
    fn drop(&mut self) {
        self.0.reading.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl BlockSource for InstrumentedSource {
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        self.bytes.fetch_add(len as u64, Ordering::SeqCst);
        let _reading = ReadInProgress::start(self);
        let delay = if opts.prefetch {
            self.prefetch_reads.fetch_add(1, Ordering::SeqCst);
            self.prefetch_delay
        } else {
            self.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.fail_every > 0 && n.is_multiple_of(self.fail_every) {
            return Err(
                Error::new(ErrorKind::Io, format!("injected fault on read #{n}"))
                    .set_temporary()
                    .with_op("read_at")
                    .with_context("offset", offset),
            );
        }
        self.inner.read_at(offset, len, opts).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if self.writes.fetch_add(1, Ordering::SeqCst) < self.stalled_writes {
            tokio::time::sleep(self.write_stall).await;
        }
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}
