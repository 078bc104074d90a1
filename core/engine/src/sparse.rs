//! Finding the data in a buffer, so copies can leave zero runs as holes.

use std::ops::Range;

/// The granule [`data_runs`] is usually called with: small enough to keep the holes of
/// typical file systems, large enough that the scan costs little.
pub const HOLE_GRANULE: usize = 64 * 1024;

/// The ranges of `bytes` that hold data, at `granule` resolution: every granule that is
/// not all zeroes, adjacent ones merged. Writing only these ranges into a sparse file
/// reproduces `bytes` with the zero granules left as holes.
pub fn data_runs(bytes: &[u8], granule: usize) -> Vec<Range<usize>> {
    let granule = granule.max(1);
    let mut runs: Vec<Range<usize>> = Vec::new();
    for start in (0..bytes.len()).step_by(granule) {
        let end = (start + granule).min(bytes.len());
        if bytes[start..end].iter().all(|&b| b == 0) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::data_runs;

    #[test]
    fn zero_granules_are_skipped_and_data_merged() {
        let mut bytes = vec![0u8; 10];
        assert!(data_runs(&bytes, 4).is_empty());
        bytes[1] = 1;
        bytes[5] = 1;
        bytes[9] = 1;
        assert_eq!(data_runs(&bytes, 4), vec![0..10]);
        bytes[5] = 0;
        assert_eq!(data_runs(&bytes, 4), vec![0..4, 8..10]);
        assert_eq!(data_runs(&[], 4), vec![]);
    }
}
