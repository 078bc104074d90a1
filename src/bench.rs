//! `osstream bench cache`: replays boot traces against the RAM tier's eviction policies
//! and reports hit ratio, backend reads and backend bytes for each policy and capacity.
//!
//! A trace (written by the server with `[profile] trace_dir`, or by hand) is one
//! `MICROSECONDS OFFSET LENGTH` line per read of one client, after `#` comment lines; a
//! `# ... size=BYTES` header gives the image size. Several traces, or several staggered
//! copies of one (`FILE=N`), are merged by time: clients of one image sharing one cache,
//! as a lab does. The replay goes through the real tier ([`RamTier`]) with the cache
//! layer's rules: reads split into aligned blocks, adjacent missing blocks of one read
//! fetched with one backend read.

use std::path::{Path, PathBuf};

use osstream_core::{
    BlockKey, ByteSize, Bytes, CacheTier, Error, ErrorKind, EvictionPolicy, RamTier, Result,
};
use serde::Serialize;

use crate::output::output;

/// One read of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Read {
    at_us: u64,
    offset: u64,
    len: u64,
}

/// A parsed trace file.
#[derive(Debug)]
struct Trace {
    name: String,
    reads: Vec<Read>,
}

fn parse_trace(path: &Path) -> Result<Trace> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::from_io(e, format!("cannot read trace {}", path.display())))?;
    let mut reads = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad_line(path, number, line))?;
        let [at_us, offset, len] = fields[..] else {
            return Err(bad_line(path, number, line));
        };
        // One read is at most 1 GiB and ends before 2^62: a trace cannot make the
        // replay loop for ever or overflow.
        if len > 1 << 30
            || offset.checked_add(len).is_none_or(|end| end > 1 << 62)
            || at_us > 1 << 62
        {
            return Err(bad_line(path, number, line));
        }
        reads.push(Read { at_us, offset, len });
    }
    if reads.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("trace {} has no reads", path.display()),
        ));
    }
    Ok(Trace {
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        reads,
    })
}

fn bad_line(path: &Path, number: usize, line: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{}:{}: {line:?} is not a read: expected MICROSECONDS OFFSET LENGTH",
            path.display(),
            number + 1
        ),
    )
}

/// What one replay counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Outcome {
    /// Blocks found in the cache.
    pub hits: u64,
    /// Blocks read from the backend.
    pub misses: u64,
    /// Backend read calls (adjacent misses of one read share one).
    pub backend_reads: u64,
    /// Bytes read from the backend.
    pub backend_bytes: u64,
    /// Blocks evicted.
    pub evictions: u64,
}

/// Replays `reads` (sorted by time) through a fresh tier of `policy` and `capacity`.
async fn replay(reads: &[Read], policy: EvictionPolicy, capacity: u64, block: u64) -> Outcome {
    let tier = RamTier::with_policy(capacity, policy);
    let filler = Bytes::from(vec![0u8; block as usize]);
    let mut outcome = Outcome::default();
    for read in reads {
        if read.len == 0 {
            continue;
        }
        let first = read.offset / block;
        let last = (read.offset + read.len - 1) / block;
        let mut run = 0u64;
        for number in first..=last {
            let key = BlockKey {
                image: 1,
                generation: 1,
                block: number,
            };
            if tier.get(&key).await.ok().flatten().is_some() {
                outcome.hits += 1;
                if run > 0 {
                    outcome.backend_reads += 1;
                    run = 0;
                }
            } else {
                outcome.misses += 1;
                outcome.backend_bytes += block;
                run += 1;
                let _ = tier.put(key, filler.clone()).await;
            }
        }
        if run > 0 {
            outcome.backend_reads += 1;
        }
    }
    outcome.evictions = tier.stats().evictions;
    outcome
}

/// `FILE` or `FILE=N` (N staggered copies).
fn trace_arg(arg: &str) -> Result<(PathBuf, u32)> {
    match arg.rsplit_once('=') {
        Some((file, copies)) => {
            let copies: u32 = copies.parse().map_err(|_| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("--trace {arg}: the number of copies after '=' must be a number"),
                )
            })?;
            Ok((PathBuf::from(file), copies.max(1)))
        }
        None => Ok((PathBuf::from(arg), 1)),
    }
}

/// One row of the report.
#[derive(Debug, Serialize)]
struct Row {
    policy: &'static str,
    capacity: u64,
    hit_ratio: f64,
    #[serde(flatten)]
    outcome: Outcome,
}

/// Runs `osstream bench cache`.
pub async fn cache(args: &crate::args::BenchCache, json: bool) -> Result<()> {
    let block = args.block_size.bytes();
    if block == 0 || !block.is_power_of_two() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("--block-size {} must be a power of two", args.block_size),
        ));
    }
    /// Reads replayed at most (a few hundred MiB of memory): a typo in a copy count must
    /// not take the machine's memory.
    const MAX_READS: u64 = 20_000_000;
    let mut reads = Vec::new();
    let mut described = Vec::new();
    for arg in &args.trace {
        let (path, copies) = trace_arg(arg)?;
        let trace = parse_trace(&path)?;
        let total = reads.len() as u64 + trace.reads.len() as u64 * u64::from(copies);
        if total > MAX_READS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "--trace {arg}: {total} reads in all; at most {MAX_READS} are replayed (fewer copies)"
                ),
            ));
        }
        for copy in 0..u64::from(copies) {
            let shift = copy.saturating_mul(args.stagger.0.as_micros() as u64);
            reads.extend(trace.reads.iter().map(|r| Read {
                at_us: r.at_us.saturating_add(shift),
                ..*r
            }));
        }
        described.push(if copies > 1 {
            format!("{} x{copies}", trace.name)
        } else {
            trace.name
        });
    }
    reads.sort_by_key(|r| r.at_us);
    let policies: Vec<EvictionPolicy> = args
        .policy
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for capacity in &args.capacity {
        for &policy in &policies {
            let outcome = replay(&reads, policy, capacity.bytes(), block).await;
            let total = outcome.hits + outcome.misses;
            rows.push(Row {
                policy: policy.name(),
                capacity: capacity.bytes(),
                hit_ratio: if total == 0 {
                    0.0
                } else {
                    outcome.hits as f64 / total as f64
                },
                outcome,
            });
        }
    }
    let distinct: std::collections::HashSet<u64> = reads
        .iter()
        .flat_map(|r| r.offset / block..=(r.offset + r.len.max(1) - 1) / block)
        .collect();
    if !json {
        println!(
            "{} reads from {}; {} distinct blocks of {} ({}): the least any cache reads",
            reads.len(),
            described.join(", "),
            distinct.len(),
            ByteSize(block).human(),
            ByteSize(distinct.len() as u64 * block).human()
        );
    }
    let table = rows
        .iter()
        .map(|row| {
            vec![
                row.policy.to_owned(),
                ByteSize(row.capacity).human(),
                format!("{:.1}%", 100.0 * row.hit_ratio),
                row.outcome.backend_reads.to_string(),
                ByteSize(row.outcome.backend_bytes).human(),
                row.outcome.evictions.to_string(),
            ]
        })
        .collect();
    output(
        json,
        &rows,
        &[
            "POLICY",
            "CAPACITY",
            "HIT RATIO",
            "BACKEND READS",
            "BACKEND BYTES",
            "EVICTIONS",
        ],
        table,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(blocks: &[u64]) -> Vec<Read> {
        blocks
            .iter()
            .enumerate()
            .map(|(n, b)| Read {
                at_us: n as u64,
                offset: b * 4096,
                len: 4096,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_replay_counts_hits_misses_and_joined_backend_reads() {
        let mut trace = reads(&[0, 1, 0, 1]);
        trace.push(Read {
            at_us: 9,
            offset: 0,
            len: 4 * 4096,
        });
        let outcome = replay(&trace, EvictionPolicy::Clock, 1 << 20, 4096).await;
        // 0 and 1 miss once each; then 0,1 hit twice; the long read hits 0,1 and misses
        // 2,3 in one backend read.
        assert_eq!(
            (outcome.hits, outcome.misses, outcome.backend_reads),
            (4, 4, 3)
        );
        assert_eq!(outcome.backend_bytes, 4 * 4096);
    }

    #[test]
    fn trace_files_parse_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("boot.trace");
        std::fs::write(
            &good,
            "# osstream boot trace 1\n# vdisk=x size=1\n0 0 4096\n15 8192 512\n",
        )
        .unwrap();
        let trace = parse_trace(&good).unwrap();
        assert_eq!(trace.reads.len(), 2);
        assert_eq!(
            trace.reads[1],
            Read {
                at_us: 15,
                offset: 8192,
                len: 512
            }
        );
        let bad = dir.path().join("bad.trace");
        std::fs::write(&bad, "0 0 4096\n1 2\n").unwrap();
        let err = parse_trace(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.trace:2"), "{err}");
        assert_eq!(
            trace_arg("a.trace=20").unwrap(),
            (PathBuf::from("a.trace"), 20)
        );
        assert!(trace_arg("a.trace=x").is_err());
    }
}
